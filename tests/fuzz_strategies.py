"""Hypothesis strategies and settings of the fuzz tests (tests/unit/test_fuzz_*.py).

Settings come from a profile, chosen by ``TENAYA_FUZZ_PROFILE``:

- ``ci`` (the default): derandomized, so every run of the suite tries the same inputs; a
  failure seen once is seen again on any machine, and a strict xfail cannot flap. Examples
  are counted so that the fuzz tests take seconds, not minutes; no example database is
  written, and a failing example is reported as found, not shrunk (shrinking a state
  machine's run can take minutes, past the test's timeout: the failure says how to replay
  it). Exploring is the job of the ``explore`` profile and of ``scripts/fuzz``.
- ``explore``: random, 20 times the examples, failures shrunk and kept in build/hypothesis
  for the next run (``TENAYA_FUZZ_PROFILE=explore scripts/test tests/unit/test_fuzz_h2.py``).

No deadline in either: a loaded machine makes any per-example deadline flaky, and the time of
the whole test is bounded by its example count and by pytest-timeout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from typing import Any

from hypothesis import HealthCheck, Phase, reject, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from tests.fuzz_targets import KNOWN_BUGS, ROOT, KnownBug, Run, check, split

_SCALE = {"ci": 1, "explore": 20}
# Inputs that show only known bugs are rejected (see verdict): that is not a strategy's fault.
_LENIENT = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "tenaya-ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=_LENIENT,
)
settings.register_profile(
    "tenaya-explore",
    deadline=None,
    derandomize=False,
    database=DirectoryBasedExampleDatabase(str(ROOT / "build" / "hypothesis")),
    suppress_health_check=_LENIENT,
)
PROFILE = os.environ.get("TENAYA_FUZZ_PROFILE", "ci")
if PROFILE not in _SCALE:
    raise RuntimeError(f"TENAYA_FUZZ_PROFILE={PROFILE!r}: use one of {sorted(_SCALE)}")


def fuzz_settings(examples: int, **options: Any) -> settings:
    """The profile's settings with ``examples`` examples (times the profile's scale)."""
    return settings(
        settings.get_profile(f"tenaya-{PROFILE}"),
        max_examples=examples * _SCALE[PROFILE],
        **options,
    )


def verdict(run: Run, tolerate: Collection[str] = KNOWN_BUGS) -> None:
    """Checks ``run`` (:func:`fuzz_targets.check`); an input that shows only known bugs
    (those in ``tolerate``) is rejected, so that hypothesis goes on to other inputs."""
    try:
        check(run, tolerate)
    except KnownBug:
        reject()


#: Bytes that matter to an HTTP/1.1 parser, put in by the mutator.
H1_TOKENS = (
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b"\x00",
    b"\x7f",
    b"\xff",
    b"0",
    b"-1",
    b"+1",
    b"18446744073709551616",
    b"ffffffffffffffff",
    b"chunked",
    b",",
    b";ext=1",
    b"\r\n\r\n",
    b"0\r\n\r\n",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"Host: a.test\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked, gzip\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive, x-drop\r\n",
    b"Expect: 100-continue\r\n",
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n",
    b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"Trailer: x\r\n",
    b"X-Forwarded-For: 1.2.3.4\r\n",
)
#: Bytes that matter to an HTTP/2 codec: frame headers of every type, settings, HPACK.
H2_TOKENS = (
    b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    b"\x00\x00\x00\x04\x01\x00\x00\x00\x00",
    b"\x00\x00\x08\x06\x00\x00\x00\x00\x00pingping",
    b"\x00\x00\x04\x08\x00\x00\x00\x00\x00",
    b"\x00\x00\x04\x03\x00\x00\x00\x00\x01\x00\x00\x00\x08",
    b"\x00\x00\x00\x09\x04\x00\x00\x00\x01",
    b"\x00\x00\x00\x00\x01\x00\x00\x00\x01",
    b"\x00\x00\x08\x07\x00\x00\x00\x00\x00",
    b"\x7f\xff",
    b"\xff\xff\xff\xff",
    b"\x80",
    b"\x82\x86\x84",
    b"\x3f\xe1\x1f",
    b"\x00\x04\x00\x00\x00\x00",
    b"\x00\x01\x00\x00\x00\x00",
    b"\x00\x05\x00\xff\xff\xff",
    b"\x00\x03\x00\x00\x00\x00",
)


def _mutate(
    data: bytes, draw: Callable[[Any], Any], tokens: Sequence[bytes], others: Sequence[bytes]
) -> bytes:
    op = draw(st.sampled_from(("flip", "insert", "token", "delete", "duplicate", "splice")))
    n = len(data)
    i = draw(st.integers(0, n))
    if op == "flip" and n:
        i = min(i, n - 1)
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    if op == "insert":
        return data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    if op == "token":
        return data[:i] + draw(st.sampled_from(tokens)) + data[i:]
    j = draw(st.integers(i, min(n, i + 64)))
    if op == "delete":
        return data[:i] + data[j:]
    if op == "duplicate":
        k = draw(st.integers(0, n))
        return data[:k] + data[i:j] + data[k:]
    if op == "splice" and others:
        other = draw(st.sampled_from(others))
        return data[:i] + other[draw(st.integers(0, len(other))) :]
    return data


@st.composite
def mutated(
    draw: Callable[[Any], Any], seeds: Sequence[bytes], tokens: Sequence[bytes], most: int = 4
) -> bytes:
    """One of ``seeds`` with up to ``most`` mutations: a byte changed, random bytes or a
    ``tokens`` entry put in, a range dropped or repeated, another seed's tail spliced on."""
    data = draw(st.sampled_from(seeds))
    for _ in range(draw(st.integers(0, most))):
        data = _mutate(data, draw, tokens, seeds)
    return data


