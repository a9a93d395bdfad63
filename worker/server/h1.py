"""The downstream HTTP/1.1 connection: parsing, keep-alive, pipelining and response framing.

Theory of operation. httptools parses what the client sends and calls back; when a request
head is complete, a :class:`~shared.session.Session` is made from it. The first session on a
connection becomes *active* and is handed to the engine (worker/proxy/engine.py); requests pipelined
behind it wait in order, with reading paused. The active session's upstream response arrives
through the ``upstream_*`` callbacks (this class is the upstream connection's handler) and is
framed for the client: passed with its length, re-chunked, or delimited by closing. When the
response is complete, the connection either takes the next request or closes.

Hot path: parser callbacks only; headers stay the byte pairs the parser gave; the upstream
request's header lines are collected in the same loop that looks for the headers the proxy
itself must read; status lines are precomputed.

Nothing of a request goes upstream before the whole read that brought its head is parsed: the
head is complete in ``on_headers_complete``, but the parser's verdict on the rest of that read
(an invalid transfer coding, a malformed chunk) comes after it, and a request the client is
refused must leave the origin untouched. So ``on_headers_complete`` only marks the session
(:attr:`H1Server.starting`) and ``data_received`` hands it to the engine once ``feed_data``
has returned, unless the read ended in an error that belongs to that request (then it is
answered 400 and nothing went upstream). An error in a later read comes after the head went up;
that upstream connection is then closed, never reused.

Where the connection is in its life is one :class:`ConnState`, changed only by
:meth:`H1Server._to`, which checks each move against :data:`TRANSITIONS` (h11's ``_state.py``
is the model). A keep-alive request goes IDLE, HEAD, RESPONDING and back to IDLE; a pipelined
request's head takes the connection from RESPONDING to HEAD and back. An upgrade request
stops the parser (UPGRADING: the client's bytes wait in a :class:`~worker.server.tunnel.Tunnel`)
until a 101 opens the TUNNEL; a request the parser refuses, or a CONNECT, stops it for good
(STOPPED). SWITCHED (to HTTP/2), CLOSING and CLOSED end it. What is not a state: the worker's
drain (``draining``, which only turns keep-alive off), the read and write pauses (the
connection's :class:`~worker.server.flow.FlowControl`: each comes and goes in several states
for reasons of its own), and the write batch (a scope within one call).
"""

from __future__ import annotations

import asyncio
import enum
import ssl
import time
from collections import deque
from typing import Any, NoReturn

import httptools

from shared.errors import (
    ErrorKind,
    ErrorSource,
    ProxyError,
    downstream_error,
)
from shared.headers import RawHeaders, ResponseHeader, split_absolute_form, valid_host
from shared.session import Session
from worker.http import status_line
from worker.interfaces import ProxyEngine, Upstream
from worker.server.exchange import Exchange, peer_info
from worker.server.flow import FlowControl
from worker.server.select import PREFACE_START, alpn_chose_h2, is_h2_preface, switch_to_h2
from worker.server.tunnel import Tunnel, switching_head

# Response body framing, chosen when the response head is written.
MODE_NONE = 0  # no body (HEAD, 1xx, 204, 304)
MODE_LENGTH = 1  # Content-Length: body bytes pass as they arrive
MODE_CHUNKED = 2  # chunked transfer coding toward the client
MODE_CLOSE = 3  # delimited by closing the connection (HTTP/1.0 clients)

# Request headers the proxy reads itself; all but Host are hop-by-hop or rewritten by it.
_REQ_SPECIAL = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"http2-settings",
    }
)
# Response headers not passed on: hop-by-hop (RFC 9110 7.6.1) or framing the proxy redoes.
_RESP_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_KEEP_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade", b""})
#: Connection tokens of a request that name no field to drop: those above, and the fields a
#: request cannot do without. RFC 9110 7.6.1 has a proxy drop the fields the Connection field
#: names, but a Host dropped so leaves an HTTP/1.1 request without one (RFC 9112 3.2), and the
#: framing fields are the proxy's own; such tokens are ignored.
_REQ_KEEP_TOKENS = _KEEP_TOKENS | {b"host", b"content-length", b"transfer-encoding"}
#: Trailer fields a request may not carry (RFC 9110 6.5.1: framing, routing and connection
#: fields); a chunked body ending with one is refused. Others are dropped, as trailers are
#: not sent upstream.
_BAD_TRAILERS = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"trailer",
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"upgrade",
        b"expect",
    }
)
#: An accepted connection whose ``connection_made`` has not come this long after its accept
#: never will: its TLS handshake failed, and the loop tells the protocol nothing of that. It is
#: forgotten then (past uvloop's TLS handshake timeout, 60 s, which the listeners keep).
UNMADE_FORGET_SECONDS = 90.0


