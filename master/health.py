"""Active health checks, once for the fleet: what is checked, how, and what a result changes.

Theory of operation. The master does not probe in its own loop: it runs one prober process
(``python -m master.prober``, :mod:`master.prober`) beside its workers and supervises it like
the demo origins. The prober runs an asyncio loop with one task per checked server, so a probe
that hangs (a server that accepts and never answers) waits on its own deadline while every
other server is probed on time, and the master's loop (signals, the control socket, the
workers' channels) never waits on a server at all. A separate process rather than
non-blocking sockets in the master's selector, because a check is a connect, maybe a TLS
handshake, maybe a name to resolve (``getaddrinfo`` blocks; discovery will add names), a write
and a read, each with a deadline; that is an event loop's job, and the master's loop ticks once a
second and must stay small. The cost is one process of a few MB that wakes once per probe.

The prober keeps nothing of its own: what a check found is in the health table
(:mod:`shared.shm.health`), whose active columns the prober alone writes. So it can be restarted
(it crashed, the table was rebuilt, a new master took over) and goes on from the table's state.

The master and the prober speak over two pipes: the master writes :class:`ProbePlan` frames on
the prober's stdin (at start and on each reload: the servers to check, by row), the prober writes
:class:`StateChanged` and :class:`PlanApplied` frames on its stdout. A frame is a 4-byte
big-endian length and a msgpack map ``{"t": NAME, ...}``, as on the workers' channels; unknown
fields and types are ignored.

A check (:func:`probe`): connect (TLS with SNI when the target says so), then with a ``path``
``GET path HTTP/1.1`` with ``Host`` and ``Connection: close``, and read the status line: 2xx and 3xx
pass, any other status is a failure that marks the server down at once (Envoy's rule), other
failures (refused, reset, timeout) count toward ``unhealthy_threshold``. Without a path the
connect is the check. The whole check has ``timeout_seconds``.

The rules (:func:`record`), on ``healthy_threshold`` and ``unhealthy_threshold`` consecutive
results: an UP or UNKNOWN server goes DOWN after ``unhealthy_threshold`` failures in a row (or one
bad status); a DOWN server goes UP after ``healthy_threshold`` passes in a row. An UNKNOWN server
(new, HAProxy's "up at start") that passes is UP with no message.

Scheduling (:class:`Prober`): every server is checked once at start, within the first
:data:`FIRST_SPREAD` of its interval and at most :data:`FIRST_SPREAD_MAX_SECONDS` (a random
offset, so a hundred servers are not probed in the same millisecond), then every
``interval_seconds`` counted from the last check's start, each period off by a random
:data:`JITTER` fraction either way (so servers checked in step drift apart, and the long-run
rate is still one per interval).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import ssl
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from shared.address import parse_address
from shared.config import Config
from shared.shm.health import Failure, HealthTable, State, describe

log = logging.getLogger("tenaya")

#: The first check of a server comes within this fraction of its interval after start...
FIRST_SPREAD = 0.5
#: ... and at most this many seconds after it.
FIRST_SPREAD_MAX_SECONDS = 1.0
#: Each period is ``interval * (1 ± JITTER)``, uniformly.
JITTER = 0.1
#: Longest status line read from a server; a longer one is a bad response.
MAX_STATUS_LINE = 1024
#: Largest frame on the master-prober pipes.
MAX_FRAME = 4 * 1024 * 1024

_LEN = struct.Struct(">I")


# -- what is checked --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """How one server is checked (``upstreams.<name>.health_check``)."""

    path: str | None = None
    """HTTP path to GET; None: a TCP connect check."""
    interval_seconds: float = 2.0
    """Time between two checks' starts."""
    timeout_seconds: float = 1.0
    """Longest a check may take (connect, handshake, request, status line)."""
    healthy_threshold: int = 2
    """Consecutive passes that bring a DOWN server UP."""
    unhealthy_threshold: int = 3
    """Consecutive failures that take an UP server DOWN."""


@dataclass(frozen=True, slots=True)
class Target:
    """One server to check, and the row its results go to."""

    row: int
    """The server's row in the health table."""
    upstream: str
    """The upstream's name (for messages)."""
    address: str
    """``HOST:PORT`` as in the config."""
    check: CheckSpec
    """How to check it."""
    tls: bool = False
    """Connect with TLS. The hook for upstream TLS settings: the config has none yet, so
    :func:`plan_from_config` leaves it False; set it (and the three below) from them."""
    sni: str = ""
    """TLS server name sent and verified; ``""``: the host."""
    verify: bool = True
    """Verify the certificate chain and its name (TLS only)."""
    ca_file: str | None = None
    """CA bundle for verification; None: the system store."""
    host_header: str = ""
    """``Host`` of the check request; ``""``: the address."""


