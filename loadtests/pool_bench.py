"""Benchmark: how many upstream connections Tenaya's pool opens, shared between workers or not.

Theory of operation. One nginx process is the origin: it listens on ``--origins`` ports of
loopback (one ``server`` block with a ``listen`` line per port), answers every request with the
same fixed body (``loadtests.bench.BODY``), keeps upstream connections alive for a long time, and
writes an access log line ``$msec $server_port $connection $connection_requests`` per request.
A line whose ``$connection_requests`` is 1 is the first request of a connection, so counting
those lines between two offsets of the log counts *exactly* the connections the proxy opened to
the origin in that window, whatever the proxy says about itself (``$msec`` tells how many of
them came in the later half of the window: cold start, or churn that goes on). The proxies'
readiness probes (a GET without a Host of ours, which both route to o0) come before the window.

Scenario A, "sparse": a paced client sends ``--rate`` requests per second for ``--duration``
seconds, each to an origin drawn uniformly at random (the same seeded sequence for every proxy)
and each on a new client connection (``Host: o<i>``, ``Connection: close``), so the kernel
spreads them over the proxy's workers (SO_REUSEPORT) and every worker sees every origin only
now and then. It runs against three proxies, each started fresh with ``--workers`` workers:
Tenaya with ``pool.shared: true``, Tenaya with ``pool.shared: false``, and nginx as a reverse
proxy with ``upstream o<i> { keepalive 16; }`` per origin, routed by Host with a ``map``. The
goals: shared Tenaya opens at most a third of the connections of unshared Tenaya, and fewer
than nginx.

Scenario B, "steady": wrk keeps ``--steady-connections`` keep-alive connections busy for
``--steady-warmup`` + ``--steady-duration`` seconds against shared Tenaya, its Lua script
rotating the Host header over o0..o<n-1>. The reuse ratio is
``1 - new connections at the origin / requests at the origin``, over the whole run and over the
window after the warm-up (the goal, at least 99.9 %, is on the latter); Tenaya's own
``reuse_ratio`` from ``python -m master status --json`` is shown beside it.

Every response's status is checked (the sparse client reads and compares every body; wrk
counts statuses of 400 and more and socket errors): a failure is reported and makes the exit
status 1. Tenaya's pool counters are read from its control socket just before and just after a
run (after a pause longer than the workers' heartbeat), and their differences reported. Every
server runs in its own process group and is stopped in a ``finally``; every loop is bounded in
count and time.

Usage: ``scripts/bench pool`` or ``python -m loadtests.pool_bench --rate 200 --duration 20``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtests.bench import (
    BODY,
    EXIT_OK,
    EXIT_RUN_ERRORS,
    EXIT_SETUP_FAILED,
    LOOPBACK,
    NGINX_KEEPALIVE_REQUESTS,
    NGINX_MIN_WORKER_CONNECTIONS,
    PROBES_PER_WORKER,
    REPO_ROOT,
    TENAYA_GRACE_SECONDS,
    WRK_ERROR_CHARS,
    WRK_OVERRUN_SECONDS,
    BenchError,
    Server,
    _nginx_common,
    _tail,
    _terminate_on_sigterm,
    find_tool,
    free_ports,
    launch_tenaya,
    parse_wrk,
    start_nginx,
    tenaya_env,
)

DESCRIPTION = (
    "Count the upstream connections Tenaya opens with its pool shared between workers or not, "
    "against nginx with upstream keep-alive (sparse traffic), and its reuse ratio (steady load)."
)

SCENARIO_SPARSE = "sparse"
SCENARIO_STEADY = "steady"
SCENARIO_ALL = "all"

PROXY_SHARED = "tenaya-shared"
PROXY_UNSHARED = "tenaya-unshared"
PROXY_NGINX = "nginx"
#: The sparse scenario's proxies, in the order of odd rounds (even rounds go backwards).
SPARSE_PROXIES = (PROXY_SHARED, PROXY_UNSHARED, PROXY_NGINX)
PROXY_LABELS = {
    PROXY_SHARED: "tenaya pool.shared=true",
    PROXY_UNSHARED: "tenaya pool.shared=false",
    PROXY_NGINX: "nginx keepalive {keepalive}",
}

DEFAULT_WORKERS = 4
DEFAULT_ORIGINS = 100
DEFAULT_RATE = 200.0
DEFAULT_DURATION_SECONDS = 20.0
DEFAULT_SEED = 1
DEFAULT_ROUNDS = 1
DEFAULT_STEADY_ORIGINS = 10
DEFAULT_STEADY_CONNECTIONS = 20
DEFAULT_STEADY_DURATION_SECONDS = 15
DEFAULT_STEADY_WARMUP_SECONDS = 3
#: Longest a sparse request may take (connect, send, read the whole response).
DEFAULT_REQUEST_TIMEOUT_SECONDS = 10.0

#: The goals of the issue: shared Tenaya opens at most this share of unshared Tenaya's new
#: upstream connections (sparse), and reuses at least this share of connections (steady).
TARGET_SHARED_OVER_UNSHARED = 1 / 3
TARGET_STEADY_REUSE_RATIO = 0.999

#: nginx reverse proxy: idle upstream connections kept per worker and per origin.
NGINX_POOL_KEEPALIVE = 16
#: The origin keeps idle connections this long (longer than any proxy's idle timeout).
ORIGIN_KEEPALIVE_TIMEOUT_SECONDS = 120
ORIGIN_LOG_FORMAT_NAME = "pool"
ORIGIN_LOG_FORMAT = "$msec $server_port $connection $connection_requests"
#: Name of the nginx variable holding the upstream chosen by Host.
NGINX_UPSTREAM_VARIABLE = "$pool_upstream"

#: Pause after a proxy is ready and after a run, before reading the origin's log and Tenaya's
#: counters: longer than a worker's heartbeat (1 s, when the master's counters are refreshed)
#: and than the time an idle connection stays in a worker before it is donated (1 s).
SETTLE_SECONDS = 2.5
#: Longest wait for ``python -m master status``.
STATUS_TIMEOUT_SECONDS = 15.0
#: Extra time the sparse client waits for its last requests beyond their own timeout.
CLIENT_MARGIN_SECONDS = 5.0
#: Largest response head the sparse client accepts.
MAX_HEAD_BYTES = 16_384
#: wrk threads for the steady load (the machine has few cores; one thread is plenty).
STEADY_WRK_THREADS = 1
#: Status counters of Tenaya's pool and broker whose differences a run reports.
POOL_COUNTERS = (
    "upstream_requests",
    "connections_created",
    "reused_local",
    "reused_shared",
    "donated",
)
BROKER_COUNTERS = ("donated", "lent", "misses", "dropped")

#: How a sparse request that got no response is recorded.
ERROR_BAD_BODY = "bad body"
ERROR_TIMEOUT = "timeout"

EXIT_TARGETS_MISSED = 3

#: Words of a Tenaya log line (its level) that make the log worth showing.
LOG_ALARMS = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")


# --------------------------------------------------------------------------------------------
# Configs


def origin_ports_config(tmp: Path, ports: Sequence[int], access_log: Path) -> str:
    """nginx config of the origin: one worker, one server listening on every port, BODY."""
    listens = "".join(f"        listen {LOOPBACK}:{port};\n" for port in ports)
    return (
        _nginx_common(tmp, "origin", 1, NGINX_MIN_WORKER_CONNECTIONS)
        + f"    default_type text/plain;\n"
        f"    keepalive_timeout {ORIGIN_KEEPALIVE_TIMEOUT_SECONDS}s;\n"
        f"    log_format {ORIGIN_LOG_FORMAT_NAME} '{ORIGIN_LOG_FORMAT}';\n"
        f"    server {{\n"
        f"{listens}"
        f"        access_log {access_log} {ORIGIN_LOG_FORMAT_NAME};\n"
        f'        location / {{ return 200 "{BODY.decode("ascii")}"; }}\n'
        f"    }}\n"
        f"}}\n"
    )


def origin_name(i: int) -> str:
    """The upstream name and Host header of origin ``i``: ``o<i>``."""
    return f"o{i}"


def nginx_pool_proxy_config(
    tmp: Path, name: str, port: int, ports: Sequence[int], workers: int
) -> str:
    """nginx as a reverse proxy: an upstream block per origin with keep-alive, chosen by Host
    (an unknown Host goes to o0, as with Tenaya's load balancer)."""
    upstreams = "".join(
        f"    upstream {origin_name(i)} {{\n"
        f"        server {LOOPBACK}:{p};\n"
        f"        keepalive {NGINX_POOL_KEEPALIVE};\n"
        f"        keepalive_requests {NGINX_KEEPALIVE_REQUESTS};\n"
        f"    }}\n"
        for i, p in enumerate(ports)
    )
    routes = "".join(f"        {origin_name(i)} {origin_name(i)};\n" for i in range(len(ports)))
    return (
        _nginx_common(tmp, name, workers, NGINX_MIN_WORKER_CONNECTIONS)
        + upstreams
        + f"    map $host {NGINX_UPSTREAM_VARIABLE} {{\n"
        f"        default {origin_name(0)};\n"
        f"{routes}"
        f"    }}\n"
        f"    server {{\n"
        f"        listen {LOOPBACK}:{port} reuseport;\n"
        f"        location / {{\n"
        f"            proxy_pass http://{NGINX_UPSTREAM_VARIABLE};\n"
        f"            proxy_http_version 1.1;\n"
        f'            proxy_set_header Connection "";\n'
        f"        }}\n"
        f"    }}\n"
        f"}}\n"
    )


def tenaya_pool_config(
    tmp: Path, name: str, port: int, ports: Sequence[int], workers: int, shared: bool
) -> dict[str, Any]:
    """Tenaya's config: the built-in load balancer with an upstream per origin, routed by Host,
    the pool shared or not, a control socket for ``status``, no access log."""
    return {
        "server": {
            "workers": workers,
            "grace_period_seconds": TENAYA_GRACE_SECONDS,
            "control_socket": str(tmp / f"{name}.sock"),
        },
        "listeners": [{"address": f"{LOOPBACK}:{port}"}],
        "upstreams": {
            origin_name(i): {"servers": [f"{LOOPBACK}:{p}"], "hosts": [origin_name(i)]}
            for i, p in enumerate(ports)
        },
        "pool": {"shared": shared},
        "logging": {
            "access_log": "off",
            "level": "info",
            "error_log": str(tmp / f"{name}-error.log"),
        },
    }


def steady_wrk_script(origins: int) -> str:
    """wrk's Lua script: each request's Host is the next of o0..o<origins-1>, in turn."""
    return (
        "-- Rotates the Host header over the origins (requests are formatted once).\n"
        "local requests = {}\n"
        "local next_i = 0\n"
        "init = function(args)\n"
        f"  for i = 0, {origins - 1} do\n"
        '    requests[i] = wrk.format("GET", "/", {["Host"] = "o" .. i})\n'
        "  end\n"
        "end\n"
        "request = function()\n"
        "  local r = requests[next_i]\n"
        f"  next_i = (next_i + 1) % {origins}\n"
        "  return r\n"
        "end\n"
    )


# --------------------------------------------------------------------------------------------
# The origin's access log


@dataclass(slots=True)
class OriginCount:
    """What the origin logged between two offsets of its access log."""

    requests: int  #: requests the origin answered
    new_connections: int  #: requests that were the first of their connection
    connections_used: int  #: distinct connections that carried a request
    origins_touched: int  #: distinct ports that got a request
    max_new_per_origin: int  #: most new connections to a single port
    new_in_second_half: int  #: new connections in the later half of the window (origin's clock)


class OriginLog:
    """The origin's access log, read between offsets (it is never truncated while in use)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def offset(self) -> int:
        """The log's length now: where the next request's line will start."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def count(self, start: int, end: int) -> OriginCount:
        """Counts the whole lines that begin in ``[start, end)``; a line cut by ``start`` (an
        offset taken while nginx was writing) belongs to the window before, one cut by ``end``
        to the window after."""
        with open(self.path, "rb") as f:
            data = f.read(end)
        if start > 0 and data[start - 1 : start] != b"\n":
            cut = data.find(b"\n", start)
            start = len(data) if cut < 0 else cut + 1
        data = data[: data.rfind(b"\n") + 1]
        requests = 0
        connections: set[bytes] = set()
        new_by_port: Counter[bytes] = Counter()
        ports: set[bytes] = set()
        times: list[float] = []
        new_times: list[float] = []
        for line in data[start:].splitlines():
            fields = line.split()
            if len(fields) != len(ORIGIN_LOG_FORMAT.split()):
                continue
            msec, port, connection, nth = fields
            requests += 1
            connections.add(connection)
            ports.add(port)
            times.append(float(msec))
            if nth == b"1":
                new_by_port[port] += 1
                new_times.append(float(msec))
        middle = (min(times) + max(times)) / 2 if times else 0.0
        return OriginCount(
            requests=requests,
            new_connections=len(new_times),
            connections_used=len(connections),
            origins_touched=len(ports),
            max_new_per_origin=max(new_by_port.values(), default=0),
            new_in_second_half=sum(t > middle for t in new_times),
        )


# --------------------------------------------------------------------------------------------
# Tenaya's status


def tenaya_status(conf: Path) -> tuple[dict[str, Any] | None, str]:
    """``python -m master status -c conf --json``, parsed; or None and why not."""
    cmd = [sys.executable, "-m", "master", "status", "-c", str(conf), "--json"]
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            env=tenaya_env(),
            timeout=STATUS_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        return None, f"status did not answer within {STATUS_TIMEOUT_SECONDS:g}s"
    if done.returncode != 0:
        return None, f"status exited with {done.returncode}: {done.stderr.strip()[-500:]}"
    try:
        return json.loads(done.stdout), ""
    except json.JSONDecodeError as e:
        return None, f"status printed no JSON ({e}): {done.stdout.strip()[-500:]}"


def pool_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Differences of the pool and broker counters between two status replies, the window's
    reuse ratio, and Tenaya's own (cumulative) ``reuse_ratio`` and broker ``idle`` at the end."""
    pool = {k: after["pool"].get(k, 0) - before["pool"].get(k, 0) for k in POOL_COUNTERS}
    requests = pool["upstream_requests"]
    reused = pool["reused_local"] + pool["reused_shared"]
    out: dict[str, Any] = {
        "pool": pool,
        "window_reuse_ratio": reused / requests if requests else None,
        "status_reuse_ratio": after["pool"].get("reuse_ratio"),
        "broker": None,
    }
    if after.get("broker") is not None and before.get("broker") is not None:
        broker = {
            k: after["broker"].get(k, 0) - before["broker"].get(k, 0) for k in BROKER_COUNTERS
        }
        broker["idle_at_end"] = after["broker"].get("idle", 0)
        out["broker"] = broker
    return out


# --------------------------------------------------------------------------------------------
# The sparse client


@dataclass(slots=True)
class ClientResult:
    """What the paced client saw."""

    sent: int  #: requests started
    ok: int  #: 200 responses with the origin's body
    statuses: dict[str, int]  #: count by status code (as text), every response
    errors: dict[str, int]  #: requests without a valid response, by reason
    elapsed_seconds: float  #: from the first request's start to the last one's end
    max_start_lag_ms: float  #: worst delay of a request's start after its due time

    @property
    def failures(self) -> int:
        """Requests that did not get a 200 with the origin's body."""
        return self.sent - self.ok


def _content_length(head: bytes) -> int | None:
    """The Content-Length of a response head, or None."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


async def _one_request(port: int, host: str) -> tuple[int, bytes]:
    """GET / with ``Host: host`` on a new connection; returns the status and body."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port, limit=MAX_HEAD_BYTES)
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = _content_length(head)
        body = await (reader.readexactly(length) if length is not None else reader.read())
        return status, body
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _timed_request(port: int, host: str, timeout: float) -> tuple[int | None, str]:
    """One request with a deadline: (status, "") or (status or None, the reason it failed)."""
    try:
        status, body = await asyncio.wait_for(_one_request(port, host), timeout)
    except TimeoutError:
        return None, ERROR_TIMEOUT
    except (
        OSError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        ValueError,
        IndexError,
    ) as e:
        return None, type(e).__name__
    if status == 200 and body != BODY:
        return status, ERROR_BAD_BODY
    return status, ""


async def _sparse_client(
    port: int, origins: int, rate: float, duration: float, seed: int, timeout: float
) -> ClientResult:
    """Sends ``rate * duration`` requests, one every ``1 / rate`` seconds, each on a new
    connection to a random origin's Host; waits for them all (each has ``timeout``)."""
    rng = random.Random(seed)
    total = int(rate * duration)
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[tuple[int | None, str]]] = []
    max_lag = 0.0
    start = loop.time()
    for k in range(total):
        host = origin_name(rng.randrange(origins))
        due = start + k / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        max_lag = max(max_lag, loop.time() - due)
        tasks.append(asyncio.create_task(_timed_request(port, host, timeout)))
    done, pending = await asyncio.wait(tasks, timeout=timeout + CLIENT_MARGIN_SECONDS)
    elapsed = loop.time() - start
    for task in pending:
        task.cancel()
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    ok = 0
    for task in tasks:
        if task not in done:
            errors["unfinished"] += 1
            continue
        status, error = task.result()
        if status is not None:
            statuses[str(status)] += 1
        if error:
            errors[error] += 1
        elif status == 200:
            ok += 1
        else:
            errors[f"status {status}"] += 1
    return ClientResult(total, ok, dict(statuses), dict(errors), elapsed, max_lag * 1e3)


