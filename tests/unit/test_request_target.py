"""The Host and request-target rules of shared/headers.py: ``valid_host`` (RFC 3986 host with
an optional port) and ``split_absolute_form`` (RFC 9112 3.2.2)."""

from __future__ import annotations

import pytest

from shared.headers import split_absolute_form, valid_host

GOOD = [
    b"t",
    b"t:80",
    b"t:",
    b"T.Example-1",
    b"127.0.0.1:8080",
    b"999.1.1.1",
    b"[::1]",
    b"[::1]:80",
    b"[fe80::1]",
    b"[2001:db8::a:b]:443",
    b"[v1.x:y]",
    b"xn--bcher-kva.example",
    b"a%41b",
    b"a!$&'()*+,;=b",
    b"_srv.example",
    b"example.com.",
    b"",
]
BAD = [
    b"user@t",
    b"@t",
    b"t:80:80",
    b"t:8o",
    b"t:80@evil.example",
    b"t/evil",
    b"t evil",
    b"t\tevil",
    b"t\\evil",
    b"t?x",
    b"t#x",
    b"[::1",
    b"::1",
    b"[not-an-ip]",
    b"[1:2:3]",
    b"[::1]x",
    b"[::1]:8o",
    b"t%zz",
    b"t%4",
    b"t:123456",
    b"t\x00",
    b"t\x7f",
    b"\xc3\xa9.example",
    b"t]",
    b"[t]",
]


@pytest.mark.parametrize("host", GOOD)
def test_valid_hosts(host: bytes) -> None:
    """Names (with sub-delims and pct-encoded octets), IPv4, IPv6 and IPvFuture literals,
    with or without a port; empty too (RFC 9112 3.2)."""
    assert valid_host(host)


@pytest.mark.parametrize("host", BAD)
def test_invalid_hosts(host: bytes) -> None:
    """Userinfo, a second colon, a port that is not digits (or longer than five), a path,
    whitespace, controls, bad percent-escapes, an unbracketed or malformed IP literal."""
    assert not valid_host(host)


@pytest.mark.parametrize(
    ("target", "want"),
    [
        (b"http://a.example/p?q=1", (b"a.example", b"/p?q=1")),
        (b"HTTPS://A.Example:8443", (b"A.Example:8443", b"/")),
        (b"http://a.example?q", (b"a.example", b"/?q")),
        (b"http://[::1]:80//x", (b"[::1]:80", b"//x")),
    ],
)
def test_absolute_form_is_split(target: bytes, want: tuple[bytes, bytes]) -> None:
    """The authority, and the target in origin-form (an empty path becomes ``/``)."""
    assert split_absolute_form(target) == want


@pytest.mark.parametrize(
    "target",
    [
        b"http://user@a.example/",
        b"http://user:pw@a.example/",
        b"http://@a.example/",
        b"http:///x",
        b"http://",
        b"ftp://a.example/",
        b"a.example:80",
        b"/x",
        b"*",
        b"http://a.example:8o/",
        b"http://a.example/x#f",
        b"http://a b/",
        b"1http://a/",
    ],
)
def test_not_an_acceptable_absolute_form(target: bytes) -> None:
    """Userinfo, no host, another scheme, no scheme, a bad port or a fragment: None."""
    assert split_absolute_form(target) is None
