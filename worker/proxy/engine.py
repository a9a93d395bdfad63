"""The proxy engine: drives an app's phases for each request, in Pingora's order.

The request side (filters, peer choice, connect with retries, the upstream request head and
body) is one coroutine per request, :meth:`Engine.run`; the class docstring lists every phase
in order, and where it runs. For an app whose phases are all plain
``def``, that coroutine is stepped by hand (:func:`_step`) instead of being wrapped in a Task:
with a pooled connection it finishes without ever suspending, so a request costs no task and no
loop iteration. An app with ``async def`` phases gets a real Task per request, so its code sees
``asyncio.current_task()`` and timeouts as usual. The response side is callbacks from the
upstream connection through the downstream exchange (worker/server/exchange.py).

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
from shared.errors import (
    ErrorKind,
    ErrorSource,
    ProxyError,
    RetryType,
    circuit_open,
    downstream_error,
)
from shared.headers import RawHeaders, RequestHeader, ResponseHeader
from shared.peer import HttpPeer
from shared.session import Session
from worker.accesslog import AccessLog
from worker.connector.connector import Connector
from worker.connector.pool import Pool
from worker.http import status_line, upstream_request
from worker.interfaces import Downstream, DownstreamConn, Upstream
from worker.log_throttle import LogThrottle

if TYPE_CHECKING:
    from collections.abc import Coroutine

#: Methods whose request may be sent twice without changing its meaning (RFC 9110 9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
#: An idle connection of a draining worker is closed after idling this long (seconds).
DRAIN_IDLE_SECONDS = 1.0

# The request a log line belongs to (see the module docstring).
_current: Session | None = None
_task_session: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "tenaya_session", default=None
)
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
    """The per-worker proxy: the app, its phases, the upstream connector, the connections.

    One request's phases, in Pingora's order (``docs/user_guide/phase_chart.md``); each runs
    only when the app overrides it (looked up once, here):

    - the request side, :meth:`run` (one coroutine, stepped by hand when no phase is async):
      ``early_request_filter`` → ``request_filter`` (True: the app answered) →
      ``upstream_peer`` → connect (:meth:`Connector.acquire
      <worker.connector.connector.Connector.acquire>`; on failure ``fail_to_connect``, then
      the retry loop) → ``connected_to_upstream`` → ``upstream_request_filter`` → the head
      in the peer's protocol (:meth:`Upstream.request_head
      <worker.interfaces.Upstream.request_head>`) → ``request_body_filter`` on each chunk
      (:meth:`send_body`);
    - the response side, called back by the upstream through the downstream exchange:
      ``upstream_response_filter`` and ``response_filter`` (:meth:`response_head`) →
      ``response_body_filter`` on each piece (:meth:`body_filter`) → ``logging``
      (:meth:`request_done`, once per request whatever happened);
    - on failure: an upstream that fails before the response starts goes through
      ``error_while_proxy``, then back to the retry loop when the error it returns allows
      (:meth:`upstream_failed`); else ``fail_to_proxy`` (:meth:`fail`) writes the error
      response.
    """

    def __init__(
        self, app: ProxyHttp, config: Config, access_log: AccessLog | None, log: logging.Logger
    ) -> None:
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
        self.response_phases = bool(
            self.p_upstream_response_filter or self.p_response_filter or self.p_response_body_filter
        )
        t = config.timeouts
        self.read_timeout = t.upstream_read_seconds
        self.keepalive = t.keepalive_seconds
        self.header_timeout = t.client_header_seconds
        self.max_head = config.limits.max_header_bytes
        self.max_body = config.limits.max_body_bytes
        self.max_retries = config.server.max_retries
        #: Where upstream exchanges come from (pools, broker, new connections).
        self.connector = Connector(
            self.loop,
            Pool(config.pool.size_per_worker, config.pool.idle_timeout_seconds),
            t.upstream_connect_seconds,
            t.upstream_write_seconds,
        )
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

    async def run(self, conn: Downstream, s: Session, retry: bool = False) -> None:
        """The request side of ``s``, phase by phase in Pingora's order; ``retry``: again,
        after its upstream failed before answering (:meth:`upstream_failed`), from
        ``upstream_peer`` on. The response side runs as the response arrives (see the
        class docstring)."""
        try:
            if not retry:
                ctx = s.ctx = self.new_ctx() if self.new_ctx is not None else None
                if s.error is not None:
                    raise s.error
                if s.method == b"CONNECT":
                    raise downstream_error(ErrorKind.METHOD_NOT_ALLOWED, "CONNECT is not enabled")
                # 1. early_request_filter
                if self.p_early_request_filter is not None:
                    r = self.p_early_request_filter(s, ctx)
                    if self.a_early:
                        await r
                # 2. request_filter: True when the app answered by itself
                if self.p_request_filter is not None:
                    r = self.p_request_filter(s, ctx)
                    if self.a_request_filter:
                        r = await r
                    if r:
                        if not s.response_started:
                            raise ProxyError(
                                ErrorKind.INTERNAL,
                                ErrorSource.INTERNAL,
                                cause="request_filter returned True but wrote nothing",
                            )
                        conn.finish(s)
                        return
            # The retry loop (Pingora's process_request): a failure to connect goes round
            # here; one after the request went up comes back through upstream_failed.
            ctx = s.ctx
            while True:
                # 3. upstream_peer
                peer = self.p_upstream_peer(s, ctx)
                if self.a_upstream_peer:
                    peer = await peer
                # In flight to the peer from now until this attempt is over (a balancer's
                # peer: least_conn counts it): counted here, where every attempt passes, and
                # ended here on a retry or in request_done, which every request reaches once.
                # A request already over (its client gone meanwhile) is not counted.
                # The upstream's guard (a balancer's peer) counts the request too, and refuses
                # it at once (503) while the fleet has max_requests in flight.
                counted = s.in_flight
                if counted is not None:
                    s.in_flight = None
                    counted.cells[counted.index] -= 1
                    g = counted.guard
                    if g is not None:
                        g.cells[g.base] -= 1
                counted = peer.in_flight
                if counted is not None and not s.response_done:
                    g = counted.guard
                    if g is not None:
                        if sum(g.requests) >= g.max_requests:
                            s.peer = peer
                            raise circuit_open(g.name, "max_requests", g.max_requests)
                        g.cells[g.base] += 1
                    counted.cells[counted.index] += 1
                    s.in_flight = counted
                # 4. connect: the pools, the broker, or a new connection
                try:
                    up, reused = await self.connector.acquire(peer)
                except ProxyError as e:
                    if self.p_fail_to_connect is not None:
                        e = self.p_fail_to_connect(s, peer, e, ctx)
                    if self.may_retry(s, e, sent=False) and self.retry_allowed(s, peer, e):
                        continue
                    s.peer = peer
                    raise
                break
            if conn.closing:
                up.release()
                return
            s.peer = peer
            s.upstream_reused = reused
            # 5. connected_to_upstream
            if self.p_connected_to_upstream is not None:
                r = self.p_connected_to_upstream(s, reused, peer, ctx)
                if self.a_connected:
                    await r
            # 6. upstream_request_filter, on the upstream request as an object
            req: RequestHeader | None = None
            if self.p_upstream_request_filter is not None:
                req = upstream_request(s, conn, peer)
                r = self.p_upstream_request_filter(s, req, s.ctx)
                if self.a_upstream_request:
                    await r
                for name in ("content-length", "transfer-encoding"):
                    req.remove(name)
            # The head in the peer's protocol (HTTP/1.1 from the parsed request when no
            # phase made it an object).
            head = up.request_head(s, req, conn, peer, self.p_request_body_filter is not None)
            body_error = s._body_error
            if body_error is not None:
                # The body failed (malformed, over the limit) before the head went up, in the
                # read that brought the head or while a connection was made: the origin gets
                # nothing of a refused request, and the connection stays as good as it was.
                up.release()
                raise body_error
            conn.attach(s, up, head, peer.options.read_timeout or self.read_timeout)
            # 7. request_body_filter, on each chunk of the body on its way up
            if s.has_body:
                await self.send_body(conn, s, up)
            # 8. The response phases run as the response arrives: response_head
            # (upstream_response_filter, response_filter), body_filter (response_body_filter),
            # request_done (logging).
        except ProxyError as e:
            self.fail(conn, s, e)
        except Exception as e:
            self.log.exception(
                "app error on %s %s%s",
                s.method.decode("latin-1"),
                s.url[:200].decode("latin-1"),
                " (retry)" if retry else "",
            )
            self.fail(conn, s, ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL, cause=e))

    def may_retry(self, s: Session, err: ProxyError, sent: bool) -> bool:
        """The one retry decision: ``err`` allows it (its retry type, and whether the failed
        connection was reused), ``server.max_retries`` is not reached, and, once the request
        went up (``sent``), it has no body (a body is not kept, so it cannot be sent twice).
        Whether a method may be sent twice is decided before, in the error's retry type
        (:meth:`classify`), which ``error_while_proxy`` may change."""
        if sent and s.has_body:
            return False
        return err.retryable() and s.retries < self.max_retries

    @staticmethod
    def classify(s: Session, err: ProxyError) -> None:
        """The default retry type of a failure after the request went up, before
        ``error_while_proxy`` sees it (nginx's ``proxy_next_upstream error timeout``): a
        connection that closed before any response byte, or a read timeout, is retried
        (``ALWAYS``) for an idempotent request without a body (RFC 9110 9.2.2), on a fresh
        connection as on a pooled one; any other request is not (``NEVER``) unless the app
        says so."""
        if s.method not in IDEMPOTENT or s.has_body:
            err.retry = RetryType.NEVER
        elif err.kind is ErrorKind.READ_TIMEOUT or (
            err.kind is ErrorKind.CONNECTION_CLOSED and err.retry is RetryType.IF_REUSED
        ):
            err.retry = RetryType.ALWAYS

    def retry_allowed(self, s: Session, peer: HttpPeer, err: ProxyError) -> bool:
        """The fleet's retry budget for a retry :meth:`may_retry` allows: at most 20% of the
        upstream's requests in flight are retries, at least 3 (Envoy's retry budget,
        :class:`shared.lb.fleet.Guard`). Within it, the request is counted as a retry (once,
        until it ends), ``peer`` goes to ``s.tried`` (the balancer skips it next) and
        ``s.retries`` grows; over it, the retry is not made and a line is logged. A peer
        without a guard (made by hand) has no budget."""
        counted = peer.in_flight
        g = counted.guard if counted is not None else None
        if g is not None:
            if not g.retry_allowed(s.retry_guard is not None):
                self.log.warning(
                    "%s %s: not retried, upstream %s's retry budget (%d retries in flight) is "
                    "spent: %s",
                    s.method.decode("latin-1"),
                    s.url[:200].decode("latin-1"),
                    g.name,
                    g.retry_budget(),
                    err,
                )
                return False
            if s.retry_guard is None:
                s.retry_guard = g
                g.cells[g.base + 1] += 1  # RETRIES
        tried = s.tried
        if tried is None:
            s.tried = [peer]
        else:
            tried.append(peer)
        s.retries += 1
        return True

    @property
    def connect(self) -> Callable[[HttpPeer], Awaitable[Upstream]]:
        """The connector's step that makes a new connection (an HTTP/2 one gives a stream on
        it); raises :class:`ProxyError`. Assignable: a test harness stands its own origin in
        for the network here."""
        return self.connector.connect

    @connect.setter
    def connect(self, fn: Callable[[HttpPeer], Awaitable[Upstream]]) -> None:
        self.connector.connect = fn

    async def send_body(self, conn: Downstream, s: Session, up: Upstream) -> None:
        """Streams the request body upstream through ``request_body_filter``, pausing while
        the upstream is not writable; returns early once the exchange is over (the upstream
        failed meanwhile, a write timeout say, and the request was answered)."""
        body_filter = self.p_request_body_filter
        while True:
            try:
                chunk = await s.read_body_chunk()
            except ProxyError:
                if conn.up is not up or up.closed:
                    return  # the exchange failed (a write timeout) and was answered
                raise
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
                up.send_body(chunk)
            if end:
                up.end_body()
                s.body_sent = True
                return
            if up.write_paused:
                await conn.wait_upstream_writable()
                if conn.up is not up or up.closed:
                    return

    # -- the response side ---------------------------------------------------------------

    def response_head(
        self, conn: Downstream, s: Session, up: Upstream, status: int, headers: RawHeaders
    ) -> None:
        """The upstream response head, through the response phases the app overrides."""
        global _current
        prev, _current = _current, s
        try:
            resp = ResponseHeader(
                status, [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
            )
            try:
                if self.p_upstream_response_filter is not None:
                    self.p_upstream_response_filter(s, resp, s.ctx)
                if self.p_response_filter is not None:
                    r = self.p_response_filter(s, resp, s.ctx)
                    if self.a_response_filter:
                        up.pause_reading()
                        conn.hold_body()
                        self.drive(self._finish_response_filter(conn, s, up, r, resp), s)
                        return
            except Exception as e:
                self._phase_failed(conn, s, up, e)
                return
            self._write_filtered_head(conn, s, resp)
        finally:
            _current = prev

    async def _finish_response_filter(
        self, conn: Downstream, s: Session, up: Upstream, pending: Any, resp: ResponseHeader
    ) -> None:
        try:
            await pending
        except Exception as e:
            self._phase_failed(conn, s, up, e)
            return
        if conn.closing:
            conn.drop_held()
            return
        self._write_filtered_head(conn, s, resp)
        if conn.held_done is not None or not conn.write_paused:
            up.resume_reading()
        conn.release_held()

    def _write_filtered_head(self, conn: Downstream, s: Session, resp: ResponseHeader) -> None:
        fields = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in resp]
        conn.write_head(
            s,
            status_line(resp.status, resp.reason),
            fields,
            self.p_response_body_filter is not None,
        )

    def _phase_failed(self, conn: Downstream, s: Session, up: Upstream, e: Exception) -> None:
        self.log.exception("response phase failed", exc_info=e)
        conn.forget_upstream()
        conn.drop_held()
        up.detach()
        self.fail(conn, s, ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL, cause=e))

    def body_filter(self, s: Session, data: bytes, end: bool) -> bytes:
        """Runs ``response_body_filter`` on one piece of the response body."""
        global _current
        prev, _current = _current, s
        try:
            r = self.p_response_body_filter(s, data, end, s.ctx)
        finally:
            _current = prev
        return data if r is None else r

    # -- failures and the end of a request -------------------------------------------------

    def upstream_failed(self, conn: Downstream, s: Session, err: ProxyError) -> None:
        """The upstream failed before the response started: ``error_while_proxy`` sees the
        error first and may change it (its ``retry`` above all), then the retry decision
        (:meth:`may_retry`) is taken on what it returned, as Pingora's ``proxy_h1`` hands the
        error to the phase before ``process_request`` decides."""
        global _current
        prev, _current = _current, s
        try:
            self.classify(s, err)
            if self.p_error_while_proxy is not None and s.peer is not None:
                try:
                    r = self.p_error_while_proxy(s, s.peer, err, s.ctx)
                except Exception:
                    self.log.exception("error_while_proxy failed")
                else:
                    if isinstance(r, ProxyError):
                        err = r
                    else:
                        self.log.error("error_while_proxy returned %r, not a ProxyError", r)
            peer = s.peer
            if (
                self.may_retry(s, err, sent=True)
                and peer is not None
                and self.retry_allowed(s, peer, err)
            ):
                self.drive(self.run(conn, s, retry=True), s)
                return
            self.fail(conn, s, err)
        finally:
            _current = prev

    def refuse(self, conn: Downstream, s: Session, err: ProxyError) -> None:
        """A request the downstream protocol refuses before its turn (unparseable, or its
        head too slow): counted as started, then answered as :meth:`fail` answers."""
        self.active_requests += 1
        self.fail(conn, s, err)

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
            conn.forget_upstream()
            up.detach()
        if err.source is ErrorSource.DOWNSTREAM or (s.has_body and not s.body_done):
            s.keep_alive = False
        if err.source is not ErrorSource.DOWNSTREAM:
            level = logging.WARNING if err.source is ErrorSource.UPSTREAM else logging.INFO
            self.log.log(
                level, "%s %s: %s", s.method.decode("latin-1"), s.url[:200].decode("latin-1"), err
            )
        elif err.kind is not ErrorKind.DOWNSTREAM_CLOSED:
            # A request refused: once per client and kind a minute (a client's flood of bad
            # requests must not become a flood of lines).
            client = conn.client_addr[0]
            held = self.log_throttle.allow(client, err.kind.name)
            if held is not None:
                self.log.info(
                    "%s %s from %s: %s%s",
                    s.method.decode("latin-1"),
                    s.url[:200].decode("latin-1"),
                    client,
                    err,
                    f" (and {held} more from this client since the last line)" if held else "",
                )
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
        counted = s.in_flight
        if counted is not None:
            s.in_flight = None
            counted.cells[counted.index] -= 1
            g = counted.guard
            if g is not None:
                g.cells[g.base] -= 1
        g = s.retry_guard
        if g is not None:
            s.retry_guard = None
            g.cells[g.base + 1] -= 1  # RETRIES
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
