"""shared.lb: the selection algorithms behind the Selector interface (round robin today)."""

from __future__ import annotations

import pytest

from shared.lb import RoundRobin, Selector
from shared.peer import HttpPeer


def test_round_robin_cycles() -> None:
    """select() goes through the peers in order and starts over."""
    peers = [HttpPeer(f"10.0.0.{i}:80") for i in range(1, 4)]
    rr = RoundRobin(peers)
    assert [rr.select() for _ in range(7)] == [*peers, *peers, peers[0]]


@pytest.mark.parametrize(("start", "first"), [(0, 0), (1, 1), (2, 2), (3, 0), (5, 2)])
def test_round_robin_start(start: int, first: int) -> None:
    """The start index (modulo the count) is the first peer chosen; order continues from it."""
    peers = [HttpPeer(f"10.0.0.{i}:80") for i in range(3)]
    rr = RoundRobin(peers, start=start)
    assert [rr.select() for _ in range(3)] == [peers[(first + i) % 3] for i in range(3)]


def test_round_robin_single_peer() -> None:
    """With one peer, every choice is that peer."""
    peer = HttpPeer("10.0.0.1:80")
    rr = RoundRobin([peer], start=4)
    assert [rr.select() for _ in range(3)] == [peer, peer, peer]


def test_round_robin_ignores_the_key() -> None:
    """Round robin takes a key, as every selector does, and goes on in turn whatever it is."""
    peers = [HttpPeer(f"10.0.0.{i}:80") for i in range(3)]
    rr = RoundRobin(peers)
    assert [rr.select(b"client-a"), rr.select(None), rr.select(b"client-a")] == peers


@pytest.mark.parametrize("start", [0, 1, 2])
def test_iter_is_the_failover_order(start: int) -> None:
    """iter() begins with the peer select() would have chosen, then goes round the others,
    each once."""
    peers = [HttpPeer(f"10.0.0.{i}:80") for i in range(3)]
    expected = RoundRobin(peers, start=start).select()
    order = list(RoundRobin(peers, start=start).iter(b"key"))
    assert order[0] is expected
    assert order == [peers[(start + i) % 3] for i in range(3)]


def test_iter_takes_one_turn() -> None:
    """An iter() takes one turn of the rotation however far it is read, so failing over does
    not skew the rotation of the next requests."""
    peers = [HttpPeer(f"10.0.0.{i}:80") for i in range(3)]
    rr = RoundRobin(peers)
    assert list(rr.iter()) == peers
    assert next(rr.iter()) is peers[1]
    assert [rr.select(), rr.select()] == [peers[2], peers[0]]


def test_iter_of_no_peers_is_empty() -> None:
    """An empty set has no failover order; select() on it raises IndexError."""
    rr: RoundRobin[HttpPeer] = RoundRobin([], start=3)
    assert list(rr.iter()) == []
    with pytest.raises(IndexError):
        rr.select()


def test_round_robin_is_a_selector() -> None:
    """RoundRobin provides the Selector interface (checked by mypy here, and at run time)."""
    selector: Selector[HttpPeer] = RoundRobin([HttpPeer("10.0.0.1:80")])
    assert isinstance(selector, Selector)
