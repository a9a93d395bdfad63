"""Upstream connections for the engine: ``Connector.acquire(peer) -> (Upstream, reused)``.

The local pool first (HTTP/1.1: an idle connection; HTTP/2: a stream on a live connection with
room), then the pool broker (another worker's idle connection), then a new connection, whose
failure is classified here as a :class:`~shared.errors.ProxyError`. aiohttp's
``BaseConnector.connect`` and Pingora's ``get_http_session`` are the model: the engine never
pools, and never sees a socket error.
"""
