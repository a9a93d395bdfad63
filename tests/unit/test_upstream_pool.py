"""worker.upstream: the per-worker Pool of idle upstream connections, and short exchanges."""

from __future__ import annotations

from typing import Any

import pytest

import worker.client.h1 as upstream
from shared.headers import RawHeaders
from shared.peer import HttpPeer, PoolKey
from shared.session import Session
from tests.support.client import FakeTransport
from worker.client.h1 import UpstreamConn
from worker.connector.pool import Pool
from worker.interfaces import Upstream

KEY_A = HttpPeer("10.0.0.1:80").pool_key
KEY_B = HttpPeer("10.0.0.2:80").pool_key


class Clock:
    """Stands in for the ``time`` module in worker.upstream: monotonic() is set by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Handler:
    """Records the response callbacks of one exchange (a ``ResponseHandler`` with no request)."""

    def __init__(self) -> None:
        self.active: Session | None = None
        self.events: list[tuple[Any, ...]] = []

    def upstream_head(self, up: Upstream, status: int, headers: RawHeaders) -> None:
        self.events.append(("head", status, list(headers)))

    def upstream_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def upstream_trailers(self, headers: RawHeaders) -> None:
        self.events.append(("trailers", list(headers)))

    def upstream_done(self, up: Upstream) -> None:
        self.events.append(("done", up.keep_alive))

    def upstream_failed(self, up: Upstream, exc: BaseException | None) -> None:
        self.events.append(("failed", type(exc).__name__, str(exc)))

    def upstream_writable(self, writable: bool) -> None:
        self.events.append(("writable", writable))

    def begin_batch(self) -> None:
        pass

    def end_batch(self) -> None:
        pass

    def tunnel_started(self, up: Upstream) -> None:
        self.events.append(("tunnel",))

    def tunnel_data(self, data: bytes) -> None:
        self.events.append(("tunnel-data", data))

    def tunnel_closed(self) -> None:
        self.events.append(("tunnel-closed",))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A clock the pool and its connections read instead of the real one."""
    c = Clock()
    monkeypatch.setattr(upstream, "time", c)
    return c


def conn(pool: Pool, key: PoolKey = KEY_A) -> UpstreamConn:
    """A connection of ``pool`` on a fake transport, as asyncio would set it up."""
    up = UpstreamConn(key, pool)
    up.connection_made(FakeTransport())  # type: ignore[arg-type]
    return up


def is_closed(up: UpstreamConn) -> bool:
    """True when the connection was closed and its transport too."""
    return up.closed and up.transport.closed  # type: ignore[union-attr]


# -- get / put ---------------------------------------------------------------------------


def test_get_from_empty_pool() -> None:
    """An empty pool has nothing to reuse."""
    assert Pool(size=4, idle_timeout=60).get(KEY_A) is None


def test_get_is_lifo_per_key() -> None:
    """The most recently returned connection of a key is reused first."""
    pool = Pool(size=4, idle_timeout=60)
    a, b, c = conn(pool), conn(pool), conn(pool)
    for up in (a, b, c):
        pool.put(up)
    assert pool.idle_count == 3
    assert [pool.get(KEY_A), pool.get(KEY_A), pool.get(KEY_A), pool.get(KEY_A)] == [c, b, a, None]
    assert pool.reused == 3
    assert pool.idle_count == 0
    assert not any(up.closed for up in (a, b, c))


def test_keys_are_separate() -> None:
    """A connection is only handed out for its own key."""
    pool = Pool(size=4, idle_timeout=60)
    a, b = conn(pool, KEY_A), conn(pool, KEY_B)
    pool.put(a)
    pool.put(b)
    assert pool.get(KEY_B) is b
    assert pool.get(KEY_B) is None
    assert pool.get(KEY_A) is a


def test_size_cap_evicts_and_closes_oldest() -> None:
    """A full pool closes its oldest idle connection, whatever its key, to take a new one."""
    pool = Pool(size=2, idle_timeout=60)
    a, b, c = conn(pool, KEY_A), conn(pool, KEY_B), conn(pool, KEY_A)
    for up in (a, b, c):
        pool.put(up)
    assert is_closed(a)
    assert pool.idle_count == 2
    assert pool.get(KEY_A) is c
    assert pool.get(KEY_A) is None
    assert pool.get(KEY_B) is b


