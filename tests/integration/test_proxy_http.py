"""HTTP/1.1 semantics through the real master and workers: load balancing, keep-alive to the
upstream, forwarded and hop-by-hop headers, message framing and pipelining.

One master serves the whole module: the default upstream is three origins in round robin, and
``single.test`` routes to one origin whose echo shows what the proxy sent.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.client import HttpConn, build_request, chunked_body, get
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.origin import Origin
from tests.support.waits import wait_for

if TYPE_CHECKING:
    from tests.conftest import Fleet

SINGLE = "single.test"


@dataclass
class Env:
    master: Master
    pool: list[Origin]
    single: Origin

    @property
    def port(self) -> int:
        return self.master.port


@pytest.fixture(scope="module")
def env(module_fleet: Fleet) -> Env:
    pool = [module_fleet.origin(f"rr{i}") for i in range(3)]
    single = module_fleet.origin("single")
    config = config_for(upstreams={"main": [o.address for o in pool]})
    config["upstreams"]["single"] = {"servers": [single.address], "hosts": [SINGLE]}
    return Env(module_fleet.master(config), pool, single)


@pytest.fixture
def single(env: Env) -> Origin:
    env.single.reset()
    return env.single


def echo(
    port: int,
    target: str = "/echo",
    headers: list[tuple[str, str]] | None = None,
    method: str = "GET",
    body: bytes = b"",
) -> dict:
    """Sends a request to the single origin and returns its echo of what arrived."""
    resp = get(port, target, [("Host", SINGLE), *(headers or [])], method, body)
    assert resp.status == 200, resp
    return resp.json()


def headers_of(echoed: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in echoed["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


# -- load balancing and pooling --------------------------------------------------------------


def test_round_robin_cycles_over_every_server(env: Env) -> None:
    """Consecutive requests handled by one worker go to each server in turn."""
    for o in env.pool:
        o.reset()
    with HttpConn(env.port) as conn:
        served = []
        for i in range(9):
            resp = conn.request("GET", f"/rr/{i}")
            assert resp.status == 200
            served.append(resp.header("X-Origin") or "")
    assert sorted(served) == sorted(["rr0", "rr1", "rr2"] * 3), served
    cycle = served[:3]
    assert len(set(cycle)) == 3, served
    assert served == cycle * 3, f"not a fixed rotation: {served}"
    assert [len(o.requests) for o in env.pool] == [3, 3, 3]


def test_round_robin_spreads_new_connections(env: Env) -> None:
    """Requests on separate client connections (any worker) reach every server."""
    for o in env.pool:
        o.reset()
    for i in range(12):
        assert get(env.port, f"/spread/{i}").status == 200
    assert all(len(o.requests) >= 2 for o in env.pool), [len(o.requests) for o in env.pool]
    assert sum(len(o.requests) for o in env.pool) == 12


def test_upstream_connections_are_reused(env: Env, single: Origin) -> None:
    """Sequential requests, even on new client connections, share pooled upstream
    connections: the origin accepts at most one connection per worker."""
    for i in range(20):
        echoed = echo(env.port, f"/reuse/{i}")
        assert echoed["target"] == f"/reuse/{i}"
    assert len(single.requests) == 20
    assert single.accepted <= env.master.workers_count, (
        f"{single.accepted} upstream connections for 20 sequential requests"
    )
    assert max(r.conn_seq for r in single.requests) >= 20 // env.master.workers_count


# -- headers -------------------------------------------------------------------------------------


def test_forwarded_headers_added_and_host_passed_through(env: Env, single: Origin) -> None:
    """The origin sees the client's Host unchanged and X-Forwarded-For/Proto/Host."""
    echoed = echo(env.port, "/fwd?x=1")
    h = headers_of(echoed)
    assert h["host"] == [SINGLE]
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == [SINGLE]
    assert echoed["target"] == "/fwd?x=1"


