"""worker.upstream: what an UpstreamConn makes of responses an origin should not send.

Each test feeds byte literals to a connection on a fake transport and reads the callbacks its
handler got, and whether the connection may be reused (``done`` carries ``keep_alive``: the
exchange pools the connection only when it is True).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import httptools
import pytest

from shared.headers import RawHeaders
from shared.peer import HttpPeer
from shared.session import Session
from tests.support.client import FakeTransport
from worker.client.h1 import InvalidResponse, StaleBytes, UpstreamConn
from worker.connector.pool import Pool
from worker.interfaces import Upstream

KEY = HttpPeer("10.0.0.1:80").pool_key
GET = b"GET / HTTP/1.1\r\n\r\n"


@dataclass
class FakeSession:
    """What the connection reads of the request being served."""

    upgrade: bytes | None = None
    upstream_reused: bool = False
    keep_alive: bool = True


class Handler:
    """Records the response callbacks of one exchange; ``active`` is its request (a
    :class:`FakeSession` standing in for a Session)."""

    def __init__(self, session: FakeSession | None = None) -> None:
        self.active: Session | None = cast(Session, session or FakeSession())
        self.events: list[tuple[Any, ...]] = []
        self.failure: BaseException | None = None

    def upstream_head(self, up: Upstream, status: int, headers: RawHeaders) -> None:
        self.events.append(("head", status, list(headers)))

    def upstream_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def upstream_trailers(self, headers: RawHeaders) -> None:
        self.events.append(("trailers", list(headers)))

    def upstream_done(self, up: Upstream) -> None:
        self.events.append(("done", up.keep_alive))

    def upstream_failed(self, up: Upstream, exc: BaseException | None) -> None:
        self.failure = exc
        self.events.append(("failed", type(exc).__name__))

    def tunnel_started(self, up: Upstream) -> None:
        self.events.append(("tunnel",))

    def tunnel_data(self, data: bytes) -> None:
        self.events.append(("tunnel-data", data))

    def tunnel_closed(self) -> None:
        self.events.append(("tunnel-closed",))

    def upstream_writable(self, writable: bool) -> None:
        self.events.append(("writable", writable))

    def begin_batch(self) -> None:
        pass

    def end_batch(self) -> None:
        pass


def conn(pool: Pool | None = None) -> UpstreamConn:
    """A connection on a fake transport, as asyncio would set it up."""
    up = UpstreamConn(KEY, pool or Pool(size=4, idle_timeout=60))
    up.connection_made(FakeTransport())  # type: ignore[arg-type]
    return up


def exchange(
    up: UpstreamConn, *reads: bytes, method: bytes = b"GET", session: FakeSession | None = None
) -> Handler:
    """Starts an exchange on ``up`` and feeds it ``reads``; returns its handler."""
    handler = Handler(session)
    up.start(
        handler,
        method + b" / HTTP/1.1\r\n\r\n",
        method == b"HEAD",
        read_timeout=5,
    )
    for data in reads:
        up.data_received(data)
    return handler


def is_closed(up: UpstreamConn) -> bool:
    return up.closed and up.transport.closed  # type: ignore[union-attr]


# -- bytes after a complete response -------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        b"JUNK",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 2",
    ],
)
def test_bytes_after_a_response_in_the_same_read_end_reuse(extra: bytes) -> None:
    """The response is delivered whole; what follows it makes the connection not reusable,
    and the exchange ends only after the whole read was parsed (not mid-read, when it could
    have gone to the pool with the rest of the read still to come)."""
    h = exchange(conn(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + extra)
    assert h.events == [
        ("head", 200, [(b"Content-Length", b"2")]),
        ("body", b"ok"),
        ("done", False),
    ]


def test_clean_response_ends_reusable() -> None:
    h = exchange(conn(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.events[-1] == ("done", True)


def test_trailing_crlf_is_not_a_message() -> None:
    """An empty line after a response is skipped by the parser, as before a status line."""
    h = exchange(conn(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n")
    assert h.events[-1] == ("done", True)


def test_chunked_response_with_trailers_ends_once() -> None:
    h = exchange(
        conn(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
    )
    assert [e[0] for e in h.events] == ["head", "body", "trailers", "done"]
    assert h.events[-1] == ("done", True)


# -- 204, 304 and HEAD ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "framing,reusable",
    [
        (b"Content-Length: 0\r\n", True),
        (b"Content-Length: 5\r\n", False),
        (b"Transfer-Encoding: chunked\r\n", False),
    ],
)
def test_204_loses_its_framing(framing: bytes, reusable: bool) -> None:
    h = exchange(conn(), b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n" + framing + b"\r\n")
    assert h.events == [("head", 204, [(b"X-A", b"1")]), ("done", reusable)]


def test_204_body_in_the_same_read_is_not_passed_on() -> None:
    h = exchange(conn(), b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello")
    assert h.events == [("head", 204, []), ("done", False)]


def test_204_without_framing_is_untouched() -> None:
    h = exchange(conn(), b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
    assert h.events == [("head", 204, [(b"X-A", b"1")]), ("done", True)]


def test_304_keeps_its_length_as_metadata() -> None:
    h = exchange(conn(), b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n")
    assert h.events == [("head", 304, [(b"Content-Length", b"5")]), ("done", True)]


def test_304_with_body_bytes_is_not_reused() -> None:
    h = exchange(conn(), b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello")
    assert h.events == [("head", 304, [(b"Content-Length", b"5")]), ("done", False)]


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\n",
        b"Content-Length: 0\r\n",
        b"Transfer-Encoding: chunked\r\n",
    ],
)
def test_head_response_without_body_is_reusable(framing: bytes) -> None:
    """A response to HEAD ends at its head, whatever its framing says; the parser is ready for
    the next exchange."""
    up = conn()
    h = exchange(up, b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n", method=b"HEAD")
    assert h.events[-1] == ("done", True) and len(h.events) == 2
    again = exchange(up, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [e[0] for e in again.events] == ["head", "body", "done"]


@pytest.mark.parametrize(
    "framing,body",
    [
        (b"Content-Length: 5\r\n", b"hello"),
        (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        (b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        (b"Transfer-Encoding: chunked\r\n", b"hello"),
        (b"", b"hello"),
        (b"Content-Length: 0\r\n", b"hello"),
    ],
)
def test_head_response_with_body_bytes_is_not_reused(framing: bytes, body: bytes) -> None:
    """Body bytes after the head of a response to HEAD are never passed on, and the
    connection is not reused."""
    h = exchange(conn(), b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n" + body, method=b"HEAD")
    assert [e[0] for e in h.events] == ["head", "done"]
    assert h.events[-1] == ("done", False)


def test_head_response_body_in_a_later_read_closes_the_idle_connection() -> None:
    up = conn()
    h = exchange(up, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", method=b"HEAD")
    assert h.events[-1] == ("done", True)
    up.data_received(b"hello")
    assert is_closed(up)


# -- 101 -----------------------------------------------------------------------------------

SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\n"


def test_101_for_the_offered_protocol_tunnels() -> None:
    """Protocol names compare without regard to case."""
    h = exchange(
        conn(), SWITCH % b"WebSocket" + b"frame", session=FakeSession(upgrade=b"websocket")
    )
    assert [e[0] for e in h.events] == ["head", "tunnel", "tunnel-data"]
    assert h.events[-1] == ("tunnel-data", b"frame")


@pytest.mark.parametrize(
    "offered,response",
    [
        (None, SWITCH % b"websocket"),
        (b"websocket", SWITCH % b"h2c"),
        (b"websocket", SWITCH % b"websocket, h2c"),
        (b"websocket", b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n"),
        (b"websocket", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
    ],
)
def test_101_not_asked_for_is_invalid(offered: bytes | None, response: bytes) -> None:
    """A 101 without an upgrade request, for a protocol not offered, without Upgrade or
    without the upgrade connection option: the exchange fails as an invalid response before
    the handler hears of a 101, the connection is closed, and so will the client's be."""
    session = FakeSession(upgrade=offered)
    up = conn()
    h = exchange(up, response + b"after", session=session)
    assert h.events == [("failed", "InvalidResponse")]
    assert isinstance(h.failure, httptools.HttpParserError)
    assert is_closed(up)
    assert session.keep_alive is False


