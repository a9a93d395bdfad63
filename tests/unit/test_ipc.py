"""shared.ipc: the msgpack codec of master-worker messages and the Channel over a socketpair."""

from __future__ import annotations

import array
import os
import socket
import struct
import typing
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from shared.ipc import (
    MAX_FRAME,
    MESSAGE_TYPES,
    AppFailed,
    Boot,
    Channel,
    ChannelClosed,
    Drain,
    Heartbeat,
    Message,
    Ready,
    decode,
    encode,
)

SAMPLES: list[Message] = [
    Boot(
        slot=2,
        generation=5,
        source="/etc/tenaya.yaml",
        config={"server": {"workers": 2}, "listeners": [{"address": "127.0.0.1:6188"}]},
    ),
    Drain(grace_seconds=2.5),
    Ready(pid=4242),
    AppFailed(reason="cannot import 'gateway': ModuleNotFoundError"),
    Heartbeat(requests=10, connections=3, active_requests=1),
]


def open_fds() -> int:
    """How many descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    """True when ``fd`` is an open descriptor."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def body(mapping: dict[str, object]) -> bytes:
    """A frame body as another version of Tenaya might send it."""
    return msgpack.packb(mapping, use_bin_type=True)


def frame(mapping: dict[str, object]) -> bytes:
    """A whole frame (length prefix and body) for ``mapping``."""
    data = body(mapping)
    return struct.pack(">I", len(data)) + data


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, Channel]]:
    """A raw socket (to write any bytes) and a Channel on the other end."""
    a, b = socket.socketpair()
    channel = Channel(b)
    yield a, channel
    a.close()
    channel.close()


@pytest.fixture
def channels() -> Iterator[tuple[Channel, Channel]]:
    """Two Channels on the ends of one socketpair."""
    a, b = socket.socketpair()
    ca, cb = Channel(a), Channel(b)
    yield ca, cb
    ca.close()
    cb.close()


# -- codec ---------------------------------------------------------------------------------


def non_default(cls: type[Message]) -> Message:
    """A message of ``cls`` with every field set to a value other than its default."""
    values: dict[str, Any] = {}
    for name, tp in typing.get_type_hints(cls).items():
        if name in ("fds", "TYPE"):
            continue
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is bool:
            values[name] = not getattr(cls(), name)
        elif tp is int:
            values[name] = 7
        elif tp is float:
            values[name] = 2.5
        elif tp is str:
            values[name] = "value \u00e9"
        elif tp is bytes:
            values[name] = b"\x00key\xff"
        elif origin is list:
            samples = {int: [3, 4], bytes: [b"\x00a", b"b\xff"]}
            values[name] = samples.get(args[0], ["a", "b"])
        elif origin is dict:
            values[name] = {"nested": {"list": [1, "two"], "none": None}}
        else:
            raise AssertionError(f"{cls.__name__}.{name}: no sample value for {tp!r}")
    return cls(**values)


@pytest.mark.parametrize("cls", MESSAGE_TYPES.values(), ids=lambda c: c.TYPE)
def test_round_trip_every_field(cls: type[Message]) -> None:
    """Every message type carries every one of its fields across the codec."""
    msg = non_default(cls)
    got = decode(encode(msg)[4:], [])
    assert type(got) is cls
    assert got == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg: Message) -> None:
    """decode(encode(msg)) gives an equal message of the same type; the prefix is the length."""
    data = encode(msg)
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    fds: list[int] = []
    assert decode(data[4:], fds) == msg
    assert type(decode(data[4:], fds)) is type(msg)


@pytest.mark.parametrize("cls", MESSAGE_TYPES.values(), ids=lambda c: c.TYPE)
def test_round_trip_defaults(cls: type[Message]) -> None:
    """Every message type round-trips with its default field values."""
    assert decode(encode(cls())[4:], []) == cls()


def test_wire_format() -> None:
    """A frame is a 4-byte big-endian length and a msgpack map with the type under "t"."""
    assert encode(Ready(pid=7)) == b"\x00\x00\x00\x0e\x82\xa1t\xa5ready\xa3pid\x07"


def test_fds_counted_not_encoded() -> None:
    """A message with descriptors says how many in "nfds"; the numbers themselves stay local."""
    msg = Ready(pid=1, fds=(7, 9))
    assert msgpack.unpackb(encode(msg)[4:]) == {"t": "ready", "pid": 1, "nfds": 2}


