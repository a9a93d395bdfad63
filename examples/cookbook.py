"""Cookbook: small apps that each do one common thing, with their settings in ``app_options``.

Run one in front of the demo origins, for example::

    scripts/start --app examples.cookbook:BearerAuth

(the embedded default config has no ``app_options``, so each recipe falls back to the demo
origins there), or name it in a config file, beside which this file is importable as
``cookbook``::

    app: cookbook:Canary
    app_options:
      stable: 127.0.0.1:8001
      canary: 127.0.0.1:8002
      percent: 5

Every setting is checked in ``configure``: a wrong one stops the worker with the reason in the
error log, before it serves.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

from shared import HttpPeer, ProxyHttp, RequestHeader, ResponseHeader, Session
from shared.config import Config

#: The demo origins of the embedded default config, used when ``app_options`` has no address.
DEMO_ORIGINS = ("127.0.0.1:6190", "127.0.0.1:6191")


def peer_option(options: dict[str, Any], key: str, default: str) -> HttpPeer:
    """``app_options[key]`` (a ``"host:port"``) as a peer; raises ValueError naming the key."""
    value = options.get(key, default)
    try:
        return HttpPeer(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"app_options.{key}: {e}") from None


# -- (a) authentication ----------------------------------------------------------------------


class BearerAuth(ProxyHttp):
    """Lets through requests with ``Authorization: Bearer <token>`` for a known token.

    No credentials: 401 with ``WWW-Authenticate``. Credentials that are wrong (an unknown token,
    another scheme): 403. The token is not passed on to the origin.

    ``app_options``: ``origin`` (``"host:port"``), ``tokens`` (a list of accepted tokens).
    """

    def configure(self, config: Config) -> None:
        super().configure(config)
        options = config.app_options
        self.origin = peer_option(options, "origin", DEMO_ORIGINS[0])
        tokens = options.get("tokens", ["let-me-in"])
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            raise ValueError("app_options.tokens: expected a list of non-empty strings")
        self.tokens = [t.encode() for t in tokens]

    def request_filter(self, session: Session, ctx: Any) -> bool:
        credentials = session.req_header.get("Authorization")
        if credentials is None:
            session.respond(
                401, {"WWW-Authenticate": 'Bearer realm="tenaya"'}, "credentials needed\n"
            )
            return True
        scheme, _, token = credentials.partition(" ")
        if scheme.lower() != "bearer" or not self.known(token.strip().encode("latin-1")):
            session.respond(403, {"Content-Type": "text/plain"}, "wrong credentials\n")
            return True
        return False

    def known(self, token: bytes) -> bool:
        """True when ``token`` is one of the accepted ones (compared in constant time)."""
        found = False
        for accepted in self.tokens:
            found |= hmac.compare_digest(token, accepted)
        return found

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        return self.origin

    def upstream_request_filter(
        self, session: Session, upstream_request: RequestHeader, ctx: Any
    ) -> None:
        upstream_request.remove("Authorization")


# -- (b) routing by header and by path prefix --------------------------------------------------


@dataclass
class Route:
    """Where one request goes, and the path prefix to take off on the way."""

    peer: HttpPeer
    strip: str = ""


class Router(ProxyHttp):
    """Routes by a request header first, then by path prefix, else to the default origin.

    A path prefix route takes its prefix off the path the origin sees: with the prefix
    ``/api/v1``, ``/api/v1/users?id=7`` reaches its origin as ``/users?id=7`` (and ``/api/v1``
    as ``/``). A prefix matches whole path segments (``/api/v1x`` does not match ``/api/v1``);
    the longest matching prefix wins.

    ``app_options``: ``default`` (``"host:port"``), ``header`` (a header name, default
    ``X-Backend``), ``header_routes`` (header value -> ``"host:port"``), ``prefix_routes``
    (path prefix -> ``"host:port"``).
    """

    def configure(self, config: Config) -> None:
        super().configure(config)
        options = config.app_options
        self.default = Route(peer_option(options, "default", DEMO_ORIGINS[0]))
        self.header = str(options.get("header", "X-Backend"))
        by_header = options.get("header_routes", {})
        self.by_header = {
            str(value): Route(peer_option(by_header, value, "")) for value in by_header
        }
        by_prefix = options.get("prefix_routes", {"/api/v1": DEMO_ORIGINS[-1]})
        for prefix in by_prefix:
            if not prefix.startswith("/") or prefix.endswith("/"):
                raise ValueError(
                    f"app_options.prefix_routes: {prefix!r} must start with / and not end with one"
                )
        # Longest first, so that /api/v1 wins over /api.
        self.by_prefix = [
            (prefix, Route(peer_option(by_prefix, prefix, ""), strip=prefix))
            for prefix in sorted(by_prefix, key=len, reverse=True)
        ]

    def new_ctx(self) -> Any:
        return {"route": self.default}

    def request_filter(self, session: Session, ctx: Any) -> bool:
        req = session.req_header
        route = self.by_header.get(req.get(self.header) or "")
        if route is None:
            path = req.path.partition("?")[0]
            route = next(
                (
                    r
                    for prefix, r in self.by_prefix
                    if path == prefix or path.startswith(prefix + "/")
                ),
                self.default,
            )
        ctx["route"] = route
        return False

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        return ctx["route"].peer

    def upstream_request_filter(
        self, session: Session, upstream_request: RequestHeader, ctx: Any
    ) -> None:
        strip = ctx["route"].strip
        if strip:
            rest = upstream_request.path[len(strip) :]
            upstream_request.path = rest if rest.startswith("/") else "/" + rest


# -- (c) a canary ------------------------------------------------------------------------------


def canary_bucket(key: str) -> int:
    """A number from 0 to 99 that depends on ``key`` only (the same in every worker and run)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % 100


