"""shared.headers: case-insensitive, multi-valued, ordered header fields and their bytes."""

from __future__ import annotations

from shared.headers import Headers, RequestHeader, ResponseHeader


def sample() -> Headers:
    """Headers with a repeated field spelled in two cases."""
    return Headers(
        [
            ("Content-Type", "text/html"),
            ("Set-Cookie", "a=1"),
            ("X-Trace", "t1"),
            ("set-cookie", "b=2"),
            ("Vary", "Accept"),
        ]
    )


def test_get_ignores_case() -> None:
    """get() finds a field whatever the case of the name, and returns the first value."""
    h = sample()
    assert h.get("content-type") == "text/html"
    assert h.get("CONTENT-TYPE") == "text/html"
    assert h.get("SET-COOKIE") == "a=1"


def test_get_missing() -> None:
    """get() of an absent field returns None or the given default."""
    h = sample()
    assert h.get("Location") is None
    assert h.get("Location", "/") == "/"


def test_get_all_in_order() -> None:
    """get_all() returns every value in arrival order, whatever the case of each name."""
    h = sample()
    assert h.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert h.get_all("location") == []


def test_contains_ignores_case() -> None:
    """``in`` ignores case and is False for non-strings."""
    h = sample()
    assert "x-trace" in h
    assert "X-TRACE" in h
    assert "Location" not in h
    assert 42 not in h
    assert b"Vary" not in h


def test_set_replaces_all_values_in_place() -> None:
    """set() puts one value where the first was, drops the others, keeps every other field."""
    h = sample()
    h.set("SET-COOKIE", "c=3")
    assert h.items() == [
        ("Content-Type", "text/html"),
        ("SET-COOKIE", "c=3"),
        ("X-Trace", "t1"),
        ("Vary", "Accept"),
    ]


def test_set_appends_when_absent() -> None:
    """set() of a new field adds it at the end."""
    h = sample()
    h.set("Location", "/next")
    assert h.items()[-1] == ("Location", "/next")
    assert len(h) == 6


def test_append_keeps_existing_values() -> None:
    """append() adds a value after the existing ones."""
    h = sample()
    h.append("Vary", "Accept-Encoding")
    assert h.get_all("vary") == ["Accept", "Accept-Encoding"]
    assert h.items()[-2:] == [("Vary", "Accept"), ("Vary", "Accept-Encoding")]


def test_remove() -> None:
    """remove() drops every value of a name, whatever its case, and says whether any was."""
    h = sample()
    assert h.remove("set-COOKIE") is True
    assert h.items() == [("Content-Type", "text/html"), ("X-Trace", "t1"), ("Vary", "Accept")]
    assert h.remove("Set-Cookie") is False
    assert len(h) == 3


def test_order_and_case_preserved() -> None:
    """Iteration gives fields in order with names spelled as given."""
    fields = [("b", "2"), ("A", "1"), ("c", "3"), ("a", "4")]
    assert list(Headers(fields)) == fields


def test_items_is_a_copy() -> None:
    """Changing the list from items() does not change the headers."""
    h = sample()
    h.items().clear()
    assert len(h) == 5


def test_encode_bytes() -> None:
    """encode() writes ``Name: value`` lines with CRLF, in order, names as spelled."""
    h = Headers([("Host", "example.com"), ("accept", "*/*"), ("X-Empty", "")])
    assert h.encode() == b"Host: example.com\r\naccept: */*\r\nX-Empty: \r\n"
    assert Headers().encode() == b""


def test_request_encode_head() -> None:
    """encode_head() is the request line, the header lines and the empty line."""
    req = RequestHeader("GET", "/a?b=1", fields=[("Host", "example.com"), ("Accept", "*/*")])
    assert req.encode_head() == (b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n")


def test_request_encode_head_after_changes() -> None:
    """Changes to method, path, version and fields are what encode_head() sends."""
    req = RequestHeader("GET", "/", fields=[("Host", "a.example"), ("Connection", "close")])
    req.method, req.path, req.version = "POST", "/submit", "1.0"
    req.set("host", "b.example")
    req.remove("connection")
    req.append("Content-Length", "0")
    assert req.encode_head() == (
        b"POST /submit HTTP/1.0\r\nhost: b.example\r\nContent-Length: 0\r\n\r\n"
    )


def test_latin1_round_trip_of_raw_bytes() -> None:
    """Any header bytes (obs-text included) survive from_raw() -> str -> encode() unchanged."""
    raw = [(b"X-Name", b"caf\xe9 \xff\x80\x01"), (b"Set-Cookie", b"id=\xc3\xa9")]
    h = Headers.from_raw(raw)
    assert h.get("x-name") == "caf\u00e9 \u00ff\x80\x01"
    assert h.get("set-cookie") == "id=\u00c3\u00a9"
    assert h.encode() == b"X-Name: caf\xe9 \xff\x80\x01\r\nSet-Cookie: id=\xc3\xa9\r\n"


def test_response_header_build() -> None:
    """ResponseHeader.build() takes a dict or a list of pairs; status and reason are kept."""
    r = ResponseHeader.build(404, {"Content-Type": "text/plain", "Content-Length": "9"})
    assert (r.status, r.reason) == (404, None)
    assert r.items() == [("Content-Type", "text/plain"), ("Content-Length", "9")]
    r2 = ResponseHeader.build(200, [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
    assert r2.get_all("set-cookie") == ["a=1", "b=2"]
