"""Header lookups shared by what the origin records and what the clients read: case-insensitive,
over a list of (name, value) pairs kept in wire order."""

from __future__ import annotations


class HeaderLookup:
    """Case-insensitive lookups in a ``headers`` list of (name, value) pairs."""

    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]