class ConnState(enum.IntEnum):
    """Where an HTTP/1.1 client connection is in its life; :data:`TRANSITIONS` says where each
    state may go. (An ``IntEnum``: its members hash as ints, which keeps the check of a
    transition cheap enough for the parser callbacks.)"""

    #: Accepted, but ``connection_made`` has not come yet (a TLS handshake under way).
    ACCEPTED = 0
    #: Open, with no request on it: waiting for the next one.
    IDLE = 1
    #: A request head is arriving (the header timeout runs). A request may be answered
    #: meanwhile: the head is then that of a pipelined request.
    HEAD = 2
    #: A request is being answered; its body may still be arriving (the session's business),
    #: and requests may wait pipelined behind it.
    RESPONDING = 3
    #: An upgrade request went its way; parsing has stopped and the client's bytes are held
    #: for the tunnel (worker/server/tunnel.py) until the origin answers.
    UPGRADING = 4
    #: The origin switched protocols (101): bytes pass unparsed both ways.
    TUNNEL = 5
    #: Parsing has stopped for good (a request the parser refused, a CONNECT): the requests
    #: before are answered, then the refusal, then the connection closes.
    STOPPED = 6
    #: Handed to the HTTP/2 protocol (ALPN ``h2``, or the h2c preface): nothing more here.
    SWITCHED = 7
    #: Closing: nothing more is read or written; what was written goes out first.
    CLOSING = 8
    #: The transport is gone (``connection_lost``).
    CLOSED = 9


_S = ConnState
#: Which states each state may move to. Every change goes through :meth:`H1Server._to`,
#: which refuses one this table does not list.
TRANSITIONS: dict[ConnState, frozenset[ConnState]] = {
    # (CLOSED: a loop that reported a failed handshake as a lost connection.)
    _S.ACCEPTED: frozenset({_S.IDLE, _S.SWITCHED, _S.CLOSING, _S.CLOSED}),
    _S.IDLE: frozenset({_S.HEAD, _S.STOPPED, _S.SWITCHED, _S.CLOSING, _S.CLOSED}),
    _S.HEAD: frozenset({_S.RESPONDING, _S.STOPPED, _S.CLOSING, _S.CLOSED}),
    _S.RESPONDING: frozenset({_S.IDLE, _S.HEAD, _S.UPGRADING, _S.STOPPED, _S.CLOSING, _S.CLOSED}),
    _S.UPGRADING: frozenset({_S.TUNNEL, _S.CLOSING, _S.CLOSED}),
    _S.TUNNEL: frozenset({_S.CLOSING, _S.CLOSED}),
    _S.STOPPED: frozenset({_S.CLOSING, _S.CLOSED}),
    _S.SWITCHED: frozenset(),
    _S.CLOSING: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}
#: The states in which the connection is done with: :attr:`H1Server.closing` is True.
CLOSING_STATES = frozenset({_S.SWITCHED, _S.CLOSING, _S.CLOSED})
# Module globals for the hot path (an enum member's lookup on its class costs more).
_ACCEPTED = _S.ACCEPTED
_IDLE = _S.IDLE
_HEAD = _S.HEAD
_RESPONDING = _S.RESPONDING
_UPGRADING = _S.UPGRADING
_TUNNEL = _S.TUNNEL
_STOPPED = _S.STOPPED
_SWITCHED = _S.SWITCHED
_CLOSING = _S.CLOSING
_CLOSED = _S.CLOSED


class _HeadTooLarge(Exception):
    """Raised from a parser callback when the request head passes the limit."""


class _BadTrailer(Exception):
    """Raised from a parser callback when a request's trailer section holds a field it may
    not."""


def _refuse(s: Session, why: str) -> None:
    """Marks ``s`` to be answered 400 (the first reason found is the one kept)."""
    if s.error is None:
        s.error = downstream_error(ErrorKind.BAD_REQUEST, why)


