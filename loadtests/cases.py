"""The benchmark's cases: what the clients speak to the proxies in each (HTTP/1.1 or HTTP/2,
TLS or not), which load generator speaks it, and the default shape of the load (rounds,
duration, connections, streams, threads, workers, warm-up).

``loadtests.bench`` runs the cases, ``loadtests.servers`` sets the proxies' listeners and
readiness probes up for a case, and ``loadtests.loadgen`` runs a case's tool.
"""

from __future__ import annotations

from dataclasses import dataclass

from loadtests.clients import ALPN_H2, H2C

CASE_KEEPALIVE = "keepalive"
CASE_CLOSE = "close"
CASE_TLS = "tls"
CASE_H2C = "h2c"
CASE_H2TLS = "h2tls"
TOOL_WRK = "wrk"
TOOL_H2LOAD = "h2load"


@dataclass(frozen=True, slots=True)
class Case:
    """What the clients of one case speak to the proxies, and with which tool."""

    name: str
    tool: str  #: TOOL_WRK or TOOL_H2LOAD
    tls: bool  #: TLS on the proxies' listeners
    http2: bool  #: HTTP/2 from the clients to the proxies
    help: str  #: one line for --help
    wrk_args: tuple[str, ...] = ()  #: extra wrk arguments

    @property
    def scheme(self) -> str:
        """The URL scheme the load generator uses."""
        return "https" if self.tls else "http"

    @property
    def pump(self) -> bool:
        """Whether the pump (``loadtests.pump``, cleartext HTTP/1.1 only) takes part."""
        return not self.tls and not self.http2

    @property
    def protocol(self) -> str:
        """The application protocol h2load must report ("" for wrk's cases)."""
        if not self.http2:
            return ""
        return ALPN_H2 if self.tls else H2C


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case(CASE_KEEPALIVE, TOOL_WRK, False, False, "wrk, HTTP/1.1 keep-alive"),
        Case(
            CASE_CLOSE,
            TOOL_WRK,
            False,
            False,
            "wrk, HTTP/1.1, a new connection per request",
            ("-H", "Connection: close"),
        ),
        Case(CASE_TLS, TOOL_WRK, True, False, "wrk, HTTPS (HTTP/1.1 keep-alive)"),
        Case(CASE_H2C, TOOL_H2LOAD, False, True, "h2load, cleartext HTTP/2 (prior knowledge)"),
        Case(CASE_H2TLS, TOOL_H2LOAD, True, True, "h2load, HTTP/2 over TLS (ALPN h2)"),
    )
}

DEFAULT_ROUNDS = 5
DEFAULT_DURATION_SECONDS = 5
DEFAULT_CONNECTIONS = 50
#: h2load's defaults: this many connections with up to H2_DEFAULT_STREAMS requests in flight on
#: each, as many requests in flight as wrk's DEFAULT_CONNECTIONS.
H2_DEFAULT_CONNECTIONS = 5
H2_DEFAULT_STREAMS = 10
#: Both proxies allow this many concurrent streams per HTTP/2 connection (Tenaya's fixed limit,
#: nginx's http2_max_concurrent_streams default); more would only queue in h2load.
H2_MAX_STREAMS = 128
DEFAULT_THREADS = 1
DEFAULT_WORKERS = 1
#: Length of the uncounted run that warms each proxy (upstream pool, caches) before round 1.
DEFAULT_WARMUP_SECONDS = 1