def run_sparse_client(port: int, args: argparse.Namespace) -> ClientResult:
    """The paced client of scenario A, in its own event loop."""
    return asyncio.run(
        _sparse_client(
            port, args.origins, args.rate, args.duration, args.seed, args.request_timeout
        )
    )


# --------------------------------------------------------------------------------------------
# Runs


@dataclass(slots=True)
class SparseRun:
    """One proxy's run of scenario A."""

    proxy: str  #: PROXY_SHARED, PROXY_UNSHARED or PROXY_NGINX
    round: int  #: 1-based
    requests: int  #: requests the client sent
    failures: int  #: requests without a 200 and the origin's body
    errors: dict[str, int]  #: failures by reason
    statuses: dict[str, int]  #: responses by status
    origin: OriginCount  #: what the origin logged during the run
    cpu_seconds: float  #: user + system CPU of the proxy's processes during the run
    elapsed_seconds: float  #: the client's run time
    max_start_lag_ms: float  #: the client's worst pacing delay
    tenaya: dict[str, Any] | None = None  #: pool_delta of the run (Tenaya only)
    problems: list[str] = field(default_factory=list)  #: why the run is flagged


@dataclass(slots=True)
class SteadyRun:
    """Scenario B: wrk against shared Tenaya."""

    requests: int  #: responses wrk completed
    failures: int  #: wrk's socket errors plus responses with a status of 400 or more
    rps: float  #: requests per second over the whole run
    whole: OriginCount  #: what the origin logged during the whole run
    steady: OriginCount  #: what it logged after the warm-up
    cpu_seconds: float  #: user + system CPU of Tenaya's processes during the run
    tenaya: dict[str, Any] | None  #: pool_delta of the whole run
    problems: list[str] = field(default_factory=list)

    @property
    def reuse_ratio_whole(self) -> float | None:
        """1 - new connections / requests at the origin, over the whole run."""
        return _reuse(self.whole)

    @property
    def reuse_ratio_steady(self) -> float | None:
        """The same after the warm-up."""
        return _reuse(self.steady)


