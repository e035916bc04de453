"""The probes' data model, without bcc: constants, ranges, histograms, counters.

The constants repeat ``ebpf/remote_hw_events.h`` (``header_constants`` reads that file
so a test can check the two agree). Everything here is plain Python, usable where bcc
is missing. The header is read only when asked for, never at import: building the
command line's parser imports this module and must work wherever the package does.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote_hw import resources

HEADER = "remote_hw_events.h"

LAYOUT_VERSION = 2

KIND_PORT, KIND_MMIO = 0, 1
KIND_NAMES = {KIND_PORT: "port", KIND_MMIO: "mmio"}
KINDS = {v: k for k, v in KIND_NAMES.items()}

DIR_READ, DIR_WRITE = 0, 1
DIR_NAMES = {DIR_READ: "read", DIR_WRITE: "write"}
DIRS = {v: k for k, v in DIR_NAMES.items()}

CLS_UNMAPPED, CLS_REMOTE, CLS_LOCAL = 0, 1, 2
CLASS_NAMES = {CLS_UNMAPPED: "unmapped", CLS_REMOTE: "remote", CLS_LOCAL: "local"}
CLASSES = {v: k for k, v in CLASS_NAMES.items()}

EV_USERSPACE = 1

LINEAR_BUCKETS = 256
LOG_BUCKETS = 32
NBUCKETS = LINEAR_BUCKETS + LOG_BUCKETS

RANGE_FIXED_BITS = 96
RANGE_KEY_BITS = 160
LABEL_LEN = 40

CFG_TRACE, CFG_TGID = 0, 1
STAT_LOST_EVENTS, STAT_MAP_FULL = 0, 1

ADDR_LIMITS = {"port": 0xFFFF, "mmio": (1 << 64) - 1}

# name in this module -> name in the header
_HEADER_NAMES = {
    "LAYOUT_VERSION": "RHW_LAYOUT_VERSION",
    "KIND_PORT": "RHW_KIND_PORT", "KIND_MMIO": "RHW_KIND_MMIO",
    "DIR_READ": "RHW_DIR_READ", "DIR_WRITE": "RHW_DIR_WRITE",
    "CLS_UNMAPPED": "RHW_CLS_UNMAPPED", "CLS_REMOTE": "RHW_CLS_REMOTE",
    "CLS_LOCAL": "RHW_CLS_LOCAL", "EV_USERSPACE": "RHW_EV_USERSPACE",
    "LINEAR_BUCKETS": "RHW_LINEAR_BUCKETS", "LOG_BUCKETS": "RHW_LOG_BUCKETS",
    "RANGE_FIXED_BITS": "RHW_RANGE_FIXED_BITS", "RANGE_KEY_BITS": "RHW_RANGE_KEY_BITS",
    "LABEL_LEN": "RHW_LABEL_LEN", "CFG_TRACE": "RHW_CFG_TRACE", "CFG_TGID": "RHW_CFG_TGID",
    "STAT_LOST_EVENTS": "RHW_STAT_LOST_EVENTS", "STAT_MAP_FULL": "RHW_STAT_MAP_FULL",
}


def header_path() -> Path:
    """The shared header of this installation (see ``remote_hw.resources``)."""
    return resources.ebpf_dir() / HEADER


def header_constants(path: Path | None = None) -> dict[str, int]:
    """The integer ``#define``s of the shared header, by header name."""
    text = (path or header_path()).read_text()
    return {m.group(1): int(m.group(2), 0)
            for m in re.finditer(r"^#define\s+(RHW_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", text, re.M)}


def mismatched_constants(path: Path | None = None) -> list[str]:
    """Names whose value here differs from the header's (empty when they agree)."""
    consts = header_constants(path)
    return [f"{ours}={globals()[ours]} but {theirs}={consts.get(theirs)}"
            for ours, theirs in _HEADER_NAMES.items() if consts.get(theirs) != globals()[ours]]


_CTYPES = {"__u8": ctypes.c_uint8, "__u16": ctypes.c_uint16, "__u32": ctypes.c_uint32,
           "__u64": ctypes.c_uint64, "char": ctypes.c_char}


