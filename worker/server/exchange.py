"""What every downstream exchange does with its upstream, whatever the protocol.

An *exchange* is one request and its response on the client's side: an HTTP/1.1 connection
(one exchange at a time) or one HTTP/2 stream. The engine hands it an upstream connection
(:meth:`Exchange.attach`); the upstream connection calls back with the response
(``upstream_head`` / ``upstream_body`` / ``upstream_done`` / ``upstream_failed``). What differs
between protocols is how a response is written (``write_head``, ``write_body``, ``end_body``,
``respond``) and what ends an exchange (``finish``, ``close``); subclasses supply those.
Backpressure is the connection's :class:`~worker.server.flow.FlowControl` (:attr:`Exchange.flow`):
the client's write pause, and the drain a request body waits on while its upstream is full.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shared.headers import RawHeaders
from shared.session import Session
from worker.http import status_line
from worker.interfaces import ProxyEngine, Upstream
from worker.server.flow import FlowControl


def peer_info(
    transport: asyncio.BaseTransport,
) -> tuple[tuple[str, int], bytes, tuple[str, int], Any]:
    """A new client connection's (client address, client IP as bytes, server address, TLS
    object or None)."""
    peer = transport.get_extra_info("peername")
    sock = transport.get_extra_info("sockname")
    client = tuple(peer[:2]) if peer else ("", 0)
    server = tuple(sock[:2]) if sock else ("", 0)
    return client, client[0].encode(), server, transport.get_extra_info("ssl_object")


class Exchange:
    """The upstream side of an exchange; subclasses write responses in their protocol."""

    engine: ProxyEngine
    active: Session | None
    up: Upstream | None
    closing: bool
    client_ip: bytes
    client_addr: tuple[str, int]
    server_addr: tuple[str, int]
    scheme: bytes
    #: The client connection's flow control (an HTTP/2 connection's streams share one).
    flow: FlowControl
    held: list[bytes] | None
    held_done: Upstream | None

    @property
    def write_paused(self) -> bool:
        """True while the client is not taking what is written."""
        return self.flow.write_paused

    # -- what a protocol supplies ----------------------------------------------------------

    def write_head(self, s: Session, line: bytes, headers: RawHeaders, rechunk: bool) -> None:
        raise NotImplementedError

    def write_body(self, s: Session, data: bytes) -> None:
        raise NotImplementedError

    def end_body(self, s: Session) -> None:
        """The response body is complete."""

    def respond(self, s: Session, status: int, headers: Any, body: bytes) -> None:
        raise NotImplementedError

    def pause_body(self) -> None:
        """The request body's buffer is full: stop reading it from the client."""
        raise NotImplementedError

    def resume_body(self) -> None:
        """The request body's buffer has room again."""
        raise NotImplementedError

    def send_continue(self, s: Session) -> None:
        """Answers ``Expect: 100-continue``."""
        raise NotImplementedError

    def finish(self, s: Session) -> None:
        raise NotImplementedError

    def end_exchange(self, s: Session) -> bool:
        """Marks ``s`` answered and logs it (once); False if it already was."""
        if s.response_done:
            return False
        s.response_done = True
        self.active = None
        self.engine.request_done(s)
        return True

    def close(self) -> None:
        raise NotImplementedError

    def upstream_trailers(self, headers: RawHeaders) -> None:
        """Trailer fields after the upstream's body (gRPC's status); sent with the end."""
        s = self.active
        if s is not None:
            s.trailers = list(headers)

    def switching_protocols(self, s: Session, headers: RawHeaders) -> None:
        """A 101 from the upstream; only HTTP/1.1 tunnels it."""

    def tunnel_started(self, up: Upstream) -> None:
        """After a 101: only HTTP/1.1 tunnels."""
        raise NotImplementedError

    def tunnel_data(self, data: bytes) -> None:
        raise NotImplementedError

    def tunnel_closed(self) -> None:
        raise NotImplementedError

    def begin_batch(self) -> None:
        """Writes until :meth:`end_batch` may be collected into one."""

    def end_batch(self) -> None:
        """Writes what the batch collected."""

    # -- flow control ----------------------------------------------------------------------

    def upstream_writable(self, writable: bool) -> None:
        if writable:
            self.flow.wake()

    async def wait_upstream_writable(self) -> None:
        """Waits until the upstream connection takes writes again (or the exchange ends)."""
        up = self.up
        while up is not None and up.write_paused and not up.closed and not self.closing:
            await self.flow.drain()
            up = self.up

    # -- the exchange --------------------------------------------------------------------

    def attach(self, s: Session, up: Upstream, head: Any, read_timeout: float) -> None:
        """Sends the request head on ``up``; its response comes back to this connection."""
        self.up = up
        up.start(self, head, s.method == b"HEAD", read_timeout)
        if self.flow.write_paused:
            up.pause_reading()

    def upstream_head(self, up: Upstream, status: int, headers: RawHeaders) -> None:
        s = self.active
        if s is None:
            return
        if status == 101:
            self.switching_protocols(s, headers)
            return
        engine = self.engine
        if engine.response_phases:
            engine.response_head(self, s, up, status, headers)
            return
        self.write_head(s, status_line(status), headers, False)

    def upstream_body(self, data: bytes) -> None:
        s = self.active
        if s is None:
            return
        if self.held is not None:
            self.held.append(data)
            return
        bf = self.engine.p_response_body_filter
        if bf is not None:
            data = self.engine.body_filter(s, data, False)
        self.write_body(s, data)

    def upstream_done(self, up: Upstream) -> None:
        if self.held is not None:
            self.held_done = up
            return
        s = self.active
        self.up = None
        if s is None:
            up.close()
            return
        if self.engine.p_response_body_filter is not None:
            self.write_body(s, self.engine.body_filter(s, b"", True))
        self.end_body(s)
        # Reusable only if the whole request body went up (an origin may answer first).
        if up.keep_alive and (s.body_sent or not s.has_body):
            up.release()
        else:
            up.close()
        self.finish(s)

    def hold_body(self) -> None:
        """An async ``response_filter`` runs: the response body waits (until
        :meth:`release_held`)."""
        self.held = []

    def drop_held(self) -> None:
        """The held response body will not be sent (the exchange is closing or failed)."""
        self.held = self.held_done = None

    def forget_upstream(self) -> None:
        """The exchange no longer has an upstream (the engine detaches it)."""
        self.up = None

    def release_held(self) -> None:
        """The response head went out: send the body that waited for it."""
        held, self.held = self.held, None
        for data in held or ():
            self.upstream_body(data)
        up, self.held_done = self.held_done, None
        if up is not None:
            self.upstream_done(up)

    def upstream_failed(self, up: Upstream, exc: BaseException | None) -> None:
        s = self.active
        self.up = None
        self.held = self.held_done = None
        up.close()
        if s is None:
            return
        err = up.failure(exc)
        err.reused = s.upstream_reused
        if not s.response_started:
            self.engine.upstream_failed(self, s, err)
            return
        # The response has started: the client can only learn of it by an incomplete response.
        s.error = err
        s.keep_alive = False
        self.close()
        self.finish(s)
