"""Encoding and decoding of single messages, with full validation.

Everything here is derived from the table in :mod:`.messages`: at import time each
:class:`~.messages.MessageSpec` is compiled into a ``_Plan`` (field names, which
validation rule applies to which field, where the reserved bytes are, a fast
constructor).  The generic :func:`encode` / :func:`decode_payload` walk a plan; the
hot messages (IO_REQUEST, FEEDBACK) additionally get hand-unrolled fast paths that use
the *same* ``struct.Struct`` objects from the table and fall back to the generic code
whenever anything looks unusual, so the generic code alone decides what is an error
and how it is worded.

Decoding raises :class:`~.errors.RemoteProtocolError`, encoding raises
:class:`~.errors.LocalProtocolError`; both are :class:`~.errors.ProtocolError`.
Every field is validated before a message object is built.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import fields
from operator import attrgetter
from typing import Any, NoReturn

from .errors import LocalProtocolError, RemoteProtocolError
from .messages import (
    ABSOLUTE_MAX_PAYLOAD,
    HEADER,
    ID_CHARS,
    MAGIC_U16,
    MAX_ID_LENGTH,
    MESSAGES,
    PRE_HANDSHAKE_MAX_PAYLOAD,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    AccessKind,
    Direction,
    ErrorCode,
    Feedback,
    IoRequest,
    Message,
    MessageSpec,
    MsgType,
    Role,
    Status,
)

__all__ = [
    "encode",
    "decode_payload",
    "encode_io_request",
    "encode_feedback",
    "decode_feedback",
    "MSG_NAMES",
]

#: message type value -> name used in error texts ("IO_REQUEST")
MSG_NAMES: dict[int, str] = {t.value: t.name for t in MsgType}

_MALFORMED = ErrorCode.MALFORMED
_BAD_ID = ErrorCode.BAD_ID


class _Bad(Exception):
    """Raised by a field rule; the caller adds the message and field name."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        self.code = code
        self.text = text


# ------------------------------------------------------------------------ field rules
#
# A rule is a pair (decode, encode).  ``decode`` gets what struct unpacked (an int, or
# the raw bytes of a trailing string) and returns the Python value for the message;
# ``encode`` gets the message's attribute and returns what struct packs (an int, or
# the bytes of a trailing string).  Both raise _Bad.  Fields without a rule are plain
# unsigned integers whose range struct itself enforces.


# A field rule: validates a value and returns its canonical form (or raises _Bad).
_Rule = Callable[[Any], Any]
# (decode rule, encode rule); None where the field needs no rule that way.
_RulePair = tuple[_Rule | None, _Rule | None]


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def _lookup_rule(table: dict[Any, Any], allowed: str) -> tuple[_Rule, _Rule]:
    # A dict lookup both validates and converts to the canonical value ``table``
    # maps to; ``allowed`` lists the valid values for the error text.
    def rule(value: Any) -> Any:
        try:
            v = table.get(value)
        except TypeError:  # unhashable
            v = None
        if v is None:
            raise _Bad(_MALFORMED, f"{_short(value)} is not one of {allowed}")
        return v

    return rule, rule


def _enum_rule(enum_cls: type[enum.IntEnum],
               only: tuple[enum.IntEnum, ...] | None = None) -> tuple[_Rule, _Rule]:
    # Converts to the enum member; IntEnum members hash like their int values, so
    # callers may pass plain ints when encoding.
    members = {m.value: m for m in (enum_cls if only is None else only)}
    return _lookup_rule(members, ", ".join(f"{m.value} ({m.name})" for m in members.values()))


def _choice_rule(choices: tuple[int, ...]) -> tuple[_Rule, _Rule]:
    # Returns the canonical int, so a 4.0 or an IntEnum passed by a caller cannot
    # reach the arithmetic that follows.
    return _lookup_rule({c: c for c in choices}, ", ".join(map(str, choices)))


def _max_payload_rule(value: Any) -> Any:
    # The floor guarantees every v1 control message (the largest is ~170 bytes) fits
    # whatever is negotiated, so senders of those need no size check.
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not PRE_HANDSHAKE_MAX_PAYLOAD <= value <= ABSOLUTE_MAX_PAYLOAD
    ):
        raise _Bad(
            _MALFORMED,
            f"{_short(value)} is outside {PRE_HANDSHAKE_MAX_PAYLOAD}..{ABSOLUTE_MAX_PAYLOAD}",
        )
    return value


