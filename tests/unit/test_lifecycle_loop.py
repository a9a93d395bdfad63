"""The master loop's parts in one process: the selector's handlers, the control socket and its
commands, the broker's watch on idle connections."""

from __future__ import annotations

import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from master import control
from master.arbiter import Arbiter
from master.broker import Broker
from master.control import CommandHandlers, ControlServer
from master.lifecycle import State
from master.selector import Selector
from shared import ipc
from shared.config import from_mapping
from shared.shm.pool_index import PoolIndex

KEY = b"pool-key"


@pytest.fixture
def arbiter() -> Iterator[Arbiter]:
    """An arbiter that has not started (booting, no workers, no sockets)."""
    config = from_mapping(
        {
            "listeners": [{"address": "127.0.0.1:0"}],
            "upstreams": {"web": {"servers": ["127.0.0.1:9"]}},
        },
        "test.yaml",
    )
    a = Arbiter(config)
    yield a
    os.close(a._wake_r)
    os.close(a._wake_w)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def broker() -> Iterator[Broker]:
    index = PoolIndex.create()
    b = Broker(Selector(), index, size=4, idle_timeout=60.0)
    yield b
    b.close()
    index.close()


def test_a_ready_descriptor_runs_its_handler(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    sel = Selector()
    calls: list[tuple[object, int]] = []
    sel.register(a, lambda key, mask: calls.append((key.fileobj, mask)))
    sel.dispatch(0.0)
    assert calls == []
    b.send(b"x")
    sel.dispatch(1.0)
    assert calls == [(a, selectors.EVENT_READ)]


def test_unregistering_twice_or_after_close_is_no_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = pair
    sel = Selector()
    sel.register(a, lambda key, mask: None)
    sel.unregister(a)
    sel.unregister(a)
    other, peer = socket.socketpair()
    other.close()
    peer.close()
    sel.unregister(other)


def test_an_unknown_command_is_refused(arbiter: Arbiter) -> None:
    reply = CommandHandlers(arbiter).handle("restart")
    assert not reply.ok
    assert reply.error == "unknown command 'restart'"


def test_status_before_any_worker(arbiter: Arbiter) -> None:
    reply = CommandHandlers(arbiter).handle("status")
    assert reply.ok
    data = reply.data
    assert data["pid"] == os.getpid()
    assert data["state"] == "booting"
    assert data["workers"] == []
    assert data["broker"] is None
    assert data["pool"]["upstream_requests"] == 0
    assert data["pool"]["reuse_ratio"] == 0.0


def test_a_reload_while_booting_waits(arbiter: Arbiter) -> None:
    reply = CommandHandlers(arbiter).handle("reload")
    assert reply.ok
    assert arbiter.deferred == ["hup"]


def test_stop_goes_through_the_arbiter(arbiter: Arbiter) -> None:
    assert CommandHandlers(arbiter).handle("stop").ok
    assert arbiter.lifecycle.state is State.STOPPING


def test_the_control_socket_answers_one_request(arbiter: Arbiter, tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    sel = Selector()
    server = ControlServer(path, CommandHandlers(arbiter), sel)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        replies: list[ipc.ControlReply] = []
        client = threading.Thread(target=lambda: replies.append(control.request(path, "status")))
        client.start()
        deadline = time.monotonic() + 5.0
        while client.is_alive() and time.monotonic() < deadline:
            sel.dispatch(0.05)
        client.join(1.0)
        assert [r.data["state"] for r in replies if r.ok] == ["booting"]
    finally:
        server.close()
    assert not os.path.exists(path)


def test_an_idle_connection_that_closes_is_dropped(broker: Broker) -> None:
    a, b = socket.socketpair()
    broker.donate(KEY, a.detach())
    assert len(broker) == 1
    broker.sel.dispatch(0.0)
    assert len(broker) == 1
    b.close()
    broker.sel.dispatch(1.0)
    assert len(broker) == 0
    assert broker.stats()["dropped"] == 1


def test_an_idle_connection_lent_in_the_same_round_as_it_closes(broker: Broker) -> None:
    # A worker's Borrow and the origin's close are ready in the same select() round, the
    # Borrow first: lend() drops the dead connection, then its own handler still runs.
    a, b = socket.socketpair()
    broker.donate(KEY, a.detach())
    channel, worker = socket.socketpair()
    lent: list[socket.socket | None] = []

    def on_borrow(key: selectors.SelectorKey, mask: int) -> None:
        channel.recv(1)
        lent.append(broker.lend(KEY))

    broker.sel.register(channel, on_borrow)
    try:
        worker.send(b"x")
        b.close()
        broker.sel.dispatch(1.0)
        assert lent == [None]
        assert len(broker) == 0
        assert broker.stats()["dropped"] == 1
    finally:
        broker.sel.unregister(channel)
        channel.close()
        worker.close()
