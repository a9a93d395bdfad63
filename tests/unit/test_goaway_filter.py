"""The upstream HTTP/2 connection's GOAWAY filter: whatever way the server's bytes are cut into
reads, h2 gets every frame but the GOAWAYs, unchanged and in order, and each GOAWAY's payload
comes out once, whole."""

from __future__ import annotations

import random
import struct

import pytest

from worker.client.h2 import GoawayFilter

GOAWAY = 0x7


def frame(ftype: int, payload: bytes, sid: int = 0, flags: int = 0) -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def goaway(last: int, code: int = 0, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, struct.pack(">LL", last, code) + debug)


FRAMES = [
    frame(0x4, b"\x00\x03\x00\x00\x00\x64"),  # SETTINGS
    frame(0x4, b"", flags=0x1),  # SETTINGS ACK, empty
    frame(0x1, b"\x88", sid=1, flags=0x4),  # HEADERS
    goaway(3, 0, b"draining"),
    frame(0x0, b"x" * 40_000, sid=1),  # DATA longer than any read below
    frame(0x0, b"", sid=1, flags=0x1),
    goaway(1, 2),
    frame(0x8, b"\x00\x00\x10\x00"),  # WINDOW_UPDATE
]
KEPT = b"".join(f for f in FRAMES if f[3] != GOAWAY)
PAYLOADS = [f[9:] for f in FRAMES if f[3] == GOAWAY]


def run(data: bytes, cuts: list[int]) -> tuple[bytes, list[bytes]]:
    filt = GoawayFilter()
    out = b""
    payloads: list[bytes] = []
    start = 0
    for cut in [*cuts, len(data)]:
        passed, found = filt.feed(data[start:cut])
        out += passed
        payloads += found
        start = cut
    return out, payloads


def test_one_read() -> None:
    assert run(b"".join(FRAMES), []) == (KEPT, PAYLOADS)


def test_a_read_without_goaway_passes_unchanged() -> None:
    """The common case costs no copy: the very bytes object goes on."""
    data = FRAMES[0] + FRAMES[2]
    passed, found = GoawayFilter().feed(data)
    assert passed is data and found == []


def test_byte_by_byte() -> None:
    data = b"".join(FRAMES)
    assert run(data, list(range(1, len(data)))) == (KEPT, PAYLOADS)


@pytest.mark.parametrize("seed", range(50))
def test_random_cuts(seed: int) -> None:
    data = b"".join(FRAMES)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 40)))
    assert run(data, cuts) == (KEPT, PAYLOADS)


@pytest.mark.parametrize("cut", range(1, 17))
def test_cut_inside_a_goaway(cut: int) -> None:
    """A GOAWAY whose header or payload is cut between reads still comes out whole."""
    g = goaway(5, 0, b"bye")
    data = FRAMES[2] + g + FRAMES[2]
    at = len(FRAMES[2]) + cut
    assert run(data, [at]) == (FRAMES[2] * 2, [g[9:]])
