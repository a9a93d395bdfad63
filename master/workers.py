"""The master's record of each worker process it runs (:class:`WorkerProc`).

Its own module, so that the arbiter's parts (the control commands' status) can name it
without importing the arbiter.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

from shared.ipc import Channel


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
    #: At ``server.max_connections``, not accepting (from its last heartbeat).
    accept_paused: bool = False
    accept_pauses: int = 0
    app_error: str = ""
    exit_code: int | None = None
    pool: dict[str, int] = field(default_factory=dict)
