"""The benchmarks' servers: starting and stopping nginx, Tenaya and the pump, their configs,
and the readiness probes that say when they serve.

Theory of operation. Every server runs as its own process group with its output in a log file
(``Server``); ``stop`` asks the leader to stop, waits, then SIGKILLs whatever of the group is
left, so a benchmark that stops its servers in a ``finally`` (also on SIGTERM or SIGHUP, see
``terminate_on_sigterm``) leaves nothing behind. One nginx serves as the origin: it answers
every request with the same fixed BODY. nginx as a reverse proxy, Tenaya (``python -m master
start``, run from this checkout) and, in the cleartext HTTP/1.1 cases, the pump (``python -m
loadtests.pump``) stand in front of it with the same worker count; the configs are written
here. A server counts as ready once it has its workers and a run of GETs in a row, each on a
fresh connection, return BODY (``wait_ready``); every wait has a deadline.

``loadtests.bench`` and ``loadtests.pool_bench`` both start their servers with this module.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml

from loadtests.cases import CASE_KEEPALIVE, CASES, DEFAULT_CONNECTIONS, Case
from loadtests.clients import ProbeError, get_h1, get_h2, probe_ok

LOOPBACK = "127.0.0.1"
#: The origin's answer to every request: exactly BODY_BYTES of plain ASCII (no quotes, since it
#: is written into nginx's config as a string literal).
BODY_BYTES = 100
BODY = ("tenaya-bench-origin-" + "0123456789" * 10)[:BODY_BYTES].encode("ascii")

#: Longest wait for a server to answer its first GET with the origin's body.
READY_TIMEOUT_SECONDS = 30.0
#: Pause between two readiness probes (this is a poll interval, not a wait for readiness).
READY_POLL_SECONDS = 0.05
#: Timeout of one readiness probe's connect and read.
PROBE_TIMEOUT_SECONDS = 1.0
#: How many fresh-connection GETs per worker must succeed before a proxy counts as ready, so
#: that every worker's SO_REUSEPORT socket has had a chance to be probed.
PROBES_PER_WORKER = 4
#: Tenaya's graceful-stop window; on stop we wait for it plus STOP_MARGIN_SECONDS, then SIGKILL.
TENAYA_GRACE_SECONDS = 5.0
STOP_MARGIN_SECONDS = 5.0
#: Lines of a server's log shown when it fails or complains.
LOG_TAIL_LINES = 20

#: nginx settings: the proxy keeps at least this many idle upstream connections per worker (more
#: when more requests are in flight, so that no upstream connection is closed for lack of room);
#: both nginx servers allow this many requests per connection, HTTP/2 streams included (the
#: default 1000 would add reconnects, and h2load does not reconnect).
NGINX_UPSTREAM_KEEPALIVE = 64
NGINX_KEEPALIVE_REQUESTS = 1_000_000
#: Floor of nginx's worker_connections; raised with --connections (each proxied request holds a
#: downstream and an upstream connection).
NGINX_MIN_WORKER_CONNECTIONS = 4096
NGINX_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
#: TLS settings of both proxies: nginx 1.22's default protocols lack TLS 1.3, and Tenaya's TLS
#: 1.2 cipher list and server preference are written into nginx's config. TLS 1.3 suites are
#: OpenSSL's defaults on both sides (neither sets them).
TLS_MIN_VERSION = "1.2"
NGINX_SSL_PROTOCOLS = "TLSv1.2 TLSv1.3"
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
#: Tenaya's idle upstream connections per worker by default; raised like nginx's keep-alive.
TENAYA_POOL_SIZE = 128

#: Longest process title kept in a run's per-process CPU figures.
LABEL_CHARS = 40


class BenchError(Exception):
    """The benchmark cannot go on (a tool is missing, a server did not start)."""


# --------------------------------------------------------------------------------------------
# Processes


def free_ports(count: int) -> list[int]:
    """Ports on loopback that were free a moment ago, all different (held open together)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in socks]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, or a note that it is missing."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path.name} missing)"


