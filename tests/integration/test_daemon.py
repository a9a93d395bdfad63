"""Starting in the background, readiness for systemd, and refusing a taken address."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import Fleet
from tests.support.client import get
from tests.support.config import config_for
from tests.support.resources import free_port
from tests.support.waits import wait_for


def _write_config(tmp_path: Path, config: dict[str, object]) -> Path:
    path = tmp_path / "tenaya.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "master", "start", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _live_masters(cwd: Path) -> set[int]:
    """Pids of running (not zombie) Tenaya masters whose working directory is ``cwd``: the
    ones a test started there, not those of other tests or runs on the same machine."""
    out = set()
    for p in psutil.process_iter():
        try:
            if (
                p.status() != psutil.STATUS_ZOMBIE
                and "tenaya master" in " ".join(p.cmdline())
                and p.cwd() == str(cwd)
            ):
                out.add(p.pid)
        except psutil.Error:
            pass
    return out


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_daemon_returns_once_serving(fleet: Fleet, tmp_path: Path) -> None:
    """`start --daemon` exits 0 only once the master serves; `stop` ends it."""
    origin = fleet.origin()
    port = free_port()
    pid_file = tmp_path / "tenaya.pid"
    config = config_for(
        {"origin": [origin.address]},
        listeners=[{"address": f"127.0.0.1:{port}"}],
        server={"pid_file": str(pid_file)},
        logging={"access_log": "off", "error_log": str(tmp_path / "error.log")},
    )
    path = _write_config(tmp_path, config)
    result = _start("-c", str(path), "--daemon", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pid = int(pid_file.read_text())
    try:
        assert f"master pid {pid}" in result.stdout
        assert get(port, "/").status == 200  # serving already, no waiting
    finally:
        subprocess.run(
            [sys.executable, "-m", "master", "stop", "-c", str(path)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        wait_for(lambda: _gone(pid), timeout=30)


def test_daemon_reports_a_failed_start(tmp_path: Path) -> None:
    """`start --daemon` with an app that cannot load exits 1 with the reason, and leaves no
    process behind."""
    config = config_for(
        listeners=[{"address": f"127.0.0.1:{free_port()}"}],
        app="nope:App",
        logging={"error_log": str(tmp_path / "error.log")},
    )
    result = _start("-c", str(_write_config(tmp_path, config)), "-d", cwd=tmp_path)
    assert result.returncode == 1
    assert "No module named 'nope'" in result.stderr
    assert not (tmp_path / "tenaya.pid").exists()
    assert _live_masters(tmp_path) == set()


def test_second_master_on_a_taken_address_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    """A master asked to listen where another process listens refuses to start instead of
    joining that process's SO_REUSEPORT group."""
    origin = fleet.origin()
    port = free_port()
    first = fleet.master(
        config_for({"origin": [origin.address]}, listeners=[{"address": f"127.0.0.1:{port}"}])
    )
    config = config_for({"origin": [origin.address]}, listeners=[{"address": f"127.0.0.1:{port}"}])
    result = _start("-c", str(_write_config(tmp_path, config)), cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert get(first.port, "/").status == 200


def test_systemd_notify(fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With NOTIFY_SOCKET set, the master tells systemd READY (with its pid), RELOADING and
    READY around a reload, and STOPPING."""
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        origin = fleet.origin()
        m = fleet.master(config_for({"origin": [origin.address]}))
        assert sock.recv(4096).decode().split("\n")[:2] == ["READY=1", f"MAINPID={m.pid}"]
        m.signal(signal.SIGHUP)
        assert sock.recv(4096) == b"RELOADING=1"
        assert sock.recv(4096) == b"READY=1"
        m.signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert m.wait(30) == 0
    os.unlink(address)
