"""The HTTP/1.1 connection's state machine (worker/server/h1.py): the table refuses a move it
does not list, and the states a keep-alive request, a pipelined pair, a 101 upgrade, a refused
request and a close walk through. H1Server runs on a fake transport with a stub engine that
answers each request at once, as the upstream client would call back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, MutableSet
from typing import Any

import pytest

from shared.errors import ProxyError
from shared.headers import RawHeaders
from shared.session import Session
from worker.server.h1 import CLOSING_STATES, TRANSITIONS, ConnState, H1Server
from worker.server.tunnel import EARLY_TUNNEL_BYTES

S = ConnState
GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
OK_HEADERS: RawHeaders = [(b"Content-Length", b"2")]


class Transport:
    """Either end of a connection: records writes, closes and read pauses."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.1", 50000), "sockname": ("192.0.2.2", 80)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, parts: Iterable[bytes]) -> None:
        for p in parts:
            self.written += p

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Upstream:
    """An upstream exchange that is always done and reusable."""

    keep_alive = True
    write_paused = False
    closed = False
    ended_with_head = False

    def __init__(self) -> None:
        self.transport = Transport()

    def release(self) -> None:
        pass

    def close(self) -> None:
        self.transport.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def detach(self) -> None:
        pass


class Engine:
    """The engine's side, cut down: ``start`` answers 200 ``ok`` at once, or (``answer``
    False) keeps the session for the test to answer."""

    log = logging.getLogger("test_h1_state")
    log_throttle: Any = None
    max_head = 16384
    max_body = 0
    header_timeout = 30.0
    draining = False
    response_phases = False
    p_response_body_filter: Callable[..., Any] | None = None

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self._connections: set[Any] = set()
        self.started: list[Session] = []
        self.done: list[Session] = []
        self.refused: list[ProxyError] = []

    @property
    def connections(self) -> MutableSet[Any]:
        return self._connections

    def start(self, conn: Any, s: Session) -> None:
        self.started.append(s)
        if self.answer:
            up = Upstream()
            conn.up = up
            conn.begin_batch()
            conn.upstream_head(up, 200, OK_HEADERS)
            conn.upstream_body(b"ok")
            conn.upstream_done(up)
            conn.end_batch()

    def refuse(self, conn: Any, s: Session, err: ProxyError) -> None:
        self.refused.append(err)
        conn.respond(s, 400, None, b"")
        conn.finish(s)

    def fail(self, conn: Any, s: Session, err: ProxyError) -> None:
        raise AssertionError(err)

    def upstream_failed(self, conn: Any, s: Session, err: ProxyError) -> None:
        raise AssertionError(err)

    def response_head(
        self, conn: Any, s: Session, up: Any, status: int, headers: RawHeaders
    ) -> None:
        raise AssertionError("no response phases")

    def body_filter(self, s: Session, data: bytes, end: bool) -> bytes:
        return data

    def request_done(self, s: Session) -> None:
        self.done.append(s)


class Recording(H1Server):
    """An H1Server that records every state it is put in (the moves the hot path checks
    inline included), from ``__init__``'s ACCEPTED on."""

    walk: list[ConnState]

    @property
    def state(self) -> ConnState:
        return self._state

    @state.setter
    def state(self, new: ConnState) -> None:
        self.__dict__.setdefault("walk", []).append(new)
        self._state = new


def connect(engine: Engine) -> tuple[Recording, Transport]:
    conn = Recording(engine)
    conn.walk = []
    t = Transport()
    conn.connection_made(t)  # type: ignore[arg-type]
    return conn, t


# -- the table ---------------------------------------------------------------------------


