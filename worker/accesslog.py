"""The access log: one line per request, buffered and written in batches.

Formats: ``combined`` (nginx's combined format, then the upstream address and the request time
in seconds) and ``json`` (one object per line). Lines are collected in memory and written when
the buffer passes :data:`FLUSH_BYTES` or once a second, so logging costs no system call per
request; :meth:`AccessLog.reopen` reopens a file log (for logrotate).
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.session import Session

#: Buffered log bytes that trigger a write.
FLUSH_BYTES = 32 * 1024


def _header(s: Session, name: bytes) -> str:
    for n, v in s.raw_headers:
        if n.lower() == name:
            return v.decode("latin-1")
    return "-"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class AccessLog:
    """Writes request lines to stderr, stdout or a file."""

    def __init__(self, target: str, fmt: str = "combined") -> None:
        self.target = target
        self.fmt = fmt
        self._buf: list[bytes] = []
        self._size = 0
        self._fd = -1
        self._own_fd = False
        self._time_second = -1
        self._time_text = ""
        self.reopen()

    def reopen(self) -> None:
        """(Re)opens the target; a file is opened for appending."""
        self.flush()
        if self._own_fd:
            os.close(self._fd)
        if self.target == "stderr":
            self._fd, self._own_fd = 2, False
        elif self.target == "stdout":
            self._fd, self._own_fd = 1, False
        else:
            self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._own_fd = True

    def fileno(self) -> int:
        """The descriptor lines are written to (1 or 2 for stdout and stderr)."""
        return self._fd

    def _local_time(self, now: float) -> str:
        second = int(now)
        if second != self._time_second:
            self._time_second = second
            self._time_text = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(second))
        return self._time_text

    def write(self, s: Session) -> None:
        """Adds the line of one finished request."""
        now = time.time()
        elapsed = now - s.start_time if s.start_time else 0.0
        request = f"{s.method.decode('latin-1')} {s.url.decode('latin-1')} HTTP/{s.version}"
        upstream = str(s.peer) if s.peer is not None else "-"
        status = s.status or (s.error.status if s.error is not None else 0)
        if self.fmt == "json":
            line = (
                json.dumps(
                    {
                        "time": now,
                        "client": s.client_addr[0],
                        "method": s.method.decode("latin-1"),
                        "url": s.url.decode("latin-1"),
                        "version": s.version,
                        "status": status,
                        "bytes": s.resp_bytes,
                        "referer": _header(s, b"referer"),
                        "user_agent": _header(s, b"user-agent"),
                        "upstream": upstream,
                        "request_time": round(elapsed, 6),
                        "error": str(s.error) if s.error is not None else None,
                        "request_id": s.request_id,
                    }
                )
                + "\n"
            )
        else:
            line = (
                f'{s.client_addr[0]} - - [{self._local_time(now)}] "{_escape(request)}" '
                f'{status} {s.resp_bytes} "{_escape(_header(s, b"referer"))}" '
                f'"{_escape(_header(s, b"user-agent"))}" {upstream} {elapsed:.3f}\n'
            )
        data = line.encode("utf-8", "replace")
        self._buf.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Writes what is buffered."""
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except OSError:
            pass

    def close(self) -> None:
        self.flush()
        if self._own_fd:
            os.close(self._fd)
            self._own_fd = False
