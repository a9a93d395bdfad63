"""The upstream write timeout and a peer's idle timeout, against real origins.

The write timeout bounds how long sending a request may stall while the origin does not read
it (nginx's ``proxy_send_timeout``): an origin that accepts and never reads, with a small
receive buffer, and a POST body far larger than every buffer on the way, gets the request's
head and the start of its body, then nothing moves; the client gets 504 from the write timeout,
well before the read timeout (which waits while the request stalls). An origin that reads
slowly but steadily is not cut off, however long the upload takes in all. The same holds for an
HTTP/2 peer whose origin grants no flow-control window.

``PeerOptions.idle_timeout`` closes one peer's pooled connections sooner, or later, than
``pool.idle_timeout_seconds``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tests.support.client import HttpConn
from tests.support.config import config_for, origin_app
from tests.support.master import Master
from tests.support.origin import Origin
from tests.support.waits import wait_for

if TYPE_CHECKING:
    from tests.conftest import Fleet

#: The write timeout under test (seconds).
WRITE_TIMEOUT = 1.0
#: The read timeout: far longer, so that a 504 in time is the write timeout's.
READ_TIMEOUT = 30.0
#: Larger than the socket buffers between client, proxy and origin together.
BODY = 48 << 20
#: The origin's receive buffer (the kernel may double it).
RCVBUF = 4096
#: What the slow origin reads at a time, every 50 ms, and its receive buffer.
SLOW_PIECE = 128 << 10
#: The body the slow origin reads to its end.
SLOW_BODY = 8 << 20


class StuckOrigin:
    """A raw TCP server that accepts and never reads (``trickle=0``), or reads ``trickle`` bytes
    every ``pause`` seconds and answers 200 once it has read ``expect`` bytes of body."""

    def __init__(
        self, trickle: int = 0, pause: float = 0.0, expect: int = 0, rcvbuf: int = RCVBUF
    ) -> None:
        self.trickle, self.pause, self.expect = trickle, pause, expect
        self.sock = socket.socket()
        # Set before listen(): accepted sockets take it, and the window is sized from it.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.conns: list[socket.socket] = []
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(c)
            if self.trickle:
                threading.Thread(target=self._read_slowly, args=(c,), daemon=True).start()

    def _read_slowly(self, c: socket.socket) -> None:
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data:
                data += c.recv(self.trickle)
            got = len(data) - data.index(b"\r\n\r\n") - 4
            while got < self.expect and not self._stop.is_set():
                time.sleep(self.pause)
                piece = c.recv(self.trickle)
                if not piece:
                    return
                got += len(piece)
                self.received = got
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for c in self.conns:
            c.close()
        self._thread.join(5)


@pytest.fixture
def stuck() -> Iterator[StuckOrigin]:
    o = StuckOrigin()
    try:
        yield o
    finally:
        o.close()


def post_big(port: int, path: str, size: int = BODY, timeout: float = 20.0) -> tuple[int, float]:
    """POSTs ``size`` bytes to ``path``, sending the body from a thread while the response is
    read; returns the response's status and how long it took to come."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {size}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(head)
            piece = b"x" * (1 << 16)
            left = size
            while left > 0:
                n = sock.send(piece[: min(left, len(piece))])
                left -= n

    sender = threading.Thread(target=send, daemon=True)
    started = time.monotonic()
    sender.start()
    try:
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise AssertionError(f"connection closed with {data!r}")
            data += chunk
        took = time.monotonic() - started
        return int(data.split(b" ", 2)[1]), took
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        sender.join(5)


# -- the write timeout ---------------------------------------------------------------------


def test_config_write_timeout_is_504(fleet: Fleet, stuck: StuckOrigin) -> None:
    """``timeouts.upstream_write_seconds``: an origin that never reads the request gets it cut
    off after the write timeout, and the client a 504 that names it, long before the read
    timeout."""
    config = config_for(
        app="gw:App",
        app_options={"origin": stuck.address},
        server={"workers": 1},
        timeouts={"upstream_write_seconds": WRITE_TIMEOUT, "upstream_read_seconds": READ_TIMEOUT},
    )
    master = fleet.master(config, files={"gw.py": origin_app()})
    status, took = post_big(master.port, "/upload")
    assert status == 504
    assert WRITE_TIMEOUT * 0.9 <= took < READ_TIMEOUT / 2
    wait_for(lambda: "write timeout" in master.read_error_log(), timeout=5)
    assert "read timeout" not in master.read_error_log()


