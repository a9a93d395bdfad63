"""The fleet's health table: one row per server, what the checks found and who may take requests.

Theory of operation. A row belongs to one server, named by its key, the pair (upstream name,
address); the master's :class:`HealthDirectory` gives rows out and writes each row's key into
the table, so the table describes itself: a reload that keeps a server keeps its row and its
state (a down server stays down), a new server gets a row never used before, and a new master
after an upgrade, given the descriptor with the listeners, reads the directory back from the
table (:meth:`HealthDirectory.from_table`). A removed server's row is retired, never given to
another server of this table; when no fresh row is left, the master builds a larger table and
copies the kept rows (:meth:`HealthTable.copy_from`).

A new row starts UNKNOWN, which counts as up until the first check says otherwise: HAProxy's
choice (a server starts UP and is checked at once), not Envoy's (unhealthy until a check
passes), so a fleet that starts or reloads does not refuse traffic for a check interval.

Workers do not index rows: they index servers in config order, numbered across upstreams as
the balance table numbers them (:func:`shared.shm.balance.server_ranges`). For that, the table
holds :data:`LAYOUTS` usable vectors: a vector is a generation's servers in its config order, one
byte each, 1 while the server may take requests. A worker hands the slice of its upstream to
:class:`shared.lb.members.Members` as the usable mask (a ``memoryview``, kept by reference), so
what the checks find reaches the next selection with no IPC. A reload gives the new generation
a new vector while the old generation, draining, keeps reading its own.

Who writes what (ONE WRITER PER COLUMN; readers tolerate a moment's staleness):

- The prober (:mod:`master.health`, its own process) writes the ACTIVE columns: ``state``
  (UNKNOWN / UP / DOWN), consecutive ``rises`` and ``falls``, ``checks``, ``last_check_ns``,
  ``since_ns``, ``last_result``, ``last_latency_us``. They are whole pages of their own, which
  the prober alone maps writable (:meth:`HealthTable.attach_prober`): the kernel keeps anyone
  else from writing them through that API.
- The master writes the rest: the keys and the vectors' row lists (the directory,
  :class:`HealthDirectory`), ``ejected_until_ns`` and ``ejections`` (the master's outlier
  aggregator, from the passive results workers report), ``drained`` (the control socket's
  ``server drain|disable|enable`` handler), and the usable vectors (:meth:`HealthDirectory.refresh`:
  usable = not DOWN and not drained and not ejected). The prober tells the master of a change of
  ``state`` on its events pipe; the master refreshes that row.
- Readers: every worker (selection, through the usable vectors), the master (status, usable).

Layout after the header page (:mod:`shared.shm.table`), parameters ``(capacity, layouts)``: the
master's region (keys of :data:`KEY_BYTES` each, then per vector an owner pid, a server count
and ``capacity`` u32 rows, then ``ejected_until_ns``, ``ejections``, ``drained``, then the
usable vectors, ``capacity`` bytes each), then, on the next page, the prober's region (one
column after another). Every column is an array over rows, so a column is one ``memoryview``.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Iterable, Sequence

from shared.shm.table import PAGE, SharedTable, pages

#: Bytes of a row's key: ``upstream NUL address``, UTF-8, zero padded.
KEY_BYTES = 128
#: Usable vectors: the generations that may run at once (a reload during a reload, and an old
#: master's generation during an upgrade).
LAYOUTS = 4
#: Rows a new table has at least, so that reloads may add servers before a rebuild.
MIN_CAPACITY = 64
#: The first byte of a retired row's key (a removed server's row is never given out again).
_RETIRED = 0xFF

Key = tuple[str, str]
"""A server's key: (upstream name, address as written in the config)."""


class State(enum.IntEnum):
    """A server's active-check state (the ``state`` column)."""

    UNKNOWN = 0
    """Not checked yet, or not checked at all (no ``health_check``): counts as up."""
    UP = 1
    """``healthy_threshold`` consecutive checks passed (or it was never down)."""
    DOWN = 2
    """``unhealthy_threshold`` consecutive checks failed."""


