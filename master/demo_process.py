"""The demo origins' process (``python -m master.demo``), as the master sees it.

The master that starts with the embedded default config starts the demo origins itself. A
binary upgrade hands them over instead of restarting them: the old master names the process in
its ``Handover``, the new master adopts it (through a pidfd, so that a signal can never reach
another process that got the same pid) and says so in ``UpgradeReady``, and the old master then
leaves it running when it exits. The origins' sockets are never closed, so no request to them
fails across any number of upgrades; the last master stops them.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess

from shared.paths import child_env, python_command

log = logging.getLogger("tenaya")

#: How long the demo origins get to exit after SIGTERM before SIGKILL.
STOP_SECONDS = 5.0


class DemoStartError(Exception):
    """The demo origins could not start (the reason is the message)."""


class DemoOrigins:
    """The process serving the demo origins on ``addresses``: this master's child (``popen``)
    or adopted from the master before it (``pidfd``)."""

    def __init__(
        self,
        addresses: list[str],
        pid: int,
        popen: subprocess.Popen[bytes] | None = None,
        pidfd: int = -1,
    ) -> None:
        self.addresses = list(addresses)
        self.pid = pid
        self.popen = popen
        #: For an adopted process: its pidfd, readable once it has exited.
        self.pidfd = pidfd

    @classmethod
    def start(cls, addresses: list[str]) -> DemoOrigins:
        """Starts the demo origins and waits until they listen. Raises
        :class:`DemoStartError`."""
        popen = subprocess.Popen(
            python_command("master.demo", *addresses),
            env=child_env(),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert popen.stdout is not None
        line = popen.stdout.readline()
        popen.stdout.close()
        if line.strip() != b"ready":
            popen.wait()
            raise DemoStartError("demo origins could not start (see above)")
        log.info("demo origins on %s", ", ".join(addresses))
        return cls(addresses, popen.pid, popen=popen)

    @classmethod
    def adopt(cls, pid: int, addresses: list[str]) -> DemoOrigins | None:
        """The demo origins the old master handed over, or None when that process is gone."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        log.info(
            "kept the demo origins on %s (pid %d) from the old master", ", ".join(addresses), pid
        )
        return cls(addresses, pid, pidfd=pidfd)

    def release(self) -> None:
        """Lets go of the process without stopping it (it exited, or the new master has
        adopted it)."""
        self._close_pidfd()

    def stop(self) -> None:
        """SIGTERM; SIGKILL after :data:`STOP_SECONDS`. Waits for the exit."""
        if self.popen is not None:
            if self.popen.returncode is None:
                self.popen.terminate()
                try:
                    self.popen.wait(STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait()
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGTERM)
            if not select.select([self.pidfd], [], [], STOP_SECONDS)[0]:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            # Not this master's child: whoever adopted it when its first master exited reaps it.
            self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
