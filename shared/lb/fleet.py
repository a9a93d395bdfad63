"""What the selectors count with: the fleet's turn, and requests in flight per member.

A selector does not know where its numbers live. :class:`Turns` is an upstream's rotation
counter and :class:`Load` its members' in-flight counts; each is either local to this process
(:meth:`Turns.local`, :meth:`Load.local`: tests, tools, a single process) or backed by the
shared :class:`~shared.shm.balance.BalanceTable` (:meth:`Turns.shared`, :meth:`Load.shared`), in
which case every worker of the fleet sees and adds to the same numbers. Both shapes are the
same to a selector: a column to ``sum()`` and this process's own cell to add to.

:class:`Guard` is an upstream's circuit breakers and retry budget, counted the same way: per
upstream, requests in flight, retries in flight, requests waiting for a new connection and
open connections, each a column of the shared table (this process adds to its own cells) and a
limit from the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from shared.shm.balance import CONNECTIONS, GUARD_CELLS, PENDING, REQUESTS, RETRIES

if TYPE_CHECKING:
    from shared.shm.balance import SlotCells

#: The retry budget (Envoy's ``retry_budget``): retries in flight to an upstream may be at most
#: this percentage of its requests in flight...
RETRY_BUDGET_PERCENT = 20
#: ...and at least this many, whatever the load (Envoy's ``min_retry_concurrency``).
MIN_RETRY_CONCURRENCY = 3


class Cells(Protocol):
    """Integer cells one process writes: a ``memoryview`` of a shared table's row, or a list."""

    def __getitem__(self, i: int, /) -> int: ...
    def __setitem__(self, i: int, value: int, /) -> None: ...


class Turns:
    """An upstream's rotation: how many requests the fleet has balanced to it so far.

    :meth:`take` is round robin's hot path: the fleet's total (one ``sum()`` over a column of
    the shared table), then one more in this process's cell.
    """

    __slots__ = ("column", "cells", "cell")

    column: Sequence[int]
    """The counters whose sum is the fleet's turn (one per worker slot, and the retired one)."""
    cells: Cells
    """Where this process's counter is."""
    cell: int
    """The index of this process's counter in :attr:`cells`."""

    def __init__(self, column: Sequence[int], cells: Cells, cell: int) -> None:
        self.column = column
        self.cells = cells
        self.cell = cell

    @classmethod
    def local(cls, start: int = 0) -> Turns:
        """A rotation of this process alone, from turn ``start``."""
        cells = [start]
        return cls(cells, cells, 0)

    @classmethod
    def shared(cls, slot: SlotCells, upstream: int) -> Turns:
        """Upstream number ``upstream``'s rotation in a shared table, counted in ``slot``."""
        return cls(slot.table.turns_column(upstream), slot.turns, upstream)

    def take(self) -> int:
        """The fleet's turn, then counts one more request in this process's cell."""
        turn = sum(self.column)
        self.cells[self.cell] += 1
        return turn

    def peek(self) -> int:
        """The fleet's turn, taking none."""
        return sum(self.column)


class Load:
    """Requests in flight to each member of an upstream (member ``i`` is its ``i``-th server).

    Whoever sends a request to member ``i`` calls :meth:`begin` before and :meth:`end` once the
    request is over (its response ended, or it failed), in this process; least-connections reads
    :meth:`count`, the sum over the fleet.
    """

    __slots__ = ("columns", "cells")

    columns: Sequence[Sequence[int]]
    """Per member, the counts whose sum is its in-flight total (one per worker slot)."""
    cells: Cells
    """Per member, this process's count."""

    def __init__(self, columns: Sequence[Sequence[int]], cells: Cells) -> None:
        self.columns = columns
        self.cells = cells

    @classmethod
    def local(cls, members: int) -> Load:
        """In-flight counts of this process alone."""
        columns = [[0] for _ in range(members)]
        return cls(columns, _Cells(columns))

    @classmethod
    def shared(cls, slot: SlotCells, first: int, members: int) -> Load:
        """Servers ``first`` to ``first + members - 1`` of a shared table (one upstream's),
        counted in ``slot``."""
        table = slot.table
        columns = [table.in_flight_column(first + i) for i in range(members)]
        return cls(columns, slot.in_flight_range(first, members))

    def count(self, member: int) -> int:
        """Requests in flight to ``member``, over the fleet."""
        return sum(self.columns[member])

    def begin(self, member: int) -> None:
        """Counts a request to ``member`` as in flight."""
        self.cells[member] += 1

    def end(self, member: int) -> None:
        """Counts a request that :meth:`begin` counted as over."""
        self.cells[member] -= 1

    def member(self, member: int, guard: Guard | None = None) -> MemberLoad:
        """Member ``member``'s counter alone, to hang on its peer
        (:attr:`shared.peer.HttpPeer.in_flight`): the engine counts the requests it sends to
        the peer with it, and in ``guard`` (its upstream's) when given."""
        return MemberLoad(self.cells, member, guard)


