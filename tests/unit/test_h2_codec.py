"""worker.h2_codec: the server side of HTTP/2, checked against the ``h2`` package's client.

The client makes the bytes a real client sends, and parsing what the codec answers with it
checks that our frames and header blocks are valid. Protocol errors no client library would
commit are crafted by hand: :func:`frame` builds any frame, ``hpack.Encoder`` any header block.
"""

from __future__ import annotations

import struct
from typing import Any, TypeVar, cast

import hpack
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from worker.h2 import codec as h2_codec
from worker.h2.codec import (
    CLOSED_MEMORY,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    MAX_IDLE_FRAMES_PER_SECOND,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    H2Codec,
)
from worker.h2.fields import check_request, header_list_size
from worker.h2.hpack import Fields
from worker.h2.states import StreamState

REQUEST: Fields = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":path", b"/"),
    (b":authority", b"example.com"),
]
POST: Fields = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":path", b"/upload"),
    (b":authority", b"example.com"),
]
OK: Fields = [(b":status", b"200"), (b"content-type", b"text/plain")]
MAX_WINDOW = (1 << 31) - 1


class Recorder:
    """A handler that writes down every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_request(self, stream_id: int, fields: Fields, end_stream: bool, too_large: bool) -> None:
        self.calls.append(("request", stream_id, fields, end_stream, too_large))

    def on_data(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        self.calls.append(("data", stream_id, data, flow, end_stream))

    def on_reset(self, stream_id: int, code: int, by_client: bool) -> None:
        self.calls.append(("reset", stream_id, code, by_client))

    def on_window(self, stream_id: int) -> None:
        self.calls.append(("window", stream_id))

    def on_goaway(self, code: int) -> None:
        self.calls.append(("goaway", code))

    def take(self) -> list[tuple[Any, ...]]:
        calls, self.calls = self.calls, []
        return calls

    def requests(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == "request"]


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """Any frame, valid or not."""
    return (
        len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + sid.to_bytes(4, "big") + payload
    )


def headers(sid: int, block: bytes, end_stream: bool = True) -> bytes:
    return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid, block)


def parse(data: bytes) -> list[Frame]:
    """The frames in what the codec sent."""
    frames = []
    view = memoryview(data)
    while view:
        f, length = Frame.parse_frame_header(view[:9])
        f.parse_body(view[9 : 9 + length])
        frames.append(f)
        view = view[9 + length :]
    return frames


F = TypeVar("F", bound=Frame)


def parse_as(kind: type[F], data: bytes) -> list[F]:
    """The frames in what the codec sent, each of which must be a ``kind``."""
    frames = parse(data)
    assert all(isinstance(f, kind) for f in frames), frames
    return cast(list[F], frames)


def resets(data: bytes) -> list[tuple[int, int]]:
    return [(f.stream_id, f.error_code) for f in parse(data) if isinstance(f, RstStreamFrame)]


def raw_codec(max_streams: int = 100, max_header_list: int = 16384) -> tuple[H2Codec, Recorder]:
    """A codec past the preface and the client's (empty) SETTINGS, its output taken."""
    handler = Recorder()
    codec = H2Codec(handler, max_streams, max_header_list)
    codec.initiate_connection()
    assert codec.receive_data(PREFACE + frame(SETTINGS, 0, 0))
    codec.data_to_send()
    return codec, handler


def connection_error(codec: H2Codec, data: bytes) -> int:
    """Feeds ``data``, which must end the connection; returns the GOAWAY's error code."""
    assert codec.receive_data(data) is False
    assert codec.closed
    last = parse(codec.data_to_send())[-1]
    assert isinstance(last, GoAwayFrame)
    # Nothing more is taken or sent once the connection is over.
    assert codec.receive_data(frame(PING, 0, 0, b"12345678")) is False
    assert codec.data_to_send() == b""
    return last.error_code


class Pair:
    """The codec and an ``h2`` client connected back to back, past the SETTINGS exchange."""

    def __init__(self, max_streams: int = 100, max_header_list: int = 65536) -> None:
        self.handler = Recorder()
        self.codec = H2Codec(self.handler, max_streams, max_header_list)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.codec.initiate_connection()
        self.client.initiate_connection()
        assert self.send()
        self.receive()
        assert self.send()  # the client's ACK of our SETTINGS

    def send(self) -> bool:
        """What the client wrote, into the codec."""
        return self.codec.receive_data(self.client.data_to_send())

    def receive(self) -> list[Any]:
        """What the codec wrote, into the client; the client's events."""
        return self.client.receive_data(self.codec.data_to_send())

    def get(
        self,
        sid: int,
        extra: tuple[tuple[bytes, bytes], ...] | Fields = (),
        end_stream: bool = True,
    ) -> None:
        """A request from the client, taken by the codec."""
        self.client.send_headers(sid, REQUEST + list(extra), end_stream=end_stream)
        assert self.send()


def events_of(events: list[Any], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


# -- the connection's start ------------------------------------------------------------------


def test_handshake() -> None:
    """The codec's SETTINGS announce its limits; it ACKs the client's SETTINGS, and takes the
    client's ACK of its own without answering."""
    handler = Recorder()
    codec = H2Codec(handler, 7, 9000)
    codec.initiate_connection()
    ours = parse(codec.data_to_send())
    assert len(ours) == 1 and isinstance(ours[0], SettingsFrame)
    assert ours[0].settings == {
        SettingCodes.MAX_CONCURRENT_STREAMS: 7,
        SettingCodes.MAX_HEADER_LIST_SIZE: 9000,
    }
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    assert codec.receive_data(client.data_to_send())
    events = client.receive_data(ours[0].serialize() + codec.data_to_send())
    assert events_of(events, RemoteSettingsChanged)
    assert events_of(events, SettingsAcknowledged)
    assert codec.receive_data(client.data_to_send())  # the ACK
    assert codec.data_to_send() == b""
    assert handler.calls == []


def test_preface_in_pieces() -> None:
    """The preface may arrive split anywhere."""
    handler = Recorder()
    codec = H2Codec(handler, 10, 1000)
    data = PREFACE + frame(SETTINGS, 0, 0)
    for i in range(0, len(data), 5):
        assert codec.receive_data(data[i : i + 5])
    assert [f.flags for f in parse(codec.data_to_send())] == [{"ACK"}]


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + frame(SETTINGS, 0, 0),
        b"PRI * HTTP/1.1",
    ],
)
def test_no_preface(data: bytes) -> None:
    """Anything but the preface is a PROTOCOL_ERROR, as soon as a byte differs."""
    codec = H2Codec(Recorder(), 10, 1000)
    assert connection_error(codec, data) == ErrorCodes.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "first",
    [
        frame(PING, 0, 0, b"12345678"),
        frame(SETTINGS, 1, 0),  # an ACK is not the client's SETTINGS
        frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01\x00"),
    ],
)
def test_first_frame_must_be_settings(first: bytes) -> None:
    """RFC 9113 3.4: the preface "MUST be followed by a SETTINGS frame"."""
    codec = H2Codec(Recorder(), 10, 1000)
    assert connection_error(codec, PREFACE + first) == ErrorCodes.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(SETTINGS, 0, 1), ErrorCodes.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, b"\x00\x04\x00\x00"), ErrorCodes.FRAME_SIZE_ERROR),
        (frame(SETTINGS, 1, 0, b"\x00\x04\x00\x00\x00\x01"), ErrorCodes.FRAME_SIZE_ERROR),
        (frame(SETTINGS, 0, 0, b"\x00\x05\x00\x00\x3f\xff"), ErrorCodes.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, b"\x00\x05\x01\x00\x00\x00"), ErrorCodes.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, b"\x00\x02\x00\x00\x00\x02"), ErrorCodes.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"), ErrorCodes.FLOW_CONTROL_ERROR),
    ],
)
def test_bad_settings(bad: bytes, code: int) -> None:
    """SETTINGS on a stream, of a bad length, or with a value out of range end the
    connection with the error RFC 9113 6.5 names."""
    codec, _ = raw_codec()
    assert connection_error(codec, bad) == code


def test_settings_unknown_and_frame_size() -> None:
    """Unknown settings are ignored; a larger MAX_FRAME_SIZE is used for what we send."""
    codec, _ = raw_codec()
    assert codec.receive_data(
        frame(SETTINGS, 0, 0, b"\x00\x99\x00\x00\x00\x01\x00\x05\x00\x00\x80\x00")
    )
    assert [f.flags for f in parse(codec.data_to_send())] == [{"ACK"}]
    assert codec.max_outbound_frame_size == 0x8000


# -- requests -------------------------------------------------------------------------------


def test_get_and_response() -> None:
    """A GET with END_STREAM is one on_request; the response HEADERS and DATA reach the
    client with END_STREAM, and the stream is then forgotten."""
    p = Pair()
    p.get(1, [(b"accept", b"*/*"), (b"user-agent", b"test/1.0")])
    assert p.handler.take() == [
        ("request", 1, REQUEST + [(b"accept", b"*/*"), (b"user-agent", b"test/1.0")], True, False)
    ]
    assert p.codec.highest_inbound_stream_id == 1
    p.codec.send_headers(1, OK + [(b"content-length", b"5")])
    p.codec.send_data(1, b"hello", end_stream=True)
    events = p.receive()
    (resp,) = events_of(events, ResponseReceived)
    assert resp.stream_id == 1
    assert list(resp.headers) == OK + [(b"content-length", b"5")]
    assert [e.data for e in events_of(events, DataReceived)] == [b"hello"]
    assert [e.stream_id for e in events_of(events, StreamEnded)] == [1]
    assert p.codec.streams == {}


