"""Benchmark: Tenaya against nginx as a reverse proxy, in the same run, on loopback.

Theory of operation. One nginx process serves as the origin: it answers every request with the
same fixed 100-byte body. Two proxies stand in front of it, each with the same worker count:
Tenaya (``python -m master start``) and nginx with upstream keep-alive. wrk then loads them in
turns, and the order flips every round (T N, N T, T N, ...) so that a slow drift of the shared,
noisy machine weighs on both alike. For every run we keep:

- requests/s of *successful* responses (wrk's count minus its non-2xx/3xx count), so a proxy
  that answers quickly with errors does not look fast;
- the p99 latency from ``wrk --latency``;
- socket errors and non-2xx responses (a run with any is flagged, and the exit status says so);
- the CPU seconds the proxy's own processes used during the run (user + system of the master and
  its workers, measured with psutil just before and just after wrk), hence requests per
  CPU-second, the figure DESIGN.md section 8 sets the goal on.

The table shows the median over rounds for each proxy and the Tenaya/nginx ratios. Every child
runs in its own process group and is stopped in a ``finally`` (also on Ctrl-C or SIGTERM); every
wait has a deadline; readiness is polled (a GET through the proxy must return the origin's body).

Usage: ``scripts/bench`` or ``python -m loadtests.bench --rounds 5 --duration 5 --case close``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

DESCRIPTION = "Benchmark Tenaya against nginx as a reverse proxy (requests/s, p99, req/CPU-s)."
LOOPBACK = "127.0.0.1"
#: The origin's answer to every request: exactly BODY_BYTES of plain ASCII (no quotes, since it
#: is written into nginx's config as a string literal).
BODY_BYTES = 100
BODY = ("tenaya-bench-origin-" + "0123456789" * 10)[:BODY_BYTES].encode("ascii")

CASE_KEEPALIVE = "keepalive"
CASE_CLOSE = "close"
#: Extra wrk arguments per case: ``close`` opens a new connection for every request.
CASE_WRK_ARGS: dict[str, list[str]] = {
    CASE_KEEPALIVE: [],
    CASE_CLOSE: ["-H", "Connection: close"],
}

DEFAULT_ROUNDS = 5
DEFAULT_DURATION_SECONDS = 5
DEFAULT_CONNECTIONS = 50
DEFAULT_THREADS = 1
DEFAULT_WORKERS = 1
#: Length of the uncounted run that warms each proxy (upstream pool, caches) before round 1.
DEFAULT_WARMUP_SECONDS = 1

#: Longest wait for a server to answer its first GET with the origin's body.
READY_TIMEOUT_SECONDS = 30.0
#: Pause between two readiness probes (this is a poll interval, not a wait for readiness).
READY_POLL_SECONDS = 0.05
#: Timeout of one readiness probe's connect and read.
PROBE_TIMEOUT_SECONDS = 1.0
#: How many fresh-connection GETs per worker must succeed before a proxy counts as ready, so
#: that every worker's SO_REUSEPORT socket has had a chance to be probed.
PROBES_PER_WORKER = 4
#: A wrk run longer than its duration plus this is killed and recorded as failed.
WRK_OVERRUN_SECONDS = 30.0
#: Tenaya's graceful-stop window; on stop we wait for it plus STOP_MARGIN_SECONDS, then SIGKILL.
TENAYA_GRACE_SECONDS = 5.0
STOP_MARGIN_SECONDS = 5.0
#: How much of wrk's output a failed run quotes.
WRK_ERROR_CHARS = 500
#: Lines of a server's log shown when it fails or complains.
LOG_TAIL_LINES = 20

#: nginx settings: the proxy keeps this many idle upstream connections per worker; both nginx
#: servers allow this many requests per connection (the default 1000 would add reconnects).
NGINX_UPSTREAM_KEEPALIVE = 64
NGINX_KEEPALIVE_REQUESTS = 1_000_000
#: Floor of nginx's worker_connections; raised with --connections (each proxied request holds a
#: downstream and an upstream connection).
NGINX_MIN_WORKER_CONNECTIONS = 4096
NGINX_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

#: Longest process title kept in a run's per-process CPU figures.
LABEL_CHARS = 40
#: CPU times are ticks of 10 ms; more digits would be noise.
CPU_DIGITS = 2
#: wrk prints times with these units.
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_RE_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.MULTILINE)
_RE_P99 = re.compile(r"^\s*99(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RE_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_RE_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")

EXIT_OK = 0
EXIT_RUN_ERRORS = 1
EXIT_SETUP_FAILED = 2


class BenchError(Exception):
    """The benchmark cannot go on (a tool is missing, a server did not start)."""


# --------------------------------------------------------------------------------------------
# Results


@dataclass(slots=True)
class WrkResult:
    """What one wrk run printed, parsed."""

    requests: int  #: responses wrk completed, whatever their status
    elapsed_seconds: float  #: the run's length as wrk measured it
    p99_ms: float | None  #: 99th percentile latency; None if wrk printed none
    socket_errors: dict[str, int]  #: connect / read / write / timeout counts
    non_2xx: int  #: responses with a status of 400 or more (wrk's "Non-2xx or 3xx")


@dataclass(slots=True)
class Run:
    """One counted run of wrk against one proxy."""

    proxy: str  #: "tenaya" or "nginx"
    round: int  #: 1-based round number
    ok_requests: int  #: responses below 400
    rps: float  #: ok_requests per second of the run
    p99_ms: float | None  #: wrk's 99th percentile latency
    cpu_seconds: float  #: user + system CPU of the proxy's processes during the run
    requests_per_cpu_second: float | None  #: ok_requests / cpu_seconds
    socket_errors: int  #: sum of wrk's socket error counts
    non_2xx: int  #: wrk's non-2xx/3xx count
    problems: list[str] = field(default_factory=list)  #: why the run is flagged; empty if clean
    cpu_by_process: dict[str, float] = field(default_factory=dict)  #: "PID TITLE" -> CPU seconds

    @property
    def flagged(self) -> bool:
        """True when the run had errors or the proxy's processes changed during it."""
        return bool(self.problems)


