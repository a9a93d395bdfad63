"""The master's lifecycle: workers are respawned, SIGTERM drains, SIGINT stops at once, and an
app that cannot load stops ``start`` with a clear message instead of a respawn loop.

Each test has its own master (they kill, stop or break it).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING

import psutil
import pytest

from tests.support.client import HttpConn, build_request, get
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.waits import wait_for

if TYPE_CHECKING:
    from tests.conftest import Fleet

#: An app that names the worker process that answered.
PID_APP = """
from __future__ import annotations

import os

from shared.apps.load_balancer import LoadBalancer


class PidApp(LoadBalancer):
    def response_filter(self, session, upstream_response, ctx):
        upstream_response.set("X-Worker-Pid", str(os.getpid()))
"""


def worker_pids(master: Master) -> set[int]:
    return {w.pid for w in master.workers()}


def title(proc: psutil.Process) -> str:
    return " ".join(proc.cmdline()).strip()


def test_workers_are_titled_children_of_the_master(fleet: Fleet) -> None:
    """``--workers`` sets the count; each worker is a child titled ``tenaya worker N``."""
    origin = fleet.origin()
    master = fleet.master(config_for(upstreams={"o": [origin.address]}), args=("--workers", "3"))
    assert master.workers_count == 3

    def titles() -> list[str] | None:
        found = sorted(title(w) for w in master.workers())
        return found if all(t.startswith("tenaya worker") for t in found) else None

    assert wait_for(titles, what="worker titles") == [
        "tenaya worker 0",
        "tenaya worker 1",
        "tenaya worker 2",
    ]


def test_killed_worker_is_respawned_and_serves(fleet: Fleet) -> None:
    """kill -9 of a worker: a new worker takes its place and serves; no request sent after
    the kill fails."""
    origin = fleet.origin()
    master = fleet.master(
        config_for(upstreams={"o": [origin.address]}, app="pidapp:PidApp"),
        files={"pidapp.py": PID_APP},
    )

    def pids(exclude: int = 0) -> set[int]:
        found = worker_pids(master)
        return found if len(found) == 2 and exclude not in found else set()

    old = wait_for(pids, what="two workers")
    victim = min(old)
    psutil.Process(victim).kill()
    # Requests from now on must all succeed: the connections that land on the dead worker's
    # socket wait in its queue for the new worker.
    statuses = [get(master.port, f"/during/{i}").status for i in range(10)]
    assert statuses == [200] * 10
    new = wait_for(lambda: pids(exclude=victim), what="a replacement worker")
    (replacement,) = new - old
    served_by: set[int] = set()
    for i in range(200):
        resp = get(master.port, f"/after/{i}")
        assert resp.status == 200
        served_by.add(int(resp.header("X-Worker-Pid") or 0))
        if replacement in served_by:
            break
    assert replacement in served_by, f"the new worker never answered (saw {served_by})"
    assert victim not in served_by
    assert "respawning" in master.read_error_log()


def test_sigterm_drains_in_flight_request(fleet: Fleet) -> None:
    """SIGTERM while a slow response is in flight: it completes (with Connection: close),
    idle keep-alive connections are closed, and the master exits 0 long before the grace
    period ends."""
    origin = fleet.origin()
    master = fleet.master(
        config_for(upstreams={"o": [origin.address]}, server={"grace_period_seconds": 20})
    )
    with HttpConn(master.port, timeout=20) as idle, HttpConn(master.port, timeout=20) as busy:
        assert idle.request("GET", "/warm").status == 200
        busy.send(build_request("GET", "/sleep?s=1.5"))
        wait_for(lambda: "/sleep?s=1.5" in origin.paths(), what="the slow request upstream")
        started = time.monotonic()
        master.signal(signal.SIGTERM)
        resp = busy.read_response()
        assert resp.status == 200
        assert resp.json()["target"] == "/sleep?s=1.5"
        assert (resp.header("Connection") or "").lower() == "close"
        assert busy.closed_by_peer()
        assert idle.closed_by_peer(timeout=10), "an idle connection kept the worker alive"
        assert master.wait(15) == 0
    assert time.monotonic() - started < 10
    assert 'GET /sleep?s=1.5 HTTP/1.1" 200' in master.read_access_log()


def test_sigterm_stops_accepting(fleet: Fleet) -> None:
    """Once the master has been told to stop and has exited, the port refuses connections."""
    origin = fleet.origin()
    master = fleet.master(config_for(upstreams={"o": [origin.address]}))
    assert get(master.port, "/").status == 200
    master.signal(signal.SIGTERM)
    assert master.wait(15) == 0
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", master.port), timeout=5),
    ):
        pass
    assert not master.workers()


def test_grace_period_bounds_the_drain(fleet: Fleet) -> None:
    """A response slower than server.grace_period_seconds does not keep the master: it exits
    shortly after the grace period, and the client's connection is closed."""
    origin = fleet.origin()
    master = fleet.master(
        config_for(upstreams={"o": [origin.address]}, server={"grace_period_seconds": 1})
    )
    with HttpConn(master.port, timeout=20) as conn:
        conn.send(build_request("GET", "/sleep?s=30"))
        wait_for(lambda: origin.requests, what="the slow request upstream")
        started = time.monotonic()
        master.signal(signal.SIGTERM)
        master.wait(15)
        assert time.monotonic() - started < 8
        assert conn.closed_by_peer(timeout=5)


