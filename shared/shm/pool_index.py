"""The shared-memory pool index: how many idle upstream connections the broker holds, by key.

One writer (the master's broker), many readers (the workers). The table
(:class:`~shared.shm.table.SharedTable`) lives in an anonymous memory file that the master
creates and each worker maps read-only from an inherited descriptor, so nothing is named in
the file system and nothing is left behind.

Layout: the header page (the number of ``slots`` its one parameter), then ``slots`` u32
counters. A pool key is hashed (CRC-32 of its bytes) to a slot; keys that share a slot share a
counter, so a reader treats a count as a hint: zero means asking the broker cannot succeed now,
more than zero means it may.
"""

from __future__ import annotations

import zlib

from shared.shm.table import SharedTable

#: Counter slots; more slots, fewer false hints.
DEFAULT_SLOTS = 4096


def slot_of(key: bytes, slots: int) -> int:
    """The slot of a pool key's bytes."""
    return zlib.crc32(key) % slots


class PoolIndex(SharedTable):
    """A mapped pool index; create it in the master, attach to it in workers."""

    MAGIC = 0x544E5950  # "TNYP"
    VERSION = 2
    NAME = "tenaya-pool-index"
    PARAMS = 1

    slots: int
    """Counter slots."""
    counts: memoryview
    """The counters, one per slot (u32)."""

    @classmethod
    def data_size(cls, *params: int) -> int:
        """4 bytes per slot; at least one slot."""
        (slots,) = params
        if slots < 1:
            raise ValueError("a pool index needs at least one slot")
        return 4 * slots

    def _setup(self) -> None:
        self.slots = self.params[0]
        self.counts = self._view(self.data, 0, "I", self.slots)

    @classmethod
    def create(cls, *params: int) -> PoolIndex:
        """A new zeroed index (master side) with ``slots`` counters (default
        :data:`DEFAULT_SLOTS`); its ``fd`` is passed to workers."""
        return super().create(*(params or (DEFAULT_SLOTS,)))

    def available(self, slot: int) -> bool:
        """True when the broker may hold an idle connection for keys of ``slot``."""
        return self.counts[slot] > 0

    def add(self, slot: int, delta: int) -> None:
        """Changes a counter (the broker only)."""
        self.counts[slot] = max(0, self.counts[slot] + delta)
