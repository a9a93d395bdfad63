"""master.health: the thresholds, the check's bytes, the master-prober frames, the plan from a
config, and the scheduler on a real loop with fake probes (the first check at start, the
interval, a hang that delays nobody else, plans that keep or change schedules)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator

import pytest

from master.health import (
    CONNECTED,
    CheckSpec,
    FrameReader,
    PlanApplied,
    ProbePlan,
    Prober,
    StateChanged,
    Target,
    encode,
    keys_from_config,
    message,
    parse_status_line,
    plan_from_config,
    record,
    request_bytes,
)
from shared.config import from_mapping
from shared.shm.health import Failure, HealthDirectory, HealthTable, State


@pytest.fixture
def table() -> Iterator[HealthTable]:
    t = HealthTable.create(8)
    yield t
    t.close()


def _target(row: int = 0, **check: float | int | str | None) -> Target:
    return Target(row, "origin", f"127.0.0.1:{9001 + row}", CheckSpec(**check))  # type: ignore[arg-type]


# -- the thresholds ---------------------------------------------------------------------------


def test_unhealthy_threshold_failures_take_a_server_down(table: HealthTable) -> None:
    """UNKNOWN (up) stays up through two refused connects and goes DOWN at the third; the
    message names the server, the upstream, the reason and the count."""
    t = _target(path="/h")
    assert record(table, t, Failure.REFUSED, 10) is None
    assert record(table, t, Failure.REFUSED, 10) is None
    assert table.falls[0] == 2 and table.state[0] == State.UNKNOWN
    down = record(table, t, Failure.REFUSED, 10)
    assert down is not None and down.new is State.DOWN and table.state[0] == State.DOWN
    assert message(t, down) == (
        "server 127.0.0.1:9001 of upstream origin is DOWN: connect refused (3 checks)"
    )
    assert table.checks[0] == 3 and table.last_result[0] == Failure.REFUSED
    assert table.since_ns[0] > 0


def test_healthy_threshold_passes_bring_it_back(table: HealthTable) -> None:
    """A DOWN server needs healthy_threshold consecutive passes; a failure between starts the
    count again."""
    t = _target(path="/h", unhealthy_threshold=1, healthy_threshold=2)
    assert record(table, t, Failure.TIMEOUT, 10) is not None
    assert record(table, t, 200, 10) is None
    assert record(table, t, Failure.TIMEOUT, 10) is None  # still down, the pass count restarts
    assert table.rises[0] == 0
    assert record(table, t, 204, 10) is None
    up = record(table, t, 302, 10)
    assert up is not None and up.new is State.UP and up.count == 2
    assert message(t, up).endswith("is UP: status 302 (2 checks)")


def test_a_bad_status_is_down_at_once(table: HealthTable) -> None:
    """Envoy's rule: a status outside 2xx/3xx marks the server down at once, whatever the
    threshold; a 1xx final status or a 4xx too."""
    for status in (500, 404, 503):
        table.state[0] = State.UP
        table.falls[0] = 0
        t = _target(path="/h", unhealthy_threshold=5)
        down = record(table, t, status, 10)
        assert down is not None and down.new is State.DOWN and down.count == 1


def test_the_first_pass_is_quiet(table: HealthTable) -> None:
    """UNKNOWN -> UP on the first pass changes nothing for anyone: no transition, no log."""
    assert record(table, _target(), CONNECTED, 10) is None
    assert table.state[0] == State.UP and table.rises[0] == 1


def test_a_pass_clears_the_failures(table: HealthTable) -> None:
    """Failures count only while consecutive."""
    t = _target(path="/h")
    record(table, t, Failure.RESET, 10)
    record(table, t, Failure.RESET, 10)
    record(table, t, 200, 10)
    record(table, t, Failure.RESET, 10)
    assert table.falls[0] == 1 and table.state[0] == State.UP


# -- the check's bytes ------------------------------------------------------------------------


def test_request_and_status_line() -> None:
    """GET path HTTP/1.1 with Host and Connection: close; the status of an HTTP/1.x line."""
    assert request_bytes("/healthz", "10.0.0.1:80").startswith(
        b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.1:80\r\n"
    )
    assert request_bytes("/", "h").endswith(b"Connection: close\r\n\r\n")
    assert parse_status_line(b"HTTP/1.1 200 OK\r\n") == 200
    assert parse_status_line(b"HTTP/1.0 503\r\n") == 503
    assert parse_status_line(b"SSH-2.0-OpenSSH\r\n") == Failure.BAD_RESPONSE
    assert parse_status_line(b"HTTP/1.1 2000 OK\r\n") == Failure.BAD_RESPONSE
    assert parse_status_line(b"HTTP/2 200\r\n") == Failure.BAD_RESPONSE


# -- frames -----------------------------------------------------------------------------------


def test_frames_round_trip_however_cut() -> None:
    """A plan and the events survive the stream cut anywhere; an unknown type is skipped."""
    plan = ProbePlan(3, (_target(0, path="/h"), _target(1)), (5, 6))
    stream = encode(plan) + encode(StateChanged(1, 2)) + encode(PlanApplied(3))
    import msgpack

    unknown = msgpack.packb({"t": "future", "x": 1})
    stream += len(unknown).to_bytes(4, "big") + unknown
    for cut in range(1, len(stream)):
        reader = FrameReader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == [plan, StateChanged(1, 2), PlanApplied(3)]


def test_a_corrupt_stream_raises() -> None:
    """A length past the limit is a corrupt stream, not a wait for 4 GB."""
    with pytest.raises(ValueError):
        FrameReader().feed(b"\xff\xff\xff\xff")


# -- the plan ---------------------------------------------------------------------------------


def test_plan_from_config(table: HealthTable) -> None:
    """Servers with a health_check become targets with its settings (HAProxy's defaults);
    those of an upstream without one are unchecked rows."""
    config = from_mapping(
        {
            "upstreams": {
                "origin": {
                    "servers": ["127.0.0.1:9001", {"address": "127.0.0.1:9002", "weight": 3}],
                    "health_check": {"path": "/healthz", "interval_seconds": 5},
                },
                "api": {"servers": ["127.0.0.1:9101"]},
            }
        }
    )
    keys = keys_from_config(config)
    assert keys == [
        ("origin", "127.0.0.1:9001"),
        ("origin", "127.0.0.1:9002"),
        ("api", "127.0.0.1:9101"),
    ]
    directory = HealthDirectory(table)
    directory.publish(keys)
    plan = plan_from_config(config, directory.rows, generation=2)
    assert plan.generation == 2 and plan.unchecked == (2,)
    assert [(t.row, t.address) for t in plan.targets] == [(0, keys[0][1]), (1, keys[1][1])]
    assert plan.targets[0].check == CheckSpec("/healthz", 5.0, 1.0, 2, 3)


# -- the scheduler ----------------------------------------------------------------------------


class _Probes:
    """A fake probe: records when each target was probed; ``hang`` rows never answer."""

    def __init__(self, result: int = 200) -> None:
        self.result = result
        self.times: dict[int, list[float]] = {}
        self.hang: set[int] = set()

    async def __call__(self, target: Target) -> int:
        loop = asyncio.get_running_loop()
        self.times.setdefault(target.row, []).append(loop.time())
        if target.row in self.hang:
            try:
                async with asyncio.timeout(target.check.timeout_seconds):
                    await asyncio.Event().wait()
            except TimeoutError:
                return Failure.TIMEOUT
        return self.result


async def _until(condition: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.005)


def test_first_check_at_start_then_one_per_interval(table: HealthTable) -> None:
    """Every target is probed within FIRST_SPREAD of its interval after the plan, then about
    once per interval (the jitter averages out)."""
    probes = _Probes()

    async def main() -> None:
        prober = Prober(table, probe_fn=probes, rng=random.Random(7))
        loop = asyncio.get_running_loop()
        start = loop.time()
        prober.apply(ProbePlan(1, tuple(_target(r, interval_seconds=0.1) for r in range(4))))
        await _until(lambda: all(len(probes.times.get(r, ())) >= 11 for r in range(4)))
        await prober.close()
        for r in range(4):
            times = probes.times[r]
            assert times[0] - start <= 0.05 + 0.02
            period = (times[10] - times[0]) / 10
            assert 0.09 <= period <= 0.115, period

    asyncio.run(main())


def test_a_hang_delays_no_other_server(table: HealthTable) -> None:
    """A server that never answers fails per timeout; the others are probed on time all the
    while, and it goes DOWN after unhealthy_threshold timeouts."""
    probes = _Probes()
    probes.hang.add(0)
    changes: list[tuple[int, State]] = []

    async def main() -> None:
        prober = Prober(
            table,
            on_change=lambda r, s: changes.append((r, s)),
            probe_fn=probes,
            rng=random.Random(1),
        )
        targets = [_target(0, interval_seconds=0.2, timeout_seconds=0.15, unhealthy_threshold=2)]
        targets += [_target(r, interval_seconds=0.05, timeout_seconds=0.04) for r in (1, 2)]
        prober.apply(ProbePlan(1, tuple(targets)))
        await _until(lambda: table.state[0] == State.DOWN)
        await prober.close()

    asyncio.run(main())
    assert changes == [(0, State.DOWN)]
    assert table.last_result[0] == Failure.TIMEOUT
    for r in (1, 2):
        gaps = [b - a for a, b in zip(probes.times[r], probes.times[r][1:], strict=False)]
        assert len(gaps) >= 4 and max(gaps) < 0.05 * 1.1 + 0.03, gaps


def test_a_new_plan_keeps_unchanged_schedules_and_resets_unchecked(table: HealthTable) -> None:
    """An unchanged target is not probed again at once; a changed one is; a dropped row is no
    longer probed; an unchecked DOWN row goes back to UNKNOWN and is reported."""
    probes = _Probes(result=500)
    changes: list[tuple[int, State]] = []

    async def main() -> None:
        prober = Prober(
            table,
            on_change=lambda r, s: changes.append((r, s)),
            probe_fn=probes,
            rng=random.Random(2),
        )
        kept, changed, dropped = (_target(r, interval_seconds=30.0) for r in range(3))
        prober.apply(ProbePlan(1, (kept, changed, dropped)))
        await _until(lambda: all(table.state[r] == State.DOWN for r in range(3)))
        slower = Target(1, "origin", changed.address, CheckSpec(interval_seconds=20.0))
        prober.apply(ProbePlan(2, (kept, slower), unchecked=(2,)))
        await _until(lambda: len(probes.times[1]) == 2)
        await asyncio.sleep(0.05)
        assert {t.row for t in prober.targets} == {0, 1}
        await prober.close()

    asyncio.run(main())
    assert [len(probes.times[r]) for r in range(3)] == [1, 2, 1]
    assert table.state[2] == State.UNKNOWN and table.falls[2] == 0
    assert (2, State.UNKNOWN) in changes


def test_transitions_are_logged(table: HealthTable) -> None:
    """A change of state is one log line (WARNING for DOWN)."""
    probes = _Probes(result=Failure.REFUSED)
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = _Keep()
    log = logging.getLogger("tenaya")
    log.addHandler(handler)
    try:

        async def main() -> None:
            prober = Prober(table, probe_fn=probes, rng=random.Random(3))
            prober.apply(ProbePlan(1, (_target(0, interval_seconds=0.02, unhealthy_threshold=3),)))
            await _until(lambda: table.state[0] == State.DOWN)
            await prober.close()

        asyncio.run(main())
    finally:
        log.removeHandler(handler)
    lines = [r for r in records if "is DOWN" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert lines[0].getMessage() == (
        "server 127.0.0.1:9001 of upstream origin is DOWN: connect refused (3 checks)"
    )
