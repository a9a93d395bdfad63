"""Zero-downtime lifecycle: reloads, upgrades and worker count changes under load lose nothing;
broken configs, broken apps and broken code on disk leave the running server serving."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import Fleet
from tests.support.client import HttpConn, get
from tests.support.config import config_for, origin_app
from tests.support.master import Master
from tests.support.resources import free_port
from tests.support.waits import wait_for

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent


def soak(*args: str) -> dict[str, Any]:
    """Runs tests/soak.py in a private network namespace and returns its JSON result."""
    out = subprocess.run(
        ["unshare", "-rn", sys.executable, str(TESTS / "soak.py"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_no_loss(result: dict[str, Any], count: int) -> None:
    assert result["done"] == count, result
    assert result["load_running_at_end"], result
    wrk = result["wrk"]
    assert wrk["requests"] > 1000, result
    assert {k: v for k, v in wrk.items() if k != "requests"} == {
        "connect": 0,
        "read": 0,
        "write": 0,
        "timeout": 0,
        "non2xx": 0,
    }, result
    assert all(v == 0 for v in result["counters"].values()), result


@pytest.mark.parametrize("mode", ["keepalive", "close"])
def test_twenty_reloads_under_load_lose_nothing(mode: str) -> None:
    """20 SIGHUPs in a row under steady load: no failed request, no reset, no listen drop."""
    assert_no_loss(soak("--action", "reload", "--count", "20", "--mode", mode), 20)


@pytest.mark.parametrize("mode", ["keepalive", "close"])
def test_five_upgrades_under_load_lose_nothing(mode: str) -> None:
    """5 SIGUSR2 binary upgrades in a row under steady load lose nothing."""
    result = soak("--action", "upgrade", "--count", "5", "--mode", mode)
    assert_no_loss(result, 5)


def test_worker_count_changes_under_load_lose_nothing() -> None:
    """SIGTTIN and SIGTTOU in turn under load lose nothing."""
    assert_no_loss(soak("--action", "resize", "--count", "6"), 6)


def test_negative_control_harness_sees_losses() -> None:
    """Killing the workers under load is seen as failed requests and resets: the harness
    that finds nothing above can find something."""
    result = soak("--action", "kill-workers", "--count", "3")
    wrk = result["wrk"]
    lost = wrk["connect"] + wrk["read"] + wrk["write"] + wrk["timeout"] + wrk["non2xx"]
    assert lost > 0 or result["counters"]["TcpOutRsts"] > 0, result


def _serving_generation(m: Master, generation: int) -> None:
    wait_for(lambda: f"generation {generation} serving" in m.read_error_log(), timeout=30)


def _worker_pids(m: Master) -> set[int]:
    return {p.pid for p in m.workers()}


def test_reload_with_broken_config_keeps_serving(fleet: Fleet) -> None:
    """A reload whose config is invalid is refused with the reason; the same workers serve."""
    origin = fleet.origin()
    m = fleet.master(config_for({"origin": [origin.address]}))
    before = _worker_pids(m)
    text = m.config_path.read_text()
    m.config_path.write_text(
        text.replace("workers: 2", "wokers: 2").replace(
            "grace_period_seconds: 10", "grace_period_seconds: ten"
        )
    )
    m.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in m.read_error_log(), timeout=10)
    # One log line lists every mistake.
    line = next(x for x in m.read_error_log().splitlines() if "reload refused" in x)
    assert "(2 errors)" in line
    assert "server.wokers: unknown key (did you mean 'workers'?)" in line
    assert "server.grace_period_seconds: expected a number, got 'ten'" in line
    assert get(m.port, "/").status == 200
    assert _worker_pids(m) == before
    m.config_path.write_text(text)
    m.signal(signal.SIGHUP)
    _serving_generation(m, 2)
    assert get(m.port, "/").status == 200


APP = origin_app("""
    def response_filter(self, session, resp, ctx):
        resp.set("X-App-Version", "VERSION")
