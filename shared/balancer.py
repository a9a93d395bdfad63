"""The public balancer of one upstream: what ``ProxyHttp.balancer(name)`` returns.

Theory of operation. A :class:`Balancer` is built once per worker (in ``configure``, or on
first use) from the upstream's config: one :class:`~shared.peer.HttpPeer` per server, the
:class:`~shared.lb.Members` (weights, backups, the usable mask), and the selector that
``balance`` names (:func:`shared.lb.make_selector`). In a worker its counters are the fleet's:
the rotation's turn and each server's in-flight count live in the shared balance table
(:mod:`shared.shm.balance`), in the row of this worker's slot, and every selection reads the
sums over all workers, so the fleet behaves as one balancer whichever worker took the
connection. Outside a worker (unit tests, ``python -m master check``) the counters are this
process's (``Turns.local``, ``Load.local``).

Servers are numbered across the config's upstreams in config order
(:func:`shared.shm.balance.server_ranges`): the master sizes the table from the same config, so
upstream ``u``'s servers are the table's servers ``first .. first + n - 1``.

Failover: a request the engine retries lists the peers it tried in ``session.tried``;
:attr:`Balancer.select_for` then walks the failover order (:meth:`Balancer.iter`) and returns
the first peer not tried, so a retry goes to another server (for ``hash``, the next on the
ring) while one remains usable, and to the ordinary choice once every usable one was tried.
:meth:`Balancer.select` does the same with ``exclude``. Each balancer also carries its
upstream's :class:`~shared.lb.fleet.Guard` (the circuit breakers and the retry budget), hung on
every peer's counter (``peer.in_flight.guard``) for the engine.

In-flight accounting is the engine's, not the caller's: each peer carries its counter
(:attr:`HttpPeer.in_flight`), and the engine counts a request to the peer that
``upstream_peer`` returned, from then until that attempt is over, on every path (a retry,
the end of the response, an error, the client going away). So a selection made and not used
(an app that looks, then chooses another peer) counts nothing, and an app only returns the
peer.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING

from shared.config import Server
from shared.lb import Load, Members, Turns, key_function, make_selector
from shared.lb.fleet import Guard
from shared.lb.keys import KeyFunction, KeySource
from shared.peer import HttpPeer, PeerOptions
from shared.shm.balance import server_ranges

if TYPE_CHECKING:
    from shared.config import Config
    from shared.lb.members import Balanced
    from shared.shm.balance import SlotCells

#: How many servers :meth:`Balancer.select` tries with an ``accept`` function by default
#: (Pingora's callers pass 256 as ``max_iterations``).
DEFAULT_MAX_ITERATIONS = 256


class Balancer:
    """Fleet-wide selection over one upstream's servers (Pingora's ``LoadBalancer``).

    ``self.balancer("origin").select(key=b"user-7")`` in an app's ``upstream_peer`` gives the
    :class:`HttpPeer` to return, or None when no server is usable. Build it with
    :meth:`ProxyHttp.balancer <shared.app.ProxyHttp.balancer>`, not directly.
    """

    __slots__ = (
        "name",
        "balance",
        "peers",
        "members",
        "selector",
        "load",
        "key_of",
        "guard",
        "select_for",
        "_select",
        "_select_first",
    )

    name: str
    """The upstream's name in ``upstreams``."""
    balance: str
    """The upstream's ``balance``: round_robin, random, least_conn or hash."""
    peers: list[HttpPeer]
    """One peer per server, in config order (each with its :attr:`HttpPeer.in_flight`)."""
    members: Members[HttpPeer]
    """Weights, backups and the usable mask (``members.usable``, one entry per server)."""
    selector: Balanced[HttpPeer]
    """The algorithm (``shared.lb``), counting in the fleet's table in a worker."""
    load: Load
    """In flight per server, over the fleet in a worker (``load.count(i)``)."""
    key_of: KeyFunction | None
    """For ``balance: hash``, the ``hash_key`` as a function of the request; else None."""
    guard: Guard
    """The upstream's circuit breakers and retry budget (``max_requests``), counted over the
    fleet in a worker."""
    select_for: Callable[[KeySource], HttpPeer | None]
    """``select_for(session)``: :meth:`select` with the request's ``hash_key`` (``balance:
    hash``; no key for the others), as the built-in load balancer calls it; None when no server
    is usable. On a retry (``session.tried`` set) the first peer of the failover order not
    tried yet, while one remains. The hot path: a function chosen once for the upstream's shape
    (one server: no turn to take, nothing to choose)."""

    def __init__(self, config: Config, name: str, slot: SlotCells | None = None) -> None:
        """Builds the balancer of ``config.upstreams[name]``, counting in ``slot`` (a worker's
        row of the balance table) or locally when None. Raises ``KeyError`` for an unknown
        upstream, ``ValueError`` when ``slot``'s table was not made for this config."""
        names = list(config.upstreams)
        index = names.index(name) if name in config.upstreams else -1
        if index < 0:
            raise KeyError(f"no upstream named {name!r} (upstreams: {', '.join(names)})")
        upstream = config.upstreams[name]
        # Items of a config built in code may be plain strings.
        servers = [s if isinstance(s, Server) else Server(s) for s in upstream.servers]
        n = len(servers)
        limits = (upstream.max_requests, upstream.max_pending, upstream.max_connections)
        if slot is not None:
            counts = [len(u.servers) for u in config.upstreams.values()]
            table = slot.table
            if table.upstreams != len(counts) or table.servers != sum(counts):
                raise ValueError(
                    f"the balance table holds {table.upstreams} upstreams and {table.servers} "
                    f"servers; the config has {len(counts)} and {sum(counts)}"
                )
            first = server_ranges(counts)[index][0]
            turns = Turns.shared(slot, index)
            self.load = Load.shared(slot, first, n)
            self.guard = Guard.shared(slot, index, name, limits)
        else:
            turns = Turns.local()
            self.load = Load.local(n)
            self.guard = Guard.local(name, limits)
        options = PeerOptions(http2=upstream.http2)
        self.peers = [HttpPeer(s.address, options=options) for s in servers]
        for i, peer in enumerate(self.peers):
            peer.in_flight = self.load.member(i, self.guard)
        self.members = Members(self.peers, [s.weight for s in servers], [s.backup for s in servers])
        self.name = name
        self.balance = upstream.balance
        self.selector = make_selector(upstream.balance, self.members, turns, self.load)
        self.key_of = key_function(upstream.hash_key) if upstream.hash_key else None
        self._select: Callable[[bytes | None], int] = self.selector.select_index
        first_choice: Callable[[KeySource], HttpPeer | None]
        if n == 1:
            first_choice = self._select_only
        elif self.key_of is not None:
            first_choice = self._select_keyed
        else:
            first_choice = self._select_unkeyed
        self._select_first = first_choice
        # One server: a retry can only go back to it.
        self.select_for = first_choice if n == 1 else self._select_or_failover

    def select(
        self,
        key: bytes | None = None,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
        accept: Callable[[HttpPeer], bool] | None = None,
        exclude: Collection[HttpPeer] | None = None,
    ) -> HttpPeer | None:
        """The peer for a request: the selector's choice among the usable servers (``key``
        is what ``hash`` hashes; the other algorithms ignore it), taking the fleet's next turn.

        With ``accept``, the first peer in failover order (:meth:`iter`) that ``accept(peer)``
        takes, trying at most ``max_iterations`` servers (Pingora's ``select_with``). Returns
        None when no server is usable (or accepted); ``upstream_peer`` then raises a
        ``NO_PEER`` error (502). Counts nothing: the engine counts the request in flight to
        the peer ``upstream_peer`` returns.

        With ``exclude`` (``session.tried`` on a retry), the first peer in failover order
        not in it (and accepted); when every usable peer is excluded, the first of that
        order, as without it."""
        if exclude:
            fallback = None
            for tried, peer in enumerate(self.iter(key)):
                if tried >= max_iterations:
                    break
                if accept is not None and not accept(peer):
                    continue
                if not any(peer is p for p in exclude):
                    return peer
                if fallback is None:
                    fallback = peer
            return fallback
        if accept is None:
            i = self._select(key)
            return self.peers[i] if i >= 0 else None
        for tried, peer in enumerate(self.iter(key)):
            if tried >= max_iterations:
                break
            if accept(peer):
                return peer
        return None

    def _select_or_failover(self, request: KeySource) -> HttpPeer | None:
        tried = getattr(request, "tried", None)
        if not tried:
            return self._select_first(request)
        key = self.key_of(request) if self.key_of is not None else None
        return self.select(key, exclude=tried)

    def _select_unkeyed(self, request: KeySource) -> HttpPeer | None:
        i = self._select(None)
        return self.peers[i] if i >= 0 else None

    def _select_keyed(self, request: KeySource) -> HttpPeer | None:
        i = self._select(self.key_of(request))  # type: ignore[misc]
        return self.peers[i] if i >= 0 else None

    def _select_only(self, request: KeySource) -> HttpPeer | None:
        """One server: it, while usable (a lone server is never a backup)."""
        return self.peers[0] if self.members.usable[0] else None

    def iter(self, key: bytes | None = None) -> Iterator[HttpPeer]:
        """The failover order for a request with ``key``: :meth:`select`'s choice (taking its
        turn), then the other usable servers, each once (primaries, then backups)."""
        return self.selector.iter(key)

    def in_flight(self, peer: HttpPeer) -> int:
        """Requests in flight to ``peer`` (one of :attr:`peers`), over the fleet."""
        return self.load.count(self.peers.index(peer))
