"""``python -m master status`` as text: the upstream pool figures the JSON has (per worker,
the totals and the broker) are shown, with the same numbers; without a control socket it says
that they are not known."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import Fleet
from tests.support.client import HttpConn, get
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.waits import wait_for

#: Requests sent through the proxy: some on a connection each, the rest on one keep-alive
#: client connection (so one worker reuses its upstream connection).
SINGLE_REQUESTS = 8
KEEPALIVE_REQUESTS = 12

POOL_LINE = re.compile(
    r"pool: (\d+) upstream requests?, (\d+) reused \((\d+\.\d)%: (\d+) local, (\d+) from the "
    r"broker\), (\d+) new connections?, (\d+) donated to the broker(; exited workers included)?"
)
BROKER_LINE = re.compile(
    r"broker: (\d+) idle, (\d+) received, (\d+) lent, (\d+) borrows? "
    r"missed, (\d+) dropped"
)
POOL_HEADER = [
    "pid",
    "upstream",
    "reused",
    "reuse",
    "%",
    "local",
    "borrowed",
    "new",
    "conns",
    "donated",
]


def command(m: Master, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "master", "status", "-c", str(m.config_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


def counters(data: dict[str, Any]) -> Any:
    """The parts of the JSON that the text's pool figures come from."""
    return (data["pool"], data["broker"], [(w["pid"], w["pool"]) for w in data["workers"]])


def snapshot(m: Master) -> tuple[dict[str, Any], str]:
    """The JSON and the text of one moment: read until the counters did not move between a
    JSON before and a JSON after the text (a local pool may donate an idle connection to the
    broker at any time)."""
    found: list[tuple[dict[str, Any], str]] = []

    def steady() -> bool:
        before = json.loads(command(m, "--json"))
        text = command(m)
        after = json.loads(command(m, "--json"))
        found[:] = [(after, text)]
        return counters(before) == counters(after)

    wait_for(steady, timeout=20, interval=0.3, what="pool counters to hold still")
    return found[0]


def pool_rows(text: str) -> dict[int, list[str]]:
    """The rows of the per-worker pool table by pid (the table under the ``upstream``
    header)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == POOL_HEADER)
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith(("pool:", "broker:")):
            break
        fields = line.split()
        rows[int(fields[0])] = fields[1:]
    return rows


def assert_text_matches(data: dict[str, Any], text: str) -> re.Match[str]:
    """Every pool figure of ``text`` is the JSON's; returns the match of the totals line."""
    totals = data["pool"]
    match = POOL_LINE.search(text)
    assert match, text
    requests, reused, percent, local, shared, created, donated = (
        match.group(i) for i in range(1, 8)
    )
    assert int(requests) == totals["upstream_requests"]
    assert int(local) == totals["reused_local"]
    assert int(shared) == totals["reused_shared"]
    assert int(reused) == totals["reused_local"] + totals["reused_shared"]
    assert percent == f"{100 * totals['reuse_ratio']:.1f}"
    assert int(created) == totals["connections_created"]
    assert int(donated) == totals["donated"]

    broker = BROKER_LINE.search(text)
    assert broker, text
    assert [int(g) for g in broker.groups()] == [
        data["broker"][name] for name in ("idle", "donated", "lent", "misses", "dropped")
    ]

    rows = pool_rows(text)
    assert sorted(rows) == sorted(w["pid"] for w in data["workers"]), text
    for w in data["workers"]:
        p = w["pool"]
        if not p:  # a worker whose first heartbeat has not come yet
            assert rows[w["pid"]] == ["-"] * 7, text
            continue
        reused_w = p["reused_local"] + p["reused_shared"]
        share = f"{100 * reused_w / p['upstream_requests']:.1f}%" if p["upstream_requests"] else "-"
        assert rows[w["pid"]] == [
            str(p["upstream_requests"]),
            str(reused_w),
            share,
            str(p["reused_local"]),
            str(p["reused_shared"]),
            str(p["connections_created"]),
            str(p["donated"]),
        ], text
    return match


def test_status_text_shows_the_pool_figures_of_the_json(fleet: Fleet, tmp_path: Path) -> None:
    """After traffic, the text has one pool row per worker, a ``pool:`` totals line and a
    ``broker:`` line, each with the JSON's numbers; after a reload the totals keep the figures
    of the workers that exited, and say so."""
    origin = fleet.origin()
    m = fleet.master(
        config_for(
            {"origin": [origin.address]}, server={"control_socket": str(tmp_path / "ctl.sock")}
        )
    )
    for _ in range(SINGLE_REQUESTS):
        assert get(m.port, "/").status == 200
    with HttpConn(m.port) as conn:
        for _ in range(KEEPALIVE_REQUESTS):
            assert conn.request("GET", "/").status == 200
    sent = SINGLE_REQUESTS + KEEPALIVE_REQUESTS
    wait_for(
        lambda: json.loads(command(m, "--json"))["pool"]["upstream_requests"] >= sent,
        timeout=10,
        interval=0.3,
        what="the heartbeats to report the requests",
    )

    data, text = snapshot(m)
    assert data["pool"]["upstream_requests"] == sent
    assert data["pool"]["reused_local"] + data["pool"]["reused_shared"] >= 1, data
    match = assert_text_matches(data, text)
    assert match.group(8) is None, text  # no worker has exited

    subprocess.run(
        [sys.executable, "-m", "master", "reload", "-c", str(m.config_path)],
        check=True,
        timeout=30,
        capture_output=True,
    )
    wait_for(
        lambda: (
            [
                (w["generation"], bool(w["pool"]))
                for w in json.loads(command(m, "--json"))["workers"]
            ]
            == [(2, True), (2, True)]
        ),
        timeout=30,
        interval=0.3,
        what="generation 2 alone, heard from",
    )
    data, text = snapshot(m)
    assert data["pool"]["upstream_requests"] == sent
    match = assert_text_matches(data, text)
    assert match.group(8) is not None, text


def test_status_text_without_control_socket_says_pool_figures_are_unknown(
    fleet: Fleet, tmp_path: Path
) -> None:
    """From the pid file alone there are no counters: the text says so instead of numbers."""
    origin = fleet.origin()
    m = fleet.master(
        config_for({"origin": [origin.address]}, server={"pid_file": str(tmp_path / "tenaya.pid")})
    )
    lines = command(m).splitlines()
    assert lines[-1] == "pool: no figures without the control socket (server.control_socket)"
    assert not any(line.startswith("broker:") for line in lines)