def test_sigint_stops_at_once(fleet: Fleet) -> None:
    """SIGINT is a fast stop: an in-flight slow request does not hold the master up."""
    origin = fleet.origin()
    master = fleet.master(
        config_for(upstreams={"o": [origin.address]}, server={"grace_period_seconds": 30})
    )
    with HttpConn(master.port, timeout=20) as conn:
        conn.send(build_request("GET", "/sleep?s=30"))
        wait_for(lambda: origin.requests, what="the slow request upstream")
        started = time.monotonic()
        master.signal(signal.SIGINT)
        master.wait(10)
        assert time.monotonic() - started < 5
        assert conn.closed_by_peer(timeout=5)
    assert not master.workers()


def test_idle_client_connection_closed_after_keepalive_timeout(fleet: Fleet) -> None:
    """timeouts.keepalive_seconds: an idle client connection is closed after about that
    long; a busy one is not."""
    origin = fleet.origin()
    master = fleet.master(
        config_for(upstreams={"o": [origin.address]}, timeouts={"keepalive_seconds": 1})
    )
    with HttpConn(master.port) as idle, HttpConn(master.port) as busy:
        assert idle.request("GET", "/once").status == 200
        started = time.monotonic()
        assert busy.request("GET", "/sleep?s=2").status == 200
        assert idle.closed_by_peer(timeout=5)
        assert 0.9 <= time.monotonic() - started < 4.5
        assert busy.request("GET", "/still-busy").status == 200


BROKEN_APPS = {
    "import_error": (
        "brokenapp:App",
        {"brokenapp.py": "import no_such_module_here\n"},
        "no_such_module_here",
    ),
    "missing_module": ("nosuchapp:App", {}, "nosuchapp"),
    "missing_attribute": ("okapp:Nope", {"okapp.py": "X = 1\n"}, "Nope"),
    "raises_on_import": (
        "boomapp:App",
        {"boomapp.py": "raise RuntimeError('boom at import')\n"},
        "boom at import",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_APPS))
def test_app_that_cannot_load_stops_start(fleet: Fleet, case: str) -> None:
    """An app that cannot be imported makes ``start`` exit non-zero soon, saying why, with
    no worker respawned in a loop and none left behind."""
    spec, files, reason = BROKEN_APPS[case]
    origin = fleet.origin()
    master = fleet.master(
        config_for(upstreams={"o": [origin.address]}, app=spec), files=files, start=False
    )
    proc = master.spawn()
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"start kept running with a broken app:\n{master.logs()}") from None
    assert code != 0
    log = master.read_error_log() + (master.workdir / "master.stderr").read_text()
    assert reason in log, log
    assert "Traceback" not in log, f"start crashed instead of reporting:\n{log}"
    assert "serving on" not in log
    attempts = log.count("app failed to load")
    assert attempts <= 2 * 2 + 1, f"{attempts} load attempts: a respawn loop?\n{log}"
    wait_for(lambda: not master.workers(), what="no worker left behind")


def test_app_override_on_command_line_that_cannot_load(fleet: Fleet) -> None:
    """``start --app`` with a module that does not exist exits non-zero with the reason."""
    origin = fleet.origin()
    master = fleet.master(
        config_for(upstreams={"o": [origin.address]}),
        args=("--app", "not_a_real_module:App"),
        start=False,
    )
    code = master.spawn().wait(30)
    assert code != 0
    log = master.read_error_log() + (master.workdir / "master.stderr").read_text()
    assert "not_a_real_module" in log
    assert "Traceback" not in log, f"start crashed instead of reporting:\n{log}"


def test_port_in_use_fails_to_start(fleet: Fleet) -> None:
    """A listener address that is taken makes ``start`` exit non-zero, naming the address."""
    origin = fleet.origin()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = config_for(upstreams={"o": [origin.address]}, listeners=[{"address": address}])
        master = fleet.master(config, start=False)
        code = master.spawn().wait(30)
    assert code != 0
    log = master.read_error_log() + (master.workdir / "master.stderr").read_text()
    assert address in log
    assert "Traceback" not in log, f"start crashed instead of reporting:\n{log}"
