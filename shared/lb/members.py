"""The members of an upstream as every selector sees them: weights, backups, and which are usable.

A member is usable when its entry in the ``usable`` mask is true. The mask is any sequence
indexed by member (a ``bytearray``, a list, a ``memoryview`` of a shared health table); the
selector keeps a reference, not a copy, so whoever marks a member down (health checks, outlier
ejection, ``drain``) changes what the next selection sees, with no call. The backup rule
(nginx's ``backup``): backup members take requests only while no primary member is usable.

:func:`smooth_weighted` is nginx's smooth weighted round robin, run once over the weights to make
a schedule: a sequence of member indices of length ``sum(weights)`` (after dividing by their
greatest common divisor, which gives the same sequence) in which each member appears ``weight``
times, spread out (weights 5, 1, 1 give a a b a c a a). Round robin indexes it with the
fleet's turn; random draws from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

#: Schedules kept for sets of usable members other than "every primary" (outages are few).
MAX_CACHED_SCHEDULES = 64


def smooth_weighted(weights: Sequence[int], members: Sequence[int] | None = None) -> list[int]:
    """nginx's smooth weighted round robin, one full cycle: the member indices in the order it
    picks them. ``members`` (default: all) are the indices taking part, ``weights`` indexed by
    member. On each pick every member's current weight grows by its weight, the largest (the
    first of equals) is picked and loses the total. Empty when no member takes part."""
    chosen = list(range(len(weights))) if members is None else list(members)
    ws = [weights[i] for i in chosen]
    if not ws:
        return []
    g = math.gcd(*ws)
    ws = [w // g for w in ws]
    total = sum(ws)
    current = [0] * len(ws)
    schedule = []
    for _ in range(total):
        best = 0
        for k, w in enumerate(ws):
            current[k] += w
            if current[k] > current[best]:
                best = k
        current[best] -= total
        schedule.append(chosen[best])
    return schedule


class Members(Generic[T]):
    """An upstream's members, their weights and backup flags, and the usable mask.

    Raises ``ValueError`` when the lengths disagree or a weight is below 1.
    """

    __slots__ = ("peers", "weights", "backup", "usable", "primaries", "backups", "_cache")

    peers: Sequence[T]
    """The members (peers), in config order."""
    weights: list[int]
    """Per member, its weight (at least 1)."""
    backup: list[bool]
    """Per member, True for a backup."""
    usable: Sequence[int] | Sequence[bool]
    """Per member, true while it may take requests (the mask; kept by reference)."""
    primaries: tuple[int, ...]
    """The indices of the primary members."""
    backups: tuple[int, ...]
    """The indices of the backup members."""

    def __init__(
        self,
        peers: Sequence[T],
        weights: Sequence[int] | None = None,
        backup: Sequence[bool] | None = None,
        usable: Sequence[int] | Sequence[bool] | None = None,
    ) -> None:
        n = len(peers)
        self.peers = peers
        self.weights = [1] * n if weights is None else list(weights)
        self.backup = [False] * n if backup is None else list(backup)
        self.usable = bytearray(b"\x01" * n) if usable is None else usable
        if len(self.weights) != n or len(self.backup) != n or len(self.usable) != n:
            raise ValueError("weights, backup and usable need one entry per member")
        if any(w < 1 for w in self.weights):
            raise ValueError("a weight must be at least 1")
        self.primaries = tuple(i for i in range(n) if not self.backup[i])
        self.backups = tuple(i for i in range(n) if self.backup[i])
        self._cache: dict[tuple[int, ...], list[int]] = {}

    def set_weights(self, weights: Sequence[int]) -> None:
        """New weights (slow start, an operator's change); forgets the cached schedules."""
        if len(weights) != len(self.peers) or any(w < 1 for w in weights):
            raise ValueError("one weight of at least 1 per member")
        self.weights = list(weights)
        self._cache.clear()

    def tier(self) -> tuple[int, ...]:
        """The members that may take a request now: the usable primaries, or when there are
        none the usable backups, or none. O(members): for the slow path."""
        usable = self.usable
        tier = tuple(i for i in self.primaries if usable[i])
        return tier or tuple(i for i in self.backups if usable[i])

    def schedule_of(self, tier: tuple[int, ...]) -> list[int]:
        """The smooth weighted schedule of the members in ``tier``, cached."""
        schedule = self._cache.get(tier)
        if schedule is None:
            if len(self._cache) >= MAX_CACHED_SCHEDULES:
                self._cache.clear()
            schedule = self._cache[tier] = smooth_weighted(self.weights, tier)
        return schedule

    def failover(self, first: int) -> Iterator[int]:
        """``first`` (when not -1), then the other usable members, each once: the primaries
        after ``first`` around the ring, then the backups. Usability is read as the
        iterator goes."""
        usable = self.usable
        if first >= 0:
            yield first
        for group in (self.primaries, self.backups):
            start = group.index(first) + 1 if first in group else 0
            for i in group[start:] + group[:start]:
                if i != first and usable[i]:
                    yield i


class Balanced(Generic[T]):
    """The part every fleet selector shares: members, and ``select``/``iter`` on top of the
    algorithm's :meth:`select_index`.

    A subclass implements :meth:`select_index`; ``select`` and ``iter`` then satisfy
    :class:`~shared.lb.selection.Selector`.
    """

    __slots__ = ("members", "_schedule", "_usable", "_degraded")

    members: Members[T]
    """The members, weights, backups and usable mask."""

    def __init__(self, members: Members[T]) -> None:
        self.members = members
        self._usable = members.usable
        self._rebuild()

    def _rebuild(self) -> None:
        """Recomputes the primaries' schedule (at start and when weights change)."""
        members = self.members
        self._schedule = members.schedule_of(members.primaries)
        # Degraded: some primary is not usable, so the schedule in use is the tier's,
        # recomputed on each selection until every primary is usable again.
        self._degraded = not self._schedule

    def _degraded_schedule(self) -> list[int]:
        """The slow path, taken once a pick finds an unusable member: the schedule of the
        members usable now (empty when there are none). Leaves degraded mode when every
        primary is usable again."""
        members = self.members
        tier = members.tier()
        if tier and tier == members.primaries:
            self._degraded = False
            return self._schedule
        self._degraded = True
        return members.schedule_of(tier) if tier else []

    def select_index(self, key: bytes | None = None) -> int:
        """The index of the member for a request with ``key``, or -1 when no member is
        usable. The hot path: one call per request."""
        raise NotImplementedError

    def select(self, key: bytes | None = None) -> T | None:
        """The member for a request with ``key``, or None when no member is usable."""
        i = self.select_index(key)
        return self.members.peers[i] if i >= 0 else None

    def iter_indices(self, key: bytes | None = None) -> Iterator[int]:
        """The failover order as member indices: :meth:`select_index`'s choice (taking its
        turn), then the other usable members, each once (primaries, then backups)."""
        return self.members.failover(self.select_index(key))

    def iter(self, key: bytes | None = None) -> Iterator[T]:
        """The failover order as members (see :meth:`iter_indices`)."""
        peers = self.members.peers
        return (peers[i] for i in self.iter_indices(key))

    def set_weights(self, weights: Sequence[int]) -> None:
        """New weights, from the next selection on (slow start: :mod:`shared.lb.slow_start`)."""
        self.members.set_weights(weights)
        self._rebuild()
