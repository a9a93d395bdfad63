"""HTTP/1.1 bytes that both sides of the proxy write: precomputed status lines.

A status line is looked up, not formatted, on the hot path: one dict lookup per response.
"""

from __future__ import annotations

import http

#: ``HTTP/1.1 <status> <reason>\r\n`` for every status the standard library names.
STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus
}


def status_line(status: int, reason: str | None = None) -> bytes:
    """``HTTP/1.1 <status> <reason>`` with CRLF."""
    if reason is None:
        line = STATUS_LINES.get(status)
        if line is not None:
            return line
        reason = ""
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")
