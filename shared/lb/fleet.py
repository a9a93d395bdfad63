"""What the selectors count with: the fleet's turn, and requests in flight per member.

A selector does not know where its numbers live. :class:`Turns` is an upstream's rotation
counter and :class:`Load` its members' in-flight counts; each is either local to this process
(:meth:`Turns.local`, :meth:`Load.local`: tests, tools, a single process) or backed by the
shared :class:`~shared.shm.balance.BalanceTable` (:meth:`Turns.shared`, :meth:`Load.shared`), in
which case every worker of the fleet sees and adds to the same numbers. Both shapes are the
same to a selector: a column to ``sum()`` and this process's own cell to add to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shared.shm.balance import SlotCells


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

    def member(self, member: int) -> MemberLoad:
        """Member ``member``'s counter alone, to hang on its peer
        (:attr:`shared.peer.HttpPeer.in_flight`): the engine counts the requests it sends to
        the peer with it."""
        return MemberLoad(self.cells, member)


class MemberLoad:
    """One member's in-flight counter in this process's cells: :meth:`begin` when a request
    goes to it, :meth:`end` once that request is over (the engine does the same to
    ``cells[index]`` inline, see :attr:`shared.peer.HttpPeer.in_flight`)."""

    __slots__ = ("cells", "index")

    cells: Cells
    """This process's cells of the upstream's members."""
    index: int
    """The member's cell in :attr:`cells`."""

    def __init__(self, cells: Cells, index: int) -> None:
        self.cells = cells
        self.index = index

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
