"""Coalesced writes (remote_hw.client.vmm.coalesced): the ring reader, the zone table,
and guests on the real /dev/kvm writing to coalesced ports and MMIO.

The guest is guests/coalesce.S: a stream of counting bytes to one port (or MMIO byte),
then a "fence" (a non-coalesced OUT and IN on another port) or a spin with no exit.
Handlers log into one shared list, and a drain listener logs ``DRAIN``, so a test sees
both the order of the accesses and which of them came through the ring. No wall-clock
assertions: timeouts only bound a broken run.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest

from remote_hw.client.vmm import STATUS_STOPPED, Bus, Vm, VmError, debug_exit_status, kvm
from remote_hw.client.vmm import coalesced as co
from remote_hw.client.vmm.vcpu import Kicker
from remote_hw.guest_images import guest_image

RUN_TIMEOUT = 30          # seconds; only bounds a broken run
WAIT = 30
PORT, FENCE, OTHER = 0x520, 0x521, 0x522
MMIO_SEG, MMIO_ADDR = 0xA000, 0xA0000
FENCE_ANSWER = 0x33
MODE_FENCE, MODE_SPIN, MODE_MMIO = 0, 1, 2
DRAIN = "drain"
PAGE = 4096
RING_ENTRIES = 170        # (4096 - 8) / 24; the ring holds one fewer


def coalesce_guest(count: int, mode: int = MODE_FENCE, port: int = PORT, value: int = 0,
                   fence: int = FENCE, seg: int = MMIO_SEG) -> bytes:
    """guests/coalesce.S with its parameters patched in (offsets as its header says)."""
    img = bytearray(guest_image("coalesce.bin").read_bytes())
    struct.pack_into("<IIIIII", img, 4, count, port, mode, value, fence, seg)
    return bytes(img)


def counting(n: int, value: int = 0) -> list[int]:
    return [(value + i) & 0xFF for i in range(n)]


class Logger:
    """A handler appending ``(tag, "w", offset, size, value)`` / ``(tag, "r", offset,
    size)`` to a log shared with the other handlers and the drain listener."""

    def __init__(self, log: list, tag: str, answer: int = FENCE_ANSWER) -> None:
        self.log, self.tag, self.answer = log, tag, answer

    def read(self, offset: int, size: int) -> int:
        self.log.append((self.tag, "r", offset, size))
        return self.answer

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append((self.tag, "w", offset, size, value))


def written(log: list, tag: str) -> list[int]:
    return [e[4] for e in log if e != DRAIN and e[0] == tag and e[1] == "w"]


def new_vm(log: list, mem_size: int = 1 << 20, **kw) -> Vm:
    vm = Vm(mem_size=mem_size, **kw)
    vm.bus.map_ports(PORT, PORT, Logger(log, "c"))
    vm.bus.map_ports(FENCE, FENCE, Logger(log, "f"))
    vm.bus.map_ports(OTHER, OTHER, Logger(log, "o"))
    vm.bus.on_drain(lambda: log.append(DRAIN))
    return vm


def wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# --------------------------------------------------------------- tables and ring

def test_abi_numbers():
    # What <linux/kvm.h> (6.1) expands to; kvm.py computes them from _IOC.
    assert kvm.KVM_REGISTER_COALESCED_MMIO == 0x4010AE67
    assert kvm.KVM_UNREGISTER_COALESCED_MMIO == 0x4010AE68
    assert (kvm.KVM_CAP_COALESCED_MMIO, kvm.KVM_CAP_COALESCED_PIO) == (15, 162)
    assert kvm.COALESCED_ZONE_STRUCT.size == 16
    assert (kvm.COALESCED_RING_ENTRIES, kvm.COALESCED_ENTRY_SIZE,
            kvm.COALESCED_ENTRY_DATA) == (8, 24, 16)
    assert kvm.coalesced_ring_entries(PAGE) == RING_ENTRIES


def fake_ring(first: int, entries: list[tuple[int, int, int, int]],
              page_offset: int = 1) -> tuple[bytearray, co.CoalescedRing]:
    """A kvm_run-like buffer whose ring holds ``entries`` (addr, len, pio, value) from
    index ``first`` on, wrapping as the kernel does."""
    buf = bytearray((page_offset + 1) * PAGE)
    base = page_offset * PAGE
    i = first
    for addr, length, pio, value in entries:
        off = base + 8 + i * 24
        stale = b"\xee" * (8 - length)           # the kernel copies only len bytes
        struct.pack_into("<QII8s", buf, off, addr, length, pio,
                         value.to_bytes(length, "little") + stale)
        i = (i + 1) % RING_ENTRIES
    struct.pack_into("<II", buf, base, first, i)
    return buf, co.CoalescedRing(buf, page_offset, PAGE)


def test_ring_drains_in_order_across_the_wrap():
    entries = [(0x520, 1, 1, 0x11), (0xD0000000, 8, 0, 0x1122334455667788),
               (0x3F8, 2, 1, 0xBEEF), (0xD0000010, 4, 0, 0xCAFEF00D), (0x521, 1, 1, 0x22)]
    buf, ring = fake_ring(RING_ENTRIES - 2, entries)
    assert ring.pending() == 5
    log: list = []
    n = ring.drain(lambda *a: log.append(("p", *a)), lambda *a: log.append(("m", *a)),
                   lambda: log.append(DRAIN))
    assert n == 5
    assert log == [("p" if pio else "m", addr, length, value)
                   for addr, length, pio, value in entries] + [DRAIN]
    assert struct.unpack_from("<II", buf, PAGE) == (3, 3)      # first written back
    assert ring.pending() == 0 and (ring.delivered, ring.drains) == (5, 1)


def test_ring_empty_drain_calls_nothing():
    _buf, ring = fake_ring(7, [])
    calls: list = []
    assert ring.drain(calls.append, calls.append, lambda: calls.append(DRAIN)) == 0
    assert calls == [] and ring.drains == 0


def test_ring_handler_error_consumes_up_to_it_and_keeps_the_rest():
    buf, ring = fake_ring(0, [(PORT, 1, 1, v) for v in (1, 2, 3, 4)])
    seen: list = []
    after: list = []

    def port_write(port, size, value):
        seen.append(value)
        if value == 2:
            raise RuntimeError("device gone")

    with pytest.raises(RuntimeError, match="device gone"):
        ring.drain(port_write, port_write, lambda: after.append(1))
    assert seen == [1, 2] and after == [1]
    assert ring.pending() == 2
    ring.drain(port_write, port_write)
    assert seen == [1, 2, 3, 4] and ring.pending() == 0


def test_ring_page_must_be_inside_the_mmap():
    with pytest.raises(co.CoalescingUnsupported, match="not inside"):
        co.CoalescedRing(bytearray(2 * PAGE), 2, PAGE)
    with pytest.raises(co.CoalescingUnsupported):
        co.CoalescedRing(bytearray(3 * PAGE), 0, PAGE)


def test_zone_checks_and_missing_capability():
    table = co.ZoneTable(-1, co.Support(page_offset=2, pio=False))
    with pytest.raises(co.CoalescingUnsupported, match="KVM_CAP_COALESCED_PIO"):
        table.check(co.Zone("port", PORT, 1))
    table.check(co.Zone("mmio", MMIO_ADDR, 0x100))             # MMIO alone is fine
    none = co.ZoneTable(-1, co.Support(page_offset=0, pio=False))
    with pytest.raises(co.CoalescingUnsupported, match="no coalesced I/O ring"):
        none.check(co.Zone("mmio", MMIO_ADDR, 1))
    for bad in (co.Zone("port", 0xFFFF, 2), co.Zone("port", PORT, 0), co.Zone("port", -1, 1),
                co.Zone("mmio", (1 << 64) - 1, 2), co.Zone("mmio", 0, 1 << 32),
                co.Zone("io", 0, 1)):
        with pytest.raises(ValueError):
            table.check(bad)


def test_bus_drain_listeners_in_order():
    bus = Bus(debug_exit_port=None)
    calls: list = []
    bus.on_drain(lambda: calls.append(1))
    bus.on_drain(lambda: calls.append(2))
    bus.after_drain()
    assert calls == [1, 2]
    with pytest.raises(TypeError):
        bus.on_drain(42)


def test_bus_batches_open_only_around_drains_of_several_writes():
    """A (before, after) pair (a link's cork/uncork) brackets drains of more than one
    write; a drain of one write needs no batch and costs no cork."""
    bus = Bus(debug_exit_port=None)
    calls: list = []
    bus.on_drain(lambda: calls.append("after"), before=lambda: calls.append("before"))
    bus.on_drain(lambda: calls.append("always"))
    bus.before_drain(1)
    bus.after_drain()
    assert calls == ["always"]
    calls.clear()
    bus.before_drain(3)
    bus.after_drain()
    assert calls == ["before", "always", "after"]
    calls.clear()
    bus.after_drain()  # no batch open: the pair's after is not called
    assert calls == ["always"]


def test_ring_tells_before_how_many_writes_wait():
    entries = [(0x3F8, 1, 1, v) for v in (1, 2, 3)]
    _buf, ring = fake_ring(0, entries)
    seen: list = []
    assert ring.drain(lambda *a: None, lambda *a: None, None, seen.append) == 3
    assert seen == [3]


# ------------------------------------------------------------------ real guests


@pytest.mark.kvm
def test_capability_query():
    with Vm(mem_size=1 << 20) as vm:
        assert vm.coalescing_supported() and vm.coalescing_supported("mmio")
        assert vm.coalesced_zones == () and vm.coalesced_pending() == 0


@pytest.mark.kvm
def test_coalesced_writes_arrive_in_order_before_the_fence():
    log: list = []
    with new_vm(log) as vm:
        zone = vm.coalesce_ports(PORT, 1)
        assert vm.coalesced_zones == (zone,) and str(zone) == "port 0x520..0x520"
        vm.load_image(coalesce_guest(16, value=0x40))
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(FENCE_ANSWER)
    # All 16 through the ring (one drain, before the fence's exit), then the fence.
    assert log == ([("c", "w", 0, 1, v) for v in counting(16, 0x40)]
                   + [DRAIN, ("f", "w", 0, 1, 0x50), ("f", "r", 0, 1)])


@pytest.mark.kvm
def test_read_of_a_coalesced_port_exits_after_its_writes():
    # The fence on the coalesced port itself: its OUT is queued too, its IN exits.
    log: list = []
    with new_vm(log) as vm:
        vm.coalesce_ports(PORT, 1)
        vm.load_image(coalesce_guest(5, fence=PORT))
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(FENCE_ANSWER)
    assert log == [("c", "w", 0, 1, v) for v in range(6)] + [DRAIN, ("c", "r", 0, 1)]


@pytest.mark.kvm
def test_more_writes_than_the_ring_holds():
    # Ring full: KVM exits for the write that does not fit; the loop drains first, so
    # the order holds and nothing is lost or doubled.
    n = 1000
    log: list = []
    with new_vm(log) as vm:
        vm.coalesce_ports(PORT, 1)
        vm.load_image(coalesce_guest(n))
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(FENCE_ANSWER)
        ring = vm._vt.coalesced
        assert ring is not None and ring.delivered < n
    assert written(log, "c") == counting(n)
    # Every coalesced write reaches the bus before the fence does. Whether a drain
    # comes right before the fence depends on where the ring's fill stood: the last
    # write may have found it full and exited itself (an exit of another kind, which
    # the host may cause at any time, drains the ring and shifts that phase).
    assert [e for e in log if e != DRAIN][-3:] == [("c", "w", 0, 1, (n - 1) & 0xFF),
                                                   ("f", "w", 0, 1, n & 0xFF),
                                                   ("f", "r", 0, 1)]
    drains = log.count(DRAIN)
    assert drains >= n // RING_ENTRIES
    # Between two drains at most one ring's worth plus the write that found it full.
    marks = [i for i, e in enumerate(log) if e == DRAIN]
    assert max(b - a - 1 for a, b in zip([-1] + marks, marks)) <= RING_ENTRIES


@pytest.mark.kvm
def test_unregistered_port_is_not_coalesced():
    log: list = []
    with new_vm(log) as vm:
        vm.coalesce_ports(PORT, 1)            # the neighbour of OTHER only
        vm.load_image(coalesce_guest(20, port=OTHER))
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(FENCE_ANSWER)
        assert vm.coalesced_pending() == 0
    assert DRAIN not in log                   # every write was its own exit
    assert written(log, "o") == counting(20)


@pytest.mark.kvm
def test_uncoalesced_port_exits_again():
    log: list = []
    with new_vm(log) as vm:
        zone = vm.coalesce_ports(PORT, 1)
        vm.uncoalesce(zone)
        assert vm.coalesced_zones == ()
        vm.load_image(coalesce_guest(20))
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(FENCE_ANSWER)
    assert DRAIN not in log and written(log, "c") == counting(20)


@pytest.mark.kvm
def test_zone_bookkeeping_on_a_vm():
    with Vm(mem_size=1 << 20) as vm:
        a = vm.coalesce_ports(PORT, 4)
        b = vm.coalesce_mmio(MMIO_ADDR, 0x100)
        c = vm.coalesce_mmio(PORT, 4)             # same numbers, other space: fine
        assert vm.coalesced_zones == (a, b, c)
        with pytest.raises(ValueError, match="overlaps"):
            vm.coalesce_ports(PORT + 3, 2)
        with pytest.raises(ValueError, match="not coalesced"):
            vm.uncoalesce(co.Zone("port", PORT, 1))
        vm.uncoalesce(b)
        assert vm.coalesced_zones == (a, c)
    with pytest.raises(VmError, match="closed"):
        vm.coalesce_ports(PORT, 1)


@pytest.mark.kvm
def test_missing_capability_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(co, "probe", lambda fd: co.Support(page_offset=0, pio=False))
    with Vm(mem_size=1 << 20) as vm:
        assert not vm.coalescing_supported()
        with pytest.raises(co.CoalescingUnsupported, match="KVM_CAP_COALESCED_MMIO"):
            vm.coalesce_ports(PORT, 1)
        assert vm._vt.coalesced is None           # the exit loop still tests nothing


@pytest.mark.kvm
def test_coalesced_mmio_writes():
    log: list = []
    with new_vm(log, mem_size=512 << 10) as vm:  # RAM below the 0xa0000 MMIO byte
        vm.bus.map_mmio(MMIO_ADDR, MMIO_ADDR + 0xFFF, Logger(log, "m"))
        vm.coalesce_mmio(MMIO_ADDR, 0x1000)
        vm.load_image(coalesce_guest(300, mode=MODE_MMIO, value=7))
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(FENCE_ANSWER)
    assert written(log, "m") == counting(300, 7)
    assert DRAIN in log and log[-2:] == [("f", "w", 0, 1, (7 + 300) & 0xFF), ("f", "r", 0, 1)]


@pytest.mark.kvm
def test_coalescing_starts_while_the_guest_runs():
    n, switch_at = 3000, 200
    log: list = []
    reached, registered = threading.Event(), threading.Event()

    class Pausing(Logger):
        def write(self, offset, size, value):
            super().write(offset, size, value)
            if len(log) == switch_at:     # the vCPU waits here while zones change
                reached.set()
                registered.wait(WAIT)

    with new_vm(log) as vm:
        vm.bus.unmap_ports(PORT)
        vm.bus.map_ports(PORT, PORT, Pausing(log, "c"))
        vm.load_image(coalesce_guest(n))
        result: list = []
        t = threading.Thread(target=lambda: result.append(vm.run(timeout=RUN_TIMEOUT)))
        t.start()
        assert reached.wait(WAIT)
        assert vm.running
        vm.coalesce_ports(PORT, 1)
        registered.set()
        t.join(WAIT)
    assert result == [debug_exit_status(FENCE_ANSWER)]
    assert written(log, "c") == counting(n)
    assert DRAIN not in log[:switch_at] and DRAIN in log[switch_at:]


@pytest.mark.kvm
def test_a_kick_delivers_the_writes_of_a_guest_that_never_exits():
    # The guest writes, then spins with no exit: only the watchdog's kick (EINTR)
    # brings the vCPU back to user space, and the loop drains there.
    # A kick may land between two of the writes: then they come in two drains.
    log: list = []
    with new_vm(log) as vm:
        vm.coalesce_ports(PORT, 1)
        vm.load_image(coalesce_guest(5, mode=MODE_SPIN, value=0x90))
        result: list = []
        t = threading.Thread(target=lambda: result.append(vm.run(timeout=RUN_TIMEOUT)))
        t.start()
        try:
            wait_for(lambda: len(written(log, "c")) == 5 and log[-1] == DRAIN,
                     "5 writes delivered")
            assert vm.running                     # delivered while still running
            assert written(log, "c") == counting(5, 0x90)
        finally:
            vm.stop()
            t.join(WAIT)
    assert result == [STATUS_STOPPED]


@pytest.mark.kvm
def test_stop_delivers_queued_writes():
    # No watchdog kicks (an hour's interval): the writes sit in the ring until stop().
    log: list = []
    kicker = Kicker(interval=3600)
    with new_vm(log, kicker=kicker) as vm:
        vm.coalesce_ports(PORT, 1)
        vm.load_image(coalesce_guest(5, mode=MODE_SPIN, value=0xFE))
        result: list = []
        t = threading.Thread(target=lambda: result.append(vm.run(timeout=RUN_TIMEOUT)))
        t.start()
        try:
            wait_for(lambda: vm.coalesced_pending() == 5, "5 queued writes")
            assert log == []                      # queued, not delivered
        finally:
            vm.stop()
            t.join(WAIT)
        assert vm.coalesced_pending() == 0
    assert result == [STATUS_STOPPED]
    assert log == [("c", "w", 0, 1, v) for v in counting(5, 0xFE)] + [DRAIN]