def _major_encode(value: Any) -> Any:
    if value != PROTOCOL_MAJOR:
        raise _Bad(
            ErrorCode.VERSION_MISMATCH,
            f"this implementation speaks protocol {PROTOCOL_MAJOR}.x, "
            f"cannot encode major version {_short(value)}",
        )
    return value


# Identifier caches.  Device and server ids repeat on every I/O, so remembering the
# ones already validated turns two regex-like checks into one dict lookup.  The caches
# only ever hold valid ids and are cleared when they grow (a peer could otherwise make
# us remember arbitrarily many).  They are shared by all threads: single dict get/set
# operations are atomic under the GIL, and a lost entry only costs a re-validation.
_CACHE_LIMIT = 4096
_ID_BYTES: dict[str, bytes] = {}  # valid non-empty id -> its bytes
_OPT_ID_BYTES: dict[str, bytes] = {"": b""}  # the same, for fields where "" is allowed
_ID_STR: dict[bytes, str] = {}  # valid non-empty id bytes -> str

_ID_RULE_TEXT = f"must be 1-{MAX_ID_LENGTH} bytes of [A-Za-z0-9._-]"


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def id_caches() -> tuple[dict[bytes, str], dict[str, bytes], dict[str, bytes]]:
    """The identifier caches (decode, encode, encode-optional), for a fast path that
    shares them (remote_hw/net/fastio.py): it may read them and add only ids that
    passed this module's check, so both sides agree on every id they have seen."""
    return _ID_STR, _ID_BYTES, _OPT_ID_BYTES


def _valid_id_bytes(raw: bytes) -> bool:
    # translate(None, ID_CHARS) deletes every allowed byte: anything left is illegal.
    return 0 < len(raw) <= MAX_ID_LENGTH and not raw.translate(None, ID_CHARS)


def _id_decode(raw: bytes) -> str:
    s = _ID_STR.get(raw)
    if s is None:
        if not _valid_id_bytes(raw):
            if not raw:
                raise _Bad(_BAD_ID, f"empty; {_ID_RULE_TEXT}")
            raise _Bad(_BAD_ID, f"{_short(raw)} is not an identifier ({_ID_RULE_TEXT})")
        s = raw.decode("ascii")
        _remember(_ID_STR, raw, s)
    return s


def _opt_id_decode(raw: bytes) -> str:
    return _id_decode(raw) if raw else ""


def _id_encode_into(cache: dict[str, bytes], value: Any) -> bytes:
    b = cache.get(value) if isinstance(value, str) else None
    if b is None:
        if not isinstance(value, str):
            raise _Bad(_BAD_ID, f"{_short(value)} is not a str")
        try:
            b = value.encode("ascii")
        except UnicodeEncodeError:
            b = b"\x80"  # any non-ASCII id is invalid; let the check below say so
        if not _valid_id_bytes(b):
            if not value:
                raise _Bad(_BAD_ID, f"empty; {_ID_RULE_TEXT}")
            raise _Bad(_BAD_ID, f"{_short(value)} is not an identifier ({_ID_RULE_TEXT})")
        _remember(cache, value, b)
    return b


def _id_encode(value: Any) -> bytes:
    return _id_encode_into(_ID_BYTES, value)


def _opt_id_encode(value: Any) -> bytes:
    return _id_encode_into(_OPT_ID_BYTES, value)


