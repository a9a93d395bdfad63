"""Benchmark: Tenaya against nginx as a reverse proxy, in the same run, on loopback.

Theory of operation. One nginx process serves as the origin: it answers every request with the
same fixed 100-byte body over plaintext HTTP/1.1. Two proxies stand in front of it, each with the
same worker count: Tenaya (``python -m master start``) and nginx with upstream keep-alive. A load
generator then loads them in turns, and the order flips every round (T N, N T, T N, ...) so that
a slow drift of the shared, noisy machine weighs on both alike. The case decides what the
clients speak to the proxies (the proxies always speak HTTP/1.1 to the origin):

- ``keepalive``: wrk, HTTP/1.1, keep-alive; ``close``: the same with a new connection per request;
- ``tls``: wrk over HTTPS (HTTP/1.1, keep-alive). Both proxies use the same certificate (ECDSA
  P-256, generated at run time into the temporary directory), TLS 1.2 and 1.3 with TLS 1.3
  preferred, Tenaya's default TLS 1.2 cipher list and the server's order of cipher suites;
- ``h2c``: h2load, cleartext HTTP/2 with prior knowledge (nginx ``listen ... http2``);
- ``h2tls``: h2load, HTTP/2 over TLS chosen by ALPN (nginx ``listen ... ssl http2``).

The readiness probe speaks the case's protocol, and the report shows what a TLS handshake with
each proxy negotiated (version, cipher suite, ALPN). For every run we keep:

- requests/s of *successful* responses (wrk's count minus its non-2xx/3xx count; h2load's 2xx
  count), so a proxy that answers quickly with errors does not look fast;
- latency: the p99 from ``wrk --latency``; h2load prints no percentiles, only the min, max, mean
  and standard deviation of its "time for request", so its cases show the mean and the max (wrk's
  cases show its mean and max too);
- errors: wrk's socket errors and non-2xx/3xx responses; h2load's failed, errored and timed-out
  requests and non-2xx responses, and an application protocol other than the case's (a run with
  any is flagged, and the exit status says so);
- the CPU seconds the proxy's own processes used during the run (user + system of the master and
  its workers, measured with psutil just before and just after the load generator), hence
  requests per CPU-second, the figure DESIGN.md section 8 sets the goal on.

The table shows the median over rounds for each proxy and the Tenaya/nginx ratios. Every child
runs in its own process group and is stopped in a ``finally`` (also on Ctrl-C or SIGTERM); every
wait has a deadline; readiness is polled (a GET through the proxy must return the origin's body).

Usage: ``scripts/bench`` or ``python -m loadtests.bench --rounds 5 --duration 5 --case close``
(``--case tls``, ``--case h2c``, ``--case h2tls``).
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from loadtests.clients import (
    ALPN_H2,
    H2C,
    H2loadResult,
    ProbeError,
    get_h1,
    get_h2,
    h2load_command,
    parse_h2load,
    probe_ok,
    write_certificate,
)

DESCRIPTION = "Benchmark Tenaya against nginx as a reverse proxy (requests/s, p99, req/CPU-s)."
LOOPBACK = "127.0.0.1"
#: The origin's answer to every request: exactly BODY_BYTES of plain ASCII (no quotes, since it
#: is written into nginx's config as a string literal).
BODY_BYTES = 100
BODY = ("tenaya-bench-origin-" + "0123456789" * 10)[:BODY_BYTES].encode("ascii")

CASE_KEEPALIVE = "keepalive"
CASE_CLOSE = "close"
CASE_TLS = "tls"
CASE_H2C = "h2c"
CASE_H2TLS = "h2tls"
TOOL_WRK = "wrk"
TOOL_H2LOAD = "h2load"


@dataclass(frozen=True, slots=True)
class Case:
    """What the clients of one case speak to the proxies, and with which tool."""

    name: str
    tool: str  #: TOOL_WRK or TOOL_H2LOAD
    tls: bool  #: TLS on the proxies' listeners
    http2: bool  #: HTTP/2 from the clients to the proxies
    help: str  #: one line for --help
    wrk_args: tuple[str, ...] = ()  #: extra wrk arguments

    @property
    def scheme(self) -> str:
        """The URL scheme the load generator uses."""
        return "https" if self.tls else "http"

    @property
    def protocol(self) -> str:
        """The application protocol h2load must report ("" for wrk's cases)."""
        if not self.http2:
            return ""
        return ALPN_H2 if self.tls else H2C


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case(CASE_KEEPALIVE, TOOL_WRK, False, False, "wrk, HTTP/1.1 keep-alive"),
        Case(
            CASE_CLOSE,
            TOOL_WRK,
            False,
            False,
            "wrk, HTTP/1.1, a new connection per request",
            ("-H", "Connection: close"),
        ),
        Case(CASE_TLS, TOOL_WRK, True, False, "wrk, HTTPS (HTTP/1.1 keep-alive)"),
        Case(CASE_H2C, TOOL_H2LOAD, False, True, "h2load, cleartext HTTP/2 (prior knowledge)"),
        Case(CASE_H2TLS, TOOL_H2LOAD, True, True, "h2load, HTTP/2 over TLS (ALPN h2)"),
    )
}

