"""The engine behind its downstream servers in one process, without a socket, for tests that
run each case over HTTP/1.1 and HTTP/2 (h2c with prior knowledge), as uvicorn's
``tests/protocols/test_http.py`` does.

Theory of operation. A :class:`Proxy` is the real :class:`~worker.proxy.engine.Engine` with a
real app (the built-in :class:`~shared.apps.load_balancer.LoadBalancer`, or a subclass) and its
real connector. A client connection is a real :class:`~worker.server.h1.H1Server` on a
:class:`ClientTransport`; the HTTP/2 client sends the connection preface first, so the server
hands the connection to :class:`~worker.server.h2.H2Server` as worker/server/select.py does (on
a TLS client connection, ``Proxy.client(tls=True)``, ALPN chooses instead).
The HTTP/1.1 client writes raw bytes and parses what it gets with httptools; the HTTP/2 client
is ``h2``'s :class:`~h2.connection.H2Connection`, which encodes the requests and decodes the
server's frames.

The origin stands in at the one place the data path touches the network: the event loop's
``create_connection`` (:class:`OriginLoop`). The connector, its pool and the HTTP/1.1 client
(worker/client/h1.py) are the production code; the transport they get is an
:class:`OriginConn`, which parses with httptools what the proxy writes and lets the test answer
byte by byte, fail, or refuse the connection. Every step runs inside the loop, then lets it
run :data:`SETTLE_TURNS` turns, so what each test asserts is what a user would see on the wire
once the proxy has done what it can.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import httptools
from h2.errors import ErrorCodes

from shared.app import ProxyHttp
from shared.apps.load_balancer import LoadBalancer
from shared.config import from_mapping
from tests.support.client import FakeTransport
from worker.proxy.engine import Engine
from worker.server.h1 import H1Server

#: The one upstream server (never connected to: :class:`OriginLoop` stands in for it).
PEER = "192.0.2.10:8080"
CLIENT_ADDR = ("203.0.113.7", 51234)
SERVER_ADDR = ("192.0.2.1", 8080)
HOST = "example.com"
#: Loop turns each step lets the proxy run before the test looks.
SETTLE_TURNS = 30
#: The head of a plain origin response with a body of ``n`` bytes (``OK_HEAD % n``).
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Origin: yes\r\n\r\n"

#: HTTP/2 frame types and the END_STREAM flag (RFC 9113 6), for the frames after GOAWAY.
FRAME_DATA, FRAME_HEADERS, FRAME_RST_STREAM = 0x0, 0x1, 0x3
FLAG_END_STREAM = 0x1

Headers = list[tuple[bytes, bytes]]


def find(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of a field, by case-insensitive name."""
    return [v for n, v in headers if n.lower() == name]


# -- the origin -------------------------------------------------------------------------------


@dataclass
class OriginRequest:
    """One request as the origin parsed it from what the proxy wrote."""

    method: bytes = b""
    target: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    complete: bool = False

    def header(self, name: bytes) -> list[bytes]:
        return find(self.headers, name)


class OriginConn:
    """One upstream connection: the transport the proxy's HTTP/1.1 client writes to, and the
    origin server at its far end, which the test drives (:meth:`reply`, :meth:`fail`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        self.loop = loop
        self.protocol = protocol
        self.parser = httptools.HttpRequestParser(self)
        self.requests: list[OriginRequest] = []
        self.received = bytearray()
        self.closed = False
        self.reading = True
        #: The request asked for an upgrade: no more parsing.
        self.upgraded = False

    # The transport, as the proxy sees it.

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "a write after close"
        self.received += data
        if self.upgraded:
            return
        try:
            self.parser.feed_data(bytes(data))
        except httptools.HttpParserUpgrade:
            self.upgraded = True  # what follows the request is the tunnel's

    def writelines(self, parts: Iterable[bytes]) -> None:
        self.write(b"".join(parts))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return 0

    # The origin's parser.

    def on_message_begin(self) -> None:
        self.requests.append(OriginRequest())

    def on_url(self, url: bytes) -> None:
        self.requests[-1].target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.requests[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.requests[-1].method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        self.requests[-1].body += body

    def on_message_complete(self) -> None:
        self.requests[-1].complete = True

    # What the origin does (called from the test, through Proxy.step).

    def reply(self, data: bytes) -> None:
        """The origin sends ``data``."""
        assert not self.closed and self.reading, "the proxy is not reading this connection"
        self.protocol.data_received(data)

    def end(self) -> None:
        """The origin closes the connection (cleanly: EOF)."""
        self.closed = True
        self.protocol.connection_lost(None)

    def fail(self) -> None:
        """The origin's end resets the connection."""
        self.closed = True
        self.protocol.connection_lost(ConnectionResetError("reset by the origin"))

    def full(self, full: bool) -> None:
        """The connection's write buffer fills (True) or drains (False), as the loop tells a
        protocol whose peer does not read."""
        if full:
            self.protocol.pause_writing()
        else:
            self.protocol.resume_writing()


