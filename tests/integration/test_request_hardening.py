"""Request-side hardening through the real master: nothing the proxy refuses reaches an origin,
and what it forwards means one thing.

Theory of operation. :class:`CaptureOrigin` is a raw-socket origin on 127.0.0.1 whose threads
record every byte of every upstream connection, split into the requests they held. Each refusal
test first sends a good request (``/warm``) so that the single worker holds a pooled upstream
connection: with one ready, a request head goes upstream as soon as the engine starts, which is
what let a head through before the parser's error in the same read. Then the bad bytes go in
one write, the client must get the status and see its connection closed, and a ``/marker``
request on a new connection follows. Once every upstream connection but the marker's has closed
(a proxy that wrote a head and then gave up closes that connection), the origin's record must
hold ``/warm`` and ``/marker`` and no other byte.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.events
import pytest

from tests.support.client import CLIENT_TIMEOUT, HttpConn
from tests.support.config import config_for, origin_app
from tests.support.master import Master
from tests.support.waits import wait_for

if TYPE_CHECKING:
    from tests.conftest import Fleet

#: Host routed to the second origin (absolute-form targets name it).
OTHER = "other.example"
#: The proxy's request body limit here.
MAX_BODY = 1000
#: Longest wait for the origin to see (or stop seeing) something.
ORIGIN_SECONDS = 10.0


# -- the capturing origin ------------------------------------------------------------------


@dataclass
class Seen:
    """One request as an origin connection received it."""

    line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes

    @property
    def target(self) -> bytes:
        return self.line.split(b" ")[1]

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    def names(self) -> set[bytes]:
        return {n.lower() for n, _ in self.headers}


@dataclass
class UpConn:
    """One upstream connection: every byte it carried, and the requests they made."""

    data: bytearray = field(default_factory=bytearray)
    requests: list[Seen] = field(default_factory=list)
    #: Bytes not (yet) part of a complete request.
    rest: bytes = b""
    tunnelled: bytes = b""
    closed: bool = False


class _Incomplete(Exception):
    """More bytes are needed."""


def _chunked(buf: bytes, at: int) -> tuple[bytes, int]:
    """The decoded chunked body starting at ``at`` and where it ends; raises _Incomplete."""
    body = b""
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            raise _Incomplete
        size = int(buf[at:eol].split(b";")[0], 16)
        at = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", at - 2)
            if end < 0:
                raise _Incomplete
            return body, end + 4
        if len(buf) < at + size + 2:
            raise _Incomplete
        body += buf[at : at + size]
        at += size + 2


def _parse(buf: bytes) -> tuple[Seen, int]:
    """The first request in ``buf`` and its length; raises _Incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        raise _Incomplete
    lines = buf[:end].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip()))
    seen = Seen(lines[0], headers, b"", b"")
    at = end + 4
    te = seen.header(b"transfer-encoding")
    length = seen.header(b"content-length")
    if te is not None and te.split(b",")[-1].strip().lower() == b"chunked":
        seen.body, at = _chunked(buf, at)
    elif length is not None:
        if len(buf) < at + int(length):
            raise _Incomplete
        seen.body = buf[at : at + int(length)]
        at += int(length)
    seen.raw = buf[:at]
    return seen, at


class CaptureOrigin:
    """An HTTP/1.1 origin on raw sockets that records each connection's bytes exactly.

    Every request is answered ``200`` with body ``ok``; one that asks for an upgrade (Upgrade
    and a Connection field naming it) is answered ``101`` and its connection then echoes what
    it gets.
    """

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[UpConn] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="capture-origin").start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def reset(self) -> None:
        """Forgets the record (open connections keep recording into a fresh entry)."""
        with self._lock:
            for c in self.conns:
                c.data.clear()
                c.requests.clear()
                c.rest = b""
                c.tunnelled = b""
            self.conns = [c for c in self.conns if not c.closed]

    def requests(self) -> list[Seen]:
        with self._lock:
            return [r for c in self.conns for r in c.requests]

    def targets(self) -> list[bytes]:
        return [r.target for r in self.requests()]

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            conn = UpConn()
            with self._lock:
                self.conns.append(conn)
                self._socks.append(s)
            threading.Thread(target=self._serve, args=(s, conn), daemon=True).start()

    def _serve(self, s: socket.socket, conn: UpConn) -> None:
        buf = b""
        tunnel = False
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                with self._lock:
                    conn.data += data
                if tunnel:
                    conn.tunnelled += data
                    s.sendall(data)
                    continue
                buf += data
                while buf:
                    try:
                        seen, n = _parse(buf)
                    except (_Incomplete, ValueError):
                        break
                    buf = buf[n:]
                    with self._lock:
                        conn.requests.append(seen)
                    upgrade = seen.header(b"upgrade")
                    connection = (seen.header(b"connection") or b"").lower()
                    if upgrade is not None and b"upgrade" in connection:
                        s.sendall(
                            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                            b"Upgrade: " + upgrade + b"\r\n\r\n"
                        )
                        tunnel = True
                        conn.tunnelled = buf
                        if buf:
                            s.sendall(buf)
                        buf = b""
                        break
                    s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                with self._lock:
                    conn.rest = buf
        except OSError:
            pass
        finally:
            conn.closed = True
            s.close()


