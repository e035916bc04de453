"""Filters and text of ``remote-hw trace`` and ``remote-hw top`` (no bcc, no I/O).

Events and counters come in as plain values (an ``rhw_access_event`` ctypes struct or
anything with the same attributes; ``Snapshot``s), names and labels through callables,
so everything here runs in unit tests without a kernel.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import model as M
from .model import Histogram, Snapshot

NameOf = Callable[[int], str]                              # tgid -> process name
LabelOf = Callable[[int, int, int, int, int], str]         # tgid, vm, kind, addr, cls


# ------------------------------------------------------------------------ filters

@dataclass(frozen=True)
class VmSelector:
    """``PID``, ``PID/VM`` or a process name (shell pattern allowed)."""

    pid: int | None = None
    vm: int | None = None
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> VmSelector:
        text = text.strip()
        if not text:
            raise ValueError("an empty VM selector")
        head, sep, tail = text.partition("/")
        if head.isdigit():
            if sep and not tail.isdigit():
                raise ValueError(f"{text!r}: the VM after '/' must be a number")
            return cls(pid=int(head), vm=int(tail) if sep else None)
        if sep:
            raise ValueError(f"{text!r}: use PID/VM with a numeric pid")
        return cls(name=text)

    def matches(self, tgid: int, vm: int, process: str) -> bool:
        if self.name is not None:
            return fnmatch.fnmatchcase(process, self.name)
        return tgid == self.pid and (self.vm is None or vm == self.vm)


@dataclass(frozen=True)
class DeviceSelector:
    """``port:START[-END]`` / ``mmio:START[-END]`` (overlapping accesses) or a piece of
    a device label such as ``a/uart0`` (case-insensitive)."""

    kind: int | None = None
    start: int = 0
    end: int = 0
    text: str | None = None

    @classmethod
    def parse(cls, text: str) -> DeviceSelector:
        text = text.strip()
        if not text:
            raise ValueError("an empty device selector")
        kind, sep, rest = text.partition(":")
        if sep and kind in M.KINDS:
            lo, dash, hi = rest.partition("-")
            try:
                start = int(lo, 0)
                end = int(hi, 0) if dash else start
            except ValueError:
                raise ValueError(f"{text!r}: addresses must be numbers, e.g. "
                                 f"{kind}:0x3f8-0x3ff") from None
            if end < start:
                raise ValueError(f"{text!r}: the end is below the start")
            return cls(kind=M.KINDS[kind], start=start, end=end)
        return cls(text=text.lower())

    def matches(self, kind: int, addr: int, size: int, count: int, label: str) -> bool:
        if self.text is not None:
            return self.text in label.lower()
        last = addr + max(size, 1) * max(count, 1) - 1 if kind == M.KIND_MMIO else addr
        return kind == self.kind and addr <= self.end and last >= self.start


@dataclass
class EventFilter:
    """What ``trace`` shows and ``top`` counts: any VM / device / direction / kind /
    class listed (an empty list allows all)."""

    vms: list[VmSelector] = field(default_factory=list)
    devices: list[DeviceSelector] = field(default_factory=list)
    dirs: set[int] = field(default_factory=set)
    kinds: set[int] = field(default_factory=set)
    classes: set[int] = field(default_factory=set)

    @classmethod
    def from_args(cls, vms: Iterable[str] = (), devices: Iterable[str] = (),
                  dirs: Iterable[str] = (), kinds: Iterable[str] = (),
                  classes: Iterable[str] = ()) -> EventFilter:
        return cls([VmSelector.parse(v) for v in vms],
                   [DeviceSelector.parse(d) for d in devices],
                   {M.DIRS[d] for d in dirs}, {M.KINDS[k] for k in kinds},
                   {M.CLASSES[c] for c in classes})

    def kernel_tgid(self) -> int:
        """The one process the kernel may filter on (0: no kernel-side filter)."""
        pids = {s.pid for s in self.vms}
        if len(self.vms) >= 1 and len(pids) == 1 and None not in pids:
            return pids.pop()  # type: ignore[return-value]
        return 0

    def wants_vm(self, tgid: int, vm: int, process: str) -> bool:
        return not self.vms or any(s.matches(tgid, vm, process) for s in self.vms)

    def wants(self, *, tgid: int, vm: int, process: str, kind: int, dir: int, cls: int,
              addr: int, size: int, count: int, label: str) -> bool:
        if self.dirs and dir not in self.dirs:
            return False
        if self.kinds and kind not in self.kinds:
            return False
        if self.classes and cls not in self.classes:
            return False
        if not self.wants_vm(tgid, vm, process):
            return False
        return not self.devices or any(d.matches(kind, addr, size, count, label)
                                       for d in self.devices)

    def wants_event(self, ev: Any, process: str, label: str) -> bool:
        return self.wants(tgid=ev.tgid, vm=ev.vm, process=process, kind=ev.kind, dir=ev.dir,
                          cls=ev.cls, addr=ev.addr, size=ev.size, count=ev.count,
                          label=label)


# -------------------------------------------------------------------------- trace

TRACE_HEADER = (f"{'TIME(s)':>12} {'PID':>7} {'VM':>3} {'PROCESS':<15} {'KIND':<4} "
                f"{'DIR':<5} {'ADDRESS':>12} {'SZ':>2} {'COUNT':>5} {'VALUE':>18} "
                f"{'CLASS':<8} {'STALL(us)':>9}  DEVICE")


def format_event(ev: Any, t0_ns: int, process: str, label: str) -> str:
    """One line of ``remote-hw trace``."""
    stall = f"{ev.stall_ns / 1000:.1f}" if ev.flags & M.EV_USERSPACE else "-"
    value = f"{ev.val:#x}" if ev.size else "-"
    return (f"{(ev.ts_ns - t0_ns) / 1e9:12.6f} {ev.tgid:>7} {ev.vm:>3} {process[:15]:<15} "
            f"{M.KIND_NAMES.get(ev.kind, '?'):<4} {M.DIR_NAMES.get(ev.dir, '?'):<5} "
            f"{ev.addr:>#12x} {ev.size:>2} {ev.count:>5} {value:>18} "
            f"{M.CLASS_NAMES.get(ev.cls, '?'):<8} {stall:>9}  {label}")


# ---------------------------------------------------------------------------- top

def _us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v < 10000 else f"{v / 1000:.0f}ms"


def _pcts(h: Histogram) -> tuple[str, str, str]:
    return _us(h.percentile(50)), _us(h.percentile(90)), _us(h.percentile(99))


@dataclass
class VmRow:
    tgid: int
    vm: int
    process: str
    rates: dict[str, float]      # class name -> accesses/s
    stall: Histogram             # interval stall of its accesses handled in user space

    @property
    def total(self) -> float:
        return sum(self.rates.values())


@dataclass
class DeviceRow:
    tgid: int
    vm: int
    process: str
    device: str
    cls: str
    reads: float                 # accesses/s
    writes: float
    stall: Histogram

    @property
    def total(self) -> float:
        return self.reads + self.writes


def top_rows(prev: Snapshot, cur: Snapshot, name_of: NameOf, label_of: LabelOf,
             flt: EventFilter | None = None) -> tuple[list[VmRow], list[DeviceRow]]:
    """Per-VM and per-device rates over [prev, cur], busiest first."""
    flt = flt or EventFilter()
    dt = max(cur.time - prev.time, 1e-9)
    vms: dict[tuple[int, int], VmRow] = {}
    devs: dict[tuple[int, int, int, int, int], DeviceRow] = {}
    for key, row in cur.counts.items():
        old = prev.counts.get(key)
        n = row.accesses - (old.accesses if old else 0)
        if n <= 0:
            continue
        process = name_of(row.tgid)
        label = label_of(row.tgid, row.vm, row.kind, row.addr, row.cls)
        if not flt.wants(tgid=row.tgid, vm=row.vm, process=process, kind=row.kind,
                         dir=row.dir, cls=row.cls, addr=row.addr, size=1, count=1,
                         label=label):
            continue
        hkey = (row.tgid, row.vm, row.kind, row.cls, row.addr)
        hist = cur.hists.get(hkey, Histogram()).minus(prev.hists.get(hkey, Histogram()))
        v = vms.get((row.tgid, row.vm))
        if v is None:
            v = vms[(row.tgid, row.vm)] = VmRow(
                row.tgid, row.vm, process, {c: 0.0 for c in M.CLASS_NAMES.values()},
                Histogram())
        v.rates[row.class_name] += n / dt
        d = devs.get(hkey)
        if d is None:
            d = devs[hkey] = DeviceRow(row.tgid, row.vm, process, label, row.class_name,
                                       0.0, 0.0, hist)
            v.stall.merge(hist)
        if row.dir == M.DIR_READ:
            d.reads += n / dt
        else:
            d.writes += n / dt
    return (sorted(vms.values(), key=lambda r: (-r.total, r.tgid, r.vm)),
            sorted(devs.values(), key=lambda r: (-r.total, r.tgid, r.vm, r.device)))


def render_top(prev: Snapshot, cur: Snapshot, name_of: NameOf, label_of: LabelOf,
               flt: EventFilter | None = None, *, limit: int = 20,
               stats: dict[str, int] | None = None) -> str:
    """One frame of ``remote-hw top``: a summary line, the VM table, the device table."""
    vms, devs = top_rows(prev, cur, name_of, label_of, flt)
    dt = cur.time - prev.time
    total = {c: sum(v.rates[c] for v in vms) for c in M.CLASS_NAMES.values()}
    lines = [f"remote-hw top: {len(vms)} VM(s) with accesses in the last {dt:.1f}s; "
             f"{sum(total.values()):.0f}/s (remote {total['remote']:.0f}, local "
             f"{total['local']:.0f}, unmapped {total['unmapped']:.0f})"
             + (f"; lost {stats.get('map_full', 0)}" if stats and stats.get("map_full")
                else ""),
             "",
             f"{'PID':>7} {'VM':>3} {'PROCESS':<15} {'ACCESS/s':>9} {'REMOTE/s':>9} "
             f"{'LOCAL/s':>9} {'UNMAP/s':>9}  {'STALL us p50':>12} {'p90':>5} {'p99':>5}"]
    for v in vms[:limit]:
        p50, p90, p99 = _pcts(v.stall)
        lines.append(f"{v.tgid:>7} {v.vm:>3} {v.process[:15]:<15} {v.total:>9.0f} "
                     f"{v.rates['remote']:>9.0f} {v.rates['local']:>9.0f} "
                     f"{v.rates['unmapped']:>9.0f}  {p50:>12} {p90:>5} {p99:>5}")
    if not vms:
        lines.append("    (no guest accesses)")
    lines += ["",
              f"{'DEVICE':<28} {'CLASS':<8} {'PID':>7} {'VM':>3} {'READ/s':>9} "
              f"{'WRITE/s':>9}  {'STALL us p50':>12} {'p90':>5} {'p99':>5}"]
    for d in devs[:limit]:
        p50, p90, p99 = _pcts(d.stall)
        lines.append(f"{d.device[:28]:<28} {d.cls:<8} {d.tgid:>7} {d.vm:>3} "
                     f"{d.reads:>9.0f} {d.writes:>9.0f}  {p50:>12} {p90:>5} {p99:>5}")
    if len(devs) > limit:
        lines.append(f"    ({len(devs) - limit} more)")
    return "\n".join(lines)
