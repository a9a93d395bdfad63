"""The benchmark's results and how they are shown: one Run per proxy and round, medians and
ranges over the rounds (``Summary``), the ratios between the contenders (Tenaya/nginx,
Tenaya/pump, pump/nginx: of the medians, and the same ratio round by round), the progress lines
and the table with its notes. Nothing here starts a server or a load generator.

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

    proxy: str  #: "tenaya", "nginx" or "pump"
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
    """Medians over the rounds of one proxy, and the lowest and highest value of the main
    figures (None when no run had the figure)."""

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
    min_rps: float | None = None
    max_rps: float | None = None
    min_p99_ms: float | None = None
    max_p99_ms: float | None = None
    min_mean_ms: float | None = None
    max_mean_ms: float | None = None
    min_requests_per_cpu_second: float | None = None
    max_requests_per_cpu_second: float | None = None


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values that are not None; None if there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def low_high(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(min, max) of the values that are not None; (None, None) if there are none."""
    present = [v for v in values if v is not None]
    return (min(present), max(present)) if present else (None, None)


def summarize(proxy: str, runs: Sequence[Run]) -> Summary:
    """Medians and error totals of one proxy's runs."""
    mine = [r for r in runs if r.proxy == proxy]
    min_rps, max_rps = low_high([r.rps for r in mine])
    min_p99, max_p99 = low_high([r.p99_ms for r in mine])
    min_mean, max_mean = low_high([r.mean_ms for r in mine])
    min_rpc, max_rpc = low_high([r.requests_per_cpu_second for r in mine])
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
        min_rps=min_rps,
        max_rps=max_rps,
        min_p99_ms=min_p99,
        max_p99_ms=max_p99,
        min_mean_ms=min_mean,
        max_mean_ms=max_mean,
        min_requests_per_cpu_second=min_rpc,
        max_requests_per_cpu_second=max_rpc,
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


#: The ratios the report shows, numerator over denominator, in this order.
PAIRS: tuple[tuple[str, str], ...] = (("tenaya", "nginx"), ("tenaya", "pump"), ("pump", "nginx"))
#: Each ratio: its key in the JSON report, the Summary median and the Run figure it divides,
#: and its column in the table.
RATIO_FIGURES: tuple[tuple[str, str, str, str], ...] = (
    ("rps", "median_rps", "rps", "req/s"),
    (
        "requests_per_cpu_second",
        "median_requests_per_cpu_second",
        "requests_per_cpu_second",
        "req/CPU-s",
    ),
    ("p99", "median_p99_ms", "p99_ms", "p99"),
    ("mean_latency", "median_mean_ms", "mean_ms", "mean"),
    ("max_latency", "median_max_ms", "max_ms", "max"),
)


def pair_name(numerator: str, denominator: str) -> str:
    """How a ratio is named in the report: ``tenaya/nginx``."""
    return f"{numerator}/{denominator}"


def ratios_of(
    summaries: dict[str, Summary], numerator: str = "tenaya", denominator: str = "nginx"
) -> dict[str, float | None]:
    """One proxy's medians over another's (by default Tenaya's over nginx's): req/s,
    req/CPU-s and the latencies."""
    a, b = summaries[numerator], summaries[denominator]
    return {key: _ratio(getattr(a, attr), getattr(b, attr)) for key, attr, _, _ in RATIO_FIGURES}


def round_ratios(runs: Sequence[Run], numerator: str, denominator: str) -> dict[str, list[float]]:
    """The same ratio round by round: each round's figure of one proxy over the other's, for
    the rounds where both have it."""
    by_round = {(r.proxy, r.round): r for r in runs}
    rounds = sorted({r.round for r in runs})
    out: dict[str, list[float]] = {}
    for key, _, field_name, _ in RATIO_FIGURES:
        values = []
        for n in rounds:
            a, b = by_round.get((numerator, n)), by_round.get((denominator, n))
            if a is None or b is None:
                continue
            ratio = _ratio(getattr(a, field_name), getattr(b, field_name))
            if ratio is not None:
                values.append(ratio)
        out[key] = values
    return out


