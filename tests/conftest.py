"""Fixtures of the integration tests: origins, masters and nginx that are stopped at the end.

``fleet`` lives for one test; ``module_fleet`` for one test module, to share a master between
tests that do not disturb each other. When a test fails, the logs of every master still known
are attached to its report.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.master import Master
from tests.support.nginx import Nginx
from tests.support.origin import Origin

_LIVE_MASTERS: list[Master] = []


class Fleet:
    """Starts origins, masters and nginx in ``workdir`` and stops them all in :meth:`close`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._origins: list[Origin] = []
        self._masters: list[Master] = []
        self._nginx: list[Nginx] = []
        self._count = 0

    def _dir(self, kind: str) -> Path:
        self._count += 1
        d = self.workdir / f"{kind}{self._count}"
        d.mkdir(parents=True)
        return d

    def origin(self, name: str = "origin", **options: Any) -> Origin:
        """A started :class:`Origin`."""
        o = Origin(name=name, **options).start()
        self._origins.append(o)
        return o

    def master(
        self,
        config: dict[str, Any],
        files: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        start: bool = True,
    ) -> Master:
        """A :class:`Master` for ``config``; started and serving unless ``start`` is False."""
        m = Master(self._dir("master"), config, files, args)
        self._masters.append(m)
        _LIVE_MASTERS.append(m)
        if start:
            m.start()
        return m

    def nginx(self) -> Nginx:
        """A started :class:`Nginx` origin."""
        n = Nginx(self._dir("nginx"))
        self._nginx.append(n)
        return n.start()

    def close(self) -> None:
        for m in self._masters:
            m.stop()
            with contextlib.suppress(ValueError):
                _LIVE_MASTERS.remove(m)
        for n in self._nginx:
            n.stop()
        for o in self._origins:
            o.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture(scope="module")
def refusing_address() -> Iterator[str]:
    """A loopback port bound but not listening: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def module_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        yield f
    finally:
        f.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration carries the ``integration`` marker."""
    for item in items:
        if "integration" in Path(str(item.path)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.failed and _LIVE_MASTERS:
        for i, m in enumerate(_LIVE_MASTERS):
            report.sections.append((f"tenaya master {i} logs", m.logs()))
