"""Guest RAM: one anonymous mapping registered as KVM memory slot 0 at guest address 0.

``GuestRam`` is also the DMA interface device models use (``read(addr, length)``,
``write(addr, data)``; see ``remote_hw.devices.base.GuestMemory``). Accesses are bounds
checked against the RAM size; addresses outside RAM are MMIO and not reachable here.
"""

from __future__ import annotations

import ctypes
import mmap

from . import kvm

PAGE_SIZE = 4096
# Guest RAM starts at 0 and must stay below the MMIO hole, the identity-map page and the
# TSS (0xfffbc000..0xfffc0000) that the VM reserves just under 4 GiB.
MAX_MEM_SIZE = 0xC000_0000


class GuestMemoryError(ValueError):
    """An access outside guest RAM."""


class GuestRam:
    """``size`` bytes of guest-physical memory starting at guest address 0."""

    def __init__(self, size: int, slot: int = 0) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest RAM size {size:#x} must be a positive multiple of 4 KiB")
        if size > MAX_MEM_SIZE:
            raise ValueError(f"guest RAM size {size:#x} above the limit {MAX_MEM_SIZE:#x}")
        self.size = size
        self.slot = slot
        self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self._mm)   # pins the mapping
        self.host_addr = ctypes.addressof(self._anchor)
        self._view = memoryview(self._mm)

    # -------------------------------------------------------------- KVM registration

    def register(self, vm_fd: int) -> None:
        region = kvm.KvmUserspaceMemoryRegion(
            slot=self.slot, flags=0, guest_phys_addr=0, memory_size=self.size,
            userspace_addr=self.host_addr)
        kvm.ioctl_struct(vm_fd, kvm.KVM_SET_USER_MEMORY_REGION, region)

    # ------------------------------------------------------------------- DMA access

    def _check(self, addr: int, length: int) -> None:
        if addr < 0 or length < 0 or addr + length > self.size:
            raise GuestMemoryError(
                f"guest access {addr:#x}+{length:#x} outside RAM (0..{self.size:#x})")

    def read(self, addr: int, length: int) -> bytes:
        """``length`` bytes of guest memory at guest-physical ``addr``."""
        self._check(addr, length)
        return self._mm[addr:addr + length]

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at guest-physical ``addr``."""
        n = len(data)
        self._check(addr, n)
        self._mm[addr:addr + n] = data

    def read_u32(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 4), "little")

    def write_u32(self, addr: int, value: int) -> None:
        self.write(addr, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def view(self, addr: int, length: int) -> memoryview:
        """A zero-copy view (valid until ``close``)."""
        self._check(addr, length)
        return self._view[addr:addr + length]

    def clear(self) -> None:
        """Zero all of RAM (drops the pages; they come back zero-filled on demand)."""
        try:
            self._mm.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError):  # pragma: no cover - no madvise
            self._mm[:] = bytes(self.size)

    def close(self) -> None:
        if self._mm.closed:
            return
        self._view.release()
        del self._anchor
        self._mm.close()

    def __len__(self) -> int:
        return self.size