class Server:
    """A server started as its own process group, with its output in a log file.

    ``stop`` asks the leader to stop with ``stop_signal``, waits up to ``stop_timeout`` seconds,
    then SIGKILLs whatever of the group (and of the descendants seen so far) is left.
    """

    def __init__(
        self,
        name: str,
        cmd: list[str],
        log: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout: float = STOP_MARGIN_SECONDS,
    ) -> None:
        self.name = name
        self.log = log
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        self.root = psutil.Process(self.popen.pid)
        self._seen: dict[int, psutil.Process] = {self.root.pid: self.root}

    def processes(self) -> list[psutil.Process]:
        """The leader and its descendants alive now (they are remembered for ``stop``)."""
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self._seen.setdefault(p.pid, p)
        return procs

    def cpu_seconds(self) -> tuple[float, dict[int, float]]:
        """CPU seconds (user + system) the group has used so far, in total and per pid.

        The total includes the leader's ``children_*`` times: they hold the CPU of descendants
        it has reaped, so a worker that dies between two readings is still counted.
        """
        total = 0.0
        by_pid: dict[int, float] = {}
        for p in self.processes():
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            by_pid[p.pid] = t.user + t.system
            total += by_pid[p.pid]
            if p.pid == self.root.pid:
                total += t.children_user + t.children_system
        return total, by_pid

    def label(self, pid: int) -> str:
        """``PID TITLE`` of a process seen in the group (its title as ps shows it)."""
        try:
            # setproctitle pads the title with spaces; nginx's master shows its whole command.
            title = " ".join(" ".join(self._seen[pid].cmdline()).split())[:LABEL_CHARS]
        except (KeyError, psutil.Error):
            title = "?"
        return f"{pid} {title}"

    def exited(self) -> int | None:
        """The leader's exit status, or None while it runs."""
        return self.popen.poll()

    def stop(self) -> None:
        """Stop the server and every process it started; returns once they are gone."""
        self.processes()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(self.stop_timeout)
        if self.popen.poll() is None:
            # The leader still runs, so its group id cannot have been reused.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(self.stop_timeout)
        leftovers = [p for p in self._seen.values() if p.pid != self.root.pid and p.is_running()]
        for p in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(leftovers, timeout=self.stop_timeout)


def probe(port: int) -> bool:
    """True if a GET / on a fresh connection to the port answers 200 with the origin's body."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=PROBE_TIMEOUT_SECONDS)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        return response.status == http.client.OK and response.read() == BODY
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def case_probe(case: Case) -> Callable[[int], bool]:
    """The readiness probe of a proxy in this case: GET / in the case's protocol (HTTP/1.1 or
    HTTP/2, TLS or not) on a fresh connection must answer 200 with the origin's body."""
    if not case.tls and not case.http2:
        return probe

    def check(port: int) -> bool:
        return probe_ok(
            LOOPBACK,
            port,
            BODY,
            http2=case.http2,
            tls=case.tls,
            timeout=PROBE_TIMEOUT_SECONDS,
        )

    return check


def handshake_summary(case: Case, port: int) -> str:
    """What a TLS handshake with the proxy negotiates for the case's client (version, cipher
    suite, ALPN), or "" for a plaintext case. Raises BenchError if the probe fails."""
    if not case.tls:
        return ""
    get = get_h2 if case.http2 else get_h1
    try:
        return get(LOOPBACK, port, tls=True, timeout=PROBE_TIMEOUT_SECONDS).negotiated
    except (OSError, ProbeError) as e:
        raise BenchError(f"TLS probe of port {port} failed: {e}") from e


def wait_ready(
    server: Server,
    port: int,
    *,
    workers: int = 1,
    probes: int = 1,
    check: Callable[[int], bool] = probe,
) -> None:
    """Poll until the server has ``workers`` children and ``probes`` checks in a row succeed
    (``check(port)``: by default an HTTP/1.1 GET that must return BODY).

    Raises BenchError, with the tail of the server's log, if the server exits or the deadline
    (READY_TIMEOUT_SECONDS) passes first.
    """
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    streak = 0
    while time.monotonic() < deadline:
        status = server.exited()
        if status is not None:
            raise BenchError(
                f"{server.name} exited with status {status} before it was ready:\n"
                f"{log_tail(server.log)}"
            )
        if len(server.processes()) > workers and check(port):
            streak += 1
            if streak >= probes:
                return
            continue
        streak = 0
        time.sleep(READY_POLL_SECONDS)
    raise BenchError(
        f"{server.name} not ready on port {port} after {READY_TIMEOUT_SECONDS}s:\n"
        f"{log_tail(server.log)}"
    )


def nginx_common(tmp: Path, name: str, workers: int, worker_connections: int) -> str:
    """The part of an nginx config both nginx servers share: process settings, temp paths."""
    temp = "\n".join(f"    {kind}_temp_path {tmp / name / kind};" for kind in NGINX_TEMP_DIRS)
    return (
        f"worker_processes {workers};\n"
        f"daemon off;\n"
        f"pid {tmp / name}.pid;\n"
        f"error_log {tmp / name}-error.log warn;\n"
        f"events {{ worker_connections {worker_connections}; }}\n"
        f"http {{\n"
        f"    access_log off;\n"
        f"    keepalive_requests {NGINX_KEEPALIVE_REQUESTS};\n"
        f"{temp}\n"
    )


