"""The pool broker: idle upstream connections shared by all workers.

Workers donate idle connections they cannot keep (their local pool is full, the connection has
been idle locally for a while, or the worker is exiting) and borrow one when their local pool
has none for a key. The broker keeps them in the master, watched: a connection that becomes
readable while it waits here (the origin closed it, or sent bytes nobody asked for) is closed at
once, so the broker never lends a connection known to be dead; one idle past the idle timeout
is closed too. The shared-memory :class:`~shared.poolindex.PoolIndex` tells workers, without a
round trip, whether asking can succeed.

Only plaintext HTTP/1.1 connections with nothing buffered travel between processes: TLS and
HTTP/2 state lives inside the process that made it.
"""

from __future__ import annotations

import functools
import logging
import os
import selectors
import socket
import time
from collections import OrderedDict

from master.selector import Selector
from shared.shm.pool_index import PoolIndex, slot_of

log = logging.getLogger("tenaya")


class IdleConn:
    """One idle connection held by the broker."""

    __slots__ = ("sock", "key", "slot", "since")

    def __init__(self, sock: socket.socket, key: bytes, slot: int) -> None:
        self.sock = sock
        self.key = key
        self.slot = slot
        self.since = time.monotonic()


class Broker:
    """Holds idle connections by pool key (most recently donated first)."""

    def __init__(self, sel: Selector, index: PoolIndex, size: int, idle_timeout: float) -> None:
        self.sel = sel
        self.index = index
        self.size = size
        self.idle_timeout = idle_timeout
        self._by_key: dict[bytes, list[IdleConn]] = {}
        self._order: OrderedDict[IdleConn, None] = OrderedDict()
        # Counters
        self.donated = 0
        self.lent = 0
        self.misses = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._order)

    def donate(self, key: bytes, fd: int) -> None:
        """Takes ownership of ``fd``, an idle connection for ``key``."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return
        self.donated += 1
        sock.setblocking(False)
        if self.size <= 0 or _readable(sock):
            self.dropped += 1
            sock.close()
            return
        if len(self._order) >= self.size:
            self._drop(next(iter(self._order)))
        conn = IdleConn(sock, key, slot_of(key, self.index.slots))
        self._by_key.setdefault(key, []).append(conn)
        self._order[conn] = None
        self.sel.register(sock, functools.partial(self._on_idle_readable, conn))
        self.index.add(conn.slot, 1)

    def lend(self, key: bytes) -> socket.socket | None:
        """An idle connection for ``key`` (the caller sends it, then closes it), or None."""
        stack = self._by_key.get(key)
        while stack:
            conn = stack.pop()
            if not stack:
                del self._by_key[key]
            self._forget(conn)
            if _readable(conn.sock):
                self.dropped += 1
                conn.sock.close()
                stack = self._by_key.get(key)
                continue
            self.lent += 1
            return conn.sock
        self.misses += 1
        return None

    def _on_idle_readable(self, conn: IdleConn, key: selectors.SelectorKey, mask: int) -> None:
        """The selector handler of an idle connection: it spoke or closed, so it can't be
        reused. It may already be gone: lent or dropped by an earlier handler of the same
        round (a worker's ``Borrow`` read just before)."""
        if conn in self._order:
            self._drop(conn)

    def sweep(self, now: float) -> None:
        """Closes connections idle past the idle timeout."""
        limit = now - self.idle_timeout
        for conn in list(self._order):
            if conn.since > limit:
                break
            self._drop(conn)

    def take_all(self) -> list[tuple[bytes, socket.socket]]:
        """Every idle connection, for a new master (the broker is left empty)."""
        out = []
        for conn in list(self._order):
            self._forget(conn)
            out.append((conn.key, conn.sock))
        self._by_key.clear()
        return out

    def close(self) -> None:
        for conn in list(self._order):
            self._drop(conn)

    def _forget(self, conn: IdleConn) -> None:
        del self._order[conn]
        self.sel.unregister(conn.sock)
        self.index.add(conn.slot, -1)

    def _drop(self, conn: IdleConn) -> None:
        stack = self._by_key.get(conn.key)
        if stack is not None and conn in stack:
            stack.remove(conn)
            if not stack:
                del self._by_key[conn.key]
        self._forget(conn)
        self.dropped += 1
        conn.sock.close()

    def stats(self) -> dict[str, int]:
        return {
            "idle": len(self._order),
            "donated": self.donated,
            "lent": self.lent,
            "misses": self.misses,
            "dropped": self.dropped,
        }


def _readable(sock: socket.socket) -> bool:
    """True when an idle connection has bytes or an end of stream waiting (or failed)."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return True  # bytes, or b"" at end of stream
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
