"""worker.h2.states: the stream state table, checked against RFC 9113 5.1 on the wire.

For every state a server's stream reaches and every frame a client may send on it, the codec
is put in that state by frames and calls, the frame is fed, and what the codec sends back is
compared with what RFC 9113 asks for: nothing (the frame is taken or dropped, the connection
goes on), RST_STREAM with a code (a stream error), or GOAWAY with a code (a connection error).
The same expectation is then read from :data:`~worker.h2.states.TRANSITIONS`, so the table and
the wire agree cell by cell.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hpack
import pytest
from h2.errors import ErrorCodes

from worker.h2.codec import (
    CLOSED_MEMORY,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    H2Codec,
)
from worker.h2.hpack import Fields
from worker.h2.states import (
    LEGAL,
    RECEIVING,
    REFUSALS,
    TRANSITIONS,
    Event,
    Reaction,
    StreamState,
)

S = StreamState
REQUEST: Fields = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":path", b"/"),
    (b":authority", b"example.com"),
]
TRAILERS: Fields = [(b"x-trailer", b"1")]
RESPONSE: Fields = [(b":status", b"200")]

#: What the codec sends back: nothing, or ("RST_STREAM" | "GOAWAY", code).
Wire = tuple[str, int] | None
OK: Wire = None
RST_STREAM_CLOSED: Wire = ("RST_STREAM", ErrorCodes.STREAM_CLOSED)
RST_PROTOCOL: Wire = ("RST_STREAM", ErrorCodes.PROTOCOL_ERROR)
GOAWAY_STREAM_CLOSED: Wire = ("GOAWAY", ErrorCodes.STREAM_CLOSED)
GOAWAY_PROTOCOL: Wire = ("GOAWAY", ErrorCodes.PROTOCOL_ERROR)


class Recorder:
    """The codec's handler: keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_request(self, stream_id: int, fields: Fields, end_stream: bool, too_large: bool) -> None:
        self.calls.append(("request", stream_id, end_stream))

    def on_data(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        self.calls.append(("data", stream_id, data, end_stream))

    def on_reset(self, stream_id: int, code: int, by_client: bool) -> None:
        self.calls.append(("reset", stream_id, code, by_client))

    def on_window(self, stream_id: int) -> None:
        self.calls.append(("window", stream_id))

    def on_goaway(self, code: int) -> None:
        self.calls.append(("goaway", code))


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + sid.to_bytes(4, "big") + payload
    )


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of each frame in what the codec sent."""
    out = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        ftype, flags = data[pos + 3], data[pos + 4]
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        out.append((ftype, flags, sid, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


class Conn:
    """A codec past the preface and SETTINGS, with the client's HPACK encoder."""

    def __init__(self) -> None:
        self.handler = Recorder()
        self.codec = H2Codec(self.handler, 100, 16384)
        self.codec.initiate_connection()
        assert self.codec.receive_data(PREFACE + frame(SETTINGS, 0, 0))
        self.codec.data_to_send()
        self.enc = hpack.Encoder()

    def headers(self, sid: int, fields: Fields, end_stream: bool) -> bytes:
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        return frame(HEADERS, flags, sid, self.enc.encode(fields))

    def feed(self, data: bytes) -> bool:
        return self.codec.receive_data(data)

    def open(self, sid: int, end_stream: bool) -> None:
        assert self.feed(self.headers(sid, REQUEST, end_stream))

    def wire(self, data: bytes, sid: int) -> Wire:
        """Feeds ``data``: what came back. After nothing or a RST_STREAM, the connection
        must still answer a PING."""
        alive = self.feed(data)
        sent = frames(self.codec.data_to_send())
        if not alive:
            assert sent and sent[-1][0] == GOAWAY
            return ("GOAWAY", int.from_bytes(sent[-1][3][4:8], "big"))
        assert self.feed(frame(PING, 0, 0, b"12345678"))
        assert frames(self.codec.data_to_send()) == [(PING, 1, 0, b"12345678")]
        if not sent:
            return OK
        assert [(f[0], f[2]) for f in sent] == [(RST_STREAM, sid)]
        return ("RST_STREAM", int.from_bytes(sent[0][3], "big"))


# The states, each reached by frames and calls; the stream under test is 1.


def idle(c: Conn) -> None:
    pass


def open_(c: Conn) -> None:
    c.open(1, end_stream=False)


def half_closed_local(c: Conn) -> None:
    c.open(1, end_stream=False)
    c.codec.send_headers(1, RESPONSE, end_stream=True)


def half_closed_remote(c: Conn) -> None:
    c.open(1, end_stream=True)