def test_response_headers_only() -> None:
    """A response of HEADERS with END_STREAM, and one ended by an empty DATA frame."""
    p = Pair()
    p.get(1)
    p.get(3)
    p.codec.send_headers(1, [(b":status", b"204")], end_stream=True)
    p.codec.send_headers(3, [(b":status", b"200")])
    p.codec.end_stream(3)
    events = p.receive()
    assert [e.stream_id for e in events_of(events, StreamEnded)] == [1, 3]
    assert p.codec.streams == {}
    # Sending on a stream that is over does nothing.
    p.codec.send_data(1, b"late")
    p.codec.send_headers(3, OK)
    assert p.codec.data_to_send() == b""


def test_post_body_in_padded_data_frames() -> None:
    """A body in several DATA frames, padded or not; each on_data carries the bytes and the
    flow-controlled length (padding included); END_STREAM rides on the last DATA."""
    p = Pair()
    p.client.send_headers(1, POST + [(b"content-length", b"13")])
    p.client.send_data(1, b"hello ")
    p.client.send_data(1, b"body", pad_length=10)
    p.client.send_data(1, b"!!!", end_stream=True, pad_length=0)
    assert p.send()
    assert p.handler.take() == [
        ("request", 1, POST + [(b"content-length", b"13")], False, False),
        ("data", 1, b"hello ", 6, False),
        ("data", 1, b"body", 4 + 10 + 1, False),
        ("data", 1, b"!!!", 3 + 1, True),
    ]
    assert p.codec.streams[1].state is StreamState.HALF_CLOSED_REMOTE  # the client is done


def test_hand_padded_data() -> None:
    """Padding by hand: the longest padding allowed, and padding as long as the frame (a
    PROTOCOL_ERROR, RFC 9113 6.1)."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    codec.receive_data(headers(1, enc.encode(POST), end_stream=False))
    assert codec.receive_data(frame(DATA, PADDED, 1, b"\x05abcde"))
    assert codec.receive_data(frame(DATA, PADDED, 1, b"\x00"))
    assert handler.take()[1:] == [("data", 1, b"", 6, False), ("data", 1, b"", 1, False)]
    assert connection_error(codec, frame(DATA, PADDED, 1, b"\x05abcd")) == ErrorCodes.PROTOCOL_ERROR


def test_body_ended_by_trailers() -> None:
    """Trailers end the body: one on_data with no bytes and end_stream."""
    p = Pair()
    p.client.send_headers(1, POST)
    p.client.send_data(1, b"part")
    p.client.send_headers(1, [(b"grpc-status", b"0"), (b"x-checksum", b"abc")], end_stream=True)
    assert p.send()
    assert p.handler.take()[1:] == [("data", 1, b"part", 4, False), ("data", 1, b"", 0, True)]
    p.codec.send_headers(1, OK)
    p.codec.send_data(1, b"x")
    p.codec.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    events = p.receive()
    (trailers,) = events_of(events, TrailersReceived)
    assert list(trailers.headers) == [(b"grpc-status", b"0")]
    assert events_of(events, StreamEnded)
    assert p.codec.streams == {}


@pytest.mark.parametrize(
    ("trailers", "end_stream"),
    [
        ([(b":path", b"/")], True),
        ([(b"X-Upper", b"1")], True),
        ([(b"connection", b"close")], True),
        ([(b"x-bad", b"a\r\nb")], True),
        ([(b"grpc-status", b"0")], False),
    ],
)
def test_malformed_trailers(trailers: Fields, end_stream: bool) -> None:
    """Trailers with a pseudo-field, a bad name or value, a connection field, or without
    END_STREAM reset the stream with PROTOCOL_ERROR."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    codec.receive_data(headers(1, enc.encode(POST), end_stream=False))
    assert codec.receive_data(headers(1, enc.encode(trailers), end_stream=end_stream))
    assert resets(codec.data_to_send()) == [(1, ErrorCodes.PROTOCOL_ERROR)]
    assert handler.take()[1:] == [("reset", 1, ErrorCodes.PROTOCOL_ERROR, False)]
    assert codec.streams == {}


def test_trailers_after_end_stream() -> None:
    """HEADERS on a stream whose request already ended: STREAM_CLOSED for that stream; the
    block still updates the decoder's table, so the next request decodes."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    codec.receive_data(headers(1, enc.encode(REQUEST)))
    assert codec.receive_data(headers(1, enc.encode([(b"x-late", b"1")])))
    assert resets(codec.data_to_send()) == [(1, ErrorCodes.STREAM_CLOSED)]
    assert codec.receive_data(headers(3, enc.encode(REQUEST + [(b"x-late", b"1")])))
    assert handler.requests()[-1][2] == REQUEST + [(b"x-late", b"1")]


def test_large_request_header_in_continuation() -> None:
    """A request header block the client splits into HEADERS and CONTINUATION frames."""
    p = Pair()
    big = b"v" * 40_000
    p.get(1, [(b"x-big", big)])
    ((_, sid, fields, end, too_large),) = p.handler.take()
    assert (sid, end, too_large) == (1, True, False)
    assert fields[-1] == (b"x-big", big)


def test_large_response_header_in_continuation() -> None:
    """A response header block over the peer's frame size goes out as HEADERS and
    CONTINUATIONs, each at most that size, END_HEADERS on the last only; lengths over 127
    take multi-byte integers, and the client decodes it all."""
    p = Pair()
    p.get(1)
    fields = OK + [(b"x-a", b"a" * 200), (b"x-b", b"b" * 17_000), (b"x-c", b"c" * 16_000)]
    p.codec.send_headers(1, fields, end_stream=True)
    out = p.codec.data_to_send()
    frames = parse(out)
    assert [type(f) for f in frames] == [HeadersFrame, ContinuationFrame, ContinuationFrame]
    sizes = [len(f.data) for f in frames[:2] if isinstance(f, HeadersFrame | ContinuationFrame)]
    assert sizes == [16384, 16384]
    assert [f.flags for f in frames] == [{"END_STREAM"}, set(), {"END_HEADERS"}]
    events = p.client.receive_data(out)
    (resp,) = events_of(events, ResponseReceived)
    assert list(resp.headers) == fields
    assert events_of(events, StreamEnded)


def test_response_headers_follow_max_frame_size() -> None:
    """After the client raises SETTINGS_MAX_FRAME_SIZE, header blocks are cut at that size."""
    p = Pair()
    p.client.update_settings({SettingCodes.MAX_FRAME_SIZE: 20_000})
    p.get(1)
    assert events_of(p.receive(), SettingsAcknowledged)
    fields = OK + [(b"x-big", b"z" * 30_000)]
    p.codec.send_headers(1, fields)
    out = p.codec.data_to_send()
    frames = [f for f in parse(out) if isinstance(f, HeadersFrame | ContinuationFrame)]
    assert [len(f.data) for f in frames][0] == 20_000
    assert len(frames) == 2
    (resp,) = events_of(p.client.receive_data(out), ResponseReceived)
    assert list(resp.headers) == fields


def test_response_fields_round_trip() -> None:
    """Static-table fields, names the table lacks, empty values and credentials all reach
    the client intact; credentials arrive marked "never indexed"."""
    p = Pair()
    p.get(1)
    fields = [
        (b":status", b"404"),
        (b"content-type", b"text/html"),
        (b"x-empty", b""),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"server", b"tenaya"),
        (b"x-long", bytes(range(33, 127)) * 3),
    ]
    p.codec.send_headers(1, fields, end_stream=True)
    (resp,) = events_of(p.receive(), ResponseReceived)
    assert list(resp.headers) == fields
    never = [h[0] for h in resp.headers if isinstance(h, hpack.NeverIndexedHeaderTuple)]
    assert never == [b"set-cookie", b"set-cookie"]


# -- flow control ---------------------------------------------------------------------------


def test_send_data_uses_windows() -> None:
    """send_data takes from the stream's and the connection's window; the client accepts
    exactly a full window."""
    p = Pair()
    p.get(1)
    p.get(3)
    assert p.codec.local_flow_control_window(1) == 65535
    p.codec.send_headers(1, OK)
    p.codec.send_data(1, b"x" * 16384)
    assert p.codec.local_flow_control_window(1) == 65535 - 16384
    assert p.codec.local_flow_control_window(3) == 65535 - 16384  # the connection's
    for _ in range(2):
        p.codec.send_data(1, b"x" * 16384)
    p.codec.send_data(1, b"x" * 16383)
    assert p.codec.local_flow_control_window(1) == 0
    assert p.codec.local_flow_control_window(99) == 0  # no such stream
    events = p.receive()
    assert sum(len(e.data) for e in events_of(events, DataReceived)) == 65535


def test_window_update_reopens_windows() -> None:
    """WINDOW_UPDATE on a stream and on the connection grow those windows, and say so."""
    p = Pair()
    p.get(1)
    p.handler.take()
    p.codec.send_headers(1, OK)
    p.codec.send_data(1, b"x" * 16384)
    p.codec.send_data(1, b"x" * 16384)
    p.receive()
    p.client.increment_flow_control_window(10_000, stream_id=1)
    assert p.send()
    assert p.handler.take() == [("window", 1)]
    assert p.codec.local_flow_control_window(1) == 65535 - 32768  # the connection's
    p.client.increment_flow_control_window(50_000)
    assert p.send()
    assert p.handler.take() == [("window", 0)]
    assert p.codec.local_flow_control_window(1) == 65535 - 32768 + 10_000
    assert p.codec.send_window == 65535 - 32768 + 50_000


def test_initial_window_size_change() -> None:
    """SETTINGS_INITIAL_WINDOW_SIZE moves the window of every open stream by the difference
    (below zero too) and is what new streams start with; a rise calls on_window(0)."""
    p = Pair()
    p.client.increment_flow_control_window(1_000_000)
    p.get(1)
    p.codec.send_headers(1, OK)
    p.codec.send_data(1, b"x" * 5000)
    p.receive()
    p.handler.take()
    p.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100_000})
    assert p.send()
    assert p.handler.take() == [("window", 0)]
    assert p.codec.local_flow_control_window(1) == 95_000
    assert events_of(p.receive(), SettingsAcknowledged)
    p.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    assert p.send()
    assert p.handler.take() == []
    assert p.codec.local_flow_control_window(1) == -4000
    p.receive()
    p.get(3)
    assert p.codec.local_flow_control_window(3) == 1000


def test_stream_window_overflow() -> None:
    """A WINDOW_UPDATE taking a stream's window over 2^31-1 resets that stream with
    FLOW_CONTROL_ERROR; a zero increment resets it with PROTOCOL_ERROR."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    codec.receive_data(headers(1, enc.encode(REQUEST)) + headers(3, enc.encode(REQUEST)))
    assert codec.receive_data(frame(WINDOW_UPDATE, 0, 1, MAX_WINDOW.to_bytes(4, "big")))
    assert codec.receive_data(frame(WINDOW_UPDATE, 0, 3, bytes(4)))
    assert resets(codec.data_to_send()) == [
        (1, ErrorCodes.FLOW_CONTROL_ERROR),
        (3, ErrorCodes.PROTOCOL_ERROR),
    ]
    assert handler.take()[2:] == [
        ("reset", 1, ErrorCodes.FLOW_CONTROL_ERROR, False),
        ("reset", 3, ErrorCodes.PROTOCOL_ERROR, False),
    ]
    # A stream that is over: its WINDOW_UPDATE is ignored.
    assert codec.receive_data(frame(WINDOW_UPDATE, 0, 1, b"\x00\x00\x00\x01"))
    assert codec.data_to_send() == b"" and handler.calls == []


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(WINDOW_UPDATE, 0, 0, MAX_WINDOW.to_bytes(4, "big")), ErrorCodes.FLOW_CONTROL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, bytes(4)), ErrorCodes.PROTOCOL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, b"\x00\x01"), ErrorCodes.FRAME_SIZE_ERROR),
        (frame(WINDOW_UPDATE, 0, 9, b"\x00\x00\x00\x01"), ErrorCodes.PROTOCOL_ERROR),
    ],
)
def test_connection_window_errors(bad: bytes, code: int) -> None:
    """The connection's window over 2^31-1, a zero increment on it, a WINDOW_UPDATE of the
    wrong length or on an idle stream end the connection."""
    codec, _ = raw_codec()
    assert connection_error(codec, bad) == code