def test_decode_takes_its_fds_from_the_front() -> None:
    """Each message takes as many descriptors as it announced, in order."""
    fds = [10, 11, 12]
    first = decode(body({"t": "ready", "pid": 1, "nfds": 2}), fds)
    second = decode(body({"t": "drain", "grace_seconds": 1.0, "nfds": 1}), fds)
    assert first is not None and first.fds == (10, 11)
    assert second is not None and second.fds == (12,)
    assert fds == []


def test_unknown_fields_ignored() -> None:
    """Fields this side does not know (from a newer peer) are dropped, the rest kept."""
    msg = decode(body({"t": "heartbeat", "requests": 5, "cpu_percent": 12.5}), [])
    assert msg == Heartbeat(requests=5)


def test_missing_fields_take_defaults() -> None:
    """Fields an older peer does not send take their defaults."""
    assert decode(body({"t": "heartbeat"}), []) == Heartbeat()


def test_unknown_type_ignored_and_its_fds_closed() -> None:
    """A message type this side does not know is dropped, and the descriptors it carried are
    closed (the ones after it are left for the next message)."""
    r, w = os.pipe()
    try:
        fds = [r, w]
        assert decode(body({"t": "reload_certs", "paths": ["/a"], "nfds": 1}), fds) is None
        assert fds == [w]
        assert not is_open(r)
        assert is_open(w)
    finally:
        os.close(w)


def test_message_without_type_ignored() -> None:
    """A frame without a "t" is dropped."""
    assert decode(body({"pid": 1}), []) is None


# -- Channel -----------------------------------------------------------------------------


def test_send_and_read(channels: tuple[Channel, Channel]) -> None:
    """What one end sends, the other reads, in order, both ways."""
    ca, cb = channels
    for msg in SAMPLES:
        ca.send(msg)
    assert cb.read() == SAMPLES
    cb.send(Ready(pid=9))
    assert ca.read() == [Ready(pid=9)]
    assert cb.read() == []


def test_frame_split_byte_by_byte(pair: tuple[socket.socket, Channel]) -> None:
    """A frame arriving one byte at a time is decoded once its last byte is in."""
    raw, channel = pair
    msg = SAMPLES[0]
    data = encode(msg)
    for i, byte in enumerate(data):
        raw.sendall(bytes([byte]))
        got = channel.read()
        if i < len(data) - 1:
            assert got == []
    assert got == [msg]


def test_several_messages_in_one_read(pair: tuple[socket.socket, Channel]) -> None:
    """Several frames arriving together are all returned by one read, in order."""
    raw, channel = pair
    raw.sendall(b"".join(encode(m) for m in SAMPLES) + encode(Ready(pid=1))[:6])
    assert channel.read() == SAMPLES
    raw.sendall(encode(Ready(pid=1))[6:])
    assert channel.read() == [Ready(pid=1)]


def test_unknown_type_skipped_in_stream(pair: tuple[socket.socket, Channel]) -> None:
    """An unknown message between known ones is skipped; the stream goes on."""
    raw, channel = pair
    raw.sendall(encode(Ready(pid=1)) + frame({"t": "future", "x": 1}) + encode(Drain()))
    assert channel.read() == [Ready(pid=1), Drain()]


def test_large_message(channels: tuple[Channel, Channel]) -> None:
    """A message larger than the socket buffer and the read size arrives whole."""
    ca, cb = channels
    msg = AppFailed(reason="x" * 1_000_000)
    ca.send(msg)
    got: list[Message] = []
    for _ in range(10_000):
        got += cb.read()
        if got:
            break
        ca.flush()
    assert got == [msg]
    assert not ca.wants_write


def test_descriptors_arrive_working(channels: tuple[Channel, Channel]) -> None:
    """Descriptors sent with a message arrive as working descriptors of the same files."""
    ca, cb = channels
    r, w = os.pipe()
    try:
        ca.send(Boot(slot=1, fds=(r, w)))
        (msg,) = cb.read()
        assert msg == Boot(slot=1)
        got_r, got_w = msg.fds
        assert {got_r, got_w}.isdisjoint({r, w})
        os.write(w, b"ping")
        assert os.read(got_r, 4) == b"ping"
        os.write(got_w, b"pong")
        assert os.read(r, 4) == b"pong"
        os.close(got_r)
        os.close(got_w)
    finally:
        os.close(r)
        os.close(w)


