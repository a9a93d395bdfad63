"""The prober process (``python -m master.prober TABLE_FD``) and the master's handle on it.

The process: attaches the health table from the inherited ``TABLE_FD``
(:meth:`~shared.shm.health.HealthTable.attach_prober`: only the active columns writable), reads
:class:`~master.health.ProbePlan` frames on stdin and applies each, runs the checks
(:class:`~master.health.Prober`) on a uvloop loop, and writes
:class:`~master.health.StateChanged` and :class:`~master.health.PlanApplied` frames on stdout.
It logs its state changes on ``--error-log`` (``stderr`` by default; a file is reopened on
SIGUSR1, like the workers'). It exits 0 on SIGTERM or SIGINT, and when its stdin ends (the
master is gone: a prober never outlives the master that feeds it).

The master's side, :class:`ProberProcess`: starts the process with the table's descriptor,
sends plans without ever blocking (a plan that does not fit the pipe waits in a buffer, sent
as the pipe drains, see :meth:`ProberProcess.flush`), reads the events from a non-blocking
pipe registered with the master's selector (:meth:`ProberProcess.read_events`), and stops the
process.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from master.health import (
    FrameReader,
    PlanApplied,
    ProbePlan,
    Prober,
    ProberMessage,
    StateChanged,
    encode,
)
from shared.paths import child_env, python_command
from shared.shm.health import HealthTable, State

log = logging.getLogger("tenaya")

#: How long the prober gets to exit after SIGTERM before SIGKILL.
STOP_SECONDS = 5.0
#: Bytes read from the events pipe at a time.
READ_SIZE = 65536


# -- the master's side ------------------------------------------------------------------------


class ProberProcess:
    """The prober, as the master runs it: ``ProberProcess.start(table_fd)``, then
    :meth:`send` plans, register :attr:`events_fd` with the selector and call
    :meth:`read_events` when it is readable, :meth:`stop` at the end.

    ``error_log`` and ``level`` are the config's ``logging.error_log`` and ``logging.level``.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        assert popen.stdin is not None and popen.stdout is not None
        self.popen = popen
        self.pid = popen.pid
        self.plan_fd = popen.stdin.fileno()
        """The prober's stdin (non-blocking), where plans go."""
        self.events_fd = popen.stdout.fileno()
        """The prober's stdout (non-blocking), where its events come from."""
        self._out = bytearray()
        self._reader = FrameReader()
        for fd in (self.plan_fd, self.events_fd):
            os.set_blocking(fd, False)

    @classmethod
    def start(cls, table_fd: int, error_log: str = "stderr", level: str = "info") -> ProberProcess:
        """Starts the prober on the table in ``table_fd`` (the master's own descriptor stays
        open). Raises ``OSError`` when the process cannot start."""
        popen = subprocess.Popen(
            python_command(
                "master.prober", str(table_fd), "--error-log", error_log, "--level", level
            ),
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(table_fd,),
        )
        log.info("health prober started (pid %d)", popen.pid)
        return cls(popen)

    def send(self, plan: ProbePlan) -> None:
        """Queues ``plan`` and writes what the pipe takes now; never blocks. Call
        :meth:`flush` on later loop turns while :attr:`wants_write`."""
        self._out += encode(plan)
        self.flush()

    @property
    def wants_write(self) -> bool:
        """True while a plan is partly unsent."""
        return bool(self._out)

    def flush(self) -> None:
        """Writes what it can of the queued plans. A prober that has exited loses them (the
        master starts a new one and sends the current plan again)."""
        while self._out:
            try:
                n = os.write(self.plan_fd, self._out)
            except BlockingIOError:
                return
            except BrokenPipeError:
                self._out.clear()
                return
            del self._out[:n]

    def read_events(self) -> list[ProberMessage] | None:
        """The events the prober wrote since the last call; None once it closed its stdout
        (it exited: unregister :attr:`events_fd`, reap it, start another). Raises
        ``ValueError`` on a corrupt stream."""
        out: list[ProberMessage] = []
        while True:
            try:
                data = os.read(self.events_fd, READ_SIZE)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not data:
                return out or None
            out += self._reader.feed(data)

    def stop(self) -> int:
        """SIGTERM; SIGKILL after :data:`STOP_SECONDS`. Waits for the exit; returns its code.
        After this the table has no writer of its active columns."""
        if self.popen.returncode is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for f in (self.popen.stdin, self.popen.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        return self.popen.returncode


# -- the process ------------------------------------------------------------------------------


def _setup_log(target: str, level: str) -> logging.Handler:
    handler: logging.Handler
    if target in ("stderr", "stdout"):
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(target)
    handler.setFormatter(
        logging.Formatter("%(asctime)s [prober %(process)d] %(levelname)s %(message)s")
    )
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    return handler


def _reopen(handler: logging.Handler) -> None:
    if isinstance(handler, logging.FileHandler):
        handler.acquire()
        try:
            handler.close()
            handler.stream = handler._open()
        finally:
            handler.release()


class _Events:
    """Writes event frames to stdout, never blocking the loop for long: stdout is the
    master's pipe, which it reads on each loop turn."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, msg: ProberMessage) -> None:
        data = encode(msg)
        while data:
            try:
                n = os.write(self.fd, data)
            except BrokenPipeError:
                return
            data = data[n:]


async def serve(table: HealthTable, handler: logging.Handler) -> None:
    """Runs the checks until SIGTERM, SIGINT or the end of stdin."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    events = _Events(sys.stdout.fileno())

    def on_change(row: int, state: State) -> None:
        events.send(StateChanged(row, int(state)))

    prober = Prober(table, on_change=on_change)
    reader = FrameReader()

    def on_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGUSR1, _reopen, handler)

    def on_plan_readable() -> None:
        try:
            data = os.read(0, READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            on_stop()
            return
        try:
            messages = reader.feed(data)
        except ValueError as e:
            log.error("health prober: %s", e)
            on_stop()
            return
        for msg in messages:
            if isinstance(msg, ProbePlan):
                prober.apply(msg)
                log.debug("health prober: %d servers checked", len(msg.targets))
                events.send(PlanApplied(msg.generation))

    os.set_blocking(0, False)
    loop.add_reader(0, on_plan_readable)
    try:
        await stop
    finally:
        loop.remove_reader(0)
        await prober.close()


def main(argv: list[str] | None = None, run: Callable[..., object] | None = None) -> int:
    """The prober process's entry: ``TABLE_FD [--error-log TARGET] [--level LEVEL]``."""
    parser = argparse.ArgumentParser(prog="python -m master.prober")
    parser.add_argument("table_fd", type=int)
    parser.add_argument("--error-log", default="stderr")
    parser.add_argument("--level", default="info")
    args = parser.parse_args(argv)
    import setproctitle
    import uvloop

    setproctitle.setproctitle("tenaya health-prober")
    handler = _setup_log(args.error_log, args.level)
    try:
        table = HealthTable.attach_prober(args.table_fd)
    except (OSError, ValueError) as e:
        log.error("health prober: cannot attach the health table: %s", e)
        return 1
    try:
        (run or uvloop.run)(serve(table, handler))
    finally:
        table.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
