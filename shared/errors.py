"""Errors that say who failed and whether a retry is safe.

Every failure on the proxy path is a :class:`ProxyError` with a *kind* (what went wrong), a
*source* (upstream, downstream or internal) and a *retry* decision. ``fail_to_proxy`` turns it
into a response with the status from :meth:`ProxyError.status`.
"""

from __future__ import annotations

import enum


class ErrorSource(enum.Enum):
    """Which side of the proxy failed: ``UPSTREAM`` (the origin or the way to it), ``DOWNSTREAM``
    (the client: a malformed request, a body too large, a client gone; the client's connection
    is closed after the error response) or ``INTERNAL`` (the proxy or the app)."""

    UPSTREAM = "upstream"
    DOWNSTREAM = "downstream"
    INTERNAL = "internal"


class RetryType(enum.Enum):
    """Whether the request may be sent again, on a fresh connection or to another peer:
    ``NEVER``, ``ALWAYS`` or ``IF_REUSED``. Read by :meth:`ProxyError.retryable`."""

    NEVER = "never"
    ALWAYS = "always"
    IF_REUSED = "if_reused"
    """Only when the failed connection came from the pool: a reused connection may have been closed
    by the origin while idle, which says nothing about a fresh one."""


class ErrorKind(enum.Enum):
    """What went wrong. Each kind has a ``text`` and a ``status``, the status code of its error
    response: 502 for ``CONNECT_REFUSED``, ``CONNECT_ERROR``, ``TLS_ERROR``, ``NO_PEER``,
    ``CONNECTION_CLOSED`` and ``INVALID_RESPONSE``; 504 for ``CONNECT_TIMEOUT``,
    ``READ_TIMEOUT`` and ``WRITE_TIMEOUT``; 400 ``BAD_REQUEST``; 405 ``METHOD_NOT_ALLOWED``;
    431 ``HEADERS_TOO_LARGE``; 408 ``HEADER_TIMEOUT``; 413 ``BODY_TOO_LARGE``; 499
    ``DOWNSTREAM_CLOSED`` (the client is gone: nothing is sent, the access log shows 499); 500
    ``INTERNAL``.
    """

    CONNECT_REFUSED = ("connect refused", 502)
    CONNECT_TIMEOUT = ("connect timeout", 504)
    CONNECT_ERROR = ("connect error", 502)
    TLS_ERROR = ("upstream TLS handshake failed", 502)
    NO_PEER = ("no upstream peer", 502)
    READ_TIMEOUT = ("read timeout", 504)
    WRITE_TIMEOUT = ("write timeout", 504)
    CONNECTION_CLOSED = ("connection closed", 502)
    INVALID_RESPONSE = ("invalid upstream response", 502)
    BAD_REQUEST = ("bad request", 400)
    METHOD_NOT_ALLOWED = ("method not allowed", 405)
    HEADERS_TOO_LARGE = ("request headers too large", 431)
    HEADER_TIMEOUT = ("request head not received in time", 408)
    BODY_TOO_LARGE = ("request body too large", 413)
    DOWNSTREAM_CLOSED = ("client closed the connection", 499)
    INTERNAL = ("internal error", 500)

    text: str
    """What went wrong, in a few words (``"connect refused"``)."""
    status: int
    """The status code of the error response (``502``)."""

    def __init__(self, text: str, status: int) -> None:
        self.text = text
        self.status = status


class ProxyError(Exception):
    """A failure while proxying one request.

    The engine makes one for every failure and hands it to ``fail_to_connect``,
    ``error_while_proxy``, ``fail_to_proxy`` and ``logging``. An app may raise one from a
    phase, ``ProxyError(ErrorKind.NO_PEER, ErrorSource.UPSTREAM, cause="no such tenant")``: the
    request then fails with the kind's status through ``fail_to_proxy`` (for a status of your
    own, answer in ``request_filter`` with ``session.respond`` instead). ``str(error)`` is
    ``"<source> error: <kind text>: <cause>"`` (``"upstream error: connect refused: ..."``),
    as the error log shows it (upstream errors as warnings, others as info); when the kind text
    is that prefix already, it is said once (``"internal error: <cause>"``). Without a cause
    the last part is left out.
    """

    __slots__ = ("kind", "source", "retry", "cause", "reused")

    kind: ErrorKind
    """What went wrong, and so the status of the error response."""
    source: ErrorSource
    """Which side failed."""
    retry: RetryType
    """Whether the request may be sent again; ``fail_to_connect`` may change it."""
    cause: BaseException | str | None
    """The underlying exception or a short text, or None."""
    reused: bool
    """True when the failure happened on a connection taken from a pool."""

    def __init__(
        self,
        kind: ErrorKind,
        source: ErrorSource,
        retry: RetryType = RetryType.NEVER,
        cause: BaseException | str | None = None,
    ) -> None:
        super().__init__(kind, source, retry, cause)
        self.kind = kind
        self.source = source
        self.retry = retry
        self.cause = cause
        self.reused = False

    @property
    def status(self) -> int:
        """The status code of the default error response for this error."""
        return self.kind.status

    def retryable(self) -> bool:
        """True when the request may be sent again: ``retry`` is ``ALWAYS``, or ``IF_REUSED``
        and the failed connection came from a pool (:attr:`reused`)."""
        if self.retry is RetryType.ALWAYS:
            return True
        return self.retry is RetryType.IF_REUSED and self.reused

    def __str__(self) -> str:
        text = f"{self.source.value} error"
        if self.kind.text != text:
            text += f": {self.kind.text}"
        if self.cause is not None:
            text += f": {self.cause}"
        return text


def upstream_error(kind: ErrorKind, cause: BaseException | str | None = None,
                   retry: RetryType = RetryType.NEVER) -> ProxyError:
    """A :class:`ProxyError` whose source is the upstream."""
    return ProxyError(kind, ErrorSource.UPSTREAM, retry, cause)


def downstream_error(kind: ErrorKind, cause: BaseException | str | None = None) -> ProxyError:
    """A :class:`ProxyError` whose source is the downstream client."""
    return ProxyError(kind, ErrorSource.DOWNSTREAM, RetryType.NEVER, cause)
