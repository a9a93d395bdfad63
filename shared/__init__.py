"""What both the master and the workers use, and what apps import.

Apps need only this package's top level::

    from shared import ProxyHttp, HttpPeer, Session
"""

from shared.app import ProxyHttp
from shared.errors import ErrorKind, ErrorSource, ProxyError, RetryType
from shared.headers import RequestHeader, ResponseHeader
from shared.peer import HttpPeer, PeerOptions
from shared.session import Session

__all__ = [
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
