"""worker.h2_hpack: the decoder (with its block cache) and the stateless encoder, checked
against RFC 7541's examples and cross-checked with the ``hpack`` package both ways."""

from __future__ import annotations

import random

import hpack
import pytest

import worker.h2.hpack as h2_hpack
from worker.h2.hpack import (
    BLOCK_CACHE_SIZE,
    STATIC,
    DecodeError,
    Decoder,
    Fields,
    _encode_integer,
    _integer,
    encode,
    encode_field,
)


def unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


def table_of(enc: hpack.Encoder) -> Fields:
    """The ``hpack`` encoder's dynamic table, newest first."""
    return list(enc.header_table.dynamic_entries)


# -- integers (RFC 7541 5.1, C.1) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "prefix", "encoded"),
    [
        (10, 5, b"\x0a"),  # C.1.1
        (1337, 5, b"\x1f\x9a\x0a"),  # C.1.2
        (42, 8, b"\x2a"),  # C.1.3
        (30, 5, b"\x1e"),
        (31, 5, b"\x1f\x00"),  # exactly the prefix's maximum takes a second byte
        (127, 7, b"\x7f\x00"),
        (128, 7, b"\x7f\x01"),
        (254, 7, b"\x7f\x7f"),
        (255, 7, b"\x7f\x80\x01"),
        (16_510, 7, b"\x7f\xff\x7f"),
        (16_511, 7, b"\x7f\x80\x80\x01"),
    ],
)
def test_integers(value: int, prefix: int, encoded: bytes) -> None:
    """Integers with an N-bit prefix, both ways, at and around the multi-byte boundaries."""
    assert _encode_integer(value, prefix, 0) == encoded
    assert _integer(encoded + b"rest", 0, prefix) == (value, len(encoded))


def test_integer_keeps_flag_bits() -> None:
    """The bits above the prefix belong to the representation, not the integer."""
    assert _encode_integer(5, 4, 0x10) == b"\x15"
    assert _integer(b"\xff\x00", 0, 4) == (15, 2)


@pytest.mark.parametrize("data", [b"\x1f", b"\x1f\x80", b"\x1f\xff\xff\xff\xff\x7f"])
def test_bad_integers(data: bytes) -> None:
    """A truncated integer, or one past any block's length, is a DecodeError."""
    with pytest.raises(DecodeError):
        _integer(data, 0, 5)


# -- decoding: RFC 7541 Appendix C ----------------------------------------------------------

C3 = [  # Requests without Huffman coding
    (
        "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"www.example.com"),
        ],
        [(b":authority", b"www.example.com")],
    ),
    (
        "8286 84be 5808 6e6f 2d63 6163 6865",
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"www.example.com"),
            (b"cache-control", b"no-cache"),
        ],
        [(b"cache-control", b"no-cache"), (b":authority", b"www.example.com")],
    ),
    (
        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", b"/index.html"),
            (b":authority", b"www.example.com"),
            (b"custom-key", b"custom-value"),
        ],
        [
            (b"custom-key", b"custom-value"),
            (b"cache-control", b"no-cache"),
            (b":authority", b"www.example.com"),
        ],
    ),
]
C4 = [  # The same requests, Huffman coded
    "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
    "8286 84be 5886 a8eb 1064 9cbf",
    "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
]
_DATE_1 = b"Mon, 21 Oct 2013 20:13:21 GMT"
_DATE_2 = b"Mon, 21 Oct 2013 20:13:22 GMT"
_COOKIE = b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
C5 = [  # Responses without Huffman coding, a 256-byte table: evictions
    (
        "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133"
        "2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70"
        "6c65 2e63 6f6d",
        [
            (b":status", b"302"),
            (b"cache-control", b"private"),
            (b"date", _DATE_1),
            (b"location", b"https://www.example.com"),
        ],
        222,
    ),
    (
        "4803 3330 37c1 c0bf",
        [
            (b":status", b"307"),
            (b"cache-control", b"private"),
            (b"date", _DATE_1),
            (b"location", b"https://www.example.com"),
        ],
        222,
    ),
    (
        "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d"
        "54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049"
        "5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e"
        "3d31",
        [
            (b":status", b"200"),
            (b"cache-control", b"private"),
            (b"date", _DATE_2),
            (b"location", b"https://www.example.com"),
            (b"content-encoding", b"gzip"),
            (b"set-cookie", _COOKIE),
        ],
        215,
    ),
]


def test_rfc_requests_without_huffman() -> None:
    """RFC 7541 C.3: three requests on one connection, the dynamic table growing."""
    dec = Decoder()
    for text, fields, table in C3:
        assert dec.decode(unhex(text)) == fields
        assert dec.table == table
    assert dec.size == 164


