"""The upstream protocols: ``h1`` (one HTTP/1.1 connection, httptools' response parser) and
``h2`` (HTTP/2 streams on ``h2``'s client). Each implements
:class:`~worker.interfaces.Upstream`: it encodes its own request head and body, and says what a
failure it reported means (:meth:`~worker.interfaces.Upstream.failure`)."""