@dataclass(frozen=True, slots=True)
class ProbePlan:
    """Master -> prober: every row of the current generation, and how to check it.

    A new plan replaces the last: a target that is the same as before keeps its schedule, a
    new or changed one is checked at once (within :data:`FIRST_SPREAD_MAX_SECONDS`), and a row in
    ``unchecked`` (kept by a server whose upstream no longer has a health check) is set back to
    UNKNOWN, so it cannot stay down with nothing to bring it up.
    """

    TYPE = "plan"
    generation: int = 0
    """The master's generation the plan is for (echoed in :class:`PlanApplied`)."""
    targets: tuple[Target, ...] = ()
    """The servers to check."""
    unchecked: tuple[int, ...] = ()
    """Rows of servers that are not checked."""


@dataclass(frozen=True, slots=True)
class StateChanged:
    """Prober -> master: a row's ``state`` changed; refresh its usable bytes."""

    TYPE = "changed"
    row: int = 0
    """The row."""
    state: int = 0
    """Its new :class:`~shared.shm.health.State`."""


@dataclass(frozen=True, slots=True)
class PlanApplied:
    """Prober -> master: the plan of ``generation`` is in force (the rows it dropped are no
    longer written)."""

    TYPE = "applied"
    generation: int = 0
    """The plan's generation."""


ProberMessage = ProbePlan | StateChanged | PlanApplied


def keys_from_config(config: Config) -> list[tuple[str, str]]:
    """Every server of ``config`` as (upstream, address), numbered across upstreams in config
    order, as the workers number them: what :meth:`HealthDirectory.publish
    <shared.shm.health.HealthDirectory.publish>` takes."""
    return [
        (name, str.__str__(server))
        for name, upstream in config.upstreams.items()
        for server in upstream.servers
    ]


def plan_from_config(
    config: Config, rows: Mapping[tuple[str, str], int], generation: int
) -> ProbePlan:
    """The plan for ``config``'s servers, whose rows ``rows`` gives by (upstream, address)
    (the master's :class:`~shared.shm.health.HealthDirectory`). Servers of an upstream with no
    ``health_check`` are ``unchecked``."""
    targets: list[Target] = []
    unchecked: list[int] = []
    for name, upstream in config.upstreams.items():
        hc = upstream.health_check
        for server in upstream.servers:
            address = str.__str__(server)
            row = rows[(name, address)]
            if hc is None:
                unchecked.append(row)
                continue
            spec = CheckSpec(
                hc.path,
                hc.interval_seconds,
                hc.timeout_seconds,
                hc.healthy_threshold,
                hc.unhealthy_threshold,
            )
            targets.append(Target(row, name, address, spec))
    return ProbePlan(generation, tuple(targets), tuple(unchecked))


# -- the codec --------------------------------------------------------------------------------


def encode(msg: ProberMessage) -> bytes:
    """One frame of ``msg``."""
    body: dict[str, Any]
    if isinstance(msg, ProbePlan):
        body = {
            "t": msg.TYPE,
            "generation": msg.generation,
            "unchecked": list(msg.unchecked),
            "targets": [_encode_target(t) for t in msg.targets],
        }
    elif isinstance(msg, StateChanged):
        body = {"t": msg.TYPE, "row": msg.row, "state": msg.state}
    else:
        body = {"t": msg.TYPE, "generation": msg.generation}
    raw = msgpack.packb(body)
    return _LEN.pack(len(raw)) + raw


def _encode_target(t: Target) -> dict[str, Any]:
    c = t.check
    return {
        "row": t.row,
        "upstream": t.upstream,
        "address": t.address,
        "path": c.path,
        "interval": c.interval_seconds,
        "timeout": c.timeout_seconds,
        "rise": c.healthy_threshold,
        "fall": c.unhealthy_threshold,
        "tls": t.tls,
        "sni": t.sni,
        "verify": t.verify,
        "ca_file": t.ca_file,
        "host": t.host_header,
    }


def _decode_target(d: dict[str, Any]) -> Target:
    spec = CheckSpec(d.get("path"), d["interval"], d["timeout"], d["rise"], d["fall"])
    return Target(
        d["row"],
        d["upstream"],
        d["address"],
        spec,
        tls=d.get("tls", False),
        sni=d.get("sni", ""),
        verify=d.get("verify", True),
        ca_file=d.get("ca_file"),
        host_header=d.get("host", ""),
    )


