"""Tenaya's data plane: the worker process, in layers that meet at worker/interfaces.py.

- ``process``: boot, the event loop, the listeners, heartbeats, drain.
- ``server/``: the downstream protocols (HTTP/1.1, HTTP/2, the 101 tunnel, the choice between
  them): bytes in, a :class:`~shared.session.Session` to the engine, the response out.
- ``h2/``: the HTTP/2 server codec (frames, HPACK, fields, flow control).
- ``proxy/``: the engine, which drives the app's phases in Pingora's order.
- ``connector/``: ``acquire(peer) -> (Upstream, reused)``: the pools, the broker, new
  connections.
- ``client/``: the upstream protocols (HTTP/1.1, HTTP/2).

A layer imports the interfaces and the layers below it (``client`` and ``server`` below
``connector``, below ``proxy``, below ``process``), never a sibling's classes; ``http``,
``tls``, ``accesslog``, ``log_throttle`` and ``accept_limit`` are leaves any of them may use,
above ``h2`` and ``interfaces``. Only ``process`` uses ``server``, and ``proxy`` and
``process`` reach ``client`` through ``connector``. The import contracts in pyproject.toml
check all of it (``lint-imports``).
"""
