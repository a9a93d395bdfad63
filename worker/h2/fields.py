"""The rules an HTTP/2 request's fields must follow (RFC 9113 8.2, 8.3) before the proxy
sends it on as HTTP/1.1: what would make the upstream read another request line, another
Host, or another body than the client sent is malformed.
"""

from __future__ import annotations

import re

from shared.headers import valid_host
from worker.h2.hpack import Fields

#: Characters allowed in a field name: tchar (RFC 9110 5.6.2), lower case only.
_BAD_NAME = re.compile(rb"[^a-z0-9!#$%&'*+.^_`|~-]")
#: A value may not hold NUL, CR or LF, nor start or end with whitespace (RFC 9113 8.2.1).
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
#: A method is a token (RFC 9110 9.1).
_BAD_METHOD = re.compile(rb"[^A-Za-z0-9!#$%&'*+.^_`|~-]")
#: What may not appear in :path: it becomes the HTTP/1.1 request line upstream, where
#: whitespace or control characters would split or bend the request, and no fragment is part
#: of a request target (RFC 9112 3.2). :authority and host become the upstream Host: each must
#: be an RFC 3986 host with an optional port (:func:`shared.headers.valid_host`; no userinfo,
#: RFC 9113 8.3.1, no path), the rule an HTTP/1.1 Host meets.
_BAD_PATH = re.compile(rb"[\x00-\x20\x7f#]")
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_CONNECTION_FIELDS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


def check_request(fields: Fields) -> tuple[str | None, int]:
    """Why a request's header list is malformed (RFC 9113 8.2, 8.3), or None; and its
    content-length (-1 if it has none), which the body must then match (RFC 9113 8.1.1: an
    HTTP/1.1 upstream would otherwise read the rest of the body as another request)."""
    pseudo: set[bytes] = set()
    regular = False
    method = b""
    authority: bytes | None = None
    host: bytes | None = None
    star = False
    length = -1
    for name, value in fields:
        if _BAD_VALUE.search(value):
            return f"invalid value of {name!r}", length
        if name[:1] == b":":
            if regular:
                return f"{name!r} after a regular field", length
            if name not in _REQUEST_PSEUDO or name in pseudo:
                return f"unexpected or repeated {name!r}", length
            if name == b":method":
                if not value or _BAD_METHOD.search(value):
                    return "invalid :method", length
                method = value
            elif name == b":authority":
                if not value or not valid_host(value):
                    return "invalid :authority", length
                authority = value
            elif name == b":path":
                if not (value[:1] == b"/" or value == b"*") or _BAD_PATH.search(value):
                    return "invalid :path", length
                star = value == b"*"
            pseudo.add(name)
            continue
        regular = True
        if not name or _BAD_NAME.search(name):
            return f"invalid field name {name!r}", length
        if name in _CONNECTION_FIELDS or (name == b"te" and value != b"trailers"):
            return f"connection-specific field {name!r}", length
        if name == b"content-length":
            # Repeats must agree (RFC 9110 8.6); a list or a sign is malformed.
            if not value.isdigit() or (length >= 0 and int(value) != length):
                return "invalid content-length", length
            length = int(value)
        elif name == b"host":
            # The app reads Host, the upstream gets :authority: they must be one value.
            if host is not None or (authority is not None and value != authority):
                return "repeated host, or host and :authority differ", length
            if not value or not valid_host(value):
                return "invalid host", length
            host = value
    if method == b"CONNECT":
        if b":authority" not in pseudo or b":scheme" in pseudo or b":path" in pseudo:
            return "CONNECT needs :authority alone", length
    elif not method or b":scheme" not in pseudo or b":path" not in pseudo:
        return "missing :method, :scheme or :path", length
    elif star and method != b"OPTIONS":
        return ":path * is for OPTIONS only", length
    return None, length


def check_trailers(fields: Fields) -> str | None:
    for name, value in fields:
        if not name or _BAD_NAME.search(name) or _BAD_VALUE.search(value):
            return f"invalid trailer {name!r}"
        if name in _CONNECTION_FIELDS:
            return f"connection-specific trailer {name!r}"
    return None


def header_list_size(fields: Fields) -> int:
    """The size SETTINGS_MAX_HEADER_LIST_SIZE limits (RFC 9113 6.5.2)."""
    return sum(len(n) + len(v) + 32 for n, v in fields)
