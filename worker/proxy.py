"""The proxy engine: drives an app's phases for each request, in Pingora's order.

The request side (filters, peer choice, connect with retries, the upstream request head and
body) is one coroutine per request, :meth:`Engine.run`. For an app whose phases are all plain
``def``, that coroutine is stepped by hand (:func:`_step`) instead of being wrapped in a Task:
with a pooled connection it finishes without ever suspending, so a request costs no task and no
loop iteration. An app with ``async def`` phases gets a real Task per request, so its code sees
``asyncio.current_task()`` and timeouts as usual. The response side is callbacks from the
upstream connection (worker/h1_server.py).

Which request a log line belongs to (:func:`current_session`, read by
:class:`RequestLogFilter` on the error log's handler) is known two ways, each the cheapest for
its path. Code the engine runs synchronously for a request (each hand-stepped
:func:`_step`, each phase called from a connection's callback) runs with the module variable
``_current`` set to that session, and the previous value put back after: two assignments, no
allocation, and a coroutine stepped by hand is covered at every resumption since each one goes
through :func:`_step`. A Task cannot be hooked at each resumption, so each Task the engine makes
for a request starts in a context whose :data:`_task_session` holds the session (tasks the
app starts from a phase inherit it, as contextvars do); the variable is not set outside
those Tasks, since a context left holding a session would lend it to whatever is created in
it (a pooled upstream connection made while serving one request serves many, which is why
connections are made in a context of their own). ``_current`` wins when both are set: it is
set only while the engine runs code for that session right now.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from shared.app import ProxyHttp, is_async, overridden_phases
from shared.config import Config
from shared.errors import ErrorKind, ErrorSource, ProxyError, downstream_error
from shared.headers import RawHeaders, RequestHeader, ResponseHeader
from shared.peer import HttpPeer, format_address
from shared.session import Session
from worker.accesslog import AccessLog
from worker.connector.connector import Connector
from worker.connector.pool import Pool
from worker.http import status_line
from worker.interfaces import Downstream, DownstreamConn, Upstream
from worker.log_throttle import LogThrottle
from worker.upstream_h2 import UpstreamH2Stream

if TYPE_CHECKING:
    from collections.abc import Coroutine

#: Methods whose request may be sent twice without changing its meaning (RFC 9110 9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
#: Request headers the proxy strips from the upstream request (hop-by-hop or rewritten).
_UPSTREAM_DROP = ("connection", "keep-alive", "proxy-connection", "te", "trailer",
                  "transfer-encoding", "upgrade", "expect", "content-length",
                  "x-forwarded-proto", "x-forwarded-host", "x-forwarded-for", "http2-settings")
#: Request headers not sent to an HTTP/2 upstream (connection-specific, RFC 9113 8.2.2;
#: Host becomes :authority).
_H2_UPSTREAM_DROP = frozenset({"host", "connection", "keep-alive", "proxy-connection", "te",
                               "transfer-encoding", "upgrade", "content-length"})
#: An idle connection of a draining worker is closed after idling this long (seconds).
DRAIN_IDLE_SECONDS = 1.0

# The request a log line belongs to (see the module docstring).
_current: Session | None = None
_task_session: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "tenaya_session", default=None)
"""The session of the engine's Task running now (apps with ``async def`` phases)."""


def current_session() -> Session | None:
    """The request whose phase (or engine code) runs now in this thread, or None outside
    any request. In a thread other than the event loop's, only a context copied from a
    request's Task (``asyncio.to_thread``) says so."""
    s = _current
    return s if s is not None else _task_session.get()


