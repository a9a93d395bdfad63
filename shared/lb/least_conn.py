"""Least connections over the fleet: the member with the fewest requests in flight, counted by
every worker in the shared table (:class:`~shared.lb.fleet.Load`), relative to its weight.

Two ways to choose, both breaking ties in rotation (the fleet's turn, :class:`Turns`, decides
where the scan starts and which member the rotation offers):

- ``exact=False`` (the default), power of two choices: the member the weighted rotation offers
  at this turn against another drawn at random; the one with fewer in flight per weight wins, the
  rotation's on a tie. Two ``sum()`` calls whatever the number of members, and, since every
  worker draws differently, no herd: workers that read the same stale counts do not all pile
  onto the one server that looked least loaded (Mitzenmacher's result: the maximum load is
  exponentially better than one random choice, nearly as good as the true minimum).
- ``exact=True``, the true minimum: every usable member's count; costs one ``sum()`` per
  member (see ``loadtests/select_bench.py`` for the figures), and all the workers that select
  within one moment choose the same member.

The caller counts the requests: :meth:`Load.begin` when a request goes to a member,
:meth:`Load.end` when it is over.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from operator import truediv
from typing import TypeVar

from shared.lb.fleet import Load, Turns
from shared.lb.members import Balanced, Members

T = TypeVar("T")


class LeastConn(Balanced[T]):
    """The member with the fewest in-flight requests per weight; the key is ignored.

    ``LeastConn(members, Load.shared(slot, first, n), Turns.shared(slot, upstream))`` in a
    worker. ``rng`` draws the second choice (default: the ``random`` module's generator).
    """

    __slots__ = (
        "load",
        "turns",
        "exact",
        "_random",
        "_columns",
        "_prim_weights",
        "_uniform",
        "_positions",
    )

    load: Load
    """In-flight requests per member, over the fleet."""
    turns: Turns
    """The upstream's rotation (one turn per selection), for ties."""
    exact: bool
    """True: the true minimum; False: power of two choices."""

    def __init__(
        self,
        members: Members[T],
        load: Load | None = None,
        turns: Turns | None = None,
        exact: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.load = Load.local(len(members.peers)) if load is None else load
        self.turns = Turns.local() if turns is None else turns
        self.exact = exact
        self._random = random.random if rng is None else rng.random
        super().__init__(members)

    def _rebuild(self) -> None:
        super()._rebuild()
        members = self.members
        self._columns = [self.load.columns[i] for i in members.primaries]
        self._prim_weights = [members.weights[i] for i in members.primaries]
        self._uniform = len(set(self._prim_weights)) <= 1
        self._positions = {i: k for k, i in enumerate(members.primaries)}

    def select_index(self, key: bytes | None = None) -> int:
        """The least loaded usable member (taking a turn), or -1 when none is usable."""
        turns = self.turns
        turn = sum(turns.column)  # Turns.take, inline: this is the hot path
        turns.cells[turns.cell] += 1
        if not self._degraded:
            if self.exact:
                i = self._exact_primary(turn)
                if self._usable[i]:
                    return i
            else:
                # Power of two choices, inline: the rotation's member against another
                # primary drawn uniformly (among n - 1, skipping the first one's place).
                schedule = self._schedule
                a = schedule[turn % len(schedule)]
                if self._usable[a]:
                    n = len(self._columns)
                    if n < 2:
                        return a
                    k = int(self._random() * (n - 1))
                    if k >= self._positions[a]:
                        k += 1
                    b = self.members.primaries[k]
                    if self._usable[b]:
                        columns = self.load.columns
                        if self._uniform:
                            if sum(columns[b]) < sum(columns[a]):
                                return b
                        else:
                            weights = self.members.weights
                            if sum(columns[b]) * weights[a] < sum(columns[a]) * weights[b]:
                                return b
                    return a
        schedule = self._degraded_schedule()
        if not schedule:
            return -1
        if not self._degraded:  # every primary usable again: this once, the rotation's
            return self._exact_primary(turn) if self.exact else schedule[turn % len(schedule)]
        return self._least_of(sorted(set(schedule)), turn)

    def _exact_primary(self, turn: int) -> int:
        """The least loaded primary, the first from the turn's position on a tie (fast path:
        every primary assumed usable; the caller checks the winner)."""
        loads: Sequence[float] = list(map(sum, self._columns))
        if not self._uniform:
            loads = list(map(truediv, loads, self._prim_weights))
        least = min(loads)
        start = turn % len(loads)
        try:
            k = loads.index(least, start)
        except ValueError:
            k = loads.index(least)
        return self.members.primaries[k]

    def _least_of(self, tier: list[int], turn: int) -> int:
        """The least loaded member of ``tier`` (slow path), the first from the turn's
        position on a tie."""
        columns, weights = self.load.columns, self.members.weights
        n = len(tier)
        start = turn % n
        best, best_load, best_weight = -1, 0, 1
        for i in tier[start:] + tier[:start]:
            count = sum(columns[i])
            if best < 0 or count * best_weight < best_load * weights[i]:
                best, best_load, best_weight = i, count, weights[i]
        return best
