"""shared.peer: addresses and the pool key of an upstream peer."""

from __future__ import annotations

from typing import Any

import pytest

from shared.address import format_address, parse_address
from shared.peer import HttpPeer, PeerOptions, PoolKey


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("localhost:8080", ("localhost", 8080)),
        ("example.com:0", ("example.com", 0)),
        ("example.com:65535", ("example.com", 65535)),
        ("[::1]:80", ("::1", 80)),
        ("[2001:db8::7]:443", ("2001:db8::7", 443)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    """HOST:PORT and [IPv6]:PORT parse to (host, port), brackets removed."""
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text", ["127.0.0.1:80", "localhost:8080", "[::1]:80", "[2001:db8::7]:443", "h:0"]
)
def test_format_parse_round_trip_of_text(text: str) -> None:
    """Formatting a parsed address gives the text back."""
    assert format_address(*parse_address(text)) == text


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("10.0.0.1", 80, "10.0.0.1:80"),
        ("::1", 80, "[::1]:80"),
        ("fe80::1", 8443, "[fe80::1]:8443"),
        ("origin.internal", 9000, "origin.internal:9000"),
    ],
)
def test_format_address(host: str, port: int, text: str) -> None:
    """IPv6 hosts are bracketed, others are not; parsing gives (host, port) back."""
    assert format_address(host, port) == text
    assert parse_address(text) == (host, port)


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("example.com", 443, ("example.com", 443)),
        ("[::1]", 80, ("::1", 80)),
        ("example.com:8080", 443, ("example.com", 8080)),
    ],
)
def test_default_port(text: str, default: int, expected: tuple[str, int]) -> None:
    """Without a port the default port is used; an explicit port wins."""
    assert parse_address(text, default) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "expected an address such as 127.0.0.1:8080"),
        ("example.com", "'example.com': missing ':PORT'"),
        ("[::1]", "'[::1]': missing ':PORT'"),
        ("::1:80", "'::1:80': write an IPv6 address as [ADDRESS]:PORT"),
        ("[::1:80", "'[::1:80': missing ']' after an IPv6 address"),
        ("[::1]80", "'[::1]80': expected ':PORT' after ']'"),
        (":80", "':80': missing host"),
        ("[]:80", "'[]:80': missing host"),
        ("example.com:", "'example.com:': the port must be a number from 0 to 65535"),
        ("example.com:65536", "'example.com:65536': the port must be a number from 0 to 65535"),
        ("example.com:-1", "'example.com:-1': the port must be a number from 0 to 65535"),
        ("example.com:http", "'example.com:http': the port must be a number from 0 to 65535"),
        ("example.com: 80", "'example.com: 80': the port must be a number from 0 to 65535"),
    ],
)
def test_parse_address_errors(text: str, reason: str) -> None:
    """Text that is not an address raises ValueError saying what is wrong."""
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert str(info.value) == reason


@pytest.mark.parametrize(
    "port",
    ["\u00b2", "\u0668\u0660", "\uff18\uff10"],
    ids=["superscript-two", "arabic-indic-80", "fullwidth-80"],
)
def test_port_must_be_ascii_digits(port: str) -> None:
    """A port of non-ASCII digits is refused with the usual reason (RFC 3986: port = *DIGIT)."""
    text = f"example.com:{port}"
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert str(info.value) == f"{text!r}: the port must be a number from 0 to 65535"


def test_parse_address_refuses_non_string() -> None:
    """A number (as YAML gives for an unquoted port alone) is not an address."""
    with pytest.raises(ValueError, match="expected an address"):
        parse_address(8080)  # type: ignore[arg-type]


def test_peer_default_ports() -> None:
    """A peer without a port connects to 80, or 443 with TLS."""
    assert (HttpPeer("example.com").host, HttpPeer("example.com").port) == ("example.com", 80)
    assert HttpPeer("example.com", tls=True).port == 443
    assert HttpPeer("example.com:8443", tls=True).port == 8443


def test_peer_from_tuple_and_str() -> None:
    """A peer may be given as (host, port); str() is HOST:PORT, bracketed for IPv6."""
    assert str(HttpPeer(("::1", 8080))) == "[::1]:8080"
    assert str(HttpPeer("10.0.0.1:80")) == "10.0.0.1:80"
    assert HttpPeer(("10.0.0.1", 80)).pool_key == HttpPeer("10.0.0.1:80").pool_key


