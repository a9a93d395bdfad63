"""Errors map to the right status, and the client connection is closed exactly when the error
leaves it unusable: upstream failures (502, 504) keep it; bad requests (400, 431, 413) and a
response that broke off close it. A request on a pooled connection the origin has closed is
sent again on a fresh one.

One master serves the module, with small limits and a one-second upstream read timeout; Host
routes to special upstreams: ``refused.test`` (a port that refuses), ``idle.test`` (an origin
that closes idle connections) and ``drop.test`` (an origin that drops reused connections).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tests.support.client import HttpConn, build_request, chunked_body
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.origin import Origin
from tests.support.waits import wait_for

if TYPE_CHECKING:
    from tests.conftest import Fleet

MAX_HEADER = 4096
MAX_BODY = 65536
READ_TIMEOUT = 1.0
#: timeouts.client_header_seconds of the proxy under test.
HEADER_TIMEOUT = 1.5


@dataclass
class Env:
    master: Master
    main: Origin
    idle: Origin
    drop: Origin

    @property
    def port(self) -> int:
        return self.master.port


@pytest.fixture(scope="module")
def env(module_fleet: Fleet, refusing_address: str) -> Env:
    main = module_fleet.origin("main")
    idle = module_fleet.origin("idle", close_idle_after=0.2)
    drop = module_fleet.origin("drop", drop_reused=True)
    config = config_for(
        upstreams={"main": [main.address]},
        limits={"max_header_bytes": MAX_HEADER, "max_body_bytes": MAX_BODY},
        timeouts={"upstream_read_seconds": READ_TIMEOUT, "client_header_seconds": HEADER_TIMEOUT},
        server={"max_retries": 2},
    )
    config["upstreams"].update(
        {
            "refused": {"servers": [refusing_address], "hosts": ["refused.test"]},
            "idle": {"servers": [idle.address], "hosts": ["idle.test"]},
            "drop": {"servers": [drop.address], "hosts": ["drop.test"]},
        }
    )
    return Env(module_fleet.master(config), main, idle, drop)


@pytest.fixture(autouse=True)
def fresh_origins(env: Env) -> None:
    for o in (env.main, env.idle, env.drop):
        o.reset()


# -- upstream failures ---------------------------------------------------------------------


def test_connect_refused_is_502_and_connection_kept(env: Env) -> None:
    """A refused upstream connection answers 502; the client connection stays usable."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", "/x", [("Host", "refused.test")])
        assert resp.status == 502
        assert b"502" in resp.body
        again = conn.request("GET", "/after-502")
        assert again.status == 200
        assert again.json()["target"] == "/after-502"
    assert "refused" in env.master.read_error_log()


@pytest.mark.parametrize("sent", ["whole", "part"])
def test_connect_refused_with_unread_body(env: Env, sent: str) -> None:
    """A POST whose upstream refuses: 502, and the body the proxy did not forward never
    desynchronises the connection: either the response says close and the connection
    closes, or the next request on it is answered as itself."""
    body = b"q" * 50_000
    with HttpConn(env.port) as conn:
        head = build_request(
            "POST", "/post", [("Host", "refused.test"), ("Content-Length", str(len(body)))]
        )
        conn.send(head + (body if sent == "whole" else body[:1000]))
        resp = conn.read_response()
        assert resp.status == 502
        if (resp.header("Connection") or "").lower() == "close":
            assert conn.closed_by_peer()
        else:
            assert sent == "whole", "kept a connection whose body is still to come"
            again = conn.request("GET", "/after-post")
            assert again.status == 200
            assert again.json()["target"] == "/after-post"


def test_upstream_read_timeout_is_504(env: Env) -> None:
    """An origin slower than timeouts.upstream_read_seconds gets 504, in about that time; the
    client connection stays usable."""
    with HttpConn(env.port) as conn:
        started = time.monotonic()
        resp = conn.request("GET", "/sleep?s=6")
        elapsed = time.monotonic() - started
        assert resp.status == 504
        assert READ_TIMEOUT * 0.9 <= elapsed < READ_TIMEOUT + 3, elapsed
        assert conn.request("GET", "/after-504").status == 200


def test_timeout_after_response_started_closes_client(env: Env) -> None:
    """When the origin stalls mid-body, the client gets the head and the bytes that came,
    then the connection closes (a truncated body must not look complete)."""
    with HttpConn(env.port) as conn:
        conn.send(build_request("GET", "/stall?sent=100"))
        status, _, headers = conn.read_head()
        assert status == 200
        assert dict((n.lower(), v) for n, v in headers)["content-length"] == "1100"
        started = time.monotonic()
        got = conn.read_exactly(100)
        assert got == b"s" * 100
        assert conn.closed_by_peer(timeout=READ_TIMEOUT + 5)
        assert time.monotonic() - started < READ_TIMEOUT + 5


