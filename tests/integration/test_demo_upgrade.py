"""Binary upgrades of a master that runs the demo origins (the embedded default config's shape)
lose no request, and the last master's stop leaves nothing behind.

Theory of operation. The master starts the demo origins' process itself; a binary upgrade
hands that process to the new master (``Handover.demo_pid``, ``UpgradeReady.demo_adopted``), so
the origins' sockets never close and the upstream behind the built-in load balancer is always
there. Two client threads keep requests going through the proxy while the test upgrades twice
in a row: one opens a new connection per request, the other keeps one keep-alive connection and
opens the next only when a response says ``Connection: close`` (as a draining worker's does).
Every response must be a 200 from a demo origin, for the path asked, and no request may fail.

Without the handover the test fails one way or the other: a new master that started its own
demo origins could not bind their ports (the upgrade fails and the pid file keeps the old pid),
and an old master that stopped them on exit would leave the new one proxying to closed ports
(502s, and the process the test follows is gone).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import Fleet
from tests.support.client import HttpConn, Response, get
from tests.support.config import config_for
from tests.support.master import Master, is_worker
from tests.support.resources import free_port
from tests.support.waits import wait_for

#: Longest wait for a new master to serve, or for an old one to exit.
UPGRADE_SECONDS = 30.0
#: The load stops after this long even if the test never says so (a hung test).
LOAD_SECONDS = 45.0
#: Nor does one client thread send more requests than this.
LOAD_MAX_REQUESTS = 200_000
#: Longest wait for processes to exit and ports to close after the last stop.
STOP_SECONDS = 20.0
#: The title the demo origins' process gives itself (master/demo.py).
DEMO_TITLE = "tenaya demo-origins"


def distinct_free_ports(n: int) -> list[int]:
    """``n`` different ports that were free a moment ago."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def demo_config(workdir: Path) -> tuple[dict[str, Any], list[str]]:
    """The embedded default's shape on free ports: one listener, an upstream of two demo
    origins that the master starts, a pid file and a control socket. Also returns the demo
    origins' addresses."""
    listen, *origin_ports = distinct_free_ports(3)
    demo = [f"127.0.0.1:{port}" for port in origin_ports]
    config = config_for(
        {"demo": demo},
        listeners=[{"address": f"127.0.0.1:{listen}"}],
        server={
            "pid_file": str(workdir / "tenaya.pid"),
            "control_socket": str(workdir / "ctl.sock"),
        },
        demo_origins=demo,
    )
    return config, demo


def expected_body(origin: str, target: str) -> bytes:
    """What a demo origin answers (master/demo.py)."""
    return f"Hello from Tenaya demo origin {origin}\nYou asked for {target}\n".encode()


class Client(threading.Thread):
    """Sends GETs through the proxy until told to stop (or :data:`LOAD_SECONDS` or
    :data:`LOAD_MAX_REQUESTS`), counting the demo origin of every good answer and describing
    every failure. ``keep_alive``: one connection at a time, replaced only when a response
    says ``Connection: close``; otherwise a new connection per request."""

    def __init__(
        self, port: int, origins: list[str], keep_alive: bool, stop: threading.Event
    ) -> None:
        super().__init__(name=f"load-{'kept' if keep_alive else 'fresh'}", daemon=True)
        self.port = port
        self.origins = origins
        self.keep_alive = keep_alive
        self.stop = stop
        #: Requests sent so far (answered or failed).
        self.sent = 0
        #: Good answers by the demo origin that gave them.
        self.answered: Counter[str] = Counter()
        self.failures: list[str] = []
        #: Connections opened (keep-alive client).
        self.connections = 0
        #: Whether the thread stopped before being told to (deadline or count reached).
        self.ran_out = False

    def run(self) -> None:
        deadline = time.monotonic() + LOAD_SECONDS
        conn: HttpConn | None = None
        kind = "kept" if self.keep_alive else "fresh"
        try:
            while not self.stop.is_set():
                if self.sent >= LOAD_MAX_REQUESTS or time.monotonic() > deadline:
                    self.ran_out = True
                    return
                target = f"/{kind}/{self.sent}"
                self.sent += 1
                try:
                    if not self.keep_alive:
                        resp = get(self.port, target, headers=[("Connection", "close")])
                    else:
                        if conn is None:
                            conn = HttpConn(self.port)
                            self.connections += 1
                        resp = conn.request("GET", target)
                        if (resp.header("connection") or "").lower() == "close":
                            conn.close()
                            conn = None
                except (OSError, AssertionError, ValueError) as e:
                    self.failures.append(f"{target}: {type(e).__name__}: {e}")
                    if conn is not None:
                        conn.close()
                        conn = None
                    continue
                self._check(target, resp)
        finally:
            if conn is not None:
                conn.close()

    def _check(self, target: str, resp: Response) -> None:
        origin = resp.header("x-demo-origin") or ""
        if (
            resp.status == 200
            and origin in self.origins
            and resp.body == expected_body(origin, target)
        ):
            self.answered[origin] += 1
        else:
            self.failures.append(f"{target}: {resp.status} from {origin!r}: {resp.body[:200]!r}")


