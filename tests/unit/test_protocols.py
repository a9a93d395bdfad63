"""The engine, H1Server, H2Server and the exchange, each case over HTTP/1.1 and HTTP/2 (h2c with
prior knowledge), in one process with the origin standing in at the event loop's
``create_connection`` (tests/support/protocols.py). What is asserted is what a user sees on
the wire: the bytes the client gets, parsed with httptools or h2, and the requests the origin
parses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from h2.errors import ErrorCodes

from shared.apps.load_balancer import LoadBalancer
from shared.headers import ResponseHeader
from shared.session import Session
from tests.support.protocols import (
    CLIENT_ADDR,
    HOST,
    OK_HEAD,
    PROTOCOLS,
    H1Client,
    H2Client,
    Proxy,
    proxies,
)


@pytest.fixture(params=PROTOCOLS)
def make_proxy(request: pytest.FixtureRequest) -> Iterator[Callable[..., Proxy]]:
    """Makes proxies in the test's protocol (see :func:`proxies`)."""
    yield from proxies(request.param)


@pytest.fixture
def proxy(make_proxy: Callable[..., Proxy]) -> Proxy:
    return make_proxy()


# -- the cases --------------------------------------------------------------------------------


def test_get_is_proxied(proxy: Proxy) -> None:
    c = proxy.client()
    rid = c.request("GET", "/a/b?q=1", [("Accept", "text/plain"), ("X-Forwarded-For", "10.1.1.1")])
    [up] = proxy.origin.conns
    [req] = up.requests
    assert (req.method, req.target, req.complete) == (b"GET", b"/a/b?q=1", True)
    assert req.header(b"host") == [HOST.encode()]
    assert req.header(b"accept") == [b"text/plain"]
    # The client's X-Forwarded-For is kept, the client's address added after it.
    assert req.header(b"x-forwarded-for") == [b"10.1.1.1, " + CLIENT_ADDR[0].encode()]
    assert req.header(b"x-forwarded-proto") == [b"http"]
    assert c.reply(rid) is None  # nothing before the origin answers

    proxy.step(up.reply, OK_HEAD % 5 + b"hello")
    r = c.reply(rid)
    assert r is not None
    assert (r.status, r.body, r.complete) == (200, b"hello", True)
    assert r.header(b"x-origin") == [b"yes"]
    assert r.header(b"content-length") == [b"5"]
    assert not c.closed


def test_tls_client_is_proxied_as_https(proxy: Proxy) -> None:
    """On a TLS listener (HTTP/2 chosen by ALPN, not the preface): X-Forwarded-Proto says
    https."""
    c = proxy.client(tls=True)
    rid = c.request("GET", "/")
    [req] = proxy.origin.requests
    assert req.header(b"x-forwarded-proto") == [b"https"]
    proxy.step(proxy.origin.conns[0].reply, OK_HEAD % 2 + b"ok")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (200, b"ok", True)


def test_post_body_is_streamed_up(proxy: Proxy) -> None:
    c = proxy.client()
    rid = c.start("POST", "/upload", [("Content-Length", "10")], end=False)
    [up] = proxy.origin.conns
    [req] = up.requests
    assert req.method == b"POST" and req.body == b""
    assert req.header(b"content-length") == [b"10"]

    c.send(rid, b"01234")
    assert (req.body, req.complete) == (b"01234", False)  # passed on before the rest came
    c.send(rid, b"56789", end=True)
    assert (req.body, req.complete) == (b"0123456789", True)

    proxy.step(up.reply, OK_HEAD % 2 + b"ok")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (200, b"ok", True)