class Failure(enum.IntEnum):
    """Why a check failed, as the ``last_result`` column holds it (negative; a positive value
    is the HTTP status of the last answer, 0 no check yet)."""

    REFUSED = -1
    """The connection was refused."""
    TIMEOUT = -2
    """No connection, or no status line, within ``timeout_seconds``."""
    RESET = -3
    """The connection was reset."""
    CLOSED = -4
    """The server closed the connection before a status line."""
    BAD_RESPONSE = -5
    """What came back is not an HTTP/1.x status line."""
    TLS = -6
    """The TLS handshake failed (certificate, protocol)."""
    RESOLVE = -7
    """The host name did not resolve."""
    ERROR = -8
    """Another socket error (unreachable network, say)."""


def describe(result: int) -> str:
    """``last_result`` in words: ``"200"``, ``"connect refused"``, ``"no check yet"``."""
    if result > 0:
        return f"status {result}"
    if result == 0:
        return "no check yet"
    return _FAILURE_TEXT.get(result, f"error {result}")


_FAILURE_TEXT: dict[int, str] = {
    Failure.REFUSED: "connect refused",
    Failure.TIMEOUT: "timeout",
    Failure.RESET: "connection reset",
    Failure.CLOSED: "closed before a status line",
    Failure.BAD_RESPONSE: "bad status line",
    Failure.TLS: "TLS handshake failed",
    Failure.RESOLVE: "name not resolved",
    Failure.ERROR: "socket error",
}


def capacity_for(servers: int) -> int:
    """Rows for a new table of ``servers`` servers: twice as many, at least :data:`MIN_CAPACITY`."""
    return max(MIN_CAPACITY, 2 * servers)


def encode_key(key: Key) -> bytes:
    """The key's bytes as the table stores them. Raises ``ValueError`` when too long."""
    raw = f"{key[0]}\0{key[1]}".encode()
    if len(raw) > KEY_BYTES or not raw or raw[0] == _RETIRED:
        raise ValueError(f"health table: key {key!r} does not fit {KEY_BYTES} bytes")
    return raw