class SourcedConn(HttpConn):
    """An :class:`HttpConn` from a loopback address of its own (another client to the
    proxy)."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=CLIENT_TIMEOUT, source_address=(source, 0)
        )
        self.buf = bytearray()
        self.eof = False


# -- the stack -------------------------------------------------------------------------------


@dataclass
class Env:
    master: Master
    origin: CaptureOrigin
    other: CaptureOrigin

    @property
    def port(self) -> int:
        return self.master.port


@pytest.fixture(scope="module")
def stack(module_fleet: Fleet) -> Iterator[Env]:
    origin, other = CaptureOrigin(), CaptureOrigin()
    # One worker and no broker: the warm-up's pooled connection is the one the next request
    # finds.
    config = config_for(
        upstreams={"main": [origin.address]},
        server={"workers": 1},
        pool={"shared": False},
        limits={"max_body_bytes": MAX_BODY},
    )
    config["upstreams"]["other"] = {"servers": [other.address], "hosts": [OTHER]}
    try:
        yield Env(module_fleet.master(config), origin, other)
    finally:
        origin.close()
        other.close()


@pytest.fixture
def env(stack: Env) -> Env:
    stack.origin.reset()
    stack.other.reset()
    return stack


def warm(conn: HttpConn) -> None:
    """A good request on ``conn``, so the worker holds a pooled upstream connection."""
    resp = conn.request("GET", "/warm", [("Host", "t")])
    assert resp.status == 200, resp


def assert_origin_saw_only_warm_and_marker(env: Env) -> None:
    """After the refusal: a marker request, then the origin's record holds the warm-up and
    the marker, and nothing else, on any connection."""
    with HttpConn(env.port) as conn:
        assert conn.request("GET", "/marker", [("Host", "t")]).status == 200
    origin = env.origin

    def settled() -> bool:
        with origin._lock:
            return all(
                c.closed or (c.requests and c.requests[-1].target == b"/marker")
                for c in origin.conns
                if c.data
            )

    wait_for(settled, ORIGIN_SECONDS, what="upstream connections to settle")
    with origin._lock:
        rests = [bytes(c.rest) for c in origin.conns if c.rest]
        tunnelled = [c.tunnelled for c in origin.conns if c.tunnelled]
    assert origin.targets() == [b"/warm", b"/marker"], [r.raw for r in origin.requests()]
    assert not rests, f"bytes of a refused request reached the origin: {rests}"
    assert not tunnelled
    assert not env.other.requests()


def refused(env: Env, raw: bytes, status: int = 400) -> None:
    """With a pooled upstream connection ready, ``raw`` (one write) gets ``status``, the
    connection closes, and the origin sees nothing of it."""
    with HttpConn(env.port) as conn:
        warm(conn)
        conn.send(raw)
        resp = conn.read_response()
        assert resp.status == status, (resp.status, resp.body)
        assert conn.closed_by_peer(), "the connection was left open"
    assert_origin_saw_only_warm_and_marker(env)


def forwarded(env: Env, raw: bytes, origin: CaptureOrigin | None = None) -> Seen:
    """Sends ``raw`` on a new connection; it must be answered 200 and reach ``origin`` (the
    main one by default) as one request, which is returned."""
    origin = origin or env.origin
    with HttpConn(env.port) as conn:
        conn.send(raw)
        resp = conn.read_response()
        assert resp.status == 200, (resp.status, resp.body)
    seen = wait_for(origin.requests, ORIGIN_SECONDS, what="the request at the origin")
    assert len(seen) == 1, [r.raw for r in seen]
    return seen[0]


# -- 1. nothing that arrived with the head goes up before it is all parsed ---------------------

CHUNKED_HEAD = b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"

MALFORMED_CHUNKED = {
    "lf_in_chunk_extension": b"5;a\nb\r\nhello\r\n0\r\n\r\n",
    "chunk_size_overflow": b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "leading_space": b" 5\r\nhello\r\n0\r\n\r\n",
    "trailing_space": b"5 \r\nhello\r\n0\r\n\r\n",
    "hex_prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "negative_size": b"-5\r\nhello\r\n0\r\n\r\n",
    "lf_line_endings": b"5\nhello\n0\n\n",
    "more_data_than_size": b"5\r\nhelloXX\r\n0\r\n\r\n",
    "no_crlf_after_data": b"5\r\nhello0\r\n\r\n",
    "bare_cr": b"5\rhello\r\n0\r\n\r\n",
    "no_crlf_after_last_chunk": b"5\r\nhello\r\n0\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n",
    "content_length_trailer": b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n",
    "transfer_encoding_trailer": b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
    "host_trailer": b"5\r\nhello\r\n0\r\nHost: evil.example\r\n\r\n",
}


def test_unknown_transfer_coding_sends_nothing_upstream(env: Env) -> None:
    """``Transfer-Encoding: xchunked``: llhttp reports it after the headers callback; the
    head must not have gone upstream by then."""
    refused(env, b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n")


@pytest.mark.parametrize("body", MALFORMED_CHUNKED.values(), ids=MALFORMED_CHUNKED.keys())
def test_malformed_chunked_body_sends_nothing_upstream(env: Env, body: bytes) -> None:
    """A chunked body that is malformed in the read that brought its head: 400, closed, and
    the origin sees nothing."""
    refused(env, CHUNKED_HEAD + body)


def test_good_chunked_body_in_one_read_is_forwarded(env: Env) -> None:
    """The same head and a well-formed body (with an allowed trailer) in one read: forwarded
    whole, and the trailer is not turned into a header field."""
    seen = forwarded(env, CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n")
    assert seen.body == b"hello"
    assert b"x-sum" not in seen.names()


def test_chunked_body_over_the_limit_in_the_head_read_sends_nothing(env: Env) -> None:
    """A chunked body past ``limits.max_body_bytes`` within the read that brought its head:
    413, and the origin sees nothing (the limit is found while the read is parsed, before the
    engine would write the head)."""
    refused(
        env, CHUNKED_HEAD + b"%x\r\n" % (2 * MAX_BODY) + b"a" * 2 * MAX_BODY + b"\r\n0\r\n\r\n", 413
    )


def test_error_in_a_later_read_closes_the_upstream_connection(env: Env) -> None:
    """A body that turns bad in a later read: the head went up already, so that upstream
    connection is closed, never reused; the next request finds a fresh one."""
    with HttpConn(env.port) as conn:
        warm(conn)
        conn.send(CHUNKED_HEAD + b"5\r\nhello\r\n")
        wait_for(
            lambda: any(c.rest for c in env.origin.conns),
            ORIGIN_SECONDS,
            what="the head and first chunk at the origin",
        )
        conn.send(b"zz\r\n")
        assert conn.read_response().status == 400
        assert conn.closed_by_peer()
    wait_for(
        lambda: env.origin.conns and env.origin.conns[0].closed,
        ORIGIN_SECONDS,
        what="the upstream connection to close",
    )
    with HttpConn(env.port) as conn:
        assert conn.request("GET", "/after", [("Host", "t")]).status == 200
    assert env.origin.conns[-1].requests[-1].target == b"/after"
    assert len(env.origin.conns) == 2


# -- 2. request target and Host ----------------------------------------------------------------


def test_absolute_form_uses_the_authority(env: Env) -> None:
    """``GET http://other.example/p?q HTTP/1.1`` with ``Host: t``: the target's authority
    wins (RFC 9112 3.2.2): routed to the upstream for other.example, forwarded in
    origin-form with that Host."""
    seen = forwarded(env, b"GET http://other.example/p?q=1 HTTP/1.1\r\nHost: t\r\n\r\n", env.other)
    assert seen.line == b"GET /p?q=1 HTTP/1.1"
    assert seen.header(b"host") == b"other.example"
    assert not env.origin.requests()


def test_absolute_form_with_empty_path_and_port(env: Env) -> None:
    """An absolute-form target without a path goes up as ``/``; the port stays in Host."""
    seen = forwarded(env, b"GET HTTP://Other.Example:8080 HTTP/1.1\r\nHost: t\r\n\r\n", env.other)
    assert seen.line == b"GET / HTTP/1.1"
    assert seen.header(b"host") == b"Other.Example:8080"


BAD_TARGETS = {
    "userinfo": b"http://user@other.example/",
    "userinfo_no_name": b"http://@other.example/",
    "empty_authority": b"http:///x",
    "other_scheme": b"ftp://other.example/",
    "bad_port": b"http://other.example:8o/",
    "fragment": b"/x#/../admin",
    "fragment_absolute": b"http://other.example/x#frag",
    "no_leading_slash": b"x/y",
    "asterisk_not_options": b"*",
}


@pytest.mark.parametrize("target", BAD_TARGETS.values(), ids=BAD_TARGETS.keys())
def test_bad_target_is_refused(env: Env, target: bytes) -> None:
    """Userinfo in an absolute-form target, a fragment, a form that is none of origin-,
    absolute- or (for OPTIONS) asterisk-form: 400, nothing upstream."""
    refused(env, b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")


BAD_HOSTS = {
    "userinfo": b"user@t",
    "two_ports": b"t:80:80",
    "letter_in_port": b"t:8o",
    "port_then_userinfo": b"t:80@evil.example",
    "path": b"t/evil",
    "space": b"t evil",
    "backslash": b"t\\evil",
    "unclosed_ip_literal": b"[::1",
    "bad_ip_literal": b"[not-an-ip]",
    "bad_percent": b"t%zz",
}


@pytest.mark.parametrize("host", BAD_HOSTS.values(), ids=BAD_HOSTS.keys())
def test_bad_host_is_refused(env: Env, host: bytes) -> None:
    """A Host that is not an RFC 3986 host [":" port]: 400, nothing upstream."""
    refused(env, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")


GOOD_HOSTS = [
    b"t",
    b"t:80",
    b"T.Example-1",
    b"127.0.0.1:8080",
    b"[::1]:80",
    b"[fe80::1]",
    b"xn--bcher-kva.example",
    b"a%41b",
]


@pytest.mark.parametrize("host", GOOD_HOSTS, ids=[h.decode() for h in GOOD_HOSTS])
def test_good_host_is_forwarded(env: Env, host: bytes) -> None:
    """Names, IPv4 and IPv6 literals, with and without a port, pass unchanged."""
    seen = forwarded(env, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert seen.header(b"host") == host


def test_two_hosts_and_no_host_are_refused(env: Env) -> None:
    """RFC 9112 3.2: more than one Host, or none on HTTP/1.1: 400."""
    refused(env, b"GET / HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n")
    env.origin.reset()
    refused(env, b"GET / HTTP/1.1\r\nX: y\r\n\r\n")


@pytest.mark.parametrize("version", [b"2.0", b"0.9", b"1.2", b"3.0"])
def test_version_other_than_1x_is_refused(env: Env, version: bytes) -> None:
    """An HTTP/1 request line may say HTTP/1.0 or HTTP/1.1 only: anything else is refused
    and the connection closed."""
    with HttpConn(env.port) as conn:
        warm(conn)
        conn.send(b"GET / HTTP/" + version + b"\r\nHost: t\r\n\r\n")
        resp = conn.read_response()
        assert resp.status in (400, 505), resp.status
        assert conn.closed_by_peer()
    assert_origin_saw_only_warm_and_marker(env)


def test_http09_request_line_is_refused(env: Env) -> None:
    """A request line without a version (HTTP/0.9, which httptools takes) is refused."""
    refused(env, b"GET /x\r\n\r\n")


def test_pri_method_is_refused(env: Env) -> None:
    """PRI is the HTTP/2 preface's method (RFC 9113 3.4), never an HTTP/1.1 request."""
    refused(env, b"PRI /x HTTP/1.1\r\nHost: t\r\n\r\n")


