"""Shared-memory tables: fixed layouts in anonymous memory files that the master creates and the
workers map from an inherited descriptor.

:mod:`shared.shm.table` is the base (header, attach checks, typed views, closing);
:mod:`shared.shm.balance` holds the fleet's load-balancing counters. Each table's module says
who writes which cells and who reads them.
"""

from shared.shm.balance import BalanceTable, SlotCells
from shared.shm.table import SharedTable

__all__ = ["BalanceTable", "SharedTable", "SlotCells"]
