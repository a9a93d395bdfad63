"""An origin is untrusted too: no response it sends may mean two things to the client, or leave
a connection in a state where the next message on it means something else.

Rejected with 502 (and the origin's connection closed, never reused): a 101 the request did not
ask for (or naming a protocol it did not offer), two different Content-Lengths or a list of
them, a malformed status line, control characters in a header value. Passed on, but framed
without ambiguity: a 204 loses its Content-Length and Transfer-Encoding; a 304 and a response to
HEAD keep Content-Length as metadata (RFC 9110 8.6) but never carry body bytes; the origin's
connection is closed when bytes follow any complete response. A request sent on a reused
connection where bytes left over from the exchange before come first is sent again on a fresh
connection, as one whose connection died before answering.

Theory of operation. One master serves the module (one worker, so one client connection's
requests meet one pool; the pool broker on, as by default), with an app that sends each request
to the loopback port its Host names (``o<PORT>.test``): each test has its own
:class:`RawOrigin` and meets no other test's pooled connections. A RawOrigin is a listening
socket in a thread of the test process; each connection it accepts runs the test's *script*
in a thread of its own, then is read to its end. Every byte each connection received is kept,
and whether the proxy closed it, so a test can say what the origin saw on which connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from tests.support.client import HttpConn, Response, build_request
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.waits import wait_for

if TYPE_CHECKING:
    from tests.conftest import Fleet

#: Test client socket timeout: short, so that a proxy that never answers fails fast.
CLIENT_TIMEOUT = 5.0
#: Longest wait for what an origin connection sees.
ORIGIN_WAIT = 5.0

APP = '''
from shared import HttpPeer, ProxyHttp


class App(ProxyHttp):
    """Sends each request to 127.0.0.1 on the port its Host names: ``o<PORT>.test``."""

    def configure(self, config):
        super().configure(config)
        self.peers = {}

    def upstream_peer(self, session, ctx):
        port = int(session.host.split(".", 1)[0][1:])
        peer = self.peers.get(port)
        if peer is None:
            peer = self.peers[port] = HttpPeer(("127.0.0.1", port))
        return peer
'''


def ok(body: bytes = b"hello") -> bytes:
    """A 200 response with Content-Length."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


# -- the raw origin -----------------------------------------------------------------------


class OriginConn:
    """One connection a :class:`RawOrigin` accepted, as its script sees it."""

    def __init__(self, sock: socket.socket, index: int) -> None:
        self.sock = sock
        #: 0 for the origin's first connection, then 1, 2, ...
        self.index = index
        #: Every byte received on the connection, in order.
        self.received = bytearray()
        #: Request heads (with their bodies) the script read.
        self.requests: list[bytes] = []
        #: True once the proxy closed the connection (the origin read its end).
        self.eof = False
        self._buf = bytearray()

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.received += data
        self._buf += data
        return True

    def read_request(self) -> bytes | None:
        """The next request (its head, and a body of its Content-Length), or None when the
        proxy closes the connection first."""
        while b"\r\n\r\n" not in self._buf:
            if not self._fill():
                return None
        end = self._buf.index(b"\r\n\r\n") + 4
        length = 0
        for line in bytes(self._buf[:end]).split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self._buf) < end + length:
            if not self._fill():
                return None
        request = bytes(self._buf[: end + length])
        del self._buf[: end + length]
        self.requests.append(request)
        return request

    def send(self, data: bytes) -> None:
        """Sends ``data`` in one call (one segment on loopback)."""
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def answer_each(self, response: bytes) -> None:
        """Answers every request with ``response`` until the proxy closes the connection."""
        while self.read_request() is not None:
            self.send(response)

    def got(self, what: bytes) -> bool:
        """True when ``what`` is among the bytes received."""
        return what in bytes(self.received)

    def read_until_got(self, what: bytes) -> bool:
        """Reads until ``what`` is among the bytes received; False if the connection ends
        first."""
        while not self.got(what):
            if not self._fill():
                return False
        return True

    def read_to_end(self) -> None:
        while self._fill():
            pass


Script = Callable[[OriginConn], None]


