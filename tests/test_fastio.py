"""The C fast path (remote_hw.net._fastio) against the Python codec, on real sockets.

The C recognises only the common frames and hands everything else back as bytes, so
these tests check both halves: that what it recognises it decodes and encodes exactly
as the codec does (property tests), and that everything else comes back untouched.
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remote_hw.net import fastio
from remote_hw.protocol import FeedbackFields, IoRequestFields, codec
from remote_hw.protocol.messages import AccessKind, Direction, MsgType, Status

# Skipped (with the reason) where the extension is not built or disagrees with the
# codec; tests/test_environment.py fails instead, so a missing build is never quiet.
pytestmark = pytest.mark.fastio

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-",
              min_size=1, max_size=64)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    # A receive timeout, as the real transports set (Transport's read slice).
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200_000))
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200_000))
    yield a, b
    a.close()
    b.close()


def _learn(server_id: str, device: str) -> None:
    """Put ids in the codec's caches the way both ends learn them (one slow pass)."""
    # The caches are bounded and start over when full, so the second id can evict the
    # first; a second pass then finds room for both.
    for _ in range(2):
        f = codec.encode_io_request(1, 1, 0, 0, 0, 0, 1, 0, 0, server_id, device)
        codec.decode_payload(MsgType.IO_REQUEST, f[8:])


@st.composite
def io_fields(draw) -> IoRequestFields:
    """Valid IO_REQUEST fields in wire order, with ids the codec has already seen."""
    size = draw(st.sampled_from([1, 2, 4, 8]))
    sid, did = draw(st.one_of(st.just(""), ids)), draw(ids)
    _learn(sid, did)
    return IoRequestFields(
        draw(u64), draw(u32), draw(u32), draw(u64), draw(st.integers(0, 2**(8 * size) - 1)),
        draw(st.sampled_from(list(AccessKind))), size, draw(st.sampled_from(list(Direction))),
        draw(st.integers(0, 255)), sid, did)


@settings(max_examples=300, deadline=None)
@given(io_fields())
def test_recv_io_matches_the_codec(fields):
    frame = codec.encode_io_request(*fields)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame)
        got = fastio.recv_io(b.fileno())
    want = codec.io_request_fields(frame, 8, len(frame))
    # The same named tuple from both: callers read got.device_id, never got[10].
    assert type(got) is IoRequestFields and type(want) is IoRequestFields
    assert got == want == fields
    assert got._asdict() == fields._asdict()


@settings(max_examples=300, deadline=None)
@given(io_fields())
def test_request_encodes_as_the_codec(fields):
    rid, vm, cid, size, data = (fields.request_id, fields.vm_id, fields.client_id,
                                fields.size, fields.data)
    a, b = socket.socketpair()
    with a, b:
        b.sendall(codec.encode_feedback(rid, vm, cid, Status.OK, size, data))
        # The answer was queued first, so request() finds it right after sending.
        assert fastio.request(a.fileno(), threading.Lock(), *fields) == (Status.OK, data)
        assert b.recv(4096) == codec.encode_io_request(*fields)


@settings(max_examples=300, deadline=None)
@given(u64, u32, u32, st.sampled_from(list(Status)), st.sampled_from([0, 1, 2, 4, 8]), u64)
def test_send_feedback_encodes_as_the_codec(rid, vm, cid, status, size, raw):
    data = raw & ((1 << (8 * size)) - 1) if size else 0
    a, b = socket.socketpair()
    with a, b:
        assert fastio.send_feedback(a.fileno(), rid, vm, cid, int(status), size, data)
        assert b.recv(4096) == codec.encode_feedback(rid, vm, cid, status, size, data)


def _mutated(frame: bytes, at: int, value: int, cut: int) -> bytes:
    """A frame with one byte changed and possibly cut short."""
    b = bytearray(frame)
    b[at % len(b)] = value
    return bytes(b[:max(1, len(b) - cut)])


@settings(max_examples=500, deadline=None)
@given(io_fields(), st.integers(0, 600), st.integers(0, 255), st.sampled_from([0, 0, 0, 1, 9]))
def test_recv_io_on_damaged_frames_agrees_with_the_codec(fields, at, value, cut):
    # Whatever arrives, the C either hands it back untouched or decodes exactly what
    # the codec decodes from it: it never accepts a frame the codec would not.
    frame = _mutated(codec.encode_io_request(*fields), at, value, cut)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame)
        got = fastio.recv_io(b.fileno())
    if type(got) is IoRequestFields:
        hdr = struct.unpack_from("<2sBBI", frame)
        assert hdr == (b"RH", MsgType.IO_REQUEST, 0, len(frame) - 8)
        assert got == codec.io_request_fields(frame, 8, len(frame))
    else:
        assert got == frame


