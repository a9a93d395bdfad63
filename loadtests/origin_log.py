"""Counting the upstream connections a proxy opened, from the origin's access log.

The origin (nginx, see ``loadtests.pool_servers``) writes ``$msec $server_port $connection
$connection_requests`` per request. A line whose ``$connection_requests`` is 1 is the first
request of a connection, so counting those lines between two offsets of the log counts
*exactly* the connections the proxy opened to the origin in that window, whatever the proxy
says about itself (``$msec`` tells how many of them came in the later half of the window).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: The origin's access log format, by name and as nginx's log_format takes it.
ORIGIN_LOG_FORMAT_NAME = "pool"
ORIGIN_LOG_FORMAT = "$msec $server_port $connection $connection_requests"


@dataclass(slots=True)
class OriginCount:
    """What the origin logged between two offsets of its access log."""

    requests: int  #: requests the origin answered
    new_connections: int  #: requests that were the first of their connection
    connections_used: int  #: distinct connections that carried a request
    origins_touched: int  #: distinct ports that got a request
    max_new_per_origin: int  #: most new connections to a single port
    new_in_second_half: int  #: new connections in the later half of the window (origin's clock)


class OriginLog:
    """The origin's access log, read between offsets (it is never truncated while in use)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def offset(self) -> int:
        """The log's length now: where the next request's line will start."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def count(self, start: int, end: int) -> OriginCount:
        """Counts the whole lines that begin in ``[start, end)``; a line cut by ``start`` (an
        offset taken while nginx was writing) belongs to the window before, one cut by ``end``
        to the window after."""
        with open(self.path, "rb") as f:
            data = f.read(end)
        if start > 0 and data[start - 1 : start] != b"\n":
            cut = data.find(b"\n", start)
            start = len(data) if cut < 0 else cut + 1
        data = data[: data.rfind(b"\n") + 1]
        requests = 0
        connections: set[bytes] = set()
        new_by_port: Counter[bytes] = Counter()
        ports: set[bytes] = set()
        times: list[float] = []
        new_times: list[float] = []
        for line in data[start:].splitlines():
            fields = line.split()
            if len(fields) != len(ORIGIN_LOG_FORMAT.split()):
                continue
            msec, port, connection, nth = fields
            requests += 1
            connections.add(connection)
            ports.add(port)
            times.append(float(msec))
            if nth == b"1":
                new_by_port[port] += 1
                new_times.append(float(msec))
        middle = (min(times) + max(times)) / 2 if times else 0.0
        return OriginCount(
            requests=requests,
            new_connections=len(new_times),
            connections_used=len(connections),
            origins_touched=len(ports),
            max_new_per_origin=max(new_by_port.values(), default=0),
            new_in_second_half=sum(t > middle for t in new_times),
        )
