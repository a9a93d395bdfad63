"""One HTTP/1.1 connection to an upstream.

An :class:`UpstreamConn` is either *busy* (it carries one exchange: its ``handler`` receives the
response callbacks) or *idle* (it waits in the pool, worker/connector/pool.py). An idle
connection is watched:
if the origin closes it or sends anything, it is dropped, so the pool never hands out a
connection known to be dead (``pingora-pool`` ``idle_poll`` does the same).

An origin is not trusted to frame its responses sanely; nothing it sends may mean two things
downstream or leave the connection carrying a message the next exchange would misread:

- A response is *complete* when httptools ends it (or, for HEAD, at its head), but the exchange
  ends only once the read that completed it is parsed to its end: a byte after a complete
  response (junk, a body to a 204 / 304 / HEAD, a second response) means the origin and the
  proxy disagree on where the response ended, so the connection is closed, never pooled.
- A 204 loses Content-Length and Transfer-Encoding (RFC 9110 8.6, RFC 9112 6.1: a server MUST
  NOT send them); one that declared a body is not reused. A 304 and a response to HEAD keep
  Content-Length, which there says what a 200 to GET would have carried (RFC 9110 8.6).
- A 101 is valid only for a request that asked to upgrade, and its Upgrade must name protocols
  the request offered (RFC 9110 7.8); otherwise it is an invalid response (502), and the
  client's connection is closed as well.
- Bytes that begin no response, arriving on a reused connection before this exchange's
  response, are left over from the exchange before: the exchange fails as one whose reused
  connection died before answering (:class:`StaleBytes`), which the engine may send again on
  a fresh connection.

These checks run where the rare case shows (the status of the head, the end of a read, a
parse error), not on every response.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING

import httptools

from shared.errors import ErrorKind, ProxyError, RetryType, upstream_error
from shared.headers import RawHeaders, RequestHeader
from shared.peer import HttpPeer
from shared.session import Session
from worker.http import upstream_request
from worker.interfaces import Downstream, ResponseHandler, UpstreamPool

if TYPE_CHECKING:
    from shared.peer import PoolKey


class _BytesAfterResponse(Exception):
    """Raised from a parser callback when bytes follow a complete response."""


class InvalidResponse(httptools.HttpParserError):
    """A response httptools parsed that HTTP forbids (a 101 the request did not ask for); the
    exchange fails as with any parse error (502)."""


class StaleBytes(ConnectionError):
    """Bytes that begin no response came first on a reused connection: left over from the
    exchange before (an origin that sent more than its response). The exchange fails as one
    whose connection died before any response byte (the engine may retry it)."""


#: How a status line begins (what bytes left over from an earlier exchange do not).
_STATUS_LINE_START = b"HTTP/"


def _framing(s: Session, body_filtered: bool) -> bytes:
    """The framing lines of the upstream request: Upgrade, chunked (the body's length is not
    known, or a ``request_body_filter`` may change it), Content-Length, or none."""
    if s.upgrade is not None:
        return b"Connection: Upgrade\r\nUpgrade: " + s.upgrade + b"\r\n"
    if s.chunked or (body_filtered and s.has_body):
        return b"Transfer-Encoding: chunked\r\n"
    if s.content_length is not None:
        return b"Content-Length: %d\r\n" % s.content_length
    return b""


class UpstreamConn(asyncio.Protocol):
    """A client connection to one upstream server."""

    #: An HTTP/1.1 response always says its own framing (HTTP/2 may end with its head).
    ended_with_head = False

    __slots__ = (
        "key",
        "pool",
        "transport",
        "parser",
        "handler",
        "headers",
        "trailers",
        "status",
        "head_only",
        "got_bytes",
        "keep_alive",
        "deadline",
        "read_timeout",
        "requests",
        "idle_since",
        "closed",
        "write_paused",
        "tunnel",
        "reading_paused",
        "complete",
        "chunked_body",
        "write_timeout",
        "write_timer",
        "idle_timeout",
    )

    def __init__(self, key: PoolKey, pool: UpstreamPool) -> None:
        # Per-connection
        self.key = key
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.handler: ResponseHandler | None = None
        self.closed = False
        self.write_paused = False
        #: Reading was paused for the client's sake (backpressure); undone before reuse.
        self.reading_paused = False
        self.requests = 0
        self.idle_since = 0.0
        self.deadline = 0.0
        self.read_timeout = 60.0
        #: Longest stall of the request on its way up (seconds; 0: none): the connector sets
        #: it for each exchange (the peer's ``write_timeout``, else the config's).
        self.write_timeout = 0.0
        #: Fails the exchange once the request stalled ``write_timeout`` (armed by
        #: pause_writing only, so an upload that never fills the buffer costs no timer).
        self.write_timer: asyncio.TimerHandle | None = None
        #: How long this connection may idle in the pool (the peer's ``idle_timeout``, set by
        #: the connector for each exchange); None: the pool's own.
        self.idle_timeout: float | None = None
        #: After a 101 response: the downstream side of the byte tunnel.
        self.tunnel: ResponseHandler | None = None
        # Per-exchange
        self.headers: RawHeaders = []
        #: Trailer fields after a chunked body (httptools reports them as more headers once
        #: the head is complete).
        self.trailers: RawHeaders | None = None
        self.status = 0
        self.head_only = False
        self.got_bytes = False
        self.keep_alive = True
        #: The response is complete; the exchange ends once the read that completed it is
        #: parsed to its end (see the module docstring).
        self.complete = False
        #: The request body goes in chunks (set with the head).
        self.chunked_body = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.tunnel_data(data)
            return
        handler = self.handler
        if handler is None:
            # An idle connection spoke: whatever it is, the connection can't be reused.
            self.close()
            return
        self.got_bytes = True
        self.deadline = time.monotonic() + self.read_timeout
        handler.begin_batch()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._start_tunnel(handler, data[e.args[0] :])
        except httptools.HttpParserCallbackError as e:
            self._stopped(e.__context__ or e, data)
        except httptools.HttpParserError as e:
            self._stopped(e, data)
        else:
            if self.complete:
                self._finish()
        finally:
            handler.end_batch()

    def _stopped(self, exc: BaseException, data: bytes) -> None:
        """Parsing stopped at an error (or a callback's exception) within ``data``."""
        if self.complete:
            # Whatever stopped the parser came after a complete response: the response
            # stands, the connection does not.
            self.keep_alive = False
            self._finish()
            return
        if (
            self.status == 0
            and not self.headers
            and isinstance(exc, httptools.HttpParserError)
            and not isinstance(exc, InvalidResponse)
            and not _STATUS_LINE_START.startswith(data.lstrip(b"\r\n")[:5])
            and self._reused()
        ):
            self.got_bytes = False
            exc = StaleBytes(
                f"{len(data)} bytes that begin no response came before the "
                f"response on a reused connection ({data[:16]!r})"
            )
        self._fail(exc)

    def _reused(self) -> bool:
        """True when the connection carried an exchange before this one (here, or in the
        worker that gave it to the pool broker)."""
        if self.requests > 1:
            return True
        # A connection the pool broker lent carries its first exchange in this process; the
        # request knows it was reused (a handler that serves no Session cannot say).
        s = getattr(self.handler, "active", None)
        return s is not None and s.upstream_reused is True

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.tunnel_closed()
            return
        handler = self.handler
        if handler is None:
            self.pool.discard(self)
            return
        if self.status and self._close_delimited():
            # A response without length ends when the origin closes the connection.
            self.keep_alive = False
            self._finish()
            return
        self.handler = None
        handler.upstream_failed(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.handler is not None and self.write_timeout > 0 and self.write_timer is None:
            # The origin takes request bytes slower than they come: from now on the write
            # timeout, not the read timeout, bounds the exchange (nginx's proxy_send_timeout;
            # its read timer starts once the request is sent).
            self.deadline = math.inf
            self.write_timer = asyncio.get_running_loop().call_later(
                self.write_timeout, self._write_timed_out
            )
        h = self.handler or self.tunnel
        if h is not None:
            h.upstream_writable(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.write_timer is not None:
            self._disarm()
            if self.handler is not None and self.deadline == math.inf:
                # The wait for the response counts from the origin's last progress.
                self.deadline = time.monotonic() + self.read_timeout
        h = self.handler or self.tunnel
        if h is not None:
            h.upstream_writable(True)

    def _disarm(self) -> None:
        """Cancels the write timer (the request moves again, or the exchange is over)."""
        timer, self.write_timer = self.write_timer, None
        if timer is not None:
            timer.cancel()

    def _write_timed_out(self) -> None:
        """The request stalled ``write_timeout``: the origin did not read enough of it to bring
        the write buffer back to its low-water mark."""
        self.write_timer = None
        handler = self.handler
        self._fail(
            upstream_error(
                ErrorKind.WRITE_TIMEOUT,
                f"the upstream did not read the request for {self.write_timeout:g}s",
                context="sending the request",
            )
        )
        if handler is not None:
            # The request side waits for the upstream to take writes again: it won't.
            handler.upstream_writable(True)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _BytesAfterResponse
        self.headers = []
        self.trailers = None

    def on_header(self, name: bytes, value: bytes) -> None:
        trailers = self.trailers
        if trailers is None:
            self.headers.append((name, value))
        else:
            trailers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        handler = self.handler
        if status < 200:
            if status == 101 and handler is not None:
                # Switching protocols: the handler sends the head on; the tunnel starts once
                # the parser stops (HttpParserUpgrade).
                self._check_switch(handler)
                self.status = 101
                self.keep_alive = False
                handler.upstream_head(self, 101, self.headers)
            # 1xx interim responses are not forwarded: the proxy answers Expect itself.
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.trailers = []
        if status == 204:
            self._drop_204_framing()
        if handler is not None:
            handler.upstream_head(self, status, self.headers)
        if self.head_only:
            # A response to HEAD ends at its head, whatever its framing says (RFC 9112 6.3);
            # a body byte after it is a byte after a complete response.
            self.complete = True

    def _check_switch(self, handler: ResponseHandler) -> None:
        """Raises :class:`InvalidResponse` unless this 101 switches to protocols the request's
        Upgrade offered. RFC 9110 7.8: "A server MUST NOT switch to a protocol that was not
        indicated by the client in the corresponding request's Upgrade header field"; a 101
        "MUST send an Upgrade header field to indicate the new protocol(s)", and "A sender of
        Upgrade MUST also send an "Upgrade" connection option in the Connection header
        field"."""
        s = handler.active
        offered = s.upgrade if s is not None else None
        named = [
            token.strip().lower()
            for name, value in self.headers
            if name.lower() == b"upgrade"
            for token in value.split(b",")
        ]
        named = [token for token in named if token]
        what = b", ".join(named).decode("latin-1") or "no protocol"
        if offered is None:
            why = f"101 switching to {what} for a request that asked for no upgrade"
        elif not named or not all(
            token in {t.strip().lower() for t in offered.split(b",")} for token in named
        ):
            why = f"101 switching to {what}; the request offered {offered.decode('latin-1')}"
        elif not self.parser.should_upgrade():
            why = "101 without the upgrade option in its Connection field"
        else:
            return
        if s is not None:
            # Nothing sane follows on the client's side either: what it sent after its
            # request was meant for a protocol that is not spoken, or for a tunnel.
            s.keep_alive = False
        raise InvalidResponse(why)

    def _drop_204_framing(self) -> None:
        """A 204 has no body: Content-Length and Transfer-Encoding are not passed on (RFC 9110
        8.6: "A server MUST NOT send a Content-Length header field in any response with a
        status code of 1xx (Informational) or 204 (No Content)"; RFC 9112 6.1 says the same of
        Transfer-Encoding). One that declared a body may still send it: it is not reused."""
        headers = self.headers
        for name, _ in headers:
            n = name.lower()
            if n == b"content-length" or n == b"transfer-encoding":
                break
        else:
            return
        kept: RawHeaders = []
        for name, value in headers:
            n = name.lower()
            if n == b"content-length":
                if value.strip() != b"0":
                    self.keep_alive = False
            elif n == b"transfer-encoding":
                self.keep_alive = False
            else:
                kept.append((name, value))
        self.headers = kept

    def _close_delimited(self) -> bool:
        """True when the current response's body ends only when the connection closes."""
        if self.head_only or self.status in (204, 304):
            return False
        for name, value in self.headers:
            n = name.lower()
            if n == b"content-length":
                return False
            # A transfer coding that does not end in chunked is delimited by the close
            # (RFC 9112 6.3).
            if n == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked"):
                return False
        return True

    def on_body(self, data: bytes) -> None:
        if self.complete:
            raise _BytesAfterResponse  # a body after the head of a response to HEAD
        handler = self.handler
        if handler is not None:
            handler.upstream_body(data)

    def on_message_complete(self) -> None:
        if self.complete:
            # A response to HEAD, complete at its head. httptools ends it here at once when its
            # framing says no body follows; a chunked one ends only after a last chunk, which
            # is a body after all.
            if self.status not in (204, 304) and self._declares_chunked():
                raise _BytesAfterResponse
            return
        if self.status and self.status != 101:
            if self.trailers and self.handler is not None:
                self.handler.upstream_trailers(self.trailers)
            self.complete = True

    def _declares_chunked(self) -> bool:
        """True when the response's framing is the chunked coding."""
        for name, value in self.headers:
            if name.lower() == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked"):
                return True
        return False

    def _start_tunnel(self, handler: ResponseHandler, rest: bytes) -> None:
        """After a 101 response: bytes go both ways unparsed until either side closes."""
        self.pool.busy.discard(self)
        self.handler = None
        if self.write_timer is not None:
            self._disarm()
        if self.status != 101:
            self._fail(httptools.HttpParserError("upgrade without 101"))
            return
        self.tunnel = handler
        handler.tunnel_started(self)
        if rest:
            handler.tunnel_data(rest)

    # -- exchange ------------------------------------------------------------------------

    def request_head(
        self,
        s: Session,
        req: RequestHeader | None,
        client: Downstream,
        peer: HttpPeer,
        body_filtered: bool,
    ) -> bytes:
        """The request head in HTTP/1.1, for :meth:`start`: from ``req`` when the app's
        ``upstream_request_filter`` made it; else, unless a phase built ``s.req_header``,
        from the request as parsed (the fast path: the header lines the downstream protocol
        collected, then X-Forwarded-*, Host when the client sent none, and the framing),
        with one join. ``body_filtered``: a ``request_body_filter`` may change the body, which
        then goes chunked; the body's framing is decided here (:meth:`send_body`)."""
        self.chunked_body = s.chunked or body_filtered
        if req is None:
            if s._req_header is None:
                ip = client.client_ip
                xff = ip if s.xff is None else s.xff + b", " + ip
                host = s.host_b
                if host is None:
                    tail = [
                        b"Host: ",
                        str(peer).encode(),
                        b"\r\nX-Forwarded-For: ",
                        xff,
                        b"\r\nX-Forwarded-Proto: ",
                        client.scheme,
                        b"\r\n",
                        _framing(s, body_filtered),
                        b"\r\n",
                    ]
                else:
                    tail = [
                        b"X-Forwarded-For: ",
                        xff,
                        b"\r\nX-Forwarded-Proto: ",
                        client.scheme,
                        b"\r\nX-Forwarded-Host: ",
                        host,
                        b"\r\n",
                        _framing(s, body_filtered),
                        b"\r\n",
                    ]
                return b"".join((s.method, b" ", s.url, b" HTTP/1.1\r\n", *s.fwd, *tail))
            req = upstream_request(s, client, peer)
        return req.encode_head()[:-2] + _framing(s, body_filtered) + b"\r\n"

    def start(
        self, handler: ResponseHandler, head: bytes, head_only: bool, read_timeout: float
    ) -> None:
        """Sends a request head; the response goes to ``handler``."""
        self.handler = handler
        self.head_only = head_only
        self.status = 0
        self.complete = False
        self.got_bytes = False
        self.requests += 1
        self.pool.requests += 1
        self.read_timeout = read_timeout
        self.deadline = time.monotonic() + read_timeout
        self.pool.busy.add(self)
        self.transport.write(head)  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        """Sends request body bytes as they are."""
        self.transport.write(data)  # type: ignore[union-attr]

    def send_body(self, data: bytes) -> None:
        """Sends a piece of the request body, as a chunk when the head said chunked."""
        if self.chunked_body:
            self.transport.writelines(  # type: ignore[union-attr]
                (b"%x\r\n" % len(data), data, b"\r\n")
            )
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def end_body(self) -> None:
        """The request body is complete: the last chunk, when chunked."""
        if self.chunked_body:
            self.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]

    def release(self) -> None:
        """The exchange ended cleanly (or never began): back to the pool."""
        self.pool.put(self)

    def failure(self, exc: BaseException | None) -> ProxyError:
        """What a failure reported to the handler (``upstream_failed``) means: a late
        response, an invalid one, or a connection that closed (retryable if no byte of a
        response came and the connection was reused); a :class:`ProxyError` (a write timeout)
        is itself."""
        if isinstance(exc, ProxyError):
            return exc
        if isinstance(exc, TimeoutError):
            return upstream_error(ErrorKind.READ_TIMEOUT, exc)
        if isinstance(exc, httptools.HttpParserError):
            return upstream_error(ErrorKind.INVALID_RESPONSE, exc)
        return upstream_error(
            ErrorKind.CONNECTION_CLOSED,
            exc or "closed before a response",
            RetryType.IF_REUSED if not self.got_bytes else RetryType.NEVER,
        )

    def pause_reading(self) -> None:
        if not self.closed and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if not self.closed and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _finish(self) -> None:
        handler = self.handler
        self.handler = None
        self.pool.busy.discard(self)
        if self.write_timer is not None:
            self._disarm()
        if self.head_only and self.keep_alive:
            # The parser may still expect a body the origin will never send.
            self.parser = httptools.HttpResponseParser(self)
        if handler is not None:
            handler.upstream_done(self)

    def _fail(self, exc: BaseException) -> None:
        handler = self.handler
        self.handler = None
        self.pool.busy.discard(self)
        self.close()
        if handler is not None:
            handler.upstream_failed(self, exc)

    def timed_out(self) -> None:
        """Called by the sweeper when no byte arrived within the read timeout."""
        self._fail(TimeoutError("upstream read timeout"))

    def detach(self) -> None:
        """Forgets the exchange (the client went away); the connection is closed."""
        self.handler = None
        self.pool.busy.discard(self)
        self.close()

    def close(self) -> None:
        if self.write_timer is not None:
            self._disarm()
        if not self.closed:
            self.closed = True
            self.pool.discard(self)
            if self.transport is not None:
                self.transport.close()

    def went_idle(self) -> float:
        """The exchange ended and the connection waits in a pool: reading resumes (an idle
        connection is watched, and must be read to notice the origin closing it), and the
        connection remembers since when, which it returns (``time.monotonic()``)."""
        if self.reading_paused:
            self.resume_reading()
        now = self.idle_since = time.monotonic()
        return now

    def donatable(self) -> bool:
        """True when the connection may move to another process: idle, plaintext HTTP/1.1,
        nothing buffered either way."""
        t = self.transport
        return (
            not self.closed
            and self.handler is None
            and t is not None
            and not t.is_closing()
            and t.get_write_buffer_size() == 0
            and t.get_extra_info("sslcontext") is None
        )

    def fileno(self) -> int:
        return self.transport.get_extra_info("socket").fileno()  # type: ignore[union-attr]