DEFAULT_ROUNDS = 5
DEFAULT_DURATION_SECONDS = 5
DEFAULT_CONNECTIONS = 50
#: h2load's defaults: this many connections with up to H2_DEFAULT_STREAMS requests in flight on
#: each, as many requests in flight as wrk's DEFAULT_CONNECTIONS.
H2_DEFAULT_CONNECTIONS = 5
H2_DEFAULT_STREAMS = 10
#: Both proxies allow this many concurrent streams per HTTP/2 connection (Tenaya's fixed limit,
#: nginx's http2_max_concurrent_streams default); more would only queue in h2load.
H2_MAX_STREAMS = 128
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
#: A wrk or h2load run longer than its duration plus this is killed and recorded as failed.
WRK_OVERRUN_SECONDS = 30.0
#: Tenaya's graceful-stop window; on stop we wait for it plus STOP_MARGIN_SECONDS, then SIGKILL.
TENAYA_GRACE_SECONDS = 5.0
STOP_MARGIN_SECONDS = 5.0
#: How much of wrk's (or h2load's) output a failed run quotes.
WRK_ERROR_CHARS = 500
#: Lines of a server's log shown when it fails or complains.
LOG_TAIL_LINES = 20

#: nginx settings: the proxy keeps at least this many idle upstream connections per worker (more
#: when more requests are in flight, so that no upstream connection is closed for lack of room);
#: both nginx servers allow this many requests per connection, HTTP/2 streams included (the
#: default 1000 would add reconnects, and h2load does not reconnect).
NGINX_UPSTREAM_KEEPALIVE = 64
NGINX_KEEPALIVE_REQUESTS = 1_000_000
#: Floor of nginx's worker_connections; raised with --connections (each proxied request holds a
#: downstream and an upstream connection).
NGINX_MIN_WORKER_CONNECTIONS = 4096
NGINX_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
#: TLS settings of both proxies: nginx 1.22's default protocols lack TLS 1.3, and Tenaya's TLS
#: 1.2 cipher list and server preference are written into nginx's config. TLS 1.3 suites are
#: OpenSSL's defaults on both sides (neither sets them).
TLS_MIN_VERSION = "1.2"
NGINX_SSL_PROTOCOLS = "TLSv1.2 TLSv1.3"
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
#: Tenaya's idle upstream connections per worker by default; raised like nginx's keep-alive.
TENAYA_POOL_SIZE = 128

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
_RE_LATENCY = re.compile(
    r"^\s*Latency\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)",
    re.MULTILINE,
)

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
    mean_ms: float | None = None  #: mean latency (wrk's thread stats); None if not printed
    max_ms: float | None = None  #: longest latency (wrk's thread stats); None if not printed


@dataclass(slots=True)
class Load:
    """One run of a load generator (wrk or h2load), in the terms a Run needs."""

    ok_requests: int  #: responses that count: below 400 (wrk), 2xx (h2load)
    elapsed_seconds: float  #: the run's length as the tool measured it
    p99_ms: float | None  #: 99th percentile latency (wrk only)
    mean_ms: float | None  #: mean latency
    max_ms: float | None  #: longest latency
    errors: dict[str, int]  #: transport errors by kind (wrk's socket errors, h2load's
    #: errored and timed-out requests)
    non_2xx: int  #: responses with an error status (wrk: 400 or more; h2load: not 2xx)
    problems: list[str]  #: anything else wrong (h2load's failures, a wrong protocol)
    negotiated: str  #: what h2load says the connections negotiated; "" for wrk


