"""The control socket: a Unix-domain socket (mode 0600) on which the master answers commands.

``python -m master status|reload|upgrade|reopen|stop`` connect to it, send one
:class:`~shared.ipc.ControlRequest` and read one :class:`~shared.ipc.ControlReply`. Without a
control socket those commands fall back to signals sent to the pid in the pid file.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from typing import Any

from shared import ipc
from shared.ipc import Channel, ChannelClosed

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