@dataclass(slots=True)
class Summary:
    """Medians over the rounds of one proxy."""

    proxy: str
    runs: int
    flagged_runs: int
    median_rps: float | None
    median_p99_ms: float | None
    median_requests_per_cpu_second: float | None
    total_socket_errors: int
    total_non_2xx: int


def parse_wrk(output: str) -> WrkResult:
    """Parse the text ``wrk --latency`` prints; raises ValueError if the totals are missing."""
    m = _RE_REQUESTS.search(output)
    if m is None:
        raise ValueError("no 'N requests in T' line in wrk's output")
    requests = int(m.group(1))
    elapsed = float(m.group(2)) * _TIME_UNITS[m.group(3)]
    p99 = _RE_P99.search(output)
    p99_ms = float(p99.group(1)) * _TIME_UNITS[p99.group(2)] * 1e3 if p99 else None
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    s = _RE_SOCKET_ERRORS.search(output)
    if s is not None:
        errors = dict(zip(errors, (int(g) for g in s.groups()), strict=True))
    n = _RE_NON_2XX.search(output)
    return WrkResult(requests, elapsed, p99_ms, errors, int(n.group(1)) if n else 0)


def _median(values: Sequence[float | None]) -> float | None:
    """Median of the values that are not None; None if there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(proxy: str, runs: Sequence[Run]) -> Summary:
    """Medians and error totals of one proxy's runs."""
    mine = [r for r in runs if r.proxy == proxy]
    return Summary(
        proxy=proxy,
        runs=len(mine),
        flagged_runs=sum(r.flagged for r in mine),
        median_rps=_median([r.rps for r in mine]),
        median_p99_ms=_median([r.p99_ms for r in mine]),
        median_requests_per_cpu_second=_median([r.requests_per_cpu_second for r in mine]),
        total_socket_errors=sum(r.socket_errors for r in mine),
        total_non_2xx=sum(r.non_2xx for r in mine),
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unknown or b is zero."""
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------------------------
# Processes


def free_ports(count: int) -> list[int]:
    """Ports on loopback that were free a moment ago, all different (held open together)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in socks]


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, or a note that it is missing."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path.name} missing)"


