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
import logging
import os
import select
import signal
import socket
import sys
import time
from functools import partial

import setproctitle
import uvloop

from shared import ipc
from shared.app import AppLoadError, ProxyHttp, load_app
from shared.config import Config, ConfigError, from_mapping, load
from shared.ipc import Channel, ChannelClosed
from shared.paths import add_app_dirs
from shared.poolindex import PoolIndex
from worker.accept_limit import AcceptLimit, Listening, fit_open_files
from worker.accesslog import AccessLog
from worker.broker_client import BrokerClient
from worker.h1_server import H1Server
from worker.proxy import Engine, RequestLogFilter
from worker.tls import ServerTls

#: ALPN protocols the listeners offer, preferred first.
SERVER_ALPN = ("h2", "http/1.1")

HEARTBEAT_SECONDS = 1.0
SWEEP_SECONDS = 1.0
DRAIN_SWEEP_SECONDS = 0.1
BOOT_TIMEOUT_SECONDS = 30.0


def setup_logging(config: Config, name: str) -> logging.Logger:
    """The error log of this process, as ``logging.error_log`` and ``logging.level`` say, for
    Tenaya's ``tenaya`` logger and every other (an app's ``logging.getLogger(__name__)``, a
    library's): one handler, on the root logger and on ``tenaya``, both at ``logging.level``.
    ``tenaya`` does not propagate, so its lines are not written twice; since the handler is
    the same object, closing it on a reopen (SIGUSR1) reopens the file for every logger.

    A line reads ``TIME [NAME PID] LEVEL [req ID] message``, the ``[req ID] `` part only for
    lines written while a request's code runs (:class:`~worker.proxy.RequestLogFilter`).
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
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [{name} %(process)d] %(levelname)s %(request_tag)s%(message)s"))
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

    def __init__(self, boot: ipc.Boot, listen_fds: list[tuple[int, int]],
                 channel: Channel) -> None:
        self.boot = boot
        self.slot = boot.slot
        self.listen_fds = listen_fds
        self.channel = channel
        self.stopping = False
        self.drain_deadline = 0.0

    def run(self) -> int:
        setproctitle.setproctitle(f"tenaya worker {self.slot}")
        config = from_mapping(self.boot.config, self.boot.source)
        self.config = config
        log = self.log = setup_logging(config, f"worker {self.slot}")
        try:
            app = _load_app(config)
            app.worker_id = self.slot
            app.configure(config)
        except AppLoadError as e:
            return self._app_failed(str(e))
        except Exception as e:
            return self._app_failed(f"{config.app or 'LoadBalancer'}.configure failed: "
                                    f"{type(e).__name__}: {e}")
        loop = self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        target = config.logging.access_log
        self.access_log = None if target == "off" else AccessLog(
            target, config.logging.access_log_format)
        warning = fit_open_files(config.server.max_connections, config.pool.size_per_worker)
        if warning:
            log.warning("%s", warning)
        engine = self.engine = Engine(app, config, self.access_log, log)
        self.broker: BrokerClient | None = None
        if self.boot.pool_index_fd >= 0 and config.pool.shared:
            self.broker = BrokerClient(self.channel.send, PoolIndex.attach(self.boot.pool_index_fd))
            engine.broker = self.broker
            engine.pool.donor = self.broker.donate
        self.tls: dict[int, ServerTls] = {}
        listening = []
        for fd, index in self.listen_fds:
            listener = config.listeners[index]
            if listener.tls is not None and index not in self.tls:
                self.tls[index] = ServerTls(config, listener.tls, alpn=SERVER_ALPN)
            tls = self.tls.get(index)
            listening.append(Listening(socket.socket(fileno=fd), listener.backlog,
                                       tls.context if tls is not None else None))
        limit = self.accepting = AcceptLimit(loop, partial(H1Server, engine), listening,
                                             config.server.max_connections, log)
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
            engine.pool.close_all()
            self._flush_channel()
            if self.access_log is not None:
                self.access_log.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
        return ipc.EXIT_OK

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
                self.reopen_logs()
            elif isinstance(msg, ipc.Lend):
                if self.broker is not None:
                    self.broker.on_lend(msg)
                else:
                    for fd in msg.fds:
                        os.close(fd)

    def _master_gone(self) -> None:
        if not self.channel.closed or not self.stopping:
            self.loop.remove_reader(self.channel.fileno()) if not self.channel.closed else None
            self.channel.close()
            self.log.warning("lost the master; draining")
            self.drain(self.config.server.grace_period_seconds)

    def _heartbeat(self) -> None:
        if self.channel.closed:
            return
        e = self.engine
        p = e.pool
        self._send(ipc.Heartbeat(requests=e.requests, connections=len(e.connections),
                                 active_requests=e.active_requests,
                                 accept_paused=self.accepting.paused,
                                 accept_pauses=self.accepting.pauses,
                                 upstream_requests=p.requests, connections_created=p.created,
                                 reused_local=p.reused, reused_shared=p.reused_shared,
                                 donated=p.donated))
        self.loop.call_later(HEARTBEAT_SECONDS, self._heartbeat)

    def _sweep(self) -> None:
        now = time.monotonic()
        self.engine.sweep(now)
        for tls in self.tls.values():
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

    def reopen_logs(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()
        for h in self.log.handlers:
            if isinstance(h, logging.FileHandler):
                h.close()


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
    """``python -m worker --check``: loads the config and the app the way a worker would."""
    try:
        config = load(config_path)
        if app_spec is not None:
            config = from_mapping({**config.raw, "app": app_spec}, config.source)
        app = _load_app(config)
        app.configure(config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except AppLoadError as e:
        print(f"{config.source}: app: {e}", file=sys.stderr)
        return ipc.EXIT_APP_LOAD
    except Exception as e:
        print(f"{config.source}: app: configure failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return ipc.EXIT_APP_LOAD
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker",
                                     description="A Tenaya worker (started by the master).")
    parser.add_argument("--channel-fd", type=int)
    parser.add_argument("--listen-fds", default="",
                        help="FD@LISTENER_INDEX,... of the sockets to accept on")
    parser.add_argument("--check", action="store_true",
                        help="load the config and the app, then exit")
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