def decode(body: bytes) -> ProberMessage | None:
    """The message of one frame's body, or None for a type this code does not know. Raises
    ``ValueError`` for a malformed body."""
    try:
        d = msgpack.unpackb(body)
        kind = d.get("t")
        if kind == ProbePlan.TYPE:
            targets = tuple(_decode_target(t) for t in d.get("targets", ()))
            return ProbePlan(d.get("generation", 0), targets, tuple(d.get("unchecked", ())))
        if kind == StateChanged.TYPE:
            return StateChanged(d["row"], d["state"])
        if kind == PlanApplied.TYPE:
            return PlanApplied(d.get("generation", 0))
        return None
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as e:
        raise ValueError(f"bad prober frame: {e}") from e


class FrameReader:
    """Cuts a byte stream into frames: :meth:`feed` bytes as they come, get messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[ProberMessage]:
        """The messages completed by ``data``, in order. Raises ``ValueError`` on a corrupt
        stream."""
        self._buf += data
        out: list[ProberMessage] = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise ValueError(f"prober frame of {n} bytes")
            if len(self._buf) < _LEN.size + n:
                break
            body = bytes(self._buf[_LEN.size : _LEN.size + n])
            del self._buf[: _LEN.size + n]
            msg = decode(body)
            if msg is not None:
                out.append(msg)
        return out


# -- one check --------------------------------------------------------------------------------


#: The result of a TCP connect check that connected (not an HTTP status).
CONNECTED = 1


def passed(result: int) -> bool:
    """True for a result that passes: a 2xx or 3xx status, or :data:`CONNECTED`."""
    return result == CONNECTED or 200 <= result <= 399


def request_bytes(path: str, host: str) -> bytes:
    """The check's request: ``GET path HTTP/1.1`` with ``Host`` and ``Connection: close``."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tenaya-health-check\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")


def parse_status_line(line: bytes) -> int:
    """The status of an HTTP/1.x status line, or :attr:`Failure.BAD_RESPONSE`."""
    parts = line.split(None, 2)
    if (
        len(parts) >= 2
        and parts[0].startswith(b"HTTP/1.")
        and len(parts[1]) == 3
        and parts[1].isdigit()
    ):
        status = int(parts[1])
        return status if status >= 100 else Failure.BAD_RESPONSE
    return Failure.BAD_RESPONSE


def _client_context(target: Target) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=target.ca_file)
    if not target.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def probe(target: Target) -> int:
    """Checks ``target`` once within its ``timeout_seconds``: the HTTP status of the answer to
    the check request (an interim 1xx is skipped), :data:`CONNECTED` for a TCP check that
    connected, or a (negative) :class:`~shared.shm.health.Failure`. Never raises but for
    cancellation."""
    host, port = parse_address(target.address)
    try:
        async with asyncio.timeout(target.check.timeout_seconds):
            return await _probe(target, host, port)
    except TimeoutError:
        return Failure.TIMEOUT
    except ssl.SSLError:
        return Failure.TLS
    except ConnectionRefusedError:
        return Failure.REFUSED
    except ConnectionResetError:
        return Failure.RESET
    except socket.gaierror:
        return Failure.RESOLVE
    except OSError as e:
        # Connecting to several addresses of a name raises a plain OSError of them all.
        return Failure.REFUSED if e.errno == errno.ECONNREFUSED else Failure.ERROR


async def _probe(target: Target, host: str, port: int) -> int:
    ctx = _client_context(target) if target.tls else None
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ctx, server_hostname=(target.sni or host) if ctx else None
    )
    try:
        path = target.check.path
        if path is None:
            return CONNECTED
        writer.write(request_bytes(path, target.host_header or target.address))
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as e:
                return Failure.CLOSED if not e.partial else Failure.BAD_RESPONSE
            except asyncio.LimitOverrunError:
                return Failure.BAD_RESPONSE
            if len(line) > MAX_STATUS_LINE:
                return Failure.BAD_RESPONSE
            status = parse_status_line(line)
            if not 100 <= status <= 199:
                return status
            # An interim response: skip its (empty) header block, read the final status.
            while (await reader.readuntil(b"\n")).strip():
                pass
    finally:
        writer.transport.abort()


# -- what a result changes --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of a server's state that :func:`record` made."""

    row: int
    old: State
    new: State
    result: int
    """The result that decided it."""
    count: int
    """Consecutive results of its kind that led to it."""


