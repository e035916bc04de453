"""KVM's coalesced I/O ring: guest writes to chosen ports or MMIO ranges without an exit.

Why: every port or MMIO exit costs about 8-17 µs here (bench/local_exit.py), and a device
that takes a stream of writes it never answers (a transmit register, a doorbell whose
effect can wait) pays that per write. For a *zone* registered with
``KVM_REGISTER_COALESCED_MMIO`` the kernel instead appends each write (address, length,
up to 8 data bytes) to a ring page shared with user space and lets the guest run on.
Reads of a zone still exit: the kernel has no value to answer with.

The ring is one page of the vCPU mmap at the page offset that
``KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO)`` answers; one ring serves the whole VM.
The kernel produces at ``last``; user space consumes from ``first`` and writes ``first``
back. A full ring (``(last + 1) % entries == first``) makes the next write an ordinary
exit, so nothing is lost. The exit loop (``vcpu.py``) drains the ring after every return
from ``KVM_RUN``, before it handles the exit itself: a coalesced write therefore always
reaches its device before any later non-coalesced access of the guest is handled.

This module holds the two halves: ``ZoneTable`` (which ranges, registered on the VM fd)
and ``CoalescedRing`` (the reader over the mmap); ``Vm`` puts them together.
"""

from __future__ import annotations

import fcntl
import mmap
import struct
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from . import kvm

PORT_SPACE = 0x10000
KINDS = ("port", "mmio")

Write = Callable[[int, int, int], Any]          # (address or port, size, value)


class CoalescingUnsupported(RuntimeError):
    """This KVM cannot coalesce the writes asked for (no ring, or no port zones)."""


class Support(NamedTuple):
    """What ``KVM_CHECK_EXTENSION`` says about coalescing."""

    page_offset: int        # the ring's page in the vCPU mmap; 0: no ring at all
    pio: bool               # zones may be port ranges (KVM_CAP_COALESCED_PIO)

    def allows(self, kind: str) -> bool:
        return self.page_offset > 0 and (kind == "mmio" or self.pio)

    def why_not(self, kind: str) -> str:
        if self.page_offset <= 0:
            return ("this KVM has no coalesced I/O ring "
                    f"(KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO={kvm.KVM_CAP_COALESCED_MMIO})"
                    " answers 0)")
        return ("this KVM coalesces MMIO writes but not port writes "
                f"(KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_PIO={kvm.KVM_CAP_COALESCED_PIO}) "
                "answers 0)")


def probe(fd: int) -> Support:
    """Ask KVM (system or VM fd) whether and how it coalesces writes."""
    def check(cap: int) -> int:
        try:
            return fcntl.ioctl(fd, kvm.KVM_CHECK_EXTENSION, cap)
        except OSError:
            return 0
    return Support(check(kvm.KVM_CAP_COALESCED_MMIO), check(kvm.KVM_CAP_COALESCED_PIO) > 0)


class Zone(NamedTuple):
    """``length`` bytes of port space (``kind="port"``) or guest-physical MMIO from
    ``start`` whose writes are coalesced."""

    kind: str
    start: int
    length: int

    @property
    def end(self) -> int:
        """The last address (inclusive), as ``Bus.map_ports`` counts."""
        return self.start + self.length - 1

    def check(self) -> None:
        """Raise ``ValueError`` for a zone the kernel would refuse (or that makes no sense)."""
        if self.kind not in KINDS:
            raise ValueError(f"zone kind {self.kind!r} is not one of {KINDS}")
        limit = PORT_SPACE if self.kind == "port" else 1 << 64
        if not (0 < self.length <= 0xFFFF_FFFF and self.start >= 0
                and self.start + self.length <= limit):
            raise ValueError(f"bad {self.kind} range to coalesce: {self.length} bytes "
                             f"from {self.start:#x}")

    def overlaps(self, other: Zone) -> bool:
        return (self.kind == other.kind and self.start <= other.end
                and other.start <= self.end)

    def __str__(self) -> str:
        return f"{self.kind} {self.start:#x}..{self.end:#x}"


def _zone_arg(zone: Zone) -> bytes:
    return kvm.COALESCED_ZONE_STRUCT.pack(zone.start, zone.length, int(zone.kind == "port"))


def register_zone(vm_fd: int, zone: Zone) -> None:
    """KVM_REGISTER_COALESCED_MMIO: from now on the kernel coalesces ``zone``'s writes."""
    fcntl.ioctl(vm_fd, kvm.KVM_REGISTER_COALESCED_MMIO, _zone_arg(zone))


def unregister_zone(vm_fd: int, zone: Zone) -> None:
    """KVM_UNREGISTER_COALESCED_MMIO. The kernel removes every registered zone of the
    same kind that *contains* ``zone``; ``ZoneTable`` keeps zones disjoint, so that is
    ``zone`` itself. Writes already in the ring stay there until the next drain."""
    fcntl.ioctl(vm_fd, kvm.KVM_UNREGISTER_COALESCED_MMIO, _zone_arg(zone))


