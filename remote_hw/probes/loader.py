"""Loads ebpf/kvm_access.bpf.c with bcc and reads its maps.

bcc's Python module comes from Debian's python3-bpfcc in /usr/lib/python3/dist-packages
(pure Python over libbcc). That directory is appended to ``sys.path`` only for the
import of ``bcc`` and removed again, so it never shadows this interpreter's packages.

Every reason the probes cannot run becomes :class:`ProbeUnavailable` with one sentence
that says why (and, where it helps, what to run).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from remote_hw import resources

from . import model as M
from .model import CountRow, Histogram, RangeSpec, Snapshot

BCC_PATH = "/usr/lib/python3/dist-packages"
TRACEFS = "/sys/kernel/tracing"
BPFFS = "/sys/fs/bpf"
PIN_DIR = f"{BPFFS}/remote_hw/v{M.LAYOUT_VERSION}"
SOURCE = "kvm_access.bpf.c"
INSTALL_HINT = "run scripts/install_bpf.sh as root"

# Attach order matters (see kvm_access.bpf.c): KVM_RUN entry and exits first. The entry
# is kvm_fpu(load); where a kernel lacks it, the KVM_RUN ioctl's syscall tracepoint.
ENTRY_KVM_FPU = "kvm:kvm_fpu"
ENTRY_SYSCALL = "syscalls:sys_enter_ioctl"
TRACEPOINTS = ["kvm:kvm_userspace_exit", "kvm:kvm_pio", "kvm:kvm_mmio", "kvm:kvm_fast_mmio"]

_bcc_module: Any = None
_bcc_lock = threading.Lock()


class ProbeUnavailable(RuntimeError):
    """The eBPF probes cannot run here; ``str()`` is one sentence saying why."""


def import_bcc() -> Any:
    """The ``bcc`` module, imported from Debian's dist-packages if need be."""
    global _bcc_module
    with _bcc_lock:
        if _bcc_module is not None:
            return _bcc_module
        added = BCC_PATH not in sys.path
        if added:
            sys.path.append(BCC_PATH)
        try:
            import bcc
        except ImportError as e:
            raise ProbeUnavailable(
                f"bcc's Python module cannot be imported ({e}); {INSTALL_HINT} to install "
                "python3-bpfcc") from None
        except OSError as e:  # libbcc.so missing or broken
            raise ProbeUnavailable(f"bcc's library cannot be loaded ({e}); {INSTALL_HINT}") \
                from None
        finally:
            if added:
                try:
                    sys.path.remove(BCC_PATH)
                except ValueError:  # pragma: no cover
                    pass
        _bcc_module = bcc
        return bcc


def _mount(fstype: str, target: str) -> bool:
    """mount -t fstype none target, through libc (no mount(8) needed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.mount(fstype.encode(), target.encode(), fstype.encode(), 0, None) == 0


def _is_mounted(target: str, fstype: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == target and line.split()[2] == fstype for line in f)
    except OSError:  # pragma: no cover
        return False


def check_environment() -> None:
    """Raise ProbeUnavailable for what is certainly missing before compiling."""
    if os.geteuid() != 0:
        raise ProbeUnavailable("the eBPF probes need root (to load BPF programs and attach "
                               "to kernel tracepoints); run this command as root")
    if not os.path.isdir(f"{TRACEFS}/events"):
        if not (os.path.isdir(TRACEFS) and _mount("tracefs", TRACEFS)):
            raise ProbeUnavailable(f"tracefs is not mounted at {TRACEFS} and cannot be "
                                   "mounted, so the kvm tracepoints cannot be found")
    for event in ("kvm/kvm_pio", "kvm/kvm_mmio", "kvm/kvm_userspace_exit"):
        if not os.path.isdir(f"{TRACEFS}/events/{event}"):
            what = "kvm"
            raise ProbeUnavailable(
                f"this kernel has no {event} tracepoint (is the {what} tracing support "
                "built in and the kvm module loaded?), so guest accesses cannot be seen")
    if not any(os.path.isdir(f"{TRACEFS}/events/{tp.replace(':', '/')}")
               for tp in (ENTRY_KVM_FPU, ENTRY_SYSCALL)):
        raise ProbeUnavailable("this kernel has neither the kvm_fpu nor the sys_enter_ioctl "
                               "tracepoint, so the re-entry into a guest cannot be seen")
    build = Path("/lib/modules") / platform.release() / "build"
    if not build.is_dir():
        raise ProbeUnavailable(f"there are no kernel headers at {build} for bcc to compile "
                               f"the probes against; {INSTALL_HINT}")


def pin_dir() -> str | None:
    """The directory of the pinned (shared) maps, mounting bpffs if need be; None if
    maps cannot be pinned here (then ranges are seen only by this process's probe)."""
    if not _is_mounted(BPFFS, "bpf"):
        if not (os.path.isdir(BPFFS) and _mount("bpf", BPFFS)):
            return None
    try:
        os.makedirs(PIN_DIR, exist_ok=True)
    except OSError:
        return None
    return PIN_DIR


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no diagnostic"


def process_starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None if no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(")") + 2:].split()[19])


