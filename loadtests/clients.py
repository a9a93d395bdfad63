"""The benchmark's clients: a throwaway TLS certificate, one-request probes over HTTP/1.1 and
HTTP/2 (cleartext or TLS), h2load (its command line and its output, parsed) and wrk's output,
parsed.

Nothing here knows the benchmark's servers: hosts, ports and the expected body are arguments,
so ``loadtests.bench`` (and any other load test) can use it without an import cycle.

The certificate is made with ``cryptography`` (a dependency of pyOpenSSL, hence of Tenaya) at
run time, into the benchmark's temporary directory: no key is ever stored in the repository.
The probes do not verify it (it is self-signed, and wrk and h2load do not verify either); they
report what the handshake negotiated, so the benchmark can show that both proxies speak the
same TLS version and cipher.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events

#: The certificate's lifetime: long enough for any benchmark, short enough to be worthless.
CERT_VALID_DAYS = 1
#: How far back the certificate's validity starts, against clock skew.
CERT_BACKDATE_MINUTES = 5
#: File names of the generated certificate and key inside the directory given.
CERT_FILE = "bench-cert.pem"
KEY_FILE = "bench-key.pem"
#: The name the certificate is issued to, besides the IP address the servers listen on.
CERT_DNS_NAME = "localhost"

#: ALPN protocol ids.
ALPN_H2 = "h2"
ALPN_HTTP11 = "http/1.1"
#: What h2load prints as its application protocol for cleartext HTTP/2 with prior knowledge.
H2C = "h2c"

#: Largest read of one probe's socket.
READ_BYTES = 65536
#: The status of a successful probe.
STATUS_OK = 200

#: h2load and wrk print times with these units.
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUM_UNIT = r"([\d.]+)(us|ms|s|m|h)"
_RE_FINISHED = re.compile(rf"^finished in {_NUM_UNIT},", re.MULTILINE)
_RE_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout",
    re.MULTILINE,
)
_RE_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.MULTILINE)
_RE_REQUEST_TIME = re.compile(
    rf"^time for request:\s+{_NUM_UNIT}\s+{_NUM_UNIT}\s+{_NUM_UNIT}\s", re.MULTILINE
)
_RE_PROTOCOL = re.compile(r"^Application protocol: (\S+)", re.MULTILINE)
_RE_TLS_PROTOCOL = re.compile(r"^TLS Protocol: (\S+)", re.MULTILINE)
_RE_CIPHER = re.compile(r"^Cipher: (\S+)", re.MULTILINE)
_RE_TEMP_KEY = re.compile(r"^Server Temp Key: (\S+)", re.MULTILINE)
#: What wrk prints.
_RE_WRK_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.MULTILINE)
_RE_WRK_P99 = re.compile(r"^\s*99(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RE_WRK_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_RE_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_RE_WRK_LATENCY = re.compile(
    r"^\s*Latency\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)",
    re.MULTILINE,
)


# --------------------------------------------------------------------------------------------
# Certificate


def write_certificate(directory: Path, ip: str) -> tuple[Path, Path]:
    """Write a self-signed ECDSA P-256 certificate for ``localhost`` and ``ip`` and its key
    (PEM, the key readable by its owner only) into ``directory``; returns (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CERT_DNS_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=CERT_BACKDATE_MINUTES))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(CERT_DNS_NAME), x509.IPAddress(ipaddress.ip_address(ip))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# --------------------------------------------------------------------------------------------
# Probes


class ProbeError(Exception):
    """A probe got no complete, well-formed answer."""


@dataclass(frozen=True, slots=True)
class Reply:
    """What one probe request got back."""

    status: int  #: the response's status code
    body: bytes  #: the whole response body
    negotiated: str  #: "TLSv1.3 TLS_AES_256_GCM_SHA384 alpn h2"; "" without TLS


