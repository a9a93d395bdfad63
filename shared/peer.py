"""Upstream peers: where a request goes and how to connect there.

An :class:`HttpPeer` is what ``upstream_peer`` returns. Its :attr:`HttpPeer.pool_key` holds
everything that makes reusing an idle connection safe: two requests may share a connection only
when their peers have equal keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``"127.0.0.1:80"``, ``"[::1]:80"`` or ``"localhost:80"`` as ``(host, port)``.

    Raises ``ValueError`` with a short reason when the text is not an address.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("expected an address such as 127.0.0.1:8080")
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after an IPv6 address")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError(f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"{text!r}: missing host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: missing ':PORT'")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class PeerOptions:
    """Timeouts (seconds) and pool settings of one peer; None takes the config's ``timeouts``."""

    #: Longest wait for a new TCP connection.
    connect_timeout: float | None = None
    #: Longest wait for the response head, and between two reads of a response body.
    read_timeout: float | None = None
    #: Longest time a write to the upstream may stay blocked.
    write_timeout: float | None = None
    #: How long an idle connection to this peer may wait in the pool; None: the pool's setting.
    idle_timeout: float | None = None
    #: Speak HTTP/2 to this peer: with ALPN h2 over TLS, with prior knowledge (h2c) without.
    #: Requests are multiplexed on one connection; needed for gRPC (trailers).
    http2: bool = False
    #: ALPN protocols offered on a TLS connection (``("h2",)`` when ``http2``).
    alpn: tuple[str, ...] = ("http/1.1",)
    #: Verify the upstream certificate and host name (TLS only).
    verify_cert: bool = True
    verify_hostname: bool = True
    #: CA bundle for verification; None uses the system store.
    ca_file: str | None = None
    #: Client certificate and key presented to the upstream (TLS only).
    client_cert: str | None = None
    client_key: str | None = None


@dataclass(slots=True)
class HttpPeer:
    """An upstream HTTP server for one request.

    ``address`` is ``"host:port"`` (or a ``(host, port)`` tuple). ``tls`` and ``sni`` choose an
    encrypted connection; ``group_key`` separates pools for connections that must not be shared
    (for example per tenant).
    """

    address: str | tuple[str, int]
    tls: bool = False
    sni: str = ""
    options: PeerOptions = field(default_factory=PeerOptions)
    group_key: str = ""
    host: str = field(init=False)
    port: int = field(init=False)
    _key: tuple[object, ...] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.address, tuple):
            self.host, self.port = self.address
        else:
            self.host, self.port = parse_address(self.address, 443 if self.tls else 80)

    @property
    def pool_key(self) -> tuple[object, ...]:
        """Everything that makes reusing a connection to this peer safe."""
        key = self._key
        if key is None:
            o = self.options
            key = self._key = (
                self.host, self.port, self.tls, self.sni, o.verify_cert, o.verify_hostname,
                o.ca_file, o.client_cert, o.client_key, o.alpn, o.http2, self.group_key,
            )
        return key

    def __str__(self) -> str:
        return format_address(self.host, self.port)