def _reuse(count: OriginCount) -> float | None:
    """1 - new connections / requests, or None without requests."""
    return 1 - count.new_connections / count.requests if count.requests else None


def _process_problems(
    proxy: str, pids_before: set[int], pids_after: set[int], exit_status: int | None
) -> list[str]:
    """Why a run is flagged as far as the proxy's processes go: some changed, or the leader
    exited (with its status; a negative one is the signal that killed it)."""
    problems = []
    if pids_before != pids_after:
        problems.append(f"processes changed: {sorted(pids_before)} -> {sorted(pids_after)}")
    if exit_status is not None:
        how = (
            f"killed by {signal.Signals(-exit_status).name}"
            if exit_status < 0
            else f"exit status {exit_status}"
        )
        problems.append(f"{proxy}'s leader process exited during the run ({how})")
    return problems


class Bench:
    """The origin, the temp directory and the tools, shared by every run."""

    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.stack = stack
        self.nginx = find_tool("nginx", args.nginx, ["/usr/sbin", "/usr/local/sbin"])
        self.wrk = (
            find_tool("wrk", args.wrk) if args.scenario in (SCENARIO_STEADY, SCENARIO_ALL) else ""
        )
        self.tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tenaya-pool-")))
        self.ports = free_ports(args.origins)
        self.log = OriginLog(self.tmp / "origin-access.log")
        origin = start_nginx(
            self.nginx,
            self.tmp,
            "origin",
            origin_ports_config(self.tmp, self.ports, self.log.path),
            port=self.ports[0],
            workers=1,
            probes=1,
        )
        stack.callback(origin.stop)
        self.origin = origin
        self.tenaya_logs: dict[str, str] = {}

    def _start_proxy(
        self, proxy: str, name: str, port: int, ports: Sequence[int]
    ) -> tuple[Server, Path | None]:
        """Start one proxy fresh; returns it and, for Tenaya, its config file."""
        workers = self.args.workers
        if proxy == PROXY_NGINX:
            config = nginx_pool_proxy_config(self.tmp, name, port, ports, workers)
            server = start_nginx(
                self.nginx,
                self.tmp,
                name,
                config,
                port=port,
                workers=workers,
                probes=PROBES_PER_WORKER * workers,
            )
            return server, None
        conf = self.tmp / f"{name}.yaml"
        config_map = tenaya_pool_config(
            self.tmp, name, port, ports, workers, shared=proxy == PROXY_SHARED
        )
        return launch_tenaya(conf, config_map, port=port, workers=workers), conf

    def _keep_log(self, name: str, problems: Sequence[str]) -> None:
        """Remember the tail of a Tenaya run's error log and output when the run is flagged or
        they hold a warning or an error (info lines alone are not worth showing)."""
        said = "\n".join(
            _tail(p)
            for p in (self.tmp / f"{name}-error.log", self.tmp / f"{name}.out")
            if p.is_file() and p.stat().st_size
        )
        if said.strip() and (problems or any(m in said for m in LOG_ALARMS)):
            self.tenaya_logs[name] = said

    def sparse(self, proxy: str, round_no: int) -> SparseRun:
        """Scenario A against one freshly started proxy."""
        name = f"{proxy}-r{round_no}"
        (port,) = free_ports(1)
        server, conf = self._start_proxy(proxy, name, port, self.ports)
        try:
            time.sleep(SETTLE_SECONDS)
            status_before, note_before = tenaya_status(conf) if conf else (None, "")
            pids_before = {p.pid for p in server.processes()}
            cpu_before, _ = server.cpu_seconds()
            start = self.log.offset()
            client = run_sparse_client(port, self.args)
            time.sleep(SETTLE_SECONDS)
            end = self.log.offset()
            cpu_after, _ = server.cpu_seconds()
            pids_after = {p.pid for p in server.processes()}
            status_after, note_after = tenaya_status(conf) if conf else (None, "")
            exit_status = server.exited()
        finally:
            server.stop()
        problems = [n for n in (note_before, note_after) if n]
        problems += _process_problems(proxy, pids_before, pids_after, exit_status)
        if client.failures:
            problems.append(f"{client.failures} failed requests: {client.errors}")
        if conf:
            self._keep_log(name, problems)
        tenaya = (
            pool_delta(status_before, status_after)
            if status_before is not None and status_after is not None
            else None
        )
        return SparseRun(
            proxy=proxy,
            round=round_no,
            requests=client.sent,
            failures=client.failures,
            errors=client.errors,
            statuses=client.statuses,
            origin=self.log.count(start, end),
            cpu_seconds=round(cpu_after - cpu_before, 2),
            elapsed_seconds=round(client.elapsed_seconds, 2),
            max_start_lag_ms=round(client.max_start_lag_ms, 1),
            tenaya=tenaya,
            problems=problems,
        )

    def steady(self) -> SteadyRun:
        """Scenario B: wrk with rotating Host headers against freshly started shared Tenaya."""
        args = self.args
        name = f"{PROXY_SHARED}-steady"
        (port,) = free_ports(1)
        ports = self.ports[: args.steady_origins]
        script = self.tmp / "rotate-hosts.lua"
        script.write_text(steady_wrk_script(len(ports)))
        total = args.steady_warmup + args.steady_duration
        cmd = [
            self.wrk,
            f"-t{STEADY_WRK_THREADS}",
            f"-c{args.steady_connections}",
            f"-d{total}s",
            "-s",
            str(script),
            f"http://{LOOPBACK}:{port}/",
        ]
        server, conf = self._start_proxy(PROXY_SHARED, name, port, ports)
        assert conf is not None
        problems: list[str] = []
        output = ""
        try:
            time.sleep(SETTLE_SECONDS)
            status_before, note_before = tenaya_status(conf)
            pids_before = {p.pid for p in server.processes()}
            cpu_before, _ = server.cpu_seconds()
            start = self.log.offset()
            wrk = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            try:
                time.sleep(args.steady_warmup)
                middle = self.log.offset()
                try:
                    output, _ = wrk.communicate(timeout=args.steady_duration + WRK_OVERRUN_SECONDS)
                except subprocess.TimeoutExpired:
                    problems.append(f"wrk did not finish within {total + WRK_OVERRUN_SECONDS:g}s")
            finally:
                if wrk.poll() is None:
                    wrk.kill()
                    wrk.wait()
            time.sleep(SETTLE_SECONDS)
            end = self.log.offset()
            cpu_after, _ = server.cpu_seconds()
            pids_after = {p.pid for p in server.processes()}
            status_after, note_after = tenaya_status(conf)
            exit_status = server.exited()
        finally:
            server.stop()
        problems += [n for n in (note_before, note_after) if n]
        problems += _process_problems(PROXY_SHARED, pids_before, pids_after, exit_status)
        requests = failures = 0
        rps = 0.0
        if wrk.returncode != 0:
            problems.append(f"wrk exited with {wrk.returncode}: {output[-WRK_ERROR_CHARS:]}")
        else:
            try:
                result = parse_wrk(output)
            except ValueError as e:
                problems.append(f"{e}: {output[-WRK_ERROR_CHARS:]}")
            else:
                requests = result.requests
                failures = result.non_2xx + sum(result.socket_errors.values())
                rps = result.requests / result.elapsed_seconds if result.elapsed_seconds else 0.0
                if failures:
                    problems.append(
                        f"{result.non_2xx} responses >= 400, socket errors {result.socket_errors}"
                    )
        tenaya = (
            pool_delta(status_before, status_after)
            if status_before is not None and status_after is not None
            else None
        )
        self._keep_log(name, problems)
        return SteadyRun(
            requests=requests,
            failures=failures,
            rps=round(rps, 1),
            whole=self.log.count(start, end),
            steady=self.log.count(middle, end),
            cpu_seconds=round(cpu_after - cpu_before, 2),
            tenaya=tenaya,
            problems=problems,
        )


