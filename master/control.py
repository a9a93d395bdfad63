"""The control socket: a Unix-domain socket (mode 0600) on which the master answers commands.

``python -m master status|reload|upgrade|reopen|stop`` connect to it, send one
:class:`~shared.ipc.ControlRequest` and read one :class:`~shared.ipc.ControlReply`. Without a
control socket those commands fall back to signals sent to the pid in the pid file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

import psutil

from shared import ipc
from shared.ipc import Channel, ChannelClosed

log = logging.getLogger("tenaya")

#: Longest wait for the master's answer.
CLIENT_TIMEOUT_SECONDS = 10.0


class ControlServer:
    """The listening side, owned by the master's loop."""

    def __init__(self, path: str) -> None:
        self.path = path
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

    def accept(self) -> Channel | None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        return Channel(conn)

    def close(self) -> None:
        """Closes the socket; removes the path only if it is still this socket's (after an
        upgrade it belongs to the new master)."""
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
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


def reply_data(reply: ipc.ControlReply) -> dict[str, Any]:
    return dict(reply.data)


class ControlConn:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel



class ControlMixin:
    """The arbiter's answers on the control socket."""

    control: ControlServer | None

    def _open_control(self: Any) -> None:
        path = self.config.server.control_socket
        assert path
        try:
            self.control = ControlServer(path)
        except OSError as e:
            log.error("cannot open the control socket %s: %s", path, e.strerror)
            return
        self.sel.register(self.control.sock, selectors.EVENT_READ, self.control)

    def _on_control(self: Any, conn: ControlConn) -> None:
        try:
            messages = conn.channel.read()
        except (ChannelClosed, OSError):
            self._unregister(conn.channel.sock)
            conn.channel.close()
            return
        for msg in messages:
            if not isinstance(msg, ipc.ControlRequest):
                continue
            reply = self._control_command(msg.command)
            try:
                conn.channel.sock.setblocking(True)
                conn.channel.sock.settimeout(2.0)
                conn.channel.send(reply)
                conn.channel.flush()
            except (ChannelClosed, OSError):
                pass
            self._unregister(conn.channel.sock)
            conn.channel.close()
            return

    def _control_command(self: Any, command: str) -> ipc.ControlReply:
        handlers: dict[str, Callable[[], None]] = {
            "reload": self.handle_hup, "upgrade": self.handle_usr2,
            "reopen": self.handle_usr1, "stop": self.handle_term,
        }
        if command == "status":
            return ipc.ControlReply(ok=True, data=self.status())
        handler = handlers.get(command)
        if handler is None:
            return ipc.ControlReply(ok=False, error=f"unknown command {command!r}")
        handler()
        return ipc.ControlReply(ok=True)

    def status(self: Any) -> dict[str, Any]:
        """The master's and each worker's numbers, for ``python -m master status``."""
        now = time.monotonic()
        workers = []
        for w in sorted(self.workers.values(), key=lambda w: (w.generation, w.slot)):
            rss = cpu = 0.0
            try:
                p = psutil.Process(w.pid)
                rss = p.memory_info().rss
                t = p.cpu_times()
                cpu = t.user + t.system
            except psutil.Error:
                pass
            workers.append({
                "pid": w.pid, "slot": w.slot, "generation": w.generation,
                "age_seconds": round(now - w.started, 1), "rss_bytes": int(rss),
                "cpu_seconds": round(cpu, 2), "connections": w.connections,
                "requests": w.requests, "active_requests": w.active_requests,
                "ready": w.ready, "draining": w.draining, "pool": dict(w.pool),
                "accept_paused": w.accept_paused, "accept_pauses": w.accept_pauses,
            })
        totals: dict[str, Any] = dict(self.retired_counts)
        for w in self.workers.values():
            for name, value in w.pool.items():
                totals[name] += value
        reused = totals["reused_local"] + totals["reused_shared"]
        totals["reuse_ratio"] = round(reused / totals["upstream_requests"], 5) if totals[
            "upstream_requests"] else 0.0
        return {
            "pid": os.getpid(), "uptime_seconds": round(time.time() - self.started, 1),
            "state": self.lifecycle.state.value, "generation": self.generation,
            "config": self.config.source,
            "listeners": [lst.bound_address for lst in self.listeners],
            "workers": workers, "pool": totals,
            "broker": self.broker.stats() if self.broker is not None else None,
        }

