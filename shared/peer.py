"""Upstream peers: where a request goes and how to connect there.

An :class:`HttpPeer` is what ``upstream_peer`` returns. Its :attr:`HttpPeer.pool_key` holds
everything that makes reusing an idle connection safe: two requests may share a connection only
when their peers have equal keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from shared.address import format_address, parse_address


class PoolKey(NamedTuple):
    """What two connections must agree on to be interchangeable: :attr:`HttpPeer.pool_key`.

    Requests share a pooled connection only when their peers' keys are equal; the pools (this
    worker's, the broker's shared between workers, the HTTP/2 connections) are keyed by it. A
    tuple, so it hashes and compares as one (and its msgpack form, sent to the broker, is the
    list of its fields). Timeouts are not part of it: they govern how a connection is used,
    not what it is connected to.
    """

    #: Where the connection goes: the address as given (a name is resolved per new connection).
    host: str
    #: Where the connection goes: the port.
    port: int
    #: A TLS connection never stands in for a plaintext one, nor the other way round.
    tls: bool
    #: The name the handshake sent and verified: a connection to one virtual host is not one to
    #: another on the same address.
    sni: str
    #: A connection made without checking the certificate must not serve a peer that wants it
    #: checked.
    verify_cert: bool
    #: As ``verify_cert``, for the check of the certificate's name.
    verify_hostname: bool
    #: The CA bundle the certificate was verified against: another trust store may refuse it.
    ca_file: str | None
    #: The client certificate presented (mTLS): the upstream may grant it rights another
    #: client's connection must not get.
    client_cert: str | None
    #: The key of ``client_cert``, which goes with it.
    client_key: str | None
    #: The ALPN protocols offered, which decided what the connection speaks.
    alpn: tuple[str, ...]
    #: HTTP/2 connections are multiplexed and pooled apart from HTTP/1.1 ones.
    http2: bool
    #: The app's own separation (one pool per tenant, say), for what the other fields miss.
    group_key: str


@dataclass(slots=True)
class PeerOptions:
    """How to connect to and talk with one peer: timeouts (seconds), protocol and TLS settings.

    Pass one as ``HttpPeer(..., options=PeerOptions(...))``; every field has a default, so give
    only what differs. The TLS settings, ``alpn`` and ``http2`` are part of the peer's
    :attr:`HttpPeer.pool_key`: connections are shared only between peers whose settings agree.
    """

    connect_timeout: float | None = None
    """Longest wait for a new connection (and its TLS handshake); None: the config's
    ``timeouts.upstream_connect_seconds``. Past it: ``CONNECT_TIMEOUT`` (504, retryable)."""
    read_timeout: float | None = None
    """Longest wait for the response head, and between two reads of a response body; None:
    ``timeouts.upstream_read_seconds``. Past it: ``READ_TIMEOUT`` (504)."""
    write_timeout: float | None = None
    """Longest time sending the request (head and body) may stall because the upstream does not
    read it (HTTP/2: grants no flow-control window); None: ``timeouts.upstream_write_seconds``.
    Past it: ``WRITE_TIMEOUT`` (504 when no response byte reached the client yet; never
    retried, the body is not kept). While the request stalls, the read timeout waits; it
    starts again when the upstream reads on."""
    idle_timeout: float | None = None
    """How long an idle HTTP/1.1 connection to this peer may wait in the pool, shorter or longer
    than ``pool.idle_timeout_seconds`` (None: that); checked once a second. Such a connection
    stays in the worker that used it last (the pool broker is not given it)."""
    http2: bool = False
    """Speak HTTP/2 to this peer: with ALPN h2 over TLS, with prior knowledge (h2c) without.
    Requests are multiplexed on one connection; needed for gRPC (trailers)."""
    alpn: tuple[str, ...] = ("http/1.1",)
    """ALPN protocols offered on a TLS connection (``("h2",)`` when ``http2``)."""
    verify_cert: bool = True
    """Verify the upstream's certificate chain (TLS only)."""
    verify_hostname: bool = True
    """Check the certificate's name against ``sni`` (or the host) (TLS only)."""
    ca_file: str | None = None
    """CA bundle (a PEM file path, relative to the worker's current directory) for verification;
    None uses the system store."""
    client_cert: str | None = None
    """Client certificate chain (a PEM file path) presented to the upstream (TLS only)."""
    client_key: str | None = None
    """The private key of ``client_cert`` (a PEM file path); None: it is in that file."""


