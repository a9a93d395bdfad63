"""worker.accept_limit: a worker at ``server.max_connections`` stops accepting and resumes
below it, on a real uvloop loop and loopback sockets; a closed limit never accepts again; the
open-files limit is raised to fit."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from collections.abc import Callable, Iterator

import pytest
import uvloop

from worker import accept_limit
from worker.accept_limit import (
    AcceptLimit,
    AcceptState,
    CountedConnections,
    Listening,
    fit_open_files,
    resume_level,
)

#: How long the loop runs to show that something does not happen.
QUIET_SECONDS = 0.2


class Conn(asyncio.Protocol):
    """A server-side connection that counts itself from its accept on, as H1Server does."""

    def __init__(self, limit: AcceptLimit, made: list[Conn]) -> None:
        self.limit = limit
        self.transport: asyncio.BaseTransport | None = None
        limit.connections.add(self)
        made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.limit.connections.discard(self)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Rig:
    """A listening socket (the master's copy), a worker's limit on a dup of it, clients."""

    def __init__(self, limit: int) -> None:
        self.loop = uvloop.new_event_loop()
        self.master_sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = self.master_sock.getsockname()[1]
        self.made: list[Conn] = []
        self.records = Records()
        log = logging.getLogger(f"test-accept-limit-{id(self)}")
        log.handlers[:] = [self.records]
        log.setLevel(logging.INFO)
        log.propagate = False
        self.limit = AcceptLimit(
            self.loop,
            lambda: Conn(self.limit, self.made),
            [Listening(self.master_sock.dup(), 16)],
            limit,
            log,
        )
        self.clients: list[socket.socket] = []
        self.loop.run_until_complete(self.limit.open())

    def connect(self) -> socket.socket:
        """A client connection; the kernel completes it whether or not the worker accepts."""
        client = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.clients.append(client)
        return client

    def run_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        async def wait() -> None:
            deadline = self.loop.time() + timeout
            while not condition():
                assert self.loop.time() < deadline, "condition not met in time"
                await asyncio.sleep(0.005)

        self.loop.run_until_complete(wait())

    def run_for(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def close_conn(self, conn: Conn) -> None:
        assert conn.transport is not None
        conn.transport.close()

    def close(self) -> None:
        self.limit.close()
        for conn in self.made:
            if conn.transport is not None:
                conn.transport.close()
        for client in self.clients:
            client.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        self.master_sock.close()


@pytest.fixture
def rig_of() -> Iterator[Callable[[int], Rig]]:
    rigs: list[Rig] = []

    def make(limit: int) -> Rig:
        rigs.append(Rig(limit))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


def test_at_the_limit_accepting_pauses_and_a_close_resumes_it(rig_of: Callable[[int], Rig]) -> None:
    """Two connections fill a limit of 2: the worker closes its server, a third connection
    waits unaccepted; one closing brings the server back and the third is accepted."""
    rig = rig_of(2)
    rig.connect()
    rig.connect()
    rig.run_until(lambda: rig.limit.state is AcceptState.PAUSED)
    assert len(rig.made) == 2 and rig.limit.servers == [] and rig.limit.paused
    rig.connect()
    rig.run_for(QUIET_SECONDS)
    assert len(rig.made) == 2
    rig.close_conn(rig.made[0])
    rig.run_until(lambda: len(rig.made) == 3)
    # The third made two again: paused again.
    rig.run_until(lambda: rig.limit.state is AcceptState.PAUSED)
    assert rig.limit.pauses == 2
    rig.close_conn(rig.made[1])
    rig.run_until(lambda: rig.limit.state is AcceptState.ACCEPTING)
    assert not rig.limit.paused and len(rig.limit.servers) == 1
    assert rig.records.lines[0] == (
        "accepting paused: 2 connections open, "
        "server.max_connections is 2; new connections wait in the "
        "accept queue until 1"
    )
    assert rig.records.lines[1].startswith("accepting resumed: 1 connections open (paused for ")
    assert len(rig.records.lines) == 2  # the second pause, so soon, is only counted


def test_a_closed_limit_never_accepts_again_and_leaves_the_queue_to_the_socket(
    rig_of: Callable[[int], Rig],
) -> None:
    """Closing (a drain) while paused: connections closing later do not bring the server
    back; what waits in the accept queue is still there for the master's socket."""
    rig = rig_of(1)
    rig.connect()
    rig.run_until(lambda: rig.limit.state is AcceptState.PAUSED)
    waiting = rig.connect()
    rig.limit.close()
    assert rig.limit.state is AcceptState.CLOSED
    assert all(item.spare.fileno() == -1 for item in rig.limit.listening)
    rig.close_conn(rig.made[0])
    rig.run_for(QUIET_SECONDS)
    assert rig.limit.servers == [] and len(rig.made) == 1
    assert "accepting resumed" not in " ".join(rig.records.lines)
    rig.master_sock.settimeout(5)
    accepted, peer = rig.master_sock.accept()
    with accepted:
        assert peer == waiting.getsockname()


def test_closing_while_resuming_opens_nothing(rig_of: Callable[[int], Rig]) -> None:
    """A drain between the decision to resume and the servers being made: none is made."""
    rig = rig_of(1)
    rig.connect()
    rig.run_until(lambda: rig.limit.state is AcceptState.PAUSED)
    opened = rig.limit.open

    async def drained_first() -> None:
        assert rig.limit.state is AcceptState.OPENING
        rig.limit.close()
        await opened()

    rig.limit.open = drained_first  # type: ignore[method-assign]
    rig.close_conn(rig.made[0])
    rig.run_until(lambda: rig.limit.state is AcceptState.CLOSED)
    rig.connect()
    rig.run_for(QUIET_SECONDS)
    assert rig.limit.state is AcceptState.CLOSED
    assert rig.limit.servers == [] and len(rig.made) == 1


def test_no_limit_never_pauses(rig_of: Callable[[int], Rig]) -> None:
    rig = rig_of(0)
    for _ in range(5):
        rig.connect()
    rig.run_until(lambda: len(rig.made) == 5)
    rig.run_for(0.05)
    assert rig.limit.state is AcceptState.ACCEPTING and rig.limit.pauses == 0


def test_pauses_logged_once_per_interval_with_the_count_of_the_others(
    rig_of: Callable[[int], Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = rig_of(1)
    for _ in range(3):
        rig.connect()
        rig.run_until(lambda: rig.limit.state is AcceptState.PAUSED)
        rig.close_conn(rig.made[-1])
        rig.run_until(
            lambda: (
                rig.limit.state is AcceptState.ACCEPTING
                and not rig.limit.paused
                and len(rig.limit.connections) == 0
            )
        )
    assert rig.limit.pauses == 3
    assert [line.split(":")[0] for line in rig.records.lines] == [
        "accepting paused",
        "accepting resumed",
    ]
    monkeypatch.setattr(accept_limit, "LOG_INTERVAL_SECONDS", 0.0)
    rig.connect()
    rig.run_until(lambda: rig.limit.state is AcceptState.PAUSED)
    assert rig.records.lines[-1].endswith("(2 more pauses since the last one logged)")


def test_counted_connections_speak_only_at_the_limit_and_while_paused() -> None:
    calls: list[str] = []
    conns = CountedConnections(3, lambda: calls.append("full"), lambda: calls.append("room"))
    conns.add("a")
    conns.add("b")
    conns.discard("b")
    conns.add("b")
    assert calls == []
    conns.add("c")
    assert calls == ["full"]
    conns.paused = True
    conns.add("d")
    assert calls == ["full"]
    conns.discard("d")
    conns.discard("c")  # 2 left: the resume level of 3
    assert calls == ["full", "room"]
    conns.remove("b")
    assert calls == ["full", "room", "room"]


@pytest.mark.parametrize(("limit", "level"), [(1, 0), (3, 2), (20, 19), (100, 95), (10000, 9500)])
def test_resume_level(limit: int, level: int) -> None:
    assert resume_level(limit) == level


def test_open_files_raised_to_fit_up_to_the_hard_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"soft": 1024, "hard": 1 << 20}
    monkeypatch.setattr(resource, "getrlimit", lambda _: (limits["soft"], limits["hard"]))
    monkeypatch.setattr(
        resource, "setrlimit", lambda _, value: limits.update(soft=value[0], hard=value[1])
    )
    assert fit_open_files(10000, 128) is None
    assert limits == {"soft": 2 * 10000 + 128 + accept_limit.FD_MARGIN, "hard": 1 << 20}
    assert fit_open_files(0, 128) is None
    limits.update(soft=1024, hard=4096)
    warning = fit_open_files(10000, 128)
    assert limits["soft"] == 4096
    assert warning is not None and "hard limit of open files (ulimit -Hn) is 4096" in warning
