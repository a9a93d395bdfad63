"""A worker's upstream connections at rest: the idle HTTP/1.1 ones, and the live HTTP/2 ones.

:class:`Pool` keeps idle HTTP/1.1 connections by pool key, most recently used first, and the
exchanges under way (whose read deadlines its sweep checks, for both protocols). An idle
connection is watched (worker/client/h1.py): one the origin closes or that speaks leaves the pool.
When the pool is shared (``pool.shared``), a connection idle for a moment, or of a key this
worker did not use a moment ago, goes to the pool broker instead, where any worker can use it.
A connection whose peer set its own idle timeout (``PeerOptions.idle_timeout``) stays in this
worker's pool, which closes it on that time; the broker would keep it for
``pool.idle_timeout_seconds``.

:class:`H2Pool` keeps the live HTTP/2 connections by key: each carries many requests at once,
so it is not idle or busy but has room or not.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from worker.client.h1 import UpstreamConn
from worker.client.h2 import UpstreamH2Conn, UpstreamH2Stream
from worker.interfaces import Upstream

if TYPE_CHECKING:
    from shared.peer import PoolKey

#: A connection idle this long in a worker's pool goes to the broker, where any worker can
#: use it (seconds).
DONATE_AFTER_SECONDS = 1.0
#: A key whose connection came back to this worker within this long before is hot: the
#: worker keeps its connection instead of giving it to the broker (seconds).
HOT_KEY_SECONDS = 0.05

#: Gives idle connections to the pool broker; returns how many went.
Donor = Callable[[list[UpstreamConn]], int]


class Pool:
    """Idle upstream connections of one worker, by pool key, most recently used first.

    Holds at most ``size`` idle connections over all keys; the oldest goes first when full.
    An idle connection is closed after ``idle_timeout`` seconds, or its own
    (:attr:`UpstreamConn.idle_timeout <worker.client.h1.UpstreamConn.idle_timeout>`, its
    peer's), as the once-a-second :meth:`sweep` finds it.
    """

    def __init__(self, size: int, idle_timeout: float) -> None:
        self.size = size
        self.idle_timeout = idle_timeout
        self._idle: dict[PoolKey, list[UpstreamConn]] = {}
        self._order: OrderedDict[UpstreamConn, None] = OrderedDict()
        #: Exchanges under way, HTTP/1.1 connections and HTTP/2 streams (the sweep checks
        #: their read deadlines).
        self.busy: set[Upstream] = set()
        #: Gives connections to the pool broker; None when the pool is not shared.
        self.donor: Donor | None = None
        #: When this worker last returned a connection of each key (to tell hot keys).
        self._last_put: dict[PoolKey, float] = {}
        # Counters
        self.requests = 0
        self.created = 0
        self.reused = 0
        self.reused_shared = 0
        self.donated = 0

    def get(self, key: PoolKey) -> UpstreamConn | None:
        """An idle connection for ``key``, or None."""
        stack = self._idle.get(key)
        while stack:
            up = stack.pop()
            del self._order[up]
            if not up.closed:
                self.reused += 1
                return up
        return None

    def put(self, up: UpstreamConn) -> None:
        """Keeps a connection whose exchange ended cleanly; closes it if the pool is full."""
        if up.closed:
            return
        # The connection reads the clock (all of an HTTP/1.1 connection's times are its
        # module's: worker/client/h1.py).
        now = up.went_idle()
        if self.donor is not None and up.idle_timeout is None:
            # A key this worker used a moment ago is hot: its next request is likely here, so
            # the connection stays local (no round trip). A cold key's connection goes to the
            # broker at once, where the next request for it finds it, whichever worker it
            # reaches: with sparse traffic spread over many workers, that is most of the reuse.
            last = self._last_put.get(up.key, 0.0)
            self._last_put[up.key] = now
            if now - last > HOT_KEY_SECONDS:
                self._give_away([up])
                return
        if self.size <= 0:
            self._give_away([up])
            return
        if len(self._order) >= self.size:
            oldest = next(iter(self._order))
            self.discard(oldest)
            self._give_away([oldest])
        self._idle.setdefault(up.key, []).append(up)
        self._order[up] = None

    def discard(self, up: UpstreamConn) -> None:
        """Forgets a connection that closed."""
        self.busy.discard(up)
        if up in self._order:
            del self._order[up]
            stack = self._idle.get(up.key)
            if stack is not None:
                stack.remove(up)
                if not stack:
                    del self._idle[up.key]

    def _give_away(self, conns: list[UpstreamConn]) -> None:
        """Donates connections to the broker (when shared), else closes them; one with an
        idle timeout of its own is closed (see the module docstring)."""
        if self.donor is not None:
            own = [up for up in conns if up.idle_timeout is not None]
            if own:
                conns = [up for up in conns if up.idle_timeout is None]
                for up in own:
                    up.close()
            if conns:
                self.donated += self.donor(conns)
        else:
            for up in conns:
                up.close()

    def sweep(self, now: float) -> None:
        """Closes idle connections past their idle timeout, gives to the broker those idle
        for a while (when shared), and fails exchanges whose upstream missed its read
        deadline."""
        limit = now - self.idle_timeout
        donate_limit = now - DONATE_AFTER_SECONDS if self.donor is not None else limit
        spare = []
        # To the end of the order: one with an idle timeout of its own may be anywhere in it.
        for up in list(self._order):
            own = up.idle_timeout
            if own is not None:
                # Its peer's time, whatever its place in the order; never donated.
                if now - up.idle_since >= own:
                    up.close()
                continue
            if up.idle_since > donate_limit:
                continue
            if up.idle_since <= limit:
                up.close()
            else:
                self.discard(up)
                spare.append(up)
        if spare:
            self._give_away(spare)
        for late in [u for u in self.busy if u.deadline < now]:
            late.timed_out()

    def close_all(self) -> None:
        """Worker exit: idle connections go to the broker (when shared) or are closed."""
        conns = list(self._order)
        for up in conns:
            self.discard(up)
        self._give_away(conns)

    @property
    def idle_count(self) -> int:
        return len(self._order)


class H2Pool:
    """Live upstream HTTP/2 connections by pool key (a worker's)."""

    def __init__(self) -> None:
        self._conns: dict[PoolKey, list[UpstreamH2Conn]] = {}

    def stream(self, key: PoolKey) -> UpstreamH2Stream | None:
        """A new stream on a live connection with room, or None."""
        best = None
        for conn in self._conns.get(key, ()):
            if (
                not conn.closed
                and conn.capacity > 0
                and (best is None or conn.capacity > best.capacity)
            ):
                best = conn
        return best.open_stream() if best is not None else None

    def add(self, conn: UpstreamH2Conn) -> None:
        self._conns.setdefault(conn.key, []).append(conn)

    def remove(self, conn: UpstreamH2Conn) -> None:
        conns = self._conns.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.key]

    def close_all(self) -> None:
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.close()
