"""A peer's own timeouts on an HTTP/1.1 upstream connection: ``PeerOptions.idle_timeout`` in
the pool (shorter or longer than the pool's, never handed to the broker), and the write timeout,
armed only while the transport has paused writing."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

import worker.client.h1 as upstream
from shared.errors import ErrorKind, ProxyError
from shared.peer import HttpPeer, PeerOptions
from tests.support.client import FakeTransport
from worker.client.h1 import UpstreamConn
from worker.connector.connector import Connector
from worker.connector.pool import Pool

KEY = HttpPeer("10.0.0.1:80").pool_key


class Clock:
    """Stands in for the ``time`` module of worker/client/h1.py."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(upstream, "time", c)
    return c


class Handler:
    """Records the failure and writability callbacks of one exchange."""

    active = None

    def __init__(self) -> None:
        self.failed: list[BaseException | None] = []
        self.writable: list[bool] = []

    def upstream_failed(self, up: UpstreamConn, exc: BaseException | None) -> None:
        self.failed.append(exc)

    def upstream_writable(self, writable: bool) -> None:
        self.writable.append(writable)


def conn(pool: Pool, idle_timeout: float | None = None) -> UpstreamConn:
    up = UpstreamConn(KEY, pool)
    up.connection_made(FakeTransport())  # type: ignore[arg-type]
    up.idle_timeout = idle_timeout
    return up


# -- PeerOptions.idle_timeout ------------------------------------------------------------


def test_peer_idle_timeout_shorter_than_pool(clock: Clock) -> None:
    """A connection whose peer says 2 s closes after 2 s idle, though the pool's is 60 s."""
    pool = Pool(size=8, idle_timeout=60)
    own, plain = conn(pool, idle_timeout=2), conn(pool)
    pool.put(plain)
    pool.put(own)
    clock.now += 1.5
    pool.sweep(clock.now)
    assert not own.closed
    clock.now += 1.0
    pool.sweep(clock.now)
    assert own.closed and not plain.closed
    assert pool.get(KEY) is plain


def test_peer_idle_timeout_longer_than_pool(clock: Clock) -> None:
    """A connection whose peer says 30 s outlives the pool's 5 s."""
    pool = Pool(size=8, idle_timeout=5)
    own, plain = conn(pool, idle_timeout=30), conn(pool)
    pool.put(own)
    pool.put(plain)
    clock.now += 10
    pool.sweep(clock.now)
    assert plain.closed and not own.closed
    clock.now += 25
    pool.sweep(clock.now)
    assert own.closed


def test_own_idle_timeout_is_never_donated(clock: Clock) -> None:
    """With a shared pool, a connection of a peer with its own idle timeout stays local (the
    broker would keep it for the pool's time): not given away when put, nor by the sweep,
    and closed, not donated, when the worker exits."""
    pool = Pool(size=8, idle_timeout=60)
    donated: list[UpstreamConn] = []

    def donor(conns: list[UpstreamConn]) -> int:
        donated.extend(conns)
        return len(conns)

    pool.donor = donor
    own, plain = conn(pool, idle_timeout=30), conn(pool)
    pool.put(own)
    pool.put(plain)  # a cold key: straight to the broker
    assert donated == [plain]
    clock.now += 5
    pool.sweep(clock.now)
    assert donated == [plain] and not own.closed
    assert pool.get(KEY) is own
    pool.put(own)
    pool.close_all()
    assert donated == [plain] and own.closed


