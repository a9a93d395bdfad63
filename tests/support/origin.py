"""What the integration tests share: a configurable origin, the real master as a subprocess,
nginx as an origin, and small HTTP/1.1 clients that show the bytes on the wire.

Theory of operation. An :class:`Origin` is an asyncio HTTP/1.1 server on 127.0.0.1 (port 0) that
runs its own event loop in a thread of the test process, so a test reads its counters and opens
its gates directly. What it answers is chosen by the request path (see :meth:`Origin._route`);
``rh=NAME:VALUE`` query parameters add response header lines to any route. A :class:`Master`
runs ``python -m master start`` with a config written to a temporary folder, its logs in files
there, and finds its port by polling the error log for the ``serving on`` line. Nothing here
sleeps and hopes: :func:`wait_for` polls a condition until a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import psutil
import yaml

from shared.config import Config

#: Longest wait for a master to log that it serves.
MASTER_START_SECONDS = 30.0
#: Longest wait for a master to exit after SIGTERM before it is killed.
MASTER_STOP_SECONDS = 20.0
#: Default socket timeout of the test clients.
CLIENT_TIMEOUT = 10.0

T = TypeVar("T")

#: The master's ``serving on`` line: one ``http://`` or ``https://`` (TLS) address per listener.
_SERVING = re.compile(
    r"serving on (https?://127\.0\.0\.1:\d+(?:, https?://127\.0\.0\.1:\d+)*)"
    r" with (\d+) workers \(pid (\d+)\)"
)
_SERVING_ADDRESS = re.compile(r"(https?)://127\.0\.0\.1:(\d+)")


# -- waiting -------------------------------------------------------------------------------


def wait_for(
    condition: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Polls ``condition`` until it returns something true; returns that. Raises
    ``AssertionError`` naming ``what`` when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def wait_until_stable(
    value: Callable[[], int], settle: float = 1.0, timeout: float = 30.0, interval: float = 0.05
) -> int:
    """Polls ``value`` until it has not changed for ``settle`` seconds; returns it (a flow
    that backpressure stopped)."""
    deadline = time.monotonic() + timeout
    last = value()
    since = time.monotonic()
    while True:
        time.sleep(interval)
        now = time.monotonic()
        current = value()
        if current != last:
            last, since = current, now
        elif now - since >= settle:
            return current
        if now > deadline:
            raise AssertionError(f"value still changing after {timeout:g}s (at {current})")


# -- body patterns ---------------------------------------------------------------------------

_BLOCK = bytes(range(256)) * 256  # 64 KiB


def pattern_chunks(size: int, piece: int = len(_BLOCK)) -> Iterator[bytes]:
    """A deterministic body of ``size`` bytes, in pieces of at most ``piece`` bytes."""
    left = size
    while left > 0:
        n = min(left, piece, len(_BLOCK))
        yield _BLOCK[:n]
        left -= n


def pattern_sha256(size: int) -> str:
    """The SHA-256 of :func:`pattern_chunks` of ``size`` bytes."""
    h = hashlib.sha256()
    for chunk in pattern_chunks(size):
        h.update(chunk)
    return h.hexdigest()


# -- the origin ------------------------------------------------------------------------------


class HeaderLookup:
    """Case-insensitive lookups in a ``headers`` list of (name, value) pairs."""

    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]


@dataclass
class RecordedRequest(HeaderLookup):
    """One request as the origin received it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    conn_id: int
    #: How many requests its connection carried, this one included.
    conn_seq: int
    body: bytes = b""
    #: "chunked", "length" or "none".
    framing: str = "none"
    #: True once the whole body (if any) was read: a request the proxy gave up on while
    #: streaming it stays incomplete.
    complete: bool = False


class _BadRequest(Exception):
    pass


