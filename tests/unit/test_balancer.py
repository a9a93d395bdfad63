"""shared.balancer: the public Balancer of an upstream (``ProxyHttp.balancer(name)``), outside a
worker (local counts) and on a shared balance table (two worker slots in one process)."""

from __future__ import annotations

import os
import typing
from typing import Any

import pytest

from shared.app import ProxyHttp
from shared.balancer import Balancer
from shared.config import Config, from_mapping
from shared.lb.fleet import MemberLoad
from shared.peer import HttpPeer
from shared.session import Session
from shared.shm.balance import BalanceTable

SERVERS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]


def config(**web: Any) -> Config:
    return from_mapping(
        {
            "upstreams": {
                "other": {"servers": ["10.9.0.1:80"]},
                "web": {"servers": SERVERS, **web},
            },
            "app": "m:A",
        }
    )


class App(ProxyHttp[None]):
    def upstream_peer(self, session: Session, ctx: None) -> HttpPeer:
        raise NotImplementedError


def app(cfg: Config) -> App:
    a = App()
    a.configure(cfg)
    return a


def addresses(peers: typing.Iterable[HttpPeer | None]) -> list[str]:
    return [str(p) for p in peers]


def test_balancer_is_built_once_per_name() -> None:
    a = app(config())
    assert a.balancer("web") is a.balancer("web")
    assert a.balancer("web") is not a.balancer("other")
    with pytest.raises(KeyError, match="no upstream named 'nope'"):
        a.balancer("nope")


def test_select_rotates_and_iter_fails_over() -> None:
    b = app(config()).balancer("web")
    assert addresses(b.select() for _ in range(4)) == [*SERVERS, SERVERS[0]]
    assert addresses(b.iter()) == [SERVERS[1], SERVERS[2], SERVERS[0]]


def test_select_with_accept_and_max_iterations() -> None:
    """With ``accept``, the first accepted peer in failover order, within max_iterations."""
    b = app(config()).balancer("web")
    not_first = b.peers[0]
    assert str(b.select(accept=lambda p: p is not not_first)) == SERVERS[1]  # turn 0
    assert b.select(max_iterations=1, accept=lambda p: p is b.peers[2]) is None  # turn 1
    assert str(b.select(max_iterations=3, accept=lambda p: p is b.peers[1])) == SERVERS[1]


def test_select_is_none_when_nothing_is_usable() -> None:
    b = app(config()).balancer("web")
    usable = typing.cast(bytearray, b.members.usable)
    usable[:] = b"\x00\x00\x00"
    assert b.select() is None
    assert list(b.iter()) == []


def test_hash_sticks_by_key() -> None:
    """balance: hash: the same key, the same server; select_for reads the hash_key."""
    b = app(config(balance="hash", hash_key="header:X-User")).balancer("web")
    chosen = {str(b.select(b"user-%d" % i)) for i in range(200)}
    assert chosen == set(SERVERS)
    for i in range(20):
        key = b"user-%d" % i
        assert len({str(b.select(key)) for _ in range(5)}) == 1

    class Request:
        raw_headers = [(b"x-user", b"user-7")]
        url = b"/"
        client_addr = ("192.0.2.1", 1234)

    assert b.select_for(Request()) is b.select(b"user-7")


def test_peers_carry_weights_and_their_in_flight_counter() -> None:
    b = app(config(servers=[{"address": "10.0.0.1:80", "weight": 3}, "10.0.0.2:80"])).balancer(
        "web"
    )
    assert b.members.weights == [3, 1]
    assert addresses(b.select() for _ in range(4)) == ["10.0.0.1:80"] * 2 + [
        "10.0.0.2:80",
        "10.0.0.1:80",
    ]
    counter = b.peers[1].in_flight
    assert isinstance(counter, MemberLoad)
    counter.begin()
    assert b.in_flight(b.peers[1]) == 1 and b.in_flight(b.peers[0]) == 0
    counter.end()
    assert b.in_flight(b.peers[1]) == 0


def test_two_slots_share_the_rotation_and_the_counts() -> None:
    """Two workers' balancers on one table: one rotation, and each sees the other's
    in-flight requests; upstream 'web' is the table's upstream 1, servers 1..3."""
    cfg = config(balance="least_conn")
    table = BalanceTable.create(2, 4, 2)
    slots = [BalanceTable.attach_slot(os.dup(table.fd), w) for w in (0, 1)]
    try:
        apps = []
        for w, slot in enumerate(slots):
            a = App()
            a.worker_id, a.balance_slot = w, slot
            a.configure(cfg)
            apps.append(a)
        b0, b1 = (a.balancer("web") for a in apps)
        counter = b0.peers[2].in_flight
        assert isinstance(counter, MemberLoad)
        counter.begin()
        assert b1.in_flight(b1.peers[2]) == 1
        assert table.in_flight(3) == 1 and table.in_flight(1) == 0
        counter.end()
        rr0, rr1 = (a.balancer("other") for a in apps)
        rr0.select(), rr1.select()
        assert table.turn(0) == 2
    finally:
        del apps
        for slot in slots:
            slot.close()
        table.close()


def test_a_table_of_another_config_is_refused() -> None:
    table = BalanceTable.create(1, 1, 1)
    slot = BalanceTable.attach_slot(os.dup(table.fd), 0)
    try:
        with pytest.raises(ValueError, match="balance table holds 1 upstreams and 1 servers"):
            Balancer(config(), "web", slot)
    finally:
        slot.close()
        table.close()
