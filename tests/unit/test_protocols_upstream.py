"""The engine and its downstream servers against an origin that misbehaves or is slow, each case
over HTTP/1.1 and HTTP/2 (h2c): timeouts, retries, the upstream pool, and how an origin's
responses are framed for the client (tests/support/protocols.py; the main cases are in
test_protocols.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.protocols import HOST, OK_HEAD, PROTOCOLS, H1Client, H2Client, Proxy, proxies

#: A connect timeout short enough to wait out (seconds).
CONNECT_TIMEOUT = 0.05


@pytest.fixture(params=PROTOCOLS)
def make_proxy(request: pytest.FixtureRequest) -> Iterator[Callable[..., Proxy]]:
    """Makes proxies in the test's protocol (see :func:`proxies`)."""
    yield from proxies(request.param)


@pytest.fixture
def proxy(make_proxy: Callable[..., Proxy]) -> Proxy:
    return make_proxy()


# -- timeouts, retries, the pool ----------------------------------------------------------------


def test_upstream_read_timeout_is_504(make_proxy: Callable[..., Proxy]) -> None:
    """With no retry left (max_retries 0), a read timeout answers 504."""
    proxy = make_proxy(server={"max_retries": 0})
    c = proxy.client()
    rid = c.request("GET", "/slow")
    [up] = proxy.origin.conns
    # The worker's once-a-second sweep, past the read deadline.
    proxy.step(proxy.engine.sweep, time.monotonic() + proxy.engine.read_timeout + 1)
    r = c.reply(rid)
    assert r is not None and (r.status, r.complete) == (504, True)
    assert up.closed


def test_upstream_read_timeout_retries_a_get(proxy: Proxy) -> None:
    """A read timeout before any response byte sends an idempotent request again, on a new
    connection (nginx's proxy_next_upstream timeout); its answer reaches the client."""
    c = proxy.client()
    rid = c.request("GET", "/slow")
    [up] = proxy.origin.conns
    proxy.step(proxy.engine.sweep, time.monotonic() + proxy.engine.read_timeout + 1)
    assert up.closed
    [_, again] = proxy.origin.conns
    proxy.step(again.reply, OK_HEAD % 2 + b"ok")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body) == (200, b"ok")