@dataclass(slots=True)
class Run:
    """One counted run of wrk against one proxy."""

    proxy: str  #: "tenaya" or "nginx"
    round: int  #: 1-based round number
    ok_requests: int  #: responses below 400
    rps: float  #: ok_requests per second of the run
    p99_ms: float | None  #: wrk's 99th percentile latency (None with h2load)
    cpu_seconds: float  #: user + system CPU of the proxy's processes during the run
    requests_per_cpu_second: float | None  #: ok_requests / cpu_seconds
    socket_errors: int  #: wrk's socket errors, h2load's errored and timed-out requests
    non_2xx: int  #: responses with an error status (see Load.non_2xx)
    problems: list[str] = field(default_factory=list)  #: why the run is flagged; empty if clean
    cpu_by_process: dict[str, float] = field(default_factory=dict)  #: "PID TITLE" -> CPU seconds
    mean_ms: float | None = None  #: mean latency
    max_ms: float | None = None  #: longest latency
    negotiated: str = ""  #: h2load's protocol, TLS version, cipher suite and key exchange

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
    median_mean_ms: float | None = None
    median_max_ms: float | None = None


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
    lat = _RE_LATENCY.search(output)
    mean_ms = max_ms = None
    if lat is not None:
        mean_ms = float(lat.group(1)) * _TIME_UNITS[lat.group(2)] * 1e3
        max_ms = float(lat.group(5)) * _TIME_UNITS[lat.group(6)] * 1e3
    return WrkResult(
        requests, elapsed, p99_ms, errors, int(n.group(1)) if n else 0, mean_ms, max_ms
    )


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
        median_mean_ms=_median([r.mean_ms for r in mine]),
        median_max_ms=_median([r.max_ms for r in mine]),
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


def case_probe(case: Case) -> Callable[[int], bool]:
    """The readiness probe of a proxy in this case: GET / in the case's protocol (HTTP/1.1 or
    HTTP/2, TLS or not) on a fresh connection must answer 200 with the origin's body."""
    if not case.tls and not case.http2:
        return probe

    def check(port: int) -> bool:
        return probe_ok(
            LOOPBACK,
            port,
            BODY,
            http2=case.http2,
            tls=case.tls,
            timeout=PROBE_TIMEOUT_SECONDS,
        )

    return check


def handshake_summary(case: Case, port: int) -> str:
    """What a TLS handshake with the proxy negotiates for the case's client (version, cipher
    suite, ALPN), or "" for a plaintext case. Raises BenchError if the probe fails."""
    if not case.tls:
        return ""
    get = get_h2 if case.http2 else get_h1
    try:
        return get(LOOPBACK, port, tls=True, timeout=PROBE_TIMEOUT_SECONDS).negotiated
    except (OSError, ProbeError) as e:
        raise BenchError(f"TLS probe of port {port} failed: {e}") from e


