"""The worker process: one event loop serving the listeners the master handed over.

The master starts ``python -m worker --channel-fd N --listen-fds A,B`` with those descriptors
inherited. Before the worker exists as its own process nothing of it runs; once started it reads
its :class:`~shared.ipc.Boot` message (slot, generation, config), loads the app, serves, and
reports on its channel: ``Ready`` once it accepts, a ``Heartbeat`` every second. It exits with
:data:`~shared.ipc.EXIT_APP_LOAD` when the app cannot load, so the master does not respawn it
in a loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import pkgutil
import select
import signal
import socket
import sys
import time
from functools import partial

import setproctitle
import uvloop

from shared import ipc, privileges
from shared.app import AppLoadError, ProxyHttp, load_app
from shared.config import Config, ConfigError, from_mapping, load
from shared.ipc import Channel, ChannelClosed
from shared.paths import add_app_dirs
from shared.privileges import Identity
from shared.shm.balance import BalanceTable
from shared.shm.pool_index import PoolIndex
from worker.accept_limit import AcceptLimit, Listening, fit_open_files
from worker.accesslog import AccessLog
from worker.connector.broker_client import BrokerClient
from worker.proxy.engine import Engine, RequestLogFilter
from worker.server.h1 import H1Server
from worker.tls import ServerTls

#: ALPN protocols the listeners offer, preferred first.
SERVER_ALPN = ("h2", "http/1.1")

HEARTBEAT_SECONDS = 1.0
SWEEP_SECONDS = 1.0
DRAIN_SWEEP_SECONDS = 0.1
BOOT_TIMEOUT_SECONDS = 30.0

#: Imported before a worker switches to ``server.user``, beside all of Tenaya's own modules:
#: what the standard library imports only when first used on the request path. The new user
#: may not be able to read the interpreter's files (a Python installed under /root), and a
#: module imported after the switch would then fail. The app's own imports come after it, as
#: that user: the app's files and the libraries it uses must be readable by it.
PRELOAD_MODULES = ("encodings.idna", "cryptography.x509")


def setup_logging(config: Config, name: str) -> logging.Logger:
    """The error log of this process, as ``logging.error_log`` and ``logging.level`` say, for
    Tenaya's ``tenaya`` logger and every other (an app's ``logging.getLogger(__name__)``, a
    library's): one handler, on the root logger and on ``tenaya``, both at ``logging.level``.
    ``tenaya`` does not propagate, so its lines are not written twice; since the handler is
    the same object, closing it on a reopen (SIGUSR1) reopens the file for every logger.

    A line reads ``TIME [NAME PID] LEVEL [req ID] message``, the ``[req ID] `` part only for
    lines written while a request's code runs (:class:`~worker.proxy.engine.RequestLogFilter`).
    Runs before the app is loaded, so its import and ``configure`` log here too. Returns the
    ``tenaya`` logger.
    """
    target = config.logging.error_log
    handler: logging.Handler
    if target in ("stderr", "stdout"):
        handler = logging.StreamHandler(sys.stderr if target == "stderr" else sys.stdout)
    else:
        handler = logging.FileHandler(target)
    handler.addFilter(RequestLogFilter())
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s [{name} %(process)d] %(levelname)s %(request_tag)s%(message)s"
        )
    )
    level = config.logging.level.upper()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    log = logging.getLogger("tenaya")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    return log


class Worker:
    """Runs once the process has its boot message."""

    def __init__(self, boot: ipc.Boot, listen_fds: list[tuple[int, int]], channel: Channel) -> None:
        self.boot = boot
        self.slot = boot.slot
        self.listen_fds = listen_fds
        self.channel = channel
        self.stopping = False
        self.drain_deadline = 0.0
        #: Who this worker switched to (``server.user``), or None.
        self.identity: Identity | None = None
        #: Listeners whose certificate files the worker cannot read after its switch: their
        #: certificates change on a reload, not on the fly.
        self.tls_fixed: set[int] = set()

    def run(self) -> int:
        setproctitle.setproctitle(f"tenaya worker {self.slot}")
        config = from_mapping(self.boot.config, self.boot.source)
        self.config = config
        log = self.log = setup_logging(config, f"worker {self.slot}")
        self._open_files(config)
        try:
            self.identity = switch_user(config)
        except (OSError, LookupError) as e:
            log.error("cannot run as server.user: %s", e)
            return ipc.EXIT_BOOT
        if self.identity is not None:
            self._check_tls_files()
        try:
            app = _load_app(config)
            app.worker_id = self.slot
            if self.boot.balance_fd >= 0:
                # This slot's row of the generation's balance table: the app's balancers
                # count there, and read every worker's rows.
                app.balance_slot = BalanceTable.attach_slot(self.boot.balance_fd, self.slot)
            app.configure(config)
        except AppLoadError as e:
            return self._app_failed(self._as_user(str(e)))
        except Exception as e:
            return self._app_failed(
                self._as_user(
                    f"{config.app or 'LoadBalancer'}.configure failed: {type(e).__name__}: {e}"
                )
            )
        loop = self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        engine = self.engine = Engine(app, config, self.access_log, log)
        self.broker: BrokerClient | None = None
        if self.boot.pool_index_fd >= 0 and config.pool.shared:
            self.broker = BrokerClient(self.channel.send, PoolIndex.attach(self.boot.pool_index_fd))
            engine.connector.broker = self.broker
            engine.pool.donor = self.broker.donate
        listening = []
        for fd, index in self.listen_fds:
            listener = config.listeners[index]
            tls = self.tls.get(index)
            listening.append(
                Listening(
                    socket.socket(fileno=fd),
                    listener.backlog,
                    tls.context if tls is not None else None,
                )
            )
        limit = self.accepting = AcceptLimit(
            loop, partial(H1Server, engine), listening, config.server.max_connections, log
        )
        if limit.limit:
            # Counted where the protocols count themselves: at accept, and when they go.
            engine.connections = limit.connections
        loop.run_until_complete(limit.open())
        self.stopped = loop.create_future()
        loop.add_reader(self.channel.fileno(), self._on_channel)
        loop.add_signal_handler(signal.SIGTERM, self.drain, config.server.grace_period_seconds)
        loop.add_signal_handler(signal.SIGQUIT, self.drain, config.server.grace_period_seconds)
        loop.add_signal_handler(signal.SIGINT, self.stop_now)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        self._send(ipc.Ready(pid=os.getpid()))
        loop.call_later(HEARTBEAT_SECONDS, self._heartbeat)
        loop.call_later(SWEEP_SECONDS, self._sweep)
        log.debug("worker %d serving", self.slot)
        try:
            loop.run_until_complete(self.stopped)
        finally:
            for conn in list(engine.connections):
                conn.close()
            if self.channel.closed:
                engine.pool.donor = None
            engine.connector.close_all()
            self._flush_channel()
            if self.access_log is not None:
                self.access_log.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
        return ipc.EXIT_OK

    def _open_files(self, config: Config) -> None:
        """What needs the master's user, before the switch to ``server.user``: the access log
        (the error log is open already), the TLS certificates and keys, room for
        ``server.max_connections`` in the limit of open files."""
        target = config.logging.access_log
        self.access_log = (
            None if target == "off" else AccessLog(target, config.logging.access_log_format)
        )
        self.tls: dict[int, ServerTls] = {}
        for _, index in self.listen_fds:
            listener = config.listeners[index]
            if listener.tls is not None and index not in self.tls:
                self.tls[index] = ServerTls(config, listener.tls, alpn=SERVER_ALPN)
        warning = fit_open_files(config.server.max_connections, config.pool.size_per_worker)
        if warning:
            self.log.warning("%s", warning)

    def _check_tls_files(self) -> None:
        """After the switch: certificate files the new user cannot read are not watched for
        changes (that would fail every second); says so once."""
        unreadable: list[str] = []
        for index, tls in self.tls.items():
            paths = [
                path for c in tls.certs for path in (c.cert, c.key) if not os.access(path, os.R_OK)
            ]
            if paths:
                self.tls_fixed.add(index)
                unreadable += [path for path in paths if path not in unreadable]
        if unreadable and self.identity is not None:
            self.log.info(
                "%s cannot read %s: certificate changes are picked up by a reload, not on the fly",
                self.identity.name,
                ", ".join(unreadable),
            )

    def _as_user(self, reason: str) -> str:
        """An app load failure's reason, saying who could not load it after a switch."""
        if self.identity is None:
            return reason
        return (
            f"{reason} (the worker runs as {self.identity.name}, server.user: the app "
            "and the files it opens must be readable by that user)"
        )

    def _flush_channel(self) -> None:
        """Before exit: what waits for the master (donated connections) goes out."""
        deadline = time.monotonic() + 2
        try:
            while self.channel.wants_write and time.monotonic() < deadline:
                select.select([], [self.channel], [], 0.1)
                self.channel.flush()
        except (ChannelClosed, OSError):
            pass

    def _app_failed(self, reason: str) -> int:
        logging.getLogger("tenaya").error("app failed to load: %s", reason)
        try:
            self.channel.send(ipc.AppFailed(reason=reason))
            deadline = time.monotonic() + 2
            while self.channel.wants_write and time.monotonic() < deadline:
                select.select([], [self.channel], [], 0.1)
                self.channel.flush()
        except (ChannelClosed, OSError):
            pass
        return ipc.EXIT_APP_LOAD

    def _send(self, msg: ipc.Message) -> None:
        try:
            self.channel.send(msg)
        except (ChannelClosed, OSError):
            self._master_gone()

    def _on_channel(self) -> None:
        try:
            messages = self.channel.read()
        except ChannelClosed:
            self._master_gone()
            return
        for msg in messages:
            if isinstance(msg, ipc.Drain):
                self.drain(msg.grace_seconds)
            elif isinstance(msg, ipc.ReopenLogs):
                self.reopen_logs(msg)
            elif isinstance(msg, ipc.Lend):
                if self.broker is not None:
                    self.broker.on_lend(msg)
                else:
                    for fd in msg.fds:
                        os.close(fd)

    def _master_gone(self) -> None:
        if not self.channel.closed or not self.stopping:
            if not self.channel.closed:
                self.loop.remove_reader(self.channel.fileno())
            self.channel.close()
            if self.broker is not None:
                # No Lend can come any more: a borrow under way connects by itself now, not
                # after BORROW_TIMEOUT_SECONDS.
                self.broker.fail_pending()
            self.log.warning("lost the master; draining")
            self.drain(self.config.server.grace_period_seconds)

    def _heartbeat(self) -> None:
        if self.channel.closed:
            return
        e = self.engine
        p = e.pool
        self._send(
            ipc.Heartbeat(
                requests=e.requests,
                connections=len(e.connections),
                active_requests=e.active_requests,
                accept_paused=self.accepting.paused,
                accept_pauses=self.accepting.pauses,
                upstream_requests=p.requests,
                connections_created=p.created,
                reused_local=p.reused,
                reused_shared=p.reused_shared,
                donated=p.donated,
            )
        )
        self.loop.call_later(HEARTBEAT_SECONDS, self._heartbeat)

    def _sweep(self) -> None:
        now = time.monotonic()
        self.engine.sweep(now)
        for index, tls in self.tls.items():
            if index not in self.tls_fixed:
                tls.reload_if_changed()
        if self.access_log is not None:
            self.access_log.flush()
        if self.stopping:
            if not self.engine.connections or now >= self.drain_deadline:
                if not self.stopped.done():
                    self.stopped.set_result(None)
                return
            self.loop.call_later(DRAIN_SWEEP_SECONDS, self._sweep)
        else:
            self.loop.call_later(SWEEP_SECONDS, self._sweep)

    def drain(self, grace: float) -> None:
        """Stops accepting; in-flight requests finish; exits once drained or at the deadline."""
        if self.stopping:
            return
        self.stopping = True
        self.drain_deadline = time.monotonic() + grace
        setproctitle.setproctitle(f"tenaya worker {self.slot} (draining)")
        # Closes this process's copies of the listening sockets for good (a worker paused at
        # server.max_connections does not resume); the master keeps its own, so what waits in
        # the accept queues is not lost.
        self.accepting.close()
        self.engine.drain()
        self.loop.call_soon(self._sweep)

    def stop_now(self) -> None:
        """Fast stop: close everything and exit."""
        self.stopping = True
        self.accepting.close()
        if not self.stopped.done():
            self.stopped.set_result(None)

    def reopen_logs(self, msg: ipc.ReopenLogs | None = None) -> None:
        """Reopens the log files (SIGUSR1 from logrotate, or the master's ``ReopenLogs``).

        A file the master opened for this worker (``msg.fds``, when the worker runs as
        ``server.user``, which may not be allowed to open it) is used as it is; any other is
        opened by its path. The new file takes the old one's descriptor (``dup2``), so nothing
        writes to a closed descriptor; a file that cannot be opened leaves the old one in use,
        with an error in the log."""
        given: dict[str, int] = {}
        if msg is not None:
            given = {
                os.path.abspath(path): fd for path, fd in zip(msg.paths, msg.fds, strict=False)
            }
            for fd in msg.fds[len(msg.paths) :]:
                os.close(fd)
        try:
            if self.access_log is not None and self.access_log.target not in ("stderr", "stdout"):
                self.access_log.flush()
                self._reopen(self.access_log.target, self.access_log.fileno(), given)
            for h in self.log.handlers:
                if isinstance(h, logging.FileHandler) and h.stream is not None:
                    h.flush()
                    self._reopen(h.baseFilename, h.stream.fileno(), given)
        finally:
            for fd in given.values():
                os.close(fd)

    def _reopen(self, path: str, current: int, given: dict[str, int]) -> None:
        fd = given.pop(os.path.abspath(path), -1)
        if fd < 0:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                self.log.error(
                    "cannot reopen %s: %s; still writing to the file it was", path, e.strerror or e
                )
                return
        try:
            os.dup2(fd, current, inheritable=False)
        finally:
            os.close(fd)


