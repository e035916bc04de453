"""One vCPU, the thread that owns it, and the exit loop (the project's hot path).

KVM wants every vCPU ioctl from the thread that created the vCPU, so ``VcpuThread``
starts a thread that creates the vCPU and then executes jobs (``call(fn)``) for the
rest of the VM's life: loading registers, reading them, and the run loop itself.

Stopping and halt detection both use a kick: ``signal.pthread_kill`` of the vCPU thread
with ``KICK_SIGNAL`` (a no-op Python handler is installed for it), which makes a
``KVM_RUN`` in progress return ``EINTR``. ``stop`` also sets ``kvm_run.immediate_exit``
so a stop that lands while the thread runs Python code still ends the next
``KVM_RUN`` at once. The watchdog (``Kicker``) kicks every vCPU that is inside
``KVM_RUN`` every ``kick_interval`` seconds (not one whose exit handler is waiting for a
remote device: that wait has its own deadline); on such an interruption the loop asks
``KVM_GET_MP_STATE`` and, if the vCPU is HALTED with RFLAGS.IF clear, the guest has
finished (status 0): with the in-kernel irqchip a halted vCPU sleeps inside
``KVM_RUN`` and no HLT exit ever reaches user space.

Coalesced writes (``coalesced.py``): once a zone is registered, the loop drains the
ring after every return from ``KVM_RUN`` (an exit, an ``EINTR`` from a kick or a stop,
an error), before it looks at the exit. So the writes reach the bus in the guest's
order and before the access that caused the exit, and a guest that runs on without
exits still has its writes delivered within a kick interval. Before the first zone
the cost is one attribute test per exit; after it, reading an empty ring's header adds
about 0.2 µs to an exit.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import signal
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from . import kvm
from .bus import ONES, Bus, GuestExit
from .coalesced import CoalescedRing

KICK_SIGNAL = signal.SIGUSR2
DEFAULT_KICK_INTERVAL = 0.05

STATUS_HALTED = 0          # HLT with IF=0 (the guest has finished)
STATUS_RESET = 0x100       # the guest or a device asked for a reset (reset_action="exit")
STATUS_STOPPED = 0x102     # stop() without a status (host-side stop, e.g. close)
STATUS_TIMEOUT = 0x104     # used internally by Vm.run(timeout) before raising VmTimeout


class VmError(RuntimeError):
    """The guest crashed or KVM refused to run it (SHUTDOWN, INTERNAL_ERROR, ...).

    ``exit_reason`` is the KVM exit reason number, ``regs`` the general registers (a
    dict, may be empty), ``status`` a non-zero even exit status a command line can use
    (``0x200 | exit_reason``).
    """

    def __init__(self, message: str, exit_reason: int = 0,
                 regs: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.exit_reason = exit_reason
        self.regs = regs or {}
        self.status = 0x200 | (exit_reason & 0xFF)


# ----------------------------------------------------------------------- kicking

def _noop_handler(signum: int, frame: Any) -> None:
    pass


_handler_lock = threading.Lock()
_handler_ready = False


def install_kick_handler() -> None:
    """Make sure ``KICK_SIGNAL`` has a (no-op) Python handler, not the default action.

    ``signal.signal`` only works in the main thread; this runs at import time, so
    importing this module from the main thread once is enough.
    """
    global _handler_ready
    with _handler_lock:
        if _handler_ready:
            return
        current = signal.getsignal(KICK_SIGNAL)
        if callable(current):          # someone else's Python handler: fine, harmless
            _handler_ready = True
            return
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                f"signal {KICK_SIGNAL!s} needs a handler for vCPU kicks: import "
                "remote_hw.client.vmm (or create the first Vm) in the main thread")
        signal.signal(KICK_SIGNAL, _noop_handler)
        _handler_ready = True


try:
    install_kick_handler()
except RuntimeError:                   # imported from a worker thread; retried later
    pass


class Kicker:
    """Periodic kicks of running vCPUs so halted-with-IF=0 guests are noticed."""

    def __init__(self, interval: float = DEFAULT_KICK_INTERVAL) -> None:
        self.interval = interval
        self._cond = threading.Condition()
        self._running: set[VcpuThread] = set()
        self._thread: threading.Thread | None = None

    def add(self, vt: VcpuThread) -> None:
        with self._cond:
            self._running.add(vt)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vcpu-kicker",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, vt: VcpuThread) -> None:
        with self._cond:
            self._running.discard(vt)

    def _loop(self) -> None:
        with self._cond:
            while True:
                if not self._running:
                    self._cond.wait()
                    continue
                self._cond.wait(self.interval)
                for vt in list(self._running):
                    vt.kick()


KICKER = Kicker()

# ----------------------------------------------------------------------- the vCPU

_PACK: list[Any] = [None] * 9
_UNPACK: list[Any] = [None] * 9
for _size, _fmt in ((1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q")):
    _PACK[_size] = struct.Struct(_fmt).pack_into
    _UNPACK[_size] = struct.Struct(_fmt).unpack_from
_MASK = [ONES.get(n, 0) for n in range(9)]


class Vcpu:
    """A KVM vCPU. Create it, and use it, from one thread only (``VcpuThread``)."""

    def __init__(self, vm_fd: int, mmap_size: int, cpuid: kvm.KvmCpuid2 | None,
                 index: int = 0) -> None:
        self.index = index
        self.fd = kvm.ioctl_ulong(vm_fd, kvm.KVM_CREATE_VCPU, index)
        try:
            self.run_mm = mmap.mmap(self.fd, mmap_size, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
            if cpuid is not None:
                kvm.ioctl_struct(self.fd, kvm.KVM_SET_CPUID2, cpuid)
            self.reset_sregs = self.get_sregs()
        except BaseException:
            os.close(self.fd)
            raise
        self.ran = False
        self.exits = 0

    # ---------------------------------------------------------------- registers

    def get_regs(self) -> kvm.KvmRegs:
        regs = kvm.KvmRegs()
        fcntl.ioctl(self.fd, kvm.KVM_GET_REGS, regs, True)
        return regs

    def set_regs(self, regs: kvm.KvmRegs) -> None:
        fcntl.ioctl(self.fd, kvm.KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm.KvmSregs:
        sregs = kvm.KvmSregs()
        fcntl.ioctl(self.fd, kvm.KVM_GET_SREGS, sregs, True)
        return sregs

    def set_sregs(self, sregs: kvm.KvmSregs) -> None:
        fcntl.ioctl(self.fd, kvm.KVM_SET_SREGS, sregs)

    def get_mp_state(self) -> int:
        st = kvm.KvmMpState()
        fcntl.ioctl(self.fd, kvm.KVM_GET_MP_STATE, st, True)
        return st.mp_state

    def set_mp_state(self, state: int) -> None:
        fcntl.ioctl(self.fd, kvm.KVM_SET_MP_STATE, kvm.KvmMpState(state))

    def describe(self) -> str:
        try:
            return kvm.format_regs(self.get_regs(), self.get_sregs())
        except OSError as e:  # pragma: no cover
            return f"(registers unavailable: {e})"

    def regs_dict(self) -> dict[str, int]:
        try:
            return kvm.regs_dict(self.get_regs())
        except OSError:  # pragma: no cover
            return {}

    # -------------------------------------------------------------------- setup

    def flush_pending(self) -> None:
        """Complete a pending IN/MMIO read of the last exit without running the guest
        (KVM finishes it on the next KVM_RUN; with immediate_exit that is all it does).
        Needed before registers are overwritten, or the completion would clobber them."""
        if not self.ran:
            return
        mm = self.run_mm
        mm[kvm.RUN_IMMEDIATE_EXIT] = 1
        try:
            fcntl.ioctl(self.fd, kvm.KVM_RUN)
        except InterruptedError:
            pass
        finally:
            mm[kvm.RUN_IMMEDIATE_EXIT] = 0

    def setup(self, image) -> None:
        """Put the vCPU in the start state ``image`` (a loader.BootImage) asks for."""
        self.flush_pending()
        sregs = kvm.KvmSregs.from_buffer_copy(self.reset_sregs)
        regs = kvm.KvmRegs()
        image.setup_cpu(regs, sregs)
        self.set_sregs(sregs)
        self.set_regs(regs)
        self.set_mp_state(kvm.MP_STATE_RUNNABLE)

    def close(self) -> None:
        try:
            self.run_mm.close()
        finally:
            os.close(self.fd)


class VcpuThread:
    """The thread that creates and owns one vCPU and runs jobs on it."""

    def __init__(self, vm_fd: int, mmap_size: int, cpuid: kvm.KvmCpuid2 | None,
                 bus: Bus, name: str = "vcpu0", kicker: Kicker = KICKER) -> None:
        install_kick_handler()
        self.bus = bus
        self.kicker = kicker
        self.vcpu: Vcpu | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stop_status: int | None = None
        self._in_run = False
        # True only inside the KVM_RUN ioctl: the watchdog kicks only then. A kick that
        # lands while the exit handler waits for a remote device would interrupt that
        # wait (and, before every read honoured its deadline, restart it).
        self._in_guest = False
        # The coalesced ring, set (from any thread) by attach_ring before the first zone
        # is registered; None until then, which is all the exit loop tests.
        self.coalesced: CoalescedRing | None = None
        self._sinks: tuple[Callable[..., Any], ...] = ()   # the Bus's, bound once
        self._alive = True
        self._ident = 0
        started: Future = Future()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True,
                                        args=(vm_fd, mmap_size, cpuid, started))
        self._thread.start()
        started.result()          # re-raises a vCPU creation error here

    # ---------------------------------------------------------------- the thread

    def _main(self, vm_fd, mmap_size, cpuid, started: Future) -> None:
        try:
            self.vcpu = Vcpu(vm_fd, mmap_size, cpuid)
            self._ident = threading.get_ident()
        except BaseException as e:
            started.set_exception(e)
            return
        started.set_result(None)
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self.vcpu))
            except BaseException as e:
                fut.set_exception(e)
        with self._lock:
            self._alive = False
            vcpu, self.vcpu = self.vcpu, None
        vcpu.close()

    def submit(self, fn: Callable[[Vcpu], Any]) -> Future:
        if not self._alive:
            raise RuntimeError("the vCPU thread has ended")
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut

    def call(self, fn: Callable[[Vcpu], Any]) -> Any:
        """Run ``fn(vcpu)`` in the vCPU thread and return its result."""
        if threading.get_ident() == self._ident:
            if self.vcpu is None:
                raise RuntimeError("the vCPU thread has ended")
            return fn(self.vcpu)
        return self.submit(fn).result()

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    # ------------------------------------------------------------ stop and kick

    def kick(self) -> None:
        """Interrupt a KVM_RUN in progress (any thread)."""
        with self._lock:
            if self._in_guest and self._alive:
                signal.pthread_kill(self._ident, KICK_SIGNAL)

    def stop(self, status: int) -> None:
        """End the current (or next) run with ``status`` (any thread)."""
        with self._lock:
            if not self._alive or self.vcpu is None:
                return
            if self._stop_status is None:
                self._stop_status = status
            self.vcpu.run_mm[kvm.RUN_IMMEDIATE_EXIT] = 1
            if self._in_run and self._ident != threading.get_ident():
                signal.pthread_kill(self._ident, KICK_SIGNAL)

    @property
    def running(self) -> bool:
        return self._in_run

    # -------------------------------------------------------- coalesced writes

    def attach_ring(self, page_offset: int) -> CoalescedRing:
        """Drain the coalesced ring at ``page_offset`` of the vCPU mmap after every
        ``KVM_RUN`` from now on (any thread; call it before registering a zone)."""
        with self._lock:
            if self.coalesced is None:
                if self.vcpu is None:
                    raise RuntimeError("the vCPU thread has ended")
                bus = self.bus
                self._sinks = (bus.port_write, bus.mmio_write, bus.after_drain,
                               bus.before_drain)
                self.coalesced = CoalescedRing(self.vcpu.run_mm, page_offset)
            return self.coalesced

    def _drain(self) -> None:
        """Deliver the coalesced writes, oldest first, then tell the drain listeners."""
        ring = self.coalesced
        if ring is not None:
            port_write, mmio_write, after, before = self._sinks
            ring.drain(port_write, mmio_write, after, before)

    # ------------------------------------------------------------------ running

    def run(self, vcpu: Vcpu) -> int:
        """The run loop; call only in the vCPU thread (through ``submit``)."""
        with self._lock:
            self._in_run = True
        self.kicker.add(self)
        try:
            return self._loop(vcpu)
        finally:
            self.kicker.remove(self)
            with self._lock:
                self._in_run = False
                self._in_guest = False
                self._stop_status = None
                vcpu.run_mm[kvm.RUN_IMMEDIATE_EXIT] = 0

    def _interrupted(self, vcpu: Vcpu) -> int | None:
        """KVM_RUN returned EINTR: a stop, or a watchdog kick (halt check)."""
        status = self._stop_status
        if status is not None:
            return status
        if vcpu.get_mp_state() == kvm.MP_STATE_HALTED:
            if not vcpu.get_regs().rflags & kvm.RFLAGS_IF:
                return STATUS_HALTED
        return None

    def _loop(self, vcpu: Vcpu) -> int:
        # Everything the hot path touches is a local.
        fd = vcpu.fd
        mm = vcpu.run_mm
        ioctl = fcntl.ioctl
        KVM_RUN = kvm.KVM_RUN
        # kvm.py's table, bound to locals: the names cost nothing in the loop.
        unpack_exit = kvm.EXIT_IO_STRUCT.unpack_from
        unpack_mmio = kvm.EXIT_MMIO_STRUCT.unpack_from
        RUN_EXIT_REASON, RUN_MMIO = kvm.RUN_EXIT_REASON, kvm.RUN_MMIO
        RUN_MMIO_DATA = kvm.RUN_MMIO_DATA
        EXIT_IO, EXIT_MMIO = kvm.EXIT_IO, kvm.EXIT_MMIO
        bus = self.bus
        port_get = bus.port_table.get
        pack, unpack, mask = _PACK, _UNPACK, _MASK
        vcpu.ran = True
        try:
            while True:
                self._in_guest = True
                try:
                    ioctl(fd, KVM_RUN)
                except InterruptedError:
                    self._in_guest = False
                    if self.coalesced is not None:
                        self._drain()
                    status = self._interrupted(vcpu)
                    if status is not None:
                        return status
                    continue
                except OSError:
                    self._in_guest = False
                    if self.coalesced is not None:
                        self._drain()
                    raise
                self._in_guest = False
                # Coalesced writes first: they happened before the access that exited.
                if self.coalesced is not None:
                    self._drain()
                reason, direction, size, port, count, off = unpack_exit(mm, RUN_EXIT_REASON)
                if reason == EXIT_IO:
                    entry = port_get(port)
                    if count == 1:
                        if entry is None:
                            if direction:
                                bus.unmapped_writes += 1
                            else:
                                bus.unmapped_reads += 1
                                pack[size](mm, off, mask[size])
                        elif direction:
                            entry[1](port - entry[2], size, unpack[size](mm, off)[0])
                        else:
                            pack[size](mm, off, entry[0](port - entry[2], size) & mask[size])
                    else:
                        self._string_io(entry, direction, size, port, count, off, mm)
                elif reason == EXIT_MMIO:
                    addr, data, length, is_write = unpack_mmio(mm, RUN_MMIO)
                    if is_write:
                        bus.mmio_write(addr, length,
                                       int.from_bytes(data[:length], "little"))
                    else:
                        value = bus.mmio_read(addr, length)
                        mm[RUN_MMIO_DATA:RUN_MMIO_DATA + length] = value.to_bytes(length, "little")
                else:
                    status = self._other_exit(vcpu, reason)
                    if status is not None:
                        return status
        except GuestExit as e:
            return e.status
        except OSError as e:
            if e.errno == errno.EINTR:  # pragma: no cover - handled above
                raise
            raise VmError(f"KVM_RUN failed: {e}; {vcpu.describe()}", 0,
                          vcpu.regs_dict()) from e

    def _string_io(self, entry, direction, size, port, count, off, mm) -> None:
        bus = self.bus
        if entry is None:
            if direction:
                bus.unmapped_writes += count
            else:
                bus.unmapped_reads += count
                mm[off:off + size * count] = b"\xff" * (size * count)
            return
        read, write, base = entry
        offset = port - base
        if direction:
            for value in struct.iter_unpack("<" + "xBHxIxxxQ"[size], mm[off:off + size * count]):
                write(offset, size, value[0])
        else:
            p, m = _PACK[size], _MASK[size]
            for i in range(count):
                p(mm, off + i * size, read(offset, size) & m)

    def _other_exit(self, vcpu: Vcpu, reason: int) -> int | None:
        mm = vcpu.run_mm
        name = kvm.EXIT_REASONS.get(reason, f"#{reason}")
        if reason == kvm.EXIT_HLT:
            if not vcpu.get_regs().rflags & kvm.RFLAGS_IF:
                return STATUS_HALTED
            return None
        if reason == kvm.EXIT_INTR:
            return self._interrupted(vcpu)
        if reason == kvm.EXIT_SYSTEM_EVENT:
            ev = kvm.run_field(mm, "system_event.type")
            if ev == kvm.SYSTEM_EVENT_RESET:
                return STATUS_RESET
            detail = f"system event {kvm.SYSTEM_EVENT_TYPES.get(ev, ev)}"
        elif reason == kvm.EXIT_SHUTDOWN:
            detail = "guest shutdown (triple fault?)"
        elif reason == kvm.EXIT_INTERNAL_ERROR:
            sub = kvm.run_field(mm, "internal.suberror")
            nd = min(kvm.run_field(mm, "internal.ndata"), 16)
            data = kvm.run_field(mm, "internal.data")[:nd]
            what = kvm.INTERNAL_ERRORS.get(sub, "")
            detail = f"internal error, suberror {sub} {what}"
            raw = bytes(mm[kvm.RUN_INTERNAL_DATA:kvm.RUN_INTERNAL_DATA + 8 * nd])
            if sub == kvm.INTERNAL_ERROR_EMULATION and nd >= 3 and data[0] & 1:
                # emulation failure: u64 flags, u8 insn_size, u8 insn_bytes[15]
                size = min(raw[8], 15)
                detail += f", instruction bytes {raw[9:9 + size].hex(' ')}"
            else:
                detail += f", data [{', '.join(hex(d) for d in data)}]"
        elif reason == kvm.EXIT_FAIL_ENTRY:
            hw = kvm.run_field(mm, "fail_entry.hardware_entry_failure_reason")
            detail = f"entry failed, hardware reason {hw:#x}"
        else:
            detail = "unexpected exit"
        raise VmError(f"KVM exit {name}: {detail}; {vcpu.describe()}", reason,
                      vcpu.regs_dict())
