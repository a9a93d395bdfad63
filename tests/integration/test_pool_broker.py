"""Upstream connections shared across workers: the master's pool broker lends idle
connections that any worker donated, never lends a dead one, leaks no descriptor, and keeps its
connections across reloads and upgrades."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import Fleet
from tests.support.client import HttpConn, get
from tests.support.config import config_for, origin_app
from tests.support.master import Master
from tests.support.waits import wait_for, wait_until_stable

TAG_APP = origin_app("""
    def upstream_request_filter(self, session, req, ctx):
        req.set("X-Worker", str(os.getpid()))
""")


def status(m: Master) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "master", "status", "-c", str(m.config_path), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)


def control(tmp_path: Path) -> dict[str, Any]:
    return {"control_socket": str(tmp_path / "ctl.sock")}


def test_connection_donated_by_one_worker_serves_another(fleet: Fleet, tmp_path: Path) -> None:
    """With no local pool, every idle connection goes to the broker: the origin sees one
    connection carry requests from both workers, and few connections in all."""
    origin = fleet.origin()
    m = fleet.master(
        config_for(
            app="tag:App",
            app_options={"origin": origin.address},
            server=control(tmp_path),
            pool={"size_per_worker": 0},
        ),
        files={"tag.py": TAG_APP},
    )
    for _ in range(30):
        assert get(m.port, "/").status == 200
    workers_by_conn: dict[int, set[str]] = {}
    for r in origin.requests:
        workers_by_conn.setdefault(r.conn_id, set()).add(r.header("X-Worker") or "")
    assert len({w for ws in workers_by_conn.values() for w in ws}) == 2, workers_by_conn
    assert any(len(ws) == 2 for ws in workers_by_conn.values()), workers_by_conn
    assert origin.accepted <= 5
    wait_for(lambda: status(m)["pool"]["reused_shared"] >= 20, timeout=10, interval=0.3)


def test_connection_closed_by_origin_is_never_lent(fleet: Fleet, tmp_path: Path) -> None:
    """An idle connection the origin closes while the broker holds it is dropped, not lent."""
    origin = fleet.origin(close_idle_after=0.3)
    m = fleet.master(
        config_for(
            {"origin": [origin.address]}, server=control(tmp_path), pool={"size_per_worker": 0}
        )
    )
    assert get(m.port, "/").status == 200
    wait_for(lambda: origin.idle_closed >= 1, timeout=10)
    wait_for(lambda: status(m)["broker"]["dropped"] >= 1, timeout=10, interval=0.2)
    assert status(m)["broker"]["idle"] == 0
    for _ in range(5):
        assert get(m.port, "/").status == 200
    assert status(m)["broker"]["lent"] == 0 or origin.accepted >= 2


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_targets(pid: int) -> list[str]:
    """What a process's descriptors point at, to show a leak when there is one."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


def test_no_fd_leaks_after_ten_thousand_handoffs(fleet: Fleet, tmp_path: Path) -> None:
    """5 000 requests with no local pool (10 000 hand-offs between workers and the broker)
    leave the master and the workers with the descriptors they had."""
    origin = fleet.origin()
    m = fleet.master(
        config_for(
            {"origin": [origin.address]}, server=control(tmp_path), pool={"size_per_worker": 0}
        )
    )
    clients = [HttpConn(m.port) for _ in range(4)]
    try:
        for c in clients:
            assert c.request("GET", "/").status == 200
        workers = [w.pid for w in m.workers()]
        # A connection handed off a moment ago may still be closing: count once settled.
        before = {pid: wait_until_stable(partial(_fds, pid), settle=0.5) for pid in workers}
        idle_before = status(m)["broker"]["idle"]
        master_before = wait_until_stable(lambda: _fds(m.pid), settle=0.5) - idle_before
        for i in range(5000):
            assert clients[i % 4].request("GET", "/").status == 200
        # Same client connections open as before: the workers hold no more than they held.
        try:
            wait_for(lambda: all(_fds(pid) <= n for pid, n in before.items()), timeout=15)
        except AssertionError:
            now = {pid: (_fds(pid), _fd_targets(pid)) for pid in workers}
            raise AssertionError(f"worker descriptors before {before}, now {now}") from None
    finally:
        for c in clients:
            c.close()
    last: dict[str, Any] = {}

    def counted() -> dict[str, Any] | None:
        last.update(status(m))
        return dict(last) if last["pool"]["upstream_requests"] >= 5004 else None

    try:
        data = wait_for(counted, timeout=10, interval=0.3)
    except AssertionError:
        raise AssertionError(f"status: {last}") from None
    assert data["pool"]["reused_shared"] >= 4900
    # The broker's idle connections are the only descriptors the master gained (a donation
    # may still be in flight when the first status is read, hence the poll).
    wait_for(
        lambda: _fds(m.pid) - status(m)["broker"]["idle"] <= master_before, timeout=10, interval=0.2
    )


def test_reload_keeps_idle_connections(fleet: Fleet, tmp_path: Path) -> None:
    """Old workers give their idle connections to the broker as they exit; the new generation
    uses them: no new upstream connection after a reload."""
    origin = fleet.origin()
    m = fleet.master(config_for({"origin": [origin.address]}, server=control(tmp_path)))
    for _ in range(10):
        assert get(m.port, "/").status == 200
    accepted = origin.accepted
    m.signal(signal.SIGHUP)
    wait_for(lambda: "generation 2 serving" in m.read_error_log(), timeout=30)
    wait_for(
        lambda: len(m.workers()) == 2 and status(m)["broker"]["idle"] >= 1, timeout=30, interval=0.2
    )
    for _ in range(10):
        assert get(m.port, "/").status == 200
    assert origin.accepted == accepted


def test_upgrade_keeps_idle_connections(fleet: Fleet, tmp_path: Path) -> None:
    """The broker's idle connections move to the new master on SIGUSR2."""
    origin = fleet.origin()
    pid_file = tmp_path / "tenaya.pid"
    m = fleet.master(
        config_for(
            {"origin": [origin.address]}, server={**control(tmp_path), "pid_file": str(pid_file)}
        )
    )
    for _ in range(10):
        assert get(m.port, "/").status == 200
    accepted = origin.accepted
    old = m.pid
    m.signal(signal.SIGUSR2)
    new = wait_for(lambda: (p := int(pid_file.read_text() or 0)) != old and p, timeout=30)
    try:
        assert m.wait(timeout=30) == 0
        wait_for(
            lambda: "idle upstream connections from the old master" in m.read_error_log(),
            timeout=10,
        )
        for _ in range(10):
            assert get(m.port, "/").status == 200
        assert origin.accepted == accepted
    finally:
        os.kill(new, signal.SIGTERM)
        wait_for(
            lambda: (
                not psutil.pid_exists(new) or psutil.Process(new).status() == psutil.STATUS_ZOMBIE
            ),
            timeout=30,
        )
