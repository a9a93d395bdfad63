"""gRPC through the real master and workers: grpcio clients on the proxy's listeners (h2c prior
knowledge on the plaintext one, TLS with ALPN h2 on the other, verified against a trustme CA),
the built-in load balancer in front of two grpcio servers with ``http2: true``.

The services handle raw bytes (no protobuf, no serializers): unary, server streaming, client
streaming and bidirectional calls; an error with details and trailing metadata sent as a
"trailers-only" response; a call that outlives its deadline; 3 MB messages; 200 calls at once.
What is proved: messages, status codes, details and trailing metadata (HTTP/2 trailers) pass
through both ways, a bidirectional stream is relayed message by message (not buffered to the
end), an expired call ends at the server too, and calls spread over both servers.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import psutil
import pytest
import trustme

from tests.support.config import config_for
from tests.support.master import Master
from tests.support.resources import free_port
from tests.support.waits import wait_for

if TYPE_CHECKING:
    from tests.conftest import Fleet

SERVICE = "t.Svc"
CALL_SECONDS = 20.0
LARGE = 3 * 1024 * 1024
#: No proxy from the environment between the client and Tenaya.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


# -- the gRPC origin -----------------------------------------------------------------------------


@dataclass
class GrpcOrigin:
    """A grpcio server on 127.0.0.1 with the test service; counts what it served."""

    name: str
    server: grpc.Server | None = None
    port: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    metadata: list[dict[str, str]] = field(default_factory=list)
    #: Set when a ``Slow`` call saw its RPC end (deadline or cancellation) at the server.
    slow_ended: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> GrpcOrigin:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32),
            options=[
                ("grpc.max_receive_message_length", 8 << 20),
                ("grpc.max_send_message_length", 8 << 20),
            ],
        )
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Large": grpc.unary_unary_rpc_method_handler(self.large),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.stop(None)
            self.server = None

    def _count(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[method] += 1
            self.metadata.append(
                {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
            )

    # -- handlers (on the server's threads) ---------------------------------------------------

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Unary", context)
        context.set_trailing_metadata((("x-served-by", self.name),))
        return b"echo:" + request

    def large(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Large", context)
        return request[::-1]

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Fail", context)
        context.set_trailing_metadata((("x-reason", "policy"),))
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"no entry for {request.decode()}")
        raise AssertionError("abort returned")  # pragma: no cover

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Slow", context)
        deadline = time.monotonic() + CALL_SECONDS
        while context.is_active() and time.monotonic() < deadline:
            if self.release.wait(0.02):
                return b"released"
        if not context.is_active():
            self.slow_ended.set()
        return b"too late"

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("ServerStream", context)
        for i in range(int(request)):
            yield b"item-%d" % i
        context.set_trailing_metadata((("x-items", request.decode()),))

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._count("ClientStream", context)
        h = hashlib.sha256()
        count = size = 0
        for message in requests:
            count += 1
            size += len(message)
            h.update(message)
        return b"%d %d %s" % (count, size, h.hexdigest().encode())

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("Bidi", context)
        for message in requests:
            yield b"pong:" + message


# -- the stack -------------------------------------------------------------------------------


@dataclass
class Stack:
    origins: list[GrpcOrigin]
    master: Master
    ca_pem: bytes

    def channel(self, kind: str) -> grpc.Channel:
        opts = [
            *CHANNEL_OPTIONS,
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20),
        ]
        if kind == "tls":
            creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
            # The certificate names 127.0.0.1 too: verified by IP address.
            return grpc.secure_channel(
                f"127.0.0.1:{self.master.listeners[1][1]}", creds, options=opts
            )
        return grpc.insecure_channel(f"127.0.0.1:{self.master.listeners[0][1]}", options=opts)

    def calls(self, method: str) -> int:
        return sum(o.calls[method] for o in self.origins)


@pytest.fixture(scope="module")
def grpc_origins() -> Iterator[list[GrpcOrigin]]:
    origins: list[GrpcOrigin] = []
    try:
        for name in ("g1", "g2"):
            origins.append(GrpcOrigin(name).start())
        yield origins
    finally:
        for o in origins:
            o.stop()


@pytest.fixture(scope="module")
def stack(
    module_fleet: Fleet, grpc_origins: list[GrpcOrigin], tmp_path_factory: pytest.TempPathFactory
) -> Stack:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    files = {
        "server.pem": "".join(b.bytes().decode() for b in leaf.cert_chain_pems),
        "server.key": leaf.private_key_pem.bytes().decode(),
    }
    config = config_for(
        {"grpc": [o.address for o in grpc_origins]},
        listeners=[
            {"address": "127.0.0.1:0"},
            {
                "address": f"127.0.0.1:{free_port()}",
                "tls": {"cert": "server.pem", "key": "server.key"},
            },
        ],
    )
    config["upstreams"]["grpc"]["http2"] = True
    master = module_fleet.master(config, files=files)
    assert [scheme for scheme, _ in master.listeners] == ["http", "https"]
    return Stack(grpc_origins, master, ca.cert_pem.bytes())


@pytest.fixture(params=["h2c", "tls"])
def channel(request: pytest.FixtureRequest, stack: Stack) -> Iterator[grpc.Channel]:
    """A channel to the proxy: plaintext (h2c prior knowledge) or TLS (verified, ALPN h2)."""
    with stack.channel(request.param) as ch:
        grpc.channel_ready_future(ch).result(timeout=CALL_SECONDS)
        yield ch


def method(ch: grpc.Channel, kind: str, name: str) -> Any:
    """The multi-callable of ``/t.Svc/NAME`` (``kind``: uu, us, su or ss), raw bytes."""
    factory = {
        "uu": ch.unary_unary,
        "us": ch.unary_stream,
        "su": ch.stream_unary,
        "ss": ch.stream_stream,
    }[kind]
    return factory(f"/{SERVICE}/{name}")


# -- tests ---------------------------------------------------------------------------------


def test_unary(channel: grpc.Channel, stack: Stack) -> None:
    """A unary call through the proxy gets its answer, status OK and the server's trailing
    metadata; the request's metadata reaches the server."""
    call = method(channel, "uu", "Unary")
    response, info = call.with_call(
        b"hello", timeout=CALL_SECONDS, metadata=(("x-client", "tenaya-test"),)
    )
    assert response == b"echo:hello"
    assert info.code() == grpc.StatusCode.OK
    trailing = dict(info.trailing_metadata())
    assert trailing["x-served-by"] in {o.name for o in stack.origins}
    assert any(m.get("x-client") == "tenaya-test" for o in stack.origins for m in o.metadata)
    wait_for(
        lambda: f"/{SERVICE}/Unary" in stack.master.read_access_log(),
        what="the call in the proxy's access log",
    )


