"""Request ids and the error log: ``Session.request_id`` (the client's sane ``X-Request-Id``, else
a generated one, made lazily), and ``worker.proxy.RequestLogFilter``, which tags a record with
the id of the request whose code runs, whether the engine steps that code by hand or runs it
in a Task, and tags nothing outside a request."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from shared.app import ProxyHttp
from shared.config import from_mapping
from shared.session import MAX_REQUEST_ID, Session
from worker.proxy import engine as proxy
from worker.proxy.engine import Engine, RequestLogFilter, current_session

GENERATED = re.compile(r"[0-9a-f]{12}-[0-9a-f]{6}")


class FakeConn:
    """The downstream connection a session arrived on: just its addresses."""

    client_addr = ("203.0.113.7", 51234)
    server_addr = ("127.0.0.1", 6188)


def session(*headers: tuple[bytes, bytes]) -> Session:
    s = Session(FakeConn())  # type: ignore[arg-type]
    s.method = b"GET"
    s.url = b"/"
    s.raw_headers = [(b"Host", b"example.com"), *headers]
    return s


# -- Session.request_id ------------------------------------------------------------------------


@pytest.mark.parametrize("name", [b"X-Request-Id", b"x-request-id", b"X-REQUEST-ID"])
def test_a_sane_client_id_is_used(name: bytes) -> None:
    assert session((name, b"abc123")).request_id == "abc123"


def test_the_first_client_id_counts() -> None:
    s = session((b"X-Request-Id", b"first"), (b"X-Request-Id", b"second"))
    assert s.request_id == "first"


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"has space",
        b"tab\there",
        b"new\nline",
        b"nul\x00",
        b"del\x7f",
        b"caf\xe9",
        b"x" * (MAX_REQUEST_ID + 1),
    ],
    ids=["empty", "space", "tab", "newline", "nul", "del", "latin1", "too-long"],
)
def test_an_insane_client_id_is_replaced(value: bytes) -> None:
    assert GENERATED.fullmatch(session((b"X-Request-Id", value)).request_id)


def test_the_longest_client_id_is_kept() -> None:
    value = "a" * MAX_REQUEST_ID
    assert session((b"X-Request-Id", value.encode())).request_id == value


def test_a_generated_id_is_made_once_and_unique() -> None:
    """Without the field: a per-process prefix and a counter, the same id on every read."""
    a, b = session(), session()
    first = a.request_id
    assert GENERATED.fullmatch(first)
    assert a.request_id == first
    assert b.request_id != first
    assert b.request_id.split("-")[0] == first.split("-")[0]


def test_a_generated_id_is_made_only_when_asked() -> None:
    """Sessions nothing asks about take no number: the next one asked gets the next."""
    before = int(session().request_id.split("-")[1], 16)
    for _ in range(5):
        session()
    assert int(session().request_id.split("-")[1], 16) == before + 1


def test_an_app_may_set_its_own_id() -> None:
    s = session((b"X-Request-Id", b"abc123"))
    s.request_id = "mine-7"
    assert s.request_id == "mine-7"


# -- the filter --------------------------------------------------------------------------------


class Capture(logging.Handler):
    """Keeps the formatted lines of the records it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(request_tag)s%(message)s"))
        self.addFilter(RequestLogFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, Capture]]:
    handler = Capture()
    logger = logging.getLogger("test_request_log")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


def test_no_tag_outside_a_request(log: tuple[logging.Logger, Capture]) -> None:
    logger, handler = log
    logger.info("idle")
    assert handler.lines == ["INFO idle"]
    assert current_session() is None


class App(ProxyHttp):
    """A sync app (the engine steps its requests by hand)."""


class AsyncApp(ProxyHttp):
    """An app with an async phase (the engine makes a Task per request)."""

    # May be async def (shared/app.py), which ProxyHttp's sync signature does not say.
    async def request_filter(self, session: Session, ctx: Any) -> bool:  # type: ignore[override]
        """Not called here; makes the app async."""
        return False


@pytest.mark.parametrize("app", [App(), AsyncApp()], ids=["stepped", "task"])
def test_interleaved_requests_each_log_their_own_id(
    app: ProxyHttp, log: tuple[logging.Logger, Capture]
) -> None:
    """Two requests whose code waits in the middle: each line, before and after the wait, carries
    the id of the request it was written for; between their steps nothing is current."""
    logger, handler = log
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        engine = Engine(app, from_mapping({"app": "x:App"}, "test"), None, logger)
        assert engine.any_async is isinstance(app, AsyncApp)
        gates = {"a": loop.create_future(), "b": loop.create_future()}

        async def code(name: str) -> None:
            logger.info("%s before", name)
            await gates[name]
            logger.warning("%s after", name)

        async def main() -> None:
            engine.drive(code("a"), session((b"X-Request-Id", b"req-a")))
            engine.drive(code("b"), session((b"X-Request-Id", b"req-b")))
            await asyncio.sleep(0)
            logger.info("between")
            gates["b"].set_result(None)
            await asyncio.sleep(0)
            gates["a"].set_result(None)
            for _ in range(3):
                await asyncio.sleep(0)

        loop.run_until_complete(main())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    assert handler.lines == [
        "INFO [req req-a] a before",
        "INFO [req req-b] b before",
        "INFO between",
        "WARNING [req req-b] b after",
        "WARNING [req req-a] a after",
    ]
    assert proxy._current is None


def test_another_thread_does_not_get_the_loop_threads_request(
    log: tuple[logging.Logger, Capture],
) -> None:
    """A line from another thread while a request's code runs on the loop's thread has no tag
    (unless that thread runs in a copy of the request's context)."""
    logger, handler = log
    s = session((b"X-Request-Id", b"on-loop"))
    proxy._current = s
    try:
        logger.info("loop thread")
        t = threading.Thread(target=logger.info, args=("other thread",))
        t.start()
        t.join()
    finally:
        proxy._current = None
    assert handler.lines == ["INFO [req on-loop] loop thread", "INFO other thread"]
