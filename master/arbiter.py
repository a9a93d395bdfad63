"""The arbiter: the master's supervision loop.

Signal handlers only queue the signal and wake the loop (a self-pipe); one loop then dispatches
``handle_<signal>`` by name, reads worker channels, reaps children, kills workers that stopped
heartbeating, and spawns workers up to the target count. The master never blocks on a worker
and never runs app code: workers are fresh ``python -m worker`` processes (fork+exec) that get
their listening sockets and a channel by inheritance, and their config in a ``Boot`` message.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import setproctitle

from master.listeners import Listener, bind_all
from shared import ipc
from shared.config import Config
from shared.ipc import Channel, ChannelClosed

log = logging.getLogger("tenaya")

#: Longest wait for the first generation of workers to report ready.
BOOT_TIMEOUT_SECONDS = 60.0
#: A worker that dies younger than this counts as a boot failure and backs off.
MIN_HEALTHY_SECONDS = 1.0
BACKOFF_FIRST_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 10.0
#: After SIGABRT, a stuck worker gets this long before SIGKILL.
KILL_GRACE_SECONDS = 2.0
#: After the grace period of a stop, how long to wait for workers before SIGKILL.
STOP_MARGIN_SECONDS = 2.0

_SIGNALS = {
    signal.SIGTERM: "term", signal.SIGQUIT: "quit", signal.SIGINT: "int",
    signal.SIGHUP: "hup", signal.SIGUSR1: "usr1", signal.SIGUSR2: "usr2",
    signal.SIGTTIN: "ttin", signal.SIGTTOU: "ttou", signal.SIGCHLD: "chld",
}


@dataclass
class WorkerProc:
    """The master's record of one worker process."""

    pid: int
    slot: int
    generation: int
    channel: Channel
    popen: subprocess.Popen[bytes]
    started: float
    last_seen: float
    ready: bool = False
    draining: bool = False
    killed_at: float = 0.0
    requests: int = 0
    connections: int = 0
    active_requests: int = 0
    app_error: str = ""
    stats: dict[str, int] = field(default_factory=dict)


class StartError(Exception):
    """The master could not start serving (the reason is the message)."""


