"""Each message's layout compiled once, at import, into what the codec walks.

:data:`~.messages.MESSAGES` says what a message is (class, fixed-part struct, trailing
strings); a ``_Plan`` says how to handle it: field names in wire order, which rule
(:mod:`._rules`) applies to which field, where the reserved bytes are, one struct for
header and fixed part together, and a constructor that skips the frozen dataclass's
``__init__``. Doing this once keeps the per-message code in :mod:`._decode` and
:mod:`._encode` to a loop over precomputed lists.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import fields
from operator import attrgetter
from typing import Any

from ._rules import _INT_LIMITS, _RULE_OVERRIDES, _RULES
from .messages import HEADER, MESSAGES, Message, MessageSpec, MsgType


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
