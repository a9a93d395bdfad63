"""shared.errors: default status per kind, retry decisions and messages."""

from __future__ import annotations

import pytest

from shared.errors import (
    ErrorKind,
    ErrorSource,
    ProxyError,
    RetryType,
    downstream_error,
    upstream_error,
)

STATUS = {
    ErrorKind.CONNECT_REFUSED: 502,
    ErrorKind.CONNECT_ERROR: 502,
    ErrorKind.TLS_ERROR: 502,
    ErrorKind.NO_PEER: 502,
    ErrorKind.CIRCUIT_OPEN: 503,
    ErrorKind.CONNECTION_CLOSED: 502,
    ErrorKind.INVALID_RESPONSE: 502,
    ErrorKind.CONNECT_TIMEOUT: 504,
    ErrorKind.READ_TIMEOUT: 504,
    ErrorKind.WRITE_TIMEOUT: 504,
    ErrorKind.BAD_REQUEST: 400,
    ErrorKind.METHOD_NOT_ALLOWED: 405,
    ErrorKind.HEADERS_TOO_LARGE: 431,
    ErrorKind.HEADER_TIMEOUT: 408,
    ErrorKind.BODY_TOO_LARGE: 413,
    ErrorKind.DOWNSTREAM_CLOSED: 499,
    ErrorKind.INTERNAL: 500,
    ErrorKind.HTTP_STATUS: 500,
}


@pytest.mark.parametrize(("kind", "status"), STATUS.items(), ids=lambda v: getattr(v, "name", v))
def test_default_status_per_kind(kind: ErrorKind, status: int) -> None:
    """Each kind maps to its default status: refused 502, timeouts 504, 400, 431, 408, 413,
    500."""
    assert ProxyError(kind, ErrorSource.UPSTREAM).status == status


def test_every_kind_has_an_expected_status() -> None:
    """The table above covers every kind, so a new kind needs its status decided here."""
    assert set(STATUS) == set(ErrorKind)


@pytest.mark.parametrize(
    ("retry", "reused", "expected"),
    [
        (RetryType.NEVER, False, False),
        (RetryType.NEVER, True, False),
        (RetryType.ALWAYS, False, True),
        (RetryType.ALWAYS, True, True),
        (RetryType.IF_REUSED, False, False),
        (RetryType.IF_REUSED, True, True),
    ],
)
def test_retryable(retry: RetryType, reused: bool, expected: bool) -> None:
    """IF_REUSED retries only a failure on a pooled connection; ALWAYS and NEVER mean it."""
    error = upstream_error(ErrorKind.CONNECTION_CLOSED, retry=retry)
    error.reused = reused
    assert error.retryable() is expected


def test_new_error_is_not_reused() -> None:
    """A new error counts as on a fresh connection, so IF_REUSED does not retry it yet."""
    error = upstream_error(ErrorKind.CONNECTION_CLOSED, retry=RetryType.IF_REUSED)
    assert error.reused is False
    assert error.retryable() is False


def test_retry_can_be_changed_by_a_phase() -> None:
    """Setting error.retry (as fail_to_connect may) changes the decision."""
    error = upstream_error(ErrorKind.CONNECT_REFUSED)
    assert error.retryable() is False
    error.retry = RetryType.ALWAYS
    assert error.retryable() is True


def test_str_names_source_kind_and_cause() -> None:
    """str() says which side failed, what went wrong, and the cause."""
    cause = ConnectionRefusedError(111, "Connection refused")
    error = upstream_error(ErrorKind.CONNECT_REFUSED, cause)
    assert str(error) == "upstream error: connect refused: [Errno 111] Connection refused"
    assert error.cause is cause
    assert error.source is ErrorSource.UPSTREAM


def test_str_without_cause() -> None:
    """Without a cause, str() is the source and kind only."""
    assert str(downstream_error(ErrorKind.HEADERS_TOO_LARGE)) == (
        "downstream error: request headers too large"
    )


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (
            ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL, cause="my bug"),
            "internal error: my bug",
        ),
        (ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL), "internal error"),
        (
            ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL, cause=ValueError("bad value")),
            "internal error: bad value",
        ),
        (
            ProxyError(ErrorKind.NO_PEER, ErrorSource.INTERNAL, cause="no such tenant"),
            "internal error: no upstream peer: no such tenant",
        ),
        (
            ProxyError(ErrorKind.INTERNAL, ErrorSource.UPSTREAM, cause="odd"),
            "upstream error: internal error: odd",
        ),
        (
            upstream_error(ErrorKind.READ_TIMEOUT, "no response in 60s"),
            "upstream error: read timeout: no response in 60s",
        ),
        (
            downstream_error(ErrorKind.DOWNSTREAM_CLOSED),
            "downstream error: client closed the connection",
        ),
    ],
    ids=[
        "internal",
        "internal_no_cause",
        "internal_exception",
        "internal_source_other_kind",
        "internal_kind_other_source",
        "upstream",
        "downstream",
    ],
)
def test_str_says_internal_error_once(error: ProxyError, text: str) -> None:
    """An internal error reads ``internal error: <cause>``: the source's prefix and the kind's
    text are the same words, said once; other pairs keep both parts."""
    assert str(error) == text