def test_initial_window_size_overflow() -> None:
    """A SETTINGS_INITIAL_WINDOW_SIZE that takes an open stream's window over 2^31-1 is a
    connection error (RFC 9113 6.9.2)."""
    codec, _ = raw_codec()
    codec.receive_data(headers(1, hpack.Encoder().encode(REQUEST)))
    codec.receive_data(frame(WINDOW_UPDATE, 0, 1, (MAX_WINDOW - 65535).to_bytes(4, "big")))
    bad = frame(SETTINGS, 0, 0, b"\x00\x04\x00\x01\x00\x00")
    assert connection_error(codec, bad) == ErrorCodes.FLOW_CONTROL_ERROR


def test_client_exceeds_connection_window() -> None:
    """DATA beyond the connection's receive window: GOAWAY FLOW_CONTROL_ERROR."""
    codec, _ = raw_codec()
    codec.receive_data(headers(1, hpack.Encoder().encode(POST), end_stream=False))
    for _ in range(3):
        assert codec.receive_data(frame(DATA, 0, 1, bytes(16384)))
    assert codec.receive_data(frame(DATA, 0, 1, bytes(16383)))
    assert connection_error(codec, frame(DATA, 0, 1, b"!")) == ErrorCodes.FLOW_CONTROL_ERROR


def test_client_exceeds_stream_window() -> None:
    """DATA beyond one stream's window (the connection's having room) resets that stream
    with FLOW_CONTROL_ERROR; the connection goes on."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    codec.receive_data(headers(1, enc.encode(POST), end_stream=False))
    for _ in range(4):
        assert codec.receive_data(frame(DATA, 0, 1, bytes(16000)))
    codec.acknowledge_received_data(64000, 0)  # only the connection's window
    assert [f.stream_id for f in parse(codec.data_to_send())] == [0]
    assert codec.receive_data(frame(DATA, 0, 1, bytes(2000)))
    assert resets(codec.data_to_send()) == [(1, ErrorCodes.FLOW_CONTROL_ERROR)]
    assert handler.calls[-1] == ("reset", 1, ErrorCodes.FLOW_CONTROL_ERROR, False)
    assert codec.receive_data(headers(3, enc.encode(REQUEST)))
    assert handler.calls[-1][:2] == ("request", 3)


def test_acknowledge_received_data() -> None:
    """Window is given back in WINDOW_UPDATEs on the stream and the connection once half a
    window has been consumed, not before; the client can then send a full window again."""
    p = Pair()
    p.client.send_headers(1, POST)
    p.client.send_data(1, b"a" * 15000)
    p.client.send_data(1, b"b" * 15000)
    assert p.send()
    assert p.client.local_flow_control_window(1) == 65535 - 30000
    p.codec.acknowledge_received_data(30000, 1)
    assert p.codec.data_to_send() == b""
    p.client.send_data(1, b"c" * 3000)
    assert p.send()
    p.codec.acknowledge_received_data(3000, 1)
    out = p.codec.data_to_send()
    updates = [
        (f.stream_id, f.window_increment) for f in parse(out) if isinstance(f, WindowUpdateFrame)
    ]
    assert updates == [(0, 33000), (1, 33000)]
    events = p.client.receive_data(out)
    assert len(events_of(events, WindowUpdated)) == 2
    assert p.client.local_flow_control_window(1) == 65535
    # Once the request has ended, only the connection's window is given back.
    for _ in range(3):
        p.client.send_data(1, b"d" * 10000)
    p.client.send_data(1, b"d" * 10000, end_stream=True)
    assert p.send()
    p.codec.acknowledge_received_data(40000, 1)
    updates = [
        (f.stream_id, f.window_increment)
        for f in parse_as(WindowUpdateFrame, p.codec.data_to_send())
    ]
    assert updates == [(0, 40000)]


def test_client_lowers_header_table_size() -> None:
    """When the client lowers SETTINGS_HEADER_TABLE_SIZE, our next header block starts with
    a dynamic table size update (RFC 7541 4.2; h2's decoder insists), and only that one."""
    p = Pair()
    p.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 100})
    p.get(1)
    p.get(3)
    assert events_of(p.receive(), SettingsAcknowledged)
    p.codec.send_headers(1, OK, end_stream=True)
    p.codec.send_headers(3, OK)
    p.codec.send_headers(3, [(b"x-t", b"1")], end_stream=True)
    out = p.codec.data_to_send()
    blocks = [f.data for f in parse_as(HeadersFrame, out)]
    assert [b[:1] for b in blocks] == [b"\x20", b"\x88", b"\x00"]
    events = p.client.receive_data(out)
    assert len(events_of(events, ResponseReceived)) == 2
    assert events_of(events, TrailersReceived)
    # Lowering it again needs no update: the table is already at 0.
    p.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 0})
    p.get(5)
    assert events_of(p.receive(), SettingsAcknowledged)
    p.codec.send_headers(5, OK, end_stream=True)
    out = p.codec.data_to_send()
    assert parse_as(HeadersFrame, out)[0].data[:1] == b"\x88"
    assert events_of(p.client.receive_data(out), ResponseReceived)


def test_client_raises_header_table_size() -> None:
    """A larger SETTINGS_HEADER_TABLE_SIZE changes nothing in our blocks."""
    p = Pair()
    p.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 65536})
    p.get(1)
    p.receive()
    p.codec.send_headers(1, OK, end_stream=True)
    out = p.codec.data_to_send()
    assert parse_as(HeadersFrame, out)[0].data == b"\x88\x0f\x10\x0atext/plain"
    assert events_of(p.client.receive_data(out), ResponseReceived)