def wait_ready(
    server: Server,
    port: int,
    *,
    workers: int = 1,
    probes: int = 1,
    check: Callable[[int], bool] = probe,
) -> None:
    """Poll until the server has ``workers`` children and ``probes`` checks in a row succeed
    (``check(port)``: by default an HTTP/1.1 GET that must return BODY).

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
        if len(server.processes()) > workers and check(port):
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
    tmp: Path,
    port: int,
    origin_port: int,
    workers: int,
    connections: int,
    *,
    case: Case = CASES[CASE_KEEPALIVE],
    tls_files: tuple[Path, Path] | None = None,
) -> str:
    """nginx config of the reverse proxy: ``workers`` workers, keep-alive to the origin, a
    listener speaking the case's protocol (``ssl`` with ``tls_files`` = (cert, key), ``http2``).

    ``connections`` is the most requests in flight at once; it sizes worker_connections and the
    upstream keep-alive cache.
    """
    worker_connections = max(NGINX_MIN_WORKER_CONNECTIONS, 4 * connections)
    keepalive = max(NGINX_UPSTREAM_KEEPALIVE, connections)
    listen = f"{LOOPBACK}:{port} reuseport" + (" ssl" if case.tls else "")
    listen += " http2" if case.http2 else ""
    ssl = ""
    if case.tls:
        if tls_files is None:
            raise ValueError(f"case {case.name} needs a certificate and key")
        cert, key = tls_files
        ssl = (
            f"        ssl_certificate {cert};\n"
            f"        ssl_certificate_key {key};\n"
            f"        ssl_protocols {NGINX_SSL_PROTOCOLS};\n"
            f"        ssl_ciphers {TLS12_CIPHERS};\n"
            f"        ssl_prefer_server_ciphers on;\n"
        )
    return (
        _nginx_common(tmp, "nginx-proxy", workers, worker_connections) + f"    upstream o {{\n"
        f"        server {LOOPBACK}:{origin_port};\n"
        f"        keepalive {keepalive};\n"
        f"        keepalive_requests {NGINX_KEEPALIVE_REQUESTS};\n"
        f"    }}\n"
        f"    server {{\n"
        f"        listen {listen};\n"
        f"{ssl}"
        f"        location / {{\n"
        f"            proxy_pass http://o;\n"
        f"            proxy_http_version 1.1;\n"
        f'            proxy_set_header Connection "";\n'
        f"        }}\n"
        f"    }}\n"
        f"}}\n"
    )


def tenaya_config(
    tmp: Path,
    port: int,
    origin_port: int,
    workers: int,
    *,
    tls_files: tuple[Path, Path] | None = None,
    connections: int = DEFAULT_CONNECTIONS,
    pool_shared: bool = True,
) -> dict[str, Any]:
    """Tenaya's config: the built-in load balancer with one upstream, access log off; TLS on
    the listener with ``tls_files`` = (cert, key). HTTP/2 needs no setting: every listener
    takes h2c with prior knowledge, and a TLS listener offers h2 by ALPN.

    ``connections`` is the most requests in flight at once; the pool keeps at least as many idle
    upstream connections.
    """
    listener: dict[str, Any] = {"address": f"{LOOPBACK}:{port}"}
    if tls_files is not None:
        cert, key = tls_files
        listener["tls"] = {
            "cert": str(cert),
            "key": str(key),
            "min_version": TLS_MIN_VERSION,
            "ciphers": TLS12_CIPHERS,
        }
    return {
        "server": {"workers": workers, "grace_period_seconds": TENAYA_GRACE_SECONDS},
        "listeners": [listener],
        "upstreams": {"origin": {"servers": [f"{LOOPBACK}:{origin_port}"]}},
        "pool": {"size_per_worker": max(TENAYA_POOL_SIZE, connections), "shared": pool_shared},
        "logging": {
            "access_log": "off",
            "level": "warning",
            "error_log": str(tmp / "tenaya-error.log"),
        },
    }


def start_nginx(
    nginx: str,
    tmp: Path,
    name: str,
    config: str,
    *,
    port: int,
    workers: int,
    probes: int,
    check: Callable[[int], bool] = probe,
) -> Server:
    """Write the config, start nginx in the foreground and wait until it serves BODY (as
    ``check`` asks for it: by default over plaintext HTTP/1.1)."""
    for kind in NGINX_TEMP_DIRS:
        (tmp / name / kind).mkdir(parents=True, exist_ok=True)
    conf = tmp / f"{name}.conf"
    conf.write_text(config)
    # -e: nginx opens its error log before reading the config; keep even that one in tmp.
    cmd = [nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / f"{name}-error.log")]
    # SIGQUIT is nginx's graceful stop; it has nothing in flight when we stop it.
    server = Server(name, cmd, tmp / f"{name}.out", stop_signal=signal.SIGQUIT)
    wait_ready(server, port, workers=workers, probes=probes, check=check)
    return server


#: The repository this file is in: Tenaya's commands run from it (see ``tenaya_env``).
REPO_ROOT = Path(__file__).resolve().parent.parent


def tenaya_env() -> dict[str, str]:
    """The environment of a Tenaya command: this one with REPO_ROOT first on PYTHONPATH, so
    the code that runs is this checkout's even when the project is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def launch_tenaya(
    conf: Path,
    config: dict[str, Any],
    *,
    port: int,
    workers: int,
    check: Callable[[int], bool] = probe,
) -> Server:
    """Write ``config`` to ``conf``, start ``python -m master start -c conf`` from REPO_ROOT
    (its output in ``conf`` with the suffix ``.out``) and wait until it proxies BODY on
    ``port`` (as ``check`` asks for it); the server is named after the file's stem."""
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
    wait_ready(server, port, workers=workers, probes=PROBES_PER_WORKER * workers, check=check)
    return server