class Server:
    """A server started as its own process group, with its output in a log file.

    ``stop`` asks the leader to stop with ``stop_signal``, waits up to ``stop_timeout`` seconds,
    then SIGKILLs whatever of the group (and of the descendants seen so far) is left.
    """

    def __init__(
        self,
        name: str,
        cmd: list[str],
        log: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout: float = STOP_MARGIN_SECONDS,
    ) -> None:
        self.name = name
        self.log = log
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        self.root = psutil.Process(self.popen.pid)
        self._seen: dict[int, psutil.Process] = {self.root.pid: self.root}

    def processes(self) -> list[psutil.Process]:
        """The leader and its descendants alive now (they are remembered for ``stop``)."""
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self._seen.setdefault(p.pid, p)
        return procs

    def cpu_seconds(self) -> tuple[float, dict[int, float]]:
        """CPU seconds (user + system) the group has used so far, in total and per pid.

        The total includes the leader's ``children_*`` times: they hold the CPU of descendants
        it has reaped, so a worker that dies between two readings is still counted.
        """
        total = 0.0
        by_pid: dict[int, float] = {}
        for p in self.processes():
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            by_pid[p.pid] = t.user + t.system
            total += by_pid[p.pid]
            if p.pid == self.root.pid:
                total += t.children_user + t.children_system
        return total, by_pid

    def label(self, pid: int) -> str:
        """``PID TITLE`` of a process seen in the group (its title as ps shows it)."""
        try:
            # setproctitle pads the title with spaces; nginx's master shows its whole command.
            title = " ".join(" ".join(self._seen[pid].cmdline()).split())[:LABEL_CHARS]
        except (KeyError, psutil.Error):
            title = "?"
        return f"{pid} {title}"

    def exited(self) -> int | None:
        """The leader's exit status, or None while it runs."""
        return self.popen.poll()

    def stop(self) -> None:
        """Stop the server and every process it started; returns once they are gone."""
        self.processes()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(self.stop_timeout)
        if self.popen.poll() is None:
            # The leader still runs, so its group id cannot have been reused.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(self.stop_timeout)
        leftovers = [p for p in self._seen.values() if p.pid != self.root.pid and p.is_running()]
        for p in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(leftovers, timeout=self.stop_timeout)