class Guard:
    """An upstream's circuit breakers and retry budget, over the fleet in a worker.

    The counts are columns (``sum()`` is the fleet's) with this process's cell of each at
    ``cells[base + REQUESTS]`` and so on (:mod:`shared.shm.balance`'s order). Who counts:

    - ``REQUESTS``: the engine, per attempt, beside the server's in-flight count (read against
      :attr:`max_requests` before the attempt, and as the active requests of the retry
      budget);
    - ``RETRIES``: the engine, once per request from its first retry until it ends
      (:meth:`retry_allowed` before each retry);
    - ``PENDING`` and ``CONNECTIONS``: laid out for ``max_pending`` and ``max_connections``
      (the connector's counts), not counted yet.
    """

    __slots__ = (
        "name",
        "cells",
        "base",
        "requests",
        "retries",
        "pending",
        "connections",
        "max_requests",
        "max_pending",
        "max_connections",
    )

    name: str
    """The upstream's name (for the error and the log line)."""
    cells: Cells
    """This process's cells; this upstream's are from :attr:`base` on."""
    base: int
    """The index of this upstream's first cell in :attr:`cells`."""
    requests: Sequence[int]
    """Requests in flight to the upstream's servers, one count per process."""
    retries: Sequence[int]
    """Requests that are retries (from their first retry until they end)."""
    pending: Sequence[int]
    """Requests waiting for a new connection to the upstream."""
    connections: Sequence[int]
    """Open connections to the upstream's servers."""
    max_requests: int
    """``upstreams.<name>.max_requests``."""
    max_pending: int
    """``upstreams.<name>.max_pending``."""
    max_connections: int
    """``upstreams.<name>.max_connections``."""

    def __init__(
        self,
        name: str,
        columns: Sequence[Sequence[int]],
        cells: Cells,
        base: int,
        limits: tuple[int, int, int],
    ) -> None:
        self.name = name
        self.cells = cells
        self.base = base
        self.requests = columns[REQUESTS]
        self.retries = columns[RETRIES]
        self.pending = columns[PENDING]
        self.connections = columns[CONNECTIONS]
        self.max_requests, self.max_pending, self.max_connections = limits

    @classmethod
    def local(cls, name: str, limits: tuple[int, int, int]) -> Guard:
        """Counts of this process alone; ``limits`` are (max_requests, max_pending,
        max_connections)."""
        columns = [[0] for _ in range(GUARD_CELLS)]
        return cls(name, columns, _Cells(columns), 0, limits)

    @classmethod
    def shared(
        cls, slot: SlotCells, upstream: int, name: str, limits: tuple[int, int, int]
    ) -> Guard:
        """Upstream number ``upstream``'s counts in a shared table, counted in ``slot``."""
        table = slot.table
        columns = [table.guard_column(upstream, c) for c in range(GUARD_CELLS)]
        return cls(name, columns, slot.guards, upstream * GUARD_CELLS, limits)

    def count(self, which: int, delta: int) -> None:
        """Adds ``delta`` to this process's count ``which`` (``REQUESTS`` ...)."""
        self.cells[self.base + which] += delta

    def retry_budget(self) -> int:
        """Retries the fleet may have in flight to the upstream now: :data:`RETRY_BUDGET_PERCENT`
        of its requests in flight, at least :data:`MIN_RETRY_CONCURRENCY`."""
        return max(MIN_RETRY_CONCURRENCY, sum(self.requests) * RETRY_BUDGET_PERCENT // 100)

    def retry_allowed(self, counted: bool) -> bool:
        """Whether one more retry fits in the budget; ``counted``: the request is already
        counted as a retry (its next retry replaces its last, and needs no new room)."""
        return sum(self.retries) - counted < self.retry_budget()


class MemberLoad:
    """One member's in-flight counter in this process's cells: :meth:`begin` when a request
    goes to it, :meth:`end` once that request is over (the engine does the same to
    ``cells[index]`` inline, see :attr:`shared.peer.HttpPeer.in_flight`)."""

    __slots__ = ("cells", "index", "guard")

    cells: Cells
    """This process's cells of the upstream's members."""
    index: int
    """The member's cell in :attr:`cells`."""
    guard: Guard | None
    """The upstream's circuit breakers and retry budget, or None."""

    def __init__(self, cells: Cells, index: int, guard: Guard | None = None) -> None:
        self.cells = cells
        self.index = index
        self.guard = guard

    def begin(self) -> None:
        """Counts one more request in flight to the member."""
        self.cells[self.index] += 1

    def end(self) -> None:
        """Counts one request that :meth:`begin` counted as over."""
        self.cells[self.index] -= 1


class _Cells:
    """The local stand-in for a row: member ``i``'s cell is ``columns[i][0]``."""

    __slots__ = ("_columns",)

    def __init__(self, columns: list[list[int]]) -> None:
        self._columns = columns

    def __getitem__(self, i: int, /) -> int:
        return self._columns[i][0]

    def __setitem__(self, i: int, value: int, /) -> None:
        self._columns[i][0] = value
