"""The master's lifecycle states and the transitions between them, in one table.

``SERVING`` is the resting state. A reload (SIGHUP, or TTIN/TTOU, which change the worker
count the same way) spawns a new generation of workers and waits in ``RELOADING`` until all of
them are ready; only then does the old generation drain. An upgrade (SIGUSR2) starts a new
master and waits in ``UPGRADING`` for it to report ready; then this master drains and leaves
(``STOPPING``). A failed reload or upgrade goes back to ``SERVING`` with nothing changed.

Every change of state goes through :meth:`Lifecycle.to`, which refuses a move the table does
not list; nothing assigns :attr:`Lifecycle.state` directly.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    """Where the master is in its life (the value is what ``status`` shows)."""

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
        """Moves to ``new``. Raises ``RuntimeError`` when :data:`TRANSITIONS` does not allow
        it (the caller has a bug: nothing catches it)."""
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"cannot go from {self.state.value} to {new.value}")
        self.state = new

    def can(self, new: State) -> bool:
        """True when :meth:`to` would accept ``new`` now."""
        return new in TRANSITIONS[self.state]

    @property
    def serving(self) -> bool:
        """True in ``SERVING``, the only state that takes a reload, resize or upgrade."""
        return self.state is State.SERVING