def _align(n: int) -> int:
    return -(-n // 8) * 8


class HealthTable(SharedTable):
    """Health of every server: ``HealthTable.create(capacity)`` in the master,
    ``attach_prober(fd)`` in the prober, ``attach(fd)`` in a worker (read-only).

    Columns are ``memoryview``s indexed by row (see the module docstring for their writers).
    """

    MAGIC = 0x48594E54  # "TNYH"
    VERSION = 1
    NAME = "tenaya-health"
    PARAMS = 2

    capacity: int
    """Rows."""
    layouts: int
    """Usable vectors."""
    # The master's region.
    keys: memoryview
    """The row keys, :data:`KEY_BYTES` each (the directory)."""
    owners: memoryview
    """Per vector, the pid of the master whose generation uses it; 0 when free (u64)."""
    counts: memoryview
    """Per vector, its number of servers (u64)."""
    ejected_until_ns: memoryview
    """Per row, ``CLOCK_MONOTONIC`` ns until which the server is ejected (u64; 0: not ejected).
    Writer: the master's outlier aggregator. Monotonic time is system-wide, so a new master
    compares it alike."""
    ejections: memoryview
    """Per row, how many times the server was ejected (u64). Writer: the outlier aggregator."""
    drained: memoryview
    """Per row, 1 while an operator drains or disables the server (u8). Writer: the control
    socket's handler."""
    # The prober's region.
    state: memoryview
    """Per row, a :class:`State` (u8)."""
    rises: memoryview
    """Per row, consecutive passed checks (u64)."""
    falls: memoryview
    """Per row, consecutive failed checks (u64)."""
    checks: memoryview
    """Per row, checks done (u64)."""
    last_check_ns: memoryview
    """Per row, wall-clock ns of the last check's end (u64; 0: none)."""
    since_ns: memoryview
    """Per row, wall-clock ns of the last change of state (u64; 0: never changed)."""
    last_result: memoryview
    """Per row, the last check's HTTP status, or a :class:`Failure` (i64; 0: none)."""
    last_latency_us: memoryview
    """Per row, the last check's duration in microseconds (u64)."""

    @classmethod
    def data_size(cls, *params: int) -> int:
        """The master's region then the prober's, each whole pages."""
        capacity, layouts = params
        if capacity < 1 or layouts < 1:
            raise ValueError("a health table needs at least one row and one vector")
        return cls._master_bytes(capacity, layouts) + cls._prober_bytes(capacity)

    @classmethod
    def create(cls, *params: int) -> HealthTable:
        """A new table (the master) of ``capacity`` rows and :data:`LAYOUTS` vectors; every
        row fresh (UNKNOWN: up)."""
        if len(params) == 1:
            params = (params[0], LAYOUTS)
        return super().create(*params)

    @staticmethod
    def _master_bytes(capacity: int, layouts: int) -> int:
        size = capacity * KEY_BYTES
        size += layouts * 16 + layouts * _align(4 * capacity)
        size += 16 * capacity + _align(capacity)
        size += layouts * _align(capacity)
        return pages(size)

    @staticmethod
    def _prober_bytes(capacity: int) -> int:
        return pages(7 * 8 * capacity + _align(capacity))

    def _setup(self) -> None:
        self.capacity, self.layouts = cap, lay = self.params
        view, data = self._view, self.data
        self.keys = self._keep(data[: cap * KEY_BYTES])
        at = cap * KEY_BYTES
        self.owners = view(data, at, "Q", lay)
        self.counts = view(data, at + 8 * lay, "Q", lay)
        at += 16 * lay
        self._rows = []
        for _ in range(lay):
            self._rows.append(view(data, at, "I", cap))
            at += _align(4 * cap)
        self.ejected_until_ns = view(data, at, "Q", cap)
        self.ejections = view(data, at + 8 * cap, "Q", cap)
        at += 16 * cap
        self.drained = view(data, at, "B", cap)
        at += _align(cap)
        self._usable = []
        for _ in range(lay):
            self._usable.append(view(data, at, "B", cap))
            at += _align(cap)
        self._prober_offset = self._master_bytes(cap, lay)
        self._prober_views(self.data[self._prober_offset :])

    def _prober_views(self, region: memoryview) -> None:
        """Makes the prober's columns on ``region`` (the whole map's, or the prober's own
        writable map of the same pages)."""
        cap, view = self.capacity, self._view
        self.rises = view(region, 0, "Q", cap)
        self.falls = view(region, 8 * cap, "Q", cap)
        self.checks = view(region, 16 * cap, "Q", cap)
        self.last_check_ns = view(region, 24 * cap, "Q", cap)
        self.since_ns = view(region, 32 * cap, "Q", cap)
        self.last_result = view(region, 40 * cap, "q", cap)
        self.last_latency_us = view(region, 48 * cap, "Q", cap)
        self.state = view(region, 56 * cap, "B", cap)

    # -- attaching ------------------------------------------------------------------------

    @classmethod
    def attach_prober(cls, fd: int) -> HealthTable:
        """The prober's table: everything read-only but the active columns, which are mapped
        writable on their own pages. Raises ``ValueError`` for a bad header."""
        table = cls.attach(fd)
        try:
            size = cls._prober_bytes(table.capacity)
            assert table._prober_offset % PAGE == 0
            table._prober_views(table._map(table._prober_offset, size, writable=True))
        except BaseException:
            table.close()
            raise
        return table

    # -- reading --------------------------------------------------------------------------

    def usable(self, layout: int) -> memoryview:
        """Usable vector ``layout``: a byte per server of its generation, in config order
        (servers numbered across upstreams). Slice it per upstream
        (``usable(layout)[first:first + count]``) for ``Members``' usable mask; the view
        belongs to the table (valid until :meth:`close`)."""
        return self._usable[layout]

    def vector_rows(self, layout: int) -> memoryview:
        """The rows of vector ``layout``'s servers, in its config order (u32; the first
        ``counts[layout]`` count)."""
        return self._rows[layout]

    def key(self, row: int) -> Key | None:
        """Row ``row``'s key, or None for a fresh or retired row."""
        raw = bytes(self.keys[row * KEY_BYTES : (row + 1) * KEY_BYTES]).rstrip(b"\0")
        if not raw or raw[0] == _RETIRED:
            return None
        upstream, _, address = raw.decode().partition("\0")
        return upstream, address

    def is_up(self, row: int) -> bool:
        """True unless the active checks found the server down."""
        return self.state[row] != State.DOWN

    def copy_from(self, old: HealthTable, moves: Iterable[tuple[int, int]]) -> None:
        """Copies row ``old_row`` of ``old`` to row ``new_row`` here, for each pair of
        ``moves``: key, every column. The master does it on a table it just created (a rebuild
        for more rows, or a layout version change), before any prober writes it: stop the
        old table's prober first, or its last writes may be lost. Vectors are not copied (the
        master publishes them anew)."""
        for src, dst in moves:
            self.keys[dst * KEY_BYTES : (dst + 1) * KEY_BYTES] = old.keys[
                src * KEY_BYTES : (src + 1) * KEY_BYTES
            ]
            for name in _ROW_COLUMNS:
                getattr(self, name)[dst] = getattr(old, name)[src]


#: Every per-row column, as :meth:`HealthTable.copy_from` copies them.
_ROW_COLUMNS = (
    "ejected_until_ns",
    "ejections",
    "drained",
    "state",
    "rises",
    "falls",
    "checks",
    "last_check_ns",
    "since_ns",
    "last_result",
    "last_latency_us",
)


class TableFull(Exception):
    """The table has no fresh row left for a new server: build a larger one."""


class HealthDirectory:
    """The master's directory of a :class:`HealthTable`: which row is whose, which vector is
    whose, and the usable bytes (the master is their only writer).

    ``pid`` is the master's process id (the owner it writes into the vectors it takes).
    """

    def __init__(self, table: HealthTable, pid: int | None = None) -> None:
        self.table = table
        self.pid = os.getpid() if pid is None else pid
        self.rows: dict[Key, int] = {}
        """Row of each key in the table."""
        self._fresh = 0
        for row in range(table.capacity):
            if table.keys[row * KEY_BYTES] != 0:
                self._fresh = row + 1
                key = table.key(row)
                if key is not None:
                    self.rows[key] = row
        #: Per vector this master owns: row -> positions of that row in it.
        self._positions: dict[int, dict[int, list[int]]] = {}
        for layout in range(table.layouts):
            if table.owners[layout] == self.pid:
                self._index(layout)

    @classmethod
    def from_table(cls, table: HealthTable) -> HealthDirectory:
        """The directory of a table created by another master (the new master after an
        upgrade): rows and keys read from the table."""
        return cls(table)

    def _index(self, layout: int) -> None:
        rows = self.table.vector_rows(layout)
        positions: dict[int, list[int]] = {}
        for pos in range(self.table.counts[layout]):
            positions.setdefault(rows[pos], []).append(pos)
        self._positions[layout] = positions

    # -- vectors --------------------------------------------------------------------------

    def publish(self, keys: Sequence[Key]) -> int:
        """Gives the servers ``keys`` (a generation's, in config order, numbered across
        upstreams) their rows (a kept key keeps its row, a new one gets a fresh row) and a usable
        vector of their own, filled in; returns the vector's number, to pass to the workers of
        that generation with the table's descriptor. Rows used by no vector any more are retired
        (call :meth:`release` for a generation that is gone first). Raises :class:`TableFull`
        when there are not enough fresh rows (nothing changed then), ``RuntimeError`` when
        every vector is in use."""
        table = self.table
        layout = self._free_layout()
        new = [k for k in dict.fromkeys(keys) if k not in self.rows]
        if self._fresh + len(new) > table.capacity:
            raise TableFull(f"{len(new)} new servers, {table.capacity - self._fresh} rows left")
        for key in new:
            raw = encode_key(key)
            row = self._fresh
            self._fresh += 1
            table.keys[row * KEY_BYTES : row * KEY_BYTES + len(raw)] = raw
            self.rows[key] = row
        rows = table.vector_rows(layout)
        for pos, key in enumerate(keys):
            rows[pos] = self.rows[key]
        table.counts[layout] = len(keys)
        table.owners[layout] = self.pid
        self._index(layout)
        self.refresh()
        self._retire_unused()
        return layout

    def release(self, layout: int) -> None:
        """Frees vector ``layout`` (its generation has exited) and retires the rows no vector
        names any more."""
        self._positions.pop(layout, None)
        self.table.counts[layout] = 0
        self.table.owners[layout] = 0
        self._retire_unused()

    def _free_layout(self) -> int:
        table = self.table
        for layout in range(table.layouts):
            owner = table.owners[layout]
            if owner == 0 or (owner != self.pid and not _alive(owner)):
                return layout
        raise RuntimeError("health table: every usable vector is in use")

    def _retire_unused(self) -> None:
        """Retires rows no live vector names (their servers were removed)."""
        table = self.table
        used: set[int] = set()
        for layout in range(table.layouts):
            owner = table.owners[layout]
            if owner == self.pid or (owner != 0 and _alive(owner)):
                rows = table.vector_rows(layout)
                used.update(rows[: table.counts[layout]])
        for key, row in list(self.rows.items()):
            if row not in used:
                table.keys[row * KEY_BYTES] = _RETIRED
                del self.rows[key]

    # -- usable ---------------------------------------------------------------------------

    def usable_now(self, row: int, now_ns: int | None = None) -> bool:
        """Whether row ``row`` may take requests: not DOWN, not drained, not ejected."""
        table = self.table
        if now_ns is None:
            now_ns = time.monotonic_ns()
        return (
            table.state[row] != State.DOWN
            and not table.drained[row]
            and table.ejected_until_ns[row] <= now_ns
        )

    def refresh(self, rows: Iterable[int] | None = None, now_ns: int | None = None) -> None:
        """Rewrites the usable bytes of ``rows`` (default: all) in every vector this master
        owns. The master calls it when the prober reports a change of state, after a drain or
        an ejection, and on each loop turn for ejections that ended."""
        if now_ns is None:
            now_ns = time.monotonic_ns()
        table = self.table
        for layout, positions in self._positions.items():
            vector = table.usable(layout)
            for row in positions if rows is None else rows:
                at = positions.get(row)
                if at:
                    value = 1 if self.usable_now(row, now_ns) else 0
                    for pos in at:
                        vector[pos] = value

    def grown(self, capacity: int) -> HealthDirectory:
        """A directory on a new table of ``capacity`` rows holding this one's rows, state
        included, renumbered from 0 (for :class:`TableFull`). Stop the prober of this table
        first (see :meth:`HealthTable.copy_from`); the new table has no vectors: publish the
        new generation's, hand the new descriptor to its workers and to a new prober, and keep
        this table until the generations reading it have exited. Raises ``ValueError`` when
        ``capacity`` is too small."""
        if capacity < len(self.rows):
            raise ValueError(f"{capacity} rows cannot hold {len(self.rows)} servers")
        table = HealthTable.create(capacity, self.table.layouts)
        moves = [(old, new) for new, old in enumerate(sorted(self.rows.values()))]
        table.copy_from(self.table, moves)
        return HealthDirectory(table, self.pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
