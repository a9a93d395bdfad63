"""Network addresses as the config and the peers write them: ``host:port``, ``[v6]:port``.

The master (listeners, the demo origins), the config's checks and the peers all parse and print
addresses the same way; this module is that one way, and imports nothing of the app API.
"""

from __future__ import annotations


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``"127.0.0.1:80"``, ``"[::1]:80"`` or ``"localhost:80"`` as ``(host, port)``.

    Raises ``ValueError`` with a short reason when the text is not an address.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("expected an address such as 127.0.0.1:8080")
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after an IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError(f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"{text!r}: missing host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: missing ':PORT'")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
