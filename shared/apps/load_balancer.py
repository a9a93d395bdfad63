"""The built-in load balancer app: each upstream's ``balance`` over ``upstreams.<name>.servers``,
fleet-wide.

Requests whose Host header (without port) is listed in an upstream's ``hosts`` go to that
upstream; every other request goes to the first upstream with servers. Each upstream's servers
are chosen by its :class:`~shared.balancer.Balancer` (``ProxyHttp.balancer``), which counts in
the fleet's shared balance table: consecutive requests go to consecutive servers whichever
worker takes them (round robin), and least_conn sees every worker's requests in flight.

It is what a config without ``app`` runs (:data:`shared.app.BUILTIN_APP`), an ordinary
:class:`~shared.app.ProxyHttp` subclass: an app may subclass it to add phases.
"""

from __future__ import annotations

from shared.app import ProxyHttp
from shared.balancer import Balancer
from shared.config import Config
from shared.errors import ErrorKind, upstream_error
from shared.peer import HttpPeer
from shared.session import Session


def _strip_port(host: str) -> str:
    """``example.com:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.rsplit(":", 1)[0]


class LoadBalancer(ProxyHttp[None]):
    """Each upstream's balance over its servers, with routing by Host."""

    def configure(self, config: Config) -> None:
        """Builds the balancer of every upstream with servers; the first is the default."""
        super().configure(config)
        self.default: Balancer | None = None
        self.by_host: dict[str, Balancer] = {}
        for name, upstream in config.upstreams.items():
            if not upstream.servers:
                continue
            balancer = self.balancer(name)
            if self.default is None:
                self.default = balancer
            for host in upstream.hosts:
                self.by_host[host.lower()] = balancer
        self._route = bool(self.by_host)

    def upstream_peer(self, session: Session, ctx: None) -> HttpPeer:
        """The server the balancer of the upstream that the request's Host names (or of the
        first upstream) chooses. Raises a ``NO_PEER`` error (502) when no upstream has
        servers, or when none of the upstream's servers is usable."""
        b = self.default
        if self._route:
            host = session.host
            if host:
                b = self.by_host.get(_strip_port(host).lower(), b)
        if b is None:
            raise upstream_error(ErrorKind.NO_PEER, "no upstream servers configured")
        peer = b.select_for(session)
        if peer is None:
            raise upstream_error(ErrorKind.NO_PEER, f"upstream {b.name}: no usable server")
        return peer