def read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def process(pid: int) -> psutil.Process:
    """The live process ``pid`` (its create time, kept by psutil, guards against reuse)."""
    p = psutil.Process(pid)
    p.create_time()
    return p


def gone(p: psutil.Process) -> bool:
    """True once ``p`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def refuses(address: str) -> bool:
    """True when nothing listens on ``address`` any more."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


#: The pidfd of an adopted demo origins' process, as :func:`held_fds` names it.
PIDFD = "anon_inode:[pidfd]"
#: The state column of a listening socket in /proc/net/tcp.
TCP_LISTEN = "0A"


def _socket_kinds(pid: int) -> dict[str, str]:
    """``socket:[INODE]`` to ``socket:unix`` or ``socket:tcp-listen``, for the sockets of the
    network namespace of ``pid``."""
    kinds: dict[str, str] = {}
    with open(f"/proc/{pid}/net/unix") as f:
        for line in f.readlines()[1:]:
            kinds[f"socket:[{line.split()[6]}]"] = "socket:unix"
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == TCP_LISTEN:
                    kinds[f"socket:[{cols[9]}]"] = "socket:tcp-listen"
    return kinds


def held_fds(pid: int) -> Counter[str]:
    """What the master ``pid`` holds open, by kind: files by path, pipes and anonymous inodes
    by type, sockets as unix or listening TCP. TCP connections are left out: the pool
    broker's idle upstream connections come and go with the load, in any number."""
    targets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    sockets = _socket_kinds(pid)
    held: Counter[str] = Counter()
    for target in targets:
        if target.startswith("socket:["):
            if target in sockets:
                held[sockets[target]] += 1
        elif target.startswith("pipe:["):
            held["pipe"] += 1
        else:
            held[target] += 1
    return held


def settled_fds(pid: int, expected: Counter[str]) -> None:
    """Waits until what the master ``pid`` holds is ``expected`` (a new master closes the old
    one's channel on its next tick); fails with the difference otherwise."""
    seen: list[Counter[str]] = []

    def settled() -> bool:
        seen.append(held_fds(pid))
        return seen[-1] == expected

    with contextlib.suppress(AssertionError):
        wait_for(settled, timeout=10, what="the master's descriptors to settle")
    assert seen[-1] == expected, (pid, "more:", seen[-1] - expected, "fewer:", expected - seen[-1])


def kill_all(masters: list[psutil.Process], demo: psutil.Process) -> None:
    """SIGKILL what is left of ``masters`` with their workers, then of ``demo`` (after a
    failure)."""
    for p in [*masters, demo]:
        with contextlib.suppress(psutil.Error):
            if gone(p):
                continue
            for child in p.children():
                if is_worker(child):
                    child.kill()
            p.kill()


