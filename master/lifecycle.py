"""The master's lifecycle states and the transitions between them, in one table.

``SERVING`` is the resting state. A reload (SIGHUP, or TTIN/TTOU, which change the worker
count the same way) spawns a new generation of workers and waits in ``RELOADING`` until all of
them are ready; only then does the old generation drain. An upgrade (SIGUSR2) starts a new
master and waits in ``UPGRADING`` for it to report ready; then this master drains and leaves
(``STOPPING``). A failed reload or upgrade goes back to ``SERVING`` with nothing changed.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    BOOTING = "booting"
    SERVING = "serving"
    RELOADING = "reloading"
    UPGRADING = "upgrading"
    STOPPING = "stopping"


#: Which states each state may move to.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.BOOTING: frozenset({State.SERVING, State.STOPPING}),
    State.SERVING: frozenset({State.RELOADING, State.UPGRADING, State.STOPPING}),
    State.RELOADING: frozenset({State.SERVING, State.STOPPING}),
    State.UPGRADING: frozenset({State.SERVING, State.STOPPING}),
    State.STOPPING: frozenset(),
}


class Lifecycle:
    """Holds the current state and refuses transitions the table does not allow."""

    def __init__(self) -> None:
        self.state = State.BOOTING

    def to(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"cannot go from {self.state.value} to {new.value}")
        self.state = new

    def can(self, new: State) -> bool:
        return new in TRANSITIONS[self.state]

    @property
    def serving(self) -> bool:
        return self.state is State.SERVING