def switch_user(config: Config) -> Identity | None:
    """Makes this process ``server.user``/``server.group`` when that is due (the master runs
    as root: :func:`shared.privileges.for_workers`), after importing what code would import
    later (:data:`PRELOAD_MODULES`, Tenaya's modules). Returns the identity switched to, or
    None. Raises :class:`OSError` when the switch fails: the caller must not serve then."""
    identity, _ = privileges.for_workers(config.server.user, config.server.group)
    if identity is None:
        return None
    _preload()
    privileges.switch_to(identity)
    logging.getLogger("tenaya").debug("running as %s", identity.name)
    return identity


def _preload() -> None:
    for package in ("shared", "worker"):
        # Their subpackages too (worker.server, worker.client ...): every module, at any depth.
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
            if not info.name.endswith(".__main__"):
                importlib.import_module(info.name)
    for name in PRELOAD_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _load_app(config: Config) -> ProxyHttp:
    """Loads the config's app, imported from the app's directories (the config file's, then
    the current one: :func:`shared.paths.add_app_dirs`), which go on ``sys.path`` only now,
    after Tenaya's own packages. Raises :class:`AppLoadError`."""
    if config.app is not None:
        try:
            add_app_dirs(config.source)
        except ValueError as e:
            raise AppLoadError(str(e)) from None
    return load_app(config.app)