@st.composite
def reads(draw: Callable[[Any], Any], data: bytes) -> list[bytes]:
    """``data`` cut into the reads a server could get: whole, at random points, or in pieces
    of a few bytes."""
    how = draw(st.sampled_from(("whole", "random", "every")))
    if how == "whole" or not data:
        return [data]
    if how == "random":
        return split(data, draw(st.lists(st.integers(1, len(data)), max_size=8)))
    k = draw(st.integers(1, 16))
    return [data[i : i + k] for i in range(0, len(data), k)]


_METHODS = (
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"OPTIONS",
    b"PATCH",
    b"TRACE",
    b"CONNECT",
    b"PROPFIND",
)
_TARGETS = (
    b"/",
    b"/a/b?c=d&e",
    b"/%2e%2e/x",
    b"*",
    b"http://a.test/abs",
    b"a.test:443",
    b"/" + b"x" * 300,
)
_FIELDS = (
    b"Accept: */*",
    b"User-Agent: fuzz",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Connection: x-hop",
    b"X-Hop: dropped",
    b"Connection: close, x-forwarded-for",
    b"Connection: content-length",
    b"Connection: host",
    b"Connection: upgrade",
    b"Keep-Alive: timeout=5",
    b"Expect: 100-continue",
    b"Upgrade: websocket",
    b"X-Forwarded-For: 203.0.113.9",
    b"X-Forwarded-Proto: https",
    b"Te: trailers",
    b"Trailer: X-Sum",
    b"Cookie: a=b",
    b"X-Long: " + b"v" * 200,
    b"Transfer-Encoding: gzip",
    b"Content-Length: 3",
    b"Host: other.test",
)


@st.composite
def h1_requests(draw: Callable[[Any], Any]) -> bytes:
    """An HTTP/1.x request built from parts, mostly well-formed: a method, a target, a
    version, Host (usually), fields from a list, and a body framed by Content-Length or
    chunked (sometimes with trailers), or none."""
    method = draw(st.sampled_from(_METHODS))
    version = draw(st.sampled_from((b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0")))
    lines = [b"%s %s %s" % (method, draw(st.sampled_from(_TARGETS)), version)]
    if draw(st.integers(0, 9)):
        lines.append(b"Host: fuzz.test")
    lines += draw(st.lists(st.sampled_from(_FIELDS), max_size=4))
    body = draw(st.binary(max_size=48))
    framing = draw(st.sampled_from(("none", "length", "chunked")))
    tail = b""
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
        tail = body
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        cuts = draw(st.lists(st.integers(1, max(1, len(body))), max_size=3))
        chunks = [c for c in split(body, cuts) if c]
        tail = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n"
        if draw(st.booleans()):
            tail += b"X-Sum: 1\r\n"
        tail += b"\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + tail
