"""What a master is given: config mappings for 127.0.0.1 port 0, the source of an app module
that proxies to an origin, and every declared setting found from the config dataclasses."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from shared.config import Config

_ORIGIN_APP = """
import os
from shared import HttpPeer, ProxyHttp

class App(ProxyHttp):
    def configure(self, config):
        super().configure(config)
        self.peer = HttpPeer(config.app_options["origin"])

    def upstream_peer(self, session, ctx):
        return self.peer
"""


def origin_app(phases: str = "") -> str:
    """Source of an app module ``App`` proxying to ``app_options.origin``, with ``phases``
    (more methods, indented as in the class body) added."""
    return _ORIGIN_APP + phases


def declared_settings(cls: Any = Config, prefix: str = "") -> dict[str, dataclasses.Field[Any]]:
    """Every leaf setting under ``cls`` by key path (as a user writes it), found from the
    dataclass declarations independently of the reference the project generates."""
    out: dict[str, dataclasses.Field[Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("source", "raw"):
            continue
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out.update(declared_settings(tp, f"{prefix}{f.name}."))
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(args[0]):
            out.update(declared_settings(args[0], f"{prefix}{f.name}[]."))
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(args[1]):
            out.update(declared_settings(args[1], f"{prefix}{f.name}.<name>."))
        elif any(dataclasses.is_dataclass(a) for a in args):
            # An optional section: its own row, then its settings.
            out[prefix + f.name] = f
            inner = next(a for a in args if dataclasses.is_dataclass(a))
            out.update(declared_settings(inner, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = f
    return out


def config_for(upstreams: dict[str, list[str]] | None = None, **sections: Any) -> dict[str, Any]:
    """A config mapping listening on 127.0.0.1:0; ``sections`` are merged over it."""
    config: dict[str, Any] = {
        "server": {"workers": 2, "grace_period_seconds": 10},
        "listeners": [{"address": "127.0.0.1:0"}],
    }
    if upstreams is not None:
        config["upstreams"] = {name: {"servers": servers} for name, servers in upstreams.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config
