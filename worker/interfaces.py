"""The seams of the data plane: the ``typing.Protocol`` each layer meets the next at.

Theory of operation. The worker is built in layers that call each other through callbacks (the
callback design is the measured hot path: see worker/proxy/engine.py), so each layer holds a
reference to the one beside it. Each reference is typed by a protocol here, never by the
class behind it, so that no layer needs to know another's classes (httpcore's
``interfaces.py`` is the model):

- :class:`Upstream`: one exchange with an upstream, an HTTP/1.1 connection or an HTTP/2
  stream (worker/client/h1.py, worker/client/h2.py). The engine and the downstream exchanges
  drive it; both clients implement it.
- :class:`ResponseHandler`: what an upstream calls back with the response: the downstream
  exchange (an HTTP/1.1 connection or an HTTP/2 stream).
- :class:`Downstream`: what the engine drives of a downstream exchange (the same objects, seen
  from the engine: a :class:`ResponseHandler` and the session's
  :class:`shared.session.Downstream`).
- :class:`DownstreamConn`: a client connection, as the engine's housekeeping sees it.
- :class:`ProxyEngine`: what the downstream protocols need of the engine.
- :class:`UpstreamPool`: what an upstream connection tells the pool that made it.

Nothing here runs; the module imports only the app API (``shared``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, MutableSet
from typing import Any, Protocol

from shared.errors import ProxyError
from shared.headers import RawHeaders, RequestHeader
from shared.peer import HttpPeer, PoolKey
from shared.session import Downstream as SessionDownstream
from shared.session import Session

__all__ = [
    "Downstream",
    "DownstreamConn",
    "ProxyEngine",
    "ResponseHandler",
    "Upstream",
    "UpstreamPool",
]


class Upstream(Protocol):
    """One exchange with an upstream: an HTTP/1.1 connection carrying one request at a time,
    or one stream of an HTTP/2 connection. Made by the connector; its response goes to the
    :class:`ResponseHandler` given to :meth:`start`."""

    key: PoolKey
    """The pool key of the peer it talks to."""
    closed: bool
    """True once closed (it carries nothing more)."""
    write_paused: bool
    """True while the upstream takes no more request body (its buffer or window is full)."""
    got_bytes: bool
    """True once this exchange received any byte of a response."""
    keep_alive: bool
    """True while the connection may carry another exchange after this one."""
    ended_with_head: bool
    """True when the response ended with its head (an HTTP/2 headers-only response)."""
    deadline: float
    """When the response is late (``time.monotonic()``); the pool's sweep fails it then."""
    transport: asyncio.Transport | None
    """The connection's transport (an HTTP/1.1 tunnel writes to it after a 101)."""

    def request_head(
        self,
        s: Session,
        req: RequestHeader | None,
        client: Downstream,
        peer: HttpPeer,
        body_filtered: bool,
    ) -> Any:
        """The request head in this client's protocol, for :meth:`start`: from ``req`` when
        the app's ``upstream_request_filter`` made it, else from the request as received
        (``s``, from ``client``, to ``peer``). ``body_filtered``: a ``request_body_filter``
        may change the body's length."""
        ...

    def start(
        self, handler: ResponseHandler, head: Any, head_only: bool, read_timeout: float
    ) -> None:
        """Sends the request head (as :meth:`request_head` made it); the response goes to
        ``handler``. ``head_only``: the request is HEAD (its response has no body)."""
        ...

    def send_body(self, data: bytes) -> None:
        """Sends a piece of the request body, framed as the head said."""
        ...

    def end_body(self) -> None:
        """The request body is complete."""
        ...

    def release(self) -> None:
        """The exchange ended cleanly, or never began: the connection goes back to its pool
        (an HTTP/2 stream is closed)."""
        ...

    def failure(self, exc: BaseException | None) -> ProxyError:
        """The error a failure this client reported (``upstream_failed``) means, with the
        retry it allows."""
        ...

    def pause_reading(self) -> None:
        """Stops reading the response (the client is not taking it)."""
        ...

    def resume_reading(self) -> None:
        """Reads the response again."""
        ...

    def detach(self) -> None:
        """Forgets the exchange (the client went away); nothing more is reported."""
        ...

    def close(self) -> None:
        """Ends the exchange for good (an HTTP/1.1 connection closes, a stream is reset)."""
        ...

    def timed_out(self) -> None:
        """Called by the sweep when the response is past :attr:`deadline`."""
        ...


class ResponseHandler(Protocol):
    """What an :class:`Upstream` reports the response to: the downstream exchange."""

    active: Session | None
    """The request being answered, or None once it has ended."""

    def upstream_head(self, up: Upstream, status: int, headers: RawHeaders) -> None:
        """The response head arrived (a 101 included; other 1xx are not reported)."""
        ...

    def upstream_body(self, data: bytes) -> None:
        """A piece of the response body arrived."""
        ...

    def upstream_trailers(self, headers: RawHeaders) -> None:
        """Trailer fields arrived after the body."""
        ...

    def upstream_done(self, up: Upstream) -> None:
        """The response is complete; ``up`` may be reused if its ``keep_alive`` says so."""
        ...

    def upstream_failed(self, up: Upstream, exc: BaseException | None) -> None:
        """The exchange failed (``exc`` says how; None: closed without a word)."""
        ...

    def upstream_writable(self, writable: bool) -> None:
        """The upstream stopped (False) or resumed (True) taking request body."""
        ...

    def begin_batch(self) -> None:
        """Writes to the client may be collected until :meth:`end_batch`."""
        ...

    def end_batch(self) -> None:
        """Writes what the batch collected."""
        ...

    def tunnel_started(self, up: Upstream) -> None:
        """After a 101: bytes pass unparsed both ways from now on."""
        ...

    def tunnel_data(self, data: bytes) -> None:
        """Tunnel bytes from the upstream."""
        ...

    def tunnel_closed(self) -> None:
        """The upstream closed the tunnel."""
        ...


