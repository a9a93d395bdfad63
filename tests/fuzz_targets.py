"""Fuzzing harnesses for the two parsers that face clients: the HTTP/1.1 request path
(:class:`~worker.h1_server.H1Server`) and the HTTP/2 server (:class:`~worker.h2_server.H2Server`
over worker/h2_codec.py), each wired to a real :class:`~worker.proxy.Engine`.

Theory of operation. One run is one client connection: a server protocol on a
:class:`ClientTransport` (what asyncio's transport looks like to the protocol, recording what
the client receives and honouring ``pause_reading``), fed byte chunks in order. The engine's
"upstream side" is an :class:`Origin`: the engine's ``connect`` is replaced by one that makes an
:class:`~worker.upstream.UpstreamConn` on an :class:`OriginConn` transport, which parses what
the proxy writes with httptools, tags each write with the session it was written for, and
answers every complete request with a small 200. So everything between the client's bytes and
the upstream's is the production code, and nothing touches a socket.

The loop is asyncio's pure-Python one, on purpose: the harness needs to know when nothing is
runnable any more (its ``_ready`` queue is empty), which is how "no hang" is decided: after
each chunk, and at the end, the loop must fall idle within :data:`MAX_TURNS` turns, and once
idle the connection must be closed or plainly waiting for the client.

:func:`check_h1` and :func:`check_h2` are the properties, raising ``AssertionError``: no
exception escaped a protocol callback or reached the loop's exception handler or the error log;
the loop fell idle; what the client got is well-formed (responses that httptools parses, or
HTTP/2 frames and header blocks in a valid order); the upstream parsed every byte sent to it as
HTTP/1.1, and each request it parsed belongs to exactly one client request, with the method and
target the proxy parsed, one Host, one framing field, no hop-by-hop field; a request the proxy
refused with a 4xx never reached the upstream whole (with ``strict``, when it came in one read:
not one byte of it); after the client goes, no request is left counted or in flight. A bug
listed in :data:`KNOWN_BUGS` (none now) makes them raise :class:`KnownBug` instead, so that the
fuzzers look past it.

The same module is the atheris entry point (``scripts/fuzz``): ``python tests/fuzz_targets.py
h1|h2 [libFuzzer options] [corpus dirs]``, and ``--seeds DIR`` writes the seed inputs. It lives
in tests/ because it is test support (not shipped with the packages), and one module keeps the
properties of the suite and of the long runs the same.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import struct
import sys
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
from hpack import Decoder as HpackDecoder
from hpack import Encoder as HpackEncoder
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

from shared.app import ProxyHttp
from shared.config import Config, from_mapping
from shared.errors import ErrorKind
from shared.peer import HttpPeer
from shared.session import Session
from worker.client.h1 import UpstreamConn
from worker.h2.codec import PREFACE
from worker.proxy.engine import Engine
from worker.server.h1 import H1Server
from worker.server.h2 import H2Server

ROOT = Path(__file__).resolve().parent.parent
#: The request corpus (tests/requests/README.md): the seeds of the HTTP/1.1 fuzzers.
CORPUS = ROOT / "tests" / "requests"
#: Loop turns the harness waits for the loop to fall idle before it calls it a hang.
MAX_TURNS = 400
#: Limits small enough for the fuzzers to cross them.
MAX_HEADER_BYTES = 2048
MAX_BODY_BYTES = 512
#: The peer every request goes to (never connected to: the Origin stands in for it).
PEER = HttpPeer("192.0.2.10:8080")
CLIENT_ADDR = ("198.51.100.7", 40000)
SERVER_ADDR = ("192.0.2.1", 8080)


def load_request(path: Path) -> bytes:
    """The bytes of a corpus ``.http`` file: real line breaks dropped, escapes decoded."""
    raw = path.read_bytes().replace(b"\r", b"").replace(b"\n", b"")
    return bytes(codecs.escape_decode(raw)[0])


def corpus() -> list[bytes]:
    """Every request of tests/requests, in name order."""
    return [load_request(p) for p in sorted(CORPUS.glob("*.http"))]


class FuzzApp(ProxyHttp):
    """Sends every request to :data:`PEER`."""

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        """Always :data:`PEER`."""
        return PEER


_config: Config | None = None


def config() -> Config:
    """The config of every run (built once): the defaults, with limits small enough to
    cross."""
    global _config
    if _config is None:
        _config = from_mapping(
            {
                "app": "fuzz_targets:FuzzApp",
                "limits": {"max_header_bytes": MAX_HEADER_BYTES, "max_body_bytes": MAX_BODY_BYTES},
            },
            "fuzz",
        )
    return _config


# -- recording ----------------------------------------------------------------------------


class _ErrorLog(logging.Filter):
    """Keeps the engine's ERROR records (an app error or a parser callback that failed) and
    lets no record through: the engine's logger needs no handler."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


