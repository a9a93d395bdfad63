"""Benchmark: how many upstream connections Tenaya's pool opens, shared between workers or not.

Theory of operation. One nginx process is the origin: it listens on ``--origins`` ports of
loopback (one ``server`` block with a ``listen`` line per port), answers every request with the
same fixed body (``loadtests.servers.BODY``), keeps upstream connections alive for a long time, and
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

The origin's and the proxies' configs and Tenaya's status are in ``loadtests.pool_servers``,
the counting of the origin's access log in ``loadtests.origin_log``, the clients in
``loadtests.pool_client``, the results, tables and JSON report in ``loadtests.pool_report``;
this module runs the scenarios and holds the command line. Starting and stopping servers is
``loadtests.servers``'s, shared with ``loadtests.bench``.

Usage: ``scripts/bench pool`` or ``python -m loadtests.pool_bench --rate 200 --duration 20``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from loadtests.bench import EXIT_OK, EXIT_RUN_ERRORS, EXIT_SETUP_FAILED
from loadtests.clients import parse_wrk
from loadtests.loadgen import WRK_ERROR_CHARS, WRK_OVERRUN_SECONDS
from loadtests.origin_log import OriginLog
from loadtests.pool_client import STEADY_WRK_THREADS, run_sparse_client, steady_wrk_script
from loadtests.pool_report import (
    Results,
    SparseRun,
    SteadyRun,
    build_report,
    render_sparse,
    render_steady,
)
from loadtests.pool_servers import (
    PROXY_NGINX,
    PROXY_SHARED,
    SPARSE_PROXIES,
    nginx_pool_proxy_config,
    origin_ports_config,
    pool_delta,
    tenaya_pool_config,
    tenaya_status,
)
from loadtests.report import flags, fmt
from loadtests.servers import (
    LOOPBACK,
    PROBES_PER_WORKER,
    Server,
    find_tool,
    free_ports,
    launch_tenaya,
    log_tail,
    run_guarded,
    start_nginx,
)

DESCRIPTION = (
    "Count the upstream connections Tenaya opens with its pool shared between workers or not, "
    "against nginx with upstream keep-alive (sparse traffic), and its reuse ratio (steady load)."
)

SCENARIO_SPARSE = "sparse"
SCENARIO_STEADY = "steady"
SCENARIO_ALL = "all"

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

#: Pause after a proxy is ready and after a run, before reading the origin's log and Tenaya's
#: counters: longer than a worker's heartbeat (1 s, when the master's counters are refreshed)
#: and than the time an idle connection stays in a worker before it is donated (1 s).
SETTLE_SECONDS = 2.5

EXIT_TARGETS_MISSED = 3

#: Words of a Tenaya log line (its level) that make the log worth showing.
LOG_ALARMS = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")


# --------------------------------------------------------------------------------------------
# Runs


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
            log_tail(p)
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
                        f"connections" + flags(run.problems),
                        file=sys.stderr,
                        flush=True,
                    )
        if args.scenario in (SCENARIO_STEADY, SCENARIO_ALL):
            results.steady = steady = b.steady()
            print(
                f"steady: {steady.requests} requests, {steady.failures} failures, "
                f"reuse ratio after warm-up {fmt(steady.reuse_ratio_steady, '.5f')}"
                + flags(steady.problems),
                file=sys.stderr,
                flush=True,
            )
        results.tenaya_logs = b.tenaya_logs
    return results


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
    results = run_guarded("pool_bench", lambda: bench(args))
    if results is None:
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
