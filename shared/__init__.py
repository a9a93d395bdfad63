"""What both the master and the workers use, and what apps import.

Apps need only this package's top level::

    from shared import ProxyHttp, HttpPeer, Session

The app API (:data:`__all__`) is loaded on first use, not when the package is: the master
imports ``shared.config`` and ``shared.ipc``, which runs this file, and must not load the app
API nor anything an app could pull in with it (the import contracts in pyproject.toml).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.app import ProxyHttp
    from shared.balancer import Balancer
    from shared.errors import ErrorKind, ErrorSource, ProxyError, RetryType
    from shared.headers import RequestHeader, ResponseHeader
    from shared.peer import HttpPeer, PeerOptions
    from shared.session import Session

__all__ = [
    "Balancer",
    "ErrorKind",
    "ErrorSource",
    "HttpPeer",
    "PeerOptions",
    "ProxyError",
    "ProxyHttp",
    "RequestHeader",
    "ResponseHeader",
    "RetryType",
    "Session",
]

#: The module each name of :data:`__all__` comes from (as the imports above say, for mypy).
_HOMES = {
    "Balancer": "shared.balancer",
    "ErrorKind": "shared.errors",
    "ErrorSource": "shared.errors",
    "HttpPeer": "shared.peer",
    "PeerOptions": "shared.peer",
    "ProxyError": "shared.errors",
    "ProxyHttp": "shared.app",
    "RequestHeader": "shared.headers",
    "ResponseHeader": "shared.headers",
    "RetryType": "shared.errors",
    "Session": "shared.session",
}

if not TYPE_CHECKING:
    # Hidden from mypy, which would otherwise type every unknown name of ``shared`` as Any.

    def __getattr__(name: str) -> Any:
        """``shared.ProxyHttp`` and ``from shared import ProxyHttp``: import the name's module
        on first use and keep the name here, so that the next use is a plain lookup. Raises
        ``AttributeError`` for any other name (which is how ``from shared import ipc`` goes on
        to import the submodule)."""
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
