"""The app API: a Python counterpart of Pingora's ``ProxyHttp`` trait.

An app is a subclass of :class:`ProxyHttp` that overrides the phases it needs. The engine calls
them in this order for each request (``ctx`` is the per-request object from :meth:`new_ctx`)::

    early_request_filter -> request_filter (may answer itself) -> upstream_peer
      -> [connect: local pool or new connection; on failure fail_to_connect, maybe retry]
      -> connected_to_upstream -> upstream_request_filter -> request_body_filter (each chunk)
      -> upstream_response_filter -> response_filter -> response_body_filter (each chunk)
      -> logging
    on errors: error_while_proxy (after the request was sent) / fail_to_proxy (error response)

Only upstream responses go through the three response phases: a response written by
``session.respond`` (in :meth:`ProxyHttp.request_filter`) or by :meth:`ProxyHttp.fail_to_proxy`
goes to the client as written.

Every phase but :meth:`upstream_peer` has a do-nothing default. A phase the app does not
override is never called (the engine checks once, when the app is loaded), so it costs nothing.
Phases marked *may be async* can be written as ``async def``; the others are called on the event
loop directly and must not block.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from shared.balancer import Balancer
from shared.errors import ProxyError

if TYPE_CHECKING:
    from shared.config import Config
    from shared.headers import RequestHeader, ResponseHeader
    from shared.peer import HttpPeer
    from shared.session import Session
    from shared.shm.balance import SlotCells

#: The phases the engine looks up on an app; for each, whether it may be ``async def``.
PHASES: dict[str, bool] = {
    "early_request_filter": True,
    "request_filter": True,
    "upstream_peer": True,
    "connected_to_upstream": True,
    "upstream_request_filter": True,
    "request_body_filter": True,
    "upstream_response_filter": False,
    "response_filter": True,
    "response_body_filter": False,
    "logging": True,
    "fail_to_connect": False,
    "error_while_proxy": False,
    "fail_to_proxy": True,
}


#: The type of an app's per-request ``ctx``, the one :meth:`ProxyHttp.new_ctx` returns.
CtxT = TypeVar("CtxT")


class ProxyHttp(Generic[CtxT]):
    """Base class of Tenaya apps: subclass it and override :meth:`upstream_peer` and any other
    phase (the module's docstring shows their order).

    The class is generic in the type of ``ctx`` (Pingora's ``type CTX``): an app that declares
    ``class App(ProxyHttp[MyCtx])`` and ``def new_ctx(self) -> MyCtx`` gets its phases'
    ``ctx: MyCtx`` checked by a type checker; :meth:`logging` and :meth:`fail_to_proxy` take
    ``MyCtx | None``, since a request refused before it had a ``ctx`` reaches them with None.
    ``class App(ProxyHttp)`` leaves ``ctx`` as ``Any``. Nothing changes at run time.

    The engine builds one app object per worker process (a class named in the config is called
    with no arguments), sets :attr:`worker_id`, calls :meth:`configure`, then calls the phases
    for every request that worker serves. Requests of one worker run concurrently on one event
    loop, so per-request state belongs in the ``ctx`` that :meth:`new_ctx` makes, not on
    ``self``. Every phase receives the request's :class:`Session` and ``ctx``.

    An exception other than :class:`ProxyError` raised by a phase is logged
    (with its traceback, in the error log) and becomes a 500 for that request; the worker goes
    on serving. A :class:`ProxyError` becomes the error response of its
    ``status``, written by :meth:`fail_to_proxy`.
    """

    config: Config
    """The worker's validated config (a ``shared.config.Config``), set by :meth:`configure` before
    the first request; ``self.config.app_options`` holds the app's own settings."""
    worker_id: int = 0
    """The worker's slot number (0 .. workers-1), set before :meth:`configure` runs (0 in
    ``python -m master check``)."""
    balance_slot: SlotCells | None = None
    """The engine's: this worker's row of the fleet's balance table, set before
    :meth:`configure` runs; None outside a worker (the balancers then count locally)."""

    def balancer(self, name: str) -> Balancer:
        """The :class:`~shared.balancer.Balancer` of upstream ``name``: fleet-wide selection
        over its servers with its ``balance``, weights and backups, sharing the turns and
        in-flight counts of every worker (Pingora's ``LoadBalancer``).

        Call it in :meth:`configure` (after ``super().configure(config)``) or later; the same
        object comes back for the same name. ``select(key=None, max_iterations=...)`` gives
        the :class:`HttpPeer` to return from :meth:`upstream_peer`, or None when no server is
        usable; the engine counts each request in flight to the peer returned until it is over.
        Raises ``KeyError`` for an upstream the config does not have.
        """
        balancers: dict[str, Balancer] | None = self.__dict__.get("_balancers")
        if balancers is None:
            balancers = self.__dict__["_balancers"] = {}
        b = balancers.get(name)
        if b is None:
            b = balancers[name] = Balancer(self.config, name, self.balance_slot)
        return b

    def configure(self, config: Config) -> None:
        """Prepares the app to serve; runs once in each worker process, and in ``python -m
        master check``.

        Runs after the app object is built and :attr:`worker_id` is set, before the worker's
        event loop exists and before any request: do blocking setup here (read files, build
        :class:`HttpPeer` objects), but no ``asyncio`` work. ``config`` is the
        validated ``shared.config.Config``; ``config.app_options`` is the config file's
        ``app_options`` mapping (``{}`` when the file has none) with values as YAML parsed
        them, unchecked: validate them here. ``config.upstreams`` maps each upstream's name to
        its ``servers`` (``"HOST:PORT"`` strings, each a ``shared.config.Server`` with
        ``weight`` and ``backup`` too), ``hosts``, ``http2`` and ``balance`` settings;
        :meth:`balancer` selects over them.

        Must be a plain ``def`` (an ``async def`` would never run); returns nothing. An
        exception means the app failed to load: the worker exits with the reason in the error
        log; while the master is starting it then gives up, on a reload the old workers go on
        serving. Default: keeps ``config`` as :attr:`config`; an override should call
        ``super().configure(config)`` first.
        """
        self.config = config

    def new_ctx(self) -> CtxT:
        """Makes the per-request context: runs once at the start of each request, before any
        other phase.

        Returns any object; it is handed to every phase of that request as ``ctx`` and kept
        as ``session.ctx``. Must be a plain ``def``. An exception fails the request with a 500.
        A request the parser refused (400, 408, 431 before a request head was complete) goes
        straight to :meth:`fail_to_proxy` and :meth:`logging` with ``ctx`` None. Default:
        None (the engine then does not call it at all): the ``ctx`` of an app that keeps no
        per-request state, a ``ProxyHttp[None]``.
        """
        return cast("CtxT", None)

    def early_request_filter(self, session: Session, ctx: CtxT) -> None:
        """The first look at a request: runs once its head has arrived and was accepted.

        ``session.req_header`` is the request head; the body may still be arriving. Runs
        before :meth:`request_filter`, not for requests refused before it (malformed,
        ``CONNECT``). May be ``async def``. The return value is ignored, and this phase cannot
        answer the request: the engine goes on with :meth:`request_filter` and the upstream
        whatever it does, so it must not call ``session.respond`` (answer in
        :meth:`request_filter` instead). Raise :class:`ProxyError` to fail the
        request with its status. Default: nothing.
        """

    def request_filter(self, session: Session, ctx: CtxT) -> bool:
        """Checks the request, and may answer it here instead of proxying it.

        Runs after :meth:`early_request_filter`, before :meth:`upstream_peer`. May be
        ``async def``. To answer the request itself, call ``session.respond(...)`` and return
        True: no upstream is chosen, no response phase runs, the engine goes on to
        :meth:`logging`. Returning True without having responded fails the request with a 500.
        Return False to proxy it. Changes made here to ``session.req_header`` (``path``,
        ``method``, fields) are what the upstream gets.

        A phase that reads the request body (``await session.read_request_body()``) has
        consumed it, and should answer: a request proxied after that reaches the upstream
        without its body. Raise :class:`ProxyError` to fail the request with
        its status. Default: False.
        """
        return False

    def upstream_peer(self, session: Session, ctx: CtxT) -> HttpPeer:
        """Chooses the upstream server for this request. Required: an app that does not
        override it is refused when it loads.

        Runs after :meth:`request_filter` returned False, and again for each retry: after a
        connect failure that :meth:`fail_to_connect` leaves retryable, and after a pooled
        connection closed before answering an idempotent request (``GET``, ``HEAD``, ``PUT``,
        ``DELETE``, ``OPTIONS``, ``TRACE``) without a body (at most ``server.max_retries``
        retries in all; ``session.retries`` counts them). May be
        ``async def``. Returns the :class:`HttpPeer` to connect to; build peers
        once (in :meth:`configure`) rather than per request. Raise
        :class:`ProxyError` (e.g. ``ProxyError(ErrorKind.NO_PEER,
        ErrorSource.UPSTREAM)``, a 502) to fail the request. Default: raises
        ``NotImplementedError``.
        """
        raise NotImplementedError("an app must override upstream_peer")

    def connected_to_upstream(
        self, session: Session, reused: bool, peer: HttpPeer, ctx: CtxT
    ) -> None:
        """Runs once a connection to ``peer`` is ready, before the request is sent on it.

        ``reused`` is True when the connection was idle in a pool (this worker's, the pool
        shared between workers, or an HTTP/2 connection already open), False when it was just
        made. ``session.peer`` and ``session.upstream_reused`` are set by then. Runs once per
        attempt (again after a retry); not when the client went away meanwhile. May be
        ``async def``. The return value is ignored. Default: nothing.
        """

    def upstream_request_filter(
        self, session: Session, upstream_request: RequestHeader, ctx: CtxT
    ) -> None:
        """Changes the request head just before it is sent upstream.

        Runs after :meth:`connected_to_upstream`, once per attempt. ``upstream_request`` is a
        new :class:`RequestHeader` made from ``session.req_header`` (method,
        path, fields) for HTTP/1.1: without the hop-by-hop fields (``Connection`` and those it
        names, ``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Trailer``, ``Transfer-Encoding``,
        ``Upgrade``, ``Expect``) and ``Content-Length``; with ``X-Forwarded-For`` (the
        client's list plus the client's address), ``X-Forwarded-Proto`` (``http`` or
        ``https``) and ``X-Forwarded-Host`` (the request's Host) in place of the client's own;
        with ``Host: <peer address>`` when the request had none. Changes to it are what the
        upstream gets (an HTTP/2 peer gets its fields, Host as ``:authority``), except
        ``Content-Length`` and ``Transfer-Encoding``, which the engine sets from the body;
        they do not change ``session.req_header``.

        May be ``async def``. The return value is ignored. Default: nothing (the request goes
        up as described above).
        """

    def request_body_filter(
        self, session: Session, body: bytes, end_of_stream: bool, ctx: CtxT
    ) -> bytes | None:
        """Sees each piece of the request body on its way upstream.

        Runs for requests with a body only, after the request head was sent: once for each
        piece as it arrives from the client (``end_of_stream`` False), then once more with
        ``body == b""`` and ``end_of_stream`` True. May be ``async def`` (the body waits while
        it runs). Returns the bytes to send instead (``b""`` drops the piece), or None to send
        ``body`` unchanged. Overriding this phase makes every request body go to an HTTP/1.1
        upstream chunked, since its length may change. Default: None.
        """
        return None

    def upstream_response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: CtxT
    ) -> None:
        """Changes the upstream's response head before :meth:`response_filter` sees it.

        Runs once the upstream's final response head has arrived (1xx interim responses are
        not passed on; a ``101 Switching Protocols`` bypasses the response phases). Changes to
        ``upstream_response`` (``status``, ``reason``, fields) are what the client gets. Only
        upstream responses pass here: not those of ``session.respond`` nor the error pages of
        :meth:`fail_to_proxy`. Must be a plain ``def`` and must not block. The return value is
        ignored; an exception turns the response into a 500. Default: nothing.
        """

    def response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: CtxT
    ) -> None:
        """Changes the response head before it goes to the client.

        Runs right after :meth:`upstream_response_filter`, with the same
        ``upstream_response``; its changes (``status``, ``reason``, fields) are what the client
        gets. Like that phase it sees upstream responses only, not those of
        ``session.respond`` nor error pages: add a field to those where they are made.
        ``session.status`` is still 0 here (the status is ``upstream_response.status``). May
        be ``async def`` (reading the upstream pauses meanwhile). The return value is ignored;
        an exception turns the response into a 500. Default: nothing.
        """

    def response_body_filter(
        self, session: Session, body: bytes, end_of_stream: bool, ctx: CtxT
    ) -> bytes | None:
        """Sees each piece of the upstream's response body on its way to the client.

        Runs once for each piece as it arrives from the upstream (``end_of_stream`` False),
        then once more with ``body == b""`` and ``end_of_stream`` True; upstream responses
        only. Must be a plain ``def``, must not block and should not raise. Returns the bytes
        to send instead (``b""`` drops the piece), or None to send ``body`` unchanged.
        Overriding this phase makes every upstream response lose its ``Content-Length`` (its
        length may change): HTTP/1.1 clients get it chunked. Default: None.
        """
        return None

    def logging(self, session: Session, error: ProxyError | None, ctx: CtxT | None) -> None:
        """Runs last, once for every request, when its response is complete or has failed.

        Also for requests answered by :meth:`request_filter`, refused as malformed, failed,
        or abandoned by the client. ``error`` is the :class:`ProxyError` the
        request ended with (also ``session.error``), or None. ``session.status`` is the status
        sent (0 when none was), ``session.peer`` the upstream used (or None). Runs after the
        engine wrote the access log line. May be ``async def``: it is then started as a task
        that nothing waits for, and an exception it raises is reported only by asyncio, on
        the worker's stderr. An exception of a plain ``def`` is logged in the error log. The
        return value is ignored. Default: nothing.
        """

    def fail_to_connect(
        self, session: Session, peer: HttpPeer, error: ProxyError, ctx: CtxT
    ) -> ProxyError:
        """Decides what a failed connection attempt to ``peer`` leads to.

        Runs when making a new connection to ``peer`` failed: ``error.kind`` is
        ``CONNECT_REFUSED``, ``CONNECT_TIMEOUT`` or ``CONNECT_ERROR`` (with ``error.retry ==
        RetryType.ALWAYS``), or ``TLS_ERROR`` (``RetryType.NEVER``). Must be a plain ``def``
        and must not block. Returns the error to go on with: ``error`` itself (its ``retry``
        may be changed), or another :class:`ProxyError`. When the returned error
        is retryable and ``session.retries < server.max_retries``, :meth:`upstream_peer` runs
        again (set ``error.retry = RetryType.NEVER`` to stop that); otherwise the request fails
        with it, through :meth:`fail_to_proxy`. Default: returns ``error`` unchanged, so
        refused and timed-out connections are retried.
        """
        return error

    def error_while_proxy(
        self, session: Session, peer: HttpPeer, error: ProxyError, ctx: CtxT
    ) -> ProxyError:
        """Decides what an upstream failure after the request was sent leads to, before the
        response started.

        Runs when the connection to ``peer`` closed (``CONNECTION_CLOSED``), timed out
        (``READ_TIMEOUT``, ``WRITE_TIMEOUT``) or answered something that is not HTTP
        (``INVALID_RESPONSE``) before a response head reached the client; on every such
        failure, before the retry decision (Pingora's order). Once the response has started,
        a failure only closes the client's connection and this phase does not run. Must be a
        plain ``def`` and must not block. Returns the error to go on with: ``error`` itself
        (its ``retry`` may be changed), or another :class:`ProxyError`. When the returned
        error is retryable (:meth:`ProxyError.retryable`), ``session.retries <
        server.max_retries``, and the request may be sent twice (an idempotent method, no
        body: whatever the error says, the body is not kept), :meth:`upstream_peer` runs again;
        otherwise the request fails with it, through :meth:`fail_to_proxy`. Set
        ``error.retry = RetryType.ALWAYS`` to retry what the engine would not (an invalid
        response, a connection that closed on a fresh connection), ``RetryType.NEVER`` to
        stop a retry (of a pooled connection the origin closed). An exception is logged and
        ``error`` goes on. Default: returns ``error`` unchanged: only a reused connection that
        closed before any response byte is retried.
        """
        return error

    def fail_to_proxy(self, session: Session, error: ProxyError, ctx: CtxT | None) -> int:
        """Writes the error response of a failed request.

        Runs for every request that fails before its response is complete: refused by the
        parser (400, 408, 413, 431; then ``ctx`` is None), ``CONNECT`` (405), a
        :class:`ProxyError` raised by a phase, a connect failure after the
        retries, an upstream failure, an exception in a phase (500). Then :meth:`logging`
        runs. An override must write a response with ``session.respond(...)`` when
        ``session.response_started`` is False (the client gets nothing otherwise), or call
        ``super().fail_to_proxy(...)``. May be ``async def``. Returns the status it wrote
        (the engine does not use it: the access log shows ``session.status``, or
        ``error.status`` when nothing was sent); an exception is logged and the default page
        is written instead. Default: a short plain-text page, ``"<status> <error.text>"``
        (``"502 connect refused"``, ``"429 too many requests"``), with status
        ``error.status``, unless the response has started.
        """
        status = error.status
        if not session.response_started:
            session.respond(status, body=f"{status} {error.text}\n".encode())
        return status