def test_rfc_requests_with_huffman() -> None:
    """RFC 7541 C.4: the same requests with Huffman-coded strings decode the same."""
    dec = Decoder()
    for text, (_, fields, table) in zip(C4, C3, strict=True):
        assert dec.decode(unhex(text)) == fields
        assert dec.table == table
    assert dec.size == 164


def test_rfc_responses_with_eviction() -> None:
    """RFC 7541 C.5: with a 256-byte table, older entries are evicted as new ones come."""
    dec = Decoder(256)
    for text, fields, size in C5:
        assert dec.decode(unhex(text)) == fields
        assert dec.size == size
    assert dec.table == [
        (b"set-cookie", _COOKIE),
        (b"content-encoding", b"gzip"),
        (b"date", _DATE_2),
    ]


def test_static_table() -> None:
    """All 61 static entries decode by index, the first and last as RFC 7541 lists them."""
    dec = Decoder()
    block = b"".join(_encode_integer(i, 7, 0x80) for i in range(1, 62))
    fields = dec.decode(block)
    assert fields == list(STATIC)
    assert fields[0] == (b":authority", b"")
    assert fields[60] == (b"www-authenticate", b"")
    assert dec.table == [] and dec.generation == 0


# -- decoding: cross-checked with the hpack package ----------------------------------------


def test_hpack_encoder_round_trip() -> None:
    """What ``hpack.Encoder`` makes (Huffman or not, indexed, literal, never indexed) decodes
    to the same fields, and both sides' dynamic tables stay equal."""
    enc = hpack.Encoder()
    dec = Decoder()
    lists: list[list[tuple[bytes, bytes, bool]]] = [
        [(b":method", b"GET", False), (b":path", b"/a", False), (b"x-a", b"1", False)],
        [(b":method", b"GET", False), (b":path", b"/a", False), (b"x-a", b"1", False)],
        [
            (b":method", b"POST", False),
            (b"authorization", b"Bearer t", True),
            (b"cookie", b"a=b", True),
            (b"x-long", b"v" * 1000, False),
        ],
        [
            (b"x-empty", b"", False),
            (b"", b"empty name", False),
            (b"x-bin", bytes(range(256)), False),
        ],
    ]
    for huffman in (True, False):
        for fields in lists:
            block = enc.encode(fields, huffman=huffman)
            assert dec.decode(block) == [(n, v) for n, v, _ in fields]
            assert dec.table == table_of(enc)
            assert dec.size == enc.header_table._current_size


def test_random_traffic_with_evictions_and_size_updates() -> None:
    """Many random header lists, some values repeating, some big enough to evict, with table
    size changes now and then: the decoder agrees with ``hpack`` throughout."""
    rng = random.Random(7541)
    enc = hpack.Encoder()
    dec = Decoder()
    names = [b"x-%d" % i for i in range(20)] + [b"user-agent", b"accept", b"cookie"]
    for _ in range(500):
        if rng.random() < 0.05:
            enc.header_table_size = rng.choice([0, 64, 256, 1024, 4096])
        fields = [
            (
                rng.choice(names),
                b"v" * rng.choice([0, 1, 10, 100, 300, 2000]) + b"%d" % rng.randrange(4),
            )
            for _ in range(rng.randrange(1, 8))
        ]
        block = enc.encode(fields, huffman=rng.random() < 0.5)
        assert dec.decode(block) == fields
        assert dec.table == table_of(enc)
        assert dec.max_size == enc.header_table_size


def test_size_updates() -> None:
    """A table size update evicts what no longer fits; 0 empties the table; two updates at
    the start of a block are allowed; each changes the generation."""
    dec = Decoder()
    dec.decode(b"\x40\x03x-a\x011" + b"\x40\x03x-b\x012")  # two 36-byte entries
    assert dec.size == 72
    gen = dec.generation
    assert dec.decode(b"\x3f\x1a") == []  # 31 + 26 = 57: only the newest fits
    assert dec.table == [(b"x-b", b"2")] and dec.max_size == 57
    assert dec.generation > gen
    assert dec.decode(b"\x20\x3f\xe1\x1f\x82") == [(b":method", b"GET")]  # 0, then 4096
    assert dec.table == [] and dec.size == 0 and dec.max_size == 4096


def test_size_update_errors() -> None:
    """A size over the limit the connection allows, or an update after a field, is an
    error (RFC 7541 4.2, 6.3)."""
    with pytest.raises(DecodeError):
        Decoder().decode(b"\x3f\xe2\x1f")  # 4097
    with pytest.raises(DecodeError):
        Decoder(100).decode(b"\x3f\x46")  # 101
    assert Decoder(100).decode(b"\x3f\x45") == []
    with pytest.raises(DecodeError):
        Decoder().decode(b"\x82\x20")