@settings(max_examples=500, deadline=None)
@given(u64, st.sampled_from(list(Status)), st.sampled_from([0, 1, 2, 4, 8]), u64,
       st.integers(0, 40), st.integers(0, 255), st.sampled_from([0, 0, 0, 1, 9]))
def test_request_on_damaged_answers_agrees_with_the_codec(rid, status, size, raw, at, value,
                                                          cut):
    _learn("", "uart0")
    data = raw & ((1 << (8 * size)) - 1) if size else 0
    answer = _mutated(codec.encode_feedback(rid, 1, 1, status, size, data), at, value, cut)
    a, b = socket.socketpair()
    with a, b:
        b.sendall(answer)
        got = fastio.request(a.fileno(), threading.Lock(), rid, 1, 0, 7, 0, 0, 1, 0, 0, "",
                             "uart0")
    if type(got) is tuple:
        f = codec.feedback_fields(answer, 8, len(answer))
        assert answer[:8] == b"RH\x04\x00" + struct.pack("<I", 28)
        assert type(f) is FeedbackFields
        assert f.request_id == rid and got == (f.status, f.data)
    else:
        assert got == answer


def _io(rid=5, device="uart0", size=1, data=0, sid="") -> bytes:
    _learn(sid or "x", device)
    return codec.encode_io_request(rid, 1, 0, 7, data, 0, size, 0, 0, sid, device)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: _io() + _io(6), id="two frames in one read"),
    pytest.param(lambda: _io()[:20], id="a partial frame"),
    pytest.param(lambda: codec.encode_feedback(1, 1, 1, 0, 0, 0), id="another type"),
    pytest.param(lambda: _io()[:4] + b"\x01" + _io()[5:], id="a wrong length"),
    pytest.param(lambda: _io()[:3] + b"\x01" + _io()[4:], id="flags set"),
    pytest.param(lambda: b"XX" + _io()[2:], id="bad magic"),
    pytest.param(lambda: _io()[:8 + 33] + b"\x03" + _io()[8 + 34:], id="size 3"),
    pytest.param(lambda: _io()[:8 + 32] + b"\x07" + _io()[8 + 33:], id="unknown kind"),
    pytest.param(lambda: _io()[:8 + 34] + b"\x02" + _io()[8 + 35:], id="unknown direction"),
    pytest.param(lambda: _io()[:-1] + b"!", id="an invalid id"),
    pytest.param(lambda: codec.encode_io_request(9, 1, 0, 0, 0, 0, 1, 0, 0, "",
                                                 "never-seen-before-id"), id="an unknown id"),
])
def test_recv_io_hands_back_what_it_does_not_recognise(pair, make):
    a, b = pair
    frame = make()
    a.sendall(frame)
    # Untouched bytes, for the Connection to decode or reject with the precise error.
    assert fastio.recv_io(b.fileno()) == frame


def test_recv_io_eof_and_timeout(pair):
    a, b = pair
    assert fastio.recv_io(b.fileno()) is None  # the receive timeout passed
    a.shutdown(socket.SHUT_WR)
    assert fastio.recv_io(b.fileno()) == b""
    with pytest.raises(OSError):
        fastio.recv_io(-1)


def test_request_hands_back_other_answers(pair):
    a, b = pair
    _learn("", "uart0")
    args = (1, 0, 7, 0, 0, 1, 0, 0, "", "uart0")
    interrupt = codec.encode(codec_interrupt())
    for answer, rid in ((codec.encode_feedback(41, 1, 1, 0, 1, 0x42), 42),  # not ours
                        (codec.encode_feedback(42, 1, 1, 0, 1, 0x42) + interrupt, 42),
                        (interrupt, 42)):
        b.sendall(answer)
        assert fastio.request(a.fileno(), threading.Lock(), rid, *args) == answer
        b.recv(4096)
    assert fastio.request(a.fileno(), threading.Lock(), 43, *args) is None  # timeout
    b.recv(4096)
    b.shutdown(socket.SHUT_WR)
    assert fastio.request(a.fileno(), threading.Lock(), 44, *args) == b""


def codec_interrupt():
    from remote_hw.protocol.messages import Interrupt
    return Interrupt(vm_id=1, client_id=1, line=4, level=1, device_id="uart0")


