"""The pool benchmark's clients: the paced client of the sparse scenario (a request on a new
connection to a random origin's Host, at a fixed rate, every response's status and body
checked) and wrk's Lua script for the steady scenario (the Host rotating over the origins).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
from collections import Counter
from dataclasses import dataclass

from loadtests.pool_servers import origin_name
from loadtests.servers import BODY, LOOPBACK

#: Extra time the sparse client waits for its last requests beyond their own timeout.
CLIENT_MARGIN_SECONDS = 5.0
#: Largest response head the sparse client accepts.
MAX_HEAD_BYTES = 16_384
#: wrk threads for the steady load (the machine has few cores; one thread is plenty).
STEADY_WRK_THREADS = 1

#: How a sparse request that got no response is recorded.
ERROR_BAD_BODY = "bad body"
ERROR_TIMEOUT = "timeout"


# --------------------------------------------------------------------------------------------
# The steady load's wrk script


def steady_wrk_script(origins: int) -> str:
    """wrk's Lua script: each request's Host is the next of o0..o<origins-1>, in turn."""
    return (
        "-- Rotates the Host header over the origins (requests are formatted once).\n"
        "local requests = {}\n"
        "local next_i = 0\n"
        "init = function(args)\n"
        f"  for i = 0, {origins - 1} do\n"
        '    requests[i] = wrk.format("GET", "/", {["Host"] = "o" .. i})\n'
        "  end\n"
        "end\n"
        "request = function()\n"
        "  local r = requests[next_i]\n"
        f"  next_i = (next_i + 1) % {origins}\n"
        "  return r\n"
        "end\n"
    )


# --------------------------------------------------------------------------------------------
# The sparse client


@dataclass(slots=True)
class ClientResult:
    """What the paced client saw."""

    sent: int  #: requests started
    ok: int  #: 200 responses with the origin's body
    statuses: dict[str, int]  #: count by status code (as text), every response
    errors: dict[str, int]  #: requests without a valid response, by reason
    elapsed_seconds: float  #: from the first request's start to the last one's end
    max_start_lag_ms: float  #: worst delay of a request's start after its due time

    @property
    def failures(self) -> int:
        """Requests that did not get a 200 with the origin's body."""
        return self.sent - self.ok


def _content_length(head: bytes) -> int | None:
    """The Content-Length of a response head, or None."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


async def _one_request(port: int, host: str) -> tuple[int, bytes]:
    """GET / with ``Host: host`` on a new connection; returns the status and body."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port, limit=MAX_HEAD_BYTES)
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = _content_length(head)
        body = await (reader.readexactly(length) if length is not None else reader.read())
        return status, body
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _timed_request(port: int, host: str, timeout: float) -> tuple[int | None, str]:
    """One request with a deadline: (status, "") or (status or None, the reason it failed)."""
    try:
        status, body = await asyncio.wait_for(_one_request(port, host), timeout)
    except TimeoutError:
        return None, ERROR_TIMEOUT
    except (
        OSError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        ValueError,
        IndexError,
    ) as e:
        return None, type(e).__name__
    if status == 200 and body != BODY:
        return status, ERROR_BAD_BODY
    return status, ""


async def _sparse_client(
    port: int, origins: int, rate: float, duration: float, seed: int, timeout: float
) -> ClientResult:
    """Sends ``rate * duration`` requests, one every ``1 / rate`` seconds, each on a new
    connection to a random origin's Host; waits for them all (each has ``timeout``)."""
    rng = random.Random(seed)
    total = int(rate * duration)
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[tuple[int | None, str]]] = []
    max_lag = 0.0
    start = loop.time()
    for k in range(total):
        host = origin_name(rng.randrange(origins))
        due = start + k / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        max_lag = max(max_lag, loop.time() - due)
        tasks.append(asyncio.create_task(_timed_request(port, host, timeout)))
    done, pending = await asyncio.wait(tasks, timeout=timeout + CLIENT_MARGIN_SECONDS)
    elapsed = loop.time() - start
    for task in pending:
        task.cancel()
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    ok = 0
    for task in tasks:
        if task not in done:
            errors["unfinished"] += 1
            continue
        status, error = task.result()
        if status is not None:
            statuses[str(status)] += 1
        if error:
            errors[error] += 1
        elif status == 200:
            ok += 1
        else:
            errors[f"status {status}"] += 1
    return ClientResult(total, ok, dict(statuses), dict(errors), elapsed, max_lag * 1e3)


def run_sparse_client(port: int, args: argparse.Namespace) -> ClientResult:
    """The paced client of scenario A, in its own event loop."""
    return asyncio.run(
        _sparse_client(
            port, args.origins, args.rate, args.duration, args.seed, args.request_timeout
        )
    )