# --------------------------------------------------------------------------------------------
# Report


def _median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def sparse_summary(runs: Sequence[SparseRun]) -> dict[str, Any]:
    """Per proxy: median new connections and total failures; the targets on those medians."""
    new = {
        p: _median([r.origin.new_connections for r in runs if r.proxy == p]) for p in SPARSE_PROXIES
    }
    failures = {p: sum(r.failures for r in runs if r.proxy == p) for p in SPARSE_PROXIES}
    shared, unshared, nginx = new[PROXY_SHARED], new[PROXY_UNSHARED], new[PROXY_NGINX]
    ratio_unshared = shared / unshared if shared is not None and unshared else None
    ratio_nginx = shared / nginx if shared is not None and nginx else None
    return {
        "median_new_connections": new,
        "failures": failures,
        "shared_over_unshared": ratio_unshared,
        "shared_over_nginx": ratio_nginx,
        "target_shared_over_unshared_met": (
            ratio_unshared is not None and ratio_unshared <= TARGET_SHARED_OVER_UNSHARED
        ),
        "target_fewer_than_nginx_met": (
            shared is not None and nginx is not None and shared < nginx
        ),
    }


def _fmt(value: float | None, spec: str) -> str:
    """A number formatted, or '-' for None."""
    return "-" if value is None else format(value, spec)


