"""Accepting up to ``server.max_connections``: a worker at its limit stops accepting.

Theory of operation. The engine's set of open client connections is a
:class:`CountedConnections`, which tells the :class:`AcceptLimit` when it reaches the limit (on
the ``add`` a protocol makes when the loop accepts its connection) and, while paused, when it
goes down. Nothing is done inside that call: the loop is in the middle of an accept (uvloop
builds the protocol before it takes the new descriptor, and closing the listening handle then
would drop that connection), so the limit only schedules a look for the loop's next turn. libuv
accepts one connection per readiness event of a listening socket (libuv/libuv#3696), and the
loop's ready callbacks run before it polls again, so a worker passes its limit by at most one
connection per listening socket it serves.

uvloop's servers cannot stop accepting and start again, so pausing closes them and resuming
makes new ones, each on a fresh ``dup`` of its listening socket: the worker keeps one
descriptor of every listening socket for that (the *spare*), and the master holds its own, so
closing a server never closes the socket. Connections that arrive meanwhile wait in the
socket's accept queue, as with nginx at ``worker_connections``, and are accepted once the worker
resumes; none is reset. A full queue makes the kernel drop new SYNs, which clients retry.

The states and their transitions are one table (:data:`TRANSITIONS`). ``CLOSED`` (the worker
drains or stops) is left for nothing: a draining worker never accepts again, whatever its count
does later. Pauses and resumes are logged, at most one of each per
:data:`LOG_INTERVAL_SECONDS` (a worker that flaps at its limit says how many it did not log).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import resource
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Resuming waits until the count is this fraction of the limit below it (at least one):
#: a worker at its limit does not close and remake its servers for every connection.
RESUME_FRACTION = 0.05
#: Most one pause and one resume line per this long; the others are counted.
LOG_INTERVAL_SECONDS = 60.0
#: After a resume failed (no descriptor for the dup), the next try.
RETRY_SECONDS = 1.0
#: Descriptors a worker needs besides client and upstream connections: listening sockets, its
#: channel, log files, the pool index, files an app opens.
FD_MARGIN = 256


class AcceptState(enum.Enum):
    """Whether a worker accepts."""

    #: Making the servers: at start, and when resuming.
    OPENING = "opening"
    ACCEPTING = "accepting"
    #: At the limit: no server; new connections wait in the accept queues.
    PAUSED = "paused"
    #: Draining or stopping: never accepts again.
    CLOSED = "closed"


#: Which states each state may move to.
TRANSITIONS: dict[AcceptState, frozenset[AcceptState]] = {
    AcceptState.OPENING: frozenset({AcceptState.ACCEPTING, AcceptState.PAUSED, AcceptState.CLOSED}),
    AcceptState.ACCEPTING: frozenset({AcceptState.PAUSED, AcceptState.CLOSED}),
    AcceptState.PAUSED: frozenset({AcceptState.OPENING, AcceptState.CLOSED}),
    AcceptState.CLOSED: frozenset(),
}


def resume_level(limit: int) -> int:
    """The count at or below which a paused worker accepts again."""
    return limit - max(1, int(limit * RESUME_FRACTION))


@dataclass
class Listening:
    """One listening socket a worker accepts on."""

    #: This worker's descriptor of the socket, never served itself: each server gets a dup.
    spare: socket.socket
    backlog: int
    ssl: ssl.SSLContext | None = None


class CountedConnections(set[Any]):
    """The engine's open client connections, which tell the :class:`AcceptLimit` when their
    count reaches the limit, and, while it is paused, when it goes down. The protocols use
    :meth:`add` and :meth:`discard` (once per connection, not per request)."""

    __slots__ = ("limit", "resume_at", "paused", "_full", "_room")

    def __init__(self, limit: int, full: Callable[[], None], room: Callable[[], None]) -> None:
        super().__init__()
        #: The limit; no limit (0) is one the count never reaches.
        self.limit = limit or sys.maxsize
        self.resume_at = resume_level(limit)
        #: True from a pause until the servers are back: ``add`` then says nothing more.
        self.paused = False
        self._full = full
        self._room = room

    def add(self, conn: Any) -> None:
        """Adds ``conn``; at the limit, tells the :class:`AcceptLimit`."""
        set.add(self, conn)
        if len(self) >= self.limit and not self.paused:
            self._full()

    def discard(self, conn: Any) -> None:
        """Removes ``conn`` if present; while paused, tells the :class:`AcceptLimit` when the
        count is low enough to accept again."""
        set.discard(self, conn)
        if self.paused and len(self) <= self.resume_at:
            self._room()

    def remove(self, conn: Any) -> None:
        """Removes ``conn`` (KeyError if absent), as :meth:`discard` does."""
        set.remove(self, conn)
        if self.paused and len(self) <= self.resume_at:
            self._room()


class AcceptLimit:
    """Accepts on a worker's listening sockets while it holds fewer than ``limit`` open
    client connections (0: no limit). :attr:`connections` is the set the engine counts its
    connections in; :meth:`open` starts accepting, :meth:`close` stops for good."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.Protocol],
        listening: list[Listening],
        limit: int,
        log: logging.Logger,
    ) -> None:
        self.loop = loop
        self.factory = factory
        self.listening = listening
        self.limit = limit
        self.log = log
        self.state = AcceptState.OPENING
        #: The servers accepting now (none while paused).
        self.servers: list[asyncio.AbstractServer] = []
        self.connections = CountedConnections(limit, self._schedule, self._schedule)
        #: How many times this worker paused.
        self.pauses = 0
        self._scheduled = False
        self._opening: asyncio.Task[None] | None = None
        self._paused_at = 0.0
        self._last_log = float("-inf")
        self._unlogged = 0
        self._logged = False

    @property
    def paused(self) -> bool:
        """True while the worker is at its limit and does not accept."""
        return self.state is AcceptState.PAUSED or (
            self.state is AcceptState.OPENING and self.pauses > 0
        )

    def _to(self, new: AcceptState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"accepting: cannot go from {self.state.value} to {new.value}")
        self.state = new

    async def open(self) -> None:
        """Makes a server on every listening socket and accepts (at start, and when resuming).
        At start, an error (no descriptor left) is raised; when resuming it is logged, and
        resuming is tried again after :data:`RETRY_SECONDS`."""
        made: list[asyncio.AbstractServer] = []
        server: asyncio.AbstractServer
        try:
            for item in self.listening:
                if self.state is AcceptState.CLOSED:
                    break
                sock = item.spare.dup()
                try:
                    server = await self.loop.create_server(
                        self.factory, sock=sock, backlog=item.backlog, ssl=item.ssl
                    )
                except BaseException:
                    sock.close()
                    raise
                made.append(server)
        except OSError as e:
            for server in made:
                server.close()
            if self.pauses == 0:
                raise
            self.log.error("accepting not resumed: %s; trying again", e.strerror or e)
            if self.state is not AcceptState.CLOSED:
                self._to(AcceptState.PAUSED)
                self.loop.call_later(RETRY_SECONDS, self._schedule)
            return
        finally:
            self._opening = None
        if self.state is AcceptState.CLOSED:
            for server in made:
                server.close()
            return
        self.servers = made
        resumed = self.pauses > 0
        self._to(AcceptState.ACCEPTING)
        self.connections.paused = False
        if resumed and self._logged:
            self.log.info(
                "accepting resumed: %d connections open (paused for %.1fs)",
                len(self.connections),
                time.monotonic() - self._paused_at,
            )
        if self.limit:
            # The count may have reached the limit again while the servers were made.
            self._schedule()

    def close(self) -> None:
        """Stops accepting for good (the worker drains or stops): closes the servers and the
        spare descriptors. What waits in the accept queues stays there for the master's
        sockets' next worker."""
        if self.state is AcceptState.CLOSED:
            return
        self._to(AcceptState.CLOSED)
        self.connections.paused = True
        servers, self.servers = self.servers, []
        for server in servers:
            server.close()
        for item in self.listening:
            item.spare.close()

    def _schedule(self) -> None:
        """Called by the count (possibly inside an accept): look on the loop's next turn."""
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._reconcile)

    def _reconcile(self) -> None:
        self._scheduled = False
        if not self.limit:
            return
        count = len(self.connections)
        if self.state is AcceptState.ACCEPTING and count >= self.limit:
            self._pause(count)
        elif self.state is AcceptState.PAUSED and count <= self.connections.resume_at:
            self._to(AcceptState.OPENING)
            self._opening = self.loop.create_task(self.open())

    def _pause(self, count: int) -> None:
        self._to(AcceptState.PAUSED)
        self.connections.paused = True
        servers, self.servers = self.servers, []
        for server in servers:
            server.close()
        self.pauses += 1
        now = self._paused_at = time.monotonic()
        if now - self._last_log < LOG_INTERVAL_SECONDS:
            self._unlogged += 1
            self._logged = False
            return
        more = (
            f" ({self._unlogged} more pauses since the last one logged)" if self._unlogged else ""
        )
        self.log.warning(
            "accepting paused: %d connections open, server.max_connections is "
            "%d; new connections wait in the accept queue until %d%s",
            count,
            self.limit,
            self.connections.resume_at,
            more,
        )
        self._last_log = now
        self._unlogged = 0
        self._logged = True


def fit_open_files(max_connections: int, upstream_idle: int) -> str | None:
    """Raises this process's soft limit of open files (``RLIMIT_NOFILE``, often 1024) so that
    ``max_connections`` client connections, as many upstream ones and ``upstream_idle`` idle
    upstream connections fit, up to the hard limit, which needs no privilege. Returns a warning
    when the hard limit is too low for that; None otherwise or without a limit (0)."""
    if not max_connections:
        return None
    # A client connection waiting on its upstream holds two descriptors.
    need = 2 * max_connections + upstream_idle + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    fits = new - upstream_idle - FD_MARGIN
    if fits >= max_connections:
        return None
    return (
        f"server.max_connections is {max_connections}, but the hard limit of open files "
        f"(ulimit -Hn) is {hard}: a worker runs out of descriptors before that, from about "
        f"{max(0, fits // 2)} connections waiting on upstreams or {max(0, fits)} idle ones"
    )