def probe(port: int) -> bool:
    """True if a GET / on a fresh connection to the port answers 200 with the origin's body."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=PROBE_TIMEOUT_SECONDS)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        return response.status == http.client.OK and response.read() == BODY
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def wait_ready(server: Server, port: int, *, workers: int = 1, probes: int = 1) -> None:
    """Poll until the server has ``workers`` children and ``probes`` GETs in a row succeed.

    Raises BenchError, with the tail of the server's log, if the server exits or the deadline
    (READY_TIMEOUT_SECONDS) passes first.
    """
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    streak = 0
    while time.monotonic() < deadline:
        status = server.exited()
        if status is not None:
            raise BenchError(
                f"{server.name} exited with status {status} before it was ready:\n"
                f"{_tail(server.log)}"
            )
        if len(server.processes()) > workers and probe(port):
            streak += 1
            if streak >= probes:
                return
            continue
        streak = 0
        time.sleep(READY_POLL_SECONDS)
    raise BenchError(
        f"{server.name} not ready on port {port} after {READY_TIMEOUT_SECONDS}s:\n"
        f"{_tail(server.log)}"
    )


def _nginx_common(tmp: Path, name: str, workers: int, worker_connections: int) -> str:
    """The part of an nginx config both nginx servers share: process settings, temp paths."""
    temp = "\n".join(f"    {kind}_temp_path {tmp / name / kind};" for kind in NGINX_TEMP_DIRS)
    return (
        f"worker_processes {workers};\n"
        f"daemon off;\n"
        f"pid {tmp / name}.pid;\n"
        f"error_log {tmp / name}-error.log warn;\n"
        f"events {{ worker_connections {worker_connections}; }}\n"
        f"http {{\n"
        f"    access_log off;\n"
        f"    keepalive_requests {NGINX_KEEPALIVE_REQUESTS};\n"
        f"{temp}\n"
    )


def origin_config(tmp: Path, port: int) -> str:
    """nginx config of the origin: one worker answering every request with BODY."""
    return (
        _nginx_common(tmp, "origin", 1, NGINX_MIN_WORKER_CONNECTIONS)
        + f"    default_type text/plain;\n"
        f"    server {{\n"
        f"        listen {LOOPBACK}:{port};\n"
        f'        location / {{ return 200 "{BODY.decode("ascii")}"; }}\n'
        f"    }}\n"
        f"}}\n"
    )


def nginx_proxy_config(
    tmp: Path, port: int, origin_port: int, workers: int, connections: int
) -> str:
    """nginx config of the reverse proxy: ``workers`` workers, keep-alive to the origin."""
    worker_connections = max(NGINX_MIN_WORKER_CONNECTIONS, 4 * connections)
    return (
        _nginx_common(tmp, "nginx-proxy", workers, worker_connections) + f"    upstream o {{\n"
        f"        server {LOOPBACK}:{origin_port};\n"
        f"        keepalive {NGINX_UPSTREAM_KEEPALIVE};\n"
        f"        keepalive_requests {NGINX_KEEPALIVE_REQUESTS};\n"
        f"    }}\n"
        f"    server {{\n"
        f"        listen {LOOPBACK}:{port} reuseport;\n"
        f"        location / {{\n"
        f"            proxy_pass http://o;\n"
        f"            proxy_http_version 1.1;\n"
        f'            proxy_set_header Connection "";\n'
        f"        }}\n"
        f"    }}\n"
        f"}}\n"
    )


def tenaya_config(tmp: Path, port: int, origin_port: int, workers: int) -> dict[str, Any]:
    """Tenaya's config: the built-in load balancer with one upstream, access log off."""
    return {
        "server": {"workers": workers, "grace_period_seconds": TENAYA_GRACE_SECONDS},
        "listeners": [{"address": f"{LOOPBACK}:{port}"}],
        "upstreams": {"origin": {"servers": [f"{LOOPBACK}:{origin_port}"]}},
        "logging": {
            "access_log": "off",
            "level": "warning",
            "error_log": str(tmp / "tenaya-error.log"),
        },
    }


def start_nginx(
    nginx: str, tmp: Path, name: str, config: str, *, port: int, workers: int, probes: int
) -> Server:
    """Write the config, start nginx in the foreground and wait until it serves BODY."""
    for kind in NGINX_TEMP_DIRS:
        (tmp / name / kind).mkdir(parents=True, exist_ok=True)
    conf = tmp / f"{name}.conf"
    conf.write_text(config)
    # -e: nginx opens its error log before reading the config; keep even that one in tmp.
    cmd = [nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / f"{name}-error.log")]
    # SIGQUIT is nginx's graceful stop; it has nothing in flight when we stop it.
    server = Server(name, cmd, tmp / f"{name}.out", stop_signal=signal.SIGQUIT)
    wait_ready(server, port, workers=workers, probes=probes)
    return server


#: The repository this file is in: Tenaya's commands run from it (see ``tenaya_env``).
REPO_ROOT = Path(__file__).resolve().parent.parent