# -- resets, limits, GOAWAY -----------------------------------------------------------------


def test_reset_by_client() -> None:
    """RST_STREAM from the client: on_reset(by_client=True), and the stream is gone, so
    nothing more is sent on it."""
    p = Pair()
    p.get(1, end_stream=False)
    p.client.reset_stream(1, ErrorCodes.CANCEL)
    assert p.send()
    assert p.handler.take()[1:] == [("reset", 1, ErrorCodes.CANCEL, True)]
    assert p.codec.streams == {}
    p.codec.send_headers(1, OK)
    p.codec.send_data(1, b"x")
    assert p.codec.data_to_send() == b""
    # DATA the client had in flight is dropped but still counts against the connection.
    assert p.codec.receive_data(frame(DATA, 0, 1, b"late"))
    assert p.handler.calls == [] and p.codec.unacked == 4


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(RST_STREAM, 0, 5, bytes(4)), ErrorCodes.PROTOCOL_ERROR),
        (frame(RST_STREAM, 0, 0, bytes(4)), ErrorCodes.PROTOCOL_ERROR),
        (frame(RST_STREAM, 0, 1, bytes(3)), ErrorCodes.FRAME_SIZE_ERROR),
    ],
)
def test_bad_rst_stream(bad: bytes, code: int) -> None:
    """RST_STREAM on an idle stream or the connection, or of the wrong length."""
    codec, _ = raw_codec()
    codec.receive_data(headers(1, hpack.Encoder().encode(REQUEST)))
    assert connection_error(codec, bad) == code


def test_reset_stream_by_server() -> None:
    """reset_stream sends RST_STREAM once; the stream is forgotten."""
    p = Pair()
    p.get(1)
    p.codec.reset_stream(1)
    p.codec.reset_stream(1)
    events = p.receive()
    assert [(e.stream_id, e.error_code) for e in events_of(events, StreamReset)] == [
        (1, ErrorCodes.CANCEL)
    ]
    assert p.codec.streams == {}


def test_rapid_sequence_of_streams() -> None:
    """Many streams in one read all arrive, in order, and all get their responses; repeated
    requests decode the same every time."""
    p = Pair()
    for sid in range(1, 200, 2):
        p.client.send_headers(sid, REQUEST + [(b"x-n", b"%d" % (sid % 5))], end_stream=True)
    assert p.send()
    calls = p.handler.take()
    assert [c[1] for c in calls] == list(range(1, 200, 2))
    assert all(c[2] == REQUEST + [(b"x-n", b"%d" % (c[1] % 5))] for c in calls)
    for sid in range(1, 200, 2):
        p.codec.send_headers(sid, OK)
        p.codec.send_data(sid, b"%d" % sid, end_stream=True)
    events = p.receive()
    assert len(events_of(events, StreamEnded)) == 100
    assert [e.data for e in events_of(events, DataReceived)] == [
        b"%d" % sid for sid in range(1, 200, 2)
    ]
    assert p.codec.streams == {}


def test_rapid_open_and_reset() -> None:
    """Streams opened and reset at once: each is an on_request then an on_reset."""
    p = Pair()
    for sid in range(1, 21, 2):
        p.client.send_headers(sid, POST)
        p.client.reset_stream(sid, ErrorCodes.CANCEL)
    assert p.send()
    calls = p.handler.take()
    assert [c[:2] for c in calls] == [
        (k, sid) for sid in range(1, 21, 2) for k in ("request", "reset")
    ]
    assert p.codec.streams == {}


def test_streams_over_the_limit_are_refused() -> None:
    """A stream beyond max_streams gets RST_STREAM REFUSED_STREAM while the connection lives;
    its header block still went through the decoder, so the next request, which refers to
    the dynamic table entry the refused one added, decodes correctly."""
    codec, handler = raw_codec(max_streams=2)
    enc = hpack.Encoder()
    codec.receive_data(headers(1, enc.encode(REQUEST)) + headers(3, enc.encode(REQUEST)))
    refused = enc.encode(REQUEST + [(b"x-new", b"five")])
    assert codec.receive_data(headers(5, refused, end_stream=False))
    assert resets(codec.data_to_send()) == [(5, ErrorCodes.REFUSED_STREAM)]
    assert [c[1] for c in handler.take()] == [1, 3]
    # The refused stream's body is dropped quietly.
    assert codec.receive_data(frame(DATA, END_STREAM, 5, b"body"))
    assert codec.data_to_send() == b"" and handler.calls == []
    codec.send_headers(1, OK, end_stream=True)
    codec.data_to_send()
    block = enc.encode(REQUEST + [(b"x-new", b"five")])
    assert len(block) < len(refused)  # it refers to the table now
    assert codec.receive_data(headers(7, block))
    assert handler.take() == [("request", 7, REQUEST + [(b"x-new", b"five")], True, False)]


def test_goaway_then_new_stream_refused() -> None:
    """After goaway() new streams are refused; open ones go on; GOAWAY names the last stream
    the client opened."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    codec.receive_data(headers(1, enc.encode(REQUEST)))
    codec.goaway()
    (g,) = parse(codec.data_to_send())
    assert isinstance(g, GoAwayFrame)
    assert (g.last_stream_id, g.error_code) == (1, ErrorCodes.NO_ERROR)
    assert codec.receive_data(headers(3, enc.encode(REQUEST + [(b"x-after", b"1")])))
    assert resets(codec.data_to_send()) == [(3, ErrorCodes.REFUSED_STREAM)]
    codec.send_headers(1, OK, end_stream=True)
    assert [type(f) for f in parse(codec.data_to_send())] == [HeadersFrame]
    assert not codec.closed


def test_goaway_from_client() -> None:
    """The client's GOAWAY is reported with its error code; a short one is an error."""
    p = Pair()
    p.client.close_connection(ErrorCodes.NO_ERROR)
    assert p.send()
    assert p.handler.take() == [("goaway", ErrorCodes.NO_ERROR)]
    codec, _ = raw_codec()
    assert connection_error(codec, frame(GOAWAY, 0, 0, bytes(4))) == ErrorCodes.PROTOCOL_ERROR


def test_close_connection() -> None:
    """close_connection sends GOAWAY with the code; the codec then sends and takes nothing."""
    p = Pair()
    p.get(1, end_stream=False)
    p.codec.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
    events = p.receive()
    (term,) = events_of(events, ConnectionTerminated)
    assert (term.error_code, term.last_stream_id) == (ErrorCodes.ENHANCE_YOUR_CALM, 1)
    p.codec.send_headers(1, OK, end_stream=True)
    p.codec.send_data(1, b"x")
    p.codec.acknowledge_received_data(40000, 1)
    p.codec.reset_stream(1)
    p.codec.goaway()
    assert p.codec.data_to_send() == b""
    assert p.codec.receive_data(frame(PING, 0, 0, bytes(8))) is False


# -- malformed requests ---------------------------------------------------------------------

