"""Running the load generators: one run of wrk or h2load against a proxy, with a deadline,
its output parsed (by ``loadtests.clients``) into a ``Load``, the terms a benchmark run needs:
successful requests, latencies, errors and what the connections negotiated.
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from loadtests.cases import CASES, TOOL_H2LOAD, TOOL_WRK, Case
from loadtests.clients import H2loadResult, WrkResult, h2load_command, parse_h2load, parse_wrk
from loadtests.servers import LOOPBACK

#: A wrk or h2load run longer than its duration plus this is killed and recorded as failed.
WRK_OVERRUN_SECONDS = 30.0
#: How much of wrk's (or h2load's) output a failed run quotes.
WRK_ERROR_CHARS = 500

T = TypeVar("T")


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


def _run_tool(
    name: str, cmd: list[str], duration: int, parse: Callable[[str], T]
) -> tuple[T | None, str]:
    """Run a load generator with a deadline (``duration`` + WRK_OVERRUN_SECONDS); returns its
    output as ``parse`` reads it (None on failure) and a note saying why it failed."""
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
    try:
        return parse(done.stdout), ""
    except ValueError as e:
        return None, f"{e}: {done.stdout.strip()[-WRK_ERROR_CHARS:]}"


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
    return _run_tool(TOOL_WRK, cmd, duration, parse_wrk)


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
    return _run_tool(TOOL_H2LOAD, cmd, duration, parse_h2load)


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
