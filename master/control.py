"""The control socket: a Unix-domain socket (mode 0600) on which the master answers commands.

``python -m master status|reload|upgrade|reopen|stop`` connect to it, send one
:class:`~shared.ipc.ControlRequest` and read one :class:`~shared.ipc.ControlReply`. Without a
control socket those commands fall back to signals sent to the pid in the pid file.

Two parts, as gunicorn's ``ctl`` package has them: :class:`ControlServer` owns the socket and
its connections (registered with the master's selector; one request, one reply, closed), and
:class:`CommandHandlers` holds the arbiter and answers each command. The server knows nothing
of the arbiter, and the handlers nothing of sockets.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import selectors
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import psutil

from master.selector import Selector
from shared import ipc
from shared.ipc import Channel, ChannelClosed

if TYPE_CHECKING:
    from master.broker import Broker
    from master.lifecycle import Lifecycle
    from master.listeners import Listener
    from master.workers import WorkerProc
    from shared.config import Config

log = logging.getLogger("tenaya")

#: Longest wait for the master's answer.
CLIENT_TIMEOUT_SECONDS = 10.0
#: Longest the master blocks writing one reply to a client.
REPLY_TIMEOUT_SECONDS = 2.0


class Supervisor(Protocol):
    """What the commands use of the arbiter (:class:`~master.arbiter.Arbiter`, which builds
    them with itself): a Protocol, so that this module need not import the arbiter that
    imports it."""

    workers: dict[int, WorkerProc]
    retired_counts: dict[str, int]
    started: float
    lifecycle: Lifecycle
    generation: int
    config: Config
    listeners: list[Listener]
    broker: Broker | None

    def handle_hup(self) -> None: ...
    def handle_usr2(self) -> None: ...
    def handle_usr1(self) -> None: ...
    def handle_term(self) -> None: ...


class CommandHandlers:
    """The master's answer to each control command; the arbiter does the work.

    ``reload``, ``upgrade``, ``reopen`` and ``stop`` do what SIGHUP, SIGUSR2, SIGUSR1 and
    SIGTERM do (the arbiter's ``handle_<signal>``); ``status`` returns the figures.
    """

    def __init__(self, arbiter: Supervisor) -> None:
        self.arbiter = arbiter
        #: Commands that act and reply with no data, by name.
        self.actions: dict[str, Callable[[], None]] = {
            "reload": arbiter.handle_hup,
            "upgrade": arbiter.handle_usr2,
            "reopen": arbiter.handle_usr1,
            "stop": arbiter.handle_term,
        }

    def handle(self, command: str) -> ipc.ControlReply:
        """Runs ``command``; the reply is ``ok`` with the status for ``status``, ``ok`` with no
        data for an action, and not ``ok`` with the reason for an unknown command."""
        if command == "status":
            return ipc.ControlReply(ok=True, data=self.status())
        action = self.actions.get(command)
        if action is None:
            return ipc.ControlReply(ok=False, error=f"unknown command {command!r}")
        action()
        return ipc.ControlReply(ok=True)

    def status(self) -> dict[str, Any]:
        """The master's and each worker's numbers, for ``python -m master status``."""
        arbiter = self.arbiter
        now = time.monotonic()
        workers = []
        for w in sorted(arbiter.workers.values(), key=lambda w: (w.generation, w.slot)):
            rss = cpu = 0.0
            try:
                p = psutil.Process(w.pid)
                rss = p.memory_info().rss
                t = p.cpu_times()
                cpu = t.user + t.system
            except psutil.Error:
                pass
            workers.append(
                {
                    "pid": w.pid,
                    "slot": w.slot,
                    "generation": w.generation,
                    "age_seconds": round(now - w.started, 1),
                    "rss_bytes": int(rss),
                    "cpu_seconds": round(cpu, 2),
                    "connections": w.connections,
                    "requests": w.requests,
                    "active_requests": w.active_requests,
                    "ready": w.ready,
                    "draining": w.draining,
                    "pool": dict(w.pool),
                    "accept_paused": w.accept_paused,
                    "accept_pauses": w.accept_pauses,
                }
            )
        totals: dict[str, Any] = dict(arbiter.retired_counts)
        for w in arbiter.workers.values():
            for name, value in w.pool.items():
                totals[name] += value
        reused = totals["reused_local"] + totals["reused_shared"]
        totals["reuse_ratio"] = (
            round(reused / totals["upstream_requests"], 5) if totals["upstream_requests"] else 0.0
        )
        return {
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - arbiter.started, 1),
            "state": arbiter.lifecycle.state.value,
            "generation": arbiter.generation,
            "config": arbiter.config.source,
            "listeners": [lst.bound_address for lst in arbiter.listeners],
            "workers": workers,
            "pool": totals,
            "broker": arbiter.broker.stats() if arbiter.broker is not None else None,
        }


class ControlServer:
    """The listening side: accepts clients on ``path`` and answers each one's request with
    ``handlers``, in the master's loop (registered with ``sel``).

    Raises ``OSError`` when the socket cannot be made (a folder that does not exist, no
    permission); a socket file left by an earlier master is replaced.
    """

    def __init__(self, path: str, handlers: CommandHandlers, sel: Selector) -> None:
        self.path = path
        self.handlers = handlers
        self.sel = sel
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self.sock = sock
        self._inode = os.stat(path).st_ino
        sel.register(sock, self._on_accept)

    def _on_accept(self, key: selectors.SelectorKey, mask: int) -> None:
        """The listening socket is readable: a client connects."""
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        channel = Channel(conn)
        self.sel.register(channel.sock, functools.partial(self._on_request, channel))

    def _on_request(self, channel: Channel, key: selectors.SelectorKey, mask: int) -> None:
        """A client's connection is readable: its request is answered, then it is closed. The
        reply is written blocking, for :data:`REPLY_TIMEOUT_SECONDS` at most."""
        try:
            messages = channel.read()
        except (ChannelClosed, OSError):
            self.sel.unregister(channel.sock)
            channel.close()
            return
        for msg in messages:
            if not isinstance(msg, ipc.ControlRequest):
                continue
            reply = self.handlers.handle(msg.command)
            try:
                channel.sock.setblocking(True)
                channel.sock.settimeout(REPLY_TIMEOUT_SECONDS)
                channel.send(reply)
                channel.flush()
            except (ChannelClosed, OSError):
                pass
            self.sel.unregister(channel.sock)
            channel.close()
            return

    def close(self) -> None:
        """Closes the socket; removes the path only if it is still this socket's (after an
        upgrade it belongs to the new master)."""
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        self.sel.unregister(self.sock)
        self.sock.close()


def request(path: str, command: str) -> ipc.ControlReply:
    """Sends ``command`` to the master listening on ``path`` and returns its reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CLIENT_TIMEOUT_SECONDS)
    sock.connect(path)
    channel = Channel(sock)
    channel.send(ipc.ControlRequest(command=command))
    deadline = time.monotonic() + CLIENT_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            if channel.wants_write:
                channel.flush()
            select.select([channel], [], [], 0.2)
            for msg in channel.read():
                if isinstance(msg, ipc.ControlReply):
                    return msg
    except ChannelClosed:
        pass
    finally:
        channel.close()
    raise TimeoutError(f"no answer from the master on {path}")
