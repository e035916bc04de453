"""Fuzz the C fast path (remote_hw/net/_fastio.c) against the codec.

The C may only *recognise* the common frames, never judge input: ``recv_io`` returns
fields only for a read that is exactly one valid IO_REQUEST (and then the codec's
fields), else the very bytes it read; ``request`` returns ``(status, value)`` only
for exactly one valid FEEDBACK to its own request id (and then the codec's values),
else the bytes. Mutated frames go through a socket pair to check both, byte for byte.
"""

from __future__ import annotations

import random
import socket
import threading

import pytest

from remote_hw.net import fastio
from remote_hw.protocol import ProtocolError, codec
from remote_hw.protocol.messages import HEADER_SIZE, MsgType

from mutate import CLIENT_FRAMES, SERVER_FRAMES, Mutator, budget, seconds, seed

pytestmark = pytest.mark.fastio


@pytest.fixture
def pair():
    if not fastio.enabled():
        pytest.skip(f"the C fast path is off here: {fastio.status()[1]}")
    a, b = socket.socketpair()
    b.settimeout(2)
    yield a, b
    a.close()
    b.close()


def _valid(frame: bytes, t: MsgType) -> object | None:
    if len(frame) < HEADER_SIZE or frame[2] != t or frame[:2] != b"RH" or frame[3]:
        return None
    if int.from_bytes(frame[4:8], "little") != len(frame) - HEADER_SIZE:
        return None
    try:
        return codec.decode_payload(t, frame[HEADER_SIZE:])
    except ProtocolError:
        return None


def test_recv_io_recognises_only_valid_io_requests(pair):
    a, b = pair
    rng = random.Random(seed() + 2)
    io_frames = [f for f in CLIENT_FRAMES if f[2] == MsgType.IO_REQUEST]
    mut = Mutator(rng, io_frames + CLIENT_FRAMES)
    recognised = 0
    for _ in budget(seconds() / 2):
        frame = mut.frame()
        if not frame:
            continue
        a.sendall(frame)
        got = fastio.recv_io(b.fileno())
        if isinstance(got, tuple):
            recognised += 1
            msg = _valid(frame, MsgType.IO_REQUEST)
            assert msg is not None, (seed(), frame.hex(), got)
            assert tuple(got) == codec.io_request_fields(frame, HEADER_SIZE, len(frame))
        else:
            rest = got or b""
            while len(rest) < len(frame):  # the C read once; take the remainder
                rest += b.recv(65536)
            assert rest == frame, (seed(), frame.hex(), got)
            if _valid(frame, MsgType.IO_REQUEST) is not None:
                # A valid frame the C passed over: only because an id was new to it.
                # The codec learns it now (as a server's Connection would).
                codec.decode_payload(MsgType.IO_REQUEST, frame[HEADER_SIZE:])
    assert recognised


def test_request_takes_only_its_own_valid_feedback(pair):
    a, b = pair
    rng = random.Random(seed() + 3)
    fb_frames = [f for f in SERVER_FRAMES if f[2] == MsgType.FEEDBACK]
    mut = Mutator(rng, fb_frames + SERVER_FRAMES)
    codec.encode_io_request(1, 1, 0, 7, 0, 0, 1, 0, 0, "", "uart0")  # ids known to the C
    lock = threading.Lock()
    taken = 0
    for _ in budget(seconds() / 2):
        frame = mut.frame()
        if not frame:
            continue
        rid = int.from_bytes(frame[8:16], "little") if len(frame) >= 16 else 1
        if rng.random() < 0.3:
            rid ^= 1  # someone else's answer
        b.sendall(frame)  # queued before the request, so the one read finds it
        got = fastio.request(a.fileno(), lock, rid, 1, 0, 7, 0, 0, 1, 0, 0, "", "uart0")
        sent = b.recv(65536)
        assert sent == codec.encode_io_request(rid, 1, 0, 7, 0, 0, 1, 0, 0, "", "uart0")
        msg = _valid(frame, MsgType.FEEDBACK)
        if isinstance(got, tuple):
            taken += 1
            assert msg is not None and msg.request_id == rid, (seed(), frame.hex(), got)
            assert tuple(got) == (msg.status, msg.data)
        else:
            rest = got or b""
            a.settimeout(2)
            while len(rest) < len(frame):
                rest += a.recv(65536)
            a.settimeout(None)
            assert rest == frame, (seed(), frame.hex(), got)
            assert msg is None or msg.request_id != rid or len(rest) != len(frame)
    assert taken
