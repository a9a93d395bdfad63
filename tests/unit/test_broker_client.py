"""worker.connector.broker_client: a borrow under way ends at once when the master's channel is
lost (its request then connects by itself), not at BORROW_TIMEOUT_SECONDS."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from shared.config import from_mapping
from shared.ipc import Channel
from shared.peer import HttpPeer
from shared.shm.pool_index import PoolIndex
from worker.connector.broker_client import BORROW_TIMEOUT_SECONDS, BrokerClient
from worker.process import Worker

KEY = HttpPeer("192.0.2.10:8080").pool_key


def test_fail_pending_ends_every_borrow_with_none() -> None:
    """fail_pending() settles each pending borrow with None, and forgets it."""

    async def scenario() -> list[socket.socket | None]:
        sent: list[object] = []
        broker = BrokerClient(sent.append, PoolIndex.create(64))
        borrows = [asyncio.ensure_future(broker.borrow(KEY)) for _ in range(2)]
        await asyncio.sleep(0)
        assert len(sent) == 2
        broker.fail_pending()
        return list(await asyncio.gather(*borrows))

    assert asyncio.run(scenario()) == [None, None]


def test_a_borrow_ends_at_once_when_the_master_goes() -> None:
    """The worker hears its channel close (the master died) while a borrow waits for the
    broker's answer: the borrow returns None at once, and the worker drains."""
    drained: list[float] = []

    async def scenario() -> tuple[socket.socket | None, float]:
        loop = asyncio.get_running_loop()
        ours, masters = socket.socketpair()
        channel = Channel(ours)
        broker = BrokerClient(channel.send, PoolIndex.create(64))
        worker = Worker.__new__(Worker)
        worker.channel = channel
        worker.loop = loop  # type: ignore[assignment]
        worker.broker = broker
        worker.stopping = False
        worker.log = logging.getLogger("test-broker-client")
        worker.config = from_mapping({"app": "x:App"}, "test")
        worker.drain = lambda grace: drained.append(grace)  # type: ignore[method-assign]
        loop.add_reader(channel.fileno(), worker._on_channel)
        borrow = asyncio.ensure_future(broker.borrow(KEY))
        await asyncio.sleep(0)
        start = time.monotonic()
        masters.close()
        try:
            got = await asyncio.wait_for(borrow, BORROW_TIMEOUT_SECONDS / 2)
        finally:
            if not channel.closed:
                loop.remove_reader(channel.fileno())
                channel.close()
        return got, time.monotonic() - start

    got, waited = asyncio.run(scenario())
    assert got is None
    assert waited < BORROW_TIMEOUT_SECONDS / 2
    assert drained, "the worker did not drain"
