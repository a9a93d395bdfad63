"""TLS through the real master and workers, with certificates from a test CA (trustme).

Downstream: curl and Python's ssl/http.client verify the proxy's certificate against the test CA
and get the origin's answer with ``X-Forwarded-Proto: https``; TLS 1.1 and older, CBC suites and
(on a ``min_version: "1.3"`` listener) TLS 1.2 are refused; SNI picks the certificate whose
subjectAltName holds the name (exact or wildcard) and anything else gets the default; ALPN says
http/1.1; mTLS refuses a client without a certificate (or with one from another CA) and shows the
app the identity of one signed by ``client_ca``; a certificate replaced on disk is served to new
handshakes within seconds while an older keep-alive connection keeps working; SIGHUP picks up a
config that names other files, and a handshake still under way when its worker drains is
completed and answered by that worker; ``check`` refuses a config naming a missing certificate.

Upstream: an app's ``HttpPeer(tls=True, sni=...)`` reaches an HTTPS origin when the CA signed its
certificate for that name (502 otherwise), and ``verify_cert`` / ``verify_hostname`` turned off
accept what verification would refuse.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
import trustme
import yaml

from tests.support.client import HttpConn
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.origin import Origin
from tests.support.resources import fd_count, free_port
from tests.support.waits import wait_for

if TYPE_CHECKING:
    from tests.conftest import Fleet

CURL_SECONDS = 20.0


# -- certificates --------------------------------------------------------------------------


@dataclass
class Pki:
    """The test CAs and the certificates the tests serve, as PEM text."""

    ca: trustme.CA
    #: A CA that signed none of the servers' certificates.
    other_ca: trustme.CA
    #: The CA the mTLS listener trusts for client certificates.
    client_ca: trustme.CA
    ca_file: Path
    other_ca_file: Path

    def files(self, prefix: str, leaf: trustme.LeafCert) -> dict[str, str]:
        """``PREFIX.pem`` (the chain) and ``PREFIX.key`` for a master's ``files``."""
        return {
            f"{prefix}.pem": chain_pem(leaf),
            f"{prefix}.key": leaf.private_key_pem.bytes().decode(),
        }


def chain_pem(leaf: trustme.LeafCert) -> str:
    return "".join(b.bytes().decode() for b in leaf.cert_chain_pems)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca, client_ca = trustme.CA(), trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(d / "other-ca.pem"))
    return Pki(ca, other_ca, client_ca, d / "ca.pem", d / "other-ca.pem")


def client_context(
    ca: Path | None, *, alpn: list[str] | None = None, check_hostname: bool = True
) -> ssl.SSLContext:
    """A verifying client context trusting only ``ca``."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.check_hostname = check_hostname
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def tls_conn(port: int, ctx: ssl.SSLContext, server_hostname: str | None) -> HttpConn:
    """An :class:`HttpConn` over TLS (the handshake done; ``server_hostname`` is the SNI)."""
    conn = HttpConn(port)
    try:
        conn.sock = ctx.wrap_socket(conn.sock, server_hostname=server_hostname)
    except BaseException:
        conn.close()
        raise
    return conn


def san(cert: dict[str, Any]) -> set[str]:
    """The DNS names of a certificate in ``getpeercert()`` form."""
    return {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}


def peer_cert(
    port: int, server_hostname: str | None, ca: Path, check_hostname: bool = False
) -> dict[str, Any]:
    """The certificate the proxy shows a new handshake with this SNI (verified by ``ca``)."""
    ctx = client_context(ca, check_hostname=check_hostname)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as s,
    ):
        cert = s.getpeercert()
        assert cert, "no verified peer certificate"
        return cert


def run_curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=CURL_SECONDS,
        stdin=subprocess.DEVNULL,
    )


# -- the terminating proxy (one master for the module) ---------------------------------------


@dataclass
class Site:
    master: Master
    origin: Origin
    #: The listener with the default settings (TLS 1.2 and 1.3).
    port: int
    #: The listener with ``min_version: "1.3"``.
    port13: int


@pytest.fixture(scope="module")
def site(module_fleet: Fleet, pki: Pki) -> Site:
    origin = module_fleet.origin("plain")
    files = {
        **pki.files("default", pki.ca.issue_cert("tenaya.test", "127.0.0.1")),
        **pki.files("other", pki.ca.issue_cert("other.test", "www.other.test")),
        **pki.files("wild", pki.ca.issue_cert("*.wild.test")),
    }
    tls = {
        "cert": "default.pem",
        "key": "default.key",
        "certificates": [
            {"cert": "other.pem", "key": "other.key"},
            {"cert": "wild.pem", "key": "wild.key"},
        ],
    }
    master = module_fleet.master(
        config_for(
            upstreams={"origin": [origin.address]},
            listeners=[
                {"address": "127.0.0.1:0", "tls": tls},
                # A second port 0 would be "listed twice".
                {"address": f"127.0.0.1:{free_port()}", "tls": {**tls, "min_version": "1.3"}},
            ],
        ),
        files,
    )
    assert [scheme for scheme, _ in master.listeners] == ["https", "https"], master.listeners
    return Site(master, origin, master.listeners[0][1], master.listeners[1][1])


def test_curl_verifies_and_gets_200(site: Site, pki: Pki) -> None:
    """curl verifying against the test CA gets the origin's 200; the origin sees https."""
    host = f"tenaya.test:{site.port}"
    result = run_curl(
        "--cacert",
        str(pki.ca_file),
        "--resolve",
        f"{host}:127.0.0.1",
        "-w",
        "\n%{http_code} %{ssl_verify_result}",
        f"https://{host}/curl",
    )
    assert result.returncode == 0, result.stderr
    body, _, status = result.stdout.rpartition("\n")
    assert status == "200 0"
    echo = json.loads(body)
    assert echo["target"] == "/curl"
    headers = {n.lower(): v for n, v in echo["headers"]}
    assert headers["x-forwarded-proto"] == "https"
    assert headers["host"] == host


