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
        "downstream error: request headers too large")


@pytest.mark.parametrize(("error", "text"), [
    (ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL, cause="my bug"),
     "internal error: my bug"),
    (ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL), "internal error"),
    (ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL, cause=ValueError("bad value")),
     "internal error: bad value"),
    (ProxyError(ErrorKind.NO_PEER, ErrorSource.INTERNAL, cause="no such tenant"),
     "internal error: no upstream peer: no such tenant"),
    (ProxyError(ErrorKind.INTERNAL, ErrorSource.UPSTREAM, cause="odd"),
     "upstream error: internal error: odd"),
    (upstream_error(ErrorKind.READ_TIMEOUT, "no response in 60s"),
     "upstream error: read timeout: no response in 60s"),
    (downstream_error(ErrorKind.DOWNSTREAM_CLOSED),
     "downstream error: client closed the connection"),
], ids=["internal", "internal_no_cause", "internal_exception", "internal_source_other_kind",
        "internal_kind_other_source", "upstream", "downstream"])
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
