"""The downstream HTTP/2 connection: streams as exchanges.

Theory of operation. :class:`H2Server` owns the connection and its codec (worker/h2/codec.py:
framing, HPACK, stream states and windows); every request stream becomes an
:class:`H2Stream`, an exchange like an HTTP/1.1
connection, so the engine and the upstream side are the same for both protocols (an HTTP/2
request goes upstream as HTTP/1.1). Response bodies respect HTTP/2 flow control: what the
client's window does not take waits in the stream, and the stream's upstream stops being read
until a WINDOW_UPDATE arrives. Request bodies are acknowledged (the client's window reopened)
only as fast as they are sent on, so a slow upstream slows the client.

Limits: at most ``MAX_CONCURRENT_STREAMS`` streams at once, a header list no larger than
``limits.max_header_bytes``, and at most ``MAX_RESETS_PER_SECOND`` streams reset by the client
per second: past that (the "rapid reset" attack, CVE-2023-44487) the connection gets GOAWAY
ENHANCE_YOUR_CALM and is closed, as is a connection that has reset more than
``MIN_RESETS_FOR_RATIO`` streams and most of its streams. A stream over the concurrency limit
is refused (RST_STREAM REFUSED_STREAM); a header list over the limit is answered 431. On
drain, GOAWAY tells the client to open no new streams; the connection closes once its streams
are done.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from h2.errors import ErrorCodes

from shared.errors import ErrorKind, downstream_error
from shared.headers import RawHeaders, ResponseHeader
from shared.session import Session
from worker.h2.codec import H2Codec
from worker.h2.flow import WindowedSender
from worker.h2.hpack import Fields
from worker.http import status_line
from worker.interfaces import ProxyEngine
from worker.server.exchange import Exchange, peer_info
from worker.server.flow import FlowControl

__all__ = ["H2Server", "H2Stream"]

MAX_CONCURRENT_STREAMS = 128
#: Streams the client may reset per second before the connection is closed.
MAX_RESETS_PER_SECOND = 200
#: Past this many resets on one connection, resetting most of its streams closes it too.
MIN_RESETS_FOR_RATIO = 100
#: Response headers that are connection-specific, not allowed in HTTP/2 (RFC 9113 8.2.2).
_H2_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"trailer",
    }
)
_MODE_NONE = 0
_MODE_DATA = 1


class H2Stream(Exchange):
    """One request stream: the exchange the engine drives."""

    def __init__(self, server: H2Server, stream_id: int) -> None:
        # Global
        self.engine = server.engine
        self.server = server
        # Per-stream
        self.stream_id = stream_id
        self.client_addr = server.client_addr
        self.server_addr = server.server_addr
        self.client_ip = server.client_ip
        self.scheme = server.scheme
        self.tls = server.tls
        self.active: Session | None = None
        self.up = None
        self.closing = False
        self.flow = server.flow
        self.held: list[bytes] | None = None
        self.held_done = None
        self.out = WindowedSender(server.conn, stream_id)
        self.pending_end = False
        self.ended = False
        self.body_paused = False
        self.unacked = 0
        self.trailers: RawHeaders | None = None
        #: The response's Content-Length, if it has one.
        self.length: int | None = None

    # -- what the session needs ------------------------------------------------------------

    def pause_body(self) -> None:
        self.body_paused = True

    def resume_body(self) -> None:
        self.body_paused = False
        if self.unacked and not self.closing:
            self.server.ack(self.stream_id, self.unacked)
            self.unacked = 0
            self.server.flush()

    def send_continue(self, s: Session) -> None:
        """HTTP/2 clients send their body without waiting for 100 Continue."""

    # -- writing the response ----------------------------------------------------------------

    def write_head(self, s: Session, line: bytes, headers: RawHeaders, rechunk: bool) -> None:
        s.response_started = True
        status = s.status = int(line[9:12])
        fields = [(b":status", b"%d" % status)]
        named: list[bytes] | None = None
        for name, value in headers:
            n = name.lower()
            if n in _H2_DROP:
                if n == b"connection":
                    # Its tokens are parsed only when it is there: most responses lack it.
                    for token in value.lower().split(b","):
                        token = token.strip()
                        if token:
                            named = [*(named or ()), token]
                continue
            if rechunk and n == b"content-length":
                continue
            if n == b"content-length":
                self.length = int(value)
            fields.append((n, value))
        if named:
            # RFC 9110 7.6.1: "a proxy or gateway MUST parse a received Connection header
            # field before a message is forwarded and, for each connection-option in this
            # field, remove any header or trailer field(s) from the message with the same
            # name as the connection-option". The same as HTTP/1.1 clients get (h1.py).
            kept = fields[:1]  # :status, whatever the tokens say
            for n, value in fields[1:]:
                if n not in named:
                    kept.append((n, value))
                elif n == b"content-length":
                    self.length = None
            fields = kept
        no_body = (
            s.method == b"HEAD"
            or status == 204
            or status == 304
            or (self.up is not None and self.up.ended_with_head)
        )
        s.resp_mode = _MODE_NONE if no_body else _MODE_DATA
        if self.closing:
            return
        self.server.conn.send_headers(self.stream_id, fields, end_stream=no_body)
        self.ended = no_body
        self.server.flush()

    def write_body(self, s: Session, data: bytes) -> None:
        if not data or s.resp_mode == _MODE_NONE or self.closing:
            return
        s.resp_bytes += len(data)
        if s.resp_bytes == self.length and self.out.send_last(data):
            # The whole declared body: END_STREAM rides on its last frame.
            self.ended = True
            self.server.flush()
            return
        if not self.out.send(data) and self.up is not None:
            # The client's window is full: stop reading the upstream until it opens.
            self.up.pause_reading()
        self.server.flush()

    def window_opened(self) -> None:
        """WINDOW_UPDATE: send what waited."""
        if not self.out.blocked or self.closing:
            return
        done = self.out.resume()
        self.server.flush()
        if not done:
            return
        if self.pending_end:
            self._end()
        elif self.up is not None and not self.flow.write_paused:
            self.up.resume_reading()

    def end_body(self, s: Session) -> None:
        if self.ended or self.closing:
            return
        self.trailers = s.trailers
        if self.out.blocked:
            self.pending_end = True
        else:
            self._end()

    def _end(self) -> None:
        self.ended = True
        self.pending_end = False
        trailers = self.trailers
        if trailers:
            fields = [(n.lower(), v) for n, v in trailers if n.lower() not in _H2_DROP]
            self.server.conn.send_headers(self.stream_id, fields, end_stream=True)
        else:
            self.server.conn.end_stream(self.stream_id)
        self.server.flush()
        if self.active is None:
            # The exchange finished while its body waited for the window.
            self.server.stream_done(self)

    def respond(self, s: Session, status: int, headers: Any, body: bytes) -> None:
        if headers is None:
            fields: RawHeaders = []
        else:
            h = ResponseHeader.build(status, headers)
            fields = [
                (n.lower().encode("latin-1"), v.encode("latin-1"))
                for n, v in h
                if n.lower() != "content-length"
            ]
        fields.append((b"content-length", b"%d" % len(body)))
        self.write_head(s, status_line(status), fields, False)
        self.write_body(s, body)
        self.end_body(s)

    def begin_batch(self) -> None:
        self.server.batching += 1

    def end_batch(self) -> None:
        self.server.batching -= 1
        self.server.flush()

    # -- the end of the exchange -----------------------------------------------------------

    def finish(self, s: Session) -> None:
        if not self.end_exchange(s):
            return
        if not self.ended and not self.closing and not self.pending_end:
            self.end_body(s)
        if self.ended or self.closing:
            self.server.stream_done(self)
        # else: the body still waits for the client's window; _end lets the stream go.

    def close(self) -> None:
        """The response can't complete: reset the stream."""
        if not self.closing:
            self.closing = True
            if not self.ended:
                self.server.reset(self.stream_id)
            self.out.clear()

    def reset_by_client(self) -> None:
        """The client reset the stream (or the connection went away)."""
        self.closing = True
        self.out.clear()
        up, self.up = self.up, None
        if up is not None:
            up.detach()
        s = self.active
        if s is not None:
            gone = downstream_error(ErrorKind.DOWNSTREAM_CLOSED, "stream reset")
            s.fail_body(gone)
            if not s.response_done:
                s.error = s.error or gone
                s.response_done = True
                self.active = None
                self.engine.request_done(s)
        self.server.stream_done(self)


