"""Benchmark: Tenaya against nginx and against a bare Python proxy, in the same run, on loopback.

Theory of operation. One nginx process serves as the origin: it answers every request with the
same fixed 100-byte body over plaintext HTTP/1.1. The contenders stand in front of it, each with
the same worker count: Tenaya (``python -m master start``), nginx with upstream keep-alive, and
the pump (``loadtests.pump``: a minimal HTTP/1.1 keep-alive proxy on uvloop and httptools, the
least per-request work a Python proxy can do, "the Python ceiling"; machines differ in how much
they slow Python down, so Tenaya's figures are quoted against both). A load generator then loads
them in turns, and the order flips every round (T N P, P N T, T N P, ...) so that a slow drift
of the shared, noisy machine weighs on all alike. The pump speaks cleartext HTTP/1.1 only, so it
takes part in the keepalive and close cases, not in tls, h2c and h2tls (``--no-pump`` leaves it
out of every case). The case decides what the clients speak to the proxies (the proxies always
speak HTTP/1.1 to the origin):

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

The table shows the median over rounds for each proxy, the range (min-max) of its main figures,
and the ratios Tenaya/nginx, Tenaya/pump and pump/nginx: the ratio of the medians, and in brackets
the range of the same ratio taken round by round (each round's runs are close in time). Every
child
runs in its own process group and is stopped in a ``finally`` (also on Ctrl-C or SIGTERM); every
wait has a deadline; readiness is polled (a GET through the proxy must return the origin's body).

The cases are in ``loadtests.cases``, the servers (start, stop, configs, readiness) in
``loadtests.servers``, the load generators' runs in ``loadtests.loadgen``, the summaries and
the table in ``loadtests.report``; this module measures a run and holds the command line.

Usage: ``scripts/bench`` or ``python -m loadtests.bench --rounds 5 --duration 5 --case close``
(``--case tls``, ``--case h2c``, ``--case h2tls``; ``--no-pump``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtests.cases import (
    CASE_KEEPALIVE,
    CASES,
    DEFAULT_CONNECTIONS,
    DEFAULT_DURATION_SECONDS,
    DEFAULT_ROUNDS,
    DEFAULT_THREADS,
    DEFAULT_WARMUP_SECONDS,
    DEFAULT_WORKERS,
    H2_DEFAULT_CONNECTIONS,
    H2_DEFAULT_STREAMS,
    H2_MAX_STREAMS,
    TOOL_H2LOAD,
    TOOL_WRK,
    Case,
)
from loadtests.clients import write_certificate
from loadtests.loadgen import run_load
from loadtests.report import (
    Run,
    Summary,
    all_ratios,
    describe_run,
    ratios_of,
    render_table,
    report_notes,
    summarize,
)
from loadtests.servers import (
    BODY_BYTES,
    LOOPBACK,
    PROBES_PER_WORKER,
    Server,
    case_probe,
    find_tool,
    free_ports,
    handshake_summary,
    log_tail,
    nginx_proxy_config,
    origin_config,
    run_guarded,
    start_nginx,
    start_pump,
    start_tenaya,
)

DESCRIPTION = (
    "Benchmark Tenaya against nginx and a bare uvloop + httptools proxy (the pump) as reverse "
    "proxies (requests/s, p99, req/CPU-s)."
)
#: CPU times are ticks of 10 ms; more digits would be noise.
CPU_DIGITS = 2

EXIT_OK = 0
EXIT_RUN_ERRORS = 1
EXIT_SETUP_FAILED = 2


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


def in_flight(case: Case, args: argparse.Namespace) -> int:
    """The most requests the load generator keeps in flight at once."""
    connections: int = args.connections
    return connections * (args.streams if case.http2 else 1)


def pump_absence(case: Case, args: argparse.Namespace) -> str:
    """Why the pump does not take part in this run, or "" when it does."""
    if args.no_pump:
        return "--no-pump"
    if not case.pump:
        return f"it speaks cleartext HTTP/1.1 only, and case {case.name} is not"
    return ""


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Start the origin and the contenders, run the rounds, stop everything; returns the
    report."""
    case = CASES[args.case]
    why_no_pump = pump_absence(case, args)
    tool = find_tool(case.tool, args.wrk if case.tool == TOOL_WRK else args.h2load)
    nginx = find_tool("nginx", args.nginx, ["/usr/sbin", "/usr/local/sbin"])
    concurrency = in_flight(case, args)
    origin_port, tenaya_port, nginx_port, pump_port = free_ports(4)
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
        pump: Server | None = None
        if not why_no_pump:
            pump = start_pump(tmp, port=pump_port, origin_port=origin_port, workers=args.workers)
            stack.callback(pump.stop)
            targets["pump"] = (pump, pump_port)
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
            log_tail(log)
            for log in (tmp / "tenaya-error.log", tenaya.log)
            if log.is_file() and log.stat().st_size
        )
        tenaya_status = tenaya.exited()
        pump_status = pump.exited() if pump is not None else None
        pump_log = log_tail(pump.log) if pump is not None and pump.log.stat().st_size else ""
    summaries = {name: summarize(name, runs) for name in targets}
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
        "ratios": all_ratios(runs, summaries),
        "pump": {"takes_part": not why_no_pump, "why_not": why_no_pump},
        "tenaya_alive_at_end": tenaya_status is None,
        "tenaya_exit_status": tenaya_status,  # negative: killed by that signal
        "tenaya_log_tail": tenaya_log,
        "pump_alive_at_end": None if why_no_pump else pump_status is None,
        "pump_exit_status": pump_status,
        "pump_log_tail": pump_log,
    }


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
    p.add_argument(
        "--no-pump",
        action="store_true",
        help="leave out the pump (the bare uvloop + httptools proxy, loadtests/pump.py)",
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
    report = run_guarded("bench", lambda: bench(args))
    if report is None:
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
        print(render_table(summaries, header, report_notes(report), report["ratios"]))
    if report["tenaya_log_tail"].strip():
        print(f"tenaya's log (tail):\n{report['tenaya_log_tail']}", file=sys.stderr)
    if not report["tenaya_alive_at_end"]:
        status = report["tenaya_exit_status"]
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        print(f"bench: tenaya's master exited during the benchmark ({how})", file=sys.stderr)
    if report["pump_log_tail"].strip():
        print(f"the pump's log (tail):\n{report['pump_log_tail']}", file=sys.stderr)
    if report["pump_alive_at_end"] is False:
        status = report["pump_exit_status"]
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        print(f"bench: the pump exited during the benchmark ({how})", file=sys.stderr)
    if flagged:
        print(
            f"bench: {flagged} run(s) flagged (errors or process changes); see above",
            file=sys.stderr,
        )
        return EXIT_RUN_ERRORS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