MALFORMED = {
    "uppercase name": REQUEST + [(b"X-Foo", b"1")],
    "connection header": REQUEST + [(b"connection", b"keep-alive")],
    "keep-alive": REQUEST + [(b"keep-alive", b"timeout=5")],
    "transfer-encoding": REQUEST + [(b"transfer-encoding", b"chunked")],
    "upgrade": REQUEST + [(b"upgrade", b"websocket")],
    "te gzip": REQUEST + [(b"te", b"gzip")],
    "missing :path": REQUEST[:2] + REQUEST[3:],
    "missing :method": REQUEST[1:],
    "missing :scheme": REQUEST[:1] + REQUEST[2:],
    "pseudo after regular": REQUEST[:3] + [(b"accept", b"*/*"), REQUEST[3]],
    "unknown pseudo": REQUEST + [(b":protocol-x", b"1")],
    "response pseudo": REQUEST + [(b":status", b"200")],
    "repeated pseudo": REQUEST + [(b":path", b"/again")],
    "empty :path": REQUEST[:2] + [(b":path", b"")] + REQUEST[3:],
    "CR in value": REQUEST + [(b"x-a", b"a\rb")],
    "LF in value": REQUEST + [(b"x-a", b"a\nb")],
    "NUL in value": REQUEST + [(b"x-a", b"a\x00b")],
    "leading space": REQUEST + [(b"x-a", b" a")],
    "trailing tab": REQUEST + [(b"x-a", b"a\t")],
    "CR in pseudo value": [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/\r\nx: y")],
    "space in name": REQUEST + [(b"x a", b"1")],
    "colon in name": REQUEST + [(b"x:a", b"1")],
    "empty name": REQUEST + [(b"", b"1")],
    "CONNECT with :path": [(b":method", b"CONNECT"), (b":authority", b"h:443"), (b":path", b"/")],
    "CONNECT without :authority": [(b":method", b"CONNECT")],
    "content-length not a number": REQUEST + [(b"content-length", b"abc")],
    "negative content-length": REQUEST + [(b"content-length", b"-1")],
    "signed content-length": REQUEST + [(b"content-length", b"+0")],
    "content-length list": REQUEST + [(b"content-length", b"0, 0")],
    "content-length with underscore": REQUEST + [(b"content-length", b"0_0")],
    "empty content-length": REQUEST + [(b"content-length", b"")],
    "differing content-lengths": REQUEST + [(b"content-length", b"0"), (b"content-length", b"1")],
    "host differs from :authority": REQUEST + [(b"host", b"other.example")],
    # What becomes the upstream's request line and Host may not bend them.
    "space in :path": REQUEST[:2] + [(b":path", b"/a b")] + REQUEST[3:],
    "tab in :path": REQUEST[:2] + [(b":path", b"/a\tb")] + REQUEST[3:],
    "relative :path": REQUEST[:2] + [(b":path", b"a")] + REQUEST[3:],
    "absolute-form :path": REQUEST[:2] + [(b":path", b"http://x/")] + REQUEST[3:],
    "space in :method": [(b":method", b"GET /x")] + REQUEST[1:],
    "empty :method": [(b":method", b"")] + REQUEST[1:],
    "userinfo in :authority": REQUEST[:3] + [(b":authority", b"user@example.com")],
    "space in :authority": REQUEST[:3] + [(b":authority", b"example.com x")],
    "path in :authority": REQUEST[:3] + [(b":authority", b"example.com/x")],
    "empty :authority": REQUEST[:3] + [(b":authority", b"")],
    "asterisk :path on GET": REQUEST[:2] + [(b":path", b"*")] + REQUEST[3:],
    "bad host without :authority": REQUEST[:3] + [(b"host", b"user@evil.example")],
    "empty host without :authority": REQUEST[:3] + [(b"host", b"")],
    "two hosts": REQUEST[:3] + [(b"host", b"a.example"), (b"host", b"b.example")],
}


@pytest.mark.parametrize("fields", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_resets_stream(fields: Fields) -> None:
    """A malformed request (RFC 9113 8.2, 8.3) gets RST_STREAM PROTOCOL_ERROR, reaches no
    handler, and leaves the connection and the decoder's table fine."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    assert codec.receive_data(headers(1, enc.encode(fields)))
    assert resets(codec.data_to_send()) == [(1, ErrorCodes.PROTOCOL_ERROR)]
    assert handler.calls == [] and codec.streams == {}
    assert codec.receive_data(headers(3, enc.encode(fields)))
    assert resets(codec.data_to_send()) == [(3, ErrorCodes.PROTOCOL_ERROR)]
    assert codec.receive_data(headers(5, enc.encode(REQUEST + [(b"x-ok", b"1")])))
    assert handler.take() == [("request", 5, REQUEST + [(b"x-ok", b"1")], True, False)]


WELL_FORMED = {
    "te trailers": REQUEST + [(b"te", b"trailers")],
    "CONNECT": [(b":method", b"CONNECT"), (b":authority", b"h:443")],
    "no :authority": REQUEST[:3] + [(b"host", b"h")],
    "inner spaces": REQUEST + [(b"x-a", b"a b\tc")],
    "tchar name": REQUEST + [(b"x-!#$%&'*+.^_`|~09", b"1")],
    "empty value": REQUEST + [(b"x-a", b"")],
    "high bytes": REQUEST + [(b"x-a", b"\x80\xff")],
    "host as :authority": REQUEST + [(b"host", b"example.com")],
    "agreeing content-lengths": REQUEST + [(b"content-length", b"0"), (b"content-length", b"00")],
    "OPTIONS *, :path first": [
        (b":path", b"*"),
        (b":method", b"OPTIONS"),
        (b":scheme", b"https"),
        (b":authority", b"example.com"),
    ],
    "IPv6 authority": REQUEST[:3] + [(b":authority", b"[::1]:8443")],
}


@pytest.mark.parametrize("fields", WELL_FORMED.values(), ids=WELL_FORMED.keys())
def test_well_formed_request(fields: Fields) -> None:
    """Requests near the edge of the rules pass as they are."""
    assert check_request(fields)[0] is None
    codec, handler = raw_codec()
    assert codec.receive_data(headers(1, hpack.Encoder().encode(fields)))
    assert handler.calls == [("request", 1, fields, True, False)]


def test_content_length_matches_body() -> None:
    """A body exactly as long as its content-length (padding aside) passes, whether it ends
    on DATA or with trailers; content-length 0 with END_STREAM on HEADERS too."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    codec.receive_data(headers(1, enc.encode(POST + [(b"content-length", b"9")]), False))
    codec.receive_data(
        frame(DATA, PADDED, 1, b"\x02hello\x00\x00")
        + frame(DATA, 0, 1, b"")
        + frame(DATA, END_STREAM, 1, b"ties")
    )
    codec.receive_data(headers(3, enc.encode(POST + [(b"content-length", b"3")]), False))
    codec.receive_data(frame(DATA, 0, 3, b"abc") + headers(3, enc.encode([(b"x-t", b"1")])))
    codec.receive_data(headers(5, enc.encode(POST + [(b"content-length", b"0")])))
    assert codec.data_to_send() == b""
    assert [c[:3] for c in handler.calls] == [
        ("request", 1, POST + [(b"content-length", b"9")]),
        ("data", 1, b"hello"),
        ("data", 1, b""),
        ("data", 1, b"ties"),
        ("request", 3, POST + [(b"content-length", b"3")]),
        ("data", 3, b"abc"),
        ("data", 3, b""),
        ("request", 5, POST + [(b"content-length", b"0")]),
    ]


def test_check_request_gives_content_length() -> None:
    """check_request returns the content-length the body must match (-1: none)."""
    assert check_request(POST + [(b"content-length", b"0012")]) == (None, 12)
    assert check_request(POST) == (None, -1)
    assert check_request(POST + [(b"content-length", b"1"), (b"content-length", b"2")])[0]


def test_body_longer_than_content_length() -> None:
    """RFC 9113 8.1.1: DATA beyond the content-length makes the request malformed. The frame
    that goes past it never reaches the handler (an HTTP/1.1 upstream would read the excess
    as a second request); the stream is reset with PROTOCOL_ERROR, the connection goes on."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    codec.receive_data(headers(1, enc.encode(POST + [(b"content-length", b"5")]), False))
    smuggled = b"hello" + b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
    assert codec.receive_data(frame(DATA, END_STREAM, 1, smuggled))
    assert resets(codec.data_to_send()) == [(1, ErrorCodes.PROTOCOL_ERROR)]
    assert [c[0] for c in handler.take()] == ["request", "reset"]
    assert codec.unacked == len(smuggled)  # the connection's window still counts them
    codec.receive_data(headers(3, enc.encode(POST + [(b"content-length", b"5")]), False))
    assert codec.receive_data(frame(DATA, 0, 3, b"abc") + frame(DATA, 0, 3, b"def"))
    assert resets(codec.data_to_send()) == [(3, ErrorCodes.PROTOCOL_ERROR)]
    assert handler.take()[1:] == [
        ("data", 3, b"abc", 3, False),
        ("reset", 3, ErrorCodes.PROTOCOL_ERROR, False),
    ]


@pytest.mark.parametrize("ending", ["data", "trailers", "headers"])
def test_body_shorter_than_content_length(ending: str) -> None:
    """A body that ends (on DATA, with trailers, or on the HEADERS themselves) before its
    content-length is reached resets the stream with PROTOCOL_ERROR."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    head = enc.encode(POST + [(b"content-length", b"10")])
    if ending == "headers":
        data = headers(1, head)
    else:
        data = headers(1, head, end_stream=False) + frame(DATA, 0, 1, b"12345")
        if ending == "data":
            data += frame(DATA, END_STREAM, 1, b"6789")
        else:
            data += headers(1, enc.encode([(b"x-t", b"1")]))
    assert codec.receive_data(data)
    assert resets(codec.data_to_send()) == [(1, ErrorCodes.PROTOCOL_ERROR)]
    assert not [c for c in handler.calls if c[0] == "data" and c[4]]
    assert codec.streams == {}


def test_header_list_too_large() -> None:
    """A header list over max_header_list (RFC 9113 6.5.2 sizes: name + value + 32 each)
    still reaches on_request, with too_large set and only its pseudo-fields, so the handler
    can answer 431."""
    fields = REQUEST + [(b"x-pad", b"")]
    base = header_list_size(fields)
    codec, handler = raw_codec(max_header_list=base + 100)
    enc = hpack.Encoder()
    codec.receive_data(headers(1, enc.encode(REQUEST + [(b"x-pad", b"p" * 100)])))
    codec.receive_data(headers(3, enc.encode(REQUEST + [(b"x-pad", b"q" * 101)])))
    assert [(c[1], c[4]) for c in handler.calls] == [(1, False), (3, True)]
    assert handler.calls[1][2] == REQUEST


def test_hpack_bomb_ends_the_connection() -> None:
    """A few bytes of HPACK can name kilobytes each (an index of a large table entry): a
    header list that decodes to more than four times the limit ends the connection with
    ENHANCE_YOUR_CALM as soon as it passes that, not after decoding all of it."""
    codec, handler = raw_codec(max_header_list=32768)
    enc = hpack.Encoder()
    big = (b"x-big", b"b" * 4000)
    assert codec.receive_data(headers(1, enc.encode(REQUEST + [big])))
    # 0xbe: index 62, the newest table entry, the big field: 4 kB a byte.
    block = enc.encode(REQUEST + [big]) + b"\xbe" * 100_000
    frames = frame(HEADERS, END_STREAM, 3, block[:16384])
    for i in range(16384, len(block), 16384):
        last = i + 16384 >= len(block)
        frames += frame(CONTINUATION, END_HEADERS if last else 0, 3, block[i : i + 16384])
    assert connection_error(codec, frames) == ErrorCodes.ENHANCE_YOUR_CALM
    assert [c[1] for c in handler.calls] == [1]


def test_self_dependency() -> None:
    """A HEADERS frame whose priority depends on its own stream: RST_STREAM PROTOCOL_ERROR;
    PRIORITY frames are otherwise parsed and ignored. A bad PRIORITY frame on a closed stream
    resets it; on an idle one, which no RST_STREAM may name (RFC 9113 6.4) and the client may
    still open, it ends the connection."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    block = enc.encode(REQUEST)
    bad = HeadersFrame(
        1, block, flags=["END_HEADERS", "END_STREAM", "PRIORITY"], depends_on=1, stream_weight=16
    )
    assert codec.receive_data(bad.serialize())
    assert resets(codec.data_to_send()) == [(1, ErrorCodes.PROTOCOL_ERROR)]
    good = HeadersFrame(
        3,
        enc.encode(REQUEST),
        flags=["END_HEADERS", "END_STREAM", "PRIORITY", "PADDED"],
        depends_on=1,
        stream_weight=200,
        pad_length=7,
    )
    assert codec.receive_data(good.serialize())
    assert codec.receive_data(frame(PRIORITY, 0, 9, b"\x00\x00\x00\x03\x10"))
    assert codec.data_to_send() == b""
    assert handler.calls == [("request", 3, REQUEST, True, False)]
    assert codec.receive_data(frame(PRIORITY, 0, 3, b"\x00\x00\x00\x03\x10"))
    assert codec.receive_data(frame(PRIORITY, 0, 1, b"\x00\x00\x00\x01"))
    assert resets(codec.data_to_send()) == [
        (3, ErrorCodes.PROTOCOL_ERROR),
        (1, ErrorCodes.FRAME_SIZE_ERROR),
    ]
    assert connection_error(codec, frame(PRIORITY, 0, 0, bytes(5))) == ErrorCodes.PROTOCOL_ERROR
    for payload, code in (
        (b"\x00\x00\x00\x0b\x10", ErrorCodes.PROTOCOL_ERROR),
        (b"\x00\x00\x00\x01", ErrorCodes.FRAME_SIZE_ERROR),
    ):
        codec, handler = raw_codec()
        assert connection_error(codec, frame(PRIORITY, 0, 11, payload)) == code


def test_self_dependency_across_continuation() -> None:
    """A self-dependent HEADERS frame is refused even when its block goes on in CONTINUATION
    frames, and the block still reaches the decoder (the next request decodes)."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    block = enc.encode(REQUEST + [(b"x-a", b"1")])
    first = HeadersFrame(
        1, block[:2], flags=["END_STREAM", "PRIORITY"], depends_on=1, stream_weight=16
    )
    rest = frame(CONTINUATION, END_HEADERS, 1, block[2:])
    assert codec.receive_data(first.serialize() + rest)
    assert resets(codec.data_to_send()) == [(1, ErrorCodes.PROTOCOL_ERROR)]
    assert codec.receive_data(headers(3, enc.encode(REQUEST + [(b"x-a", b"1")])))
    assert handler.calls == [("request", 3, REQUEST + [(b"x-a", b"1")], True, False)]


# -- connection errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "block",
    [
        b"\xbf",  # index 63: past the (empty) dynamic table
        b"\x80",  # index 0
        b"\x82\x41\x05exa",  # a string longer than the block
        b"\x82\x1f",  # a truncated integer
        b"\x82\x41\x81\xff",  # Huffman: EOS and padding longer than 7 bits
        b"\x3f\xe2\x1f",  # a table size update over SETTINGS_HEADER_TABLE_SIZE
        b"\x82\x3f\x01",  # a table size update after a field
    ],
)
def test_hpack_garbage(block: bytes) -> None:
    """A header block that is not valid HPACK: GOAWAY COMPRESSION_ERROR, receive_data
    returns False."""
    codec, handler = raw_codec()
    assert connection_error(codec, headers(1, block)) == ErrorCodes.COMPRESSION_ERROR
    assert handler.calls == []


def test_frame_too_large() -> None:
    """A frame over 16384 bytes (we never raise SETTINGS_MAX_FRAME_SIZE): FRAME_SIZE_ERROR,
    known from the frame header alone."""
    codec, _ = raw_codec()
    header = (16385).to_bytes(3, "big") + bytes((DATA, 0)) + (1).to_bytes(4, "big")
    assert connection_error(codec, header) == ErrorCodes.FRAME_SIZE_ERROR
    codec, handler = raw_codec()
    assert codec.receive_data(frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode(POST)))
    assert codec.receive_data(frame(DATA, 0, 1, bytes(16384)))
    assert handler.calls[-1] == ("data", 1, bytes(16384), 16384, False)