def test_curl_refuses_an_untrusted_proxy(site: Site, pki: Pki) -> None:
    """Negative control: curl trusting another CA refuses the proxy's certificate."""
    host = f"tenaya.test:{site.port}"
    other = site.master.workdir.parent / "other-ca-for-curl.pem"
    pki.other_ca.cert_pem.write_to_path(str(other))
    result = run_curl("--cacert", str(other), "--resolve", f"{host}:127.0.0.1", f"https://{host}/")
    assert result.returncode == 60, (result.returncode, result.stderr)


def test_http_client_keep_alive(site: Site, pki: Pki) -> None:
    """http.client over a verified TLS connection: two requests on one connection, both 200
    with X-Forwarded-Proto https (the certificate's IP SAN matches 127.0.0.1)."""
    conn = http.client.HTTPSConnection(
        "127.0.0.1", site.port, timeout=10, context=client_context(pki.ca_file)
    )
    try:
        seen = []
        for i in range(2):
            conn.request("GET", f"/keep/{i}")
            resp = conn.getresponse()
            echo = json.loads(resp.read())
            assert resp.status == 200
            headers = {n.lower(): v for n, v in echo["headers"]}
            assert headers["x-forwarded-proto"] == "https"
            assert conn.sock is not None
            seen.append(conn.sock.getsockname())
        assert seen[0] == seen[1], "the second request used another connection"
    finally:
        conn.close()


def _legacy_client(version: ssl.TLSVersion) -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = version
        ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def _accepts(ctx: ssl.SSLContext, port: int) -> str:
    """The version a handshake gets; raises ``ssl.SSLError`` when it is refused."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="tenaya.test") as s,
    ):
        return str(s.version())


def _version_a_permissive_server_gets(ctx: ssl.SSLContext, pki: Pki) -> str:
    """The version ``ctx`` handshakes with a local server that allows TLS 1.0 and up: proves
    that a refusal by the proxy is the proxy's, not the client's inability."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    pki.ca.issue_cert("tenaya.test").configure_cert(server)
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as e:
            errors.append(e)
            return
        with conn:
            conn.settimeout(10)
            try:
                with server.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError) as e:
                errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        return _accepts(ctx, listener.getsockname()[1])
    finally:
        thread.join(10)
        listener.close()


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_old_tls_versions_are_refused(site: Site, pki: Pki, version: str) -> None:
    """A TLS 1.0 / 1.1 client's handshake fails, though the same client handshakes with a
    server that allows those versions."""
    ctx = _legacy_client(getattr(ssl.TLSVersion, version))
    assert _version_a_permissive_server_gets(ctx, pki) == version.replace("_", ".")
    with pytest.raises(ssl.SSLError):
        _accepts(ctx, site.port)


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_tls12_and_tls13_are_accepted(site: Site, pki: Pki, version: ssl.TLSVersion) -> None:
    """TLS 1.2 and 1.3 clients both get a verified handshake and a 200."""
    ctx = client_context(pki.ca_file)
    ctx.minimum_version = ctx.maximum_version = version
    with tls_conn(site.port, ctx, "tenaya.test") as conn:
        assert isinstance(conn.sock, ssl.SSLSocket)
        assert (
            conn.sock.version()
            == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        )
        assert conn.request("GET", "/v").status == 200


