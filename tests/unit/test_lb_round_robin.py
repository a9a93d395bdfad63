"""shared.lb round robin over the fleet (smooth weighted, indexed by the shared turn), weighted
random, the usable mask and the backup rule, and slow start."""

from __future__ import annotations

import itertools
import os
import random
from collections import Counter
from collections.abc import Iterator

import pytest

from shared.lb import (
    BALANCE_NAMES,
    ConsistentHash,
    FleetRoundRobin,
    LeastConn,
    Members,
    Selector,
    Turns,
    WeightedRandom,
    make_selector,
    ramp_weights,
    smooth_weighted,
)
from shared.lb.slow_start import RAMP_STEPS, ramp_factor, ramping
from shared.shm import BalanceTable, SlotCells
from shared.shm.balance import server_ranges


@pytest.fixture
def workers() -> Iterator[tuple[SlotCells, SlotCells]]:
    """Two workers' views of one balance table (one upstream, three servers, four slots)."""
    table = BalanceTable.create(1, 3, 4)
    a = BalanceTable.attach_slot(os.dup(table.fd), 0)
    b = BalanceTable.attach_slot(os.dup(table.fd), 3)
    yield a, b
    a.close()
    b.close()
    table.close()


def _names(schedule: list[int]) -> str:
    return "".join("abcdefgh"[i] for i in schedule)


def test_smooth_weighted_is_nginx_sequence() -> None:
    """nginx's smooth weighted round robin for weights 5, 1, 1 is a a b a c a a."""
    assert _names(smooth_weighted([5, 1, 1])) == "aabacaa"


@pytest.mark.parametrize(
    ("weights", "expected"),
    [([1, 1, 1], "abc"), ([2, 2], "ab"), ([10, 5, 5], "abca"), ([3, 1], "aaba")],
)
def test_smooth_weighted_schedules(weights: list[int], expected: str) -> None:
    """Equal weights are plain rotation; weights with a common divisor give the reduced
    schedule (the same sequence, shorter)."""
    assert _names(smooth_weighted(weights)) == expected


def test_fleet_alternation(workers: tuple[SlotCells, SlotCells]) -> None:
    """Two workers, each with its own selector over one shared table: interleaved selections
    go to consecutive servers, whichever worker takes the request."""
    a, b = workers
    peers = ["s0", "s1", "s2"]
    rr_a = FleetRoundRobin(Members(peers), Turns.shared(a, 0))
    rr_b = FleetRoundRobin(Members(peers), Turns.shared(b, 0))
    order = [rr_a, rr_b, rr_b, rr_a, rr_b, rr_a, rr_a, rr_b, rr_a]
    assert [rr.select() for rr in order] == [*peers, *peers, *peers]


def _longest_run(seq: list[str]) -> int:
    return max(len(list(g)) for _, g in itertools.groupby(seq))


def test_weights_over_the_fleet_without_bursts(workers: tuple[SlotCells, SlotCells]) -> None:
    """Weights 5, 1, 1 from two randomly interleaved workers: shares within a few percent
    over 10 000 selections, and the fleet's sequence is nginx's cycle repeated (no more than
    two in a row within a cycle, four across a cycle's end, where naive weighted round robin
    sends five)."""
    a, b = workers
    peers = ["a", "b", "c"]
    selectors = [
        FleetRoundRobin(Members(peers, [5, 1, 1]), Turns.shared(slot, 0)) for slot in (a, b)
    ]
    rng = random.Random(7)
    chosen = [selectors[rng.randrange(2)].select() or "" for _ in range(10_000)]
    counts = Counter(chosen)
    for name, weight in zip(peers, [5, 1, 1], strict=True):
        assert abs(counts[name] / 10_000 - weight / 7) < 0.02
    assert chosen == list("aabacaa" * 1429)[:10_000]
    assert _longest_run(chosen) == 4


def test_round_robin_is_a_selector() -> None:
    """The fleet selectors satisfy the Selector interface."""
    selector: Selector[str] = FleetRoundRobin(Members(["a"]))
    assert isinstance(selector, Selector)
    assert isinstance(WeightedRandom(Members(["a"])), Selector)


def test_unusable_members_are_skipped() -> None:
    """A member marked down in the mask takes nothing; the others share its turns evenly, and
    it is back in the rotation as soon as it is usable again."""
    mask = bytearray(b"\x01" * 3)
    members = Members(["a", "b", "c"], usable=mask)
    rr = FleetRoundRobin(members)
    mask[1] = 0
    picks = [rr.select() for _ in range(6)]
    assert "b" not in picks and Counter(picks) == {"a": 3, "c": 3}
    mask[1] = 1
    assert sorted(str(rr.select()) for _ in range(3)) == ["a", "b", "c"]