def test_peer_bad_address_raises() -> None:
    """An invalid peer address fails when the peer is made."""
    with pytest.raises(ValueError, match="IPv6"):
        HttpPeer("::1:80")


def make_peer(**changes: Any) -> HttpPeer:
    """A TLS peer with every reuse-relevant option set; ``changes`` override peer or options."""
    option_names = set(PeerOptions.__dataclass_fields__)
    options: dict[str, Any] = {
        "alpn": ("h2", "http/1.1"),
        "ca_file": "/etc/ca.pem",
        "client_cert": "/etc/client.pem",
        "client_key": "/etc/client.key",
    }
    peer: dict[str, Any] = {
        "address": "10.0.0.1:443",
        "tls": True,
        "sni": "api.example.com",
        "group_key": "tenant-a",
    }
    for name, value in changes.items():
        (options if name in option_names else peer)[name] = value
    return HttpPeer(**peer, options=PeerOptions(**options))


@pytest.mark.parametrize(
    "change",
    [
        {"address": "10.0.0.2:443"},
        {"address": "10.0.0.1:8443"},
        {"tls": False},
        {"sni": "www.example.com"},
        {"sni": ""},
        {"group_key": "tenant-b"},
        {"verify_cert": False},
        {"verify_hostname": False},
        {"ca_file": "/etc/other-ca.pem"},
        {"ca_file": None},
        {"alpn": ("http/1.1",)},
        {"client_cert": "/etc/other.pem"},
        {"client_cert": None},
        {"client_key": "/etc/other.key"},
    ],
    ids=lambda change: "-".join(f"{k}={v}" for k, v in change.items()),
)
def test_pool_key_differs_when_reuse_would_be_unsafe(change: dict[str, Any]) -> None:
    """Peers that differ in address, TLS, SNI, verification, ALPN, client cert or group
    never share a pooled connection."""
    assert make_peer(**change).pool_key != make_peer().pool_key


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"connect_timeout": 1.0},
        {"read_timeout": 2.0},
        {"write_timeout": 3.0},
        {"idle_timeout": 4.0},
    ],
    ids=lambda change: "-".join(change) or "same",
)
def test_pool_key_equal_otherwise(change: dict[str, Any]) -> None:
    """Peers that differ only in timeouts share pooled connections."""
    assert make_peer(**change).pool_key == make_peer().pool_key
    assert hash(make_peer(**change).pool_key) == hash(make_peer().pool_key)


def test_pool_key_names_its_fields() -> None:
    """The key is a PoolKey whose fields say what they hold, in the order the plain tuple had
    (so its msgpack form, the key the broker knows, is unchanged)."""
    key = make_peer().pool_key
    assert isinstance(key, PoolKey)
    assert (key.host, key.port, key.tls, key.sni, key.group_key) == (
        "10.0.0.1",
        443,
        True,
        "api.example.com",
        "tenant-a",
    )
    assert (
        key.verify_cert,
        key.verify_hostname,
        key.ca_file,
        key.client_cert,
        key.client_key,
        key.alpn,
        key.http2,
    ) == (
        True,
        True,
        "/etc/ca.pem",
        "/etc/client.pem",
        "/etc/client.key",
        ("h2", "http/1.1"),
        False,
    )
    assert tuple(key) == (
        "10.0.0.1",
        443,
        True,
        "api.example.com",
        True,
        True,
        "/etc/ca.pem",
        "/etc/client.pem",
        "/etc/client.key",
        ("h2", "http/1.1"),
        False,
        "tenant-a",
    )


def test_pool_key_is_a_tuple_as_a_dict_key() -> None:
    """A PoolKey equals and hashes as the plain tuple of its fields, so pools keyed by either
    find the same entries."""
    key = make_peer().pool_key
    plain = tuple(key)
    assert key == plain and hash(key) == hash(plain)
    assert {plain: "idle"}[key] == "idle"


def test_pool_key_is_computed_once() -> None:
    """A peer's key is built on first use and the same object afterwards."""
    peer = make_peer()
    assert peer.pool_key is peer.pool_key