_log = logging.getLogger("tenaya.fuzz")
_log.propagate = False
_log.setLevel(logging.ERROR)
_errors = _ErrorLog()
_log.addFilter(_errors)


@dataclass
class UpstreamRequest:
    """One request as the origin parsed it from what the proxy wrote."""

    conn: int
    """Which upstream connection (in the order they were made) carried it."""
    method: bytes = b""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    """The origin read it to its end (and answered it)."""
    sessions: list[Any] = field(default_factory=list)
    """The sessions whose writes carried its bytes (one, unless requests got mixed)."""

    def header(self, name: bytes) -> bytes | None:
        """The first value of a field, by case-insensitive name."""
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


def _soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """``loop.call_soon``, unless the run is over (a coroutine finalized after its loop closed
    may still close a transport)."""
    if not loop.is_closed():
        loop.call_soon(fn, *args)


class ClientTransport:
    """The client's end of a downstream connection, as the server protocol sees its transport.

    Writes after ``close`` are dropped, as asyncio's and uvloop's transports drop them once the
    close is under way; ``connection_lost`` comes a loop turn after ``close``.
    """

    def __init__(self, run: Run, protocol: asyncio.Protocol) -> None:
        self.run = run
        self.loop = asyncio.get_running_loop()
        self.protocol = protocol
        self.received = bytearray()
        self.closing = False
        self.lost = False
        self.paused = False
        self.writes_after_close = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": CLIENT_ADDR, "sockname": SERVER_ADDR}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            self.writes_after_close += 1
            return
        self.received += data

    def writelines(self, parts: Iterable[bytes]) -> None:
        for p in parts:
            self.write(p)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            _soon(self.loop, self._lose, None)

    abort = close

    def _lose(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(exc)

    def client_gone(self) -> None:
        """The client closes its end: the protocol hears ``connection_lost`` (once)."""
        self.closing = True
        if not self.lost:
            self.lost = True
            self.run.call("connection_lost", self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_reading(self) -> bool:
        return not self.paused

    def set_protocol(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.Protocol:
        return self.protocol

    def get_write_buffer_size(self) -> int:
        return 0


class OriginConn:
    """The transport of one upstream connection, and the origin server at its far end."""

    def __init__(self, origin: Origin, up: UpstreamConn) -> None:
        self.origin = origin
        self.up = up
        self.loop = asyncio.get_running_loop()
        self.index = len(origin.conns)
        origin.conns.append(self)
        self.parser = httptools.HttpRequestParser(self)
        self.requests: list[UpstreamRequest] = []
        self.current: UpstreamRequest | None = None
        self.tag: Any = None
        self.closed = False
        self.paused = False
        self.waiting: list[bytes] = []
        self.parse_error: str | None = None
        self.upgraded = False
        #: Every byte the proxy wrote on this connection.
        self.sent = bytearray()
        #: The origin closes the connection once its replies are out.
        self.closing_after = False

    # -- the transport ----------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (PEER.host, PEER.port)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        handler = self.up.handler
        self.tag = handler.active if handler is not None else None
        self.sent += data
        if self.parse_error is not None or self.upgraded:
            self.origin.stray.append(bytes(data))
            return
        if self.current is not None and self.tag not in self.current.sessions:
            self.current.sessions.append(self.tag)
        try:
            self.parser.feed_data(bytes(data))
        except httptools.HttpParserUpgrade:
            # The proxy asked for an upgrade; this origin answers 200 instead, and what
            # follows is not HTTP.
            self.upgraded = True
        except httptools.HttpParserError as e:
            # Found out (the check fails on it); answered as an origin would, 400 and close.
            self.parse_error = f"{type(e).__name__}: {e}"
            self.origin.parse_errors.append((self.index, self.parse_error, bytes(self.sent)))
            self.current = None
            self.closing_after = True
            _soon(
                self.loop,
                self._deliver,
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )

    def writelines(self, parts: Iterable[bytes]) -> None:
        self.write(b"".join(parts))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _soon(
                self.loop,
                self.origin.run.call,
                "upstream connection_lost",
                self.up.connection_lost,
                None,
            )

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            if self.waiting:
                _soon(self.loop, self._deliver, b"")

    def get_write_buffer_size(self) -> int:
        return 0

    # -- the origin's parser ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = UpstreamRequest(self.index, sessions=[self.tag])
        self.requests.append(self.current)
        self.origin.requests.append(self.current)

    def on_url(self, url: bytes) -> None:
        self.current.target += url  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method()  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.current.body += body  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        req = self.current
        self.current = None
        if req is None:
            return
        req.complete = True
        origin = self.origin
        origin.answered += 1
        body = b"origin %d" % origin.answered
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Origin-Seq: %d\r\n\r\n" % (
            len(body),
            origin.answered,
        )
        reply = head if req.method == b"HEAD" else head + body
        _soon(self.loop, self._deliver, reply)

    def _deliver(self, reply: bytes) -> None:
        if reply:
            self.waiting.append(reply)
        if self.closed or self.paused or not self.waiting:
            return
        data = b"".join(self.waiting)
        self.waiting.clear()
        self.origin.run.call("upstream data_received", self.up.data_received, data)
        if self.closing_after:
            self.close()


class Origin:
    """The upstream side of a run: its connections and every request they carried."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.conns: list[OriginConn] = []
        self.requests: list[UpstreamRequest] = []
        self.parse_errors: list[tuple[int, str, bytes]] = []
        #: Bytes written after the origin stopped parsing (past an error or an upgrade).
        self.stray: list[bytes] = []
        self.answered = 0

    def connection(self, engine: Engine) -> UpstreamConn:
        """A new upstream connection to :data:`PEER`, on this origin."""
        up = UpstreamConn(PEER.pool_key, engine.pool)
        up.connection_made(OriginConn(self, up))  # type: ignore[arg-type]
        return up

    def requests_of(self, s: Any) -> list[UpstreamRequest]:
        """The upstream requests any byte of which was written for session ``s``."""
        return [r for r in self.requests if any(t is s for t in r.sessions)]


# -- one run ----------------------------------------------------------------------------


@dataclass
class Run:
    """What one connection's run left behind, for the checks."""

    strict: bool = False
    """Every request came in the read that ended its head (so none may reach the upstream
    before it is known to be whole)."""
    escapes: list[str] = field(default_factory=list)
    """Exceptions out of protocol callbacks, the loop's exception handler and the error log."""
    hangs: list[str] = field(default_factory=list)
    """Where the loop did not fall idle, or fell idle with the connection stuck."""
    sessions: list[Session] = field(default_factory=list)
    """Every session the engine finished, in order."""
    leaks: list[str] = field(default_factory=list)
    """What the engine still counted once the client had gone."""
    transport: ClientTransport | None = None
    origin: Origin | None = None
    engine: Engine | None = None
    h2: bool = False

    def call(self, what: str, fn: Any, *args: Any) -> Any:
        """Calls a protocol callback as the loop would; an exception out of it is recorded."""
        try:
            return fn(*args)
        except Exception as e:  # any exception escaping is the finding
            self.escapes.append(f"{what}: {type(e).__name__}: {e}")
            return None

    def exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.escapes.append(f"loop: {context.get('message')}: {exc!r}")

    @property
    def received(self) -> bytes:
        """What the client got."""
        return bytes(self.transport.received) if self.transport is not None else b""


def _build(run: Run, warm: int) -> Engine:
    engine = Engine(FuzzApp(), config(), None, _log)
    origin = run.origin = Origin(run)
    run.engine = engine

    async def connect(peer: HttpPeer) -> UpstreamConn:
        await asyncio.sleep(0)  # a new connection takes a loop turn or more
        engine.pool.created += 1
        return origin.connection(engine)

    engine.connect = connect
    done = engine.request_done

    def request_done(s: Session) -> None:
        run.sessions.append(s)
        done(s)

    engine.request_done = request_done  # type: ignore[method-assign]
    for _ in range(warm):
        engine.pool.put(origin.connection(engine))
    return engine


async def _settle(run: Run, where: str) -> bool:
    """Runs the loop until nothing is runnable; False (a hang recorded) past MAX_TURNS."""
    loop = asyncio.get_running_loop()
    for _ in range(MAX_TURNS):
        await asyncio.sleep(0)
        if not loop._ready:  # type: ignore[attr-defined]
            return True
    run.hangs.append(f"loop still busy after {MAX_TURNS} turns ({where})")
    return False


def _waiting_for_client(run: Run) -> str | None:
    """Why an idle, open connection is stuck, or None when it plainly waits for the client."""
    t = run.transport
    assert t is not None
    p = t.protocol
    if t.closing:
        return None
    if isinstance(p, H1Server):
        if t.paused:
            return "reading paused with nothing in flight"
        if p.pipeline:
            return f"{len(p.pipeline)} pipelined requests wait with nothing in flight"
        s = p.active
        if s is not None and (s.body_done or not s.has_body):
            return f"{s!r} is whole but unanswered"
        return None
    if isinstance(p, H2Server):
        if t.paused:
            return "reading paused with nothing in flight"
        for sid, stream in p.streams.items():
            s = stream.active
            if s is not None and s.body_done and not s.response_started:
                return f"stream {sid}: the request is whole but unanswered"
        return None
    return f"unknown protocol {p!r}"


class Conversation:
    """One client connection served step by step: :meth:`send` some reads, :meth:`take` what
    the client got since, :meth:`finish` to have the client wait and go. Each step runs the
    loop until it falls idle. The engine is new, its pool holding ``warm`` idle upstream
    connections; ``h2`` speaks HTTP/2 from the first byte (else HTTP/1.1, which switches on
    the h2c preface)."""

    def __init__(self, *, warm: int = 0, h2: bool = False, strict: bool = False) -> None:
        self.run = Run(strict=strict, h2=h2)
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self.run.exception_handler)
        self.warm = warm
        self.taken = 0
        self.ended = False
        #: Every read delivered so far (what replays the run: see :meth:`replay`).
        self.reads: list[bytes] = []
        _errors.records.clear()
        self.loop.run_until_complete(self._open(warm, h2))

    async def _open(self, warm: int, h2: bool) -> None:
        run = self.run
        engine = _build(run, warm)
        proto: asyncio.Protocol = H2Server(engine) if h2 else H1Server(engine)
        t = run.transport = ClientTransport(run, proto)
        run.call("connection_made", proto.connection_made, t)
        await _settle(run, "after connection_made")

    @property
    def open(self) -> bool:
        """The connection still takes reads (not closed, no hang or escape so far)."""
        t = self.run.transport
        return (
            not self.ended
            and t is not None
            and not t.closing
            and not self.run.hangs
            and not self.run.escapes
        )

    def send(self, chunks: Iterable[bytes]) -> bool:
        """Delivers ``chunks``, one ``data_received`` each, as a transport would: not while
        reading is paused, none once closed; returns :attr:`open`."""
        if self.open:
            chunks = list(chunks)
            self.reads += chunks
            self.loop.run_until_complete(self._send(chunks))
        return self.open

    def replay(self) -> str:
        """The call that serves the same reads again (for a failure's report)."""
        h2 = ", h2=True" if self.run.h2 else ""
        return f"run_connection({self.reads!r}, warm={self.warm}{h2})"

    async def _send(self, chunks: list[bytes]) -> None:
        run = self.run
        t = run.transport
        assert t is not None
        for i, chunk in enumerate(chunks):
            if t.closing:
                return
            if t.paused:
                run.hangs.append(f"before read {i}: {_waiting_for_client(run) or 'paused'}")
                return
            run.call("data_received", t.protocol.data_received, chunk)
            if not await _settle(run, f"after read {i}"):
                return
        why = _waiting_for_client(run)
        if why is not None:
            run.hangs.append(f"after the reads: {why}")

    def take(self) -> bytes:
        """What the client got since the last call."""
        data = self.run.received
        new, self.taken = data[self.taken :], len(data)
        return new

    def finish(self, timeout: bool = True) -> Run:
        """The client sends nothing more (with ``timeout``, the sweeper's checks run far past
        every limit), then goes; the loop is closed. Returns the run."""
        if not self.ended:
            self.ended = True
            try:
                self.loop.run_until_complete(self._finish(timeout))
            finally:
                self.loop.run_until_complete(asyncio.sleep(0))
                self.loop.close()
            for r in _errors.records:
                self.run.escapes.append(
                    f"error log: {r.getMessage()}: {r.exc_info and r.exc_info[1]!r}"
                )
        return self.run

    async def _finish(self, timeout: bool) -> None:
        run = self.run
        t, engine = run.transport, run.engine
        assert t is not None and engine is not None
        p: Any = t.protocol
        if timeout and not t.closing and not run.hangs:
            now = p.last_active + 3600.0
            run.call("idle_check", p.idle_check, now, engine.keepalive, 1.0)
            if not await _settle(run, "after idle_check"):
                return
        t.client_gone()
        if not await _settle(run, "after the client went"):
            return
        if engine.active_requests:
            run.leaks.append(f"{engine.active_requests} requests still counted active")
        if engine.connections:
            run.leaks.append(f"{len(engine.connections)} connections still counted")
        if engine.pool.busy:
            run.leaks.append(f"{len(engine.pool.busy)} upstream connections still busy")


def run_connection(
    chunks: Sequence[bytes],
    *,
    warm: int = 0,
    h2: bool = False,
    timeout: bool = True,
    strict: bool = False,
) -> Run:
    """Serves one client connection that sends ``chunks`` (one ``data_received`` each), then
    waits and goes (see :class:`Conversation`). Returns what happened."""
    conv = Conversation(warm=warm, h2=h2, strict=strict)
    conv.send(chunks)
    return conv.finish(timeout)


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length, duplicates ignored)."""
    if not data:
        return [data]
    points = sorted({c % len(data) for c in cuts} - {0})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# -- HTTP/1.1 checks ----------------------------------------------------------------------


@dataclass
class Response:
    """One response the client got."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class _ResponseHead:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.head_done = False
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def parse_responses(data: bytes, methods: Sequence[bytes], closed: bool) -> list[Response]:
    """The responses in ``data`` (answers to requests of ``methods``, in order), each parsed
    by httptools; raises AssertionError for bytes that are not well-formed responses. A
    response without a length may run to the end when the connection ``closed``."""
    out: list[Response] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        assert end >= 0, f"an incomplete response head at {pos}: {data[pos : pos + 200]!r}"
        end += 4
        rec = _ResponseHead()
        parser = httptools.HttpResponseParser(rec)
        try:
            parser.feed_data(data[pos:end])
        except httptools.HttpParserError as e:
            raise AssertionError(
                f"a malformed response head at {pos}: {e}: {data[pos:end]!r}"
            ) from None
        assert rec.head_done, f"a response head the parser did not finish: {data[pos:end]!r}"
        status = parser.get_status_code()
        method = methods[len(out)] if len(out) < len(methods) else b"?"
        pos = end
        if status < 200:
            assert status == 100, f"an interim response {status}"
            continue
        lengths = [v for n, v in rec.headers if n.lower() == b"content-length"]
        chunked = any(n.lower() == b"transfer-encoding" for n, _ in rec.headers)
        assert len(lengths) <= 1, f"several Content-Length fields: {rec.headers}"
        if method == b"HEAD" or status in (204, 304) or rec.done:
            body = b""
        elif lengths:
            n = int(lengths[0])
            body = data[pos : pos + n]
            assert len(body) == n or closed, f"a body cut short: {data[pos - 200 :]!r}"
            pos += n
        elif chunked:
            # Byte at a time, to find where the chunked body ends.
            while not rec.done and pos < len(data):
                parser.feed_data(data[pos : pos + 1])
                pos += 1
            assert rec.done or closed, "a chunked body cut short"
            body = rec.body
        else:
            assert closed, f"a response without framing on an open connection: {rec.headers}"
            body, pos = data[pos:], len(data)
        out.append(Response(status, rec.headers, body))
    return out