def _pass(met: bool) -> str:
    return "MET" if met else "MISSED"


def render_sparse(
    runs: Sequence[SparseRun], summary: dict[str, Any], args: argparse.Namespace
) -> str:
    """Scenario A's table."""
    rows = [
        f'Scenario A "sparse": {args.rate:g} req/s x {args.duration:g} s over {args.origins} '
        f"origins, a new client connection per request, {args.workers} workers per proxy, "
        f"seed {args.seed}",
        "",
        f"{'proxy':<26}{'rnd':>4}{'requests':>9}{'fail':>6}{'origin req':>11}"
        f"{'NEW CONNS':>10}{'2nd half':>9}{'created':>9}{'local':>7}{'shared':>7}{'reuse':>8}"
        f"{'donated':>9}{'lent':>6}{'miss':>6}{'cpu s':>7}",
    ]
    for r in runs:
        t = r.tenaya or {}
        pool = t.get("pool") or {}
        broker = t.get("broker") or {}
        label = PROXY_LABELS[r.proxy].format(keepalive=NGINX_POOL_KEEPALIVE)
        rows.append(
            f"{label:<26}{r.round:>4}{r.requests:>9}{r.failures:>6}{r.origin.requests:>11}"
            f"{r.origin.new_connections:>10}{r.origin.new_in_second_half:>9}"
            f"{_fmt(pool.get('connections_created'), 'd'):>9}"
            f"{_fmt(pool.get('reused_local'), 'd'):>7}"
            f"{_fmt(pool.get('reused_shared'), 'd'):>7}"
            f"{_fmt(t.get('window_reuse_ratio'), '.3f'):>8}"
            f"{_fmt(broker.get('donated'), 'd'):>9}"
            f"{_fmt(broker.get('lent'), 'd'):>6}"
            f"{_fmt(broker.get('misses'), 'd'):>6}"
            f"{r.cpu_seconds:>7.2f}"
        )
    new = summary["median_new_connections"]
    rows += [
        "",
        "NEW CONNS: first requests of connections in the origin's access log (2nd half: of"
        " them, in the later half of the run); created/local/shared/reuse: Tenaya's pool"
        " counters over the run; donated/lent/miss: its broker's.",
        f"new upstream connections (median): shared {_fmt(new[PROXY_SHARED], 'g')}, "
        f"unshared {_fmt(new[PROXY_UNSHARED], 'g')}, nginx {_fmt(new[PROXY_NGINX], 'g')}",
        f"target shared/unshared <= 1/3: {_fmt(summary['shared_over_unshared'], '.3f')} "
        f"{_pass(summary['target_shared_over_unshared_met'])}; "
        f"target shared < nginx: shared/nginx {_fmt(summary['shared_over_nginx'], '.3f')} "
        f"{_pass(summary['target_fewer_than_nginx_met'])}",
    ]
    return "\n".join(rows)