@pytest.mark.parametrize("token", [b"host", b"Content-Length", b"transfer-encoding"])
def test_connection_token_never_removes_framing_or_host(env: Env, token: bytes) -> None:
    """``Connection: host`` (or a framing field): the token is ignored, Host still goes up
    and a body keeps its framing."""
    seen = forwarded(
        env,
        b"POST / HTTP/1.1\r\nHost: t\r\nConnection: " + token + b"\r\nContent-Length: 2\r\n\r\nhi",
    )
    assert seen.header(b"host") == b"t"
    assert seen.body == b"hi"


# -- 3. upgrade ------------------------------------------------------------------------------


def test_h2c_upgrade_is_not_forwarded(env: Env) -> None:
    """``Upgrade: h2c`` with HTTP2-Settings (h2c smuggling): the upgrade and the settings are
    stripped and the request answered as a normal one."""
    seen = forwarded(
        env,
        b"GET /h2c HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings"
        b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    assert seen.target == b"/h2c"
    assert not {b"upgrade", b"http2-settings"} & seen.names()
    assert b"upgrade" not in (seen.header(b"connection") or b"").lower()


def test_h2c_among_other_upgrades_is_dropped(env: Env) -> None:
    """An Upgrade list naming h2c and another protocol asks for the other one only."""
    with HttpConn(env.port) as conn:
        conn.send(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c, websocket\r\n\r\n"
        )
        status, _, _ = conn.read_head()
        assert status == 101
    seen = wait_for(env.origin.requests, ORIGIN_SECONDS, what="the upgrade at the origin")
    assert seen[0].header(b"upgrade") == b"websocket"


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\n\r\nhello",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["length", "chunked"],
)
def test_upgrade_with_a_body_is_refused(env: Env, framing: bytes) -> None:
    """An upgrade request with a body would reach the origin without it (the parser switches
    at the end of the head): 400, nothing upstream."""
    refused(
        env,
        b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + framing,
    )