class Cells(Protocol):
    """Integer cells, indexed (a ``memoryview`` of a shared table's row, or a list)."""

    def __getitem__(self, i: int, /) -> int: ...
    def __setitem__(self, i: int, value: int, /) -> None: ...


class InFlight(Protocol):
    """Counts the requests in flight to one peer (a ``shared.lb.fleet.MemberLoad``: its cell in
    the fleet's balance table): ``cells[index]`` is this process's count. The engine adds to
    the cell itself (a method call per request costs more than the addition)."""

    cells: Cells
    """This process's cells."""
    index: int
    """The peer's cell in :attr:`cells`."""
    guard: Any
    """Its upstream's circuit breakers and retry budget (a ``shared.lb.fleet.Guard``), or
    None: the engine counts requests and retries there."""


@dataclass(slots=True)
class HttpPeer:
    """An upstream HTTP server, as ``upstream_peer`` returns it.

    ``HttpPeer("127.0.0.1:8080")``, ``HttpPeer("api.internal:443", tls=True)``. Raises
    ``ValueError`` when ``address`` is not an address. A peer is cheap to keep and to share
    between requests: build peers once (in ``configure``) and do not change one after its first
    use (its :attr:`pool_key` is computed once).
    """

    address: str | tuple[str, int]
    """``"host:port"``, ``"[v6 address]:port"``, ``"host"`` (port 443 with ``tls``, else 80), or a
    ``(host, port)`` tuple. A host name is resolved on each new connection."""
    tls: bool = False
    """Connect with TLS, verified as ``options`` says (default: the system's CAs, the name)."""
    sni: str = ""
    """The TLS server name to send and verify; ``""``: the host."""
    options: PeerOptions = field(default_factory=PeerOptions)
    """Timeouts, HTTP/2 and TLS settings (:class:`PeerOptions`)."""
    group_key: str = ""
    """Keeps this peer's pooled connections apart from those of equal peers with another key (for
    example one pool per tenant)."""
    host: str = field(init=False)
    """The host part of ``address`` (set from it)."""
    port: int = field(init=False)
    """The port of ``address`` (set from it)."""
    _key: PoolKey | None = field(init=False, default=None, repr=False)
    in_flight: InFlight | None = field(default=None, compare=False, repr=False, kw_only=True)
    """Where the requests sent to this peer are counted while in flight (least_conn reads
    them): set on the peers of a :class:`~shared.balancer.Balancer`; None for a peer made by
    hand. The engine adds 1 to its cell once the peer is chosen for a request (each attempt,
    retries included) and takes it back when that attempt is over: a retry to another peer,
    the response's end, an error, or the client going away."""

    def __post_init__(self) -> None:
        if isinstance(self.address, tuple):
            self.host, self.port = self.address
        else:
            self.host, self.port = parse_address(self.address, 443 if self.tls else 80)

    @property
    def pool_key(self) -> PoolKey:
        """Everything that makes reusing a connection to this peer safe, as a
        :class:`PoolKey`: host, port, TLS settings, ALPN, HTTP/2 and ``group_key``. Requests
        share a pooled connection only when their peers' keys are equal."""
        key = self._key
        if key is None:
            o = self.options
            key = self._key = PoolKey(
                self.host,
                self.port,
                self.tls,
                self.sni,
                o.verify_cert,
                o.verify_hostname,
                o.ca_file,
                o.client_cert,
                o.client_key,
                o.alpn,
                o.http2,
                self.group_key,
            )
        return key

    def __str__(self) -> str:
        return format_address(self.host, self.port)
