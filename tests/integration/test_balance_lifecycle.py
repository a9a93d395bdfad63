"""Fleet-wide round robin across a binary upgrade and in the README's quick start (issue 12).

A SIGUSR2 upgrade hands the old fleet's turns to the new master (``Handover.balance_turns``),
whose first balance table goes on from there. The quick start runs ``python -m master start``
with no config, as a new user does: two workers, two demo origins on fixed ports. So that those
ports and the embedded config's ``/tmp`` files belong to this test alone, it runs in private
network and mount namespaces (``unshare -rnm``, with a fresh ``/tmp``), and the client is curl,
each call a new connection, as in the README.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.conftest import Fleet
from tests.support.client import get
from tests.support.config import config_for
from tests.support.origin import Origin
from tests.support.waits import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
#: Longest wait for a new master to serve, or for an old one to exit.
UPGRADE_SECONDS = 30.0


def served_by(origins: list[Origin], target: str) -> int:
    got = [i for i, o in enumerate(origins) if target in o.paths()]
    assert len(got) == 1, f"{target} reached origins {got}"
    return got[0]


def read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def test_an_upgrade_keeps_the_rotation_going(fleet: Fleet, tmp_path: Path) -> None:
    origins = [fleet.origin(name=f"o{i}") for i in range(3)]
    pid_file = tmp_path / "tenaya.pid"
    config = config_for(
        {"web": [o.address for o in origins]},
        server={
            "workers": 4,
            "pid_file": str(pid_file),
            "control_socket": str(tmp_path / "ctl.sock"),
        },
    )
    m = fleet.master(config)
    # The upgraded master must bind the same port: the listener's address is fixed now.
    seen = []
    for i in range(4):
        assert get(m.port, f"/u/{i}").status == 200
        seen.append(served_by(origins, f"/u/{i}"))
    assert seen == [0, 1, 2, 0]
    old = psutil.Process(m.pid)
    new_pid = 0
    try:
        old.send_signal(signal.SIGUSR2)
        new_pid = wait_for(
            lambda: (p := read_pid(pid_file)) != old.pid and p,
            timeout=UPGRADE_SECONDS,
            what="the new master's pid",
        )
        wait_for(
            lambda: not old.is_running() or old.status() == psutil.STATUS_ZOMBIE,
            timeout=UPGRADE_SECONDS,
            what="the old master's exit",
        )
        for i in range(3):
            assert get(m.port, f"/u/after/{i}").status == 200
            seen.append(served_by(origins, f"/u/after/{i}"))
        assert seen[4:] == [1, 2, 0], seen
    finally:
        if new_pid:
            new = psutil.Process(new_pid)
            new.send_signal(signal.SIGTERM)
            try:
                new.wait(timeout=20)
            except psutil.TimeoutExpired:
                for child in new.children():
                    child.kill()
                new.kill()


#: Runs inside the namespaces: the quick start's master, then curl 10 times, then a stop.
QUICK_START = textwrap.dedent(
    """
    import subprocess, sys, time, socket, os
    master = subprocess.Popen([sys.executable, "-m", "master", "start"],
                              stdout=subprocess.DEVNULL, stderr=open("/tmp/master.log", "wb"))
    deadline = time.monotonic() + 60
    while not os.path.exists("/tmp/tenaya-6188.pid"):
        if time.monotonic() > deadline or master.poll() is not None:
            sys.exit("the master did not start: " + open("/tmp/master.log").read())
        time.sleep(0.05)
    try:
        for _ in range(10):
            out = subprocess.run(["curl", "-s", "127.0.0.1:6188/"], capture_output=True,
                                 text=True, timeout=10)
            print(out.stdout.splitlines()[0] if out.stdout else "curl: " + out.stderr)
    finally:
        master.send_signal(15)
        master.wait(30)
    """
)


@pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("curl") is None or shutil.which("ip") is None,
    reason="needs unshare, ip and curl",
)
def test_quick_start_curls_alternate() -> None:
    """The README's quick start, every time: consecutive curls reach alternating demo
    origins, whichever of the two workers takes each connection."""
    script = f"{sys.executable} -c {_quote(QUICK_START)}"
    out = subprocess.run(
        [
            "unshare",
            "-rnm",
            "sh",
            "-c",
            f"mount -t tmpfs tmpfs /tmp && ip link set lo up && {script}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    a = "Hello from Tenaya demo origin 127.0.0.1:6190"
    b = "Hello from Tenaya demo origin 127.0.0.1:6191"
    assert lines == [a, b] * 5, out.stdout


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