@pytest.mark.parametrize("args", [
    pytest.param((1, 0, 7, 0, 0, 1, 0, 0, "", "not-yet-encoded-id"), id="unknown device"),
    pytest.param((1, 0, 7, 0, 0, 1, 0, 0, "unknown-server-id", "uart0"), id="unknown server"),
    pytest.param((1, 0, 7, 0x100, 0, 1, 0, 0, "", "uart0"), id="data wider than size"),
    pytest.param((1, 0, 7, 0, 0, 3, 0, 0, "", "uart0"), id="size 3"),
    pytest.param((1, 0, 7, 0, 5, 1, 0, 0, "", "uart0"), id="unknown kind"),
    pytest.param((1, 0, 7, 0, 0, 1, 2, 0, "", "uart0"), id="unknown direction"),
    pytest.param((2**32, 0, 7, 0, 0, 1, 0, 0, "", "uart0"), id="vm id too large"),
    pytest.param((1, -1, 7, 0, 0, 1, 0, 0, "", "uart0"), id="negative client id"),
    pytest.param((1, 0, 7, 0, 0, 1, 0, 256, "", "uart0"), id="hops too large"),
    pytest.param((1, 0, 7.0, 0, 0, 1, 0, 0, "", "uart0"), id="a float"),
])
def test_request_leaves_unusual_values_to_the_codec(pair, args):
    a, b = pair
    _learn("", "uart0")
    # Nothing is sent: the caller takes the codec's path, which explains the problem.
    assert fastio.request(a.fileno(), threading.Lock(), 9, *args) is NotImplemented
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(4096)


@pytest.mark.parametrize("args", [
    pytest.param((1, 1, 1, 99, 1, 0), id="unknown status"),
    pytest.param((1, 1, 1, 0, 3, 0), id="size 3"),
    pytest.param((1, 1, 1, 0, 1, 0x100), id="data wider than size"),
    pytest.param((1, 2**32, 1, 0, 1, 0), id="vm id too large"),
    pytest.param((-1, 1, 1, 0, 1, 0), id="negative request id"),
])
def test_send_feedback_refuses_bad_values(pair, args):
    a, b = pair
    assert fastio.send_feedback(a.fileno(), *args) is False
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(4096)


def test_request_holds_the_write_lock(pair):
    a, b = pair
    _learn("", "uart0")
    lock = threading.Lock()
    seen = []

    class Spy:
        def acquire(self):
            seen.append("acquire")
            return lock.acquire()

        def release(self):
            seen.append(("release", lock.locked()))
            lock.release()

    b.sendall(codec.encode_feedback(3, 1, 1, 0, 1, 0x42))
    assert fastio.request(a.fileno(), Spy(), 3, 1, 0, 7, 0, 0, 1, 0, 0, "", "uart0") == (0, 0x42)
    assert seen == ["acquire", ("release", True)] and not lock.locked()


def test_version_says_whether_it_is_in_use():
    import os
    import subprocess
    import sys
    root = str(__import__("pathlib").Path(__file__).parent.parent)
    for env, want in (({}, "(C fast path: on)"),
                      ({"REMOTE_HW_FASTIO": "0"},
                       "(C fast path: off, disabled by REMOTE_HW_FASTIO=0)")):
        out = subprocess.run([sys.executable, "-m", "remote_hw.cli", "--version"],
                             capture_output=True, text=True, cwd=root,
                             env={**os.environ, **env})
        assert out.returncode == 0 and out.stdout.strip().endswith(want), out


@settings(max_examples=100, deadline=None)
@given(u64, u32, u32, st.sampled_from(list(Status)), st.sampled_from([0, 1, 2, 4, 8]), u64)
def test_feedback_fields_are_named(rid, vm, cid, status, size, raw):
    # What the client's hot path reads (Connection.next_feedback): f.status, f.data.
    data = raw & ((1 << (8 * size)) - 1) if size else 0
    frame = codec.encode_feedback(rid, vm, cid, status, size, data)
    f = codec.feedback_fields(frame, 8, len(frame))
    assert type(f) is FeedbackFields
    assert f._asdict() == {"request_id": rid, "vm_id": vm, "client_id": cid,
                           "status": status, "size": size, "data": data}


def test_configure_refuses_a_class_it_cannot_build():
    # A tuple subclass with a __dict__ is not laid out like a tuple: refused, and the
    # configuration in use is left as it was.
    from remote_hw.net import _fastio

    class Loose(tuple):
        pass

    with pytest.raises(TypeError, match="NamedTuple"):
        _fastio.configure({}, {}, {}, 0, 0, 0, Loose)
    with pytest.raises(TypeError):
        _fastio.configure({}, {}, {}, 0, 0, 0, dict)
    frame = _io(rid=77)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame)
        assert type(fastio.recv_io(b.fileno())) is IoRequestFields


def test_recv_io_never_changes_a_result_someone_holds(pair):
    # recv_io refills results nobody holds any more (as zip() does); one that is kept,
    # however many calls later, keeps its values.
    import gc
    a, b = pair
    kept = []
    for rid in range(6):
        a.sendall(_io(rid=rid, data=rid & 0xFF))
        got = fastio.recv_io(b.fileno())
        assert type(got) is IoRequestFields and got.request_id == rid
        if rid % 2:
            kept.append(got)
        del got
        gc.collect()
    assert [(k.request_id, k.data) for k in kept] == [(1, 1), (3, 3), (5, 5)]