""")


def test_reload_with_syntax_error_in_app_keeps_serving(fleet: Fleet) -> None:
    """A reload that finds a SyntaxError in the app keeps the old workers (and old app) serving;
    a reload after the fix serves the new app code."""
    origin = fleet.origin()
    m = fleet.master(
        config_for(app="gw:App", app_options={"origin": origin.address}),
        files={"gw.py": APP.replace("VERSION", "1")},
    )
    assert get(m.port, "/").header("X-App-Version") == "1"
    before = _worker_pids(m)
    (m.workdir / "gw.py").write_text(APP.replace("VERSION", "2") + "\ndef broken(:\n")
    m.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in m.read_error_log(), timeout=30)
    assert "SyntaxError" in m.read_error_log()
    for _ in range(20):
        assert get(m.port, "/").header("X-App-Version") == "1"
    wait_for(lambda: _worker_pids(m) == before, timeout=10)
    (m.workdir / "gw.py").write_text(APP.replace("VERSION", "2"))
    m.signal(signal.SIGHUP)
    wait_for(
        lambda: (
            "generation 3 serving" in m.read_error_log()
            or "generation 2 serving" in m.read_error_log()
        ),
        timeout=30,
    )
    wait_for(lambda: get(m.port, "/").header("X-App-Version") == "2", timeout=10)


def _pid_file(m: Master) -> Path:
    return Path(m.config["server"]["pid_file"])


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def test_upgrade_with_broken_code_on_disk_keeps_the_old_master(
    fleet: Fleet, tmp_path: Path
) -> None:
    """SIGUSR2 when the code on disk cannot start: the old master says so, keeps serving and
    keeps its pid in the pid file; once the code is fixed, an upgrade succeeds."""
    origin = fleet.origin()
    work = tmp_path / "code"
    for package in ("master", "worker", "shared"):
        shutil.copytree(
            ROOT / package, work / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    pid_file = tmp_path / "tenaya.pid"
    m = Master(work, config_for({"origin": [origin.address]}, server={"pid_file": str(pid_file)}))
    fleet._masters.append(m)  # stopped with the fleet
    m.start()
    assert _read_pid(pid_file) == m.pid
    arbiter = work / "master" / "arbiter.py"
    good = arbiter.read_text()
    arbiter.write_text(good + "\nthis is not python\n")
    m.signal(signal.SIGUSR2)
    wait_for(lambda: "upgrade failed" in m.read_error_log(), timeout=30)
    assert _read_pid(pid_file) == m.pid
    assert m.proc is not None and m.proc.poll() is None
    assert get(m.port, "/").status == 200
    arbiter.write_text(good)
    m.signal(signal.SIGUSR2)
    new = wait_for(lambda: (p := _read_pid(pid_file)) != m.pid and p, timeout=30)
    try:
        assert m.wait(timeout=30) == 0
        assert get(m.port, "/").status == 200
    finally:
        os.kill(new, signal.SIGTERM)
        wait_for(
            lambda: (
                not psutil.pid_exists(new) or psutil.Process(new).status() == psutil.STATUS_ZOMBIE
            ),
            timeout=30,
        )


SPIN_APP = origin_app("""
    def request_filter(self, session, ctx):
        if session.req_header.path == "/spin":
            while True:
                pass
        return False