class Origin:
    """Every upstream connection the proxy made, and what it does with the next attempt."""

    def __init__(self) -> None:
        self.conns: list[OriginConn] = []
        self.attempts = 0
        #: Refuse every connection (ConnectionRefusedError), as a port nothing listens on.
        self.refuse = False
        #: While set, connection attempts wait for it (never done: a peer that drops SYNs).
        self.gate: asyncio.Future[None] | None = None

    @property
    def requests(self) -> list[OriginRequest]:
        return [r for c in self.conns for r in c.requests]


class OriginLoop(asyncio.SelectorEventLoop):
    """An event loop whose outgoing connections reach :attr:`origin`, never the network."""

    def __init__(self) -> None:
        super().__init__()
        self.origin = Origin()

    async def create_connection(  # type: ignore[override]
        self, protocol_factory: Callable[[], asyncio.Protocol], *args: Any, **kwargs: Any
    ) -> tuple[OriginConn, asyncio.Protocol]:
        self.origin.attempts += 1
        if self.origin.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        if self.origin.gate is not None:
            await self.origin.gate
        protocol = protocol_factory()
        conn = OriginConn(self, protocol)
        self.origin.conns.append(conn)
        protocol.connection_made(conn)  # type: ignore[arg-type]
        return conn, protocol


# -- the client -------------------------------------------------------------------------------


class FakeTls:
    """What the servers read of a TLS connection (``ssl_object``): the protocol ALPN chose."""

    def __init__(self, alpn: str) -> None:
        self.alpn = alpn

    def selected_alpn_protocol(self) -> str:
        return self.alpn

    def getpeercert(self) -> None:
        return None


