"""The phase driver: :class:`~worker.proxy.engine.Engine` runs an app's phases for each request,
in Pingora's order, with one retry loop, and never branches on a protocol version."""
