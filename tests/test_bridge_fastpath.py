"""The bridge's per-access fast path (remote_hw/bridge/fastpath.py) on real sockets.

The fast path recognises only the common message, one lone BAR-sized REGION_READ or
REGION_WRITE, and hands everything else to the ServerConnection as bytes. So these
tests hold it to the sans-I/O parser, which stays the one definition of the protocol:

* the Python twin accepts exactly the frames the parser decodes into one 1/2/4/8-byte
  access with nothing left over, with the same fields (property tests over arbitrary
  frames, well-formed or not);
* the C calls (remote_hw.bridge._fastvfu) give the same results as the Python twins,
  read for read and reply byte for byte (property tests over socket pairs);
* descriptors passed with a message are never swallowed: they come back with the
  bytes, for the parser to give to the message they came with.
"""

from __future__ import annotations

import array
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remote_hw.bridge import fastpath
from remote_hw.bridge import vfio_user as vu

C_BUILT = fastpath._c is not None
needs_c = pytest.mark.skipif(not C_BUILT, reason=f"remote_hw.bridge._fastvfu: "
                                                  f"{fastpath.status()[1]}")

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)


def frame(msg_id: int, command: int, flags: int, payload: bytes, size: int | None = None,
          error: int = 0) -> bytes:
    size = vu.HEADER_SIZE + len(payload) if size is None else size
    return vu.HEADER.pack(msg_id, command, size, flags, error) + payload


@st.composite
def accesses(draw) -> bytes:
    """Access-shaped frames: mostly well-formed, often with one field off."""
    command = draw(st.sampled_from([vu.Command.REGION_READ, vu.Command.REGION_WRITE,
                                    vu.Command.DEVICE_RESET, 77]))
    count = draw(st.sampled_from([1, 2, 4, 8, 0, 3, 16, 256]))
    data = b""
    if command == vu.Command.REGION_WRITE:
        n = draw(st.sampled_from([count, count, count, count + 1, max(count - 1, 0)]))
        data = draw(st.binary(min_size=n, max_size=n))
    payload = vu.REGION_ACCESS.pack(draw(u64), draw(u32), count) + data
    flags = draw(st.sampled_from([0, 0, vu.FLAG_NO_REPLY, vu.FLAG_REPLY, 0x40, 0x30]))
    size = draw(st.sampled_from([None, None, None, 31, 33]))
    f = frame(draw(u16), command, flags, payload, size, draw(st.sampled_from([0, 5])))
    cut = draw(st.sampled_from([None, None, None, 0, 1]))
    if cut is not None:  # a partial frame, or one with a stray byte after it
        f = f[:-1] if cut else f + b"\0"
    return f


@st.composite
def streams(draw) -> bytes:
    """What one read may hold: one to three access-shaped frames back to back."""
    return b"".join(draw(st.lists(accesses(), min_size=1, max_size=3)))


def parser_view(data: bytes) -> fastpath.Access | list[fastpath.Access] | None:
    """What the sans-I/O parser makes of ``data`` in the fast path's terms: one
    1/2/4/8-byte RegionRead/RegionWrite as a tuple, several as a list, and None when
    anything else is in it (another command, an error, a partial frame)."""
    conn = vu.ServerConnection()
    conn.receive_data(frame(1, vu.Command.VERSION, 0, struct.pack("<HH", 0, 1)))
    conn.next_event()
    conn.receive_data(data)
    out: list[fastpath.Access] = []
    pos = 0
    try:
        while (ev := conn.next_event()) is not vu.NEED_DATA:
            if not isinstance(ev, (vu.RegionRead, vu.RegionWrite)) \
                    or ev.count not in (1, 2, 4, 8):
                return None
            flags = vu.HEADER.unpack_from(data, pos)[3]
            pos += vu.HEADER.unpack_from(data, pos)[2]
            if isinstance(ev, vu.RegionRead):
                out.append((ev.msg_id, vu.Command.REGION_READ, flags, ev.offset, ev.region,
                            ev.count, 0))
            else:
                out.append((ev.msg_id, vu.Command.REGION_WRITE, flags, ev.offset, ev.region,
                            ev.count, int.from_bytes(ev.data, "little")))
    except vu.VfioUserError:
        return None
    if not out or not conn.idle:
        return None
    return out[0] if len(out) == 1 else out


@settings(max_examples=400, deadline=None)
@given(streams())
def test_python_twin_accepts_exactly_what_the_parser_decodes_as_accesses(data):
    assert fastpath.decode_accesses(data) == parser_view(data)


@settings(max_examples=200, deadline=None)
@given(accesses())
def test_an_access_event_rebuilt_from_the_tuple_is_the_parsers(data):
    access = fastpath.decode_access(data)
    if access is None:
        return
    conn = vu.ServerConnection()
    conn.receive_data(frame(1, vu.Command.VERSION, 0, struct.pack("<HH", 0, 1)))
    conn.next_event()
    conn.receive_data(data)
    assert fastpath.event(access) == conn.next_event()


@settings(max_examples=200, deadline=None)
@given(u16, st.sampled_from([vu.Command.REGION_READ, vu.Command.REGION_WRITE]), u64, u32,
       st.sampled_from([1, 2, 4, 8]), st.data())
