"""nginx as an origin: fast and real, serving fixed bodies on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.payloads import pattern_chunks
from tests.support.resources import free_port


def nginx_binary() -> str:
    """The nginx executable (scripts/test installs it)."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    assert found, "nginx is not installed (scripts/test installs it)"
    return found


class Nginx:
    """nginx serving fixed bodies on 127.0.0.1, as a fast, real origin.

    ``/small`` answers 13 bytes; ``/bytes/N`` answers the file ``N`` of ``N`` bytes (made on
    demand by :meth:`add_file`). Keep-alive requests per connection are unlimited.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        (workdir / "html" / "bytes").mkdir(parents=True, exist_ok=True)
        (workdir / "html" / "small").write_text("hello, nginx\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def add_file(self, size: int) -> str:
        path = self.workdir / "html" / "bytes" / str(size)
        with open(path, "wb") as f:
            for chunk in pattern_chunks(size):
                f.write(chunk)
        return f"/bytes/{size}"

    def start(self, attempts: int = 5) -> Nginx:
        for _ in range(attempts):
            self.port = free_port()
            conf = self.workdir / "nginx.conf"
            w = self.workdir
            # As root, nginx's workers would switch to a user that cannot read tmp_path.
            user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
            conf.write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {w}/tmp;
    proxy_temp_path {w}/tmp;
    fastcgi_temp_path {w}/tmp;
    uwsgi_temp_path {w}/tmp;
    scgi_temp_path {w}/tmp;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port};
        root {w}/html;
        location = /small {{ default_type text/plain; }}
    }}
}}
""")
            (w / "tmp").mkdir(exist_ok=True)
            log = open(w / "nginx.stderr", "wb")  # noqa: SIM115 - closed below
            try:
                self.proc = subprocess.Popen(
                    [
                        nginx_binary(),
                        "-p",
                        str(w),
                        "-c",
                        str(conf),
                        "-e",
                        str(w / "nginx-error.log"),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            finally:
                log.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), timeout=1),
                ):
                    return self
                time.sleep(0.02)
            self.stop()  # probably lost the port to someone else: try another
        log_text = (self.workdir / "nginx-error.log").read_text(errors="replace")
        raise AssertionError(f"nginx did not start:\n{log_text[-2000:]}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
