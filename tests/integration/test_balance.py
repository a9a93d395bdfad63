"""Fleet-wide selection through real masters with 4 workers and real origins (issue 12): round
robin alternates across workers on new connections, weights hold, hash keys stick across
workers and move minimally when a reload removes a server, least_conn keeps load off a slow
server, random spreads, a reload keeps the rotation going, and the balance tables' descriptors
are closed exactly once (``/proc/PID/fd``).

Which server took a request is read at the origins: each request has a target of its own, and
the origin that recorded it is the one the proxy chose. Every request goes on a new client
connection, so the kernel spreads them over the 4 workers' sockets.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from typing import Any

import yaml

from tests.conftest import Fleet
from tests.support.client import get
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.origin import Origin
from tests.support.waits import wait_for

WORKERS = 4
#: What /proc/PID/fd shows for a balance table (shared/shm/balance.py's NAME).
TABLE_LINK = "/memfd:tenaya-balance"


def balanced(servers: list[Any], **upstream: Any) -> dict[str, Any]:
    """A config of one upstream ``web`` with these servers and settings, 4 workers."""
    config = config_for(server={"workers": WORKERS})
    config["upstreams"] = {"web": {"servers": servers, **upstream}}
    return config


def start(fleet: Fleet, n: int, **upstream: Any) -> tuple[Master, list[Origin]]:
    origins = [fleet.origin(name=f"o{i}") for i in range(n)]
    return fleet.master(balanced([o.address for o in origins], **upstream)), origins


def served_by(origins: list[Origin], target: str) -> int:
    """The index of the origin that received ``target`` (exactly one did)."""
    got = [i for i, o in enumerate(origins) if target in o.paths()]
    assert len(got) == 1, f"{target} reached origins {got}"
    return got[0]


def send(m: Master, origins: list[Origin], target: str, **headers: str) -> int:
    """One GET on a new connection; the index of the origin that answered it."""
    r = get(m.port, target, headers=list(headers.items()))
    assert r.status == 200, r
    return served_by(origins, target)


def reload(m: Master, config: dict[str, Any], generation: int) -> None:
    """Rewrites the config, sends SIGHUP, and waits until only the new generation's workers
    are left (the old ones drained and exited)."""
    m.config = {**config, "logging": m.config["logging"]}
    m.config_path.write_text(yaml.safe_dump(m.config, sort_keys=False))
    before = {p.pid for p in m.workers()}
    m.signal(signal.SIGHUP)
    wait_for(
        lambda: f"generation {generation} serving" in m.read_error_log(),
        timeout=30,
        what=f"generation {generation} serving",
    )
    wait_for(
        lambda: len(pids := {p.pid for p in m.workers()}) == WORKERS and not pids & before,
        timeout=30,
        what="only the new generation's workers",
    )


def table_fds(pid: int) -> tuple[int, int]:
    """The balance tables process ``pid`` holds open, and its descriptors of them (a map of
    the table holds a descriptor of its own: Python's mmap keeps a duplicate)."""
    inodes: list[int] = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(TABLE_LINK):
                inodes.append(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except FileNotFoundError:
            pass
    return len(set(inodes)), len(inodes)


def test_round_robin_alternates_across_workers(fleet: Fleet) -> None:
    """30 requests, each on a new connection (whatever worker takes it): each goes to the
    server after the previous one's."""
    m, origins = start(fleet, 3)
    seen = [send(m, origins, f"/rr/{i}") for i in range(30)]
    for prev, cur in zip(seen, seen[1:], strict=False):
        assert cur == (prev + 1) % 3, seen


def test_weights_three_to_one(fleet: Fleet) -> None:
    """Weights 3:1 give 3/4 and 1/4 of 400 requests, within a few percent."""
    heavy, light = fleet.origin(name="heavy"), fleet.origin(name="light")
    m = fleet.master(balanced([{"address": heavy.address, "weight": 3}, light.address]))
    origins = [heavy, light]
    counts = Counter(send(m, origins, f"/w/{i}") for i in range(400))
    assert abs(counts[0] - 300) <= 12 and abs(counts[1] - 100) <= 12, counts


def test_hash_sticks_across_workers_and_a_removed_server_moves_only_its_keys(
    fleet: Fleet,
) -> None:
    m, origins = start(fleet, 3, balance="hash", hash_key="header:X-User")
    keys = [f"user-{i}" for i in range(60)]
    placed = {k: send(m, origins, f"/h/{k}/0", **{"X-User": k}) for k in keys}
    assert set(placed.values()) == {0, 1, 2}  # 60 keys land on every server
    for round_ in (1, 2):
        for k in keys[:20]:
            assert send(m, origins, f"/h/{k}/{round_}", **{"X-User": k}) == placed[k]
    # Server 2 leaves by a reload: its keys move, every other key stays.
    reload(
        m,
        balanced([o.address for o in origins[:2]], balance="hash", hash_key="header:X-User"),
        2,
    )
    moved = 0
    for k in keys:
        now = send(m, origins, f"/h/{k}/after", **{"X-User": k})
        if placed[k] == 2:
            assert now in (0, 1)
            moved += 1
        else:
            assert now == placed[k], k
    assert moved == sum(1 for v in placed.values() if v == 2)


def test_least_conn_gives_a_slow_server_a_small_share(fleet: Fleet) -> None:
    """8 clients at once, 15 requests each: the server that takes 0.3 s per request has
    requests in flight longer, so least_conn (counted over the fleet) sends it few."""
    slow = fleet.origin(name="slow", delay=0.3)
    fast = [fleet.origin(name=f"fast{i}") for i in range(2)]
    m = fleet.master(balanced([slow.address, *(o.address for o in fast)], balance="least_conn"))
    statuses: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(15):
            try:
                r = get(m.port, f"/lc/{n}/{i}")
            except OSError as e:
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                statuses.append(r.status)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert errors == [] and statuses == [200] * 120
    share = sum(1 for p in slow.paths() if p.startswith("/lc/")) / 120
    assert share < 0.15, share  # a third without least_conn


def test_random_spreads(fleet: Fleet) -> None:
    m, origins = start(fleet, 3, balance="random")
    counts = Counter(send(m, origins, f"/rnd/{i}") for i in range(240))
    assert all(counts[i] >= 40 for i in range(3)), counts


def test_a_reload_keeps_the_rotation_going(fleet: Fleet) -> None:
    """After a reload the next request goes to the server after the last one's, not to the
    first server again; the tables' descriptors are closed once their generation is gone."""
    m, origins = start(fleet, 3)
    master_fds = table_fds(m.pid)
    assert master_fds[0] == 1
    workers_fds = [table_fds(p.pid) for p in m.workers()]
    assert [tables for tables, _ in workers_fds] == [1] * WORKERS
    seen = [send(m, origins, f"/k/{i}") for i in range(4)]
    assert seen == [0, 1, 2, 0]
    for generation in (2, 3, 4):
        reload(m, m.config, generation)
        wait_for(lambda: table_fds(m.pid) == master_fds, timeout=10, what="one table in the master")
        seen.append(send(m, origins, f"/k/g{generation}"))
    # The master's descriptors of the tables of generations 1 to 3 were each closed once:
    # as many as at the start, not more (a leak) and not fewer (closed twice would raise).
    assert seen[4:] == [1, 2, 0], seen
    assert [table_fds(p.pid) for p in m.workers()] == workers_fds


def test_a_respawned_worker_keeps_the_rotation(fleet: Fleet) -> None:
    """A worker killed and respawned on its slot: its row is retired first, so the fleet's
    turn never goes back and the rotation goes on."""
    m, origins = start(fleet, 3)
    seen = [send(m, origins, f"/r/{i}") for i in range(8)]
    victims = m.workers()
    for w in victims:
        os.kill(w.pid, signal.SIGKILL)
    old = {w.pid for w in victims}
    wait_for(
        lambda: len(pids := {p.pid for p in m.workers()}) == WORKERS and not pids & old,
        timeout=30,
        what="respawned workers",
    )
    wait_for(lambda: get(m.port, "/warm").status == 200, timeout=10)
    seen.append(served_by(origins, "/warm"))
    seen += [send(m, origins, f"/r/after/{i}") for i in range(4)]
    for prev, cur in zip(seen, seen[1:], strict=False):
        assert cur == (prev + 1) % 3, seen
    assert table_fds(m.pid)[0] == 1
