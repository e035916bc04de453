"""Dispatch of port-I/O and MMIO exits to handlers.

A handler is any object with ``read(offset, size) -> int`` and
``write(offset, size, value) -> None`` where ``offset`` is relative to the start of the
range it was mapped at: a local device model (``remote_hw.devices.base.Device``) maps
directly, and so does a proxy that forwards accesses to a remote server.

Port dispatch is one dict lookup: ``Bus.port_table`` maps every mapped port to
``(read, write, base)`` with the bound methods already looked up. MMIO dispatch is a
bisect over the sorted range starts (``Bus.mmio_read`` / ``Bus.mmio_write``).

Unmapped accesses: reads return all ones of the access size, writes are ignored and
counted (``unmapped_reads`` / ``unmapped_writes``).

Port 0xf4 (``DEBUG_EXIT_PORT``) is the local debug-exit device, as QEMU's
``isa-debug-exit``: a write of ``v`` ends the VM with exit status ``(v << 1) | 1``.
It is entered in the port table like any handler; its write raises ``GuestExit``.

Writes the kernel coalesced (``coalesced.py``) arrive through ``port_write`` /
``mmio_write`` like the others, in the guest's order, a ring's worth at a time; after
each such batch the bus calls its drain listeners (``on_drain``), so a handler that
forwards writes can send one batch in one message instead of one per write.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from typing import Any, Protocol

DEBUG_EXIT_PORT = 0xF4
PORT_SPACE = 0x10000
ONES = {n: (1 << (8 * n)) - 1 for n in range(1, 9)}


class Handler(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class GuestExit(Exception):
    """Raised by a handler (inside the vCPU thread) to end the VM with ``status``."""

    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


class DebugExit:
    """isa-debug-exit: writing ``v`` ends the VM with status ``(v << 1) | 1``."""

    def read(self, offset: int, size: int) -> int:
        return ONES[size]

    def write(self, offset: int, size: int, value: int) -> None:
        raise GuestExit((value << 1) | 1, f"debug-exit write {value:#x}")


class Bus:
    """Port and MMIO address spaces of one VM."""

    def __init__(self, debug_exit_port: int | None = DEBUG_EXIT_PORT) -> None:
        self._lock = threading.Lock()
        self.port_ranges: list[tuple[int, int, Any]] = []     # (start, end, handler)
        # Hot-path tables, rebuilt on every map/unmap (the vCPU thread only reads them;
        # a rebuild swaps whole objects, so a concurrent lookup sees old or new).
        self.port_table: dict[int, tuple[Any, Any, int]] = {}
        self._mmio: list[tuple[int, int, Any]] = []            # sorted by start
        # (starts, entries) swapped as one object; entry = (end, read, write, base)
        self.mmio_index: tuple[list[int], list[tuple[int, Any, Any, int]]] = ([], [])
        self.unmapped_reads = 0
        self.unmapped_writes = 0
        # Called after each drain of the coalesced ring that delivered writes (a tuple,
        # replaced whole by on_drain, so the vCPU thread never sees it half-changed).
        self._drain_listeners: tuple[Callable[[], Any], ...] = ()
        # (before, after) pairs around a drain of more than one write (on_drain).
        self._drain_batches: tuple[tuple[Callable[[], Any], Callable[[], Any]], ...] = ()
        self._batch_open = False
        self.debug_exit_port = debug_exit_port
        if debug_exit_port is not None:
            self.map_ports(debug_exit_port, debug_exit_port, DebugExit())

    # ----------------------------------------------------------------- mapping

    @staticmethod
    def _check_handler(handler: Any) -> None:
        if not (callable(getattr(handler, "read", None))
                and callable(getattr(handler, "write", None))):
            raise TypeError(f"{handler!r} has no read(offset, size)/write(offset, size, value)")

    def map_ports(self, start: int, end: int, handler: Handler) -> None:
        """Route ports ``start..end`` (inclusive) to ``handler`` (offset = port - start)."""
        self._check_handler(handler)
        if not 0 <= start <= end < PORT_SPACE:
            raise ValueError(f"bad port range {start:#x}..{end:#x}")
        with self._lock:
            for s, e, h in self.port_ranges:
                if start <= e and s <= end:
                    raise ValueError(f"ports {start:#x}..{end:#x} overlap {s:#x}..{e:#x} "
                                     f"({type(h).__name__})")
            self.port_ranges.append((start, end, handler))
            self.port_ranges.sort(key=lambda r: r[0])
            self._rebuild_ports()

    def map_mmio(self, start: int, end: int, handler: Handler) -> None:
        """Route guest-physical ``start..end`` (inclusive) to ``handler``."""
        self._check_handler(handler)
        if not 0 <= start <= end < 1 << 64:
            raise ValueError(f"bad MMIO range {start:#x}..{end:#x}")
        with self._lock:
            for s, e, h in self._mmio:
                if start <= e and s <= end:
                    raise ValueError(f"MMIO {start:#x}..{end:#x} overlaps {s:#x}..{e:#x} "
                                     f"({type(h).__name__})")
            self._mmio.append((start, end, handler))
            self._mmio.sort(key=lambda r: r[0])
            self._rebuild_mmio()

    def unmap_ports(self, start: int) -> None:
        with self._lock:
            self.port_ranges = [r for r in self.port_ranges if r[0] != start]
            self._rebuild_ports()

    def unmap_mmio(self, start: int) -> None:
        with self._lock:
            self._mmio = [r for r in self._mmio if r[0] != start]
            self._rebuild_mmio()

    def _rebuild_ports(self) -> None:
        table: dict[int, tuple[Any, Any, int]] = {}
        for start, end, handler in self.port_ranges:
            entry = (handler.read, handler.write, start)
            for port in range(start, end + 1):
                table[port] = entry
        # Mutate in place so a loop that captured the dict sees the change; one
        # dict.update is atomic under the GIL, so live ports never go missing.
        for port in [p for p in self.port_table if p not in table]:
            del self.port_table[port]
        self.port_table.update(table)

    def _rebuild_mmio(self) -> None:
        self.mmio_index = ([r[0] for r in self._mmio],
                           [(e, h.read, h.write, s) for s, e, h in self._mmio])

    # ------------------------------------------------------------------ lookup

    def find_port(self, port: int) -> Any | None:
        for s, e, h in self.port_ranges:
            if s <= port <= e:
                return h
        return None

    def find_mmio(self, addr: int) -> tuple[Any, int] | None:
        i = bisect.bisect_right(self.mmio_index[0], addr) - 1
        if i >= 0:
            s, e, h = self._mmio[i]
            if addr <= e:
                return h, s
        return None

    # ------------------------------------------------ dispatch (slow paths / tests)

    def port_read(self, port: int, size: int) -> int:
        entry = self.port_table.get(port)
        if entry is None:
            self.unmapped_reads += 1
            return ONES[size]
        return entry[0](port - entry[2], size) & ONES[size]

    def port_write(self, port: int, size: int, value: int) -> None:
        entry = self.port_table.get(port)
        if entry is None:
            self.unmapped_writes += 1
            return
        entry[1](port - entry[2], size, value)

    def mmio_read(self, addr: int, size: int) -> int:
        starts, entries = self.mmio_index
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            end, read, _write, base = entries[i]
            if addr <= end:
                return read(addr - base, size) & ONES[size]
        self.unmapped_reads += 1
        return ONES[size]

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        starts, entries = self.mmio_index
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            end, _read, write, base = entries[i]
            if addr <= end:
                write(addr - base, size, value)
                return
        self.unmapped_writes += 1

    # --------------------------------------------------- coalesced-write batches

    def on_drain(self, callback: Callable[[], Any],
                 before: Callable[[], Any] | None = None) -> None:
        """Call ``callback()`` (in the vCPU thread) after every drain of the coalesced
        ring that delivered at least one write: the end of a batch of coalesced writes,
        all of them already passed to their handlers' ``write``. With ``before``, the
        two are a pair called around drains of more than one write only (a link corks
        before and sends the batch at once after; one write needs no batch)."""
        if not callable(callback) or (before is not None and not callable(before)):
            raise TypeError(f"{callback!r} / {before!r} is not callable")
        with self._lock:
            if before is None:
                self._drain_listeners += (callback,)
            else:
                self._drain_batches += ((before, callback),)

    def before_drain(self, count: int) -> None:
        """A drain is about to deliver ``count`` writes: open the batches if several."""
        if count > 1 and self._drain_batches:
            self._batch_open = True
            for before, _ in self._drain_batches:
                before()

    def after_drain(self) -> None:
        """A drain delivered writes: call the drain listeners, in registration order,
        and close the batches ``before_drain`` opened."""
        for callback in self._drain_listeners:
            callback()
        if self._batch_open:
            self._batch_open = False
            for _, after in self._drain_batches:
                after()