def overridden_phases(app: ProxyHttp[Any]) -> dict[str, Any]:
    """Maps each phase the app overrides to its bound method."""
    out = {}
    for name in PHASES:
        method = getattr(type(app), name, None)
        if method is not None and method is not getattr(ProxyHttp, name):
            out[name] = getattr(app, name)
    return out


def is_async(method: Any) -> bool:
    """True when calling ``method`` returns an awaitable to wait for."""
    return inspect.iscoroutinefunction(method)


class AppLoadError(Exception):
    """The app named in the config could not be imported or built."""


#: The app a config without ``app`` runs: the built-in load balancer, loaded like any other
#: app. It is named, not imported, so that this module does not depend on the apps built on it.
BUILTIN_APP = "shared.apps.load_balancer:LoadBalancer"


def load_app(spec: str | None) -> ProxyHttp[Any]:
    """Imports ``MODULE:ATTRIBUTE`` and returns the app (built when the attribute is a class).

    None gives the built-in load balancer (:data:`BUILTIN_APP`). Raises :class:`AppLoadError`
    with the reason.
    """
    if spec is None:
        spec = BUILTIN_APP
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise AppLoadError(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from e
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise AppLoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    if inspect.isclass(target):
        if not issubclass(target, ProxyHttp):
            raise AppLoadError(f"{spec} is not a subclass of shared.app.ProxyHttp")
        try:
            target = target()
        except Exception as e:
            raise AppLoadError(f"building {spec} failed: {type(e).__name__}: {e}") from e
    if not isinstance(target, ProxyHttp):
        raise AppLoadError(f"{spec} is not a ProxyHttp subclass or instance")
    if "upstream_peer" not in overridden_phases(target):
        raise AppLoadError(f"{spec} does not override upstream_peer")
    for name, method in overridden_phases(target).items():
        if is_async(method) and not PHASES[name]:
            raise AppLoadError(f"{spec}.{name} must be a plain def, not async def")
    return target