class RequestLogFilter(logging.Filter):
    """Puts the current request's id on each record that reaches the handler it is added to:
    ``record.request_id`` (the id, or None outside a request) and ``record.request_tag``
    (``"[req ID] "``, or ``""``), for a format such as ``%(request_tag)s%(message)s``.

    Only records logged while the engine runs a request's code get an id; the id is made
    then (:attr:`Session.request_id`), so a request nothing logs for costs nothing. Never
    drops a record.
    """

    def __init__(self) -> None:
        super().__init__()
        self._loop_thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        """Adds ``request_id`` and ``request_tag`` to ``record``; returns True."""
        s = _current if threading.get_ident() == self._loop_thread else None
        if s is None:
            s = _task_session.get()
        if s is None:
            record.request_id = None
            record.request_tag = ""
        else:
            rid = record.request_id = s.request_id
            record.request_tag = f"[req {rid}] "
        return True


def _step(coro: Coroutine[Any, Any, None], s: Session, _fut: Any = None) -> None:
    """Runs ``coro`` (a request's, ``s``) until it waits for a future, and again when that
    future is done; log lines written meanwhile belong to ``s``."""
    global _current
    prev, _current = _current, s
    try:
        fut = coro.send(None)
    except StopIteration:
        return
    finally:
        _current = prev
    if fut is None:  # a bare yield (asyncio.sleep(0))
        asyncio.get_running_loop().call_soon(_step, coro, s)
        return
    fut._asyncio_future_blocking = False
    fut.add_done_callback(partial(_step, coro, s))


