"""Which protocol serves a client connection, and the hand-over to HTTP/2.

Every connection starts as HTTP/1.1 (worker/server/h1.py): a TLS connection whose ALPN chose
``h2`` becomes HTTP/2 once its handshake is done (``connection_made``), and a plaintext one
whose first bytes are the HTTP/2 connection preface (prior knowledge, "h2c", RFC 9113 3.3)
becomes HTTP/2 with those bytes. No third protocol object stands in front of either: the HTTP/1.1
server asks here, on its first event only, so a connection that stays HTTP/1.1 pays one
comparison (uvicorn's ``protocols/http/auto.py`` picks a class up front; ALPN is known only after
the handshake, so here the choice is made on the connection).
"""

from __future__ import annotations

import asyncio
import ssl

from worker.h2.codec import PREFACE
from worker.interfaces import ProxyEngine
from worker.server.h2 import H2Server

#: What an HTTP/2 connection preface starts with (the cheap first test, on a slice).
PREFACE_START = PREFACE[:4]


def alpn_chose_h2(tls: ssl.SSLObject) -> bool:
    """True when the TLS handshake agreed on HTTP/2 (ALPN ``h2``)."""
    return tls.selected_alpn_protocol() == "h2"


def is_h2_preface(data: bytes) -> bool:
    """True when a connection's first bytes are the HTTP/2 connection preface."""
    return data.startswith(PREFACE)


def switch_to_h2(engine: ProxyEngine, transport: asyncio.Transport, data: bytes) -> H2Server:
    """Hands the connection's transport to a new HTTP/2 server, which counts itself among the
    engine's connections, and gives it the bytes read so far."""
    h2 = H2Server(engine)
    transport.set_protocol(h2)
    h2.connection_made(transport)
    if data:
        h2.data_received(data)
    return h2
