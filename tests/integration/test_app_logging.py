"""An app's own loggers write to the error log as Tenaya's do: same file, same level (``logging
.level``), same format, with ``[req ID]`` on the lines written during a request's phases (the
client's ``X-Request-Id``, else a generated id), for sync and async phases alike; each line
once; still after a reopen (SIGUSR1). An app's exception is logged with the request's path as
text."""

from __future__ import annotations

import re
import signal
import threading
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.client import get
from tests.support.config import config_for, origin_app
from tests.support.master import Master
from tests.support.resources import free_port
from tests.support.waits import wait_for

if TYPE_CHECKING:
    from tests.conftest import Fleet

#: The head of an error log line: time, worker slot and pid, level.
HEAD = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[worker (\d+) (\d+)\] "
#: A request id Tenaya generates.
GENERATED = r"[0-9a-f]{12}-[0-9a-f]{6}"

MYGW = (
    origin_app("""
    def request_filter(self, session, ctx):
        log.info("tenant=%s", session.req_header.get("X-Tenant") or "-")
        if session.req_header.path == "/boom":
            raise ValueError("boom")
        return False

    def response_filter(self, session, upstream_response, ctx):
        log.warning("answered %d", upstream_response.status)
""")
    + """
import logging

log = logging.getLogger("mygw")
logging.getLogger("mygw.boot").info("loaded")
"""
)

ASYNC_MYGW = (
    origin_app("""
    async def request_filter(self, session, ctx):
        tenant = session.req_header.get("X-Tenant")
        log.info("tenant=%s before", tenant)
        await asyncio.sleep(0.2)
        log.info("tenant=%s after", tenant)
        return False
""")
    + """
import asyncio
import logging

log = logging.getLogger("mygw")
"""
)


def start(fleet: Fleet, source: str) -> Master:
    origin = fleet.origin("app")
    config = config_for(app="mygw:App", app_options={"origin": origin.address})
    return fleet.master(config, files={"mygw.py": source})


def lines(master: Master, pattern: str) -> list[re.Match[str]]:
    """The error log's lines that match ``pattern`` whole."""
    return [
        m for line in master.read_error_log().splitlines() if (m := re.fullmatch(pattern, line))
    ]


def worker_pids(master: Master) -> set[int]:
    return {p.pid for p in master.workers()}


def test_app_lines_have_the_format_and_the_request_id(fleet: Fleet) -> None:
    """Info in request_filter, warning in response_filter: each once, with the time, the
    worker's slot and pid, and ``[req abc123]`` from the request's X-Request-Id."""
    master = start(fleet, MYGW)
    resp = get(master.port, "/", [("X-Request-Id", "abc123"), ("X-Tenant", "acme")])
    assert resp.status == 200
    info = HEAD + r"INFO \[req abc123\] tenant=acme"
    warning = HEAD + r"WARNING \[req abc123\] answered 200"
    wait_for(lambda: lines(master, warning), what="the app's warning line")
    (i,) = lines(master, info)
    (w,) = lines(master, warning)
    assert int(i.group(2)) in worker_pids(master)
    assert (i.group(1), i.group(2)) == (w.group(1), w.group(2))
    log = master.read_error_log()
    assert log.count("tenant=acme") == 1
    assert log.count("answered 200") == 1


def test_lines_outside_a_request_have_no_request_id(fleet: Fleet) -> None:
    """What the app logs while it loads (once per worker) has the format, without ``[req``."""
    master = start(fleet, MYGW)
    found = wait_for(
        lambda: (
            len(lines(master, HEAD + "INFO loaded")) == master.workers_count
            and lines(master, HEAD + "INFO loaded")
        ),
        what="a loaded line per worker",
    )
    assert {int(m.group(2)) for m in found} == worker_pids(master)
    assert master.read_error_log().count("loaded") == master.workers_count