def client_context(alpn: Sequence[str]) -> ssl.SSLContext:
    """A TLS client context that offers ``alpn`` (none if empty) and verifies nothing: the
    benchmark's certificate is self-signed, and the load generators do not verify either."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def describe_tls(sock: ssl.SSLSocket) -> str:
    """The TLS version, cipher suite and ALPN protocol a handshake settled on, in one line."""
    cipher = sock.cipher()
    return (
        f"{sock.version()} {cipher[0] if cipher else '?'} "
        f"alpn {sock.selected_alpn_protocol() or '-'}"
    )


def get_h1(host: str, port: int, *, tls: bool, timeout: float) -> Reply:
    """GET / over HTTP/1.1 on a fresh connection (TLS without ALPN, as wrk does, if ``tls``).

    Raises ProbeError (or OSError) when no complete response arrives.
    """
    conn: http.client.HTTPConnection
    if tls:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=client_context(()))
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        negotiated = describe_tls(conn.sock) if isinstance(conn.sock, ssl.SSLSocket) else ""
        return Reply(response.status, body, negotiated)
    except http.client.HTTPException as e:
        raise ProbeError(f"HTTP/1.1 probe: {e!r}") from e
    finally:
        conn.close()


def get_h2(host: str, port: int, *, tls: bool, timeout: float) -> Reply:
    """GET / over HTTP/2 on a fresh connection: TLS with ALPN h2 if ``tls``, else cleartext
    with prior knowledge (h2c). The whole exchange must finish within ``timeout`` seconds.

    Raises ProbeError when the server does not select h2, resets the stream, ends the
    connection early or is too slow; OSError on a socket error.
    """
    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as stack:
        sock: socket.socket = stack.enter_context(
            socket.create_connection((host, port), timeout=timeout)
        )
        negotiated = ""
        if tls:
            sock = stack.enter_context(
                client_context((ALPN_H2,)).wrap_socket(sock, server_hostname=host)
            )
            assert isinstance(sock, ssl.SSLSocket)
            negotiated = describe_tls(sock)
            if sock.selected_alpn_protocol() != ALPN_H2:
                raise ProbeError(f"server did not select ALPN h2 ({negotiated})")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(
            stream_id,
            [
                (":method", "GET"),
                (":path", "/"),
                (":scheme", "https" if tls else "http"),
                (":authority", f"{host}:{port}"),
            ],
            end_stream=True,
        )
        sock.sendall(conn.data_to_send())
        status: int | None = None
        body = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProbeError(f"no complete HTTP/2 response within {timeout}s")
            sock.settimeout(left)
            data = sock.recv(READ_BYTES)
            if not data:
                raise ProbeError("connection closed before the HTTP/2 response ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    raise ProbeError(f"stream reset with {event.error_code!r}")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise ProbeError(f"GOAWAY with {event.error_code!r}")
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    if status is None:
                        raise ProbeError("stream ended without a response header")
                    conn.close_connection()
                    with contextlib.suppress(OSError):
                        sock.sendall(conn.data_to_send())
                    return Reply(status, bytes(body), negotiated)
            sock.sendall(conn.data_to_send())


def probe_ok(
    host: str, port: int, expected: bytes, *, http2: bool, tls: bool, timeout: float
) -> bool:
    """True if GET / on a fresh connection answers 200 with ``expected`` as its body."""
    get = get_h2 if http2 else get_h1
    try:
        reply = get(host, port, tls=tls, timeout=timeout)
    except (OSError, ProbeError):
        return False
    return reply.status == STATUS_OK and reply.body == expected


# --------------------------------------------------------------------------------------------
# h2load


@dataclass(slots=True)
class H2loadResult:
    """What one h2load run printed, parsed."""

    elapsed_seconds: float  #: "finished in": the main duration of a timing-based run
    done: int  #: requests that got a whole response (or failed)
    succeeded: int  #: responses with a status below 400 (h2load's "succeeded")
    failed: int  #: requests that failed, including responses with a status of 400 or more
    errored: int  #: requests lost to a stream or connection error
    timeout: int  #: requests lost to h2load's timeouts
    status: dict[str, int]  #: responses by class: "2xx", "3xx", "4xx", "5xx"
    mean_ms: float | None  #: mean time for request
    max_ms: float | None  #: longest time for request
    protocol: str  #: the application protocol: "h2c", "h2", "http/1.1"; "" if not printed
    tls: str  #: "TLSv1.3 TLS_AES_256_GCM_SHA384 X25519"; "" without TLS

    @property
    def ok(self) -> int:
        """Responses with a 2xx status."""
        return self.status["2xx"]

    @property
    def not_2xx(self) -> int:
        """Responses with a 3xx, 4xx or 5xx status (the origin only ever answers 200)."""
        return self.status["3xx"] + self.status["4xx"] + self.status["5xx"]


def _ms(value: str, unit: str) -> float:
    """A time h2load printed, in milliseconds."""
    return float(value) * _TIME_UNITS[unit] * 1e3


def parse_h2load(output: str) -> H2loadResult:
    """Parse the text h2load prints at the end of a run; raises ValueError if the totals are
    missing."""
    finished, requests, status = (
        r.search(output) for r in (_RE_FINISHED, _RE_REQUESTS, _RE_STATUS)
    )
    if finished is None or requests is None or status is None:
        raise ValueError("h2load printed no 'finished in', 'requests:' or 'status codes:' line")
    _total, _started, done, succeeded, failed, errored, timeout = (
        int(g) for g in requests.groups()
    )
    times = _RE_REQUEST_TIME.search(output)
    mean_ms = max_ms = None
    if times is not None and done:
        max_ms = _ms(times.group(3), times.group(4))
        mean_ms = _ms(times.group(5), times.group(6))
    protocol = _RE_PROTOCOL.search(output)
    tls = " ".join(
        m.group(1) for r in (_RE_TLS_PROTOCOL, _RE_CIPHER, _RE_TEMP_KEY) if (m := r.search(output))
    )
    return H2loadResult(
        elapsed_seconds=float(finished.group(1)) * _TIME_UNITS[finished.group(2)],
        done=done,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        status=dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, status.groups()), strict=True)),
        mean_ms=mean_ms,
        max_ms=max_ms,
        protocol=protocol.group(1) if protocol else "",
        tls=tls,
    )


def h2load_command(
    h2load: str, url: str, *, clients: int, streams: int, threads: int, duration: int
) -> list[str]:
    """The command line of a timing-based h2load run: ``clients`` connections with up to
    ``streams`` requests in flight on each, for ``duration`` seconds, without warm-up (the
    benchmark warms up with a separate run). An ``http://`` URL means h2c with prior knowledge,
    an ``https://`` one TLS with ALPN (h2 first)."""
    return [
        h2load,
        f"--clients={clients}",
        f"--max-concurrent-streams={streams}",
        f"--threads={threads}",
        f"--duration={duration}s",
        url,
    ]