def _text_decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(_MALFORMED, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _text_encode(value: Any) -> bytes:
    if not isinstance(value, str):
        raise _Bad(_MALFORMED, f"{_short(value)} is not a str")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates
        raise _Bad(_MALFORMED, f"cannot be encoded as UTF-8 ({e.reason})") from None


_RULES: dict[str, _RulePair] = {
    # major is checked before anything else when decoding (see _version_precheck),
    # because a HELLO of another major version may not even have our layout.
    "major": (None, _major_encode),
    "max_payload": (_max_payload_rule, _max_payload_rule),
    # Role.SERVER names the accepting end; it is never sent.
    "role": _enum_rule(Role, (Role.CLIENT, Role.PEER)),
    "kind": _enum_rule(AccessKind),
    "direction": _enum_rule(Direction),
    "status": _enum_rule(Status),
    "code": _enum_rule(ErrorCode),
    "level": _choice_rule((0, 1)),
    "size": _choice_rule((1, 2, 4, 8)),
    "name": (_id_decode, _id_encode),
    "device_id": (_id_decode, _id_encode),
    "server_id": (_opt_id_decode, _opt_id_encode),
    "text": (_text_decode, _text_encode),
}
# Where one message needs a different rule for a shared field name.
_RULE_OVERRIDES: dict[tuple[MsgType, str], _RulePair] = {
    # ATTACH/DETACH replies carry no value: size 0 (and data 0).
    (MsgType.FEEDBACK, "size"): _choice_rule((0, 1, 2, 4, 8)),
}

_INT_LIMITS = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFF_FFFF, "Q": 0xFFFF_FFFF_FFFF_FFFF}


# ------------------------------------------------------------------------------ plans


def _fast_constructor(cls: type[Message], names: list[str]) -> Callable[..., Message]:
    """Build ``f(*values) -> cls`` that bypasses the frozen dataclass ``__init__``.

    A frozen dataclass sets each field through ``object.__setattr__`` by name, which
    costs ~0.8 µs for six fields; calling the slot descriptors directly halves that.
    Only used with values that have already been validated.
    """
    args = ", ".join(f"v{i}" for i in range(len(names)))
    body = "".join(f"    _s{i}(o, v{i})\n" for i in range(len(names)))
    src = f"def build({args}):\n    o = _new(_cls)\n{body}    return o\n"
    ns: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    for i, n in enumerate(names):
        ns[f"_s{i}"] = cls.__dict__[n].__set__
    exec(src, ns)  # noqa: S102 - source built from dataclass field names only
    build: Callable[..., Message] = ns["build"]
    return build


class _Plan:
    """A :class:`MessageSpec` compiled for the codec (see module docstring)."""

    __slots__ = (
        "type", "name", "cls", "fixed", "fixed_size", "frame", "names", "nfixed",
        "nvar", "var_max", "fmts", "pads", "dec_rules", "enc_rules", "size_idx",
        "data_idx", "rid_idx", "versioned", "build", "get",
    )

    def __init__(self, t: MsgType, spec: MessageSpec) -> None:
        self.type = t
        self.name = t.name
        self.cls = spec.cls
        self.fixed = spec.fixed
        self.fixed_size = spec.fixed.size
        # Header and fixed part packed by one call when encoding.
        self.frame = struct.Struct(HEADER.format + spec.fixed.format.lstrip("<"))
        self.names = [f.name for f in fields(spec.cls)]
        self.nvar = len(spec.var)
        self.nfixed = len(self.names) - self.nvar
        fmt = spec.fixed.format.lstrip("<")
        items = [c for c in fmt if c != "x"]
        self.fmts = items[: self.nfixed]  # struct code of each fixed field
        self.var_max = [_INT_LIMITS[c] for c in items[self.nfixed :]]
        # Offsets of reserved (pad) bytes: struct skips them, so check them by hand.
        self.pads = tuple(
            struct.calcsize("<" + fmt[:i]) for i, c in enumerate(fmt) if c == "x"
        )
        self.dec_rules = []
        self.enc_rules = []
        for i, n in enumerate(self.names):
            dec, enc = _RULE_OVERRIDES.get((t, n)) or _RULES.get(n, (None, None))
            if dec is not None:
                self.dec_rules.append((i, dec, n))
            if enc is not None:
                self.enc_rules.append((i, enc, n))
        both = "size" in self.names and "data" in self.names
        self.size_idx = self.names.index("size") if both else None
        self.data_idx = self.names.index("data") if both else -1  # used only with size_idx
        self.rid_idx = self.names.index("request_id") if "request_id" in self.names else None
        self.versioned = self.names[0] == "major"
        self.build = _fast_constructor(spec.cls, self.names)
        self.get: Callable[[Message], tuple[Any, ...]]
        if len(self.names) == 1:
            only = self.names[0]
            self.get = lambda m: (getattr(m, only),)
        else:
            self.get = attrgetter(*self.names)

    def where(self, field: str) -> str:
        return f"{self.name} {field}"