class KnownBug(AssertionError):
    """A run showed only bugs listed in :data:`KNOWN_BUGS`: the fuzz tests skip such inputs."""


#: Bugs these fuzzers found that are not fixed yet: name -> what it is. A check that sees one of
#: them (and nothing else wrong) raises :class:`KnownBug` rather than failing, so the fuzzers
#: keep looking for new ones; each has a strict xfail reproducer in tests/unit/test_fuzz_*.py,
#: which fails once the bug is fixed: then delete its entry here.
KNOWN_BUGS: dict[str, str] = {}
#: Fields that never go upstream on their own (hop-by-hop, RFC 9110 7.6.1): the proxy frames
#: the request itself, and adds Connection and Upgrade only for an upgrade.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)

#: Fields the proxy writes itself (so a client naming them in Connection does not drop them):
#: the framing, the X-Forwarded-* fields, and Host, which it keeps.
_ADDED_BY_PROXY = frozenset(
    {
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"content-length",
        b"transfer-encoding",
    }
)


class Findings:
    """The properties a run broke, and the known bugs it showed."""

    def __init__(self, tolerate: Collection[str]) -> None:
        self.tolerate = tolerate
        self.failures: list[str] = []
        self.known: list[str] = []

    def expect(self, ok: bool, what: str, bug: str | None = None) -> None:
        """Notes ``what`` unless ``ok``: as the known bug ``bug`` when tolerated."""
        if ok:
            return
        if bug is not None and bug in self.tolerate:
            self.known.append(f"[{bug}] {what}")
        else:
            self.failures.append(what if bug is None else f"[{bug}] {what}")

    def raise_if_any(self) -> None:
        """Raises AssertionError for failures, :class:`KnownBug` when only known bugs showed."""
        if self.failures:
            raise AssertionError("\n".join(self.failures + self.known))
        if self.known:
            raise KnownBug("\n".join(self.known))


