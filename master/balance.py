"""The master's balance tables: one per generation of workers.

Theory of operation. Workers balance fleet-wide from the shared table of
:mod:`shared.shm.balance`, one row per worker slot. A reload starts a new generation on the same
slot numbers while the old one drains, so the two cannot share rows (each row has one writer):
each generation gets a table of its own, sized from its own config (upstreams, servers in
config order, worker slots). The master

- creates the first generation's table at start (a new master after an upgrade seeds it with
  the turns the old master handed over, by upstream name);
- creates a new generation's table when the reload begins, seeded by upstream name with the
  serving generation's turns, so the rotation goes on where the fleet is instead of starting
  over at each upstream's first server (an upstream the old config did not have starts at 0);
- passes a generation's descriptor to each of its workers (:meth:`BalanceTables.fd`), which
  attach their slot's row;
- retires a slot's row when its process has exited, before the slot is given to a new process
  (:meth:`BalanceTables.retire`): its turns go to the retired row, its in-flight counts to 0;
- closes a generation's table once that generation is neither serving nor starting and none of
  its workers is left (:meth:`BalanceTables.release`), and every table at shutdown; each
  descriptor exactly once.

Turns of the old generation taken after the new table was seeded are not carried over (both
generations serve for the moment of the overlap; the new one's rotation starts from the seed).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

from shared.config import Config
from shared.shm.balance import BalanceTable

log = logging.getLogger("tenaya.master")


class BalanceTables:
    """Every live generation's :class:`BalanceTable`, by generation number."""

    def __init__(self) -> None:
        self.tables: dict[int, BalanceTable] = {}
        #: Per generation, its upstreams' names in config order (the table's upstream numbers).
        self.names: dict[int, list[str]] = {}

    def create(
        self, generation: int, config: Config, slots: int, seed: Mapping[str, int] | None = None
    ) -> BalanceTable:
        """Makes generation ``generation``'s table for ``config`` with ``slots`` worker slots;
        ``seed`` maps upstream names to the turn their rotation goes on from. A table already
        made for that generation (a reload that failed and is tried again under the same
        number does not happen, but a second call must not leak) is closed first."""
        old = self.tables.pop(generation, None)
        if old is not None:
            old.close()
        names = list(config.upstreams)
        servers = sum(len(u.servers) for u in config.upstreams.values())
        table = BalanceTable.create(len(names), servers, max(1, slots))
        for u, name in enumerate(names):
            turn = (seed or {}).get(name, 0)
            if turn:
                table.seed_turns(u, turn)
        self.tables[generation] = table
        self.names[generation] = names
        return table

    def fd(self, generation: int) -> int:
        """The descriptor of ``generation``'s table to pass to its workers; -1 when it has
        none."""
        table = self.tables.get(generation)
        return table.fd if table is not None else -1

    def turns(self, generation: int) -> dict[str, int]:
        """The fleet's turn of each upstream of ``generation``, by name (to seed another
        table); empty when the generation has no table."""
        table = self.tables.get(generation)
        if table is None:
            return {}
        return {name: table.turn(u) for u, name in enumerate(self.names[generation])}

    def retire(self, generation: int, slot: int) -> None:
        """Worker slot ``slot`` of ``generation`` has exited: its row is folded into the
        retired row and zeroed, before another process gets the slot."""
        table = self.tables.get(generation)
        if table is not None and 0 <= slot < table.slots:
            table.retire(slot)

    def release(self, live: Collection[int]) -> None:
        """Closes the table of every generation not in ``live`` (the generations that serve,
        start, or still have a worker)."""
        for generation in [g for g in self.tables if g not in live]:
            self.names.pop(generation, None)
            self.tables.pop(generation).close()
            log.debug("closed the balance table of generation %d", generation)

    def close(self) -> None:
        """Closes every table (at shutdown)."""
        self.release(())
