"""Errors that say who failed and whether a retry is safe.

Every failure on the proxy path is a :class:`ProxyError` with a *kind* (what went wrong), a
*source* (upstream, downstream or internal) and a *retry* decision, and optionally a *context*
(where, or doing what: ``"connecting to 10.0.0.1:80"``) and a *cause* (the underlying exception,
or a short text), kept apart as Pingora keeps them. ``fail_to_proxy`` turns it into a response
with the status from :attr:`ProxyError.status`: the kind's, or one the app chose
(:meth:`ProxyError.http_status`, Pingora's ``ErrorType::HTTPStatus``).
"""

from __future__ import annotations

import enum
import http


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
    ``CONNECTION_CLOSED`` and ``INVALID_RESPONSE``; 503 ``CIRCUIT_OPEN`` (an upstream's
    ``max_requests`` reached over the fleet: refused at once, never retried; the context
    names the upstream and the limit); 504 for ``CONNECT_TIMEOUT``,
    ``READ_TIMEOUT`` and ``WRITE_TIMEOUT``; 400 ``BAD_REQUEST``; 405 ``METHOD_NOT_ALLOWED``;
    431 ``HEADERS_TOO_LARGE``; 408 ``HEADER_TIMEOUT``; 413 ``BODY_TOO_LARGE``; 499
    ``DOWNSTREAM_CLOSED`` (the client is gone: nothing is sent, the access log shows 499); 500
    ``INTERNAL``. ``HTTP_STATUS`` is an error response of a status the app chose, given with
    the error (:meth:`ProxyError.http_status`: 401, 403, 429, 503, any from 100 to 599); 500
    when none was.
    """

    CONNECT_REFUSED = ("connect refused", 502)
    CONNECT_TIMEOUT = ("connect timeout", 504)
    CONNECT_ERROR = ("connect error", 502)
    TLS_ERROR = ("upstream TLS handshake failed", 502)
    NO_PEER = ("no upstream peer", 502)
    CIRCUIT_OPEN = ("upstream circuit breaker open", 503)
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
    HTTP_STATUS = ("http status", 500)

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
    request then fails with the kind's status through ``fail_to_proxy``. For a status of the
    app's choosing, raise ``ProxyError.http_status(429, cause="over the limit")``, or give
    ``status=`` with any kind (``ProxyError(ErrorKind.NO_PEER, ErrorSource.UPSTREAM,
    status=503)``).

    ``str(error)`` is ``"<source> error: <text>: <context>: <cause>"`` (``"upstream error:
    connect refused: ..."``), as the error log shows it (upstream errors as warnings, others as
    info); when the text is that prefix already, it is said once (``"internal error:
    <cause>"``). An empty context or a missing cause is left out. For an ``HTTP_STATUS`` error
    the text is the status and its reason (``"internal error: 429 too many requests"``).
    """

    __slots__ = ("kind", "source", "retry", "cause", "context", "reused", "_status")

    kind: ErrorKind
    """What went wrong, and so the status of the error response (unless :attr:`status` was
    given)."""
    source: ErrorSource
    """Which side failed."""
    retry: RetryType
    """Whether the request may be sent again; ``fail_to_connect`` and ``error_while_proxy``
    may change it."""
    cause: BaseException | str | None
    """The underlying exception or a short text, or None."""
    context: str
    """Where the failure happened, or what was being done (``"reading the response head"``);
    ``""`` when nothing more is known than the kind says."""
    reused: bool
    """True when the failure happened on a connection taken from a pool."""

    def __init__(
        self,
        kind: ErrorKind,
        source: ErrorSource,
        retry: RetryType = RetryType.NEVER,
        cause: BaseException | str | None = None,
        *,
        status: int | None = None,
        context: str = "",
    ) -> None:
        super().__init__(kind, source, retry, cause)
        self.kind = kind
        self.source = source
        self.retry = retry
        self.cause = cause
        self.context = context
        self.reused = False
        self._status = 0 if status is None else _checked_status(status)

    @classmethod
    def http_status(
        cls,
        status: int,
        cause: BaseException | str | None = None,
        *,
        source: ErrorSource = ErrorSource.INTERNAL,
        context: str = "",
    ) -> ProxyError:
        """An ``HTTP_STATUS`` error: the request fails with ``status`` (100 to 599), through
        ``fail_to_proxy``, whose default page reads ``"<status> <reason>"`` (``"403
        forbidden"``). Never retried.

        ``source`` says who failed, as for any error: ``INTERNAL`` (the default: the app
        decided) keeps the client's connection open; ``DOWNSTREAM`` closes it after the
        response; ``UPSTREAM`` logs the error as a warning. Raises ``ValueError`` when
        ``status`` is not an integer from 100 to 599.
        """
        return cls(
            ErrorKind.HTTP_STATUS, source, RetryType.NEVER, cause, status=status, context=context
        )

    @property
    def status(self) -> int:
        """The status code of the default error response for this error: the one given
        (:meth:`http_status`, ``status=``), else the kind's. May be set (100 to 599), for
        example by ``error_while_proxy``; setting 0 goes back to the kind's."""
        return self._status or self.kind.status

    @status.setter
    def status(self, status: int) -> None:
        self._status = 0 if status == 0 else _checked_status(status)

    @property
    def text(self) -> str:
        """What went wrong, in a few words, as the default error page says it after the status:
        the kind's text (``"connect refused"``), or for an ``HTTP_STATUS`` error the status's
        reason phrase in lower case (``"too many requests"``; the kind's text, ``"http
        status"``, for a status without one)."""
        if self.kind is ErrorKind.HTTP_STATUS:
            phrase = _PHRASES.get(self.status)
            if phrase is not None:
                return phrase
        return self.kind.text

    def retryable(self) -> bool:
        """True when the request may be sent again: ``retry`` is ``ALWAYS``, or ``IF_REUSED``
        and the failed connection came from a pool (:attr:`reused`)."""
        if self.retry is RetryType.ALWAYS:
            return True
        return self.retry is RetryType.IF_REUSED and self.reused

    def __str__(self) -> str:
        text = f"{self.source.value} error"
        what = self.text
        if self.kind is ErrorKind.HTTP_STATUS:
            what = f"{self.status} {what}"
        if what != text:
            text += f": {what}"
        if self.context:
            text += f": {self.context}"
        if self.cause is not None:
            text += f": {self.cause}"
        return text


