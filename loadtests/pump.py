"""The pump: the least a Python reverse proxy can do per request, on uvloop and httptools.

It is the benchmark's third contender (``loadtests.bench``), "the Python ceiling": machines
differ in how much they slow Python down, so Tenaya's figures are quoted against nginx and
against this. It has no phases, no logging, no config, no timeouts and no header rewriting
beyond what a proxy must do.

Theory of operation. Each process listens on its own SO_REUSEPORT socket (``--workers N`` forks
N - 1 siblings of the first process before any loop exists; the kernel spreads connections
over the N sockets). A downstream connection (``Downstream``) parses requests with httptools'
request parser and forwards each one, head rebuilt and body as it comes, to one upstream
connection (``Upstream``) that it holds from its first request until it closes: one upstream
connection per downstream connection, taken from the process's pool of idle keep-alive
connections (``Pump.idle``) or connected anew, and given back to the pool when the downstream
connection closes between responses. Pipelined requests go upstream at once and their responses
come back in order. The upstream connection parses each response with httptools' response
parser and writes the rebuilt head and the body downstream; what one ``data_received`` produced
goes out in one write.

What a proxy must do, and what the pump does of it. RFC 9110 section 7.6.1: "a proxy or
gateway MUST parse a received Connection header field before a message is forwarded and, for
each connection-option in this field, remove any header or trailer field(s) from the message
with the same name as the connection-option, and then remove the Connection header field
itself". The pump removes the
Connection field and the usual hop-by-hop fields (``HOP_BY_HOP``), not the fields a Connection
option names. Requests go upstream as HTTP/1.1 (so the upstream connection stays open), and
responses come back as HTTP/1.1 with the reason phrase of their status code (RFC 9112 section
4: "A client SHOULD ignore the reason-phrase content"); the response that ends a connection
carries ``Connection: close``. Chunked bodies are forwarded chunked (re-framed, trailers
dropped), Content-Length bodies as they are.

Not supported, since the benchmark does not need them: HEAD (httptools' response parser would
wait for the body the headers announce), upgrades and CONNECT, retries (a request sent on a
pooled connection the origin has just closed gets a 502), and any TLS.

Usage: ``python -m loadtests.pump --listen 127.0.0.1:8080 --origin 127.0.0.1:8000
--workers 1``. SIGTERM or SIGINT stops it; the first process stops its siblings, and stops
when one of them exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from typing import cast

import httptools
import uvloop

#: Length of each listening socket's accept queue (Tenaya's default listener backlog).
LISTEN_BACKLOG = 2048
#: Idle upstream connections a process keeps at most; more are closed when released.
MAX_IDLE_UPSTREAMS = 1024
#: How long the first process waits for its siblings to exit after SIGTERM, then SIGKILLs them.
SIBLING_STOP_SECONDS = 5.0
#: Poll interval of that wait.
SIBLING_POLL_SECONDS = 0.02

#: Header fields that belong to one connection and are not forwarded (lower case).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
    }
)


def status_line(code: int) -> bytes:
    """The HTTP/1.1 status line of a code, with its standard reason phrase (empty if none)."""
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {code} {phrase}\r\n".encode("ascii")


#: The status lines of the responses written downstream, by status code (RFC 9110 section 15:
#: three digits, 100 to 599; httptools refuses others).
STATUS_LINES: dict[int, bytes] = {code: status_line(code) for code in range(100, 600)}
CLOSE_HEADER = b"Connection: close\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CRLF = b"\r\n"
HEADER_SEPARATOR = b": "
TRANSFER_ENCODING = b"transfer-encoding"
REQUEST_VERSION = b" HTTP/1.1\r\n"
SPACE = b" "

EXIT_OK = 0
EXIT_SIBLING_DIED = 1


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (RFC 9112 section 7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class Pump:
    """What one process's connections share: the loop, the origin's address and the pool."""

    __slots__ = ("loop", "origin", "idle")

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: tuple[str, int]) -> None:
        self.loop = loop
        #: (host, port) of the origin.
        self.origin = origin
        #: Idle upstream connections, most recently released last (a dict for O(1) removal).
        self.idle: dict[Upstream, None] = {}

    def close(self) -> None:
        """Close the idle upstream connections (when the process stops)."""
        for upstream in list(self.idle):
            upstream.close()


class Downstream(asyncio.Protocol):
    """One client connection: parses its requests and forwards them to its upstream connection.

    Hot path: the parser's callbacks only append to ``out``; ``data_received`` sends it in one
    write once the parser has consumed the data.
    """

    __slots__ = (
        "pump",
        "transport",
        "parser",
        "upstream",
        "connecting",
        "out",
        "in_flight",
        "closing",
        "url",
        "headers",
        "chunked",
    )

    def __init__(self, pump: Pump) -> None:
        # Global
        self.pump = pump
        # Per-connection
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: Upstream | None = None  #: held from the first request until the end
        self.connecting = False  #: a new upstream connection is being made
        self.out: list[bytes] = []  #: request bytes not yet written upstream
        self.in_flight = 0  #: requests sent upstream whose response has not ended
        self.closing = False  #: a request asked to close; the connection ends after it
        # Per-request
        self.url = b""
        self.headers: list[bytes] = []
        self.chunked = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        """Parse the data, then send what it produced upstream (connecting first if need be)."""
        if self.closing:
            return  # after the last request, nothing more is read
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if not self.closing:  # bytes after the last request are no error of ours to report
                self.fail(BAD_REQUEST)
                return
        if self.out:
            upstream = self.upstream
            if upstream is not None:
                upstream.send(self.out)
                self.out.clear()
            elif not self.connecting:
                self.acquire()

    def connection_lost(self, exc: Exception | None) -> None:
        """Give the upstream connection back to the pool if it is between responses."""
        self.transport = None
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            if self.in_flight == 0:
                upstream.release()
            else:
                upstream.close()

    def pause_writing(self) -> None:
        """The client reads slower than the origin answers: stop reading the origin."""
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        """The client caught up: read the origin again."""
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- httptools callbacks (hot path)

    def on_url(self, url: bytes) -> None:
        """A piece of the request target."""
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header field; hop-by-hop fields are dropped."""
        lower = name.lower()
        if lower in HOP_BY_HOP:
            return
        if lower == TRANSFER_ENCODING:
            self.chunked = True
        self.headers += (name, HEADER_SEPARATOR, value, CRLF)

    def on_headers_complete(self) -> None:
        """The head is complete: queue it, rebuilt, for upstream."""
        if self.closing:
            return
        headers = self.headers
        headers.append(CRLF)
        self.out.append(
            b"".join((self.parser.get_method(), SPACE, self.url, REQUEST_VERSION, *headers))
        )
        self.in_flight += 1
        self.url = b""
        self.headers = []

    def on_body(self, body: bytes) -> None:
        """A piece of the request body (chunk framing already removed by httptools)."""
        if not self.closing:
            self.out.append(chunk(body) if self.chunked else body)

    def on_message_complete(self) -> None:
        """The request ended; one that did not ask for keep-alive is the connection's last."""
        if self.closing:
            return
        if self.chunked:
            self.out.append(LAST_CHUNK)
            self.chunked = False
        if not self.parser.should_keep_alive():
            self.closing = True

    # -- upstream connection

    def acquire(self) -> None:
        """Take an idle upstream connection from the pool, or start connecting a new one."""
        idle = self.pump.idle
        if idle:
            upstream, _ = idle.popitem()
            self.bind(upstream)
            return
        self.connecting = True
        host, port = self.pump.origin
        pump = self.pump
        task = self.pump.loop.create_task(
            self.pump.loop.create_connection(lambda: Upstream(pump), host, port)
        )
        task.add_done_callback(self.connected)

    def connected(self, task: asyncio.Task[tuple[asyncio.BaseTransport, Upstream]]) -> None:
        """The new upstream connection is made (or failed: 502)."""
        self.connecting = False
        if task.cancelled() or task.exception() is not None:
            self.fail(BAD_GATEWAY)
            return
        _, upstream = task.result()
        if self.transport is None:
            upstream.release()
            return
        self.bind(upstream)

    def bind(self, upstream: Upstream) -> None:
        """Hold ``upstream`` and send it what is queued."""
        self.upstream = upstream
        upstream.downstream = self
        if self.out:
            upstream.send(self.out)
            self.out.clear()

    def fail(self, response: bytes) -> None:
        """Answer with an error response and close (nothing of another response was sent)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(response)
            transport.close()
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.close()


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the origin: parses its responses and writes them to the
    downstream connection that holds it.

    Hot path: the parser's callbacks only append to ``out``; ``data_received`` writes it
    downstream in one write, then does what the last response asked (close the client, drop
    this connection).
    """

    __slots__ = (
        "pump",
        "transport",
        "parser",
        "downstream",
        "reading_paused",
        "out",
        "reusable",
        "end_downstream",
        "responding",
        "headers",
        "chunked",
        "interim",
    )

    def __init__(self, pump: Pump) -> None:
        # Global
        self.pump = pump
        # Per-connection
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.downstream: Downstream | None = None  #: who holds it; None while idle
        self.reading_paused = False
        self.out: list[bytes] = []  #: response bytes not yet written downstream
        self.reusable = True  #: False once the origin said it will close
        self.end_downstream = False  #: close the client after this write
        # Per-response
        self.responding = False  #: part of a response was written downstream
        self.headers: list[bytes] = []
        self.chunked = False
        self.interim = False  #: a 1xx response, after which the real one comes

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        """Parse the data, write what it produced downstream, then act on the ends it saw."""
        downstream = self.downstream
        if downstream is None:
            self.close()  # an idle connection must not speak
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.drop(downstream)
            return
        client = downstream.transport
        if client is None:
            self.close()
            return
        if self.out:
            client.writelines(self.out)
            self.out.clear()
        if self.end_downstream:
            self.end_downstream = False
            client.close()
            downstream.upstream = None
            if self.reusable and downstream.in_flight == 0:
                self.release()
            else:
                self.close()
        elif not self.reusable and downstream.in_flight == 0:
            downstream.upstream = None
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """The origin closed (or we did): leave the pool; a client waiting for a response gets
        a 502, or the end of the one it is reading."""
        self.transport = None
        self.pump.idle.pop(self, None)
        downstream = self.downstream
        if downstream is not None:
            self.downstream = None
            downstream.upstream = None
            if downstream.in_flight or self.responding:
                self.drop(downstream)

    def pause_writing(self) -> None:
        """The origin reads slower than the client sends: stop reading the client."""
        downstream = self.downstream
        if downstream is not None and downstream.transport is not None:
            downstream.transport.pause_reading()

    def resume_writing(self) -> None:
        """The origin caught up: read the client again."""
        downstream = self.downstream
        if downstream is not None and downstream.transport is not None:
            downstream.transport.resume_reading()

    # -- httptools callbacks (hot path)

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header field; hop-by-hop fields are dropped."""
        lower = name.lower()
        if lower in HOP_BY_HOP:
            return
        if lower == TRANSFER_ENCODING:
            self.chunked = True
        self.headers += (name, HEADER_SEPARATOR, value, CRLF)

    def on_headers_complete(self) -> None:
        """The head is complete: queue it, rebuilt, for the client."""
        code = self.parser.get_status_code()
        headers = self.headers
        downstream = self.downstream
        if code < 200:
            self.interim = True
        elif downstream is not None and downstream.closing and downstream.in_flight == 1:
            headers.append(CLOSE_HEADER)
        headers.append(CRLF)
        self.out.append(b"".join((STATUS_LINES[code], *headers)))
        self.responding = True
        self.headers = []

    def on_body(self, body: bytes) -> None:
        """A piece of the response body (chunk framing already removed by httptools)."""
        self.out.append(chunk(body) if self.chunked else body)

    def on_message_complete(self) -> None:
        """The response ended: count it, and note whether the client or this connection ends."""
        self.responding = False
        if self.interim:
            self.interim = False
            return
        if self.chunked:
            self.out.append(LAST_CHUNK)
            self.chunked = False
        if not self.parser.should_keep_alive():
            self.reusable = False
        downstream = self.downstream
        if downstream is not None:
            downstream.in_flight -= 1
            if downstream.closing and downstream.in_flight == 0:
                self.end_downstream = True

    # -- life cycle

    def send(self, data: list[bytes]) -> None:
        """Write request bytes to the origin."""
        if self.transport is not None:
            self.transport.writelines(data)

    def pause_reading(self) -> None:
        """Stop reading the origin (the client's write buffer is full)."""
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the origin again."""
        if self.transport is not None and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def release(self) -> None:
        """Back to the pool, idle (closed instead when it is unusable or the pool is full)."""
        self.downstream = None
        if self.transport is None or self.transport.is_closing():
            return
        if not self.reusable or len(self.pump.idle) >= MAX_IDLE_UPSTREAMS:
            self.close()
            return
        self.resume_reading()
        self.pump.idle[self] = None

    def close(self) -> None:
        """Close the connection (it leaves the pool in ``connection_lost``)."""
        self.downstream = None
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def drop(self, downstream: Downstream) -> None:
        """Something went wrong mid-exchange: a 502 to the client if it has not had part of a
        response yet, else the end of its connection; this connection closes."""
        client = downstream.transport
        if client is not None:
            if self.out:
                client.writelines(self.out)
                self.out.clear()
            if not self.responding and not client.is_closing():
                client.write(BAD_GATEWAY)
            client.close()
        downstream.upstream = None
        self.close()


# --------------------------------------------------------------------------------------------
# Processes


def address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as a (host, port) pair; raises argparse.ArgumentTypeError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


def listening_socket(listen: tuple[str, int]) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT, so that every process can have its own."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(listen)
    sock.setblocking(False)
    return sock


def serve(listen: tuple[str, int], origin: tuple[str, int], siblings: Sequence[int] = ()) -> int:
    """Run one process's proxy until SIGTERM or SIGINT, or until one of ``siblings`` (the
    processes the first one forked) exits; returns the exit status.

    A sibling's exit is seen through a pidfd that becomes readable when it exits (uvloop keeps
    SIGCHLD for itself); where pidfds are missing, it is not watched."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    pump = Pump(loop, origin)
    stopped: asyncio.Future[int] = loop.create_future()

    def stop(status: int) -> None:
        if not stopped.done():
            stopped.set_result(status)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, EXIT_OK)
    pidfds: list[int] = []
    if hasattr(os, "pidfd_open"):
        for pid in siblings:
            with contextlib.suppress(OSError):
                pidfds.append(os.pidfd_open(pid))
                loop.add_reader(pidfds[-1], stop, EXIT_SIBLING_DIED)
    server = loop.run_until_complete(
        loop.create_server(
            lambda: Downstream(pump), sock=listening_socket(listen), backlog=LISTEN_BACKLOG
        )
    )
    try:
        return loop.run_until_complete(stopped)
    finally:
        for fd in pidfds:
            loop.remove_reader(fd)
            os.close(fd)
        server.close()
        pump.close()
        loop.close()