# -- bytes left over before a response -------------------------------------------------------


def reused_conn() -> UpstreamConn:
    """A connection that has carried one clean exchange."""
    up = conn()
    exchange(up, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return up


@pytest.mark.parametrize(
    "data",
    [b"hello", b"\r\nhello", b"0\r\n\r\n", b"helloHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
)
def test_leftover_bytes_on_a_reused_connection_fail_as_a_dead_connection(data: bytes) -> None:
    """Bytes that begin no status line, first on a reused connection: the exchange fails as
    one whose connection died before any response byte (so the engine may retry it)."""
    up = reused_conn()
    h = exchange(up, data)
    assert h.events == [("failed", "StaleBytes")]
    assert isinstance(h.failure, ConnectionError) and not up.got_bytes
    assert is_closed(up)


def test_leftover_bytes_on_a_borrowed_connection_fail_as_a_dead_connection() -> None:
    """A connection lent by the pool broker carries its first exchange in this process; the
    request says it was reused."""
    up = conn()
    h = exchange(up, b"hello", session=FakeSession(upstream_reused=True))
    assert h.events == [("failed", "StaleBytes")]
    assert not up.got_bytes


@pytest.mark.parametrize(
    "data",
    [
        b"hello",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
    ],
)
def test_bad_bytes_on_a_fresh_connection_are_an_invalid_response(data: bytes) -> None:
    up = conn()
    h = exchange(up, data)
    assert len(h.events) == 1 and h.events[0][0] == "failed"
    assert isinstance(h.failure, httptools.HttpParserError)
    assert not isinstance(h.failure, StaleBytes | InvalidResponse)
    assert is_closed(up)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
)
def test_invalid_response_on_a_reused_connection_stays_invalid(data: bytes) -> None:
    """A response that begins as one is the origin's answer, however malformed: 502, no
    retry."""
    up = reused_conn()
    h = exchange(up, data)
    assert isinstance(h.failure, httptools.HttpParserError)
    assert is_closed(up)