def header_struct(name: str, path: Path | None = None) -> type[ctypes.Structure]:
    """A ctypes class for ``struct NAME`` of the shared header, built from its text (so
    the Python and kernel layouts cannot drift apart). Fields: __u8/16/32/64 and char,
    scalars or arrays with a literal or RHW_ constant length."""
    text = (path or header_path()).read_text()
    consts = header_constants(path)
    m = re.search(r"struct\s+" + re.escape(name) + r"\s*\{(.*?)\};", text, re.S)
    if not m:
        raise KeyError(f"struct {name} is not in {HEADER}")
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    fields = []
    for decl in filter(None, (d.strip() for d in body.split(";"))):
        fm = re.fullmatch(r"(\w+)\s+(\w+)(?:\[(\w+)\])?", decl)
        if not fm or fm.group(1) not in _CTYPES:
            raise ValueError(f"struct {name}: cannot read field {decl!r}")
        ctype: Any = _CTYPES[fm.group(1)]  # a ctypes type, or an array type of it
        if fm.group(3):
            n = fm.group(3)
            ctype = ctype * (consts[n] if n in consts else int(n, 0))
        fields.append((fm.group(2), ctype))
    return type(name, (ctypes.Structure,), {"_fields_": fields})


# ---------------------------------------------------------------------- histogram

def bucket_of(ns: int) -> int:
    """The histogram bucket of a stall of ``ns`` nanoseconds (as the kernel side)."""
    us = ns // 1000
    if us < LINEAR_BUCKETS:
        return us
    return min(LINEAR_BUCKETS + us.bit_length() - 1 - 8, NBUCKETS - 1)


def bucket_bounds_us(b: int) -> tuple[int, int]:
    """[low, high) microseconds of bucket ``b``."""
    if b < LINEAR_BUCKETS:
        return b, b + 1
    k = b - LINEAR_BUCKETS
    return 1 << (8 + k), 1 << (9 + k)