#: Reason phrases in lower case, as error pages and messages say them (``"forbidden"``).
_PHRASES: dict[int, str] = {s.value: s.phrase.lower() for s in http.HTTPStatus}


def _checked_status(status: int) -> int:
    """``status`` when it is a status code an error response may have; else ``ValueError``."""
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError(f"an HTTP status is an integer from 100 to 599, not {status!r}")
    return status


def upstream_error(
    kind: ErrorKind,
    cause: BaseException | str | None = None,
    retry: RetryType = RetryType.NEVER,
    *,
    context: str = "",
) -> ProxyError:
    """A :class:`ProxyError` whose source is the upstream."""
    return ProxyError(kind, ErrorSource.UPSTREAM, retry, cause, context=context)


def circuit_open(upstream: str, limit: str, value: int) -> ProxyError:
    """The ``CIRCUIT_OPEN`` error (503, never retried) of ``upstream`` whose ``limit``
    (``"max_requests"``) of ``value`` is reached over the fleet."""
    return ProxyError(
        ErrorKind.CIRCUIT_OPEN,
        ErrorSource.UPSTREAM,
        RetryType.NEVER,
        context=f"upstream {upstream}: {limit} {value} reached",
    )


def downstream_error(
    kind: ErrorKind, cause: BaseException | str | None = None, *, context: str = ""
) -> ProxyError:
    """A :class:`ProxyError` whose source is the downstream client."""
    return ProxyError(kind, ErrorSource.DOWNSTREAM, RetryType.NEVER, cause, context=context)