def _common_checks(run: Run, f: Findings) -> None:
    f.expect(not run.escapes, "exceptions escaped:\n" + "\n".join(run.escapes))
    f.expect(not run.hangs, "hang: " + "; ".join(run.hangs))
    f.expect(not run.leaks, "left behind: " + "; ".join(run.leaks))
    origin = run.origin
    assert origin is not None
    f.expect(
        not origin.parse_errors, f"the upstream could not parse what it got: {origin.parse_errors}"
    )
    for r in origin.requests:
        tags = [t for t in r.sessions if t is not None]
        if len(tags) != 1 or len(r.sessions) != 1:
            f.expect(False, f"one upstream request carries bytes of {len(r.sessions)} sessions")
            continue
        s = tags[0]
        if not r.method:
            continue  # the head did not arrive whole
        f.expect(r.method == s.method, f"upstream got {r.method!r}, the proxy parsed {s.method!r}")
        f.expect(r.target == s.url, f"upstream got {r.target!r}, the proxy parsed {s.url!r}")
        names = [n.lower() for n, _ in r.headers]
        tokens = set(s.conn_tokens or ())
        f.expect(
            names.count(b"host") == 1, f"upstream got {names.count(b'host')} Host fields for {s!r}"
        )
        framing = [n for n in names if n in (b"content-length", b"transfer-encoding")]
        f.expect(len(framing) <= 1, f"upstream got framing fields {framing} for {s!r}")
        upgrade = s.upgrade is not None
        for n in names:
            f.expect(
                n not in _HOP_BY_HOP or (upgrade and n in (b"connection", b"upgrade")),
                f"the hop-by-hop field {n!r} went upstream for {s!r}",
            )
            f.expect(
                n not in tokens or n in _ADDED_BY_PROXY,
                f"{n!r}, named in Connection, went upstream for {s!r}",
            )
    for s in run.sessions:
        status = s.status if s.response_started else 0
        f.expect(status < 500, f"{s!r} got {status} ({s.error}) though the upstream never fails")
        sent = origin.requests_of(s)
        if sent:
            f.expect(
                s.version in ("1.0", "1.1", "2"),
                f"an HTTP/{s.version} request went upstream as HTTP/1.1: {s!r}",
            )
        if (
            400 <= status < 500
            and s.error is not None
            and s.error.kind is not ErrorKind.DOWNSTREAM_CLOSED
        ):  # refused by the proxy
            if run.strict:
                f.expect(not sent, f"{s!r} got {status} ({s.error}) but reached the upstream")
            f.expect(
                not [r for r in sent if r.complete],
                f"{s!r} got {status} ({s.error}) but reached the upstream whole",
            )
        whole = [r for r in sent if r.complete]
        f.expect(len(whole) <= 1 + s.retries, f"{s!r} went upstream whole {len(whole)} times")


