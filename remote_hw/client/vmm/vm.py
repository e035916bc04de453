"""A small KVM virtual machine: RAM, in-kernel irqchip and PIT, one vCPU, a Bus.

    vm = Vm(mem_size=2 << 20)
    vm.bus.map_ports(0x3f8, 0x3ff, uart)      # any object with read/write
    vm.load_image("guests/build/hello.bin")
    status = vm.run(timeout=10)               # 0: halted with IF=0; odd: debug-exit

Set-up order (docs/vmm.md, "Set-up order"): SET_TSS_ADDR, SET_IDENTITY_MAP_ADDR, CREATE_IRQCHIP,
CREATE_PIT2, memory, vCPU (created in its own thread), SET_CPUID2.

Exit statuses returned by ``run``:

* ``0`` (``STATUS_HALTED``): the guest executed HLT with interrupts disabled;
* ``(v << 1) | 1``: the guest wrote ``v`` to the debug-exit port 0xf4;
* ``0x100`` (``STATUS_RESET``): a reset was requested (``request_reset`` or a KVM
  system-event RESET) and ``reset_action`` is ``"exit"``;
* whatever was passed to ``stop(status)``.

Coalesced writes: ``vm.coalesce_ports(0x3f8, 1)`` (or ``coalesce_mmio``) makes the
kernel queue the guest's writes to that range in a ring instead of exiting for each;
they reach the bus, in order, at the vCPU's next exit (or kick), before that exit is
handled (``coalesced.py``). Reads of the range still exit. Any time, also while running.

A crash (SHUTDOWN / triple fault, INTERNAL_ERROR, FAIL_ENTRY) raises ``VmError`` with
the registers in its message (``VmError.status`` = ``0x200 | exit_reason``); a handler's
exception propagates out of ``run`` unchanged; a ``timeout`` raises ``VmTimeout``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import TimeoutError as FutureTimeout

from . import kvm
from .bus import Bus
from .coalesced import CoalescingUnsupported, Zone, ZoneTable
from .irqchip import IrqChip, IrqLine
from .loader import BootImage, ImageSource, parse_image, read_image
from .memory import GuestRam
from .vcpu import (
    KICKER,
    STATUS_HALTED,
    STATUS_RESET,
    STATUS_STOPPED,
    STATUS_TIMEOUT,
    Kicker,
    Vcpu,
    VcpuThread,
    VmError,
)

__all__ = ["Vm", "VmError", "VmTimeout", "STATUS_HALTED", "STATUS_RESET", "STATUS_STOPPED",
           "debug_exit_status", "CoalescingUnsupported", "Zone"]

DEFAULT_MEM_SIZE = 16 << 20
RESET_ACTIONS = ("exit", "restart")
EVENT_RESET_REQUEST = "reset-request"   # same string as remote_hw.devices.base


class VmTimeout(VmError, TimeoutError):
    """``run(timeout)`` ran out of time; the vCPU was stopped and may be run again."""


def debug_exit_status(value: int) -> int:
    """The exit status a debug-exit write of ``value`` produces."""
    return (value << 1) | 1


def _supported_cpuid(kvm_fd: int) -> kvm.KvmCpuid2:
    cpuid = kvm.KvmCpuid2(nent=kvm.CPUID_MAX_ENTRIES)
    kvm.ioctl_struct(kvm_fd, kvm.KVM_GET_SUPPORTED_CPUID, cpuid)
    return cpuid


class Vm:
    """One KVM VM with one vCPU. Thread-safe: ``set_irq``, ``stop``, ``request_reset``."""

    def __init__(self, mem_size: int = DEFAULT_MEM_SIZE, bus: Bus | None = None, *,
                 reset_action: str = "exit", name: str = "vm",
                 kicker: Kicker | None = None, kvm_path: str = "/dev/kvm") -> None:
        if reset_action not in RESET_ACTIONS:
            raise ValueError(f"reset_action must be one of {RESET_ACTIONS}")
        self.name = name
        self.bus = bus if bus is not None else Bus()
        self.reset_action = reset_action
        self.resets = 0
        self.image: BootImage | None = None
        self.vm_fd = -1
        # memory, irqchip and _vt exist once __init__ succeeds; close() copes with a
        # constructor that failed half-way (it finds only what was made).
        self.memory: GuestRam
        self.irqchip: IrqChip
        self._vt: VcpuThread
        self._run_lock = threading.Lock()
        self._pending_reset: str | None = None      # "exit" / "restart" once requested
        self._zones: ZoneTable | None = None           # made by the first coalesce_*
        self._zones_lock = threading.Lock()
        self._closed = False
        kvm_fd = os.open(kvm_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            version = kvm.ioctl_ulong(kvm_fd, kvm.KVM_GET_API_VERSION, 0)
            if version != kvm.KVM_API_VERSION:
                raise VmError(f"KVM API version {version}, expected {kvm.KVM_API_VERSION}")
            mmap_size = kvm.ioctl_ulong(kvm_fd, kvm.KVM_GET_VCPU_MMAP_SIZE, 0)
            cpuid = _supported_cpuid(kvm_fd)
            self.vm_fd = kvm.ioctl_ulong(kvm_fd, kvm.KVM_CREATE_VM, 0)
        finally:
            os.close(kvm_fd)
        try:
            kvm.ioctl_ulong(self.vm_fd, kvm.KVM_SET_TSS_ADDR, kvm.TSS_ADDR)
            kvm.ioctl_struct(self.vm_fd, kvm.KVM_SET_IDENTITY_MAP_ADDR,
                             kvm.u64(kvm.IDENTITY_MAP_ADDR))
            self.irqchip = IrqChip(self.vm_fd)
            self.memory = GuestRam(mem_size)
            self.memory.register(self.vm_fd)
            self._vt = VcpuThread(self.vm_fd, mmap_size, cpuid, self.bus,
                                  name=f"{name}-vcpu0", kicker=kicker or KICKER)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- properties

    @property
    def mem_size(self) -> int:
        return self.memory.size

    @property
    def running(self) -> bool:
        vt = getattr(self, "_vt", None)
        return vt is not None and vt.running

    @property
    def reset_requested(self) -> bool:
        """True from ``request_reset`` until the reset has been carried out."""
        return self._pending_reset is not None

    # --------------------------------------------------------------------- image

    def load_image(self, image: ImageSource) -> BootImage:
        """Load a raw / ELF32 / ELF64 image (path or bytes); RAM is cleared first.

        Raises ``loader.ImageError`` for an image that cannot be booted.
        """
        boot = parse_image(read_image(image), self.memory.size)
        self._check_idle()
        self._install(boot)
        return boot

    def _install(self, boot: BootImage) -> None:
        # RAM and registers are changed in the vCPU thread, with the vCPU not running.
        def install(vcpu: Vcpu) -> None:
            self.memory.clear()
            boot.load_into(self.memory)
            vcpu.setup(boot)

        self._vt.call(install)
        self.image = boot

    # ----------------------------------------------------------------------- run

    def run(self, timeout: float | None = None) -> int:
        """Run the vCPU (in its own thread) until the guest ends; return the status.

        ``timeout`` (seconds): stop the guest and raise ``VmTimeout`` when it is over;
        the VM keeps its state and ``run`` may be called again to continue.
        """
        if self.image is None:
            raise VmError("no image loaded")
        if not self._run_lock.acquire(blocking=False):
            raise VmError("the VM is already running")
        try:
            fut = self._vt.submit(self._run_job)
            try:
                return fut.result(timeout)
            except FutureTimeout:
                self._vt.stop(STATUS_TIMEOUT)
                status = fut.result()
                if status != STATUS_TIMEOUT:
                    return status          # the guest ended on its own meanwhile
                raise VmTimeout(f"{self.name}: guest still running after {timeout} s",
                                0, self._vt.call(lambda v: v.regs_dict())) from None
        finally:
            self._run_lock.release()

    def _run_job(self, vcpu: Vcpu) -> int:
        while True:
            status = self._vt.run(vcpu)
            if status == STATUS_RESET or self._pending_reset is not None:
                action = self._pending_reset or self.reset_action
                self._pending_reset = None
                self.resets += 1
                if action == "restart" and self.image is not None:
                    self.memory.clear()
                    self.image.load_into(self.memory)
                    vcpu.setup(self.image)
                    continue
                return STATUS_RESET
            return status

    def stop(self, status: int = STATUS_STOPPED) -> None:
        """End ``run`` with ``status`` (any thread, also from a handler).

        A stop issued while the VM is not running makes the next ``run`` return at once.
        """
        self._vt.stop(status)

    def request_reset(self) -> None:
        """Ask for a reset (any thread): with ``reset_action="exit"`` ``run`` returns
        ``STATUS_RESET``; with ``"restart"`` the image is reloaded into cleared RAM,
        the registers reset, and the guest starts again (``resets`` counts them)."""
        self._pending_reset = self.reset_action
        self.stop(STATUS_RESET)

    def request_restart(self) -> None:
        """Reset and start the guest again whatever ``reset_action`` says (any thread)."""
        self._pending_reset = "restart"
        self.stop(STATUS_RESET)

    def device_event(self, name: str) -> None:
        """An ``EventSink`` for device models: ``reset-request`` resets the VM."""
        if name == EVENT_RESET_REQUEST:
            self.request_reset()

    # ------------------------------------------------------------------ interrupts

    def set_irq(self, line: int, level: bool | int) -> None:
        """Drive GSI ``line`` to ``level`` (any thread)."""
        self.irqchip.set_irq(line, level)

    def irq_line(self, line: int) -> IrqLine:
        """An ``IrqLine`` (``set_level``) for a local device model."""
        return IrqLine(self, line)

    # ------------------------------------------------------------ coalesced writes

    def coalescing_supported(self, kind: str = "port") -> bool:
        """Whether this KVM can coalesce writes to ``kind`` ("port" or "mmio") ranges."""
        return self._zone_table().support.allows(kind)

    def coalesce_ports(self, start: int, length: int = 1) -> Zone:
        """Coalesce guest writes to ports ``start .. start + length - 1`` (any thread,
        before or while running): no exit per write; the bus gets them, in order, at
        the next exit. Raises ``CoalescingUnsupported`` where KVM cannot, ``ValueError``
        for a bad range or one overlapping a coalesced range."""
        return self._coalesce(Zone("port", start, length))

    def coalesce_mmio(self, addr: int, length: int) -> Zone:
        """Coalesce guest writes to MMIO ``addr .. addr + length - 1`` (as
        ``coalesce_ports``)."""
        return self._coalesce(Zone("mmio", addr, length))

    def uncoalesce(self, zone: Zone) -> None:
        """Stop coalescing ``zone`` (as returned by ``coalesce_*`` or listed by
        ``coalesced_zones``); writes already queued are still delivered."""
        self._zone_table().remove(zone)

    @property
    def coalesced_zones(self) -> tuple[Zone, ...]:
        """The coalesced ranges, in the order they were added."""
        return self._zones.zones if self._zones is not None else ()

    def coalesced_pending(self) -> int:
        """Writes queued in the ring and not yet delivered (any thread; diagnostics)."""
        ring = self._vt.coalesced
        return ring.pending() if ring is not None else 0

    def _zone_table(self) -> ZoneTable:
        with self._zones_lock:
            if self._closed:
                raise VmError("the VM is closed")
            if self._zones is None:
                self._zones = ZoneTable(self.vm_fd)
            return self._zones

    def _coalesce(self, zone: Zone) -> Zone:
        table = self._zone_table()
        table.check(zone)
        # The ring is read from before the zone exists: no write is ever left unread.
        self._vt.attach_ring(table.support.page_offset)
        table.add(zone)
        return zone

    # ----------------------------------------------------------------- inspection

    def regs(self) -> dict[str, int]:
        """General registers (only while not running)."""
        self._check_idle()
        return self._vt.call(lambda v: kvm.regs_dict(v.get_regs()))

    def sregs(self) -> kvm.KvmSregs:
        self._check_idle()
        return self._vt.call(lambda v: v.get_sregs())

    def mp_state(self) -> int:
        self._check_idle()
        return self._vt.call(lambda v: v.get_mp_state())

    def _check_idle(self) -> None:
        if self._closed:
            raise VmError("the VM is closed")
        if self.running:
            raise VmError("the VM is running")

    # ----------------------------------------------------------------- life cycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        vt = getattr(self, "_vt", None)
        if vt is not None:
            vt.stop(STATUS_STOPPED)
            vt.close()
        irqchip = getattr(self, "irqchip", None)
        if irqchip is not None:
            irqchip.close()
        if self.vm_fd >= 0:
            os.close(self.vm_fd)
            self.vm_fd = -1
        memory = getattr(self, "memory", None)
        if memory is not None:
            memory.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