def start_tenaya(
    tmp: Path,
    *,
    port: int,
    origin_port: int,
    workers: int,
    case: Case = CASES[CASE_KEEPALIVE],
    tls_files: tuple[Path, Path] | None = None,
    connections: int = DEFAULT_CONNECTIONS,
    pool_shared: bool = True,
) -> Server:
    """Start ``python -m master start`` with a generated config; wait until it proxies BODY in
    the case's protocol.

    It runs from the repository this file is in (also put on PYTHONPATH), so the code measured
    is this checkout's even when the project is not installed.
    """
    config = tenaya_config(
        tmp, port, origin_port, workers, tls_files=tls_files, connections=connections,
        pool_shared=pool_shared,
    )
    return launch_tenaya(
        tmp / "tenaya.yaml", config, port=port, workers=workers, check=case_probe(case)
    )


# --------------------------------------------------------------------------------------------
# Runs


def _run_tool(name: str, cmd: list[str], duration: int) -> tuple[str | None, str]:
    """Run a load generator with a deadline (``duration`` + WRK_OVERRUN_SECONDS); returns its
    output (None on failure) and a note saying why it failed."""
    limit = duration + WRK_OVERRUN_SECONDS
    try:
        done = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=limit
        )
    except subprocess.TimeoutExpired:
        return None, f"{name} did not finish within {limit:g}s"
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip())[-WRK_ERROR_CHARS:]
        return None, f"{name} exited with {done.returncode}: {said}"
    return done.stdout, ""


def run_wrk(
    wrk: str,
    port: int,
    *,
    case: Case | str,
    threads: int,
    connections: int,
    duration: int,
) -> tuple[WrkResult | None, str]:
    """Run wrk once against the port (HTTPS in the tls case); returns the parsed result (None
    on failure) and a note."""
    c = CASES[case] if isinstance(case, str) else case
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        *c.wrk_args,
        f"{c.scheme}://{LOOPBACK}:{port}/",
    ]
    output, note = _run_tool(TOOL_WRK, cmd, duration)
    if output is None:
        return None, note
    try:
        return parse_wrk(output), ""
    except ValueError as e:
        return None, f"{e}: {output.strip()[-WRK_ERROR_CHARS:]}"


def run_h2load(
    h2load: str,
    port: int,
    *,
    case: Case,
    threads: int,
    connections: int,
    streams: int,
    duration: int,
) -> tuple[H2loadResult | None, str]:
    """Run h2load once against the port (h2c, or h2 over TLS); returns the parsed result (None
    on failure) and a note."""
    url = f"{case.scheme}://{LOOPBACK}:{port}/"
    cmd = h2load_command(
        h2load, url, clients=connections, streams=streams, threads=threads, duration=duration
    )
    output, note = _run_tool(TOOL_H2LOAD, cmd, duration)
    if output is None:
        return None, note
    try:
        return parse_h2load(output), ""
    except ValueError as e:
        return None, f"{e}: {output.strip()[-WRK_ERROR_CHARS:]}"


def run_load(
    tool: str, port: int, case: Case, args: argparse.Namespace, duration: int
) -> tuple[Load | None, str]:
    """One run of the case's load generator (its path is ``tool``) against the port."""
    if case.tool == TOOL_WRK:
        wrk, note = run_wrk(
            tool,
            port,
            case=case,
            threads=args.threads,
            connections=args.connections,
            duration=duration,
        )
        if wrk is None:
            return None, note
        return Load(
            ok_requests=wrk.requests - wrk.non_2xx,
            elapsed_seconds=wrk.elapsed_seconds,
            p99_ms=wrk.p99_ms,
            mean_ms=wrk.mean_ms,
            max_ms=wrk.max_ms,
            errors=wrk.socket_errors,
            non_2xx=wrk.non_2xx,
            problems=[],
            negotiated="",
        ), ""
    h2, note = run_h2load(
        tool,
        port,
        case=case,
        threads=args.threads,
        connections=args.connections,
        streams=args.streams,
        duration=duration,
    )
    if h2 is None:
        return None, note
    problems = []
    if h2.protocol != case.protocol:
        problems.append(f"h2load spoke {h2.protocol or 'nothing'}, not {case.protocol}")
    if h2.failed:
        problems.append(f"h2load: {h2.failed} requests failed")
    if not h2.done:
        problems.append("h2load: no request completed")
    return Load(
        ok_requests=h2.ok,
        elapsed_seconds=h2.elapsed_seconds,
        p99_ms=None,
        mean_ms=h2.mean_ms,
        max_ms=h2.max_ms,
        errors={"errored": h2.errored, "timeout": h2.timeout},
        non_2xx=h2.not_2xx,
        problems=problems,
        negotiated=" ".join(filter(None, (h2.protocol, h2.tls))),
    ), ""