class RawOrigin:
    """A loopback origin that runs ``script`` on each connection it accepts (in a thread), then
    reads the connection to its end; it records what each connection received."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        #: Connections in the order accepted.
        self.conns: list[OriginConn] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        accept = threading.Thread(target=self._accept, name=f"raw-origin-{self.port}", daemon=True)
        self._threads.append(accept)
        accept.start()

    @property
    def host(self) -> str:
        """The Host that routes a request to this origin."""
        return f"o{self.port}.test"

    def conn(self, index: int) -> OriginConn:
        """Connection ``index``, once accepted."""
        wait_for(
            lambda: len(self.conns) > index,
            ORIGIN_WAIT,
            what=f"the proxy to open origin connection {index}",
        )
        return self.conns[index]

    def wait_closed(self, index: int) -> OriginConn:
        """Connection ``index``, once the proxy has closed it."""
        c = self.conn(index)
        wait_for(lambda: c.eof, ORIGIN_WAIT, what=f"the proxy to close origin connection {index}")
        return c

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            if self._stopping:
                sock.close()
                return
            c = OriginConn(sock, len(self.conns))
            self.conns.append(c)
            t = threading.Thread(
                target=self._run, args=(c,), daemon=True, name=f"raw-origin-{self.port}-{c.index}"
            )
            self._threads.append(t)
            t.start()

    def _run(self, c: OriginConn) -> None:
        try:
            self.script(c)
            c.read_to_end()
        finally:
            c.sock.close()

    def stop(self) -> None:
        """Closes the listener and every connection; joins the threads."""
        self._stopping = True
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        self.listener.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)


# -- fixtures -----------------------------------------------------------------------------


def start_master(fleet: Fleet, shared: bool) -> Master:
    config = config_for(
        app="rawroute:App",
        server={"workers": 1, "grace_period_seconds": 5},
        pool={"shared": shared},
    )
    return fleet.master(config, files={"rawroute.py": APP})


@pytest.fixture(scope="module")
def local_master(module_fleet: Fleet) -> Master:
    """A master whose worker keeps its idle upstream connections itself: a connection that
    goes back to the pool is the one the next request gets (tests that need reuse)."""
    return start_master(module_fleet, shared=False)


@pytest.fixture(scope="module")
def shared_master(module_fleet: Fleet) -> Master:
    """A master with the pool broker (the default): a connection may be given to the broker
    as soon as its exchange ends, and lent back for the next request."""
    return start_master(module_fleet, shared=True)


@pytest.fixture(params=["local", "shared"])
def master(request: pytest.FixtureRequest) -> Master:
    """Each master in turn, for tests whose outcome must not depend on the pool."""
    m: Master = request.getfixturevalue(f"{request.param}_master")
    return m


@pytest.fixture
def origin() -> Iterator[Callable[[Script], RawOrigin]]:
    """Starts a :class:`RawOrigin` for a script; stops them all after the test."""
    started: list[RawOrigin] = []

    def start(script: Script) -> RawOrigin:
        o = RawOrigin(script)
        started.append(o)
        return o

    yield start
    for o in started:
        o.stop()


def client(master: Master) -> HttpConn:
    return HttpConn(master.port, timeout=CLIENT_TIMEOUT)


def request(
    o: RawOrigin,
    target: str,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    version: str = "1.1",
) -> bytes:
    """A request's bytes, routed to ``o``."""
    return build_request(method, target, [("Host", o.host), *(headers or [])], body, version)


def names(resp: Response) -> set[str]:
    """The lower-cased field names of a response."""
    return {n.lower() for n, _ in resp.headers}


def assert_closes(conn: HttpConn) -> None:
    """The proxy closes the client connection, with nothing more sent."""
    assert conn.closed_by_peer(), f"the client connection stayed open ({bytes(conn.buf)!r})"


# -- 101 Switching Protocols ----------------------------------------------------------------

SWITCH_WEBSOCKET = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n"
)
UPGRADE_REQUEST = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]


