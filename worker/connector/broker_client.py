"""The worker's side of the pool broker: borrow idle connections, donate spare ones.

A borrow costs a round trip to the master, so it is tried only when the shared-memory pool
index says the broker may hold a connection for the key: a miss in the local pool with an empty
index costs nothing. Donations are one-way messages that carry the connections' descriptors.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack

from shared import ipc
from shared.ipc import MAX_FDS_PER_MESSAGE, ChannelClosed
from shared.shm.pool_index import PoolIndex, slot_of

if TYPE_CHECKING:
    from shared.peer import PoolKey
    from worker.client.h1 import UpstreamConn

log = logging.getLogger("tenaya")

#: Longest wait for the broker's answer; after it the worker connects by itself.
BORROW_TIMEOUT_SECONDS = 1.0


class BrokerClient:
    """Talks to the master's broker over the worker's channel."""

    def __init__(self, send: Callable[[ipc.Message], None], index: PoolIndex) -> None:
        self._send = send
        self.index = index
        self._keys: dict[PoolKey, tuple[bytes, int]] = {}
        self._pending: dict[int, asyncio.Future[socket.socket | None]] = {}
        self._ids = itertools.count(1)

    def key_info(self, key: PoolKey) -> tuple[bytes, int]:
        """The key's bytes (as the broker knows it) and its index slot."""
        info = self._keys.get(key)
        if info is None:
            kb = msgpack.packb(list(key), use_bin_type=True)
            info = self._keys[key] = (kb, slot_of(kb, self.index.slots))
        return info

    def may_have(self, key: PoolKey) -> bool:
        """True when the broker may hold an idle connection for ``key`` (a hint)."""
        return self.index.available(self.key_info(key)[1])

    async def borrow(self, key: PoolKey) -> socket.socket | None:
        """An idle connection for ``key`` from the broker, or None."""
        loop = asyncio.get_running_loop()
        request = next(self._ids)
        fut: asyncio.Future[socket.socket | None] = loop.create_future()
        self._pending[request] = fut
        try:
            self._send(ipc.Borrow(request=request, key=self.key_info(key)[0]))
        except (ChannelClosed, OSError):
            self._pending.pop(request, None)
            return None
        timer = loop.call_later(BORROW_TIMEOUT_SECONDS, _settle, fut, None)
        try:
            return await fut
        finally:
            timer.cancel()
            self._pending.pop(request, None)

    def on_lend(self, msg: ipc.Lend) -> None:
        """The broker answered a borrow."""
        fut = self._pending.pop(msg.request, None)
        sock = socket.socket(fileno=msg.fds[0]) if msg.fds else None
        if fut is None or fut.done():
            if sock is not None:
                sock.close()
            return
        fut.set_result(sock)

    def donate(self, conns: list[UpstreamConn]) -> int:
        """Gives idle connections to the broker; returns how many went. Each connection is
        closed here either way (the broker holds its own descriptor)."""
        given = 0
        for i in range(0, len(conns), MAX_FDS_PER_MESSAGE):
            batch = [up for up in conns[i : i + MAX_FDS_PER_MESSAGE] if up.donatable()]
            if batch:
                try:
                    self._send(
                        ipc.Donate(
                            keys=[self.key_info(up.key)[0] for up in batch],
                            fds=tuple(up.fileno() for up in batch),
                        )
                    )
                    given += len(batch)
                except (ChannelClosed, OSError, BlockingIOError):
                    pass
            for up in conns[i : i + MAX_FDS_PER_MESSAGE]:
                up.close()
        return given

    def fail_pending(self) -> None:
        """The master's channel is lost: every borrow under way ends now with None (its
        request connects by itself), instead of at its timeout."""
        for fut in self._pending.values():
            _settle(fut, None)
        self._pending.clear()


def _settle(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
