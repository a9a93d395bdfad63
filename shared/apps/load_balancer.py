"""The built-in load balancer app: round robin over ``upstreams.<name>.servers``.

Requests whose Host header (without port) is listed in an upstream's ``hosts`` go to that
upstream; every other request goes to the first upstream. Each worker starts its rotation at its
own slot, so consecutive new connections spread over the servers from the first request on.

It is what a config without ``app`` runs (:data:`shared.app.BUILTIN_APP`), an ordinary
:class:`~shared.app.ProxyHttp` subclass: an app may subclass it to add phases.
"""

from __future__ import annotations

from shared.app import ProxyHttp
from shared.config import Config
from shared.errors import ErrorKind, upstream_error
from shared.lb import RoundRobin
from shared.peer import HttpPeer, PeerOptions
from shared.session import Session


def _strip_port(host: str) -> str:
    """``example.com:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.rsplit(":", 1)[0]


class LoadBalancer(ProxyHttp[None]):
    """Round robin over the configured upstreams, with routing by Host."""

    def configure(self, config: Config) -> None:
        """Builds one rotation per upstream with servers; the first is the default."""
        super().configure(config)
        self.default: RoundRobin[HttpPeer] | None = None
        self.by_host: dict[str, RoundRobin[HttpPeer]] = {}
        for upstream in config.upstreams.values():
            if not upstream.servers:
                continue
            options = PeerOptions(http2=upstream.http2)
            rr = RoundRobin(
                [HttpPeer(s, options=options) for s in upstream.servers], start=self.worker_id
            )
            if self.default is None:
                self.default = rr
            for host in upstream.hosts:
                self.by_host[host.lower()] = rr
        self._route = bool(self.by_host)

    def upstream_peer(self, session: Session, ctx: None) -> HttpPeer:
        """The next server of the upstream that the request's Host names, or of the first
        upstream. Raises a ``NO_PEER`` error (502) when no upstream has servers."""
        rr = self.default
        if self._route:
            host = session.host
            if host:
                rr = self.by_host.get(_strip_port(host).lower(), rr)
        if rr is None:
            raise upstream_error(ErrorKind.NO_PEER, "no upstream servers configured")
        return rr.select()