@dataclass
class Origin:
    """A test origin: an HTTP/1.1 server with counters and knobs (see :meth:`_route`).

    ``close_idle_after``: close a keep-alive connection idle this long after a response.
    ``drop_reused``: close, without an answer, every request that is not the first on its
    connection (the race of an origin closing an idle connection as a request arrives).
    ``tls``: a server ``ssl.SSLContext`` to serve HTTPS instead of plaintext.
    ``require``: a (name, value) header field every request must carry; one without it is
    answered 403 once its body is read (any route but ``/sink``).
    """

    name: str = "origin"
    close_idle_after: float | None = None
    drop_reused: bool = False
    tls: ssl.SSLContext | None = None
    require: tuple[str, str] | None = None
    # Counters, read by the tests.
    accepted: int = 0
    open_connections: int = 0
    idle_closed: int = 0
    dropped: int = 0
    large_sent: int = 0
    sink_received: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _server: asyncio.AbstractServer | None = field(default=None, repr=False)
    _gate: asyncio.Event | None = field(default=None, repr=False)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set, repr=False)
    _conn_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    # -- control, from the test thread -----------------------------------------------------

    def start(self) -> Origin:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self._gate = asyncio.Event()
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20, ssl=self.tls)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # pragma: no cover - reported to the starter
                errors.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"origin-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Closes the listener and every connection; joins the thread."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def reset(self) -> None:
        """Forgets what was counted (connections and options stay) and closes the gate."""
        self.accepted = 0
        self.idle_closed = 0
        self.dropped = 0
        self.large_sent = 0
        self.sink_received = 0
        self.requests = []
        if self._loop is not None and self._gate is not None:
            self._loop.call_soon_threadsafe(self._gate.clear)

    def open_gate(self) -> None:
        """Lets ``/sink?gate=1`` requests read their bodies."""
        assert self._loop is not None and self._gate is not None
        self._loop.call_soon_threadsafe(self._gate.set)

    def close_connections(self) -> None:
        """Closes every open connection at once (as an origin restart would)."""
        assert self._loop is not None

        def close_all() -> None:
            for w in list(self._writers):
                w.close()

        self._loop.call_soon_threadsafe(close_all)

    def paths(self) -> list[str]:
        return [r.target for r in self.requests]

    # -- the server, on the origin's loop ----------------------------------------------------

    async def _cleanup(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = next(self._conn_ids)
        self.accepted += 1
        self.open_connections += 1
        self._writers.add(writer)
        seq = 0
        try:
            while True:
                try:
                    if seq and self.close_idle_after is not None:
                        head = await asyncio.wait_for(
                            reader.readuntil(b"\r\n\r\n"), self.close_idle_after
                        )
                    else:
                        head = await reader.readuntil(b"\r\n\r\n")
                except TimeoutError:
                    self.idle_closed += 1
                    break
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    break
                seq += 1
                try:
                    req = _parse_head(head, conn_id, seq)
                except _BadRequest:
                    writer.write(
                        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )
                    break
                if self.drop_reused and seq > 1:
                    self.dropped += 1
                    break
                self.requests.append(req)
                if not await self._route(req, reader, writer):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            self.open_connections -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _read_body(
        self, req: RecordedRequest, reader: asyncio.StreamReader
    ) -> AsyncIterator[bytes]:
        """Yields the request body in pieces as it arrives."""
        te = (req.header("transfer-encoding") or "").lower()
        if "chunked" in te:
            req.framing = "chunked"
            while True:
                line = await reader.readuntil(b"\r\n")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    return
                left = size
                while left:
                    data = await reader.read(min(left, 1 << 16))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(data)
                    yield data
                if await reader.readexactly(2) != b"\r\n":
                    raise ConnectionError("bad chunk framing")
        length = req.header("content-length")
        if length is not None:
            req.framing = "length"
            left = int(length)
            while left:
                data = await reader.read(min(left, 1 << 16))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(data)
                yield data

    async def _route(
        self, req: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answers one request; returns whether the connection stays open.

        Routes (by path): ``/sleep?s=SECONDS`` waits, then echoes; ``/large?size=N`` sends N
        pattern bytes (``&chunked=1``: chunked), counting them in ``large_sent`` as the socket
        takes them; ``/sink`` reads the body as it comes (``?gate=1``: only once
        :meth:`open_gate` was called) and answers its size and SHA-256; ``/chunked?parts=a,b``
        answers those chunks (``&trailer=name:value``: and that trailer field);
        ``/status/NNN`` answers that status; ``/close`` answers with ``Connection: close`` and
        closes; ``/early`` answers 401 before reading the request
        body and closes; ``/interim?code=1xx`` sends that interim response
        first, then echoes; ``/eof?body=TEXT`` answers a body without length
        or chunking, delimited by closing (``&type=``: its Content-Type);
        ``/stall?sent=N`` sends a head promising more than N body bytes, N bytes, then
        nothing until the peer closes; ``/garbage`` answers bytes that are not HTTP;
        ``/hangup`` closes without answering; anything else echoes the request as JSON.
        """
        url = urlsplit(req.target)
        query = parse_qs(url.query)
        path = url.path
        extra = [tuple(h.split(":", 1)) for h in query.get("rh", [])]
        keep = _keep_alive(req)
        if path == "/close":
            keep = False
        head_only = req.method == "HEAD"

        if path == "/sleep":
            await asyncio.sleep(float(query.get("s", ["1"])[0]))
        if path == "/sink":
            if query.get("gate"):
                await self._gate.wait()  # type: ignore[union-attr]
            h = hashlib.sha256()
            n = 0
            async for data in self._read_body(req, reader):
                h.update(data)
                n += len(data)
                self.sink_received += len(data)
            req.complete = True
            body = json.dumps(
                {"bytes": n, "sha256": h.hexdigest(), "framing": req.framing}
            ).encode()
            await self._send(writer, 200, extra, body, keep, head_only)
            return keep
        parts = []
        async for data in self._read_body(req, reader):
            parts.append(data)
        req.body = b"".join(parts)
        req.complete = True

        if self.require is not None and self.require[1] not in req.header_all(self.require[0]):
            await self._send(writer, 403, extra, b"required header missing\n", keep, head_only)
            return keep
        if path == "/interim":
            code = int(query.get("code", ["100"])[0])
            writer.write(
                f"HTTP/1.1 {code} Interim\r\nLink: </style.css>; rel=preload\r\n\r\n".encode()
            )
            await writer.drain()
        if path == "/early":
            # Answers before reading the body, then drains it until the peer closes (a
            # lingering close, so that the answer is not lost to a reset).
            writer.write(_head(401, [("Content-Length", "7")], False) + b"no way\n")
            await writer.drain()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_drain_reader(reader), 30)
            return False
        if path == "/hangup":
            return False
        if path == "/eof":
            body = query.get("body", ["until the end"])[0].encode()
            ctype = query.get("type", ["text/plain"])[0]
            writer.write(
                _head(200, [("Content-Type", ctype), *extra], True) + (b"" if head_only else body)
            )
            return False
        if path == "/garbage":
            writer.write(b"THIS IS NOT HTTP\r\n\r\n")
            return False
        if path == "/stall":
            n = int(query.get("sent", ["10"])[0])
            writer.write(_head(200, [("Content-Length", str(n + 1000)), *extra], keep) + b"s" * n)
            await writer.drain()
            while await reader.read(1 << 16):
                pass
            return False
        if path == "/large":
            size = int(query["size"][0])
            chunked = bool(query.get("chunked"))
            fields = [("Content-Type", "application/octet-stream"), *extra]
            if chunked:
                fields.append(("Transfer-Encoding", "chunked"))
            else:
                fields.append(("Content-Length", str(size)))
            writer.write(_head(200, fields, keep))
            if head_only:
                return keep
            for chunk in pattern_chunks(size):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await writer.drain()
                self.large_sent += len(chunk)
            if chunked:
                writer.write(b"0\r\n\r\n")
            return keep
        if path == "/chunked":
            pieces = query.get("parts", ["alpha,beta,gamma"])[0].split(",")
            fields = [("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked"), *extra]
            writer.write(_head(200, fields, keep))
            if not head_only:
                for p in pieces:
                    writer.write(b"%x\r\n%s\r\n" % (len(p), p.encode()))
                    await writer.drain()
                trailers = "".join(f"{t}\r\n" for t in query.get("trailer", []))
                writer.write(b"0\r\n" + trailers.encode() + b"\r\n")
            return keep
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            if status in (204, 304):
                fields = [("ETag", '"v1"'), *extra]
                writer.write(_head(status, fields, keep))
                return keep
            await self._send(writer, status, extra, f"status {status}\n".encode(), keep, head_only)
            return keep
        echo = {
            "origin": self.name,
            "method": req.method,
            "target": req.target,
            "version": req.version,
            "headers": req.headers,
            "body": req.body.decode("latin-1"),
            "framing": req.framing,
            "conn_id": req.conn_id,
            "conn_seq": req.conn_seq,
        }
        await self._send(writer, 200, extra, json.dumps(echo).encode(), keep, head_only)
        return keep

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        extra: list[tuple[str, ...]],
        body: bytes,
        keep: bool,
        head_only: bool,
    ) -> None:
        fields = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("X-Origin", self.name),
            *extra,
        ]
        writer.write(_head(status, fields, keep) + (b"" if head_only else body))
        await writer.drain()


async def _drain_reader(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


def _parse_head(head: bytes, conn_id: int, seq: int) -> RecordedRequest:
    lines = head[:-4].decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise _BadRequest from None
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest
        headers.append((name, value.strip()))
    return RecordedRequest(method, target, version.removeprefix("HTTP/"), headers, conn_id, seq)


def _keep_alive(req: RecordedRequest) -> bool:
    tokens = {t.strip().lower() for v in req.header_all("connection") for t in v.split(",")}
    if req.version == "1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _head(status: int, fields: Iterable[tuple[str, ...]], keep: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Whatever')}"]
    lines += [f"{n}: {v}" for n, v in fields]
    if not keep:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    304: "Not Modified",
    404: "Not Found",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


# -- clients -----------------------------------------------------------------------------------


@dataclass
class Response(HeaderLookup):
    """A response as read off the wire."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    #: True when the body came with chunked transfer coding.
    chunked: bool = False
    #: Status codes of the interim (1xx) responses before this one.
    interim: list[int] = field(default_factory=list)

    def has(self, name: str) -> bool:
        return bool(self.header_all(name))

    def json(self) -> Any:
        return json.loads(self.body)


def build_request(
    method: str = "GET",
    target: str = "/",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    version: str = "1.1",
    host: str | None = "test.local",
) -> bytes:
    """A request's bytes; Content-Length is added for a body unless a framing header is
    given."""
    fields = list(headers)
    names = {n.lower() for n, _ in fields}
    if host is not None and "host" not in names:
        fields.insert(0, ("Host", host))
    if body and "content-length" not in names and "transfer-encoding" not in names:
        fields.append(("Content-Length", str(len(body))))
    head = f"{method} {target} HTTP/{version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields)
    return head.encode("latin-1") + b"\r\n" + body


def chunked_body(pieces: Iterable[bytes]) -> bytes:
    """``pieces`` in chunked transfer coding, with the last chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


class FakeTransport:
    """A transport for protocol unit tests: records what is written and whether it was closed."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


class HttpConn:
    """A raw HTTP/1.1 client connection: what is sent and read is exactly the bytes."""

    def __init__(
        self, port: int, timeout: float = CLIENT_TIMEOUT, rcvbuf: int | None = None
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def __enter__(self) -> HttpConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        version: str = "1.1",
    ) -> Response:
        """Sends one request and reads its response."""
        self.send(build_request(method, target, headers, body, version))
        return self.read_response(method)

    def _fill(self) -> bool:
        """Reads more bytes; False at the end of the stream."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_until(self, sep: bytes) -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                return out
            if not self._fill():
                raise ConnectionError(f"connection closed (buffered: {bytes(self.buf)[:200]!r})")

    def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError(f"connection closed after {len(self.buf)} of {n} bytes")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_head(self) -> tuple[int, str, list[tuple[str, str]]]:
        """The next response head (interim ones included)."""
        head = self.read_until(b"\r\n\r\n").decode("latin-1")
        lines = head[:-4].split("\r\n")
        version, _, rest = lines[0].partition(" ")
        assert version.startswith("HTTP/1."), f"not a status line: {lines[0]!r}"
        code, _, reason = rest.partition(" ")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        return int(code), reason, headers

    def read_response(self, method: str = "GET") -> Response:
        """Reads one whole response (the body per its framing; a 1xx is recorded and
        skipped)."""
        interim = []
        while True:
            status, reason, headers = self.read_head()
            if status >= 200:
                break
            interim.append(status)
        resp = Response(status, reason, headers, b"", interim=interim)
        if method == "HEAD" or status in (204, 304):
            return resp
        te = (resp.header("transfer-encoding") or "").lower()
        if "chunked" in te:
            resp.chunked = True
            resp.body = self._read_chunked()
        elif resp.header("content-length") is not None:
            resp.body = self.read_exactly(int(resp.header("content-length") or 0))
        else:
            while self._fill():
                pass
            resp.body = bytes(self.buf)
            self.buf.clear()
        return resp

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        self.read_chunked_into(parts.append)
        return b"".join(parts)

    def read_chunked_into(self, sink: Callable[[bytes], object]) -> int:
        """Reads a chunked body, handing each piece to ``sink``; returns its size."""
        total = 0
        while True:
            line = self.read_until(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.read_until(b"\r\n") != b"\r\n":
                    pass
                return total
            self.read_exactly_into(size, sink)
            total += size
            assert self.read_exactly(2) == b"\r\n", "chunk not followed by CRLF"

    def read_exactly_into(self, n: int, sink: Callable[[bytes], object]) -> None:
        """Reads ``n`` body bytes, handing each piece to ``sink`` (nothing kept)."""
        left = n
        while left:
            if not self.buf and not self._fill():
                raise ConnectionError(f"connection closed with {left} of {n} bytes to go")
            piece = bytes(self.buf[:left])
            del self.buf[: len(piece)]
            sink(piece)
            left -= len(piece)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout`` seconds without
        sending anything more."""
        if self.buf:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        if data:
            self.buf += data
            return False
        self.eof = True
        return True


def get(
    port: int,
    target: str = "/",
    headers: Iterable[tuple[str, str]] = (),
    method: str = "GET",
    body: bytes = b"",
) -> Response:
    """One request on a new connection, closed afterwards."""
    with HttpConn(port) as conn:
        return conn.request(method, target, headers, body)


# -- the master ----------------------------------------------------------------------------

_ORIGIN_APP = """
import os
from shared import HttpPeer, ProxyHttp

class App(ProxyHttp):
    def configure(self, config):
        super().configure(config)
        self.peer = HttpPeer(config.app_options["origin"])

    def upstream_peer(self, session, ctx):
        return self.peer
"""


def origin_app(phases: str = "") -> str:
    """Source of an app module ``App`` proxying to ``app_options.origin``, with ``phases``
    (more methods, indented as in the class body) added."""
    return _ORIGIN_APP + phases


def declared_settings(cls: Any = Config, prefix: str = "") -> dict[str, dataclasses.Field[Any]]:
    """Every leaf setting under ``cls`` by key path (as a user writes it), found from the
    dataclass declarations independently of the reference the project generates."""
    out: dict[str, dataclasses.Field[Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("source", "raw"):
            continue
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out.update(declared_settings(tp, f"{prefix}{f.name}."))
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(args[0]):
            out.update(declared_settings(args[0], f"{prefix}{f.name}[]."))
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(args[1]):
            out.update(declared_settings(args[1], f"{prefix}{f.name}.<name>."))
        elif any(dataclasses.is_dataclass(a) for a in args):
            # An optional section: its own row, then its settings.
            out[prefix + f.name] = f
            inner = next(a for a in args if dataclasses.is_dataclass(a))
            out.update(declared_settings(inner, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = f
    return out


def config_for(upstreams: dict[str, list[str]] | None = None, **sections: Any) -> dict[str, Any]:
    """A config mapping listening on 127.0.0.1:0; ``sections`` are merged over it."""
    config: dict[str, Any] = {
        "server": {"workers": 2, "grace_period_seconds": 10},
        "listeners": [{"address": "127.0.0.1:0"}],
    }
    if upstreams is not None:
        config["upstreams"] = {name: {"servers": servers} for name, servers in upstreams.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def is_worker(proc: psutil.Process) -> bool:
    """True for a worker process (by its title, or its command line before the title)."""
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False
    return cmd.startswith("tenaya worker") or " -m worker " in f"{cmd} "


class Master:
    """``python -m master start`` in a subprocess, with its files in ``workdir``.

    ``files`` are written beside the config (app modules). ``error_log`` and ``access_log``
    are set to files in ``workdir`` unless the config names them. The master runs in ``cwd``
    (default: ``workdir``).
    """

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        files: dict[str, str] | None = None,
        args: Iterable[str] = (),
        cwd: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.cwd = cwd or workdir
        workdir.mkdir(parents=True, exist_ok=True)
        logging_cfg = dict(config.get("logging") or {})
        logging_cfg.setdefault("error_log", str(workdir / "error.log"))
        logging_cfg.setdefault("access_log", str(workdir / "access.log"))
        self.config = {**config, "logging": logging_cfg}
        self.config_path = workdir / "tenaya.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        for name, text in (files or {}).items():
            (workdir / name).write_text(text)
        self.args = list(args)
        self.error_log = (
            Path(logging_cfg["error_log"])
            if logging_cfg["error_log"] not in ("stderr", "stdout")
            else workdir / "master.stderr"
        )
        self.access_log = Path(logging_cfg["access_log"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        #: (scheme, port) of each listener, in the config's order; ``port`` is the first's.
        self.listeners: list[tuple[str, int]] = []
        self.workers_count = 0
        self._known_children: set[int] = set()

    # -- start and stop ------------------------------------------------------------------

    def spawn(self) -> subprocess.Popen[bytes]:
        """Starts the master process (without waiting for it to serve)."""
        out = open(self.workdir / "master.stdout", "wb")  # noqa: SIM115 - closed below
        err = open(self.workdir / "master.stderr", "wb")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "master", "start", "-c", str(self.config_path), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            out.close()
            err.close()
        return self.proc

    def start(self, timeout: float = MASTER_START_SECONDS) -> Master:
        """Starts the master and waits for its ``serving on`` line."""
        proc = self.spawn()
        deadline = time.monotonic() + timeout
        while True:
            m = _SERVING.search(self.read_error_log())
            if m:
                found = _SERVING_ADDRESS.findall(m.group(1))
                self.listeners = [(scheme, int(port)) for scheme, port in found]
                self.port = self.listeners[0][1]
                self.workers_count = int(m.group(2))
                assert int(m.group(3)) == proc.pid
                return self
            if proc.poll() is not None:
                raise AssertionError(
                    f"master exited with {proc.returncode} before serving:\n{self.logs()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"master not serving after {timeout:g}s:\n{self.logs()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = MASTER_STOP_SECONDS) -> int | None:
        """SIGTERM, then wait; SIGKILL (the master and its workers) as a last resort.
        Returns the master's exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self._remember_children()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the master and every worker it was seen with."""
        if self.proc is None:
            return
        self._remember_children()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self._known_children:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                if is_worker(p) or "master.demo" in " ".join(p.cmdline()):
                    p.kill()

    def _remember_children(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in psutil.Process(self.pid).children():
                self._known_children.add(c.pid)

    # -- looking at it ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = self.listeners[0][0] if self.listeners else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def workers(self) -> list[psutil.Process]:
        """The live worker processes, children of the master."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        self._known_children.update(c.pid for c in children)
        return [c for c in children if is_worker(c) and c.status() != psutil.STATUS_ZOMBIE]

    def read_error_log(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def read_access_log(self) -> str:
        try:
            return self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self) -> str:
        parts = []
        for name in ("error.log", "master.stderr", "master.stdout"):
            p = self.workdir / name
            if p.exists() and (p != self.error_log or name == "error.log"):
                parts.append(f"--- {name} ---\n{p.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


# -- nginx as an origin --------------------------------------------------------------------


def nginx_binary() -> str:
    """The nginx executable (scripts/test installs it)."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    assert found, "nginx is not installed (scripts/test installs it)"
    return found


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """nginx serving fixed bodies on 127.0.0.1, as a fast, real origin.

    ``/small`` answers 13 bytes; ``/bytes/N`` answers the file ``N`` of ``N`` bytes (made on
    demand by :meth:`add_file`). Keep-alive requests per connection are unlimited.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        (workdir / "html" / "bytes").mkdir(parents=True, exist_ok=True)
        (workdir / "html" / "small").write_text("hello, nginx\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def add_file(self, size: int) -> str:
        path = self.workdir / "html" / "bytes" / str(size)
        with open(path, "wb") as f:
            for chunk in pattern_chunks(size):
                f.write(chunk)
        return f"/bytes/{size}"

    def start(self, attempts: int = 5) -> Nginx:
        for _ in range(attempts):
            self.port = free_port()
            conf = self.workdir / "nginx.conf"
            w = self.workdir
            # As root, nginx's workers would switch to a user that cannot read tmp_path.
            user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
            conf.write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {w}/tmp;
    proxy_temp_path {w}/tmp;
    fastcgi_temp_path {w}/tmp;
    uwsgi_temp_path {w}/tmp;
    scgi_temp_path {w}/tmp;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port};
        root {w}/html;
        location = /small {{ default_type text/plain; }}
    }}
}}
""")
            (w / "tmp").mkdir(exist_ok=True)
            log = open(w / "nginx.stderr", "wb")  # noqa: SIM115 - closed below
            try:
                self.proc = subprocess.Popen(
                    [
                        nginx_binary(),
                        "-p",
                        str(w),
                        "-c",
                        str(conf),
                        "-e",
                        str(w / "nginx-error.log"),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            finally:
                log.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), timeout=1),
                ):
                    return self
                time.sleep(0.02)
            self.stop()  # probably lost the port to someone else: try another
        log_text = (self.workdir / "nginx-error.log").read_text(errors="replace")
        raise AssertionError(f"nginx did not start:\n{log_text[-2000:]}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


# -- processes -----------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    """Open descriptors of a process, from /proc/PID/fd."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    """Resident memory of a process in bytes."""
    return int(psutil.Process(pid).memory_info().rss)
