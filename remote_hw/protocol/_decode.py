"""The reference decoder: any payload, walked by its plan, every field validated.

This is the code that decides what is an error and how it is worded. The fast
decoders of the per-access messages (:mod:`._decoders`) accept exactly what this
accepts and hand it everything unusual, so there is one definition of "valid".

Raises :class:`~.errors.RemoteProtocolError` naming the message and field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from ._plans import _Plan
from ._rules import _Bad
from .errors import RemoteProtocolError
from .messages import PROTOCOL_MAJOR, PROTOCOL_MINOR, ErrorCode, Message

_MALFORMED = ErrorCode.MALFORMED


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
