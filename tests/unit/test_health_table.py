"""shared.shm.health: rows keyed by (upstream, address), one writer per column, the usable
vectors a worker hands to Members, and what a reload or an upgrade keeps."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from shared.lb.members import Members
from shared.shm.health import (
    Failure,
    HealthDirectory,
    HealthTable,
    State,
    TableFull,
    describe,
)

A = [("origin", "127.0.0.1:9001"), ("origin", "127.0.0.1:9002"), ("api", "127.0.0.1:9101")]


@pytest.fixture
def table() -> Iterator[HealthTable]:
    t = HealthTable.create(8)
    yield t
    t.close()


def test_a_new_server_is_unknown_and_usable(table: HealthTable) -> None:
    """HAProxy's start: a new row is UNKNOWN (never checked), which counts as up."""
    directory = HealthDirectory(table)
    layout = directory.publish(A)
    rows = [directory.rows[k] for k in A]
    assert rows == [0, 1, 2]
    assert all(table.state[r] == State.UNKNOWN and table.is_up(r) for r in rows)
    assert list(table.usable(layout)[:3]) == [1, 1, 1]
    assert [table.key(r) for r in rows] == A
    assert table.key(3) is None


def test_usable_is_not_down_not_drained_not_ejected(table: HealthTable) -> None:
    """The master's refresh writes usable = not DOWN and not drained and not ejected, in
    config order, into the vector a worker reads."""
    prober = HealthTable.attach_prober(os.dup(table.fd))
    try:
        directory = HealthDirectory(table)
        layout = directory.publish(A)
        usable = table.usable(layout)
        prober.state[1] = State.DOWN
        directory.refresh([1])
        assert list(usable[:3]) == [1, 0, 1]
        prober.state[1] = State.UP
        table.drained[0] = 1
        table.ejected_until_ns[2] = 10**18
        directory.refresh(now_ns=10**18 - 1)
        assert list(usable[:3]) == [0, 1, 0]
        table.drained[0] = 0
        directory.refresh(now_ns=10**18)  # the ejection is over
        assert list(usable[:3]) == [1, 1, 1]
    finally:
        prober.close()


def test_the_prober_writes_only_the_active_columns(table: HealthTable) -> None:
    """The prober's columns are whole pages mapped writable in the prober alone; the rest of
    its map is read-only, and a worker's map is read-only throughout."""
    prober = HealthTable.attach_prober(os.dup(table.fd))
    worker = HealthTable.attach(os.dup(table.fd))
    try:
        prober.rises[3] = 2
        prober.last_result[3] = Failure.TIMEOUT
        assert table.rises[3] == 2 and table.last_result[3] == Failure.TIMEOUT
        with pytest.raises(TypeError):
            prober.drained[3] = 1
        with pytest.raises(TypeError):
            prober.usable(0)[3] = 0
        with pytest.raises(TypeError):
            worker.state[3] = State.DOWN
    finally:
        prober.close()
        worker.close()


def test_members_reads_the_vector_by_reference(table: HealthTable) -> None:
    """A worker slices its upstream's servers out of the vector and hands the view to Members:
    the master's next refresh changes the next selection, with no call."""
    directory = HealthDirectory(table)
    layout = directory.publish(A)
    worker = HealthTable.attach(os.dup(table.fd))
    try:
        mask = worker.usable(layout)[0:2]  # upstream "origin": servers 0 and 1
        members = Members(["a", "b"], usable=mask)
        assert members.tier() == (0, 1)
        table.drained[directory.rows[A[0]]] = 1
        directory.refresh()
        assert members.tier() == (1,)
        del members
        mask.release()
    finally:
        worker.close()