def render_steady(run: SteadyRun, args: argparse.Namespace) -> str:
    """Scenario B's table."""
    t = run.tenaya or {}
    pool = t.get("pool") or {}
    steady = run.reuse_ratio_steady
    rows = [
        f'Scenario B "steady": wrk -t{STEADY_WRK_THREADS} -c{args.steady_connections}, '
        f"{args.steady_warmup} s warm-up + {args.steady_duration} s, Host rotating over "
        f"{args.steady_origins} origins, tenaya pool.shared=true, {args.workers} workers",
        "",
        f"{'window':<16}{'origin req':>11}{'new conns':>10}{'reuse ratio':>13}",
        f"{'whole run':<16}{run.whole.requests:>11}{run.whole.new_connections:>10}"
        f"{_fmt(run.reuse_ratio_whole, '.5f'):>13}",
        f"{'after warm-up':<16}{run.steady.requests:>11}{run.steady.new_connections:>10}"
        f"{_fmt(steady, '.5f'):>13}",
        "",
        f"wrk: {run.requests} responses ({run.rps:.0f}/s), {run.failures} failures; "
        f"tenaya cpu {run.cpu_seconds:.2f} s",
        f"tenaya status over the run: upstream_requests {_fmt(pool.get('upstream_requests'), 'd')}"
        f", created {_fmt(pool.get('connections_created'), 'd')}, reused_local "
        f"{_fmt(pool.get('reused_local'), 'd')}, reused_shared "
        f"{_fmt(pool.get('reused_shared'), 'd')}, reuse ratio "
        f"{_fmt(t.get('window_reuse_ratio'), '.5f')} (status reuse_ratio since start "
        f"{_fmt(t.get('status_reuse_ratio'), '.5f')})",
        f"target reuse ratio after warm-up >= {TARGET_STEADY_REUSE_RATIO:.1%}: "
        f"{_pass(steady is not None and steady >= TARGET_STEADY_REUSE_RATIO)}",
    ]
    return "\n".join(rows)


