"""What a public listener needs: ``server.max_connections`` (a worker at its limit stops
accepting; new connections wait in the accept queue, unanswered but not reset, until one
closes), and ``server.user``/``server.group`` (the root master binds a privileged port and
stays root; its workers switch to the user before they serve, and keep serving across log
reopens, reloads and upgrades)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import psutil
import pytest
import yaml

from tests.conftest import Fleet
from tests.support.client import HttpConn, build_request, get
from tests.support.config import config_for
from tests.support.master import Master, is_worker
from tests.support.waits import wait_for

#: How long a connection waiting in the accept queue is watched for an answer it must not get.
UNANSWERED_SECONDS = 1.0


def status(m: Master) -> dict[str, Any]:
    """``status --json`` of the master, through its control socket."""
    out = subprocess.run(
        [sys.executable, "-m", "master", "status", "--json", "-c", str(m.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
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
    fleet: Fleet, tmp_path: Path
) -> None:
    """Three idle keep-alive connections fill a worker's limit of 3: a fourth connection is
    made by the kernel, but its request is not answered, nor is it reset, while they stay
    open; ``status`` says the worker is paused with 3 connections. Once one of the three
    closes, the fourth gets its answer. The log says when accepting paused and resumed."""
    origin = fleet.origin()
    m = fleet.master(
        config_for(
            {"o": [origin.address]},
            server={
                "workers": 1,
                "max_connections": 3,
                "control_socket": str(tmp_path / "ctl.sock"),
            },
        )
    )
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


def h2c_connection(port: int, paths: list[str]) -> socket.socket:
    """An HTTP/2 connection (prior knowledge) on which each of ``paths`` was fetched in turn
    (200 each), left open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    for path in paths:
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1")],
            end_stream=True,
        )
        sock.sendall(conn.data_to_send())
        status, ended = None, False
        while not ended:
            data = sock.recv(65536)
            assert data, "the HTTP/2 connection closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
                ended = ended or (
                    isinstance(event, h2.events.StreamEnded) and event.stream_id == stream
                )
            sock.sendall(conn.data_to_send())
        assert status == b"200"
    return sock


def test_an_http2_connection_counts_once(fleet: Fleet, tmp_path: Path) -> None:
    """Under a limit of 2, an HTTP/2 connection that made three requests and an HTTP/1.1 one
    are two connections: the worker pauses with 2, not before."""
    origin = fleet.origin()
    m = fleet.master(
        config_for(
            {"o": [origin.address]},
            server={
                "workers": 1,
                "max_connections": 2,
                "control_socket": str(tmp_path / "ctl.sock"),
            },
        )
    )
    with h2c_connection(m.port, ["/h2-1", "/h2-2", "/h2-3"]):
        (worker,) = wait_for(lambda: [w for w in status(m)["workers"] if w["connections"] == 1])
        assert not worker["accept_paused"] and "accepting paused" not in m.read_error_log()
        (held,) = held_connections(m.port, 1)
        with held:
            wait_for(lambda: "accepting paused: 2 connections open" in m.read_error_log())
            with HttpConn(m.port) as third:
                third.send(build_request("GET", "/third"))
                assert_unanswered(third)


def test_draining_worker_at_its_limit_never_accepts_again(fleet: Fleet) -> None:
    """A worker paused at its limit that drains (a reload) does not resume when its
    connections close: the connection waiting in the queue is answered by the new worker,
    and the old worker exits without having accepted again."""
    origin = fleet.origin()
    m = fleet.master(
        config_for({"o": [origin.address]}, server={"workers": 1, "max_connections": 2})
    )
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


# -- server.user / server.group ------------------------------------------------------------


def _free_privileged_port() -> int:
    """A port below 1024 that nothing listens on at 127.0.0.1."""
    for port in range(81, 1024):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise pytest.skip.Exception("no free port below 1024 on 127.0.0.1")


def _ids(name: str, group: str) -> tuple[int, int]:
    try:
        return pwd.getpwnam(name).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:
        raise pytest.skip.Exception(
            f"this system has no user {name!r} or group {group!r}"
        ) from None


def _supplementary_groups(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:]}
    raise AssertionError(f"no Groups line for {pid}")


def assert_identities(master_pid: int, uid: int, gid: int, control: Path, count: int) -> None:
    """The master runs as root; each of its ``count`` workers as ``uid``/``gid`` (real,
    effective and saved; supplementary groups the user's), without the control socket; the
    control socket is the master's alone (0600, root's)."""
    master = psutil.Process(master_pid)
    assert tuple(master.uids()) == (0, 0, 0)

    def serving() -> list[psutil.Process]:
        found = [
            c
            for c in master.children()
            if is_worker(c) and "(draining)" not in " ".join(c.cmdline())
        ]
        return found if len(found) == count else []

    workers = wait_for(serving, timeout=30)
    for w in workers:
        assert tuple(w.uids()) == (uid, uid, uid), w
        assert tuple(w.gids()) == (gid, gid, gid), w
        assert _supplementary_groups(w.pid) == set(os.getgrouplist("nobody", gid))
        assert str(control) not in {c.laddr for c in w.net_connections("unix")}
    st = os.stat(control)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (0, 0)


