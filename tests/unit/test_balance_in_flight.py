"""The engine counts each request in flight to the balancer's peer it went to, from the choice of
the peer until the request is over, on every path: a response, an error, a retry to another
server, the client going away; over HTTP/1.1 and HTTP/2 (tests/support/protocols.py). The
counts are local here (no balance table outside a worker); the fleet's table is the same cells.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from shared.apps.load_balancer import LoadBalancer
from shared.balancer import Balancer
from shared.peer import Cells
from tests.support.protocols import OK_HEAD, PROTOCOLS, H2Client, Proxy, proxies

#: Two servers, so that a retry goes to the other one (round robin).
SERVERS = ["192.0.2.10:8080", "192.0.2.11:8080"]


@pytest.fixture(params=PROTOCOLS)
def make_proxy(request: pytest.FixtureRequest) -> Iterator[Callable[..., Proxy]]:
    yield from proxies(request.param)


def two_servers(
    make_proxy: Callable[..., Proxy], balance: str = "round_robin", **config: object
) -> tuple[Proxy, Balancer]:
    proxy = make_proxy(upstreams={"origin": {"servers": SERVERS, "balance": balance}}, **config)
    assert isinstance(proxy.app, LoadBalancer)
    return proxy, proxy.app.balancer("origin")


class Recorded:
    """An in-flight counter whose one cell writes down each change, in one list for every
    peer ("begin N" for +1, "end N" for -1)."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name
        self.cells: Cells = self
        self.index = 0
        self.guard = None
        self.value = 0

    def __getitem__(self, i: int, /) -> int:
        return self.value

    def __setitem__(self, i: int, value: int, /) -> None:
        self.log.append(f"{'begin' if value > self.value else 'end'} {self.name}")
        self.value = value


def counts(b: Balancer) -> list[int]:
    return [b.load.count(i) for i in range(len(b.peers))]


def test_counted_until_the_response_ends(make_proxy: Callable[..., Proxy]) -> None:
    proxy, b = two_servers(make_proxy)
    c = proxy.client()
    first = c.request("GET", "/1")
    assert counts(b) == [1, 0]
    c2 = proxy.client()
    second = c2.request("GET", "/2")
    assert counts(b) == [1, 1]
    up1, up2 = proxy.origin.conns
    proxy.step(up1.reply, OK_HEAD % 2 + b"ok")
    assert counts(b) == [0, 1]
    proxy.step(up2.reply, OK_HEAD % 0)
    assert counts(b) == [0, 0]
    for client, rid in ((c, first), (c2, second)):
        r = client.reply(rid)
        assert r is not None and r.status == 200


def test_a_response_body_in_progress_still_counts(make_proxy: Callable[..., Proxy]) -> None:
    proxy, b = two_servers(make_proxy)
    c = proxy.client()
    rid = c.request("GET", "/")
    [up] = proxy.origin.conns
    proxy.step(up.reply, OK_HEAD % 10 + b"01234")
    assert counts(b) == [1, 0]
    proxy.step(up.reply, b"56789")
    assert counts(b) == [0, 0]
    r = c.reply(rid)
    assert r is not None and r.complete


def test_a_retry_moves_the_count_to_the_next_server(make_proxy: Callable[..., Proxy]) -> None:
    """Connect refused on both servers (a retry to the second): nothing counts once the 502
    is written; a connection reset before the response (retried on the other server, reset
    again): nothing counts either."""
    proxy, b = two_servers(make_proxy, server={"max_retries": 1})
    log: list[str] = []
    counters = [p.in_flight for p in b.peers]
    for i, peer in enumerate(b.peers):
        peer.in_flight = Recorded(log, str(i))
    proxy.origin.refuse = True
    c = proxy.client()
    rid = c.request("GET", "/")
    assert log == ["begin 0", "end 0", "begin 1", "end 1"]
    assert proxy.origin.attempts == 2
    r = c.reply(rid)
    assert r is not None and r.status == 502
    for peer, counter in zip(b.peers, counters, strict=True):
        peer.in_flight = counter
    proxy.origin.refuse = False
    c = proxy.client()
    rid = c.request("GET", "/")  # turn 2: server 0
    assert counts(b) == [1, 0]
    [up] = proxy.origin.conns
    proxy.step(up.fail)  # a fresh connection reset unanswered: a GET goes to server 1
    assert counts(b) == [0, 1]
    [_, retry] = proxy.origin.conns
    proxy.step(retry.fail)  # max_retries 1: 502, and nothing counts
    assert counts(b) == [0, 0]
    r = c.reply(rid)
    assert r is not None and r.status == 502


def test_an_upstream_timeout_ends_the_count(make_proxy: Callable[..., Proxy]) -> None:
    proxy, b = two_servers(make_proxy, server={"max_retries": 0})
    c = proxy.client()
    rid = c.request("GET", "/slow")
    assert counts(b) == [1, 0]
    proxy.step(proxy.engine.sweep, time.monotonic() + proxy.engine.read_timeout + 1)
    r = c.reply(rid)
    assert r is not None and r.status == 504
    assert counts(b) == [0, 0]


def test_the_client_going_away_ends_the_count(make_proxy: Callable[..., Proxy]) -> None:
    proxy, b = two_servers(make_proxy)
    c = proxy.client()
    rid = c.request("GET", "/")
    assert counts(b) == [1, 0]
    if isinstance(c, H2Client):
        c.reset(rid)
    else:
        c.gone()
    assert counts(b) == [0, 0]


def test_the_client_gone_while_connecting_ends_the_count(
    make_proxy: Callable[..., Proxy],
) -> None:
    proxy, b = two_servers(make_proxy)
    gate = proxy.origin.gate = proxy.loop.create_future()
    c = proxy.client()
    rid = c.request("GET", "/")
    assert counts(b) == [1, 0]
    if isinstance(c, H2Client):
        c.reset(rid)
    else:
        c.gone()
    proxy.origin.gate = None
    proxy.step(gate.set_result, None)
    assert counts(b) == [0, 0]


def test_least_conn_avoids_the_busy_server(make_proxy: Callable[..., Proxy]) -> None:
    """With one request held on a server, least_conn sends the next ones to the other."""
    proxy, b = two_servers(make_proxy, "least_conn")
    held = proxy.client()
    held.request("GET", "/held")
    busy = counts(b).index(1)
    for n in range(4):
        c = proxy.client()
        rid = c.request("GET", f"/{n}")
        assert counts(b)[1 - busy] == 1
        up = proxy.origin.conns[-1]
        proxy.step(up.reply, OK_HEAD % 0)
        r = c.reply(rid)
        assert r is not None and r.status == 200
    assert counts(b)[busy] == 1


def test_a_peer_made_by_hand_counts_nothing() -> None:
    """HttpPeer.in_flight is None unless a balancer made the peer."""
    from shared.peer import HttpPeer

    assert HttpPeer("192.0.2.1:80").in_flight is None
