"""The server side of an HTTP/2 connection (RFC 9113): frames in, callbacks out, frames back.

Theory of operation. :class:`H2Codec` parses what the client sends, keeps the state of the
connection (settings, flow-control windows, the streams and their halves) and calls its
handler once per meaningful thing: a request's header block, a piece of body, a reset, a
window that opened, a GOAWAY. What the handler sends goes through the codec's ``send_*``
methods into one output buffer, taken with :meth:`data_to_send`. No I/O happens here, so the
codec is tested by feeding it bytes (the ``h2`` package's client is the reference in tests).

It replaces the ``h2`` package on the downstream hot path because h2's general state machine,
event objects and header checks cost ~55 us per request in CPython, more than the rest of the
proxy together; ``h2`` still speaks HTTP/2 to upstreams (worker/client/h2.py). This codec is
only what a server needs: client-initiated streams, no server push, no priorities (parsed and
ignored, as RFC 9113 deprecates them).

A stream's state is a :class:`~worker.h2.states.StreamState`: idle -> open (HEADERS) ->
half-closed (END_STREAM from one side) -> closed (END_STREAM from both, or RST_STREAM either
way). Every move, and the answer to a frame a state does not allow, is read from the table in
worker/h2/states.py; the codec holds the open and half-closed streams and remembers how the
last CLOSED_MEMORY closed ones closed. Frames reach their handler through a table too
(``_dispatch``, frame type -> bound method, built once per connection); a type it does not
list is ignored ("Implementations MUST ignore and discard frames of unknown types", 4.1).

Errors follow RFC 9113 5.4: a malformed request or a stream's own flow-control fault resets that
stream; anything that breaks the connection's shared state (framing, HPACK, the connection
window, an unexpected frame) sends GOAWAY and :meth:`receive_data` returns False.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from time import monotonic
from typing import Protocol

from h2.errors import ErrorCodes

from worker.h2.fields import check_request, check_trailers, header_list_size
from worker.h2.hpack import (
    DEFAULT_TABLE_SIZE,
    DecodeError,
    Decoder,
    Fields,
    ListTooLarge,
    encode,
)
from worker.h2.states import LEGAL, RECEIVING, REFUSALS, Event, Reaction, StreamState

#: The client connection preface of HTTP/2 (RFC 9113 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
#: Not a wire flag: marks a header block whose HEADERS frame made the stream depend on itself.
_SELF_DEPENDENT = 0x100
# Settings (RFC 9113 6.5.2).
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW = 65_535
DEFAULT_FRAME_SIZE = 16_384
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1
#: A header block (HEADERS and its CONTINUATIONs, their frame headers counted) longer than
#: this many times the header list limit ends the connection (the CONTINUATION flood,
#: CVE-2024-27316), and so does a header list that decodes to more than this many times it
#: (HPACK lets one byte name a whole table entry): past the limit itself, 431.
MAX_BLOCK_FACTOR = 4
#: Frames that carry no request, body or window (PING, SETTINGS, PRIORITY, empty DATA, unknown
#: types, HEADERS of streams already over) a client may send per second before the
#: connection is closed with ENHANCE_YOUR_CALM (floods of them, CVE-2019-9518): far above
#: what clients send (gRPC's keepalive and bandwidth probes are PINGs), far below a flood.
MAX_IDLE_FRAMES_PER_SECOND = 10_000

#: How many closed streams the codec remembers the closed state of (which decides how a late
#: frame on one is answered, worker/h2/states.py); frames on older ones are ignored.
CLOSED_MEMORY = 1024

_FRAME = struct.Struct(">HBBBL")
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")
_IDLE_TYPES = frozenset({PING, SETTINGS, PRIORITY})

# The states, events and table rows as module globals: an enum member's attribute lookup
# costs more than the dict lookup that follows it (hot path).
_IDLE = StreamState.IDLE
_HALF_CLOSED_LOCAL = StreamState.HALF_CLOSED_LOCAL
_CLOSED = StreamState.CLOSED
_CLOSED_RESET_BY_US = StreamState.CLOSED_RESET_BY_US
_CLOSED_SKIPPED = StreamState.CLOSED_SKIPPED
_CLOSED_FORGOTTEN = StreamState.CLOSED_FORGOTTEN
_RECV_HEADERS = Event.RECV_HEADERS
_RECV_HEADERS_END = Event.RECV_HEADERS_END
_RECV_DATA = Event.RECV_DATA
_RECV_DATA_END = Event.RECV_DATA_END
_RECV_RST_STREAM = Event.RECV_RST_STREAM
_RECV_WINDOW_UPDATE = Event.RECV_WINDOW_UPDATE
_RECV_PRIORITY = Event.RECV_PRIORITY
_ON_RECV_HEADERS = LEGAL[_RECV_HEADERS]
_ON_RECV_HEADERS_END = LEGAL[_RECV_HEADERS_END]
_ON_RECV_DATA = LEGAL[_RECV_DATA]
_ON_RECV_DATA_END = LEGAL[_RECV_DATA_END]
_ON_RECV_RST_STREAM = LEGAL[_RECV_RST_STREAM]
_ON_RECV_WINDOW_UPDATE = LEGAL[_RECV_WINDOW_UPDATE]
_ON_RECV_PRIORITY = LEGAL[_RECV_PRIORITY]
_ON_SEND_HEADERS = LEGAL[Event.SEND_HEADERS]
_ON_SEND_DATA = LEGAL[Event.SEND_DATA]
_ON_SEND_END_STREAM = LEGAL[Event.SEND_END_STREAM]
_ON_SEND_RST_STREAM = LEGAL[Event.SEND_RST_STREAM]
#: What a request's HEADERS makes of an idle stream, without and with END_STREAM.
_OPENED = (_ON_RECV_HEADERS[_IDLE], _ON_RECV_HEADERS_END[_IDLE])


class Handler(Protocol):
    """What the codec calls; each call is about one stream (0: the connection)."""

    def on_request(self, stream_id: int, fields: Fields, end_stream: bool, too_large: bool) -> None:
        """A request's validated header fields (``too_large``: over the header list limit)."""

    def on_data(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        """Body bytes (``flow`` of the window to acknowledge), or the end of the body."""

    def on_reset(self, stream_id: int, code: int, by_client: bool) -> None:
        """The stream was reset by the client, or by the codec for a stream error."""

    def on_window(self, stream_id: int) -> None:
        """A flow-control window opened (0: the connection's or all streams')."""

    def on_goaway(self, code: int) -> None:
        """The client sent GOAWAY."""


class _H2Error(Exception):
    """A fault in what the client sent, with the error code that answers it."""

    def __init__(self, code: ErrorCodes, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class _ConnectionError(_H2Error):
    """Answered with GOAWAY: the connection closes (RFC 9113 5.4.1)."""


class _StreamError(_H2Error):
    """Answered with RST_STREAM on the frame's stream (RFC 9113 5.4.2)."""


class _Stream:
    __slots__ = ("send_window", "recv_window", "unacked", "state", "remaining")

    def __init__(
        self, send_window: int, recv_window: int, state: StreamState, remaining: int
    ) -> None:
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacked = 0
        #: Open or half-closed (closed streams are dropped, their state kept in _closed);
        #: CLOSED only while the handler hears the end of the request.
        self.state = state
        #: Body bytes the request's content-length still promises (-1: no content-length).
        self.remaining = remaining


class H2Codec:
    """One server connection's HTTP/2 state and framing."""

    def __init__(self, handler: Handler, max_streams: int, max_header_list: int) -> None:
        self.handler = handler
        self.max_streams = max_streams
        self.max_header_list = max_header_list
        self.streams: dict[int, _Stream] = {}
        #: The highest stream the client opened (what a GOAWAY reports).
        self.highest_inbound_stream_id = 0
        self.decoder = Decoder()
        self.max_outbound_frame_size = DEFAULT_FRAME_SIZE
        self.initial_send_window = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW
        self.recv_window = DEFAULT_WINDOW
        self.unacked = 0
        self.goaway_sent = False
        self._goaway_received = False
        self.closed = False
        #: The connection's window (or every stream's) opened during this read: the handler
        #: hears it once, after the read's frames (however many WINDOW_UPDATEs it held).
        self._opened = False
        #: Closed streams and their closed state (see CLOSED_MEMORY), and the highest stream
        #: ID forgotten.
        self._closed: dict[int, StreamState] = {}
        self._closed_floor = 0
        #: Frames that carried nothing (see MAX_IDLE_FRAMES_PER_SECOND) in the current second.
        self._idle_frames = 0
        self._idle_second = 0
        #: The dynamic table size the client's decoder holds us to, and whether our next
        #: header block must shrink it (the client lowered SETTINGS_HEADER_TABLE_SIZE).
        self._table_size = DEFAULT_TABLE_SIZE
        self._shrink_table = False
        self._out = bytearray()
        self._buf = b""
        self._preface = False
        self._settings_seen = False
        #: A header block waiting for its CONTINUATION frames: (stream, flags, parts, length).
        self._block: tuple[int, int, list[bytes], int] | None = None
        #: Frame type -> its handler; types not listed are ignored (RFC 9113 4.1).
        self._dispatch: dict[int, Callable[[int, int, bytes], None]] = {
            DATA: self._data,
            HEADERS: self._headers,
            PRIORITY: self._priority,
            RST_STREAM: self._rst_stream,
            SETTINGS: self._settings,
            PUSH_PROMISE: self._push_promise,
            PING: self._ping,
            GOAWAY: self._goaway,
            WINDOW_UPDATE: self._window_update,
            CONTINUATION: self._continuation,
        }

    # -- sending ---------------------------------------------------------------------------

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        n = len(payload)
        out = self._out
        out += _FRAME.pack(n >> 8, n & 0xFF, ftype, flags, sid)
        if n:
            out += payload

    def initiate_connection(self) -> None:
        """Our SETTINGS, the first frame the server sends."""
        self._frame(
            SETTINGS,
            0,
            0,
            _SETTING.pack(MAX_CONCURRENT_STREAMS, self.max_streams)
            + _SETTING.pack(MAX_HEADER_LIST_SIZE, self.max_header_list),
        )

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = bytes(out)
        out.clear()
        return data

    def send_headers(self, sid: int, fields: Fields, end_stream: bool = False) -> None:
        """A response head or trailers (lower-case names, pseudo-fields first). Dropped on a
        stream not held, or after our END_STREAM (the table's verdict)."""
        st = self.streams.get(sid)
        if st is None or self.closed:
            return
        try:
            after = (_ON_SEND_END_STREAM if end_stream else _ON_SEND_HEADERS)[st.state]
        except KeyError:
            return  # every refusal of a send is IGNORE (worker/h2/states.py)
        block = encode(fields)
        if self._shrink_table:
            # RFC 7541 4.2: the first header block after the change "MUST" begin with a
            # dynamic table size update; 0, as our encoder never uses the table.
            block = b"\x20" + block
            self._shrink_table = False
        size = self.max_outbound_frame_size
        flags = END_STREAM if end_stream else 0
        if len(block) <= size:
            self._frame(HEADERS, flags | END_HEADERS, sid, block)
        else:
            self._frame(HEADERS, flags, sid, block[:size])
            for i in range(size, len(block), size):
                last = i + size >= len(block)
                self._frame(CONTINUATION, END_HEADERS if last else 0, sid, block[i : i + size])
        if end_stream:
            self._sent_end(sid, st, after)

    def local_flow_control_window(self, sid: int) -> int:
        """How much DATA the stream may send now."""
        st = self.streams.get(sid)
        if st is None:
            return 0
        return min(st.send_window, self.send_window)

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        """One DATA frame; the caller keeps it within the window and the frame size. Dropped
        as :meth:`send_headers` drops a head."""
        st = self.streams.get(sid)
        if st is None or self.closed:
            return
        try:
            after = (_ON_SEND_END_STREAM if end_stream else _ON_SEND_DATA)[st.state]
        except KeyError:
            return  # every refusal of a send is IGNORE
        n = len(data)
        st.send_window -= n
        self.send_window -= n
        self._frame(DATA, END_STREAM if end_stream else 0, sid, data)
        if end_stream:
            self._sent_end(sid, st, after)

    def end_stream(self, sid: int) -> None:
        self.send_data(sid, b"", end_stream=True)

    def reset_stream(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        st = self.streams.pop(sid, None)
        if st is not None:
            self._closed_as(sid, _ON_SEND_RST_STREAM[st.state])
            if not self.closed:
                self._frame(RST_STREAM, 0, sid, _U32.pack(code))

    def finished(self, sid: int) -> None:
        """Our response is complete: if the client is still sending a body nobody reads,
        ask it to stop (RST_STREAM NO_ERROR, RFC 9113 8.1)."""
        st = self.streams.get(sid)
        if st is not None and st.state is _HALF_CLOSED_LOCAL:
            self.reset_stream(sid, ErrorCodes.NO_ERROR)

    def acknowledge_received_data(self, size: int, sid: int) -> None:
        """Gives ``size`` bytes of window back (once half a window has been consumed)."""
        if self.closed:
            return
        self.unacked += size
        if self.unacked >= DEFAULT_WINDOW // 2:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.unacked))
            self.recv_window += self.unacked
            self.unacked = 0
        st = self.streams.get(sid)
        if st is None or st.state not in RECEIVING:
            return
        st.unacked += size
        if st.unacked >= DEFAULT_WINDOW // 2:
            self._frame(WINDOW_UPDATE, 0, sid, _U32.pack(st.unacked))
            st.recv_window += st.unacked
            st.unacked = 0

    def goaway(self, code: int = ErrorCodes.NO_ERROR) -> None:
        """GOAWAY: no new streams (the open ones go on unless the connection closes)."""
        if not self.closed:
            self._frame(GOAWAY, 0, 0, _GOAWAY.pack(self.highest_inbound_stream_id, code))
        self.goaway_sent = True

    def close_connection(self, code: int) -> None:
        self.goaway(code)
        self.closed = True

    def _sent_end(self, sid: int, st: _Stream, after: StreamState) -> None:
        """Our END_STREAM went: half-closed (local), or closed and dropped."""
        st.state = after
        if after is _CLOSED:
            del self.streams[sid]
            self._closed_as(sid, after)

    def _closed_as(self, sid: int, state: StreamState) -> None:
        closed = self._closed
        if len(closed) >= CLOSED_MEMORY:
            closed.clear()
            self._closed_floor = self.highest_inbound_stream_id
        closed[sid] = state

    def _state_of(self, sid: int) -> StreamState:
        """The state of a stream the codec does not hold: idle above the highest ID used,
        else closed, as remembered (or skipped, or forgotten)."""
        if sid > self.highest_inbound_stream_id:
            return _IDLE
        state = self._closed.get(sid)
        if state is not None:
            return state
        return _CLOSED_FORGOTTEN if sid <= self._closed_floor else _CLOSED_SKIPPED

    def _refuse(self, state: StreamState, event: Event) -> None:
        """Answers a frame ``state`` does not allow as the table says: returns if the frame
        is dropped, raises _StreamError or _ConnectionError."""
        refusal = REFUSALS[state, event]
        if refusal.reaction is Reaction.STREAM_ERROR:
            raise _StreamError(refusal.code, refusal.reason)
        if refusal.reaction is Reaction.CONNECTION_ERROR:
            raise _ConnectionError(refusal.code, refusal.reason)

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> bool:
        """Takes what the client sent; False once the connection must close (a GOAWAY with
        the error is queued)."""
        if self.closed:
            return False
        try:
            self._receive(data)
        except _ConnectionError as e:
            self._buf = b""
            self.close_connection(e.code)
            return False
        return True

    def _receive(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        if not self._preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "no preface")
                self._buf = buf
                return
            if not buf.startswith(PREFACE):
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "no preface")
            self._preface = True
            pos = len(PREFACE)
        end = len(buf)
        unpack = _FRAME.unpack_from
        dispatch = self._dispatch
        while end - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(buf, pos)
            length = hi << 8 | lo
            if length > DEFAULT_FRAME_SIZE:
                raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "frame too large")
            stop = pos + 9 + length
            if stop > end:
                break
            payload = buf[pos + 9 : stop]
            pos = stop
            sid &= 0x7FFFFFFF
            if not self._settings_seen and (ftype != SETTINGS or flags & ACK):
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "SETTINGS must come first")
            if self._block is not None and ftype != CONTINUATION:
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "expected CONTINUATION")
            if ftype > CONTINUATION or ftype in _IDLE_TYPES:
                self._idle_frame()
            try:
                handle = dispatch[ftype]
            except KeyError:
                continue  # an unknown type, ignored (RFC 9113 4.1, 5.5)
            try:
                handle(flags, sid, payload)
            except _StreamError as e:
                self._stream_error(sid, e.code)
            if self.closed:
                return
        self._buf = buf[pos:] if pos < end else b""
        if self._opened:
            self._opened = False
            self.handler.on_window(0)

    def _idle_frame(self) -> None:
        second = int(monotonic())
        if second != self._idle_second:
            self._idle_second = second
            self._idle_frames = 0
        self._idle_frames += 1
        if self._idle_frames > MAX_IDLE_FRAMES_PER_SECOND:
            raise _ConnectionError(ErrorCodes.ENHANCE_YOUR_CALM, "too many empty frames")

    def _stream_error(self, sid: int, code: int) -> None:
        """Resets the stream, open or not (a refused or malformed one never opened). A stream
        still idle (a bad PRIORITY frame is the only frame that errs on one) cannot be reset:
        "RST_STREAM frames MUST NOT be sent for a stream in the 'idle' state" (RFC 9113 6.4),
        and the client could open it afterwards; "an endpoint MAY choose to treat a stream
        error as a connection error" (5.4.1), which it is then."""
        if sid > self.highest_inbound_stream_id:
            raise _ConnectionError(ErrorCodes(code), "stream error on an idle stream")
        known = self.streams.pop(sid, None) is not None
        self._closed_as(sid, _CLOSED_RESET_BY_US)
        self._frame(RST_STREAM, 0, sid, _U32.pack(code))
        if known:
            self.handler.on_reset(sid, code, False)

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS length")
        self._settings_seen = True
        window = -1
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, "window too large")
                window = value  # the last one counts; the streams are adjusted once
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
                    raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.max_outbound_frame_size = value
            elif key == ENABLE_PUSH and value > 1:
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "bad ENABLE_PUSH")
            elif key == HEADER_TABLE_SIZE and value < self._table_size:
                # Our encoder never uses the dynamic table, but the client's decoder keeps
                # its size until our next block says 0 (strict decoders insist).
                self._table_size = 0
                self._shrink_table = True
            # The others are limits on what we do not do (push) or advice.
        if window >= 0 and window != self.initial_send_window:
            delta = window - self.initial_send_window
            self.initial_send_window = window
            for st in self.streams.values():
                st.send_window += delta
                if st.send_window > MAX_WINDOW:
                    raise _ConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, "window overflow")
            self._opened = self._opened or delta > 0
        self._frame(SETTINGS, ACK, 0)

    def _ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "PING length")
        if not flags & ACK:
            self._frame(PING, ACK, 0, payload)

    def _goaway(self, flags: int, sid: int, payload: bytes) -> None:
        if sid or len(payload) < 8:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "bad GOAWAY")
        if self._goaway_received:
            self._idle_frame()
        self._goaway_received = True
        self.handler.on_goaway(_U32.unpack_from(payload, 4)[0])

    def _push_promise(self, flags: int, sid: int, payload: bytes) -> None:
        raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "PUSH_PROMISE from client")

    def _priority(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "PRIORITY on the connection")
        st = self.streams.get(sid)
        state = st.state if st is not None else self._state_of(sid)
        if state not in _ON_RECV_PRIORITY:
            self._refuse(state, _RECV_PRIORITY)
            return
        if len(payload) != 5:
            raise _StreamError(ErrorCodes.FRAME_SIZE_ERROR, "PRIORITY length")
        if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
            raise _StreamError(ErrorCodes.PROTOCOL_ERROR, "stream depends on itself")

    def _window_update(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not increment:
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "zero window increment")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, "window overflow")
            self._opened = True
            return
        st = self.streams.get(sid)
        state = st.state if st is not None else self._state_of(sid)
        if st is None or state not in _ON_RECV_WINDOW_UPDATE:
            # Idle: a connection error; closed: allowed, but it carries nothing.
            self._refuse(state, _RECV_WINDOW_UPDATE)
            self._idle_frame()
            return
        if not increment:
            raise _StreamError(ErrorCodes.PROTOCOL_ERROR, "zero window increment")
        st.send_window += increment
        if st.send_window > MAX_WINDOW:
            raise _StreamError(ErrorCodes.FLOW_CONTROL_ERROR, "window overflow")
        self.handler.on_window(sid)

    def _rst_stream(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "RST_STREAM length")
        if not sid:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "RST_STREAM on the connection")
        st = self.streams.get(sid)
        state = st.state if st is not None else self._state_of(sid)
        after = _ON_RECV_RST_STREAM.get(state)
        if st is None or after is None:
            # Idle: a connection error; closed: legitimate, but nothing is lost.
            self._refuse(state, _RECV_RST_STREAM)
            self._idle_frame()
        else:
            del self.streams[sid]
            self._closed_as(sid, after)
        self.handler.on_reset(sid, _U32.unpack(payload)[0], True)

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "DATA on the connection")
        flow = len(payload)
        data = payload
        if flags & PADDED:
            if not flow or payload[0] >= flow:
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "bad padding")
            data = payload[1 : flow - payload[0]]
        self.recv_window -= flow
        if self.recv_window < 0:
            raise _ConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, "connection window exceeded")
        end = bool(flags & END_STREAM)
        st = self.streams.get(sid)
        state = st.state if st is not None else self._state_of(sid)
        after: StreamState | None
        try:
            after = (_ON_RECV_DATA_END if end else _ON_RECV_DATA)[state]
        except KeyError:
            after = None  # refused: _refuse below says how
        if not data and (after is None or not end):
            self._idle_frame()  # no body, and not the end of one
        if st is None or after is None:
            if state is not _IDLE:
                # The bytes still count against the connection's window (on an idle stream
                # the frame ends the connection first).
                self.acknowledge_received_data(flow, 0)
            self._refuse(state, _RECV_DATA_END if end else _RECV_DATA)
            return
        st.recv_window -= flow
        if st.recv_window < 0:
            self.acknowledge_received_data(flow, 0)
            raise _StreamError(ErrorCodes.FLOW_CONTROL_ERROR, "stream window exceeded")
        remaining = st.remaining
        if remaining >= 0:
            st.remaining = remaining = remaining - len(data)
            if remaining < 0 or (end and remaining):
                self.acknowledge_received_data(flow, 0)
                raise _StreamError(ErrorCodes.PROTOCOL_ERROR, "body and content-length differ")
        st.state = after
        self.handler.on_data(sid, data, flow, end)
        if after is _CLOSED and self.streams.get(sid) is st:
            del self.streams[sid]
            self._closed_as(sid, after)

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid & 1:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "HEADERS on an even stream")
        start = 0
        end = len(payload)
        if flags & PADDED:
            if not end or payload[0] >= end:
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "bad padding")
            end -= payload[0]
            start = 1
        if flags & PRIORITY_FLAG:
            if end - start < 5:
                # Too short for its fields, or padding that eats them (RFC 9113 4.2, 6.2).
                code = (
                    ErrorCodes.FRAME_SIZE_ERROR
                    if len(payload) < start + 5
                    else ErrorCodes.PROTOCOL_ERROR
                )
                raise _ConnectionError(code, "HEADERS too short")
            if _U32.unpack_from(payload, start)[0] & 0x7FFFFFFF == sid:
                flags |= _SELF_DEPENDENT
            start += 5
        block = payload[start:end] if start or end < len(payload) else payload
        if not flags & END_HEADERS:
            self._block = (sid, flags, [block], len(block))
            return
        self._header_block(sid, flags, block)

    def _continuation(self, flags: int, sid: int, payload: bytes) -> None:
        pending = self._block
        if pending is None or pending[0] != sid:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "unexpected CONTINUATION")
        first, first_flags, parts, length = pending
        if not payload:
            self._idle_frame()
        parts.append(payload)
        length += 9 + len(payload)
        if length > MAX_BLOCK_FACTOR * self.max_header_list:
            raise _ConnectionError(ErrorCodes.ENHANCE_YOUR_CALM, "header block too long")
        if not flags & END_HEADERS:
            self._block = (first, first_flags, parts, length)
            return
        self._block = None
        self._header_block(sid, first_flags, b"".join(parts))

    def _decode(self, block: bytes) -> Fields:
        try:
            return self.decoder.decode(block, MAX_BLOCK_FACTOR * self.max_header_list)
        except DecodeError as e:
            raise _ConnectionError(ErrorCodes.COMPRESSION_ERROR, str(e)) from None
        except ListTooLarge as e:
            raise _ConnectionError(ErrorCodes.ENHANCE_YOUR_CALM, str(e)) from None

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        end_stream = bool(flags & END_STREAM)
        st = self.streams.get(sid)
        if st is not None:
            # Trailers: the end of a request body.
            fields = self._decode(block)
            state = st.state
            after = (_ON_RECV_HEADERS_END if end_stream else _ON_RECV_HEADERS).get(state)
            if after is None:
                self._refuse(state, _RECV_HEADERS_END if end_stream else _RECV_HEADERS)
                return
            if check_trailers(fields):
                raise _StreamError(ErrorCodes.PROTOCOL_ERROR, "malformed trailers")
            if st.remaining > 0:
                raise _StreamError(ErrorCodes.PROTOCOL_ERROR, "body shorter than content-length")
            st.state = after
            self.handler.on_data(sid, b"", 0, True)
            if after is _CLOSED and self.streams.get(sid) is st:
                del self.streams[sid]
                self._closed_as(sid, after)
            return
        if sid <= self.highest_inbound_stream_id:
            # A closed stream: its block still updates the decoder's table.
            self._idle_frame()
            self._decode(block)
            self._refuse(self._state_of(sid), _RECV_HEADERS_END if end_stream else _RECV_HEADERS)
            return
        self.highest_inbound_stream_id = sid
        decoder = self.decoder
        parsed: tuple[Fields, str | None, int, bool] | None = decoder.cached(  # type: ignore
            block
        )
        if parsed is None:
            generation = decoder.generation
            fields = self._decode(block)
            if header_list_size(fields) > self.max_header_list:
                # Answered 431 (as over HTTP/1.1): only the pseudo-fields are needed, and
                # they must make a request line as sound as any.
                pseudo = [f for f in fields if f[0][:1] == b":"]
                parsed = (pseudo, check_request(pseudo)[0], -1, True)
            else:
                malformed, length = check_request(fields)
                parsed = (fields, malformed, length, False)
                decoder.remember(generation, block, parsed)
        fields, malformed, length, too_large = parsed
        if flags & _SELF_DEPENDENT:
            raise _StreamError(ErrorCodes.PROTOCOL_ERROR, "stream depends on itself")
        if self.goaway_sent or len(self.streams) >= self.max_streams:
            raise _StreamError(ErrorCodes.REFUSED_STREAM, "refused")
        if malformed:
            raise _StreamError(ErrorCodes.PROTOCOL_ERROR, malformed)
        if end_stream and length > 0:
            raise _StreamError(ErrorCodes.PROTOCOL_ERROR, "no body, but a content-length")
        self.streams[sid] = _Stream(
            self.initial_send_window, DEFAULT_WINDOW, _OPENED[end_stream], length
        )
        self.handler.on_request(sid, fields, end_stream, too_large)