def test_connect_timeout_is_504(make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy(
        server={"max_retries": 0}, timeouts={"upstream_connect_seconds": CONNECT_TIMEOUT}
    )
    proxy.origin.gate = proxy.loop.create_future()
    c = proxy.client()
    rid = c.request("GET", "/")
    assert c.reply(rid) is None
    proxy.wait(CONNECT_TIMEOUT * 3)
    r = c.reply(rid)
    assert r is not None and (r.status, r.complete) == (504, True)
    assert proxy.origin.attempts == 1


def test_a_reused_connection_found_dead_is_retried_on_a_new_one(proxy: Proxy) -> None:
    """An idempotent request whose reused connection dies before any response byte goes up
    again on a fresh connection; the client never knows."""
    c = proxy.client()
    first = c.request("GET", "/1")
    [up] = proxy.origin.conns
    proxy.step(up.reply, OK_HEAD % 0)
    second = c.request("GET", "/2")
    assert [r.target for r in up.requests] == [b"/1", b"/2"]
    proxy.step(up.fail)
    fresh = proxy.origin.conns[1]
    assert [r.target for r in fresh.requests] == [b"/2"]
    proxy.step(fresh.reply, OK_HEAD % 5 + b"again")
    r1, r2 = c.reply(first), c.reply(second)
    assert r1 is not None and r1.status == 200
    assert r2 is not None and (r2.status, r2.body, r2.complete) == (200, b"again", True)


def test_an_idle_connection_the_origin_closes_is_not_reused(proxy: Proxy) -> None:
    c = proxy.client()
    c.request("GET", "/1")
    [up] = proxy.origin.conns
    proxy.step(up.reply, OK_HEAD % 0)
    proxy.step(up.fail)  # while it waits in the pool
    rid = c.request("GET", "/2")
    assert len(proxy.origin.conns) == 2 and proxy.origin.conns[1].requests[0].target == b"/2"
    proxy.step(proxy.origin.conns[1].reply, OK_HEAD % 0)
    r = c.reply(rid)
    assert r is not None and (r.status, r.complete) == (200, True)


def test_client_gone_while_connecting_leaves_the_new_connection_pooled(proxy: Proxy) -> None:
    """The client leaves while its upstream connection is being made: the request is not sent,
    and the connection, unused, serves the next request."""
    gate = proxy.origin.gate = proxy.loop.create_future()
    c = proxy.client()
    rid = c.request("GET", "/")
    if isinstance(c, H2Client):
        c.reset(rid)
    else:
        c.gone()
    proxy.origin.gate = None
    proxy.step(gate.set_result, None)
    [up] = proxy.origin.conns
    assert up.requests == [] and not up.closed
    c2 = proxy.client()
    rid = c2.request("GET", "/2")
    assert len(proxy.origin.conns) == 1 and [r.target for r in up.requests] == [b"/2"]
    proxy.step(up.reply, OK_HEAD % 0)
    r = c2.reply(rid)
    assert r is not None and (r.status, r.complete) == (200, True)


def test_client_gone_mid_request_body_closes_the_upstream_connection(proxy: Proxy) -> None:
    c = proxy.client()
    rid = c.start("POST", "/", [("Content-Length", "10")], end=False)
    c.send(rid, b"01234")
    [up] = proxy.origin.conns
    assert up.requests[0].body == b"01234"
    if isinstance(c, H2Client):
        c.reset(rid)
    else:
        c.gone()
    assert up.closed  # half a request on it


def test_an_early_response_ends_the_request(proxy: Proxy) -> None:
    """The origin answers before the request body is whole: the client gets the response
    (HTTP/2: then RST_STREAM NO_ERROR, RFC 9113 8.1; HTTP/1.1: the connection closes), and the
    upstream connection, whose request is unfinished, is not reused."""
    c = proxy.client()
    rid = c.start("POST", "/", [("Content-Length", "10")], end=False)
    c.send(rid, b"01234")
    [up] = proxy.origin.conns
    proxy.step(up.reply, b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (413, b"big", True)
    assert up.closed
    if isinstance(c, H2Client):
        assert r.reset == 0 and not c.closed
    else:
        assert c.closed
        c = proxy.client()
    rid = c.request("GET", "/next")
    assert len(proxy.origin.conns) == 2
    proxy.step(proxy.origin.conns[1].reply, OK_HEAD % 0)
    r = c.reply(rid)
    assert r is not None and (r.status, r.complete) == (200, True)


# -- how responses are framed ---------------------------------------------------------------


def test_a_close_delimited_response_is_framed_for_the_client(proxy: Proxy) -> None:
    """An origin response without a length ends when the origin closes: HTTP/1.1 clients get
    it chunked (their connection stays open), HTTP/2 ones get DATA and END_STREAM."""
    c = proxy.client()
    rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    proxy.step(up.reply, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc")
    proxy.step(up.reply, b"def")
    r = c.reply(rid)
    assert r is not None and (r.body, r.complete) == (b"abcdef", False)
    proxy.step(up.end)
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (200, b"abcdef", True)
    if isinstance(c, H1Client):
        assert r.header(b"transfer-encoding") == [b"chunked"]
    assert not c.closed


def test_an_interim_100_is_not_passed_on(proxy: Proxy) -> None:
    c = proxy.client()
    rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    proxy.step(up.reply, b"HTTP/1.1 100 Continue\r\n\r\n")
    assert c.reply(rid) is None
    proxy.step(up.reply, OK_HEAD % 2 + b"ok")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (200, b"ok", True)
    if isinstance(c, H1Client):
        assert len(c.replies()) == 1


def test_bytes_after_a_complete_response_keep_the_connection_out_of_the_pool(
    proxy: Proxy,
) -> None:
    c = proxy.client()
    rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    proxy.step(up.reply, OK_HEAD % 2 + b"okJUNK")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (200, b"ok", True)
    assert up.closed
    c.request("GET", "/2")
    assert len(proxy.origin.conns) == 2


def test_a_204_loses_its_framing_fields(proxy: Proxy) -> None:
    c = proxy.client()
    rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    proxy.step(up.reply, b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (204, b"", True)
    assert r.header(b"content-length") == [] and r.header(b"transfer-encoding") == []


def test_response_trailers_are_passed_on(proxy: Proxy) -> None:
    """Trailers (gRPC's status) reach a client that said it takes them (TE: trailers)."""
    c = proxy.client()
    rid = c.request("POST", "/rpc", [("TE", "trailers"), ("Content-Length", "1")], body=b"x")
    [up] = proxy.origin.conns
    proxy.step(
        up.reply,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
        b"2\r\nok\r\n0\r\ngrpc-status: 0\r\n\r\n",
    )
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (200, b"ok", True)
    assert r.trailers == [(b"grpc-status", b"0")]


def test_hop_by_hop_response_fields_are_dropped(proxy: Proxy) -> None:
    c = proxy.client()
    rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Secret\r\nX-Secret: s\r\n"
        b"Keep-Alive: timeout=5\r\nX-Kept: k\r\n\r\nok"
    )
    proxy.step(up.reply, head)
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (200, b"ok", True)
    assert r.header(b"x-kept") == [b"k"]
    assert r.header(b"keep-alive") == r.header(b"connection") == []


def test_head_response_has_no_body(proxy: Proxy) -> None:
    c = proxy.client()
    rid = c.request("HEAD", "/")
    [up] = proxy.origin.conns
    assert up.requests[0].method == b"HEAD"
    proxy.step(up.reply, OK_HEAD % 1234)
    r = c.reply(rid) if c.h2 else None
    if isinstance(c, H1Client):
        # httptools cannot know a response is to HEAD: the head alone must be all there is.
        written = bytes(c.transport.written)
        assert written.startswith(b"HTTP/1.1 200 OK\r\n") and written.endswith(b"\r\n\r\n")
        assert b"Content-Length: 1234\r\n" in written
    else:
        assert r is not None and (r.status, r.body, r.complete) == (200, b"", True)
        assert r.header(b"content-length") == [b"1234"]
    # The upstream connection ended cleanly with the head: reused for the next request.
    rid = c.request("GET", "/next")
    assert len(proxy.origin.conns) == 1 and len(up.requests) == 2


# -- the end of a connection ----------------------------------------------------------------


def test_drain_ends_the_connection_after_its_response(proxy: Proxy) -> None:
    """A graceful stop: the request under way is answered, then the connection closes
    (HTTP/1.1 says Connection: close; HTTP/2 sends GOAWAY first)."""
    c = proxy.client()
    rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    proxy.step(proxy.engine.drain)
    if isinstance(c, H2Client):
        assert c.goaway() and not c.closed
    proxy.step(up.reply, OK_HEAD % 2 + b"ok")
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (200, b"ok", True)
    if not c.h2:
        assert r.header(b"connection") == [b"close"]
    assert c.closed


def test_the_body_waits_while_the_connection_is_made(proxy: Proxy) -> None:
    gate = proxy.origin.gate = proxy.loop.create_future()
    c = proxy.client()
    rid = c.start("POST", "/", [("Content-Length", "6")], end=False)
    c.send(rid, b"abc")
    c.send(rid, b"def", end=True)
    assert proxy.origin.conns == []
    proxy.origin.gate = None
    proxy.step(gate.set_result, None)
    [req] = proxy.origin.requests
    assert (req.body, req.complete) == (b"abcdef", True)
    proxy.step(proxy.origin.conns[0].reply, OK_HEAD % 0)
    r = c.reply(rid)
    assert r is not None and (r.status, r.complete) == (200, True)


def test_a_response_that_ends_while_the_client_is_full_releases_its_upstream(
    proxy: Proxy,
) -> None:
    """The client's buffer fills while the response is written (pause_writing from within
    write): the response still completes, and its upstream connection goes back to the pool,
    watched (read) again, for the next request."""
    c = proxy.client()
    rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    c.transport.high_water = 10
    proxy.step(up.reply, OK_HEAD % 50 + b"x" * 50)
    assert c.transport.full
    assert up.reading and not up.closed
    proxy.step(c.transport.drained)
    r = c.reply(rid)
    assert r is not None and (r.status, r.body, r.complete) == (200, b"x" * 50, True)
    rid = c.request("GET", "/2")
    assert len(proxy.origin.conns) == 1
    proxy.step(up.reply, OK_HEAD % 1 + b"y")
    r = c.reply(rid)
    assert r is not None and (r.body, r.complete) == (b"y", True)


@pytest.mark.parametrize("make_proxy", ["http/1.1"], indirect=True)
def test_a_pipelined_request_starts_paused_while_the_client_is_full(
    make_proxy: Callable[..., Proxy],
) -> None:
    proxy = make_proxy()
    c = proxy.client()
    c.feed(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    [up] = proxy.origin.conns
    c.transport.high_water = 10
    proxy.step(up.reply, OK_HEAD % 50 + b"x" * 50)
    assert [r.target for r in up.requests] == [b"/1", b"/2"]
    assert not up.reading  # the second response waits for the client
    proxy.step(c.transport.drained)
    assert up.reading
    proxy.step(up.reply, OK_HEAD % 1 + b"y")
    assert isinstance(c, H1Client)
    assert [(r.body, r.complete) for r in c.replies()] == [(b"x" * 50, True), (b"y", True)]


@pytest.mark.parametrize("make_proxy", ["h2c"], indirect=True)
def test_h2_one_stream_failing_leaves_the_other(make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy()
    c = proxy.client()
    a = c.request("GET", "/1")
    b = c.request("POST", "/2", [("Content-Length", "1")], body=b"x")
    ua, ub = proxy.origin.conns
    proxy.step(ub.fail)
    proxy.step(ua.reply, OK_HEAD % 2 + b"ok")
    ra, rb = c.reply(a), c.reply(b)
    assert ra is not None and (ra.status, ra.body, ra.complete) == (200, b"ok", True)
    assert rb is not None and (rb.status, rb.complete) == (502, True)
    assert not c.closed


@pytest.mark.parametrize("make_proxy", ["h2c"], indirect=True)
def test_h2_connection_lost_closes_every_streams_upstream(
    make_proxy: Callable[..., Proxy],
) -> None:
    proxy = make_proxy()
    c = proxy.client()
    c.request("GET", "/1")
    c.request("GET", "/2")
    ua, ub = proxy.origin.conns
    proxy.step(ua.reply, OK_HEAD % 100 + b"x")
    c.gone()
    assert ua.closed and ub.closed


@pytest.mark.parametrize("make_proxy", ["http/1.1"], indirect=True)
def test_an_upgrade_becomes_a_tunnel(make_proxy: Callable[..., Proxy]) -> None:
    """HTTP/1.1 Upgrade (WebSocket): after the origin's 101, bytes pass unparsed both ways
    until a side closes."""
    proxy = make_proxy()
    c = proxy.client()
    c.feed(
        b"GET /ws HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\nearly"
    )
    [up] = proxy.origin.conns
    [req] = up.requests
    assert req.header(b"upgrade") == [b"websocket"]
    assert up.received.endswith(b"\r\n\r\n")  # the early bytes wait for the tunnel
    proxy.step(
        up.reply,
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nhi",
    )
    written = bytes(c.transport.written)
    assert written.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nUpgrade: websocket\r\n" in written and written.endswith(b"\r\n\r\nhi")
    assert up.received.endswith(b"\r\n\r\nearly")
    c.feed(b"\x81\x02up")
    assert up.received.endswith(b"early\x81\x02up")
    proxy.step(up.reply, b"\x81\x04down")
    assert bytes(c.transport.written).endswith(b"hi\x81\x04down")
    proxy.step(up.end)
    assert c.closed