def test_invalid_upstream_response_is_502(env: Env) -> None:
    """An origin that answers something that is not HTTP gets 502."""
    with HttpConn(env.port) as conn:
        assert conn.request("GET", "/garbage").status == 502
        assert conn.request("GET", "/after-garbage").status == 200


def test_origin_hangup_is_502(env: Env) -> None:
    """An origin that closes without answering (on every connection) gets 502, after the
    retries the request is allowed."""
    with HttpConn(env.port) as conn:
        assert conn.request("GET", "/hangup").status == 502
        assert conn.request("GET", "/after-hangup").status == 200


# -- dead pooled connections ---------------------------------------------------------------


def test_origin_closed_idle_connection_next_request_succeeds(env: Env) -> None:
    """The origin closes an idle pooled connection; the next request still succeeds."""
    with HttpConn(env.port) as conn:
        assert conn.request("GET", "/first", [("Host", "idle.test")]).status == 200
        wait_for(lambda: env.idle.idle_closed >= 1, what="the origin to close the idle conn")
        for i in range(3):
            resp = conn.request("GET", f"/next{i}", [("Host", "idle.test")])
            assert resp.status == 200, resp
            wait_for(
                lambda: env.idle.idle_closed >= len(env.idle.requests),
                what="the origin to close the idle connection again",
            )
    assert [r.target for r in env.idle.requests] == ["/first", "/next0", "/next1", "/next2"]


def test_request_on_dropped_pooled_connection_is_retried(env: Env) -> None:
    """A pooled connection dies as the request arrives on it (the origin closes without an
    answer): the proxy sends the GET again on a fresh connection, and the client gets 200."""
    with HttpConn(env.port) as conn:
        assert conn.request("GET", "/one", [("Host", "drop.test")]).status == 200
        for i in range(3):
            resp = conn.request("GET", f"/two{i}", [("Host", "drop.test")])
            assert resp.status == 200, resp
            assert resp.json()["conn_seq"] == 1
    assert env.drop.dropped == 3, "the pooled connection was not reused"
    assert [r.target for r in env.drop.requests] == ["/one", "/two0", "/two1", "/two2"]


# -- bad requests ---------------------------------------------------------------------------


def test_malformed_request_is_400_and_closed(env: Env) -> None:
    """A request the parser rejects gets 400 saying Connection: close, then the connection
    closes."""
    with HttpConn(env.port) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 400
        assert (resp.header("Connection") or "").lower() == "close"
        assert conn.closed_by_peer()
    assert env.main.requests == []


def test_malformed_request_after_good_one_in_pipeline(env: Env) -> None:
    """A good request pipelined before garbage is answered first; then 400 and close."""
    with HttpConn(env.port) as conn:
        conn.send(build_request("GET", "/good") + b"BAD REQUEST LINE\r\n\r\n")
        first = conn.read_response()
        assert first.status == 200
        assert first.json()["target"] == "/good"
        second = conn.read_response()
        assert second.status == 400
        assert conn.closed_by_peer()


@pytest.mark.parametrize("where", ["header", "many_headers", "url"])
def test_headers_too_large_is_431_and_closed(env: Env, where: str) -> None:
    """A request head over limits.max_header_bytes gets 431, then the connection closes."""
    if where == "header":
        head = build_request("GET", "/", [("X-Big", "a" * (MAX_HEADER + 100))])
    elif where == "many_headers":
        head = build_request("GET", "/", [(f"X-H{i}", "v" * 20) for i in range(300)])
    else:
        head = build_request("GET", "/" + "u" * (MAX_HEADER + 100))
    with HttpConn(env.port) as conn:
        conn.send(head)
        resp = conn.read_response()
        assert resp.status == 431
        assert (resp.header("Connection") or "").lower() == "close"
        assert conn.closed_by_peer()
    assert env.main.requests == []


def test_unterminated_huge_head_is_431(env: Env) -> None:
    """A head that never ends is refused once it passes the limit, without waiting for its
    end."""
    with HttpConn(env.port) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"e" * (MAX_HEADER * 3))
        resp = conn.read_response()
        assert resp.status == 431
        assert (resp.header("Connection") or "").lower() == "close"
        assert conn.closed_by_peer()