@pytest.mark.skipif(
    os.geteuid() != 0, reason="switching the workers to another user needs a master started as root"
)
def test_root_master_binds_a_privileged_port_and_its_workers_run_as_server_user(
    fleet: Fleet, tmp_path: Path
) -> None:
    """``server.user: nobody``, ``server.group: nogroup`` on 127.0.0.1 below 1024: the master
    binds it and stays root; its workers run as nobody:nogroup and proxy to a real origin.
    After logrotate moved the logs into a folder nobody cannot reach, a reopen still gets the
    workers' lines into the new files; a reload and then an upgrade keep all of that."""
    uid, gid = _ids("nobody", "nogroup")
    origin = fleet.origin()
    port = _free_privileged_port()
    control = tmp_path / "ctl.sock"
    pid_file = tmp_path / "tenaya.pid"
    m = fleet.master(
        config_for(
            {"o": [origin.address]},
            listeners=[{"address": f"127.0.0.1:{port}"}],
            server={
                "workers": 2,
                "user": "nobody",
                "group": "nogroup",
                "control_socket": str(control),
                "pid_file": str(pid_file),
            },
        )
    )
    assert m.port == port
    assert_identities(m.pid, uid, gid, control, 2)
    assert get(port, "/as-nobody").status == 200
    assert "/as-nobody" in origin.paths()

    # logrotate moves the files away; new ones are made once the workers are told. The logs'
    # folder is root's alone, so a worker could not open a file there itself.
    os.chmod(m.workdir, 0o700)
    wait_for(lambda: "/as-nobody" in m.read_access_log())
    m.access_log.rename(m.access_log.with_name("access.log.1"))
    m.error_log.rename(m.error_log.with_name("error.log.1"))
    m.signal(signal.SIGUSR1)
    wait_for(lambda: "log files reopened" in m.read_error_log())
    wait_for(
        lambda: get(port, "/after-reopen").status == 200 and "/after-reopen" in m.read_access_log()
    )
    # A worker told by SIGUSR1 itself reopens by path, which nobody cannot: it says so, in
    # the new file, and goes on writing there.
    worker = m.workers()[0]
    worker.send_signal(signal.SIGUSR1)
    wait_for(
        lambda: re.search(
            rf"\[worker \d+ {worker.pid}\] ERROR cannot reopen .*access", m.read_error_log()
        )
    )
    assert get(port, "/still-logged").status == 200
    wait_for(lambda: "/still-logged" in m.read_access_log())

    m.signal(signal.SIGHUP)
    wait_for(lambda: "generation 2 serving" in m.read_error_log(), timeout=30)
    assert_identities(m.pid, uid, gid, control, 2)
    assert get(port, "/after-reload").status == 200

    m.signal(signal.SIGUSR2)
    new = wait_for(lambda: (p := int(pid_file.read_text() or 0)) != m.pid and p, timeout=30)
    try:
        assert m.wait(timeout=30) == 0
        assert_identities(new, uid, gid, control, 2)
        assert get(port, "/after-upgrade").status == 200
        assert "/after-upgrade" in origin.paths()
    finally:
        os.kill(new, signal.SIGTERM)
        wait_for(
            lambda: (
                not psutil.pid_exists(new) or psutil.Process(new).status() == psutil.STATUS_ZOMBIE
            ),
            timeout=30,
        )


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_check_loads_the_app_as_server_user(tmp_path: Path) -> None:
    """``check`` imports the app as the workers would, after switching to ``server.user``:
    the built-in load balancer loads; an app in a folder that user cannot read does not, and
    the reason says as whom."""
    _ids("nobody", "nogroup")
    app_dir = tmp_path / "private"
    app_dir.mkdir(mode=0o700)
    (app_dir / "privateapp.py").write_text(
        "from shared import ProxyHttp\n"
        "class App(ProxyHttp):\n"
        "    def upstream_peer(self, session, ctx):\n"
        "        return None\n"
    )
    for app, code, says in (
        (None, 0, "ok"),
        ("privateapp:App", 1, "(as nobody:nogroup, server.user)"),
    ):
        config = config_for({"o": ["127.0.0.1:9"]}, server={"user": "nobody"})
        if app:
            config["app"] = app
        path = app_dir / "tenaya.yaml"
        path.write_text(yaml.safe_dump(config))
        out = subprocess.run(
            [sys.executable, "-m", "master", "check", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == code, out.stderr
        assert says in out.stdout + out.stderr


def test_check_refuses_an_unknown_user(tmp_path: Path) -> None:
    """``check`` and ``start`` refuse a ``server.user`` or ``server.group`` that does not
    exist, naming the file, the key and the reason."""
    path = tmp_path / "tenaya.yaml"
    path.write_text(
        yaml.safe_dump(
            config_for(
                {"o": ["127.0.0.1:9"]},
                server={"user": "no-such-user-tenaya", "group": "no-such-group-tenaya"},
            )
        )
    )
    for command in ("check", "start"):
        out = subprocess.run(
            [sys.executable, "-m", "master", command, "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 1
        assert f"{path}: server.user: no such user 'no-such-user-tenaya'" in out.stderr
        assert f"{path}: server.group: no such group 'no-such-group-tenaya'" in out.stderr
