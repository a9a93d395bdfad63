"""Fuzzing the HTTP/2 server (worker/h2_server.py over the codec in worker/h2_codec.py), wired
to a real Engine and a recording origin (tests/fuzz_targets.py).

Three fuzzers of the server: valid conversations mutated byte by byte and cut into random
reads; a state machine that plays a well-behaved client (the ``h2`` package's, which checks
every frame the server sends, its flow control and its header blocks) doing anything a client
may, in any order; and one that writes frames by hand (any type, flags, stream, length;
settings, headers with their CONTINUATIONs, data, resets, window updates, pings, GOAWAY) with
header blocks that are valid or broken in one of the ways RFC 9113 8.2 and 8.3 call
malformed. Beyond what :func:`fuzz_targets.check_h2` holds for any run: a malformed request
never reaches the upstream (not one byte), every request that does arrives as the client sent
it, and a well-behaved client's request is answered. And the HPACK decoder, against the
``hpack`` package's and on any bytes.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from typing import Any

import hpack
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import H2Error
from hpack import Encoder
from hypothesis import given, reject
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.fuzz_strategies import H2_TOKENS, fuzz_settings, mutated, reads, verdict
from tests.fuzz_targets import (
    PREFACE,
    Conversation,
    H2Output,
    KnownBug,
    UpstreamRequest,
    check_h2,
    frame,
    h2_transcripts,
    run_connection,
    split,
)
from worker.h2.codec import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
)
from worker.h2.hpack import DecodeError, Decoder, Fields, ListTooLarge

AUTHORITY = b"fuzz.test"
GET: Fields = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":path", b"/"),
    (b":authority", AUTHORITY),
]
#: Inputs that showed a bug in the HTTP/2 server (fixed since), kept as regression cases.
FOUND: dict[str, bytes] = {
    # A PRIORITY frame of a bad length on an idle stream got RST_STREAM (which may not name
    # an idle stream, RFC 9113 6.4); the client then opened that stream and was served on it.
    "priority-on-idle-stream": (
        PREFACE
        + frame(SETTINGS, 0, 0)
        + frame(PRIORITY, 0, 1, bytes(4))
        + frame(HEADERS, END_STREAM | END_HEADERS, 1, Encoder().encode(GET))
    ),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_found(name: str) -> None:
    """Inputs that once showed a bug, whole and a byte per read."""
    data = FOUND[name]
    check_h2(run_connection([data], h2=True), tolerate=())
    check_h2(run_connection([data[i : i + 1] for i in range(len(data))], h2=True), tolerate=())


@fuzz_settings(600)
@given(data=st.data(), warm=st.integers(0, 2))
def test_mutated_conversations(data: st.DataObject, warm: int) -> None:
    """Valid client conversations with mutations, cut into random reads."""
    raw = data.draw(mutated(h2_transcripts(), H2_TOKENS, most=5), label="bytes")
    chunks = data.draw(reads(raw), label="reads")
    verdict(run_connection(chunks, warm=warm, h2=True, strict=len(chunks) == 1))


_NAMES = st.sampled_from(
    [b":method", b":path", b"cookie", b"accept", b"authorization", b"content-length"]
) | st.binary(min_size=1, max_size=10)
_HPACK_BLOCKS = st.lists(
    st.tuples(
        st.lists(st.tuples(_NAMES, st.binary(max_size=40), st.booleans()), max_size=8),
        st.booleans(),
        st.none() | st.integers(0, 4096),
    ),
    max_size=8,
)


@fuzz_settings(300)
@given(blocks=_HPACK_BLOCKS)
def test_hpack_decoder_agrees_with_hpack(blocks: list[tuple[Any, bool, int | None]]) -> None:
    """Header blocks from the ``hpack`` package's encoder (Huffman or not, indexed or never
    indexed, table size changes and evictions) decode, block after block, to what its own
    decoder reads."""
    enc, ours, ref = hpack.Encoder(), Decoder(), hpack.Decoder()
    for fields, huffman, size in blocks:
        if size is not None:
            enc.header_table_size = size
        block = enc.encode(fields, huffman=huffman)
        assert ours.decode(block) == [(bytes(n), bytes(v)) for n, v in ref.decode(block, raw=True)]


@fuzz_settings(500)
@given(block=st.binary(max_size=200), limit=st.integers(0, 5000))
def test_hpack_decoder_takes_any_bytes(block: bytes, limit: int) -> None:
    """Any bytes decode or raise DecodeError / ListTooLarge (the connection's errors)."""
    with contextlib.suppress(DecodeError, ListTooLarge):
        Decoder().decode(block, limit)


def _checked(conv: Conversation) -> H2Output:
    """Finishes ``conv`` and checks it; an input showing only known bugs is rejected."""
    try:
        return check_h2(conv.finish())
    except KnownBug:
        reject()


def _upstream_by_marker(requests: list[UpstreamRequest], marker: bytes) -> list[UpstreamRequest]:
    return [
        r
        for r in requests
        if r.header(b"x-fuzz") == marker or r.target.startswith(b"/m" + marker + b"/")
    ]


# -- a well-behaved client ------------------------------------------------------------------


class WellBehavedClient(RuleBasedStateMachine):
    """The ``h2`` package's client, doing what a client may in any order: every frame the
    server sends must satisfy it, and every request it completes must be answered and reach
    the upstream as it was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.conv: Conversation | None = None
        #: Streams whose request the client is still sending, and all it sent on each.
        self.sending: set[int] = set()
        self.sent: dict[int, tuple[Fields, bytearray, bool]] = {}
        self.answered: set[int] = set()
        self.reset: set[int] = set()
        #: GOAWAY either way (or the client's HPACK state is lost): the client stops talking.
        self.done = False
        self.broken = False  # a check failed: teardown checks nothing more
        #: SETTINGS frames sent and not acknowledged yet. h2 applies an acknowledgement to
        #: each setting's oldest change, whichever frame carried it, so the client sends no
        #: SETTINGS while one is unacknowledged (else it judges the server by settings the
        #: server has not seen yet).
        self.unacked_settings = 1

    @initialize(warm=st.integers(0, 2))
    def start(self, warm: int) -> None:
        self.conv = Conversation(warm=warm, h2=True)
        self._flush([])

    def _flush(self, cuts: list[int]) -> None:
        conv = self.conv
        assert conv is not None
        for _ in range(4):
            data = self.client.data_to_send()
            if not data:
                return
            conv.send(split(data, cuts))
            out = conv.take()
            if self.done or not out:
                continue
            try:
                events = self.client.receive_data(out)
            except H2Error as e:
                self._fail(f"the h2 client refused what the server sent: {e!r}")
            for ev in events:
                self._event(ev)

    def _fail(self, what: str) -> None:
        """Fails the test now, saying how to replay the server's side."""
        self.broken = True
        assert self.conv is not None
        e = AssertionError(what)
        e.add_note(f"replay: {self.conv.replay()}")
        raise e

    def _event(self, ev: Any) -> None:
        if isinstance(ev, ResponseReceived):
            self.answered.add(ev.stream_id)
        elif isinstance(ev, DataReceived):
            if ev.flow_controlled_length:
                self.client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, StreamReset):
            self.reset.add(ev.stream_id)
            self.sending.discard(ev.stream_id)
        elif isinstance(ev, StreamEnded):
            self.sending.discard(ev.stream_id)
        elif isinstance(ev, SettingsAcknowledged):
            self.unacked_settings -= 1
        elif isinstance(ev, ConnectionTerminated):
            self.done = True

    def _try(self, action: Callable[[], None]) -> bool:
        """Runs a client action the client may refuse in its state (too many streams, a
        closed stream, a full window): refused, it is skipped."""
        try:
            action()
        except (H2Error, KeyError):  # h2 raises KeyError for a window on a closed stream
            return False
        return True

    @precondition(lambda self: not self.done)
    @rule(
        method=st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS", b"DELETE"]),
        extra=st.lists(
            st.sampled_from(
                [
                    (b"accept", b"*/*"),
                    (b"cookie", b"a=1"),
                    (b"cookie", b"b=2"),
                    (b"te", b"trailers"),
                    (b"x-forwarded-for", b"203.0.113.5"),
                    (b"user-agent", b"fuzz"),
                    (b"host", AUTHORITY),
                    (b"x-long", b"v" * 3000),
                ]
            ),
            max_size=4,
            unique=True,
        ),
        body=st.none() | st.binary(max_size=300),
        length=st.booleans(),
        end=st.booleans(),
    )
    def request(
        self, method: bytes, extra: Fields, body: bytes | None, length: bool, end: bool
    ) -> None:
        """Opens a stream: a request, maybe with a body (declared or not), maybe ended."""
        sid = self.client.get_next_available_stream_id()
        fields = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":path", b"/s%d/" % sid),
            (b":authority", AUTHORITY),
            *extra,
        ]
        if body is not None and length:
            fields.append((b"content-length", b"%d" % len(body)))
        no_body = body is None
        if not self._try(lambda: self.client.send_headers(sid, fields, end_stream=no_body)):
            # h2 checks the fields as it encodes them: its HPACK table may now hold some
            # that the server never got, so the client cannot go on.
            self.done = True
            return
        self.sent[sid] = (fields, bytearray(), no_body)
        if no_body:
            return
        self.sending.add(sid)
        if body:
            self._send_data(sid, body, end)

    def _send_data(self, sid: int, data: bytes, end: bool) -> None:
        room = min(self.client.local_flow_control_window(sid), self.client.max_outbound_frame_size)
        data = data[: max(room, 0)]
        if self._try(lambda: self.client.send_data(sid, data, end_stream=end)):
            self.sent[sid][1].extend(data)
            if end:
                self.sending.discard(sid)
                self.sent[sid] = (self.sent[sid][0], self.sent[sid][1], True)

    @precondition(lambda self: not self.done and self.sending)
    @rule(data=st.data(), payload=st.binary(max_size=400), end=st.booleans())
    def body(self, data: st.DataObject, payload: bytes, end: bool) -> None:
        """More of a request body, within the windows."""
        sid = data.draw(st.sampled_from(sorted(self.sending)), label="stream")
        self._send_data(sid, payload, end)

    @precondition(lambda self: not self.done and self.sent)
    @rule(data=st.data(), code=st.sampled_from([0, 1, 2, 8, 11]))
    def reset_stream(self, data: st.DataObject, code: int) -> None:
        """The client resets one of its streams."""
        sid = data.draw(st.sampled_from(sorted(self.sent)), label="stream")
        if self._try(lambda: self.client.reset_stream(sid, code)):
            self.reset.add(sid)
            self.sending.discard(sid)

    @precondition(lambda self: not self.done)
    @rule(opaque=st.binary(min_size=8, max_size=8))
    def ping(self, opaque: bytes) -> None:
        """A PING the server must answer."""
        self._try(lambda: self.client.ping(opaque))

    # The client's own receive windows stay within 2**31 - 1 (h2 refuses anything else), so
    # its initial window and increments stay far below.
    @precondition(lambda self: not self.done and not self.unacked_settings)
    @rule(
        window=st.none() | st.sampled_from([0, 1, 1000, 65_535, 1 << 20, 1 << 24]),
        frame_size=st.none() | st.sampled_from([16_384, 65_536, (1 << 24) - 1]),
        table=st.none() | st.sampled_from([0, 100, 4096, 65_536]),
    )
    def settings(self, window: int | None, frame_size: int | None, table: int | None) -> None:
        """New settings: the initial window (0 stalls every response body), the largest frame
        the client takes, its HPACK table size."""
        new = {k: v for k, v in ((0x4, window), (0x5, frame_size), (0x1, table)) if v is not None}
        if new and self._try(lambda: self.client.update_settings(new)):
            self.unacked_settings += 1

    @precondition(lambda self: not self.done)
    @rule(data=st.data(), increment=st.sampled_from([1, 100, 65_535, 1 << 20]))
    def window_update(self, data: st.DataObject, increment: int) -> None:
        """More window for the server, on the connection or a stream."""
        sid = data.draw(st.sampled_from([0, *sorted(self.sent)]), label="stream")
        self._try(lambda: self.client.increment_flow_control_window(increment, sid or None))

    @precondition(lambda self: not self.done)
    @rule()
    def goaway(self) -> None:
        """The client says GOAWAY: the server finishes what is open, then closes."""
        if self._try(self.client.close_connection):
            self.done = True  # the h2 client takes no frames once it sent GOAWAY
            self._flush([])

    @rule(cuts=st.lists(st.integers(1, 4096), max_size=4))
    def flush(self, cuts: list[int]) -> None:
        """What the client queued goes to the server in some reads; the answer comes back."""
        self._flush(cuts)

    @invariant()
    def nothing_escaped(self) -> None:
        run = self.conv.run if self.conv is not None else None
        if run is not None and (run.escapes or run.hangs):
            self._fail("\n".join(run.escapes + run.hangs))

    def teardown(self) -> None:
        conv = self.conv
        if conv is None or self.broken:
            if conv is not None:
                conv.finish()
            return
        try:
            self._last_checks(conv)
        except AssertionError as e:
            e.add_note(f"replay: {conv.replay()}")
            raise
        finally:
            conv.finish()

    def _last_checks(self, conv: Conversation) -> None:
        if not self.done:
            self._flush([])
            # Whatever the settings, every response body may now flow.
            self._try(lambda: self.client.update_settings({0x4: 1 << 20}))
            self._try(lambda: self.client.increment_flow_control_window(1 << 24))
            self._flush([])
        if not self.done and conv.open:
            for sid, (_, _, ended) in self.sent.items():
                if ended and sid not in self.reset:
                    assert sid in self.answered, f"stream {sid}'s request got no answer"
        out = _checked(conv)
        origin = conv.run.origin
        assert origin is not None
        for r in origin.requests:
            sid = int(r.target.split(b"/")[1][1:])
            fields, body, _ = self.sent[sid]
            want = dict(fields)
            assert r.method == want[b":method"] and r.target == want[b":path"], (r, fields)
            assert r.header(b"host") == AUTHORITY, r.headers
            # The body as sent (what the client sent once the connection was gone, or past
            # its content-length, never arrived).
            assert bytes(body).startswith(r.body), f"stream {sid}: upstream got {r.body!r}"
            length = want.get(b"content-length")
            if r.complete and sid not in self.reset and sid not in out.resets:
                assert len(r.body) == int(length) if length else r.body == bytes(body), (
                    f"stream {sid}: upstream got {r.body!r} of {bytes(body)!r}"
                )


