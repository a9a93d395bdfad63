"""The protection log throttle (worker/log_throttle.py): one line per client and reason per
window, a count of what was held back, and bounded memory."""

from __future__ import annotations

from worker.log_throttle import LogThrottle


def test_one_line_per_client_and_reason_per_window() -> None:
    """The first occurrence is let through; the rest within the window are held back and
    counted; the first after the window says how many were."""
    t = LogThrottle(window=60.0)
    assert t.allow("10.0.0.1", "bad request", now=0.0) == 0
    assert t.allow("10.0.0.1", "bad request", now=1.0) is None
    assert t.allow("10.0.0.1", "bad request", now=59.9) is None
    assert t.allow("10.0.0.1", "bad request", now=60.0) == 2
    assert t.allow("10.0.0.1", "bad request", now=61.0) is None
    assert t.allow("10.0.0.1", "bad request", now=120.0) == 1


def test_clients_and_reasons_are_apart() -> None:
    """Another client, or another reason of the same client, gets its own line."""
    t = LogThrottle()
    assert t.allow("10.0.0.1", "bad request", now=0.0) == 0
    assert t.allow("10.0.0.2", "bad request", now=0.0) == 0
    assert t.allow("10.0.0.1", "rapid reset", now=0.0) == 0
    assert t.allow("10.0.0.1", "bad request", now=0.0) is None


def test_memory_is_bounded() -> None:
    """Past ``max_keys`` the expired keys go first, then the oldest: the size never grows past
    the bound, and a forgotten client is let through again."""
    t = LogThrottle(window=60.0, max_keys=100)
    for i in range(1000):
        t.allow(f"10.0.{i // 256}.{i % 256}", "bad request", now=float(i) / 1000)
        assert len(t) <= 100
    assert t.allow("10.0.0.0", "bad request", now=1.0) == 0  # forgotten: logged again
    # Expired keys are dropped before live ones.
    t = LogThrottle(window=10.0, max_keys=3)
    t.allow("a", "r", now=0.0)
    t.allow("b", "r", now=5.0)
    t.allow("c", "r", now=11.0)
    t.allow("d", "r", now=12.0)  # full: "a" has expired and goes
    assert t.allow("b", "r", now=13.0) is None
    assert t.allow("c", "r", now=13.0) is None


def test_default_clock() -> None:
    """Without ``now`` the monotonic clock is read."""
    t = LogThrottle()
    assert t.allow("10.0.0.1", "x") == 0
    assert t.allow("10.0.0.1", "x") is None