def test_downstream_errors_never_retry() -> None:
    """A downstream error has the downstream source and is never retried."""
    error = downstream_error(ErrorKind.BAD_REQUEST, "bad chunk size")
    error.reused = True
    assert error.source is ErrorSource.DOWNSTREAM
    assert error.retry is RetryType.NEVER
    assert error.retryable() is False
    assert error.status == 400


def test_is_an_exception() -> None:
    """A ProxyError can be raised and caught like any exception."""
    with pytest.raises(ProxyError) as info:
        raise upstream_error(ErrorKind.READ_TIMEOUT, "no response in 60s")
    assert info.value.kind is ErrorKind.READ_TIMEOUT
    assert info.value.status == 504


# -- errors of a status the app chose (Pingora's ErrorType::HTTPStatus) ---------------------


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (401, "unauthorized"),
        (403, "forbidden"),
        (429, "too many requests"),
        (503, "service unavailable"),
        (418, "i'm a teapot"),
        (599, "http status"),
    ],
)
def test_http_status_error(status: int, text: str) -> None:
    """http_status() makes an HTTP_STATUS error with that status; its text is the reason
    phrase (the kind's text for a status without one); it is never retried."""
    error = ProxyError.http_status(status, cause="no token")
    assert (error.kind, error.status, error.text) == (ErrorKind.HTTP_STATUS, status, text)
    assert error.source is ErrorSource.INTERNAL
    assert error.retryable() is False
    assert str(error) == f"internal error: {status} {text}: no token"


def test_http_status_error_source_and_context() -> None:
    """The source and a context may be given; str() has the context before the cause."""
    error = ProxyError.http_status(
        429, "10 requests/s", source=ErrorSource.DOWNSTREAM, context="rate limit of 203.0.113.9"
    )
    assert error.source is ErrorSource.DOWNSTREAM
    assert str(error) == (
        "downstream error: 429 too many requests: rate limit of 203.0.113.9: 10 requests/s"
    )


def test_status_overrides_the_kind() -> None:
    """status= on any kind sets the error's status; kind, text and str() stay the kind's."""
    error = ProxyError(ErrorKind.NO_PEER, ErrorSource.UPSTREAM, cause="all down", status=503)
    assert (error.status, error.text) == (503, "no upstream peer")
    assert str(error) == "upstream error: no upstream peer: all down"


def test_status_can_be_set_and_reset() -> None:
    """A phase may set error.status (error_while_proxy, say); 0 goes back to the kind's."""
    error = upstream_error(ErrorKind.READ_TIMEOUT)
    error.status = 503
    assert error.status == 503
    error.status = 0
    assert error.status == 504


@pytest.mark.parametrize("status", [99, 600, 0, -1, "403", 403.0, True])
def test_status_must_be_a_status_code(status: object) -> None:
    """A status that is not an integer from 100 to 599 is refused when the error is made or
    the status set."""
    with pytest.raises(ValueError, match="an HTTP status is an integer from 100 to 599"):
        ProxyError.http_status(status)  # type: ignore[arg-type]
    if status != 0:
        error = upstream_error(ErrorKind.READ_TIMEOUT)
        with pytest.raises(ValueError):
            error.status = status  # type: ignore[assignment]
        assert error.status == 504


# -- context, kept apart from cause (Pingora's context and cause) --------------------------


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (
            upstream_error(
                ErrorKind.CONNECT_REFUSED,
                ConnectionRefusedError(111, "Connection refused"),
                context="connecting to 10.0.0.1:80",
            ),
            "upstream error: connect refused: connecting to 10.0.0.1:80: [Errno 111] Connection "
            "refused",
        ),
        (
            downstream_error(ErrorKind.BAD_REQUEST, context="reading the chunked body"),
            "downstream error: bad request: reading the chunked body",
        ),
        (
            ProxyError(
                ErrorKind.INTERNAL,
                ErrorSource.INTERNAL,
                cause="my bug",
                context="in request_filter",
            ),
            "internal error: in request_filter: my bug",
        ),
    ],
    ids=["upstream", "no_cause", "internal"],
)
def test_str_has_the_context_before_the_cause(error: ProxyError, text: str) -> None:
    """A context says where or what, between the kind and the cause."""
    assert str(error) == text


def test_context_is_empty_by_default_and_kept_apart() -> None:
    """Without a context, context is "" and cause holds only the cause."""
    cause = OSError("reset")
    error = upstream_error(ErrorKind.CONNECTION_CLOSED, cause)
    assert (error.context, error.cause) == ("", cause)
    error.context = "reading the response head"
    assert str(error) == "upstream error: connection closed: reading the response head: reset"