def test_upgrade_on_http10_is_ignored(env: Env) -> None:
    """Upgrade is an HTTP/1.1 mechanism (RFC 9110 7.8): on HTTP/1.0 the request is answered
    as a normal one and no Upgrade goes up."""
    with HttpConn(env.port) as conn:
        conn.send(
            b"GET /old HTTP/1.0\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        resp = conn.read_response()
        assert resp.status == 200
    seen = wait_for(env.origin.requests, ORIGIN_SECONDS, what="the request at the origin")
    assert seen[0].target == b"/old"
    assert b"upgrade" not in seen[0].names()


# -- HTTP/2: the same rules on :authority, Host and :path ---------------------------------------


def h2_request(port: int, headers: list[tuple[bytes, bytes]]) -> int | str:
    """One HTTP/2 request (prior knowledge, nothing validated on our side); its status, or
    ``"reset"`` when the stream is reset."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
    )
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
        conn.initiate_connection()
        conn.send_headers(1, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            assert data, "connection closed without an answer"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                    return int(dict(event.headers)[b":status"])
                if isinstance(event, h2.events.StreamReset) and event.stream_id == 1:
                    return "reset"
            sock.sendall(conn.data_to_send())


def h2_get(
    authority: bytes | None = b"t", path: bytes = b"/", host: bytes | None = None
) -> list[tuple[bytes, bytes]]:
    """A GET's fields: without ``:authority`` when it is None, with ``host`` when given."""
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path)]
    if authority is not None:
        fields.insert(2, (b":authority", authority))
    if host is not None:
        fields.append((b"host", host))
    return fields


