"""Load balancing as a library: selection algorithms that apps and the built-in load balancer
(:mod:`shared.apps.load_balancer`) use. This package knows nothing about apps.

Every algorithm is behind the :class:`Selector` interface: ``select(key)`` for the member that
serves a request, ``iter(key)`` for the failover order. :class:`RoundRobin` rotates per worker;
the fleet algorithms count in shared memory (:mod:`shared.shm.balance`) through
:class:`Turns` and :class:`Load`, and take their members, weights, backups and usable mask
from :class:`Members`:

- :class:`FleetRoundRobin`: ``round_robin``, smooth weighted, in turn across the fleet;
- :class:`WeightedRandom`: ``random``;
- :class:`LeastConn`: ``least_conn``, fewest in flight across the fleet;
- :class:`ConsistentHash`: ``hash``, a Ketama ring mapping keys as nginx and Pingora do, with
  :func:`key_function` for ``hash_key``.

:func:`ramp_weights` is slow start; :func:`make_selector` builds the selector a ``balance``
name means.
"""

from shared.lb.algorithms import BALANCE_NAMES, make_selector
from shared.lb.fleet import Load, Turns
from shared.lb.ketama import ConsistentHash, Ring
from shared.lb.keys import key_function
from shared.lb.least_conn import LeastConn
from shared.lb.members import Members, smooth_weighted
from shared.lb.selection import RoundRobin, Selector
from shared.lb.slow_start import ramp_weights
from shared.lb.weighted import FleetRoundRobin, WeightedRandom

__all__ = [
    "BALANCE_NAMES",
    "ConsistentHash",
    "FleetRoundRobin",
    "LeastConn",
    "Load",
    "Members",
    "RoundRobin",
    "Ring",
    "Selector",
    "Turns",
    "WeightedRandom",
    "key_function",
    "make_selector",
    "ramp_weights",
    "smooth_weighted",
]
