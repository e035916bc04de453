"""The decoder of each message type, and the hot two's field readers.

Every type decodes through the reference path (:mod:`._decode`) except the two that
cross the wire once per register access, IO_REQUEST and FEEDBACK, which get
hand-unrolled readers over the *same* ``struct.Struct`` objects. A reader returns the
payload's fields as a named tuple (:mod:`._fields`) without building a message object,
or None for anything unusual (an error, an id not seen before), which the reference
path then decodes or rejects with the precise error. So they accept exactly what the
reference path accepts, only faster; ``tests/test_protocol.py`` checks both agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._decode import _decode_generic, _generic_decoder
from ._fields import FeedbackFields, IoRequestFields
from ._plans import _PLANS
from ._rules import _ID_STR
from .errors import RemoteProtocolError
from .messages import AccessKind, Direction, ErrorCode, Feedback, Message, MsgType, Status

#: message type value -> name used in error texts ("IO_REQUEST")
MSG_NAMES: dict[int, str] = {t.value: t.name for t in MsgType}

# tuple.__new__(cls, values) builds a named tuple in one C call (the generated
# ``cls(...)`` is a Python function, twice the cost).
_tuple_new = tuple.__new__

_FB_PLAN = _PLANS[MsgType.FEEDBACK]
_FB_FIXED = _FB_PLAN.fixed
_FB_SIZE = _FB_PLAN.fixed_size
_FB_PAD = _FB_PLAN.pads[0]
_FB_BUILD = _FB_PLAN.build
_STATUSES = {m.value: m for m in Status}
_FB_SIZES = frozenset((0, 1, 2, 4, 8))


def feedback_fields(buf: Any, start: int, end: int) -> FeedbackFields | None:
    """The fields of a valid FEEDBACK payload, else None.

    The hot path of a client: no message object is built. None means "not the common
    case": the generic decoder then decodes it or raises the precise error.
    """
    if end - start == _FB_SIZE and not buf[start + _FB_PAD]:
        values = _FB_FIXED.unpack_from(buf, start)
        rid, vm, cid, status, size, data = values
        if status in _STATUSES and size in _FB_SIZES and not data >> (size << 3):
            return _tuple_new(FeedbackFields, values)
    return None


def _decode_feedback(buf: Any, start: int, end: int) -> Message:
    f = feedback_fields(buf, start, end)
    if f is not None:
        rid, vm, cid, status, size, data = f
        return _FB_BUILD(rid, vm, cid, _STATUSES[status], size, data)
    return _decode_generic(_FB_PLAN, buf, start, end)


_IO_PLAN = _PLANS[MsgType.IO_REQUEST]
_IO_FIXED = _IO_PLAN.fixed
_IO_SIZE = _IO_PLAN.fixed_size
_IO_BUILD = _IO_PLAN.build
_KINDS = {m.value: m for m in AccessKind}
_DIRS = {m.value: m for m in Direction}
_IO_SIZES = frozenset((1, 2, 4, 8))


def io_request_fields(buf: Any, start: int, end: int) -> IoRequestFields | None:
    """The fields of a valid IO_REQUEST payload, else None.

    Plain ints and strs: the hot path of a server builds no message object. None
    means "not the common case" (see :func:`feedback_fields`).
    """
    if end - start >= _IO_SIZE:
        rid, vm, cid, off, data, kind, size, d, hops, ls, ld = _IO_FIXED.unpack_from(buf, start)
        p = start + _IO_SIZE
        q = p + ls
        if q + ld == end:
            sid = _ID_STR.get(bytes(buf[p:q])) if ls else ""
            did = _ID_STR.get(bytes(buf[q:end]))
            if (
                kind in _KINDS
                and d in _DIRS
                and sid is not None
                and did is not None
                and size in _IO_SIZES
                and not data >> (size << 3)
            ):
                return _tuple_new(IoRequestFields,
                                  (rid, vm, cid, off, data, kind, size, d, hops, sid, did))
    return None


def post_fields(buf: Any, start: int, end: int) -> IoRequestFields | None:
    """The fields of a valid POST payload (IO_REQUEST's layout, a write), else None."""
    f = io_request_fields(buf, start, end)
    return f if f is not None and f.direction == 1 else None


def _decode_io_request(buf: Any, start: int, end: int) -> Message:
    f = io_request_fields(buf, start, end)
    if f is not None:
        rid, vm, cid, off, data, kind, size, d, hops, sid, did = f
        return _IO_BUILD(rid, vm, cid, off, data, _KINDS[kind], size, _DIRS[d], hops, sid,
                         did)
    return _decode_generic(_IO_PLAN, buf, start, end)


#: message type -> decoder(buf, start, end); used by Connection on its receive buffer
#: (no copy of the payload) and by decode_payload.
DECODERS: dict[int, Callable[[Any, int, int], Message]] = {
    t: _generic_decoder(p) for t, p in _PLANS.items()
}
DECODERS[MsgType.FEEDBACK] = _decode_feedback
DECODERS[MsgType.IO_REQUEST] = _decode_io_request


def decode_payload(msg_type: MsgType | int, payload: bytes | bytearray | memoryview) -> Message:
    """Decode one message payload (the bytes after the 8-byte header).

    Every field is validated: identifiers, enumerated values, sizes, reserved bytes,
    that ``data`` fits in ``size`` bytes, that the string lengths exactly consume the
    payload, UTF-8 text.  A HELLO/WELCOME of another major version raises
    ``VERSION_MISMATCH`` before its layout is looked at.

    Raises :class:`RemoteProtocolError` (``UNKNOWN_TYPE``, ``MALFORMED``, ``BAD_ID``,
    ``VERSION_MISMATCH``) with a message naming the offending field.
    """
    dec = DECODERS.get(msg_type)
    if dec is None:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {msg_type!r}")
    return dec(payload, 0, len(payload))


def decode_feedback(payload: bytes | bytearray | memoryview) -> Feedback:
    """Decode a FEEDBACK payload (fast path of ``decode_payload(FEEDBACK, ...)``)."""
    return _decode_feedback(payload, 0, len(payload))  # type: ignore[return-value]
