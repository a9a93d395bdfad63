"""The byte tunnel of an upgraded HTTP/1.1 connection (WebSocket): RFC 9110 7.8, 15.2.2.

Theory of operation. An upgrade request goes upstream like any other; the client's parser
stops at the end of its head, since what follows is not HTTP. Until the origin answers, the
client's bytes (a WebSocket client may send frames right behind its handshake) are held by
:meth:`Tunnel.hold`, and reading pauses once they pass :data:`EARLY_TUNNEL_BYTES`. A 101
goes on to the client with the upgrade headers (:func:`switching_head`); then the upstream
connection becomes the tunnel's other end (:meth:`Tunnel.start`): the held bytes go first,
and from then on bytes pass unparsed both ways until either side closes. A full upstream
pauses reading from the client (:meth:`Tunnel.upstream_writable`). An answer other than 101
is an ordinary response; the connection closes after it and the held bytes are dropped.

Where the connection is (upgrading, tunnel, closing) is the HTTP/1.1 connection's state
(worker/server/h1.py, ``ConnState``); a :class:`Tunnel` holds only the bytes and the upstream
end, and pauses reading through the connection's :class:`~worker.server.flow.FlowControl`.
"""

from __future__ import annotations

import asyncio

from shared.headers import RawHeaders
from worker.http import STATUS_LINES
from worker.server.flow import FlowControl

__all__ = ["EARLY_TUNNEL_BYTES", "Tunnel", "switching_head"]

#: Client bytes sent after an upgrade request, kept until the tunnel opens, before reading
#: pauses.
EARLY_TUNNEL_BYTES = 256 * 1024


def switching_head(headers: RawHeaders) -> bytes:
    """The 101 response head for the client: the origin's fields with its own framing and
    connection fields replaced by ``Connection: Upgrade`` (the Upgrade field passes)."""
    parts = [STATUS_LINES[101]]
    for name, value in headers:
        n = name.lower()
        if n == b"connection" or n == b"keep-alive" or n == b"transfer-encoding":
            continue
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"Connection: Upgrade\r\n\r\n")
    return b"".join(parts)


class Tunnel:
    """One upgrade: the client bytes held until the 101, then the upstream end of the tunnel."""

    __slots__ = ("flow", "early", "early_bytes", "upstream")

    def __init__(self, flow: FlowControl) -> None:
        #: The client connection's flow control (reading pauses through it).
        self.flow = flow
        #: Client bytes that came before the tunnel opened, in order.
        self.early: list[bytes] = []
        #: Their total size.
        self.early_bytes = 0
        #: The upstream connection's transport, once the tunnel is open (None again once
        #: closed from the client's side).
        self.upstream: asyncio.Transport | None = None

    def hold(self, data: bytes) -> None:
        """Client bytes before the tunnel opens: kept; reading pauses past the limit."""
        if data:
            self.early.append(data)
            self.early_bytes += len(data)
            if self.early_bytes > EARLY_TUNNEL_BYTES:
                self.flow.pause_reading()

    def start(self, upstream: asyncio.Transport) -> None:
        """The origin switched: ``upstream`` is the other end. The held bytes go to it, and
        reading from the client resumes."""
        self.upstream = upstream
        early, self.early = self.early, []
        self.early_bytes = 0
        for data in early:
            upstream.write(data)
        self.flow.resume_reading()

    def send(self, data: bytes) -> None:
        """Client bytes through the open tunnel."""
        self.upstream.write(data)  # type: ignore[union-attr]

    def upstream_writable(self, writable: bool) -> None:
        """The upstream end stopped (False) or resumed (True) taking bytes: reading from the
        client follows."""
        if writable:
            self.flow.resume_reading()
        else:
            self.flow.pause_reading()

    def close(self) -> None:
        """The client's side is gone: the upstream end closes too."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