def _target(s: Session) -> bytes | None:
    """The request target is not plain origin-form (RFC 9112 3.2): for absolute-form, puts its
    origin-form in ``s.url`` and returns its authority; refuses a fragment, and any form
    other than origin-form, absolute-form, asterisk-form (OPTIONS) and authority-form
    (CONNECT, which the engine refuses itself)."""
    url = s.url
    if 35 in url:  # "#"
        # No fragment is part of a request target (RFC 9112 3.2); one would let the
        # proxy's and the origin's readings of the path differ.
        _refuse(s, "fragment in the request target")
        return None
    if url[:1] == b"/" or s.method == b"CONNECT":
        return None
    if url == b"*":
        if s.method != b"OPTIONS":
            _refuse(s, "asterisk-form target on a method other than OPTIONS")
        return None
    split = split_absolute_form(url)
    if split is None:
        _refuse(s, "invalid request target")
        return None
    authority, path = split
    # RFC 9112 3.2.4: an OPTIONS to a whole server goes to the origin as "*".
    s.url = b"*" if s.method == b"OPTIONS" and path == b"/" and url[-1:] != b"/" else path
    return authority


def _use_authority(s: Session, authority: bytes) -> None:
    """An absolute-form target: its authority is the request's host, whatever Host said
    (RFC 9112 3.2.2: a server MUST ignore the received Host field and use the target's
    authority). The router, the app and the upstream see that one Host."""
    s.host_b = authority
    s.fwd[:0] = (b"Host", b": ", authority, b"\r\n")
    raw = [(n, v) for n, v in s.raw_headers if n.lower() != b"host"]
    raw.insert(0, (b"Host", authority))
    s.raw_headers = raw


def _upgrade(s: Session) -> None:
    """An upgrade request (RFC 9110 7.8): sets ``s.upgrade`` to the protocols asked of the
    origin, if any are left; refuses one with a body."""
    if s.has_body:
        # The parser switches at the end of the head: the body would reach the origin
        # unframed, as the first bytes of the tunnel.
        _refuse(s, "upgrade request with a body")
        return
    if s.version != "1.1":
        return  # Upgrade is HTTP/1.1's: on HTTP/1.0 it is ignored
    protocols = []
    for name, value in s.raw_headers:
        if name.lower() == b"upgrade":
            for token in value.split(b","):
                token = token.strip()
                # Never h2c: an origin that switched would take HTTP/2 streams from the client
                # that the proxy never sees (h2c smuggling). Without it the request is an
                # ordinary one (nginx does the same).
                if token and token.split(b"/", 1)[0].lower() != b"h2c":
                    protocols.append(token)
    if protocols:
        s.upgrade = b", ".join(protocols)


