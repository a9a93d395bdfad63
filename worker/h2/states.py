"""The states of a stream on the server side of HTTP/2, and every transition, in one table.

Theory of operation. RFC 9113 5.1 draws seven states; a server that never pushes reaches five
of them. The two "reserved" states exist only for streams a PUSH_PROMISE opens: the codec
sends none, and one from the client is a connection error ("A client cannot push", 8.4). The
other five:

* ``IDLE``: an ID above every stream the client opened. HEADERS opens it; PRIORITY leaves it
  idle; "Receiving any frame other than HEADERS or PRIORITY on a stream in this state MUST be
  treated as a connection error (Section 5.4.1) of type PROTOCOL_ERROR."
* ``OPEN``: both sides may send. END_STREAM from one side half-closes it.
* ``HALF_CLOSED_LOCAL``: our response ended; the client's body goes on.
* ``HALF_CLOSED_REMOTE``: the request ended; "If an endpoint receives additional frames, other
  than WINDOW_UPDATE, PRIORITY, or RST_STREAM, for a stream that is in this state, it MUST
  respond with a stream error (Section 5.4.2) of type STREAM_CLOSED."
* closed, which this module splits by how the stream got there, because 5.1 makes the answer
  to a late frame depend on it:

  - ``CLOSED``: END_STREAM both ways. "An endpoint that receives any frames after receiving
    a frame with the END_STREAM flag set MUST treat that as a connection error (Section
    5.4.1) of type STREAM_CLOSED", but "WINDOW_UPDATE or RST_STREAM frames can be received in
    this state for a short period after a DATA or HEADERS frame containing an END_STREAM flag
    is sent"; they are dropped.
  - ``CLOSED_RESET_BY_US``: we sent RST_STREAM (a stream error is one). "The endpoint MUST
    ignore frames that it receives on closed streams after it has sent a RST_STREAM frame."
  - ``CLOSED_RESET_BY_CLIENT``: "An endpoint that receives any frame other than PRIORITY
    after receiving a RST_STREAM MUST treat that as a stream error (Section 5.4.2) of type
    STREAM_CLOSED." A RST_STREAM is dropped instead ("To avoid looping, an endpoint MUST NOT
    send a RST_STREAM in response to a RST_STREAM frame", 5.4.2), and so is a WINDOW_UPDATE,
    which carries nothing and costs us nothing.
  - ``CLOSED_SKIPPED``: an ID below one the client used, never used itself: "The first use of
    a new stream identifier implicitly closes all streams in the "idle" state that might have
    been initiated by that peer with a lower-valued stream identifier" (5.1.1). HEADERS or DATA
    on it are "an unexpected stream identifier": connection error PROTOCOL_ERROR.
  - ``CLOSED_FORGOTTEN``: closed longer ago than the codec remembers (its CLOSED_MEMORY):
    frames on it are dropped, as after our own RST_STREAM.

:data:`TRANSITIONS` maps (state, event) to the next state, or to a :class:`Refusal` that
says how the frame is answered: dropped, a stream error (RST_STREAM; the stream is then
``CLOSED_RESET_BY_US``) or a connection error (GOAWAY). An event is a frame the client sent
or one we send; sending happens only on streams the codec holds (open, half-closed, and a
stream ``CLOSED`` while the handler hears the end of its request), so the send events have
rows for those states only. Checks that are not about the state (a frame's length, a
malformed request, flow control) stay with the frame's handler in the codec.

The codec reads the table through per-event rows (:data:`LEGAL`), which hold only the
allowed transitions: the hot path is one dict lookup, the refusal is looked up when there is
one. The states are an ``IntEnum`` because an ``Enum``'s hash is a Python-level call, several
times slower as a dict key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from h2.errors import ErrorCodes


class StreamState(enum.IntEnum):
    """Where a stream is (RFC 9113 5.1), its "closed" state split by how it closed."""

    IDLE = 1
    OPEN = 2
    HALF_CLOSED_LOCAL = 3
    HALF_CLOSED_REMOTE = 4
    CLOSED = 5
    CLOSED_RESET_BY_US = 6
    CLOSED_RESET_BY_CLIENT = 7
    CLOSED_SKIPPED = 8
    CLOSED_FORGOTTEN = 9


class Event(enum.IntEnum):
    """A frame on a stream, received from the client (RECV_*) or sent by us (SEND_*); _END:
    with END_STREAM."""

    RECV_HEADERS = 1
    RECV_HEADERS_END = 2
    RECV_DATA = 3
    RECV_DATA_END = 4
    RECV_RST_STREAM = 5
    RECV_WINDOW_UPDATE = 6
    RECV_PRIORITY = 7
    SEND_HEADERS = 8
    SEND_DATA = 9
    SEND_END_STREAM = 10
    SEND_RST_STREAM = 11


class Reaction(enum.Enum):
    """How a frame the table does not allow is answered."""

    #: Dropped: nothing is sent, the connection goes on.
    IGNORE = "ignore"
    #: RST_STREAM with the code (RFC 9113 5.4.2).
    STREAM_ERROR = "stream error"
    #: GOAWAY with the code, and the connection closes (RFC 9113 5.4.1).
    CONNECTION_ERROR = "connection error"


@dataclass(frozen=True, slots=True)
class Refusal:
    """The table's verdict on a frame a stream's state does not allow."""

    #: What is done about it.
    reaction: Reaction
    #: The error code sent (NO_ERROR for :attr:`Reaction.IGNORE`, where nothing is sent).
    code: ErrorCodes
    #: Why, for the log and the tests (never on the wire).
    reason: str


# Short names for the table below.
_S = StreamState
_E = Event

_DROP = Refusal(Reaction.IGNORE, ErrorCodes.NO_ERROR, "frame on a stream we reset")
_DROP_LATE = Refusal(Reaction.IGNORE, ErrorCodes.NO_ERROR, "late frame on a closed stream")
_DROP_OLD = Refusal(Reaction.IGNORE, ErrorCodes.NO_ERROR, "frame on a stream long closed")
_DROP_SENT = Refusal(Reaction.IGNORE, ErrorCodes.NO_ERROR, "our END_STREAM was sent already")
_IDLE_FRAME = Refusal(
    Reaction.CONNECTION_ERROR, ErrorCodes.PROTOCOL_ERROR, "frame other than HEADERS on idle"
)
_AFTER_END = Refusal(
    Reaction.CONNECTION_ERROR, ErrorCodes.STREAM_CLOSED, "frame after END_STREAM both ways"
)
_SKIPPED = Refusal(
    Reaction.CONNECTION_ERROR, ErrorCodes.PROTOCOL_ERROR, "stream ID lower than one used"
)
_AFTER_CLIENT_END = Refusal(
    Reaction.STREAM_ERROR, ErrorCodes.STREAM_CLOSED, "frame after the client's END_STREAM"
)
_AFTER_CLIENT_RESET = Refusal(
    Reaction.STREAM_ERROR, ErrorCodes.STREAM_CLOSED, "frame after the client's RST_STREAM"
)
#: RFC 9113 8.1: "An endpoint that receives a HEADERS frame without the END_STREAM flag set
#: after receiving the HEADERS frame that opens a request ... MUST treat the corresponding
#: request or response as malformed (Section 8.1.1)": a stream error of type PROTOCOL_ERROR.
_OPEN_TRAILERS = Refusal(
    Reaction.STREAM_ERROR, ErrorCodes.PROTOCOL_ERROR, "trailers without END_STREAM"
)


def _closed_rows(
    state: StreamState, headers_or_data: Refusal, late: Refusal
) -> dict[tuple[StreamState, Event], StreamState | Refusal]:
    """A closed state's rows: HEADERS and DATA get one verdict, RST_STREAM and WINDOW_UPDATE
    another; PRIORITY is allowed on every stream (RFC 9113 5.1) and changes nothing."""
    return {
        (state, _E.RECV_HEADERS): headers_or_data,
        (state, _E.RECV_HEADERS_END): headers_or_data,
        (state, _E.RECV_DATA): headers_or_data,
        (state, _E.RECV_DATA_END): headers_or_data,
        (state, _E.RECV_RST_STREAM): late,
        (state, _E.RECV_WINDOW_UPDATE): late,
        (state, _E.RECV_PRIORITY): state,
    }


#: Every (state, event) the codec meets, to the next state or the refusal.
TRANSITIONS: dict[tuple[StreamState, Event], StreamState | Refusal] = {
    # idle: only the client opens streams (no push).
    (_S.IDLE, _E.RECV_HEADERS): _S.OPEN,
    (_S.IDLE, _E.RECV_HEADERS_END): _S.HALF_CLOSED_REMOTE,
    (_S.IDLE, _E.RECV_DATA): _IDLE_FRAME,
    (_S.IDLE, _E.RECV_DATA_END): _IDLE_FRAME,
    (_S.IDLE, _E.RECV_RST_STREAM): _IDLE_FRAME,
    (_S.IDLE, _E.RECV_WINDOW_UPDATE): _IDLE_FRAME,
    (_S.IDLE, _E.RECV_PRIORITY): _S.IDLE,
    # open
    (_S.OPEN, _E.RECV_HEADERS): _OPEN_TRAILERS,
    (_S.OPEN, _E.RECV_HEADERS_END): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _E.RECV_DATA): _S.OPEN,
    (_S.OPEN, _E.RECV_DATA_END): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _E.RECV_RST_STREAM): _S.CLOSED_RESET_BY_CLIENT,
    (_S.OPEN, _E.RECV_WINDOW_UPDATE): _S.OPEN,
    (_S.OPEN, _E.RECV_PRIORITY): _S.OPEN,
    (_S.OPEN, _E.SEND_HEADERS): _S.OPEN,
    (_S.OPEN, _E.SEND_DATA): _S.OPEN,
    (_S.OPEN, _E.SEND_END_STREAM): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _E.SEND_RST_STREAM): _S.CLOSED_RESET_BY_US,
    # half-closed (local): our response is over, the request body goes on.
    (_S.HALF_CLOSED_LOCAL, _E.RECV_HEADERS): _OPEN_TRAILERS,
    (_S.HALF_CLOSED_LOCAL, _E.RECV_HEADERS_END): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _E.RECV_DATA): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _E.RECV_DATA_END): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _E.RECV_RST_STREAM): _S.CLOSED_RESET_BY_CLIENT,
    (_S.HALF_CLOSED_LOCAL, _E.RECV_WINDOW_UPDATE): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _E.RECV_PRIORITY): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _E.SEND_HEADERS): _DROP_SENT,
    (_S.HALF_CLOSED_LOCAL, _E.SEND_DATA): _DROP_SENT,
    (_S.HALF_CLOSED_LOCAL, _E.SEND_END_STREAM): _DROP_SENT,
    (_S.HALF_CLOSED_LOCAL, _E.SEND_RST_STREAM): _S.CLOSED_RESET_BY_US,
    # half-closed (remote): the request is over, the response goes on.
    (_S.HALF_CLOSED_REMOTE, _E.RECV_HEADERS): _AFTER_CLIENT_END,
    (_S.HALF_CLOSED_REMOTE, _E.RECV_HEADERS_END): _AFTER_CLIENT_END,
    (_S.HALF_CLOSED_REMOTE, _E.RECV_DATA): _AFTER_CLIENT_END,
    (_S.HALF_CLOSED_REMOTE, _E.RECV_DATA_END): _AFTER_CLIENT_END,
    (_S.HALF_CLOSED_REMOTE, _E.RECV_RST_STREAM): _S.CLOSED_RESET_BY_CLIENT,
    (_S.HALF_CLOSED_REMOTE, _E.RECV_WINDOW_UPDATE): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _E.RECV_PRIORITY): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _E.SEND_HEADERS): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _E.SEND_DATA): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _E.SEND_END_STREAM): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _E.SEND_RST_STREAM): _S.CLOSED_RESET_BY_US,
    # closed, by how; CLOSED is still held while the handler hears the request's end, and
    # may be reset then (as any stream the handler holds).
    **_closed_rows(_S.CLOSED, _AFTER_END, _DROP_LATE),
    (_S.CLOSED, _E.SEND_HEADERS): _DROP_SENT,
    (_S.CLOSED, _E.SEND_DATA): _DROP_SENT,
    (_S.CLOSED, _E.SEND_END_STREAM): _DROP_SENT,
    (_S.CLOSED, _E.SEND_RST_STREAM): _S.CLOSED_RESET_BY_US,
    **_closed_rows(_S.CLOSED_RESET_BY_US, _DROP, _DROP),
    **_closed_rows(_S.CLOSED_RESET_BY_CLIENT, _AFTER_CLIENT_RESET, _DROP_LATE),
    **_closed_rows(_S.CLOSED_SKIPPED, _SKIPPED, _DROP_LATE),
    **_closed_rows(_S.CLOSED_FORGOTTEN, _DROP_OLD, _DROP_OLD),
}

#: For each event, the states it is allowed in and the state it leads to: what the codec's
#: hot path reads (a state missing from a row: look the refusal up in TRANSITIONS).
LEGAL: dict[Event, dict[StreamState, StreamState]] = {
    event: {
        state: to
        for (state, on), to in TRANSITIONS.items()
        if on is event and isinstance(to, StreamState)
    }
    for event in Event
}

#: The states in which the client may still send the request's body (we give its window back).
RECEIVING = frozenset(LEGAL[_E.RECV_DATA])

#: The refusals alone, for the codec's cold path.
REFUSALS: dict[tuple[StreamState, Event], Refusal] = {
    key: to for key, to in TRANSITIONS.items() if isinstance(to, Refusal)
}
