"""Readiness reporting: systemd's notify protocol and the ``start --daemon`` handshake.

With ``NOTIFY_SOCKET`` in the environment (systemd ``Type=notify``), the master sends
``READY=1`` once its workers serve, ``RELOADING=1`` / ``READY=1`` around a reload,
``MAINPID=`` when a new master takes over after an upgrade (the unit needs
``NotifyAccess=all``), and ``STOPPING=1``. With ``TENAYA_READY_FD`` (set by ``start --daemon``)
it writes one line, ``ready`` or ``failed: REASON``, to that pipe and closes it.
"""

from __future__ import annotations

import os
import socket

READY_FD_ENV = "TENAYA_READY_FD"


def sd_notify(message: str) -> None:
    """Sends ``message`` to systemd when it asked for notifications; otherwise nothing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        pass


def report_start(ok: bool, reason: str = "") -> None:
    """Tells the ``start --daemon`` parent whether serving began (once; later calls do
    nothing)."""
    fd_text = os.environ.pop(READY_FD_ENV, None)
    if fd_text is None:
        return
    try:
        os.write(int(fd_text), b"ready\n" if ok else f"failed: {reason}\n".encode())
        os.close(int(fd_text))
    except (OSError, ValueError):
        pass
