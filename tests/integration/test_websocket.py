"""WebSocket through the real master and workers: after the 101 the connection is a two-way
tunnel between a real client (the ``websockets`` package, headless Chromium) and a real
``websockets`` echo server.

Text and binary messages come back unchanged, a 5 MB one too; 50 sockets work at once; a close
started by either end completes on both (each end receives the other's close frame, with its
code and reason, and the TCP close follows at once); an origin refusing the upgrade gives its
403 to the client; an app's request phases run before the upgrade (request_filter can deny it,
upstream_request_filter's header reaches the origin's handshake); wss works on a TLS listener;
and Chromium, on a page served through the proxy, opens a WebSocket through it and receives the
echo.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trustme
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

from tests.support.config import config_for
from tests.support.master import Master
from tests.support.resources import free_port
from tests.support.waits import wait_for

if TYPE_CHECKING:
    from tests.conftest import Fleet

#: Where scripts/test installs Chromium (the Debian package).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_SECONDS = 60.0
#: A close handshake through the proxy must end (TCP closed) well within this.
CLOSE_SECONDS = 2.0
BIG_MESSAGE = 5 * 1024 * 1024

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>tenaya websocket</title></head>
<body><pre id="out">pending</pre>
<script>
const out = document.getElementById("out");
const ws = new WebSocket(`ws://${location.host}/ws/echo/chromium`);
ws.onopen = () => ws.send("hello from chromium");
let first = true;
ws.onmessage = (event) => {
  if (!first) return;  // the echo of the reply below
  first = false;
  out.textContent = "echo: " + event.data;
  ws.send("chromium got: " + event.data);
};
ws.onerror = () => { out.textContent = "websocket error"; };
</script></body></html>
"""


# -- the WebSocket origin --------------------------------------------------------------------


@dataclass
class WsOrigin:
    """A ``websockets`` server on 127.0.0.1 in a thread of its own.

    ``/ws/echo/...`` echoes every message; ``/ws/close-after-one`` echoes one message then
    closes with 4001; ``/ws/refuse`` answers the upgrade with 403; ``/page`` serves
    :data:`PAGE`. What it saw is recorded for the tests (written by its thread only).
    """

    port: int = 0
    #: (path, lower-cased headers) of every request, upgrade or not.
    handshakes: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    #: Sockets open now, by path.
    open: Counter[str] = field(default_factory=Counter)
    #: (path, code, reason) of the close frame each finished socket received (code None:
    #: none received).
    closes: list[tuple[str, int | None, str | None]] = field(default_factory=list)
    #: Messages received, by path.
    received: dict[str, list[str | bytes]] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    def start(self) -> WsOrigin:
        ready = threading.Event()
        errors: list[BaseException] = []

        async def main() -> None:
            self._stop = asyncio.Event()
            async with serve(
                self._handle, "127.0.0.1", 0, process_request=self._process_request, max_size=None
            ) as server:
                self.port = next(iter(server.sockets)).getsockname()[1]
                ready.set()
                await self._stop.wait()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(main())
            except BaseException as e:  # pragma: no cover - reported to the starter
                errors.append(e)
            finally:
                ready.set()
                loop.close()

        self._thread = threading.Thread(target=run, name="ws-origin", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors or not self.port:
            raise AssertionError(f"the WebSocket origin did not start: {errors}")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None or self._stop is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        self._loop = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.handshakes]

    def close_of(self, path: str) -> tuple[int | None, str | None] | None:
        for p, code, reason in self.closes:
            if p == path:
                return code, reason
        return None

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        self.handshakes.append(
            (request.path, {k.lower(): v for k, v in request.headers.raw_items()})
        )
        if request.path == "/ws/refuse":
            return conn.respond(HTTPStatus.FORBIDDEN, "no websockets here\n")
        if request.path == "/page":
            response = conn.respond(HTTPStatus.OK, PAGE)
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "text/html; charset=utf-8"
            return response
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else "?"
        self.open[path] += 1
        received = self.received.setdefault(path, [])
        try:
            if path.startswith("/ws/echo/"):
                async for message in ws:
                    received.append(message)
                    await ws.send(message)
            elif path == "/ws/close-after-one":
                message = await ws.recv()
                received.append(message)
                await ws.send(message)
                await ws.close(4001, "origin done")
        except ConnectionClosed:
            pass
        finally:
            self.open[path] -= 1
            rcvd = ws.protocol.close_rcvd
            self.closes.append((path, rcvd.code if rcvd else None, rcvd.reason if rcvd else None))


