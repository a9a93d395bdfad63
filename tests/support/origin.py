"""The test origin: a configurable HTTP/1.1 server with counters and knobs.

Theory of operation. An :class:`Origin` is an asyncio HTTP/1.1 server on 127.0.0.1 (port 0) that
runs its own event loop in a thread of the test process, so a test reads its counters and opens
its gates directly. What it answers is chosen by the request path (see :meth:`Origin._route`);
``rh=NAME:VALUE`` query parameters add response header lines to any route. Each request it
received is kept as a :class:`RecordedRequest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import ssl
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from tests.support.headers import HeaderLookup
from tests.support.payloads import pattern_chunks


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
    ``delay``: seconds every request waits before it is answered (a slow server).
    """

    name: str = "origin"
    close_idle_after: float | None = None
    drop_reused: bool = False
    tls: ssl.SSLContext | None = None
    require: tuple[str, str] | None = None
    delay: float = 0.0
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

        if self.delay:
            await asyncio.sleep(self.delay)
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