def all_ratios(
    runs: Sequence[Run], summaries: dict[str, Summary]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Every ratio of PAIRS whose two proxies took part, by pair name and figure:
    ``of_medians`` (the ratio of the two medians), and ``median_of_rounds``, ``min_of_rounds``
    and ``max_of_rounds`` of the same ratio round by round."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for numerator, denominator in PAIRS:
        if numerator not in summaries or denominator not in summaries:
            continue
        of_medians = ratios_of(summaries, numerator, denominator)
        per_round = round_ratios(runs, numerator, denominator)
        figures: dict[str, dict[str, float | None]] = {}
        for key, _, _, _ in RATIO_FIGURES:
            low, high = low_high(per_round[key])
            figures[key] = {
                "of_medians": of_medians[key],
                "median_of_rounds": median(per_round[key]),
                "min_of_rounds": low,
                "max_of_rounds": high,
            }
        out[pair_name(numerator, denominator)] = figures
    return out


def _span(low: float | None, high: float | None, spec: str) -> str:
    """``low-high``, or '-' when unknown."""
    return "-" if low is None or high is None else f"{low:{spec}}-{high:{spec}}"


def render_table(
    summaries: dict[str, Summary],
    header: str,
    notes: Sequence[str] = (),
    ratios: dict[str, dict[str, dict[str, float | None]]] | None = None,
) -> str:
    """The human-readable result: one row of medians per proxy, their ranges over the rounds,
    the ratios (``all_ratios``; without them, Tenaya/nginx of the medians), then notes."""
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
    rows += [
        "",
        "ranges over rounds (min-max):",
        f"{'proxy':<8}{'req/s':>16}{'p99 ms':>14}{'mean ms':>14}{'req/CPU-s':>16}",
    ]
    for s in summaries.values():
        rows.append(
            f"{s.proxy:<8}{_span(s.min_rps, s.max_rps, '.0f'):>16}"
            f"{_span(s.min_p99_ms, s.max_p99_ms, '.2f'):>14}"
            f"{_span(s.min_mean_ms, s.max_mean_ms, '.2f'):>14}"
            f"{_span(s.min_requests_per_cpu_second, s.max_requests_per_cpu_second, '.0f'):>16}"
        )
    if ratios is None:
        of_medians = ratios_of(summaries)
        ratios = {
            pair_name("tenaya", "nginx"): {
                k: {"of_medians": v, "min_of_rounds": None, "max_of_rounds": None}
                for k, v in of_medians.items()
            }
        }
    rows += [
        "",
        "ratios: of the medians [min-max of the same ratio round by round]",
        f"{'':<13}" + "".join(f" {label:>17}" for _, _, _, label in RATIO_FIGURES),
    ]
    for pair, figures in ratios.items():
        cells = []
        for key, _, _, _ in RATIO_FIGURES:
            f = figures[key]
            cell = fmt(f["of_medians"], ".2f")
            if f["min_of_rounds"] is not None:
                cell += f" [{_span(f['min_of_rounds'], f['max_of_rounds'], '.2f')}]"
            cells.append(f" {cell:>17}")  # at least one space between cells
        rows.append(f"{pair:<13}" + "".join(cells))
    return "\n".join([*rows, *notes])


def report_notes(report: dict[str, Any]) -> list[str]:
    """Lines under the table: what the TLS handshakes negotiated (by the readiness probe, and
    as h2load saw it), whether the proxies agree, whether the pump took part, and how to read
    h2load's latencies."""
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
            notes.append("WARNING: h2load negotiated different parameters with the proxies")
    pump = report["pump"]
    notes.append("")
    if pump["takes_part"]:
        notes.append(
            "pump: a bare uvloop + httptools HTTP/1.1 proxy in Python (loadtests/pump.py), "
            "the Python ceiling"
        )
    else:
        notes.append(f"pump: does not take part ({pump['why_not']})")
    if report["tool"] == TOOL_H2LOAD:
        notes.append(
            "latency: h2load prints no percentiles; mean and max are its 'time for request'"
        )
    return notes