def test_server_streaming(channel: grpc.Channel) -> None:
    """A server-streaming call gets every message in order, then OK with trailing
    metadata."""
    call = method(channel, "us", "ServerStream")(b"50", timeout=CALL_SECONDS)
    assert list(call) == [b"item-%d" % i for i in range(50)]
    assert call.code() == grpc.StatusCode.OK
    assert dict(call.trailing_metadata())["x-items"] == "50"


def test_client_streaming(channel: grpc.Channel) -> None:
    """A client-streaming call delivers every message of the stream to the server."""
    messages = [bytes([i]) * (i * 1000 + 1) for i in range(40)]
    h = hashlib.sha256(b"".join(messages)).hexdigest()
    response = method(channel, "su", "ClientStream")(iter(messages), timeout=CALL_SECONDS)
    assert response == b"%d %d %s" % (len(messages), sum(map(len, messages)), h.encode())


def test_bidirectional_ping_pong(channel: grpc.Channel) -> None:
    """A bidirectional call is relayed message by message: each request is sent only after the
    previous answer came back through the proxy."""
    outbox: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        for _ in range(20):
            message = outbox.get(timeout=CALL_SECONDS)
            if message is None:
                return
            yield message

    call = method(channel, "ss", "Bidi")(requests(), timeout=CALL_SECONDS)
    try:
        for i in range(10):
            outbox.put(b"ping-%d" % i)
            assert next(call) == b"pong:ping-%d" % i
    finally:
        outbox.put(None)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK


