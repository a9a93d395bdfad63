"""Tenaya's HTTP/2 server codec, sans I/O: frames and stream states (``codec``), HPACK
(``hpack``), the request fields' rules (``fields``), sending within flow-control windows
(``flow``, which the upstream HTTP/2 client uses too)."""
