"""The benchmark's results and how they are shown: one Run per proxy and round, medians over
the rounds (``Summary``), the Tenaya/nginx ratios, the progress lines and the table with its
notes. Nothing here starts a server or a load generator.

``median``, ``fmt`` and ``flags`` serve ``loadtests.pool_report`` too.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtests.cases import TOOL_H2LOAD


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


def median(values: Sequence[float | None]) -> float | None:
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
        median_rps=median([r.rps for r in mine]),
        median_p99_ms=median([r.p99_ms for r in mine]),
        median_requests_per_cpu_second=median([r.requests_per_cpu_second for r in mine]),
        total_socket_errors=sum(r.socket_errors for r in mine),
        total_non_2xx=sum(r.non_2xx for r in mine),
        median_mean_ms=median([r.mean_ms for r in mine]),
        median_max_ms=median([r.max_ms for r in mine]),
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unknown or b is zero."""
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str) -> str:
    """Format a number, or '-' for None."""
    return "-" if value is None else format(value, spec)


def flags(problems: Sequence[str]) -> str:
    """The end of a progress line: why the run is flagged, if it is."""
    return f"  FLAGGED: {'; '.join(problems)}" if problems else ""


def describe_run(run: Run) -> str:
    """One progress line for a run."""
    line = (
        f"round {run.round} {run.proxy:<6}  {run.rps:>9.0f} req/s  p99 "
        f"{fmt(run.p99_ms, '.2f')} mean {fmt(run.mean_ms, '.2f')} max "
        f"{fmt(run.max_ms, '.2f')} ms  cpu {run.cpu_seconds:.2f}s  "
        f"{fmt(run.requests_per_cpu_second, '.0f')} req/CPU-s"
    )
    return line + flags(run.problems)


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
            f"{s.proxy:<8}{fmt(s.median_rps, '.0f'):>10}"
            f"{fmt(s.median_p99_ms, '.2f'):>9}"
            f"{fmt(s.median_mean_ms, '.2f'):>9}"
            f"{fmt(s.median_max_ms, '.2f'):>9}"
            f"{fmt(s.median_requests_per_cpu_second, '.0f'):>11}"
            f"{s.total_socket_errors:>8}{s.total_non_2xx:>9}"
            f"{s.flagged_runs:>6}/{s.runs}"
        )
    ratios = ratios_of(summaries)
    rows += [
        "",
        "tenaya/nginx (ratio of medians): "
        + ", ".join(f"{k} {fmt(v, '.2f')}" for k, v in ratios.items() if v is not None),
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