def test_pipelined_heads_split_across_reads_are_not_too_large(env: Env) -> None:
    """Pipelined requests, each well under the head limit, arriving in reads that together
    pass the limit and that end inside a head, are all served (only one head counts)."""
    pad = "p" * (MAX_HEADER // 3)
    reqs = [build_request("GET", f"/split/{i}", [("X-Pad", pad)]) for i in range(4)]
    first = b"".join(reqs[:3]) + reqs[3][:200]
    assert len(first) > MAX_HEADER
    with HttpConn(env.port) as conn:
        conn.send(first)
        wait_for(lambda: env.main.requests, what="the first request at the origin")
        conn.send(reqs[3][200:])
        for i in range(4):
            resp = conn.read_response()
            assert resp.status == 200, (i, resp.status, resp.body[:100])
            assert resp.json()["target"] == f"/split/{i}"


def test_head_sent_byte_by_byte(env: Env) -> None:
    """A request whose head arrives one byte per write is parsed like any other."""
    data = build_request("GET", "/trickle", [("X-One", "1"), ("X-Two", "2")])
    with HttpConn(env.port) as conn:
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            conn.send(data[i : i + 1])
        resp = conn.read_response()
    assert resp.status == 200
    assert resp.json()["target"] == "/trickle"


def test_head_just_under_limit_is_served(env: Env) -> None:
    """A head a little under the limit is not refused."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", "/fits", [("X-Fill", "f" * (MAX_HEADER - 300))])
    assert resp.status == 200


def test_declared_body_too_large_is_413_and_closed(env: Env) -> None:
    """A Content-Length over limits.max_body_bytes gets 413 without the body being read,
    and nothing reaches the origin; then the connection closes."""
    with HttpConn(env.port) as conn:
        conn.send(build_request("POST", "/upload", [("Content-Length", str(MAX_BODY + 1))]))
        resp = conn.read_response()
        assert resp.status == 413
        assert (resp.header("Connection") or "").lower() == "close"
        assert conn.closed_by_peer()
    assert env.main.requests == []


def test_declared_body_too_large_with_expect_gets_no_continue(env: Env) -> None:
    """With Expect: 100-continue and a length over the limit, the answer is 413 and no
    100 Continue (the client must not send the body)."""
    with HttpConn(env.port) as conn:
        conn.send(
            build_request(
                "POST",
                "/upload",
                [("Content-Length", str(MAX_BODY * 4)), ("Expect", "100-continue")],
            )
        )
        resp = conn.read_response()
        assert resp.status == 413
        assert resp.interim == []
        assert conn.closed_by_peer()


def test_chunked_body_too_large_is_413_and_closed(env: Env) -> None:
    """A chunked body that grows past the limit gets 413 (it has no length to check up
    front), then the connection closes."""
    with HttpConn(env.port) as conn:
        conn.send(build_request("POST", "/sink", [("Transfer-Encoding", "chunked")]))
        piece = b"z" * 8192
        try:
            conn.send(chunked_body([piece] * (MAX_BODY // len(piece) + 4)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may answer and close before it has read all of it
        resp = conn.read_response()
        assert resp.status == 413
        assert (resp.header("Connection") or "").lower() == "close"
        assert conn.closed_by_peer()


def test_body_at_limit_is_accepted(env: Env) -> None:
    """A body of exactly limits.max_body_bytes is forwarded."""
    body = b"b" * MAX_BODY
    with HttpConn(env.port) as conn:
        resp = conn.request("POST", "/sink", body=body)
    assert resp.status == 200
    assert resp.json()["bytes"] == MAX_BODY


def test_worker_survives_client_leaving_mid_response(env: Env) -> None:
    """A client that disconnects in the middle of a large response harms nothing: the same
    workers go on serving."""
    before = sorted(w.pid for w in env.master.workers())
    for _ in range(5):
        with HttpConn(env.port) as conn:
            conn.send(build_request("GET", f"/large?size={8 * 1024 * 1024}"))
            assert conn.read_head()[0] == 200
            conn.read_exactly(1000)
    for _ in range(4):
        with HttpConn(env.port) as conn:
            assert conn.request("GET", "/still-there").status == 200
    assert sorted(w.pid for w in env.master.workers()) == before


# -- slow clients --------------------------------------------------------------------------


def test_request_head_trickled_past_the_header_timeout_gets_408(env: Env) -> None:
    """A client that sends a request head a line at a time and never ends it (a slowloris)
    gets 408 once ``timeouts.client_header_seconds`` have passed since the head began, and
    the connection is closed; the request never reaches the origin."""
    with HttpConn(env.port) as conn:
        conn.send(b"GET /slowloris HTTP/1.1\r\nHost: main.test\r\n")
        started = time.monotonic()
        # Trickle for most of the timeout, then fall silent (writing while the proxy closes
        # would make its answer race a reset).
        while time.monotonic() - started < HEADER_TIMEOUT * 0.7:
            conn.send(b"X-Trickle: 1\r\n")
            time.sleep(0.1)  # the trickle's pace, not a wait for the proxy
        resp = conn.read_response()
        assert resp.status == 408
        assert time.monotonic() - started >= HEADER_TIMEOUT
        assert ("Connection", "close") in resp.headers
        assert conn.closed_by_peer()
    assert "/slowloris" not in env.main.paths()
    with HttpConn(env.port) as conn:
        assert conn.request("GET", "/in-time").status == 200
