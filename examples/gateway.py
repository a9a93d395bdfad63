"""A small API gateway: the README's first custom app.

Run it in front of the demo origins with ``scripts/start --app examples.gateway:Gateway``.
"""

from __future__ import annotations

from typing import Any

from shared import HttpPeer, ProxyHttp, RequestHeader, ResponseHeader, Session
from shared.config import Config


class Gateway(ProxyHttp):
    def configure(self, config: Config) -> None:
        super().configure(config)
        servers = next(iter(config.upstreams.values())).servers
        self.api = HttpPeer(servers[0])
        self.web = HttpPeer(servers[-1])

    def request_filter(self, session: Session, ctx: Any) -> bool:
        req = session.req_header
        if req.path.startswith("/admin") and "authorization" not in req:
            session.respond(401, {"WWW-Authenticate": "Bearer"}, "log in first\n")
            return True
        return False

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        return self.api if session.req_header.path.startswith("/api/") else self.web

    def upstream_request_filter(
        self, session: Session, upstream_request: RequestHeader, ctx: Any
    ) -> None:
        upstream_request.set("X-Gateway", "tenaya")

    def response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: Any
    ) -> None:
        upstream_response.set("Server", "tenaya-gateway")
