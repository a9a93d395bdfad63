"""The per-request object every phase receives.

A :class:`Session` is made by the downstream connection when a request header has arrived. It
keeps the request as the parser gave it (a list of byte pairs) and builds a
:class:`RequestHeader` only when a phase asks for :attr:`Session.req_header`;
once built, that object is what the upstream request is made from, so changes to it go upstream.

Each request has an id, :attr:`Session.request_id`, made only when something asks for it (a log
line written during one of its phases, the JSON access log, the app): the client's
``X-Request-Id`` when it sent a sane one, else one generated from a random prefix drawn once per
worker process and a counter, so that asking costs no system call and not asking costs nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from shared.errors import ErrorKind, ProxyError, downstream_error
from shared.headers import RawHeaders, RequestHeader

if TYPE_CHECKING:
    from shared.peer import HttpPeer, InFlight

#: Buffered request body above which reading from the client pauses.
BODY_HIGH_WATER = 256 * 1024
#: Buffered request body below which reading resumes.
BODY_LOW_WATER = 64 * 1024
#: Longest ``X-Request-Id`` taken from a client; a longer one is replaced by a generated id.
MAX_REQUEST_ID = 200
#: Random bytes in the prefix of generated request ids (drawn once per process).
REQUEST_ID_PREFIX_BYTES = 6


class _RequestIds:
    """Generated request ids: this process's random prefix, then a counter (``"<hex>-00002a"``).

    Process-wide on purpose: ids must not repeat within a worker, whatever connection the
    request came on. The prefix is drawn again in a forked child, so two processes never share
    it.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new prefix and a counter from 1 (at import, and in a forked child)."""
        self.prefix = os.urandom(REQUEST_ID_PREFIX_BYTES).hex()
        self.counter = itertools.count(1)

    def new(self) -> str:
        """The next id."""
        return f"{self.prefix}-{next(self.counter):06x}"


_ids = _RequestIds()
os.register_at_fork(after_in_child=_ids.reset)


def _client_request_id(raw_headers: RawHeaders) -> str | None:
    """The first ``X-Request-Id`` field of the request if it is sane (1 to
    :data:`MAX_REQUEST_ID` printable ASCII characters, no space), else None."""
    for name, value in raw_headers:
        if name.lower() == b"x-request-id":
            if not 0 < len(value) <= MAX_REQUEST_ID or not value.isascii():
                return None
            text = value.decode("ascii")
            return text if text.isprintable() and " " not in text else None
    return None


class Downstream(Protocol):
    """What a session needs from the connection it arrived on."""

    client_addr: tuple[str, int]
    server_addr: tuple[str, int]

    def respond(self, session: Session, status: int, headers: Any, body: bytes) -> None: ...
    def pause_body(self) -> None: ...
    def resume_body(self) -> None: ...
    def send_continue(self, session: Session) -> None: ...


class Session:
    """One request and its response, as the phases see it.

    The engine makes one per request and hands it to every phase. An app reads the request
    through :attr:`req_header` (which it may also change, for the upstream), :attr:`host`,
    :attr:`client_addr`, :attr:`server_addr`, :attr:`tls` and :attr:`client_cert`; reads the
    body with :meth:`read_body_chunk` or :meth:`read_request_body`; answers by itself with
    :meth:`respond`; and finds the outcome in :attr:`status`, :attr:`peer`, :attr:`error`,
    :attr:`retries` and :attr:`resp_bytes`. Attributes documented as the engine's are not for
    apps to change.
    """

    __slots__ = (
        # Set by the connection.
        "conn",
        "method",
        "url",
        "version",
        "raw_headers",
        "fwd",
        "host_b",
        "keep_alive",
        "content_length",
        "chunked",
        "expect_continue",
        "conn_tokens",
        "xff",
        "start_time",
        "upgrade",
        "max_body",
        # Request body.
        "_body",
        "_body_size",
        "body_done",
        "body_sent",
        "body_bytes",
        "_body_waiter",
        "_body_error",
        "_continue_sent",
        # Proxy state.
        "ctx",
        "_req_header",
        "peer",
        "in_flight",
        "upstream_reused",
        "retries",
        "tried",
        "retry_guard",
        "_request_id",
        # Response state.
        "response_started",
        "response_done",
        "status",
        "resp_bytes",
        "error",
        "resp_mode",
        "trailers",
        "__weakref__",
    )

    conn: Downstream
    """The engine's: the client connection (HTTP/1.1) or stream (HTTP/2)."""
    method: bytes
    """The request method as received (``b"GET"``); read ``req_header.method``."""
    url: bytes
    """The request target as received (``b"/a?b=1"``; HTTP/2: ``:path``), except that an
    absolute-form target (``http://host/a``) is reduced to its origin-form (``/a``), its
    authority becoming :attr:`host`. Not changed by assigning ``req_header.path``; the access
    log shows this one."""
    version: str
    """The client's HTTP version: ``"1.0"``, ``"1.1"`` or ``"2"``."""
    raw_headers: RawHeaders
    """The request's fields as received, ``(name, value)`` byte pairs (HTTP/2: lower-case names, no
    pseudo-fields). Changing them does not change what goes upstream; use :attr:`req_header`."""
    fwd: list[bytes]
    """The engine's: the forwardable header lines as pieces."""
    host_b: bytes | None
    """The engine's: the Host field (HTTP/2: ``:authority``) as bytes; read :attr:`host`."""
    keep_alive: bool
    """Whether the client's connection stays open after this response. A phase may set it to False
    before the response starts, to close the connection after it (HTTP/1.x)."""
    content_length: int | None
    """The request's Content-Length, or None."""
    chunked: bool
    """True when the request body's length is not known in advance (HTTP/1.1 chunked, or HTTP/2
    without content-length)."""
    expect_continue: bool
    """True when the client sent ``Expect: 100-continue``; the engine answers 100 when the body is
    first read."""
    conn_tokens: list[bytes] | None
    """The engine's: the extra field names listed in the Connection field."""
    xff: bytes | None
    """The engine's: the client's X-Forwarded-For values, joined."""
    start_time: float
    """When the request began to arrive, as ``time.time()``."""
    upgrade: bytes | None
    """The Upgrade field of an upgrade request (``b"websocket"``), else None."""
    max_body: int
    """The engine's: the body size limit (``limits.max_body_bytes``; 0: none)."""
    body_done: bool
    """True once the whole request body has arrived from the client (whether or not it was read
    yet)."""
    body_sent: bool
    """True once the whole request body has been written to the upstream."""
    body_bytes: int
    """Bytes of request body received from the client so far."""
    ctx: Any
    """The object :meth:`ProxyHttp.new_ctx` made for this request."""
    peer: HttpPeer | None
    """The :class:`HttpPeer` the request went to: set when a connection is ready
    (before ``connected_to_upstream``) or when connecting failed for good; None before that and for
    requests not proxied."""
    in_flight: InFlight | None
    """The engine's: the counter of the peer this request is counted in flight to (its
    ``HttpPeer.in_flight``), until the attempt is over; None when not counted."""
    upstream_reused: bool
    """True when the upstream connection came from a pool."""
    retries: int
    """How many times ``upstream_peer`` ran again for this request."""
    tried: list[HttpPeer] | None
    """The peers whose attempt failed and was retried, in order (None before the first
    retry): ``Balancer.select_for`` and ``select(exclude=...)`` skip them while an untried
    usable server remains, so a retry goes to another server."""
    retry_guard: Any
    """The engine's: the upstream guard this request is counted in as a retry (the retry
    budget), from its first retry until it ends; None when not counted."""
    response_started: bool
    """True once a response head was written to the client; :meth:`respond` then raises."""
    response_done: bool
    """True once the exchange has ended (and was logged)."""
    status: int
    """The status sent to the client: 0 until a response head is written (so 0 in
    ``response_filter``: read ``upstream_response.status`` there), and still 0 in ``logging`` when
    none was sent."""
    resp_bytes: int
    """Bytes of response body written to the client."""
    error: ProxyError | None
    """The :class:`ProxyError` this request failed with (set before ``fail_to_proxy``
    runs), else None."""
    resp_mode: int
    """The engine's: how the response body is delimited."""
    trailers: RawHeaders | None
    """Trailer fields of the upstream response, if it had any (byte pairs)."""

    def __init__(self, conn: Downstream) -> None:
        self.conn = conn
        self.method = b""
        self.url = b""
        self.version = "1.1"
        self.raw_headers = []
        self.fwd = []
        self.host_b = None
        self.keep_alive = True
        self.content_length = None
        self.chunked = False
        self.expect_continue = False
        self.conn_tokens = None
        self.xff = None
        self.upgrade = None
        self.start_time = 0.0
        self.max_body = 0
        self._body: deque[bytes] | None = None
        self._body_size = 0
        self.body_done = False
        self.body_sent = False
        self.body_bytes = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._body_error: ProxyError | None = None
        self._continue_sent = False
        self.ctx = None
        self._req_header: RequestHeader | None = None
        self.peer = None
        self.in_flight: InFlight | None = None
        self.upstream_reused = False
        self.retries = 0
        self.tried: list[HttpPeer] | None = None
        self.retry_guard: Any = None
        self._request_id: str | None = None
        self.response_started = False
        self.response_done = False
        self.status = 0
        self.resp_bytes = 0
        self.error = None
        self.resp_mode = 0
        self.trailers = None

    # -- the request, for phases ---------------------------------------------------------

    @property
    def req_header(self) -> RequestHeader:
        """The request head as a :class:`RequestHeader`, to read or change.

        Built on first use from the request as received, then the same object for the rest of
        the request. Changes made to it before the request goes upstream (in
        ``early_request_filter``, ``request_filter``, ``upstream_peer`` or
        ``connected_to_upstream``) are what the upstream gets: assigning ``path`` (``"/a?b=1"``,
        the query included) sends that request target, ``method`` that method, and fields set,
        appended or removed are sent so, except the hop-by-hop and ``X-Forwarded-*`` fields
        that the engine sets itself (see ``upstream_request_filter``). The upstream request is
        HTTP/1.1 or HTTP/2 as the peer says, whatever ``version`` holds. :attr:`url` and the
        access log keep the target as received. An HTTP/2 request's ``:authority`` is not a
        field here: read :attr:`host`.
        """
        h = self._req_header
        if h is None:
            h = RequestHeader(
                self.method.decode("latin-1"), self.url.decode("latin-1"), self.version
            )
            h._fields = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw_headers]
            self._req_header = h
        return h

    @property
    def request_id(self) -> str:
        """This request's id, for log lines and for correlating with other services.

        The client's ``X-Request-Id`` field as received when it is sane (1 to 200 printable
        ASCII characters, no space), else one generated in this worker
        (``"3f9a1c0b7d2e-00002a"``: a random prefix per worker process, then a counter in
        hex). Made on first use and the same for the rest of the request; error log lines
        written during the request's phases show it as ``[req ID]``. A phase may assign
        another string (an id scheme of its own); what is logged afterwards shows that. The
        engine does not send it upstream: to pass it on, set the field in
        ``upstream_request_filter``.
        """
        rid = self._request_id
        if rid is None:
            rid = self._request_id = _client_request_id(self.raw_headers) or _ids.new()
        return rid

    @request_id.setter
    def request_id(self, value: str) -> None:
        self._request_id = value

    @property
    def host(self) -> str | None:
        """The host the client asked for: the Host field (HTTP/2: ``:authority``) as received,
        port included (``"example.com:8080"``), or None; for an absolute-form target
        (``GET http://example.com/ HTTP/1.1``), its authority, which replaces the Host field
        (RFC 9112 3.2.2). It is always a valid host (RFC 3986, with an optional port): the
        engine refuses a request whose Host is not. Not changed by setting a Host field on
        :attr:`req_header`."""
        return None if self.host_b is None else self.host_b.decode("latin-1")

    @property
    def client_addr(self) -> tuple[str, int]:
        """The client's ``(ip, port)``, as the socket gives it (not X-Forwarded-For)."""
        return self.conn.client_addr

    @property
    def tls(self) -> Any:
        """The downstream ``ssl.SSLObject`` (``.version()``, ``.selected_alpn_protocol()``,
        ``.server_hostname``), or None for a plaintext connection."""
        return getattr(self.conn, "tls", None)

    @property
    def client_cert(self) -> dict[str, Any] | None:
        """The client's verified certificate (``ssl.SSLSocket.getpeercert()`` form) when the
        listener requires one (``tls.client_ca``), else None."""
        tls = self.tls
        return tls.getpeercert() if tls is not None else None

    @property
    def server_addr(self) -> tuple[str, int]:
        """The local ``(ip, port)`` the client connected to (the listener's address)."""
        return self.conn.server_addr

    @property
    def has_body(self) -> bool:
        """True when the request carries a body (a Content-Length over 0, or a body of unknown
        length)."""
        return self.chunked or bool(self.content_length)

    def respond(self, status: int, headers: Any = None, body: bytes | str = b"") -> None:
        """Writes a whole response to the client now: ``status``, ``headers`` (a dict or a
        list of ``(name, value)`` pairs, or None) and ``body`` (``str`` is sent as UTF-8).

        Content-Length is set from ``body`` (one given in ``headers`` is replaced); a ``HEAD``
        request gets the head only. The response goes out as written: no response phase sees
        it. Call it in ``request_filter`` (then return True) or in ``fail_to_proxy``; in any
        other phase the engine would write a second response after it. Raises
        ``RuntimeError`` when a response has already started (:attr:`response_started`).
        When the client has already gone, nothing is written.
        """
        if self.response_started:
            raise RuntimeError("the response has already started")
        if isinstance(body, str):
            body = body.encode()
        self.conn.respond(self, status, headers, body)

    # -- the request body ------------------------------------------------------------------

    async def read_body_chunk(self) -> bytes:
        """The next piece of the request body, waiting for it to arrive; ``b""`` once it has
        all been read (at once for a request without a body).

        For ``async def`` phases. Answers ``Expect: 100-continue`` first when the client asked.
        The pieces read are consumed: the engine does not send them upstream, so a phase that
        reads the body should answer the request itself (a request proxied afterwards reaches
        the upstream without the body it announced). Raises
        :class:`ProxyError`: ``BODY_TOO_LARGE`` (413) past
        ``limits.max_body_bytes``, ``DOWNSTREAM_CLOSED`` when the client went away, or the
        error of a malformed body (400).
        """
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._body_size -= len(chunk)
                if self._body_size < BODY_LOW_WATER:
                    self.conn.resume_body()
                return chunk
            if self._body_error is not None:
                raise self._body_error
            if self.body_done or not self.has_body:
                return b""
            if self.expect_continue and not self._continue_sent:
                self._continue_sent = True
                self.conn.send_continue(self)
            self.conn.resume_body()
            waiter = self._body_waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._body_waiter = None

    async def read_request_body(self) -> bytes:
        """The whole request body, read with :meth:`read_body_chunk` (same waiting, same
        errors, same consuming): at most ``limits.max_body_bytes`` bytes, all held in
        memory."""
        parts = []
        while chunk := await self.read_body_chunk():
            parts.append(chunk)
        return b"".join(parts)

    # -- called by the connection ----------------------------------------------------------

    def feed_body(self, data: bytes) -> None:
        """The engine's: a piece of request body arrived from the client."""
        self.body_bytes += len(data)
        if self.max_body and self.body_bytes > self.max_body:
            if self._body_error is None:
                self._body_error = downstream_error(ErrorKind.BODY_TOO_LARGE)
                self._wake()
            return
        if self._body is None:
            self._body = deque()
        self._body.append(data)
        self._body_size += len(data)
        if self._body_size > BODY_HIGH_WATER:
            self.conn.pause_body()
        self._wake()

    def end_body(self) -> None:
        """The engine's: the request body is complete."""
        self.body_done = True
        self._wake()

    def fail_body(self, error: ProxyError) -> None:
        """The engine's: the client went away or sent garbage before the body was complete."""
        if self._body_error is None:
            self._body_error = error
        self._wake()

    def _wake(self) -> None:
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __repr__(self) -> str:
        return f"<Session {self.method.decode()} {self.url.decode('latin-1')}>"