def test_post_body_of_unknown_length_goes_up_chunked(make_proxy: Callable[..., Proxy]) -> None:
    """HTTP/1.1 chunked, or HTTP/2 DATA without content-length: re-chunked for the origin."""
    proxy = make_proxy()
    c = proxy.client()
    if c.h2:
        rid = c.start("POST", "/up", end=False)
        c.send(rid, b"abc")
        c.send(rid, b"defg", end=True)
    else:
        rid = c.start("POST", "/up", [("Transfer-Encoding", "chunked")], end=False)
        c.send(rid, b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    [req] = proxy.origin.requests
    assert req.header(b"transfer-encoding") == [b"chunked"]
    assert (req.body, req.complete) == (b"abcdefg", True)
    proxy.step(proxy.origin.conns[0].reply, OK_HEAD % 0)
    r = c.reply(rid)
    assert r is not None and (r.status, r.complete) == (200, True)


def test_response_is_streamed_down_in_pieces(proxy: Proxy) -> None:
    c = proxy.client()
    rid = c.request("GET", "/stream")
    [up] = proxy.origin.conns
    proxy.step(up.reply, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (200, b"", False)

    proxy.step(up.reply, b"5\r\nfirst\r\n")
    r = c.reply(rid)
    assert r is not None and (r.body, r.complete) == (b"first", False)
    proxy.step(up.reply, b"6\r\nsecond\r\n")
    r = c.reply(rid)
    assert r is not None and (r.body, r.complete) == (b"firstsecond", False)
    proxy.step(up.reply, b"0\r\n\r\n")
    r = c.reply(rid)
    assert r is not None and (r.body, r.complete) == (b"firstsecond", True)
    if c.h2:
        assert r.header(b"transfer-encoding") == []  # connection-specific in HTTP/2
    else:
        assert r.header(b"transfer-encoding") == [b"chunked"]
    assert not c.closed


def test_connect_failure_is_502(proxy: Proxy) -> None:
    proxy.origin.refuse = True
    c = proxy.client()
    rid = c.request("GET", "/")
    # Refused is retryable: tried again, server.max_retries times.
    assert proxy.origin.attempts == 1 + proxy.engine.max_retries
    r = c.reply(rid)
    assert r is not None
    assert (r.status, r.complete) == (502, True)
    assert r.body.startswith(b"502 ")
    assert r.header(b"content-length") == [str(len(r.body)).encode()]
    assert r.header(b"x-origin") == []
    if isinstance(c, H1Client):
        assert len(c.replies()) == 1  # one response and nothing after it
    else:
        assert r.reset is None


def test_upstream_failure_after_the_head_ends_the_response_the_protocols_way(
    proxy: Proxy,
) -> None:
    c = proxy.client()
    rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    proxy.step(up.reply, OK_HEAD % 100 + b"0123456789")
    proxy.step(up.fail)
    r = c.reply(rid)
    assert r is not None
    assert (r.status, r.body, r.complete) == (200, b"0123456789", False)
    if isinstance(c, H2Client):
        # The stream is reset; the connection and its other streams carry on.
        assert r.reset is not None
        assert not c.closed and not c.goaway()
    else:
        # A response cut short: the client can only tell by the connection closing.
        assert c.closed
    assert len(proxy.origin.conns) == 1  # no retry once the response started


def test_upstream_failure_before_the_head_is_502(proxy: Proxy) -> None:
    c = proxy.client()
    rid = c.request("POST", "/", [("Content-Length", "1")], body=b"x")
    proxy.step(proxy.origin.conns[0].fail)
    r = c.reply(rid)
    assert r is not None and (r.status, r.complete) == (502, True)
    assert len(proxy.origin.conns) == 1  # a POST is not sent twice


class Answering(LoadBalancer):
    """Answers ``/direct`` itself in ``request_filter``."""

    def request_filter(self, session: Session, ctx: Any) -> bool:
        if session.url == b"/direct":
            session.respond(403, {"X-Answered": "by the app"}, b"not here\n")
            return True
        return False


def test_request_filter_answers_directly(make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy(Answering())
    c = proxy.client()
    rid = c.request("GET", "/direct")
    r = c.reply(rid)
    assert r is not None
    assert (r.status, r.body, r.complete) == (403, b"not here\n", True)
    assert r.header(b"x-answered") == [b"by the app"]
    assert proxy.origin.attempts == 0
    # The connection serves the next request, which goes upstream.
    rid = c.request("GET", "/other")
    proxy.step(proxy.origin.conns[0].reply, OK_HEAD % 0)
    r = c.reply(rid)
    assert r is not None and (r.status, r.complete) == (200, True)


def test_malformed_request_is_refused_and_origin_untouched(proxy: Proxy) -> None:
    c = proxy.client()
    if c.h2:
        # A field name in upper case is malformed (RFC 9113 8.2.1): the stream is reset.
        assert isinstance(c, H2Client)
        c.conn.config.validate_outbound_headers = False
        c.conn.config.normalize_outbound_headers = False
        sid = c.conn.get_next_available_stream_id()
        fields = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", HOST.encode()),
            (b":path", b"/"),
            (b"X-Upper", b"1"),
        ]
        c.conn.send_headers(sid, fields, end_stream=True)
        c.flush()
        r = c.reply(sid)
        assert r is not None and r.reset == ErrorCodes.PROTOCOL_ERROR and r.status == 0
        assert not c.closed
    else:
        c.feed(b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nBad Name: x\r\n\r\n")
        r = c.reply(0)
        assert r is not None and (r.status, r.complete) == (400, True)
        assert r.header(b"connection") == [b"close"]
        assert c.closed
    assert proxy.origin.attempts == 0


def test_invalid_content_length_is_refused_and_origin_untouched(proxy: Proxy) -> None:
    c = proxy.client()
    rid = c.start("POST", "/", [("Content-Length", "1x")], end=False)
    r = c.reply(rid)
    assert r is not None
    if c.h2:
        assert r.reset == ErrorCodes.PROTOCOL_ERROR
    else:
        assert r.status == 400 and c.closed
    assert proxy.origin.attempts == 0


def test_client_gone_mid_response_closes_the_upstream_connection(proxy: Proxy) -> None:
    c = proxy.client()
    rid = c.request("GET", "/big")
    [up] = proxy.origin.conns
    proxy.step(up.reply, OK_HEAD % 1000 + b"x" * 100)
    r = c.reply(rid)
    assert r is not None and r.body == b"x" * 100
    c.gone()
    assert up.closed  # half a response on it: never reused
    # The next request gets a connection of its own.
    c2 = proxy.client()
    rid = c2.request("GET", "/next")
    assert len(proxy.origin.conns) == 2
    assert [len(u.requests) for u in proxy.origin.conns] == [1, 1]
    proxy.step(proxy.origin.conns[1].reply, OK_HEAD % 2 + b"ok")
    r = c2.reply(rid)
    assert r is not None and (r.status, r.body) == (200, b"ok")


@pytest.mark.parametrize("make_proxy", ["h2c"], indirect=True)
def test_h2_stream_reset_mid_response_closes_the_upstream_connection(
    make_proxy: Callable[..., Proxy],
) -> None:
    proxy = make_proxy()
    c = proxy.client()
    assert isinstance(c, H2Client)
    sid = c.request("GET", "/big")
    [up] = proxy.origin.conns
    proxy.step(up.reply, OK_HEAD % 1000 + b"x" * 100)
    c.reset(sid)
    assert up.closed
    sid = c.request("GET", "/next")  # the same client connection goes on
    assert len(proxy.origin.conns) == 2
    proxy.step(proxy.origin.conns[1].reply, OK_HEAD % 0)
    r = c.reply(sid)
    assert r is not None and (r.status, r.complete) == (200, True)


def test_two_requests_in_a_row_on_one_connection(proxy: Proxy) -> None:
    c = proxy.client()
    first = c.request("GET", "/1")
    [up] = proxy.origin.conns
    proxy.step(up.reply, OK_HEAD % 3 + b"one")
    second = c.request("GET", "/2")
    # The upstream connection went back to the pool and carries the second request too.
    assert len(proxy.origin.conns) == 1
    assert [r.target for r in up.requests] == [b"/1", b"/2"]
    proxy.step(up.reply, OK_HEAD % 3 + b"two")
    r1, r2 = c.reply(first), c.reply(second)
    assert r1 is not None and (r1.status, r1.body, r1.complete) == (200, b"one", True)
    assert r2 is not None and (r2.status, r2.body, r2.complete) == (200, b"two", True)
    assert not c.closed


def test_two_requests_at_once(proxy: Proxy) -> None:
    """HTTP/2: two streams at once, each with an upstream connection of its own. HTTP/1.1:
    the second request is pipelined, and goes up only once the first is answered."""
    c = proxy.client()
    first = c.request("GET", "/1")
    second = c.request("GET", "/2")
    if c.h2:
        a, b = proxy.origin.conns
        assert [r.target for r in a.requests + b.requests] == [b"/1", b"/2"]
        proxy.step(b.reply, OK_HEAD % 3 + b"two")  # the second answered first
        r2 = c.reply(second)
        assert r2 is not None and r2.complete and c.reply(first) is None
        proxy.step(a.reply, OK_HEAD % 3 + b"one")
    else:
        [a] = proxy.origin.conns
        assert [r.target for r in a.requests] == [b"/1"]
        proxy.step(a.reply, OK_HEAD % 3 + b"one")
        assert [r.target for r in a.requests] == [b"/1", b"/2"]
        proxy.step(a.reply, OK_HEAD % 3 + b"two")
    r1, r2 = c.reply(first), c.reply(second)
    assert r1 is not None and (r1.body, r1.complete) == (b"one", True)
    assert r2 is not None and (r2.body, r2.complete) == (b"two", True)


def test_client_backpressure_pauses_reading_the_upstream(proxy: Proxy) -> None:
    c = proxy.client()
    rid = c.request("GET", "/big")
    [up] = proxy.origin.conns
    proxy.step(up.reply, OK_HEAD % 20 + b"x" * 10)
    assert up.reading
    # The client's transport buffer fills: the loop calls pause_writing.
    proxy.step(c.protocol.pause_writing)
    assert not up.reading
    proxy.step(c.protocol.resume_writing)
    assert up.reading
    proxy.step(up.reply, b"y" * 10)
    r = c.reply(rid)
    assert r is not None and (r.body, r.complete) == (b"x" * 10 + b"y" * 10, True)


def test_backpressure_before_the_upstream_answers(proxy: Proxy) -> None:
    """A client not reading when its request goes up: the upstream is not read from the
    start."""
    c = proxy.client()
    proxy.step(c.protocol.pause_writing)
    if c.h2:
        # HTTP/2 stops reading the client too (its frames' answers would pile up): the
        # request has to be in before the pause.
        proxy.step(c.protocol.resume_writing)
        rid = c.request("GET", "/")
        proxy.step(c.protocol.pause_writing)
    else:
        rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    assert not up.reading
    proxy.step(c.protocol.resume_writing)
    assert up.reading
    proxy.step(up.reply, OK_HEAD % 1 + b"z")
    r = c.reply(rid)
    assert r is not None and (r.body, r.complete) == (b"z", True)


def test_request_body_waits_while_the_upstream_is_full(proxy: Proxy) -> None:
    """Backpressure up: while the origin does not read, the client is not read from either
    (HTTP/1.1: reading its connection pauses; HTTP/2: its window is not given back)."""
    total = 600 * 1024
    c = proxy.client()
    rid = c.start("POST", "/upload", [("Content-Length", str(total))], end=False)
    [up] = proxy.origin.conns
    proxy.step(up.full, True)
    piece = b"p" * 16384
    sent = 0
    if isinstance(c, H2Client):
        # As much as the window allows, until it stops opening.
        while sent < total and c.window(rid) >= len(piece):
            c.send(rid, piece)
            sent += len(piece)
        assert sent < total and c.window(rid) < len(piece)
    else:
        while sent < 400 * 1024:
            c.send(rid, piece)
            sent += len(piece)
        assert not c.transport.reading
    passed = len(up.requests[0].body)
    assert passed < sent  # the rest waits in the proxy, within its limit
    proxy.step(up.full, False)
    if isinstance(c, H2Client):
        assert c.window(rid) >= len(piece)
    else:
        assert c.transport.reading
    c.send(rid, b"q" * (total - sent), end=True)
    [req] = up.requests
    assert (len(req.body), req.complete) == (total, True)
    proxy.step(up.reply, OK_HEAD % 0)
    r = c.reply(rid)
    assert r is not None and (r.status, r.complete) == (200, True)


@pytest.mark.parametrize("make_proxy", ["h2c"], indirect=True)
def test_h2_client_window_pauses_reading_the_upstream(make_proxy: Callable[..., Proxy]) -> None:
    """Backpressure down in HTTP/2: what the client's window does not take waits, and the
    upstream is not read until a WINDOW_UPDATE opens it."""
    proxy = make_proxy()
    c = proxy.client()
    assert isinstance(c, H2Client)
    c.auto_ack = False
    rid = c.request("GET", "/big")
    [up] = proxy.origin.conns
    size = 100_000  # more than the default window (65535)
    proxy.step(up.reply, OK_HEAD % size + b"b" * 70_000)
    r = c.reply(rid)
    assert r is not None and len(r.body) == 65_535
    assert not up.reading
    c.ack(rid)
    assert up.reading
    proxy.step(up.reply, b"b" * (size - 70_000))
    c.ack(rid)
    r = c.reply(rid)
    assert r is not None and (len(r.body), r.complete) == (size, True)


# -- the app's response phases ------------------------------------------------------------------


class AsyncResponseFilter(LoadBalancer):
    """An ``async def response_filter``: the body waits while it runs."""

    async def response_filter(  # type: ignore[override]
        self, session: Session, resp: ResponseHeader, ctx: Any
    ) -> None:
        await asyncio.sleep(0)
        resp.set("X-Filtered", "later")


def test_an_async_response_filter_holds_the_body(make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy(AsyncResponseFilter())
    c = proxy.client()
    rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    # The head and the whole body in one read: the body waits for the filter, then follows.
    proxy.step(up.reply, OK_HEAD % 5 + b"hello")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (200, b"hello", True)
    assert r.header(b"x-filtered") == [b"later"]
    c.request("GET", "/2")
    assert len(proxy.origin.conns) == 1 and len(up.requests) == 2  # released to the pool


class Shout(LoadBalancer):
    """A ``response_body_filter`` that changes the body's length."""

    def response_body_filter(self, session: Session, body: bytes, end: bool, ctx: Any) -> bytes:
        return body.upper() + (b"!" if end else b"")


def test_a_body_filter_drops_the_length(make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy(Shout())
    c = proxy.client()
    rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    proxy.step(up.reply, OK_HEAD % 5 + b"hel")
    proxy.step(up.reply, b"lo")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (200, b"HELLO!", True)
    assert r.header(b"content-length") == []
    if isinstance(c, H1Client):
        assert r.header(b"transfer-encoding") == [b"chunked"]


# -- the client's limits ------------------------------------------------------------------------


def test_a_body_over_the_limit_by_its_length_is_413_and_origin_untouched(
    make_proxy: Callable[..., Proxy],
) -> None:
    proxy = make_proxy(limits={"max_body_bytes": 10})
    c = proxy.client()
    rid = c.start("POST", "/", [("Content-Length", "100")], end=False)
    r = c.reply(rid)
    assert r is not None and (r.status, r.complete) == (413, True)
    assert proxy.origin.attempts == 0


def test_a_body_growing_over_the_limit_is_413_and_its_upstream_closed(
    make_proxy: Callable[..., Proxy],
) -> None:
    proxy = make_proxy(limits={"max_body_bytes": 10})
    c = proxy.client()
    if isinstance(c, H2Client):
        rid = c.start("POST", "/", end=False)  # no content-length: the size shows as it comes
        c.send(rid, b"12345")
    else:
        rid = c.start("POST", "/", [("Transfer-Encoding", "chunked")], end=False)
        c.send(rid, b"5\r\n12345\r\n")
    [up] = proxy.origin.conns
    assert up.requests[0].body == b"12345"
    if isinstance(c, H2Client):
        c.send(rid, b"x" * 20)
    else:
        c.send(rid, b"14\r\n" + b"x" * 20 + b"\r\n")
    r = c.reply(rid)
    assert r is not None and (r.status, r.complete) == (413, True)
    assert up.closed and not up.requests[0].complete


@pytest.mark.parametrize("make_proxy", ["http/1.1"], indirect=True)
def test_a_head_too_slow_is_408(make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy()
    c = proxy.client()
    c.feed(b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n")
    proxy.step(proxy.engine.sweep, time.monotonic() + proxy.engine.header_timeout + 1)
    r = c.reply(0)
    assert r is not None and (r.status, r.complete) == (408, True)
    assert c.closed and proxy.origin.attempts == 0


@pytest.mark.parametrize("make_proxy", ["http/1.1"], indirect=True)
def test_expect_100_continue_is_answered_by_the_proxy(make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy()
    c = proxy.client()
    rid = c.start("POST", "/", [("Content-Length", "3"), ("Expect", "100-continue")], end=False)
    assert bytes(c.transport.written) == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(rid, b"abc")
    [req] = proxy.origin.requests
    assert req.header(b"expect") == [] and (req.body, req.complete) == (b"abc", True)


def test_an_idle_client_connection_is_closed_after_keepalive(proxy: Proxy) -> None:
    c = proxy.client()
    c.request("GET", "/")
    proxy.step(proxy.origin.conns[0].reply, OK_HEAD % 0)
    proxy.step(proxy.engine.sweep, time.monotonic() + proxy.engine.keepalive - 1)
    assert not c.closed
    proxy.step(proxy.engine.sweep, time.monotonic() + proxy.engine.keepalive + 1)
    assert c.closed


def test_fields_named_in_connection_are_dropped(proxy: Proxy) -> None:
    """RFC 9110 7.6.1: a field the origin's Connection names is hop-by-hop, on HTTP/2 too."""
    c = proxy.client()
    rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    proxy.step(
        up.reply,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Secret\r\nX-Secret: s\r\n\r\nok",
    )
    r = c.reply(rid)
    assert r is not None and (r.status, r.body) == (200, b"ok")
    assert r.header(b"x-secret") == []


def test_idle_close_sends_goaway_first(proxy: Proxy) -> None:
    """RFC 9113 6.8: an endpoint closing a connection SHOULD send GOAWAY first."""
    c = proxy.client()
    c.request("GET", "/")
    proxy.step(proxy.origin.conns[0].reply, OK_HEAD % 0)
    proxy.step(proxy.engine.sweep, time.monotonic() + proxy.engine.keepalive + 1)
    assert c.closed
    if isinstance(c, H2Client):
        assert c.goaway()


def test_early_response_says_close(proxy: Proxy) -> None:
    """RFC 9112 9.6: an answer before the whole request body closes the connection after it,
    and says so (``Connection: close``)."""
    c = proxy.client()
    rid = c.start("POST", "/", [("Content-Length", "10")], end=False)
    c.send(rid, b"01234")
    [up] = proxy.origin.conns
    proxy.step(up.reply, b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body) == (413, b"big")
    if isinstance(c, H1Client):
        assert c.closed and r.header(b"connection") == [b"close"]
