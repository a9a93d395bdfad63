"""Resources as the tests measure or take them: a process's open descriptors and resident memory,
and a port that was free a moment ago."""

from __future__ import annotations

import os
import socket

import psutil


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fd_count(pid: int) -> int:
    """Open descriptors of a process, from /proc/PID/fd."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    """Resident memory of a process in bytes."""
    return int(psutil.Process(pid).memory_info().rss)