@pytest.fixture(scope="module")
def ws_origin() -> Iterator[WsOrigin]:
    origin = WsOrigin().start()
    try:
        yield origin
    finally:
        origin.stop()


# -- the proxies -----------------------------------------------------------------------------

GATE_APP = '''
from shared import HttpPeer, ProxyHttp


class WsGate(ProxyHttp):
    """Denies /ws/forbidden in request_filter; marks what it forwards."""

    def configure(self, config):
        super().configure(config)
        self.origin = HttpPeer(config.app_options["origin"])

    def request_filter(self, session, ctx):
        if session.req_header.path == "/ws/forbidden":
            session.respond(403, {"X-Denied-By": "request_filter"}, "forbidden\\n")
            return True
        return False

    def upstream_peer(self, session, ctx):
        return self.origin

    def upstream_request_filter(self, session, upstream_request, ctx):
        upstream_request.set("X-Via-App", "ws-gate")
'''


@dataclass
class Proxies:
    #: The built-in load balancer: a plaintext listener, then a TLS one.
    lb: Master
    lb_tls_port: int
    ca: trustme.CA
    #: The WsGate app.
    gate: Master


@pytest.fixture(scope="module")
def proxies(module_fleet: Fleet, ws_origin: WsOrigin) -> Proxies:
    ca = trustme.CA()
    leaf = ca.issue_cert("ws.test", "127.0.0.1")
    files = {
        "ws.pem": "".join(b.bytes().decode() for b in leaf.cert_chain_pems),
        "ws.key": leaf.private_key_pem.bytes().decode(),
    }
    lb = module_fleet.master(
        config_for(
            upstreams={"ws": [ws_origin.address]},
            listeners=[
                {"address": "127.0.0.1:0"},
                # A second port 0 would be "listed twice".
                {"address": f"127.0.0.1:{free_port()}", "tls": {"cert": "ws.pem", "key": "ws.key"}},
            ],
        ),
        files,
    )
    assert [scheme for scheme, _ in lb.listeners] == ["http", "https"], lb.listeners
    gate = module_fleet.master(
        config_for(app="ws_gate:WsGate", app_options={"origin": ws_origin.address}),
        {"ws_gate.py": GATE_APP},
    )
    return Proxies(lb, lb.listeners[1][1], ca, gate)


def ws_url(master: Master, path: str) -> str:
    return f"ws://127.0.0.1:{master.port}{path}"


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 30)

    return asyncio.run(bounded())


async def echo(ws: ClientConnection, message: str | bytes) -> str | bytes:
    await ws.send(message)
    return await ws.recv()


# -- messages --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["lb", "gate"])
def test_text_and_binary_echo(proxies: Proxies, ws_origin: WsOrigin, which: str) -> None:
    """Text and binary messages come back unchanged and with their type, through the load
    balancer and through an app."""
    master = proxies.lb if which == "lb" else proxies.gate
    text = "héllo, tenaya ✓"
    binary = bytes(range(256)) * 4

    async def talk() -> None:
        async with connect(ws_url(master, f"/ws/echo/types-{which}"), open_timeout=10) as ws:
            for _ in range(3):
                assert await echo(ws, text) == text
                reply = await echo(ws, binary)
                assert isinstance(reply, bytes) and reply == binary
            assert await echo(ws, "") == ""
            assert await echo(ws, b"") == b""

    run(talk())
    assert ws_origin.received[f"/ws/echo/types-{which}"][:2] == [text, binary]


def test_five_megabyte_message(proxies: Proxies) -> None:
    """A 5 MB binary message (uncompressed, incompressible) goes there and back intact."""
    payload = os.urandom(BIG_MESSAGE)

    async def talk() -> None:
        async with connect(
            ws_url(proxies.lb, "/ws/echo/big"), max_size=None, compression=None, open_timeout=10
        ) as ws:
            reply = await echo(ws, payload)
            assert isinstance(reply, bytes)
            assert len(reply) == BIG_MESSAGE
            assert hashlib.sha256(reply).digest() == hashlib.sha256(payload).digest()
            assert await echo(ws, "after the big one") == "after the big one"

    run(talk())