class Canary(ProxyHttp):
    """Sends ``percent`` % of the requests to the canary origin, the others to the stable one.

    The choice hashes the request's ``X-Request-Id`` (or, without one, the client's IP address),
    so a request id, or a client, always lands on the same side: 0 sends nothing to the canary,
    100 everything. The response says which side answered in ``X-Canary: yes|no``.

    ``app_options``: ``stable`` and ``canary`` (``"host:port"``), ``percent`` (0 to 100).
    """

    def configure(self, config: Config) -> None:
        super().configure(config)
        options = config.app_options
        self.stable = peer_option(options, "stable", DEMO_ORIGINS[0])
        self.canary = peer_option(options, "canary", DEMO_ORIGINS[-1])
        percent = options.get("percent", 10)
        if (
            isinstance(percent, bool)
            or not isinstance(percent, (int, float))
            or not (0 <= percent <= 100)
        ):
            raise ValueError(f"app_options.percent: expected 0 to 100, got {percent!r}")
        self.percent = percent

    def new_ctx(self) -> Any:
        return {"canary": False}

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        key = session.req_header.get("X-Request-Id") or session.client_addr[0]
        ctx["canary"] = canary_bucket(key) < self.percent
        return self.canary if ctx["canary"] else self.stable

    def response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: Any
    ) -> None:
        upstream_response.set("X-Canary", "yes" if ctx["canary"] else "no")


# -- (d) adding response headers ---------------------------------------------------------------


class ResponseHeaders(ProxyHttp):
    """Sets response header fields on every response from the origin.

    The response phases see upstream responses only: a response the app writes itself with
    ``session.respond`` (or an error page) carries the fields only if it is given them there.

    ``app_options``: ``origin`` (``"host:port"``), ``headers`` (field name -> value; a value
    replaces the origin's own).
    """

    def configure(self, config: Config) -> None:
        super().configure(config)
        options = config.app_options
        self.origin = peer_option(options, "origin", DEMO_ORIGINS[0])
        headers = options.get("headers", {"X-Frame-Options": "DENY"})
        if not isinstance(headers, dict):
            raise ValueError("app_options.headers: expected a mapping of field names to values")
        for name, value in headers.items():
            if not isinstance(value, str) or "\r" in value or "\n" in value:
                raise ValueError(f"app_options.headers.{name}: expected one line of text")
        self.headers = list(headers.items())

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        return self.origin

    def response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: Any
    ) -> None:
        for name, value in self.headers:
            upstream_response.set(name, value)


# -- (e) logging a field of your own -----------------------------------------------------------

log = logging.getLogger("myapp")


@dataclass
class Timing:
    """The per-request context of :class:`TenantLog`."""

    tenant: str = "-"
    started: float = 0.0


class TenantLog(ProxyHttp):
    """Logs one line per request to the ``myapp`` logger, with a field the access log does not
    have: the tenant named by a request header.

    ``tenant=acme GET /orders status=200 upstream=127.0.0.1:8001 ms=1.2``

    ``app_options``: ``origin`` (``"host:port"``), ``tenant_header`` (default ``X-Tenant``).
    """

    def configure(self, config: Config) -> None:
        super().configure(config)
        options = config.app_options
        self.origin = peer_option(options, "origin", DEMO_ORIGINS[0])
        self.tenant_header = str(options.get("tenant_header", "X-Tenant"))

    def new_ctx(self) -> Any:
        return Timing(started=time.monotonic())

    def request_filter(self, session: Session, ctx: Any) -> bool:
        ctx.tenant = session.req_header.get(self.tenant_header) or "-"
        return False

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        return self.origin

    def logging(self, session: Session, error: Any, ctx: Any) -> None:
        if ctx is None:
            return  # a request refused before it was read: no context
        req = session.req_header
        log.info(
            "tenant=%s %s %s status=%d upstream=%s ms=%.1f%s",
            ctx.tenant,
            req.method,
            req.path,
            session.status or (error.status if error else 0),
            session.peer or "-",
            (time.monotonic() - ctx.started) * 1000,
            f" error={error.kind.name}" if error else "",
        )