@pytest.mark.parametrize(
    "interloper",
    [
        frame(PING, 0, 0, bytes(8)),
        frame(DATA, 0, 1, b"x"),
        frame(HEADERS, END_HEADERS, 3, b"\x82\x86\x84"),
        frame(CONTINUATION, END_HEADERS, 3, b""),
        frame(0x20, 0, 0, b"unknown"),
    ],
)
def test_continuation_interleaved(interloper: bytes) -> None:
    """Between HEADERS without END_HEADERS and its last CONTINUATION, any other frame (even
    an unknown type, or a CONTINUATION of another stream) is a PROTOCOL_ERROR."""
    codec, _ = raw_codec()
    block = hpack.Encoder().encode(REQUEST)
    assert codec.receive_data(frame(HEADERS, END_STREAM, 1, block[:3]))
    assert connection_error(codec, interloper) == ErrorCodes.PROTOCOL_ERROR


def test_continuation_by_hand() -> None:
    """A block cut in many pieces, some empty, decodes as one; END_STREAM comes from the
    HEADERS frame."""
    codec, handler = raw_codec()
    block = hpack.Encoder().encode(REQUEST + [(b"x-a", b"b" * 300)])
    data = frame(HEADERS, END_STREAM, 1, block[:1])
    for i in range(1, len(block), 50):
        data += frame(CONTINUATION, 0, 1, block[i : i + 50]) + frame(CONTINUATION, 0, 1)
    data += frame(CONTINUATION, END_HEADERS, 1, b"")
    assert codec.receive_data(data)
    assert handler.calls == [("request", 1, REQUEST + [(b"x-a", b"b" * 300)], True, False)]


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (
            frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, b"\x00\x00\x00"),
            ErrorCodes.FRAME_SIZE_ERROR,
        ),
        (frame(HEADERS, END_HEADERS | PADDED, 1, b"\x03\x82\x86"), ErrorCodes.PROTOCOL_ERROR),
        # Padding that leaves no room for the priority fields.
        (
            frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 1, b"\x02" + bytes(6)),
            ErrorCodes.PROTOCOL_ERROR,
        ),
        (frame(HEADERS, END_HEADERS | PADDED, 1, b""), ErrorCodes.PROTOCOL_ERROR),
        (frame(DATA, PADDED, 1, b""), ErrorCodes.PROTOCOL_ERROR),
    ],
)
def test_bad_padding_or_priority(bad: bytes, code: int) -> None:
    """Padding as long as the frame, or a priority field cut short, ends the connection."""
    codec, _ = raw_codec()
    codec.receive_data(headers(1, hpack.Encoder().encode(POST), end_stream=False))
    assert connection_error(codec, bad) == code


def test_stray_continuation() -> None:
    """A CONTINUATION with no HEADERS before it is a PROTOCOL_ERROR."""
    codec, _ = raw_codec()
    assert (
        connection_error(codec, frame(CONTINUATION, END_HEADERS, 1, b"\x82"))
        == ErrorCodes.PROTOCOL_ERROR
    )


def test_continuation_flood() -> None:
    """A header block that grows past four times the header list limit (frame headers
    counted), END_HEADERS or not, ends the connection with ENHANCE_YOUR_CALM
    (CVE-2024-27316) before it is decoded."""
    codec, handler = raw_codec(max_header_list=1000)
    assert codec.receive_data(frame(HEADERS, 0, 1, bytes(1000)))
    for _ in range(2):
        assert codec.receive_data(frame(CONTINUATION, 0, 1, bytes(1000)))
    assert codec.receive_data(frame(CONTINUATION, 0, 1, bytes(973)))  # 4000 in all
    flood = frame(CONTINUATION, 0, 1, b"")
    assert connection_error(codec, flood) == ErrorCodes.ENHANCE_YOUR_CALM
    assert handler.calls == []


def test_empty_continuation_flood() -> None:
    """Empty CONTINUATION frames add no block bytes, but their frame headers count: a
    stream of them ends the connection too."""
    codec, handler = raw_codec(max_header_list=1000)
    assert codec.receive_data(frame(HEADERS, 0, 1, b"\x82"))
    flood = frame(CONTINUATION, 0, 1, b"") * 1000
    assert connection_error(codec, flood) == ErrorCodes.ENHANCE_YOUR_CALM
    assert handler.calls == []