def test_entry_larger_than_table() -> None:
    """An entry larger than the whole table empties it and is not added (RFC 7541 4.4), but
    is still a field of the block."""
    dec = Decoder(64)
    dec.decode(b"\x40\x03x-a\x011")
    assert dec.decode(b"\x40\x03x-b\x20" + b"b" * 32) == [(b"x-b", b"b" * 32)]
    assert dec.table == [] and dec.size == 0
    with pytest.raises(DecodeError):
        dec.decode(b"\xbe")


def test_zero_size_table() -> None:
    """With a zero-sized table nothing is stored, and nothing can be referred to."""
    dec = Decoder(0)
    assert dec.decode(b"\x40\x03x-a\x011") == [(b"x-a", b"1")]
    assert dec.table == []


def test_literal_forms() -> None:
    """Without indexing and never indexed, with an indexed name or a literal one: fields,
    but no table change and no new generation."""
    dec = Decoder()
    block = (
        b"\x04\x01/" + b"\x00\x03x-a\x011" + b"\x14\x02/x" + b"\x10\x03x-b\x012" + b"\x0f\x28\x02a="
    )  # set-cookie (55): a 4-bit prefix overflows
    assert dec.decode(block) == [
        (b":path", b"/"),
        (b"x-a", b"1"),
        (b":path", b"/x"),
        (b"x-b", b"2"),
        (b"set-cookie", b"a="),
    ]
    assert dec.table == [] and dec.generation == 0


def test_dynamic_indexes() -> None:
    """Index 62 is the newest entry, counting back from there; one past the end fails."""
    dec = Decoder()
    dec.decode(b"\x40\x03x-a\x011" + b"\x40\x03x-b\x012" + b"\x40\x03x-c\x013")
    assert dec.decode(b"\xbe\xbf\xc0") == [(b"x-c", b"3"), (b"x-b", b"2"), (b"x-a", b"1")]
    assert dec.decode(b"\x7e\x019") == [(b"x-c", b"9")]  # name from index 62, then added
    assert dec.table[0] == (b"x-c", b"9")
    with pytest.raises(DecodeError):
        dec.decode(b"\xc2")  # 66: four entries, 62..65


@pytest.mark.parametrize(
    "block",
    [
        b"\x80",  # index 0
        b"\xfe",  # 126: no such entry
        b"\x40",  # a literal name's length missing
        b"\x40\x05abc",  # a name longer than the block
        b"\x04\x7f",  # a value length cut short
        b"\x04\x85abcd",  # a Huffman value longer than the block
        b"\x04\x81\xff",  # Huffman padding of 8 bits (RFC 7541 5.2)
        b"\x04\x84\xff\xff\xff\xff",  # the EOS symbol
        b"\x04\x81\x00",  # padding that is not the EOS prefix
        b"\x00\x80",  # a name (empty, Huffman coded) and no value
    ],
)
def test_garbage(block: bytes) -> None:
    """Blocks that are not valid HPACK raise DecodeError, never anything else."""
    with pytest.raises(DecodeError):
        Decoder().decode(block)


def test_huffman_strings() -> None:
    """Huffman-coded names and values, short and long, all byte values."""
    coder = hpack.huffman.HuffmanEncoder(
        hpack.huffman_constants.REQUEST_CODES, hpack.huffman_constants.REQUEST_CODES_LENGTH
    )
    dec = Decoder()
    for raw in [b"a", b"custom-key", bytes(range(256)), b"\xff" * 200, b"z" * 5000]:
        coded = coder.encode(raw)
        block = b"\x00" + _encode_integer(len(coded), 7, 0x80) + coded
        block += _encode_integer(len(coded), 7, 0x80) + coded
        assert dec.decode(block) == [(raw, raw)]


# -- the block cache ------------------------------------------------------------------------


def test_cache_remembers_per_generation() -> None:
    """remember() stores under the generation the block was decoded at; cached() finds it
    only while the table is still at that generation."""
    dec = Decoder()
    block = b"\x82\x84"
    gen = dec.generation
    fields = dec.decode(block)
    dec.remember(gen, block, fields)
    assert dec.cached(block) is fields
    dec.decode(b"\x40\x03x-a\x011")
    assert dec.cached(block) is None


def test_cache_skips_blocks_that_changed_the_table() -> None:
    """A block that changed the table (its generation is stale by the time it is
    remembered) is not stored: the same bytes would change the table again."""
    dec = Decoder()
    block = b"\x40\x03x-a\x011"
    gen = dec.generation
    dec.decode(block)
    dec.remember(gen, block, "result")
    assert dec.cache == {} and dec.cached(block) is None


