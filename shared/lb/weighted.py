"""Round robin over the fleet, and weighted random.

:class:`FleetRoundRobin` is ``balance: round_robin``. It indexes the smooth weighted schedule
(:func:`~shared.lb.members.smooth_weighted`) with the fleet's turn
(:class:`~shared.lb.fleet.Turns`: the sum of every worker's counter in the shared table), so
consecutive requests go to consecutive entries of the schedule whichever worker takes them:
with weights all 1, plain rotation across the fleet; with weights, nginx's spread (5, 1, 1:
a a b a c a a), never a burst to one server. Two workers that read the same turn at the same
moment send those two requests to the same server; the rotation goes on from the next turn.

:class:`WeightedRandom` is ``balance: random``: a uniform draw from the same schedule, so each
member is chosen in proportion to its weight.

Both skip members the usable mask marks down and apply the backup rule
(:mod:`shared.lb.members`). The fast path checks only the member picked; when it is unusable
the selector turns to the schedule of the members usable now and keeps recomputing it, once
per selection, until every primary is usable again.
"""

from __future__ import annotations

import random
from typing import TypeVar

from shared.lb.fleet import Turns
from shared.lb.members import Balanced, Members

T = TypeVar("T")


class FleetRoundRobin(Balanced[T]):
    """Smooth weighted round robin indexed by the fleet's turn.

    ``FleetRoundRobin(Members(peers, weights), Turns.shared(slot, upstream))`` in a worker;
    ``Turns.local()`` (the default) for one process. The key is ignored.
    """

    __slots__ = ("turns",)

    turns: Turns
    """The upstream's rotation counter (one turn per selection)."""

    def __init__(self, members: Members[T], turns: Turns | None = None) -> None:
        self.turns = Turns.local() if turns is None else turns
        super().__init__(members)

    def select_index(self, key: bytes | None = None) -> int:
        """The schedule's entry at the fleet's turn (taking the turn), or -1 when no member
        is usable; ``key`` is ignored."""
        turns = self.turns
        turn = sum(turns.column)  # Turns.take, inline: this is the hot path
        turns.cells[turns.cell] += 1
        if not self._degraded:
            schedule = self._schedule
            i = schedule[turn % len(schedule)]
            if self._usable[i]:
                return i
        schedule = self._degraded_schedule()
        return schedule[turn % len(schedule)] if schedule else -1


class WeightedRandom(Balanced[T]):
    """A random member, in proportion to the weights; the key is ignored.

    ``rng`` (default: the ``random`` module's generator) makes the draws; pass a seeded
    ``random.Random`` for a repeatable sequence.
    """

    __slots__ = ("_random",)

    def __init__(self, members: Members[T], rng: random.Random | None = None) -> None:
        self._random = random.random if rng is None else rng.random
        super().__init__(members)

    def select_index(self, key: bytes | None = None) -> int:
        """A weighted random usable member, or -1 when none is usable."""
        if not self._degraded:
            schedule = self._schedule
            i = schedule[int(self._random() * len(schedule))]
            if self._usable[i]:
                return i
        schedule = self._degraded_schedule()
        return schedule[int(self._random() * len(schedule))] if schedule else -1
