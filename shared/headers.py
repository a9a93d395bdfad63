"""Request and response headers: case-insensitive, multi-valued, order-preserving.

Names keep the case they arrived with (or were given); lookups ignore case. Values are ``str``
decoded as Latin-1, the way HTTP/1.1 header bytes map to text (RFC 9110, section 5.5), so any byte
sequence survives the round trip unchanged.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator

RawHeaders = list[tuple[bytes, bytes]]

# RFC 3986 3.2.2 and 3.2.3: host = IP-literal / IPv4address / reg-name, then [":" port].
# IPv4address is a reg-name by its characters, so the pattern has two arms: a reg-name
# (unreserved, sub-delims and pct-encoded octets; written unrolled, with no nested repetition
# that could backtrack) and a bracketed literal, checked again by ipaddress when it is IPv6.
_REG_CHAR = rb"[A-Za-z0-9\-._~!$&'()*+,;=]"
_HOST = re.compile(
    rb"(?:" + _REG_CHAR + rb"*(?:%[0-9A-Fa-f]{2}" + _REG_CHAR + rb"*)*"
    rb"|\[[0-9A-Fa-f:.]+\]"
    rb"|\[[vV][0-9A-Fa-f]+\.(?:" + _REG_CHAR + rb"|:)+\])"
    rb"(?::[0-9]{0,5})?"
).fullmatch
#: An absolute-form request target (RFC 9112 3.2.2): scheme, authority, and the rest.
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)", re.DOTALL).fullmatch


def valid_host(value: bytes) -> bool:
    """True when ``value`` (a Host field or an authority) is an RFC 3986 host with an
    optional port: a registered name or IPv4 address, or a bracketed IPv6 (or IPvFuture)
    literal; the port digits only. Userinfo, a path, whitespace or a second colon make it
    false. Empty is true (RFC 9112 3.2: the Host of a target URI without authority)."""
    if _HOST(value) is None:
        return False
    if value[:1] == b"[" and value[1:2] not in (b"v", b"V"):
        try:
            ipaddress.IPv6Address(value[1 : value.index(b"]")].decode("ascii"))
        except ValueError:
            return False
    return True


def split_absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """``(authority, origin-form target)`` of an absolute-form request target
    (``b"http://a.example:8080/p?q"`` -> ``(b"a.example:8080", b"/p?q")``; an empty path
    becomes ``/``), or None when it is not an ``http`` or ``https`` URI with a valid host
    (:func:`valid_host`; userinfo is refused, RFC 9110 4.2.4) or holds a fragment."""
    m = _ABSOLUTE(target)
    if m is None:
        return None
    scheme, authority, rest = m.groups()
    if (
        scheme.lower() not in (b"http", b"https")
        or not authority
        or b"#" in rest
        or not valid_host(authority)
    ):
        return None
    if rest[:1] != b"/":
        rest = b"/" + rest
    return authority, rest


class Headers:
    """An ordered list of ``(name, value)`` fields with case-insensitive lookup.

    The base of :class:`RequestHeader` and :class:`ResponseHeader`. Iterating gives the
    ``(name, value)`` pairs in order; ``len()`` counts them; ``"name" in headers`` ignores case.
    Names and values are ``str``; a value must be Latin-1 text without CR or LF (the engine
    writes it as it is).
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields: list[tuple[str, str]] = list(fields)

    @classmethod
    def from_raw(cls, raw: RawHeaders) -> Headers:
        """Headers from ``(name, value)`` byte pairs (as a parser gives them), decoded as
        Latin-1."""
        h = cls.__new__(cls)
        h._fields = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw]
        return h

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` (any case), or ``default`` when there is none."""
        lname = name.lower()
        for n, v in self._fields:
            if n.lower() == lname:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name`` (any case), in order; ``[]`` when there is none."""
        lname = name.lower()
        return [v for n, v in self._fields if n.lower() == lname]

    def set(self, name: str, value: str) -> None:
        """Replaces every value of ``name`` (any case) with one ``value``, written with the
        case of ``name``: it takes the place of the first one, or is appended when there was
        none."""
        lname = name.lower()
        for i, (n, _) in enumerate(self._fields):
            if n.lower() == lname:
                self._fields[i] = (name, value)
                self._fields[i + 1 :] = [f for f in self._fields[i + 1 :] if f[0].lower() != lname]
                return
        self._fields.append((name, value))

    def append(self, name: str, value: str) -> None:
        """Adds a field ``name: value`` at the end, keeping any other value of ``name``."""
        self._fields.append((name, value))

    def remove(self, name: str) -> bool:
        """Removes every value of ``name`` (any case); True if there was one."""
        lname = name.lower()
        before = len(self._fields)
        self._fields = [f for f in self._fields if f[0].lower() != lname]
        return len(self._fields) != before

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        lname = name.lower()
        return any(n.lower() == lname for n, _ in self._fields)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def items(self) -> list[tuple[str, str]]:
        """A copy of the fields as ``(name, value)`` pairs."""
        return list(self._fields)

    def encode(self) -> bytes:
        """The fields as HTTP/1.1 header lines, each ending in CRLF."""
        return "".join(f"{n}: {v}\r\n" for n, v in self._fields).encode("latin-1")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._fields!r})"


class RequestHeader(Headers):
    """The request line and header fields of a request: ``session.req_header`` and the
    ``upstream_request`` of ``upstream_request_filter``.

    ``method`` and ``path`` may be changed by a phase, and the fields (see :class:`Headers`);
    the upstream gets what they hold when the request is sent.
    """

    __slots__ = ("method", "path", "version")

    method: str
    """The request method, ``"GET"``."""
    path: str
    """The request target, query included, as sent (``"/a/b?c=1"``); assign it to send another
    target upstream."""
    version: str
    """The HTTP version of the request line: ``"1.0"``, ``"1.1"`` or ``"2"`` on
    ``session.req_header``, where changing it has no effect; ``"1.1"`` on ``upstream_request``."""

    def __init__(
        self, method: str, path: str, version: str = "1.1", fields: Iterable[tuple[str, str]] = ()
    ) -> None:
        super().__init__(fields)
        self.method = method
        self.path = path
        self.version = version

    def encode_head(self) -> bytes:
        """The request line and fields as HTTP/1.1 bytes, ending with the empty line."""
        return (
            f"{self.method} {self.path} HTTP/{self.version}\r\n".encode("latin-1")
            + self.encode()
            + b"\r\n"
        )


class ResponseHeader(Headers):
    """The status and header fields of a response: the ``upstream_response`` of the response
    phases, whose changes are what the client gets."""

    __slots__ = ("status", "reason")

    status: int
    """The status code (``200``); may be changed."""
    reason: str | None
    """The reason phrase to send, or None for the standard one of ``status``. The upstream's own
    phrase is not kept (None when the phases get it)."""

    def __init__(
        self, status: int, fields: Iterable[tuple[str, str]] = (), reason: str | None = None
    ) -> None:
        super().__init__(fields)
        self.status = status
        self.reason = reason

    @classmethod
    def build(
        cls, status: int, headers: Iterable[tuple[str, str]] | dict[str, str] = ()
    ) -> ResponseHeader:
        """A response header from a status and a dict or a list of ``(name, value)``
        fields."""
        fields = headers.items() if isinstance(headers, dict) else headers
        return cls(status, fields)
