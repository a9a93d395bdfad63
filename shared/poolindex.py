"""The shared-memory pool index: how many idle upstream connections the broker holds, by key.

One writer (the master's broker), many readers (the workers). The table lives in an anonymous
memory file (``memfd_create``) that the master creates and each worker maps read-only from an
inherited descriptor, so nothing is named in the file system and nothing is left behind.

Layout (little-endian u32): ``magic, version, slots, 0`` then ``slots`` counters. A pool key is
hashed (CRC-32 of its bytes) to a slot; keys that share a slot share a counter, so a reader
treats a count as a hint: zero means asking the broker cannot succeed now, more than zero means
it may.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib

MAGIC = 0x544E5950  # "TNYP"
VERSION = 1
#: Counter slots; more slots, fewer false hints.
DEFAULT_SLOTS = 4096
_HEADER = struct.Struct("<4I")


def slot_of(key: bytes, slots: int) -> int:
    """The slot of a pool key's bytes."""
    return zlib.crc32(key) % slots


class PoolIndex:
    """A mapped pool index; create it in the master, attach to it in workers."""

    def __init__(self, fd: int, slots: int, writable: bool) -> None:
        self.fd = fd
        self.slots = slots
        size = _HEADER.size + 4 * slots
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        self.counts = memoryview(self._map)[_HEADER.size :].cast("I")

    @classmethod
    def create(cls, slots: int = DEFAULT_SLOTS) -> PoolIndex:
        """A new zeroed index (master side); its ``fd`` is passed to workers."""
        fd = os.memfd_create("tenaya-pool-index", os.MFD_CLOEXEC)
        os.ftruncate(fd, _HEADER.size + 4 * slots)
        index = cls(fd, slots, writable=True)
        _HEADER.pack_into(index._map, 0, MAGIC, VERSION, slots, 0)
        return index

    @classmethod
    def attach(cls, fd: int) -> PoolIndex:
        """Maps an index made by :meth:`create` (worker side), read-only."""
        header = os.pread(fd, _HEADER.size, 0)
        magic, version, slots, _ = _HEADER.unpack(header)
        if magic != MAGIC or version != VERSION:
            raise ValueError("not a pool index of this version")
        return cls(fd, slots, writable=False)

    def available(self, slot: int) -> bool:
        """True when the broker may hold an idle connection for keys of ``slot``."""
        return self.counts[slot] > 0

    def add(self, slot: int, delta: int) -> None:
        """Changes a counter (the broker only)."""
        self.counts[slot] = max(0, self.counts[slot] + delta)

    def close(self) -> None:
        self.counts.release()
        self._map.close()
        os.close(self.fd)