def _wait_boot(channel: Channel) -> ipc.Boot:
    deadline = time.monotonic() + BOOT_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        select.select([channel], [], [], 1.0)
        for msg in channel.read():
            if isinstance(msg, ipc.Boot):
                return msg
    raise TimeoutError("no boot message from the master")


def check(config_path: str | None, app_spec: str | None) -> int:
    """``python -m worker --check``: loads the config and the app the way a worker would,
    as ``server.user`` when a worker would switch to it."""
    try:
        config = load(config_path)
        if app_spec is not None:
            config = from_mapping({**config.raw, "app": app_spec}, config.source)
        try:
            identity = switch_user(config)
        except OSError as e:
            print(f"{config.source}: server.user: cannot switch: {e}", file=sys.stderr)
            return 1
        try:
            app = _load_app(config)
        except AppLoadError as e:
            if identity is not None:
                raise AppLoadError(f"{e} (as {identity.name}, server.user)") from None
            raise
        app.configure(config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except AppLoadError as e:
        print(f"{config.source}: app: {e}", file=sys.stderr)
        return ipc.EXIT_APP_LOAD
    except Exception as e:
        print(f"{config.source}: app: configure failed: {type(e).__name__}: {e}", file=sys.stderr)
        return ipc.EXIT_APP_LOAD
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker", description="A Tenaya worker (started by the master)."
    )
    parser.add_argument("--channel-fd", type=int)
    parser.add_argument(
        "--listen-fds", default="", help="FD@LISTENER_INDEX,... of the sockets to accept on"
    )
    parser.add_argument(
        "--check", action="store_true", help="load the config and the app, then exit"
    )
    parser.add_argument("-c", "--config")
    parser.add_argument("--app")
    args = parser.parse_args(argv)
    if args.check:
        return check(args.config, args.app)
    if args.channel_fd is None:
        parser.error("--channel-fd is required (workers are started by the master)")
    try:
        channel = Channel(socket.socket(fileno=args.channel_fd))
        listen_fds = []
        for item in filter(None, args.listen_fds.split(",")):
            fd, _, index = item.partition("@")
            listen_fds.append((int(fd), int(index or 0)))
        boot = _wait_boot(channel)
    except (OSError, ValueError, TimeoutError, ChannelClosed) as e:
        print(f"tenaya worker: cannot boot: {e}", file=sys.stderr)
        return ipc.EXIT_BOOT
    return Worker(boot, listen_fds, channel).run()