def stop_siblings(pids: Sequence[int]) -> None:
    """SIGTERM the siblings, wait up to SIBLING_STOP_SECONDS for them, then SIGKILL the rest."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    left = set(pids)
    deadline = time.monotonic() + SIBLING_STOP_SECONDS
    while left and time.monotonic() < deadline:
        for pid in list(left):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            left.discard(pid)
        if left:
            time.sleep(SIBLING_POLL_SECONDS)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: where to listen, where the origin is, how many processes."""
    p = argparse.ArgumentParser(
        prog="python -m loadtests.pump",
        description="A bare uvloop + httptools HTTP/1.1 reverse proxy (the Python ceiling).",
    )
    p.add_argument("--listen", type=address, required=True, help="HOST:PORT to listen on")
    p.add_argument("--origin", type=address, required=True, help="HOST:PORT of the origin")
    p.add_argument("--workers", type=int, default=1, help="processes (default %(default)s)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Fork the siblings, serve in this process too, stop the siblings at the end."""
    args = parse_args(argv)
    siblings: list[int] = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            status = EXIT_SIBLING_DIED
            try:
                status = serve(args.listen, args.origin)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(status)
        siblings.append(pid)
    try:
        return serve(args.listen, args.origin, siblings)
    finally:
        stop_siblings(siblings)


if __name__ == "__main__":
    sys.exit(main())