class Downstream(ResponseHandler, SessionDownstream, Protocol):
    """A downstream exchange as the engine drives it: one request at a time on an HTTP/1.1
    connection, or one HTTP/2 stream."""

    @property
    def up(self) -> Upstream | None:
        """The upstream exchange serving the request, while there is one."""
        ...

    @property
    def closing(self) -> bool:
        """True once the exchange (or its connection) is closing: nothing more is written."""
        ...

    @property
    def client_ip(self) -> bytes:
        """The client's IP address, as X-Forwarded-For writes it."""
        ...

    @property
    def scheme(self) -> bytes:
        """``b"http"`` or ``b"https"``: how the client reached the proxy."""
        ...

    @property
    def write_paused(self) -> bool:
        """True while the client is not taking what is written."""
        ...

    @property
    def held_done(self) -> Upstream | None:
        """The upstream whose response ended while its body was held for an async
        ``response_filter``."""
        ...

    def attach(self, s: Session, up: Upstream, head: Any, read_timeout: float) -> None:
        """Sends the request head on ``up``; its response comes back to this exchange."""
        ...

    def write_head(self, s: Session, line: bytes, headers: RawHeaders, rechunk: bool) -> None:
        """Writes a response head (``line``: an HTTP/1.1 status line)."""
        ...

    def hold_body(self) -> None:
        """An async ``response_filter`` runs: the response body waits."""
        ...

    def drop_held(self) -> None:
        """The held response body will not be sent."""
        ...

    def forget_upstream(self) -> None:
        """The exchange no longer has an upstream (the engine detaches it)."""
        ...

    def release_held(self) -> None:
        """Sends the response body held for an async ``response_filter``."""
        ...

    async def wait_upstream_writable(self) -> None:
        """Waits until the upstream takes request body again (or the exchange ends)."""
        ...

    def finish(self, s: Session) -> None:
        """The response to ``s`` is complete: log it, go on or close."""
        ...

    def close(self) -> None:
        """Ends the exchange now (the response cannot complete)."""
        ...


class DownstreamConn(Protocol):
    """A client connection (HTTP/1.1 or HTTP/2), as the engine's housekeeping sees it."""

    def close(self) -> None:
        """Closes the connection once what was written has gone out."""
        ...

    def drain(self) -> None:
        """Graceful stop: no new requests after the current ones."""
        ...

    def idle_check(self, now: float, keepalive: float, drain_idle: float) -> None:
        """Closes the connection if it idled past its limit."""
        ...


class ProxyEngine(Protocol):
    """What the downstream protocols need of the engine (worker/proxy/engine.py's ``Engine``)."""

    log: logging.Logger
    """The error log."""
    log_throttle: Any
    """Lets a protection's log line through once per client and reason a minute."""
    max_head: int
    """``limits.max_header_bytes``."""
    max_body: int
    """``limits.max_body_bytes`` (0: none)."""
    header_timeout: float
    """``timeouts.client_header_seconds``."""
    draining: bool
    """True once the worker drains."""

    @property
    def connections(self) -> MutableSet[Any]:
        """The open client connections (:class:`DownstreamConn`), counted at accept."""
        ...

    response_phases: bool
    """True when the app overrides a response phase (the head goes through
    :meth:`response_head`)."""
    p_response_body_filter: Callable[..., Any] | None
    """The app's ``response_body_filter``, when it overrides it (else None)."""

    def start(self, conn: Downstream, s: Session) -> None:
        """A request head is complete and its turn has come."""
        ...

    def fail(self, conn: Downstream, s: Session, err: ProxyError) -> None:
        """Answers ``s`` with an error response and ends it."""
        ...

    def refuse(self, conn: Downstream, s: Session, err: ProxyError) -> None:
        """Answers a request refused before its turn (counted as started) with an error."""
        ...

    def upstream_failed(self, conn: Downstream, s: Session, err: ProxyError) -> None:
        """The upstream failed before the response started: retry or fail."""
        ...

    def response_head(
        self, conn: Downstream, s: Session, up: Upstream, status: int, headers: RawHeaders
    ) -> None:
        """The upstream response head, through the app's response phases."""
        ...

    def body_filter(self, s: Session, data: bytes, end: bool) -> bytes:
        """A piece of the response body through ``response_body_filter``."""
        ...

    def request_done(self, s: Session) -> None:
        """Every request ends here once: the access log and the ``logging`` phase."""
        ...


class UpstreamPool(Protocol):
    """What an upstream connection tells the pool it belongs to."""

    @property
    def busy(self) -> MutableSet[Any]:
        """Exchanges under way (:class:`Upstream`); the sweep checks their deadlines."""
        ...

    requests: int
    """Exchanges started, counted."""

    def put(self, up: Any) -> None:
        """An HTTP/1.1 connection whose exchange ended cleanly: keep it (or give it away)."""
        ...

    def discard(self, up: Any) -> None:
        """An HTTP/1.1 connection closed: forget it."""
        ...