def test_descriptors_follow_their_message(channels: tuple[Channel, Channel]) -> None:
    """With messages with and without descriptors interleaved, each gets its own."""
    ca, cb = channels
    pipes = [os.pipe() for _ in range(2)]
    try:
        ca.send(Ready(pid=1))
        ca.send(Boot(slot=0, fds=(pipes[0][0],)))
        ca.send(Heartbeat(requests=1))
        ca.send(Boot(slot=1, fds=(pipes[1][0],)))
        # The kernel ends a read at a message carrying descriptors; the rest comes next read.
        msgs: list[Message] = []
        for _ in range(10):
            msgs += cb.read()
        assert msgs == [Ready(pid=1), Boot(slot=0), Heartbeat(requests=1), Boot(slot=1)]
        assert msgs[0].fds == () and msgs[2].fds == ()
        for msg, (_, w) in zip((msgs[1], msgs[3]), pipes, strict=True):
            assert isinstance(msg, Boot) and len(msg.fds) == 1
            os.write(w, f"slot {msg.slot}".encode())
            assert os.read(msg.fds[0], 16) == f"slot {msg.slot}".encode()
            os.close(msg.fds[0])
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_no_descriptor_leak() -> None:
    """Sending, receiving and closing leaves exactly the descriptors open that were before."""
    before = open_fds()
    a, b = socket.socketpair()
    ca, cb = Channel(a), Channel(b)
    r, w = os.pipe()
    for _ in range(5):
        ca.send(Boot(fds=(r, w)))
        ca.send(Ready())
        for msg in cb.read():
            for fd in msg.fds:
                os.close(fd)
    os.close(r)
    os.close(w)
    ca.close()
    cb.close()
    assert open_fds() == before


def test_unknown_type_with_descriptors_does_not_leak(pair: tuple[socket.socket, Channel]) -> None:
    """Descriptors riding on a message type the reader does not know are closed by it."""
    raw, channel = pair
    before = open_fds()
    r, w = os.pipe()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))]
    raw.sendmsg([frame({"t": "future", "nfds": 2}) + encode(Ready(pid=3))], anc)
    os.close(r)
    os.close(w)
    assert channel.read() == [Ready(pid=3)]
    assert open_fds() == before


def test_close_releases_unclaimed_descriptors(pair: tuple[socket.socket, Channel]) -> None:
    """Descriptors received with an incomplete frame are closed when the channel closes."""
    raw, channel = pair
    before = open_fds()
    r, w = os.pipe()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))]
    raw.sendmsg([encode(Boot(fds=(r,)))[:3]], anc)
    os.close(r)
    os.close(w)
    assert channel.read() == []
    assert open_fds() == before + 1
    channel.close()
    assert open_fds() == before - 1  # the channel's own socket is gone too


def test_channel_closed_at_eof(pair: tuple[socket.socket, Channel]) -> None:
    """Messages sent before the peer closed are read; then read raises ChannelClosed."""
    raw, channel = pair
    raw.sendall(encode(Ready(pid=5)))
    raw.close()
    assert channel.read() == [Ready(pid=5)]
    with pytest.raises(ChannelClosed):
        channel.read()
    assert channel.closed


def test_send_after_peer_closed(channels: tuple[Channel, Channel]) -> None:
    """Sending to a channel whose peer is gone raises ChannelClosed."""
    ca, cb = channels
    cb.close()
    with pytest.raises(ChannelClosed):
        ca.send(Ready())
    assert ca.closed
    with pytest.raises(ChannelClosed):
        ca.send(Ready())


def test_oversized_frame_refused(pair: tuple[socket.socket, Channel]) -> None:
    """A length over MAX_FRAME means a corrupt stream: the channel closes itself."""
    raw, channel = pair
    raw.sendall(struct.pack(">I", MAX_FRAME + 1) + b"\x00" * 16)
    with pytest.raises(ChannelClosed, match=f"frame of {MAX_FRAME + 1} bytes"):
        channel.read()
    assert channel.closed


def test_frame_of_max_size_is_awaited(pair: tuple[socket.socket, Channel]) -> None:
    """A length of exactly MAX_FRAME is allowed: the channel waits for the rest."""
    raw, channel = pair
    raw.sendall(struct.pack(">I", MAX_FRAME) + b"\x80")
    assert channel.read() == []
    assert not channel.closed
