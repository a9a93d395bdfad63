"""The arbiter: the master's supervision loop.

Signal handlers only queue the signal and wake the loop (a self-pipe); one loop then dispatches
``handle_<signal>`` by name, reads worker channels and control commands, reaps children, kills
workers that stopped heartbeating, and spawns workers up to the target count. The master never
blocks on a worker and never runs app code: workers are fresh ``python -m worker`` processes
(fork+exec) that inherit their listening sockets and a channel, and get their config in a
``Boot`` message.

Reload and upgrade never close a listening socket that may hold unaccepted connections: a new
generation of workers accepts on the same sockets before the old one stops accepting, and a new
master receives the sockets themselves (SCM_RIGHTS) before the old master drains.

The arbiter is put together from parts that each hold it, rather than from mixins: the
lifecycle's state table (:mod:`master.lifecycle`), the upgrade's two sides
(:class:`~master.upgrade.Upgrade`), the control socket and its commands
(:class:`~master.control.ControlServer`, :class:`~master.control.CommandHandlers`), the pool
broker. Each descriptor the loop watches is registered with the handler that reads it
(:class:`~master.selector.Selector`); the loop itself only dispatches.

Where a new part plugs in (the health prober to come, say): a helper process the master runs
beside its workers follows the demo origins (:mod:`master.demo_process`): started in
:meth:`Arbiter.start`, recognised by pid in :meth:`Arbiter.reap` (or, when adopted from the old
master in an upgrade, watched through a pidfd), named in the upgrade's ``Handover``, and stopped
in :meth:`Arbiter.shutdown`. What it reports comes in on a pipe or socket registered with
``self.sel.register(fd, handler)``, with no change to :meth:`Arbiter._tick`.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import setproctitle

from master.balance import BalanceTables
from master.broker import Broker
from master.control import CommandHandlers, ControlServer
from master.demo_process import DemoOrigins, DemoStartError
from master.lifecycle import Lifecycle, State
from master.listeners import Listener, ListenError, bind_all
from master.notify import report_start, sd_notify
from master.selector import Selector
from master.upgrade import StartError, Upgrade
from master.workers import WorkerProc
from shared import ipc, privileges
from shared.config import Config, ConfigError
from shared.ipc import Channel, ChannelClosed
from shared.paths import child_env, python_command
from shared.shm.pool_index import PoolIndex

log = logging.getLogger("tenaya")

#: Longest wait for a generation of workers to report ready.
BOOT_TIMEOUT_SECONDS = 60.0
#: A worker that dies younger than this counts as a boot failure and backs off.
MIN_HEALTHY_SECONDS = 1.0
BACKOFF_FIRST_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 10.0
#: After SIGABRT, a stuck worker gets this long before SIGKILL.
KILL_GRACE_SECONDS = 2.0
#: After the grace period of a stop, how long to wait for workers before SIGKILL.
STOP_MARGIN_SECONDS = 2.0

_SIGNALS: dict[int, str] = {
    signal.SIGTERM: "term",
    signal.SIGQUIT: "quit",
    signal.SIGINT: "int",
    signal.SIGHUP: "hup",
    signal.SIGUSR1: "usr1",
    signal.SIGUSR2: "usr2",
    signal.SIGTTIN: "ttin",
    signal.SIGTTOU: "ttou",
    signal.SIGCHLD: "chld",
}


@dataclass
class Generation:
    """A generation of workers being started by a reload (not yet serving alone)."""

    number: int
    config: Config
    listeners: list[Listener]
    count: int
    deadline: float
    #: Listeners bound for this generation alone, and sockets added to kept listeners:
    #: closed again if the reload fails.
    fresh: list[Listener] = field(default_factory=list)
    added: list[socket.socket] = field(default_factory=list)
    failure: str = ""


#: Counters a worker reports about its upstream connections.
POOL_COUNTERS = (
    "upstream_requests",
    "connections_created",
    "reused_local",
    "reused_shared",
    "donated",
)


class Arbiter:
    """Supervises the workers of one config."""

    def __init__(
        self,
        config: Config,
        reload_config: Callable[[], Config] | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self.config = config
        self.reload_config = reload_config
        self.argv = argv or ["start"]
        self.num_workers = config.worker_count()
        self.generation = 1
        self.listeners: list[Listener] = []
        self.retired: list[Listener] = []
        self.workers: dict[int, WorkerProc] = {}
        #: Every descriptor the loop watches, each with its handler.
        self.sel = Selector()
        self.sig_queue: list[int] = []
        self.lifecycle = Lifecycle()
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.backoff: dict[int, float] = {}
        self.next_spawn: dict[int, float] = {}
        self.pending: Generation | None = None
        #: Both sides of a binary upgrade (SIGUSR2).
        self.upgrade = Upgrade(self)
        #: Reloads and resizes (signal names) that came while booting or reloading, to run
        #: in order once serving.
        self.deferred: list[str] = []
        self.demo: DemoOrigins | None = None
        #: In a new master: the demo origins the old master hands over (pid, addresses).
        self.handed_demo: tuple[int, list[str]] = (0, [])
        #: In a new master: the old fleet's balancing turns, by upstream name.
        self.handed_turns: dict[str, int] = {}
        #: The balance tables, one per generation of workers (master/balance.py).
        self.balance = BalanceTables()
        self.control: ControlServer | None = None
        self.broker: Broker | None = None
        #: Counters of workers that have exited, so totals survive reloads.
        self.retired_counts: dict[str, int] = dict.fromkeys(POOL_COUNTERS, 0)
        self.started = time.time()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def stopping(self) -> bool:
        """True once a stop has begun (the lifecycle is ``STOPPING``)."""
        return self.lifecycle.state is State.STOPPING

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Binds (or, in an upgrade, receives) the listeners, starts the demo origins and the
        workers, then writes the pid file and opens the control socket.

        Raises :class:`StartError` when serving is impossible (a port in use, an app that
        cannot load).
        """
        setproctitle.setproctitle("tenaya master")
        self._warn_identity(self.config)
        upgrade_fd = os.environ.pop(ipc.UPGRADE_FD_ENV, None)
        parent: Channel | None = None
        if upgrade_fd is not None:
            parent = Channel(socket.socket(fileno=int(upgrade_fd)))
            self.listeners = self.upgrade.receive_listeners(parent)
        else:
            self.listeners = bind_all(self.config.listeners, self.num_workers)
        self._install_signals()
        self.sel.register(self._wake_r, self._on_wake)
        if self.config.pool.shared:
            self.broker = Broker(
                self.sel,
                PoolIndex.create(),
                self.config.pool.size_shared,
                self.config.pool.idle_timeout_seconds,
            )
        self.balance.create(self.generation, self.config, self.num_workers, self.handed_turns)
        if self.config.demo_origins:
            self._start_demo()
        for slot in range(self.num_workers):
            self.spawn(slot)
        deadline = time.monotonic() + BOOT_TIMEOUT_SECONDS
        while len(self.workers) < self.num_workers or not all(
            w.ready for w in self.workers.values()
        ):
            if time.monotonic() > deadline:
                raise StartError("workers did not report ready in time")
            self._tick(0.5)
            failed = [w for w in self.workers.values() if w.app_error]
            if failed or self.stopping:
                reason = failed[0].app_error if failed else "stopped during start"
                raise StartError(f"app failed to load: {reason}")
        self.lifecycle.to(State.SERVING)
        self.write_pid_file()
        if self.config.server.control_socket:
            self._open_control()
        if parent is not None:
            # The old master's idle upstream connections follow once its workers are gone.
            self.upgrade.report_ready(parent)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving")
        report_start(True)
        addresses = ", ".join(
            f"{'https' if lst.config.tls else 'http'}://{lst.bound_address}"
            for lst in self.listeners
        )
        log.info("serving on %s with %d workers (pid %d)", addresses, self.num_workers, os.getpid())
        self._run_deferred()

    def abandon_start(self) -> None:
        """After :meth:`start` raised: moves to ``STOPPING`` (unless a stop signal already
        did) and shuts down."""
        if self.lifecycle.can(State.STOPPING):
            self.lifecycle.to(State.STOPPING)
        self.shutdown()

    def _open_control(self) -> None:
        """Opens the control socket; logs and serves on without it when it cannot be made."""
        path = self.config.server.control_socket
        assert path
        try:
            self.control = ControlServer(path, CommandHandlers(self), self.sel)
        except OSError as e:
            log.error("cannot open the control socket %s: %s", path, e.strerror)

    def _on_wake(self, key: selectors.SelectorKey, mask: int) -> None:
        """The wake-up pipe (written by the signal wakeup fd): emptied; the queued signals
        are handled at the end of the tick."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    @staticmethod
    def _warn_identity(config: Config) -> None:
        """Says when ``server.user`` cannot be switched to (the master is not root)."""
        try:
            _, warning = privileges.for_workers(config.server.user, config.server.group)
        except LookupError as e:
            warning = f"server.user: {e}"
        if warning:
            log.warning("%s", warning)

    def _start_demo(self) -> None:
        """Adopts the demo origins an old master handed over when they serve the same
        addresses (an upgrade), else starts them."""
        pid, addresses = self.handed_demo
        if pid and addresses == self.config.demo_origins:
            self.demo = DemoOrigins.adopt(pid, addresses)
            if self.demo is not None:
                self.sel.register(self.demo.pidfd, self._on_demo_pidfd)
                return
        try:
            self.demo = DemoOrigins.start(self.config.demo_origins)
        except DemoStartError as e:
            raise StartError(str(e)) from None

    def _on_demo_pidfd(self, key: selectors.SelectorKey, mask: int) -> None:
        """The adopted demo origins' pidfd is readable: they have exited."""
        self._demo_exited(None)

    def _demo_exited(self, code: int | None) -> None:
        if self.demo is not None:
            self.let_go_of_demo(stop=False)
            if not self.stopping:
                log.error("demo origins exited%s", "" if code is None else f" ({code})")

    def let_go_of_demo(self, stop: bool) -> None:
        """Forgets the demo origins: stopped (``stop``), or left running (they exited, or a
        new master adopted them)."""
        demo, self.demo = self.demo, None
        if demo is None:
            return
        if demo.pidfd >= 0:
            self.sel.unregister(demo.pidfd)
        if stop:
            demo.stop()
        else:
            demo.release()

    def write_pid_file(self) -> None:
        """Writes this master's pid to ``server.pid_file`` (if set), replacing it atomically."""
        path = self.config.server.pid_file
        if path:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, path)

    def _remove_pid_file(self) -> None:
        path = self.config.server.pid_file
        if path:
            try:
                with open(path) as f:
                    mine = f.read().strip() == str(os.getpid())
                if mine:
                    os.unlink(path)
            except OSError:
                pass

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in _SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.sig_queue.append(signum)

    # -- workers -------------------------------------------------------------------------

    def spawn(self, slot: int, gen: Generation | None = None) -> None:
        """Starts a worker for ``slot`` (of the current generation, or of ``gen``)."""
        config = gen.config if gen else self.config
        listeners = gen.listeners if gen else self.listeners
        count = gen.count if gen else self.num_workers
        number = gen.number if gen else self.generation
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent.set_inheritable(False)
        pairs = [
            (sock.fileno(), index)
            for index, lst in enumerate(listeners)
            for sock in lst.sockets_for(slot, count)
        ]
        # The worker puts the app's directories on its path itself (shared/paths.py).
        cmd = python_command(
            "worker",
            "--channel-fd",
            str(child.fileno()),
            "--listen-fds",
            ",".join(f"{fd}@{index}" for fd, index in pairs),
        )
        env = child_env()
        index_fd = self.broker.index.fd if self.broker is not None and config.pool.shared else -1
        balance_fd = self.balance.fd(number)
        extra = [fd for fd in (index_fd, balance_fd) if fd >= 0]
        try:
            popen = subprocess.Popen(
                cmd,
                pass_fds=[child.fileno(), *(fd for fd, _ in pairs), *extra],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            child.close()
        now = time.monotonic()
        channel = Channel(parent)
        w = WorkerProc(popen.pid, slot, number, channel, popen, now, now)
        self.workers[w.pid] = w
        self.sel.register(channel.sock, partial(self._on_worker_readable, w))
        channel.send(
            ipc.Boot(
                slot=slot,
                generation=number,
                config=config.raw,
                source=config.source,
                pool_index_fd=index_fd,
                balance_fd=balance_fd,
            )
        )
        log.debug("spawned worker %d of generation %d (pid %d)", slot, number, w.pid)

    def _on_worker_readable(self, w: WorkerProc, key: selectors.SelectorKey, mask: int) -> None:
        """A worker's channel is readable: its messages, or its end (the worker is gone)."""
        try:
            for msg in w.channel.read():
                self._on_worker_message(w, msg)
        except (ChannelClosed, OSError):
            self._forget(w)

    def _on_worker_message(self, w: WorkerProc, msg: ipc.Message) -> None:
        w.last_seen = time.monotonic()
        if isinstance(msg, ipc.Ready):
            w.ready = True
            self.backoff.pop(w.slot, None)
        elif isinstance(msg, ipc.Heartbeat):
            w.requests = msg.requests
            w.connections = msg.connections
            w.active_requests = msg.active_requests
            w.accept_paused = msg.accept_paused
            w.accept_pauses = msg.accept_pauses
            w.pool = {name: getattr(msg, name) for name in POOL_COUNTERS}
        elif isinstance(msg, ipc.Borrow):
            self._lend(w, msg)
        elif isinstance(msg, ipc.Donate):
            self.take_donations(msg)
            return
        elif isinstance(msg, ipc.AppFailed):
            w.app_error = msg.reason
        for fd in msg.fds:
            os.close(fd)

    def take_donations(self, msg: ipc.Donate) -> None:
        """Gives the broker the idle connections in ``msg`` (from a worker, or from the old
        master after an upgrade); closes them when there is no broker."""
        for i, fd in enumerate(msg.fds):
            if self.broker is not None and i < len(msg.keys):
                self.broker.donate(msg.keys[i], fd)
            else:
                os.close(fd)

    def _lend(self, w: WorkerProc, msg: ipc.Borrow) -> None:
        sock = self.broker.lend(msg.key) if self.broker is not None else None
        try:
            w.channel.send(
                ipc.Lend(request=msg.request, fds=(sock.fileno(),) if sock is not None else ())
            )
        except (ChannelClosed, OSError):
            pass
        finally:
            if sock is not None:
                sock.close()

    def _forget(self, w: WorkerProc) -> None:
        self.sel.unregister(w.channel.sock)
        w.channel.close()

    def _drain_worker(self, w: WorkerProc, grace: float) -> None:
        w.draining = True
        try:
            w.channel.send(ipc.Drain(grace_seconds=grace))
        except (ChannelClosed, OSError):
            self.kill(w.pid, signal.SIGTERM)

    def reap(self) -> None:
        """Collects exited children; a worker that exited is replaced by manage_workers."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if self.demo is not None and self.demo.popen is not None and pid == self.demo.pid:
                self.demo.popen.returncode = code
                self._demo_exited(code)
                continue
            if self.upgrade.reaped(pid, code):
                continue
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            w.popen.returncode = w.exit_code = code
            # Messages sent just before exit (AppFailed) may still wait in the channel.
            try:
                for msg in w.channel.read():
                    self._on_worker_message(w, msg)
            except (ChannelClosed, OSError):
                pass
            self._forget(w)
            # Its balance row has no writer now: retired before the slot gets a new process.
            self.balance.retire(w.generation, w.slot)
            self._release_balance()
            for name, value in w.pool.items():
                self.retired_counts[name] += value
            self._worker_exited(w, code)

    def _release_balance(self) -> None:
        """Closes the balance table of every generation that neither serves nor starts and
        has no worker left."""
        live = {self.generation, *(w.generation for w in self.workers.values())}
        if self.pending is not None:
            live.add(self.pending.number)
        self.balance.release(live)

    def balance_turns(self) -> dict[str, int]:
        """The serving generation's balancing turn per upstream name (handed to a new master
        on upgrade)."""
        return self.balance.turns(self.generation)

    def _worker_exited(self, w: WorkerProc, code: int) -> None:
        if self.stopping or w.draining:
            log.debug("worker %d (pid %d) exited", w.slot, w.pid)
            return
        gen = self.pending
        if gen is not None and w.generation == gen.number:
            gen.failure = w.app_error or f"a new worker exited with {code}"
            return
        if self.lifecycle.state is State.BOOTING:
            w.app_error = w.app_error or f"worker exited with {code} while booting"
            self.workers[w.pid] = w  # start() reads the reason
            return
        young = time.monotonic() - w.started < MIN_HEALTHY_SECONDS
        if code == ipc.EXIT_APP_LOAD:
            log.error("worker %d could not load the app: %s", w.slot, w.app_error or "see above")
        else:
            log.error(
                "worker %d (pid %d) exited with %s; respawning",
                w.slot,
                w.pid,
                f"signal {-code}" if code < 0 else f"code {code}",
            )
        if young or code == ipc.EXIT_APP_LOAD:
            delay = self.backoff.get(w.slot, BACKOFF_FIRST_SECONDS / 2) * 2
            self.backoff[w.slot] = min(delay, BACKOFF_MAX_SECONDS)
            self.next_spawn[w.slot] = time.monotonic() + self.backoff[w.slot]

    def manage_workers(self) -> None:
        """Spawns a worker for every slot of the current generation that has none."""
        if not self.lifecycle.serving:
            return
        taken = {
            w.slot
            for w in self.workers.values()
            if w.generation == self.generation and not w.draining
        }
        now = time.monotonic()
        for slot in range(self.num_workers):
            if slot not in taken and self.next_spawn.get(slot, 0) <= now:
                self.next_spawn.pop(slot, None)
                self.spawn(slot)
        if self.retired and not any(w.draining for w in self.workers.values()):
            for listener in self.retired:
                log.info("closing listener %s", listener.bound_address)
                listener.close()
            self.retired.clear()

    def murder_stuck(self) -> None:
        """Kills workers that stopped heartbeating (SIGABRT, then SIGKILL)."""
        now = time.monotonic()
        timeout = self.config.server.worker_timeout_seconds
        for w in list(self.workers.values()):
            if w.killed_at:
                if now - w.killed_at > KILL_GRACE_SECONDS:
                    self.kill(w.pid, signal.SIGKILL)
            elif now - w.last_seen > timeout:
                log.error(
                    "worker %d (pid %d) silent for %.0fs; killing it",
                    w.slot,
                    w.pid,
                    now - w.last_seen,
                )
                w.killed_at = now
                self.kill(w.pid, signal.SIGABRT)

    @staticmethod
    def kill(pid: int, sig: int) -> None:
        """Sends ``sig`` to ``pid``; a process already gone is no error."""
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    # -- reload: a new generation ----------------------------------------------------------

    def begin_generation(self, config: Config, count: int, why: str) -> None:
        """Starts ``count`` workers of a new generation on ``config``; the old generation
        drains once they are all ready (see :meth:`_check_generation`)."""
        old = {lst.config.address: lst for lst in self.listeners}
        gen = Generation(
            self.generation + 1, config, [], count, time.monotonic() + BOOT_TIMEOUT_SECONDS
        )
        try:
            for lc in config.listeners:
                listener = old.get(lc.address)
                if listener is None:
                    listener = Listener(lc)
                    gen.fresh.append(listener)
                before = len(listener.sockets)
                listener.ensure_slots(count)
                if listener not in gen.fresh:
                    gen.added.extend(listener.sockets[before:])
                gen.listeners.append(listener)
        except ListenError as e:
            self._undo_listeners(gen)
            log.error("%s refused, still serving as before: %s", why, e)
            return
        self.pending = gen
        # The new generation's own balance table, its rotations going on from the fleet's.
        self.balance.create(gen.number, config, count, self.balance.turns(self.generation))
        self.lifecycle.to(State.RELOADING)
        sd_notify("RELOADING=1")
        log.info("%s: starting generation %d with %d workers", why, gen.number, count)
        for slot in range(count):
            self.spawn(slot, gen)

    def _undo_listeners(self, gen: Generation) -> None:
        for listener in gen.fresh:
            listener.close()
        for sock in gen.added:
            for listener in self.listeners:
                if sock in listener.sockets:
                    listener.sockets.remove(sock)
            sock.close()

    def _check_generation(self) -> None:
        gen = self.pending
        if gen is None:
            return
        new = [w for w in self.workers.values() if w.generation == gen.number]
        if not gen.failure and time.monotonic() > gen.deadline:
            gen.failure = "the new workers did not report ready in time"
        if not gen.failure:
            failed = [w for w in new if w.app_error]
            if failed:
                gen.failure = f"app failed to load: {failed[0].app_error}"
        if gen.failure:
            log.error(
                "reload failed, still serving generation %d: %s", self.generation, gen.failure
            )
            for w in new:
                self._drain_worker(w, 0.0)
            self._undo_listeners(gen)
            self.pending = None
            self._release_balance()
            self.lifecycle.to(State.SERVING)
            sd_notify("READY=1")
            self._run_deferred()
            return
        if len(new) < gen.count or not all(w.ready for w in new):
            return
        grace = self.config.server.grace_period_seconds
        for w in list(self.workers.values()):
            if w.generation != gen.number and not w.draining:
                self._drain_worker(w, grace)
        kept = set(map(id, gen.listeners))
        self.retired.extend(lst for lst in self.listeners if id(lst) not in kept)
        self.config, self.listeners = gen.config, gen.listeners
        if self.broker is not None:
            self.broker.size = gen.config.pool.size_shared
            self.broker.idle_timeout = gen.config.pool.idle_timeout_seconds
        self.num_workers, self.generation = gen.count, gen.number
        self.pending = None
        self._release_balance()
        self.backoff.clear()
        self.next_spawn.clear()
        self.lifecycle.to(State.SERVING)
        sd_notify("READY=1")
        log.info("generation %d serving; the old workers drain", gen.number)
        self._run_deferred()

    # -- the loop ------------------------------------------------------------------------

    def _tick(self, timeout: float) -> None:
        """One turn of the loop: every ready descriptor's handler, the broker's sweep, the
        queued signals (``handle_<name>``), then the reaping of exited children."""
        self.sel.dispatch(timeout)
        if self.broker is not None:
            self.broker.sweep(time.monotonic())
        while self.sig_queue:
            signum = self.sig_queue.pop(0)
            handler = getattr(self, f"handle_{_SIGNALS[signum]}", None)
            if handler is not None:
                handler()
        self.reap()

    def run(self) -> int:
        """Supervises until stopped; returns the exit code."""
        try:
            while True:
                self._tick(0.25 if self.lifecycle.state is not State.SERVING else 1.0)
                if self.stopping:
                    if not self.workers:
                        break
                    if time.monotonic() > self.stop_deadline:
                        for w in self.workers.values():
                            self.kill(w.pid, signal.SIGKILL)
                    continue
                self._check_generation()
                self.upgrade.check_deadline(time.monotonic())
                self.murder_stuck()
                self.manage_workers()
        finally:
            self.shutdown()
        return self.exit_code

    def shutdown(self) -> None:
        """Closes the listeners, stops the demo origins, removes the pid file."""
        self.upgrade.hand_pool_to_successor()
        if self.broker is not None:
            self.broker.close()
        self.balance.close()
        for lst in [*self.listeners, *self.retired]:
            lst.close()
        for w in list(self.workers.values()):
            self.kill(w.pid, signal.SIGKILL)
            self._forget(w)
        if self.control is not None:
            self.control.close()
        self.let_go_of_demo(stop=True)
        self._remove_pid_file()

    # -- signals -------------------------------------------------------------------------

    def stop(self, graceful: bool) -> None:
        """Graceful: workers drain within the grace period. Fast: workers close at once."""
        if self.stopping:
            # A second stop signal: no more waiting.
            log.info("stopping now")
            for w in self.workers.values():
                self.kill(w.pid, signal.SIGKILL)
            self.stop_deadline = 0.0
            return
        if self.upgrade.in_progress:
            self.upgrade.fail("stopping")
        if self.pending is not None:
            for w in self.workers.values():
                if w.generation == self.pending.number:
                    w.draining = True
            self.pending = None
        self.lifecycle.to(State.STOPPING)
        if self.upgrade.successor is None:
            sd_notify("STOPPING=1")
        grace = self.config.server.grace_period_seconds if graceful else 0.0
        self.stop_deadline = time.monotonic() + grace + STOP_MARGIN_SECONDS
        log.info("%s stop", "graceful" if graceful else "fast")
        for w in self.workers.values():
            if graceful:
                self._drain_worker(w, grace)
            else:
                w.draining = True
                self.kill(w.pid, signal.SIGINT)

    def handle_term(self) -> None:
        self.stop(graceful=True)

    def handle_quit(self) -> None:
        self.stop(graceful=True)

    def handle_int(self) -> None:
        self.stop(graceful=False)

    def _defer(self, name: str, what: str) -> bool:
        """While the master boots or a reload is under way, a reload or resize waits for it
        (so ``ExecReload=kill -HUP`` right after start is not lost). Returns True when
        ``handle_<name>`` was put off; it runs once serving (:meth:`_run_deferred`)."""
        state = self.lifecycle.state
        if state not in (State.BOOTING, State.RELOADING):
            return False
        if name != "hup" or name not in self.deferred:
            self.deferred.append(name)
        log.info(
            "%s deferred until %s",
            what,
            "the workers are ready"
            if state is State.BOOTING
            else f"generation {self.generation + 1} serves",
        )
        return True

    def _run_deferred(self) -> None:
        todo, self.deferred = self.deferred, []
        for name in todo:
            getattr(self, f"handle_{name}")()

    def handle_hup(self) -> None:
        """Reload: re-read the config; if valid, start a new generation of workers."""
        if self._defer("hup", "reload"):
            return
        if not self.lifecycle.serving:
            log.warning("reload ignored while %s", self.lifecycle.state.value)
            return
        try:
            config = self.reload_config() if self.reload_config else self.config
        except ConfigError as e:
            count = f" ({len(e.errors)} errors)" if len(e.errors) > 1 else ""
            log.error(
                "reload refused, still serving the old config%s: %s",
                count,
                "; ".join(map(str, e.errors)),
            )
            return
        self._warn_identity(config)
        self.begin_generation(config, config.worker_count(), "reload")

    def handle_usr2(self) -> None:
        """Upgrade: a new master from the code on disk takes over the listeners."""
        if not self.lifecycle.serving:
            log.warning("upgrade ignored while %s", self.lifecycle.state.value)
            return
        self.upgrade.begin()

    def handle_ttin(self) -> None:
        """One worker more."""
        if self._defer("ttin", "one worker more"):
            return
        if self.lifecycle.serving:
            self.begin_generation(self.config, self.num_workers + 1, "one worker more")
        else:
            log.warning("one worker more: ignored while %s", self.lifecycle.state.value)

    def handle_ttou(self) -> None:
        """One worker fewer (never fewer than one)."""
        if self._defer("ttou", "one worker fewer"):
            return
        if not self.lifecycle.serving:
            log.warning("one worker fewer: ignored while %s", self.lifecycle.state.value)
        elif self.num_workers > 1:
            self.begin_generation(self.config, self.num_workers - 1, "one worker fewer")
        else:
            log.warning("one worker fewer: ignored, there is only one")

    def handle_usr1(self) -> None:
        """Reopen log files, here and in every worker. Workers that run as ``server.user``
        get the files opened by the master (:meth:`_open_logs_for_workers`)."""
        for handler in log.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.close()
        paths, fds = self._open_logs_for_workers()
        try:
            for w in self.workers.values():
                try:
                    w.channel.send(ipc.ReopenLogs(paths=paths, fds=tuple(fds)))
                except (ChannelClosed, OSError):
                    pass
        finally:
            for fd in fds:
                os.close(fd)
        log.info("log files reopened")

    def _open_logs_for_workers(self) -> tuple[list[str], list[int]]:
        """When the workers run as another user (``server.user``): the log files of the
        config, opened (and created, after logrotate moved them) here, as the master's user,
        since that user may not be allowed to open them, or to reach their folder. The files
        keep their owner and mode. Otherwise nothing: workers reopen their files themselves."""
        config = self.config
        try:
            identity, _ = privileges.for_workers(config.server.user, config.server.group)
        except LookupError:
            identity = None
        if identity is None:
            return [], []
        targets = [config.logging.error_log, config.logging.access_log]
        paths: list[str] = []
        fds: list[int] = []
        for target in targets:
            if target in ("stderr", "stdout", "off"):
                continue
            path = os.path.abspath(target)
            if path in paths:
                continue
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                log.error("cannot open %s for the workers: %s", path, e.strerror or e)
                continue
            paths.append(path)
            fds.append(fd)
        return paths, fds

    def handle_chld(self) -> None:
        """Children are reaped after every tick."""
