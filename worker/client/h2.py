"""HTTP/2 to upstreams: one connection per origin per worker, many requests multiplexed on it.

An :class:`UpstreamH2Conn` is one connection; each request on it is an :class:`UpstreamH2Stream`,
which offers the engine the same interface as an HTTP/1.1 :class:`~worker.client.h1.UpstreamConn`
(``start``, ``write``, ``end``, ``pause_reading``, ``detach`` ...), so the engine and the
downstream exchanges need not know which protocol the upstream speaks. Trailers (gRPC's
``grpc-status``) reach the exchange through ``upstream_trailers``.

The pool tells a connection with free streams from a full one (worker/connector/pool.py,
``H2Pool``): it hands out a new stream on the least busy live connection for the key while it
has room (:attr:`UpstreamH2Conn.capacity`, under the server's SETTINGS_MAX_CONCURRENT_STREAMS),
and a new connection is made only when none has. A connection that closes or retires says so
to the pool through the ``on_retire`` callback it was made with.

A GOAWAY from the server retires the connection gracefully: streams above its last stream ID
fail (the server never saw them, so they may be retried), the others run to their end, and
the connection closes once they have. ``h2`` would close its state machine on GOAWAY and
reject every later frame, so :class:`GoawayFilter` takes GOAWAY frames out of the bytes before
h2 sees them.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError

from shared.address import format_address
from shared.errors import ErrorKind, ProxyError, RetryType, upstream_error
from shared.headers import RequestHeader
from shared.peer import HttpPeer
from shared.session import Session
from worker.h2.flow import WindowedSender
from worker.http import upstream_request
from worker.interfaces import Downstream, ResponseHandler, UpstreamPool

if TYPE_CHECKING:
    from shared.peer import PoolKey

#: Streams open at once on one upstream connection when the server sets no lower limit.
DEFAULT_MAX_STREAMS = 100
#: Streams one upstream connection carries in all before a new one replaces it: below common
#: server limits (nginx's http2_max_requests is 1000), so that a new connection is ready
#: before the server sends GOAWAY.
MAX_STREAMS_PER_CONNECTION = 900
#: Request fields not sent to an HTTP/2 upstream (connection-specific, RFC 9113 8.2.2; Host
#: becomes :authority).
_H2_UPSTREAM_DROP = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
_GOAWAY = 0x7
_FRAME_HEAD = struct.Struct(">HBB")


class GoawayFilter:
    """Walks the frames a server sends and takes the GOAWAY frames out of them.

    :meth:`feed` returns the bytes for h2 (all but GOAWAY frames) and the GOAWAYs' payloads.
    A read with no GOAWAY in it is passed on as it is."""

    __slots__ = ("head", "left", "dropping", "payload")

    def __init__(self) -> None:
        self.head = b""  #: the start of a frame header cut by the end of a read
        self.left = 0  #: bytes of the current frame's payload still to come
        self.dropping = False  #: the current frame is a GOAWAY
        self.payload = b""  #: what has come of the current GOAWAY's payload

    def feed(self, data: bytes) -> tuple[bytes, list[bytes]]:
        if not self.dropping and not self.head and self.left < len(data):
            # The fast path: find the frame starts; nothing to change unless one is GOAWAY.
            pos = self.left
            end = len(data)
            while pos + 9 <= end:
                hi, lo, ftype = _FRAME_HEAD.unpack_from(data, pos)
                if ftype == _GOAWAY:
                    break
                pos += 9 + (hi << 8 | lo)
            else:
                if pos < end:  # a header cut short: keep it, pass the rest
                    self.head = data[pos:]
                    self.left = 0
                    return data[:pos], []
                self.left = pos - end
                return data, []
        elif not self.dropping and not self.head:
            self.left -= len(data)
            return data, []
        return self._slow(data)

    def _slow(self, data: bytes) -> tuple[bytes, list[bytes]]:
        out: list[bytes] = []
        goaways: list[bytes] = []
        pos = 0
        end = len(data)
        while pos < end:
            if self.left:
                n = min(self.left, end - pos)
                if self.dropping:
                    self.payload += data[pos : pos + n]
                else:
                    out.append(data[pos : pos + n])
                self.left -= n
                pos += n
            else:
                need = 9 - len(self.head)
                self.head += data[pos : pos + need]
                pos += need
                if len(self.head) < 9:
                    break
                hi, lo, ftype = _FRAME_HEAD.unpack_from(self.head)
                self.left = hi << 8 | lo
                self.dropping = ftype == _GOAWAY
                if not self.dropping:
                    out.append(self.head)
                self.head = b""
            if self.dropping and not self.left:
                goaways.append(self.payload)
                self.payload = b""
                self.dropping = False
        return b"".join(out), goaways


def h2_fields(req: RequestHeader, s: Session, peer: HttpPeer) -> list[tuple[bytes, bytes]]:
    """The upstream request as HTTP/2 header fields (lower-case names, pseudo-headers)."""
    authority = req.get("host") or format_address(peer.host, peer.port)
    fields = [
        (b":method", req.method.encode()),
        (b":scheme", b"https" if peer.tls else b"http"),
        (b":authority", authority.encode("latin-1")),
        (b":path", req.path.encode("latin-1")),
    ]
    for name, value in req:
        n = name.lower()
        if n not in _H2_UPSTREAM_DROP:
            fields.append((n.encode("latin-1"), value.encode("latin-1")))
    # gRPC needs to know that trailers will be read (RFC 9113 8.2.2 allows te: trailers).
    for raw_name, raw_value in s.raw_headers:
        if raw_name.lower() == b"te" and b"trailers" in raw_value.lower():
            fields.append((b"te", b"trailers"))
            break
    if s.content_length is not None:
        fields.append((b"content-length", b"%d" % s.content_length))
    return fields


class UpstreamH2Stream:
    """One request on an upstream HTTP/2 connection."""

    def __init__(self, conn: UpstreamH2Conn, stream_id: int) -> None:
        self.conn = conn
        self.key = conn.key
        self.stream_id = stream_id
        self.handler: ResponseHandler | None = None
        self.closed = False
        self.write_paused = False
        self.got_bytes = False
        self.keep_alive = True
        self.status = 0
        self.deadline = 0.0
        self.read_timeout = 60.0
        #: Longest stall of the request body on a closed flow-control window (seconds; 0:
        #: none), set by the connector for each exchange.
        self.write_timeout = 0.0
        #: Armed while the body waits for a window (see worker/client/h1.py's).
        self.write_timer: asyncio.TimerHandle | None = None
        self.out = WindowedSender(conn.h2, stream_id)
        self.pending_end = False
        self.paused = False
        self.held: list[ev.Event] = []
        self.transport = conn.transport
        #: The response was headers only, ended at once (gRPC's "trailers-only" errors).
        self.ended_with_head = False

    # -- what the engine and the exchange call ---------------------------------------------

    def request_head(
        self,
        s: Session,
        req: RequestHeader | None,
        client: Downstream,
        peer: HttpPeer,
        body_filtered: bool,
    ) -> list[tuple[bytes, bytes]]:
        """The request head as HTTP/2 fields, for :meth:`start`: from ``req`` when the app's
        ``upstream_request_filter`` made it, else from the request as the proxy forwards
        it (:func:`~worker.http.upstream_request`). The body goes in DATA frames whatever
        ``body_filtered`` says."""
        if req is None:
            req = upstream_request(s, client, peer)
        return h2_fields(req, s, peer)

    def start(
        self, handler: ResponseHandler, head: Any, head_only: bool, read_timeout: float
    ) -> None:
        """Sends the request headers (``head``: a list of byte pairs with pseudo-headers)."""
        self.handler = handler
        self.read_timeout = read_timeout
        self.deadline = time.monotonic() + read_timeout
        self.conn.pool.requests += 1
        self.conn.pool.busy.add(self)
        s = handler.active
        end = s is None or not s.has_body
        try:
            self.conn.h2.send_headers(self.stream_id, head, end_stream=end)
        except ProtocolError as e:
            # The connection closed under us: fail as an unanswered reused connection does.
            asyncio.get_running_loop().call_soon(self._fail, ConnectionResetError(str(e)))
            return
        self.conn.flush()

    def write(self, data: bytes) -> None:
        """Sends request body bytes (within the flow-control window; the rest waits)."""
        if self.closed:
            return
        if not self.out.send(data) and not self.write_paused:
            self.write_paused = True
            if self.write_timeout > 0:
                # The server grants no window: the write timeout, not the read timeout,
                # bounds the wait from now on (as for HTTP/1.1).
                self.deadline = math.inf
                self.write_timer = asyncio.get_running_loop().call_later(
                    self.write_timeout, self._write_timed_out
                )
        self.conn.flush()

    def send_body(self, data: bytes) -> None:
        """Sends a piece of the request body (HTTP/2 frames it: DATA)."""
        self.write(data)

    def end_body(self) -> None:
        """The request body is complete."""
        if self.closed:
            return
        if self.out.blocked:
            self.pending_end = True
            return
        try:
            self.conn.h2.end_stream(self.stream_id)
        except ProtocolError:
            pass
        self.conn.flush()

    def window_opened(self) -> None:
        """WINDOW_UPDATE: send what waited; the engine may write again once it is out."""
        done = self.out.resume()
        self.conn.flush()
        if not done:
            return
        self.write_paused = False
        if self.write_timer is not None:
            self._disarm()
            if self.deadline == math.inf:
                self.deadline = time.monotonic() + self.read_timeout
        if self.pending_end:
            self.pending_end = False
            self.end_body()
        if self.handler is not None:
            self.handler.upstream_writable(True)

    def _disarm(self) -> None:
        timer, self.write_timer = self.write_timer, None
        if timer is not None:
            timer.cancel()

    def _write_timed_out(self) -> None:
        """The body waited ``write_timeout`` for a flow-control window."""
        self.write_timer = None
        handler = self.handler
        self._fail(
            upstream_error(
                ErrorKind.WRITE_TIMEOUT,
                f"the upstream opened no flow-control window for {self.write_timeout:g}s",
                context="sending the request",
            )
        )
        if handler is not None:
            handler.upstream_writable(True)

    def pause_reading(self) -> None:
        """Stops acknowledging response data, so the server's window closes."""
        self.paused = True

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            held, self.held = self.held, []
            for event in held:
                self.on_event(event)

    def detach(self) -> None:
        """The client went away: reset the stream."""
        self.handler = None
        self.close()

    def close(self) -> None:
        if self.write_timer is not None:
            self._disarm()
        if not self.closed:
            self.closed = True
            self.conn.pool.busy.discard(self)
            self.conn.stream_closed(self, reset=True)

    def release(self) -> None:
        """The exchange ended (or never began): a stream is not reused, it is closed."""
        self.close()

    def failure(self, exc: BaseException | None) -> ProxyError:
        """What a failure reported to the handler (``upstream_failed``) means: a late
        response, or a stream or connection that closed (retryable if no byte of a response
        came and the connection was reused); a :class:`ProxyError` (a write timeout) is
        itself."""
        if isinstance(exc, ProxyError):
            return exc
        if isinstance(exc, TimeoutError):
            return upstream_error(ErrorKind.READ_TIMEOUT, exc)
        return upstream_error(
            ErrorKind.CONNECTION_CLOSED,
            exc or "closed before a response",
            RetryType.IF_REUSED if not self.got_bytes else RetryType.NEVER,
        )

    def timed_out(self) -> None:
        """Called by the sweep when the response is late."""
        self._fail(TimeoutError("upstream read timeout"))

    def donatable(self) -> bool:
        """Never: a stream does not move to another worker."""
        return False

    # -- events from the connection ----------------------------------------------------------

    def on_event(self, event: ev.Event) -> None:
        if self.paused and isinstance(
            event, (ev.DataReceived, ev.TrailersReceived, ev.StreamEnded)
        ):
            self.held.append(event)
            return
        handler = self.handler
        self.got_bytes = True
        self.deadline = time.monotonic() + self.read_timeout
        if isinstance(event, ev.ResponseReceived):
            status = 0
            headers = []
            for name, value in event.headers:
                if name == b":status":
                    status = int(value)
                elif name[:1] != b":":
                    headers.append((name, value))
            if status < 200:
                return
            self.status = status
            self.ended_with_head = event.stream_ended is not None
            if handler is not None:
                handler.upstream_head(self, status, headers)
        elif isinstance(event, ev.DataReceived):
            self.conn.ack(self.stream_id, event.flow_controlled_length)
            if handler is not None:
                handler.upstream_body(event.data)
        elif isinstance(event, ev.TrailersReceived):
            if handler is not None:
                handler.upstream_trailers(event.headers)
        elif isinstance(event, ev.StreamEnded):
            self._finish()
        elif isinstance(event, ev.StreamReset):
            self._fail(ConnectionResetError(f"stream reset by the upstream ({event.error_code})"))

    def _finish(self) -> None:
        handler = self.handler
        self.handler = None
        if self.write_timer is not None:
            self._disarm()
        self.closed = True
        self.conn.pool.busy.discard(self)
        self.conn.stream_closed(self, reset=False)
        if handler is not None:
            handler.upstream_done(self)

    def _fail(self, exc: BaseException) -> None:
        handler = self.handler
        self.handler = None
        self.close()
        if handler is not None:
            handler.upstream_failed(self, exc)


