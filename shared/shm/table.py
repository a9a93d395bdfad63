"""The base of every fixed-layout shared-memory table.

Theory of operation. The master creates a table before it forks or spawns any worker: an
anonymous memory file (``memfd_create`` with ``MFD_CLOEXEC``, so nothing is named in the file
system and nothing outlives the processes that hold it), sized for the table's layout. The
file's first page is a header: a magic number naming the kind of table, the layout version,
the data size, and up to :data:`MAX_PARAMS` layout parameters (a table's dimensions). The
data starts on the second page, so any part of it that is a whole number of pages can be
mapped on its own (a worker's own writable row, see :mod:`shared.shm.balance`).

A worker gets the descriptor (inherited across ``fork``, or passed to a spawned process like
the listeners) and calls :meth:`SharedTable.attach`, which checks the header against what this
code expects (the kind, the version, the file's size) before mapping anything, so a worker of
another release never reads a layout it does not know. A table is mapped read-only or
writable; readers tolerate a moment's staleness, and each cell has one writer (the subclass
says which), so no lock is needed: an aligned 8-byte cell is read and written whole.

Cells are reached through typed views (``memoryview`` casts of the map), made once when the
table is mapped and kept by the table. :meth:`SharedTable.close` releases the views, then the
maps, then the descriptor, each exactly once, whatever was mapped.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import ClassVar, Literal, Self

#: Layout parameters a header holds (unused ones are 0).
MAX_PARAMS = 8
#: Bytes of the header page, also the granularity of partial maps.
PAGE = mmap.ALLOCATIONGRANULARITY
# magic, version, data size, then the parameters.
_HEADER = struct.Struct(f"<IIQ{MAX_PARAMS}I")

#: The cell formats a view may have (native-endian unsigned/signed integers).
CellFormat = Literal["B", "I", "Q", "q"]


def pages(size: int) -> int:
    """``size`` bytes rounded up to whole pages."""
    return -(-size // PAGE) * PAGE


class SharedTable:
    """A table in an anonymous memory file: create it in the master, attach to it elsewhere.

    A subclass sets :attr:`MAGIC`, :attr:`VERSION` and :attr:`NAME`, says how many data bytes
    its parameters need (:meth:`data_size`) and makes its views in :meth:`_setup`, with
    :meth:`_view`; it sets :attr:`PARAMS` too. ``params`` are the table's dimensions, in the
    subclass's order.
    """

    MAGIC: ClassVar[int]
    """Names the kind of table (four ASCII letters as a little-endian u32)."""
    VERSION: ClassVar[int]
    """The layout version; bump it when the layout changes."""
    NAME: ClassVar[str]
    """The memory file's name, as ``/proc/PID/fd`` shows it."""
    PARAMS: ClassVar[int]
    """How many layout parameters the header holds for this kind of table."""

    fd: int
    """The memory file; pass it to the processes that attach."""
    params: tuple[int, ...]
    """The layout parameters, as created."""
    writable: bool
    """True when the whole table is mapped writable (the creator)."""

    def __init__(self, fd: int, params: tuple[int, ...], writable: bool) -> None:
        """Maps an existing, checked table (use :meth:`create` or :meth:`attach`)."""
        self.fd = fd
        self.params = params
        self.writable = writable
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._closed = False
        try:
            self.data = self._map(0, self.data_size(*params), writable)
            """The whole data area as bytes (a view of the map)."""
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- the subclass's part --------------------------------------------------------------

    @classmethod
    def data_size(cls, *params: int) -> int:
        """The data bytes a table with these parameters needs (after the header page).
        Raises ``ValueError`` for parameters the layout cannot hold."""
        raise NotImplementedError

    def _setup(self) -> None:
        """Makes the subclass's views of :attr:`data` (runs once, when mapped)."""

    # -- creating and attaching -----------------------------------------------------------

    @classmethod
    def create(cls, *params: int) -> Self:
        """A new zeroed table (the master), mapped writable; its :attr:`fd` is what others
        attach to. Raises ``ValueError`` for parameters the layout cannot hold."""
        if len(params) != cls.PARAMS or any(not 0 <= p < 2**32 for p in params):
            raise ValueError(f"{cls.__name__}: bad layout parameters {params}")
        size = cls.data_size(*params)
        fd = os.memfd_create(cls.NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, PAGE + pages(size))
            padded = params + (0,) * (MAX_PARAMS - len(params))
            os.pwrite(fd, _HEADER.pack(cls.MAGIC, cls.VERSION, size, *padded), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, tuple(params), writable=True)

    @classmethod
    def read_header(cls, fd: int) -> tuple[int, ...]:
        """The layout parameters of the table in ``fd``, checked against this class: raises
        ``ValueError`` when the file is not such a table of this version, or is too short."""
        raw = os.pread(fd, _HEADER.size, 0)
        if len(raw) < _HEADER.size:
            raise ValueError(f"{cls.__name__}: not a shared table (short header)")
        magic, version, size, *padded = _HEADER.unpack(raw)
        if magic != cls.MAGIC:
            raise ValueError(f"{cls.__name__}: not this kind of table (magic {magic:#x})")
        if version != cls.VERSION:
            raise ValueError(f"{cls.__name__}: layout version {version}, expected {cls.VERSION}")
        params = tuple(padded[: cls.PARAMS])
        if cls.data_size(*params) != size or os.fstat(fd).st_size < PAGE + size:
            raise ValueError(f"{cls.__name__}: the file does not match its header")
        return params

    @classmethod
    def attach(cls, fd: int, writable: bool = False) -> Self:
        """Maps a table made by :meth:`create` from an inherited descriptor, read-only unless
        ``writable``; the table owns ``fd`` from then on (:meth:`close` closes it). Raises
        ``ValueError`` when the header does not match this class."""
        return cls(fd, cls.read_header(fd), writable)

    # -- views ----------------------------------------------------------------------------

    def _map(self, offset: int, size: int, writable: bool) -> memoryview:
        """Maps ``size`` data bytes from ``offset`` (a multiple of :data:`PAGE`) and returns
        a byte view of them, kept until :meth:`close`."""
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        m = mmap.mmap(self.fd, max(size, 1), mmap.MAP_SHARED, prot, offset=PAGE + offset)
        self._maps.append(m)
        view = memoryview(m)[:size]
        self._views.append(view)
        return view

    def _view(self, base: memoryview, offset: int, fmt: CellFormat, count: int) -> memoryview:
        """``count`` cells of struct format ``fmt`` (``"Q"``, ``"q"``, ``"I"``, ``"B"``) at
        byte ``offset`` of ``base``, kept until :meth:`close`."""
        size = struct.calcsize(fmt)
        view = base[offset : offset + size * count].cast(fmt)
        self._views.append(view)
        return view

    def _keep(self, view: memoryview) -> memoryview:
        """Keeps a view derived from one of this table's views (a slice), so that
        :meth:`close` releases it too; returns it."""
        self._views.append(view)
        return view

    # -- closing --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def close(self) -> None:
        """Releases the views (newest first, so derived views go before their bases), the
        maps and the descriptor. Runs once; later calls do nothing. A view handed out and
        still exported elsewhere (a ``memoryview`` of it) makes this raise ``BufferError``."""
        if self._closed:
            return
        self._closed = True
        views, self._views = self._views, []
        maps, self._maps = self._maps, []
        for view in reversed(views):
            view.release()
        for m in maps:
            m.close()
        os.close(self.fd)
