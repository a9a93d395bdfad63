"""Load balancing as a library: selection algorithms that apps and the built-in load balancer
(:mod:`shared.apps.load_balancer`) use. This package knows nothing about apps.

Today there is one algorithm, :class:`RoundRobin`, behind the :class:`Selector` interface:
``select(key)`` for the member that serves a request, ``iter(key)`` for the failover order.
"""

from shared.lb.selection import RoundRobin, Selector

__all__ = ["RoundRobin", "Selector"]