""")


def test_stuck_worker_is_killed_and_replaced(fleet: Fleet) -> None:
    """A worker stuck in a busy loop misses its heartbeats, is killed and replaced."""
    origin = fleet.origin()
    m = fleet.master(
        config_for(
            app="spin:App",
            app_options={"origin": origin.address},
            server={"workers": 1, "worker_timeout_seconds": 2},
        ),
        files={"spin.py": SPIN_APP},
    )
    (stuck,) = _worker_pids(m)
    t = threading.Thread(target=lambda: _ignore_errors(lambda: get(m.port, "/spin")), daemon=True)
    t.start()
    wait_for(lambda: stuck not in _worker_pids(m) and len(_worker_pids(m)) == 1, timeout=30)
    assert "silent for" in m.read_error_log()
    assert get(m.port, "/").status == 200
    t.join(15)


def _ignore_errors(fn: Any) -> None:
    try:
        fn()
    except Exception:
        pass


def test_usr1_reopens_the_access_log(fleet: Fleet) -> None:
    """After logrotate moves the access log, SIGUSR1 makes workers write to a new file."""
    origin = fleet.origin()
    m = fleet.master(config_for({"origin": [origin.address]}))
    assert get(m.port, "/first").status == 200
    wait_for(lambda: "/first" in m.read_access_log(), timeout=10)
    rotated = m.access_log.with_suffix(".1")
    m.access_log.rename(rotated)
    m.signal(signal.SIGUSR1)
    wait_for(lambda: "log files reopened" in m.read_error_log(), timeout=10)

    def second_logged() -> bool:
        get(m.port, "/second")
        return "/second" in m.read_access_log()

    wait_for(second_logged, timeout=10, interval=0.2)
    assert "/second" not in rotated.read_text()


def test_master_leaks_no_fds_across_reloads(fleet: Fleet) -> None:
    """20 reloads leave the master with the descriptors it had."""
    origin = fleet.origin()
    m = fleet.master(config_for({"origin": [origin.address]}))
    master = psutil.Process(m.pid)
    assert get(m.port, "/").status == 200
    before = master.num_fds()
    for generation in range(2, 22):
        m.signal(signal.SIGHUP)
        _serving_generation(m, generation)
    wait_for(lambda: len(m.workers()) == 2, timeout=30)
    assert get(m.port, "/").status == 200
    wait_for(lambda: master.num_fds() == before, timeout=10)


def test_slow_response_on_old_worker_finishes_after_reload(fleet: Fleet) -> None:
    """A slow response in flight on an old worker completes within the grace period."""
    origin = fleet.origin()
    m = fleet.master(config_for({"origin": [origin.address]}))
    result: dict[str, Any] = {}

    def slow() -> None:
        result["response"] = get(m.port, "/sleep?s=2")

    t = threading.Thread(target=slow)
    t.start()
    wait_for(lambda: any(t.startswith("/sleep") for t in origin.paths()), timeout=10)
    m.signal(signal.SIGHUP)
    _serving_generation(m, 2)
    t.join(30)
    assert result["response"].status == 200


def test_status_and_control_commands(fleet: Fleet, tmp_path: Path) -> None:
    """`status --json` reports the master and its workers with live counters through the
    control socket (mode 0600); `reload` and `stop` work through it too."""
    origin = fleet.origin()
    sock = tmp_path / "ctl.sock"
    m = fleet.master(config_for({"origin": [origin.address]}, server={"control_socket": str(sock)}))
    assert sock.stat().st_mode & 0o777 == 0o600
    for _ in range(10):
        assert get(m.port, "/").status == 200
    cmd = [sys.executable, "-m", "master"]

    def status() -> dict[str, Any]:
        out = subprocess.run(
            [*cmd, "status", "-c", str(m.config_path), "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return json.loads(out.stdout)

    wait_for(lambda: sum(w["requests"] for w in status()["workers"]) >= 10, timeout=10)
    data = status()
    assert data["pid"] == m.pid and data["generation"] == 1 and data["state"] == "serving"
    assert len(data["workers"]) == 2
    assert all(w["rss_bytes"] > 0 for w in data["workers"])
    subprocess.run(
        [*cmd, "reload", "-c", str(m.config_path)], check=True, timeout=30, capture_output=True
    )
    _serving_generation(m, 2)
    subprocess.run(
        [*cmd, "stop", "-c", str(m.config_path)], check=True, timeout=30, capture_output=True
    )
    assert m.wait(timeout=30) == 0
    assert not sock.exists()


#: An app whose worker 1 waits, while configured, for a file to appear: worker 0 serves while
#: the master is still booting.
GATED_APP = origin_app("""
    def configure(self, config):
        super().configure(config)
        import pathlib, time
        self.peer = HttpPeer(config.app_options["origin"])
        gate = pathlib.Path(config.app_options["gate"])
        deadline = time.monotonic() + 30
        while self.worker_id == 1 and not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
""")


def test_signals_while_booting_are_deferred_not_lost(fleet: Fleet) -> None:
    """SIGHUP and SIGTTIN that come while the master still waits for its workers are logged
    as deferred and carried out, in order, once it serves."""
    origin = fleet.origin()
    port = free_port()
    gate = fleet.workdir / "gate"
    m = fleet.master(
        config_for(
            app="gw:App",
            listeners=[{"address": f"127.0.0.1:{port}"}],
            app_options={"origin": origin.address, "gate": str(gate)},
        ),
        files={"gw.py": GATED_APP},
        start=False,
    )
    m.spawn()
    wait_for(lambda: _answers(port), timeout=30)
    assert "serving on" not in m.read_error_log()
    m.signal(signal.SIGHUP)
    wait_for(lambda: "reload deferred until the workers are ready" in m.read_error_log())
    m.signal(signal.SIGTTIN)
    wait_for(lambda: "one worker more deferred" in m.read_error_log())
    gate.touch()
    _serving_generation(m, 2)
    _serving_generation(m, 3)
    wait_for(lambda: len(_worker_pids(m)) == 3, timeout=30)
    assert get(port, "/").status == 200


def _answers(port: int) -> bool:
    """One worker answers. A connection the kernel queued on the worker still booting waits
    there until it serves, so each try gives up after a second and the next one, from another
    source port, may land on the worker that answers."""
    try:
        with HttpConn(port, timeout=1.0) as conn:
            return conn.request("GET", "/").status == 200
    except OSError:
        return False
