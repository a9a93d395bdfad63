"""Bodies stream both ways: a large body crosses the proxy with backpressure, so a slow reader
on either side holds the sender back and no process keeps a whole body in memory.

Proof by measurement: the receiver stops reading; the sender's progress stalls far short of the
body's size (what is in flight is bounded by socket buffers, not by the body); the workers'
memory grows far less than the body; then the receiver reads on and gets every byte intact.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tests.support.client import HttpConn, build_request, get
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.origin import Origin
from tests.support.payloads import pattern_chunks, pattern_sha256
from tests.support.resources import rss
from tests.support.waits import wait_for, wait_until_stable

if TYPE_CHECKING:
    from tests.conftest import Fleet

#: Size of the large bodies.
BODY = 128 * 1024 * 1024
#: Most body bytes allowed in flight (buffers of the kernel and the proxy) while the reader
#: does not read. Loopback socket buffers autotune to a few MiB each; the proxy's own buffers
#: are a few hundred KiB.
MAX_IN_FLIGHT = 32 * 1024 * 1024
#: Most a worker's resident memory may grow while holding a stalled large transfer.
MAX_RSS_GROWTH = 24 * 1024 * 1024


@dataclass
class Env:
    master: Master
    origin: Origin

    @property
    def port(self) -> int:
        return self.master.port

    def workers_rss(self) -> int:
        return sum(rss(w.pid) for w in self.master.workers())


@pytest.fixture(scope="module")
def env(module_fleet: Fleet) -> Env:
    origin = module_fleet.origin("big")
    config = config_for(
        upstreams={"big": [origin.address]},
        server={"workers": 1},
        limits={"max_body_bytes": 0},
        timeouts={"upstream_read_seconds": 60},
    )
    return Env(module_fleet.master(config), origin)


@pytest.fixture(autouse=True)
def fresh_origin(env: Env) -> None:
    env.origin.reset()


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_large_download_to_stalled_reader_is_streamed(env: Env, framing: str) -> None:
    """A 128 MiB response to a client that stops reading: the origin is held back, the worker
    stays small, other requests are still served, and the body arrives intact."""
    before = env.workers_rss()
    target = f"/large?size={BODY}" + ("&chunked=1" if framing == "chunked" else "")
    with HttpConn(env.port, timeout=60, rcvbuf=64 * 1024) as conn:
        conn.send(build_request("GET", target))
        status, _, headers = conn.read_head()
        assert status == 200
        names = {n.lower(): v for n, v in headers}
        if framing == "length":
            assert names.get("content-length") == str(BODY)
        else:
            assert names.get("transfer-encoding") == "chunked"
        # The client reads nothing more: the origin must stop, well short of the end.
        stalled_at = wait_until_stable(lambda: env.origin.large_sent, settle=1.0, timeout=60)
        assert stalled_at < MAX_IN_FLIGHT, (
            f"origin sent {stalled_at} bytes to a client that read nothing (no backpressure)"
        )
        growth = env.workers_rss() - before
        assert growth < MAX_RSS_GROWTH, f"worker grew {growth} bytes holding the response"
        # The worker is not blocked by the stalled transfer.
        assert get(env.port, "/other").status == 200
        # Read on: every byte, in order.
        h = hashlib.sha256()
        if framing == "length":
            conn.read_exactly_into(BODY, h.update)
        else:
            assert conn.read_chunked_into(h.update) == BODY
        digest = h.hexdigest()
    assert digest == pattern_sha256(BODY)
    assert env.origin.large_sent == BODY


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_large_upload_to_stalled_origin_is_streamed(env: Env, framing: str) -> None:
    """A 128 MiB request body to an origin that does not read yet: the client is held back,
    the worker stays small; once the origin reads, it gets every byte intact."""
    before = env.workers_rss()
    sent = 0
    errors: list[BaseException] = []
    fields = [("Host", "up.test")]
    if framing == "length":
        fields.append(("Content-Length", str(BODY)))
    else:
        fields.append(("Transfer-Encoding", "chunked"))
    conn = HttpConn(env.port, timeout=60)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)

    def upload() -> None:
        nonlocal sent
        try:
            conn.send(build_request("POST", "/sink?gate=1", fields))
            for piece in pattern_chunks(BODY):
                if framing == "chunked":
                    conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                else:
                    conn.send(piece)
                sent += len(piece)
            if framing == "chunked":
                conn.send(b"0\r\n\r\n")
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    sender = threading.Thread(target=upload, name="uploader", daemon=True)
    try:
        sender.start()
        wait_for(lambda: env.origin.requests, what="the request head at the origin")
        stalled_at = wait_until_stable(lambda: sent, settle=1.0, timeout=60)
        assert not errors, errors
        assert stalled_at < MAX_IN_FLIGHT, (
            f"client sent {stalled_at} bytes to an origin that read nothing (no backpressure)"
        )
        assert env.origin.sink_received == 0
        growth = env.workers_rss() - before
        assert growth < MAX_RSS_GROWTH, f"worker grew {growth} bytes holding the request"
        env.origin.open_gate()
        sender.join(120)
        assert not sender.is_alive(), "upload did not finish"
        assert not errors, errors
        resp = conn.read_response()
    finally:
        conn.close()
        sender.join(10)
    assert resp.status == 200, resp
    assert json.loads(resp.body) == {
        "bytes": BODY,
        "sha256": pattern_sha256(BODY),
        "framing": framing,
    }
