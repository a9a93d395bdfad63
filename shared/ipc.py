"""Messages between the master and its workers, and how they travel.

Every master-worker channel is one end of a Unix-domain stream socketpair made at spawn.
A frame is a 4-byte big-endian length and a msgpack map ``{"t": NAME, field: value, ...}``.
A message that carries file descriptors sends them with SCM_RIGHTS in the same ``sendmsg`` as
its first byte, and says how many in its ``nfds`` field, so the reader can match descriptors to
messages whatever way the stream is cut. Both sides ignore fields and message types they do not
know, so an old master and a new one can talk.

Every message type is declared here, as a frozen dataclass, with its fields.
"""

from __future__ import annotations

import array
import dataclasses
import errno
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

_LEN = struct.Struct(">I")
#: Largest frame accepted; a larger length means a corrupt stream.
MAX_FRAME = 16 * 1024 * 1024
#: Most descriptors one recvmsg accepts.
MAX_FDS_PER_READ = 64
#: Most descriptors a sender puts in one message.
MAX_FDS_PER_MESSAGE = 32


@dataclass(frozen=True, slots=True)
class Message:
    """Base of all messages; ``fds`` are the descriptors travelling with it (not encoded)."""

    TYPE: ClassVar[str] = ""
    fds: tuple[int, ...] = field(default=(), kw_only=True, compare=False)


# master -> worker


@dataclass(frozen=True, slots=True)
class Boot(Message):
    """First message to a new worker: who it is and the config it runs."""

    TYPE = "boot"
    #: The worker's slot: which listening socket(s) it accepts on.
    slot: int = 0
    #: Generation of workers this one belongs to (bumped on each reload).
    generation: int = 0
    #: The validated config mapping and where it came from.
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    #: The inherited descriptor of the shared-memory pool index; -1 without a broker.
    pool_index_fd: int = -1
    #: The inherited descriptor of the generation's balance table (``shared.shm.balance``),
    #: whose row ``slot`` the worker writes; -1 without one.
    balance_fd: int = -1


@dataclass(frozen=True, slots=True)
class Drain(Message):
    """Stop accepting, finish in-flight requests within ``grace_seconds``, then exit 0."""

    TYPE = "drain"
    grace_seconds: float = 30.0


# worker -> master


@dataclass(frozen=True, slots=True)
class Ready(Message):
    """The worker loaded the app and accepts connections."""

    TYPE = "ready"
    pid: int = 0


@dataclass(frozen=True, slots=True)
class AppFailed(Message):
    """The worker could not load the app; it exits with ``EXIT_APP_LOAD`` next."""

    TYPE = "app_failed"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Sent every second; also carries the worker's live counters."""

    TYPE = "heartbeat"
    requests: int = 0
    connections: int = 0
    active_requests: int = 0
    #: Requests sent upstream, and how their connections were had.
    upstream_requests: int = 0
    connections_created: int = 0
    reused_local: int = 0
    reused_shared: int = 0
    donated: int = 0
    #: The worker holds ``server.max_connections`` and does not accept for now.
    accept_paused: bool = False
    #: How many times it stopped accepting at that limit since it started.
    accept_pauses: int = 0


# pool broker (worker <-> master; old master -> new master)


@dataclass(frozen=True, slots=True)
class Donate(Message):
    """Idle upstream connections given to the broker: ``fds[i]`` is a connection for the
    pool key ``keys[i]`` (msgpack bytes of the key). The sender closes its own descriptors."""

    TYPE = "donate"
    keys: list[bytes] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Borrow(Message):
    """A worker asks for an idle connection for ``key``; answered by :class:`Lend`."""

    TYPE = "borrow"
    request: int = 0
    key: bytes = b""


@dataclass(frozen=True, slots=True)
class Lend(Message):
    """The broker's answer to :class:`Borrow` number ``request``: one descriptor, or none."""

    TYPE = "lend"
    request: int = 0


@dataclass(frozen=True, slots=True)
class ReopenLogs(Message):
    """Reopen the access and error log files (after logrotate moved them).

    When the workers run as ``server.user``, which may not be allowed to open the files, the
    master opens them and sends them in ``fds``: ``fds[i]`` is the file at ``paths[i]``
    (absolute). A file not sent is reopened by the worker by its path."""

    TYPE = "reopen_logs"
    paths: list[str] = field(default_factory=list)


# old master <-> new master (binary upgrade)


@dataclass(frozen=True, slots=True)
class Handover(Message):
    """From the old master to the new one: every listening socket, in ``fds``.

    ``addresses[i]`` is the configured address of listener ``i`` and ``counts[i]`` how many of
    the descriptors (one per worker slot, in order) belong to it.
    """

    TYPE = "handover"
    addresses: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    #: The demo origins' process, which the new master adopts if it runs the same
    #: ``demo_origins`` (0: none).
    demo_pid: int = 0
    demo_origins: list[str] = field(default_factory=list)
    #: The fleet's balancing turn of each upstream, by name, when the listeners were sent: the
    #: new master's rotation goes on from there.
    balance_turns: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UpgradeReady(Message):
    """From the new master: its workers serve; the old master may drain and exit."""

    TYPE = "upgrade_ready"
    pid: int = 0
    #: True when the new master adopted the old one's demo origins: the old master leaves
    #: them running when it exits.
    demo_adopted: bool = False


