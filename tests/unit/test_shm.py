"""shared.shm: the shared-table base (header, attach checks, views, closing) and the fleet
balancing table (one writer per cell, the retired row)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from shared.shm import BalanceTable, PoolIndex, SharedTable, SlotCells, slot_of
from shared.shm.pool_index import DEFAULT_SLOTS
from shared.shm.table import PAGE


class _Tiny(SharedTable):
    """A table of ``count`` u32 cells, for testing the base."""

    MAGIC = 0x54534554  # "TEST"
    VERSION = 3
    NAME = "tenaya-test"
    PARAMS = 1

    @classmethod
    def data_size(cls, *params: int) -> int:
        (count,) = params
        return 4 * count

    def _setup(self) -> None:
        self.cells = self._view(self.data, 0, "I", self.params[0])


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_attach_reads_the_layout_and_shares_the_cells() -> None:
    """A table attached from the creator's descriptor has its parameters and sees its
    writes; the data starts after a header page."""
    table = _Tiny.create(10)
    other = _Tiny.attach(os.dup(table.fd))
    try:
        assert other.params == (10,)
        table.cells[7] = 42
        assert other.cells[7] == 42
        assert os.fstat(table.fd).st_size == 2 * PAGE
    finally:
        other.close()
        table.close()


def test_read_only_attach_cannot_write() -> None:
    """attach() maps read-only unless asked: writing a cell raises."""
    table = _Tiny.create(4)
    reader = _Tiny.attach(os.dup(table.fd))
    try:
        with pytest.raises(TypeError):
            reader.cells[0] = 1
        writer = _Tiny.attach(os.dup(table.fd), writable=True)
        writer.cells[0] = 5
        assert reader.cells[0] == 5
        writer.close()
    finally:
        reader.close()
        table.close()


def _header(fd: int, magic: int, version: int, size: int, count: int) -> None:
    os.pwrite(fd, struct.pack("<IIQ8I", magic, version, size, count, *[0] * 7), 0)


@pytest.mark.parametrize(
    ("magic", "version", "size", "reason"),
    [
        (0x12345678, 3, 40, "kind"),
        (_Tiny.MAGIC, 2, 40, "version"),
        (_Tiny.MAGIC, 3, 44, "does not match"),
    ],
)
def test_attach_checks_the_header(magic: int, version: int, size: int, reason: str) -> None:
    """Another kind of table, another layout version, or a size that disagrees with the
    parameters: attach refuses before mapping anything."""
    table = _Tiny.create(10)
    try:
        _header(table.fd, magic, version, size, 10)
        with pytest.raises(ValueError, match=reason):
            _Tiny.attach(os.dup(table.fd))
    finally:
        table.close()


def test_attach_refuses_a_short_file() -> None:
    """A file shorter than its header says (or than a header) is not attached."""
    fd = os.memfd_create("short", os.MFD_CLOEXEC)
    try:
        with pytest.raises(ValueError, match="short header"):
            _Tiny.read_header(fd)
        os.ftruncate(fd, PAGE)
        _header(fd, _Tiny.MAGIC, 3, 4 * 10, 10)
        with pytest.raises(ValueError, match="does not match"):
            _Tiny.read_header(fd)
    finally:
        os.close(fd)


def test_create_checks_the_parameters() -> None:
    """The wrong number of parameters, or one out of range, is refused."""
    with pytest.raises(ValueError):
        _Tiny.create(1, 2)
    with pytest.raises(ValueError):
        _Tiny.create(-1)


def test_close_releases_everything_once() -> None:
    """close() releases the views, the map and the descriptor; a second close does nothing."""
    table = _Tiny.create(4)
    fd, cells = table.fd, table.cells
    table.close()
    assert table.closed
    assert not _fd_open(fd)
    with pytest.raises(ValueError):
        cells[0]
    table.close()


# -- the balance table ---------------------------------------------------------------------


@pytest.fixture
def table() -> Iterator[BalanceTable]:
    t = BalanceTable.create(2, 5, 4)
    yield t
    t.close()


def _slot(table: BalanceTable, slot: int) -> SlotCells:
    return BalanceTable.attach_slot(os.dup(table.fd), slot)


def test_turns_sum_over_the_workers(table: BalanceTable) -> None:
    """Each worker's take_turn returns the fleet's turn and adds one in its own cell, so
    interleaved workers see consecutive turns."""
    a, b = _slot(table, 0), _slot(table, 3)
    try:
        assert [a.take_turn(0), b.take_turn(0), a.take_turn(0), b.take_turn(1)] == [0, 1, 2, 0]
        assert table.turn(0) == 3 and table.turn(1) == 1
        assert list(table.turns_column(0)) == [0, 2, 0, 0, 1]
    finally:
        a.close()
        b.close()


def test_in_flight_sums_over_the_workers(table: BalanceTable) -> None:
    """begin/end count in the worker's own cell; in_flight is the fleet's sum."""
    a, b = _slot(table, 1), _slot(table, 2)
    try:
        a.begin(4)
        a.begin(4)
        b.begin(4)
        b.end(4)
        b.begin(0)
        assert table.in_flight(4) == 2 and table.in_flight(0) == 1
        assert b.table.in_flight(4) == 2
    finally:
        a.close()
        b.close()


def test_a_worker_cannot_write_another_slots_cells(table: BalanceTable) -> None:
    """A worker's map of the table is read-only except its own row, whose pages are mapped
    writable on their own: writing a cell of another slot (or of the retired row) raises."""
    a = _slot(table, 1)
    try:
        row = a.table.row_cells
        with pytest.raises(TypeError):
            a.table.cells[0] = 1  # the retired row
        with pytest.raises(TypeError):
            a.table.cells[3 * row] = 1  # slot 2's turn counter
        assert row * 8 % PAGE == 0
        a.turns[0] += 1
        assert table.cells[2 * row] == 1  # slot 1 is row 2
    finally:
        a.close()


def test_attach_slot_checks_the_slot(table: BalanceTable) -> None:
    """A slot beyond the table's is refused, and the descriptor is not leaked."""
    fd = os.dup(table.fd)
    with pytest.raises(ValueError, match="out of range"):
        BalanceTable.attach_slot(fd, 4)
    assert not _fd_open(fd)


