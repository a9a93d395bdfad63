"""Shared-memory tables: fixed layouts in anonymous memory files that the master creates and the
workers map from an inherited descriptor.

:mod:`shared.shm.table` is the base (header, attach checks, typed views, closing);
:mod:`shared.shm.balance` holds the fleet's load-balancing counters, :mod:`shared.shm.pool_index`
the broker's idle-connection hints. Each table's module says
who writes which cells and who reads them.
"""

from shared.shm.balance import BalanceTable, SlotCells
from shared.shm.pool_index import PoolIndex, slot_of
from shared.shm.table import SharedTable

__all__ = ["BalanceTable", "PoolIndex", "SharedTable", "SlotCells", "slot_of"]
