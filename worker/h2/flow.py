"""HTTP/2 flow control on the sending side, shared by the downstream and upstream streams."""

from __future__ import annotations

from typing import Protocol


class FlowConnection(Protocol):
    """What a sender needs of a connection: ``h2``'s ``H2Connection`` (upstreams) and the
    downstream codec (worker/h2/codec.py) both have it."""

    @property
    def max_outbound_frame_size(self) -> int: ...

    def local_flow_control_window(self, stream_id: int) -> int: ...

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...


class WindowedSender:
    """Data for one stream, sent as far as its flow-control window allows; the rest waits,
    in order, until :meth:`resume` after a WINDOW_UPDATE."""

    __slots__ = ("conn", "stream_id", "pending")

    def __init__(self, conn: FlowConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.pending: list[bytes] = []

    @property
    def blocked(self) -> bool:
        """True while data waits for the window."""
        return bool(self.pending)

    def send(self, data: bytes) -> bool:
        """Sends ``data`` or queues what the window does not take; True if all went out."""
        if self.pending:
            self.pending.append(data)
            return False
        rest = self._push(data)
        if rest:
            self.pending.append(rest)
            return False
        return True

    def send_last(self, data: bytes) -> bool:
        """Sends ``data`` as the stream's last frame (END_STREAM) if nothing waits and it fits
        the window in one frame; False (nothing sent) otherwise."""
        conn = self.conn
        if self.pending or len(data) > min(
            conn.local_flow_control_window(self.stream_id), conn.max_outbound_frame_size
        ):
            return False
        conn.send_data(self.stream_id, data, end_stream=True)
        return True

    def resume(self) -> bool:
        """Sends what waited; True once nothing waits any more."""
        while self.pending:
            rest = self._push(self.pending[0])
            if rest:
                self.pending[0] = rest
                return False
            self.pending.pop(0)
        return True

    def clear(self) -> None:
        self.pending.clear()

    def _push(self, data: bytes) -> bytes:
        conn = self.conn
        sid = self.stream_id
        while data:
            n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if n <= 0:
                return data
            conn.send_data(sid, data[:n])
            data = data[n:]
        return b""