def origin_config(tmp: Path, port: int) -> str:
    """nginx config of the origin: one worker answering every request with BODY."""
    return (
        nginx_common(tmp, "origin", 1, NGINX_MIN_WORKER_CONNECTIONS)
        + f"    default_type text/plain;\n"
        f"    server {{\n"
        f"        listen {LOOPBACK}:{port};\n"
        f'        location / {{ return 200 "{BODY.decode("ascii")}"; }}\n'
        f"    }}\n"
        f"}}\n"
    )


def nginx_proxy_config(
    tmp: Path,
    port: int,
    origin_port: int,
    workers: int,
    connections: int,
    *,
    case: Case = CASES[CASE_KEEPALIVE],
    tls_files: tuple[Path, Path] | None = None,
) -> str:
    """nginx config of the reverse proxy: ``workers`` workers, keep-alive to the origin, a
    listener speaking the case's protocol (``ssl`` with ``tls_files`` = (cert, key), ``http2``).

    ``connections`` is the most requests in flight at once; it sizes worker_connections and the
    upstream keep-alive cache.
    """
    worker_connections = max(NGINX_MIN_WORKER_CONNECTIONS, 4 * connections)
    keepalive = max(NGINX_UPSTREAM_KEEPALIVE, connections)
    listen = f"{LOOPBACK}:{port} reuseport" + (" ssl" if case.tls else "")
    listen += " http2" if case.http2 else ""
    ssl = ""
    if case.tls:
        if tls_files is None:
            raise ValueError(f"case {case.name} needs a certificate and key")
        cert, key = tls_files
        ssl = (
            f"        ssl_certificate {cert};\n"
            f"        ssl_certificate_key {key};\n"
            f"        ssl_protocols {NGINX_SSL_PROTOCOLS};\n"
            f"        ssl_ciphers {TLS12_CIPHERS};\n"
            f"        ssl_prefer_server_ciphers on;\n"
        )
    return (
        nginx_common(tmp, "nginx-proxy", workers, worker_connections) + f"    upstream o {{\n"
        f"        server {LOOPBACK}:{origin_port};\n"
        f"        keepalive {keepalive};\n"
        f"        keepalive_requests {NGINX_KEEPALIVE_REQUESTS};\n"
        f"    }}\n"
        f"    server {{\n"
        f"        listen {listen};\n"
        f"{ssl}"
        f"        location / {{\n"
        f"            proxy_pass http://o;\n"
        f"            proxy_http_version 1.1;\n"
        f'            proxy_set_header Connection "";\n'
        f"        }}\n"
        f"    }}\n"
        f"}}\n"
    )


def tenaya_config(
    tmp: Path,
    port: int,
    origin_port: int,
    workers: int,
    *,
    tls_files: tuple[Path, Path] | None = None,
    connections: int = DEFAULT_CONNECTIONS,
    pool_shared: bool = True,
) -> dict[str, Any]:
    """Tenaya's config: the built-in load balancer with one upstream, access log off; TLS on
    the listener with ``tls_files`` = (cert, key). HTTP/2 needs no setting: every listener
    takes h2c with prior knowledge, and a TLS listener offers h2 by ALPN.

    ``connections`` is the most requests in flight at once; the pool keeps at least as many idle
    upstream connections.
    """
    listener: dict[str, Any] = {"address": f"{LOOPBACK}:{port}"}
    if tls_files is not None:
        cert, key = tls_files
        listener["tls"] = {
            "cert": str(cert),
            "key": str(key),
            "min_version": TLS_MIN_VERSION,
            "ciphers": TLS12_CIPHERS,
        }
    return {
        "server": {"workers": workers, "grace_period_seconds": TENAYA_GRACE_SECONDS},
        "listeners": [listener],
        "upstreams": {"origin": {"servers": [f"{LOOPBACK}:{origin_port}"]}},
        "pool": {"size_per_worker": max(TENAYA_POOL_SIZE, connections), "shared": pool_shared},
        "logging": {
            "access_log": "off",
            "level": "warning",
            "error_log": str(tmp / "tenaya-error.log"),
        },
    }


