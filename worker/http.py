"""What both sides of the proxy build: status lines, and the upstream request as an object.

Both the downstream protocols (worker/server/h1.py, worker/server/h2.py) and the upstream
clients (worker/client/h1.py, worker/client/h2.py) import this module, and it imports neither:
a status line is looked up, not formatted, on the hot path (one dict lookup per response), and
:func:`upstream_request` is the one place that says which fields of a request go upstream
when the request goes as an object (an app changed it, or the upstream speaks HTTP/2).
"""

from __future__ import annotations

import http

from shared.address import format_address
from shared.headers import RequestHeader
from shared.peer import HttpPeer
from shared.session import Session
from worker.interfaces import Downstream

#: Request fields the proxy strips from the upstream request (hop-by-hop or rewritten).
UPSTREAM_DROP = (
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-for",
    "http2-settings",
)

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


def upstream_request(s: Session, client: Downstream, peer: HttpPeer) -> RequestHeader:
    """The upstream request as an object, from ``s.req_header`` (as received, or as a phase
    changed it): hop-by-hop fields and those the Connection field names out, X-Forwarded-For,
    X-Forwarded-Proto and X-Forwarded-Host (or the peer as Host) in."""
    src = s.req_header
    req = RequestHeader(src.method, src.path, "1.1", src.items())
    tokens = [t.decode("latin-1") for t in s.conn_tokens or ()]
    for name in (*UPSTREAM_DROP, *tokens):
        req.remove(name)
    addr = client.client_addr[0]
    prior = src.get_all("x-forwarded-for")
    req.append("X-Forwarded-For", ", ".join([*prior, addr]))
    req.append("X-Forwarded-Proto", client.scheme.decode())
    host = src.get("host")
    if host is None:
        req.append("Host", format_address(peer.host, peer.port))
    else:
        req.append("X-Forwarded-Host", host)
    return req
