"""shared.lb.ketama: the Ketama ring maps keys as nginx's ``hash ... consistent`` and
Pingora's pingora-ketama do; stickiness, minimal movement, the next server when one is down,
backups; and the hash_key functions (shared.lb.keys)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from shared.lb import ConsistentHash, Members, Ring, Turns, key_function
from shared.lb.ketama import POINTS_PER_WEIGHT, address_text, server_points
from shared.peer import HttpPeer
from shared.shm import BalanceTable

# Request URIs and the server (10.0.0.N:443) that nginx's consistent hash chose for each, with
# nine servers of weight 100: the first rows of the sample trace that pingora-ketama's tests
# check against (test-data/sample-nginx-upstream.csv there).
NGINX_SAMPLE = [
    (b"/81fa1d251d605775d647b5b55565e71526d4cef6", 7),
    (b"/2fec328e6ccdda6a7edf329f9f780e546ea183b4", 5),
    (b"/19fb835d90883a6263ec4279c6da184e3f1a79b2", 4),
    (b"/da7a88e542f7aaddc074f988164b9df7e5f7fea6", 4),
    (b"/8f87cfd8005306643b6528b3d4125cf005139a7e", 5),
    (b"/26d2769eab098458bc3e4e641a4b7d8abffd0aea", 6),
    (b"/aa5b5323980f2d3e21246212ebd820c3949c1e88", 7),
    (b"/d9c4bc3cc4517c629e8f4c911c2fd8baf260ae65", 1),
    (b"/28c1c069a2904bb3b3e0f9731b1ff8de9ab7a76d", 4),
    (b"/fe5199bdfeee5cd431ae7e9f77f178164f9995a0", 9),
    (b"/43992eee187920c5e8695332f71ca6e23ef6ac4b", 3),
    (b"/38528aab753a6f32de86b5a7acdbb0c885137a81", 9),
    (b"/12d4b9155ff599c0ac554226796b58a2278b450f", 7),
    (b"/9c34c9a4f9009997dd29c6e6a627b0aca7beb6e5", 5),
    (b"/eb5a2ab55796afd673874fd7560f1329be5540bd", 9),
    (b"/ad7b5395766b77098c3f212043650a805b622ffe", 3),
    (b"/c72fedf4177499635302849496898fe4f3409cc1", 9),
    (b"/77766138aaf0c016bdd1f6b996177fc8ca1d2204", 8),
    (b"/860c86b94e04f2648fb164c87fd6166707fd08ff", 6),
    (b"/1b419454e4eb63ef915e8e06cc11110a3ccd607e", 7),
    (b"/a8762dc488e1a1af31e53af8ddb887d4f3cca990", 8),
    (b"/2e8e8e8fdeada0bbd33ba57d20209b4d9343f965", 4),
    (b"/0220fa8b9a256e7fcf823097759aa3c44e6390e3", 6),
    (b"/418c1c554186b78c11de89227fbc24ef128bce54", 8),
]


def _ring(addresses: Sequence[str], weight: int = 1) -> tuple[list[str], Ring]:
    servers = [
        (a.rsplit(":", 1)[0].strip("[]"), int(a.rsplit(":", 1)[1]), weight) for a in addresses
    ]
    return list(addresses), Ring(servers)


def test_matches_nginx_sample_trace() -> None:
    """Nine servers of weight 100: every key of the sample goes where nginx sent it."""
    ring = Ring([(f"10.0.0.{n}", 443, 100) for n in range(1, 10)])
    assert len(ring.hashes) <= 9 * 100 * POINTS_PER_WEIGHT
    assert [(key, ring.server(key) + 1) for key, _ in NGINX_SAMPLE] == NGINX_SAMPLE


def test_matches_pingora_ketama_vectors() -> None:
    """The mappings pingora-ketama's own tests assert (two servers, weight 1)."""
    names, ring = _ring(["127.0.0.1:7777", "127.0.0.1:7778"])
    expected = {
        b"/some/path": "127.0.0.1:7778",
        b"/some/longer/path": "127.0.0.1:7777",
        b"/sad/zaidoon": "127.0.0.1:7778",
        b"/g": "127.0.0.1:7777",
        b"/pingora/team/is/cool/and/this/is/a/long/uri": "127.0.0.1:7778",
        b"/i/am/not/confident/in/this/code": "127.0.0.1:7777",
    }
    assert {key: names[ring.server(key)] for key in expected} == expected


