"""shared.lb.least_conn: in-flight requests counted across workers in the shared table, the
true minimum and power of two choices, ties broken in rotation."""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator

import pytest

from shared.lb import LeastConn, Load, Members, Turns
from shared.shm import BalanceTable, SlotCells

PEERS = ["s0", "s1", "s2"]


@pytest.fixture
def workers() -> Iterator[tuple[SlotCells, SlotCells]]:
    """Two workers' views of one balance table (one upstream of three servers)."""
    table = BalanceTable.create(1, 3, 4)
    a = BalanceTable.attach_slot(os.dup(table.fd), 1)
    b = BalanceTable.attach_slot(os.dup(table.fd), 2)
    yield a, b
    a.close()
    b.close()
    table.close()


def _selector(slot: SlotCells, exact: bool, members: Members[str] | None = None) -> LeastConn[str]:
    members = members or Members(PEERS)
    return LeastConn(
        members,
        Load.shared(slot, 0, len(members.peers)),
        Turns.shared(slot, 0),
        exact=exact,
        rng=random.Random(3),
    )


@pytest.mark.parametrize("exact", [True, False])
def test_prefers_fewer_in_flight_across_workers(
    workers: tuple[SlotCells, SlotCells], exact: bool
) -> None:
    """Worker a has two requests in flight to s0, worker b one to s1: b's selector sees the
    fleet's counts and picks s2, then (one more to s2 counted) s1 or s2, never s0."""
    a, b = workers
    sel_a, sel_b = _selector(a, exact), _selector(b, exact)
    sel_a.load.begin(0)
    sel_a.load.begin(0)
    sel_b.load.begin(1)
    assert sel_b.load.count(0) == 2
    if exact:
        assert sel_b.select() == "s2"
    picks = []
    for _ in range(20):
        i = sel_b.select_index()
        picks.append(i)
        sel_b.load.begin(i)
        sel_b.load.end(i)
    assert 0 not in picks


def test_exact_minimum_ties_go_in_rotation(workers: tuple[SlotCells, SlotCells]) -> None:
    """With nothing in flight, the true minimum is a tie every time, broken by the fleet's
    turn: two workers interleaved go round the servers."""
    a, b = workers
    sel_a, sel_b = _selector(a, True), _selector(b, True)
    picks = [s.select() for s in (sel_a, sel_b, sel_b, sel_a, sel_a, sel_b)]
    assert picks == [*PEERS, *PEERS]


def test_two_choices_ties_go_to_the_rotation() -> None:
    """Power of two choices with equal loads takes the rotation's member."""
    selector = LeastConn(Members(PEERS), rng=random.Random(5))
    assert [selector.select() for _ in range(6)] == [*PEERS, *PEERS]


def test_two_choices_avoids_the_loaded_server() -> None:
    """Two servers, one with requests in flight: power of two choices always compares both,
    so every request goes to the idle one."""
    selector = LeastConn(Members(["busy", "idle"]), rng=random.Random(9))
    selector.load.begin(0)
    assert Counter(selector.select() for _ in range(100)) == {"idle": 100}


@pytest.mark.parametrize("exact", [True, False])
def test_in_flight_is_relative_to_weight(exact: bool) -> None:
    """A server of weight 3 with 2 in flight is less loaded than one of weight 1 with 1."""
    selector = LeastConn(Members(["a", "b"], [3, 1]), exact=exact, rng=random.Random(2))
    selector.load.begin(0)
    selector.load.begin(0)
    selector.load.begin(1)
    assert {selector.select() for _ in range(20)} == {"a"}


@pytest.mark.parametrize("exact", [True, False])
def test_unusable_and_backup(exact: bool) -> None:
    """A down server is skipped even when least loaded; backups only when no primary is."""
    mask = bytearray(b"\x01" * 3)
    members = Members(["a", "b", "x"], backup=[False, False, True], usable=mask)
    selector = LeastConn(members, exact=exact, rng=random.Random(4))
    selector.load.begin(0)
    mask[1] = 0
    assert {selector.select() for _ in range(10)} == {"a"}
    mask[0] = 0
    assert {selector.select() for _ in range(10)} == {"x"}
    mask[2] = 0
    assert selector.select() is None
    mask[:] = b"\x01\x01\x01"
    assert {selector.select() for _ in range(10)} == {"b"}


def test_failover_order_after_the_least_loaded() -> None:
    """iter starts with the least loaded member, then the other usable ones."""
    selector = LeastConn(Members(PEERS), exact=True)
    selector.load.begin(0)
    selector.load.begin(2)
    assert list(selector.iter()) == ["s1", "s2", "s0"]
