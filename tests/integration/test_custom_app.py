"""A custom app's phases run in the real workers: request_filter answers by itself,
upstream_request_filter and response_filter rewrite headers, response_body_filter rewrites the
body, and an exception in a phase becomes a 500 without harming the worker.

The same behaviour is written with plain ``def`` phases and with ``async def`` phases that really
suspend: the engine drives the two differently, so both run (one master each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tests.support.client import HttpConn
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.origin import Origin

if TYPE_CHECKING:
    from tests.conftest import Fleet

APP = '''
from __future__ import annotations

import asyncio

from shared import HttpPeer, ProxyError, ProxyHttp


class SyncRewriter(ProxyHttp):
    """Answers /local itself, denies X-Deny, rewrites headers and /api/ paths."""

    def configure(self, config):
        super().configure(config)
        self.address = config.upstreams["origin"].servers[0]

    def new_ctx(self):
        return {"upper": False}

    def request_filter(self, session, ctx):
        req = session.req_header
        if req.path == "/local":
            session.respond(200, {"X-Answered-By": "request_filter"}, b"answered locally\\n")
            return True
        if req.get("X-Deny") is not None:
            session.respond(403, [("Content-Type", "text/plain")], "denied\\n")
            return True
        if req.path == "/boom":
            raise RuntimeError("app bug")
        if req.path == "/limited":
            raise ProxyError.http_status(429, cause="over the test quota")
        ctx["upper"] = req.path.startswith("/upper")
        return False

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    def upstream_request_filter(self, session, upstream_request, ctx):
        upstream_request.set("X-Added-By-Proxy", "yes")
        upstream_request.remove("X-Secret")
        if upstream_request.path.startswith("/api/"):
            upstream_request.path = "/v2/" + upstream_request.path[len("/api/"):]

    def response_filter(self, session, upstream_response, ctx):
        upstream_response.set("X-Proxy", "tenaya")
        upstream_response.remove("X-Origin")
        upstream_response.set("X-Seen-Path", session.req_header.path)

    def response_body_filter(self, session, body, end_of_stream, ctx):
        if ctx["upper"]:
            return body.upper()
        return None


class AsyncRewriter(SyncRewriter):
    """The same, with async request-side phases that give the loop a turn first."""

    async def request_filter(self, session, ctx):
        await asyncio.sleep(0.001)
        return SyncRewriter.request_filter(self, session, ctx)

    async def upstream_peer(self, session, ctx):
        await asyncio.sleep(0)
        return SyncRewriter.upstream_peer(self, session, ctx)

    async def upstream_request_filter(self, session, upstream_request, ctx):
        await asyncio.sleep(0.001)
        SyncRewriter.upstream_request_filter(self, session, upstream_request, ctx)



class AsyncResponseRewriter(SyncRewriter):
    """The same, with an async response_filter."""

    async def response_filter(self, session, upstream_response, ctx):
        await asyncio.sleep(0.001)
        SyncRewriter.response_filter(self, session, upstream_response, ctx)
'''


@dataclass
class Env:
    master: Master
    origin: Origin

    @property
    def port(self) -> int:
        return self.master.port


@pytest.fixture(scope="module", params=["SyncRewriter", "AsyncRewriter"])
def shared_env(module_fleet: Fleet, request: pytest.FixtureRequest) -> Env:
    origin = module_fleet.origin("custom")
    config = config_for(upstreams={"origin": [origin.address]}, app=f"rewriter:{request.param}")
    return Env(module_fleet.master(config, files={"rewriter.py": APP}), origin)


@pytest.fixture
def env(shared_env: Env) -> Env:
    shared_env.origin.reset()
    return shared_env


def test_request_filter_answers_without_upstream(env: Env) -> None:
    """request_filter's own response reaches the client, nothing reaches the origin, and the
    connection goes on to proxy the next request."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", "/local")
        assert resp.status == 200
        assert resp.body == b"answered locally\n"
        assert resp.header("X-Answered-By") == "request_filter"
        assert resp.header("Content-Length") == str(len(resp.body))
        assert env.origin.requests == []
        nxt = conn.request("GET", "/proxied")
        assert nxt.status == 200
    assert env.origin.paths() == ["/proxied"]


def test_request_filter_denies(env: Env) -> None:
    """request_filter can refuse a request with its own status and body."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", "/anything", [("X-Deny", "1")])
        assert resp.status == 403
        assert resp.body == b"denied\n"
        assert conn.request("GET", "/ok").status == 200
    assert env.origin.paths() == ["/ok"]


def test_upstream_request_filter_rewrites_request(env: Env) -> None:
    """Headers added and removed by upstream_request_filter, and its new path, are what the
    origin gets; the proxy's own forwarded headers are still there."""
    with HttpConn(env.port) as conn:
        resp = conn.request(
            "GET",
            "/api/items?q=1",
            [("Host", "app.test"), ("X-Secret", "token"), ("X-Keep", "kept")],
        )
    assert resp.status == 200
    (req,) = env.origin.requests
    assert req.target == "/v2/items?q=1"
    assert req.header("X-Added-By-Proxy") == "yes"
    assert req.header("X-Secret") is None
    assert req.header("X-Keep") == "kept"
    assert req.header("Host") == "app.test"
    assert req.header("X-Forwarded-For") == "127.0.0.1"
    assert req.header("X-Forwarded-Host") == "app.test"