@dataclass(slots=True)
class Results:
    """Everything a benchmark produced."""

    sparse: list[SparseRun]  #: scenario A's runs, in the order they ran
    steady: SteadyRun | None  #: scenario B's run, if it ran
    tenaya_logs: dict[str, str]  #: run name -> what Tenaya wrote to its logs (tails)

    def flagged(self) -> int:
        """How many runs had failures or process changes."""
        return sum(bool(r.problems) for r in self.sparse) + bool(
            self.steady is not None and self.steady.problems
        )


def bench(args: argparse.Namespace) -> Results:
    """Start the origin, run the scenarios (each proxy fresh), stop everything."""
    results = Results([], None, {})
    with contextlib.ExitStack() as stack:
        b = Bench(args, stack)
        if args.scenario in (SCENARIO_SPARSE, SCENARIO_ALL):
            for round_no in range(1, args.rounds + 1):
                order = SPARSE_PROXIES if round_no % 2 else SPARSE_PROXIES[::-1]
                for proxy in order:
                    run = b.sparse(proxy, round_no)
                    results.sparse.append(run)
                    print(
                        f"sparse round {round_no} {proxy}: {run.requests} requests, "
                        f"{run.failures} failures, {run.origin.new_connections} new upstream "
                        f"connections" + _flags(run.problems),
                        file=sys.stderr,
                        flush=True,
                    )
        if args.scenario in (SCENARIO_STEADY, SCENARIO_ALL):
            results.steady = steady = b.steady()
            print(
                f"steady: {steady.requests} requests, {steady.failures} failures, "
                f"reuse ratio after warm-up {_fmt(steady.reuse_ratio_steady, '.5f')}"
                + _flags(steady.problems),
                file=sys.stderr,
                flush=True,
            )
        results.tenaya_logs = b.tenaya_logs
    return results


def _flags(problems: Sequence[str]) -> str:
    """The end of a progress line: why the run is flagged, if it is."""
    return f"  FLAGGED: {'; '.join(problems)}" if problems else ""


