"""The pool benchmark's servers: one nginx origin listening on many ports (``o0``..``o<n-1>``),
the proxies put in front of it (Tenaya with its pool shared or not, nginx with upstream
keep-alive, each routing by Host), and Tenaya's pool counters read over its control socket.

Starting and stopping them is ``loadtests.servers``'s; the origin's access log is read by
``loadtests.origin_log``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.origin_log import ORIGIN_LOG_FORMAT, ORIGIN_LOG_FORMAT_NAME
from loadtests.servers import (
    BODY,
    LOOPBACK,
    NGINX_KEEPALIVE_REQUESTS,
    NGINX_MIN_WORKER_CONNECTIONS,
    REPO_ROOT,
    TENAYA_GRACE_SECONDS,
    nginx_common,
    tenaya_env,
)

PROXY_SHARED = "tenaya-shared"
PROXY_UNSHARED = "tenaya-unshared"
PROXY_NGINX = "nginx"
#: The sparse scenario's proxies, in the order of odd rounds (even rounds go backwards).
SPARSE_PROXIES = (PROXY_SHARED, PROXY_UNSHARED, PROXY_NGINX)
PROXY_LABELS = {
    PROXY_SHARED: "tenaya pool.shared=true",
    PROXY_UNSHARED: "tenaya pool.shared=false",
    PROXY_NGINX: "nginx keepalive {keepalive}",
}

#: nginx reverse proxy: idle upstream connections kept per worker and per origin.
NGINX_POOL_KEEPALIVE = 16
#: The origin keeps idle connections this long (longer than any proxy's idle timeout).
ORIGIN_KEEPALIVE_TIMEOUT_SECONDS = 120
#: Name of the nginx variable holding the upstream chosen by Host.
NGINX_UPSTREAM_VARIABLE = "$pool_upstream"

#: Longest wait for ``python -m master status``.
STATUS_TIMEOUT_SECONDS = 15.0
#: Status counters of Tenaya's pool and broker whose differences a run reports.
POOL_COUNTERS = (
    "upstream_requests",
    "connections_created",
    "reused_local",
    "reused_shared",
    "donated",
)
BROKER_COUNTERS = ("donated", "lent", "misses", "dropped")


# --------------------------------------------------------------------------------------------
# Configs


def origin_ports_config(tmp: Path, ports: Sequence[int], access_log: Path) -> str:
    """nginx config of the origin: one worker, one server listening on every port, BODY."""
    listens = "".join(f"        listen {LOOPBACK}:{port};\n" for port in ports)
    return (
        nginx_common(tmp, "origin", 1, NGINX_MIN_WORKER_CONNECTIONS)
        + f"    default_type text/plain;\n"
        f"    keepalive_timeout {ORIGIN_KEEPALIVE_TIMEOUT_SECONDS}s;\n"
        f"    log_format {ORIGIN_LOG_FORMAT_NAME} '{ORIGIN_LOG_FORMAT}';\n"
        f"    server {{\n"
        f"{listens}"
        f"        access_log {access_log} {ORIGIN_LOG_FORMAT_NAME};\n"
        f'        location / {{ return 200 "{BODY.decode("ascii")}"; }}\n'
        f"    }}\n"
        f"}}\n"
    )


def origin_name(i: int) -> str:
    """The upstream name and Host header of origin ``i``: ``o<i>``."""
    return f"o{i}"


def nginx_pool_proxy_config(
    tmp: Path, name: str, port: int, ports: Sequence[int], workers: int
) -> str:
    """nginx as a reverse proxy: an upstream block per origin with keep-alive, chosen by Host
    (an unknown Host goes to o0, as with Tenaya's load balancer)."""
    upstreams = "".join(
        f"    upstream {origin_name(i)} {{\n"
        f"        server {LOOPBACK}:{p};\n"
        f"        keepalive {NGINX_POOL_KEEPALIVE};\n"
        f"        keepalive_requests {NGINX_KEEPALIVE_REQUESTS};\n"
        f"    }}\n"
        for i, p in enumerate(ports)
    )
    routes = "".join(f"        {origin_name(i)} {origin_name(i)};\n" for i in range(len(ports)))
    return (
        nginx_common(tmp, name, workers, NGINX_MIN_WORKER_CONNECTIONS)
        + upstreams
        + f"    map $host {NGINX_UPSTREAM_VARIABLE} {{\n"
        f"        default {origin_name(0)};\n"
        f"{routes}"
        f"    }}\n"
        f"    server {{\n"
        f"        listen {LOOPBACK}:{port} reuseport;\n"
        f"        location / {{\n"
        f"            proxy_pass http://{NGINX_UPSTREAM_VARIABLE};\n"
        f"            proxy_http_version 1.1;\n"
        f'            proxy_set_header Connection "";\n'
        f"        }}\n"
        f"    }}\n"
        f"}}\n"
    )


def tenaya_pool_config(
    tmp: Path, name: str, port: int, ports: Sequence[int], workers: int, shared: bool
) -> dict[str, Any]:
    """Tenaya's config: the built-in load balancer with an upstream per origin, routed by Host,
    the pool shared or not, a control socket for ``status``, no access log."""
    return {
        "server": {
            "workers": workers,
            "grace_period_seconds": TENAYA_GRACE_SECONDS,
            "control_socket": str(tmp / f"{name}.sock"),
        },
        "listeners": [{"address": f"{LOOPBACK}:{port}"}],
        "upstreams": {
            origin_name(i): {"servers": [f"{LOOPBACK}:{p}"], "hosts": [origin_name(i)]}
            for i, p in enumerate(ports)
        },
        "pool": {"shared": shared},
        "logging": {
            "access_log": "off",
            "level": "info",
            "error_log": str(tmp / f"{name}-error.log"),
        },
    }


# --------------------------------------------------------------------------------------------
# Tenaya's status


def tenaya_status(conf: Path) -> tuple[dict[str, Any] | None, str]:
    """``python -m master status -c conf --json``, parsed; or None and why not."""
    cmd = [sys.executable, "-m", "master", "status", "-c", str(conf), "--json"]
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            env=tenaya_env(),
            timeout=STATUS_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        return None, f"status did not answer within {STATUS_TIMEOUT_SECONDS:g}s"
    if done.returncode != 0:
        return None, f"status exited with {done.returncode}: {done.stderr.strip()[-500:]}"
    try:
        return json.loads(done.stdout), ""
    except json.JSONDecodeError as e:
        return None, f"status printed no JSON ({e}): {done.stdout.strip()[-500:]}"


def pool_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Differences of the pool and broker counters between two status replies, the window's
    reuse ratio, and Tenaya's own (cumulative) ``reuse_ratio`` and broker ``idle`` at the end."""
    pool = {k: after["pool"].get(k, 0) - before["pool"].get(k, 0) for k in POOL_COUNTERS}
    requests = pool["upstream_requests"]
    reused = pool["reused_local"] + pool["reused_shared"]
    out: dict[str, Any] = {
        "pool": pool,
        "window_reuse_ratio": reused / requests if requests else None,
        "status_reuse_ratio": after["pool"].get("reuse_ratio"),
        "broker": None,
    }
    if after.get("broker") is not None and before.get("broker") is not None:
        broker = {
            k: after["broker"].get(k, 0) - before["broker"].get(k, 0) for k in BROKER_COUNTERS
        }
        broker["idle_at_end"] = after["broker"].get("idle", 0)
        out["broker"] = broker
    return out
