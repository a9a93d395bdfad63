"""TLS: server contexts for listeners (SNI, ALPN, mTLS, hot reload) and client contexts for
upstreams.

The data path uses the standard library's ``ssl`` through uvloop's transports. pyOpenSSL reads
what ``ssl`` cannot: the DNS names in each certificate's subjectAltName, which decide the SNI
table, so the config lists certificates without repeating their names.

Theory of operation. Each certificate gets its own ``SSLContext``; the listener's context is the
default certificate's, and its ``sni_callback`` switches the handshake to the context whose
names match the client's SNI (exact name first, then a ``*.`` wildcard one label up). Reloading
a certificate loads the new files into the same context objects, so new handshakes use the new
certificate while open connections keep theirs.

A refused handshake (TLS 1.1, no client certificate under mTLS) must be answered with the fatal
alert that says why. OpenSSL writes that alert into the outgoing memory BIO, but uvloop's and
asyncio's SSL protocols close the transport on a handshake error without sending what the BIO
holds (python/cpython#98078). The listener's SSL objects therefore report such a failure as
"want read" once: on that answer the loop's protocol sends the BIO, as it does every handshake
flight, and the failure is raised at the next event (see :class:`_AlertingObject`).
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import crypto

from shared.config import Config, TlsConfig
from shared.peer import HttpPeer

log = logging.getLogger("tenaya")

#: TLS 1.2 ciphers offered by default: forward secrecy and AEAD only.
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
#: ALPN protocols a listener offers, in order of preference.
SERVER_ALPN = ("h2", "http/1.1")
#: What ``do_handshake`` raises while it waits for the peer: uvloop and asyncio send the outgoing
#: BIO on these and keep the connection.
_HANDSHAKE_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLSyscallError)


def certificate_names(cert_path: str) -> list[str]:
    """The DNS names of a PEM certificate's subjectAltName (lower case)."""
    from cryptography import x509

    with open(cert_path, "rb") as f:
        cert = crypto.load_certificate(crypto.FILETYPE_PEM, f.read()).to_cryptography()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in san.get_values_for_type(x509.DNSName)]


@dataclass
class _Cert:
    cert: str
    key: str
    context: ssl.SSLContext
    mtime: tuple[float, float] = (0.0, 0.0)
    names: list[str] = field(default_factory=list)


class _AlertingObject(ssl.SSLObject):
    """A listener's TLS connection, whose refused handshake sends its alert before failing.

    When the handshake fails and OpenSSL left bytes (the fatal alert) in the outgoing BIO, the
    first ``do_handshake`` keeps the error and raises ``SSLWantReadError``, so that the event
    loop's SSL protocol sends those bytes; every later call raises the kept error, and the
    protocol closes the connection as it did before. The client's next event is that call: its
    next bytes, or its close (RFC 8446 6.2: whoever receives a fatal alert closes at once),
    which the protocol turns into a reset during the handshake. A client that does neither is
    closed by the handshake timeout, as one that stalls mid-handshake is. A failure with
    nothing to send raises at once, as without this class. Handshakes that succeed pay one
    Python call per step; reads and writes are the base class's.
    """

    #: The BIO the alert is written to; set by :meth:`_ServerContext.wrap_bio`.
    outgoing: ssl.MemoryBIO | None = None
    #: The handshake's failure, kept while its alert goes out.
    refusal: ssl.SSLError | None = None

    def do_handshake(self) -> None:
        if self.refusal is not None:
            raise self.refusal
        try:
            super().do_handshake()
        except _HANDSHAKE_AGAIN:
            raise
        except ssl.SSLError as e:
            if self.outgoing is None or not self.outgoing.pending:
                raise
            self.refusal = e
            raise ssl.SSLWantReadError("handshake refused; sending the alert first") from e


class _ServerContext(ssl.SSLContext):
    """A certificate's server context, whose ``wrap_bio`` makes :class:`_AlertingObject`
    connections and gives each its outgoing BIO.

    The event loop calls ``wrap_bio`` on the listener's context only (the default
    certificate's), and the SNI callback's switch to another context keeps the object made
    there; every certificate's context is of this class all the same, so none can serve a
    listener without it.
    """

    sslobject_class = _AlertingObject

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if isinstance(obj, _AlertingObject):
            obj.outgoing = outgoing
        return obj


def _mtimes(cert: str, key: str) -> tuple[float, float]:
    try:
        return os.stat(cert).st_mtime, os.stat(key).st_mtime
    except OSError:
        return (0.0, 0.0)


class ServerTls:
    """The TLS side of one listener."""

    def __init__(self, config: Config, tls: TlsConfig, alpn: tuple[str, ...] = SERVER_ALPN) -> None:
        self.tls = tls
        self.alpn = alpn
        self._client_ca = config.resolve(tls.client_ca) if tls.client_ca else None
        pairs = [(tls.cert, tls.key)] + [(c.cert, c.key) for c in tls.certificates]
        self.certs = [self._make(config.resolve(c), config.resolve(k)) for c, k in pairs]
        self.by_name: dict[str, ssl.SSLContext] = {}
        self._index_names()
        self.context = self.certs[0].context
        self.context.sni_callback = self._on_sni

    def _make(self, cert: str, key: str) -> _Cert:
        ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = (
            ssl.TLSVersion.TLSv1_3 if self.tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        )
        ctx.set_ciphers(self.tls.ciphers or DEFAULT_CIPHERS)
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
        ctx.set_alpn_protocols(list(self.alpn))
        if self._client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self._client_ca)
        ctx.load_cert_chain(cert, key)
        return _Cert(cert, key, ctx, _mtimes(cert, key), certificate_names(cert))

    def _index_names(self) -> None:
        self.by_name = {}
        # The first certificate listing a name wins; the default comes first.
        for c in self.certs:
            for name in c.names:
                self.by_name.setdefault(name, c.context)

    def _on_sni(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        if not name:
            return
        name = name.lower()
        chosen = self.by_name.get(name)
        if chosen is None and "." in name:
            chosen = self.by_name.get("*." + name.split(".", 1)[1])
        if chosen is not None and chosen is not sslobj.context:
            sslobj.context = chosen

    def reload_if_changed(self) -> bool:
        """Loads certificates whose files changed on disk; True if any did."""
        changed = False
        for c in self.certs:
            now = _mtimes(c.cert, c.key)
            if now != c.mtime:
                try:
                    c.context.load_cert_chain(c.cert, c.key)
                    c.names = certificate_names(c.cert)
                except (OSError, ssl.SSLError, crypto.Error, ValueError) as e:
                    # Half-written files: keep the old certificate and try again later.
                    log.warning("certificate %s not reloaded: %s", c.cert, e)
                    continue
                c.mtime = now
                changed = True
                log.info("certificate %s reloaded", c.cert)
        if changed:
            self._index_names()
        return changed


class ClientTls:
    """Client contexts for upstream peers, one per set of verification settings."""

    def __init__(self) -> None:
        self._contexts: dict[tuple[Any, ...], ssl.SSLContext] = {}

    def context(self, peer: HttpPeer) -> ssl.SSLContext:
        o = peer.options
        alpn = ("h2",) if o.http2 else o.alpn
        key = (o.verify_cert, o.verify_hostname, o.ca_file, o.client_cert, o.client_key, alpn)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=o.ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if not o.verify_hostname:
                ctx.check_hostname = False
            if not o.verify_cert:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if o.client_cert:
                ctx.load_cert_chain(o.client_cert, o.client_key)
            if alpn:
                ctx.set_alpn_protocols(list(alpn))
            self._contexts[key] = ctx
        return ctx