_PLANS: dict[int, _Plan] = {t: _Plan(t, spec) for t, spec in MESSAGES.items()}
_PLAN_BY_CLASS: dict[type[Message], _Plan] = {p.cls: p for p in _PLANS.values()}


# ----------------------------------------------------------------------------- decode


def _fail_decode(plan: _Plan, vals: list[Any], code: ErrorCode, text: str) -> NoReturn:
    rid = 0
    if plan.rid_idx is not None and len(vals) > plan.rid_idx:
        rid = vals[plan.rid_idx]
    raise RemoteProtocolError(code, text, rid)


def _version_precheck(plan: _Plan, buf: Any, start: int, end: int) -> None:
    # Read just the u16 major (and minor when present) before trusting the layout.
    if end - start < 2:
        return  # the length check that follows reports it
    major = buf[start] | buf[start + 1] << 8
    if major != PROTOCOL_MAJOR:
        minor = f".{buf[start + 2] | buf[start + 3] << 8}" if end - start >= 4 else ""
        raise RemoteProtocolError(
            ErrorCode.VERSION_MISMATCH,
            f"{plan.name} is for protocol {major}{minor}, but this side speaks "
            f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}; the major versions must match",
        )


def _decode_generic(plan: _Plan, buf: Any, start: int, end: int) -> Message:
    """Decode ``buf[start:end]`` as a payload of ``plan``'s type (the reference path)."""
    if plan.versioned:
        _version_precheck(plan, buf, start, end)
    n = end - start
    fsize = plan.fixed_size
    if n < fsize:
        raise RemoteProtocolError(
            _MALFORMED,
            f"{plan.name}: payload of {n} bytes is shorter than its {fsize}-byte fixed part",
        )
    vals = list(plan.fixed.unpack_from(buf, start))
    for off in plan.pads:
        if buf[start + off]:
            _fail_decode(
                plan, vals, _MALFORMED,
                f"{plan.name}: reserved byte at payload offset {off} must be 0, "
                f"got {buf[start + off]:#x}",
            )
    nfixed = plan.nfixed
    if plan.nvar:
        lens = vals[nfixed:]
        del vals[nfixed:]
        p = start + fsize
        if p + sum(lens) != end:
            detail = " + ".join(
                f"{name} {ln}" for name, ln in zip(plan.names[nfixed:], lens)
            )
            _fail_decode(
                plan, vals, _MALFORMED,
                f"{plan.name}: string lengths ({detail}) need {sum(lens)} bytes after "
                f"the {fsize}-byte fixed part, but {end - p} follow",
            )
        for ln in lens:
            vals.append(bytes(buf[p : p + ln]))
            p += ln
    elif n != fsize:
        _fail_decode(
            plan, vals, _MALFORMED,
            f"{plan.name}: {n - fsize} trailing bytes after the {fsize}-byte payload",
        )
    for i, rule, field in plan.dec_rules:
        try:
            vals[i] = rule(vals[i])
        except _Bad as b:
            _fail_decode(plan, vals, b.code, f"{plan.where(field)}: {b.text}")
    if plan.size_idx is not None:
        size, data = vals[plan.size_idx], vals[plan.data_idx]
        if data >> (size << 3):
            _fail_decode(
                plan, vals, _MALFORMED,
                f"{plan.where('data')}: {data:#x} does not fit in size {size}",
            )
    return plan.build(*vals)


def _generic_decoder(plan: _Plan) -> Callable[[Any, int, int], Message]:
    return lambda buf, start, end: _decode_generic(plan, buf, start, end)


# Fast paths.  They accept exactly what the generic path accepts; anything unusual
# (an error, an id not seen before) is handed to the generic path, which either
# decodes it or raises the precise error.

_FB_PLAN = _PLANS[MsgType.FEEDBACK]
_FB_FIXED = _FB_PLAN.fixed
_FB_SIZE = _FB_PLAN.fixed_size
_FB_PAD = _FB_PLAN.pads[0]
_FB_BUILD = _FB_PLAN.build
_STATUSES = {m.value: m for m in Status}
_FB_SIZES = frozenset((0, 1, 2, 4, 8))