class ZoneTable:
    """The coalesced zones of one VM, registered on its fd (thread-safe).

    Zones of one kind may not overlap, so that unregistering one (which the kernel
    does by containment) removes exactly that one.
    """

    def __init__(self, vm_fd: int, support: Support | None = None) -> None:
        self.vm_fd = vm_fd
        self.support = support if support is not None else probe(vm_fd)
        self._lock = threading.Lock()
        self._zones: list[Zone] = []

    @property
    def zones(self) -> tuple[Zone, ...]:
        """The registered zones, in the order they were added."""
        return tuple(self._zones)

    def check(self, zone: Zone) -> None:
        """Raise ``CoalescingUnsupported``/``ValueError`` if ``add(zone)`` would fail."""
        zone.check()
        if not self.support.allows(zone.kind):
            raise CoalescingUnsupported(f"cannot coalesce {zone}: "
                                        f"{self.support.why_not(zone.kind)}")
        for z in self._zones:
            if zone.overlaps(z):
                raise ValueError(f"cannot coalesce {zone}: it overlaps the coalesced {z}")

    def add(self, zone: Zone) -> None:
        with self._lock:
            self.check(zone)
            register_zone(self.vm_fd, zone)
            self._zones.append(zone)

    def remove(self, zone: Zone) -> None:
        with self._lock:
            if zone not in self._zones:
                raise ValueError(f"{zone} is not coalesced (coalesced: "
                                 f"{', '.join(map(str, self._zones)) or 'none'})")
            unregister_zone(self.vm_fd, zone)
            self._zones.remove(zone)


# An entry with its data as one little-endian u64 (the bytes past ``len`` are stale
# and masked off): one iter_unpack per run of entries, no per-size decoder.
_ENTRY_WHOLE = struct.Struct("<QIIQ")
_MASKS = tuple((1 << (8 * n)) - 1 for n in range(9))      # by length; x86 writes <= 8
_FIRST_PACK = struct.Struct("<I").pack_into
if _ENTRY_WHOLE.size != kvm.COALESCED_ENTRY_SIZE:  # pragma: no cover - layout typo
    raise AssertionError("kvm_coalesced_mmio entry size")


class CoalescedRing:
    """Reader of the coalesced ring in ``buf`` (a vCPU's kvm_run mmap) at ``page_offset``.

    Only one thread may drain (the vCPU thread); ``pending`` may be asked from any.
    Holds no buffer export of ``buf``, so the mmap can still be closed.
    """

    def __init__(self, buf: Any, page_offset: int, page_size: int = mmap.PAGESIZE) -> None:
        base = page_offset * page_size
        if page_offset <= 0 or base + page_size > len(buf):
            raise CoalescingUnsupported(
                f"the coalesced ring's page {page_offset} is not inside the vCPU mmap "
                f"({len(buf)} bytes)")
        self._buf = buf
        self._first = base + kvm.COALESCED_RING_FIRST
        self._entries = base + kvm.COALESCED_RING_ENTRIES
        self._head = kvm.COALESCED_HEAD_STRUCT.unpack_from  # (first, last)
        self.size = kvm.coalesced_ring_entries(page_size)   # entries, one always free
        self.delivered = 0                                   # writes delivered so far
        self.drains = 0                                      # drains that delivered any

    def pending(self) -> int:
        """Writes in the ring not yet delivered."""
        first, last = self._head(self._buf, self._first)
        return (last - first) % self.size

    def drain(self, port_write: Write, mmio_write: Write,
              after: Callable[[], Any] | None = None,
              before: Callable[[int], Any] | None = None) -> int:
        """Deliver every write in the ring, oldest first, to ``port_write(port, size,
        value)`` or ``mmio_write(addr, size, value)``; return how many.

        ``first`` is written back once, at the end. If a callback raises, the writes
        before it and its own are consumed, the rest stay for the next drain, and the
        exception propagates. ``after()`` is called once when at least one write was
        delivered (also when a callback raised); ``before(n)`` once before the first,
        with how many are waiting.
        """
        first, last = self._head(self._buf, self._first)
        if first == last:           # the common case, once per exit: keep it short
            return 0
        if before is not None:
            before((last - first) % self.size)
        return self._deliver(first, last, port_write, mmio_write, after)

    def _deliver(self, first: int, last: int, port_write: Write, mmio_write: Write,
                 after: Callable[[], Any] | None) -> int:
        buf, head = self._buf, self._head
        size, entries, entry_size = self.size, self._entries, kvm.COALESCED_ENTRY_SIZE
        iter_entries, masks = _ENTRY_WHOLE.iter_unpack, _MASKS
        n = 0
        chunk = first                           # where the current run of entries began
        try:
            while first != last:
                if first >= size or last >= size:
                    raise RuntimeError(f"coalesced ring corrupt: first {first}, last {last}, "
                                       f"{size} entries")
                stop = last if last > first else size      # up to the wrap, then from 0
                chunk = first
                for addr, length, pio, data in iter_entries(
                        buf[entries + first * entry_size:entries + stop * entry_size]):
                    first += 1                  # consumed even if the callback raises
                    (port_write if pio else mmio_write)(addr, length, data & masks[length])
                n += first - chunk
                if first == size:
                    first = 0
                chunk = first
                # Anything produced meanwhile? Not by this VM's one vCPU, which is out of
                # KVM_RUN; asking costs one unpack per drain.
                last = head(buf, self._first)[1]
        finally:
            n += first - chunk                  # a run cut short by a raising callback
            if n:
                _FIRST_PACK(buf, self._first, first % size)
                self.delivered += n
                self.drains += 1
                if after is not None:
                    after()
        return n
