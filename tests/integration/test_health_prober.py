"""The health prober as its own process (``python -m master.prober``) against real loopback
origins, with the test in the master's part: it creates the health table, publishes a vector,
sends the plan, reads the prober's events and refreshes the usable bytes, as the master does.

Origins here are small threaded servers that can stop listening and listen again on the same
port, answer a chosen status, or accept and never answer; each records when it was probed.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from master.health import CheckSpec, PlanApplied, ProbePlan, StateChanged, Target
from master.prober import ProberProcess
from shared.shm.health import Failure, HealthDirectory, HealthTable, State
from tests.support.origin import Origin
from tests.support.waits import wait_for


class _Origin:
    """A loopback origin for checks: answers ``status`` to any request, or with ``hang`` reads
    the request and never answers; :meth:`stop_listening` closes the listener (connects are
    refused) and :meth:`listen` opens it again on the same port. ``probes`` holds the
    monotonic time of each connection (TCP) or request (HTTP) received."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.hang = False
        self.probes: list[float] = []
        self.port = 0
        self._listener: socket.socket | None = None
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listen()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
        self._thread.start()

    def stop_listening(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for s in self._held:
            s.close()
        self._held.clear()

    def _serve(self, listener: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        buffers: dict[socket.socket, bytes] = {}
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.02):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is listener:
                        conn, _ = listener.accept()
                        self.probes.append(time.monotonic())
                        buffers[conn] = b""
                        sel.register(conn, selectors.EVENT_READ)
                        continue
                    data = sock.recv(4096)
                    if not data:
                        sel.unregister(sock)
                        buffers.pop(sock, None)
                        sock.close()
                        continue
                    buffers[sock] += data
                    if b"\r\n\r\n" not in buffers[sock]:
                        continue
                    sel.unregister(sock)
                    del buffers[sock]
                    if self.hang:
                        self._held.append(sock)
                        continue
                    sock.sendall(
                        b"HTTP/1.1 %d Check\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        % self.status
                    )
                    sock.close()
        finally:
            for sock in buffers:
                sock.close()
            sel.close()


class _Master:
    """The master's part: the table, the directory, the prober process, its events."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.table = HealthTable.create(16)
        self.directory = HealthDirectory(self.table)
        self.prober = ProberProcess.start(self.table.fd, error_log=str(log_path), level="info")
        self.changes: list[StateChanged] = []
        self.applied: list[int] = []
        self.layout = -1

    def plan(self, origins: list[_Origin], spec: CheckSpec, generation: int = 1) -> list[int]:
        keys = [("origin", o.address) for o in origins]
        self.layout = self.directory.publish(keys)
        rows = [self.directory.rows[k] for k in keys]
        targets = tuple(
            Target(row, "origin", o.address, spec) for row, o in zip(rows, origins, strict=True)
        )
        self.prober.send(ProbePlan(generation, targets))
        return rows

    def poll(self) -> None:
        """One turn of the master's loop: the events, then the usable bytes of changed rows."""
        events = self.prober.read_events()
        for msg in events or ():
            if isinstance(msg, StateChanged):
                self.changes.append(msg)
                self.directory.refresh([msg.row])
            elif isinstance(msg, PlanApplied):
                self.applied.append(msg.generation)

    def applied_plans(self) -> list[int]:
        self.poll()
        return self.applied

    def usable(self, position: int) -> int:
        self.poll()
        return self.table.usable(self.layout)[position]

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def close(self) -> int:
        code = self.prober.stop()
        self.table.close()
        return code


@pytest.fixture
def master(tmp_path: Path) -> Iterator[_Master]:
    m = _Master(tmp_path / "prober.log")
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def origins() -> Iterator[list[_Origin]]:
    made: list[_Origin] = []
    yield made
    for o in made:
        o.stop_listening()


def _origin(origins: list[_Origin], status: int = 200) -> _Origin:
    o = _Origin(status)
    origins.append(o)
    return o


def _state(master: _Master, row: int, state: State) -> bool:
    master.poll()
    return master.table.state[row] == state


def test_a_server_that_answers_stays_up_at_the_configured_rate(
    master: _Master, origins: list[_Origin]
) -> None:
    """A 200 keeps the server up and usable; the first check comes at start, and probes come
    once per interval (the mean period over ten probes within 15% of it)."""
    origin = _origin(origins)
    interval = 0.2
    started = time.monotonic()
    (row,) = master.plan([origin], CheckSpec("/healthz", interval, 0.1, 2, 3))
    wait_for(lambda: master.applied_plans() == [1], what="the plan applied")
    wait_for(lambda: len(origin.probes) >= 11, timeout=10, what="eleven probes")
    first = origin.probes[0] - started
    assert first < 0.5 * interval + 0.3, first  # the spread, and the prober's start
    period = (origin.probes[10] - origin.probes[0]) / 10
    assert abs(period - interval) < 0.15 * interval, period
    assert master.table.state[row] == State.UP
    assert master.table.last_result[row] == 200
    assert master.table.checks[row] >= 10
    assert master.usable(0) == 1
    assert master.changes == []  # UNKNOWN -> UP is no change for anyone


def test_a_stopped_server_goes_down_then_comes_back(
    master: _Master, origins: list[_Origin]
) -> None:
    """Connects refused: DOWN after unhealthy_threshold checks, usable 0 once the master
    refreshes; listening again: UP after healthy_threshold checks, usable 1. The log says so."""
    origin = _origin(origins)
    other = _origin(origins)
    row, other_row = master.plan([origin, other], CheckSpec("/healthz", 0.1, 0.08, 2, 3))
    wait_for(lambda: _state(master, row, State.UP), what="the first check")
    origin.stop_listening()
    wait_for(lambda: _state(master, row, State.DOWN), timeout=5, what="DOWN")
    assert master.table.last_result[row] == Failure.REFUSED
    assert master.usable(0) == 0 and master.usable(1) == 1
    wait_for(
        lambda: (
            f"server {origin.address} of upstream origin is DOWN: connect refused (3 checks)"
            in master.log()
        ),
        what="the DOWN line",
    )
    origin.listen()
    wait_for(lambda: _state(master, row, State.UP), timeout=5, what="UP again")
    assert master.usable(0) == 1
    wait_for(
        lambda: (
            f"server {origin.address} of upstream origin is UP: status 200 (2 checks)"
            in master.log()
        ),
        what="the UP line",
    )
    assert [c.state for c in master.changes if c.row == row] == [State.DOWN, State.UP]
    assert master.table.state[other_row] == State.UP


def test_a_hang_is_a_timeout_and_delays_no_one(master: _Master, origins: list[_Origin]) -> None:
    """A server that accepts and never answers fails each check at timeout_seconds and goes
    DOWN; meanwhile another server is probed on time."""
    hung = _origin(origins)
    hung.hang = True
    fine = _origin(origins)
    interval = 0.1
    row, fine_row = master.plan([hung, fine], CheckSpec("/healthz", interval, 0.09, 2, 2))
    wait_for(lambda: _state(master, row, State.DOWN), timeout=5, what="the hung server DOWN")
    assert master.table.last_result[row] == Failure.TIMEOUT
    latency = master.table.last_latency_us[row] / 1e6
    assert 0.08 <= latency < 0.2, latency
    n = len(fine.probes)
    wait_for(lambda: len(fine.probes) >= n + 8, timeout=5, what="more probes of the other")
    gaps = [b - a for a, b in zip(fine.probes, fine.probes[1:], strict=False)]
    assert max(gaps) < interval * 1.1 + 0.05, gaps
    assert master.table.state[fine_row] == State.UP
    assert len(hung.probes) >= 2


def test_a_500_is_down_at_once(master: _Master, origins: list[_Origin]) -> None:
    """A status outside 2xx/3xx is DOWN on the first check, unhealthy_threshold or not."""
    origin = _origin(origins, status=500)
    (row,) = master.plan([origin], CheckSpec("/healthz", 0.5, 0.2, 2, 5))
    wait_for(lambda: _state(master, row, State.DOWN), timeout=5, what="DOWN")
    assert master.table.last_result[row] == 500
    wait_for(lambda: "is DOWN: status 500 (1 check)" in master.log(), what="the DOWN line")
    origin.status = 204
    wait_for(lambda: _state(master, row, State.UP), timeout=5, what="UP after two 204s")


def test_tcp_check_without_a_path(master: _Master, origins: list[_Origin]) -> None:
    """No path: the connect is the check (the origin sees connections, no request)."""
    origin = _origin(origins)
    (row,) = master.plan([origin], CheckSpec(None, 0.1, 0.08, 2, 2))
    wait_for(lambda: len(origin.probes) >= 3, what="connects")
    assert master.table.state[row] == State.UP and master.table.last_result[row] == 1
    origin.stop_listening()
    wait_for(lambda: _state(master, row, State.DOWN), timeout=5, what="DOWN")


def test_a_new_plan_and_the_prober_s_exits(master: _Master, origins: list[_Origin]) -> None:
    """A reload's plan is applied (echoed), a dropped server is no longer probed; SIGTERM
    stops the prober with 0; a prober whose stdin ends (its master gone) exits by itself."""
    a, b = _origin(origins), _origin(origins)
    master.plan([a, b], CheckSpec("/", 0.1, 0.08, 2, 2), generation=1)
    wait_for(lambda: a.probes and b.probes, what="both probed")
    master.plan([a], CheckSpec("/", 0.1, 0.08, 2, 2), generation=2)
    wait_for(lambda: master.applied_plans() == [1, 2], what="the second plan applied")
    n, na = len(b.probes), len(a.probes)
    wait_for(lambda: len(a.probes) > na + 5, what="more probes of the kept server")
    assert len(b.probes) <= n + 1  # at most one probe that was already under way
    assert master.close() == 0

    table = HealthTable.create(4)
    try:
        orphan = ProberProcess.start(table.fd)
        assert orphan.popen.stdin is not None
        orphan.popen.stdin.close()
        assert orphan.popen.wait(10) == 0
        orphan.stop()
    finally:
        table.close()
    # The fixture closes the master again: stopping a stopped prober is harmless.


def test_tls_check_with_sni(master: _Master, tmp_path: Path) -> None:
    """A TLS target: the handshake sends the SNI and verifies the certificate against the CA
    file, the request carries Host; a CA that did not sign it is a TLS failure."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("origin.test").configure_cert(server_ctx)
    origin = Origin(tls=server_ctx).start()
    try:
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        other_ca = tmp_path / "other.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        keys = [("secure", origin.address)]
        master.layout = master.directory.publish(keys)
        row = master.directory.rows[keys[0]]
        spec = CheckSpec("/status/204", 0.1, 0.5, 2, 1)
        good = Target(
            row,
            "secure",
            origin.address,
            spec,
            tls=True,
            sni="origin.test",
            ca_file=str(ca_file),
            host_header="origin.test",
        )
        master.prober.send(ProbePlan(1, (good,)))
        wait_for(lambda: master.table.last_result[row] == 204, timeout=5, what="a 204 over TLS")
        assert master.table.state[row] == State.UP
        assert origin.requests[0].header("host") == "origin.test"
        bad = Target(
            row,
            "secure",
            origin.address,
            spec,
            tls=True,
            sni="origin.test",
            ca_file=str(other_ca),
        )
        master.prober.send(ProbePlan(2, (bad,)))
        wait_for(lambda: _state(master, row, State.DOWN), timeout=5, what="DOWN")
        assert master.table.last_result[row] == Failure.TLS
    finally:
        origin.stop()