def test_101_without_upgrade_request_is_502_and_no_tunnel(
    master: Master, origin: Callable[[Script], RawOrigin]
) -> None:
    """A 101 to a request that asked for no upgrade is invalid: the client gets 502 and its
    connection closes; the origin's connection is closed, and the client's next request never
    reaches the origin as raw bytes (before this check it did: the connection had become a
    tunnel)."""
    switched = threading.Event()

    def script(c: OriginConn) -> None:
        c.read_request()
        c.send(SWITCH_WEBSOCKET)
        switched.set()

    o = origin(script)
    with client(master) as conn:
        conn.send(request(o, "/one"))
        assert switched.wait(ORIGIN_WAIT)
        with contextlib.suppress(OSError):
            conn.send(request(o, "/two"))
        first = o.conn(0)
        wait_for(
            lambda: first.eof or first.got(b"/two"),
            ORIGIN_WAIT,
            what="the origin connection to close or to get the next request",
        )
        assert not first.got(b"/two"), "the next request went to the origin as raw bytes"
        resp = conn.read_response()
        assert resp.status == 502
        assert resp.header("connection") == "close"
        assert_closes(conn)
    o.wait_closed(0)
    assert len(o.conns) == 1 and not any(c.got(b"/two") for c in o.conns)


@pytest.mark.parametrize(
    "switch",
    [
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            id="other-protocol",
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket, h2c\r\n"
            b"Connection: Upgrade\r\n\r\n",
            id="one-more-protocol",
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
            id="no-upgrade-field",
        ),
    ],
)
def test_101_for_a_protocol_not_offered_is_502(
    master: Master, origin: Callable[[Script], RawOrigin], switch: bytes
) -> None:
    """A 101 whose Upgrade names a protocol the request's Upgrade did not offer, or names none
    (RFC 9110 7.8: "A server MUST NOT switch to a protocol that was not indicated by the
    client"), is invalid: 502, no 101 to the client, both connections closed, and the bytes
    the client sent after its upgrade request never reach the origin."""

    def script(c: OriginConn) -> None:
        c.read_request()
        c.send(switch)

    o = origin(script)
    with client(master) as conn:
        conn.send(request(o, "/ws", headers=UPGRADE_REQUEST) + b"EARLY-FRAME")
        status, _, headers = conn.read_head()
        assert status == 502, f"the client got {status} {headers}"
        assert ("Connection", "close") in headers
        length = int(dict((n.lower(), v) for n, v in headers)["content-length"])
        conn.read_exactly(length)
        assert_closes(conn)
    first = o.wait_closed(0)
    assert not first.got(b"EARLY-FRAME")


def test_101_for_the_offered_protocol_still_tunnels(
    master: Master, origin: Callable[[Script], RawOrigin]
) -> None:
    """The upgrade the client asked for (named in another case) still becomes a tunnel, with
    the bytes sent early passed on."""

    def script(c: OriginConn) -> None:
        c.read_request()
        c.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n"
        )
        if c.read_until_got(b"EARLY"):
            c.send(b"from-origin")

    o = origin(script)
    with client(master) as conn:
        conn.send(request(o, "/ws", headers=UPGRADE_REQUEST) + b"EARLY")
        status, _, headers = conn.read_head()
        assert status == 101
        assert conn.read_exactly(len(b"from-origin")) == b"from-origin"


# -- no body after 204, 304 and HEAD --------------------------------------------------------


