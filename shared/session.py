"""The per-request object every phase receives.

A :class:`Session` is made by the downstream connection when a request header has arrived. It
keeps the request as the parser gave it (a list of byte pairs) and builds a
:class:`~shared.headers.RequestHeader` only when a phase asks for :attr:`Session.req_header`;
once built, that object is what the upstream request is made from, so changes to it go upstream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from shared.errors import ErrorKind, ProxyError, downstream_error
from shared.headers import RawHeaders, RequestHeader

if TYPE_CHECKING:
    from shared.peer import HttpPeer

#: Buffered request body above which reading from the client pauses.
BODY_HIGH_WATER = 256 * 1024
#: Buffered request body below which reading resumes.
BODY_LOW_WATER = 64 * 1024


class Downstream(Protocol):
    """What a session needs from the connection it arrived on."""

    client_addr: tuple[str, int]
    server_addr: tuple[str, int]

    def respond(self, session: Session, status: int, headers: Any, body: bytes) -> None: ...
    def pause_body(self) -> None: ...
    def resume_body(self) -> None: ...
    def send_continue(self, session: Session) -> None: ...


class Session:
    """One request and its response, as the phases see it."""

    __slots__ = (
        # Set by the connection.
        "conn", "method", "url", "version", "raw_headers", "fwd", "host_b", "keep_alive",
        "content_length", "chunked", "expect_continue", "conn_tokens", "xff", "start_time",
        "upgrade",
        "max_body",
        # Request body.
        "_body", "_body_size", "body_done", "body_sent", "body_bytes", "_body_waiter",
        "_body_error",
        "_continue_sent",
        # Proxy state.
        "ctx", "_req_header", "peer", "upstream_reused", "retries",
        # Response state.
        "response_started", "response_done", "status", "resp_bytes", "error", "resp_mode",
        "trailers",
        "__weakref__",
    )

    def __init__(self, conn: Downstream) -> None:
        self.conn = conn
        self.method = b""
        self.url = b""
        self.version = "1.1"
        self.raw_headers: RawHeaders = []
        #: The forwardable header lines as pieces (name, ": ", value, CRLF, ...).
        self.fwd: list[bytes] = []
        self.host_b: bytes | None = None
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.conn_tokens: list[bytes] | None = None
        self.xff: bytes | None = None
        #: The Upgrade header of an upgrade request (``b"websocket"``), else None.
        self.upgrade: bytes | None = None
        self.start_time = 0.0
        self.max_body = 0
        self._body: deque[bytes] | None = None
        self._body_size = 0
        self.body_done = False
        #: The whole request body has been written to the upstream.
        self.body_sent = False
        self.body_bytes = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._body_error: ProxyError | None = None
        self._continue_sent = False
        self.ctx: Any = None
        self._req_header: RequestHeader | None = None
        self.peer: HttpPeer | None = None
        self.upstream_reused = False
        self.retries = 0
        self.response_started = False
        self.response_done = False
        self.status = 0
        self.resp_bytes = 0
        self.error: ProxyError | None = None
        self.resp_mode = 0
        #: Trailer fields of the upstream response, if it had any.
        self.trailers: RawHeaders | None = None

    # -- the request, for phases ---------------------------------------------------------

    @property
    def req_header(self) -> RequestHeader:
        """The request header, to read or change (changes go upstream)."""
        h = self._req_header
        if h is None:
            h = RequestHeader(self.method.decode("latin-1"), self.url.decode("latin-1"),
                              self.version)
            h._fields = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw_headers]
            self._req_header = h
        return h

    @property
    def host(self) -> str | None:
        """The Host header of the request, or None."""
        return None if self.host_b is None else self.host_b.decode("latin-1")

    @property
    def client_addr(self) -> tuple[str, int]:
        """The client's (ip, port)."""
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
        """The (ip, port) the client connected to."""
        return self.conn.server_addr

    @property
    def has_body(self) -> bool:
        """True when the request carries a body (a length over 0, or chunked)."""
        return self.chunked or bool(self.content_length)

    def respond(self, status: int, headers: Any = None, body: bytes | str = b"") -> None:
        """Writes a whole response now (``headers``: a dict or list of pairs).

        Sets Content-Length; a phase that responds should then return True (request_filter).
        """
        if self.response_started:
            raise RuntimeError("the response has already started")
        if isinstance(body, str):
            body = body.encode()
        self.conn.respond(self, status, headers, body)

    # -- the request body ------------------------------------------------------------------

    async def read_body_chunk(self) -> bytes:
        """The next piece of the request body, or ``b""`` once it has all been read.

        Raises :class:`ProxyError` (413) when the body is larger than ``limits.max_body_bytes``.
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
        """The whole request body (at most ``limits.max_body_bytes``)."""
        parts = []
        while chunk := await self.read_body_chunk():
            parts.append(chunk)
        return b"".join(parts)

    # -- called by the connection ----------------------------------------------------------

    def feed_body(self, data: bytes) -> None:
        """A piece of request body arrived from the client."""
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
        """The request body is complete."""
        self.body_done = True
        self._wake()

    def fail_body(self, error: ProxyError) -> None:
        """The client went away or sent garbage before the body was complete."""
        if self._body_error is None:
            self._body_error = error
        self._wake()

    def _wake(self) -> None:
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __repr__(self) -> str:
        return f"<Session {self.method.decode()} {self.url.decode('latin-1')}>"
