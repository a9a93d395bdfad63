"""Waiting without sleeping and hoping: poll a condition, or a value until it settles, with a
deadline that fails the test naming what it waited for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T | Literal[False] | None],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Polls ``condition`` until it returns something true; returns that. Raises
    ``AssertionError`` naming ``what`` when ``timeout`` seconds pass first.

    ``condition`` may say "not yet" with False or None (``ready and value``, ``value if ready
    else None``): the type returned is then the value's alone."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def wait_until_stable(
    value: Callable[[], int], settle: float = 1.0, timeout: float = 30.0, interval: float = 0.05
) -> int:
    """Polls ``value`` until it has not changed for ``settle`` seconds; returns it (a flow
    that backpressure stopped)."""
    deadline = time.monotonic() + timeout
    last = value()
    since = time.monotonic()
    while True:
        time.sleep(interval)
        now = time.monotonic()
        current = value()
        if current != last:
            last, since = current, now
        elif now - since >= settle:
            return current
        if now > deadline:
            raise AssertionError(f"value still changing after {timeout:g}s (at {current})")