def feedback_fields(buf: Any, start: int, end: int) -> tuple[int, ...] | None:
    """The fields of a valid FEEDBACK payload as a tuple in wire order, else None.

    The hot path of a client: no message object is built. None means "not the common
    case": the generic decoder then decodes it or raises the precise error.
    """
    if end - start == _FB_SIZE and not buf[start + _FB_PAD]:
        fields = _FB_FIXED.unpack_from(buf, start)
        size, data = fields[4], fields[5]
        if fields[3] in _STATUSES and size in _FB_SIZES and not data >> (size << 3):
            return fields
    return None


def _decode_feedback(buf: Any, start: int, end: int) -> Message:
    f = feedback_fields(buf, start, end)
    if f is not None:
        return _FB_BUILD(f[0], f[1], f[2], _STATUSES[f[3]], f[4], f[5])
    return _decode_generic(_FB_PLAN, buf, start, end)


_IO_PLAN = _PLANS[MsgType.IO_REQUEST]
_IO_FIXED = _IO_PLAN.fixed
_IO_SIZE = _IO_PLAN.fixed_size
_IO_BUILD = _IO_PLAN.build
_KINDS = {m.value: m for m in AccessKind}
_DIRS = {m.value: m for m in Direction}
_IO_SIZES = frozenset((1, 2, 4, 8))


def io_request_fields(buf: Any, start: int, end: int) -> tuple[Any, ...] | None:
    """The fields of a valid IO_REQUEST payload as a tuple in wire order, else None.

    (request id, vm id, client id, offset, data, kind, size, direction, hops, server
    id, device id) with plain ints and strs: the hot path of a server builds no message
    object. None means "not the common case" (see :func:`feedback_fields`).
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
                return rid, vm, cid, off, data, kind, size, d, hops, sid, did
    return None


def _decode_io_request(buf: Any, start: int, end: int) -> Message:
    f = io_request_fields(buf, start, end)
    if f is not None:
        return _IO_BUILD(f[0], f[1], f[2], f[3], f[4], _KINDS[f[5]], f[6], _DIRS[f[7]],
                         f[8], f[9], f[10])
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


# ----------------------------------------------------------------------------- encode


def _explain_pack_error(plan: _Plan, vals: list[Any]) -> str:
    for name, code, value in zip(plan.names, plan.fmts, vals):
        if not isinstance(value, int):
            return f"{plan.where(name)}: {_short(value)} is not an int"
        if not 0 <= value <= _INT_LIMITS[code]:
            bits = struct.calcsize(code) * 8
            return f"{plan.where(name)}: {_short(value)} does not fit in u{bits}"
    return f"{plan.name}: cannot pack {_short(vals)}"  # pragma: no cover - defensive


def encode(msg: Message) -> bytes:
    """Encode ``msg`` as one complete frame (header + payload).

    Validates every field the same way :func:`decode_payload` does and raises
    :class:`LocalProtocolError` naming the field otherwise.  It does not know the
    negotiated limit; :meth:`Connection.send` checks that.
    """
    fast = _FAST_ENCODERS.get(type(msg))
    if fast is not None:
        return fast(msg)
    return _encode_generic(msg)


def _encode_generic(msg: Message) -> bytes:
    """The reference encoder, driven by the plan of ``msg``'s type."""
    plan = _PLAN_BY_CLASS.get(type(msg))
    if plan is None:
        raise TypeError(f"not a protocol message: {_short(msg)}")
    vals = list(plan.get(msg))
    for i, rule, field in plan.enc_rules:
        try:
            vals[i] = rule(vals[i])
        except _Bad as b:
            raise LocalProtocolError(b.code, f"{plan.where(field)}: {b.text}") from None
    if plan.size_idx is not None:
        size, data = vals[plan.size_idx], vals[plan.data_idx]
        if not isinstance(data, int) or data < 0 or data >> (size << 3):
            raise LocalProtocolError(
                _MALFORMED, f"{plan.where('data')}: {_short(data)} does not fit in size {size}"
            )
    nfixed = plan.nfixed
    strings = vals[nfixed:]
    lens = [len(s) for s in strings]
    for field, ln, limit in zip(plan.names[nfixed:], lens, plan.var_max):
        if ln > limit:
            raise LocalProtocolError(
                ErrorCode.OVERSIZED, f"{plan.where(field)}: {ln} bytes, at most {limit} fit"
            )
    plen = plan.fixed_size + sum(lens)
    if plen > ABSOLUTE_MAX_PAYLOAD:  # pragma: no cover - no v1 message can get there
        raise LocalProtocolError(ErrorCode.OVERSIZED, f"{plan.name}: {plen}-byte payload")
    try:
        head = plan.frame.pack(MAGIC_U16, plan.type, 0, plen, *vals[:nfixed], *lens)
    except struct.error:
        raise LocalProtocolError(_MALFORMED, _explain_pack_error(plan, vals)) from None
    return head + b"".join(strings) if strings else head


