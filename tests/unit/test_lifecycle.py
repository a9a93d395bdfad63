"""master.lifecycle: every change of state goes through the table, the arbiter's included."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from master.arbiter import Arbiter
from master.lifecycle import TRANSITIONS, Lifecycle, State
from shared.config import Config, from_mapping

#: A way to reach each state from BOOTING through the table.
PATHS: dict[State, list[State]] = {
    State.BOOTING: [],
    State.SERVING: [State.SERVING],
    State.RELOADING: [State.SERVING, State.RELOADING],
    State.UPGRADING: [State.SERVING, State.UPGRADING],
    State.STOPPING: [State.STOPPING],
}


def reach(state: State) -> Lifecycle:
    """A lifecycle moved to ``state`` by :meth:`Lifecycle.to` alone."""
    lifecycle = Lifecycle()
    for step in PATHS[state]:
        lifecycle.to(step)
    assert lifecycle.state is state
    return lifecycle


def config() -> Config:
    """The smallest config an arbiter can be made with (nothing is bound or started)."""
    return from_mapping(
        {
            "listeners": [{"address": "127.0.0.1:0"}],
            "upstreams": {"web": {"servers": ["127.0.0.1:9"]}},
        },
        "test.yaml",
    )


@pytest.fixture
def arbiter() -> Iterator[Arbiter]:
    """An arbiter that has not started (booting, no workers, no sockets)."""
    a = Arbiter(config())
    yield a
    os.close(a._wake_r)
    os.close(a._wake_w)


def test_the_table_names_every_state() -> None:
    assert set(TRANSITIONS) == set(State)
    assert set(PATHS) == set(State)


def test_a_lifecycle_starts_booting() -> None:
    assert Lifecycle().state is State.BOOTING
    assert not Lifecycle().serving


@pytest.mark.parametrize("old", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("new", list(State), ids=lambda s: s.value)
def test_to_and_can_follow_the_table(old: State, new: State) -> None:
    lifecycle = reach(old)
    allowed = new in TRANSITIONS[old]
    assert lifecycle.can(new) is allowed
    if allowed:
        lifecycle.to(new)
        assert lifecycle.state is new
    else:
        with pytest.raises(RuntimeError, match=f"cannot go from {old.value} to {new.value}"):
            lifecycle.to(new)
        assert lifecycle.state is old


def test_stopping_is_final() -> None:
    assert TRANSITIONS[State.STOPPING] == frozenset()
    assert not any(reach(State.STOPPING).can(s) for s in State)


def test_only_serving_is_serving() -> None:
    assert [s for s in State if reach(s).serving] == [State.SERVING]


def test_a_failed_start_stops_through_the_table(arbiter: Arbiter) -> None:
    arbiter.abandon_start()
    assert arbiter.lifecycle.state is State.STOPPING
    assert arbiter.stopping


def test_a_start_stopped_by_a_signal_fails_without_a_second_transition(arbiter: Arbiter) -> None:
    # SIGTERM while booting: start() then raises "stopped during start", already STOPPING.
    arbiter.stop(graceful=True)
    assert arbiter.lifecycle.state is State.STOPPING
    arbiter.abandon_start()
    assert arbiter.lifecycle.state is State.STOPPING