def closed(c: Conn) -> None:
    c.open(1, end_stream=True)
    c.codec.send_headers(1, RESPONSE, end_stream=True)


def reset_by_us(c: Conn) -> None:
    c.open(1, end_stream=False)
    c.codec.reset_stream(1)


def reset_by_client(c: Conn) -> None:
    c.open(1, end_stream=False)
    assert c.feed(frame(RST_STREAM, 0, 1, bytes(4)))


def skipped(c: Conn) -> None:
    c.open(3, end_stream=True)


def forgotten(c: Conn) -> None:
    for i in range(2 * CLOSED_MEMORY):
        c.open(1 + 2 * i, end_stream=False)
        c.codec.reset_stream(1 + 2 * i)


SETUPS: dict[StreamState, Callable[[Conn], None]] = {
    S.IDLE: idle,
    S.OPEN: open_,
    S.HALF_CLOSED_LOCAL: half_closed_local,
    S.HALF_CLOSED_REMOTE: half_closed_remote,
    S.CLOSED: closed,
    S.CLOSED_RESET_BY_US: reset_by_us,
    S.CLOSED_RESET_BY_CLIENT: reset_by_client,
    S.CLOSED_SKIPPED: skipped,
    S.CLOSED_FORGOTTEN: forgotten,
}


def frame_for(c: Conn, event: Event, state: StreamState) -> bytes:
    """The client's frame for ``event`` on stream 1 (HEADERS: a request on an idle stream,
    trailers on any other)."""
    fields = REQUEST if state is S.IDLE else TRAILERS
    return {
        Event.RECV_HEADERS: lambda: c.headers(1, fields, end_stream=False),
        Event.RECV_HEADERS_END: lambda: c.headers(1, fields, end_stream=True),
        Event.RECV_DATA: lambda: frame(DATA, 0, 1, b"x"),
        Event.RECV_DATA_END: lambda: frame(DATA, END_STREAM, 1, b"x"),
        Event.RECV_RST_STREAM: lambda: frame(RST_STREAM, 0, 1, bytes(4)),
        Event.RECV_WINDOW_UPDATE: lambda: frame(WINDOW_UPDATE, 0, 1, b"\x00\x00\x00\x01"),
        Event.RECV_PRIORITY: lambda: frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10"),
    }[event]()


_IDLE_ROW = [OK, OK, GOAWAY_PROTOCOL, GOAWAY_PROTOCOL, GOAWAY_PROTOCOL, GOAWAY_PROTOCOL, OK]
#: RFC 9113 5.1 (and 6.x, 8.1 for trailers), per state: what the client's HEADERS, HEADERS
#: with END_STREAM, DATA, DATA with END_STREAM, RST_STREAM, WINDOW_UPDATE and PRIORITY get.
RFC: dict[StreamState, list[Wire]] = {
    # "Receiving any frame other than HEADERS or PRIORITY on a stream in this state MUST be
    # treated as a connection error (Section 5.4.1) of type PROTOCOL_ERROR."
    S.IDLE: _IDLE_ROW,
    # Trailers must carry END_STREAM (8.1); without it the message is malformed (8.1.1).
    S.OPEN: [RST_PROTOCOL, OK, OK, OK, OK, OK, OK],
    S.HALF_CLOSED_LOCAL: [RST_PROTOCOL, OK, OK, OK, OK, OK, OK],
    # "other than WINDOW_UPDATE, PRIORITY, or RST_STREAM ... a stream error (Section 5.4.2)
    # of type STREAM_CLOSED."
    S.HALF_CLOSED_REMOTE: [RST_STREAM_CLOSED] * 4 + [OK, OK, OK],
    # "any frames after receiving a frame with the END_STREAM flag set MUST [be treated] as
    # a connection error (Section 5.4.1) of type STREAM_CLOSED", but WINDOW_UPDATE or
    # RST_STREAM "can be received in this state for a short period".
    S.CLOSED: [GOAWAY_STREAM_CLOSED] * 4 + [OK, OK, OK],
    # "The endpoint MUST ignore frames that it receives on closed streams after it has sent a
    # RST_STREAM frame."
    S.CLOSED_RESET_BY_US: [OK] * 7,
    # "any frame other than PRIORITY after receiving a RST_STREAM MUST [be treated] as a
    # stream error (Section 5.4.2) of type STREAM_CLOSED"; no RST_STREAM answers a RST_STREAM
    # (5.4.2), and the codec tolerates a WINDOW_UPDATE (it carries nothing).
    S.CLOSED_RESET_BY_CLIENT: [RST_STREAM_CLOSED] * 4 + [OK, OK, OK],
    # "An endpoint that receives an unexpected stream identifier MUST respond with a
    # connection error (Section 5.4.1) of type PROTOCOL_ERROR" (5.1.1).
    S.CLOSED_SKIPPED: [GOAWAY_PROTOCOL] * 4 + [OK, OK, OK],
    # Beyond the codec's memory: ignored, as after our own RST_STREAM.
    S.CLOSED_FORGOTTEN: [OK] * 7,
}
RECV = [
    Event.RECV_HEADERS,
    Event.RECV_HEADERS_END,
    Event.RECV_DATA,
    Event.RECV_DATA_END,
    Event.RECV_RST_STREAM,
    Event.RECV_WINDOW_UPDATE,
    Event.RECV_PRIORITY,
]
CELLS = [(state, event, row[i]) for state, row in RFC.items() for i, event in enumerate(RECV)]