def test_every_state_has_a_row_and_the_ends_lead_nowhere_else() -> None:
    assert set(TRANSITIONS) == set(ConnState)
    assert all(TRANSITIONS[st] <= CLOSING_STATES for st in CLOSING_STATES)
    assert TRANSITIONS[S.CLOSED] == TRANSITIONS[S.SWITCHED] == frozenset()
    # Every state but the ends can close, and every state is reachable from ACCEPTED.
    seen, todo = {S.ACCEPTED}, [S.ACCEPTED]
    while todo:
        for nxt in TRANSITIONS[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    assert seen == set(ConnState)
    assert all(S.CLOSING in TRANSITIONS[st] for st in set(ConnState) - CLOSING_STATES)
    # The one move H1Server.finish makes without a check at run time (it has just seen
    # RESPONDING): the table must allow it.
    assert S.IDLE in TRANSITIONS[S.RESPONDING]


@pytest.mark.parametrize(
    ("start", "illegal"),
    [
        (S.IDLE, S.TUNNEL),  # a tunnel only after an upgrade request
        (S.IDLE, S.RESPONDING),  # no answer before a head
        (S.ACCEPTED, S.HEAD),  # no request before connection_made
        (S.STOPPED, S.HEAD),  # a stopped parser parses nothing more
        (S.TUNNEL, S.IDLE),  # a tunnel never goes back to HTTP
        (S.CLOSED, S.IDLE),
    ],
)
def test_the_table_refuses_an_illegal_transition(start: ConnState, illegal: ConnState) -> None:
    conn = H1Server(Engine())
    conn.state = start
    with pytest.raises(RuntimeError, match=f"cannot go from {start.name} to {illegal.name}"):
        conn._to(illegal)
    assert conn.state is start
    assert conn.closing is False


def test_a_closing_state_sets_closing_and_stops_the_flow_control() -> None:
    conn, t = connect(Engine())
    conn.close()
    assert conn.state is S.CLOSING and conn.closing and conn.flow.closed and t.closed
    conn.flow.pause_reading()
    assert not t.paused  # the transport is no longer the connection's to pause


# -- the walks ---------------------------------------------------------------------------


def test_keep_alive_requests_go_idle_head_responding_idle() -> None:
    engine = Engine()
    conn, t = connect(engine)
    assert conn.walk == [S.IDLE]
    conn.data_received(GET)
    assert conn.walk == [S.IDLE, S.HEAD, S.RESPONDING, S.IDLE]
    assert t.written.startswith(b"HTTP/1.1 200 ") and t.written.endswith(b"\r\n\r\nok")
    conn.data_received(GET)
    assert conn.walk[4:] == [S.HEAD, S.RESPONDING, S.IDLE]
    assert len(engine.done) == 2 and not t.closed and conn.is_idle()


def test_a_head_in_two_reads_stays_in_head() -> None:
    conn, _ = connect(Engine())
    conn.data_received(GET[:20])
    assert conn.state is S.HEAD
    conn.data_received(GET[20:])
    assert conn.walk == [S.IDLE, S.HEAD, S.RESPONDING, S.IDLE]


def test_a_pipelined_pair_goes_head_responding_twice_then_idle() -> None:
    async def main() -> tuple[Recording, Transport, Engine, bool]:
        engine = Engine()
        conn, t = connect(engine)
        conn.data_received(GET + GET)
        # Both heads parsed in the one read; the second waits with reading paused, and the
        # first was answered when the read was done.
        paused = t.paused
        await asyncio.sleep(0)  # the second's turn comes a loop turn later
        return conn, t, engine, paused

    conn, t, engine, paused = asyncio.run(main())
    assert paused
    assert conn.walk == [S.IDLE, S.HEAD, S.RESPONDING, S.HEAD, S.RESPONDING, S.IDLE]
    assert len(engine.done) == 2 and t.written.count(b"HTTP/1.1 200 ") == 2
    assert not t.paused and not t.closed


def test_a_101_upgrade_goes_upgrading_tunnel_closing_closed() -> None:
    engine = Engine(answer=False)
    conn, t = connect(engine)
    conn.data_received(UPGRADE + b"early")
    assert conn.walk == [S.IDLE, S.HEAD, S.RESPONDING, S.UPGRADING]
    conn.data_received(b"-more")  # held with the first early bytes
    (s,) = engine.started
    up = Upstream()
    up_: Any = up
    conn.up = up_
    conn.upstream_head(up_, 101, [(b"Upgrade", b"websocket"), (b"Connection", b"upgrade")])
    assert t.written.startswith(b"HTTP/1.1 101 ")
    assert b"Upgrade: websocket\r\n" in t.written
    assert t.written.endswith(b"Connection: Upgrade\r\n\r\n")
    conn.tunnel_started(up_)
    assert conn.state is S.TUNNEL
    assert up.transport.written == b"early-more"  # the held bytes first
    conn.data_received(b"to origin")
    conn.tunnel_data(b"to client")
    assert up.transport.written == b"early-moreto origin"
    assert t.written.endswith(b"to client")
    conn.tunnel_closed()  # the origin closed
    assert conn.walk[-2:] == [S.TUNNEL, S.CLOSING] and t.closed
    assert engine.done == [s] and s.status == 101
    conn.connection_lost(None)
    assert conn.walk == [
        S.IDLE,
        S.HEAD,
        S.RESPONDING,
        S.UPGRADING,
        S.TUNNEL,
        S.CLOSING,
        S.CLOSED,
    ]


def test_early_bytes_past_the_limit_pause_reading_until_the_tunnel_opens() -> None:
    engine = Engine(answer=False)
    conn, t = connect(engine)
    conn.data_received(UPGRADE)
    conn.data_received(b"x" * (EARLY_TUNNEL_BYTES + 1))
    assert conn.state is S.UPGRADING and t.paused
    up: Any = Upstream()
    conn.up = up
    conn.upstream_head(up, 101, [(b"Upgrade", b"websocket")])
    conn.tunnel_started(up)
    assert not t.paused and len(up.transport.written) == EARLY_TUNNEL_BYTES + 1


def test_an_upgrade_refused_by_the_origin_closes_after_the_response() -> None:
    engine = Engine(answer=False)
    conn, t = connect(engine)
    conn.data_received(UPGRADE + b"early")
    (s,) = engine.started
    up: Any = Upstream()
    conn.up = up
    conn.upstream_head(up, 200, OK_HEADERS)
    conn.upstream_body(b"ok")
    conn.upstream_done(up)
    assert conn.walk == [S.IDLE, S.HEAD, S.RESPONDING, S.UPGRADING, S.CLOSING]
    assert t.closed and engine.done == [s]


def test_connection_close_goes_responding_closing_closed() -> None:
    engine = Engine()
    conn, t = connect(engine)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
    assert conn.walk == [S.IDLE, S.HEAD, S.RESPONDING, S.CLOSING]
    assert t.closed and b"Connection: close\r\n" in t.written
    conn.data_received(GET)  # nothing is read once closing
    assert len(engine.started) == 1
    conn.connection_lost(None)
    assert conn.walk[-1] is S.CLOSED


def test_a_refused_request_goes_stopped_then_closing() -> None:
    engine = Engine()
    conn, t = connect(engine)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: example.com\r\nContent-Length: x\r\n\r\n")
    assert conn.walk == [S.IDLE, S.HEAD, S.STOPPED, S.CLOSING]
    assert len(engine.refused) == 1 and not engine.started
    assert t.written.startswith(b"HTTP/1.1 400 ") and t.closed


def test_the_header_timeout_stops_a_head_still_arriving() -> None:
    engine = Engine()
    conn, t = connect(engine)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: exa")
    conn.idle_check(conn.head_started + engine.header_timeout, 60.0, 1.0)
    assert conn.walk == [S.IDLE, S.HEAD, S.STOPPED, S.CLOSING]
    assert t.closed and len(engine.refused) == 1


def test_a_close_before_connection_made_goes_accepted_closing() -> None:
    engine = Engine()
    conn = Recording(engine)
    conn.walk = []
    assert conn.state is S.ACCEPTED
    conn.close()
    t = Transport()
    conn.connection_made(t)  # type: ignore[arg-type]
    assert conn.walk == [S.CLOSING] and t.closed and conn not in engine.connections


@pytest.mark.parametrize(
    ("start", "callback"),
    [
        (S.STOPPED, "on_message_begin"),  # the move to HEAD, checked inline
        (S.TUNNEL, "on_message_begin"),
        (S.IDLE, "on_headers_complete"),  # the move to RESPONDING, checked inline
        (S.UPGRADING, "on_headers_complete"),
    ],
)
def test_the_hot_path_moves_check_the_table_too(start: ConnState, callback: str) -> None:
    conn = H1Server(Engine())
    conn.state = start
    with pytest.raises(RuntimeError, match=f"cannot go from {start.name}"):
        getattr(conn, callback)()
    assert conn.state is start
