"""Steady load through a real master while it reloads or upgrades; counts every loss.

Run inside a private network namespace so the kernel counters are this run's alone::

    unshare -rn python tests/soak.py --action reload --count 20 --mode keepalive

It brings up loopback, starts the demo origin and a master (2 workers), runs wrk against the
master, performs ``--count`` reloads (SIGHUP, each awaited until its generation serves) or
upgrades (SIGUSR2, each awaited until the new master has taken over), worker count changes
(``resize``: SIGTTIN and SIGTTOU in turn), or kills every worker with
SIGKILL (``kill-workers``: the negative control, which must show losses), then prints one JSON
object: wrk's requests and errors, the namespace's TCP reset and listen-drop counters, and
(``diagnostic``, no loss by themselves) what tells a reset's cause: sockets closed with bytes
unread, or that got bytes after their close (TcpExtTCPAbortOnClose, TcpExtTCPAbortOnData: the
proxy's or the origin's doing), and stale segments: one that reached a TIME_WAIT socket
(TcpExtPAWSTimewait) and retransmissions (TcpRetransSegs, on loopback a timer that fired before
the peer's ACK was seen). On a busy machine the loopback can deliver a client's ACK after its
own FIN, or a closing socket's timer can send its FIN again after the client's last ACK: the
side still there answers, and the side already closed resets. A kernel matter, after both ends
closed: no request lost, and no established connection reset (TcpEstabResets stays 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.support

from tests.support.config import config_for  # noqa: E402
from tests.support.master import Master  # noqa: E402
from tests.support.resources import free_port  # noqa: E402
from tests.support.waits import wait_for  # noqa: E402

COUNTERS = ("TcpOutRsts", "TcpExtListenDrops", "TcpExtListenOverflows", "TcpEstabResets")
DIAGNOSTIC = (
    "TcpExtTCPAbortOnClose",
    "TcpExtTCPAbortOnData",
    "TcpExtPAWSTimewait",
    "TcpRetransSegs",
)
#: Longest wait for one reload or upgrade to complete.
STEP_SECONDS = 30.0
#: Load after the last step, before the counters are read.
SETTLE_SECONDS = 1.0


def nstat() -> dict[str, int]:
    names = (*COUNTERS, *DIAGNOSTIC)
    out = subprocess.run(
        ["nstat", "-az", *names], capture_output=True, text=True, check=True
    ).stdout
    values = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in names:
            values[parts[0]] = int(parts[1])
    return values


def parse_wrk(out: str) -> dict[str, int]:
    m = re.search(r"(\d+) requests in", out)
    result = {
        "requests": int(m.group(1)) if m else 0,
        "connect": 0,
        "read": 0,
        "write": 0,
        "timeout": 0,
        "non2xx": 0,
    }
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        for key, value in zip(("connect", "read", "write", "timeout"), m.groups(), strict=True):
            result[key] = int(value)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        result["non2xx"] = int(m.group(1))
    return result


def master_pid(pid_file: Path) -> int:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return 0


def new_master_pid(pid_file: Path, old: int) -> int:
    """The pid in ``pid_file`` once it is another than ``old``; 0 until then."""
    pid = master_pid(pid_file)
    return pid if pid != old else 0


def serves(master: Master, generation: int) -> bool:
    """True once ``master`` logged that its ``generation`` serves."""
    return f"generation {generation} serving" in master.read_error_log()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--action", choices=("reload", "upgrade", "resize", "kill-workers", "none"), required=True
    )
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--mode", choices=("keepalive", "close"), default="keepalive")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument(
        "--duration",
        type=int,
        default=60,
        help="longest run of wrk, in seconds; it is stopped after the steps",
    )
    args = parser.parse_args()

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    work = Path(tempfile.mkdtemp(prefix="tenaya-soak-"))
    # The built-in demo origin: a separate process, fast enough not to be the bottleneck.
    origin_address = f"127.0.0.1:{free_port()}"
    origin = subprocess.Popen(
        [sys.executable, "-m", "master.demo", origin_address],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert origin.stdout is not None and origin.stdout.readline().strip() == b"ready"
    pid_file = work / "tenaya.pid"
    master = Master(
        work / "master",
        config_for(
            {"origin": [origin_address]},
            server={"workers": 2, "grace_period_seconds": 10, "pid_file": str(pid_file)},
            logging={"access_log": "off"},
        ),
    )
    wrk: subprocess.Popen[str] | None = None
    result: dict[str, object] = {"action": args.action, "mode": args.mode, "done": 0}
    try:
        master.start()
        before = nstat()
        cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--timeout", "5s"]
        if args.mode == "close":
            cmd += ["-H", "Connection: close"]
        wrk = subprocess.Popen(
            [*cmd, f"{master.url}/"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        time.sleep(1.0)  # let the load reach a steady state before the first step
        pid = master.pid
        for i in range(args.count):
            if wrk.poll() is not None:
                break
            if args.action == "reload":
                os.kill(pid, signal.SIGHUP)
                wait_for(partial(serves, master, i + 2), timeout=STEP_SECONDS)
            elif args.action == "upgrade":
                old = pid
                os.kill(old, signal.SIGUSR2)
                pid = wait_for(partial(new_master_pid, pid_file, old), timeout=STEP_SECONDS)
                wait_for(partial(_gone, old), timeout=STEP_SECONDS)
            elif args.action == "resize":
                # One worker more, then one fewer, and so on.
                os.kill(pid, signal.SIGTTIN if i % 2 == 0 else signal.SIGTTOU)
                wait_for(partial(serves, master, i + 2), timeout=STEP_SECONDS)
            elif args.action == "kill-workers":
                for w in master.workers():
                    w.kill()
                time.sleep(0.5)
            result["done"] = i + 1
        # Counters are read while the load still runs: the end of wrk itself resets the
        # connections it has in flight, which is no loss of the proxy's.
        time.sleep(SETTLE_SECONDS)
        after = nstat()
        result["load_running_at_end"] = wrk.poll() is None
        wrk.send_signal(signal.SIGINT)
        out, _ = wrk.communicate(timeout=30)
        result["wrk"] = parse_wrk(out)
        result["counters"] = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}
        result["diagnostic"] = {k: after.get(k, 0) - before.get(k, 0) for k in DIAGNOSTIC}
        result["final_pid"] = master_pid(pid_file)
    finally:
        if wrk is not None and wrk.poll() is None:
            wrk.kill()
        final = master_pid(pid_file)
        if final and final != master.pid and _alive(final):
            os.kill(final, signal.SIGTERM)
            wait_for(lambda: not _alive(final), timeout=30)
        master.stop()
        origin.terminate()
        origin.wait(10)
    print(json.dumps(result))
    return 0


def _gone(pid: int) -> bool:
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
