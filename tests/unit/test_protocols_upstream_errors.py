"""The engine alone, over HTTP/1.1 and HTTP/2 clients: the upstream write timeout (an origin
whose connection stays full), and ``error_while_proxy`` deciding the retry (it runs before the
decision, as in Pingora)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from shared.apps.load_balancer import LoadBalancer
from shared.errors import ErrorKind, RetryType
from tests.support.protocols import OK_HEAD, PROTOCOLS, Proxy, proxies

WRITE_TIMEOUT = 0.05
TIMEOUTS = {"upstream_write_seconds": WRITE_TIMEOUT, "upstream_read_seconds": 30.0}


@pytest.fixture(params=PROTOCOLS)
def make_proxy(request: pytest.FixtureRequest) -> Iterator[Callable[..., Proxy]]:
    yield from proxies(request.param)


# -- the write timeout -------------------------------------------------------------------


def test_a_stalled_request_is_504_write_timeout(make_proxy: Callable[..., Proxy]) -> None:
    """The origin's connection stays full for the write timeout: 504, WRITE_TIMEOUT, and the
    upstream connection is closed."""
    proxy = make_proxy(timeouts=TIMEOUTS)
    c = proxy.client()
    rid = c.start("POST", "/upload", [("Content-Length", "100000")], end=False)
    [up] = proxy.origin.conns
    c.send(rid, b"p" * 16384)
    proxy.step(up.full, True)
    proxy.wait(WRITE_TIMEOUT * 4)
    r = c.reply(rid)
    assert r is not None and r.status == 504
    assert up.closed
    warnings = [rec.getMessage() for rec in proxy.records.records]
    assert any("write timeout" in m for m in warnings), warnings


def test_a_request_that_moves_again_is_not_cut_off(make_proxy: Callable[..., Proxy]) -> None:
    """Stalls shorter than the write timeout, however many, add up to nothing."""
    proxy = make_proxy(timeouts=TIMEOUTS)
    c = proxy.client()
    rid = c.start("POST", "/upload", [("Content-Length", "65536")], end=False)
    [up] = proxy.origin.conns
    for _ in range(4):
        c.send(rid, b"p" * 16384)
        proxy.step(up.full, True)
        proxy.wait(WRITE_TIMEOUT * 0.5)
        proxy.step(up.full, False)
    proxy.step(up.reply, OK_HEAD % 0)
    r = c.reply(rid)
    assert r is not None and (r.status, r.complete) == (200, True)
    assert len(up.requests[0].body) == 65536


# -- error_while_proxy decides the retry -------------------------------------------------


class Retrying(LoadBalancer):
    """Marks every upstream failure ALWAYS retryable, or NEVER, and records what it saw."""

    def __init__(self, retry: RetryType) -> None:
        super().__init__()
        self.retry = retry
        self.seen: list[tuple[ErrorKind, bool, int]] = []

    def error_while_proxy(self, session, peer, error, ctx):
        self.seen.append((error.kind, error.retryable(), session.retries))
        error.retry = self.retry
        return error


def test_error_while_proxy_makes_a_retry(make_proxy: Callable[..., Proxy]) -> None:
    """An origin that closes a fresh connection without answering a POST is not retried by
    itself (not idempotent); marked ALWAYS in error_while_proxy, the request goes again, on a
    new connection."""
    app = Retrying(RetryType.ALWAYS)
    proxy = make_proxy(app)
    c = proxy.client()
    rid = c.request("POST", "/once")
    [first] = proxy.origin.conns
    proxy.step(first.end)
    assert app.seen == [(ErrorKind.CONNECTION_CLOSED, False, 0)]
    [_, second] = proxy.origin.conns
    proxy.step(second.reply, OK_HEAD % 2 + b"ok")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body) == (200, b"ok")


def test_error_while_proxy_stops_a_retry(make_proxy: Callable[..., Proxy]) -> None:
    """A pooled connection that closes before answering is retried by itself; marked NEVER
    in error_while_proxy, the request fails at once (502) and no new connection is made."""
    app = Retrying(RetryType.NEVER)
    proxy = make_proxy(app)
    c = proxy.client()
    rid = c.request("GET", "/first")
    [up] = proxy.origin.conns
    proxy.step(up.reply, OK_HEAD % 0)
    assert c.reply(rid) is not None
    rid = c.request("GET", "/second")
    assert len(proxy.origin.conns) == 1  # the pooled connection carries it
    proxy.step(up.end)
    assert app.seen == [(ErrorKind.CONNECTION_CLOSED, True, 0)]
    r = c.reply(rid)
    assert r is not None and r.status == 502
    assert len(proxy.origin.conns) == 1