def test_weights_and_ring_order_match_pingora() -> None:
    """Weighted servers and the points after a key (pingora-ketama's documented example and
    its node_iter test, IPv6 included)."""
    _, ring = _ring(["127.0.0.1:12345", "127.0.0.2:12345", "127.0.0.3:12345"])
    weighted = Ring([(f"127.0.0.{n}", 12345, n) for n in (1, 2, 3)])
    assert [weighted.server(k) + 1 for k in (b"some_key", b"another_key", b"last_key")] == [
        3,
        3,
        2,
    ]
    names, ring = _ring(["127.0.0.1:7777", "127.0.0.1:7778", "127.0.0.1:7779"])
    p = ring.lookup(b"doghash")
    after = [names[ring.owners[(p + j) % len(ring.owners)]][-4:] for j in range(8)]
    assert after == ["7778", "7779", "7779", "7777", "7777", "7778", "7778", "7779"]
    names, ring = _ring(["[::1]:7777", "[::1]:7778", "[::1]:7779"])
    p = ring.lookup(b"doghash")
    after = [names[ring.owners[(p + j) % len(ring.owners)]][-4:] for j in range(7)]
    assert after == ["7777", "7778", "7777", "7778", "7778", "7777", "7779"]


def test_adding_a_server_keeps_existing_keys() -> None:
    """pingora-ketama's check: with ten servers and with eleven, a and b stay put."""
    ten = Ring([(f"127.0.0.{u}", 6443, 1) for u in range(1, 11)])
    eleven = Ring([(f"127.0.0.{u}", 6443, 1) for u in range(1, 12)])
    for ring in (ten, eleven):
        assert (ring.server(b"a") + 1, ring.server(b"b") + 1) == (10, 5)


def test_point_hashes() -> None:
    """A server's points: 160 per unit of weight, hashed from HOST \\0 PORT."""
    assert address_text("::1", 80) == b"::1\x0080"
    assert address_text("0:0::1", 80) == b"::1\x0080"
    assert address_text("origin.internal", 8080) == b"origin.internal\x008080"
    assert len(server_points("10.0.0.1", 443, 3)) == 3 * POINTS_PER_WEIGHT


def _peers(n: int) -> list[HttpPeer]:
    return [HttpPeer(f"10.1.0.{i}:8080") for i in range(1, n + 1)]


KEYS = [b"user-%d" % i for i in range(4000)]


def test_removing_one_of_n_moves_only_its_keys() -> None:
    """Ten servers, then the same without the fourth: exactly the keys the fourth had move
    (about a tenth), and the others keep their server."""
    peers = _peers(10)
    before = ConsistentHash(Members(peers))
    after = ConsistentHash(Members(peers[:3] + peers[4:]))
    moved = [k for k in KEYS if before.select(k) != after.select(k)]
    assert all(before.select(k) is peers[3] for k in moved)
    assert sum(before.select(k) is peers[3] for k in KEYS) == len(moved)
    assert 0.06 < len(moved) / len(KEYS) < 0.14


