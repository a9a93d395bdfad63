"""``python -m master``: start, check, and the commands that talk to a running master."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from master import control
from master.arbiter import POOL_COUNTERS, Arbiter
from master.listeners import ListenError
from master.notify import READY_FD_ENV, report_start
from master.upgrade import StartError
from shared.config import Config, ConfigError, from_mapping, load, reference
from shared.paths import child_env, python_command

#: Signal sent for each command when the master has no control socket.
_COMMAND_SIGNALS = {
    "stop": signal.SIGTERM,
    "reload": signal.SIGHUP,
    "upgrade": signal.SIGUSR2,
    "reopen": signal.SIGUSR1,
}


def _load_with_overrides(args: argparse.Namespace) -> Config:
    config = load(args.config)
    raw = dict(config.raw)
    if getattr(args, "app", None):
        raw["app"] = args.app
    if getattr(args, "workers", None) is not None:
        raw["server"] = {**(raw.get("server") or {}), "workers": args.workers}
    return from_mapping(raw, config.source)


def _print_invalid(e: ConfigError) -> None:
    """``tenaya: invalid config: FILE: key: reason``, or with several mistakes a count and
    one line each."""
    if len(e.errors) == 1:
        print(f"tenaya: invalid config: {e}", file=sys.stderr)
    else:
        print(f"tenaya: invalid config ({len(e.errors)} errors):\n{e}", file=sys.stderr)


def _setup_master_log(level: str, target: str) -> None:
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr)
        if target == "stderr"
        else logging.StreamHandler(sys.stdout)
        if target == "stdout"
        else logging.FileHandler(target)
    )
    handler.setFormatter(
        logging.Formatter("%(asctime)s [master %(process)d] %(levelname)s %(message)s")
    )
    root = logging.getLogger("tenaya")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def cmd_start(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        config = _load_with_overrides(args)
    except ConfigError as e:
        _print_invalid(e)
        return 1
    if args.daemon:
        return _daemonize(argv)
    _setup_master_log(config.logging.level, config.logging.error_log)
    arbiter = Arbiter(config, reload_config=lambda: _load_with_overrides(args), argv=argv)
    try:
        arbiter.start()
    except (StartError, ListenError) as e:
        report_start(False, str(e))
        logging.getLogger("tenaya").error("cannot start: %s", e)
        arbiter.abandon_start()
        return 1
    return arbiter.run()


def _daemonize(argv: list[str]) -> int:
    """``start --daemon``: starts the master in its own session and returns once it serves
    (exit 0), or once it failed (exit 1, with the reason). The daemon's standard streams go
    to /dev/null: give ``logging.error_log`` and ``logging.access_log`` files."""
    child_argv = [a for a in argv if a not in ("-d", "--daemon")]
    read_fd, write_fd = os.pipe()
    env = child_env()
    env[READY_FD_ENV] = str(write_fd)
    with open(os.devnull, "r+b") as devnull:
        proc = subprocess.Popen(
            python_command("master", *child_argv),
            env=env,
            pass_fds=[write_fd],
            stdin=devnull,
            stdout=devnull,
            stderr=devnull,
            start_new_session=True,
        )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if line == "ready":
        print(f"tenaya: serving (master pid {proc.pid})")
        return 0
    code = proc.wait()
    print(f"tenaya: did not start ({line or f'exit {code}'})", file=sys.stderr)
    return 1


def cmd_check(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        config = _load_with_overrides(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    # The app is imported in a separate process: the master never runs app code.
    cmd = python_command("worker", "--check")
    if args.config:
        cmd += ["-c", args.config]
    if config.app:
        cmd += ["--app", config.app]
    result = subprocess.run(cmd, env=child_env(), stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        return 1
    print("ok")
    return 0


def cmd_config_reference(args: argparse.Namespace, argv: list[str]) -> int:
    sys.stdout.write(reference())
    return 0


#: Most characters of a pid file's content quoted when it does not hold a pid.
_PID_FILE_QUOTE = 40


def _master_pid(config: Config) -> int:
    """The pid of the running master, from the pid file. Raises :class:`LookupError` with a
    sentence for the user when there is none (no pid file, one naming no live process, or
    one that cannot be read)."""
    path = config.server.pid_file
    if not path:
        if config.server.control_socket:
            raise LookupError(
                f"no master is running: {config.server.control_socket} does not exist"
            )
        raise LookupError(
            f"{config.source}: neither server.control_socket nor "
            "server.pid_file is set, so the master cannot be found"
        )
    try:
        with open(path) as f:
            content = f.read().strip()
    except FileNotFoundError:
        raise LookupError(f"no master is running: {path} does not exist") from None
    except OSError as e:
        raise LookupError(
            f"cannot read the pid file {path}: {(e.strerror or str(e)).lower()}"
        ) from None
    # Only a positive number names one process: 0 and negative pids name process groups.
    if not (content.isascii() and content.isdigit() and int(content) > 0):
        shown = content if len(content) <= _PID_FILE_QUOTE else content[:_PID_FILE_QUOTE] + "..."
        found = f"it holds {shown!r}" if content else "it is empty"
        raise LookupError(
            f"no master found: the pid file {path} does not hold a process id ({found})"
        )
    pid = int(content)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise LookupError(
            f"no master is running: the pid file {path} names process {pid}, which is not running"
        ) from None
    except PermissionError:
        raise LookupError(
            f"the pid file {path} names process {pid}, which belongs to another "
            "user: run this command as that user"
        ) from None
    if not _is_master(pid):
        # A stale pid file whose pid the system gave to another process: never signal it.
        raise LookupError(
            f"no master is running: the pid file {path} names process {pid}, "
            "which is not a Tenaya master"
        )
    return pid


def _is_master(pid: int) -> bool:
    """True unless process ``pid`` is known to be something else than a master (by its title,
    or its command line before the title is set)."""
    import psutil

    try:
        cmd = " ".join(psutil.Process(pid).cmdline())
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False
    return cmd.startswith("tenaya master") or " -m master " in f"{cmd} "


def cmd_control(args: argparse.Namespace, argv: list[str]) -> int:
    """stop / reload / upgrade / reopen / status."""
    try:
        config = load(args.config)
    except ConfigError as e:
        _print_invalid(e)
        return 1
    command = args.command
    path = config.server.control_socket
    if path and os.path.exists(path):
        try:
            reply = control.request(path, command)
        except (ConnectionRefusedError, FileNotFoundError):
            # The socket file outlived its master (killed, or stopped before it could clean
            # up); FileNotFoundError when it went away between the check and the connect.
            print(f"tenaya: no master is running: nothing listens on {path}", file=sys.stderr)
            return 1
        except PermissionError:
            print(
                f"tenaya: {path} belongs to another user: run this command as that user",
                file=sys.stderr,
            )
            return 1
        except TimeoutError:
            print(f"tenaya: the master on {path} did not answer", file=sys.stderr)
            return 1
        except OSError as e:
            print(
                f"tenaya: cannot reach the master on {path}: {(e.strerror or str(e)).lower()}",
                file=sys.stderr,
            )
            return 1
        if not reply.ok:
            print(f"tenaya: {reply.error}", file=sys.stderr)
            return 1
        if command == "status":
            _print_status(reply.data, args.json)
        else:
            print(f"{command}: sent")
        return 0
    try:
        pid = _master_pid(config)
    except LookupError as e:
        print(f"tenaya: {e}", file=sys.stderr)
        return 1
    try:
        if command == "status":
            _print_status(_status_from_pid(pid), args.json)
            return 0
        os.kill(pid, _COMMAND_SIGNALS[command])
    except ProcessLookupError:
        # The master exited between the pid file check and now.
        print(f"tenaya: no master is running: process {pid} has just exited", file=sys.stderr)
        return 1
    print(f"{command}: sent {signal.Signals(_COMMAND_SIGNALS[command]).name} to {pid}")
    return 0


def _status_from_pid(pid: int) -> dict[str, object]:
    """What psutil can tell without the control socket (no request or pool counters).
    Raises :class:`ProcessLookupError` when the master has exited."""
    import psutil

    try:
        master = psutil.Process(pid)
        started = master.create_time()
        children = master.children()
    except psutil.NoSuchProcess:
        raise ProcessLookupError(pid) from None
    workers = []
    for child in children:
        try:
            title = " ".join(child.cmdline())
            if not title.startswith("tenaya worker"):
                continue
            t = child.cpu_times()
            workers.append(
                {
                    "pid": child.pid,
                    "slot": title.split()[2] if len(title.split()) > 2 else "?",
                    "age_seconds": round(time.time() - child.create_time(), 1),
                    "rss_bytes": child.memory_info().rss,
                    "cpu_seconds": round(t.user + t.system, 2),
                }
            )
        except psutil.Error:
            continue
    return {"pid": pid, "uptime_seconds": round(time.time() - started, 1), "workers": workers}


def _print_status(data: dict[str, Any], as_json: bool) -> None:
    """Prints ``status``: the JSON as the master sent it, or a few aligned lines (the master,
    its workers, their upstream pool figures, the pool totals and the broker)."""
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    print(
        f"master {data['pid']}  up {data['uptime_seconds']}s  "
        f"state {data.get('state', '?')}  generation {data.get('generation', '?')}"
    )
    if data.get("listeners"):
        print("listening on " + ", ".join(data["listeners"]))
    print(
        f"{'pid':>8} {'slot':>4} {'gen':>4} {'age s':>8} {'rss MiB':>8} {'cpu s':>8} "
        f"{'conns':>6} {'requests':>9}  state"
    )
    workers: list[dict[str, Any]] = data.get("workers", [])
    for w in workers:
        state = (
            "draining"
            if w.get("draining")
            else "starting"
            if not w.get("ready", True)
            else "paused (max_connections)"
            if w.get("accept_paused")
            else "ready"
        )
        print(
            f"{w['pid']:>8} {w['slot']:>4} {w.get('generation', '-'):>4} "
            f"{w['age_seconds']:>8} {w['rss_bytes'] / 2**20:>8.1f} {w['cpu_seconds']:>8} "
            f"{w.get('connections', '-'):>6} {w.get('requests', '-'):>9}  {state}"
        )
    totals = data.get("pool")
    if totals is None:
        # From the pid file alone (no control socket): psutil knows no counters.
        print("pool: no figures without the control socket (server.control_socket)")
        return
    print(
        f"{'pid':>8} {'upstream':>9} {'reused':>7} {'reuse %':>8} {'local':>6} "
        f"{'borrowed':>9} {'new conns':>10} {'donated':>8}"
    )
    for w in workers:
        pool = w.get("pool") or {}
        if not pool:  # no heartbeat yet
            print(f"{w['pid']:>8} {'-':>9} {'-':>7} {'-':>8} {'-':>6} {'-':>9} {'-':>10} {'-':>8}")
            continue
        reused = pool["reused_local"] + pool["reused_shared"]
        print(
            f"{w['pid']:>8} {pool['upstream_requests']:>9} {reused:>7} "
            f"{_percent(reused, pool['upstream_requests']):>8} {pool['reused_local']:>6} "
            f"{pool['reused_shared']:>9} {pool['connections_created']:>10} "
            f"{pool['donated']:>8}"
        )
    print(_pool_line(totals, workers))
    print(_broker_line(data.get("broker")))


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _pool_line(totals: dict[str, Any], workers: list[dict[str, Any]]) -> str:
    """``pool: ...``: the JSON's ``pool`` in words: requests sent upstream, how many went on
    a reused connection (from the worker's own pool or borrowed from the broker), connections
    opened, and connections given to the broker, over every worker since the master started
    (said when that includes workers that have exited)."""
    requests = totals["upstream_requests"]
    local, shared = totals["reused_local"], totals["reused_shared"]
    ratio = f"{100 * totals['reuse_ratio']:.1f}%" if requests else "-"
    line = (
        f"pool: {_plural(requests, 'upstream request', 'upstream requests')}, "
        f"{local + shared} reused ({ratio}: {local} local, {shared} from the broker), "
        f"{_plural(totals['connections_created'], 'new connection', 'new connections')}, "
        f"{totals['donated']} donated to the broker"
    )
    # The totals keep the figures of workers that have exited (reloads, respawns).
    live = {
        name: sum((w.get("pool") or {}).get(name, 0) for w in workers) for name in POOL_COUNTERS
    }
    if any(live[name] != totals[name] for name in POOL_COUNTERS):
        line += "; exited workers included"
    return line


def _broker_line(broker: dict[str, int] | None) -> str:
    """``broker: ...``: the idle connections the master holds for all workers now; those
    workers gave it (received) and it handed back (lent); borrows it had nothing for
    (missed); and those it closed instead (dropped: dead, idle too long, or no room)."""
    if broker is None:
        return "broker: off (pool.shared is false)"
    return (
        f"broker: {broker['idle']} idle, {broker['donated']} received, {broker['lent']} "
        f"lent, {_plural(broker['misses'], 'borrow', 'borrows')} missed, "
        f"{broker['dropped']} dropped"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m master", description="Tenaya: a programmable HTTP proxy (master process)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    start = sub.add_parser("start", help="start serving (foreground)")
    start.add_argument(
        "-c",
        "--config",
        help="YAML config file (default: the embedded "
        "demo config: a load balancer on 127.0.0.1:6188)",
    )
    start.add_argument("--app", help="the app as MODULE:ATTRIBUTE (overrides app:)")
    start.add_argument("--workers", type=int, help="worker processes (overrides server.workers)")
    start.add_argument(
        "-d",
        "--daemon",
        action="store_true",
        help="run in the background; return once serving (exit 0) or failed",
    )
    start.set_defaults(func=cmd_start)

    check = sub.add_parser("check", help="validate a config and import its app")
    check.add_argument("-c", "--config", required=True)
    check.add_argument("--app")
    check.set_defaults(func=cmd_check)

    helps = {
        "stop": "graceful stop (SIGTERM)",
        "reload": "re-read the config, new workers (SIGHUP)",
        "upgrade": "start a new master from the code on disk (SIGUSR2)",
        "reopen": "reopen log files (SIGUSR1)",
        "status": "the master's and workers' numbers",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "-c",
            "--config",
            help="the config the master runs (to find its "
            "control socket or pid file; default: the embedded config)",
        )
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=cmd_control, json=False)

    ref = sub.add_parser("config-reference", help="print every setting as a Markdown table")
    ref.set_defaults(func=cmd_config_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return int(args.func(args, argv))