class H2Server(asyncio.Protocol):
    """One client connection speaking HTTP/2."""

    def __init__(self, engine: ProxyEngine) -> None:
        # Global
        self.engine = engine
        # Per-connection
        self.transport: asyncio.Transport | None = None
        # Inbound headers are validated by the codec (a malformed request must not reach an
        # HTTP/1.1 upstream); outbound ones are built here already lower-case and
        # connection-free.
        self.conn = H2Codec(self, MAX_CONCURRENT_STREAMS, engine.max_head)
        self.streams: dict[int, H2Stream] = {}
        self.client_addr: tuple[str, int] = ("", 0)
        self.server_addr: tuple[str, int] = ("", 0)
        self.client_ip = b""
        self.tls: Any = None
        self.scheme = b"http"
        self.closing = False
        self.draining = False
        #: Backpressure toward the client (its streams share it).
        self.flow = FlowControl()
        self.batching = 0
        self.last_active = 0.0
        self.requests = 0
        self._resets = 0
        self._reset_second = 0
        self.total_resets = 0

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.flow.transport = transport  # type: ignore[assignment]
        self.client_addr, self.client_ip, self.server_addr, self.tls = peer_info(transport)
        if self.tls is not None:
            self.scheme = b"https"
        self.last_active = time.monotonic()
        self.engine.connections.add(self)
        self.conn.initiate_connection()
        if self.engine.draining:
            self.drain()
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.closing:
            return
        self.batching += 1
        try:
            ok = self.conn.receive_data(data)
        finally:
            self.batching -= 1
        if ok:
            self.flush()
        else:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.flow.close()
        self.engine.connections.discard(self)
        for stream in list(self.streams.values()):
            stream.reset_by_client()
        # A request body waiting for its upstream waits no more (its stream is gone).
        self.flow.wake()

    def pause_writing(self) -> None:
        # The client is not reading what we send: stop reading what it sends, so that the
        # answers its frames need (PING and SETTINGS acknowledgements, resets) cannot pile up.
        flow = self.flow
        flow.pause_writing()
        flow.pause_reading()
        for stream in self.streams.values():
            if stream.up is not None:
                stream.up.pause_reading()

    def resume_writing(self) -> None:
        flow = self.flow
        flow.resume_writing()
        flow.resume_reading()
        for stream in self.streams.values():
            if stream.up is not None and not stream.out.blocked:
                stream.up.resume_reading()

    # -- what the codec reports -----------------------------------------------------------

    def on_data(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        s = stream.active if stream is not None else None
        if s is None or stream is None:
            self.ack(stream_id, flow)
            return
        if data:
            s.feed_body(data)
        if flow:
            if stream.body_paused:
                stream.unacked += flow
            else:
                self.ack(stream_id, flow)
        if end_stream and stream.active is not None:
            stream.active.end_body()

    def on_reset(self, stream_id: int, code: int, by_client: bool) -> None:
        stream = self.streams.get(stream_id)
        # A reset counts when it throws away work: a request still being answered, whether
        # the client reset it or got it reset by sending a frame it knew to be wrong
        # ("MadeYouReset", CVE-2025-8671). Resetting a stream whose answer is complete
        # (grpcio does, with NO_ERROR, RFC 9113 8.1) loses nothing and does not count.
        if stream is not None and not stream.ended:
            self._count_reset()
        if stream is not None:
            stream.reset_by_client()

    def on_window(self, stream_id: int) -> None:
        if stream_id == 0:
            for stream in list(self.streams.values()):
                stream.window_opened()
        else:
            one = self.streams.get(stream_id)
            if one is not None:
                one.window_opened()

    def on_goaway(self, code: int) -> None:
        """The client leaves: its open streams finish, then the connection closes."""
        self.drain()

    def on_request(self, sid: int, fields: Fields, end_stream: bool, too_large: bool) -> None:
        stream = H2Stream(self, sid)
        s = Session(stream)
        s.start_time = time.time()
        s.version = "2"
        s.max_body = max_body = self.engine.max_body
        fwd = s.fwd
        raw = s.raw_headers
        cookies: list[bytes] = []
        authority = None
        for name, value in fields:
            if name[:1] == b":":
                if name == b":method":
                    s.method = value
                elif name == b":path":
                    s.url = value
                elif name == b":authority":
                    authority = value
                continue
            if name == b"cookie":
                cookies.append(value)
                continue
            raw.append((name, value))
            if name == b"host":
                authority = authority or value
            elif name == b"content-length":
                s.content_length = int(value)
            elif name == b"x-forwarded-for":
                s.xff = value if s.xff is None else s.xff + b", " + value
            elif name in (b"te", b"x-forwarded-proto", b"x-forwarded-host", b"expect"):
                pass
            else:
                fwd += (name, b": ", value, b"\r\n")
        if cookies:
            # HTTP/2 may split cookies; HTTP/1.1 wants one field (RFC 9113 8.2.3).
            joined = b"; ".join(cookies)
            raw.append((b"cookie", joined))
            fwd += (b"cookie", b": ", joined, b"\r\n")
        if authority is not None:
            s.host_b = authority
            fwd[:0] = (b"host", b": ", authority, b"\r\n")
        ended = end_stream
        if not ended and s.content_length is None:
            s.chunked = True  # a body of unknown length goes upstream chunked
        if too_large:
            s.error = downstream_error(ErrorKind.HEADERS_TOO_LARGE)
        elif max_body and s.content_length is not None and s.content_length > max_body:
            s.error = downstream_error(ErrorKind.BODY_TOO_LARGE)
        stream.active = s
        self.streams[sid] = stream
        self.requests += 1
        if ended:
            s.end_body()
        self.engine.start(stream, s)

    def _count_reset(self) -> None:
        second = int(time.monotonic())
        if second != self._reset_second:
            self._reset_second = second
            self._resets = 0
        self._resets += 1
        self.total_resets += 1
        # Too many resets a second, or a connection whose streams are mostly reset (however
        # slowly the client manages it): either way the pattern of the rapid reset attack.
        if self._resets > MAX_RESETS_PER_SECOND:
            why = f"over {MAX_RESETS_PER_SECOND} streams in a second"
        elif self.total_resets > MIN_RESETS_FOR_RATIO and self.total_resets * 2 > self.requests:
            why = f"{self.total_resets} of its {self.requests} streams"
        else:
            return
        client = self.client_addr[0]
        held = self.engine.log_throttle.allow(client, "rapid reset")
        if held is not None:
            # Once per client a minute: one that reconnects and resets again is not a flood
            # of lines.
            self.engine.log.warning(
                "%s reset %s; closing%s",
                client,
                why,
                f" (and {held} more times since the last line)" if held else "",
            )
        self._abort(ErrorCodes.ENHANCE_YOUR_CALM)

    # -- helpers for streams ---------------------------------------------------------------

    def flush(self) -> None:
        if self.batching or self.transport is None:
            return
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def ack(self, stream_id: int, size: int) -> None:
        if size and not self.closing:
            self.conn.acknowledge_received_data(size, stream_id)

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(stream_id, code)
        self.flush()

    def stream_done(self, stream: H2Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        if stream.unacked:
            # Body bytes held back while the body was paused count against the connection's
            # window too: a stream that ends without reading them gives them back.
            self.ack(stream.stream_id, stream.unacked)
            stream.unacked = 0
        self.conn.finished(stream.stream_id)
        self.last_active = time.monotonic()
        if self.draining and not self.streams:
            self.close()

    # -- closing -------------------------------------------------------------------------

    def _abort(self, code: ErrorCodes) -> None:
        self.conn.close_connection(code)
        self.batching = 0
        self.flush()
        self.close()

    def close(self) -> None:
        """Closes the connection once what h2 has to send (even mid-batch) went out."""
        if not self.closing:
            self.closing = True
            self.flow.close()
            if self.transport is not None:
                data = self.conn.data_to_send()
                if data and not self.transport.is_closing():
                    self.transport.write(data)
                self.transport.close()

    def drain(self) -> None:
        """GOAWAY: no new streams; close once the open ones are done."""
        if self.draining or self.closing:
            return
        self.draining = True
        self.conn.goaway(ErrorCodes.NO_ERROR)
        self.flush()
        if not self.streams:
            self.close()

    def is_idle(self) -> bool:
        return not self.streams

    def idle_check(self, now: float, keepalive: float, drain_idle: float) -> None:
        """Closes the connection once it has had no stream for ``keepalive`` seconds
        (``drain_idle`` while draining), with GOAWAY first: RFC 9113 6.8, "an endpoint SHOULD
        send a GOAWAY frame when ending a connection"; its last stream id (the highest the
        client opened) tells the client that no request of its went unanswered."""
        if self.is_idle() and now - self.last_active >= (
            drain_idle if self.draining else keepalive
        ):
            if not self.conn.goaway_sent:
                self.conn.goaway(ErrorCodes.NO_ERROR)
            self.close()  # writes what the codec has to send, GOAWAY included, then closes