def test_fifty_concurrent_sockets(proxies: Proxies, ws_origin: WsOrigin) -> None:
    """50 sockets open at once (the origin sees all 50 open together), each exchanging its own
    messages in parallel."""
    count = 50

    async def talk() -> None:
        opened = await asyncio.gather(
            *(
                connect(ws_url(proxies.lb, f"/ws/echo/many-{i}"), open_timeout=15)
                for i in range(count)
            ),
            return_exceptions=True,
        )
        sockets = [ws for ws in opened if isinstance(ws, ClientConnection)]
        try:
            failed = [ws for ws in opened if not isinstance(ws, ClientConnection)]
            assert not failed, failed[:3]
            deadline = time.monotonic() + 10
            while (
                sum(n for p, n in ws_origin.open.items() if p.startswith("/ws/echo/many-")) < count
            ):
                assert time.monotonic() < deadline, "the origin never had 50 sockets open"
                await asyncio.sleep(0.02)

            async def exchange(i: int, ws: ClientConnection) -> None:
                for j in range(5):
                    message = f"socket {i} message {j}"
                    assert await echo(ws, message) == message

            await asyncio.gather(*(exchange(i, ws) for i, ws in enumerate(sockets)))
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))

    run(talk())
    wait_for(
        lambda: (
            sum(
                1
                for p, code, _ in ws_origin.closes
                if p.startswith("/ws/echo/many-") and code == 1000
            )
            == count
        ),
        what="the origin to see all 50 closes",
    )


# -- closing -----------------------------------------------------------------------------------


def test_client_closes_cleanly(proxies: Proxies, ws_origin: WsOrigin) -> None:
    """A close from the client reaches the origin with its code and reason, the origin's reply
    reaches the client, and the TCP close follows at once."""
    path = "/ws/echo/client-close"

    async def talk() -> tuple[ClientConnection, float]:
        ws = await connect(ws_url(proxies.lb, path), open_timeout=10, close_timeout=5)
        try:
            assert await echo(ws, "before closing") == "before closing"
        finally:
            started = time.monotonic()
            await ws.close(1000, "client done")
        return ws, time.monotonic() - started

    ws, elapsed = run(talk())
    assert ws.protocol.close_rcvd is not None, "the origin's close frame never came back"
    assert (ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason) == (1000, "client done")
    assert elapsed < CLOSE_SECONDS, f"the close took {elapsed:.2f}s (TCP close not passed on?)"
    assert wait_for(lambda: ws_origin.close_of(path), what="the origin's end") == (
        1000,
        "client done",
    )


def test_origin_closes_cleanly(proxies: Proxies, ws_origin: WsOrigin) -> None:
    """A close from the origin reaches the client with its code and reason, the client's reply
    reaches the origin, and the TCP close follows at once."""
    path = "/ws/close-after-one"

    async def talk() -> tuple[ClientConnection, float]:
        async with connect(ws_url(proxies.lb, path), open_timeout=10, close_timeout=5) as ws:
            assert await echo(ws, "last words") == "last words"
            # recv() raises once the connection is closed: the origin's close frame, the
            # client's reply, and then the end of TCP.
            started = time.monotonic()
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return ws, time.monotonic() - started

    ws, elapsed = run(talk())
    assert ws.protocol.close_rcvd is not None
    assert (ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason) == (4001, "origin done")
    assert ws.protocol.close_sent is not None and ws.protocol.close_sent.code == 4001
    assert elapsed < CLOSE_SECONDS, f"the TCP close took {elapsed:.2f}s"
    assert wait_for(lambda: ws_origin.close_of(path), what="the origin's end") == (
        4001,
        "origin done",
    )


# -- refusals and app phases -----------------------------------------------------------------


def test_origin_refusing_the_upgrade(proxies: Proxies, ws_origin: WsOrigin) -> None:
    """An origin answering the upgrade with 403 gets its 403 (and body) to the client."""

    async def talk() -> None:
        async with connect(ws_url(proxies.lb, "/ws/refuse"), open_timeout=10):
            raise AssertionError("the upgrade was accepted")

    with pytest.raises(InvalidStatus) as refused:
        run(talk())
    assert refused.value.response.status_code == 403
    assert refused.value.response.body == b"no websockets here\n"
    assert "/ws/refuse" in ws_origin.paths()