def table_wire(state: StreamState, event: Event) -> Wire:
    """What the table says goes on the wire for ``event`` in ``state``."""
    to = TRANSITIONS[state, event]
    if isinstance(to, StreamState) or to.reaction is Reaction.IGNORE:
        return OK
    kind = "RST_STREAM" if to.reaction is Reaction.STREAM_ERROR else "GOAWAY"
    return (kind, to.code)


@pytest.mark.parametrize(
    ("state", "event", "expected"), CELLS, ids=[f"{s.name}-{e.name}" for s, e, _ in CELLS]
)
def test_a_frame_in_each_state_is_answered_as_rfc_9113_says(
    state: StreamState, event: Event, expected: Wire
) -> None:
    """The codec in ``state`` answers the client's frame as RFC 9113 says, and so does the
    table."""
    c = Conn()
    SETUPS[state](c)
    c.codec.data_to_send()
    assert c.wire(frame_for(c, event, state), 1) == expected
    assert table_wire(state, event) == expected


def test_the_setups_reach_their_state() -> None:
    """Each setup above leaves stream 1 in the state it is named for."""
    for state, setup in SETUPS.items():
        c = Conn()
        setup(c)
        st = c.codec.streams.get(1)
        assert (st.state if st is not None else c.codec._state_of(1)) is state


def test_frames_move_a_stream_through_its_states_on_the_wire() -> None:
    """open -(client END_STREAM)-> half-closed (remote): DATA there is STREAM_CLOSED on the
    stream; -(our END_STREAM)-> closed: DATA there ends the connection (STREAM_CLOSED)."""
    c = Conn()
    c.open(1, end_stream=False)
    assert c.wire(frame(DATA, END_STREAM, 1, b"body"), 1) is OK
    assert c.handler.calls[-1] == ("data", 1, b"body", True)
    assert c.wire(frame(DATA, 0, 1, b"late"), 1) == RST_STREAM_CLOSED

    c = Conn()
    c.open(1, end_stream=False)
    assert c.wire(frame(DATA, END_STREAM, 1, b"body"), 1) is OK
    c.codec.send_headers(1, RESPONSE, end_stream=True)
    assert [f[:3] for f in frames(c.codec.data_to_send())] == [(HEADERS, 5, 1)]
    assert c.wire(frame(DATA, 0, 1, b"late"), 1) == GOAWAY_STREAM_CLOSED


def test_our_end_stream_first_then_the_clients() -> None:
    """open -(our END_STREAM)-> half-closed (local): the body still comes, what we send is
    dropped; -(client END_STREAM)-> closed."""
    c = Conn()
    c.open(1, end_stream=False)
    c.codec.send_headers(1, RESPONSE, end_stream=True)
    c.codec.data_to_send()
    c.codec.send_data(1, b"more")
    c.codec.send_headers(1, TRAILERS, end_stream=True)
    assert c.codec.data_to_send() == b""
    assert c.wire(frame(DATA, 0, 1, b"a"), 1) is OK
    assert c.wire(c.headers(1, TRAILERS, end_stream=True), 1) is OK
    assert c.handler.calls[-2:] == [("data", 1, b"a", False), ("data", 1, b"", True)]
    assert c.wire(frame(DATA, 0, 1, b"late"), 1) == GOAWAY_STREAM_CLOSED


def test_finished_asks_a_client_still_sending_to_stop() -> None:
    """Half-closed (local) with the body still coming: finished() resets with NO_ERROR (RFC
    9113 8.1); then the stream is ours-reset and its DATA is dropped."""
    c = Conn()
    c.open(1, end_stream=False)
    c.codec.send_headers(1, RESPONSE, end_stream=True)
    c.codec.finished(1)
    sent = frames(c.codec.data_to_send())
    assert [(f[0], f[2], f[3]) for f in sent[1:]] == [(RST_STREAM, 1, bytes(4))]
    assert c.wire(frame(DATA, 0, 1, b"late"), 1) is OK