def start_nginx(
    nginx: str,
    tmp: Path,
    name: str,
    config: str,
    *,
    port: int,
    workers: int,
    probes: int,
    check: Callable[[int], bool] = probe,
) -> Server:
    """Write the config, start nginx in the foreground and wait until it serves BODY (as
    ``check`` asks for it: by default over plaintext HTTP/1.1)."""
    for kind in NGINX_TEMP_DIRS:
        (tmp / name / kind).mkdir(parents=True, exist_ok=True)
    conf = tmp / f"{name}.conf"
    conf.write_text(config)
    # -e: nginx opens its error log before reading the config; keep even that one in tmp.
    cmd = [nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / f"{name}-error.log")]
    # SIGQUIT is nginx's graceful stop; it has nothing in flight when we stop it.
    server = Server(name, cmd, tmp / f"{name}.out", stop_signal=signal.SIGQUIT)
    wait_ready(server, port, workers=workers, probes=probes, check=check)
    return server


#: The repository this file is in: Tenaya's commands run from it (see ``tenaya_env``).
REPO_ROOT = Path(__file__).resolve().parent.parent


def tenaya_env() -> dict[str, str]:
    """The environment of a Tenaya command: this one with REPO_ROOT first on PYTHONPATH, so
    the code that runs is this checkout's even when the project is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def launch_tenaya(
    conf: Path,
    config: dict[str, Any],
    *,
    port: int,
    workers: int,
    check: Callable[[int], bool] = probe,
) -> Server:
    """Write ``config`` to ``conf``, start ``python -m master start -c conf`` from REPO_ROOT
    (its output in ``conf`` with the suffix ``.out``) and wait until it proxies BODY on
    ``port`` (as ``check`` asks for it); the server is named after the file's stem."""
    conf.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "master", "start", "-c", str(conf)]
    server = Server(
        conf.stem,
        cmd,
        conf.with_suffix(".out"),
        cwd=REPO_ROOT,
        env=tenaya_env(),
        stop_timeout=TENAYA_GRACE_SECONDS + STOP_MARGIN_SECONDS,
    )
    wait_ready(server, port, workers=workers, probes=PROBES_PER_WORKER * workers, check=check)
    return server


def start_tenaya(
    tmp: Path,
    *,
    port: int,
    origin_port: int,
    workers: int,
    case: Case = CASES[CASE_KEEPALIVE],
    tls_files: tuple[Path, Path] | None = None,
    connections: int = DEFAULT_CONNECTIONS,
    pool_shared: bool = True,
) -> Server:
    """Start ``python -m master start`` with a generated config; wait until it proxies BODY in
    the case's protocol.

    It runs from the repository this file is in (also put on PYTHONPATH), so the code measured
    is this checkout's even when the project is not installed.
    """
    config = tenaya_config(
        tmp,
        port,
        origin_port,
        workers,
        tls_files=tls_files,
        connections=connections,
        pool_shared=pool_shared,
    )
    return launch_tenaya(
        tmp / "tenaya.yaml", config, port=port, workers=workers, check=case_probe(case)
    )


def start_pump(tmp: Path, *, port: int, origin_port: int, workers: int) -> Server:
    """Start the pump (``python -m loadtests.pump``, ``workers`` processes: the first and its
    forked siblings) from REPO_ROOT, its output in ``tmp/pump.out``; wait until it proxies BODY
    over plaintext HTTP/1.1."""
    cmd = [
        sys.executable,
        "-m",
        "loadtests.pump",
        "--listen",
        f"{LOOPBACK}:{port}",
        "--origin",
        f"{LOOPBACK}:{origin_port}",
        "--workers",
        str(workers),
    ]
    server = Server("pump", cmd, tmp / "pump.out", cwd=REPO_ROOT, env=tenaya_env())
    # The first process serves too, so it has workers - 1 children.
    wait_ready(server, port, workers=workers - 1, probes=PROBES_PER_WORKER * workers)
    return server


def find_tool(name: str, given: str | None, extra_dirs: Sequence[str] = ()) -> str:
    """The path of a tool: as given, else on PATH, else in one of extra_dirs."""
    path = given or shutil.which(
        name, path=os.pathsep.join([os.environ.get("PATH", ""), *extra_dirs])
    )
    if not path:
        raise BenchError(f"{name} not found; install it (scripts/bench does, as root)")
    return path


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit so that the ``finally`` blocks stop the servers."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


T = TypeVar("T")


def run_guarded(prog: str, run: Callable[[], T]) -> T | None:
    """``run()`` with SIGTERM and SIGHUP stopping the servers cleanly; None, after saying why
    on stderr, when the benchmark could not run or was interrupted."""
    try:
        with terminate_on_sigterm():
            return run()
    except BenchError as e:
        print(f"{prog}: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; servers stopped", file=sys.stderr)
    return None
