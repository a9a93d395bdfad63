"""shared.apps.load_balancer: the built-in load balancer's routing by Host and its fleet-wide
rotation."""

from __future__ import annotations

import os
import typing
from typing import Any

import pytest

from shared.apps.load_balancer import LoadBalancer
from shared.config import Config, from_mapping
from shared.errors import ErrorKind, ProxyError
from shared.session import Session
from shared.shm.balance import BalanceTable, SlotCells


class FakeSession:
    """Just what upstream_peer reads: the Host header."""

    def __init__(self, host: str | None) -> None:
        self.host = host


def session(host: str | None) -> Session:
    """A fake session with this Host, typed as what upstream_peer takes."""
    return typing.cast(Session, FakeSession(host))


def config(upstreams: dict[str, Any], **extra: Any) -> Config:
    """A validated config with these upstreams."""
    return from_mapping({"upstreams": upstreams, **extra}, "<test>")


ROUTED = config(
    {
        "web": {"servers": ["10.0.0.1:80", "10.0.0.2:80"]},
        "api": {
            "servers": ["10.0.1.1:8080", "10.0.1.2:8080", "10.0.1.3:8080"],
            "hosts": ["api.example.com", "API.internal"],
        },
    }
)


def balancer(cfg: Config, worker_id: int = 0, slot: SlotCells | None = None) -> LoadBalancer:
    """A load balancer configured the way a worker does it (counting in ``slot`` of a
    balance table, or locally)."""
    lb = LoadBalancer()
    lb.worker_id = worker_id
    lb.balance_slot = slot
    lb.configure(cfg)
    return lb


def pick(lb: LoadBalancer, host: str | None, n: int = 1) -> list[str]:
    """The addresses of the next ``n`` peers chosen for requests with this Host."""
    return [str(lb.upstream_peer(session(host), None)) for _ in range(n)]


def test_routes_by_host() -> None:
    """A listed Host goes to its upstream, in round-robin order."""
    lb = balancer(ROUTED)
    assert pick(lb, "api.example.com", 4) == [
        "10.0.1.1:8080",
        "10.0.1.2:8080",
        "10.0.1.3:8080",
        "10.0.1.1:8080",
    ]


@pytest.mark.parametrize(
    "host", ["api.example.com:8443", "API.Example.COM", "Api.Example.Com:80", "api.internal"]
)
def test_routes_by_host_ignoring_port_and_case(host: str) -> None:
    """The port of the Host header is ignored, and names compare without case."""
    assert pick(balancer(ROUTED), host) == ["10.0.1.1:8080"]


@pytest.mark.parametrize("host", ["www.example.com", "example.com:8080", "", None])
def test_other_hosts_go_to_first_upstream(host: str | None) -> None:
    """Unlisted, empty or missing Host goes to the first upstream."""
    assert pick(balancer(ROUTED), host, 3) == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.1:80"]


def test_ipv6_literal_host_with_port() -> None:
    """A Host of an IPv6 literal with a port routes by the bracketed address."""
    lb = balancer(
        config(
            {
                "web": {"servers": ["10.0.0.1:80"]},
                "v6": {"servers": ["10.0.6.1:80"], "hosts": ["[::1]"]},
            }
        )
    )
    assert pick(lb, "[::1]:8080") == ["10.0.6.1:80"]


def test_ipv6_literal_host_without_port() -> None:
    """A Host of an IPv6 literal without a port (RFC 9110 uri-host) routes by that address."""
    lb = balancer(
        config(
            {
                "web": {"servers": ["10.0.0.1:80"]},
                "v6": {"servers": ["10.0.6.1:80"], "hosts": ["[::1]"]},
            }
        )
    )
    assert pick(lb, "[::1]") == ["10.0.6.1:80"]


def test_without_hosts_everything_goes_to_first_upstream() -> None:
    """With no hosts listed anywhere, only the first upstream is used."""
    lb = balancer(config({"a": {"servers": ["10.0.0.1:80"]}, "b": {"servers": ["10.0.0.2:80"]}}))
    assert pick(lb, "b", 2) == ["10.0.0.1:80", "10.0.0.1:80"]


def test_first_upstream_with_servers_is_default() -> None:
    """An upstream without servers is skipped when choosing the default."""
    lb = balancer(config({"empty": {"hosts": ["x.example"]}, "web": {"servers": ["10.0.0.9:80"]}}))
    assert pick(lb, "x.example") == ["10.0.0.9:80"]


def test_workers_rotate_as_one_over_the_shared_table() -> None:
    """Load balancers of different worker slots on one balance table take turns from the
    fleet's rotation: consecutive requests alternate whichever worker takes them."""
    counts = [len(u.servers) for u in ROUTED.upstreams.values()]
    table = BalanceTable.create(len(counts), sum(counts), 2)
    slots = [BalanceTable.attach_slot(os.dup(table.fd), w) for w in (0, 1)]
    try:
        lbs = [balancer(ROUTED, w, slots[w]) for w in (0, 1)]
        seen = [pick(lbs[i % 2], None)[0] for i in range(6)]
        assert seen == ["10.0.0.1:80", "10.0.0.2:80"] * 3
        seen = [pick(lbs[i % 3 % 2], "api.example.com")[0] for i in range(6)]
        assert seen == [f"10.0.1.{i % 3 + 1}:8080" for i in range(6)]
        assert table.turn(0) == 6 and table.turn(1) == 6
    finally:
        del lbs
        for slot in slots:
            slot.close()
        table.close()


def test_weights_and_backups_from_the_config() -> None:
    """Weights give nginx's smooth sequence; a backup takes nothing while a primary is
    usable, everything once none is."""
    cfg = config(
        {
            "web": {
                "servers": [
                    {"address": "10.0.0.1:80", "weight": 5},
                    "10.0.0.2:80",
                    "10.0.0.3:80",
                    {"address": "10.0.0.9:80", "backup": True},
                ]
            }
        }
    )
    lb = balancer(cfg)
    a, b, c, _ = (f"10.0.0.{i}:80" for i in (1, 2, 3, 9))
    assert pick(lb, None, 7) == [a, a, b, a, c, a, a]
    usable = typing.cast(bytearray, lb.balancer("web").members.usable)
    for i in range(3):
        usable[i] = 0
    assert pick(lb, None, 2) == ["10.0.0.9:80"] * 2
    usable[3] = 0
    with pytest.raises(ProxyError) as info:
        pick(lb, None)
    assert info.value.kind is ErrorKind.NO_PEER


def test_no_servers_is_no_peer() -> None:
    """With an app set and no upstreams, choosing a peer fails with a 502 NO_PEER error."""
    lb = balancer(config({}, app="mypackage.gateway:Gateway"))
    with pytest.raises(ProxyError) as info:
        pick(lb, "example.com")
    assert info.value.kind is ErrorKind.NO_PEER
    assert info.value.status == 502


def test_peers_are_plain_http() -> None:
    """Peers built from servers use plain HTTP on the given port."""
    peer = balancer(ROUTED).upstream_peer(session(None), None)
    assert (peer.host, peer.port, peer.tls) == ("10.0.0.1", 80, False)