def check_h1(run: Run, tolerate: Collection[str] = KNOWN_BUGS) -> list[Response]:
    """The properties of an HTTP/1.1 run (see the module docstring); returns the responses.
    Raises AssertionError, or :class:`KnownBug` when only bugs in ``tolerate`` showed."""
    f = Findings(tolerate)
    _common_checks(run, f)
    t = run.transport
    assert t is not None
    answered = [s for s in run.sessions if s.response_started]
    responses: list[Response] = []
    try:
        responses = parse_responses(run.received, [s.method for s in answered], t.closing)
    except AssertionError as e:
        f.expect(False, str(e))
    f.expect(
        len(responses) <= len(answered),
        f"{len(responses)} responses for {len(answered)} requests answered",
    )
    for i, (r, s) in enumerate(zip(responses, answered, strict=False)):
        f.expect(r.status == s.status, f"response {i} is {r.status}, the session says {s.status}")
    f.raise_if_any()
    return responses


# -- HTTP/2 checks ------------------------------------------------------------------------


@dataclass
class H2Output:
    """What the server sent, frame by frame."""

    frames: list[Frame]
    headers: dict[int, list[list[tuple[bytes, bytes]]]]
    """Each stream's decoded header blocks, in order."""
    goaway: GoAwayFrame | None
    resets: dict[int, int]