def test_a_stream_error_leaves_the_stream_reset_by_us() -> None:
    """After the RST_STREAM a stream error sends, more frames on the stream are dropped (no
    second RST_STREAM), also when the error answered a frame after the client's RST_STREAM."""
    c = Conn()
    c.open(1, end_stream=True)
    assert c.wire(frame(DATA, 0, 1, b"x"), 1) == RST_STREAM_CLOSED
    assert c.handler.calls[-1] == ("reset", 1, ErrorCodes.STREAM_CLOSED, False)
    assert c.wire(frame(DATA, 0, 1, b"x"), 1) is OK

    c = Conn()
    reset_by_client(c)
    assert c.wire(frame(DATA, 0, 1, b"x"), 1) == RST_STREAM_CLOSED
    assert c.wire(frame(DATA, 0, 1, b"x"), 1) is OK


def test_a_request_opens_an_idle_stream() -> None:
    """HEADERS opens an idle stream: open without END_STREAM (a second HEADERS without it is
    malformed trailers), half-closed (remote) with it (DATA is then STREAM_CLOSED)."""
    c = Conn()
    assert c.wire(c.headers(1, REQUEST, end_stream=False), 1) is OK
    assert c.handler.calls == [("request", 1, False)]
    assert c.wire(c.headers(1, TRAILERS, end_stream=False), 1) == RST_PROTOCOL

    c = Conn()
    assert c.wire(c.headers(1, REQUEST, end_stream=True), 1) is OK
    assert c.wire(frame(DATA, 0, 1, b"x"), 1) == RST_STREAM_CLOSED


def test_the_client_reset_reaches_the_handler_in_every_state_but_idle() -> None:
    """RST_STREAM is taken on every stream that is not idle and the handler hears it (on a
    closed one it loses nothing: the server ignores it)."""
    for state, setup in SETUPS.items():
        if state is S.IDLE:
            continue
        c = Conn()
        setup(c)
        c.codec.data_to_send()
        c.handler.calls.clear()
        assert c.wire(frame(RST_STREAM, 0, 1, b"\x00\x00\x00\x08"), 1) is OK
        assert c.handler.calls == [("reset", 1, ErrorCodes.CANCEL, True)]


def test_unknown_frame_types_are_ignored_and_push_promise_is_not() -> None:
    """The dispatch table: a type it does not list is ignored in any state, even on an idle
    stream (RFC 9113 4.1); PUSH_PROMISE from a client is a connection error (8.4)."""
    for setup in SETUPS.values():
        c = Conn()
        setup(c)
        c.codec.data_to_send()
        assert c.wire(frame(0xFA, 0xFF, 1, b"whatever"), 1) is OK
    c = Conn()
    c.open(1, end_stream=False)
    promise = frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02" + c.enc.encode(REQUEST))
    assert c.wire(promise, 1) == GOAWAY_PROTOCOL


def test_the_table_is_complete_and_consistent() -> None:
    """Every state has a verdict for every frame the client may send; sends have rows for the
    states the codec holds, and are refused only by dropping; PRIORITY never moves a stream;
    only HEADERS leaves idle; LEGAL and REFUSALS split the table."""
    held = {S.OPEN, S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_REMOTE, S.CLOSED}
    sends = {Event.SEND_HEADERS, Event.SEND_DATA, Event.SEND_END_STREAM, Event.SEND_RST_STREAM}
    expected = {(s, e) for s in S for e in RECV} | {(s, e) for s in held for e in sends}
    assert set(TRANSITIONS) == expected
    for (state, event), to in TRANSITIONS.items():
        if event in sends and not isinstance(to, StreamState):
            assert to.reaction is Reaction.IGNORE
        if event is Event.RECV_PRIORITY:
            assert to is state
        if isinstance(to, StreamState) and to is not state:
            assert state is not S.IDLE or event in (Event.RECV_HEADERS, Event.RECV_HEADERS_END)
            assert to is not S.IDLE
    for state in held:
        assert LEGAL[Event.SEND_RST_STREAM][state] is S.CLOSED_RESET_BY_US
    legal = {(s, e) for e, row in LEGAL.items() for s in row}
    assert legal.isdisjoint(REFUSALS) and legal | set(REFUSALS) == set(TRANSITIONS)
    assert RECEIVING == {S.OPEN, S.HALF_CLOSED_LOCAL}