def test_connector_gives_each_exchange_its_peers_settings() -> None:
    """The connector sets the write timeout (the peer's, else the config's) and the idle
    timeout on the connection it hands out; a peer of the same key without them resets them."""

    async def main() -> None:
        pool = Pool(size=8, idle_timeout=60)
        connector = Connector(asyncio.get_running_loop(), pool, 5.0, write_timeout=7.0)
        tuned = HttpPeer("10.0.0.1:80", options=PeerOptions(write_timeout=2.0, idle_timeout=3.0))
        plain = HttpPeer("10.0.0.1:80")
        assert plain.pool_key == tuned.pool_key  # timeouts are not part of the key
        up = conn(pool)
        made: list[HttpPeer] = []

        async def connect(peer: HttpPeer) -> Any:
            made.append(peer)
            return up

        connector.connect = connect
        got, reused = await connector.acquire(tuned)
        assert (got, reused) == (up, False)
        assert (up.write_timeout, up.idle_timeout) == (2.0, 3.0)
        pool.put(up)
        got, reused = await connector.acquire(plain)
        assert (got, reused) == (up, True)
        assert (up.write_timeout, up.idle_timeout) == (7.0, None)

    asyncio.run(main())


# -- the write timeout -------------------------------------------------------------------


def test_write_timeout_armed_only_while_paused(clock: Clock) -> None:
    """No timer while writes go through; pause_writing arms one and takes the read deadline
    off; resume_writing disarms it and the read deadline starts again."""

    async def main() -> None:
        pool = Pool(size=8, idle_timeout=60)
        up = conn(pool)
        up.write_timeout = 5.0
        h = Handler()
        up.start(h, b"POST / HTTP/1.1\r\n\r\n", False, 30.0)  # type: ignore[arg-type]
        assert up.write_timer is None and up.deadline == clock.now + 30
        up.pause_writing()
        assert up.write_timer is not None and up.deadline == math.inf
        clock.now += 4
        up.resume_writing()
        assert up.write_timer is None and up.deadline == clock.now + 30
        assert h.writable == [False, True] and not h.failed

    asyncio.run(main())


def test_write_timeout_fails_the_exchange() -> None:
    """A pause that lasts the write timeout fails the exchange with WRITE_TIMEOUT (the
    connection closes), and wakes the request side waiting to write."""

    async def main() -> None:
        pool = Pool(size=8, idle_timeout=60)
        up = conn(pool)
        up.write_timeout = 0.05
        h = Handler()
        up.start(h, b"POST / HTTP/1.1\r\n\r\n", False, 30.0)  # type: ignore[arg-type]
        up.pause_writing()
        await asyncio.sleep(0.2)
        assert up.closed and len(h.failed) == 1
        err = up.failure(h.failed[0])
        assert isinstance(err, ProxyError) and err.kind is ErrorKind.WRITE_TIMEOUT
        assert err.status == 504 and not err.retryable()
        assert h.writable == [False, True]

    asyncio.run(main())


def test_write_timer_ends_with_the_exchange() -> None:
    """A response that completes while writes are paused disarms the timer: the connection's
    next life in the pool is not cut short."""

    async def main() -> None:
        pool = Pool(size=8, idle_timeout=60)
        up = conn(pool)
        up.write_timeout = 0.05
        h = Handler()
        h.upstream_head = lambda *a: None  # type: ignore[attr-defined]
        h.upstream_body = lambda *a: None  # type: ignore[attr-defined]
        h.upstream_done = lambda *a: None  # type: ignore[attr-defined]
        h.begin_batch = h.end_batch = lambda: None  # type: ignore[attr-defined]
        up.start(h, b"POST / HTTP/1.1\r\n\r\n", False, 30.0)  # type: ignore[arg-type]
        up.pause_writing()
        up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert up.write_timer is None
        await asyncio.sleep(0.15)
        assert not up.closed and not h.failed

    asyncio.run(main())


def test_no_write_timeout_when_zero() -> None:
    """A write timeout of 0 (a test harness's connection, say) arms nothing."""

    async def main() -> None:
        pool = Pool(size=8, idle_timeout=60)
        up = conn(pool)
        h = Handler()
        up.start(h, b"POST / HTTP/1.1\r\n\r\n", False, 30.0)  # type: ignore[arg-type]
        up.pause_writing()
        assert up.write_timer is None

    asyncio.run(main())