def test_204_with_length_and_body_is_passed_without_them(
    master: Master, origin: Callable[[Script], RawOrigin]
) -> None:
    """A 204 that declares a Content-Length and sends a body reaches the client without the
    length and without the body (the client's next response is its own); the origin's
    connection is not used again."""

    def script(c: OriginConn) -> None:
        if c.index == 0:
            c.read_request()
            c.send(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello")
            return
        c.answer_each(ok(b"second"))

    o = origin(script)
    with client(master) as conn:
        conn.send(request(o, "/one"))
        head = conn.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 204 ")
        assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
        assert b"X-A: 1\r\n" in head
        conn.send(request(o, "/two"))
        second = conn.read_response()
        assert (second.status, second.body) == (200, b"second")
    o.wait_closed(0)
    assert len(o.conns[0].requests) == 1 and o.conns[1].got(b"GET /two ")


def test_204_with_length_whose_body_comes_later_is_not_reused(
    master: Master, origin: Callable[[Script], RawOrigin]
) -> None:
    """The body of a 204 that declared one may come in a later segment: the connection is
    closed at the 204 and the next request goes out on a fresh one (before, it got 502: the
    late body was read as the next request's response)."""

    def script(c: OriginConn) -> None:
        if c.index == 0:
            c.read_request()
            c.send(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
            if c.read_request() is not None:
                c.send(b"hello")
            return
        c.answer_each(ok(b"second"))

    o = origin(script)
    with client(master) as conn:
        conn.send(request(o, "/one"))
        first = conn.read_response()
        assert first.status == 204 and not first.has("content-length")
        conn.send(request(o, "/two"))
        second = conn.read_response()
        assert (second.status, second.body) == (200, b"second")
    assert len(o.wait_closed(0).requests) == 1


@pytest.mark.parametrize("framing", [b"Content-Length: 0\r\n", b""])
def test_204_without_body_keeps_the_connection(
    local_master: Master, origin: Callable[[Script], RawOrigin], framing: bytes
) -> None:
    """A 204 with ``Content-Length: 0`` (or none) is a clean response: the length is not
    passed on (RFC 9110 8.6: "A server MUST NOT send a Content-Length header field in any
    response with a status code of ... 204"), and the connection is reused."""
    o = origin(lambda c: c.answer_each(b"HTTP/1.1 204 No Content\r\n" + framing + b"\r\n"))
    with client(local_master) as conn:
        for target in ("/one", "/two"):
            conn.send(request(o, target))
            resp = conn.read_response()
            assert resp.status == 204 and not names(resp) & {"content-length", "transfer-encoding"}
    assert len(o.conns) == 1 and len(o.conns[0].requests) == 2


def test_204_chunked_is_passed_without_framing_or_body(
    master: Master, origin: Callable[[Script], RawOrigin]
) -> None:
    """A 204 with Transfer-Encoding and a chunked body: neither reaches the client, and the
    connection is not reused."""

    def script(c: OriginConn) -> None:
        if c.index == 0:
            c.read_request()
            c.send(
                b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n"
            )
            return
        c.answer_each(ok(b"second"))

    o = origin(script)
    with client(master) as conn:
        conn.send(request(o, "/one"))
        head = conn.read_until(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
        conn.send(request(o, "/two"))
        assert conn.read_response().body == b"second"
    assert len(o.wait_closed(0).requests) == 1


@pytest.mark.parametrize("method,status", [("HEAD", 200), ("GET", 304)])
def test_length_after_head_or_304_is_metadata_and_a_body_is_dropped(
    master: Master, origin: Callable[[Script], RawOrigin], method: str, status: int
) -> None:
    """A 304, and a response to HEAD, may carry Content-Length as what a 200 to GET would have
    (RFC 9110 8.6): the client gets it, but no body byte. When the origin sends body bytes
    anyway, its connection is closed (before, a HEAD response's body was dropped unseen and
    the connection reused)."""
    head = b'HTTP/1.1 %d X\r\nContent-Length: 5\r\nETag: "e"\r\n\r\n' % status

    def script(c: OriginConn) -> None:
        if c.index == 0:
            c.read_request()
            c.send(head + b"hello")
            return
        c.answer_each(ok(b"second"))

    o = origin(script)
    with client(master) as conn:
        conn.send(request(o, "/one", method))
        first = conn.read_response(method)
        assert first.status == status and first.header("content-length") == "5"
        conn.send(request(o, "/two"))
        second = conn.read_response()
        assert (second.status, second.body) == (200, b"second")
    assert len(o.wait_closed(0).requests) == 1


@pytest.mark.parametrize("method,status", [("HEAD", 200), ("GET", 304)])
def test_length_after_head_or_304_without_body_keeps_the_connection(
    local_master: Master, origin: Callable[[Script], RawOrigin], method: str, status: int
) -> None:
    """The same responses without body bytes: the connection is reused."""

    def script(c: OriginConn) -> None:
        while (req := c.read_request()) is not None:
            c.send(
                b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status
                if b" /one " in req
                else ok(b"second")
            )

    o = origin(script)
    with client(local_master) as conn:
        conn.send(request(o, "/one", method))
        assert conn.read_response(method).header("content-length") == "5"
        conn.send(request(o, "/two"))
        assert conn.read_response().body == b"second"
    assert len(o.conns) == 1 and len(o.conns[0].requests) == 2


def test_head_chunked_with_a_last_chunk_is_not_reused(
    master: Master, origin: Callable[[Script], RawOrigin]
) -> None:
    """A chunked response to HEAD followed by a last chunk (a body after all): the client
    gets the head only and the connection is closed."""

    def script(c: OriginConn) -> None:
        if c.index == 0:
            c.read_request()
            c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            return
        c.answer_each(ok(b"second"))

    o = origin(script)
    with client(master) as conn:
        conn.send(request(o, "/one", "HEAD"))
        assert conn.read_response("HEAD").status == 200
        conn.send(request(o, "/two"))
        assert conn.read_response().body == b"second"
    assert len(o.wait_closed(0).requests) == 1


# -- bytes after a complete response ----------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"JUNK", id="junk"),
        pytest.param(ok(b"extra"), id="a-second-response"),
        pytest.param(b"HTTP/1.1 2", id="part-of-a-status-line"),
    ],
)
def test_bytes_after_a_response_in_the_same_segment(
    master: Master, origin: Callable[[Script], RawOrigin], extra: bytes
) -> None:
    """Bytes right behind a complete response: the client gets the response; the connection
    is closed, not reused; the next request goes on a fresh connection. (Before, the
    connection went back to the pool while the read was still being parsed: a partial status
    line stayed in the parser, where the next response met it (502), and the pool broker got
    the connection with the bytes already consumed, and lent it again as if clean.)"""

    def script(c: OriginConn) -> None:
        if c.index == 0:
            c.read_request()
            c.send(ok(b"first") + extra)
            return
        c.answer_each(ok(b"second"))

    o = origin(script)
    with client(master) as conn:
        conn.send(request(o, "/one"))
        assert conn.read_response().body == b"first"
        conn.send(request(o, "/two"))
        assert conn.read_response().body == b"second"
    assert len(o.wait_closed(0).requests) == 1
    assert o.conns[1].got(b"GET /two ")


def test_leftover_bytes_before_the_next_response_retry_on_a_fresh_connection(
    local_master: Master, origin: Callable[[Script], RawOrigin]
) -> None:
    """The issue's case: the origin sends bytes after a complete response, but they arrive
    only once the proxy has sent the client's next request on the reused connection (a
    keep-alive client sends it right after the response). Those bytes are read as the next
    request's response: it got 502. They begin no response, so the request is treated as
    one whose reused connection died before answering: an idempotent request without a body
    goes out again on a fresh connection. (Scripted deterministically: the origin sends the
    bytes when the next request arrives.)"""

    def script(c: OriginConn) -> None:
        if c.index == 0:
            c.read_request()
            c.send(ok(b"first"))
            if c.read_request() is not None:
                c.send(b"hello")
            return
        c.answer_each(ok(b"second"))

    o = origin(script)
    with client(local_master) as conn:
        conn.send(request(o, "/one"))
        assert conn.read_response().body == b"first"
        conn.send(request(o, "/two"))
        second = conn.read_response()
        assert (second.status, second.body) == (200, b"second")
    first = o.wait_closed(0)
    assert [r.split(b" ")[1] for r in first.requests] == [b"/one", b"/two"]
    assert o.conns[1].got(b"GET /two ")


def test_leftover_bytes_before_a_post_response_are_502(
    local_master: Master, origin: Callable[[Script], RawOrigin]
) -> None:
    """The same for a POST with a body, which is never sent twice: 502, and the connection
    is closed."""

    def script(c: OriginConn) -> None:
        if c.index == 0:
            c.read_request()
            c.send(ok(b"first"))
            if c.read_request() is not None:
                c.send(b"hello")
            return
        c.answer_each(ok(b"second"))

    o = origin(script)
    with client(local_master) as conn:
        conn.send(request(o, "/one"))
        assert conn.read_response().body == b"first"
        conn.send(request(o, "/two", "POST", body=b"data"))
        assert conn.read_response().status == 502
    assert len(o.wait_closed(0).requests) == 2
    assert len(o.conns) == 1


# -- invalid responses: 502, never reused -----------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            id="two-content-lengths",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!", id="length-list"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="length-and-chunked",
        ),
        pytest.param(b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n", id="status-two-digits"),
        pytest.param(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", id="status-four-digits"),
        pytest.param(b"HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n", id="no-status"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n", id="bare-cr"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n", id="nul"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 0\r\n\r\n", id="ctl"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\nContent-Length: 0\r\n\r\n", id="del"),
    ],
)
def test_invalid_response_is_502_and_never_reused(
    master: Master, origin: Callable[[Script], RawOrigin], response: bytes
) -> None:
    """Each of these responses is invalid: the client gets 502 (its connection stays usable),
    the origin's connection is closed, and the next request goes on a fresh one."""

    def script(c: OriginConn) -> None:
        if c.index == 0:
            c.read_request()
            c.send(response)
            return
        c.answer_each(ok(b"second"))

    o = origin(script)
    with client(master) as conn:
        conn.send(request(o, "/one"))
        resp = conn.read_response()
        assert resp.status == 502 and b"invalid upstream response" in resp.body
        conn.send(request(o, "/two"))
        assert conn.read_response().body == b"second"
    assert len(o.wait_closed(0).requests) == 1
    assert o.conns[1].got(b"GET /two ")