class ClientTransport(FakeTransport):
    """The server's end of a client connection; the client closing is :meth:`client_gone`.
    With ``tls``, a connection whose TLS handshake is done."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: FakeTls | None = None) -> None:
        super().__init__()
        self.loop = loop
        self.tls = tls
        self.protocol: asyncio.Protocol | None = None
        self.reading = True
        self.lost = False
        #: Once this many bytes are written, the buffer is full: pause_writing (as a real
        #: transport calls it, from within write); None: never.
        self.high_water: int | None = None
        self.full = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        extra = {"peername": CLIENT_ADDR, "sockname": SERVER_ADDR, "ssl_object": self.tls}
        return extra.get(name, default)

    def writelines(self, parts: Iterable[bytes]) -> None:
        for p in parts:
            self.write(p)

    def write(self, data: bytes) -> None:
        if not self.closed:
            super().write(bytes(data))
            high = self.high_water
            if high is not None and len(self.written) >= high and not self.full:
                self.full = True
                assert self.protocol is not None
                self.protocol.pause_writing()

    def drained(self) -> None:
        """The client read what was written: the buffer has room again."""
        self.high_water = None
        if self.full:
            self.full = False
            assert self.protocol is not None
            self.protocol.resume_writing()

    def close(self) -> None:
        if not self.closed:
            super().close()
            self.loop.call_soon(self._lose, None)

    abort = close

    def _lose(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            assert self.protocol is not None
            self.protocol.connection_lost(exc)

    def client_gone(self) -> None:
        self.closed = True
        self._lose(ConnectionResetError("reset by the client"))

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def get_write_buffer_size(self) -> int:
        return 0


@dataclass
class Reply:
    """A response as the client got it."""

    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    trailers: Headers = field(default_factory=list)
    complete: bool = False
    #: HTTP/2: the error code of the RST_STREAM that ended the stream, if one did.
    reset: int | None = None

    def header(self, name: bytes) -> list[bytes]:
        return find(self.headers, name)


class Client:
    """One client connection to the proxy; :class:`H1Client` and :class:`H2Client` speak it."""

    h2 = False

    #: The ALPN protocol a TLS client offers.
    alpn = "http/1.1"

    def __init__(self, proxy: Proxy, tls: bool = False) -> None:
        self.proxy = proxy
        self.scheme = "https" if tls else "http"
        self.transport = ClientTransport(proxy.loop, FakeTls(self.alpn) if tls else None)
        server = H1Server(proxy.engine)
        self.transport.set_protocol(server)
        proxy.step(server.connection_made, self.transport)

    @property
    def protocol(self) -> Any:
        """The server protocol serving the connection now (H2Server after the preface)."""
        return self.transport.protocol

    @property
    def closed(self) -> bool:
        """The server closed the connection."""
        return self.transport.closed

    def feed(self, data: bytes) -> None:
        """The client sends ``data``."""
        self.proxy.step(self.protocol.data_received, data)

    def gone(self) -> None:
        """The client goes away."""
        self.proxy.step(self.transport.client_gone)

    def request(
        self, method: str, path: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> int:
        """Sends a request, its body and its end; returns its handle for :meth:`reply`."""
        handle = self.start(method, path, headers, end=not body)
        if body:
            self.send(handle, body, end=True)
        return handle

    def start(
        self, method: str, path: str, headers: Iterable[tuple[str, str]] = (), end: bool = True
    ) -> int:
        """Sends a request head (and its end of body when ``end``)."""
        raise NotImplementedError

    def send(self, handle: int, data: bytes, end: bool = False) -> None:
        """Sends a piece of request ``handle``'s body (framed by the head's Content-Length)."""
        raise NotImplementedError

    def reply(self, handle: int) -> Reply | None:
        """The response to request ``handle`` so far, or None before its head."""
        raise NotImplementedError


class H1Client(Client):
    """HTTP/1.1: raw bytes up, httptools on what comes back."""

    def __init__(self, proxy: Proxy, tls: bool = False) -> None:
        super().__init__(proxy, tls)
        self.sent = 0

    def start(
        self, method: str, path: str, headers: Iterable[tuple[str, str]] = (), end: bool = True
    ) -> int:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
        lines += [f"{n}: {v}" for n, v in headers]
        self.feed("\r\n".join(lines).encode() + b"\r\n\r\n")
        self.sent += 1
        return self.sent - 1

    def send(self, handle: int, data: bytes, end: bool = False) -> None:
        self.feed(data)

    def replies(self) -> list[Reply]:
        """Every response the client got, parsed from the start; the parser must take all."""
        out: list[Reply] = []

        class Callbacks:
            def on_message_begin(self) -> None:
                out.append(Reply())

            def on_header(self, name: bytes, value: bytes) -> None:
                r = out[-1]
                (r.trailers if r.status else r.headers).append((name.lower(), value))

            def on_headers_complete(self) -> None:
                out[-1].status = parser.get_status_code()

            def on_body(self, body: bytes) -> None:
                out[-1].body += body

            def on_message_complete(self) -> None:
                out[-1].complete = True

        parser = httptools.HttpResponseParser(Callbacks())
        parser.feed_data(bytes(self.transport.written))
        return out

    def reply(self, handle: int) -> Reply | None:
        replies = self.replies()
        return replies[handle] if handle < len(replies) else None


class H2Client(Client):
    """HTTP/2, with prior knowledge (or chosen by ALPN on TLS): h2's client connection encodes
    and decodes."""

    h2 = True

    alpn = "h2"

    def __init__(self, proxy: Proxy, tls: bool = False) -> None:
        super().__init__(proxy, tls)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.replies: dict[int, Reply] = {}
        self.events: list[Any] = []
        #: Server bytes not yet a whole frame.
        self.pending = bytearray()
        #: GOAWAY came: the frames after it are read by :meth:`after_goaway`.
        self.terminated = False
        #: Give the window back as DATA arrives (else :meth:`ack` does).
        self.auto_ack = True
        self.unacked: dict[int, int] = {}
        self.read = 0
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        """Sends what h2 has to send and reads what came back, until neither side has more."""
        while True:
            out = self.conn.data_to_send()
            if out and not self.closed:
                self.feed(out)
            new = bytes(self.transport.written[self.read :])
            self.read += len(new)
            self.pending += new
            while len(self.pending) >= 9:
                end = 9 + int.from_bytes(self.pending[:3], "big")
                if len(self.pending) < end:
                    break
                frame = bytes(self.pending[:end])
                del self.pending[:end]
                if self.terminated:
                    self.after_goaway(frame)
                else:
                    for event in self.conn.receive_data(frame):
                        self.on_event(event)
            if not out and not new:
                return

    def after_goaway(self, frame: bytes) -> None:
        """A frame after GOAWAY, which h2 refuses to read (its connection is closed once
        GOAWAY arrives), though the streams GOAWAY let through are still being answered."""
        kind, flags, sid = frame[3], frame[4], int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
        payload = frame[9:]
        if kind == FRAME_HEADERS:
            fields = self.conn.decoder.decode(payload, raw=True)
            r = self.replies.get(sid)
            if r is not None:
                r.trailers += fields
            else:
                r = self.replies[sid] = Reply()
                for n, v in fields:
                    if n == b":status":
                        r.status = int(v)
                    else:
                        r.headers.append((n, v))
        elif kind == FRAME_DATA:
            self.replies[sid].body += payload
        elif kind == FRAME_RST_STREAM:
            self.replies.setdefault(sid, Reply()).reset = int.from_bytes(payload, "big")
        if kind in (FRAME_HEADERS, FRAME_DATA) and flags & FLAG_END_STREAM:
            self.replies[sid].complete = True

    def on_event(self, event: Any) -> None:
        self.events.append(event)
        sid: int = getattr(event, "stream_id", 0)
        if isinstance(event, h2.events.ResponseReceived):
            r = self.replies[sid] = Reply()
            for n, v in event.headers:
                if n == b":status":
                    r.status = int(v)
                else:
                    r.headers.append((n, v))
        elif isinstance(event, h2.events.DataReceived):
            self.replies[sid].body += event.data
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
            else:
                self.unacked[sid] = self.unacked.get(sid, 0) + event.flow_controlled_length
        elif isinstance(event, h2.events.TrailersReceived):
            self.replies[sid].trailers += event.headers
        elif isinstance(event, h2.events.StreamEnded):
            self.replies[sid].complete = True
        elif isinstance(event, h2.events.StreamReset):
            self.replies.setdefault(sid, Reply()).reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = True

    def start(
        self, method: str, path: str, headers: Iterable[tuple[str, str]] = (), end: bool = True
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [
            (":method", method),
            (":scheme", self.scheme),
            (":authority", HOST),
            (":path", path),
        ]
        fields += [(n.lower(), v) for n, v in headers]
        self.conn.send_headers(sid, fields, end_stream=end)
        self.flush()
        return sid

    def send(self, handle: int, data: bytes, end: bool = False) -> None:
        """Sends ``data`` in DATA frames of the largest size allowed; h2 raises
        ``FlowControlError`` past the window."""
        size = self.conn.max_outbound_frame_size
        for i in range(0, len(data), size):
            last = i + size >= len(data)
            self.conn.send_data(handle, data[i : i + size], end_stream=end and last)
            self.flush()
        if not data:
            self.conn.send_data(handle, b"", end_stream=end)
            self.flush()

    def reply(self, handle: int) -> Reply | None:
        self.flush()
        return self.replies.get(handle)

    def ack(self, handle: int) -> None:
        """Gives back the window of the DATA kept unacknowledged (``auto_ack`` False)."""
        size = self.unacked.pop(handle, 0)
        if size:
            self.conn.increment_flow_control_window(size, handle)
            self.conn.increment_flow_control_window(size)
        self.flush()

    def window(self, handle: int) -> int:
        """How many body bytes the server lets the client send on stream ``handle`` now."""
        self.flush()
        return int(self.conn.local_flow_control_window(handle))

    def reset(self, handle: int) -> None:
        """The client resets the stream (what an HTTP/2 client does when it leaves a response)."""
        self.conn.reset_stream(handle, ErrorCodes.CANCEL)
        self.flush()

    def goaway(self) -> bool:
        """True when the server sent GOAWAY."""
        self.flush()
        return self.terminated


# -- the proxy --------------------------------------------------------------------------------


class Recorder(logging.Handler):
    """Keeps every record of the engine's log."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Proxy:
    """The engine with ``app`` (the built-in load balancer by default) in front of the origin,
    on a loop of its own."""

    def __init__(self, protocol: str, app: ProxyHttp | None = None, **config: Any) -> None:
        self.protocol = protocol
        loop = self.loop = OriginLoop()
        self.origin = loop.origin
        self.loop_errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: self.loop_errors.append(context))
        asyncio.set_event_loop(loop)
        cfg = from_mapping({"upstreams": {"origin": {"servers": [PEER]}}, **config}, "test")
        self.app = app if app is not None else LoadBalancer()
        self.app.configure(cfg)
        self.log = logging.getLogger(f"tenaya.test.{id(self)}")
        self.log.propagate = False
        self.records = Recorder()
        self.log.addHandler(self.records)
        self.engine = Engine(self.app, cfg, None, self.log)
        self.clients: list[Client] = []

    def step(self, fn: Callable[..., Any], *args: Any) -> None:
        """Calls ``fn`` inside the loop, as a loop callback would, then lets the loop run."""

        async def run() -> None:
            fn(*args)
            for _ in range(SETTLE_TURNS):
                await asyncio.sleep(0)

        self.loop.run_until_complete(run())

    def wait(self, seconds: float) -> None:
        """Lets the loop run for ``seconds`` (timers fire)."""
        self.loop.run_until_complete(asyncio.sleep(seconds))
        self.step(lambda: None)

    def client(self, tls: bool = False) -> Client:
        """A new client connection, in this proxy's protocol; ``tls``: on a TLS listener,
        the handshake done (HTTP/2 then chosen by ALPN, not by the preface)."""
        c = (H2Client if self.protocol == "h2c" else H1Client)(self, tls)
        self.clients.append(c)
        return c

    def errors(self) -> list[str]:
        """ERROR records of the engine's log and exceptions the loop caught."""
        out = [r.getMessage() for r in self.records.records if r.levelno >= logging.ERROR]
        return out + [str(c.get("exception") or c.get("message")) for c in self.loop_errors]

    def close(self) -> None:
        try:
            for c in self.clients:
                if not c.transport.lost:
                    self.step(c.transport.client_gone)
            self.step(self.engine.connector.close_all)
        finally:
            self.log.removeHandler(self.records)
            asyncio.set_event_loop(None)
            self.loop.close()


#: The protocols every case runs over: HTTP/1.1, and HTTP/2 with prior knowledge.
PROTOCOLS = ("http/1.1", "h2c")


def proxies(protocol: str) -> Iterator[Callable[..., Proxy]]:
    """For a fixture: yields a maker of :class:`Proxy` objects in ``protocol`` (its arguments
    are :class:`Proxy`'s after the protocol); at the end closes them and checks that nothing
    failed inside them and that no request is left counted."""
    made: list[Proxy] = []

    def make(app: ProxyHttp | None = None, **config: Any) -> Proxy:
        p = Proxy(protocol, app, **config)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
        assert p.errors() == []
        assert p.engine.active_requests == 0