TestWellBehavedClient = WellBehavedClient.TestCase
TestWellBehavedClient.settings = fuzz_settings(150, stateful_step_count=30)


# -- frames by hand -------------------------------------------------------------------------


def _valid_request(marker: bytes, method: bytes) -> Fields:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":path", b"/m" + marker + b"/"),
        (b":authority", AUTHORITY),
        (b"x-fuzz", marker),
        (b"accept", b"*/*"),
    ]


def _set(fields: Fields, name: bytes, value: bytes) -> Fields:
    return [(n, value if n == name else v) for n, v in fields]


def _drop(fields: Fields, name: bytes) -> Fields:
    return [(n, v) for n, v in fields if n != name]


#: Ways to make a request malformed (RFC 9113 8.2, 8.2.1, 8.2.2, 8.3.1), one at a time.
MALFORMED: dict[str, Callable[[Fields], Fields]] = {
    "upper-case name": lambda f: [*f, (b"X-Upper", b"1")],
    "CRLF in a value": lambda f: [*f, (b"x-evil", b"a\r\nx-injected: 1")],
    "LF in a value": lambda f: [*f, (b"x-evil", b"a\nb")],
    "NUL in a value": lambda f: [*f, (b"x-evil", b"a\x00b")],
    "value starts with a space": lambda f: [*f, (b"x-evil", b" a")],
    "value ends with a tab": lambda f: [*f, (b"x-evil", b"a\t")],
    "connection": lambda f: [*f, (b"connection", b"keep-alive")],
    "transfer-encoding": lambda f: [*f, (b"transfer-encoding", b"chunked")],
    "upgrade": lambda f: [*f, (b"upgrade", b"h2c")],
    "keep-alive": lambda f: [*f, (b"keep-alive", b"timeout=5")],
    "proxy-connection": lambda f: [*f, (b"proxy-connection", b"close")],
    "te other than trailers": lambda f: [*f, (b"te", b"gzip")],
    "no :method": lambda f: _drop(f, b":method"),
    "no :scheme": lambda f: _drop(f, b":scheme"),
    "no :path": lambda f: _drop(f, b":path"),
    "repeated :path": lambda f: [f[0], f[2], *f[1:]],
    "pseudo after a regular field": lambda f: [*f[1:], f[0]],
    "unknown pseudo": lambda f: [(b":foo", b"x"), *f],
    "response pseudo": lambda f: [(b":status", b"200"), *f],
    "empty :path": lambda f: _set(f, b":path", b""),
    "relative :path": lambda f: _set(f, b":path", f[2][1][1:]),
    "space in :path": lambda f: _set(f, b":path", f[2][1] + b" HTTP/1.1"),
    "CRLF in :path": lambda f: _set(f, b":path", f[2][1] + b"\r\nHost: evil.test\r\n\r\n"),
    "DEL in :path": lambda f: _set(f, b":path", f[2][1] + b"\x7f"),
    "userinfo in :authority": lambda f: _set(f, b":authority", b"user@" + AUTHORITY),
    "path in :authority": lambda f: _set(f, b":authority", AUTHORITY + b"/x"),
    "space in :authority": lambda f: _set(f, b":authority", b"fuzz test"),
    "empty :authority": lambda f: _set(f, b":authority", b""),
    "host differs": lambda f: [*f, (b"host", b"other.test")],
    "two hosts": lambda f: [*f, (b"host", AUTHORITY), (b"host", AUTHORITY)],
    "content-length not a number": lambda f: [*f, (b"content-length", b"abc")],
    "negative content-length": lambda f: [*f, (b"content-length", b"-1")],
    "content-length list": lambda f: [*f, (b"content-length", b"1,1")],
    "content-lengths differ": lambda f: [*f, (b"content-length", b"3"), (b"content-length", b"4")],
    "empty name": lambda f: [*f, (b"", b"x")],
    "space in a name": lambda f: [*f, (b"x y", b"1")],
    "colon in a name": lambda f: [*f, (b"x:y", b"1")],
    "space in :method": lambda f: _set(f, b":method", b"GE T"),
    "empty :method": lambda f: _set(f, b":method", b""),
    ":path * for GET": lambda f: _set(_set(f, b":method", b"GET"), b":path", b"*"),
    "CONNECT with :path": lambda f: _set(f, b":method", b"CONNECT"),
}
#: A rule writes a frame that breaks the protocol when it draws 0 (or 1, 2 for other faults).
FAULT = st.integers(0, 15)
CUTS = st.lists(st.integers(1, 4096), max_size=4)