def test_a_reload_keeps_a_kept_servers_row_and_state(table: HealthTable) -> None:
    """A new generation's vector: a kept server keeps its row (and a down server stays down),
    a new one gets a fresh row, a removed one's row is retired once its generation is gone."""
    directory = HealthDirectory(table)
    old = directory.publish(A)
    table.state[1] = State.DOWN  # (the prober's write, from the test)
    directory.refresh()
    reloaded = [A[1], ("origin", "127.0.0.1:9003"), A[2]]
    new = directory.publish(reloaded)
    assert new != old
    assert [directory.rows[k] for k in reloaded] == [1, 3, 2]
    assert list(table.usable(new)[:3]) == [0, 1, 1]
    assert list(table.vector_rows(new)[:3]) == [1, 3, 2]
    assert A[0] in directory.rows  # the old generation still reads it
    directory.release(old)
    assert A[0] not in directory.rows and table.key(0) is None
    # A server removed then added again is a new server: a fresh row, not its old state.
    again = directory.publish([A[0], *reloaded])
    assert directory.rows[A[0]] == 4
    assert table.usable(again)[0] == 1


def test_a_new_master_reads_the_directory_from_the_table(table: HealthTable) -> None:
    """After an upgrade the new master attaches the handed-over descriptor: rows and keys come
    back from the table, the old master's vectors are left to it, the state is kept."""
    directory = HealthDirectory(table)
    old_layout = directory.publish(A)
    table.state[2] = State.DOWN
    directory.refresh()
    handed = HealthTable.attach(os.dup(table.fd), writable=True)
    try:
        successor = HealthDirectory.from_table(handed)
        successor.pid = os.getpid() + 1_000_000  # another master (not a live pid)
        assert successor.rows == directory.rows
        layout = HealthDirectory(handed, pid=successor.pid).publish(A)
        assert layout != old_layout
        assert list(handed.usable(layout)[:3]) == [1, 1, 0]
        assert list(table.usable(old_layout)[:3]) == [1, 1, 0]
    finally:
        handed.close()


def test_survives_re_attach(table: HealthTable) -> None:
    """Closing an attached map leaves the table; attaching again sees the same cells."""
    directory = HealthDirectory(table)
    directory.publish(A)
    table.checks[0] = 7
    for _ in range(3):
        reader = HealthTable.attach(os.dup(table.fd))
        assert reader.checks[0] == 7 and reader.key(0) == A[0]
        reader.close()
    assert table.checks[0] == 7


def test_full_table_grows_with_its_state(table: HealthTable) -> None:
    """More new servers than fresh rows: TableFull, nothing changed; grown() copies every
    kept row (key, state, counters) to a larger table."""
    directory = HealthDirectory(table)
    directory.publish(A)
    table.state[2] = State.DOWN
    table.ejections[2] = 3
    many = [("origin", f"127.0.0.1:{9200 + i}") for i in range(6)]
    with pytest.raises(TableFull):
        directory.publish([*A, *many])
    assert len(directory.rows) == 3
    bigger = directory.grown(16)
    try:
        layout = bigger.publish([*A, *many])
        t = bigger.table
        assert t.state[bigger.rows[A[2]]] == State.DOWN
        assert t.ejections[bigger.rows[A[2]]] == 3
        assert list(t.usable(layout)[:9]) == [1, 1, 0, 1, 1, 1, 1, 1, 1]
    finally:
        bigger.table.close()


def test_every_vector_in_use() -> None:
    """A fifth live generation has no vector: RuntimeError, not a vector taken from another."""
    t = HealthTable.create(8, 2)
    try:
        directory = HealthDirectory(t)
        directory.publish(A)
        directory.publish(A)
        with pytest.raises(RuntimeError):
            directory.publish(A)
    finally:
        t.close()


def test_header_is_checked() -> None:
    """A descriptor of another kind of table is refused."""
    from shared.shm import PoolIndex

    other = PoolIndex.create(4)
    fd = os.dup(other.fd)
    try:
        with pytest.raises(ValueError):
            HealthTable.attach(fd)
    finally:
        os.close(fd)
        other.close()


def test_describe() -> None:
    """``last_result`` in words, as the status and the log lines say it."""
    assert describe(200) == "status 200"
    assert describe(Failure.REFUSED) == "connect refused"
    assert describe(0) == "no check yet"
