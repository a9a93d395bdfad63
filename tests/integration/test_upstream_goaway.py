"""An HTTP/2 upstream that sends GOAWAY (a server restarting gracefully, or one that ends a
connection after so many requests) loses the proxy no request in flight: the streams the
server kept (at or below GOAWAY's last stream ID) are answered through the proxy, and the next
request goes on a new connection.

The origin is an HTTP/2 server written for the test with the ``h2`` package: on ``/goaway`` it
sends GOAWAY naming the request's own stream as the last, then answers that stream, then
closes the connection, the order a graceful server follows.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import h2.events as ev
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from hyperframe.frame import GoAwayFrame

from tests.support.client import HttpConn
from tests.support.config import config_for
from tests.support.master import Master

if TYPE_CHECKING:
    from tests.conftest import Fleet


class GoawayOrigin(asyncio.Protocol):
    """One connection of the test's HTTP/2 origin."""

    def __init__(self, server: H2Origin) -> None:
        self.server = server
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1
        self.server.open.add(self)
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open.discard(self)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for event in self.conn.receive_data(data):
            if isinstance(event, ev.RequestReceived):
                self.answer(event)
        self.transport.write(self.conn.data_to_send())

    def answer(self, event: ev.RequestReceived) -> None:
        assert self.transport is not None
        path = dict(event.headers)[b":path"].decode()
        self.server.paths.append(path)
        body = f"answered {path} on stream {event.stream_id}\n".encode()
        if path == "/goaway":
            # GOAWAY first (h2's own close_connection would stop this side from answering).
            goaway = GoAwayFrame(0)
            goaway.last_stream_id = event.stream_id
            self.transport.write(self.conn.data_to_send() + goaway.serialize())
        self.conn.send_headers(
            event.stream_id, [(b":status", b"200"), (b"content-length", b"%d" % len(body))]
        )
        self.conn.send_data(event.stream_id, body, end_stream=True)
        if path == "/goaway":
            self.transport.write(self.conn.data_to_send())
            self.transport.close()


class H2Origin:
    """The origin's listener, on its own event loop thread."""

    def __init__(self) -> None:
        self.connections = 0
        self.paths: list[str] = []
        self.open: set[GoawayOrigin] = set()
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None

    def start(self) -> H2Origin:
        self.server = self.loop.run_until_complete(
            self.loop.create_server(lambda: GoawayOrigin(self), "127.0.0.1", 0)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread.start()
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.close()
        if self.server is not None:
            self.server.close()
            self.loop.run_until_complete(self.server.wait_closed())
        self.loop.close()


@pytest.fixture
def origin() -> Iterator[H2Origin]:
    o = H2Origin().start()
    yield o
    o.stop()


@pytest.fixture
def master(fleet: Fleet, origin: H2Origin) -> Master:
    config = config_for({"h2": [f"127.0.0.1:{origin.port}"]}, server={"workers": 1})
    config["upstreams"]["h2"]["http2"] = True
    return fleet.master(config)


def test_stream_answered_after_goaway_reaches_the_client(master: Master, origin: H2Origin) -> None:
    """The request the server answers after its GOAWAY gets that answer (not a 502), and the
    requests after it are served on a new upstream connection."""
    with HttpConn(master.port) as conn:
        first = conn.request("GET", "/first")
        assert first.status == 200 and first.body == b"answered /first on stream 1\n"
        kept = conn.request("GET", "/goaway")
        assert kept.status == 200, kept.body
        assert kept.body == b"answered /goaway on stream 3\n"
        after = conn.request("GET", "/after")
        assert after.status == 200 and after.body == b"answered /after on stream 1\n"
    assert origin.paths == ["/first", "/goaway", "/after"]
    assert origin.connections == 2
