"""What ``balance: hash`` hashes: the ``hash_key`` setting made into a function of the request.

``hash_key`` is one of ``header:NAME``, ``cookie:NAME``, ``query:NAME``, ``path`` or
``client_ip``. :func:`key_function` parses it once (at configure time; a bad one raises
``ValueError`` with the reason, for the config error) and returns a function from a request to
the key's bytes, or None when the request has no such field: the selector then balances that
request by round robin, as nginx does with an empty key.

The functions read only what :class:`KeySource` names (a :class:`~shared.session.Session` has
it): the request's fields and target as received, and the client's address. Values are taken as
sent, not decoded, so the same bytes always give the same server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

#: The ``hash_key`` forms, for error messages and docs.
KEY_FORMS = ("header:NAME", "cookie:NAME", "query:NAME", "path", "client_ip")


class KeySource(Protocol):
    """What the key functions read from a request (a Session provides it)."""

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        """The request's fields as received, ``(name, value)`` byte pairs."""
        ...

    @property
    def url(self) -> bytes:
        """The request target as received, origin-form (``/a?b=1``)."""
        ...

    @property
    def client_addr(self) -> tuple[str, int]:
        """The client's ``(ip, port)``."""
        ...


KeyFunction = Callable[[KeySource], "bytes | None"]


def header_value(request: KeySource, name: bytes) -> bytes | None:
    """The first field named ``name`` (lower-case bytes), or None."""
    for field, value in request.raw_headers:
        if field.lower() == name:
            return value
    return None


def cookie_value(request: KeySource, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the Cookie fields (RFC 6265 ``name=value; ...``), or
    None."""
    for field, value in request.raw_headers:
        if field.lower() != b"cookie":
            continue
        for pair in value.split(b";"):
            k, eq, v = pair.strip().partition(b"=")
            if eq and k == name:
                return v.strip()
    return None


def query_value(request: KeySource, name: bytes) -> bytes | None:
    """The value of the first query parameter ``name`` (``?name=value&...``, as sent), or
    None; a parameter without ``=`` has the empty value."""
    _, sep, query = request.url.partition(b"?")
    if not sep:
        return None
    for pair in query.split(b"#", 1)[0].split(b"&"):
        k, _, v = pair.partition(b"=")
        if k == name:
            return v
    return None


def path_value(request: KeySource) -> bytes | None:
    """The request's path, without the query."""
    return request.url.partition(b"?")[0] or None


def client_ip_value(request: KeySource) -> bytes | None:
    """The client's IP address as text (the socket's, not X-Forwarded-For)."""
    return request.client_addr[0].encode("ascii")


def key_function(spec: str) -> KeyFunction:
    """The function that ``hash_key: spec`` means. Raises ``ValueError`` naming the forms
    when ``spec`` is none of them, or when a name is missing."""
    kind, colon, name = spec.partition(":")
    if not colon:
        if spec == "path":
            return path_value
        if spec == "client_ip":
            return client_ip_value
    else:
        if not name or not name.isascii() or any(c in name for c in " \t;=&?"):
            raise ValueError(f"{spec!r}: {kind}: needs a name (for example {kind}:X-User)")
        if kind == "header":
            field = name.lower().encode("ascii")
            return lambda request: header_value(request, field)
        if kind == "cookie":
            cookie = name.encode("ascii")
            return lambda request: cookie_value(request, cookie)
        if kind == "query":
            param = name.encode("ascii")
            return lambda request: query_value(request, param)
    raise ValueError(f"{spec!r}: expected one of {', '.join(KEY_FORMS)}")
