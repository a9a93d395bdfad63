"""Tenaya's HTTP/2 server codec, sans I/O: frames (``codec``), the stream states and their
transition table (``states``), HPACK (``hpack``), the request fields' rules (``fields``),
sending within flow-control windows (``flow``, which the upstream HTTP/2 client uses too)."""
