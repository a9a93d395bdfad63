"""The real master as a subprocess: ``python -m master start`` with a config written to a
temporary folder and its logs in files there; its port is found by polling the error log for the
``serving on`` line. Workers are told apart from other processes by their title."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import yaml

#: Longest wait for a master to log that it serves.
MASTER_START_SECONDS = 30.0
#: Longest wait for a master to exit after SIGTERM before it is killed.
MASTER_STOP_SECONDS = 20.0

#: The master's ``serving on`` line: one ``http://`` or ``https://`` (TLS) address per listener.
_SERVING = re.compile(
    r"serving on (https?://127\.0\.0\.1:\d+(?:, https?://127\.0\.0\.1:\d+)*)"
    r" with (\d+) workers \(pid (\d+)\)"
)
_SERVING_ADDRESS = re.compile(r"(https?)://127\.0\.0\.1:(\d+)")


def is_worker(proc: psutil.Process) -> bool:
    """True for a worker process (by its title, or its command line before the title)."""
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False
    return cmd.startswith("tenaya worker") or " -m worker " in f"{cmd} "


class Master:
    """``python -m master start`` in a subprocess, with its files in ``workdir``.

    ``files`` are written beside the config (app modules). ``error_log`` and ``access_log``
    are set to files in ``workdir`` unless the config names them. The master runs in ``cwd``
    (default: ``workdir``).
    """

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        files: dict[str, str] | None = None,
        args: Iterable[str] = (),
        cwd: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.cwd = cwd or workdir
        workdir.mkdir(parents=True, exist_ok=True)
        logging_cfg = dict(config.get("logging") or {})
        logging_cfg.setdefault("error_log", str(workdir / "error.log"))
        logging_cfg.setdefault("access_log", str(workdir / "access.log"))
        self.config = {**config, "logging": logging_cfg}
        self.config_path = workdir / "tenaya.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        for name, text in (files or {}).items():
            (workdir / name).write_text(text)
        self.args = list(args)
        self.error_log = (
            Path(logging_cfg["error_log"])
            if logging_cfg["error_log"] not in ("stderr", "stdout")
            else workdir / "master.stderr"
        )
        self.access_log = Path(logging_cfg["access_log"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        #: (scheme, port) of each listener, in the config's order; ``port`` is the first's.
        self.listeners: list[tuple[str, int]] = []
        self.workers_count = 0
        self._known_children: set[int] = set()

    # -- start and stop ------------------------------------------------------------------

    def spawn(self) -> subprocess.Popen[bytes]:
        """Starts the master process (without waiting for it to serve)."""
        out = open(self.workdir / "master.stdout", "wb")  # noqa: SIM115 - closed below
        err = open(self.workdir / "master.stderr", "wb")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "master", "start", "-c", str(self.config_path), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            out.close()
            err.close()
        return self.proc

    def start(self, timeout: float = MASTER_START_SECONDS) -> Master:
        """Starts the master and waits for its ``serving on`` line."""
        proc = self.spawn()
        deadline = time.monotonic() + timeout
        while True:
            m = _SERVING.search(self.read_error_log())
            if m:
                found = _SERVING_ADDRESS.findall(m.group(1))
                self.listeners = [(scheme, int(port)) for scheme, port in found]
                self.port = self.listeners[0][1]
                self.workers_count = int(m.group(2))
                assert int(m.group(3)) == proc.pid
                return self
            if proc.poll() is not None:
                raise AssertionError(
                    f"master exited with {proc.returncode} before serving:\n{self.logs()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"master not serving after {timeout:g}s:\n{self.logs()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = MASTER_STOP_SECONDS) -> int | None:
        """SIGTERM, then wait; SIGKILL (the master and its workers) as a last resort.
        Returns the master's exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self._remember_children()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the master and every worker it was seen with."""
        if self.proc is None:
            return
        self._remember_children()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self._known_children:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                if is_worker(p) or "master.demo" in " ".join(p.cmdline()):
                    p.kill()

    def _remember_children(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in psutil.Process(self.pid).children():
                self._known_children.add(c.pid)

    # -- looking at it ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = self.listeners[0][0] if self.listeners else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def workers(self) -> list[psutil.Process]:
        """The live worker processes, children of the master."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        self._known_children.update(c.pid for c in children)
        return [c for c in children if is_worker(c) and c.status() != psutil.STATUS_ZOMBIE]

    def read_error_log(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def read_access_log(self) -> str:
        try:
            return self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self) -> str:
        parts = []
        for name in ("error.log", "master.stderr", "master.stdout"):
            p = self.workdir / name
            if p.exists() and (p != self.error_log or name == "error.log"):
                parts.append(f"--- {name} ---\n{p.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)