def parse_h2_output(data: bytes, decoder: HpackDecoder | None = None) -> H2Output:
    """Parses what an HTTP/2 server sent (frames, header blocks); raises AssertionError for
    anything malformed, or out of order (interleaved header blocks, frames after END_STREAM,
    a first frame other than SETTINGS, HEADERS without :status)."""
    decoder = decoder or HpackDecoder()
    frames: list[Frame] = []
    headers: dict[int, list[list[tuple[bytes, bytes]]]] = {}
    ended: set[int] = set()
    resets: dict[int, int] = {}
    goaway = None
    block: tuple[int, bool, list[bytes]] | None = None
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 9, f"a cut frame header at {pos}"
        try:
            f, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
            assert len(data) - pos - 9 >= length, f"a cut frame at {pos}"
            f.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        except HyperframeError as e:
            raise AssertionError(f"a malformed frame at {pos}: {e}") from None
        pos += 9 + length
        if not frames:
            assert isinstance(f, SettingsFrame) and "ACK" not in f.flags, f"first frame {f}"
        frames.append(f)
        assert goaway is None or goaway.error_code == 0, f"{f} after {goaway}"
        if block is not None:
            assert isinstance(f, ContinuationFrame) and f.stream_id == block[0], (
                f"{f} inside the header block of stream {block[0]}"
            )
        sid = f.stream_id
        if isinstance(f, (HeadersFrame, DataFrame, ContinuationFrame)):
            assert sid % 2 == 1, f"{f} on an even stream"
        if isinstance(f, (HeadersFrame, DataFrame)):
            assert sid not in ended and sid not in resets, f"{f} after the stream ended"
        if isinstance(f, DataFrame):
            assert headers.get(sid), f"DATA before HEADERS on stream {sid}"
        if isinstance(f, HeadersFrame):
            block = (sid, "END_STREAM" in f.flags, [bytes(f.data)])
        elif isinstance(f, ContinuationFrame):
            assert block is not None, f"a stray {f}"
            block[2].append(bytes(f.data))
        if isinstance(f, (HeadersFrame, ContinuationFrame)) and "END_HEADERS" in f.flags:
            assert block is not None
            try:
                fields = [
                    (bytes(n), bytes(v)) for n, v in decoder.decode(b"".join(block[2]), raw=True)
                ]
            except Exception as e:  # hpack raises several kinds
                raise AssertionError(
                    f"an undecodable header block on stream {sid}: {e!r}"
                ) from None
            blocks = headers.setdefault(sid, [])
            if not blocks:
                assert fields[:1] and fields[0][0] == b":status" and len(fields[0][1]) == 3, (
                    f"a response head without :status first: {fields}"
                )
            else:
                assert block[1], f"trailers without END_STREAM on stream {sid}"
                assert not any(n.startswith(b":") for n, _ in fields), "pseudo in trailers"
            for n, _ in fields:
                assert n == n.lower(), f"an upper-case field name {n!r}"
            blocks.append(fields)
            if block[1]:
                ended.add(sid)
            block = None
        elif isinstance(f, DataFrame) and "END_STREAM" in f.flags:
            ended.add(sid)
        elif isinstance(f, RstStreamFrame):
            resets[sid] = f.error_code
        elif isinstance(f, GoAwayFrame):
            goaway = f
    return H2Output(frames, headers, goaway, resets)