def test_replies_are_the_parsers_replies(msg_id, command, offset, region, count, data):
    value = data.draw(st.integers(0, 2 ** (8 * count) - 1))
    conn = vu.ServerConnection()
    if command == vu.Command.REGION_READ:
        ev: vu.Message = vu.RegionRead(msg_id, False, offset, region, count)
        want = conn.reply(ev, vu.REGION_ACCESS.pack(offset, region, count)
                          + value.to_bytes(count, "little"))
    else:
        ev = vu.RegionWrite(msg_id, False, offset, region, count, value.to_bytes(count, "little"))
        want = conn.reply(ev, vu.REGION_ACCESS.pack(offset, region, count))
    assert fastpath.encode_reply(msg_id, command, offset, region, count, value) == want


def test_bad_replies_are_refused():
    with pytest.raises(ValueError):
        fastpath.encode_reply(1, vu.Command.REGION_READ, 0, 0, 1, 0x100)
    with pytest.raises(ValueError):
        fastpath.encode_reply(1, vu.Command.DEVICE_RESET, 0, 0, 1, 0)
    with pytest.raises(ValueError):
        fastpath.encode_reply(1, vu.Command.REGION_READ, 0, 0, 3, 0)


# -------------------------------------------------------------- over real sockets

@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def _both(b: socket.socket, use_c: bool, ready: bool) -> tuple[object, list[int]]:
    fds: list[int] = []
    return fastpath.reader(b, use_c)(fds, ready), fds


@needs_c
@settings(max_examples=300, deadline=None)
@given(streams(), st.booleans())
def test_c_reader_agrees_with_the_python_twin(data, ready):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        got = {}
        for use_c in (True, False):
            a.sendall(data)
            got[use_c] = _both(b, use_c, ready)
        assert got[True] == got[False]
        want = fastpath.decode_accesses(data) if ready else None
        assert got[True][0] == (want if want is not None else data)
    finally:
        a.close()
        b.close()


@needs_c
@settings(max_examples=300, deadline=None)
@given(u16, st.sampled_from([vu.Command.REGION_READ, vu.Command.REGION_WRITE]), u64, u32,
       st.sampled_from([1, 2, 4, 8]), st.data())
def test_c_replies_are_byte_for_byte_the_python_twins(msg_id, command, offset, region, count,
                                                      data):
    value = data.draw(st.integers(0, 2 ** (8 * count) - 1))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fastpath.replier(a, True)(msg_id, command, offset, region, count, value)
        got = b.recv(100)
        assert got == fastpath.encode_reply(msg_id, command, offset, region, count, value)
    finally:
        a.close()
        b.close()


@needs_c
def test_c_refuses_bad_replies_as_python_does(pair):
    a, _ = pair
    reply = fastpath.replier(a, True)
    for args in [(1, vu.Command.REGION_READ, 0, 0, 1, 0x100),
                 (1, vu.Command.DEVICE_RESET, 0, 0, 1, 0),
                 (1, vu.Command.REGION_READ, 0, 0, 3, 0), (0x10000, 9, 0, 0, 1, 0)]:
        with pytest.raises(ValueError):
            reply(*args)


@pytest.mark.parametrize("use_c", [pytest.param(True, marks=needs_c), False])
def test_descriptors_come_back_with_the_bytes_never_as_an_access(pair, use_c):
    a, b = pair
    read = fastpath.reader(b, use_c)
    access = frame(3, vu.Command.REGION_READ, 0, vu.REGION_ACCESS.pack(7, 0, 1))
    efd = os.eventfd(0)
    try:
        a.sendmsg([access], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [efd]))])
        fds: list[int] = []
        assert read(fds, True) == access  # bytes, not a tuple: the parser must see it
        assert len(fds) == 1
        os.eventfd_write(fds[0], 1)  # a working duplicate of our eventfd
        assert os.eventfd_read(efd) == 1
        os.close(fds[0])
    finally:
        os.close(efd)


@pytest.mark.parametrize("use_c", [pytest.param(True, marks=needs_c), False])
def test_end_of_stream_batches_and_the_not_ready_case(pair, use_c):
    a, b = pair
    read = fastpath.reader(b, use_c)
    access = frame(3, vu.Command.REGION_WRITE, 0, vu.REGION_ACCESS.pack(7, 0, 1) + b"\x5a")
    a.sendall(access)
    assert read([], False) == access  # before VERSION, or with bytes buffered
    a.sendall(access)
    assert read([], True) == (3, vu.Command.REGION_WRITE, 0, 7, 0, 1, 0x5A)
    posted = frame(4, vu.Command.REGION_WRITE, vu.FLAG_NO_REPLY,
                   vu.REGION_ACCESS.pack(0, 0, 1) + b"A")
    a.sendall(posted + posted + access)  # a burst of posted writes, then one waited for
    assert read([], True) == [(4, vu.Command.REGION_WRITE, vu.FLAG_NO_REPLY, 0, 0, 1, 0x41)] * 2 \
        + [(3, vu.Command.REGION_WRITE, 0, 7, 0, 1, 0x5A)]
    a.sendall(posted + access[:-1])  # a partial frame at the end: all for the parser
    assert read([], True) == posted + access[:-1]
    a.close()
    assert read([], True) == b""


def test_remote_hw_fastio_0_turns_the_c_off_too(monkeypatch):
    monkeypatch.setenv("REMOTE_HW_FASTIO", "0")
    assert fastpath.status() == (False, "disabled by REMOTE_HW_FASTIO=0")