def test_host_with_port_passed_through_unchanged(env: Env, single: Origin) -> None:
    """A Host with a port routes by its name and reaches the origin byte for byte."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", "/hostport", [("Host", "SINGLE.test:8080")])
    assert resp.status == 200
    h = headers_of(resp.json())
    assert h["host"] == ["SINGLE.test:8080"]
    assert h["x-forwarded-host"] == ["SINGLE.test:8080"]


def test_forwarded_for_appends_client_address(env: Env, single: Origin) -> None:
    """An X-Forwarded-For from the client is kept and the client's address appended; the
    client's own X-Forwarded-Proto/Host are replaced, not passed on."""
    echoed = echo(
        env.port,
        "/xff",
        [
            ("X-Forwarded-For", "10.1.2.3, 10.4.5.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "spoofed.example"),
        ],
    )
    h = headers_of(echoed)
    assert h["x-forwarded-for"] == ["10.1.2.3, 10.4.5.6, 127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == [SINGLE]


def test_hop_by_hop_request_headers_removed(env: Env, single: Origin) -> None:
    """Connection, Keep-Alive, Proxy-Connection, TE, Trailer and the headers named in
    Connection do not reach the origin; end-to-end headers do, in order."""
    echoed = echo(
        env.port,
        "/hop",
        [
            ("X-First", "1"),
            ("Connection", "keep-alive, X-Private-Hop"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("X-Private-Hop", "secret"),
            ("X-Last", "2"),
        ],
    )
    h = headers_of(echoed)
    for name in ("connection", "keep-alive", "proxy-connection", "te", "trailer", "x-private-hop"):
        assert name not in h, f"{name} reached the origin: {echoed['headers']}"
    names = [n.lower() for n, _ in echoed["headers"]]
    assert names.index("x-first") < names.index("x-last")


def test_hop_by_hop_response_headers_removed(env: Env, single: Origin) -> None:
    """Hop-by-hop response headers (and those the origin's Connection names) do not reach the
    client; end-to-end ones do."""
    target = (
        "/hopresp?rh=Connection:X-Origin-Hop&rh=X-Origin-Hop:1&rh=Keep-Alive:timeout=9"
        "&rh=Proxy-Connection:keep-alive&rh=X-Kept:yes"
    )
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", target, [("Host", SINGLE)])
        assert resp.status == 200
        assert resp.header("X-Kept") == "yes"
        for name in ("Keep-Alive", "Proxy-Connection", "X-Origin-Hop"):
            assert not resp.has(name), f"{name} reached the client: {resp.headers}"
        assert resp.header_all("Connection") in ([], ["keep-alive"])
        # The connection is still usable.
        assert conn.request("GET", "/after", [("Host", SINGLE)]).status == 200


def test_repeated_response_headers_kept_apart(env: Env, single: Origin) -> None:
    """Repeated response fields (Set-Cookie) reach the client as separate lines, in order."""
    with HttpConn(env.port) as conn:
        resp = conn.request(
            "GET",
            "/cookies?rh=Set-Cookie:a=1;%20Path=/&rh=Set-Cookie:b=2&rh=Set-Cookie:c=3",
            [("Host", SINGLE)],
        )
    assert resp.header_all("Set-Cookie") == ["a=1; Path=/", "b=2", "c=3"]


def test_origin_error_statuses_passed_through(env: Env, single: Origin) -> None:
    """An origin's own 404/500/503 reach the client as they are (not as proxy errors)."""
    with HttpConn(env.port) as conn:
        for status in (404, 500, 503):
            resp = conn.request("GET", f"/status/{status}", [("Host", SINGLE)])
            assert resp.status == status
            assert resp.body == f"status {status}\n".encode()
            assert resp.header("X-Origin") == "single"


# -- framing ---------------------------------------------------------------------------------


def test_head_has_length_but_no_body(env: Env, single: Origin) -> None:
    """HEAD gets the GET's Content-Length and no body bytes; the connection stays in sync."""
    with HttpConn(env.port) as conn:
        full = conn.request("GET", "/large?size=5000", [("Host", SINGLE)])
        head = conn.request("HEAD", "/large?size=5000", [("Host", SINGLE)])
        assert head.status == 200
        assert head.header("Content-Length") == "5000"
        after = conn.request("GET", "/status/404", [("Host", SINGLE)])
    assert len(full.body) == 5000
    assert after.status == 404, "bytes of the HEAD response leaked into the next response"
    assert [r.method for r in single.requests] == ["GET", "HEAD", "GET"]


def test_head_of_chunked_response(env: Env, single: Origin) -> None:
    """HEAD of a resource the origin would send chunked: no body, no hang."""
    with HttpConn(env.port) as conn:
        head = conn.request("HEAD", "/chunked", [("Host", SINGLE)])
        assert head.status == 200
        after = conn.request("GET", "/chunked?parts=x,y", [("Host", SINGLE)])
    assert after.body == b"xy"


@pytest.mark.parametrize(
    "status, extra",
    [(204, ""), (304, ""), (304, "?rh=Content-Length:1234"), (204, "?rh=Content-Length:0")],
)
def test_no_body_statuses(env: Env, single: Origin, status: int, extra: str) -> None:
    """204 and 304 go out without a body or chunked framing, even when the 304 gives the
    length of the representation; the next response follows."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", f"/status/{status}{extra}", [("Host", SINGLE)])
        assert resp.status == status
        assert resp.header("ETag") == '"v1"'
        assert not resp.has("Transfer-Encoding")
        nxt = conn.request("GET", "/next", [("Host", SINGLE)])
    assert nxt.status == 200
    assert nxt.json()["target"] == "/next"


def test_chunked_response_to_http11_client(env: Env, single: Origin) -> None:
    """A chunked origin response reaches an HTTP/1.1 client chunked, content intact."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", "/chunked?parts=alpha,beta,gamma,delta", [("Host", SINGLE)])
        assert resp.status == 200
        assert resp.chunked
        assert not resp.has("Content-Length")
        assert resp.body == b"alphabetagammadelta"
        assert conn.request("GET", "/again", [("Host", SINGLE)]).status == 200


def test_trailers_of_a_chunked_response_are_passed_on(env: Env, single: Origin) -> None:
    """The trailer fields after an origin's chunked body reach an HTTP/1.1 client after the
    last chunk, and the connection goes on."""
    with HttpConn(env.port) as conn:
        conn.send(
            build_request(
                "GET",
                "/chunked?parts=ab,cd&trailer=x-checksum:abc123",
                [("Host", SINGLE), ("TE", "trailers")],
            )
        )
        head = conn.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"chunked" in head.lower()
        body = conn.read_until(b"\r\n0\r\n")
        assert body.endswith(b"cd\r\n0\r\n")
        assert conn.read_until(b"\r\n\r\n") == b"x-checksum: abc123\r\n\r\n"
        assert conn.request("GET", "/after-trailers", [("Host", SINGLE)]).status == 200


def test_close_delimited_response_reframed_for_http11_client(env: Env, single: Origin) -> None:
    """An origin response without length or chunking (ended by closing) reaches an HTTP/1.1
    client whole, framed so that the client's connection can carry on."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", "/eof?body=read-to-the-end", [("Host", SINGLE)])
        assert resp.status == 200
        assert resp.body == b"read-to-the-end"
        if (resp.header("Connection") or "").lower() != "close":
            assert resp.chunked or resp.header("Content-Length") is not None
            assert conn.request("GET", "/after-eof", [("Host", SINGLE)]).status == 200


def test_chunked_request_body_forwarded(env: Env, single: Origin) -> None:
    """A chunked request body reaches the origin chunked (not buffered into a length)."""
    pieces = [b"hello ", b"chunked ", b"x" * 70000, b" world"]
    with HttpConn(env.port) as conn:
        conn.send(
            build_request("POST", "/upload", [("Host", SINGLE), ("Transfer-Encoding", "chunked")])
            + chunked_body(pieces)
        )
        resp = conn.read_response()
    assert resp.status == 200
    echoed = resp.json()
    assert echoed["framing"] == "chunked"
    assert echoed["body"].encode("latin-1") == b"".join(pieces)
    assert "transfer-encoding" in headers_of(echoed)


def test_chunked_upload_with_curl(env: Env, single: Origin, tmp_path: Path) -> None:
    """curl's chunked upload (a real client) arrives whole at the origin."""
    data = bytes(range(256)) * 800
    src = tmp_path / "upload.bin"
    src.write_bytes(data)
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-H",
            f"Host: {SINGLE}",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            f"@{src}",
            f"http://127.0.0.1:{env.port}/sink",
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result == {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "framing": "chunked",
    }


def test_content_length_body_forwarded(env: Env, single: Origin) -> None:
    """A request body with Content-Length reaches the origin with the same length."""
    body = b"k=v&" * 1000
    echoed = echo(
        env.port, "/form", [("Content-Type", "application/x-www-form-urlencoded")], "POST", body
    )
    assert echoed["framing"] == "length"
    assert headers_of(echoed)["content-length"] == [str(len(body))]
    assert echoed["body"].encode() == body


def test_origin_answers_before_reading_the_body(env: Env, single: Origin) -> None:
    """An origin that refuses an upload (401) before reading its body: the client gets the
    401 (not a 502 and not a reset); then either the response said Connection: close and the
    connection closes, or the rest of the body is read and the connection serves on."""
    body = b"u" * (8 * 1024 * 1024)
    conn = HttpConn(env.port)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            conn.send(build_request("POST", "/early", [("Host", SINGLE)], body=body))
        except OSError as e:
            errors.append(e)

    sender = threading.Thread(target=upload, name="early-upload", daemon=True)
    try:
        sender.start()
        resp = conn.read_response()
        assert resp.status == 401
        assert resp.body == b"no way\n"
        if (resp.header("Connection") or "").lower() == "close":
            assert conn.closed_by_peer()
            sender.join(20)
            assert not sender.is_alive()
        else:
            sender.join(20)
            assert not sender.is_alive()
            assert not errors, f"the connection broke without Connection: close: {errors}"
            assert conn.request("GET", "/after-early", [("Host", SINGLE)]).status == 200
    finally:
        conn.close()
        sender.join(10)


def test_expect_100_continue(env: Env, single: Origin) -> None:
    """The client gets 100 Continue before it sends the body, then the final response; the
    Expect header is not forwarded."""
    body = b"payload after continue"
    with HttpConn(env.port) as conn:
        conn.send(
            build_request(
                "PUT",
                "/expect",
                [("Host", SINGLE), ("Expect", "100-continue"), ("Content-Length", str(len(body)))],
            )
        )
        status, _, _ = conn.read_head()
        assert status == 100
        conn.send(body)
        resp = conn.read_response()
    assert resp.status == 200
    echoed = resp.json()
    assert echoed["body"].encode() == body
    assert "expect" not in headers_of(echoed)


@pytest.mark.parametrize("code", [100, 103])
def test_interim_response_from_origin(env: Env, single: Origin, code: int) -> None:
    """An origin's 1xx before its final response does not confuse the proxy: the client gets
    the final response (1xx may be passed on or not) and the connection stays in sync."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", f"/interim?code={code}", [("Host", SINGLE)])
        assert resp.status == 200
        assert resp.json()["target"] == f"/interim?code={code}"
        assert set(resp.interim) <= {code}
        assert conn.request("GET", "/after-interim", [("Host", SINGLE)]).status == 200


def test_http10_close_delimited(env: Env) -> None:
    """An HTTP/1.0 client gets a chunked origin response delimited by close (no chunked
    coding it cannot read), and the connection closes; the upstream request, sent as
    HTTP/1.1, gets the Host the client left out."""
    for o in env.pool:
        o.reset()
    with HttpConn(env.port) as conn:
        conn.send(b"GET /chunked?parts=one,two HTTP/1.0\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert not resp.has("Transfer-Encoding")
        assert resp.body == b"onetwo"
        assert conn.eof, "the response must end with the connection"
    (origin,) = [o for o in env.pool if o.requests]
    (req,) = origin.requests
    assert req.version == "1.1"
    assert req.header("host") == origin.address


def test_http10_default_closes_connection(env: Env, single: Origin) -> None:
    """HTTP/1.0 without keep-alive: a response with a length, then the proxy closes."""
    with HttpConn(env.port) as conn:
        conn.send(build_request("GET", "/h10", [("Host", SINGLE)], version="1.0"))
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.json()["target"] == "/h10"
        assert conn.closed_by_peer()


def test_http10_keep_alive(env: Env, single: Origin) -> None:
    """HTTP/1.0 with Connection: keep-alive gets keep-alive and a second answer."""
    with HttpConn(env.port) as conn:
        for i in range(2):
            resp = conn.request(
                "GET",
                f"/h10ka/{i}",
                [("Host", SINGLE), ("Connection", "keep-alive")],
                version="1.0",
            )
            assert resp.status == 200
            assert resp.header("Content-Length") is not None
            assert (resp.header("Connection") or "").lower() == "keep-alive"
    assert single.paths()[-2:] == ["/h10ka/0", "/h10ka/1"]


def test_connection_close_honoured(env: Env, single: Origin) -> None:
    """Connection: close from an HTTP/1.1 client: the response says close and the proxy
    closes the connection."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", "/bye", [("Host", SINGLE), ("Connection", "close")])
        assert resp.status == 200
        assert (resp.header("Connection") or "").lower() == "close"
        assert conn.closed_by_peer()


def test_origin_connection_close_does_not_close_client(env: Env, single: Origin) -> None:
    """An origin that closes after its response does not end the client's connection."""
    with HttpConn(env.port) as conn:
        first = conn.request("GET", "/close", [("Host", SINGLE)])
        assert first.status == 200
        assert not first.has("Connection") or first.header("Connection") == "keep-alive"
        second = conn.request("GET", "/after-close", [("Host", SINGLE)])
        assert second.status == 200


def test_pipelined_requests_answered_in_order(env: Env, single: Origin) -> None:
    """Requests sent back to back in one write are answered in order, even when an earlier
    one is slower and one carries a body."""
    data = b"".join(
        [
            build_request("GET", "/sleep?s=0.3&tag=1", [("Host", SINGLE)]),
            build_request("POST", "/p2", [("Host", SINGLE)], body=b"second body"),
            build_request("GET", "/chunked?parts=third", [("Host", SINGLE)]),
            build_request("HEAD", "/p4", [("Host", SINGLE)]),
            build_request("GET", "/p5", [("Host", SINGLE)]),
        ]
    )
    with HttpConn(env.port) as conn:
        conn.send(data)
        r1 = conn.read_response()
        r2 = conn.read_response()
        r3 = conn.read_response()
        r4 = conn.read_response("HEAD")
        r5 = conn.read_response()
    assert r1.json()["target"] == "/sleep?s=0.3&tag=1"
    assert r2.json()["target"] == "/p2"
    assert r2.json()["body"] == "second body"
    assert r3.body == b"third"
    assert r4.status == 200 and r4.body == b""
    assert r5.json()["target"] == "/p5"


def test_pipelined_connection_close_stops_after_it(env: Env, single: Origin) -> None:
    """A pipelined request with Connection: close is the last one answered."""
    data = (
        build_request("GET", "/q1", [("Host", SINGLE)])
        + build_request("GET", "/q2", [("Host", SINGLE), ("Connection", "close")])
        + build_request("GET", "/q3", [("Host", SINGLE)])
    )
    with HttpConn(env.port) as conn:
        conn.send(data)
        assert conn.read_response().json()["target"] == "/q1"
        assert conn.read_response().json()["target"] == "/q2"
        assert conn.closed_by_peer()
    wait_for(lambda: "/q2" in single.paths(), what="/q2 at the origin")
    assert "/q3" not in single.paths()


def test_curl_get(env: Env) -> None:
    """curl, a real client, gets a page through the default upstream."""
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"http://127.0.0.1:{env.port}/curl",
        ],
        capture_output=True,
        timeout=20,
        check=True,
    )
    assert out.stdout == b"200"
