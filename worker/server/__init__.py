"""The downstream protocols: a client's bytes to a :class:`~shared.session.Session` for the
engine, and the response back (``h1``: HTTP/1.1 on httptools, its connection state an enum with
one transition table; ``h2``: HTTP/2 on Tenaya's own codec, worker/h2/; ``exchange``: what both
do with the upstream; ``flow``: the backpressure both use; ``tunnel``: the byte tunnel after an
HTTP/1.1 upgrade; ``select``: which protocol serves a connection)."""
