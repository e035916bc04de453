"""The bridge's common case, one BAR access, with as little work as possible per message.

Nearly every message QEMU sends once a guest runs is a REGION_READ or REGION_WRITE of
1, 2, 4 or 8 bytes, sent alone (QEMU waits for the reply). Going through
:class:`~remote_hw.bridge.vfio_user.ServerConnection` for those means a buffer append,
a header parse, a payload copy, a dataclass, an isinstance chain and a reply built from
two packs; right after the context switch that woke the bridge that Python costs two
to three times its warm figure (docs/performance.md). So the session's thread reads
with :func:`reader` and answers with :func:`replier`:

* the reader does one ``recvmsg`` and, when the read is exactly one such access (and
  the caller says the connection is past VERSION with nothing buffered), returns it
  as a tuple ``(msg_id, command, flags, offset, region, count, value)``; when it is
  exactly several (QEMU 11.1 may post writes, x-no-posted-writes=off, and then sends
  a burst without waiting for replies; for the UART's I/O BAR it was seen to wait for
  every write), a list of them; anything else comes back as the bytes read, for the
  ServerConnection, which decodes it or names the error. So this module never judges
  input; it only recognises the common frames;
* the replier encodes that access's reply and sends it.

Both exist twice: in C (``remote_hw.bridge._fastvfu``, remote_hw/bridge/_fastvfu.c,
built by setup.py when a compiler is there) and here in Python (:func:`decode_access`,
:func:`encode_reply`), the fallback and the reference the tests hold the C to
(tests/test_bridge_fastpath.py). ``REMOTE_HW_FASTIO=0`` turns the C off, as it does
the link's (remote_hw/net/fastio.py).
"""

from __future__ import annotations

import array
import functools
import os
import socket
import struct
import types
from collections.abc import Callable
from typing import Final, TypeAlias

from remote_hw.bridge import vfio_user as vu

__all__ = ["Access", "Reader", "Replier", "decode_access", "decode_accesses", "encode_reply",
           "event", "reader", "replier", "status"]

_c: types.ModuleType | None
try:
    from remote_hw.bridge import _fastvfu as _c
except ImportError as e:  # not compiled: the Python twins below serve
    _c = None
    _missing = f"not built ({e})"
else:
    _missing = ""

#: ``(msg_id, command, flags, offset, region, count, value)``; value is the written
#: data as a little-endian int (0 for a read).
Access: TypeAlias = tuple[int, int, int, int, int, int, int]
#: ``read(fds, ready)``: one read; fds that came with it are appended to ``fds``.
Reader: TypeAlias = Callable[[list[int], bool], "Access | list[Access] | bytes"]
#: ``reply(msg_id, command, offset, region, count, value)``.
Replier: TypeAlias = Callable[[int, int, int, int, int, int], None]

#: Header and REGION_ACCESS in one: the whole fixed part of an access message.
ACCESS_FRAME: Final = struct.Struct("<HHIIIQII")
FIXED: Final = ACCESS_FRAME.size
READ: Final = int(vu.Command.REGION_READ)
WRITE: Final = int(vu.Command.REGION_WRITE)
SIZES: Final = frozenset((1, 2, 4, 8))
#: One read (as the C's RECV_CAP); a longer message arrives over several reads.
RECV_SIZE: Final = 16384
FD_SPACE: Final = socket.CMSG_SPACE(vu.MAX_MSG_FDS * array.array("i").itemsize)


def decode_access(data: bytes | memoryview) -> Access | None:
    """``data`` as one lone 1/2/4/8-byte REGION_READ/WRITE command, else None.

    Accepts exactly what ServerConnection would decode into a single RegionRead or
    RegionWrite with nothing left over (flags 0 or NO_REPLY, size matching the read).
    """
    n = len(data)
    if n < FIXED:
        return None
    msg_id, command, size, flags, _error, offset, region, count = \
        ACCESS_FRAME.unpack_from(data)
    if size != n or flags & ~vu.FLAG_NO_REPLY or count not in SIZES:
        return None
    if command == READ:
        if size != FIXED:
            return None
        return msg_id, command, flags, offset, region, count, 0
    if command == WRITE and size == FIXED + count:
        return (msg_id, command, flags, offset, region, count,
                int.from_bytes(data[FIXED:], "little"))
    return None


