"""The fleet balancing table: rotation turns and in-flight requests, counted by every worker.

Theory of operation. Load balancing is fleet-wide when every worker decides from the same
numbers: how many requests the fleet has sent to an upstream so far (the rotation's turn, which
round robin indexes its schedule with), and how many requests each server has in flight (what
least-connections compares). Each number is the sum of one cell per worker slot, and each cell
has ONE WRITER, the worker process that holds that slot, so nothing is locked: a writer adds to
its own aligned 8-byte cell, a reader sums a column and tolerates a moment's staleness (two
workers that read the same turn at the same instant send one request each to the same server;
the next turns go on).

Who writes what:

- Worker slot ``w`` writes only row ``w``: its turn counter per upstream (one per request it
  balances), its in-flight count per server (up when a request goes to the server, down when
  it ends), and per upstream the circuit breakers' and the retry budget's counts
  (:data:`GUARD_CELLS`: requests in flight, retries in flight, requests waiting for a new
  connection, open connections), each up and down in the same process. The kernel enforces
  it: a worker maps the table read-only and only its own row
  writable (:meth:`BalanceTable.attach_slot`), each row being whole pages of its own.
- The master creates the table, and writes the RETIRED row: when a slot's process has exited and
  before the slot is given to a new one, :meth:`BalanceTable.retire` adds the slot's turns to the
  retired row and zeroes the slot (its in-flight requests died with it), so the fleet's turn
  total never goes back and the rotation does not repeat itself.
- Readers: every worker (selection), the master (status).

Layout (after the header page, :mod:`shared.shm.table`): ``slots + 1`` rows, row 0 the retired
row, row ``1 + w`` worker slot ``w``; each row holds ``upstreams`` turn counters (u64), then
``servers`` in-flight counts (i64), then :data:`GUARD_CELLS` counts per upstream (i64,
upstream ``u``'s at ``GUARD_CELLS * u``), and is padded to whole pages. Servers are numbered across
all upstreams (the master numbers them in config order, and each upstream's servers are a
range). A column (one counter over all rows) is a strided ``memoryview``, so ``sum()`` of it is
one C call, and no two processes write the same cache line.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from shared.shm.table import PAGE, SharedTable, pages

_CELL = struct.calcsize("Q")

#: Per upstream, the counts the circuit breakers and the retry budget read, in this order.
GUARD_NAMES = ("requests", "retries", "pending", "connections")
#: Cells per upstream of those counts, in each row.
GUARD_CELLS = len(GUARD_NAMES)
#: The offset of each count among an upstream's guard cells.
REQUESTS, RETRIES, PENDING, CONNECTIONS = range(GUARD_CELLS)


def server_ranges(counts: Sequence[int]) -> list[tuple[int, int]]:
    """The global server numbers of each upstream, from the upstreams' server counts in config
    order: ``(first, count)`` per upstream (``[3, 2]`` -> ``[(0, 3), (3, 2)]``). The master and
    every worker number the same config the same way."""
    ranges, first = [], 0
    for count in counts:
        ranges.append((first, count))
        first += count
    return ranges


class BalanceTable(SharedTable):
    """Turns per (upstream, worker slot) and in-flight requests per (server, worker slot).

    ``BalanceTable.create(upstreams, servers, slots)`` in the master;
    ``BalanceTable.attach_slot(fd, slot)`` in the worker that holds ``slot``;
    ``BalanceTable.attach(fd)`` for a reader that writes nothing.
    """

    MAGIC = 0x42594E54  # "TNYB"
    VERSION = 2
    NAME = "tenaya-balance"
    PARAMS = 3

    upstreams: int
    """Turn counters per row."""
    servers: int
    """In-flight counts per row (servers of all upstreams)."""
    slots: int
    """Worker slots (rows besides the retired one)."""
    row_cells: int
    """Cells from one row to the next (the row's stride, padding included)."""
    cells: memoryview
    """Every cell of every row, u64, as mapped (read-only unless created here)."""

    @classmethod
    def data_size(cls, *params: int) -> int:
        """``(slots + 1)`` rows of whole pages, each ``upstreams * (1 + GUARD_CELLS) +
        servers`` cells."""
        upstreams, servers, slots = params
        if slots < 1 or upstreams < 0 or servers < 0:
            raise ValueError("a balance table needs at least one worker slot")
        return (slots + 1) * cls._row_bytes(upstreams, servers)

    @staticmethod
    def _row_bytes(upstreams: int, servers: int) -> int:
        return pages(max(1, upstreams * (1 + GUARD_CELLS) + servers) * _CELL)

    def _setup(self) -> None:
        self.upstreams, self.servers, self.slots = self.params
        row_bytes = self._row_bytes(self.upstreams, self.servers)
        self.row_cells = row_bytes // _CELL
        self.cells = self._view(self.data, 0, "Q", (self.slots + 1) * self.row_cells)
        # Signed for the in-flight counts: a reader summing them never sees a wrapped value.
        self._signed = self._view(self.data, 0, "q", (self.slots + 1) * self.row_cells)
        self._turns = [self._column(self.cells, u) for u in range(self.upstreams)]
        self._flight = [
            self._column(self._signed, self.upstreams + s, first_row=1) for s in range(self.servers)
        ]
        base = self.upstreams + self.servers
        self._guards = [
            self._column(self._signed, base + c, first_row=1)
            for c in range(self.upstreams * GUARD_CELLS)
        ]

    def _column(self, cells: memoryview, cell: int, first_row: int = 0) -> memoryview:
        start = first_row * self.row_cells + cell
        return self._keep(cells[start :: self.row_cells])

    # -- attaching ------------------------------------------------------------------------

    @classmethod
    def attach_slot(cls, fd: int, slot: int) -> SlotCells:
        """Maps the table read-only and worker slot ``slot``'s row writable (the worker that
        holds the slot); returns the writer of that row, whose :attr:`SlotCells.table` reads
        the rest. Raises ``ValueError`` for a bad header or a slot out of range."""
        table = cls.attach(fd)
        if not 0 <= slot < table.slots:
            table.close()
            raise ValueError(f"worker slot {slot} out of range (0..{table.slots - 1})")
        return SlotCells(table, slot)

    # -- reading --------------------------------------------------------------------------

    def turns_column(self, upstream: int) -> memoryview:
        """The turn counters of ``upstream``, one per row (retired first): ``sum()`` of it is
        the fleet's turn. The view belongs to the table (valid until :meth:`close`)."""
        return self._turns[upstream]

    def in_flight_column(self, server: int) -> memoryview:
        """The in-flight counts of ``server``, one per worker slot: ``sum()`` of it is the
        fleet's. The view belongs to the table."""
        return self._flight[server]

    def guard_column(self, upstream: int, count: int) -> memoryview:
        """Count ``count`` (:data:`REQUESTS`, :data:`RETRIES`, :data:`PENDING` or
        :data:`CONNECTIONS`) of ``upstream``, one cell per worker slot: ``sum()`` of it is the
        fleet's. The view belongs to the table."""
        return self._guards[upstream * GUARD_CELLS + count]

    def guard(self, upstream: int, count: int) -> int:
        """The fleet's count ``count`` of ``upstream`` (see :meth:`guard_column`)."""
        return sum(self._guards[upstream * GUARD_CELLS + count])

    def turn(self, upstream: int) -> int:
        """The fleet's turn for ``upstream``: requests balanced so far, by every worker."""
        return sum(self._turns[upstream])

    def in_flight(self, server: int) -> int:
        """Requests in flight to ``server``, over every worker."""
        return sum(self._flight[server])

    # -- the master's writes --------------------------------------------------------------

    def retire(self, slot: int) -> None:
        """Folds worker slot ``slot``'s turns into the retired row and zeroes its row (its
        in-flight requests ended with its process). The master calls it after the slot's
        process has exited and before another process gets the slot, so the row has no writer
        meanwhile. Raises ``TypeError`` on a table that is not mapped writable here."""
        cells, row = self.cells, (1 + slot) * self.row_cells
        for u in range(self.upstreams):
            cells[u] += cells[row + u]
            cells[row + u] = 0
        for s in range(self.servers + self.upstreams * GUARD_CELLS):
            cells[row + self.upstreams + s] = 0

    def seed_turns(self, upstream: int, turn: int) -> None:
        """Sets the retired turn count of ``upstream`` (the master, on a new table that
        replaces an old one: a reload that changes the layout, or a new master after an
        upgrade), so the rotation goes on from ``turn`` instead of starting over."""
        self.cells[upstream] = turn


class SlotCells:
    """One worker slot's row of a :class:`BalanceTable`: the only cells its process writes.

    Made by :meth:`BalanceTable.attach_slot`. The row is mapped writable on its own pages and the
    rest of the table read-only, so writing another slot's cells is impossible from here, not just
    absent from the API.
    """

    __slots__ = ("table", "slot", "turns", "in_flight", "guards")

    table: BalanceTable
    """The whole table, read-only."""
    slot: int
    """The worker slot this row belongs to."""
    turns: memoryview
    """This slot's turn counter per upstream (u64)."""
    in_flight: memoryview
    """This slot's in-flight count per server (i64)."""
    guards: memoryview
    """This slot's guard counts, :data:`GUARD_CELLS` per upstream (i64)."""

    def __init__(self, table: BalanceTable, slot: int) -> None:
        self.table = table
        self.slot = slot
        row_bytes = table.row_cells * _CELL
        row = table._map((1 + slot) * row_bytes, row_bytes, writable=True)
        self.turns = table._view(row, 0, "Q", table.upstreams)
        self.in_flight = table._view(row, table.upstreams * _CELL, "q", table.servers)
        self.guards = table._view(
            row, (table.upstreams + table.servers) * _CELL, "q", table.upstreams * GUARD_CELLS
        )
        assert row_bytes % PAGE == 0

    def in_flight_range(self, first: int, count: int) -> memoryview:
        """This slot's in-flight counts of servers ``first`` to ``first + count - 1`` (one
        upstream's servers), as a view kept by the table (released by :meth:`close`)."""
        return self.table._keep(self.in_flight[first : first + count])

    def take_turn(self, upstream: int) -> int:
        """The fleet's turn for ``upstream`` (the sum of the column), then counts this
        request in this slot's cell; the hot path of round robin."""
        turn = sum(self.table._turns[upstream])
        self.turns[upstream] += 1
        return turn

    def begin(self, server: int) -> None:
        """Counts a request that goes to ``server`` (global server number) as in flight."""
        self.in_flight[server] += 1

    def end(self, server: int) -> None:
        """Counts a request to ``server`` that :meth:`begin` counted as ended."""
        self.in_flight[server] -= 1

    def close(self) -> None:
        """Unmaps the table (and closes its descriptor), once."""
        self.table.close()
