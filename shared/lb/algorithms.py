"""The ``balance`` setting's names and the selector each one builds.

:func:`make_selector` is what the load balancer calls in ``configure``, once per upstream, with
the upstream's members and its counters (shared ones in a worker, local ones elsewhere), so that
the names in the config and the classes meet in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from shared.lb.fleet import Load, Turns
from shared.lb.ketama import ConsistentHash
from shared.lb.least_conn import LeastConn
from shared.lb.members import Balanced, Members
from shared.lb.weighted import FleetRoundRobin, WeightedRandom

T = TypeVar("T")

#: The values of ``upstreams.<name>.balance``, the default first.
BALANCE_NAMES = ("round_robin", "random", "least_conn", "hash")


def make_selector(
    balance: str,
    members: Members[T],
    turns: Turns | None = None,
    load: Load | None = None,
    addresses: Sequence[tuple[str, int]] | None = None,
) -> Balanced[T]:
    """The selector ``balance`` names, over ``members``, counting with ``turns`` and (for
    ``least_conn``) ``load``; ``addresses`` are what ``hash`` hashes (default: the peers'
    addresses). Raises ``ValueError`` naming the choices for an unknown ``balance``."""
    if balance == "round_robin":
        return FleetRoundRobin(members, turns)
    if balance == "random":
        return WeightedRandom(members)
    if balance == "least_conn":
        return LeastConn(members, load, turns)
    if balance == "hash":
        return ConsistentHash(members, addresses, turns)
    raise ValueError(f"{balance!r}: expected one of {', '.join(BALANCE_NAMES)}")
