"""Request and response headers: case-insensitive, multi-valued, order-preserving.

Names keep the case they arrived with (or were given); lookups ignore case. Values are ``str``
decoded as Latin-1, the way HTTP/1.1 header bytes map to text (RFC 9110, section 5.5), so any byte
sequence survives the round trip unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

RawHeaders = list[tuple[bytes, bytes]]


class Headers:
    """An ordered list of ``(name, value)`` fields with case-insensitive lookup."""

    __slots__ = ("_fields",)

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields: list[tuple[str, str]] = list(fields)

    @classmethod
    def from_raw(cls, raw: RawHeaders) -> Headers:
        """Builds headers from the byte pairs the parser produced."""
        h = cls.__new__(cls)
        h._fields = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw]
        return h

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        lname = name.lower()
        for n, v in self._fields:
            if n.lower() == lname:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        lname = name.lower()
        return [v for n, v in self._fields if n.lower() == lname]

    def set(self, name: str, value: str) -> None:
        """Replaces every value of ``name`` with one value (appended if absent)."""
        lname = name.lower()
        for i, (n, _) in enumerate(self._fields):
            if n.lower() == lname:
                self._fields[i] = (name, value)
                self._fields[i + 1:] = [f for f in self._fields[i + 1:] if f[0].lower() != lname]
                return
        self._fields.append((name, value))

    def append(self, name: str, value: str) -> None:
        """Adds one more value of ``name`` after the others."""
        self._fields.append((name, value))

    def remove(self, name: str) -> bool:
        """Removes every value of ``name``; True if there was one."""
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
    """The request line and header fields of a request.

    ``method`` (``"GET"``), ``path`` (the request target as sent, ``"/a?b=1"``) and ``version``
    (``"1.1"``) may be changed by a phase; the engine sends what they hold.
    """

    __slots__ = ("method", "path", "version")

    def __init__(self, method: str, path: str, version: str = "1.1",
                 fields: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(fields)
        self.method = method
        self.path = path
        self.version = version

    def encode_head(self) -> bytes:
        """The request line and headers, ending with the empty line."""
        return (f"{self.method} {self.path} HTTP/{self.version}\r\n".encode("latin-1")
                + self.encode() + b"\r\n")


class ResponseHeader(Headers):
    """The status and header fields of a response; ``status`` and ``reason`` may be changed."""

    __slots__ = ("status", "reason")

    def __init__(self, status: int, fields: Iterable[tuple[str, str]] = (),
                 reason: str | None = None) -> None:
        super().__init__(fields)
        self.status = status
        self.reason = reason

    @classmethod
    def build(cls, status: int, headers: Iterable[tuple[str, str]] | dict[str, str] = ()
              ) -> ResponseHeader:
        """A response header from a status and a dict or list of fields."""
        fields = headers.items() if isinstance(headers, dict) else headers
        return cls(status, fields)