def tenaya_env() -> dict[str, str]:
    """The environment of a Tenaya command: this one with REPO_ROOT first on PYTHONPATH, so
    the code that runs is this checkout's even when the project is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def launch_tenaya(conf: Path, config: dict[str, Any], *, port: int, workers: int) -> Server:
    """Write ``config`` to ``conf``, start ``python -m master start -c conf`` from REPO_ROOT
    (its output in ``conf`` with the suffix ``.out``) and wait until it proxies BODY on
    ``port``; the server is named after the file's stem."""
    conf.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "master", "start", "-c", str(conf)]
    server = Server(
        conf.stem,
        cmd,
        conf.with_suffix(".out"),
        cwd=REPO_ROOT,
        env=tenaya_env(),
        stop_timeout=TENAYA_GRACE_SECONDS + STOP_MARGIN_SECONDS,
    )
    wait_ready(server, port, workers=workers, probes=PROBES_PER_WORKER * workers)
    return server


def start_tenaya(tmp: Path, *, port: int, origin_port: int, workers: int) -> Server:
    """Start ``python -m master start`` with a generated config; wait until it proxies BODY.

    It runs from the repository this file is in (also put on PYTHONPATH), so the code measured
    is this checkout's even when the project is not installed.
    """
    config = tenaya_config(tmp, port, origin_port, workers)
    return launch_tenaya(tmp / "tenaya.yaml", config, port=port, workers=workers)


# --------------------------------------------------------------------------------------------
# Runs


def run_wrk(
    wrk: str, port: int, *, case: str, threads: int, connections: int, duration: int
) -> tuple[WrkResult | None, str]:
    """Run wrk once against the port; returns the parsed result (None on failure) and a note."""
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        *CASE_WRK_ARGS[case],
        f"http://{LOOPBACK}:{port}/",
    ]
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=duration + WRK_OVERRUN_SECONDS,
        )
    except subprocess.TimeoutExpired:
        return None, f"wrk did not finish within {duration + WRK_OVERRUN_SECONDS:g}s"
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip())[-WRK_ERROR_CHARS:]
        return None, f"wrk exited with {done.returncode}: {said}"
    try:
        return parse_wrk(done.stdout), ""
    except ValueError as e:
        return None, f"{e}: {done.stdout.strip()[-WRK_ERROR_CHARS:]}"


def measure(
    proxy: str, server: Server, port: int, round_no: int, args: argparse.Namespace, wrk: str
) -> Run:
    """One counted run: wrk against the proxy with its CPU time read before and after."""
    cpu_before, by_pid_before = server.cpu_seconds()
    result, note = run_wrk(
        wrk,
        port,
        case=args.case,
        threads=args.threads,
        connections=args.connections,
        duration=args.duration,
    )
    cpu_after, by_pid_after = server.cpu_seconds()
    cpu = round(cpu_after - cpu_before, CPU_DIGITS)
    cpu_by_process = {
        server.label(pid): round(after - by_pid_before.get(pid, 0.0), CPU_DIGITS)
        for pid, after in sorted(by_pid_after.items())
    }
    problems = [note] if note else []
    if by_pid_after.keys() != by_pid_before.keys():
        problems.append(
            f"processes changed during the run: {sorted(by_pid_before)} -> {sorted(by_pid_after)}"
        )
    if server.exited() is not None:
        problems.append(f"{proxy} exited with status {server.exited()}")
    if result is None:
        return Run(proxy, round_no, 0, 0.0, None, cpu, None, 0, 0, problems, cpu_by_process)
    ok = result.requests - result.non_2xx
    socket_errors = sum(result.socket_errors.values())
    if socket_errors:
        problems.append(
            "socket errors " + ", ".join(f"{k} {v}" for k, v in result.socket_errors.items() if v)
        )
    if result.non_2xx:
        problems.append(f"{result.non_2xx} responses with status >= 400")
    return Run(
        proxy=proxy,
        round=round_no,
        ok_requests=ok,
        rps=ok / result.elapsed_seconds if result.elapsed_seconds else 0.0,
        p99_ms=result.p99_ms,
        cpu_seconds=cpu,
        requests_per_cpu_second=ok / cpu if cpu > 0 else None,
        socket_errors=socket_errors,
        non_2xx=result.non_2xx,
        problems=problems,
        cpu_by_process=cpu_by_process,
    )


