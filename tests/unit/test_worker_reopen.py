"""worker.process: reopening the log files (logrotate), from the master's descriptors or by
path; a file that cannot be opened leaves the old one in use, never a closed descriptor."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import ipc
from worker.accesslog import AccessLog
from worker.process import Worker


class Rotated:
    """A worker's two log files, as a worker has them open, and the same paths after a move."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "logs"
        self.dir.mkdir()
        self.access = self.dir / "access.log"
        self.error = self.dir / "error.log"
        self.worker = Worker.__new__(Worker)
        self.worker.access_log = AccessLog(str(self.access))
        self.handler = logging.FileHandler(self.error)
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.worker.log = logging.getLogger(f"test-reopen-{id(self)}")
        self.worker.log.handlers[:] = [self.handler]
        self.worker.log.propagate = False

    def rotate(self) -> None:
        self.access.rename(self.dir / "access.log.1")
        self.error.rename(self.dir / "error.log.1")

    def write_both(self, text: str) -> None:
        os.write(
            self.worker.access_log.fileno() if self.worker.access_log else 2, f"{text}\n".encode()
        )
        self.worker.log.error("%s", text)
        self.handler.flush()

    def close(self) -> None:
        if self.worker.access_log is not None:
            self.worker.access_log.close()
        self.handler.close()


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[Rotated]:
    r = Rotated(tmp_path)
    yield r
    r.close()


def _opened(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def test_reopen_by_path_after_a_move(logs: Rotated) -> None:
    logs.write_both("before")
    logs.rotate()
    logs.worker.reopen_logs()
    logs.write_both("after")
    assert logs.access.read_text() == "after\n" and logs.error.read_text() == "after\n"
    assert (logs.dir / "access.log.1").read_text() == "before\n"


def test_reopen_uses_the_descriptors_the_master_sent(logs: Rotated, tmp_path: Path) -> None:
    """The files the master opened are used, even where the worker could not open them: the
    descriptors are for other files than the paths say here, to tell them apart."""
    logs.rotate()
    elsewhere_access, elsewhere_error = tmp_path / "a.new", tmp_path / "e.new"
    fds = (_opened(elsewhere_access), _opened(elsewhere_error))
    logs.worker.reopen_logs(ipc.ReopenLogs(paths=[str(logs.access), str(logs.error)], fds=fds))
    logs.write_both("from the master's files")
    assert (
        elsewhere_access.read_text() == elsewhere_error.read_text() == ("from the master's files\n")
    )
    assert not logs.access.exists() and not logs.error.exists()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed once used


def test_a_file_that_cannot_be_opened_leaves_the_old_one(logs: Rotated) -> None:
    logs.write_both("before")
    logs.rotate()
    os.rename(logs.dir, logs.dir.with_name("moved"))
    logs.worker.reopen_logs()
    logs.write_both("after")
    moved = logs.dir.with_name("moved")
    assert (moved / "access.log.1").read_text() == "before\nafter\n"
    error_log = (moved / "error.log.1").read_text()
    assert error_log.startswith("before\ncannot reopen ")
    assert error_log.endswith("still writing to the file it was\nafter\n")


def test_descriptors_for_other_files_are_closed(logs: Rotated, tmp_path: Path) -> None:
    fd = _opened(tmp_path / "unrelated.log")
    logs.worker.reopen_logs(ipc.ReopenLogs(paths=[str(tmp_path / "unrelated.log")], fds=(fd,)))
    with pytest.raises(OSError):
        os.fstat(fd)
