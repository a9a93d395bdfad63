"""The downstream protocols: a client's bytes to a :class:`~shared.session.Session` for the
engine, and the response back (``h1``: HTTP/1.1 on httptools; ``h2``: HTTP/2 on Tenaya's own
codec, worker/h2/; ``exchange``: what both do with the upstream; ``select``: which of them
serves a connection)."""