@pytest.mark.parametrize("authority", [b"t:80:80", b"t:8o", b"t evil", b"user@t", b"[::1"])
def test_h2_bad_authority_is_refused(env: Env, authority: bytes) -> None:
    """An HTTP/2 :authority that is not host [":" port] never becomes an upstream Host."""
    assert h2_request(env.port, h2_get(authority)) in ("reset", 400)
    assert h2_request(env.port, h2_get(path=b"/marker")) == 200
    assert env.origin.targets() == [b"/marker"]


def test_h2_bad_host_field_and_fragment_are_refused(env: Env) -> None:
    """The same Host rule on an HTTP/2 host field, and no fragment in :path."""
    assert h2_request(env.port, h2_get(None, host=b"t:8o")) in ("reset", 400)
    assert h2_request(env.port, h2_get(path=b"/x#/../admin")) in ("reset", 400)
    assert h2_request(env.port, h2_get(b"[::1]:80", b"/ok")) == 200
    assert env.origin.targets() == [b"/ok"]


# -- the same through an app: the upstream request made from req_header ------------------------

#: An app whose upstream request is built from ``session.req_header`` (the engine's slow
#: path), read after the whole first read is parsed; ``X-Seen-Host`` says what
#: ``session.host`` was.
SLOW_APP = origin_app("""
    def upstream_request_filter(self, session, upstream_request, ctx):
        upstream_request.set("X-Seen-Host", session.host or "-")
""")


