"""Protection logs without floods: at most one line per client and reason per window.

A refused request is worth a log line, once. A client sending thousands of bad requests (or
resetting thousands of streams) would otherwise have the worker write thousands of lines,
which fills a disk and buries the lines that matter; so each protection asks a
:class:`LogThrottle` before it logs. The throttle remembers, per (client IP, reason), when it
last let a line through and how many it held back since; the next line let through says how
many that was.

Cost: one dict lookup and one clock read per protection that fires (never on a request that
is let through). Memory is bounded by :data:`MAX_KEYS`: the keys sit in a dict in the order
their line was last let through, so the expired ones are found at its front and dropped when
it is full; if none has expired, the oldest is forgotten (that client may then be logged again
within its window, and its held-back count is lost: bounded memory wins over exact counts).
"""

from __future__ import annotations

import time

#: A client gets at most one line per reason per this many seconds.
LOG_WINDOW_SECONDS = 60.0
#: Most (client, reason) pairs remembered at once.
MAX_KEYS = 4096


class _Seen:
    """When a key's line was last let through, and how many were held back since."""

    __slots__ = ("since", "held")

    def __init__(self, since: float) -> None:
        self.since = since
        self.held = 0


class LogThrottle:
    """Decides whether a protection's log line for a client goes out (see the module
    docstring). One per worker; not thread-safe (the event loop's thread uses it)."""

    __slots__ = ("window", "max_keys", "_seen")

    def __init__(self, window: float = LOG_WINDOW_SECONDS, max_keys: int = MAX_KEYS) -> None:
        self.window = window
        self.max_keys = max_keys
        self._seen: dict[tuple[str, str], _Seen] = {}

    def allow(self, client: str, reason: str, now: float | None = None) -> int | None:
        """Called when a protection fires for ``client`` (an IP) for ``reason``. Returns None
        when a line for the pair went out less than ``window`` seconds ago (this one is
        counted and should not be logged); otherwise the number of lines held back for the
        pair since its last one (0 the first time), and the line should be logged.
        ``now`` is a ``time.monotonic()`` value (read when not given)."""
        if now is None:
            now = time.monotonic()
        key = (client, reason)
        seen = self._seen
        entry = seen.get(key)
        if entry is not None:
            if now - entry.since < self.window:
                entry.held += 1
                return None
            held = entry.held
            del seen[key]  # re-inserted at the end: the dict stays in let-through order
        else:
            held = 0
            if len(seen) >= self.max_keys:
                self._make_room(now)
        seen[key] = _Seen(now)
        return held

    def __len__(self) -> int:
        return len(self._seen)

    def _make_room(self, now: float) -> None:
        """Drops the expired keys (all at the front), or else the oldest one."""
        seen = self._seen
        expired = []
        for key, entry in seen.items():
            if now - entry.since < self.window:
                break
            expired.append(key)
        for key in expired:
            del seen[key]
        if len(seen) >= self.max_keys:
            del seen[next(iter(seen))]
