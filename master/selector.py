"""The master loop's selector: every watched file descriptor carries its own handler.

Whoever owns a descriptor registers it with the function that deals with it being readable
(a worker's channel, the control socket and each of its connections, an idle upstream
connection in the broker, the upgrade channels, an adopted child's pidfd, the wake-up pipe).
The loop calls ``key.data(key, mask)`` for each ready descriptor and knows nothing about what
they are, so a new kind of descriptor (a health prober's results pipe, say) is one
:meth:`Selector.register` call in the code that owns it, and no change to the loop.
"""

from __future__ import annotations

import selectors
import socket
from collections.abc import Callable
from typing import TypeAlias

#: What is registered with a descriptor: called with the selector key and the ready events
#: (``selectors.EVENT_READ``) each time the descriptor is ready. It must not block.
FdHandler: TypeAlias = Callable[[selectors.SelectorKey, int], None]

#: What may be registered: a socket, or a raw descriptor (a pipe, a pidfd).
FileObj: TypeAlias = socket.socket | int


class Selector:
    """A ``selectors.DefaultSelector`` whose registrations are typed handlers."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()

    def register(self, fileobj: FileObj, handler: FdHandler) -> None:
        """Watches ``fileobj`` for reading; ``handler`` runs each time it is readable. Raises
        ``KeyError`` when it is registered already."""
        self._sel.register(fileobj, selectors.EVENT_READ, handler)

    def unregister(self, fileobj: FileObj) -> None:
        """Stops watching ``fileobj``; does nothing when it is not watched (or closed)."""
        try:
            self._sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def dispatch(self, timeout: float) -> None:
        """Waits up to ``timeout`` seconds for descriptors to be ready and runs each one's
        handler, in the order the system reported them. A descriptor that an earlier handler
        of the same round unregistered (or closed) still gets its handler called: a handler
        must cope with that."""
        for key, mask in self._sel.select(timeout):
            handler: FdHandler = key.data
            handler(key, mask)
