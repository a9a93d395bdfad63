"""Built-in apps: ordinary :class:`~shared.app.ProxyHttp` subclasses, made of the same parts an
app would use (:mod:`shared.lb`), and loaded by name like any app.

Each is imported here, so that importing this package (as a worker does before it switches to
``server.user``, who may not be able to read these files) imports them all.
"""

from shared.apps.load_balancer import LoadBalancer

__all__ = ["LoadBalancer"]
