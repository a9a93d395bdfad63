"""``Connector.acquire(peer)``: an upstream exchange for a peer, reused when one is at hand.

Theory of operation. For an HTTP/1.1 peer: an idle connection of the worker's pool; else, when
the shared-memory index says the pool broker may hold one, a connection borrowed from another
worker; else a new connection. For an HTTP/2 peer: a new stream on a live connection with
room; else a new connection, made once per key at a time (requests that find none while one is
being made wait for it and share it). A new connection's failure is classified here, as the
:class:`~shared.errors.ProxyError` the engine's retry loop decides on: refused, timed out,
TLS, or another socket error, each retryable but TLS.

Connections are made in a context of their own (``contextvars.Context()``): a transport runs its
callbacks in the context it was made in, and a pooled connection serves many requests, not the
one that made it.
"""

from __future__ import annotations

import asyncio
import contextvars
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from shared.errors import ErrorKind, RetryType, upstream_error
from shared.peer import HttpPeer
from worker.client.h1 import UpstreamConn
from worker.client.h2 import UpstreamH2Conn, UpstreamH2Stream
from worker.connector.pool import H2Pool, Pool
from worker.interfaces import Upstream
from worker.tls import ClientTls

if TYPE_CHECKING:
    from shared.peer import PoolKey
    from worker.connector.broker_client import BrokerClient


