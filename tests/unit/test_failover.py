"""Failover (issue 12): a retry goes to a server the request has not tried (the balancer skips
``session.tried``), within the fleet's retry budget (20% of requests in flight, at least 3);
``max_requests`` refuses a request at once with 503; the balance table's guard columns (one
writer per row, zeroed when a slot retires). Through the engine over HTTP/1.1 and HTTP/2
(tests/support/protocols.py), with local counts; the fleet's table holds the same cells.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from shared.apps.load_balancer import LoadBalancer
from shared.balancer import Balancer
from shared.config import Config, from_mapping
from shared.errors import ErrorKind
from shared.lb.fleet import MIN_RETRY_CONCURRENCY, Guard
from shared.peer import HttpPeer
from shared.shm.balance import GUARD_CELLS, REQUESTS, RETRIES, BalanceTable
from tests.support.protocols import OK_HEAD, PROTOCOLS, Proxy, proxies

SERVERS = ["192.0.2.10:8080", "192.0.2.11:8080", "192.0.2.12:8080"]


def config(**web: Any) -> Config:
    return from_mapping({"upstreams": {"web": {"servers": SERVERS, **web}}})


@dataclass
class Request:
    """What select_for reads of a session: the fields a hash key comes from, and ``tried``."""

    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    url: bytes = b"/"
    client_ip: bytes = b"198.51.100.1"
    tried: list[HttpPeer] | None = None


def test_select_excludes_tried_while_one_is_left() -> None:
    b = Balancer(config(), "web")
    first = b.select()
    assert first is not None
    second = b.select(exclude=[first])
    assert second is not None and second is not first
    third = b.select(exclude=[first, second])
    assert third is not None and third not in (first, second)
    # Every usable server tried: the failover order's first, as without exclude.
    assert b.select(exclude=b.peers) in b.peers


def test_select_for_skips_the_tried_servers() -> None:
    b = Balancer(config(), "web")
    for _ in range(6):
        req = Request()
        p = b.select_for(req)  # type: ignore[arg-type]
        assert p is not None
        req.tried = [p]
        again = b.select_for(req)  # type: ignore[arg-type]
        assert again is not None and again is not p


def test_hash_failover_is_the_next_on_the_ring_and_comes_back() -> None:
    b = Balancer(config(balance="hash", hash_key="header:X-User"), "web")
    req = Request(raw_headers=[(b"X-User", b"u-42")])
    home = b.select_for(req)  # type: ignore[arg-type]
    assert home is not None
    order = list(b.iter(b"u-42"))
    assert order[0] is home
    req.tried = [home]
    assert b.select_for(req) is order[1]  # type: ignore[arg-type]
    req.tried = None
    assert b.select_for(req) is home  # type: ignore[arg-type]


def test_one_server_retries_go_back_to_it() -> None:
    cfg = from_mapping({"upstreams": {"web": {"servers": SERVERS[:1]}}})
    b = Balancer(cfg, "web")
    req = Request(tried=list(b.peers))
    assert b.select_for(req) is b.peers[0]  # type: ignore[arg-type]


def test_retry_budget_is_a_fifth_of_requests_at_least_three() -> None:
    g = Guard.local("web", (1024, 1024, 1024))
    assert g.retry_budget() == MIN_RETRY_CONCURRENCY
    g.count(REQUESTS, 30)
    assert g.retry_budget() == 6
    g.count(RETRIES, 5)
    assert g.retry_allowed(counted=False)
    g.count(RETRIES, 1)
    assert not g.retry_allowed(counted=False)
    assert g.retry_allowed(counted=True)  # its own retry goes on


def test_guard_columns_one_row_each_and_retired() -> None:
    table = BalanceTable.create(2, 3, 2)
    a = BalanceTable.attach_slot(os.dup(table.fd), 0)
    b = BalanceTable.attach_slot(os.dup(table.fd), 1)
    try:
        ga = Guard.shared(a, 1, "web", (2, 1024, 1024))
        gb = Guard.shared(b, 1, "web", (2, 1024, 1024))
        ga.count(REQUESTS, 2)
        gb.count(REQUESTS, 3)
        gb.count(RETRIES, 1)
        assert sum(ga.requests) == 5 and sum(gb.retries) == 1
        assert table.guard(1, REQUESTS) == 5 and table.guard(0, REQUESTS) == 0
        assert len(b.guards) == 2 * GUARD_CELLS
        table.retire(1)
        assert table.guard(1, REQUESTS) == 2 and table.guard(1, RETRIES) == 0
        assert table.in_flight(0) == 0 and table.turn(1) == 0
    finally:
        a.close()
        b.close()
        table.close()


# -- through the engine -------------------------------------------------------------------


@pytest.fixture(params=PROTOCOLS)
def make_proxy(request: pytest.FixtureRequest) -> Iterator[Callable[..., Proxy]]:
    yield from proxies(request.param)


def lb(make_proxy: Callable[..., Proxy], **upstream: Any) -> tuple[Proxy, Balancer]:
    proxy = make_proxy(
        upstreams={"web": {"servers": SERVERS, **upstream}}, server={"max_retries": 2}
    )
    assert isinstance(proxy.app, LoadBalancer)
    return proxy, proxy.app.balancer("web")


def counts(b: Balancer) -> list[int]:
    return [b.load.count(i) for i in range(len(b.peers))]


def test_a_reset_get_goes_to_another_server_each_time(make_proxy: Callable[..., Proxy]) -> None:
    """A GET whose connection resets before any response byte is retried on the next
    untried server, up to max_retries (2): three servers, three attempts, then 502; it
    held one retry in the budget meanwhile, none once over."""
    proxy, b = lb(make_proxy)
    c = proxy.client()
    rid = c.request("GET", "/")
    seen = []
    for attempt in range(3):
        seen.append(counts(b).index(1))
        if attempt:
            assert sum(b.guard.retries) == 1
        proxy.step(proxy.origin.conns[attempt].fail)
    assert sorted(seen) == [0, 1, 2]
    r = c.reply(rid)
    assert r is not None and r.status == 502
    assert counts(b) == [0, 0, 0]
    assert sum(b.guard.requests) == 0 and sum(b.guard.retries) == 0


def test_a_post_with_a_body_is_not_retried(make_proxy: Callable[..., Proxy]) -> None:
    proxy, b = lb(make_proxy)
    c = proxy.client()
    rid = c.request("POST", "/", [("Content-Type", "text/plain")], body=b"hello")
    [up] = proxy.origin.conns
    proxy.step(up.fail)
    r = c.reply(rid)
    assert r is not None and r.status == 502
    assert len(proxy.origin.conns) == 1


def test_max_requests_refuses_at_once_with_503(make_proxy: Callable[..., Proxy]) -> None:
    proxy, b = lb(make_proxy, max_requests=2)
    clients = [proxy.client() for _ in range(3)]
    rids = [c.request("GET", f"/{i}") for i, c in enumerate(clients)]
    assert sum(b.guard.requests) == 2
    r = clients[2].reply(rids[2])
    assert r is not None and r.status == 503
    assert len(proxy.origin.conns) == 2
    for up in proxy.origin.conns:
        proxy.step(up.reply, OK_HEAD % 2 + b"ok")
    for c, rid in zip(clients[:2], rids[:2], strict=True):
        r = c.reply(rid)
        assert r is not None and r.status == 200
    assert sum(b.guard.requests) == 0


def test_over_the_budget_the_error_goes_to_the_client(make_proxy: Callable[..., Proxy]) -> None:
    """The budget's floor is 3 retries in flight: with 3 requests already retrying, a 4th
    failing request is not retried (502 at once) and the line says why."""
    proxy, b = lb(make_proxy)
    b.guard.count(RETRIES, MIN_RETRY_CONCURRENCY)  # as if other workers were retrying
    try:
        c = proxy.client()
        rid = c.request("GET", "/")
        [up] = proxy.origin.conns
        proxy.step(up.fail)
        r = c.reply(rid)
        assert r is not None and r.status == 502
        assert len(proxy.origin.conns) == 1
    finally:
        b.guard.count(RETRIES, -MIN_RETRY_CONCURRENCY)
    assert ErrorKind.CIRCUIT_OPEN.status == 503
