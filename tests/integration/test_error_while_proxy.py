"""``error_while_proxy`` runs before the retry decision (Pingora's order), so what it does to the
error decides the retry: an app makes an error the engine would not retry go round again (an
origin that hangs up on a fresh connection), or stops a retry the engine would make (a pooled
connection the origin drops).

The app picks the origin by attempt: the first goes to ``first`` (``hangup`` routes to a
server that closes each connection without answering, ``drop`` to an origin that drops every
request after the first on a connection), a retry to ``good``. ``X-Retry: always`` / ``never``
tells ``error_while_proxy`` what to set; ``X-Seen`` on the response counts its calls.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tests.support.client import HttpConn
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.origin import Origin

if TYPE_CHECKING:
    from tests.conftest import Fleet

APP = """
from shared import HttpPeer, ProxyHttp, RetryType


class App(ProxyHttp):
    def configure(self, config):
        super().configure(config)
        o = config.app_options
        self.peers = {name: HttpPeer(o[name]) for name in ("hangup", "drop", "good")}

    def new_ctx(self):
        return {"seen": []}

    def upstream_peer(self, session, ctx):
        if session.retries:
            return self.peers["good"]
        return self.peers[session.req_header.path.strip("/").split("/")[0]]

    def error_while_proxy(self, session, peer, error, ctx):
        ctx["seen"].append(f"{error.kind.name}:{error.retryable()}")
        wanted = session.req_header.get("X-Retry")
        if wanted == "always":
            error.retry = RetryType.ALWAYS
        elif wanted == "never":
            error.retry = RetryType.NEVER
        return error

    def response_filter(self, session, upstream_response, ctx):
        upstream_response.set("X-Seen", ",".join(ctx["seen"]))
"""


class HangupServer:
    """Accepts, reads the request head, closes without a word."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with contextlib.suppress(OSError), c:
                c.recv(65536)

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5)


@dataclass
class Env:
    master: Master
    hangup: HangupServer
    drop: Origin
    good: Origin


@pytest.fixture(scope="module")
def env(module_fleet: Fleet) -> Iterator[Env]:
    hangup = HangupServer()
    drop = module_fleet.origin("drop", drop_reused=True)
    good = module_fleet.origin("good")
    config = config_for(
        app="ewp:App",
        app_options={"hangup": hangup.address, "drop": drop.address, "good": good.address},
        server={"workers": 1, "max_retries": 1},
        pool={"shared": False},
    )
    try:
        yield Env(module_fleet.master(config, files={"ewp.py": APP}), hangup, drop, good)
    finally:
        hangup.close()


@pytest.fixture(autouse=True)
def fresh(env: Env) -> None:
    env.drop.reset()
    env.good.reset()


def test_app_makes_an_error_retryable(env: Env) -> None:
    """A POST whose fresh connection closed before any response is not retried by default
    (502: not idempotent); marked ALWAYS by ``error_while_proxy``, it is, and the retry's
    answer reaches the client."""
    with HttpConn(env.master.port) as c:
        assert c.request("POST", "/hangup/plain").status == 502
        assert env.good.requests == []
        resp = c.request("POST", "/hangup/again", [("X-Retry", "always")])
    assert resp.status == 200
    assert resp.header("X-Seen") == "CONNECTION_CLOSED:False"
    assert [r.target for r in env.good.requests] == ["/hangup/again"]


def test_app_stops_a_retry(env: Env) -> None:
    """A pooled connection the origin drops is retried by default (and the phase saw the
    error, retryable, before that); marked NEVER by ``error_while_proxy``, it is not: 502."""
    with HttpConn(env.master.port) as c:
        assert c.request("GET", "/drop/1").status == 200
        resp = c.request("GET", "/drop/2")
        assert resp.status == 200
        assert resp.header("X-Seen") == "CONNECTION_CLOSED:True"
        assert [r.target for r in env.good.requests] == ["/drop/2"]
        assert c.request("GET", "/drop/3").status == 200
        assert c.request("GET", "/drop/4", [("X-Retry", "never")]).status == 502
    assert [r.target for r in env.good.requests] == ["/drop/2"]