_IO_FRAME = _IO_PLAN.frame
_IO_T = int(MsgType.IO_REQUEST)
_KIND_OK = frozenset(_KINDS)
_DIR_OK = frozenset(_DIRS)


def encode_io_request(
    request_id: int,
    vm_id: int,
    client_id: int,
    offset: int,
    data: int,
    kind: AccessKind | int,
    size: int,
    direction: Direction | int,
    hops: int,
    server_id: str,
    device_id: str,
) -> bytes:
    """Encode an IO_REQUEST frame from plain values (arguments in wire order).

    Same result and same validation as ``encode(IoRequest(...))``, about twice as fast
    because no message object is built on the common path.
    """
    try:
        s = _OPT_ID_BYTES[server_id]
        d = _ID_BYTES[device_id]
        if (
            size in _IO_SIZES
            and kind in _KIND_OK
            and direction in _DIR_OK
            and data >= 0
            and not data >> (size << 3)
        ):
            ls = len(s)
            ld = len(d)
            return (
                _IO_FRAME.pack(
                    MAGIC_U16, _IO_T, 0, _IO_SIZE + ls + ld, request_id, vm_id,
                    client_id, offset, data, kind, size, direction, hops, ls, ld,
                )
                + s
                + d
            )
    except (KeyError, TypeError, struct.error):
        pass
    # Unusual: a new identifier (the generic path validates and caches it) or an
    # invalid value (the generic path names it).
    return _encode_generic(
        IoRequest(
            request_id=request_id, vm_id=vm_id, client_id=client_id, offset=offset,
            # Plain ints are allowed here: the generic encoder validates them by rule.
            data=data, kind=kind, size=size, direction=direction,  # type: ignore[arg-type]
            hops=hops, server_id=server_id, device_id=device_id,
        )
    )


_FB_FRAME = _FB_PLAN.frame
_FB_T = int(MsgType.FEEDBACK)
_STATUS_OK = frozenset(_STATUSES)


def encode_feedback(
    request_id: int,
    vm_id: int,
    client_id: int,
    status: Status | int,
    size: int,
    data: int,
) -> bytes:
    """Encode a FEEDBACK frame from plain values (arguments in wire order).

    Same result and validation as ``encode(Feedback(...))``, without the object.
    """
    try:
        if status in _STATUS_OK and size in _FB_SIZES and data >= 0 and not data >> (size << 3):
            return _FB_FRAME.pack(
                MAGIC_U16, _FB_T, 0, _FB_SIZE, request_id, vm_id, client_id, status, size, data
            )
    except (TypeError, struct.error):
        pass
    return _encode_generic(
        Feedback(
            request_id=request_id, vm_id=vm_id, client_id=client_id,
            status=status,  # type: ignore[arg-type]  # a plain int: validated by its rule
            size=size, data=data,
        )
    )


# encode() of the per-I/O message objects goes through the fast paths too (the
# attrgetters list the fields in wire order, which is the fast paths' argument order).
_IO_FIELDS = attrgetter(*_IO_PLAN.names)
_FB_FIELDS = attrgetter(*_FB_PLAN.names)
_FAST_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    IoRequest: lambda m: encode_io_request(*_IO_FIELDS(m)),
    Feedback: lambda m: encode_feedback(*_FB_FIELDS(m)),
}