def decode_accesses(data: bytes | memoryview) -> Access | list[Access] | None:
    """``data`` as one access (a tuple), several (a list), or None when it is not made
    of complete 1/2/4/8-byte REGION_READ/WRITE commands only."""
    one = decode_access(data)
    if one is not None:
        return one
    out: list[Access] = []
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < FIXED:
            return None
        size = ACCESS_FRAME.unpack_from(data, pos)[2]
        access = decode_access(data[pos:pos + size]) if pos + size <= n else None
        if access is None:
            return None
        out.append(access)
        pos += size
    return out if len(out) > 1 else None


def encode_reply(msg_id: int, command: int, offset: int, region: int, count: int,
                 value: int) -> bytes:
    """The reply to an access: a read's carries ``value`` as ``count`` data bytes."""
    if command not in (READ, WRITE) or count not in SIZES or not 0 <= value >> (8 * count) < 1:
        raise ValueError("not a 1/2/4/8-byte region access reply")
    data = value.to_bytes(count, "little") if command == READ else b""
    return ACCESS_FRAME.pack(msg_id, command, FIXED + len(data), vu.FLAG_REPLY, 0, offset,
                             region, count) + data


def event(access: Access) -> vu.RegionRead | vu.RegionWrite:
    """The same access as ServerConnection's event, for the general path (config
    space, a region that is not a BAR, an access past the BAR's end)."""
    msg_id, command, flags, offset, region, count, value = access
    no_reply = bool(flags & vu.FLAG_NO_REPLY)
    if command == READ:
        return vu.RegionRead(msg_id, no_reply, offset, region, count)
    return vu.RegionWrite(msg_id, no_reply, offset, region, count,
                          value.to_bytes(count, "little"))


def _py_recv_access(sock: socket.socket, buf: bytearray, fds: list[int], ready: bool
                    ) -> Access | list[Access] | bytes:
    # Into the session's own buffer: an access is decoded from it without a copy.
    n, anc, _flags, _addr = sock.recvmsg_into([buf], FD_SPACE, socket.MSG_CMSG_CLOEXEC)
    data = memoryview(buf)[:n]
    before = len(fds)
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    if ready and len(fds) == before:
        accesses = decode_accesses(data)
        if accesses is not None:
            return accesses
    return bytes(data)


def _py_send_reply(sock: socket.socket, msg_id: int, command: int, offset: int, region: int,
                   count: int, value: int) -> None:
    sock.sendall(encode_reply(msg_id, command, offset, region, count, value))


def status() -> tuple[bool, str]:
    """(whether the C calls are in use, and if not, why)."""
    if os.environ.get("REMOTE_HW_FASTIO", "1") == "0":
        return False, "disabled by REMOTE_HW_FASTIO=0"
    if _c is None:
        return False, _missing
    return True, ""


def reader(sock: socket.socket, use_c: bool | None = None) -> Reader:
    """The read call for ``sock``: C when built (``use_c`` forces a choice)."""
    if use_c is None:
        use_c = status()[0]
    if use_c:
        assert _c is not None, _missing
        # A partial of the C function: no Python frame per call.
        return functools.partial(_c.recv_access, sock.fileno())
    return functools.partial(_py_recv_access, sock, bytearray(RECV_SIZE))


def replier(sock: socket.socket, use_c: bool | None = None) -> Replier:
    """The reply call for ``sock``: C when built (``use_c`` forces a choice)."""
    if use_c is None:
        use_c = status()[0]
    if use_c:
        assert _c is not None, _missing
        return functools.partial(_c.send_reply, sock.fileno())
    return functools.partial(_py_send_reply, sock)