def test_request_filter_denies_before_upgrade(proxies: Proxies, ws_origin: WsOrigin) -> None:
    """The app's request_filter answers 403 to /ws/forbidden: the origin never sees it."""

    async def talk() -> None:
        async with connect(ws_url(proxies.gate, "/ws/forbidden"), open_timeout=10):
            raise AssertionError("the upgrade was accepted")

    with pytest.raises(InvalidStatus) as refused:
        run(talk())
    assert refused.value.response.status_code == 403
    assert refused.value.response.headers.get("X-Denied-By") == "request_filter"
    assert "/ws/forbidden" not in ws_origin.paths()


def test_upstream_request_filter_runs_before_upgrade(proxies: Proxies, ws_origin: WsOrigin) -> None:
    """upstream_request_filter's header is in the handshake the origin receives, with the
    upgrade headers and X-Forwarded-*."""
    path = "/ws/echo/phases"

    async def talk() -> None:
        async with connect(ws_url(proxies.gate, path), open_timeout=10) as ws:
            assert await echo(ws, "through the app") == "through the app"

    run(talk())
    headers = dict(ws_origin.handshakes)[path]
    assert headers.get("x-via-app") == "ws-gate"
    assert headers.get("upgrade", "").lower() == "websocket"
    assert "sec-websocket-key" in headers
    assert headers.get("x-forwarded-proto") == "http"


def test_wss_on_tls_listener(proxies: Proxies, ws_origin: WsOrigin) -> None:
    """wss:// through a TLS listener: verified handshake, echo, and https for the origin."""
    ctx = ssl.create_default_context()
    proxies.ca.configure_trust(ctx)
    path = "/ws/echo/wss"

    async def talk() -> None:
        async with connect(
            f"wss://127.0.0.1:{proxies.lb_tls_port}{path}", ssl=ctx, open_timeout=10
        ) as ws:
            assert await echo(ws, "secure") == "secure"
            assert await echo(ws, b"\x00\xff" * 1000) == b"\x00\xff" * 1000

    run(talk())
    assert dict(ws_origin.handshakes)[path].get("x-forwarded-proto") == "https"


# -- a browser -------------------------------------------------------------------------------


def test_chromium_websocket_through_proxy(
    proxies: Proxies, ws_origin: WsOrigin, tmp_path: Path
) -> None:
    """Headless Chromium loads a page through the proxy whose script opens a WebSocket through
    the proxy and, once the echo arrives, answers it: the answer reaches the origin."""
    assert os.access(CHROMIUM, os.X_OK), (
        f"{CHROMIUM} is missing: scripts/test installs the Debian package chromium"
    )
    url = f"http://127.0.0.1:{proxies.lb.port}/page"
    profile = tmp_path / "profile"
    log_path = tmp_path / "chromium.log"
    reply = "chromium got: hello from chromium"
    with open(log_path, "wb") as log:
        browser = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                url,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: (
                reply in ws_origin.received.get("/ws/echo/chromium", [])
                or browser.poll() is not None
            ),
            timeout=CHROMIUM_SECONDS,
            interval=0.05,
            what="Chromium's answer to the echo",
        )
        assert browser.poll() is None, (
            f"chromium exited with {browser.returncode}:\n{log_path.read_text()[-3000:]}"
        )
    finally:
        _stop_browser(browser)
    assert ws_origin.received["/ws/echo/chromium"] == ["hello from chromium", reply]
    handshakes = dict(ws_origin.handshakes)
    assert "x-forwarded-for" in handshakes["/page"], "the page did not come through the proxy"
    assert "x-forwarded-for" in handshakes["/ws/echo/chromium"]
    assert "Chrome/" in handshakes["/ws/echo/chromium"].get("user-agent", "")


def _stop_browser(browser: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the browser's process group (its own session), SIGKILL if it lingers."""
    if browser.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGTERM)
        try:
            browser.wait(10)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(browser.pid, signal.SIGKILL)
    browser.wait(10)