def check_h2(run: Run, tolerate: Collection[str] = KNOWN_BUGS) -> H2Output:
    """The properties of an HTTP/2 run: those shared with HTTP/1.1, and frames that parse.
    Returns what the server sent; raises as :func:`check_h1` does."""
    f = Findings(tolerate)
    _common_checks(run, f)
    out = None
    try:
        out = parse_h2_output(run.received)
    except AssertionError as e:
        f.expect(False, str(e))
    f.raise_if_any()
    assert out is not None
    return out


def check(run: Run, tolerate: Collection[str] = KNOWN_BUGS) -> None:
    """:func:`check_h2` for a connection that spoke HTTP/2 (from the start, or after the h2c
    preface on HTTP/1.1), else :func:`check_h1`."""
    t = run.transport
    if run.h2 or (t is not None and isinstance(t.protocol, H2Server)):
        check_h2(run, tolerate)
    else:
        check_h1(run, tolerate)


# -- HTTP/2 frames ------------------------------------------------------------------------

_FRAME = struct.Struct(">HBBBL")


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """Any frame, valid or not (the length is the payload's)."""
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def h2_transcripts() -> list[bytes]:
    """Client byte streams of valid HTTP/2 conversations (preface first), the seeds of the
    HTTP/2 fuzzers: a GET, a POST with a body in two DATA frames, a request with trailers,
    pipelined streams with settings, pings, window updates, a reset and a GOAWAY."""
    enc = HpackEncoder()
    settings = frame(0x4, 0, 0, struct.pack(">HL", 0x4, 1 << 20))

    def head(sid: int, fields: list[tuple[bytes, bytes]], flags: int) -> bytes:
        return frame(0x1, flags | 0x4, sid, enc.encode(fields))

    get = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/a"),
        (b":authority", b"fuzz.test"),
        (b"user-agent", b"seed"),
    ]
    post = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", b"/form?x=1"),
        (b":authority", b"fuzz.test"),
        (b"content-length", b"11"),
        (b"content-type", b"text/plain"),
    ]
    grpc = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/svc/Call"),
        (b":authority", b"fuzz.test"),
        (b"te", b"trailers"),
    ]
    out = [PREFACE + settings + head(1, get, 0x1)]
    enc = HpackEncoder()
    out.append(
        PREFACE
        + settings
        + head(1, post, 0)
        + frame(0x0, 0, 1, b"hello")
        + frame(0x0, 0x8 | 0x1, 1, b"\x02 world\0\0")
    )
    enc = HpackEncoder()
    out.append(
        PREFACE
        + settings
        + head(1, grpc, 0)
        + frame(0x0, 0, 1, b"\0\0\0\0\0")
        + head(1, [(b"x-end", b"1")], 0x1)
    )
    enc = HpackEncoder()
    out.append(
        PREFACE
        + frame(0x4, 0, 0)
        + frame(0x6, 0, 0, b"pingpong")
        + head(1, get, 0x1)
        + head(3, get, 0x1)
        + frame(0x8, 0, 0, struct.pack(">L", 1000))
        + frame(0x4, 0x1, 0)
        + head(5, post, 0)
        + frame(0x3, 0, 5, struct.pack(">L", 8))
        + frame(0x2, 0, 7, struct.pack(">LB", 0, 16))
        + head(7, get, 0x1)
        + frame(0x7, 0, 0, struct.pack(">LL", 7, 0))
    )
    return out


