"""Demo origins: tiny HTTP servers that answer with a page naming themselves.

The embedded default config lists two of them under ``demo_origins`` and the master starts them
(``python -m master.demo ADDRESS...``, one process for all), so that a fresh ``scripts/start``
has something to balance. They speak keep-alive HTTP/1.1 and answer any request with 200.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
from typing import cast

import httptools
import setproctitle
import uvloop

from shared.address import parse_address


class DemoOrigin(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport  # set by connection_made
        self.url = b""
        self.method = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        body = (
            f"Hello from Tenaya demo origin {self.name}\n"
            f"You asked for {self.url.decode('latin-1')}\n"
        ).encode()
        keep = self.parser.should_keep_alive()
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nX-Demo-Origin: %s\r\n" % (len(body), self.name.encode())
        )
        if not keep:
            head += b"Connection: close\r\n"
        method = self.parser.get_method()
        self.transport.write(head + b"\r\n" + (b"" if method == b"HEAD" else body))
        if not keep:
            self.transport.close()


async def serve(addresses: list[str]) -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    servers = []
    for address in addresses:
        host, port = parse_address(address)
        servers.append(
            await loop.create_server(
                functools.partial(DemoOrigin, address), host, port, reuse_address=True
            )
        )
    print("ready", flush=True)
    await stop
    for server in servers:
        server.close()


def main(argv: list[str]) -> int:
    setproctitle.setproctitle("tenaya demo-origins")
    try:
        uvloop.run(serve(argv))
    except OSError as e:
        print(f"tenaya demo origins: {e.strerror or e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
