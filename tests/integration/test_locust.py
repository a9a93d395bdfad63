"""The Locust scenario through the real master: ``loadtests/locustfile.py`` run headless as
``scripts/bench locust`` runs it, for a few seconds with a few users.

One master serves the module, in front of one origin that answers 403 to any request without
the API key header, so a run only passes when the header from ``TENAYA_HEADERS`` reaches the
origin through the proxy. Locust runs as a subprocess of the project's Python (it patches the
standard library with gevent, which has no place in the test process), and the counts are read
from its ``--csv`` statistics.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.config import config_for
from tests.support.master import Master
from tests.support.origin import Origin

if TYPE_CHECKING:
    from tests.conftest import Fleet

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtests" / "locustfile.py"
#: The header the origin requires, and a second one whose value holds a separator-like ``;``.
API_KEY = ("X-Api-Key", "locust-test-key")
TRACE = ("X-Trace", "run=1; step=2")
#: A bounded run: users, users spawned a second, seconds of load.
USERS = 5
SPAWN_RATE = 5
RUN_SECONDS = 3
FAILING_RUN_SECONDS = 2
#: Longest wait for one Locust run, start-up and summary included.
LOCUST_DEADLINE_SECONDS = 60
#: Locust's exit status when a request failed (the ``--exit-code-on-error`` scripts/bench gives).
EXIT_CODE_ON_ERROR = 1
#: The statistics row that adds up every request.
AGGREGATED = "Aggregated"


@dataclass
class LocustRun:
    """What one Locust run reported: its exit status, counts and failures."""

    returncode: int
    requests: int
    failures: int
    #: The ``Name`` column of each request row (the locustfile's tasks that ran).
    names: set[str]
    #: The ``Error`` column of the failure rows, with its occurrences over every request name.
    errors: dict[str, int]
    output: str


@dataclass
class Env:
    master: Master
    origin: Origin


@pytest.fixture(scope="module")
def env(module_fleet: Fleet) -> Env:
    origin = module_fleet.origin("locust", require=API_KEY)
    return Env(module_fleet.master(config_for(upstreams={"main": [origin.address]})), origin)


def run_locust(
    workdir: Path, environ: dict[str, str], args: list[str], seconds: int = RUN_SECONDS
) -> LocustRun:
    """Runs the locustfile headless (``USERS`` users for ``seconds``) with ``environ`` over a
    copy of this process's environment from which every ``LOCUST_*`` and ``TENAYA_*`` variable
    was taken out; ``args`` go to Locust last. Returns its exit status and the aggregated counts
    of its CSV statistics."""
    assert importlib.util.find_spec("locust") is not None, (
        "locust is not installed (it is in the test extras: scripts/test installs it)"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = workdir / "locust"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "TENAYA_"))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--only-summary",
            "--users",
            str(USERS),
            "--spawn-rate",
            str(SPAWN_RATE),
            "--run-time",
            f"{seconds}s",
            "--exit-code-on-error",
            str(EXIT_CODE_ON_ERROR),
            "--csv",
            str(prefix),
            *args,
        ],
        env={**base, **environ},
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LOCUST_DEADLINE_SECONDS,
        check=False,
    )
    output = proc.stdout + proc.stderr
    stats_path = Path(f"{prefix}_stats.csv")
    assert stats_path.exists(), f"locust wrote no statistics (exit {proc.returncode}):\n{output}"
    with open(stats_path, newline="") as f:
        rows = list(csv.DictReader(f))
    total = [r for r in rows if r["Name"] == AGGREGATED]
    assert len(total) == 1, f"no {AGGREGATED} row in {stats_path}:\n{output}"
    errors: dict[str, int] = {}
    with open(f"{prefix}_failures.csv", newline="") as f:
        for r in csv.DictReader(f):  # one row per method, name and error
            errors[r["Error"]] = errors.get(r["Error"], 0) + int(r["Occurrences"])
    return LocustRun(
        proc.returncode,
        int(total[0]["Request Count"]),
        int(total[0]["Failure Count"]),
        {r["Name"] for r in rows if r["Name"] != AGGREGATED},
        errors,
        output,
    )


def test_locust_run_through_the_proxy_sends_the_environment_headers(
    env: Env, tmp_path: Path
) -> None:
    """With the host and the headers from the environment, every request of the mix passes
    the proxy and the origin's check: requests counted, none failed, exit status 0."""
    env.origin.reset()
    run = run_locust(
        tmp_path,
        {
            "TENAYA_HOST": env.master.url,
            "TENAYA_HEADERS": f"{API_KEY[0]}: {API_KEY[1]}\n\n{TRACE[0]}:{TRACE[1]}\n",
        },
        [],
    )
    assert run.requests > 0, run.output
    assert (run.failures, run.errors) == (0, {}), run.output
    assert run.returncode == 0, run.output
    # Every task ran: at ~10 requests a second per user, missing the 1-in-10 POST over this
    # many requests is vanishingly unlikely.
    assert run.names == {"/", "/search?q=[value]", "/submit"}, run.output
    seen = env.origin.requests
    # The origin saw each request Locust counted (one cut short at the end may add one).
    assert len(seen) >= run.requests
    assert {r.method for r in seen} == {"GET", "POST"}
    for r in seen:
        assert r.header_all(API_KEY[0]) == [API_KEY[1]], r
        assert r.header_all(TRACE[0]) == [TRACE[1]], r
    # The POST's own Content-Type is kept beside the environment's headers.
    posts = [r for r in seen if r.method == "POST"]
    assert all(r.header("content-type") == "application/x-www-form-urlencoded" for r in posts)


def test_locust_run_reports_origin_failures_and_exits_non_zero(
    env: Env, tmp_path: Path, refusing_address: str
) -> None:
    """Without the API key the origin answers 403: Locust counts every request as failed, names
    the status in its failures and exits with ``EXIT_CODE_ON_ERROR``. ``--host`` wins over a
    ``TENAYA_HOST`` where nothing listens: the failures are 403s, not refused connections."""
    env.origin.reset()
    run = run_locust(
        tmp_path,
        {"TENAYA_HOST": f"http://{refusing_address}"},
        ["--host", env.master.url],
        FAILING_RUN_SECONDS,
    )
    assert run.requests > 0, run.output
    assert run.failures == run.requests, run.output
    assert run.returncode == EXIT_CODE_ON_ERROR, run.output
    assert run.errors and all("status 403" in error for error in run.errors), run.errors
    assert sum(run.errors.values()) == run.failures
    assert env.origin.requests and all(not r.header_all(API_KEY[0]) for r in env.origin.requests)
