"""What the agent uses: publish the ranges it forwards, read who touches what.

    session = ProbeSession.open(optional=True)      # never raises when optional
    session.publish_vm(handle.vm, handle.config.maps, vm_id=handle.config.vm_id)
    ...
    for line in session.vm_lines() + session.report_lines():
        log.info("%s", line)
    session.close()

A session whose probes cannot run (``optional=True``) has ``available == False``,
``reason`` set to the one-sentence why, and methods that do nothing and return empty
results, so the agent needs no special case.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import model as M
from .loader import KvmProbe, ProbeUnavailable
from .model import CountRow, Histogram, RangeSpec

log = logging.getLogger("remote_hw.probes")

RangeLike = RangeSpec | tuple


def vcpu_tids(vm: Any) -> list[int]:
    """The thread ids of a remote_hw Vm's vCPU threads (or ``vm.vcpu_tids``)."""
    tids = getattr(vm, "vcpu_tids", None)
    if tids is not None:
        return [int(t) for t in (tids() if callable(tids) else tids)]
    thread = getattr(getattr(vm, "_vt", None), "_thread", None)
    tid = getattr(thread, "native_id", None)
    return [tid] if isinstance(tid, int) and tid > 0 else []


def ranges_of_maps(maps: Iterable[Any], *,
                   debug_exit_port: int | None = 0xF4) -> list[RangeSpec]:
    """RangeSpecs for the agent's MapSpecs (remote, labelled SERVER/DEVICE) and the
    debug-exit port (local)."""
    out = [RangeSpec(spec.kind, spec.start, spec.end, f"{spec.server}/{spec.device}", "remote")
           for spec in maps]
    if debug_exit_port is not None:
        out.append(RangeSpec("port", debug_exit_port, debug_exit_port, "debug-exit", "local"))
    return out


@dataclass
class ReportRow:
    """Accesses of one VM to one device range (or unmapped address) since the start."""

    pid: int
    process: str
    vm: int
    cls: str
    device: str
    reads: int
    writes: int
    stall_p50_us: float | None
    stall_p99_us: float | None