def test_backups_only_while_no_primary_is_usable() -> None:
    """Backups take requests only when every primary is unusable, and stop when one is back."""
    mask = bytearray(b"\x01" * 4)
    members = Members(["a", "b", "x", "y"], backup=[False, False, True, True], usable=mask)
    rr = FleetRoundRobin(members)
    assert {rr.select() for _ in range(10)} == {"a", "b"}
    mask[0] = mask[1] = 0
    assert {rr.select() for _ in range(10)} == {"x", "y"}
    mask[1] = 1
    assert {rr.select() for _ in range(10)} == {"b"}


def test_nothing_usable() -> None:
    """No usable member: select is None and the failover order is empty."""
    members = Members(["a", "b"], usable=bytearray(2))
    rr = FleetRoundRobin(members)
    assert rr.select() is None
    assert list(rr.iter()) == []
    assert rr.select_index() == -1


def test_failover_order() -> None:
    """iter: the member select would choose (one turn taken), then the other usable primaries
    around the ring, then the usable backups."""
    mask = bytearray(b"\x01" * 4)
    members = Members(["a", "b", "c", "x"], backup=[False, False, False, True], usable=mask)
    rr = FleetRoundRobin(members, Turns.local(start=1))
    mask[2] = 0
    assert list(rr.iter()) == ["b", "a", "x"]
    assert rr.turns.peek() == 2


def test_only_backups_configured() -> None:
    """An upstream whose members are all backups still balances over them."""
    rr = FleetRoundRobin(Members(["x", "y"], backup=[True, True]))
    assert [rr.select() for _ in range(4)] == ["x", "y", "x", "y"]


def test_members_checks_lengths_and_weights() -> None:
    with pytest.raises(ValueError):
        Members(["a", "b"], weights=[1])
    with pytest.raises(ValueError):
        Members(["a"], weights=[0])


def test_weighted_random_shares() -> None:
    """Random draws follow the weights, within a few percent over 10 000, and skip a down
    member."""
    mask = bytearray(b"\x01" * 3)
    members = Members(["a", "b", "c"], [3, 1, 1], usable=mask)
    selector = WeightedRandom(members, random.Random(1))
    counts = Counter(selector.select() for _ in range(10_000))
    assert abs(counts["a"] / 10_000 - 0.6) < 0.02
    assert abs(counts["b"] / 10_000 - 0.2) < 0.02
    mask[0] = 0
    assert {selector.select() for _ in range(200)} == {"b", "c"}


# -- slow start ----------------------------------------------------------------------------


def test_ramp_factor_is_linear() -> None:
    assert ramp_factor(0.0, 10.0) == 0.0
    assert ramp_factor(2.5, 10.0) == 0.25
    assert ramp_factor(10.0, 10.0) == 1.0
    assert ramp_factor(3.0, 0.0) == 1.0


def test_ramp_weights() -> None:
    """While a server ramps, weights are scaled by RAMP_STEPS and the ramping one reduced (at
    least 1); once no server ramps, the configured weights come back unscaled."""
    assert ramp_weights([1, 1, 2], [100.0, 100.0, 1.0], 10.0) == [10, 10, 2]
    assert ramp_weights([1, 1], [0.0, 100.0], 10.0) == [1, RAMP_STEPS]
    assert ramp_weights([1, 3], [100.0, 100.0], 10.0) == [1, 3]
    assert ramping([0.5, 20.0], 10.0) and not ramping([20.0], 10.0)


def test_slow_start_share_grows() -> None:
    """A server ramping at 30 % of its weight gets about 30 % of a peer's share."""
    members = Members(["a", "b"])
    rr = FleetRoundRobin(members)
    rr.set_weights(ramp_weights([1, 1], [100.0, 3.0], 10.0))
    counts = Counter(rr.select() for _ in range(1300))
    assert counts == {"a": 1000, "b": 300}


def test_make_selector_names() -> None:
    """Each balance name builds its selector; an unknown one is refused with the choices."""
    kinds = [FleetRoundRobin, WeightedRandom, LeastConn, ConsistentHash]
    for name, kind in zip(BALANCE_NAMES, kinds, strict=True):
        assert isinstance(make_selector(name, Members(["10.0.0.1:80"])), kind)
    with pytest.raises(ValueError, match="round_robin, random, least_conn, hash"):
        make_selector("fastest", Members(["a"]))
    assert server_ranges([3, 2, 1]) == [(0, 3), (3, 2), (5, 1)]