def test_error_status_with_details(channel: grpc.Channel) -> None:
    """A trailers-only error response keeps its status code, details and trailing metadata."""
    with pytest.raises(grpc.RpcError) as raised:
        method(channel, "uu", "Fail")(b"mallory", timeout=CALL_SECONDS)
    e: Any = raised.value
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert e.details() == "no entry for mallory"
    assert dict(e.trailing_metadata())["x-reason"] == "policy"


def test_deadline_exceeded(channel: grpc.Channel, stack: Stack) -> None:
    """A call that outlives its deadline ends with DEADLINE_EXCEEDED, and the server sees the
    call end too (the deadline travelled through, or the reset did)."""
    for o in stack.origins:
        o.slow_ended.clear()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        method(channel, "uu", "Slow")(b"", timeout=0.5)
    e: Any = raised.value
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    wait_for(
        lambda: any(o.slow_ended.is_set() for o in stack.origins),
        timeout=10,
        what="the server to see the call end",
    )


def test_large_messages(channel: grpc.Channel) -> None:
    """A 3 MB request and a 3 MB response cross the proxy intact."""
    payload = hashlib.sha256(b"seed").digest() * (LARGE // 32)
    response = method(channel, "uu", "Large")(payload, timeout=CALL_SECONDS)
    assert len(response) == LARGE
    assert response == payload[::-1]


def test_many_concurrent_calls(channel: grpc.Channel, stack: Stack) -> None:
    """200 concurrent unary calls on one channel all succeed, spread over both servers by the
    load balancer."""
    before = {o.name: o.calls["Unary"] for o in stack.origins}
    call = method(channel, "uu", "Unary")
    pending = [call.future(b"n%d" % i, timeout=CALL_SECONDS) for i in range(200)]
    assert [f.result() for f in pending] == [b"echo:n%d" % i for i in range(200)]
    served = {o.name: o.calls["Unary"] - before[o.name] for o in stack.origins}
    assert sum(served.values()) == 200
    assert all(served.values()), served


def test_upstream_http2_multiplexes_one_connection_per_origin_per_worker(
    channel: grpc.Channel, stack: Stack
) -> None:
    """After 200 concurrent calls, each worker holds at most one upstream connection to each
    gRPC server: the calls were multiplexed, not spread over new connections."""
    call = method(channel, "uu", "Unary")
    pending = [call.future(b"m%d" % i, timeout=CALL_SECONDS) for i in range(200)]
    assert all(f.result() == b"echo:m%d" % i for i, f in enumerate(pending))
    ports = {o.port for o in stack.origins}
    workers = stack.master.workers()
    assert workers
    for w in workers:
        conns = [
            c
            for c in w.net_connections("tcp")
            if c.raddr and c.raddr.port in ports and c.status == psutil.CONN_ESTABLISHED
        ]
        per_origin = {port: sum(1 for c in conns if c.raddr.port == port) for port in ports}
        assert all(n <= 1 for n in per_origin.values()), (w.pid, per_origin)


def test_streams_in_parallel_on_one_channel(stack: Stack) -> None:
    """Server streams, client streams and unary calls run at the same time on one plaintext
    channel, each with its own complete answer."""
    with stack.channel("h2c") as ch:
        grpc.channel_ready_future(ch).result(timeout=CALL_SECONDS)
        ss = [
            method(ch, "us", "ServerStream")(b"%d" % (10 + i), timeout=CALL_SECONDS)
            for i in range(10)
        ]
        cs = [
            method(ch, "su", "ClientStream").future(iter([b"x" * i] * 5), timeout=CALL_SECONDS)
            for i in range(1, 11)
        ]
        uu = [method(ch, "uu", "Unary").future(b"%d" % i, timeout=CALL_SECONDS) for i in range(20)]
        for i, call in enumerate(ss):
            assert list(call) == [b"item-%d" % j for j in range(10 + i)]
        for i, fut in enumerate(cs, start=1):
            count, size, _ = fut.result().split(b" ")
            assert (int(count), int(size)) == (5, 5 * i)
        assert [f.result() for f in uu] == [b"echo:%d" % i for i in range(20)]