class Histogram:
    """Stall counts per bucket (see ``bucket_of``)."""

    __slots__ = ("buckets",)

    def __init__(self, buckets: dict[int, int] | None = None) -> None:
        self.buckets: dict[int, int] = dict(buckets or {})

    def add(self, bucket: int, n: int = 1) -> None:
        if n:
            self.buckets[bucket] = self.buckets.get(bucket, 0) + n

    def add_ns(self, ns: int, n: int = 1) -> None:
        self.add(bucket_of(ns), n)

    def merge(self, other: Histogram) -> Histogram:
        for b, n in other.buckets.items():
            self.add(b, n)
        return self

    def minus(self, older: Histogram) -> Histogram:
        """What was added since ``older`` (a snapshot of the same counters)."""
        return Histogram({b: n - older.buckets.get(b, 0) for b, n in self.buckets.items()
                          if n - older.buckets.get(b, 0) > 0})

    @property
    def total(self) -> int:
        return sum(self.buckets.values())

    def percentile(self, p: float) -> float | None:
        """The upper bound in µs of the bucket holding the p-th percentile (0 < p <= 100);
        None for an empty histogram."""
        total = self.total
        if total == 0:
            return None
        want = max(1, -(-total * p // 100))         # ceil(total * p / 100)
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen >= want:
                return float(bucket_bounds_us(b)[1])
        return float(bucket_bounds_us(max(self.buckets))[1])  # pragma: no cover

    def mean_us(self) -> float | None:
        """Mean from bucket midpoints."""
        total = self.total
        if total == 0:
            return None
        return sum((sum(bucket_bounds_us(b)) / 2) * n for b, n in self.buckets.items()) / total

    def __repr__(self) -> str:
        return f"Histogram(total={self.total}, p50={self.percentile(50)})"


# ------------------------------------------------------------------------- ranges

@dataclass(frozen=True)
class RangeSpec:
    """A guest range whose class is known: ``cls`` is "remote" or "local"."""

    kind: str       # "port" or "mmio"
    start: int
    end: int        # inclusive
    label: str
    cls: str = "remote"

    @classmethod
    def of(cls, item: RangeSpec | tuple) -> RangeSpec:
        """From a RangeSpec or a tuple (kind, start, end[, label[, cls]])."""
        if isinstance(item, RangeSpec):
            spec = item
        else:
            t = tuple(item)
            if not 3 <= len(t) <= 5:
                raise ValueError(f"a range is (kind, start, end[, label[, class]]), got {t!r}")
            kind, start, end = t[:3]
            label = t[3] if len(t) > 3 else f"{kind}:{start:#x}-{end:#x}"
            spec = cls(kind, int(start), int(end), str(label), t[4] if len(t) > 4 else "remote")
        spec.check()
        return spec

    def check(self) -> None:
        if self.kind not in ADDR_LIMITS:
            raise ValueError(f"range kind must be port or mmio, not {self.kind!r}")
        if self.cls not in ("remote", "local"):
            raise ValueError(f"range class must be remote or local, not {self.cls!r}")
        if not 0 <= self.start <= self.end <= ADDR_LIMITS[self.kind]:
            raise ValueError(f"bad {self.kind} range {self.start:#x}-{self.end:#x}")

    def overlaps(self, other: RangeSpec) -> bool:
        return self.kind == other.kind and self.start <= other.end and other.start <= self.end


def check_disjoint(ranges: Iterable[RangeSpec]) -> None:
    by_kind: dict[str, list[RangeSpec]] = {}
    for r in ranges:
        by_kind.setdefault(r.kind, []).append(r)
    for rs in by_kind.values():
        rs.sort(key=lambda r: r.start)
        for a, b in zip(rs, rs[1:]):
            if a.end >= b.start:
                raise ValueError(f"ranges {a.label} ({a.start:#x}-{a.end:#x}) and {b.label} "
                                 f"({b.start:#x}-{b.end:#x}) overlap")


def range_prefixes(start: int, end: int, bits: int = 64) -> Iterator[tuple[int, int]]:
    """The (value, prefix length) pairs that cover [start, end] exactly, fewest first."""
    if not 0 <= start <= end < (1 << bits):
        raise ValueError(f"bad range {start:#x}-{end:#x}")
    while start <= end:
        # the largest aligned block starting at `start` that fits in [start, end]
        size = (start & -start) if start else 1 << bits
        while size > end - start + 1:
            size >>= 1
        yield start, bits - (size.bit_length() - 1)
        start += size


# ----------------------------------------------------------------------- counters

@dataclass
class CountRow:
    """The counters of one (VM, device range or address, class, direction)."""

    tgid: int
    vm: int
    kind: int
    cls: int
    dir: int
    addr: int
    accesses: int = 0
    exits: int = 0

    @property
    def key(self) -> tuple[int, int, int, int, int, int]:
        return (self.tgid, self.vm, self.kind, self.cls, self.dir, self.addr)

    @property
    def class_name(self) -> str:
        return CLASS_NAMES.get(self.cls, str(self.cls))

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, str(self.kind))

    @property
    def dir_name(self) -> str:
        return DIR_NAMES.get(self.dir, str(self.dir))


@dataclass
class Snapshot:
    """Counters and histograms read at one moment (``time`` in monotonic seconds)."""

    time: float
    counts: dict[tuple, CountRow] = field(default_factory=dict)
    # (tgid, vm, kind, cls, addr) -> Histogram
    hists: dict[tuple[int, int, int, int, int], Histogram] = field(default_factory=dict)


def class_totals(rows: Iterable[CountRow], *, tgid: int | None = None,
                 vm: int | None = None) -> dict[str, int]:
    """Accesses per class name, optionally for one process / VM."""
    out = {name: 0 for name in CLASS_NAMES.values()}
    for r in rows:
        if (tgid is None or r.tgid == tgid) and (vm is None or r.vm == vm):
            out[r.class_name] += r.accesses
    return out


def address_text(kind: int, addr: int, cls: int) -> str:
    """How an unlabelled counter address reads: ``port 0x3ff`` / ``mmio page 0xd0000``."""
    if kind == KIND_PORT:
        return f"port {addr:#x}"
    return f"mmio page {addr:#x}" if cls == CLS_UNMAPPED else f"mmio {addr:#x}"