def test_retire_keeps_the_turn_and_zeroes_the_slot(table: BalanceTable) -> None:
    """When a slot's process is gone, retire() moves its turns to the retired row (the fleet's
    turn does not go back) and zeroes its in-flight counts; a new process on the slot starts
    from zero."""
    old = _slot(table, 2)
    for _ in range(5):
        old.take_turn(1)
    old.begin(3)
    old.close()
    table.retire(2)
    assert table.turn(1) == 5
    assert table.in_flight(3) == 0
    new = _slot(table, 2)
    try:
        assert new.turns[1] == 0
        assert new.take_turn(1) == 5
    finally:
        new.close()


def test_seed_turns(table: BalanceTable) -> None:
    """A new table that replaces an old one goes on from the old turn."""
    table.seed_turns(1, 1000)
    assert table.turn(1) == 1000


def test_balance_table_needs_a_slot() -> None:
    with pytest.raises(ValueError):
        BalanceTable.create(1, 1, 0)


def test_close_releases_derived_views(table: BalanceTable) -> None:
    """Views the slot hands out (a range of its in-flight cells) are released with it."""
    a = _slot(table, 0)
    view = a.in_flight_range(1, 3)
    fd = a.table.fd
    a.close()
    assert not _fd_open(fd)
    with pytest.raises(ValueError):
        view[0]


# -- the pool index on the base ------------------------------------------------------------


def test_pool_index_hints() -> None:
    """The broker's counters: a worker attaches read-only and sees them; add never goes
    below zero; the slot of a key is its CRC-32 modulo the slots."""
    index = PoolIndex.create(64)
    worker = PoolIndex.attach(os.dup(index.fd))
    try:
        assert worker.slots == 64
        slot = slot_of(b"10.0.0.1:80", 64)
        assert not worker.available(slot)
        index.add(slot, 2)
        assert worker.available(slot)
        index.add(slot, -5)
        assert index.counts[slot] == 0 and not worker.available(slot)
        with pytest.raises(TypeError):
            worker.add(slot, 1)
    finally:
        worker.close()
        index.close()


def test_pool_index_default_slots() -> None:
    index = PoolIndex.create()
    try:
        assert index.slots == DEFAULT_SLOTS
        with pytest.raises(ValueError, match="kind"):
            BalanceTable.attach(os.dup(index.fd))
    finally:
        index.close()


def test_another_process_writes_its_row(table: BalanceTable) -> None:
    """A child process (as a worker is) attaches its slot from the inherited descriptor; its
    turns and in-flight counts are what the parent reads, and it cannot write slot 0's."""
    fd = os.dup(table.fd)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only when everything held
        code = 1
        try:
            slot = BalanceTable.attach_slot(fd, 2)
            for _ in range(3):
                slot.take_turn(1)
            slot.begin(4)
            try:
                slot.table.cells[1 * slot.table.row_cells] = 9
            except TypeError:
                code = 0
        finally:
            os._exit(code)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.turn(1) == 3 and table.in_flight(4) == 1