# --------------------------------------------------------------------------------------------
# wrk


@dataclass(slots=True)
class WrkResult:
    """What one wrk run printed, parsed."""

    requests: int  #: responses wrk completed, whatever their status
    elapsed_seconds: float  #: the run's length as wrk measured it
    p99_ms: float | None  #: 99th percentile latency; None if wrk printed none
    socket_errors: dict[str, int]  #: connect / read / write / timeout counts
    non_2xx: int  #: responses with a status of 400 or more (wrk's "Non-2xx or 3xx")
    mean_ms: float | None = None  #: mean latency (wrk's thread stats); None if not printed
    max_ms: float | None = None  #: longest latency (wrk's thread stats); None if not printed


def parse_wrk(output: str) -> WrkResult:
    """Parse the text ``wrk --latency`` prints; raises ValueError if the totals are missing."""
    m = _RE_WRK_REQUESTS.search(output)
    if m is None:
        raise ValueError("no 'N requests in T' line in wrk's output")
    requests = int(m.group(1))
    elapsed = float(m.group(2)) * _TIME_UNITS[m.group(3)]
    p99 = _RE_WRK_P99.search(output)
    p99_ms = float(p99.group(1)) * _TIME_UNITS[p99.group(2)] * 1e3 if p99 else None
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    s = _RE_WRK_SOCKET_ERRORS.search(output)
    if s is not None:
        errors = dict(zip(errors, (int(g) for g in s.groups()), strict=True))
    n = _RE_WRK_NON_2XX.search(output)
    lat = _RE_WRK_LATENCY.search(output)
    mean_ms = max_ms = None
    if lat is not None:
        mean_ms = float(lat.group(1)) * _TIME_UNITS[lat.group(2)] * 1e3
        max_ms = float(lat.group(5)) * _TIME_UNITS[lat.group(6)] * 1e3
    return WrkResult(
        requests, elapsed, p99_ms, errors, int(n.group(1)) if n else 0, mean_ms, max_ms
    )
