"""The pool benchmark's results and how they are shown: a run of each scenario, the medians
and the targets of the sparse scenario, the reuse ratios of the steady one, the two tables and
the JSON report. Nothing here starts a server or a client.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtests.origin_log import OriginCount
from loadtests.pool_client import STEADY_WRK_THREADS
from loadtests.pool_servers import (
    NGINX_POOL_KEEPALIVE,
    PROXY_LABELS,
    PROXY_NGINX,
    PROXY_SHARED,
    PROXY_UNSHARED,
    SPARSE_PROXIES,
)
from loadtests.report import fmt, median
from loadtests.servers import BODY

#: The goals of the issue: shared Tenaya opens at most this share of unshared Tenaya's new
#: upstream connections (sparse), and reuses at least this share of connections (steady).
TARGET_SHARED_OVER_UNSHARED = 1 / 3
TARGET_STEADY_REUSE_RATIO = 0.999


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


def sparse_summary(runs: Sequence[SparseRun]) -> dict[str, Any]:
    """Per proxy: median new connections and total failures; the targets on those medians."""
    new = {
        p: median([r.origin.new_connections for r in runs if r.proxy == p]) for p in SPARSE_PROXIES
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
            f"{fmt(pool.get('connections_created'), 'd'):>9}"
            f"{fmt(pool.get('reused_local'), 'd'):>7}"
            f"{fmt(pool.get('reused_shared'), 'd'):>7}"
            f"{fmt(t.get('window_reuse_ratio'), '.3f'):>8}"
            f"{fmt(broker.get('donated'), 'd'):>9}"
            f"{fmt(broker.get('lent'), 'd'):>6}"
            f"{fmt(broker.get('misses'), 'd'):>6}"
            f"{r.cpu_seconds:>7.2f}"
        )
    new = summary["median_new_connections"]
    rows += [
        "",
        "NEW CONNS: first requests of connections in the origin's access log (2nd half: of"
        " them, in the later half of the run); created/local/shared/reuse: Tenaya's pool"
        " counters over the run; donated/lent/miss: its broker's.",
        f"new upstream connections (median): shared {fmt(new[PROXY_SHARED], 'g')}, "
        f"unshared {fmt(new[PROXY_UNSHARED], 'g')}, nginx {fmt(new[PROXY_NGINX], 'g')}",
        f"target shared/unshared <= 1/3: {fmt(summary['shared_over_unshared'], '.3f')} "
        f"{_pass(summary['target_shared_over_unshared_met'])}; "
        f"target shared < nginx: shared/nginx {fmt(summary['shared_over_nginx'], '.3f')} "
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
        f"{fmt(run.reuse_ratio_whole, '.5f'):>13}",
        f"{'after warm-up':<16}{run.steady.requests:>11}{run.steady.new_connections:>10}"
        f"{fmt(steady, '.5f'):>13}",
        "",
        f"wrk: {run.requests} responses ({run.rps:.0f}/s), {run.failures} failures; "
        f"tenaya cpu {run.cpu_seconds:.2f} s",
        f"tenaya status over the run: upstream_requests {fmt(pool.get('upstream_requests'), 'd')}"
        f", created {fmt(pool.get('connections_created'), 'd')}, reused_local "
        f"{fmt(pool.get('reused_local'), 'd')}, reused_shared "
        f"{fmt(pool.get('reused_shared'), 'd')}, reuse ratio "
        f"{fmt(t.get('window_reuse_ratio'), '.5f')} (status reuse_ratio since start "
        f"{fmt(t.get('status_reuse_ratio'), '.5f')})",
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
