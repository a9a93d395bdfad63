"""The downstream protocols' FlowControl (worker/server/flow.py): pausing is idempotent and
stops once the connection is closed; every drain in progress ends at a wake, and a cancelled
one leaves the others waiting."""

from __future__ import annotations

import asyncio

from worker.server.flow import FlowControl


class Transport:
    """Counts the pause and resume calls it gets."""

    def __init__(self) -> None:
        self.pauses = 0
        self.resumes = 0

    def pause_reading(self) -> None:
        self.pauses += 1

    def resume_reading(self) -> None:
        self.resumes += 1


def flow_on(t: Transport) -> FlowControl:
    flow = FlowControl()
    flow.transport = t  # type: ignore[assignment]
    return flow


def test_pausing_and_resuming_reach_the_transport_once_each() -> None:
    t = Transport()
    flow = flow_on(t)
    flow.resume_reading()  # not paused: nothing to resume
    flow.pause_reading()
    flow.pause_reading()
    assert flow.read_paused and (t.pauses, t.resumes) == (1, 0)
    flow.resume_reading()
    flow.resume_reading()
    assert not flow.read_paused and (t.pauses, t.resumes) == (1, 1)


def test_a_closed_flow_leaves_the_transport_alone() -> None:
    t = Transport()
    flow = flow_on(t)
    flow.pause_reading()
    flow.close()
    flow.resume_reading()
    assert flow.read_paused and t.resumes == 0
    flow.read_paused = False
    flow.pause_reading()
    assert t.pauses == 1


def test_the_write_pause_is_recorded() -> None:
    flow = FlowControl()
    flow.pause_writing()
    assert flow.write_paused
    flow.resume_writing()
    assert not flow.write_paused


def test_a_wake_ends_every_drain_and_a_cancelled_one_leaves_the_others() -> None:
    async def main() -> tuple[bool, bool, bool]:
        flow = FlowControl()
        flow.wake()  # nothing waits: nothing happens
        a = asyncio.ensure_future(flow.drain())
        b = asyncio.ensure_future(flow.drain())
        c = asyncio.ensure_future(flow.drain())
        await asyncio.sleep(0)
        a.cancel()
        await asyncio.sleep(0)
        waiting = not b.done() and not c.done()
        flow.wake()
        await asyncio.wait_for(asyncio.gather(b, c), 1.0)
        # A drain begun after the wake waits for the next one.
        d = asyncio.ensure_future(flow.drain())
        await asyncio.sleep(0)
        later = not d.done()
        flow.wake()
        await asyncio.wait_for(d, 1.0)
        return waiting, a.cancelled(), later

    waiting, cancelled, later = asyncio.run(main())
    assert waiting and cancelled and later
