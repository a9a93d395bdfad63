"""Slow start: a server that has just become usable ramps its weight up over
``slow_start_seconds`` instead of taking its full share at once (a cold cache, a JIT warming up).

The ramp is linear in the time since the server became usable, from a small share to its full
weight, as nginx's ``slow_start``. Weights are integers (the schedule is made of them), so during
a ramp every weight is scaled by :data:`RAMP_STEPS` and the ramping ones reduced: a weight-1
server can then take a tenth of its share, then two tenths, and so on. Once no server ramps the
weights are the configured ones again, and the schedule is as short as without slow start.

The caller (a timer in the worker, about once a second while any server ramps) computes the
weights with :func:`ramp_weights` and hands them to the selector's ``set_weights``; it stops once
:func:`ramping` says no server ramps any more.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Steps of a ramp: the finest fraction of its weight a ramping server gets.
RAMP_STEPS = 10


def ramp_factor(elapsed: float, slow_start_seconds: float) -> float:
    """The share of its weight a server gets ``elapsed`` seconds after it became usable:
    rising linearly to 1 at ``slow_start_seconds`` (1 at once when that is 0)."""
    if slow_start_seconds <= 0 or elapsed >= slow_start_seconds:
        return 1.0
    return max(0.0, elapsed) / slow_start_seconds


def ramping(elapsed: Sequence[float], slow_start_seconds: float) -> bool:
    """True while some server's ramp is not over (``elapsed``: seconds since each became
    usable)."""
    return any(ramp_factor(e, slow_start_seconds) < 1.0 for e in elapsed)


def ramp_weights(
    weights: Sequence[int], elapsed: Sequence[float], slow_start_seconds: float
) -> list[int]:
    """The weights to select with now: the configured ``weights`` when no server ramps, else
    each scaled by :data:`RAMP_STEPS` and multiplied by its ramp factor, at least 1."""
    factors = [ramp_factor(e, slow_start_seconds) for e in elapsed]
    if all(f >= 1.0 for f in factors):
        return list(weights)
    return [max(1, int(w * RAMP_STEPS * f)) for w, f in zip(weights, factors, strict=True)]