# -- what the client gets of a valid response -------------------------------------------------


def test_headers_named_in_connection_are_not_passed_on(
    master: Master, origin: Callable[[Script], RawOrigin]
) -> None:
    """Fields the response's Connection names are hop-by-hop (RFC 9110 7.6.1), and so are
    Keep-Alive and Connection itself: the client gets none of them."""
    o = origin(
        lambda c: c.answer_each(
            b"HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive\r\nX-Secret: 1\r\n"
            b"Keep-Alive: timeout=5\r\nX-Public: 2\r\nContent-Length: 2\r\n\r\nok"
        )
    )
    with client(master) as conn:
        conn.send(request(o, "/"))
        resp = conn.read_response()
    assert resp.header("x-public") == "2"
    assert not names(resp) & {"x-secret", "keep-alive"}
    assert resp.header("connection") in (None, "keep-alive")


def test_interim_responses_are_not_sent_to_an_http10_client(
    master: Master, origin: Callable[[Script], RawOrigin]
) -> None:
    """An HTTP/1.0 client knows no 1xx (RFC 9110 15.2: "A server MUST NOT send a 1xx response
    to an HTTP/1.0 client"): the first bytes it gets are the final response."""
    o = origin(
        lambda c: c.answer_each(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            + ok(b"final")
        )
    )
    with client(master) as conn:
        conn.send(request(o, "/", version="1.0"))
        assert conn.read_until(b"\r\n").startswith(b"HTTP/1.1 200 ")
        rest = conn.read_until(b"\r\n\r\n")
        assert b"Link:" not in rest
        assert conn.read_exactly(5) == b"final"


def test_chunked_response_to_an_http10_client_is_close_delimited(
    master: Master, origin: Callable[[Script], RawOrigin]
) -> None:
    """An HTTP/1.0 client knows no chunked coding: it gets the body's bytes decoded, ended by
    the close of its connection."""
    o = origin(
        lambda c: c.answer_each(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
    )
    with client(master) as conn:
        conn.send(request(o, "/", version="1.0"))
        resp = conn.read_response()  # with neither length nor chunked: read to the close
        assert conn.eof
    assert resp.status == 200 and not resp.chunked
    assert not names(resp) & {"transfer-encoding", "content-length"}
    assert resp.body == b"hello world"