def test_a_request_without_an_id_gets_a_generated_one(fleet: Fleet) -> None:
    """No X-Request-Id, or one that is not sane: a generated id, different per request, the
    same on the request's lines."""
    master = start(fleet, MYGW)
    get(master.port, "/", [("X-Tenant", "t1")])
    get(master.port, "/", [("X-Tenant", "t2"), ("X-Request-Id", "x" * 201)])
    get(master.port, "/", [("X-Tenant", "t3"), ("X-Request-Id", "has space")])
    ids = []
    for tenant in ("t1", "t2", "t3"):
        (m,) = wait_for(
            partial(lines, master, HEAD + rf"INFO \[req ({GENERATED})\] tenant={tenant}"),
            what=f"the line of {tenant}",
        )
        ids.append(m.group(3))
    assert len(set(ids)) == 3
    warnings = [
        m.group(3)
        for m in lines(
            master,
            HEAD + rf"WARNING \[req ({GENERATED})\] "
            r"answered 200",
        )
    ]
    assert sorted(warnings) == sorted(ids)


def test_the_level_applies_to_app_loggers(fleet: Fleet) -> None:
    """``logging.level: warning``: the app's info line is dropped, its warning is written."""
    # The master's "serving on" line is info too: wait on a port of our own instead.
    origin = fleet.origin("app")
    port = free_port()
    config = config_for(
        app="mygw:App",
        app_options={"origin": origin.address},
        listeners=[{"address": f"127.0.0.1:{port}"}],
        logging={"level": "warning"},
    )
    master = fleet.master(config, files={"mygw.py": MYGW}, start=False)
    master.spawn()

    def answered() -> bool:
        try:
            return get(port, "/", [("X-Request-Id", "lvl-1"), ("X-Tenant", "acme")]).status == 200
        except OSError:
            return False

    wait_for(answered, timeout=30, what="the master to answer")
    wait_for(
        lambda: lines(master, HEAD + r"WARNING \[req lvl-1\] answered 200"),
        what="the app's warning line",
    )
    log = master.read_error_log()
    assert "tenant=acme" not in log
    assert "loaded" not in log


def test_app_error_shows_the_path_as_text(fleet: Fleet) -> None:
    """An exception in request_filter: a 500, and ``app error on GET /boom`` (no bytes repr)
    with the request's id, then the traceback."""
    master = start(fleet, MYGW)
    assert get(master.port, "/boom", [("X-Request-Id", "boom-1")]).status == 500
    wait_for(
        lambda: lines(master, HEAD + r"ERROR \[req boom-1\] app error on GET /boom"),
        what="the app error line",
    )
    log = master.read_error_log()
    assert "b'/boom'" not in log
    assert "ValueError: boom" in log


def test_async_phases_keep_each_requests_id(fleet: Fleet) -> None:
    """Two requests at once in an async phase that waits between two lines: after the wait,
    each line still carries its own request's id."""
    origin = fleet.origin("app")
    config = config_for(
        app="mygw:App", app_options={"origin": origin.address}, server={"workers": 1}
    )
    master = fleet.master(config, files={"mygw.py": ASYNC_MYGW})
    statuses: list[int] = []

    def request(n: int) -> None:
        statuses.append(
            get(master.port, "/", [("X-Request-Id", f"id-{n}"), ("X-Tenant", f"t{n}")]).status
        )

    threads = [threading.Thread(target=request, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 4
    found = wait_for(
        lambda: (
            len(
                m := lines(
                    master,
                    HEAD + r"INFO \[req ([^\]]+)\] "
                    r"tenant=(\S+) (before|after)",
                )
            )
            == 8
            and m
        ),
        what="eight lines",
    )
    assert {(m.group(3), m.group(4)) for m in found} == {(f"id-{n}", f"t{n}") for n in range(4)}
    # The requests overlapped: some request began before another's after line.
    order = [m.group(5) for m in found]
    assert order.index("after") > 1


def test_reopen_keeps_app_lines_in_the_log(fleet: Fleet) -> None:
    """After the error log is renamed and SIGUSR1 sent, the app's lines go to a new file at the
    path, still formatted."""
    master = start(fleet, MYGW)
    assert get(master.port, "/", [("X-Tenant", "before")]).status == 200
    wait_for(lambda: "tenant=before" in master.read_error_log(), what="the first line")
    rotated = Path(f"{master.error_log}.1")
    master.error_log.rename(rotated)
    master.signal(signal.SIGUSR1)

    def after_reopen() -> bool:
        get(master.port, "/", [("X-Tenant", "after"), ("X-Request-Id", "rot-1")])
        return bool(lines(master, HEAD + r"INFO \[req rot-1\] tenant=after"))

    wait_for(after_reopen, what="an app line in the reopened log")
    assert "tenant=before" in rotated.read_text()
    assert "tenant=before" not in master.read_error_log()