def _fmt(value: float | None, spec: str) -> str:
    """Format a number, or '-' for None."""
    return "-" if value is None else format(value, spec)


def describe_run(run: Run) -> str:
    """One progress line for a run."""
    line = (
        f"round {run.round} {run.proxy:<6}  {run.rps:>9.0f} req/s  p99 "
        f"{_fmt(run.p99_ms, '.2f')} ms  cpu {run.cpu_seconds:.2f}s  "
        f"{_fmt(run.requests_per_cpu_second, '.0f')} req/CPU-s"
    )
    return line + (f"  FLAGGED: {'; '.join(run.problems)}" if run.problems else "")


def render_table(summaries: dict[str, Summary], header: str) -> str:
    """The human-readable result: one row per proxy, then the Tenaya/nginx ratios."""
    rows = [
        header,
        "",
        f"{'proxy':<8}{'req/s':>12}{'p99 ms':>10}{'req/CPU-s':>12}"
        f"{'sock err':>10}{'non-2xx':>9}{'flagged':>9}",
    ]
    for s in summaries.values():
        rows.append(
            f"{s.proxy:<8}{_fmt(s.median_rps, '.0f'):>12}"
            f"{_fmt(s.median_p99_ms, '.2f'):>10}"
            f"{_fmt(s.median_requests_per_cpu_second, '.0f'):>12}"
            f"{s.total_socket_errors:>10}{s.total_non_2xx:>9}"
            f"{s.flagged_runs:>6}/{s.runs}"
        )
    t, n = summaries["tenaya"], summaries["nginx"]
    rps = _ratio(t.median_rps, n.median_rps)
    per_cpu = _ratio(t.median_requests_per_cpu_second, n.median_requests_per_cpu_second)
    p99 = _ratio(t.median_p99_ms, n.median_p99_ms)
    rows += [
        "",
        f"tenaya/nginx (ratio of medians): req/s {_fmt(rps, '.2f')}, "
        f"req/CPU-s {_fmt(per_cpu, '.2f')}, p99 {_fmt(p99, '.2f')}",
    ]
    return "\n".join(rows)