_PEERS = """
from shared import HttpPeer, PeerOptions, ProxyHttp


class App(ProxyHttp):
    def configure(self, config):
        super().configure(config)
        o = config.app_options
        self.h1 = HttpPeer(o["origin"], options=PeerOptions(write_timeout=%(wt)r))
        self.h2 = HttpPeer(o["origin"], options=PeerOptions(write_timeout=%(wt)r, http2=True))
        self.slow = HttpPeer(o["slow"], options=PeerOptions(write_timeout=%(wt)r))
        self.short = HttpPeer(o["short"], options=PeerOptions(idle_timeout=0.3))
        self.long = HttpPeer(o["long"], options=PeerOptions(idle_timeout=30.0))

    def upstream_peer(self, session, ctx):
        return getattr(self, session.req_header.path.strip("/").split("/")[0])
"""


@dataclass
class Peers:
    master: Master
    slow: StuckOrigin
    short: Origin
    long: Origin


@pytest.fixture
def peers(fleet: Fleet, stuck: StuckOrigin) -> Iterator[Peers]:
    """A master whose app gives its peers their own timeouts (the config's are long): ``/h1``
    and ``/h2`` go to the stuck origin with a write timeout of WRITE_TIMEOUT, ``/slow`` to an
    origin that reads 128 KiB every 50 ms, ``/short`` and ``/long`` to origins whose peers idle
    0.3 s and 30 s in the pool (the pool's own: 4 s)."""
    slow = StuckOrigin(trickle=SLOW_PIECE, pause=0.05, expect=SLOW_BODY, rcvbuf=SLOW_PIECE)
    short = fleet.origin("short")
    long = fleet.origin("long")
    config = config_for(
        app="gw:App",
        app_options={
            "origin": stuck.address,
            "slow": slow.address,
            "short": short.address,
            "long": long.address,
        },
        server={"workers": 1},
        pool={"idle_timeout_seconds": 4.0},
        timeouts={"upstream_write_seconds": 60.0, "upstream_read_seconds": READ_TIMEOUT},
    )
    master = fleet.master(config, files={"gw.py": _PEERS % {"wt": WRITE_TIMEOUT}})
    try:
        yield Peers(master, slow, short, long)
    finally:
        slow.close()


@pytest.mark.parametrize("path", ["/h1", "/h2"])
def test_peer_write_timeout_is_504(peers: Peers, path: str) -> None:
    """``PeerOptions.write_timeout`` wins over the config's 60 s: over HTTP/1.1 (the socket
    stops taking bytes) and HTTP/2 (no flow-control window is ever granted)."""
    status, took = post_big(peers.master.port, path)
    assert status == 504
    assert took < READ_TIMEOUT / 2
    wait_for(lambda: "write timeout" in peers.master.read_error_log(), timeout=5)
    assert "read timeout" not in peers.master.read_error_log()


def test_slow_reader_is_not_cut_off(peers: Peers) -> None:
    """The write timeout bounds a stall, not the upload: an origin that keeps reading, slowly,
    gets an 8 MiB body over about 3 s, longer than the 1 s write timeout."""
    status, took = post_big(peers.master.port, "/slow", size=SLOW_BODY, timeout=30)
    assert status == 200
    assert took > 2 * WRITE_TIMEOUT
    assert peers.slow.received == SLOW_BODY


# -- PeerOptions.idle_timeout --------------------------------------------------------------


def test_peer_idle_timeouts(peers: Peers) -> None:
    """With ``pool.idle_timeout_seconds: 4``, a peer whose idle timeout is 0.3 s has its pooled
    connection closed within about a second (the pool sweeps once a second); one whose idle
    timeout is 30 s still has its connection after 6 s, and reuses it."""
    short, long = peers.short, peers.long
    with HttpConn(peers.master.port) as c:
        assert c.request("GET", "/short/a").status == 200
        assert c.request("GET", "/long/a").status == 200
    assert short.open_connections == 1 and long.open_connections == 1
    started = time.monotonic()
    wait_for(lambda: short.open_connections == 0, timeout=3.5, what="the short peer's close")
    time.sleep(max(0.0, 6.0 - (time.monotonic() - started)))
    assert long.open_connections == 1
    with HttpConn(peers.master.port) as c:
        assert c.request("GET", "/long/b").status == 200
    assert long.accepted == 1
