"""The app API: a Python counterpart of Pingora's ``ProxyHttp`` trait.

An app is a subclass of :class:`ProxyHttp` that overrides the phases it needs. The engine calls
them in this order for each request (``ctx`` is the per-request object from :meth:`new_ctx`)::

    early_request_filter -> request_filter (may answer itself) -> upstream_peer
      -> [connect: local pool or new connection; on failure fail_to_connect, maybe retry]
      -> connected_to_upstream -> upstream_request_filter -> request_body_filter (each chunk)
      -> upstream_response_filter -> response_filter -> response_body_filter (each chunk)
      -> logging
    on errors: error_while_proxy (after the request was sent) / fail_to_proxy (error response)

Every phase but :meth:`upstream_peer` has a do-nothing default. A phase the app does not
override is never called (the engine checks once, when the app is loaded), so it costs nothing.
Phases marked *may be async* can be written as ``async def``; the others are called on the event
loop directly and must not block.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

from shared.errors import ProxyError

if TYPE_CHECKING:
    from shared.config import Config
    from shared.headers import RequestHeader, ResponseHeader
    from shared.peer import HttpPeer
    from shared.session import Session

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


class ProxyHttp:
    """Base class of Tenaya apps. Override :meth:`upstream_peer` and any other phase."""

    #: The worker's validated config, set by :meth:`configure` before the first request.
    config: Config
    #: The worker's slot number (0 .. workers-1), set before :meth:`configure` runs.
    worker_id: int = 0

    def configure(self, config: Config) -> None:
        """Runs once in each worker, after the app is built and before it serves.

        The default keeps ``config`` as ``self.config``; an override should call it.
        """
        self.config = config

    def new_ctx(self) -> Any:
        """Makes the per-request context handed to every phase. Default: None."""
        return None

    def early_request_filter(self, session: Session, ctx: Any) -> None:
        """Runs first, once the request header has arrived. May be async. Default: nothing."""

    def request_filter(self, session: Session, ctx: Any) -> bool:
        """Inspects or answers the request before any upstream is chosen. May be async.

        Return True when the phase wrote a response itself (``session.respond(...)``): the
        engine then skips to :meth:`logging`. Default: False.
        """
        return False

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        """Chooses the upstream for this request. Required. May be async.

        Runs again after a retryable connect failure. Raise :class:`ProxyError` to fail.
        """
        raise NotImplementedError("an app must override upstream_peer")

    def connected_to_upstream(self, session: Session, reused: bool, peer: HttpPeer,
                              ctx: Any) -> None:
        """Runs once a connection to ``peer`` is ready (``reused``: from the pool). May be
        async. Default: nothing."""

    def upstream_request_filter(self, session: Session, upstream_request: RequestHeader,
                                ctx: Any) -> None:
        """Changes the request header before it is sent upstream. May be async.

        ``upstream_request`` is a copy of the downstream request with hop-by-hop headers
        removed and the ``X-Forwarded-*`` headers added. Default: nothing.
        """

    def request_body_filter(self, session: Session, body: bytes, end_of_stream: bool,
                            ctx: Any) -> bytes | None:
        """Sees each chunk of the request body on its way upstream. May be async.

        Return replacement bytes, or None to send ``body`` unchanged. Default: None.
        """
        return None

    def upstream_response_filter(self, session: Session, upstream_response: ResponseHeader,
                                 ctx: Any) -> None:
        """Changes the upstream's response header (not for responses the proxy makes itself).
        Must not block. Default: nothing."""

    def response_filter(self, session: Session, upstream_response: ResponseHeader,
                        ctx: Any) -> None:
        """Changes any response header before it goes downstream. May be async.
        Default: nothing."""

    def response_body_filter(self, session: Session, body: bytes, end_of_stream: bool,
                             ctx: Any) -> bytes | None:
        """Sees each chunk of the response body. Must not block.

        Return replacement bytes, or None to send ``body`` unchanged. When an app overrides
        this phase, responses go downstream chunked (the length may change). Default: None.
        """
        return None

    def logging(self, session: Session, error: ProxyError | None, ctx: Any) -> None:
        """Runs last for every request, after the response was sent or failed. May be async.
        Default: nothing (the access log is written by the engine)."""

    def fail_to_connect(self, session: Session, peer: HttpPeer, error: ProxyError,
                        ctx: Any) -> ProxyError:
        """Runs when connecting to ``peer`` failed. Must not block.

        Set ``error.retry = RetryType.ALWAYS`` to have :meth:`upstream_peer` run again (at most
        ``server.max_retries`` times). Returns the error to go on with. Default: ``error``.
        """
        return error

    def error_while_proxy(self, session: Session, peer: HttpPeer, error: ProxyError,
                          ctx: Any) -> ProxyError:
        """Runs when the upstream failed after the request was sent. Must not block.
        Returns the error to go on with. Default: ``error``."""
        return error

    def fail_to_proxy(self, session: Session, error: ProxyError, ctx: Any) -> int:
        """Writes the error response, if the response has not started; returns its status.
        May be async. Default: a short plain-text page with ``error.status``."""
        status = error.status
        if not session.response_started:
            session.respond(status, body=f"{status} {error.kind.text}\n".encode())
        return status


def overridden_phases(app: ProxyHttp) -> dict[str, Any]:
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


def load_app(spec: str | None) -> ProxyHttp:
    """Imports ``MODULE:ATTRIBUTE`` and returns the app (built when the attribute is a class).

    None gives the built-in load balancer. Raises :class:`AppLoadError` with the reason.
    """
    if spec is None:
        from shared.lb import LoadBalancer
        return LoadBalancer()
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
