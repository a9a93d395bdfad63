"""HPACK (RFC 7541) for the downstream HTTP/2 server: a decoder that remembers header blocks,
and an encoder that needs no state.

Theory of operation. Decoding is where a proxy spends its HTTP/2 CPU, and clients repeat
themselves: once a client has put its request headers in the dynamic table, every further
request with the same headers is the same handful of index bytes. The decoder counts changes
to its dynamic table in a generation number; a block that changed nothing decodes to the same
fields whenever the generation is the same, so ``(generation, block)`` is a cache key and a
repeated request costs one dict lookup. The cache belongs to the connection (the table is
per connection) and is bounded.

The encoder sends what it can as an index into the static table, and everything else as a
literal that is never added to the dynamic table (so it has no state, and neither side keeps
a table for responses; nginx encodes this way too). Credentials are sent "never indexed", so
that no intermediary compresses them. Literals are not Huffman coded: in Python it costs more
CPU than the bytes it saves on a proxy's links. Encodings of fields are cached across
connections.
"""

from __future__ import annotations

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

#: The static table (RFC 7541 Appendix A), index 1 first.
STATIC = HeaderTable.STATIC_TABLE
#: The dynamic table size a decoder starts with (SETTINGS_HEADER_TABLE_SIZE's default).
DEFAULT_TABLE_SIZE = 4096
#: Decoded blocks one connection remembers, and the longest block it remembers (a repeated
#: request is a few bytes of indexes; long blocks are rare and would hold memory).
BLOCK_CACHE_SIZE = 64
MAX_CACHED_BLOCK = 1024
#: Encoded fields remembered process-wide (cleared when full: dates and lengths vary).
FIELD_CACHE_SIZE = 4096
#: Longest string or integer a block may declare (a block is never longer than this anyway).
MAX_LENGTH = 1 << 24
#: Fields whose values are sent "never indexed" (RFC 7541 7.1.3).
SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})

Fields = list[tuple[bytes, bytes]]


class DecodeError(Exception):
    """The block is not valid HPACK: a COMPRESSION_ERROR for the whole connection."""


class ListTooLarge(Exception):
    """The fields a block decodes to pass the decoder's hard limit (a few bytes of indexes
    can name kilobytes each): decoding stops, and the connection cannot go on."""


def _integer(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """The integer whose ``prefix``-bit start is in ``data[pos]``; returns it and the next
    position."""
    mask = (1 << prefix) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise DecodeError("truncated integer")
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        if value > MAX_LENGTH:
            raise DecodeError("integer too large")
        if not b & 0x80:
            return value, pos
        shift += 7


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos >= len(data):
        raise DecodeError("truncated string")
    huffman = data[pos] & 0x80
    length, pos = _integer(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise DecodeError("truncated string")
    raw = data[pos:end]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except HPACKDecodingError as e:
            raise DecodeError(str(e)) from None
    return raw, end


class Decoder:
    """One connection's HPACK decoder (the client's requests to us)."""

    __slots__ = ("table", "size", "max_size", "limit", "generation", "cache")

    def __init__(self, limit: int = DEFAULT_TABLE_SIZE) -> None:
        #: Dynamic table entries, newest first.
        self.table: Fields = []
        self.size = 0
        #: The size the client last chose (at most ``limit``, what we allow).
        self.max_size = limit
        self.limit = limit
        #: Changes each time the dynamic table does.
        self.generation = 0
        #: (generation, block) -> what a caller made of that block's fields.
        self.cache: dict[tuple[int, bytes], object] = {}

    def cached(self, block: bytes) -> object | None:
        """What :meth:`remember` stored for this block at this table state, if anything."""
        return self.cache.get((self.generation, block))

    def remember(self, generation: int, block: bytes, value: object) -> None:
        """Stores a caller's result for a block that left the table as it was."""
        if generation != self.generation or len(block) > MAX_CACHED_BLOCK:
            return
        cache = self.cache
        if len(cache) >= BLOCK_CACHE_SIZE:
            cache.clear()
        cache[(generation, block)] = value

    def decode(self, data: bytes, hard_limit: int = MAX_LENGTH) -> Fields:
        """The block's fields; raises :class:`ListTooLarge` as soon as their size (as
        SETTINGS_MAX_HEADER_LIST_SIZE counts it) passes ``hard_limit``."""
        fields: Fields = []
        append = fields.append
        table = self.table
        pos = 0
        end = len(data)
        total = 0
        while pos < end:
            b = data[pos]
            if b & 0x80:  # indexed field
                index, pos = _integer(data, pos, 7)
                field = self._entry(index)
                total += len(field[0]) + len(field[1]) + 32
                if total > hard_limit:
                    raise ListTooLarge(f"header list over {hard_limit} bytes")
                append(field)
                continue
            if b & 0x40:  # literal, added to the table
                index, pos = _integer(data, pos, 6)
            elif b & 0x20:  # dynamic table size update
                if fields:
                    raise DecodeError("table size update after a field")
                size, pos = _integer(data, pos, 5)
                if size > self.limit:
                    raise DecodeError(f"table size {size} over the limit {self.limit}")
                self.max_size = size
                self._evict()
                self.generation += 1
                continue
            else:  # literal, not added (or never added)
                index, pos = _integer(data, pos, 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, pos = _string(data, pos)
            value, pos = _string(data, pos)
            total += len(name) + len(value) + 32
            if total > hard_limit:
                raise ListTooLarge(f"header list over {hard_limit} bytes")
            append((name, value))
            if b & 0x40:
                table.insert(0, (name, value))
                self.size += len(name) + len(value) + 32
                self._evict()
                self.generation += 1
        return fields

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= 61:
            return STATIC[index - 1]
        try:
            if index > 61:
                return self.table[index - 62]
        except IndexError:
            pass
        raise DecodeError(f"no table entry {index}")

    def _evict(self) -> None:
        table = self.table
        while self.size > self.max_size:
            name, value = table.pop()
            self.size -= len(name) + len(value) + 32


def _encode_integer(value: int, prefix: int, first: int) -> bytes:
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes((first | value,))
    out = bytearray((first | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_FULL = {field: i + 1 for i, field in reversed(list(enumerate(STATIC)))}
_NAMES = {name: i + 1 for i, (name, _) in reversed(list(enumerate(STATIC)))}
_fields: dict[tuple[bytes, bytes], bytes] = {}


def encode_field(field: tuple[bytes, bytes]) -> bytes:
    """One field's representation (cached); the name must be lower case."""
    out = _fields.get(field)
    if out is not None:
        return out
    index = _FULL.get(field)
    name, value = field
    if index is not None:
        out = bytes((0x80 | index,))
    else:
        first = 0x10 if name in SENSITIVE else 0x00
        name_index = _NAMES.get(name)
        if name_index is not None:
            out = _encode_integer(name_index, 4, first)
        else:
            out = bytes((first,)) + _encode_integer(len(name), 7, 0) + name
        out += _encode_integer(len(value), 7, 0) + value
    if len(_fields) >= FIELD_CACHE_SIZE:
        _fields.clear()
    _fields[field] = out
    return out


def encode(fields: Fields) -> bytes:
    """A header block for ``fields`` (lower-case names, pseudo-fields first)."""
    get = _fields.get
    return b"".join([get(f) or encode_field(f) for f in fields])
