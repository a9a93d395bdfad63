"""Bodies the tests send and check: a deterministic byte pattern of any size, and its SHA-256,
so a large body is verified without keeping it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

_BLOCK = bytes(range(256)) * 256  # 64 KiB


def pattern_chunks(size: int, piece: int = len(_BLOCK)) -> Iterator[bytes]:
    """A deterministic body of ``size`` bytes, in pieces of at most ``piece`` bytes."""
    left = size
    while left > 0:
        n = min(left, piece, len(_BLOCK))
        yield _BLOCK[:n]
        left -= n


def pattern_sha256(size: int) -> str:
    """The SHA-256 of :func:`pattern_chunks` of ``size`` bytes."""
    h = hashlib.sha256()
    for chunk in pattern_chunks(size):
        h.update(chunk)
    return h.hexdigest()