def test_ping() -> None:
    """PING is answered with an ACK carrying the same payload; a PING ACK is not answered;
    a PING of the wrong size or on a stream is an error."""
    p = Pair()
    p.client.ping(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert p.send()
    (ack,) = parse(p.codec.data_to_send())
    assert isinstance(ack, PingFrame)
    assert (ack.flags, ack.opaque_data) == ({"ACK"}, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    (event,) = p.client.receive_data(ack.serialize())
    assert isinstance(event, PingAckReceived)
    assert p.codec.receive_data(frame(PING, 1, 0, bytes(8)))
    assert p.codec.data_to_send() == b""
    codec, _ = raw_codec()
    assert connection_error(codec, frame(PING, 0, 0, bytes(7))) == ErrorCodes.FRAME_SIZE_ERROR
    codec, _ = raw_codec()
    assert connection_error(codec, frame(PING, 0, 1, bytes(8))) == ErrorCodes.PROTOCOL_ERROR


def test_push_promise_from_client() -> None:
    """A client may not push: PUSH_PROMISE is a PROTOCOL_ERROR."""
    codec, _ = raw_codec()
    codec.receive_data(headers(1, hpack.Encoder().encode(REQUEST)))
    bad = frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02\x82\x86\x84")
    assert connection_error(codec, bad) == ErrorCodes.PROTOCOL_ERROR


def test_unknown_frame_ignored() -> None:
    """Frames of unknown types are ignored (RFC 9113 5.5), on any stream."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    assert codec.receive_data(frame(0x20, 0xFF, 0, b"x" * 100) + frame(0xBB, 0, 7, b""))
    assert codec.receive_data(headers(1, enc.encode(REQUEST)) + frame(0x0A, 0, 1, b"altsvc"))
    assert codec.data_to_send() == b""
    assert handler.calls == [("request", 1, REQUEST, True, False)]


def test_even_stream_id() -> None:
    """Clients open odd streams only: HEADERS on an even stream (or 0) is a PROTOCOL_ERROR."""
    codec, _ = raw_codec()
    block = hpack.Encoder().encode(REQUEST)
    assert connection_error(codec, headers(2, block)) == ErrorCodes.PROTOCOL_ERROR
    codec, _ = raw_codec()
    assert connection_error(codec, headers(0, block)) == ErrorCodes.PROTOCOL_ERROR


def test_data_on_idle_stream_or_connection() -> None:
    """DATA on a stream the client never opened, or on stream 0: PROTOCOL_ERROR."""
    codec, _ = raw_codec()
    assert connection_error(codec, frame(DATA, 0, 1, b"x")) == ErrorCodes.PROTOCOL_ERROR
    codec, _ = raw_codec()
    assert connection_error(codec, frame(DATA, 0, 0, b"x")) == ErrorCodes.PROTOCOL_ERROR


def test_data_after_end_stream() -> None:
    """DATA on a stream the client already ended: RST_STREAM STREAM_CLOSED for that stream,
    reported with by_client=False; other streams go on."""
    p = Pair()
    p.get(1)
    p.get(3)
    p.handler.take()
    assert p.codec.receive_data(frame(DATA, 0, 1, b"more"))
    assert resets(p.codec.data_to_send()) == [(1, ErrorCodes.STREAM_CLOSED)]
    assert p.handler.take() == [("reset", 1, ErrorCodes.STREAM_CLOSED, False)]
    assert list(p.codec.streams) == [3]
    assert p.codec.unacked == 4  # the connection's window still counts those bytes


def test_finished_while_client_sends() -> None:
    """finished() after a complete response, with the request body still coming: RST_STREAM
    NO_ERROR asks the client to stop (RFC 9113 8.1); after a complete exchange it sends
    nothing."""
    p = Pair()
    p.client.send_headers(1, POST)
    p.client.send_data(1, b"first part")
    assert p.send()
    p.codec.send_headers(1, [(b":status", b"413")], end_stream=True)
    p.codec.finished(1)
    events = p.receive()
    assert events_of(events, ResponseReceived) and events_of(events, StreamEnded)
    assert [(e.stream_id, e.error_code) for e in events_of(events, StreamReset)] == [
        (1, ErrorCodes.NO_ERROR)
    ]
    assert p.codec.streams == {}
    p.get(3)
    p.codec.send_headers(3, OK, end_stream=True)
    p.codec.finished(3)
    assert resets(p.codec.data_to_send()) == []


# -- byte boundaries ------------------------------------------------------------------------


def transcript() -> bytes:
    """A client's bytes: preface, SETTINGS, a GET, a POST with padded DATA and trailers, a
    PING, a WINDOW_UPDATE, a PRIORITY, an unknown frame, a reset."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    codec = H2Codec(Recorder(), 100, 65536)
    codec.initiate_connection()
    client.receive_data(codec.data_to_send())
    client.send_headers(1, REQUEST + [(b"x-big", b"q" * 20_000)], end_stream=True)
    client.send_headers(3, POST)
    client.send_data(3, b"abc" * 1000, pad_length=17)
    client.send_data(3, b"defg")
    client.send_headers(3, [(b"x-trailer", b"t")], end_stream=True)
    client.ping(b"pingpong")
    client.increment_flow_control_window(1000)
    client.send_headers(5, REQUEST, end_stream=True, priority_weight=30, priority_depends_on=3)
    client.send_headers(7, POST)
    client.reset_stream(7)
    return (
        client.data_to_send()
        + frame(0x33, 0, 0, b"ext")
        + frame(PRIORITY, 0, 9, b"\x00\x00\x00\x01\x05")
    )


def test_every_byte_boundary() -> None:
    """Fed one byte at a time, the codec makes the same calls and the same frames as when it
    gets everything at once; only the connection window's opening, reported once at the end
    of the read that opened it, comes at another place."""
    data = transcript()
    whole = Recorder()
    codec = H2Codec(whole, 100, 65536)
    assert codec.receive_data(data)
    expected = codec.data_to_send()
    assert [c[:2] for c in whole.calls] == [
        ("request", 1),
        ("request", 3),
        ("data", 3),
        ("data", 3),
        ("data", 3),
        ("request", 5),
        ("request", 7),
        ("reset", 7),
        ("window", 0),
    ]
    split = Recorder()
    codec = H2Codec(split, 100, 65536)
    out = b""
    for i in range(len(data)):
        assert codec.receive_data(data[i : i + 1])
        out += codec.data_to_send()
    assert [c[:2] for c in split.calls].index(("window", 0)) == 5
    assert sorted(split.calls, key=repr) == sorted(whole.calls, key=repr)
    assert out == expected


def test_window_updates_in_one_read_are_reported_once() -> None:
    """Thousands of connection WINDOW_UPDATEs in one read make one call, so that a flood of
    them costs the handler one pass over its streams, not one per frame."""
    codec, handler = raw_codec()
    flood = frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x01") * 5000
    assert codec.receive_data(flood)
    assert handler.calls == [("window", 0)]
    assert codec.send_window == 65_535 + 5000


# -- the decoder's block cache --------------------------------------------------------------


def test_repeated_request_hits_block_cache() -> None:
    """The first request fills the client's dynamic table (not cacheable); the second, all
    table references, is cached; the third, the same bytes, is a hit: one more cache entry,
    then none, and the very same fields."""
    p = Pair()
    cache = p.codec.decoder.cache
    extra = [(b"user-agent", b"client/1"), (b"x-id", b"42")]
    p.get(1, extra)
    assert len(cache) == 0
    p.get(3, extra)
    assert len(cache) == 1
    p.get(5, extra)
    p.get(7, extra)
    assert len(cache) == 1
    calls = p.handler.take()
    assert [c[2] for c in calls] == [REQUEST + extra] * 4
    assert calls[3][2] is calls[2][2] is calls[1][2]
    assert [c[1] for c in calls] == [1, 3, 5, 7]


def test_block_cache_never_stale() -> None:
    """The same block bytes mean other fields once the dynamic table changed: index 62 is
    "x-a: 1", then "x-a: 2" after an insertion; the cache must follow the table."""
    codec, handler = raw_codec()
    pseudo = b"\x82\x87\x84"  # GET, https, /
    insert_1 = b"\x40\x03x-a\x011"  # literal with incremental indexing
    insert_2 = b"\x40\x03x-a\x012"
    refer = pseudo + b"\xbe"  # index 62: the newest dynamic entry
    want = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")]
    codec.receive_data(headers(1, pseudo + insert_1))
    assert codec.decoder.cache == {}  # it changed the table
    codec.receive_data(headers(3, refer) + headers(5, refer))
    codec.receive_data(headers(7, pseudo + insert_2))
    codec.receive_data(headers(9, refer) + headers(11, refer))
    got = [(c[1], c[2][-1]) for c in handler.calls]
    assert got == [
        (1, (b"x-a", b"1")),
        (3, (b"x-a", b"1")),
        (5, (b"x-a", b"1")),
        (7, (b"x-a", b"2")),
        (9, (b"x-a", b"2")),
        (11, (b"x-a", b"2")),
    ]
    assert all(c[2][:3] == want for c in handler.calls)
    assert len(codec.decoder.cache) == 2


def test_block_cache_follows_table_size_update() -> None:
    """A table size update evicts entries: the same reference bytes then no longer decode
    (COMPRESSION_ERROR), not the cached fields."""
    codec, handler = raw_codec()
    refer = b"\x82\x87\x84\xbe"
    codec.receive_data(headers(1, b"\x82\x87\x84\x40\x03x-a\x011"))
    codec.receive_data(headers(3, refer) + headers(5, refer))
    assert [c[2][-1] for c in handler.calls] == [(b"x-a", b"1")] * 3
    codec.receive_data(headers(7, b"\x20\x3f\xe1\x1f\x82\x87\x84"))  # size 0, then 4096
    assert handler.calls[-1][1] == 7
    assert connection_error(codec, headers(9, refer)) == ErrorCodes.COMPRESSION_ERROR


def test_block_cache_keeps_verdicts() -> None:
    """A malformed request is cached with its verdict, judged the same way when repeated;
    a too large one is judged anew each time (never cached: it would hold memory)."""
    codec, handler = raw_codec(max_header_list=300)
    enc = hpack.Encoder()
    bad = REQUEST + [(b"connection", b"close")]
    big = REQUEST + [(b"x-big", b"b" * 200)]
    for sid in (1, 5, 9):
        codec.receive_data(headers(sid, enc.encode(bad)))
        codec.receive_data(headers(sid + 2, enc.encode(big)))
    assert resets(codec.data_to_send()) == [
        (1, ErrorCodes.PROTOCOL_ERROR),
        (5, ErrorCodes.PROTOCOL_ERROR),
        (9, ErrorCodes.PROTOCOL_ERROR),
    ]
    assert [(c[1], c[4]) for c in handler.calls] == [(3, True), (7, True), (11, True)]
    assert len(codec.decoder.cache) == 1


def test_flood_of_empty_frames_ends_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames that carry nothing (PING, SETTINGS, PRIORITY, empty DATA, unknown types) are
    answered, but past MAX_IDLE_FRAMES_PER_SECOND in a second the connection ends with
    ENHANCE_YOUR_CALM (CVE-2019-9518); a normal exchange's few are far below it."""
    monkeypatch.setattr(h2_codec, "monotonic", lambda: 1000.0)  # all in one second
    kinds = [
        frame(PING, 0, 0, bytes(8)),
        frame(PRIORITY, 0, 1, b"\x00\x00\x00\x03\x10"),
        frame(0x42, 0, 0, b"x"),
        frame(SETTINGS, 0, 0, b""),
    ]
    for kind in kinds:
        codec, _ = raw_codec()
        assert codec.receive_data(kind * 100)
        assert (
            connection_error(codec, kind * MAX_IDLE_FRAMES_PER_SECOND)
            == ErrorCodes.ENHANCE_YOUR_CALM
        )
    codec, handler = raw_codec()
    assert codec.receive_data(headers(1, hpack.Encoder().encode(POST), end_stream=False))
    assert (
        connection_error(codec, frame(DATA, 0, 1, b"") * (MAX_IDLE_FRAMES_PER_SECOND + 1))
        == ErrorCodes.ENHANCE_YOUR_CALM
    )


def test_last_initial_window_size_of_a_frame_counts() -> None:
    """Several INITIAL_WINDOW_SIZE entries in one SETTINGS frame: the open streams' windows
    move once, by the last one's difference."""
    codec, handler = raw_codec()
    assert codec.receive_data(headers(1, hpack.Encoder().encode(POST), end_stream=False))
    entries = b"".join(struct.pack(">HL", 0x4, n) for n in (1, 2_000_000, 100_000))
    assert codec.receive_data(frame(SETTINGS, 0, 0, entries))
    assert codec.local_flow_control_window(1) == min(100_000, codec.send_window)
    assert codec.streams[1].send_window == 100_000


# -- frames on closed streams (RFC 9113 5.1) ------------------------------------------------


def test_lower_stream_id_than_one_used_is_a_protocol_error() -> None:
    """Opening stream 7 closes the idle streams 3 and 5 below it: HEADERS on 5 afterwards is
    a connection error PROTOCOL_ERROR, not a request the client would wait on forever."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    assert codec.receive_data(headers(1, enc.encode(REQUEST)) + headers(7, enc.encode(REQUEST)))
    assert connection_error(codec, headers(5, enc.encode(REQUEST))) == ErrorCodes.PROTOCOL_ERROR
    assert [c[1] for c in handler.calls] == [1, 7]


def test_data_after_the_clients_reset_is_a_stream_error() -> None:
    """After the client reset a stream, its DATA there is answered RST_STREAM STREAM_CLOSED
    (and the bytes still count against the connection's window)."""
    codec, handler = raw_codec()
    assert codec.receive_data(headers(1, hpack.Encoder().encode(POST), end_stream=False))
    assert codec.receive_data(frame(RST_STREAM, 0, 1, b"\x00\x00\x00\x08"))
    assert codec.receive_data(frame(DATA, 0, 1, b"late"))
    assert resets(codec.data_to_send()) == [(1, ErrorCodes.STREAM_CLOSED)]
    assert not codec.closed


def test_data_on_a_stream_ended_both_ways_is_a_connection_error() -> None:
    """A stream both sides ended is closed: DATA on it is a connection error STREAM_CLOSED."""
    codec, handler = raw_codec()
    assert codec.receive_data(headers(1, hpack.Encoder().encode(REQUEST)))
    codec.send_headers(1, OK, end_stream=True)
    codec.data_to_send()
    assert 1 not in codec.streams
    assert connection_error(codec, frame(DATA, 0, 1, b"x")) == ErrorCodes.STREAM_CLOSED


def test_frames_on_a_stream_we_reset_are_ignored() -> None:
    """After our RST_STREAM, DATA and trailers the client had in flight are ignored (their
    header block still reaches the decoder, and their bytes the connection's window)."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    assert codec.receive_data(headers(1, enc.encode(POST), end_stream=False))
    codec.reset_stream(1)
    codec.data_to_send()
    assert codec.receive_data(
        frame(DATA, 0, 1, b"x" * 100) + headers(1, enc.encode([(b"x-trailer", b"1")]))
    )
    assert codec.data_to_send() == b""
    assert codec.unacked == 100
    assert codec.receive_data(headers(3, enc.encode(REQUEST + [(b"x-trailer", b"1")])))
    assert handler.calls[-1][:3] == ("request", 3, REQUEST + [(b"x-trailer", b"1")])


def test_closed_streams_are_remembered_within_a_bound() -> None:
    """The codec remembers how the last CLOSED_MEMORY streams closed, no more: frames on
    older ones are ignored."""
    codec, handler = raw_codec()
    enc = hpack.Encoder()
    block = enc.encode(REQUEST)
    for i in range(3 * CLOSED_MEMORY):
        sid = 1 + 2 * i
        assert codec.receive_data(headers(sid, block))
        codec.reset_stream(sid)
        assert len(codec._closed) <= CLOSED_MEMORY
    codec.data_to_send()
    assert codec.receive_data(frame(DATA, 0, 1, b"x"))
    assert codec.data_to_send() == b""


@pytest.mark.parametrize(
    "kind", ["window-update", "empty-end", "goaway", "late-reset", "empty-continuation"]
)
def test_frames_that_carry_nothing_count_against_the_budget(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames that are allowed but carry nothing, whatever their type, spend the same budget
    as PINGs: WINDOW_UPDATE or an empty END_STREAM on a stream already closed, GOAWAY after
    the first, RST_STREAM on a stream already closed, empty CONTINUATIONs."""
    monkeypatch.setattr(h2_codec, "monotonic", lambda: 1000.0)
    codec, _ = raw_codec(max_header_list=65536)
    enc = hpack.Encoder()
    assert codec.receive_data(headers(1, enc.encode(POST), end_stream=False))
    codec.reset_stream(1)
    codec.data_to_send()
    one = {
        "window-update": frame(WINDOW_UPDATE, 0, 1, b"\x00\x00\x00\x01"),
        "empty-end": frame(DATA, END_STREAM, 1),
        "goaway": frame(GOAWAY, 0, 0, bytes(8)),
        "late-reset": frame(RST_STREAM, 0, 1, b"\x00\x00\x00\x00"),
        "empty-continuation": frame(CONTINUATION, 0, 3),
    }[kind]
    start = frame(HEADERS, 0, 3, b"") if kind == "empty-continuation" else b""
    flood = start + one * (MAX_IDLE_FRAMES_PER_SECOND + 1)
    assert connection_error(codec, flood) == ErrorCodes.ENHANCE_YOUR_CALM


def test_too_large_request_with_a_bent_request_line_is_malformed() -> None:
    """A header list over the limit is answered 431 only if its pseudo-fields make a sound
    request: a CR/LF in :path resets the stream instead (it would reach the logs)."""
    codec, handler = raw_codec(max_header_list=1000)
    bent = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":path", b"/a\r\nX-Injected: 1"),
        (b":authority", b"example.com"),
        (b"x-big", b"b" * 1200),
    ]
    assert codec.receive_data(headers(1, hpack.Encoder().encode(bent)))
    assert resets(codec.data_to_send()) == [(1, ErrorCodes.PROTOCOL_ERROR)]
    assert handler.calls == []