class Arbiter:
    """Supervises the workers of one config."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.num_workers = config.worker_count()
        self.generation = 1
        self.listeners: list[Listener] = []
        self.workers: dict[int, WorkerProc] = {}
        self.sel = selectors.DefaultSelector()
        self.sig_queue: list[int] = []
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.booted = False
        self.backoff: dict[int, float] = {}
        self.next_spawn: dict[int, float] = {}
        self.demo: subprocess.Popen[bytes] | None = None
        self.started = time.time()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Binds the listeners, starts demo origins and the workers, writes the pid file.

        Raises :class:`StartError` when serving is impossible (a port in use, an app that
        cannot load).
        """
        setproctitle.setproctitle("tenaya master")
        self.listeners = bind_all(self.config.listeners, self.num_workers)
        self._install_signals()
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        if self.config.demo_origins:
            self._start_demo()
        for slot in range(self.num_workers):
            self.spawn(slot)
        deadline = time.monotonic() + BOOT_TIMEOUT_SECONDS
        while not all(w.ready for w in self.workers.values()) or len(self.workers) < self.num_workers:
            if time.monotonic() > deadline:
                raise StartError("workers did not report ready in time")
            self._tick(0.5)
            failed = [w for w in self.workers.values() if w.app_error]
            if failed or self.stopping:
                reason = failed[0].app_error if failed else "stopped during start"
                raise StartError(f"app failed to load: {reason}")
        self.booted = True
        self._write_pid_file()
        addresses = ", ".join(f"http://{lst.bound_address}" for lst in self.listeners)
        log.info("serving on %s with %d workers (pid %d)", addresses, self.num_workers,
                 os.getpid())

    def _start_demo(self) -> None:
        self.demo = subprocess.Popen(
            [sys.executable, "-m", "master.demo", *self.config.demo_origins],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        line = self.demo.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != b"ready":
            self.demo.wait()
            raise StartError("demo origins could not start (see above)")
        log.info("demo origins on %s", ", ".join(self.config.demo_origins))

    def _write_pid_file(self) -> None:
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

    def spawn(self, slot: int) -> None:
        """Starts a worker for ``slot`` on that slot's sockets."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent.set_inheritable(False)
        fds = [lst.sockets[slot].fileno() for lst in self.listeners]
        cmd = [sys.executable, "-m", "worker", "--channel-fd", str(child.fileno()),
               "--listen-fds", ",".join(map(str, fds))]
        env = dict(os.environ)
        if self.config.source and os.path.isfile(self.config.source):
            # An app module beside its config file is importable, as with gunicorn --chdir.
            here = os.path.dirname(os.path.abspath(self.config.source))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
        try:
            popen = subprocess.Popen(cmd, pass_fds=[child.fileno(), *fds],
                                     stdin=subprocess.DEVNULL, env=env)
        finally:
            child.close()
        now = time.monotonic()
        channel = Channel(parent)
        w = WorkerProc(popen.pid, slot, self.generation, channel, popen, now, now)
        self.workers[w.pid] = w
        self.sel.register(channel.sock, selectors.EVENT_READ, w)
        channel.send(ipc.Boot(slot=slot, generation=self.generation,
                              config=self.config.raw, source=self.config.source))
        log.debug("spawned worker %d (pid %d)", slot, w.pid)

    def _on_worker_message(self, w: WorkerProc, msg: ipc.Message) -> None:
        w.last_seen = time.monotonic()
        if isinstance(msg, ipc.Ready):
            w.ready = True
            self.backoff.pop(w.slot, None)
        elif isinstance(msg, ipc.Heartbeat):
            w.requests = msg.requests
            w.connections = msg.connections
            w.active_requests = msg.active_requests
        elif isinstance(msg, ipc.AppFailed):
            w.app_error = msg.reason

    def _forget(self, w: WorkerProc) -> None:
        try:
            self.sel.unregister(w.channel.sock)
        except (KeyError, ValueError):
            pass
        w.channel.close()

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
            if self.demo is not None and pid == self.demo.pid:
                self.demo.returncode = code
                if not self.stopping:
                    log.error("demo origins exited (%s)", code)
                continue
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            w.popen.returncode = code
            # Messages sent just before exit (AppFailed) are still in the channel.
            try:
                for msg in w.channel.read():
                    self._on_worker_message(w, msg)
            except (ChannelClosed, OSError):
                pass
            self._forget(w)
            if self.stopping or w.draining:
                log.debug("worker %d (pid %d) exited", w.slot, pid)
                continue
            young = time.monotonic() - w.started < MIN_HEALTHY_SECONDS
            if code == ipc.EXIT_APP_LOAD:
                log.error("worker %d could not load the app: %s", w.slot,
                          w.app_error or "see its log")
                if not self.booted:
                    w.app_error = w.app_error or "see the log above"
                    self.workers[pid] = w  # start() reads the reason
                    return
            else:
                log.error("worker %d (pid %d) exited with %s; respawning", w.slot, pid,
                          f"signal {-code}" if code < 0 else f"code {code}")
            if young or code == ipc.EXIT_APP_LOAD:
                delay = self.backoff.get(w.slot, BACKOFF_FIRST_SECONDS / 2) * 2
                self.backoff[w.slot] = min(delay, BACKOFF_MAX_SECONDS)
                self.next_spawn[w.slot] = time.monotonic() + self.backoff[w.slot]

    def manage_workers(self) -> None:
        """Spawns a worker for every slot that has none (respecting back-off)."""
        if self.stopping:
            return
        taken = {w.slot for w in self.workers.values() if not w.draining}
        now = time.monotonic()
        for slot in range(self.num_workers):
            if slot not in taken and self.next_spawn.get(slot, 0) <= now:
                self.next_spawn.pop(slot, None)
                self.spawn(slot)

    def murder_stuck(self) -> None:
        """Kills workers that stopped heartbeating (SIGABRT, then SIGKILL)."""
        now = time.monotonic()
        timeout = self.config.server.worker_timeout_seconds
        for w in list(self.workers.values()):
            if w.killed_at:
                if now - w.killed_at > KILL_GRACE_SECONDS:
                    self._kill(w.pid, signal.SIGKILL)
            elif now - w.last_seen > timeout:
                log.error("worker %d (pid %d) silent for %.0fs; killing it", w.slot, w.pid,
                          now - w.last_seen)
                w.killed_at = now
                self._kill(w.pid, signal.SIGABRT)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    # -- the loop ------------------------------------------------------------------------

    def _tick(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            w = key.data
            if w is None:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            try:
                for msg in w.channel.read():
                    self._on_worker_message(w, msg)
            except ChannelClosed:
                self._forget(w)
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    self._forget(w)
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
                self._tick(0.25 if self.stopping else 1.0)
                if self.stopping:
                    if not self.workers:
                        break
                    if time.monotonic() > self.stop_deadline:
                        for w in self.workers.values():
                            self._kill(w.pid, signal.SIGKILL)
                    continue
                self.murder_stuck()
                self.manage_workers()
        finally:
            self.shutdown()
        return self.exit_code

    def shutdown(self) -> None:
        """Closes the listeners, stops the demo origins, removes the pid file."""
        for lst in self.listeners:
            lst.close()
        for w in list(self.workers.values()):
            self._kill(w.pid, signal.SIGKILL)
            self._forget(w)
        if self.demo is not None and self.demo.returncode is None:
            self.demo.terminate()
            try:
                self.demo.wait(5)
            except subprocess.TimeoutExpired:
                self.demo.kill()
        self._remove_pid_file()

    # -- signals -------------------------------------------------------------------------

    def stop(self, graceful: bool) -> None:
        """Graceful: workers drain within the grace period. Fast: workers close at once."""
        if self.stopping:
            # A second stop signal: no more waiting.
            log.info("stopping now")
            for w in self.workers.values():
                self._kill(w.pid, signal.SIGKILL)
            self.stop_deadline = 0.0
            return
        self.stopping = True
        grace = self.config.server.grace_period_seconds if graceful else 0.0
        self.stop_deadline = time.monotonic() + grace + STOP_MARGIN_SECONDS
        log.info("%s stop", "graceful" if graceful else "fast")
        for w in self.workers.values():
            w.draining = True
            if graceful:
                try:
                    w.channel.send(ipc.Drain(grace_seconds=grace))
                except ChannelClosed:
                    self._kill(w.pid, signal.SIGTERM)
            else:
                self._kill(w.pid, signal.SIGINT)

    def handle_term(self) -> None:
        self.stop(graceful=True)

    def handle_quit(self) -> None:
        self.stop(graceful=True)

    def handle_int(self) -> None:
        self.stop(graceful=False)

    def handle_chld(self) -> None:
        """Children are reaped after every tick."""
