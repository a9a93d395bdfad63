"""Selection: which member of a fixed set serves a request, and where to go when it fails.

A :class:`Selector` answers two questions about one request (Pingora's ``BackendSelection``
and ``BackendIter``):

- :meth:`Selector.select`: the member for this request. This is the hot path, one call per
  request, so it allocates nothing.
- :meth:`Selector.iter`: the failover order for this request. It starts with the member that
  ``select`` would have chosen and goes on with the others, each at most once. A caller that
  finds the first one unusable (down, refusing connections) takes the next.

``key`` is what a key-aware algorithm chooses by (consistent hashing: the same key goes to
the same member while the set stays the same): bytes such as a client address, a URI or a
cookie. Algorithms that ignore it (round robin) take None. A selector belongs to one worker
and its event loop, so it needs no lock.

:class:`RoundRobin` here keeps its rotation per worker, so "in turn" holds per worker, not
across the fleet. The fleet-wide algorithms count in shared memory and skip members that are
not usable (down, ejected, draining), with nginx's backup rule: :class:`FleetRoundRobin` and
:class:`WeightedRandom` (:mod:`shared.lb.weighted`), :class:`LeastConn`
(:mod:`shared.lb.least_conn`), :class:`ConsistentHash` (:mod:`shared.lb.ketama`). Their
``select`` returns None when no member is usable, and their ``iter`` yields only usable
members; they also give member indices (``select_index``, ``iter_indices``) for the in-flight
accounting.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Generic, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@runtime_checkable
class Selector(Protocol[T_co]):
    """What every selection algorithm provides, whatever it chooses by.

    A selector is built from its members, and from weights or other settings where the
    algorithm needs them. It is used for one request at a time, on the worker's event loop.
    """

    def select(self, key: bytes | None = None) -> T_co | None:
        """The member that serves a request with this ``key`` (None when the request has none,
        or when the algorithm does not use keys). Called once per request; may advance the
        selector's state (the next turn of a rotation). The fleet selectors return None when
        no member is usable; :class:`RoundRobin` raises ``IndexError`` when the set is
        empty."""
        ...

    def iter(self, key: bytes | None = None) -> Iterator[T_co]:
        """The failover order for a request with this ``key``: first the member
        :meth:`select` would have returned (and the call takes that turn as ``select``
        would), then the others, each at most once. Yields nothing when the set is empty."""
        ...


class RoundRobin(Generic[T]):
    """Each member in turn, whatever the key: the built-in load balancer's algorithm.

    ``RoundRobin(peers, start=worker_id)`` starts the rotation at ``start`` (modulo the number
    of members). Then workers that each have their own selector begin on different members,
    and the first requests of a fresh fleet spread out.
    """

    __slots__ = ("peers", "_next")

    peers: Sequence[T]
    """The members, in rotation order."""

    def __init__(self, peers: Sequence[T], start: int = 0) -> None:
        self.peers = peers
        self._next = start % len(peers) if peers else 0

    def select(self, key: bytes | None = None) -> T:
        """The next member in turn (``key`` is ignored)."""
        i = self._next
        peer = self.peers[i]
        self._next = i + 1 if i + 1 < len(self.peers) else 0
        return peer

    def iter(self, key: bytes | None = None) -> Iterator[T]:
        """The next member in turn, then the members after it around the ring (``key`` is
        ignored). It takes one turn, as :meth:`select` does, however far the caller reads."""
        peers = self.peers
        if not peers:
            return iter(())
        i = self._next
        self._next = i + 1 if i + 1 < len(peers) else 0
        return iter([*peers[i:], *peers[:i]])
