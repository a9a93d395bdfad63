"""Binary upgrade (SIGUSR2): a new master from the code on disk takes over the listeners.

The old master starts ``python -m master`` with the same arguments and one end of a socketpair
named in ``TENAYA_UPGRADE_FD``, and sends every listening socket over it (SCM_RIGHTS, keyed by
configured address). The new master binds only addresses it was not given, starts its workers,
writes the pid file and answers ``UpgradeReady``; then the old master drains. Once its workers
are gone it sends the pool broker's idle upstream connections over the same channel and exits.
If the new master exits or stays silent, the old one keeps serving and keeps the pid file.

:class:`Upgrade` holds the arbiter and does both sides: as the old master it starts the new
one, waits for its answer (:class:`NewMaster`) and hands it the pool at exit; as the new master
it receives the listeners, reports ready and takes the old master's idle connections.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import selectors
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from master.lifecycle import State
from master.listeners import Listener, ListenError
from shared import ipc
from shared.ipc import MAX_FDS_PER_MESSAGE, Channel, ChannelClosed
from shared.paths import child_env, python_command

if TYPE_CHECKING:
    from master.broker import Broker
    from master.demo_process import DemoOrigins
    from master.lifecycle import Lifecycle
    from master.selector import Selector
    from shared.config import Config

log = logging.getLogger("tenaya")

#: Longest wait for a new master (binary upgrade) to report ready.
UPGRADE_TIMEOUT_SECONDS = 60.0
#: Longest wait for the old master's listeners, in a new master.
HANDOVER_TIMEOUT_SECONDS = 10.0


class StartError(Exception):
    """The master could not start serving (the reason is the message)."""


@dataclass
class NewMaster:
    """A new master started by SIGUSR2, until it reports ready."""

    #: The new master's process.
    popen: subprocess.Popen[bytes]
    #: The upgrade channel: listeners go out, ``UpgradeReady`` comes back.
    channel: Channel
    #: When the upgrade fails if the new master has not reported ready (monotonic clock).
    deadline: float


class Supervisor(Protocol):
    """What the upgrade uses of the arbiter (:class:`~master.arbiter.Arbiter`, which builds
    it with itself): a Protocol, so that this module need not import the arbiter that imports
    it."""

    config: Config
    argv: list[str]
    num_workers: int
    listeners: list[Listener]
    lifecycle: Lifecycle
    sel: Selector
    broker: Broker | None
    demo: DemoOrigins | None
    handed_demo: tuple[int, list[str]]
    handed_turns: dict[str, int]

    def balance_turns(self) -> dict[str, int]: ...

    def take_donations(self, msg: ipc.Donate) -> None: ...
    def let_go_of_demo(self, stop: bool) -> None: ...
    def stop(self, graceful: bool) -> None: ...
    def kill(self, pid: int, sig: int) -> None: ...
    def write_pid_file(self) -> None: ...


class Upgrade:
    """The arbiter's side of an upgrade, as the old master and as the new one."""

    def __init__(self, arbiter: Supervisor) -> None:
        self.arbiter = arbiter
        #: A new master being started, until it reports ready.
        self.new_master: NewMaster | None = None
        #: After an upgrade: the new master, to which the broker's connections go at exit.
        self.successor: Channel | None = None

    @property
    def in_progress(self) -> bool:
        """True from :meth:`begin` until the new master reports ready or the upgrade fails."""
        return self.new_master is not None

    # -- as the new master ---------------------------------------------------------------

    def receive_listeners(self, channel: Channel) -> list[Listener]:
        """Takes the listening sockets handed over by the old master, by address, and binds
        the configured addresses it did not send; remembers the demo origins it names (the
        arbiter's ``handed_demo``). Raises :class:`StartError` when the old master sends
        nothing in time, and ``ListenError`` when an address cannot be bound."""
        arbiter = self.arbiter
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
            for lc in arbiter.config.listeners:
                got = by_address.pop(lc.address, None)
                listener = Listener.adopt(lc, got) if got else Listener(lc)
                listeners.append(listener)
                listener.ensure_slots(arbiter.num_workers)
        except ListenError:
            for listener in listeners:
                listener.close()
            raise
        finally:
            # Addresses no longer configured: the old master keeps serving them until it goes.
            for unused in by_address.values():
                for fd in unused:
                    os.close(fd)
        arbiter.handed_demo = (handover.demo_pid, list(handover.demo_origins))
        arbiter.handed_turns = dict(handover.balance_turns)
        log.info(
            "took over %d listening sockets from the old master",
            sum(len(lst.sockets) for lst in listeners),
        )
        return listeners

    def report_ready(self, channel: Channel) -> None:
        """Once serving: tells the old master on ``channel`` (``UpgradeReady``, saying whether
        the demo origins were adopted), then watches the channel for the idle upstream
        connections it sends once its workers are gone. Logs a warning when it is gone."""
        arbiter = self.arbiter
        try:
            adopted = arbiter.demo is not None and arbiter.demo.popen is None
            channel.send(ipc.UpgradeReady(pid=os.getpid(), demo_adopted=adopted))
            channel.flush()
            arbiter.sel.register(channel.sock, functools.partial(self._on_predecessor, channel))
        except (ChannelClosed, OSError):
            log.warning("the old master is gone")
            channel.close()

    def _on_predecessor(self, channel: Channel, key: selectors.SelectorKey, mask: int) -> None:
        """The old master's channel is readable: idle connections (``Donate``), or its end."""
        try:
            messages = channel.read()
        except (ChannelClosed, OSError):
            self.arbiter.sel.unregister(channel.sock)
            channel.close()
            return
        for msg in messages:
            if isinstance(msg, ipc.Donate):
                self.arbiter.take_donations(msg)
                log.info("took %d idle upstream connections from the old master", len(msg.fds))
            else:
                for fd in msg.fds:
                    os.close(fd)

    # -- as the old master ---------------------------------------------------------------

    def begin(self) -> None:
        """Starts a new master from the code on disk and hands it the listening sockets; the
        lifecycle moves to ``UPGRADING``. Logs and returns, still serving, when the new master
        cannot be started or given the sockets."""
        arbiter = self.arbiter
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent.set_inheritable(False)
        env = child_env()
        env[ipc.UPGRADE_FD_ENV] = str(child.fileno())
        try:
            popen = subprocess.Popen(
                python_command("master", *arbiter.argv),
                pass_fds=[child.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except OSError as e:
            log.error("upgrade failed: cannot start a new master: %s", e)
            parent.close()
            return
        finally:
            child.close()
        channel = Channel(parent)
        fds = tuple(s.fileno() for lst in arbiter.listeners for s in lst.sockets)
        try:
            demo = arbiter.demo
            channel.send(
                ipc.Handover(
                    addresses=[lst.config.address for lst in arbiter.listeners],
                    counts=[len(lst.sockets) for lst in arbiter.listeners],
                    demo_pid=demo.pid if demo is not None else 0,
                    demo_origins=demo.addresses if demo is not None else [],
                    balance_turns=arbiter.balance_turns(),
                    fds=fds,
                )
            )
        except (ChannelClosed, OSError) as e:
            log.error("upgrade failed: cannot hand over the listeners: %s", e)
            channel.close()
            popen.kill()
            return
        new = NewMaster(popen, channel, time.monotonic() + UPGRADE_TIMEOUT_SECONDS)
        self.new_master = new
        arbiter.sel.register(channel.sock, functools.partial(self._on_new_master, new))
        arbiter.lifecycle.to(State.UPGRADING)
        log.info("upgrade: started a new master (pid %d)", popen.pid)

    def _on_new_master(self, new: NewMaster, key: selectors.SelectorKey, mask: int) -> None:
        """The upgrade channel is readable: on ``UpgradeReady`` this master lets the new one
        have the demo origins (when it adopted them) and stops gracefully."""
        try:
            messages = new.channel.read()
        except (ChannelClosed, OSError):
            self.fail("the new master closed the upgrade channel")
            return
        arbiter = self.arbiter
        for msg in messages:
            if isinstance(msg, ipc.UpgradeReady):
                log.info("upgrade: the new master (pid %d) serves; draining", msg.pid)
                if msg.demo_adopted:
                    # The new master keeps the demo origins running: they are its now.
                    arbiter.let_go_of_demo(stop=False)
                arbiter.sel.unregister(new.channel.sock)
                self.successor = new.channel
                self.new_master = None
                arbiter.stop(graceful=True)
                return

    def check_deadline(self, now: float) -> None:
        """Fails the upgrade when the new master has not reported ready by its deadline."""
        new = self.new_master
        if new is not None and now > new.deadline:
            self.fail("the new master did not report ready in time")

    def reaped(self, pid: int, code: int) -> bool:
        """Called for each child the arbiter reaps: True when ``pid`` was the new master (the
        upgrade has then failed)."""
        new = self.new_master
        if new is None or pid != new.popen.pid:
            return False
        new.popen.returncode = code
        self.fail(f"the new master exited with {code}")
        return True

    def fail(self, reason: str) -> None:
        """Gives up the upgrade under way (if any): kills the new master, goes back to
        ``SERVING`` and writes this master's pid file again."""
        new = self.new_master
        if new is None:
            return
        self.new_master = None
        arbiter = self.arbiter
        log.error("upgrade failed, still serving: %s", reason)
        arbiter.sel.unregister(new.channel.sock)
        new.channel.close()
        if new.popen.returncode is None:
            arbiter.kill(new.popen.pid, signal.SIGKILL)
        if arbiter.lifecycle.state is State.UPGRADING:
            arbiter.lifecycle.to(State.SERVING)
        arbiter.write_pid_file()

    def hand_pool_to_successor(self) -> None:
        """At exit, after an upgrade: the broker's idle connections go to the new master.
        Does nothing when there was no upgrade."""
        channel, self.successor = self.successor, None
        if channel is None:
            return
        broker = self.arbiter.broker
        conns = broker.take_all() if broker is not None else []
        try:
            channel.sock.setblocking(True)
            channel.sock.settimeout(5.0)
            for i in range(0, len(conns), MAX_FDS_PER_MESSAGE):
                batch = conns[i : i + MAX_FDS_PER_MESSAGE]
                channel.send(
                    ipc.Donate(
                        keys=[k for k, _ in batch], fds=tuple(sock.fileno() for _, sock in batch)
                    )
                )
            channel.flush()
            if conns:
                log.info("handed %d idle upstream connections to the new master", len(conns))
        except (ChannelClosed, OSError) as e:
            log.warning("could not hand the idle connections over: %s", e)
        finally:
            for _, sock in conns:
                sock.close()
            channel.close()
