"""The built-in load balancer app: round robin over ``upstreams.<name>.servers``.

Requests whose Host header (without port) is listed in an upstream's ``hosts`` go to that
upstream; every other request goes to the first upstream. Each worker starts its rotation at its
own slot, so consecutive new connections spread over the servers from the first request on.
"""

from __future__ import annotations

from typing import Any

from shared.app import ProxyHttp
from shared.config import Config
from shared.errors import ErrorKind, upstream_error
from shared.peer import HttpPeer, PeerOptions
from shared.session import Session


def _strip_port(host: str) -> str:
    """``example.com:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``."""
    if host.startswith("["):
        end = host.find("]")
        return host[:end + 1] if end > 0 else host
    return host.rsplit(":", 1)[0]


class RoundRobin:
    """Cycles over a fixed list of peers."""

    __slots__ = ("peers", "_next")

    def __init__(self, peers: list[HttpPeer], start: int = 0) -> None:
        self.peers = peers
        self._next = start % len(peers) if peers else 0

    def select(self) -> HttpPeer:
        """The next peer in turn."""
        i = self._next
        peer = self.peers[i]
        self._next = i + 1 if i + 1 < len(self.peers) else 0
        return peer


class LoadBalancer(ProxyHttp):
    """Round robin over the configured upstreams, with routing by Host."""

    def configure(self, config: Config) -> None:
        super().configure(config)
        self.default: RoundRobin | None = None
        self.by_host: dict[str, RoundRobin] = {}
        for upstream in config.upstreams.values():
            if not upstream.servers:
                continue
            options = PeerOptions(http2=upstream.http2)
            rr = RoundRobin([HttpPeer(s, options=options) for s in upstream.servers],
                            start=self.worker_id)
            if self.default is None:
                self.default = rr
            for host in upstream.hosts:
                self.by_host[host.lower()] = rr
        self._route = bool(self.by_host)

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        rr = self.default
        if self._route:
            host = session.host
            if host:
                rr = self.by_host.get(_strip_port(host).lower(), rr)
        if rr is None:
            raise upstream_error(ErrorKind.NO_PEER, "no upstream servers configured")
        return rr.select()
