"""What a public listener needs: ``server.max_connections`` (a worker at its limit stops
accepting; new connections wait in the accept queue, unanswered but not reset, until one
closes)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet
from helpers import HttpConn, Master, build_request, config_for, get, wait_for

#: How long a connection waiting in the accept queue is watched for an answer it must not get.
UNANSWERED_SECONDS = 1.0


def status(m: Master) -> dict[str, Any]:
    """``status --json`` of the master, through its control socket."""
    out = subprocess.run([sys.executable, "-m", "master", "status", "--json", "-c",
                          str(m.config_path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def assert_unanswered(conn: HttpConn) -> None:
    """Nothing comes back on ``conn`` for a while, and it is not reset or closed."""
    conn.sock.settimeout(UNANSWERED_SECONDS)
    with pytest.raises(TimeoutError):
        data = conn.sock.recv(1)
        raise AssertionError(f"answered or closed: {data!r}")


def held_connections(port: int, count: int) -> list[HttpConn]:
    """``count`` keep-alive connections, each with one request answered, left open idle."""
    conns = [HttpConn(port) for _ in range(count)]
    for conn in conns:
        assert conn.request().status == 200
    return conns


# -- server.max_connections ----------------------------------------------------------------


def test_worker_at_max_connections_leaves_new_ones_waiting_until_one_closes(
        fleet: Fleet, tmp_path: Path) -> None:
    """Three idle keep-alive connections fill a worker's limit of 3: a fourth connection is
    made by the kernel, but its request is not answered, nor is it reset, while they stay
    open; ``status`` says the worker is paused with 3 connections. Once one of the three
    closes, the fourth gets its answer. The log says when accepting paused and resumed."""
    origin = fleet.origin()
    m = fleet.master(config_for({"o": [origin.address]}, server={
        "workers": 1, "max_connections": 3, "control_socket": str(tmp_path / "ctl.sock")}))
    held = held_connections(m.port, 3)
    wait_for(lambda: "accepting paused" in m.read_error_log())
    with HttpConn(m.port) as fourth:
        fourth.send(build_request("GET", "/fourth"))
        assert_unanswered(fourth)
        (worker,) = wait_for(lambda: [w for w in status(m)["workers"] if w["accept_paused"]])
        assert worker["connections"] == 3
        assert worker["accept_pauses"] == 1
        assert "/fourth" not in origin.paths()
        held.pop().close()
        fourth.sock.settimeout(10)
        assert fourth.read_response().status == 200
        # The fourth made three again: a second pause, counted but not logged so soon.
    assert "/fourth" in origin.paths()
    wait_for(lambda: "accepting resumed" in m.read_error_log())
    log = m.read_error_log()
    assert log.count("accepting paused") == 1, log
    assert re.search(r"accepting paused: 3 connections open, server.max_connections is 3", log)
    assert re.search(r"accepting resumed: 2 connections open", log)
    (worker,) = wait_for(lambda: [w for w in status(m)["workers"] if not w["accept_paused"]])
    assert worker["accept_pauses"] == 2
    for conn in held:
        assert conn.request().status == 200
        conn.close()


def test_draining_worker_at_its_limit_never_accepts_again(fleet: Fleet) -> None:
    """A worker paused at its limit that drains (a reload) does not resume when its
    connections close: the connection waiting in the queue is answered by the new worker,
    and the old worker exits without having accepted again."""
    origin = fleet.origin()
    m = fleet.master(config_for({"o": [origin.address]},
                                server={"workers": 1, "max_connections": 2}))
    (old,) = [w.pid for w in m.workers()]
    held = held_connections(m.port, 2)
    wait_for(lambda: "accepting paused" in m.read_error_log())
    with HttpConn(m.port) as waiting:
        waiting.send(build_request("GET", "/waiting"))
        assert_unanswered(waiting)
        m.signal(signal.SIGHUP)
        waiting.sock.settimeout(30)
        assert waiting.read_response().status == 200
    # The old worker closes its idle connections as it drains, and exits.
    for conn in held:
        assert conn.closed_by_peer(timeout=30)
        conn.close()
    wait_for(lambda: old not in [w.pid for w in m.workers()], timeout=30)
    log = m.read_error_log()
    assert not re.search(rf"\[worker 0 {old}\] \S+ accepting resumed", log), log
    assert get(m.port, "/").status == 200