def measure(
    proxy: str, server: Server, port: int, round_no: int, args: argparse.Namespace, tool: str
) -> Run:
    """One counted run: the case's load generator (its path is ``tool``) against the proxy,
    with the proxy's CPU time read before and after."""
    case = CASES[args.case]
    cpu_before, by_pid_before = server.cpu_seconds()
    load, note = run_load(tool, port, case, args, args.duration)
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
    if load is None:
        return Run(
            proxy=proxy,
            round=round_no,
            ok_requests=0,
            rps=0.0,
            p99_ms=None,
            cpu_seconds=cpu,
            requests_per_cpu_second=None,
            socket_errors=0,
            non_2xx=0,
            problems=problems,
            cpu_by_process=cpu_by_process,
        )
    ok = load.ok_requests
    errors = sum(load.errors.values())
    if errors:
        kind = "socket errors " if case.tool == TOOL_WRK else "h2load: "
        problems.append(kind + ", ".join(f"{k} {v}" for k, v in load.errors.items() if v))
    if load.non_2xx:
        limit = "status >= 400" if case.tool == TOOL_WRK else "a status other than 2xx"
        problems.append(f"{load.non_2xx} responses with {limit}")
    problems += load.problems
    return Run(
        proxy=proxy,
        round=round_no,
        ok_requests=ok,
        rps=ok / load.elapsed_seconds if load.elapsed_seconds else 0.0,
        p99_ms=load.p99_ms,
        cpu_seconds=cpu,
        requests_per_cpu_second=ok / cpu if cpu > 0 else None,
        socket_errors=errors,
        non_2xx=load.non_2xx,
        problems=problems,
        cpu_by_process=cpu_by_process,
        mean_ms=load.mean_ms,
        max_ms=load.max_ms,
        negotiated=load.negotiated,
    )


def _fmt(value: float | None, spec: str) -> str:
    """Format a number, or '-' for None."""
    return "-" if value is None else format(value, spec)


def describe_run(run: Run) -> str:
    """One progress line for a run."""
    line = (
        f"round {run.round} {run.proxy:<6}  {run.rps:>9.0f} req/s  p99 "
        f"{_fmt(run.p99_ms, '.2f')} mean {_fmt(run.mean_ms, '.2f')} max "
        f"{_fmt(run.max_ms, '.2f')} ms  cpu {run.cpu_seconds:.2f}s  "
        f"{_fmt(run.requests_per_cpu_second, '.0f')} req/CPU-s"
    )
    return line + (f"  FLAGGED: {'; '.join(run.problems)}" if run.problems else "")


def render_table(summaries: dict[str, Summary], header: str, notes: Sequence[str] = ()) -> str:
    """The human-readable result: one row per proxy, the Tenaya/nginx ratios, then notes."""
    rows = [
        header,
        "",
        f"{'proxy':<8}{'req/s':>10}{'p99 ms':>9}{'mean ms':>9}{'max ms':>9}{'req/CPU-s':>11}"
        f"{'errors':>8}{'non-2xx':>9}{'flagged':>9}",
    ]
    for s in summaries.values():
        rows.append(
            f"{s.proxy:<8}{_fmt(s.median_rps, '.0f'):>10}"
            f"{_fmt(s.median_p99_ms, '.2f'):>9}"
            f"{_fmt(s.median_mean_ms, '.2f'):>9}"
            f"{_fmt(s.median_max_ms, '.2f'):>9}"
            f"{_fmt(s.median_requests_per_cpu_second, '.0f'):>11}"
            f"{s.total_socket_errors:>8}{s.total_non_2xx:>9}"
            f"{s.flagged_runs:>6}/{s.runs}"
        )
    ratios = ratios_of(summaries)
    rows += [
        "",
        "tenaya/nginx (ratio of medians): "
        + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in ratios.items() if v is not None),
    ]
    return "\n".join([*rows, *notes])


