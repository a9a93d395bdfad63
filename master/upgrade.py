"""Binary upgrade (SIGUSR2): a new master from the code on disk takes over the listeners.

The old master starts ``python -m master`` with the same arguments and one end of a socketpair
named in ``TENAYA_UPGRADE_FD``, and sends every listening socket over it (SCM_RIGHTS, keyed by
configured address). The new master binds only addresses it was not given, starts its workers,
writes the pid file and answers ``UpgradeReady``; then the old master drains. Once its workers
are gone it sends the pool broker's idle upstream connections over the same channel and exits.
If the new master exits or stays silent, the old one keeps serving and keeps the pid file.
"""

from __future__ import annotations

import logging
import os
import select
import selectors
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from master.lifecycle import State
from master.listeners import Listener, ListenError
from shared import ipc
from shared.ipc import MAX_FDS_PER_MESSAGE, Channel, ChannelClosed
from shared.paths import child_env, python_command

log = logging.getLogger("tenaya")

#: Longest wait for a new master (binary upgrade) to report ready.
UPGRADE_TIMEOUT_SECONDS = 60.0
#: Longest wait for the old master's listeners, in a new master.
HANDOVER_TIMEOUT_SECONDS = 10.0


class StartError(Exception):
    """The master could not start serving (the reason is the message)."""


@dataclass
class Upgrade:
    """A new master started by SIGUSR2, until it reports ready."""

    popen: subprocess.Popen[bytes]
    channel: Channel
    deadline: float


class Predecessor:
    """The channel from the old master after an upgrade: its idle connections come here."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel


class UpgradeMixin:
    """The arbiter's side of an upgrade, as the old master and as the new one."""

    #: A new master being started, until it reports ready.
    upgrade: Upgrade | None
    #: After an upgrade: the new master, to which the broker's connections go at exit.
    successor: Channel | None

    def _receive_listeners(self: Any, channel: Channel) -> list[Listener]:
        """Takes the listening sockets handed over by the old master, by address."""
        deadline = time.monotonic() + HANDOVER_TIMEOUT_SECONDS
        handover: ipc.Handover | None = None
        while handover is None:
            if time.monotonic() > deadline:
                raise StartError("the old master did not hand over its listeners")
            select.select([channel], [], [], 0.5)
            for msg in channel.read():
                if isinstance(msg, ipc.Handover):
                    handover = msg
                else:
                    for fd in msg.fds:
                        os.close(fd)
        fds = list(handover.fds)
        by_address: dict[str, list[int]] = {}
        for address, count in zip(handover.addresses, handover.counts, strict=True):
            by_address[address], fds = fds[:count], fds[count:]
        listeners: list[Listener] = []
        try:
            for lc in self.config.listeners:
                got = by_address.pop(lc.address, None)
                listener = Listener.adopt(lc, got) if got else Listener(lc)
                listeners.append(listener)
                listener.ensure_slots(self.num_workers)
        except ListenError:
            for listener in listeners:
                listener.close()
            raise
        finally:
            # Addresses no longer configured: the old master keeps serving them until it goes.
            for unused in by_address.values():
                for fd in unused:
                    os.close(fd)
        self.handed_demo = (handover.demo_pid, list(handover.demo_origins))
        log.info("took over %d listening sockets from the old master",
                 sum(len(lst.sockets) for lst in listeners))
        return listeners

    def begin_upgrade(self: Any) -> None:
        """Starts a new master from the code on disk and hands it the listening sockets."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent.set_inheritable(False)
        env = child_env()
        env[ipc.UPGRADE_FD_ENV] = str(child.fileno())
        try:
            popen = subprocess.Popen(python_command("master", *self.argv),
                                     pass_fds=[child.fileno()], env=env,
                                     stdin=subprocess.DEVNULL)
        except OSError as e:
            log.error("upgrade failed: cannot start a new master: %s", e)
            parent.close()
            return
        finally:
            child.close()
        channel = Channel(parent)
        fds = tuple(s.fileno() for lst in self.listeners for s in lst.sockets)
        try:
            demo = self.demo
            channel.send(ipc.Handover(addresses=[lst.config.address for lst in self.listeners],
                                      counts=[len(lst.sockets) for lst in self.listeners],
                                      demo_pid=demo.pid if demo is not None else 0,
                                      demo_origins=demo.addresses if demo is not None else [],
                                      fds=fds))
        except (ChannelClosed, OSError) as e:
            log.error("upgrade failed: cannot hand over the listeners: %s", e)
            channel.close()
            popen.kill()
            return
        self.upgrade = Upgrade(popen, channel, time.monotonic() + UPGRADE_TIMEOUT_SECONDS)
        self.sel.register(channel.sock, selectors.EVENT_READ, self.upgrade)
        self.lifecycle.to(State.UPGRADING)
        log.info("upgrade: started a new master (pid %d)", popen.pid)

    def _on_upgrade_readable(self: Any, up: Upgrade) -> None:
        try:
            messages = up.channel.read()
        except (ChannelClosed, OSError):
            self._upgrade_failed("the new master closed the upgrade channel")
            return
        for msg in messages:
            if isinstance(msg, ipc.UpgradeReady):
                log.info("upgrade: the new master (pid %d) serves; draining", msg.pid)
                if msg.demo_adopted:
                    # The new master keeps the demo origins running: they are its now.
                    self._let_go_of_demo(stop=False)
                self._unregister(up.channel.sock)
                self.successor = up.channel
                self.upgrade = None
                self.stop(graceful=True)
                return

    def _upgrade_failed(self: Any, reason: str) -> None:
        up = self.upgrade
        if up is None:
            return
        self.upgrade = None
        log.error("upgrade failed, still serving: %s", reason)
        self._unregister(up.channel.sock)
        up.channel.close()
        if up.popen.returncode is None:
            self._kill(up.popen.pid, signal.SIGKILL)
        if self.lifecycle.state is State.UPGRADING:
            self.lifecycle.to(State.SERVING)
        self._write_pid_file()

    def _on_predecessor(self: Any, pred: Predecessor) -> None:
        try:
            messages = pred.channel.read()
        except (ChannelClosed, OSError):
            self._unregister(pred.channel.sock)
            pred.channel.close()
            return
        for msg in messages:
            if isinstance(msg, ipc.Donate):
                self._take_donations(msg)
                log.info("took %d idle upstream connections from the old master", len(msg.fds))
            else:
                for fd in msg.fds:
                    os.close(fd)

    def _hand_pool_to_successor(self: Any) -> None:
        """After an upgrade: the broker's idle connections go to the new master."""
        channel, self.successor = self.successor, None
        if channel is None:
            return
        conns = self.broker.take_all() if self.broker is not None else []
        try:
            channel.sock.setblocking(True)
            channel.sock.settimeout(5.0)
            for i in range(0, len(conns), MAX_FDS_PER_MESSAGE):
                batch = conns[i:i + MAX_FDS_PER_MESSAGE]
                channel.send(ipc.Donate(keys=[k for k, _ in batch],
                                        fds=tuple(sock.fileno() for _, sock in batch)))
            channel.flush()
            if conns:
                log.info("handed %d idle upstream connections to the new master", len(conns))
        except (ChannelClosed, OSError) as e:
            log.warning("could not hand the idle connections over: %s", e)
        finally:
            for _, sock in conns:
                sock.close()
            channel.close()