class H1Server(Exchange, asyncio.Protocol):
    """One client connection speaking HTTP/1.x."""

    def __init__(self, engine: ProxyEngine) -> None:
        # Global
        self.engine = engine
        self.max_head = engine.max_head
        # Per-connection
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_addr: tuple[str, int] = ("", 0)
        self.server_addr: tuple[str, int] = ("", 0)
        self.client_ip = b""
        #: The TLS connection, when the listener terminates TLS.
        self.tls: ssl.SSLObject | None = None
        self.scheme = b"http"
        #: The last Host value found valid on this connection.
        self.good_host: bytes | None = None
        self.current: Session | None = None
        self.active: Session | None = None
        #: The active session, while its head's read is still being parsed: the engine gets
        #: it when ``feed_data`` returns (see the module docstring).
        self.starting: Session | None = None
        self.pipeline: deque[Session] | None = None
        self.up: Upstream | None = None
        #: Where the connection is in its life; changed only by :meth:`_to`.
        self.state = _ACCEPTED
        #: True in :data:`CLOSING_STATES`: a view of :attr:`state` that only :meth:`_to`
        #: writes, an attribute because the engine and the exchange read it on every request.
        self.closing = False
        #: The worker drains: responses from now on say ``Connection: close``. Not a state:
        #: it comes at any point of the connection's life and only changes that decision.
        self.draining = False
        #: Reading and writing pauses, and the request body's drain: not states either, each
        #: pause comes and goes in several states for reasons of its own.
        self.flow = FlowControl()
        #: The refusal to send once the requests before it are answered (in ``STOPPED``).
        self.deferred_error: ProxyError | None = None
        self.last_active = 0.0
        self.requests = 0
        # Writes made while an upstream read is being parsed go out together (one syscall for
        # a response's head and body); see begin_batch / end_batch. A scope within one call,
        # not a state of the connection.
        self.batching = False
        self.out: list[bytes] = []
        # While an async response phase runs, the response body waits here.
        self.held: list[bytes] | None = None
        self.held_done: Upstream | None = None
        #: Upgrade (WebSocket): the early bytes, then the tunnel (from ``UPGRADING`` on).
        self.tunnel: Tunnel | None = None
        # Per-request (the head being parsed)
        #: Where ``on_header`` puts fields: the session's headers, then (after the head) the
        #: trailer section, kept apart so that a trailer never passes for a header.
        self.fields: RawHeaders = []
        self.trailer_fields: RawHeaders = []
        self.head_size = 0
        self.pending_head = 0
        self.head_started = 0.0
        #: Bytes of the requests completed so far (the head's size estimated from its parts).
        self.consumed = 0
        # Counted from the accept on. The loop makes this protocol when it accepts the
        # connection but calls connection_made a loop turn later (on a TLS listener, after the
        # handshake); a draining worker exits once it counts no connection, and at exit it
        # would close one it accepted but did not count with the client's request unanswered
        # (and the upstream connection carrying that request reset).
        self.last_active = time.monotonic()
        engine.connections.add(self)

    # -- the connection's state ------------------------------------------------------------

    def _to(self, new: ConnState) -> None:
        """Moves the connection to ``new``. Raises ``RuntimeError`` when :data:`TRANSITIONS`
        does not allow it (a bug: nothing catches it, and the connection fails).

        Hot path: the moves every keep-alive request makes (to HEAD, to RESPONDING, back to
        IDLE) do this check inline instead, and make no closing move: a call costs as much
        as the check (about 0.1 µs each, measured), on every request."""
        if new not in TRANSITIONS[self.state]:
            self._illegal(new)
        self.state = new
        if new in CLOSING_STATES:
            self.closing = True
            self.flow.close()

    def _illegal(self, new: ConnState) -> NoReturn:
        raise RuntimeError(f"HTTP/1.1 connection: cannot go from {self.state.name} to {new.name}")

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.flow.transport = transport  # type: ignore[assignment]
        if self.closing:
            # Closed (the worker stopping) before the loop made it.
            transport.close()
            return
        self.client_addr, self.client_ip, self.server_addr, tls = peer_info(transport)
        if tls is not None:
            self.tls = tls
            self.scheme = b"https"
            if alpn_chose_h2(tls):
                self._switch_to_h2(transport, b"")  # type: ignore[arg-type]
                return
        self._to(_IDLE)
        self.last_active = time.monotonic()
        # Again: one that idle_check forgot while its handshake went on is back.
        self.engine.connections.add(self)
        if self.engine.draining:
            self.draining = True

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        state = self.state
        if state is not _IDLE and state is not _RESPONDING and state is not _HEAD:
            # Not parsed: tunnel bytes, early bytes for the tunnel, or dropped.
            tunnel = self.tunnel
            if tunnel is not None:
                if state is _TUNNEL:
                    tunnel.send(data)
                elif state is _UPGRADING:
                    tunnel.hold(data)
            return
        if (
            not self.requests
            and self.current is None
            and data[:4] == PREFACE_START
            and is_h2_preface(data)
        ):
            # HTTP/2 with prior knowledge (h2c) on a plaintext listener.
            self._switch_to_h2(self.transport, data)  # type: ignore[arg-type]
            return
        continuing_head = state is _HEAD
        consumed = self.consumed
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # An Upgrade (WebSocket) or CONNECT: what follows the head is not HTTP. Nothing
            # more is parsed; for an upgrade the bytes wait for the tunnel, and without one
            # the connection closes after the response.
            s = self.current or self.active
            if self.current is not None:
                self._message_complete()
            if s is not None and s.upgrade is not None:
                self._to(_UPGRADING)
                tunnel = self.tunnel = Tunnel(self.flow)
                tunnel.hold(data[e.args[0] :])
            else:
                self._to(_STOPPED)
            if s is not None:
                s.keep_alive = False
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _HeadTooLarge):
                self.bad_request(downstream_error(ErrorKind.HEADERS_TOO_LARGE))
            elif isinstance(cause, _BadTrailer):
                self.bad_request(downstream_error(ErrorKind.BAD_REQUEST, str(cause)))
            else:
                self.engine.log.exception("parser callback failed", exc_info=cause)
                self.bad_request(ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL, cause=cause))
        except httptools.HttpParserError as e:
            self.bad_request(downstream_error(ErrorKind.BAD_REQUEST, e))
        else:
            if self.state is _HEAD:
                # The head is still incomplete after this read (a long header line the
                # parser has not delivered yet): count its bytes, but not those of the
                # requests this read completed before it.
                if continuing_head:
                    self.pending_head += len(data)
                else:
                    self.pending_head = max(0, len(data) - (self.consumed - consumed))
                if self.pending_head > self.max_head:
                    self.bad_request(downstream_error(ErrorKind.HEADERS_TOO_LARGE))
            else:
                self.pending_head = 0
        s = self.starting
        if s is not None:
            # All of this read is parsed and none of it refused this request: it may go
            # upstream now.
            self.starting = None
            self.engine.start(self, s)

    def _switch_to_h2(self, transport: asyncio.Transport, data: bytes) -> None:
        """Hands the connection to the HTTP/2 protocol (which counts itself)."""
        self.engine.connections.discard(self)
        self._to(_SWITCHED)
        switch_to_h2(self.engine, transport, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._to(_CLOSED)
        self.engine.connections.discard(self)
        tunnel = self.tunnel
        if tunnel is not None and tunnel.upstream is not None:
            # The tunnel was open (the origin's side may have closed it already).
            tunnel.close()
            s = self.active
            self.up = None
            if s is not None:
                self.finish(s)
            return
        up = self.up
        if up is not None:
            self.up = None
            up.detach()
        gone = downstream_error(ErrorKind.DOWNSTREAM_CLOSED, exc)
        for s in (self.current, self.active):
            if s is not None:
                s.fail_body(gone)
        s = self.active
        if s is not None and not s.response_done:
            self.active = None
            s.error = s.error or gone
            s.response_done = True
            self.engine.request_done(s)
        # A request body waiting for its upstream waits no more.
        self.flow.wake()

    def pause_writing(self) -> None:
        self.flow.pause_writing()
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        if self.up is not None:
            self.up.resume_reading()

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        s = self.current = Session(self)
        self.fields = s.raw_headers
        s.start_time = time.time()
        self.head_size = 0
        # The three moves of every request check the table inline (see _to).
        if _HEAD not in TRANSITIONS[self.state]:
            self._illegal(_HEAD)
        self.state = _HEAD
        self.head_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        s = self.current
        s.url = s.url + url if s.url else url  # type: ignore[union-attr]
        self.head_size += len(url)
        if self.head_size > self.max_head:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        s: Session = self.current  # type: ignore[assignment]
        if _RESPONDING not in TRANSITIONS[self.state]:
            self._illegal(_RESPONDING)
        self.state = _RESPONDING
        self.pending_head = 0
        self.fields = self.trailer_fields
        p = self.parser
        method = s.method = p.get_method()
        version = s.version = p.get_http_version()
        s.keep_alive = p.should_keep_alive()
        if version != "1.1" and version != "1.0":
            # httptools takes HTTP/0.9 (no version, or a target it reads as running into the
            # version: "PRI *oHTTP/2.0") and any 1-digit major: an HTTP/1 request line says
            # 1.0 or 1.1, and an origin would read another as something else. (llhttp itself
            # refuses PRI with a 1.x version.)
            _refuse(s, f"HTTP/{version} in an HTTP/1 request line")
        url = s.url
        authority = None
        # (An int's membership test is a memchr; a bytes one costs several times more.)
        if url[:1] != b"/" or 35 in url:  # not origin-form, or a "#"
            authority = _target(s)
        fwd = s.fwd
        hosts = 0
        for name, value in s.raw_headers:
            n = name.lower()
            if n not in _REQ_SPECIAL:
                fwd += (name, b": ", value, b"\r\n")
            elif n == b"host":
                hosts += 1
                if authority is None:
                    s.host_b = value
                    fwd += (name, b": ", value, b"\r\n")
            elif n == b"content-length":
                s.content_length = int(value)
            elif n == b"transfer-encoding":
                s.chunked = True
            elif n == b"expect":
                s.expect_continue = value.lower() == b"100-continue"
            elif n == b"x-forwarded-for":
                s.xff = value if s.xff is None else s.xff + b", " + value
            elif n == b"connection":
                for token in value.lower().split(b","):
                    token = token.strip()
                    if token not in _REQ_KEEP_TOKENS:
                        if s.conn_tokens is None:
                            s.conn_tokens = []
                        s.conn_tokens.append(token)
        if s.conn_tokens:
            # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
            drop = s.conn_tokens
            kept = []
            for i in range(0, len(fwd), 4):
                if fwd[i].lower() not in drop:
                    kept += fwd[i : i + 4]
            s.fwd = kept
        if authority is not None:
            _use_authority(s, authority)
        if p.should_upgrade() and method != b"CONNECT":
            _upgrade(s)
        if hosts > 1 or (hosts == 0 and s.version == "1.1"):
            # RFC 9112 3.2: a server MUST respond with 400 to an HTTP/1.1 request without a
            # Host header field, and to any request with more than one.
            s.error = downstream_error(
                ErrorKind.BAD_REQUEST, "no Host header" if hosts == 0 else "several Host headers"
            )
        elif hosts and authority is None and s.host_b != self.good_host:
            # RFC 9110 7.2 / RFC 3986 3.2.2: host [":" port]. Userinfo, a path, a second port
            # or whitespace would route here and mean another host at the origin. A
            # connection's requests mostly repeat their Host: the last good one is not
            # checked again.
            if valid_host(s.host_b):  # type: ignore[arg-type]
                self.good_host = s.host_b
            else:
                _refuse(s, "invalid Host header")
        s.max_body = max_body = self.engine.max_body
        if max_body and s.content_length is not None and s.content_length > max_body:
            s.error = downstream_error(ErrorKind.BODY_TOO_LARGE)
        if self.draining:
            s.keep_alive = False
        self.requests += 1
        if self.active is None:
            self.active = self.starting = s
        else:
            if self.pipeline is None:
                self.pipeline = deque()
            self.pipeline.append(s)
            self.flow.pause_reading()

    def on_body(self, body: bytes) -> None:
        self.current.feed_body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        trailers = self.trailer_fields
        if trailers:
            names = [n.lower() for n, _ in trailers]
            trailers.clear()
            bad = _BAD_TRAILERS.intersection(names)
            if bad:
                raise _BadTrailer(f"{min(bad).decode()} in the trailer section")
        self._message_complete()

    def _message_complete(self) -> None:
        s = self.current
        self.current = None
        if s is not None:
            # Request line and final CRLF, the header lines, and the body.
            self.consumed += len(s.method) + 13 + self.head_size + s.body_bytes
            s.end_body()

    # -- flow control ----------------------------------------------------------------------

    def pause_body(self) -> None:
        self.flow.pause_reading()

    def resume_body(self) -> None:
        if not self.pipeline:
            self.flow.resume_reading()

    def upstream_writable(self, writable: bool) -> None:
        tunnel = self.tunnel
        if tunnel is not None and tunnel.upstream is not None:
            tunnel.upstream_writable(writable)
            return
        super().upstream_writable(writable)

    def end_body(self, s: Session) -> None:
        if s.resp_mode == MODE_CHUNKED and not self.closing:
            if s.trailers:
                lines = [b"0\r\n"]
                for name, value in s.trailers:
                    lines += (name, b": ", value, b"\r\n")
                lines.append(b"\r\n")
                self.send(b"".join(lines))
            else:
                self.send(b"0\r\n\r\n")

    # -- the exchange --------------------------------------------------------------------

    def write_head(self, s: Session, line: bytes, headers: RawHeaders, rechunk: bool) -> None:
        """Writes a response head for ``s``: the status line, the end-to-end headers, and the
        framing and connection headers this connection needs. ``rechunk`` drops the length
        (the body may change on its way)."""
        s.response_started = True
        status = s.status = int(line[9:12])
        parts = [line]
        has_length = False
        named: list[bytes] | None = None
        for name, value in headers:
            n = name.lower()
            if n in _RESP_DROP:
                if n == b"connection":
                    for token in value.lower().split(b","):
                        token = token.strip()
                        if token not in _KEEP_TOKENS:
                            named = [*(named or ()), token]
                continue
            if n == b"content-length":
                if rechunk:
                    continue
                has_length = True
            parts += (name, b": ", value, b"\r\n")
        if named:
            # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
            kept = [line]
            for i in range(1, len(parts), 4):
                if parts[i].lower() not in named:
                    kept += parts[i : i + 4]
                elif parts[i].lower() == b"content-length":
                    has_length = False
            parts = kept
        if s.method == b"HEAD" or status < 200 or status == 204 or status == 304:
            mode = MODE_NONE
        elif has_length:
            mode = MODE_LENGTH
        elif s.version == "1.1":
            mode = MODE_CHUNKED
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            mode = MODE_CLOSE
        s.resp_mode = mode
        # A request body still arriving (the origin, or the proxy, answers first) closes the
        # connection after the response (finish), so the head says so: RFC 9112 9.6, a server
        # that does not read the whole body "SHOULD send the "close" connection option".
        keep = (
            s.keep_alive
            and mode != MODE_CLOSE
            and not self.draining
            and not (s.has_body and not s.body_done)
        )
        s.keep_alive = keep
        if s.version == "1.1":
            if not keep:
                parts.append(b"Connection: close\r\n")
        elif keep:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.send(b"".join(parts))

    def send(self, data: bytes) -> None:
        """Writes to the client now, or with the batch in progress."""
        if self.batching:
            self.out.append(data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def begin_batch(self) -> None:
        self.batching = True

    def end_batch(self) -> None:
        """Writes what the batch collected, in one call."""
        self.batching = False
        out = self.out
        if out:
            if not self.closing:
                if len(out) == 1:
                    self.transport.write(out[0])  # type: ignore[union-attr]
                else:
                    self.transport.writelines(out)  # type: ignore[union-attr]
            out.clear()

    def write_body(self, s: Session, data: bytes) -> None:
        """Writes response body bytes in the framing chosen by :meth:`write_head`."""
        if not data or self.closing:
            return
        s.resp_bytes += len(data)
        mode = s.resp_mode
        if mode == MODE_CHUNKED:
            self.send(b"%x\r\n" % len(data))
            self.send(data)
            self.send(b"\r\n")
        elif mode != MODE_NONE:
            self.send(data)

    # -- upgrades: a byte tunnel after 101 -------------------------------------------------

    def switching_protocols(self, s: Session, headers: RawHeaders) -> None:
        """The origin accepted the upgrade: pass its 101 on, with the upgrade headers."""
        if s.upgrade is None:
            return  # the parser then reports an upgrade the client never asked for: 502
        s.response_started = True
        s.status = 101
        self.send(switching_head(headers))

    def tunnel_started(self, up: Upstream) -> None:
        """From now on bytes pass unparsed both ways (the held ones first)."""
        tunnel: Tunnel = self.tunnel  # type: ignore[assignment]
        if not self.closing:
            self._to(_TUNNEL)
        # Closing already: the upstream end is still the tunnel's, to close with the client.
        tunnel.start(up.transport)  # type: ignore[arg-type]

    def tunnel_data(self, data: bytes) -> None:
        s = self.active
        if s is not None:
            s.resp_bytes += len(data)
        self.send(data)

    def tunnel_closed(self) -> None:
        """The origin closed the tunnel: close the client's side once written."""
        self.up = None
        s = self.active
        self.close()
        if s is not None:
            self.finish(s)

    # -- responses the proxy writes itself -----------------------------------------------

    def respond(self, s: Session, status: int, headers: Any, body: bytes) -> None:
        """Writes a whole response for ``s`` (see :meth:`Session.respond`)."""
        if self.closing:
            s.response_started = True
            s.status = status
            return
        if headers is None:
            fields: RawHeaders = []
        else:
            h = ResponseHeader.build(status, headers)
            fields = [
                (n.encode("latin-1"), v.encode("latin-1"))
                for n, v in h
                if n.lower() != "content-length"
            ]
        fields.append((b"Content-Length", str(len(body)).encode()))
        self.write_head(s, status_line(status), fields, False)
        if s.resp_mode != MODE_NONE and body:
            s.resp_bytes += len(body)
            self.send(body)

    def send_continue(self, s: Session) -> None:
        """Answers ``Expect: 100-continue``: the body is wanted."""
        if not self.closing and not s.response_started:
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def bad_request(self, err: ProxyError) -> None:
        """The client sent something unparseable: answer it in turn, then close."""
        if self.state is not _STOPPED:
            self._to(_STOPPED)
        s = self.current
        self.current = None
        if s is not None:
            s.fail_body(err)
        if s is not None and s is self.starting:
            # The request the error belongs to arrived in this read: nothing of it went
            # upstream, and nothing will; it is answered now.
            self.starting = None
        elif self.active is not None:
            # Answer the requests before it first; the error goes out after them.
            if s is not None and s is not self.active and self.pipeline and s in self.pipeline:
                self.pipeline.remove(s)
            self.deferred_error = err
            return
        if s is None or not s.method:
            s = s or Session(self)
            s.start_time = s.start_time or time.time()
            s.method = s.method or b"-"
        s.keep_alive = False
        self.active = s
        self.engine.refuse(self, s, err)

    # -- end of a request ----------------------------------------------------------------

    def finish(self, s: Session) -> None:
        """The response to ``s`` is complete: log it, then serve the next request or close."""
        if not self.end_exchange(s):
            return
        if self.closing:
            return
        state = self.state
        if (
            not s.keep_alive
            or (s.has_body and not s.body_done)
            or (
                (state is _STOPPED or state is _UPGRADING)
                and not self.pipeline
                and self.deferred_error is None
            )
        ):
            self.close()
            return
        self.last_active = time.monotonic()
        if self.pipeline:
            asyncio.get_running_loop().call_soon(self._next_pipelined)
        elif self.deferred_error is not None:
            err, self.deferred_error = self.deferred_error, None
            self.bad_request(err)
        else:
            if state is _RESPONDING:
                # Nothing more on the connection (a pipelined head arriving keeps HEAD); a
                # move the table allows (RESPONDING to IDLE), so made without _to's check.
                self.state = _IDLE
            self.flow.resume_reading()

    def _next_pipelined(self) -> None:
        if self.closing or self.active is not None or not self.pipeline:
            return
        s = self.pipeline.popleft()
        if not self.pipeline and self.deferred_error is None:
            self.flow.resume_reading()
        if self.draining:
            s.keep_alive = False
        self.active = s
        self.engine.start(self, s)

    def close(self) -> None:
        """Closes the connection once what was written has gone out."""
        if self.state is _ACCEPTED:
            # Accepted, not yet made (its TLS handshake under way): connection_made closes it.
            self._to(_CLOSING)
            self.engine.connections.discard(self)
            return
        if not self.closing:
            if self.out:
                self.batching = False
                self.end_batch()
            self._to(_CLOSING)
            self.transport.close()  # type: ignore[union-attr]

    # -- draining ----------------------------------------------------------------------------

    def drain(self) -> None:
        """Graceful stop: the next response says ``Connection: close``; an idle connection is
        closed by :meth:`idle_check` once it has been idle for a moment (closing it at once
        would race a request the client may be sending). A TLS handshake under way gets
        that moment from now to complete."""
        self.draining = True
        if self.state is _ACCEPTED:
            self.last_active = time.monotonic()

    def is_idle(self) -> bool:
        return self.active is None and self.current is None and not self.pipeline

    def idle_check(self, now: float, keepalive: float, drain_idle: float) -> None:
        """Closes the connection if it has idled past its limit; a request head still
        arriving after ``timeouts.client_header_seconds`` (a slowloris) gets 408."""
        if self.state is _ACCEPTED:
            # Accepted, not yet made: while draining, a handshake gets the moment an idle
            # connection gets; otherwise it is forgotten once it can no longer complete.
            if now - self.last_active >= (drain_idle if self.draining else UNMADE_FORGET_SECONDS):
                self.engine.connections.discard(self)
            return
        if self.is_idle():
            limit = drain_idle if self.draining else keepalive
            if now - self.last_active >= limit:
                self.close()
        elif self.state is _HEAD and now - self.head_started >= self.engine.header_timeout:
            self.bad_request(downstream_error(ErrorKind.HEADER_TIMEOUT))