def upgrade(old: psutil.Process, first: Master, pid_file: Path) -> psutil.Process:
    """SIGUSR2 to ``old``; returns the new master once it serves and ``old`` has exited."""
    old.send_signal(signal.SIGUSR2)
    new_pid = wait_for(
        lambda: (p := read_pid(pid_file)) != old.pid and p,
        timeout=UPGRADE_SECONDS,
        what="the new master's pid in the pid file",
    )
    new = process(new_pid)
    # Every master logs to the first one's error log (the same config).
    wait_for(
        lambda: f"with 2 workers (pid {new_pid})" in first.read_error_log(),
        timeout=UPGRADE_SECONDS,
        what="the new master's 'serving on' line",
    )
    wait_for(lambda: gone(old), timeout=UPGRADE_SECONDS, what="the old master's exit")
    return new


@pytest.mark.timeout(90)
def test_two_upgrades_under_load_keep_the_demo_origins(fleet: Fleet, tmp_path: Path) -> None:
    """Two SIGUSR2 upgrades in a row under load: every request gets a demo origin's 200, the
    same demo origins' process serves throughout, no master holds more than the first did
    (but the adopted process's pidfd), and the last master's stop ends the demo origins and
    closes every port."""
    config, demo = demo_config(tmp_path)
    pid_file = tmp_path / "tenaya.pid"
    first = fleet.master(config)
    listen = config["listeners"][0]["address"]
    assert first.port == int(listen.rpartition(":")[2])
    masters = [process(first.pid)]
    (demo_proc,) = wait_for(
        lambda: [c for c in masters[0].children() if DEMO_TITLE in " ".join(c.cmdline())],
        what="the demo origins' process",
    )
    stop = threading.Event()
    clients = [Client(first.port, demo, keep_alive, stop) for keep_alive in (False, True)]
    try:
        for c in clients:
            c.start()
        wait_for(lambda: all(c.answered for c in clients), what="the load's first answers")
        first_fds = held_fds(first.pid)
        assert PIDFD not in first_fds
        adopted_fds = first_fds + Counter({PIDFD: 1})

        for _ in range(2):
            sent_before = [c.sent for c in clients]
            masters.append(upgrade(masters[-1], first, pid_file))
            if len(masters) == 2:
                assert first.wait(timeout=10) == 0
            # The load ran through the whole upgrade, and runs on; nothing failed so far.
            assert all(c.sent > n for c, n in zip(clients, sent_before, strict=True))
            for c in clients:
                assert c.is_alive() and c.failures == [], (c.name, c.ran_out, c.failures[:10])
            # Adopted, not restarted: the same process, still running.
            assert not gone(demo_proc)
            settled_fds(masters[-1].pid, adopted_fds)
        sent_after = [c.sent for c in clients]
        wait_for(
            lambda: all(c.sent > n for c, n in zip(clients, sent_after, strict=True)),
            what="the load after the last upgrade",
        )
        stop.set()
        for c in clients:
            c.join(timeout=15)
        assert not any(c.is_alive() for c in clients)

        # No request failed, every answer came from a demo origin, and both of them answered.
        for c in clients:
            assert c.failures == [], (c.name, len(c.failures), c.failures[:10])
            assert not c.ran_out, (c.name, c.sent)
            assert set(c.answered) == set(demo), (c.name, c.answered)
        # Each upgrade's draining workers told the keep-alive client to reconnect.
        assert clients[1].connections >= 3, clients[1].connections
        log = first.read_error_log()
        assert log.count("INFO demo origins on ") == 1, log
        assert (
            log.count(f"kept the demo origins on {', '.join(demo)} (pid {demo_proc.pid})") == 2
        ), log
        assert "demo origins exited" not in log, log

        # The last master's stop ends the demo origins and closes every port.
        out = subprocess.run(
            [sys.executable, "-m", "master", "stop", "-c", str(first.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=first.cwd,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for(lambda: gone(masters[-1]), timeout=STOP_SECONDS, what="the last master's exit")
        wait_for(lambda: gone(demo_proc), timeout=STOP_SECONDS, what="the demo origins' exit")
        for address in [listen, *demo]:
            wait_for(
                functools.partial(refuses, address),
                timeout=STOP_SECONDS,
                what=f"{address} to close",
            )
        assert not pid_file.exists()
        assert not (tmp_path / "ctl.sock").exists()
    finally:
        stop.set()
        for c in clients:
            if c.ident is not None:
                c.join(timeout=15)
        kill_all(masters, demo_proc)
