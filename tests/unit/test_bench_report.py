"""loadtests.report: summaries with ranges, the ratios between the three contenders, the table
and its notes about the pump."""

from __future__ import annotations

from typing import Any

import pytest

from loadtests.cases import CASES
from loadtests.report import Run, all_ratios, render_table, report_notes, summarize


def run(proxy: str, round_no: int, rps: float, rpc: float, p99: float) -> Run:
    """A clean run with the given req/s, req/CPU-s and p99."""
    return Run(
        proxy=proxy,
        round=round_no,
        ok_requests=int(rps),
        rps=rps,
        p99_ms=p99,
        cpu_seconds=rps / rpc,
        requests_per_cpu_second=rpc,
        socket_errors=0,
        non_2xx=0,
        mean_ms=p99 / 2,
        max_ms=p99 * 2,
    )


RUNS = [
    run("tenaya", 1, 100, 200, 4.0),
    run("nginx", 1, 400, 1000, 1.0),
    run("pump", 1, 200, 250, 2.0),
    run("tenaya", 2, 120, 240, 6.0),
    run("nginx", 2, 400, 800, 1.0),
    run("pump", 2, 200, 400, 4.0),
]


def report(takes_part: bool = True, why_not: str = "") -> dict[str, Any]:
    """The parts of a report that report_notes reads."""
    return {
        "tls_handshake_by_probe": {"tenaya": "", "nginx": ""},
        "runs": [{"proxy": r.proxy, "negotiated": ""} for r in RUNS],
        "tool": "wrk",
        "pump": {"takes_part": takes_part, "why_not": why_not},
    }


def test_summary_has_ranges() -> None:
    s = summarize("tenaya", RUNS)
    assert (s.median_rps, s.min_rps, s.max_rps) == (110, 100, 120)
    assert (s.min_p99_ms, s.max_p99_ms) == (4.0, 6.0)
    assert (s.min_requests_per_cpu_second, s.max_requests_per_cpu_second) == (200, 240)


def test_ratios_of_medians_and_round_by_round() -> None:
    summaries = {name: summarize(name, RUNS) for name in ("tenaya", "nginx", "pump")}
    ratios = all_ratios(RUNS, summaries)
    assert list(ratios) == ["tenaya/nginx", "tenaya/pump", "pump/nginx"]
    rps = ratios["tenaya/pump"]["rps"]
    assert rps["of_medians"] == pytest.approx(110 / 200)
    assert (rps["min_of_rounds"], rps["max_of_rounds"]) == pytest.approx((0.5, 0.6))
    rpc = ratios["pump/nginx"]["requests_per_cpu_second"]
    assert rpc["of_medians"] == pytest.approx(325 / 900)
    assert (rpc["min_of_rounds"], rpc["max_of_rounds"]) == pytest.approx((0.25, 0.5))
    table = render_table(summaries, "header", report_notes(report()), ratios)
    assert "tenaya/pump" in table and "0.55 [0.50-0.60]" in table
    assert "100-120" in table  # Tenaya's req/s range
    assert "the Python ceiling" in table


def test_without_the_pump_only_tenaya_over_nginx() -> None:
    runs = [r for r in RUNS if r.proxy != "pump"]
    summaries = {name: summarize(name, runs) for name in ("tenaya", "nginx")}
    assert list(all_ratios(runs, summaries)) == ["tenaya/nginx"]
    notes = report_notes(report(False, "--no-pump"))
    assert "pump: does not take part (--no-pump)" in notes


def test_the_pump_takes_part_in_cleartext_http1_cases_only() -> None:
    assert {name for name, case in CASES.items() if case.pump} == {"keepalive", "close"}