def ratios_of(summaries: dict[str, Summary]) -> dict[str, float | None]:
    """Tenaya's medians over nginx's: req/s, req/CPU-s and the latencies."""
    t, n = summaries["tenaya"], summaries["nginx"]
    return {
        "rps": _ratio(t.median_rps, n.median_rps),
        "requests_per_cpu_second": _ratio(
            t.median_requests_per_cpu_second, n.median_requests_per_cpu_second
        ),
        "p99": _ratio(t.median_p99_ms, n.median_p99_ms),
        "mean_latency": _ratio(t.median_mean_ms, n.median_mean_ms),
        "max_latency": _ratio(t.median_max_ms, n.median_max_ms),
    }


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


def in_flight(case: Case, args: argparse.Namespace) -> int:
    """The most requests the load generator keeps in flight at once."""
    connections: int = args.connections
    return connections * (args.streams if case.http2 else 1)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Start the origin and both proxies, run the rounds, stop everything; returns the report."""
    case = CASES[args.case]
    tool = find_tool(case.tool, args.wrk if case.tool == TOOL_WRK else args.h2load)
    nginx = find_tool("nginx", args.nginx, ["/usr/sbin", "/usr/local/sbin"])
    concurrency = in_flight(case, args)
    origin_port, tenaya_port, nginx_port = free_ports(3)
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tenaya-bench-")))
        tls_files = write_certificate(tmp, LOOPBACK) if case.tls else None
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
        tenaya = start_tenaya(
            tmp,
            port=tenaya_port,
            origin_port=origin_port,
            workers=args.workers,
            case=case,
            tls_files=tls_files,
            connections=concurrency,
            pool_shared=not args.no_pool_sharing,
        )
        stack.callback(tenaya.stop)
        proxy = start_nginx(
            nginx,
            tmp,
            "nginx-proxy",
            nginx_proxy_config(
                tmp,
                nginx_port,
                origin_port,
                args.workers,
                concurrency,
                case=case,
                tls_files=tls_files,
            ),
            port=nginx_port,
            workers=args.workers,
            probes=PROBES_PER_WORKER * args.workers,
            check=case_probe(case),
        )
        stack.callback(proxy.stop)
        targets = {"tenaya": (tenaya, tenaya_port), "nginx": (proxy, nginx_port)}
        handshakes = {name: handshake_summary(case, port) for name, (_, port) in targets.items()}

        if args.warmup > 0:
            for name, (_, port) in targets.items():
                load, note = run_load(tool, port, case, args, args.warmup)
                if load is None:
                    print(f"warm-up of {name} failed: {note}", file=sys.stderr)
        order = list(targets)
        for round_no in range(1, args.rounds + 1):
            for name in order if round_no % 2 else reversed(order):
                server, port = targets[name]
                run = measure(name, server, port, round_no, args, tool)
                runs.append(run)
                print(describe_run(run), file=sys.stderr, flush=True)
        tenaya_log = "\n".join(
            _tail(log)
            for log in (tmp / "tenaya-error.log", tenaya.log)
            if log.is_file() and log.stat().st_size
        )
        tenaya_status = tenaya.exited()
    summaries = {name: summarize(name, runs) for name in ("tenaya", "nginx")}
    return {
        "case": case.name,
        "tool": case.tool,
        "workers": args.workers,
        "rounds": args.rounds,
        "duration_seconds": args.duration,
        "connections": args.connections,
        "streams_per_connection": args.streams if case.http2 else 1,
        "threads": args.threads,
        "body_bytes": BODY_BYTES,
        "tls_handshake_by_probe": handshakes,
        "runs": [asdict(r) | {"flagged": r.flagged} for r in runs],
        "summary": {name: asdict(s) for name, s in summaries.items()},
        "ratios_tenaya_over_nginx": ratios_of(summaries),
        "tenaya_alive_at_end": tenaya_status is None,
        "tenaya_exit_status": tenaya_status,  # negative: killed by that signal
        "tenaya_log_tail": tenaya_log,
    }


def report_notes(report: dict[str, Any]) -> list[str]:
    """Lines under the table: what the TLS handshakes negotiated (by the readiness probe, and
    as h2load saw it), whether both proxies agree, and how to read h2load's latencies."""
    notes: list[str] = []
    probe = report["tls_handshake_by_probe"]
    if any(probe.values()):
        notes += [
            "",
            "TLS by probe (Python's ssl client): "
            + "; ".join(f"{name} {what}" for name, what in probe.items()),
        ]
        if len(set(probe.values())) > 1:
            notes.append("WARNING: the proxies negotiated different TLS parameters")
    seen: dict[str, set[str]] = {}
    for run in report["runs"]:
        if run["negotiated"]:
            seen.setdefault(run["proxy"], set()).add(run["negotiated"])
    if seen:
        notes.append(
            "h2load negotiated: "
            + "; ".join(f"{name} {' | '.join(sorted(what))}" for name, what in seen.items())
        )
        if len({frozenset(v) for v in seen.values()}) > 1:
            notes.append("WARNING: h2load negotiated different parameters with the two proxies")
    if report["tool"] == TOOL_H2LOAD:
        notes.append(
            "latency: h2load prints no percentiles; mean and max are its 'time for request'"
        )
    return notes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; every figure of a run can be set."""
    p = argparse.ArgumentParser(prog="scripts/bench", description=DESCRIPTION)
    p.add_argument(
        "--case",
        choices=list(CASES),
        default=CASE_KEEPALIVE,
        help="; ".join(f"{c.name}: {c.help}" for c in CASES.values()),
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
        help="whole seconds per run, as wrk and h2load take them (default %(default)s)",
    )
    p.add_argument(
        "--connections",
        type=int,
        help=f"connections of wrk or h2load (default {DEFAULT_CONNECTIONS} for wrk, "
        f"{H2_DEFAULT_CONNECTIONS} for h2load)",
    )
    p.add_argument(
        "--streams",
        type=int,
        default=H2_DEFAULT_STREAMS,
        help="h2load's concurrent streams per connection, its -m (default %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="wrk or h2load threads (default %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP_SECONDS,
        help="whole seconds of uncounted load per proxy before round 1 (0: none)",
    )
    p.add_argument(
        "--no-pool-sharing",
        action="store_true",
        help="run Tenaya with pool.shared: false (to compare the cost of sharing)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--wrk", help="path of wrk (default: found on PATH)")
    p.add_argument("--h2load", help="path of h2load (default: found on PATH)")
    p.add_argument("--nginx", help="path of nginx (default: found on PATH or in /usr/sbin)")
    args = p.parse_args(argv)
    if args.connections is None:
        http2 = CASES[args.case].tool == TOOL_H2LOAD
        args.connections = H2_DEFAULT_CONNECTIONS if http2 else DEFAULT_CONNECTIONS
    for name in ("workers", "rounds", "connections", "threads", "streams"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.duration < 1 or args.warmup < 0:
        p.error("--duration must be at least 1 and --warmup at least 0")
    if args.threads > args.connections:
        p.error("--threads cannot exceed --connections (each thread needs a connection)")
    if args.streams > H2_MAX_STREAMS:
        p.error(f"--streams cannot exceed {H2_MAX_STREAMS}, the proxies' stream limit")
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
        case = CASES[args.case]
        load = f"wrk -t{args.threads} -c{args.connections}"
        if case.tool == TOOL_H2LOAD:
            load = f"h2load -t{args.threads} -c{args.connections} -m{args.streams}"
        header = (
            f"case {args.case}, {args.workers} worker(s) per proxy, {args.rounds} rounds "
            f"x {args.duration}s, {load}, {BODY_BYTES}-byte body; medians over rounds"
        )
        summaries = {k: Summary(**v) for k, v in report["summary"].items()}
        print(render_table(summaries, header, report_notes(report)))
    if report["tenaya_log_tail"].strip():
        print(f"tenaya's log (tail):\n{report['tenaya_log_tail']}", file=sys.stderr)
    if not report["tenaya_alive_at_end"]:
        status = report["tenaya_exit_status"]
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        print(f"bench: tenaya's master exited during the benchmark ({how})", file=sys.stderr)
    if flagged:
        print(
            f"bench: {flagged} run(s) flagged (errors or process changes); see above",
            file=sys.stderr,
        )
        return EXIT_RUN_ERRORS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
