"""Backpressure on one client connection, both ways (uvicorn's ``FlowControl`` is the model).

Theory of operation. A client connection's bytes are paused in three places, and each
downstream protocol (worker/server/h1.py, worker/server/h2.py) holds one :class:`FlowControl`
for all three instead of its own flags and waiters:

- *Reading* from the client stops when what it sends has nowhere to go yet: a request body
  whose buffer is full, requests pipelined behind the one being answered, an upgrade's early
  bytes, a tunnel whose upstream is full, or (HTTP/2) a client that is not reading what it is
  sent. :meth:`FlowControl.pause_reading` and :meth:`FlowControl.resume_reading` are idempotent,
  so each reason may pause and resume without counting the others.
- *Writing* to the client: the transport calls the protocol's ``pause_writing`` /
  ``resume_writing``, which record it here (:attr:`FlowControl.write_paused`) and stop reading
  the upstreams whose responses would pile up; which upstreams that is, is the protocol's.
- *Draining* toward the upstream: a request body waits while its upstream takes no more
  (:meth:`FlowControl.drain`), until the upstream reports it writable again or the connection
  is lost (:meth:`FlowControl.wake`). One connection's HTTP/2 streams share the waiter, so a
  waiter re-checks its own upstream after it wakes.

Once the protocol no longer owns the transport (closing, closed, or handed to HTTP/2),
:meth:`FlowControl.close` makes pausing and resuming do nothing.
"""

from __future__ import annotations

import asyncio

__all__ = ["FlowControl"]


class FlowControl:
    """The pause state of one client connection and the drain its request bodies wait on."""

    __slots__ = ("transport", "read_paused", "write_paused", "closed", "_waiters")

    def __init__(self) -> None:
        #: The client's transport (set by the protocol's ``connection_made``).
        self.transport: asyncio.Transport | None = None
        #: True while reading from the client is paused.
        self.read_paused = False
        #: True while the client takes nothing more (the transport's buffer is full).
        self.write_paused = False
        #: True once the protocol no longer owns the transport: nothing is paused or resumed.
        self.closed = False
        # One future per wait (a cancelled wait cancels its own future, never another's).
        self._waiters: list[asyncio.Future[None]] | None = None

    def pause_reading(self) -> None:
        """Stops reading from the client (if it reads, and the connection is not closed)."""
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        """Reads from the client again (if paused, and the connection is not closed)."""
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        """The transport's ``pause_writing``: the client is not taking what is written."""
        self.write_paused = True

    def resume_writing(self) -> None:
        """The transport's ``resume_writing``: the client takes writes again."""
        self.write_paused = False

    def close(self) -> None:
        """The protocol gives up the transport: pausing and resuming do nothing from now on."""
        self.closed = True

    async def drain(self) -> None:
        """Waits for the next :meth:`wake`: an upstream of this connection takes request body
        again, or the connection is lost. The caller checks again what it waits for."""
        w: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [w]
        else:
            self._waiters.append(w)
        await w

    def wake(self) -> None:
        """Ends the waits of :meth:`drain` in progress (none: nothing happens)."""
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            for w in waiters:
                if not w.done():
                    w.set_result(None)
