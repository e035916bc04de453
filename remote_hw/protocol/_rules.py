"""Field rules: how each named field is validated and converted, both ways.

A rule is a pair (decode, encode). ``decode`` gets what struct unpacked (an int, or
the raw bytes of a trailing string) and returns the Python value for the message;
``encode`` gets the message's attribute and returns what struct packs (an int, or the
bytes of a trailing string). Both raise :class:`_Bad`, which the caller turns into a
protocol error naming the message and field. Fields without a rule are plain unsigned
integers whose range struct itself enforces.

Rules are looked up by field *name* (:data:`_RULES`, with per-message
:data:`_RULE_OVERRIDES`), so a new message with a ``device_id`` is validated like
every other without a line here. The identifier caches live here too, because they
are what makes the id rules cheap on the hot path.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from .messages import (
    ABSOLUTE_MAX_PAYLOAD,
    ID_CHARS,
    MAX_ID_LENGTH,
    PRE_HANDSHAKE_MAX_PAYLOAD,
    PROTOCOL_MAJOR,
    SHADOW_MAX_READS,
    AccessKind,
    Direction,
    ErrorCode,
    MsgType,
    Role,
    Status,
)

_MALFORMED = ErrorCode.MALFORMED
_BAD_ID = ErrorCode.BAD_ID


class _Bad(Exception):
    """Raised by a field rule; the caller adds the message and field name."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        self.code = code
        self.text = text


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
    # Only writes are posted: a read always needs its answer.
    (MsgType.POST, "direction"): _enum_rule(Direction, (Direction.WRITE,)),
}

def _shadowed_rule(value: Any) -> Any:
    # The shadowed registers' bytes share one u64, so at most eight can be described.
    if isinstance(value, int) and bin(value).count("1") > SHADOW_MAX_READS:
        raise _Bad(_MALFORMED, f"{value:#x} names more than {SHADOW_MAX_READS} registers")
    return value


_RULES["shadowed"] = (_shadowed_rule, _shadowed_rule)

_INT_LIMITS = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFF_FFFF, "Q": 0xFFFF_FFFF_FFFF_FFFF}