def record(
    table: HealthTable, target: Target, result: int, latency_us: int, now_ns: int | None = None
) -> Transition | None:
    """Writes one check's ``result`` into ``target``'s row (the prober, its only writer) and
    applies the thresholds; returns the transition when the state changed, else None."""
    row, spec = target.row, target.check
    now_ns = time.time_ns() if now_ns is None else now_ns
    table.checks[row] += 1
    table.last_check_ns[row] = now_ns
    table.last_result[row] = result
    table.last_latency_us[row] = latency_us
    old = State(table.state[row])
    new: State
    if passed(result):
        table.falls[row] = 0
        rises = table.rises[row] = table.rises[row] + 1
        new = State.UP if old is not State.DOWN or rises >= spec.healthy_threshold else old
        count = rises
    else:
        table.rises[row] = 0
        falls = table.falls[row] = table.falls[row] + 1
        bad_status = result > 0
        new = State.DOWN if bad_status or falls >= spec.unhealthy_threshold else old
        count = falls
    if new is old:
        return None
    table.state[row] = new
    table.since_ns[row] = now_ns
    if old is State.UNKNOWN and new is State.UP:
        return None  # the first check agreed with the start: nothing changes for anyone
    return Transition(row, old, new, result, count)


def reset(table: HealthTable, row: int) -> bool:
    """Sets an unchecked row back to UNKNOWN with no counts; True when it was DOWN (its
    usable bytes must be refreshed)."""
    was_down = table.state[row] == State.DOWN
    if table.state[row] != State.UNKNOWN:
        table.state[row] = State.UNKNOWN
        table.since_ns[row] = time.time_ns()
    table.rises[row] = table.falls[row] = 0
    return was_down


def message(target: Target, t: Transition) -> str:
    """The log line of a transition: ``server 127.0.0.1:9001 of upstream origin is DOWN:
    connect refused (3 checks)``."""
    what = describe(t.result) if t.result != CONNECTED else "connected"
    checks = "check" if t.count == 1 else "checks"
    return (
        f"server {target.address} of upstream {target.upstream} is {t.new.name}: "
        f"{what} ({t.count} {checks})"
    )


# -- the scheduler ----------------------------------------------------------------------------


ProbeFn = Callable[[Target], Any]
"""An ``async`` function checking a target (:func:`probe`; tests pass their own)."""


@dataclass
class Prober:
    """Checks every target of the current plan on its own schedule, on the running asyncio
    loop, and writes the results to ``table`` (attached with
    :meth:`~shared.shm.health.HealthTable.attach_prober`).

    ``on_change(row, state)`` runs after each change of a row's state (the prober process sends
    :class:`StateChanged`). Call :meth:`apply` with each plan, :meth:`close` at the end.
    """

    table: HealthTable
    on_change: Callable[[int, State], None] = lambda row, state: None
    probe_fn: ProbeFn = probe
    rng: random.Random = field(default_factory=random.Random)
    _tasks: dict[int, tuple[Target, asyncio.Task[None]]] = field(default_factory=dict)

    def apply(self, plan: ProbePlan) -> None:
        """Puts ``plan`` in force: stops checking rows it does not check, resets its unchecked
        rows, starts checking its new or changed targets (an unchanged one keeps its
        schedule). Runs on the loop."""
        wanted = {t.row: t for t in plan.targets}
        for row, (target, task) in list(self._tasks.items()):
            if wanted.get(row) != target:
                task.cancel()
                del self._tasks[row]
        for row in plan.unchecked:
            if row not in wanted and reset(self.table, row):
                self.on_change(row, State.UNKNOWN)
        for row, target in wanted.items():
            if row not in self._tasks:
                task = asyncio.get_running_loop().create_task(self._run(target))
                self._tasks[row] = (target, task)

    @property
    def targets(self) -> list[Target]:
        """The targets being checked."""
        return [t for t, _ in self._tasks.values()]

    async def _run(self, target: Target) -> None:
        """One target's schedule: a first check within :data:`FIRST_SPREAD` of the interval
        (at most :data:`FIRST_SPREAD_MAX_SECONDS`),
        then one per interval (± :data:`JITTER`) from the last check's start; a check that
        overran its period is followed at once by the next."""
        loop = asyncio.get_running_loop()
        interval = target.check.interval_seconds
        spread = min(FIRST_SPREAD * interval, FIRST_SPREAD_MAX_SECONDS)
        due = loop.time() + self.rng.uniform(0, spread)
        while True:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            started = loop.time()
            result = await self.probe_fn(target)
            latency_us = int((loop.time() - started) * 1e6)
            transition = record(self.table, target, result, latency_us)
            if transition is not None:
                level = logging.WARNING if transition.new is State.DOWN else logging.INFO
                log.log(level, "%s", message(target, transition))
                self.on_change(target.row, transition.new)
            due += interval * (1 + self.rng.uniform(-JITTER, JITTER))
            due = max(due, loop.time())

    async def close(self) -> None:
        """Stops every check and waits for them to end."""
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
