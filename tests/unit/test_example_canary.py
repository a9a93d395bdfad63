"""examples/canary.py, the README's canary: X-Canary: 1 always reaches the canary upstream, about
the configured share of the other requests does, and the rest go to stable in rotation."""

from __future__ import annotations

import random
import typing

import pytest

from examples.canary import Canary
from shared.config import from_mapping
from shared.headers import RequestHeader
from shared.session import Session

STABLE = ["10.0.0.1:8080", "10.0.0.2:8080"]
CANARY = ["10.0.1.1:8080"]


class FakeSession:
    def __init__(self, canary: bool) -> None:
        self.req_header = RequestHeader("GET", "/", "1.1")
        if canary:
            self.req_header.set("X-Canary", "1")


def app(percent: float = 5) -> Canary:
    a = Canary()
    a.configure(
        from_mapping(
            {
                "upstreams": {"stable": {"servers": STABLE}, "canary": {"servers": CANARY}},
                "app": "examples.canary:Canary",
                "app_options": {"canary_percent": percent},
            }
        )
    )
    return a


def pick(a: Canary, canary: bool) -> str:
    return str(a.upstream_peer(typing.cast(Session, FakeSession(canary)), None))


def test_the_header_always_goes_to_the_canary() -> None:
    assert {pick(app(0), True) for _ in range(20)} == set(CANARY)


def test_a_share_of_the_rest_goes_to_the_canary() -> None:
    random.seed(12)
    a = app(5)
    got = [pick(a, False) for _ in range(4000)]
    share = got.count(CANARY[0]) / len(got)
    assert 0.04 < share < 0.06, share
    stable = [g for g in got if g != CANARY[0]]
    assert abs(stable.count(STABLE[0]) - stable.count(STABLE[1])) <= 1


def test_a_bad_percent_is_refused() -> None:
    with pytest.raises(ValueError, match="canary_percent"):
        app(150)