# control socket (python -m master status / reload / ...)


@dataclass(frozen=True, slots=True)
class ControlRequest(Message):
    """A command for the master: ``status``, ``reload``, ``upgrade``, ``reopen`` or ``stop``."""

    TYPE = "control_request"
    command: str = ""


@dataclass(frozen=True, slots=True)
class ControlReply(Message):
    """The master's answer: ``ok`` and, for ``status``, the numbers in ``data``."""

    TYPE = "control_reply"
    ok: bool = True
    error: str = ""
    data: dict[str, Any] = field(default_factory=dict)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Boot,
        Drain,
        Ready,
        AppFailed,
        Heartbeat,
        ReopenLogs,
        Handover,
        UpgradeReady,
        ControlRequest,
        ControlReply,
        Donate,
        Borrow,
        Lend,
    )
}

#: Environment variable naming the inherited descriptor of the upgrade channel; a master
#: started with it takes its listeners from the old master instead of binding them.
UPGRADE_FD_ENV = "TENAYA_UPGRADE_FD"

#: Exit codes with fixed meanings, which the master acts on.
EXIT_OK = 0
#: The worker failed before it could serve (bad descriptors, lost channel, ...).
EXIT_BOOT = 3
#: The app could not be imported or built: respawning would fail the same way.
EXIT_APP_LOAD = 4


def encode(msg: Message) -> bytes:
    """One frame for ``msg`` (without its descriptors)."""
    body: dict[str, Any] = {"t": msg.TYPE}
    for f in dataclasses.fields(msg):
        if f.name != "fds":
            body[f.name] = getattr(msg, f.name)
    if msg.fds:
        body["nfds"] = len(msg.fds)
    data = msgpack.packb(body, use_bin_type=True)
    return _LEN.pack(len(data)) + data


def decode(body: bytes, fds: list[int]) -> Message | None:
    """The message in one frame's body; takes its descriptors from the front of ``fds``.

    Returns None for a message type this side does not know (its descriptors are closed).
    """
    data = msgpack.unpackb(body, raw=False)
    nfds = int(data.pop("nfds", 0))
    mine = tuple(fds[:nfds])
    del fds[:nfds]
    cls = MESSAGE_TYPES.get(data.pop("t", None))
    if cls is None:
        for fd in mine:
            os.close(fd)
        return None
    names = {f.name for f in dataclasses.fields(cls)} - {"fds"}
    return cls(**{k: v for k, v in data.items() if k in names}, fds=mine)


class ChannelClosed(Exception):
    """The other end of the channel is gone."""


class Channel:
    """A non-blocking framed channel over a Unix-domain stream socket.

    :meth:`send` never blocks: what the socket does not take now waits in a buffer that
    :meth:`flush` writes when the socket is writable. :meth:`read` returns the messages that
    arrived completely.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._in = bytearray()
        self._in_fds: list[int] = []
        self._out = bytearray()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def send(self, msg: Message) -> None:
        """Queues ``msg``; its descriptors are sent now or the message is refused.

        The caller keeps its descriptors: the kernel duplicates them into the message.
        """
        if self.closed:
            raise ChannelClosed
        frame = encode(msg)
        if msg.fds:
            # Descriptors must ride with the frame's first byte, so flush what waits first.
            self.flush()
            if self._out:
                raise BlockingIOError(errno.EAGAIN, "channel busy; retry the message later")
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds))]
            try:
                sent = self.sock.sendmsg([frame], anc)
            except (BrokenPipeError, ConnectionResetError) as e:
                self.closed = True
                raise ChannelClosed from e
            self._out += frame[sent:]
            return
        self._out += frame
        self.flush()

    def flush(self) -> None:
        """Writes what the socket takes now."""
        while self._out and not self.closed:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except (BrokenPipeError, ConnectionResetError) as e:
                self.closed = True
                raise ChannelClosed from e
            del self._out[:sent]

    def read(self) -> list[Message]:
        """Reads until the socket has nothing more; returns the complete messages.

        Messages that arrived before the end of the stream are returned first; the next call
        raises :class:`ChannelClosed`.
        """
        eof = False
        while not self.closed:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, MAX_FDS_PER_READ)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                eof = True
                break
            self._in_fds.extend(fds)
            if not data:
                eof = True
                break
            self._in += data
        out: list[Message] = []
        while len(self._in) >= 4:
            (n,) = _LEN.unpack_from(self._in)
            if n > MAX_FRAME:
                self.close()
                raise ChannelClosed(f"frame of {n} bytes")
            if len(self._in) < 4 + n:
                break
            body = bytes(self._in[4 : 4 + n])
            del self._in[: 4 + n]
            msg = decode(body, self._in_fds)
            if msg is not None:
                out.append(msg)
        if (eof or self.closed) and not out:
            self.close()
            raise ChannelClosed
        return out

    def close(self) -> None:
        """Closes the socket and any descriptors received but not yet claimed."""
        self.closed = True
        for fd in self._in_fds:
            os.close(fd)
        self._in_fds.clear()
        try:
            self.sock.close()
        except OSError:
            pass