class Engine:
    """The per-worker proxy: the app, its phases, the upstream pool, the connections."""

    def __init__(self, app: ProxyHttp, config: Config, access_log: AccessLog | None,
                 log: logging.Logger) -> None:
        self.app = app
        self.config = config
        self.log = log
        self.access_log = access_log
        self.loop = asyncio.get_event_loop()
        phases = overridden_phases(app)
        self.new_ctx = app.new_ctx if type(app).new_ctx is not ProxyHttp.new_ctx else None

        def phase(name: str) -> tuple[Any, bool]:
            m = phases.get(name)
            return m, (m is not None and is_async(m))

        self.p_early_request_filter, self.a_early = phase("early_request_filter")
        self.p_request_filter, self.a_request_filter = phase("request_filter")
        self.p_upstream_peer, self.a_upstream_peer = phase("upstream_peer")
        self.p_connected_to_upstream, self.a_connected = phase("connected_to_upstream")
        self.p_upstream_request_filter, self.a_upstream_request = phase("upstream_request_filter")
        self.p_request_body_filter, self.a_request_body = phase("request_body_filter")
        self.p_upstream_response_filter, _ = phase("upstream_response_filter")
        self.p_response_filter, self.a_response_filter = phase("response_filter")
        self.p_response_body_filter, _ = phase("response_body_filter")
        self.p_logging, self.a_logging = phase("logging")
        self.p_fail_to_connect, _ = phase("fail_to_connect")
        self.p_error_while_proxy, _ = phase("error_while_proxy")
        self.p_fail_to_proxy, self.a_fail_to_proxy = phase("fail_to_proxy")
        self.any_async = any(is_async(m) for m in phases.values())
        self.response_phases = bool(self.p_upstream_response_filter or self.p_response_filter
                                    or self.p_response_body_filter)
        t = config.timeouts
        self.read_timeout = t.upstream_read_seconds
        self.keepalive = t.keepalive_seconds
        self.header_timeout = t.client_header_seconds
        self.max_head = config.limits.max_header_bytes
        self.max_body = config.limits.max_body_bytes
        self.max_retries = config.server.max_retries
        #: Where upstream exchanges come from (pools, broker, new connections).
        self.connector = Connector(self.loop, Pool(config.pool.size_per_worker,
                                                   config.pool.idle_timeout_seconds),
                                   t.upstream_connect_seconds)
        #: The connector's pool of idle HTTP/1.1 connections (its counters are the
        #: heartbeat's).
        self.pool = self.connector.pool
        self.connections: set[DownstreamConn] = set()
        self.draining = False
        #: Lets the log line of a protection that fires through once per client and reason
        #: a minute (the request-side refusals here, the HTTP/2 server's).
        self.log_throttle = LogThrottle()
        # Counters
        self.requests = 0
        self.active_requests = 0

    # -- drivers -------------------------------------------------------------------------

    def drive(self, coro: Coroutine[Any, Any, None], s: Session) -> None:
        """Runs ``coro``, code of request ``s``: in a Task whose context holds ``s`` for an app
        with async phases, else stepped by hand (:func:`_step`)."""
        if self.any_async:
            token = _task_session.set(s)
            try:
                self.loop.create_task(coro)  # the task's context is a copy of this one
            finally:
                _task_session.reset(token)
        else:
            _step(coro, s)

    def start(self, conn: Downstream, s: Session) -> None:
        """A request head is complete and its turn has come."""
        self.active_requests += 1
        self.drive(self.run(conn, s), s)

    # -- the request side ----------------------------------------------------------------

    async def run(self, conn: Downstream, s: Session) -> None:
        try:
            ctx = s.ctx = self.new_ctx() if self.new_ctx is not None else None
            if s.error is not None:
                raise s.error
            if s.method == b"CONNECT":
                raise downstream_error(ErrorKind.METHOD_NOT_ALLOWED, "CONNECT is not enabled")
            if self.p_early_request_filter is not None:
                r = self.p_early_request_filter(s, ctx)
                if self.a_early:
                    await r
            if self.p_request_filter is not None:
                r = self.p_request_filter(s, ctx)
                if self.a_request_filter:
                    r = await r
                if r:
                    if not s.response_started:
                        raise ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL,
                                         cause="request_filter returned True but wrote nothing")
                    conn.finish(s)
                    return
            await self.proxy_to_upstream(conn, s)
        except ProxyError as e:
            self.fail(conn, s, e)
        except Exception as e:
            self.log.exception("app error on %s %s", s.method.decode("latin-1"),
                               s.url[:200].decode("latin-1"))
            self.fail(conn, s, ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL, cause=e))

    async def proxy_to_upstream(self, conn: Downstream, s: Session) -> None:
        """Chooses a peer, gets a connection and sends the request (retrying what may be)."""
        ctx = s.ctx
        connector = self.connector
        while True:
            peer = self.p_upstream_peer(s, ctx)  # type: ignore[misc]
            if self.a_upstream_peer:
                peer = await peer
            try:
                up, reused = await connector.acquire(peer)
            except ProxyError as e:
                if self.p_fail_to_connect is not None:
                    e = self.p_fail_to_connect(s, peer, e, ctx)
                if e.retryable() and s.retries < self.max_retries:
                    s.retries += 1
                    continue
                s.peer = peer
                raise
            break
        if conn.closing:
            self.connector.give_back(up)
            return
        s.peer = peer
        s.upstream_reused = reused
        if self.p_connected_to_upstream is not None:
            r = self.p_connected_to_upstream(s, reused, peer, ctx)
            if self.a_connected:
                await r
        head: Any
        if self.p_upstream_request_filter is not None or s._req_header is not None:
            req = await self.filtered_request(conn, s, peer)
            head = (self.h2_fields(req, s, peer) if peer.options.http2
                    else req.encode_head()[:-2] + self._framing(s) + b"\r\n")
        elif peer.options.http2:
            head = self.h2_fields(self.plain_request(conn, s, peer), s, peer)
        else:
            head = self.request_head(conn, s, peer)
        read_timeout = peer.options.read_timeout or self.read_timeout
        body_error = s._body_error
        if body_error is not None:
            # The body failed (malformed, over the limit) before the head went up, in the read
            # that brought the head or while a connection was made: the origin gets nothing
            # of a refused request, and the connection stays as good as it was.
            self.connector.give_back(up)
            raise body_error
        conn.attach(s, up, head, read_timeout)
        if s.has_body:
            await self.send_body(conn, s, up)

    def retry(self, conn: Downstream, s: Session) -> None:
        """Sends the request again after its reused connection died before answering."""
        self.drive(self._retry(conn, s), s)

    async def _retry(self, conn: Downstream, s: Session) -> None:
        try:
            await self.proxy_to_upstream(conn, s)
        except ProxyError as e:
            self.fail(conn, s, e)
        except Exception as e:
            self.log.exception("app error on %s %s (retry)", s.method.decode("latin-1"),
                               s.url[:200].decode("latin-1"))
            self.fail(conn, s, ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL, cause=e))

    @property
    def connect(self) -> Callable[[HttpPeer], Awaitable[Upstream]]:
        """The connector's step that makes a new connection (an HTTP/2 one gives a stream on
        it); raises :class:`ProxyError`. Assignable: a test harness stands its own origin in
        for the network here."""
        return self.connector.connect

    @connect.setter
    def connect(self, fn: Callable[[HttpPeer], Awaitable[Upstream]]) -> None:
        self.connector.connect = fn

    def _framing(self, s: Session) -> bytes:
        if s.upgrade is not None:
            return b"Connection: Upgrade\r\nUpgrade: " + s.upgrade + b"\r\n"
        if s.chunked or (self.p_request_body_filter is not None and s.has_body):
            return b"Transfer-Encoding: chunked\r\n"
        if s.content_length is not None:
            return b"Content-Length: %d\r\n" % s.content_length
        return b""

    def request_head(self, conn: Downstream, s: Session, peer: HttpPeer) -> bytes:
        """The upstream request head, from the request as parsed (fast path)."""
        ip = conn.client_ip
        xff = ip if s.xff is None else s.xff + b", " + ip
        host = s.host_b
        if host is None:
            tail = [b"Host: ", str(peer).encode(), b"\r\nX-Forwarded-For: ", xff,
                    b"\r\nX-Forwarded-Proto: ", conn.scheme, b"\r\n", self._framing(s),
                    b"\r\n"]
        else:
            tail = [b"X-Forwarded-For: ", xff, b"\r\nX-Forwarded-Proto: ", conn.scheme,
                    b"\r\nX-Forwarded-Host: ", host, b"\r\n", self._framing(s), b"\r\n"]
        return b"".join((s.method, b" ", s.url, b" HTTP/1.1\r\n", *s.fwd, *tail))

    def plain_request(self, conn: Downstream, s: Session, peer: HttpPeer) -> RequestHeader:
        """The upstream request as an object (hop-by-hop headers out, X-Forwarded-* in)."""
        src = s.req_header
        req = RequestHeader(src.method, src.path, "1.1", src.items())
        tokens = [t.decode("latin-1") for t in s.conn_tokens or ()]
        for name in (*_UPSTREAM_DROP, *tokens):
            req.remove(name)
        client = conn.client_addr[0]
        prior = src.get_all("x-forwarded-for")
        req.append("X-Forwarded-For", ", ".join([*prior, client]))
        req.append("X-Forwarded-Proto", conn.scheme.decode())
        host = src.get("host")
        if host is None:
            req.append("Host", format_address(peer.host, peer.port))
        else:
            req.append("X-Forwarded-Host", host)
        return req

    async def filtered_request(self, conn: Downstream, s: Session, peer: HttpPeer
                               ) -> RequestHeader:
        """The upstream request through ``upstream_request_filter``."""
        req = self.plain_request(conn, s, peer)
        if self.p_upstream_request_filter is not None:
            r = self.p_upstream_request_filter(s, req, s.ctx)
            if self.a_upstream_request:
                await r
        for name in ("content-length", "transfer-encoding"):
            req.remove(name)
        return req

    @staticmethod
    def h2_fields(req: RequestHeader, s: Session, peer: HttpPeer) -> list[tuple[bytes, bytes]]:
        """The upstream request as HTTP/2 header fields (lower-case names, pseudo-headers)."""
        authority = req.get("host") or format_address(peer.host, peer.port)
        fields = [(b":method", req.method.encode()), (b":scheme", b"https" if peer.tls
                                                       else b"http"),
                  (b":authority", authority.encode("latin-1")),
                  (b":path", req.path.encode("latin-1"))]
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

    async def send_body(self, conn: Downstream, s: Session, up: Upstream) -> None:
        """Streams the request body upstream, pausing while the upstream is not writable."""
        h2 = up.h2
        chunked = not h2 and (s.chunked or self.p_request_body_filter is not None)
        body_filter = self.p_request_body_filter
        while True:
            chunk = await s.read_body_chunk()
            if conn.up is not up or up.closed:
                return
            end = not chunk
            if body_filter is not None:
                r = body_filter(s, chunk, end, s.ctx)
                if self.a_request_body:
                    r = await r
                if r is not None:
                    chunk = r
            if chunk:
                if chunked:
                    up.transport.writelines(  # type: ignore[union-attr]
                        (b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    up.write(chunk)
            if end:
                if chunked:
                    up.write(b"0\r\n\r\n")
                elif isinstance(up, UpstreamH2Stream):
                    up.end()
                s.body_sent = True
                return
            if up.write_paused:
                await conn.wait_upstream_writable()

    # -- the response side ---------------------------------------------------------------

    def response_head(self, conn: Downstream, s: Session, up: Upstream, status: int,
                      headers: RawHeaders) -> None:
        """The upstream response head, through the response phases the app overrides."""
        global _current
        prev, _current = _current, s
        try:
            resp = ResponseHeader(status, [(n.decode("latin-1"), v.decode("latin-1"))
                                           for n, v in headers])
            try:
                if self.p_upstream_response_filter is not None:
                    self.p_upstream_response_filter(s, resp, s.ctx)
                if self.p_response_filter is not None:
                    r = self.p_response_filter(s, resp, s.ctx)
                    if self.a_response_filter:
                        up.pause_reading()
                        conn.held = []
                        self.drive(self._finish_response_filter(conn, s, up, r, resp), s)
                        return
            except Exception as e:
                self._phase_failed(conn, s, up, e)
                return
            self._write_filtered_head(conn, s, resp)
        finally:
            _current = prev

    async def _finish_response_filter(self, conn: Downstream, s: Session, up: Upstream,
                                      pending: Any, resp: ResponseHeader) -> None:
        try:
            await pending
        except Exception as e:
            self._phase_failed(conn, s, up, e)
            return
        if conn.closing:
            conn.held = conn.held_done = None
            return
        self._write_filtered_head(conn, s, resp)
        if conn.held_done is not None or not conn.write_paused:
            up.resume_reading()
        conn.release_held()

    def _write_filtered_head(self, conn: Downstream, s: Session, resp: ResponseHeader) -> None:
        fields = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in resp]
        conn.write_head(s, status_line(resp.status, resp.reason), fields,
                        self.p_response_body_filter is not None)

    def _phase_failed(self, conn: Downstream, s: Session, up: Upstream, e: Exception) -> None:
        self.log.exception("response phase failed", exc_info=e)
        conn.up = None
        conn.held = conn.held_done = None
        up.detach()
        self.fail(conn, s, ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL, cause=e))

    def body_filter(self, s: Session, data: bytes, end: bool) -> bytes:
        """Runs ``response_body_filter`` on one piece of the response body."""
        global _current
        prev, _current = _current, s
        try:
            r = self.p_response_body_filter(s, data, end, s.ctx)  # type: ignore[misc]
        finally:
            _current = prev
        return data if r is None else r

    # -- failures and the end of a request -------------------------------------------------

    def upstream_failed(self, conn: Downstream, s: Session, err: ProxyError) -> None:
        """The upstream failed before the response started."""
        global _current
        if (err.retryable() and s.method in IDEMPOTENT and not s.has_body
                and s.retries < self.max_retries):
            s.retries += 1
            self.retry(conn, s)
            return
        prev, _current = _current, s
        try:
            if self.p_error_while_proxy is not None and s.peer is not None:
                try:
                    err = self.p_error_while_proxy(s, s.peer, err, s.ctx)
                except Exception:
                    self.log.exception("error_while_proxy failed")
            self.fail(conn, s, err)
        finally:
            _current = prev

    def fail(self, conn: Downstream, s: Session, err: ProxyError) -> None:
        """Answers ``s`` with an error response (through ``fail_to_proxy``) and ends it."""
        global _current
        prev, _current = _current, s
        try:
            self._fail(conn, s, err)
        finally:
            _current = prev

    def _fail(self, conn: Downstream, s: Session, err: ProxyError) -> None:
        s.error = err
        up = conn.up
        if up is not None and conn.active is s:
            # The upstream exchange can't complete (its request body, say, was refused).
            conn.up = None
            up.detach()
        if err.source is ErrorSource.DOWNSTREAM or (s.has_body and not s.body_done):
            s.keep_alive = False
        if err.source is not ErrorSource.DOWNSTREAM:
            level = logging.WARNING if err.source is ErrorSource.UPSTREAM else logging.INFO
            self.log.log(level, "%s %s: %s", s.method.decode("latin-1"),
                         s.url[:200].decode("latin-1"), err)
        elif err.kind is not ErrorKind.DOWNSTREAM_CLOSED:
            # A request refused: once per client and kind a minute (a client's flood of bad
            # requests must not become a flood of lines).
            client = conn.client_addr[0]
            held = self.log_throttle.allow(client, err.kind.name)
            if held is not None:
                self.log.info("%s %s from %s: %s%s", s.method.decode("latin-1"),
                              s.url[:200].decode("latin-1"), client, err,
                              f" (and {held} more from this client since the last line)"
                              if held else "")
        if self.p_fail_to_proxy is None:
            self._default_error_response(conn, s, err)
            conn.finish(s)
            return
        try:
            r = self.p_fail_to_proxy(s, err, s.ctx)
        except Exception:
            self.log.exception("fail_to_proxy failed")
            self._default_error_response(conn, s, err)
            conn.finish(s)
            return
        if self.a_fail_to_proxy:
            self.drive(self._finish_fail(conn, s, err, r), s)
            return
        conn.finish(s)

    async def _finish_fail(self, conn: Downstream, s: Session, err: ProxyError, r: Any) -> None:
        try:
            await r
        except Exception:
            self.log.exception("fail_to_proxy failed")
            self._default_error_response(conn, s, err)
        conn.finish(s)

    @staticmethod
    def _default_error_response(conn: Downstream, s: Session, err: ProxyError) -> None:
        if not s.response_started:
            status = err.status
            if err.source is ErrorSource.DOWNSTREAM:
                s.keep_alive = False
            conn.respond(s, status, None, f"{status} {err.text}\n".encode())
        else:
            s.keep_alive = False
            conn.close()

    def request_done(self, s: Session) -> None:
        """Every request ends here once: the access log and the ``logging`` phase."""
        global _current
        self.requests += 1
        self.active_requests -= 1
        if self.access_log is not None:
            self.access_log.write(s)
        if self.p_logging is not None:
            prev, _current = _current, s
            try:
                r = self.p_logging(s, s.error, s.ctx)
                if self.a_logging:
                    self.drive(r, s)
            except Exception:
                self.log.exception("logging phase failed")
            finally:
                _current = prev

    # -- housekeeping --------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Once a second (more often while draining): idle and timed-out connections."""
        self.connector.sweep(now)
        for conn in list(self.connections):
            conn.idle_check(now, self.keepalive, DRAIN_IDLE_SECONDS)

    def drain(self) -> None:
        """Graceful stop: every connection closes after its current response."""
        self.draining = True
        for conn in list(self.connections):
            conn.drain()