def test_min_version_13_refuses_tls12(site: Site, pki: Pki) -> None:
    """A listener with ``min_version: "1.3"`` refuses TLS 1.2 and accepts TLS 1.3."""
    ctx12 = client_context(pki.ca_file)
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        _accepts(ctx12, site.port13)
    assert _accepts(client_context(pki.ca_file), site.port13) == "TLSv1.3"


def test_tls12_offers_only_aead_forward_secret_ciphers(site: Site) -> None:
    """By default a TLS 1.2 client offering only CBC suites is refused; one offering ECDHE with
    AES-GCM gets it."""

    def tls12(ciphers: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(ciphers)
        return ctx

    with pytest.raises(ssl.SSLError):
        _accepts(tls12("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA"), site.port)
    gcm = tls12("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")
    with (
        socket.create_connection(("127.0.0.1", site.port), timeout=10) as raw,
        gcm.wrap_socket(raw, server_hostname="tenaya.test") as s,
    ):
        cipher = s.cipher()
        assert cipher is not None and "GCM" in cipher[0] and cipher[1] == "TLSv1.2"


DEFAULT_NAMES = {"tenaya.test"}
OTHER_NAMES = {"other.test", "www.other.test"}
WILD_NAMES = {"*.wild.test"}


@pytest.mark.parametrize(
    ("sni", "names"),
    [
        ("tenaya.test", DEFAULT_NAMES),
        ("other.test", OTHER_NAMES),
        ("www.other.test", OTHER_NAMES),
        ("OTHER.Test", OTHER_NAMES),
        ("a.wild.test", WILD_NAMES),
        ("a.b.wild.test", DEFAULT_NAMES),
        ("unknown.test", DEFAULT_NAMES),
        (None, DEFAULT_NAMES),
    ],
    ids=[
        "default",
        "other",
        "other-www",
        "case",
        "wildcard",
        "wildcard-one-label",
        "unknown",
        "no-sni",
    ],
)
def test_sni_selects_certificate(site: Site, pki: Pki, sni: str | None, names: set[str]) -> None:
    """SNI picks the certificate whose subjectAltName holds the name (exact, any case, or a
    wildcard one label up); an unknown name or no SNI gets the default certificate."""
    cert = peer_cert(site.port, sni, pki.ca_file)
    assert san(cert) == names


def test_sni_certificate_passes_hostname_verification(site: Site, pki: Pki) -> None:
    """A client checking host names accepts the SNI-selected certificates and requests go
    through on them."""
    ctx = client_context(pki.ca_file)
    for name in ("tenaya.test", "other.test", "x.wild.test"):
        with tls_conn(site.port, ctx, name) as conn:
            resp = conn.request("GET", "/sni", [("Host", name)])
            assert resp.status == 200
            assert resp.json()["target"] == "/sni"


def test_alpn_negotiates_http11(site: Site, pki: Pki) -> None:
    """ALPN: a client offering http/1.1 gets it selected (Python ssl, and curl --http1.1)."""
    ctx = client_context(pki.ca_file, alpn=["http/1.1"])
    with tls_conn(site.port, ctx, "tenaya.test") as conn:
        assert isinstance(conn.sock, ssl.SSLSocket)
        assert conn.sock.selected_alpn_protocol() == "http/1.1"
        assert conn.request("GET", "/alpn").status == 200
    host = f"tenaya.test:{site.port}"
    result = run_curl(
        "-v",
        "--http1.1",
        "--cacert",
        str(pki.ca_file),
        "--resolve",
        f"{host}:127.0.0.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        f"https://{host}/alpn",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "200 1.1"
    assert "ALPN: server accepted http/1.1" in result.stderr, result.stderr


# -- mTLS ------------------------------------------------------------------------------------

WHOAMI_APP = '''
from shared import HttpPeer, ProxyHttp


class WhoAmI(ProxyHttp):
    """/whoami answers with the client certificate's subject; the rest goes to the origin."""

    def configure(self, config):
        super().configure(config)
        self.origin = HttpPeer(config.upstreams["origin"].servers[0])

    def request_filter(self, session, ctx):
        if session.req_header.path != "/whoami":
            return False
        cert = session.client_cert or {}
        subject = ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
        session.respond(200, {"X-Client-Subject": subject,
                              "X-Tls-Version": session.tls.version()}, subject + "\\n")
        return True

    def upstream_peer(self, session, ctx):
        return self.origin
'''


@dataclass
class MtlsSite:
    master: Master
    port: int
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


@pytest.fixture(scope="module")
def mtls(module_fleet: Fleet, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> MtlsSite:
    origin = module_fleet.origin("mtls-origin")
    files = {
        **pki.files("server", pki.ca.issue_cert("mtls.test")),
        "client-ca.pem": pki.client_ca.cert_pem.bytes().decode(),
        "whoami.py": WHOAMI_APP,
    }
    master = module_fleet.master(
        config_for(
            upstreams={"origin": [origin.address]},
            app="whoami:WhoAmI",
            listeners=[
                {
                    "address": "127.0.0.1:0",
                    "tls": {
                        "cert": "server.pem",
                        "key": "server.key",
                        "client_ca": "client-ca.pem",
                    },
                }
            ],
        ),
        files,
    )
    d = tmp_path_factory.mktemp("clients")
    alice = pki.client_ca.issue_cert("alice.clients.test", common_name="alice")
    stranger = pki.other_ca.issue_cert("mallory.clients.test", common_name="mallory")
    for name, leaf in (("alice", alice), ("mallory", stranger)):
        (d / f"{name}.pem").write_text(chain_pem(leaf))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
    return MtlsSite(
        master, master.port, d / "alice.pem", d / "alice.key", d / "mallory.pem", d / "mallory.key"
    )


def test_mtls_client_certificate_reaches_the_app(mtls: MtlsSite, pki: Pki) -> None:
    """With a certificate signed by client_ca the handshake succeeds, the app sees the
    client's subject in session.client_cert, and proxied requests work."""
    ctx = client_context(pki.ca_file)
    ctx.load_cert_chain(str(mtls.client_cert), str(mtls.client_key))
    with tls_conn(mtls.port, ctx, "mtls.test") as conn:
        resp = conn.request("GET", "/whoami")
        assert resp.status == 200
        assert "commonName=alice" in (resp.header("X-Client-Subject") or ""), resp.headers
        resp = conn.request("GET", "/proxied")
        assert resp.status == 200
        headers = {n.lower(): v for n, v in resp.json()["headers"]}
        assert headers["x-forwarded-proto"] == "https"


def test_mtls_with_curl(mtls: MtlsSite, pki: Pki) -> None:
    """curl presenting the client certificate gets 200 and its identity back."""
    host = f"mtls.test:{mtls.port}"
    result = run_curl(
        "--http1.1",
        "--cacert",
        str(pki.ca_file),
        "--cert",
        str(mtls.client_cert),
        "--key",
        str(mtls.client_key),
        "--resolve",
        f"{host}:127.0.0.1",
        "-D",
        "-",
        "-o",
        "/dev/null",
        f"https://{host}/whoami",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/1.1 200")
    assert "commonName=alice" in result.stdout


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
def test_mtls_without_client_certificate_fails(
    mtls: MtlsSite, pki: Pki, version: ssl.TLSVersion
) -> None:
    """Without a client certificate the handshake fails (TLS 1.2: during it; TLS 1.3: the
    client learns at its first read) and no HTTP response comes back."""
    ctx = client_context(pki.ca_file)
    ctx.minimum_version = ctx.maximum_version = version
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        tls_conn(mtls.port, ctx, "mtls.test") as conn,
    ):
        conn.request("GET", "/whoami")


def test_mtls_without_client_certificate_fails_with_curl(mtls: MtlsSite, pki: Pki) -> None:
    """curl without a client certificate gets no HTTP response (handshake or receive error)."""
    result = run_curl(
        "--http1.1",
        "--cacert",
        str(pki.ca_file),
        "--resolve",
        f"mtls.test:{mtls.port}:127.0.0.1",
        "-D",
        "-",
        f"https://mtls.test:{mtls.port}/whoami",
    )
    # 35: handshake failed, 52: empty reply, 56: receive failure.
    assert result.returncode in (35, 52, 56), (result.returncode, result.stderr)
    assert result.stdout == ""


def test_mtls_certificate_from_another_ca_fails(mtls: MtlsSite, pki: Pki) -> None:
    """A client certificate signed by a CA other than client_ca is refused (unknown CA)."""
    ctx = client_context(pki.ca_file)
    ctx.load_cert_chain(str(mtls.stranger_cert), str(mtls.stranger_key))
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        tls_conn(mtls.port, ctx, "mtls.test") as conn,
    ):
        conn.request("GET", "/whoami")


#: Handshakes the proxy refuses: a TLS 1.1 client; a TLS 1.2 client offering only CBC suites
#: and naming a host whose certificate SNI picks (so the refusal comes from that context); a TLS
#: 1.3 client without a certificate on the mTLS listener.
REFUSALS = ["tls1.1", "cbc-only-via-sni", "mtls-no-certificate"]


def _refusal(
    case: str, site: Site, mtls: MtlsSite, pki: Pki
) -> tuple[ssl.SSLContext, int, str, str]:
    """The client context, port and SNI name of a refused handshake, and the reason (as the
    client's ``ssl`` names it) of the alert the proxy must send."""
    if case == "tls1.1":
        return (
            _legacy_client(ssl.TLSVersion.TLSv1_1),
            site.port,
            "tenaya.test",
            "TLSV1_ALERT_PROTOCOL_VERSION",
        )
    if case == "cbc-only-via-sni":
        ctx = _legacy_client(ssl.TLSVersion.TLSv1_2)
        ctx.set_ciphers("ECDHE-RSA-AES128-SHA:AES128-SHA")
        return ctx, site.port, "www.other.test", "SSLV3_ALERT_HANDSHAKE_FAILURE"
    return (
        client_context(pki.ca_file),
        mtls.port,
        "mtls.test",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    )


def _refused(ctx: ssl.SSLContext, port: int, name: str) -> str:
    """Handshakes, sends a request, reads; returns the reason of the error the client got."""
    with (
        pytest.raises((ssl.SSLError, ConnectionError)) as refused,
        tls_conn(port, ctx, name) as conn,
    ):
        conn.sock.settimeout(5)
        conn.sock.sendall(b"GET / HTTP/1.1\r\nHost: " + name.encode() + b"\r\n\r\n")
        if not conn.sock.recv(1):
            raise ConnectionError("closed without a TLS alert")
    return str(getattr(refused.value, "reason", None) or repr(refused.value))


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_handshake_gets_a_tls_alert(
    site: Site, mtls: MtlsSite, pki: Pki, case: str
) -> None:
    """A refused handshake is answered with the fatal alert that says why (RFC 5246 E.1: a
    server that supports only newer versions MUST send protocol_version; RFC 8446 4.4.2.4:
    certificate_required), not a bare close that clients report as an unexpected EOF; also
    when SNI chose another certificate's context."""
    ctx, port, name, expected = _refusal(case, site, mtls, pki)
    assert _refused(ctx, port, name) == expected


def test_refused_handshakes_leave_no_descriptor_open(site: Site, mtls: MtlsSite, pki: Pki) -> None:
    """Once their clients have read the alert and gone, refused connections are closed: the
    workers hold no more descriptors than before them."""
    workers = site.master.workers() + mtls.master.workers()
    assert workers

    def open_fds() -> int:
        return sum(fd_count(w.pid) for w in workers)

    before = open_fds()
    for _ in range(10):
        for case in REFUSALS:
            ctx, port, name, expected = _refusal(case, site, mtls, pki)
            assert _refused(ctx, port, name) == expected
    wait_for(
        lambda: open_fds() <= before, timeout=10, what=f"the workers' descriptors back to {before}"
    )


# -- certificates change -----------------------------------------------------------------------


def _write_atomically(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        tmp = directory / f".{name}.new"
        tmp.write_text(text)
        os.replace(tmp, directory / name)


def test_certificate_hot_reload(fleet: Fleet, pki: Pki) -> None:
    """Cert and key replaced on disk: every worker reloads them, new handshakes get the new
    certificate, and a keep-alive connection opened before keeps working on the old one."""
    origin = fleet.origin()
    master = fleet.master(
        config_for(
            upstreams={"origin": [origin.address]},
            listeners=[{"address": "127.0.0.1:0", "tls": {"cert": "site.pem", "key": "site.key"}}],
        ),
        pki.files("site", pki.ca.issue_cert("reload.test")),
    )
    ctx = client_context(pki.ca_file)
    with tls_conn(master.port, ctx, "reload.test") as old:
        assert old.request("GET", "/before").status == 200
        assert isinstance(old.sock, ssl.SSLSocket)
        first = old.sock.getpeercert()
        assert first and san(first) == {"reload.test"}

        _write_atomically(
            master.workdir, pki.files("site", pki.ca.issue_cert("reload.test", "v2.reload.test"))
        )
        wait_for(
            lambda: master.read_error_log().count("site.pem reloaded") >= master.workers_count,
            timeout=10,
            what="every worker to reload",
        )
        for _ in range(8):
            cert = peer_cert(master.port, "reload.test", pki.ca_file, check_hostname=True)
            assert san(cert) == {"reload.test", "v2.reload.test"}
            assert cert["serialNumber"] != first["serialNumber"]

        resp = old.request("GET", "/after")
        assert resp.status == 200
        assert resp.header("Connection") is None
    assert any(r.target == "/after" for r in origin.requests)


def test_sighup_serves_certificate_named_by_new_config(fleet: Fleet, pki: Pki) -> None:
    """A reload (SIGHUP) with a config naming other certificate files serves them."""
    origin = fleet.origin()
    config = config_for(
        upstreams={"origin": [origin.address]},
        listeners=[{"address": "127.0.0.1:0", "tls": {"cert": "a.pem", "key": "a.key"}}],
    )
    master = fleet.master(
        config,
        {
            **pki.files("a", pki.ca.issue_cert("a.test")),
            **pki.files("b", pki.ca.issue_cert("b.test")),
        },
    )
    assert san(peer_cert(master.port, None, pki.ca_file)) == {"a.test"}
    config["listeners"][0]["tls"] = {"cert": "b.pem", "key": "b.key"}
    master.config_path.write_text(
        yaml.safe_dump({**config, "logging": master.config["logging"]}, sort_keys=False)
    )
    master.signal(signal.SIGHUP)

    def only_b() -> bool:
        return all(san(peer_cert(master.port, None, pki.ca_file)) == {"b.test"} for _ in range(8))

    wait_for(only_b, timeout=20, interval=0.1, what="the new generation's certificate")
    with tls_conn(master.port, client_context(pki.ca_file), "b.test") as conn:
        assert conn.request("GET", "/").status == 200


#: How long a client holds back its ClientHello once its worker drains: a worker that counted
#: nothing would exit within its first drain sweeps (0.1 s apart).
HANDSHAKE_HELD_SECONDS = 0.5


def test_draining_worker_finishes_a_handshake_it_accepted(fleet: Fleet, pki: Pki) -> None:
    """A connection the old worker accepted before a reload, whose TLS handshake is still under
    way when the worker drains, is answered by that worker (200, then Connection: close) rather
    than closed when the worker exits: a connection counts from its accept, not from the end
    of its handshake."""
    origin = fleet.origin()
    master = fleet.master(
        config_for(
            upstreams={"origin": [origin.address]},
            server={"workers": 1},
            listeners=[{"address": "127.0.0.1:0", "tls": {"cert": "site.pem", "key": "site.key"}}],
        ),
        pki.files("site", pki.ca.issue_cert("drain.test")),
    )
    [old] = master.workers()
    with HttpConn(master.port) as conn:
        me = conn.sock.getsockname()
        wait_for(
            lambda: any(c.raddr and tuple(c.raddr) == me for c in old.net_connections("tcp")),
            what="the worker to accept the connection",
        )
        master.signal(signal.SIGHUP)
        wait_for(
            lambda: "draining" in " ".join(old.cmdline()),
            timeout=30,
            what="the old worker to drain",
        )
        time.sleep(HANDSHAKE_HELD_SECONDS)
        assert old.is_running() and old.status() != psutil.STATUS_ZOMBIE, (
            "the draining worker exited with an accepted connection unanswered"
        )
        conn.sock = client_context(pki.ca_file).wrap_socket(conn.sock, server_hostname="drain.test")
        resp = conn.request("GET", "/held")
        assert resp.status == 200
        assert resp.header("Connection") == "close"
    wait_for(
        lambda: not old.is_running() or old.status() == psutil.STATUS_ZOMBIE,
        timeout=10,
        what="the old worker to exit once it answered",
    )


def test_check_refuses_missing_certificate(tmp_path: Path, pki: Pki) -> None:
    """``check`` refuses a TLS listener whose certificate file cannot be read."""
    for name, text in pki.files("site", pki.ca.issue_cert("check.test")).items():
        (tmp_path / name).write_text(text)
    path = tmp_path / "tenaya.yaml"
    path.write_text(
        yaml.safe_dump(
            config_for(
                upstreams={"origin": ["127.0.0.1:9"]},
                listeners=[
                    {"address": "127.0.0.1:0", "tls": {"cert": "missing.pem", "key": "site.key"}}
                ],
            )
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "master", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "listeners[0].tls.cert: cannot read missing.pem" in result.stdout + result.stderr
    # The same config with the file present is fine (the message was about that file).
    path.write_text(path.read_text().replace("missing.pem", "site.pem"))
    result = subprocess.run(
        [sys.executable, "-m", "master", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)


# -- upstream TLS ----------------------------------------------------------------------------

UPSTREAM_APP = '''
from shared import HttpPeer, PeerOptions, ProxyHttp


class UpstreamTls(ProxyHttp):
    """Picks a TLS peer by the path's first segment."""

    def configure(self, config):
        super().configure(config)
        o = config.app_options
        addr, good, other = o["origin"], o["ca"], o["other_ca"]
        self.peers = {
            "good": HttpPeer(addr, tls=True, sni="origin.test",
                             options=PeerOptions(ca_file=good)),
            "wrong-ca": HttpPeer(addr, tls=True, sni="origin.test",
                                 options=PeerOptions(ca_file=other)),
            "no-verify": HttpPeer(addr, tls=True, sni="origin.test",
                                  options=PeerOptions(ca_file=other, verify_cert=False)),
            "wrong-name": HttpPeer(addr, tls=True, sni="elsewhere.test",
                                   options=PeerOptions(ca_file=good)),
            "no-hostname-check": HttpPeer(addr, tls=True, sni="elsewhere.test",
                                          options=PeerOptions(ca_file=good,
                                                              verify_hostname=False)),
        }

    def upstream_peer(self, session, ctx):
        return self.peers[session.req_header.path.split("/")[1]]
'''


@dataclass
class UpstreamSite:
    master: Master
    origin: Origin
    #: The SNI names the TLS origin's handshakes carried.
    sni_seen: list[str | None]


@pytest.fixture(scope="module")
def upstream(module_fleet: Fleet, pki: Pki) -> UpstreamSite:
    sni_seen: list[str | None] = []
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.ca.issue_cert("origin.test").configure_cert(server)

    def record_sni(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sni_seen.append(name)

    server.sni_callback = record_sni
    origin = module_fleet.origin("tls-origin", tls=server)
    master = module_fleet.master(
        config_for(
            app="upstream_tls:UpstreamTls",
            app_options={
                "origin": origin.address,
                "ca": str(pki.ca_file),
                "other_ca": str(pki.other_ca_file),
            },
        ),
        {"upstream_tls.py": UPSTREAM_APP},
    )
    return UpstreamSite(master, origin, sni_seen)


@pytest.mark.parametrize(
    ("peer", "status", "sni"),
    [
        ("good", 200, "origin.test"),
        ("wrong-ca", 502, "origin.test"),
        ("no-verify", 200, "origin.test"),
        ("wrong-name", 502, "elsewhere.test"),
        ("no-hostname-check", 200, "elsewhere.test"),
    ],
)
def test_upstream_tls(upstream: UpstreamSite, peer: str, status: int, sni: str) -> None:
    """An HttpPeer(tls=True) reaches the HTTPS origin with its SNI when the certificate verifies
    (CA and name), gets 502 when it does not, and 200 with the failing check turned off."""
    before = len(upstream.origin.requests)
    upstream.sni_seen.clear()
    with HttpConn(upstream.master.port) as conn:
        resp = conn.request("GET", f"/{peer}/x")
    assert resp.status == status, (resp.status, resp.body)
    assert sni in upstream.sni_seen
    if status == 200:
        echo = resp.json()
        assert echo["origin"] == "tls-origin"
        assert echo["target"] == f"/{peer}/x"
    else:
        assert len(upstream.origin.requests) == before, "a request reached the origin"
        wait_for(
            lambda: any(
                f"GET /{peer}/x" in line and "CERTIFICATE_VERIFY_FAILED" in line
                for line in upstream.master.read_error_log().splitlines()
            ),
            timeout=5,
            what="the verification failure in the error log",
        )