def process_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


class KvmProbe:
    """The kvm access probes, attached from construction until ``close()``.

    ``pin=True`` shares the ranges and vCPU maps through bpffs with every other loader
    on the host (the agent publishes, ``remote-hw trace``/``top`` read them).
    """

    def __init__(self, *, pin: bool = True, ebpf_dir: Path | None = None,
                 entry: str | None = None) -> None:
        check_environment()
        bcc = import_bcc()
        src_dir = Path(os.environ.get("REMOTE_HW_EBPF_DIR") or ebpf_dir
                       or resources.ebpf_dir())
        source = src_dir / SOURCE
        for needed in (source, src_dir / M.HEADER):
            if not needed.is_file():
                raise ProbeUnavailable(f"the probe source {needed} is missing from this "
                                       "installation")
        # the event layout comes from the header compiled into the probes, read here
        # (not at import: building the command line must not depend on the file)
        self.event_type = M.header_struct("rhw_access_event", src_dir / M.HEADER)
        cflags = [f"-I{src_dir}", "-Wno-unused-function"]
        self.pin_dir = pin_dir() if pin else None
        if self.pin_dir:
            cflags.append(f'-DRHW_PIN_DIR="{self.pin_dir}"')

        def exists(tp: str) -> bool:
            return os.path.isdir(f"{TRACEFS}/events/{tp.replace(':', '/')}")
        # where a KVM_RUN starts: kvm_fpu(load), or the ioctl's syscall tracepoint
        self.entry = (entry or os.environ.get("REMOTE_HW_PROBE_ENTRY")
                      or (ENTRY_KVM_FPU if exists(ENTRY_KVM_FPU) else ENTRY_SYSCALL))
        if self.entry not in (ENTRY_KVM_FPU, ENTRY_SYSCALL) or not exists(self.entry):
            raise ProbeUnavailable(f"the KVM_RUN entry tracepoint {self.entry} is not "
                                   f"one of {ENTRY_KVM_FPU} and {ENTRY_SYSCALL} on this "
                                   "kernel")
        if self.entry == ENTRY_SYSCALL:
            cflags.append("-DRHW_RUN_FROM_SYSCALL")
        self.tracepoints = [self.entry] + [tp for tp in TRACEPOINTS if exists(tp)]
        if "kvm:kvm_fast_mmio" in self.tracepoints:
            cflags.append("-DRHW_HAVE_FAST_MMIO")
        self._lock = threading.Lock()
        self.bpf = self._compile(bcc, source, cflags)
        self._attach(self.tracepoints)
        self.ranges = self.bpf[b"ranges"]
        self.vcpu_vm = self.bpf[b"vcpu_vm"]
        self.pubs = self.bpf[b"pubs"]
        self.generation = self.bpf[b"generation"]
        self._counts = self.bpf[b"counts"]
        self._hist = self.bpf[b"stall_hist"]
        self._config = self.bpf[b"config"]
        self._stats = self.bpf[b"stats"]
        self._procs = self.bpf[b"procs"]
        self._labels: dict[tuple[int, int, int, int], str] = {}
        self._names: dict[int, str] = {}
        self._ring_open = False
        self._callback_error: BaseException | None = None
        self._paused = False
        self.closed = False
        self.prune()

    @staticmethod
    def _compile(bcc: Any, source: Path, cflags: list[str]) -> Any:
        """BPF(src_file=...) with clang's diagnostics caught for the one-line reason."""
        with tempfile.TemporaryFile(mode="w+") as err:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(err.fileno(), 2)
            try:
                try:
                    return bcc.BPF(src_file=str(source).encode(), cflags=cflags)
                except Exception as first:
                    # two loaders creating the same pinned map at once: the loser retries
                    if "pin" not in str(first).lower():
                        raise
                    time.sleep(0.2)
                    return bcc.BPF(src_file=str(source).encode(), cflags=cflags)
            except Exception as e:
                os.dup2(saved, 2)
                err.seek(0)
                detail = _first_error(err.read() or str(e))
                build = Path("/lib/modules") / platform.release() / "build"
                raise ProbeUnavailable(
                    f"bcc could not compile or load the kvm probes against the kernel "
                    f"headers at {build} ({detail})") from None
            finally:
                os.dup2(saved, 2)
                os.close(saved)

    # ------------------------------------------------------------------ ranges

    def _range_key(self, tgid: int, vm: int, kind: int, addr: int, prefix: int) -> Any:
        k = self.ranges.Key()
        k.prefixlen = M.RANGE_FIXED_BITS + prefix
        k.tgid, k.vm, k.kind = tgid, vm, kind
        k.addr_be = int.from_bytes(addr.to_bytes(8, "big"), "little")
        return k

    def publish(self, tgid: int, ranges: Iterable[RangeSpec | tuple], *, vm: int = 0,
                vcpu_tids: Iterable[int] = ()) -> list[RangeSpec]:
        """Replace the ranges of (tgid, vm) with ``ranges``; mark the threads
        ``vcpu_tids`` of that process as VM ``vm``'s vCPUs. tgid 0 publishes host-wide
        ranges (for every process that has none of its own at an address)."""
        specs = [RangeSpec.of(r) for r in ranges]
        M.check_disjoint(specs)
        starttime = process_starttime(tgid) if tgid else 0
        if tgid and starttime is None:
            raise ValueError(f"no process {tgid}")
        with self._lock:
            self._delete_ranges(lambda k: k.tgid == tgid and k.vm == vm)
            for spec in specs:
                kind = M.KINDS[spec.kind]
                val = self.ranges.Leaf()
                val.start, val.end, val.starttime = spec.start, spec.end, starttime
                val.cls = M.CLASSES[spec.cls]
                val.label = spec.label.encode()[:M.LABEL_LEN - 1]
                for value, prefix in M.range_prefixes(spec.start, spec.end):
                    self.ranges[self._range_key(tgid, vm, kind, value, prefix)] = val
                self._labels[(tgid, vm, kind, spec.start)] = spec.label
            for tid in vcpu_tids:
                v = self.vcpu_vm.Leaf()
                v.tgid, v.vm = tgid, vm
                self.vcpu_vm[ctypes.c_uint32(int(tid))] = v
            self._bump(tgid)
        return specs

    def _bump(self, tgid: int) -> None:
        """Note whether ``tgid`` has published anything (the entry goes when nothing is
        left) and start a new generation, so vCPU threads look things up again."""
        key = ctypes.c_uint32(tgid)
        has = (any(k.tgid == tgid for k in self.ranges)
               or any(v.tgid == tgid for v in self.vcpu_vm.values()))
        if has:
            val = self.pubs.Leaf()
            val.flags = 1
            self.pubs[key] = val
        else:
            self._delete(self.pubs, key)
        # a value never used before (two publishers at once cannot both write the old)
        self.generation[ctypes.c_int(0)] = ctypes.c_uint64(
            int.from_bytes(os.urandom(8), "little") | 1)

    def unpublish(self, tgid: int, vm: int | None = None) -> None:
        """Remove the ranges (and vCPU threads) of a process, or of one VM of it."""
        with self._lock:
            self._delete_ranges(lambda k: k.tgid == tgid and (vm is None or k.vm == vm))
            for k, v in list(self.vcpu_vm.items()):
                if v.tgid == tgid and (vm is None or v.vm == vm):
                    self._delete(self.vcpu_vm, k)
            self._bump(tgid)

    @staticmethod
    def _delete(table: Any, key: Any) -> None:
        try:
            del table[key]
        except KeyError:
            pass

    def _delete_ranges(self, match: Callable[[Any], bool]) -> None:
        for k in [k for k in self.ranges if match(k)]:
            self._delete(self.ranges, k)

    def published(self) -> list[tuple[int, int, RangeSpec]]:
        """(tgid, vm, range) of every published range, host-wide."""
        seen: dict[tuple[int, int, int, int], tuple[int, int, RangeSpec]] = {}
        for k, v in self.ranges.items():
            key = (k.tgid, k.vm, k.kind, v.start)
            if key not in seen:
                seen[key] = (k.tgid, k.vm, RangeSpec(
                    M.KIND_NAMES[k.kind], v.start, v.end, v.label.decode(errors="replace"),
                    M.CLASS_NAMES.get(v.cls, "remote")))
        return sorted(seen.values(), key=lambda t: (t[0], t[1], t[2].kind, t[2].start))

    def prune(self) -> int:
        """Drop what was published for processes that have ended (or whose pid was
        reused); returns how many map entries went."""
        gone = 0
        with self._lock:
            touched = set()
            for k, v in list(self.ranges.items()):
                if k.tgid and process_starttime(k.tgid) != v.starttime:
                    self._delete(self.ranges, k)
                    touched.add(k.tgid)
                    gone += 1
            for k, v in list(self.vcpu_vm.items()):
                if process_starttime(v.tgid) is None:
                    self._delete(self.vcpu_vm, k)
                    touched.add(v.tgid)
                    gone += 1
            for k in list(self.pubs.keys()):
                if k.value and process_starttime(k.value) is None:
                    touched.add(k.value)
            for tgid in touched:
                self._bump(tgid)
        return gone

    def label(self, tgid: int, vm: int, kind: int, addr: int, cls: int) -> str:
        """The label of a counter's range (as published, even if since unpublished)."""
        if cls != M.CLS_UNMAPPED:
            for key in ((tgid, vm, kind, addr), (tgid, 0, kind, addr), (0, 0, kind, addr)):
                if key in self._labels:
                    return self._labels[key]
            for t, v in ((tgid, vm), (tgid, 0), (0, 0)):
                try:
                    val = self.ranges[self._range_key(t, v, kind, addr, 64)]
                except KeyError:
                    continue
                if val.start == addr:
                    text = val.label.decode(errors="replace")
                    self._labels[(t, v, kind, addr)] = text
                    return text
        return M.address_text(kind, addr, cls)

    def process_name(self, tgid: int, fresh: bool = False) -> str:
        """/proc's name while the process lives (cached unless ``fresh``); then the last
        one seen, or the comm of its first vCPU thread as the kernel side noted it."""
        if not fresh and tgid in self._names:
            return self._names[tgid]
        name = process_name(tgid)
        if name is not None:
            self._names[tgid] = name
            return name
        if tgid not in self._names:
            try:
                self._names[tgid] = self._procs[ctypes.c_uint32(tgid)].comm.decode(
                    errors="replace")
            except KeyError:
                return "?"
        return self._names[tgid]

    def forget_names(self) -> None:
        """Drop cached process names (pids get reused)."""
        self._names.clear()

    # ------------------------------------------------------------------ counters

    def counts(self) -> list[CountRow]:
        rows = []
        for k, per_cpu in self._counts.items():       # per-CPU values, added up
            rows.append(CountRow(k.tgid, k.vm, k.kind, k.cls, k.dir, k.addr,
                                 sum(v.accesses for v in per_cpu),
                                 sum(v.exits for v in per_cpu)))
            if k.tgid not in self._names:
                self.process_name(k.tgid, fresh=True)
        return rows

    def histograms(self) -> dict[tuple[int, int, int, int, int], Histogram]:
        """(tgid, vm, kind, cls, addr) -> stall histogram."""
        out: dict[tuple[int, int, int, int, int], Histogram] = {}
        for k, per_cpu in self._hist.items():
            out.setdefault((k.tgid, k.vm, k.kind, k.cls, k.addr), Histogram()).add(
                k.bucket, sum(v.value if hasattr(v, "value") else int(v) for v in per_cpu))
        return out

    def snapshot(self) -> Snapshot:
        t = time.monotonic()
        return Snapshot(t, {r.key: r for r in self.counts()}, self.histograms())

    def stats(self) -> dict[str, int]:
        names = {M.STAT_LOST_EVENTS: "lost_events", M.STAT_MAP_FULL: "map_full"}
        return {name: self._stats[ctypes.c_int(i)].value for i, name in names.items()}

    def clear(self) -> None:
        """Zero the counters and histograms."""
        self._counts.clear()
        self._hist.clear()

    # ------------------------------------------------------------------ tracing

    def set_trace(self, on: bool, tgid: int = 0) -> None:
        self._config[ctypes.c_int(M.CFG_TGID)] = ctypes.c_uint64(tgid)
        self._config[ctypes.c_int(M.CFG_TRACE)] = ctypes.c_uint64(1 if on else 0)

    def on_event(self, callback: Callable[[Any], None]) -> None:
        """Deliver every access event (an ``rhw_access_event`` ctypes struct, laid out
        from the shared header) to ``callback`` from ``poll``. An exception in the
        callback stops the delivery and is raised again by ``poll``."""
        events = self.bpf[b"events"]
        event_type = self.event_type
        size = ctypes.sizeof(event_type)

        def deliver(ctx: Any, data: Any, n: int) -> int:
            if self._callback_error is not None:
                return 0
            try:
                callback(event_type.from_buffer_copy(ctypes.string_at(data, min(n, size))
                                                     .ljust(size, b"\0")))
            except BaseException as e:  # re-raised from poll(): never lost in ctypes
                self._callback_error = e
            return 0
        events.open_ring_buffer(deliver)
        self._ring_open = True

    def poll(self, timeout_ms: int = 100) -> None:
        if self._ring_open:
            self.bpf.ring_buffer_poll(timeout_ms)
            if self._callback_error is not None:
                err, self._callback_error = self._callback_error, None
                raise err
        else:
            time.sleep(timeout_ms / 1000)

    def _attach(self, tracepoints: list[str]) -> None:
        try:
            for tp in tracepoints:
                self.bpf.attach_tracepoint(tp=tp.encode(),
                                           fn_name=("rhw__" + tp.replace(":", "__")).encode())
        except Exception as e:
            self.bpf.cleanup()
            raise ProbeUnavailable(f"the kvm probes compiled but could not be attached to "
                                   f"the tracepoints ({e})") from None

    def pause(self) -> None:
        """Detach the tracepoints (maps and ranges stay); ``resume`` attaches them again."""
        with self._lock:
            if not self._paused:
                for tp in reversed(self.tracepoints):
                    self.bpf.detach_tracepoint(tp.encode())
                self._paused = True

    def resume(self) -> None:
        with self._lock:
            if self._paused:
                self.bpf[b"vcpus"].clear()        # exits seen before the pause are stale
                self._attach(self.tracepoints)
                self._paused = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.bpf.cleanup()

    def __enter__(self) -> KvmProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
