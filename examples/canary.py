"""A canary release: requests that ask for it (``X-Canary: 1``) and a share of the others go to
the ``canary`` upstream, the rest to ``stable``; each upstream is balanced fleet-wide by its
own ``balance`` (``ProxyHttp.balancer``).

    upstreams:
      stable: {servers: [10.0.0.1:8080, 10.0.0.2:8080]}
      canary: {servers: [10.0.1.1:8080]}
    app: examples.canary:Canary
    app_options: {canary_percent: 5}
"""

from __future__ import annotations

import random

from shared import ErrorKind, HttpPeer, ProxyHttp, Session
from shared.config import Config
from shared.errors import upstream_error


class Canary(ProxyHttp[None]):
    def configure(self, config: Config) -> None:
        super().configure(config)
        self.stable = self.balancer("stable")
        self.canary = self.balancer("canary")
        percent = config.app_options.get("canary_percent", 5)
        if not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
            raise ValueError("app_options.canary_percent: expected a number from 0 to 100")
        self.share = percent / 100

    def upstream_peer(self, session: Session, ctx: None) -> HttpPeer:
        asked = session.req_header.get("X-Canary") == "1"
        peer = None
        if asked or random.random() < self.share:
            peer = self.canary.select()
        if peer is None:  # not for the canary, or no canary server usable
            peer = self.stable.select()
        if peer is None:
            raise upstream_error(ErrorKind.NO_PEER, "no usable server")
        return peer
