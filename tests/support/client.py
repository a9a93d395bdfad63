"""Small HTTP/1.1 clients that show the bytes on the wire: a raw connection that sends exactly
what it is given and reads responses by their framing, request and chunked-body builders, and a
fake transport for protocol unit tests."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.support.headers import HeaderLookup

#: Default socket timeout of the test clients.
CLIENT_TIMEOUT = 10.0


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