@pytest.fixture(scope="module")
def slow(module_fleet: Fleet) -> Iterator[Env]:
    origin = CaptureOrigin()
    config = config_for(
        server={"workers": 1},
        pool={"shared": False},
        app="slowapp:App",
        app_options={"origin": origin.address},
    )
    try:
        yield Env(module_fleet.master(config, files={"slowapp.py": SLOW_APP}), origin, origin)
    finally:
        origin.close()


@pytest.fixture
def slow_env(slow: Env) -> Env:
    slow.origin.reset()
    return slow


def test_app_path_absolute_form(slow_env: Env) -> None:
    """Through an app's upstream_request_filter, an absolute-form target goes up in
    origin-form with one Host, its authority, which session.host is too."""
    seen = forwarded(slow_env, b"GET http://other.example/p HTTP/1.1\r\nHost: t\r\n\r\n")
    assert seen.line == b"GET /p HTTP/1.1"
    assert [v for n, v in seen.headers if n.lower() == b"host"] == [b"other.example"]
    assert seen.header(b"x-seen-host") == b"other.example"


def test_app_path_keeps_host_and_drops_h2c(slow_env: Env) -> None:
    """Through an app: ``Connection: host`` keeps Host; an h2c upgrade loses Upgrade and
    HTTP2-Settings."""
    seen = forwarded(slow_env, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: host\r\n\r\n")
    assert seen.header(b"host") == b"t"
    slow_env.origin.reset()
    seen = forwarded(
        slow_env,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    assert not {b"upgrade", b"http2-settings"} & seen.names()


def test_app_path_trailers_are_not_headers(slow_env: Env) -> None:
    """A chunked body and its trailer section in the head's read: req_header, built once the
    read is parsed, holds the headers only, so the trailer does not go up as a header."""
    seen = forwarded(slow_env, CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-Admin: 1\r\n\r\n")
    assert seen.body == b"hello"
    assert seen.header(b"x-admin") is None


# -- logging: once per client and reason a minute -----------------------------------------------


def test_refusals_are_logged_once_per_client_and_reason(fleet: Fleet) -> None:
    """Twenty refused requests from one client leave one line; another reason (413), or
    another client address, gets a line of its own."""
    origin = CaptureOrigin()
    try:
        master = fleet.master(
            config_for(
                upstreams={"main": [origin.address]},
                server={"workers": 1},
                limits={"max_body_bytes": MAX_BODY},
            )
        )

        def refuse(raw: bytes, status: int, source: str = "127.0.0.1") -> None:
            with SourcedConn(master.port, source) as conn:
                conn.send(raw)
                assert conn.read_response().status == status

        def lines(client: str, what: str) -> int:
            return sum(
                1
                for line in master.read_error_log().splitlines()
                if f"from {client}: downstream error: {what}" in line
            )

        for _ in range(20):
            refuse(b"GET / HTTP/1.1\r\nHost: t:8o\r\n\r\n", 400)
        refuse(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413)
        refuse(b"GET /#x HTTP/1.1\r\nHost: t\r\n\r\n", 400, source="127.0.0.2")
        # Each line is written before its response: all are in the log by now.
        assert lines("127.0.0.1", "bad request") == 1
        assert lines("127.0.0.1", "request body too large") == 1
        assert lines("127.0.0.2", "bad request") == 1
        assert not origin.requests()
    finally:
        origin.close()