def test_reuse_refreshes_age_for_eviction() -> None:
    """A connection taken and put back counts as the newest."""
    pool = Pool(size=2, idle_timeout=60)
    a, b, c = conn(pool), conn(pool, KEY_B), conn(pool)
    pool.put(a)
    pool.put(b)
    assert pool.get(KEY_A) is a
    pool.put(a)
    pool.put(c)
    assert is_closed(b)
    assert not a.closed


def test_size_zero_keeps_nothing() -> None:
    """With size 0, a returned connection is closed."""
    pool = Pool(size=0, idle_timeout=60)
    a = conn(pool)
    pool.put(a)
    assert is_closed(a)
    assert pool.get(KEY_A) is None


def test_put_closed_connection_is_not_kept() -> None:
    """A connection that already closed is not pooled."""
    pool = Pool(size=4, idle_timeout=60)
    a = conn(pool)
    a.close()
    pool.put(a)
    assert pool.idle_count == 0
    assert pool.get(KEY_A) is None


def test_idle_connection_that_speaks_is_dropped() -> None:
    """An idle connection that receives bytes is closed and leaves the pool."""
    pool = Pool(size=4, idle_timeout=60)
    a, b = conn(pool), conn(pool)
    pool.put(a)
    pool.put(b)
    b.data_received(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert is_closed(b)
    assert pool.get(KEY_A) is a
    assert pool.get(KEY_A) is None


def test_idle_connection_closed_by_origin_is_dropped() -> None:
    """An idle connection the origin closes leaves the pool."""
    pool = Pool(size=4, idle_timeout=60)
    a = conn(pool)
    pool.put(a)
    a.connection_lost(None)
    assert pool.idle_count == 0
    assert pool.get(KEY_A) is None


def test_close_all() -> None:
    """close_all() closes every idle connection."""
    pool = Pool(size=4, idle_timeout=60)
    ups = [conn(pool, KEY_A), conn(pool, KEY_B)]
    for up in ups:
        pool.put(up)
    pool.close_all()
    assert all(is_closed(up) for up in ups)
    assert pool.idle_count == 0


# -- sweep -------------------------------------------------------------------------------


def test_sweep_closes_connections_idle_too_long(clock: Clock) -> None:
    """sweep() closes exactly the connections idle for longer than the idle timeout."""
    pool = Pool(size=4, idle_timeout=10)
    a, b = conn(pool), conn(pool, KEY_B)
    start = clock.now
    pool.put(a)
    clock.now = start + 5
    pool.put(b)
    pool.sweep(start + 9.9)
    assert not a.closed and not b.closed
    pool.sweep(start + 10.1)
    assert is_closed(a)
    assert not b.closed
    assert pool.get(KEY_A) is None
    pool.sweep(start + 15.1)
    assert is_closed(b)
    assert pool.idle_count == 0


def test_sweep_counts_from_last_return(clock: Clock) -> None:
    """The idle time of a reused connection counts from when it was last put back."""
    pool = Pool(size=4, idle_timeout=10)
    a = conn(pool)
    start = clock.now
    pool.put(a)
    clock.now = start + 8
    assert pool.get(KEY_A) is a
    pool.put(a)
    pool.sweep(start + 15)
    assert not a.closed
    assert pool.get(KEY_A) is a


def test_sweep_fails_exchange_past_read_deadline(clock: Clock) -> None:
    """A busy connection whose response is late fails with a timeout and is closed."""
    pool = Pool(size=4, idle_timeout=10)
    a = conn(pool)
    handler = Handler()
    a.start(handler, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, read_timeout=5)
    assert a.transport.written == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"  # type: ignore[union-attr]
    pool.sweep(clock.now + 4)
    assert handler.events == []
    pool.sweep(clock.now + 6)
    assert handler.events == [("failed", "TimeoutError", "upstream read timeout")]
    assert is_closed(a)
    assert a not in pool.busy


# -- exchanges ending in the pool ----------------------------------------------------------


def test_exchange_with_content_length_then_reuse() -> None:
    """A response with Content-Length is delivered and the connection can go back in the pool."""
    pool = Pool(size=4, idle_timeout=60)
    a = conn(pool)
    handler = Handler()
    a.start(handler, b"GET / HTTP/1.1\r\n\r\n", False, read_timeout=5)
    a.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    a.data_received(b"lo")
    assert handler.events == [
        ("head", 200, [(b"Content-Length", b"5")]),
        ("body", b"hel"),
        ("body", b"lo"),
        ("done", True),
    ]
    assert a not in pool.busy
    pool.put(a)
    assert pool.get(KEY_A) is a


def test_interim_response_is_not_forwarded() -> None:
    """A 100 Continue before the response is not passed on."""
    pool = Pool(size=4, idle_timeout=60)
    a = conn(pool)
    handler = Handler()
    a.start(handler, b"POST / HTTP/1.1\r\n\r\n", False, read_timeout=5)
    a.data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert handler.events == [("head", 204, []), ("done", True)]


def test_head_response_ends_after_head_and_connection_is_reusable() -> None:
    """A response to HEAD ends at its head despite Content-Length; the next exchange works."""
    pool = Pool(size=4, idle_timeout=60)
    a = conn(pool)
    first = Handler()
    a.start(first, b"HEAD / HTTP/1.1\r\n\r\n", True, read_timeout=5)
    a.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert first.events == [("head", 200, [(b"Content-Length", b"100")]), ("done", True)]
    second = Handler()
    a.start(second, b"GET / HTTP/1.1\r\n\r\n", False, read_timeout=5)
    a.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert second.events == [
        ("head", 200, [(b"Content-Length", b"2")]),
        ("body", b"ok"),
        ("done", True),
    ]


def test_close_delimited_response_ends_at_close() -> None:
    """A response without length ends when the origin closes; it is not kept alive."""
    pool = Pool(size=4, idle_timeout=60)
    a = conn(pool)
    handler = Handler()
    a.start(handler, b"GET / HTTP/1.1\r\n\r\n", False, read_timeout=5)
    a.data_received(b"HTTP/1.1 200 OK\r\n\r\nsome")
    a.connection_lost(None)
    assert handler.events == [("head", 200, []), ("body", b"some"), ("done", False)]


def test_close_delimited_response_with_non_chunked_transfer_encoding() -> None:
    """A response whose Transfer-Encoding does not end in chunked is delimited by the close
    (RFC 9112, section 6.3: "the response message body length is determined by reading the
    connection until it is closed by the server")."""
    pool = Pool(size=4, idle_timeout=60)
    a = conn(pool)
    handler = Handler()
    a.start(handler, b"GET / HTTP/1.1\r\n\r\n", False, read_timeout=5)
    a.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b")
    a.connection_lost(None)
    assert handler.events == [
        ("head", 200, [(b"Transfer-Encoding", b"gzip")]),
        ("body", b"\x1f\x8b"),
        ("done", False),
    ]


def test_origin_closes_before_response() -> None:
    """A connection lost before any response fails the exchange."""
    pool = Pool(size=4, idle_timeout=60)
    a = conn(pool)
    handler = Handler()
    a.start(handler, b"GET / HTTP/1.1\r\n\r\n", False, read_timeout=5)
    a.connection_lost(ConnectionResetError("reset by peer"))
    assert handler.events == [("failed", "ConnectionResetError", "reset by peer")]


def test_invalid_response_fails_and_closes() -> None:
    """Bytes that are not HTTP fail the exchange and close the connection."""
    pool = Pool(size=4, idle_timeout=60)
    a = conn(pool)
    handler = Handler()
    a.start(handler, b"GET / HTTP/1.1\r\n\r\n", False, read_timeout=5)
    a.data_received(b"SSH-2.0-OpenSSH_9.6\r\n")
    assert [e[0] for e in handler.events] == ["failed"]
    assert is_closed(a)