class HandMadeFrames(RuleBasedStateMachine):
    """A client that writes frames by hand: valid ones in any order, now and then one that
    breaks the protocol (``fault`` 0 of 0-15: a bad length, value, stream or padding), and
    header blocks broken in every way RFC 9113 calls malformed (stream errors: the connection
    goes on). Each rule may send what was written at once, in some reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv: Conversation | None = None
        self.encoder = Encoder()
        self.pending = bytearray()
        self.next_sid = 1
        self.opened: list[int] = []
        self.markers = 0
        #: Marker of each header block sent -> why it is malformed, or None.
        self.labels: dict[bytes, str | None] = {}
        self.blocks: dict[bytes, Fields] = {}
        self.broken = False

    @initialize(
        warm=st.integers(0, 2),
        start=st.sampled_from(["settings"] * 5 + ["empty", "empty", "bytes"]),
        junk=st.binary(max_size=12),
    )
    def start(self, warm: int, start: str, junk: bytes) -> None:
        self.conv = Conversation(warm=warm, h2=True)
        if start == "settings":
            self.pending += PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HL", 0x4, 1 << 16))
        elif start == "empty":
            self.pending += PREFACE + frame(SETTINGS, 0, 0)
        else:
            self.pending += PREFACE[: len(junk)] + junk

    def _sid(self, data: st.DataObject, how: str, fault: bool = False) -> int:
        if fault:
            return data.draw(st.sampled_from([0, 2, self.next_sid + 2, 0x7FFFFFFF]), label="stream")
        if how == "new" or not self.opened:
            sid = self.next_sid
            self.next_sid += 2
            return sid
        return data.draw(st.sampled_from(self.opened), label="stream")

    def _write(self, data: bytes, now: bool, cuts: list[int]) -> None:
        self.pending += data
        if now:
            self.flush(cuts)

    @rule(
        data=st.data(),
        how=st.sampled_from(("new", "new", "open")),
        fault=FAULT,
        broken=st.none() | st.sampled_from(sorted(MALFORMED)),
        method=st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS"]),
        length=st.none() | st.integers(0, 20),
        end=st.booleans(),
        huffman=st.booleans(),
        pieces=st.integers(1, 3),
        pad=st.none() | st.integers(0, 8),
        priority=st.none() | st.integers(0, 9),
        now=st.booleans(),
        cuts=CUTS,
    )
    def headers(
        self,
        data: st.DataObject,
        how: str,
        fault: int,
        broken: str | None,
        method: bytes,
        length: int | None,
        end: bool,
        huffman: bool,
        pieces: int,
        pad: int | None,
        priority: int | None,
        now: bool,
        cuts: list[int],
    ) -> None:
        """A request's header block (valid, or malformed one way) in HEADERS and
        CONTINUATION frames, maybe padded, maybe with a priority (on itself: a stream error);
        with a fault, on a stream no request may use or left unfinished."""
        if how == "open" and self.opened and not fault:
            # Trailers: the end of a body (malformed if broken, or the stream is over).
            sid = self._sid(data, "open")
            block = self.encoder.encode(
                [(b"x-trailer", b"1")] if broken is None else [(b":path", b"/t")], huffman=huffman
            )
            self._write(frame(HEADERS, END_HEADERS | END_STREAM, sid, block), now, cuts)
            return
        sid = self._sid(data, "new", fault == 0)
        self.markers += 1
        marker = b"%d" % self.markers
        fields = _valid_request(marker, method)
        if length is not None:
            fields.append((b"content-length", b"%d" % length))
        why = None
        if broken is not None:
            fields = MALFORMED[broken](fields)
            why = broken
        elif end and length:
            why = "content-length with END_STREAM"
        self.labels[marker] = why
        self.blocks[marker] = fields
        block = self.encoder.encode(fields, huffman=huffman)
        size = max(1, -(-len(block) // pieces))
        parts = [block[i : i + size] for i in range(0, len(block), size)] or [b""]
        first = parts[0]
        flags = END_STREAM if end else 0
        if priority is not None:
            first = struct.pack(">LB", sid if priority == 0 else priority, 16) + first
            flags |= PRIORITY_FLAG
        if pad is not None:
            first = bytes([pad]) + first + b"\0" * pad
            flags |= PADDED
        if len(parts) == 1:
            flags |= END_HEADERS
        out = frame(HEADERS, flags, sid, first)
        for i, part in enumerate(parts[1:], 2):
            if i == len(parts) and fault == 1:
                break  # unfinished: whatever comes next is a connection error
            out += frame(CONTINUATION, END_HEADERS if i == len(parts) else 0, sid, part)
        if not fault:
            self.opened.append(sid)
        self._write(out, now, cuts)

    @rule(
        data=st.data(),
        fault=FAULT,
        payload=st.binary(max_size=64),
        end=st.booleans(),
        pad=st.none() | st.integers(0, 8),
        now=st.booleans(),
        cuts=CUTS,
    )
    def body(
        self,
        data: st.DataObject,
        fault: int,
        payload: bytes,
        end: bool,
        pad: int | None,
        now: bool,
        cuts: list[int],
    ) -> None:
        """DATA on a stream that was opened, maybe padded; with a fault, on a stream not
        opened, or with padding longer than the frame."""
        if not self.opened and fault:
            return
        sid = self._sid(data, "open", fault == 0)
        flags = END_STREAM if end else 0
        if pad is not None or fault == 1:
            pad = len(payload) + 1 if fault == 1 else pad or 0
            payload = bytes([pad]) + payload + b"\0" * (pad if fault != 1 else 0)
            flags |= PADDED
        self._write(frame(DATA, flags, sid, payload), now, cuts)

    @rule(
        fault=FAULT,
        window=st.none() | st.sampled_from([0, 1, 100, 65_535, 1 << 20, (1 << 31) - 1]),
        frame_size=st.none() | st.sampled_from([16_384, 1 << 20, (1 << 24) - 1]),
        table=st.none() | st.sampled_from([0, 100, 4096]),
        other=st.lists(
            st.tuples(
                st.sampled_from([0x2, 0x3, 0x6, 0x8, 0x9, 0xFF]),
                st.sampled_from([0, 1, 100, 1 << 16]),
            ),
            max_size=2,
        ),
        ack=st.booleans(),
        now=st.booleans(),
        cuts=CUTS,
    )
    def settings(
        self,
        fault: int,
        window: int | None,
        frame_size: int | None,
        table: int | None,
        other: list[tuple[int, int]],
        ack: bool,
        now: bool,
        cuts: list[int],
    ) -> None:
        """SETTINGS (any known setting with a valid value, unknown ones), or its ACK; with a
        fault, a value out of range or a length not a multiple of 6."""
        pairs = [
            (k, v) for k, v in ((0x4, window), (0x5, frame_size), (0x1, table)) if v is not None
        ] + [(k, v) for k, v in other if k != 0x2 or v < 2]
        if fault == 0:
            pairs.append(((0x4, 1 << 31), (0x5, 100), (0x2, 2))[len(pairs) % 3])
        payload = b"".join(struct.pack(">HL", k, v) for k, v in pairs)
        if fault == 1:
            payload += b"\0"
        if ack:
            self._write(frame(SETTINGS, ACK, 0, payload if fault < 2 else b""), now, cuts)
        else:
            self._write(frame(SETTINGS, 0, 0, payload), now, cuts)

    @rule(
        data=st.data(),
        fault=FAULT,
        connection=st.booleans(),
        increment=st.sampled_from([1, 100, 65_535, 1 << 20]),
        now=st.booleans(),
        cuts=CUTS,
    )
    def window_update(
        self,
        data: st.DataObject,
        fault: int,
        connection: bool,
        increment: int,
        now: bool,
        cuts: list[int],
    ) -> None:
        """WINDOW_UPDATE on the connection or an opened stream; with a fault, of 0, so large
        the window passes 2**31 - 1, or of a bad length."""
        sid = 0 if connection or not self.opened else self._sid(data, "open")
        if fault == 0:
            increment = (0, (1 << 31) - 1)[sid % 2]
        payload = struct.pack(">L", increment) + (b"\0" if fault == 1 else b"")
        self._write(frame(WINDOW_UPDATE, 0, sid, payload), now, cuts)

    @rule(data=st.data(), fault=FAULT, code=st.integers(0, 14), now=st.booleans(), cuts=CUTS)
    def rst_stream(
        self, data: st.DataObject, fault: int, code: int, now: bool, cuts: list[int]
    ) -> None:
        """RST_STREAM on an opened stream; with a fault, on another, or of a bad length."""
        if not self.opened and fault:
            return
        sid = self._sid(data, "open", fault == 0)
        payload = struct.pack(">L", code)[: 3 if fault == 1 else 4]
        self._write(frame(RST_STREAM, 0, sid, payload), now, cuts)

    @rule(
        fault=FAULT,
        opaque=st.binary(min_size=8, max_size=8),
        ack=st.booleans(),
        now=st.booleans(),
        cuts=CUTS,
    )
    def ping(self, fault: int, opaque: bytes, ack: bool, now: bool, cuts: list[int]) -> None:
        """PING, maybe an ACK; with a fault, on a stream or of a bad length."""
        payload = opaque[:7] if fault == 1 else opaque
        self._write(frame(PING, ACK if ack else 0, 1 if fault == 0 else 0, payload), now, cuts)

    @rule(fault=FAULT, code=st.sampled_from([0, 0, 2, 11]), now=st.booleans(), cuts=CUTS)
    def goaway(self, fault: int, code: int, now: bool, cuts: list[int]) -> None:
        """GOAWAY (the server finishes the open streams, then closes); with a fault, too
        short or on a stream."""
        payload = struct.pack(">LL", self.next_sid - 2 if self.next_sid > 1 else 0, code)
        self._write(
            frame(GOAWAY, 0, 1 if fault == 0 else 0, payload[: 7 if fault == 1 else 8]), now, cuts
        )

    @rule(
        data=st.data(),
        fault=FAULT,
        how=st.sampled_from(("open", "new")),
        dep=st.integers(0, 9),
        now=st.booleans(),
        cuts=CUTS,
    )
    def priority(
        self, data: st.DataObject, fault: int, how: str, dep: int, now: bool, cuts: list[int]
    ) -> None:
        """PRIORITY (ignored; on a new stream, it stays idle); with a fault, on itself, on
        the connection or of a bad length (stream errors, but on 0)."""
        sid = 0 if fault == 0 else self.next_sid if how == "new" else self._sid(data, how)
        payload = struct.pack(">LB", sid if fault == 1 else dep, 1)
        self._write(frame(PRIORITY, 0, sid, payload[: 4 if fault == 2 else 5]), now, cuts)

    @rule(
        fault=FAULT,
        ftype=st.sampled_from([0xA, 0xB, 0xFF]),
        flags=st.integers(0, 255),
        sid=st.integers(0, 9),
        payload=st.binary(max_size=16),
        now=st.booleans(),
        cuts=CUTS,
    )
    def odd_frame(
        self,
        fault: int,
        ftype: int,
        flags: int,
        sid: int,
        payload: bytes,
        now: bool,
        cuts: list[int],
    ) -> None:
        """A frame of an unknown type (ignored); with a fault, one a server never takes:
        PUSH_PROMISE, a stray CONTINUATION."""
        if fault < 2:
            ftype = (PUSH_PROMISE, CONTINUATION)[fault]
        self._write(frame(ftype, flags, sid, payload), now, cuts)

    @rule(fault=FAULT, junk=st.binary(min_size=1, max_size=24), now=st.booleans(), cuts=CUTS)
    def junk(self, fault: int, junk: bytes, now: bool, cuts: list[int]) -> None:
        """With a fault, bytes that are no frame (or the start of one); else an unknown
        frame that carries them."""
        self._write(junk if fault == 0 else frame(0xFA, 0, 0, junk), now, cuts)

    @rule(cuts=CUTS)
    def flush(self, cuts: list[int]) -> None:
        """What was written goes to the server in some reads."""
        assert self.conv is not None
        data, self.pending = bytes(self.pending), bytearray()
        if data:
            self.conv.send(split(data, cuts))

    @invariant()
    def nothing_escaped(self) -> None:
        run = self.conv.run if self.conv is not None else None
        if run is not None and (run.escapes or run.hangs):
            self.broken = True
            e = AssertionError("\n".join(run.escapes + run.hangs))
            e.add_note(f"replay: {self.conv.replay()}")  # type: ignore[union-attr]
            raise e

    def teardown(self) -> None:
        conv = self.conv
        if conv is None or self.broken:
            if conv is not None:
                conv.finish()
            return
        try:
            self.flush([])
            self._last_checks(conv)
        except AssertionError as e:
            e.add_note(f"replay: {conv.replay()}")
            raise
        finally:
            conv.finish()

    def _last_checks(self, conv: Conversation) -> None:
        _checked(conv)
        origin = conv.run.origin
        assert origin is not None
        for marker, why in self.labels.items():
            got = _upstream_by_marker(origin.requests, marker)
            if why is not None:
                assert not got, f"a request with {why} reached the upstream: {got}"
            for r in got:
                want = dict(self.blocks[marker])
                assert r.method == want[b":method"] and r.target == want[b":path"], (r, want)
        for r in origin.requests:
            assert r.header(b"x-fuzz") in self.labels, f"a request nobody sent went up: {r}"


TestHandMadeFrames = HandMadeFrames.TestCase
TestHandMadeFrames.settings = fuzz_settings(200, stateful_step_count=40)