# -- atheris ------------------------------------------------------------------------------


def h1_input(data: bytes) -> None:
    """One atheris input for HTTP/1.1: two bytes of options (the pool warm or not, how to
    cut the rest into reads), then the client's bytes."""
    if len(data) < 2:
        return
    warm, cuts = data[0] % 3, data[1]
    payload = data[2:]
    chunks = [payload] if not cuts else split(payload, range(cuts, len(payload) or 1, cuts))
    check(run_connection(chunks, warm=warm, strict=len(chunks) == 1))


def h2_input(data: bytes) -> None:
    """One atheris input for HTTP/2: a byte of options (how to cut the rest into reads, the
    pool warm or not), then the client's bytes."""
    if not data:
        return
    cuts = data[0] >> 2
    payload = data[1:]
    chunks = [payload] if not cuts else split(payload, range(cuts, len(payload) or 1, cuts))
    check_h2(run_connection(chunks, warm=data[0] & 3, h2=True))


def write_seeds(target: str, folder: Path) -> int:
    """Writes the seed inputs of ``target`` into ``folder``; returns how many."""
    folder.mkdir(parents=True, exist_ok=True)
    if target == "h1":
        seeds = [b"\x01\x00" + r for r in corpus()]
        seeds += [b"\x00\x07" + r for r in corpus()]
    else:
        seeds = [b"\x00" + t for t in h2_transcripts()] + [b"\x1d" + t for t in h2_transcripts()]
    for i, seed in enumerate(seeds):
        (folder / f"seed-{i:03d}").write_bytes(seed)
    return len(seeds)


def main(argv: list[str]) -> None:
    """``fuzz_targets.py h1|h2 [--seeds DIR] [libFuzzer args]``: runs atheris on a target."""
    if len(argv) < 2 or argv[1] not in ("h1", "h2"):
        sys.exit("usage: fuzz_targets.py h1|h2 [--seeds DIR] [libFuzzer options] [corpus dirs]")
    target, args = argv[1], argv[2:]
    if args[:1] == ["--seeds"]:
        print(f"{write_seeds(target, Path(args[1]))} seeds in {args[1]}")
        return
    import atheris  # only the fuzz extra has it

    atheris.instrument_all()
    one = h1_input if target == "h1" else h2_input
    atheris.Setup([argv[0], *args], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