def find_tool(name: str, given: str | None, extra_dirs: Sequence[str] = ()) -> str:
    """The path of a tool: as given, else on PATH, else in one of extra_dirs."""
    path = given or shutil.which(
        name, path=os.pathsep.join([os.environ.get("PATH", ""), *extra_dirs])
    )
    if not path:
        raise BenchError(f"{name} not found; install it (scripts/bench does, as root)")
    return path


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit so that the ``finally`` blocks stop the servers."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Start the origin and both proxies, run the rounds, stop everything; returns the report."""
    wrk = find_tool("wrk", args.wrk)
    nginx = find_tool("nginx", args.nginx, ["/usr/sbin", "/usr/local/sbin"])
    origin_port, tenaya_port, nginx_port = free_ports(3)
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tenaya-bench-")))
        origin = start_nginx(
            nginx,
            tmp,
            "origin",
            origin_config(tmp, origin_port),
            port=origin_port,
            workers=1,
            probes=1,
        )
        stack.callback(origin.stop)
        tenaya = start_tenaya(tmp, port=tenaya_port, origin_port=origin_port, workers=args.workers)
        stack.callback(tenaya.stop)
        proxy = start_nginx(
            nginx,
            tmp,
            "nginx-proxy",
            nginx_proxy_config(tmp, nginx_port, origin_port, args.workers, args.connections),
            port=nginx_port,
            workers=args.workers,
            probes=PROBES_PER_WORKER * args.workers,
        )
        stack.callback(proxy.stop)
        targets = {"tenaya": (tenaya, tenaya_port), "nginx": (proxy, nginx_port)}

        if args.warmup > 0:
            for name, (_, port) in targets.items():
                result, note = run_wrk(
                    wrk,
                    port,
                    case=args.case,
                    threads=args.threads,
                    connections=args.connections,
                    duration=args.warmup,
                )
                if result is None:
                    print(f"warm-up of {name} failed: {note}", file=sys.stderr)
        order = list(targets)
        for round_no in range(1, args.rounds + 1):
            for name in order if round_no % 2 else reversed(order):
                server, port = targets[name]
                run = measure(name, server, port, round_no, args, wrk)
                runs.append(run)
                print(describe_run(run), file=sys.stderr, flush=True)
        tenaya_log = "\n".join(
            _tail(log)
            for log in (tmp / "tenaya-error.log", tenaya.log)
            if log.is_file() and log.stat().st_size
        )
        tenaya_alive = tenaya.exited() is None
    summaries = {name: summarize(name, runs) for name in ("tenaya", "nginx")}
    return {
        "case": args.case,
        "workers": args.workers,
        "rounds": args.rounds,
        "duration_seconds": args.duration,
        "connections": args.connections,
        "threads": args.threads,
        "body_bytes": BODY_BYTES,
        "runs": [asdict(r) | {"flagged": r.flagged} for r in runs],
        "summary": {name: asdict(s) for name, s in summaries.items()},
        "ratios_tenaya_over_nginx": {
            "rps": _ratio(summaries["tenaya"].median_rps, summaries["nginx"].median_rps),
            "requests_per_cpu_second": _ratio(
                summaries["tenaya"].median_requests_per_cpu_second,
                summaries["nginx"].median_requests_per_cpu_second,
            ),
            "p99": _ratio(summaries["tenaya"].median_p99_ms, summaries["nginx"].median_p99_ms),
        },
        "tenaya_alive_at_end": tenaya_alive,
        "tenaya_log_tail": tenaya_log,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; every figure of a run can be set."""
    p = argparse.ArgumentParser(prog="scripts/bench", description=DESCRIPTION)
    p.add_argument(
        "--case",
        choices=sorted(CASE_WRK_ARGS),
        default=CASE_KEEPALIVE,
        help="keepalive: reuse connections; close: a new connection per request",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="worker processes of each proxy (default %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help="counted runs per proxy (default %(default)s)",
    )
    p.add_argument(
        "--duration",
        type=int,
        default=DEFAULT_DURATION_SECONDS,
        help="whole seconds per run, as wrk takes them (default %(default)s)",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=DEFAULT_CONNECTIONS,
        help="wrk connections (default %(default)s)",
    )
    p.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help="wrk threads (default %(default)s)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP_SECONDS,
        help="whole seconds of uncounted load per proxy before round 1 (0: none)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--wrk", help="path of wrk (default: found on PATH)")
    p.add_argument("--nginx", help="path of nginx (default: found on PATH or in /usr/sbin)")
    args = p.parse_args(argv)
    for name in ("workers", "rounds", "connections", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.duration < 1 or args.warmup < 0:
        p.error("--duration must be at least 1 and --warmup at least 0")
    if args.threads > args.connections:
        p.error("--threads cannot exceed --connections (wrk needs a connection per thread)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table (or JSON); exit 1 if any run was flagged."""
    args = parse_args(argv)
    try:
        with _terminate_on_sigterm():
            report = bench(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return EXIT_SETUP_FAILED
    flagged = sum(r["flagged"] for r in report["runs"])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        header = (
            f"case {args.case}, {args.workers} worker(s) per proxy, {args.rounds} rounds "
            f"x {args.duration}s, wrk -t{args.threads} -c{args.connections}, "
            f"{BODY_BYTES}-byte body; medians over rounds"
        )
        summaries = {k: Summary(**v) for k, v in report["summary"].items()}
        print(render_table(summaries, header))
    if report["tenaya_log_tail"].strip():
        print(f"tenaya's log (tail):\n{report['tenaya_log_tail']}", file=sys.stderr)
    if not report["tenaya_alive_at_end"]:
        print("bench: tenaya's master exited during the benchmark", file=sys.stderr)
    if flagged:
        print(
            f"bench: {flagged} run(s) flagged (errors or process changes); see above",
            file=sys.stderr,
        )
        return EXIT_RUN_ERRORS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
