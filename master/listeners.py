"""Listening sockets: one SO_REUSEPORT socket per worker slot and listener address.

The master binds them all and keeps them open for its whole life. Each worker accepts on the
sockets of its own slot, so the kernel spreads new connections evenly over the workers; a
worker that dies leaves its sockets open here, and its replacement accepts what waited in their
queues. Closing a socket of a reuseport group drops the connections waiting in its queue, so a
socket is closed only when the master stops.
"""

from __future__ import annotations

import socket

from shared.address import format_address, parse_address
from shared.config import ListenerConfig


class ListenError(Exception):
    """A listener address could not be bound."""


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.set_inheritable(False)
    except OSError:
        sock.close()
        raise
    return sock


def _check_free(host: str, port: int, address: str) -> None:
    """Refuses an address another process listens on. SO_REUSEPORT would let this master join
    that process's sockets (any of the same user's), so a plain bind is tried first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ListenError(f"cannot listen on {address}: {e.strerror}") from e


class Listener:
    """The sockets of one configured address, one per worker slot."""

    def __init__(self, config: ListenerConfig) -> None:
        self.config = config
        self.host, self.port = parse_address(config.address)
        self.sockets: list[socket.socket] = []

    @property
    def bound_address(self) -> str:
        """The address with the port actually bound (differs from the config for port 0)."""
        return format_address(self.host, self.port)

    def ensure_slots(self, count: int) -> None:
        """Binds sockets until there is one per slot up to ``count``."""
        if not self.sockets and self.port != 0:
            _check_free(self.host, self.port, self.config.address)
        while len(self.sockets) < count:
            try:
                sock = _bind(self.host, self.port, self.config.backlog)
            except OSError as e:
                raise ListenError(f"cannot listen on {self.config.address}: {e.strerror}") from e
            if self.port == 0:
                # Port 0: the first socket picks a port; the other slots join it.
                self.port = sock.getsockname()[1]
            self.sockets.append(sock)

    @classmethod
    def adopt(cls, config: ListenerConfig, fds: list[int]) -> Listener:
        """A listener made of sockets handed over by an old master (binary upgrade)."""
        listener = cls(config)
        listener.sockets = [socket.socket(fileno=fd) for fd in fds]
        for sock in listener.sockets:
            sock.set_inheritable(False)
        if listener.sockets:
            listener.port = listener.sockets[0].getsockname()[1]
        return listener

    def sockets_for(self, slot: int, workers: int) -> list[socket.socket]:
        """The sockets a worker in ``slot`` of ``workers`` accepts on.

        There may be more sockets than workers (after the worker count went down): a socket is
        never closed while the master runs, so each one is served by slot ``index % workers``.
        """
        return [sock for i, sock in enumerate(self.sockets) if i % workers == slot]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


def bind_all(configs: list[ListenerConfig], slots: int) -> list[Listener]:
    """Binds every listener for ``slots`` workers; on failure closes what it bound."""
    listeners: list[Listener] = []
    try:
        for config in configs:
            listener = Listener(config)
            listeners.append(listener)
            listener.ensure_slots(slots)
    except ListenError:
        for listener in listeners:
            listener.close()
        raise
    return listeners