def build_report(args: argparse.Namespace, results: Results) -> dict[str, Any]:
    """The JSON report: settings, every run, summaries and targets."""
    report: dict[str, Any] = {
        "workers": args.workers,
        "origins": args.origins,
        "body_bytes": len(BODY),
        "flagged_runs": results.flagged(),
    }
    if results.sparse:
        report["sparse"] = {
            "rate": args.rate,
            "duration_seconds": args.duration,
            "seed": args.seed,
            "rounds": args.rounds,
            "nginx_keepalive": NGINX_POOL_KEEPALIVE,
            "runs": [asdict(r) for r in results.sparse],
            "summary": sparse_summary(results.sparse),
        }
    if results.steady is not None:
        steady = results.steady.reuse_ratio_steady
        report["steady"] = asdict(results.steady) | {
            "origins": args.steady_origins,
            "connections": args.steady_connections,
            "warmup_seconds": args.steady_warmup,
            "duration_seconds": args.steady_duration,
            "reuse_ratio_whole": results.steady.reuse_ratio_whole,
            "reuse_ratio_after_warmup": steady,
            "target_met": steady is not None and steady >= TARGET_STEADY_REUSE_RATIO,
        }
    report["tenaya_logs"] = results.tenaya_logs
    return report


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; every figure of a run can be set."""
    p = argparse.ArgumentParser(prog="scripts/bench pool", description=DESCRIPTION)
    p.add_argument(
        "--scenario",
        choices=(SCENARIO_ALL, SCENARIO_SPARSE, SCENARIO_STEADY),
        default=SCENARIO_ALL,
        help="which scenario(s) to run (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="worker processes of each proxy (default %(default)s)",
    )
    p.add_argument(
        "--origins",
        type=int,
        default=DEFAULT_ORIGINS,
        help="origin ports for the sparse scenario (default %(default)s)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help="sparse requests per second (default %(default)s)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION_SECONDS,
        help="sparse run length in seconds (default %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed of the sparse origin sequence (default %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help="sparse runs per proxy, order flipped each round (default %(default)s)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_SECONDS,
        help="longest a sparse request may take, in seconds (default %(default)s)",
    )
    p.add_argument(
        "--steady-origins",
        type=int,
        default=DEFAULT_STEADY_ORIGINS,
        help="origins the steady load rotates over (default %(default)s)",
    )
    p.add_argument(
        "--steady-connections",
        type=int,
        default=DEFAULT_STEADY_CONNECTIONS,
        help="wrk keep-alive connections (default %(default)s)",
    )
    p.add_argument(
        "--steady-duration",
        type=int,
        default=DEFAULT_STEADY_DURATION_SECONDS,
        help="whole seconds of the counted steady window (default %(default)s)",
    )
    p.add_argument(
        "--steady-warmup",
        type=int,
        default=DEFAULT_STEADY_WARMUP_SECONDS,
        help="whole seconds of steady load before the counted window (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--wrk", help="path of wrk (default: found on PATH)")
    p.add_argument("--nginx", help="path of nginx (default: found on PATH or in /usr/sbin)")
    args = p.parse_args(argv)
    for name in (
        "workers",
        "origins",
        "rounds",
        "steady_origins",
        "steady_connections",
        "steady_duration",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate <= 0 or args.duration <= 0 or args.request_timeout <= 0:
        p.error("--rate, --duration and --request-timeout must be positive")
    if args.steady_warmup < 0:
        p.error("--steady-warmup must be at least 0")
    if args.steady_origins > args.origins:
        p.error("--steady-origins cannot exceed --origins")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the tables (or JSON). Exit status: 0 when every request
    succeeded and every target was met, 1 on failed requests or flagged runs, 3 when only a
    target was missed, 2 when the benchmark could not run."""
    args = parse_args(argv)
    try:
        with _terminate_on_sigterm():
            results = bench(args)
    except BenchError as e:
        print(f"pool_bench: {e}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    except KeyboardInterrupt:
        print("pool_bench: interrupted; servers stopped", file=sys.stderr)
        return EXIT_SETUP_FAILED
    report = build_report(args, results)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        tables = []
        if results.sparse:
            tables.append(render_sparse(results.sparse, report["sparse"]["summary"], args))
        if results.steady is not None:
            tables.append(render_steady(results.steady, args))
        print("\n\n".join(tables))
    for name, said in results.tenaya_logs.items():
        print(f"{name}'s log (tail):\n{said}", file=sys.stderr)
    if results.flagged():
        print(
            f"pool_bench: {results.flagged()} run(s) flagged (failures or process changes)",
            file=sys.stderr,
        )
        return EXIT_RUN_ERRORS
    summary = report.get("sparse", {}).get("summary", {})
    missed = [
        k
        for k in ("target_shared_over_unshared_met", "target_fewer_than_nginx_met")
        if k in summary and not summary[k]
    ]
    if "steady" in report and not report["steady"]["target_met"]:
        missed.append("steady reuse ratio")
    if missed:
        print(f"pool_bench: targets missed: {', '.join(missed)}", file=sys.stderr)
        return EXIT_TARGETS_MISSED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