def test_cache_is_bounded() -> None:
    """The cache holds at most BLOCK_CACHE_SIZE blocks (it starts over when full)."""
    dec = Decoder()
    for i in range(BLOCK_CACHE_SIZE * 3 + 5):
        block = b"\x82\x04" + _encode_integer(len(b"/%d" % i), 7, 0) + b"/%d" % i
        dec.remember(dec.generation, block, dec.decode(block))
        assert len(dec.cache) <= BLOCK_CACHE_SIZE
    assert dec.cached(block) == [(b":method", b"GET"), (b":path", b"/%d" % i)]


# -- encoding -------------------------------------------------------------------------------


def test_encode_static_fields() -> None:
    """Fields in the static table are one index byte; the lowest index wins."""
    assert encode([(b":status", b"200"), (b":method", b"GET"), (b":path", b"/")]) == b"\x88\x82\x84"
    assert encode([(b":status", b"404")]) == b"\x8d"
    assert encode([(b"accept-encoding", b"gzip, deflate")]) == b"\x90"
    assert encode([(b"authorization", b"")]) == b"\x97"  # an empty credential: indexed


def test_encode_literals() -> None:
    """Other fields are literals without indexing: a static name index when there is one
    (a 4-bit prefix, so index 15 and over take two bytes), else a literal name; lengths of
    128 and more take multi-byte integers; nothing is Huffman coded."""
    assert encode([(b":status", b"201")]) == b"\x08\x03201"
    assert encode([(b"content-type", b"text/plain")]) == b"\x0f\x10\x0atext/plain"
    assert encode([(b"x-a", b"1")]) == b"\x00\x03x-a\x011"
    long = b"v" * 200
    assert encode([(b"x-a", long)]) == b"\x00\x03x-a\x7f\x49" + long
    big = b"w" * 20_000
    assert encode([(b"server", big)]) == b"\x0f\x27\x7f\xa1\x9b\x01" + big
    name = b"n" * 130
    assert encode([(name, b"")]) == b"\x00\x7f\x03" + name + b"\x00"


def test_encode_credentials_never_indexed() -> None:
    """Credentials go out "never indexed" (RFC 7541 7.1.3), so no intermediary compresses
    them; ``hpack`` reads them back as such."""
    fields = [
        (b"authorization", b"Basic dXNlcjpwYXNz"),
        (b"proxy-authorization", b"x"),
        (b"cookie", b"sid=1"),
        (b"set-cookie", b"sid=2; HttpOnly"),
        (b"x-not-secret", b"y"),
    ]
    block = encode(fields)
    assert block.startswith(b"\x1f\x08")  # never indexed, name index 23
    out = hpack.Decoder().decode(block, raw=True)
    assert out == fields
    assert [isinstance(h, hpack.NeverIndexedHeaderTuple) for h in out] == [
        True,
        True,
        True,
        True,
        False,
    ]


def test_encode_round_trip_with_hpack() -> None:
    """What we encode, ``hpack`` decodes to the same fields and its dynamic table stays
    empty (we never index), whatever the fields and value lengths."""
    rng = random.Random(9113)
    names = [n for n, _ in STATIC] + [b"x-custom", b"x-" + b"l" * 300, b"grpc-status"]
    for _ in range(200):
        peer = hpack.Decoder()
        peer.max_header_list_size = 1 << 24
        fields = [
            (
                rng.choice(names),
                bytes(rng.randrange(32, 127) for _ in range(rng.choice([0, 3, 127, 128, 5000]))),
            )
            for _ in range(rng.randrange(1, 10))
        ]
        fields += rng.sample(STATIC, 3)
        assert list(peer.decode(encode(fields), raw=True)) == fields
        assert not peer.header_table.dynamic_entries


def test_encode_round_trip_with_our_decoder() -> None:
    """Our decoder reads our encoder's blocks, and its table stays empty."""
    dec = Decoder()
    fields = [
        (b":status", b"200"),
        (b"set-cookie", b"a=1"),
        (b"x-a", b"b" * 300),
        (b"content-length", b"12345"),
    ]
    assert dec.decode(encode(fields)) == fields
    assert dec.table == [] and dec.generation == 0


def test_field_cache() -> None:
    """A field's encoding is computed once and reused; the cache is bounded."""
    first = encode_field((b"x-cache-test", b"1"))
    assert encode_field((b"x-cache-test", b"1")) is first


def test_field_cache_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the field cache is full it starts over, and encodings stay right."""
    monkeypatch.setattr(h2_hpack, "FIELD_CACHE_SIZE", 8)
    monkeypatch.setattr(h2_hpack, "_fields", {})
    for i in range(50):
        field = (b"date", b"day %d" % i)
        assert encode([field]) == b"\x0f\x12" + bytes((len(field[1]),)) + field[1]
        assert len(h2_hpack._fields) <= 8
