"""The C fast path of a forwarded access, and whether this process may use it.

A forwarded register read costs a KVM exit, one TCP round trip, and the Python both
ends run for it. Right after a KVM exit or a context switch that Python runs two to
three times slower than in a warm loop, so it is the largest part of the total that
remote-hw adds (docs/performance.md). ``remote_hw.net._fastio`` (remote_hw/net/_fastio.c)
does the hot socket calls in C:

* client: ``request(fd, wlock, request_id, ...)`` encodes an IO_REQUEST, sends it
  and reads once; the common answer, one FEEDBACK for that request, comes back as
  ``(status, value)``; ``post(fd, wlock, ...)`` encodes a POST (a posted write,
  remote_hw/net/posting.py) and sends it, reading nothing;
* server: ``recv_io(fd)`` reads once and returns a lone valid IO_REQUEST as the same
  named tuple as ``codec.io_request_fields`` (an ``IoRequestFields``, built by the C
  from the class handed to it here); ``send_feedback(...)`` encodes and sends.

Anything else they read (several frames, a partial one, another type, an unknown id,
a bad field) comes back as raw bytes for :class:`~remote_hw.protocol.Connection`,
which decodes it or raises the precise error. So the C never judges input, it only
recognises the common frames, and the protocol package stays the one definition of
the wire format: the C mirror of the two layouts is checked against the codec here,
once per process, before it is used.

Only plain TCP uses the fast path (TLS records need OpenSSL's state). It is off
when the extension was not built (no compiler at install time), when the check
fails, or when ``REMOTE_HW_FASTIO=0`` is set (to compare, or to rule it out).
"""

from __future__ import annotations

import os
import socket
import threading
import types
from collections.abc import Iterable
from typing import Any

from remote_hw.protocol import FeedbackFields, IoRequestFields, codec
from remote_hw.protocol.messages import AccessKind, Direction, MsgType, Status

__all__ = ["enabled", "status", "request", "post", "recv_io", "send_feedback"]

_c: types.ModuleType | None
try:
    from remote_hw.net import _fastio as _c
except ImportError as e:  # not compiled: the pure-Python path serves
    _c = None
    _missing = f"not built ({e})"
else:
    _missing = ""

_lock = threading.Lock()
_state: tuple[bool, str] | None = None  # (enabled, why not), after the first check

request: Any = getattr(_c, "request", None)
post: Any = getattr(_c, "post", None)
recv_io: Any = getattr(_c, "recv_io", None)
send_feedback: Any = getattr(_c, "send_feedback", None)


def _mask(values: Iterable[int]) -> int:
    return sum(1 << int(v) for v in values)


def _self_check(_c: types.ModuleType) -> str:
    """Compare the C mirror with the codec on real frames; '' when they agree."""
    # Distinct bytes in every field, so a wrong offset or width cannot go unnoticed.
    io_args = IoRequestFields(0x0102030405060708, 0x11223344, 0x55667788,
                              0x99AABBCCDDEEFF00, 0xA1B2C3D4, int(AccessKind.MMIO), 4,
                              int(Direction.WRITE), 3, "check-srv", "check.dev_0")
    fb_args = FeedbackFields(0x8877665544332211, 0x0A0B0C0D, 0x01020304,
                             int(Status.HOP_LIMIT), 8, 0xF0E0D0C0B0A09080)
    rid = fb_args.request_id
    answer = (fb_args.status, fb_args.data)  # what request() returns for it
    io_frame = codec.encode_io_request(*io_args)
    fb_frame = codec.encode_feedback(*fb_args)
    # Teach the id cache these ids the way a server learns them: one generic decode.
    codec.decode_payload(MsgType.IO_REQUEST, io_frame[8:])
    a, b = socket.socketpair()
    try:
        a.sendall(io_frame)
        got = _c.recv_io(b.fileno())
        want = codec.io_request_fields(io_frame, 8, len(io_frame))
        if got != want or type(got) is not type(want):
            return f"IO_REQUEST parsed as {got!r}, the codec says {want!r}"
        if not _c.send_feedback(a.fileno(), *fb_args):
            return "a valid FEEDBACK was refused"
        sent = b.recv(4096)
        if sent != fb_frame:
            return f"FEEDBACK encoded as {sent.hex()}, the codec says {fb_frame.hex()}"
        # The answer is queued before the request goes out, so request() finds it.
        codec.encode_io_request(*io_args)  # the client learns ids by encoding once
        b.sendall(fb_frame)
        got = _c.request(a.fileno(), threading.Lock(), rid, *io_args[1:])
        if got != answer:
            return f"FEEDBACK parsed as {got!r}, expected {answer!r}"
        sent = b.recv(4096)
        want_io = codec.encode_io_request(rid, *io_args[1:])
        if sent != want_io:
            return f"IO_REQUEST encoded as {sent.hex()}, the codec says {want_io.hex()}"
        b.sendall(fb_frame)
        got = _c.request(a.fileno(), threading.Lock(), rid + 1, *io_args[1:])
        if got != fb_frame:
            return f"another request's FEEDBACK was taken as ours ({got!r})"
        b.recv(4096)
        post_args = (*io_args[:7], *io_args[8:])  # a POST: IO_REQUEST's without direction
        if not _c.post(a.fileno(), threading.Lock(), *post_args):
            return "a valid POST was refused"
        sent = b.recv(4096)
        want_post = codec.encode_post(*post_args)
        if sent != want_post:
            return f"POST encoded as {sent.hex()}, the codec says {want_post.hex()}"
    finally:
        a.close()
        b.close()
    return ""


def status() -> tuple[bool, str]:
    """(whether the C fast path is in use, and if not, why)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                if os.environ.get("REMOTE_HW_FASTIO", "1") == "0":
                    _state = (False, "disabled by REMOTE_HW_FASTIO=0")
                elif _c is None:
                    _state = (False, _missing)
                else:
                    _c.configure(*codec.id_caches(),
                                 _mask(Status), _mask(AccessKind), _mask(Direction),
                                 IoRequestFields)
                    why = _self_check(_c)
                    _state = (not why, f"disagrees with the codec: {why}" if why else "")
    return _state


def enabled() -> bool:
    """Whether the C fast path is in use in this process."""
    return status()[0]