def test_hop_by_hop_headers_removed_on_rewritten_requests(env: Env) -> None:
    """With upstream_request_filter the request head is rebuilt: hop-by-hop fields are still
    removed, a client's X-Forwarded-For is still extended."""
    with HttpConn(env.port) as conn:
        resp = conn.request(
            "GET",
            "/hop",
            [
                ("Connection", "keep-alive, X-Private"),
                ("X-Private", "1"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Proxy-Connection", "keep-alive"),
                ("X-Forwarded-For", "10.0.0.1"),
                ("X-Forwarded-Proto", "https"),
            ],
        )
    assert resp.status == 200
    (req,) = env.origin.requests
    for name in ("Connection", "X-Private", "Keep-Alive", "TE", "Proxy-Connection"):
        assert req.header(name) is None, f"{name} reached the origin"
    assert req.header_all("X-Forwarded-For") == ["10.0.0.1, 127.0.0.1"]
    assert req.header_all("X-Forwarded-Proto") == ["http"]


def test_upstream_request_filter_with_body(env: Env) -> None:
    """A request body still arrives whole after the head was rewritten."""
    body = b"0123456789" * 5000
    with HttpConn(env.port) as conn:
        resp = conn.request("POST", "/api/upload", body=body)
    assert resp.status == 200
    (req,) = env.origin.requests
    assert req.target == "/v2/upload"
    assert req.body == body


def test_response_filter_rewrites_response(env: Env) -> None:
    """response_filter's changes are what the client gets."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", "/headers")
    assert resp.status == 200
    assert resp.header("X-Proxy") == "tenaya"
    assert resp.header("X-Seen-Path") == "/headers"
    assert not resp.has("X-Origin")
    assert resp.json()["target"] == "/headers"


def test_response_body_filter_rewrites_body(env: Env) -> None:
    """response_body_filter changes the body; the response is re-framed to fit it."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", "/upper/chunked-source")
        assert resp.status == 200
        assert b'"TARGET": "/UPPER/CHUNKED-SOURCE"' in resp.body
        big = conn.request("GET", "/upper-large")
        assert big.status == 200
        assert big.body.startswith(b'{"ORIGIN": "CUSTOM"')
        plain = conn.request("GET", "/plain")
        assert plain.json()["target"] == "/plain"


def test_phase_exception_is_500_and_worker_survives(env: Env) -> None:
    """An exception raised by a phase answers 500 and is logged; the workers keep serving."""
    pids = sorted(w.pid for w in env.master.workers())
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", "/boom")
        assert resp.status == 500
    with HttpConn(env.port) as conn:
        assert conn.request("GET", "/after-boom").status == 200
    assert "app bug" in env.master.read_error_log()
    assert sorted(w.pid for w in env.master.workers()) == pids


def test_phase_raises_an_error_with_a_status_of_its_own(env: Env) -> None:
    """A ProxyError.http_status(429) raised by a phase is answered with that status and its
    reason on the default error page; nothing reaches the origin and the connection stays."""
    with HttpConn(env.port) as conn:
        resp = conn.request("GET", "/limited")
        assert (resp.status, resp.body) == (429, b"429 too many requests\n")
        assert conn.request("GET", "/after-limit").status == 200
    assert env.origin.paths() == ["/after-limit"]


@pytest.mark.parametrize(
    "target", ["/headers", "/upper/x", "/chunked?parts=a,b,c", "/large?size=300000"]
)
def test_async_response_filter(fleet: Fleet, target: str) -> None:
    """An ``async def`` response_filter: its changes reach the client with the whole body,
    whether the origin's head and body came in one read or many."""
    origin = fleet.origin("custom")
    config = config_for(
        upstreams={"origin": [origin.address]}, app="rewriter:AsyncResponseRewriter"
    )
    master = fleet.master(config, files={"rewriter.py": APP})
    with HttpConn(master.port, timeout=3) as conn:
        for _ in range(2):
            resp = conn.request("GET", target)
            assert resp.status == 200
            assert resp.header("X-Proxy") == "tenaya"
            assert not resp.has("X-Origin")
            if target == "/headers":
                assert resp.json()["target"] == "/headers"
            elif target == "/upper/x":
                assert b'"TARGET": "/UPPER/X"' in resp.body
            elif target.startswith("/chunked"):
                assert resp.body == b"abc"
            else:
                assert len(resp.body) == 300000
