"""The in-kernel interrupt controllers (PIC pair, IOAPIC, LAPIC) and PIT.

With ``CREATE_IRQCHIP`` GSIs 0-15 reach both the 8259 pair and the IOAPIC, so a
real-mode guest that programs the PIC and a protected-mode guest that uses the IOAPIC
both see ``set_irq(line, level)``. ``KVM_IRQ_LINE`` is a VM-fd ioctl and may be called
from any thread (the server-link reader thread injects interrupts this way).

Lines are levels: the PIC in its default edge mode latches a 0 -> 1 transition, so a
device that wants a second interrupt must lower and raise its line again (which a
16550 model does naturally when its level is re-evaluated after each register access).
"""

from __future__ import annotations

import fcntl
import threading

from . import kvm

NR_LINES = 24           # IOAPIC pins; 0-15 also reach the PICs
_IRQ_LEVEL = kvm.IRQ_LEVEL_STRUCT  # struct kvm_irq_level, from kvm.py's table


class IrqChip:
    def __init__(self, vm_fd: int) -> None:
        self.vm_fd = vm_fd
        kvm.ioctl_ulong(vm_fd, kvm.KVM_CREATE_IRQCHIP, 0)
        pit = kvm.KvmPitConfig(flags=kvm.KVM_PIT_SPEAKER_DUMMY)
        kvm.ioctl_struct(vm_fd, kvm.KVM_CREATE_PIT2, pit)
        self.levels = [0] * NR_LINES
        # Held around the ioctl so close() cannot let the fd number be reused by an
        # unrelated file while a late interrupt (from the link thread) is injected.
        self._lock = threading.Lock()
        self.closed = False

    def set_irq(self, line: int, level: bool | int) -> None:
        """Drive interrupt ``line`` (GSI 0-23) to ``level`` (any thread).

        After ``close`` (the VM is gone) this is a no-op."""
        if not 0 <= line < NR_LINES:
            raise ValueError(f"irq line {line} out of range 0..{NR_LINES - 1}")
        lvl = 1 if level else 0
        with self._lock:
            if self.closed:
                return
            self.levels[line] = lvl
            fcntl.ioctl(self.vm_fd, kvm.KVM_IRQ_LINE, _IRQ_LEVEL.pack(line, lvl))

    def close(self) -> None:
        """Stop injecting; call before the VM fd is closed."""
        with self._lock:
            self.closed = True

    def pulse(self, line: int) -> None:
        """Lower then raise ``line`` (a fresh edge) and lower it again."""
        self.set_irq(line, 0)
        self.set_irq(line, 1)
        self.set_irq(line, 0)


class IrqLine:
    """One line of a VM as a ``remote_hw.devices.base.IrqLine`` (``set_level``)."""

    __slots__ = ("_set", "line", "level")

    def __init__(self, chip_or_vm, line: int) -> None:
        self._set = chip_or_vm.set_irq
        self.line = line
        self.level = False

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level != self.level:
            self.level = level
            self._set(self.line, level)