class ProbeSession:
    """The agent's view of the kvm access probes (see the module docstring)."""

    available = True
    reason = ""

    def __init__(self, probe: KvmProbe) -> None:
        self.probe = probe
        self._mine: set[tuple[int, int]] = set()

    @classmethod
    def open(cls, optional: bool = False, *, pin: bool = True) -> ProbeSession:
        """Compile and attach the probes. With ``optional``, a host where they cannot
        run gives a disabled session (and one warning) instead of ProbeUnavailable."""
        try:
            probe = KvmProbe(pin=pin)
        except ProbeUnavailable as e:
            if not optional:
                raise
            log.warning("eBPF probes are off: %s", e)
            return DisabledProbeSession(str(e))
        return cls(probe)

    # ------------------------------------------------------------------ publishing

    def publish_ranges(self, pid: int, ranges: Iterable[RangeLike], *, vm_id: int = 0,
                       vcpu_tids: Iterable[int] = ()) -> list[RangeSpec]:
        """Replace the ranges of process ``pid`` (VM ``vm_id`` of it; 0: all its VMs).

        ``ranges``: RangeSpecs or tuples (kind 'port'|'mmio', start, end_inclusive,
        label[, 'remote'|'local']); the class defaults to remote. ``vcpu_tids`` are the
        thread ids of that VM's vCPU threads (in ``pid``), so accesses are told apart
        per VM within one process. pid 0 publishes host-wide ranges (for every process
        that has no range of its own at an address)."""
        specs = self.probe.publish(pid, ranges, vm=vm_id, vcpu_tids=vcpu_tids)
        self._mine.add((pid, vm_id))
        return specs

    def publish_vm(self, vm: Any, maps: Iterable[Any], *, vm_id: int,
                   pid: int | None = None) -> list[RangeSpec]:
        """Publish an agent VM: its MapSpecs as remote ranges, its debug-exit port as
        local, its vCPU threads as VM ``vm_id`` of this process."""
        port = getattr(getattr(vm, "bus", None), "debug_exit_port", 0xF4)
        return self.publish_ranges(os.getpid() if pid is None else pid,
                                   ranges_of_maps(maps, debug_exit_port=port),
                                   vm_id=vm_id, vcpu_tids=vcpu_tids(vm))

    def unpublish(self, pid: int, vm_id: int | None = None) -> None:
        self.probe.unpublish(pid, vm_id)
        self._mine = {m for m in self._mine if not (m[0] == pid and vm_id in (None, m[1]))}

    # ------------------------------------------------------------------ reading

    def counts(self, pid: int | None = None, vm_id: int | None = None) -> list[CountRow]:
        """Counter rows since the probes were attached (every VM on the host)."""
        return [r for r in self.probe.counts()
                if (pid is None or r.tgid == pid) and (vm_id is None or r.vm == vm_id)]

    def class_totals(self, pid: int | None = None,
                     vm_id: int | None = None) -> dict[str, int]:
        """{'remote': n, 'local': n, 'unmapped': n} accesses."""
        return M.class_totals(self.probe.counts(), tgid=pid, vm=vm_id)

    def stall_histograms(self, pid: int | None = None,
                         vm_id: int | None = None) -> dict[str, Histogram]:
        """Stall histograms per class name (accesses that went out to the monitor)."""
        out = {name: Histogram() for name in M.CLASS_NAMES.values()}
        for (tgid, vm, _kind, cls, _addr), h in self.probe.histograms().items():
            if (pid is None or tgid == pid) and (vm_id is None or vm == vm_id):
                out[M.CLASS_NAMES[cls]].merge(h)
        return out

    def report(self, classes: Iterable[str] = ("remote",)) -> list[ReportRow]:
        """Which VMs (any monitor on the host) touched which devices of ``classes``."""
        want = {M.CLASSES[c] for c in classes}
        hists = self.probe.histograms()
        rows: dict[tuple, ReportRow] = {}
        hist_of: dict[tuple, Histogram] = {}
        for r in self.probe.counts():
            if r.cls not in want:
                continue
            key = (r.tgid, r.vm, r.kind, r.cls, r.addr)
            row = rows.get(key)
            if row is None:
                row = rows[key] = ReportRow(
                    r.tgid, self.probe.process_name(r.tgid), r.vm, r.class_name,
                    self.probe.label(r.tgid, r.vm, r.kind, r.addr, r.cls), 0, 0, None, None)
                hist_of[key] = hists.get(key, Histogram())
            if r.dir == M.DIR_READ:
                row.reads += r.accesses
            else:
                row.writes += r.accesses
        for key, row in rows.items():
            row.stall_p50_us = hist_of[key].percentile(50)
            row.stall_p99_us = hist_of[key].percentile(99)
        return sorted(rows.values(), key=lambda r: (r.pid, r.vm, r.device))

    def report_lines(self, classes: Iterable[str] = ("remote",)) -> list[str]:
        def us(v: float | None) -> str:
            return "-" if v is None else f"{v:g}us"
        return [f"pid {r.pid} ({r.process}) vm {r.vm}: {r.cls} {r.device}: "
                f"{r.reads} reads, {r.writes} writes, stall p50 {us(r.stall_p50_us)} "
                f"p99 {us(r.stall_p99_us)}" for r in self.report(classes)]

    def vm_lines(self) -> list[str]:
        """One line per VM seen on the host (any monitor): accesses per class."""
        per_vm: dict[tuple[int, int], dict[str, int]] = {}
        for r in self.probe.counts():
            t = per_vm.setdefault((r.tgid, r.vm), {c: 0 for c in M.CLASS_NAMES.values()})
            t[r.class_name] += r.accesses
        return [f"pid {pid} ({self.probe.process_name(pid)}) vm {vm}: {t['remote']} remote, "
                f"{t['local']} local, {t['unmapped']} unmapped accesses"
                for (pid, vm), t in sorted(per_vm.items())]

    def close(self) -> None:
        """Withdraw this session's ranges and detach the probes."""
        for pid, vm in list(self._mine):
            try:
                self.probe.unpublish(pid, vm)
            except Exception:  # pragma: no cover - best effort at shutdown
                log.debug("unpublish %d/%d failed", pid, vm, exc_info=True)
        self._mine.clear()
        self.probe.close()

    def __enter__(self) -> ProbeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DisabledProbeSession(ProbeSession):
    """A session on a host where the probes cannot run: everything is a no-op."""

    available = False

    def __init__(self, reason: str) -> None:  # noqa: D107 - no probe behind it
        self.reason = reason
        self._mine = set()

    def publish_ranges(self, pid, ranges, *, vm_id=0, vcpu_tids=()):
        return [RangeSpec.of(r) for r in ranges]

    def publish_vm(self, vm, maps, *, vm_id, pid=None):
        return ranges_of_maps(maps)

    def unpublish(self, pid, vm_id=None):
        pass

    def counts(self, pid=None, vm_id=None):
        return []

    def class_totals(self, pid=None, vm_id=None):
        return {name: 0 for name in M.CLASS_NAMES.values()}

    def stall_histograms(self, pid=None, vm_id=None):
        return {name: Histogram() for name in M.CLASS_NAMES.values()}

    def report(self, classes=("remote",)):
        return []

    def vm_lines(self):
        return []

    def close(self) -> None:
        pass