class Connector:
    """A worker's upstream connections: its pools, its broker client, new connections."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: Pool,
        connect_timeout: float,
        write_timeout: float = 0.0,
    ) -> None:
        self.loop = loop
        #: Idle HTTP/1.1 connections, and the exchanges under way.
        self.pool = pool
        #: Live HTTP/2 connections (each shared by many requests at once).
        self.h2 = H2Pool()
        #: The pool broker's client, when upstream connections are shared between workers.
        self.broker: BrokerClient | None = None
        self.client_tls = ClientTls()
        #: ``timeouts.upstream_connect_seconds`` (a peer's ``connect_timeout`` wins).
        self.connect_timeout = connect_timeout
        #: ``timeouts.upstream_write_seconds`` (a peer's ``write_timeout`` wins); 0: none.
        self.write_timeout = write_timeout
        #: Upstream HTTP/2 connections being made, by pool key.
        self._h2_connecting: dict[PoolKey, asyncio.Future[None]] = {}
        #: Makes a new connection: :meth:`new_connection`, unless replaced (a test harness
        #: stands its own origin in for the network here).
        self.connect: Callable[[HttpPeer], Awaitable[Upstream]] = self.new_connection

    async def acquire(self, peer: HttpPeer) -> tuple[Upstream, bool]:
        """An upstream exchange for ``peer`` and whether its connection was reused (from
        this worker's pool, a live HTTP/2 connection, or the broker), set up with the peer's
        timeouts (:meth:`fit`). Raises :class:`~shared.errors.ProxyError` when a new
        connection cannot be made."""
        key = peer.pool_key
        if peer.options.http2:
            h2 = self.h2.stream(key)
            if h2 is None:
                # One connection at a time per key: requests that find none while one is
                # being made wait for it and share it.
                pending = self._h2_connecting.get(key)
                if pending is not None:
                    await pending
                    h2 = self.h2.stream(key)
            if h2 is not None:
                self.fit(h2, peer)
                return h2, True
        else:
            up = self.pool.get(key)
            if up is None:
                broker = self.broker
                if broker is not None and not peer.tls and broker.may_have(key):
                    up = await self.borrow(peer)
            if up is not None:
                self.fit(up, peer)
                return up, True
        new = await self.connect(peer)
        self.fit(new, peer)
        return new, False

    def fit(self, up: Upstream, peer: HttpPeer) -> None:
        """Gives ``up`` the settings of ``peer`` that govern how a connection is used, not
        what it connects to (so they are not in the pool key, and two peers of one key may
        differ in them): the write timeout, and for an HTTP/1.1 connection how long it may
        idle in the pool afterwards. The last exchange's peer decides."""
        o = peer.options
        if isinstance(up, UpstreamConn):
            up.write_timeout = o.write_timeout or self.write_timeout
            up.idle_timeout = o.idle_timeout
        elif isinstance(up, UpstreamH2Stream):
            up.write_timeout = o.write_timeout or self.write_timeout

    async def borrow(self, peer: HttpPeer) -> UpstreamConn | None:
        """An idle connection to ``peer`` from the pool broker, or None."""
        sock = await self.broker.borrow(peer.pool_key)  # type: ignore[union-attr]
        if sock is None:
            return None
        up = UpstreamConn(peer.pool_key, self.pool)
        try:
            # Made in a context of its own, like new_connection()'s.
            await self.loop.create_task(
                self.loop.create_connection(lambda: up, sock=sock), context=contextvars.Context()
            )
        except OSError:
            sock.close()
            return None
        self.pool.reused_shared += 1
        return up

    async def new_connection(self, peer: HttpPeer) -> Upstream:
        """A new connection to ``peer`` (for HTTP/2: a stream on a new connection); raises
        :class:`ProxyError` on failure."""
        loop = self.loop
        key = peer.pool_key
        up: UpstreamConn | UpstreamH2Conn
        done: asyncio.Future[None] | None = None
        if peer.options.http2:
            up = UpstreamH2Conn(key, self.pool, self.h2.remove)
            done = self._h2_connecting[key] = loop.create_future()
        else:
            up = UpstreamConn(key, self.pool)
        timeout = peer.options.connect_timeout or self.connect_timeout
        if peer.tls:
            ctx = self.client_tls.context(peer)
            conn_coro = loop.create_connection(
                lambda: up,
                peer.host,
                peer.port,
                ssl=ctx,
                server_hostname=peer.sni or peer.host,
                ssl_handshake_timeout=timeout,
            )
        else:
            conn_coro = loop.create_connection(lambda: up, peer.host, peer.port)
        # In a context of its own (see the module docstring).
        task = loop.create_task(conn_coro, context=contextvars.Context())
        timer = loop.call_later(timeout, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            raise upstream_error(
                ErrorKind.CONNECT_TIMEOUT, f"{peer} after {timeout:g}s", RetryType.ALWAYS
            ) from None
        except ConnectionRefusedError as e:
            raise upstream_error(
                ErrorKind.CONNECT_REFUSED, f"{peer}: {e.strerror}", RetryType.ALWAYS
            ) from None
        except ssl.SSLError as e:
            raise upstream_error(ErrorKind.TLS_ERROR, f"{peer}: {e.reason or e}") from None
        except OSError as e:
            raise upstream_error(
                ErrorKind.CONNECT_ERROR, f"{peer}: {e.strerror or e}", RetryType.ALWAYS
            ) from None
        finally:
            timer.cancel()
            if done is not None:
                if self._h2_connecting.get(key) is done:
                    del self._h2_connecting[key]
                done.set_result(None)
        self.pool.created += 1
        if isinstance(up, UpstreamH2Conn):
            if (
                peer.tls
                and up.transport.get_extra_info(  # type: ignore[union-attr]
                    "ssl_object"
                ).selected_alpn_protocol()
                != "h2"
            ):
                up.close()
                raise upstream_error(ErrorKind.TLS_ERROR, f"{peer} did not agree to HTTP/2")
            self.h2.add(up)
            return up.open_stream()
        return up

    def sweep(self, now: float) -> None:
        """Once a second: idle connections past their time, exchanges past their deadline."""
        self.pool.sweep(now)

    def close_all(self) -> None:
        """Worker exit: HTTP/2 connections close; idle HTTP/1.1 ones go to the broker (when
        shared) or close."""
        self.h2.close_all()
        self.pool.close_all()