class UpstreamH2Conn(asyncio.Protocol):
    """One HTTP/2 client connection to an upstream."""

    def __init__(
        self, key: PoolKey, pool: UpstreamPool, on_retire: Callable[[UpstreamH2Conn], None]
    ) -> None:
        self.key = key
        #: Where its streams count themselves (busy, requests).
        self.pool = pool
        #: Tells the HTTP/2 pool that this connection takes no new streams.
        self.on_retire = on_retire
        self.transport: asyncio.Transport | None = None
        self.h2 = H2Connection(config=H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, UpstreamH2Stream] = {}
        self.closed = False
        #: Streams opened so far; past MAX_STREAMS_PER_CONNECTION the connection retires.
        self.opened = 0
        #: The server sent GOAWAY: no new streams; close once the open ones are done.
        self.retired = False
        self.batching = 0
        self.frames = GoawayFilter()

    @property
    def capacity(self) -> int:
        if self.closed or self.retired or self.opened >= MAX_STREAMS_PER_CONNECTION:
            return 0
        limit = self.h2.remote_settings.max_concurrent_streams or DEFAULT_MAX_STREAMS
        return min(limit, DEFAULT_MAX_STREAMS) - len(self.streams)

    def open_stream(self) -> UpstreamH2Stream:
        self.opened += 1
        stream = UpstreamH2Stream(self, self.h2.get_next_available_stream_id())
        stream.transport = self.transport
        self.streams[stream.stream_id] = stream
        return stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        data, goaways = self.frames.feed(data)
        for payload in goaways:
            self._goaway(payload)
        if not data:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            self._fail_all(e)
            return
        handlers = {s.handler for s in self.streams.values() if s.handler is not None}
        for h in handlers:
            h.begin_batch()
        try:
            for event in events:
                sid = getattr(event, "stream_id", 0)
                if isinstance(event, ev.WindowUpdated):
                    targets = (
                        list(self.streams.values())
                        if sid == 0
                        else [s for s in (self.streams.get(sid),) if s is not None]
                    )
                    for stream in targets:
                        if stream.out.blocked:
                            stream.window_opened()
                elif sid and sid in self.streams:
                    self.streams[sid].on_event(event)
        finally:
            self.flush()
            for h in handlers:
                h.end_batch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.on_retire(self)
        self._fail_all(exc or ConnectionResetError("upstream closed the connection"))

    def _goaway(self, payload: bytes) -> None:
        """No new streams here; those above the server's last stream were never processed
        and fail (retried elsewhere when the request allows), the others go on."""
        if len(payload) < 8:
            self._fail_all(ConnectionResetError("malformed GOAWAY from the upstream"))
            return
        last, code = struct.unpack_from(">LL", payload)
        last &= 0x7FFFFFFF
        if not self.retired:
            self.retired = True
            self.on_retire(self)
        for sid, stream in list(self.streams.items()):
            if sid > last:
                stream._fail(ConnectionResetError(f"GOAWAY from the upstream ({code})"))
        if not self.streams:
            self.close()

    def _fail_all(self, exc: BaseException) -> None:
        self.closed = True
        self.on_retire(self)
        for stream in list(self.streams.values()):
            stream._fail(exc)
        self.streams.clear()
        if self.transport is not None:
            self.transport.close()

    def stream_closed(self, stream: UpstreamH2Stream, reset: bool) -> None:
        self.streams.pop(stream.stream_id, None)
        if reset and not self.closed:
            try:
                self.h2.reset_stream(stream.stream_id, ErrorCodes.CANCEL)
            except ProtocolError:
                pass
            self.flush()
        if not self.streams and (self.retired or self.opened >= MAX_STREAMS_PER_CONNECTION):
            # Retired by the server's GOAWAY, or before the server's own limit (nginx: 1000).
            self.close()

    def ack(self, stream_id: int, size: int) -> None:
        if size:
            try:
                self.h2.acknowledge_received_data(size, stream_id)
            except ProtocolError:
                pass

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.on_retire(self)
            if self.transport is not None:
                self.transport.close()
