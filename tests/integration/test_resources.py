"""A worker leaks nothing: after 10 000 requests of every kind (keep-alive, new connections,
bodies, upstream errors, bad requests, clients that leave mid-response), and after 20 000
HTTP/2 requests, its descriptors return to where they were and its memory stops growing; a
burst from wrk is served without errors.

One worker (so every request lands in the process measured), nginx as the origin, and a short
pool idle timeout so that, at rest, the worker holds no pooled connection and its descriptor
count is a fixed baseline.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.client import HttpConn, build_request
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.nginx import Nginx
from tests.support.resources import fd_count, rss
from tests.support.waits import wait_for, wait_until_stable

if TYPE_CHECKING:
    from tests.conftest import Fleet

ROUNDS = 100
#: Requests per round of :func:`one_round`.
PER_ROUND = 100
#: Most a worker's RSS may grow over the second half of the run (allocator noise only).
MAX_RSS_GROWTH = 4 * 1024 * 1024


@dataclass
class Env:
    master: Master
    nginx: Nginx
    large: str
    worker_pid: int

    @property
    def port(self) -> int:
        return self.master.port


@pytest.fixture(scope="module")
def env(module_fleet: Fleet, refusing_address: str) -> Env:
    nginx = module_fleet.nginx()
    large = nginx.add_file(1024 * 1024)
    config = config_for(
        upstreams={"nginx": [nginx.address]},
        server={"workers": 1},
        pool={"idle_timeout_seconds": 1},
        logging={"access_log": "off"},
    )
    config["upstreams"]["refused"] = {"servers": [refusing_address], "hosts": ["refused.test"]}
    master = module_fleet.master(config)
    (worker,) = wait_for(master.workers, what="the worker")
    return Env(master, nginx, large, worker.pid)


def one_round(env: Env) -> None:
    """100 requests exercising every path that opens or closes a descriptor."""
    with HttpConn(env.port) as conn:
        for _ in range(88):
            resp = conn.request("GET", "/small")
            assert resp.status == 200 and resp.body == b"hello, nginx\n"
        assert conn.request("POST", "/small", body=b"x" * 3000).status in (200, 405)
        assert conn.request("GET", "/missing").status == 404
        assert conn.request("GET", "/x", [("Host", "refused.test")]).status == 502
        assert conn.request("HEAD", env.large).status == 200
    for _ in range(5):
        with HttpConn(env.port) as conn:
            assert conn.request("GET", "/small", [("Connection", "close")]).status == 200
    with HttpConn(env.port) as conn:
        conn.send(b"NOT HTTP AT ALL\r\n\r\n")
        assert conn.read_response().status == 400
    with HttpConn(env.port) as conn:  # leaves in the middle of a response
        conn.send(build_request("GET", env.large))
        assert conn.read_head()[0] == 200
        conn.read_exactly(10_000)
    with HttpConn(env.port) as conn:  # leaves before the response
        conn.send(build_request("GET", env.large))


def settled_fds(pid: int) -> int:
    """The worker's descriptor count once idle connections have been closed."""
    return wait_until_stable(lambda: fd_count(pid), settle=2.5, timeout=30)


def test_no_fd_leak_and_no_memory_growth_after_10000_requests(env: Env) -> None:
    """10 000 requests of every kind: afterwards the worker's open descriptors are back to
    the baseline, and its RSS did not keep growing over the second half."""
    for _ in range(3):
        one_round(env)
    baseline = settled_fds(env.worker_pid)
    samples = []
    deadline = time.monotonic() + 100
    for i in range(ROUNDS):
        one_round(env)
        if i % 10 == 9:
            samples.append(rss(env.worker_pid))
        assert time.monotonic() < deadline, f"only {i} rounds in time"
    assert env.master.workers()[0].pid == env.worker_pid, "the worker was replaced"
    wait_for(
        lambda: fd_count(env.worker_pid) <= baseline,
        timeout=15,
        what=f"descriptors back to {baseline} (now {fd_count(env.worker_pid)})",
    )
    half = len(samples) // 2
    growth = samples[-1] - samples[half - 1]
    assert growth < MAX_RSS_GROWTH, f"RSS kept growing: {samples}"


def test_wrk_burst_without_errors(env: Env) -> None:
    """wrk, 2 seconds with 32 connections: thousands of requests, no error or non-2xx, and
    the worker's descriptors return to the baseline afterwards."""
    baseline = settled_fds(env.worker_pid)
    out = subprocess.run(
        ["wrk", "-t2", "-c32", "-d2s", f"http://127.0.0.1:{env.port}/small"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    m = re.search(r"(\d+) requests in", out.stdout)
    assert m and int(m.group(1)) > 1000, out.stdout
    assert "Non-2xx" not in out.stdout, out.stdout
    assert "Socket errors" not in out.stdout, out.stdout
    wait_for(
        lambda: fd_count(env.worker_pid) <= baseline,
        timeout=15,
        what=f"descriptors back to {baseline} (now {fd_count(env.worker_pid)})",
    )


#: HTTP/2 rounds of H2_PER_ROUND requests each, over H2_PATHS distinct paths (so that the
#: decoder's cache of header blocks fills and turns over, as with real traffic).
H2_ROUNDS = 4
H2_PER_ROUND = 5000
H2_PATHS = 500


def test_http2_leaks_nothing(env: Env, tmp_path: Path) -> None:
    """20 000 HTTP/2 requests from h2load (cleartext, 8 connections x 10 streams, 500
    different paths): all succeed, the worker's descriptors return to the baseline, and its
    RSS does not keep growing over the second half."""
    uris = tmp_path / "uris"
    uris.write_text("".join(f"http://127.0.0.1:{env.port}/small?n={i}\n" for i in range(H2_PATHS)))
    baseline = settled_fds(env.worker_pid)
    samples = []
    for _ in range(H2_ROUNDS):
        out = subprocess.run(
            ["h2load", "-n", str(H2_PER_ROUND), "-c", "8", "-m", "10", "-i", str(uris)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert f"{H2_PER_ROUND} succeeded, 0 failed, 0 errored" in out.stdout, out.stdout
        assert f"{H2_PER_ROUND} 2xx" in out.stdout, out.stdout
        samples.append(rss(env.worker_pid))
    assert env.master.workers()[0].pid == env.worker_pid, "the worker was replaced"
    wait_for(
        lambda: fd_count(env.worker_pid) <= baseline,
        timeout=15,
        what=f"descriptors back to {baseline} (now {fd_count(env.worker_pid)})",
    )
    growth = samples[-1] - samples[len(samples) // 2 - 1]
    assert growth < MAX_RSS_GROWTH, f"RSS kept growing: {samples}"
