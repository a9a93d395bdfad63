"""Consistent hashing on a Ketama ring, with the key-to-server mapping of nginx's ``hash KEY
consistent`` and Pingora's ``pingora-ketama`` (which documents that it is nginx's).

The ring (:class:`Ring`): each server puts ``160 * weight`` points on a circle of 2^32. Its
points are CRC-32 hashes: the server's base is the CRC-32 of ``HOST \\0 PORT`` (the host as
text, an IPv6 address without brackets in its canonical short form as Pingora writes it; the
port in decimal), and point ``j`` is that CRC continued over the previous point's hash as four
little-endian bytes (0 before the first). Points are sorted; of points with equal hashes, one is
kept (the earlier server's here; nginx and Pingora keep an arbitrary one, so a collision, a
few per hundred thousand points, may map a sliver of keys differently). A key goes to the
first point whose hash is at least the key's CRC-32, wrapping past the last point to the
first.

Removing one of N servers removes only its points, so only the keys it had move (about 1/N of
them), each to the server owning the next point; adding one takes only the keys of its new
points. A key whose server is not usable goes to the next point's server that is, as in nginx
and Pingora's ``select`` with ``max_iterations``.

:class:`ConsistentHash` is ``balance: hash``: a ring over the primaries and one over the
backups, used only while no primary is usable. A request without a key (None or empty: the
header, cookie or query field is missing) is balanced by round robin, as nginx does.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TypeVar

from shared.lb.fleet import Turns
from shared.lb.members import Balanced, Members
from shared.peer import parse_address

T = TypeVar("T")

#: Points on the ring per unit of weight (nginx's and Pingora's number).
POINTS_PER_WEIGHT = 160
_U32 = struct.Struct("<I")


def address_text(host: str, port: int) -> bytes:
    """What a server's points are hashed from: ``HOST \\0 PORT`` (an IP address in the form
    Pingora prints it, a host name as written)."""
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        pass
    return b"%s\x00%d" % (host.encode(), port)


def server_points(host: str, port: int, weight: int) -> list[int]:
    """The hashes of one server's ``160 * weight`` points, in the order they are made."""
    value = zlib.crc32(address_text(host, port))
    pack = _U32.pack
    points = []
    prev = 0
    for _ in range(POINTS_PER_WEIGHT * weight):
        prev = zlib.crc32(pack(prev), value)
        points.append(prev)
    return points


class Ring:
    """A Ketama continuum over servers: ``Ring([(host, port, weight), ...])``.

    :meth:`lookup` gives a key's point; :attr:`owners` the server index at each point.
    """

    __slots__ = ("hashes", "owners")

    hashes: list[int]
    """The points' hashes, ascending, no two equal."""
    owners: list[int]
    """Per point, the index of its server in the list the ring was built from."""

    def __init__(
        self, servers: Sequence[tuple[str, int, int]], which: Sequence[int] | None = None
    ) -> None:
        """``which`` (default: all) selects the servers that take part, by index."""
        points: list[tuple[int, int]] = []
        for i in range(len(servers)) if which is None else which:
            host, port, weight = servers[i]
            points.extend((h, i) for h in server_points(host, port, weight))
        points.sort()
        hashes: list[int] = []
        owners: list[int] = []
        last = -1
        for h, i in points:
            if h != last:
                hashes.append(h)
                owners.append(i)
                last = h
        self.hashes = hashes
        self.owners = owners

    def lookup(self, key: bytes) -> int:
        """The index of the point ``key`` falls on (-1 for an empty ring)."""
        if not self.hashes:
            return -1
        p = bisect_left(self.hashes, zlib.crc32(key))
        return p if p < len(self.hashes) else 0

    def server(self, key: bytes) -> int:
        """The index of the server ``key`` maps to (-1 for an empty ring)."""
        p = self.lookup(key)
        return self.owners[p] if p >= 0 else -1

    def walk(self, key: bytes) -> Iterator[int]:
        """The servers of the points from ``key``'s on, around the ring once, each server
        once: the failover order."""
        p = self.lookup(key)
        if p < 0:
            return
        seen: set[int] = set()
        owners = self.owners
        for i in owners[p:] + owners[:p]:
            if i not in seen:
                seen.add(i)
                yield i
                if len(seen) == len(owners):
                    return


class ConsistentHash(Balanced[T]):
    """``balance: hash``: the key's server on the Ketama ring, the next usable one when it is
    not usable; round robin for requests without a key.

    ``addresses`` are the members' ``(host, port)`` as hashed (default: each peer's
    ``str()`` parsed as an address, which suits :class:`~shared.peer.HttpPeer`). The ring
    keeps the weights it was built with: slow start does not apply to hashing.
    """

    __slots__ = ("rings", "turns", "_primary_ring")

    rings: tuple[Ring, Ring]
    """The primaries' ring and the backups' ring."""
    turns: Turns
    """The rotation for requests without a key."""

    def __init__(
        self,
        members: Members[T],
        addresses: Sequence[tuple[str, int]] | None = None,
        turns: Turns | None = None,
    ) -> None:
        if addresses is None:
            addresses = [parse_address(str(p)) for p in members.peers]
        servers = [(h, p, w) for (h, p), w in zip(addresses, members.weights, strict=True)]
        self.rings = (Ring(servers, members.primaries), Ring(servers, members.backups))
        self._primary_ring = self.rings[0]
        self.turns = Turns.local() if turns is None else turns
        super().__init__(members)

    def select_index(self, key: bytes | None = None) -> int:
        """The usable server for ``key`` on the ring, or -1 when none is usable."""
        if not key:
            turn = self.turns.take()
            schedule = self._schedule if not self._degraded else self._degraded_schedule()
            if schedule:
                i = schedule[turn % len(schedule)]
                if self._usable[i]:
                    return i
                schedule = self._degraded_schedule()
            return schedule[turn % len(schedule)] if schedule else -1
        ring = self._primary_ring
        p = ring.lookup(key)
        if p >= 0:
            i = ring.owners[p]
            if self._usable[i]:
                return i
        return self._next_usable(key)

    def _next_usable(self, key: bytes) -> int:
        """The slow path: the first usable server from the key's point on, on the primaries'
        ring, else on the backups'."""
        usable = self._usable
        for ring in self.rings:
            for i in ring.walk(key):
                if usable[i]:
                    return i
        return -1

    def iter_indices(self, key: bytes | None = None) -> Iterator[int]:
        """The key's usable server, then the other usable servers in ring order (primaries,
        then backups), each once. Without a key, round robin's order."""
        if not key:
            return super().iter_indices(key)
        return self._ring_order(key)

    def _ring_order(self, key: bytes) -> Iterator[int]:
        usable = self._usable
        for ring in self.rings:
            for i in ring.walk(key):
                if usable[i]:
                    yield i
