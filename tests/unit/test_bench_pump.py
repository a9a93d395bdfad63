"""loadtests.pump, the benchmark's bare uvloop + httptools proxy: each test runs the pump and a
small origin on one uvloop loop in this process and talks to the pump over loopback.

The origin answers ``GET /PATH`` with the body ``path:/PATH``, ``POST`` with the request body,
``/chunked`` with a chunked body and ``/bye`` with ``Connection: close`` (then closes); it
records every request head it got and how many connections it accepted.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import uvloop

from loadtests.pump import Downstream, Pump, address, chunk, parse_args

HOST = "127.0.0.1"
#: Longest any one test may wait for the pump or the origin.
DEADLINE = 5.0
#: How long the harness lets closing connections settle (a pause, not a wait for a condition).
SETTLE_SECONDS = 0.05


@dataclass
class Origin:
    """What the test origin saw."""

    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)


async def read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """The body of a message whose head is ``head``: Content-Length, chunked, or none."""
    fields = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
    }
    if b"content-length" in fields:
        return await reader.readexactly(int(fields[b"content-length"]))
    if fields.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return body
            body += data[:-2]
    return b""


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one response (the body decoded when chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    return head, await read_body(reader, head)


async def origin_conn(
    seen: Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One connection to the test origin."""
    seen.connections += 1
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            body = await read_body(reader, head)
            seen.heads.append(head)
            seen.bodies.append(body)
            method, path = head.split(b" ")[:2]
            if path == b"/chunked":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunk(b"hello, ")
                    + chunk(b"world")
                    + b"0\r\n\r\n"
                )
                continue
            answer = body if method == b"POST" else b"path:" + path
            close = path == b"/bye"
            writer.write(
                b"HTTP/1.1 200 OK\r\nServer: origin\r\nContent-Length: %d\r\n%s\r\n%s"
                % (len(answer), b"Connection: close\r\n" if close else b"", answer)
            )
            if close:
                await writer.drain()
                return
    finally:
        writer.close()


class Harness:
    """What a test gets: the pump's port, what the origin saw, and client connections that
    are closed at the end whatever happens (uvloop cannot close a loop cleanly while
    transports are open and warnings are errors)."""

    def __init__(self, port: int, seen: Origin) -> None:
        self.port = port
        self.seen = seen
        self.writers: list[asyncio.StreamWriter] = []

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client connection to the pump."""
        reader, writer = await asyncio.open_connection(HOST, self.port)
        self.writers.append(writer)
        return reader, writer


def run(test: Callable[[Harness], Awaitable[None]], *, origin_up: bool = True) -> Origin:
    """Start the origin (or leave its port closed) and the pump, run ``test``, stop
    everything; returns what the origin saw."""
    seen = Origin()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if origin_up:
            origin = await asyncio.start_server(lambda r, w: origin_conn(seen, r, w), HOST, 0)
            origin_port = origin.sockets[0].getsockname()[1]
        else:
            with socket.socket() as s:
                s.bind((HOST, 0))
                origin_port = s.getsockname()[1]
        pump = Pump(loop, (HOST, origin_port))
        server = await loop.create_server(lambda: Downstream(pump), HOST, 0)
        harness = Harness(server.sockets[0].getsockname()[1], seen)
        try:
            await asyncio.wait_for(test(harness), DEADLINE)
        finally:
            for writer in harness.writers:
                writer.close()
            await asyncio.sleep(SETTLE_SECONDS)  # the pump sees its clients go
            server.close()
            pump.close()
            if origin_up:
                origin.close()
            await asyncio.sleep(SETTLE_SECONDS)  # the transports finish closing

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    return seen


def test_keepalive_requests_share_one_upstream_connection() -> None:
    async def test(h: Harness) -> None:
        reader, writer = await h.connect()
        for path in (b"/a", b"/b"):
            writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\nKeep-Alive: 5\r\n\r\n" % path)
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"Server: origin\r\n" in head
            assert b"connection" not in head.lower()
            assert body == b"path:" + path

    seen = run(test)
    assert seen.connections == 1
    assert seen.heads[0] == b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"


def test_close_ends_the_client_and_pools_the_upstream_connection() -> None:
    async def test(h: Harness) -> None:
        for _ in range(3):
            reader, writer = await h.connect()
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head, body = await read_response(reader)
            assert b"\r\nConnection: close\r\n" in head
            assert body == b"path:/"
            assert await reader.read() == b""  # the pump closed the connection

    seen = run(test)
    assert seen.connections == 1
    assert all(b"close" not in h.lower() for h in seen.heads)


def test_pipelined_requests_are_answered_in_order() -> None:
    async def test(h: Harness) -> None:
        reader, writer = await h.connect()
        writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(3)))
        for n in range(3):
            assert (await read_response(reader))[1] == b"path:/%d" % n

    run(test)


def test_bodies_are_forwarded_by_length_and_rechunked() -> None:
    async def test(h: Harness) -> None:
        reader, writer = await h.connect()
        writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        assert (await read_response(reader))[1] == b"hello"
        writer.write(
            b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk(b"abc")
            + chunk(b"def")
            + b"0\r\n\r\n"
        )
        assert (await read_response(reader))[1] == b"abcdef"
        writer.write(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = await read_response(reader)
        assert b"Transfer-Encoding: chunked\r\n" in head
        assert body == b"hello, world"

    seen = run(test)
    assert seen.bodies[:2] == [b"hello", b"abcdef"]


def test_an_upstream_connection_the_origin_closes_is_replaced() -> None:
    async def test(h: Harness) -> None:
        reader, writer = await h.connect()
        for path in (b"/bye", b"/after"):
            writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            head, body = await read_response(reader)
            assert b"connection" not in head.lower()  # the client's connection goes on
            assert body == b"path:" + path

    assert run(test).connections == 2


def test_an_origin_that_is_down_gets_a_502() -> None:
    async def test(h: Harness) -> None:
        reader, writer = await h.connect()
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 502 ")
        assert await reader.read() == b""

    run(test, origin_up=False)


def test_a_malformed_request_gets_a_400() -> None:
    async def test(h: Harness) -> None:
        reader, writer = await h.connect()
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 400 ")

    assert run(test).heads == []


def test_command_line() -> None:
    args = parse_args(["--listen", "127.0.0.1:1", "--origin", "127.0.0.1:2", "--workers", "3"])
    assert (args.listen, args.origin, args.workers) == (("127.0.0.1", 1), ("127.0.0.1", 2), 3)
    assert address("::1:80") == ("::1", 80)
    with pytest.raises(SystemExit):
        parse_args(["--listen", "127.0.0.1", "--origin", "127.0.0.1:2"])
    with pytest.raises(SystemExit):
        parse_args(["--listen", "127.0.0.1:1", "--origin", "127.0.0.1:2", "--workers", "0"])