def test_sticky_across_workers() -> None:
    """Two workers' selectors (one table) send a key to the same server every time."""
    table = BalanceTable.create(1, 4, 2)
    a = BalanceTable.attach_slot(os.dup(table.fd), 0)
    b = BalanceTable.attach_slot(os.dup(table.fd), 1)
    try:
        peers = _peers(4)
        sa = ConsistentHash(Members(peers), turns=Turns.shared(a, 0))
        sb = ConsistentHash(Members(peers), turns=Turns.shared(b, 0))
        for key in KEYS[:200]:
            assert sa.select(key) is sb.select(key) is sa.select(key)
    finally:
        a.close()
        b.close()
        table.close()


def test_down_server_goes_to_the_next_on_the_ring() -> None:
    """A key whose server is not usable goes to the next server on the ring that is; the
    keys of the other servers do not move."""
    peers = _peers(5)
    mask = bytearray(b"\x01" * len(peers))
    members = Members(peers, usable=mask)
    selector = ConsistentHash(members)
    before = {k: selector.select_index(k) for k in KEYS[:500]}
    mask[2] = 0
    ring = selector.rings[0]
    for key, i in before.items():
        now = selector.select_index(key)
        if i != 2:
            assert now == i
        else:
            assert now == [j for j in ring.walk(key) if j != 2][0]
    assert list(selector.iter_indices(KEYS[0]))[0] == selector.select_index(KEYS[0])
    assert 2 not in selector.iter_indices(KEYS[0])


def test_weights_on_the_ring() -> None:
    """A server of weight 3 gets about three times the keys of one of weight 1."""
    peers = _peers(2)
    selector = ConsistentHash(Members(peers, [3, 1]))
    counts = Counter(selector.select_index(k) for k in KEYS)
    assert 0.68 < counts[0] / len(KEYS) < 0.82


def test_backups_and_keyless_requests() -> None:
    """Backups only while no primary is usable (on their own ring); a request without a key
    is balanced in rotation."""
    peers = _peers(3)
    mask = bytearray(b"\x01" * len(peers))
    members = Members(peers, backup=[False, False, True], usable=mask)
    selector = ConsistentHash(members)
    assert {selector.select_index(k) for k in KEYS[:100]} == {0, 1}
    assert [selector.select(None), selector.select(b""), selector.select(None)] == [
        peers[0],
        peers[1],
        peers[0],
    ]
    mask[0] = mask[1] = 0
    assert {selector.select_index(k) for k in KEYS[:100]} == {2}
    assert selector.select(None) is peers[2]
    mask[2] = 0
    assert selector.select(b"k") is None and selector.select(None) is None
    assert list(selector.iter(b"k")) == []


# -- hash_key ------------------------------------------------------------------------------


@dataclass
class _Request:
    url: bytes = b"/"
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    client_addr: tuple[str, int] = ("192.0.2.7", 40000)


REQUEST = _Request(
    url=b"/cart/items?user=u42&x&lang=fr",
    raw_headers=[
        (b"Host", b"shop"),
        (b"X-User", b"alice"),
        (b"Cookie", b"theme=dark; sid=abc123"),
        (b"x-user", b"bob"),
    ],
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("header:X-User", b"alice"),
        ("header:x-user", b"alice"),
        ("header:X-Missing", None),
        ("cookie:sid", b"abc123"),
        ("cookie:theme", b"dark"),
        ("cookie:none", None),
        ("query:user", b"u42"),
        ("query:x", b""),
        ("query:lang", b"fr"),
        ("query:y", None),
        ("path", b"/cart/items"),
        ("client_ip", b"192.0.2.7"),
    ],
)
def test_key_functions(spec: str, expected: bytes | None) -> None:
    assert key_function(spec)(REQUEST) == expected


def test_query_without_a_query() -> None:
    assert key_function("query:a")(_Request(url=b"/a")) is None


@pytest.mark.parametrize("spec", ["", "header", "header:", "uri", "cookie:a b", "query:a=b"])
def test_bad_hash_key(spec: str) -> None:
    """A hash_key that is none of the forms raises ValueError with the reason."""
    with pytest.raises(ValueError, match=repr(spec)):
        key_function(spec)
