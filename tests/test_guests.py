"""The guests in guests/ built with guests/build.sh and run on the real /dev/kvm.

The UART here is a tiny test-only 16550 (``CaptureUart``) so these tests depend on
nothing but the monitor; one test also runs against the project's own model
(remote_hw.devices.uart16550) when that module exists. No wall-clock assertions:
timeouts only bound a broken run.
"""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from remote_hw.client.vmm import STATUS_HALTED, Vm, debug_exit_status
from remote_hw.devices.cmos_rtc import CmosRtc
from remote_hw.devices.uart16550 import Uart16550

ROOT = Path(__file__).resolve().parent.parent
BUILD_SH = ROOT / "guests" / "build.sh"
def _declared_guests() -> set[str]:
    """Every image guests/build.sh says it builds (its 'raw NAME' / 'elf NAME' lines)."""
    text = (Path(__file__).resolve().parent.parent / "guests" / "build.sh").read_text()
    return {f"{n}.bin" for n in re.findall(r"^raw (\S+)", text, re.M)} | \
        {f"{n}.elf" for n in re.findall(r"^elf (\S+)", text, re.M)}


GUESTS = _declared_guests()
RUN_TIMEOUT = 30
WAIT = 30

pytestmark = pytest.mark.kvm


def build(out: Path) -> dict[str, str]:
    subprocess.run(["sh", str(BUILD_SH), str(out)], check=True, capture_output=True)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}


@pytest.fixture(scope="session")
def guests(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("guests")
    build(out)
    return out


# --------------------------------------------------------------- test devices

class CaptureUart:
    """Just enough of a 16550 at COM1 for the guests: THR/RBR, IER, IIR, LCR, MCR,
    LSR (THRE always set, DR while bytes are queued), scratch. The IRQ (line 4) is a
    level: RX interrupt enabled and data ready."""

    def __init__(self, vm: Vm | None = None, line: int = 4) -> None:
        self.vm, self.line = vm, line
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.out = bytearray()
        self.rx = bytearray()
        self.regs = {1: 0, 3: 0, 4: 0, 7: 0}
        self.level = False
        self.irq_edges = 0

    def _update_irq(self) -> None:
        level = bool(self.regs[1] & 1 and self.rx)
        if level != self.level and self.vm is not None:
            self.level = level
            self.irq_edges += level
            self.vm.set_irq(self.line, level)

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset == 0:
                value = self.rx.pop(0) if self.rx else 0
            elif offset == 2:
                value = 0xC4 if self.regs[1] & 1 and self.rx else 0xC1
            elif offset == 5:
                value = 0x60 | (1 if self.rx else 0)
            elif offset == 6:
                value = 0xB0
            else:
                value = self.regs.get(offset, 0)
            self._update_irq()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset == 0:
                self.out.append(value & 0xFF)
                self.changed.notify_all()
            elif offset in self.regs:
                self.regs[offset] = value & 0xFF
            self._update_irq()

    def feed(self, data: bytes) -> None:
        with self.lock:
            self.rx += data
            self._update_irq()

    def wait_for(self, text: bytes, timeout: float = WAIT) -> bytes:
        with self.lock:
            self.changed.wait_for(lambda: text in self.out, timeout)
            return bytes(self.out)


class FakeCmos:
    """Ports 0x70/0x71: index register and data. ``uip_reads`` reads of register A
    report an update in progress first."""

    def __init__(self, regs: dict[int, int], uip_reads: int = 0) -> None:
        self.regs = dict(regs)
        self.index = 0
        self.uip_reads = uip_reads
        self.reads_a = 0

    def read(self, offset: int, size: int) -> int:
        if offset != 1:
            return 0xFF
        if self.index == 0x0A:
            self.reads_a += 1
            return 0xA6 if self.reads_a <= self.uip_reads else 0x26
        return self.regs.get(self.index, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0x7F


def new_vm(mem_size: int = 4 << 20) -> tuple[Vm, CaptureUart]:
    vm = Vm(mem_size=mem_size)
    uart = CaptureUart(vm)
    vm.bus.map_ports(0x3F8, 0x3FF, uart)
    return vm, uart


class Background:
    """``vm.run`` in a thread; ``result()`` joins and returns the status or raises."""

    def __init__(self, vm: Vm) -> None:
        self.value: object = None
        self.thread = threading.Thread(target=self._go, args=(vm,))
        self.thread.start()

    def _go(self, vm: Vm) -> None:
        try:
            self.value = vm.run(timeout=RUN_TIMEOUT)
        except BaseException as e:
            self.value = e

    def result(self):
        self.thread.join()
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


# --------------------------------------------------------------------- build

def test_build_is_reproducible(tmp_path):
    first = build(tmp_path / "a")
    second = build(tmp_path / "b")
    assert set(first) == GUESTS
    assert first == second


def test_ioloop_patch_offsets_documented(guests):
    img = (guests / "ioloop.bin").read_bytes()
    assert struct.unpack_from("<IIII", img, 4) == (100000, 0x3FF, 0, 0)


# --------------------------------------------------------------------- hello

@pytest.mark.parametrize("name, kind, text", [
    ("hello.bin", "raw", b"Hello from remote-hw guest\r\n"),
    ("hello32.elf", "elf32", b"hello32\r\n"),
    ("hello64.elf", "elf64", b"hello64\r\n"),
])
def test_hello_guests_print_and_halt(guests, name, kind, text):
    vm, uart = new_vm()
    with vm:
        assert vm.load_image(guests / name).kind == kind
        assert vm.run(timeout=RUN_TIMEOUT) == STATUS_HALTED
        assert bytes(uart.out) == text
        assert uart.regs[3] == 0x03                  # LCR 8N1 was programmed


def test_hello_loader_modes(guests):
    vm, uart = new_vm()
    with vm:
        assert vm.load_image(guests / "hello32.elf").kind == "elf32"
        assert vm.run(timeout=RUN_TIMEOUT) == STATUS_HALTED
        sregs = vm.sregs()
        assert sregs.cr0 & 1 and not sregs.efer & 0x400 and sregs.cs.db == 1
        assert vm.load_image(guests / "hello64.elf").kind == "elf64"
        assert vm.run(timeout=RUN_TIMEOUT) == STATUS_HALTED
        sregs = vm.sregs()
        assert sregs.efer & 0x400 and sregs.cs.l == 1 and sregs.cr0 & 0x8000_0000
        assert bytes(uart.out) == b"hello32\r\nhello64\r\n"


# ---------------------------------------------------------------------- echo

def test_echo_interrupt_driven(guests):
    vm, uart = new_vm(1 << 20)
    with vm:
        vm.load_image(guests / "echo.bin")
        bg = Background(vm)
        try:
            assert uart.wait_for(b"echo ready\r\n").endswith(b"echo ready\r\n")
            uart.feed(b"abc")
            assert uart.wait_for(b"abc") == b"echo ready\r\nabc"
            uart.feed(b"XYZ")
            assert uart.wait_for(b"abcXYZ") == b"echo ready\r\nabcXYZ"
            uart.feed(b"!\x04")
        finally:
            if bg.thread.is_alive() and b"bye" not in uart.wait_for(b"bye", 5):
                vm.stop(0xDEAD)
            status = bg.result()
        assert bytes(uart.out) == b"echo ready\r\nabcXYZ!bye\r\n"
        assert status == STATUS_HALTED
        assert uart.irq_edges >= 3                    # one per feed at least
        assert uart.regs[4] == 0x0B and uart.regs[1] == 0x01


def test_echo_with_project_uart_model(guests):
    vm = Vm(mem_size=1 << 20)
    with vm:
        uart = Uart16550(irq=vm.irq_line(4))
        out = bytearray()
        got = threading.Condition()

        def sink(data: bytes) -> None:
            with got:
                out.extend(data)
                got.notify_all()

        uart.tx_sink = sink
        lock = threading.Lock()

        class Locked:                                 # the server's instance lock
            def read(self, offset, size):
                with lock:
                    return uart.read(offset, size)

            def write(self, offset, size, value):
                with lock:
                    uart.write(offset, size, value)

        vm.bus.map_ports(0x3F8, 0x3FF, Locked())
        vm.load_image(guests / "echo.bin")
        bg = Background(vm)
        with got:
            got.wait_for(lambda: b"echo ready\r\n" in out, WAIT)
        with lock:
            uart.feed(b"hi\x04")
        with got:
            if not got.wait_for(lambda: b"bye\r\n" in out, WAIT):
                vm.stop(0xDEAD)
        assert bg.result() == STATUS_HALTED
        assert bytes(out) == b"echo ready\r\nhibye\r\n"


# ----------------------------------------------------------------------- rtc

@pytest.mark.parametrize("regs, expected", [
    # BCD, 24-hour
    ({0x00: 0x56, 0x02: 0x34, 0x04: 0x12, 0x07: 0x25, 0x08: 0x12, 0x09: 0x24, 0x32: 0x20,
      0x0B: 0x02}, b"RTC 2024-12-25 12:34:56\r\n"),
    # binary, 24-hour
    ({0x00: 5, 0x02: 4, 0x04: 23, 0x07: 1, 0x08: 2, 0x09: 99, 0x32: 19, 0x0B: 0x06},
     b"RTC 1999-02-01 23:04:05\r\n"),
    # BCD, 12-hour, PM bit; no century register (0) -> 20
    ({0x00: 0x00, 0x02: 0x59, 0x04: 0x81, 0x07: 0x31, 0x08: 0x01, 0x09: 0x30, 0x0B: 0x00},
     b"RTC 2030-01-31 13:59:00\r\n"),
    # BCD, 12-hour, 12 AM is hour 0
    ({0x00: 0x07, 0x02: 0x08, 0x04: 0x12, 0x07: 0x09, 0x08: 0x10, 0x09: 0x11, 0x32: 0x20,
      0x0B: 0x00}, b"RTC 2011-10-09 00:08:07\r\n"),
])
def test_rtc_prints_cmos_date(guests, regs, expected):
    vm, uart = new_vm(1 << 20)
    with vm:
        cmos = FakeCmos(regs, uip_reads=3)
        vm.bus.map_ports(0x70, 0x71, cmos)
        vm.load_image(guests / "rtc.bin")
        assert vm.run(timeout=RUN_TIMEOUT) == STATUS_HALTED
        assert bytes(uart.out) == expected
        assert cmos.reads_a == 4                      # waited out the update


def test_rtc_with_project_cmos_model(guests):
    when = datetime(2031, 7, 4, 9, 8, 7, tzinfo=timezone.utc).timestamp() + 0.5
    vm, uart = new_vm(1 << 20)
    with vm:
        vm.bus.map_ports(0x70, 0x71, CmosRtc(clock=lambda: when))
        vm.load_image(guests / "rtc.bin")
        assert vm.run(timeout=RUN_TIMEOUT) == STATUS_HALTED
        assert bytes(uart.out) == b"RTC 2031-07-04 09:08:07\r\n"


# -------------------------------------------------------------------- ioloop

def ioloop(guests: Path, count: int, port: int, mode: int, value: int = 0) -> bytes:
    img = bytearray((guests / "ioloop.bin").read_bytes())
    struct.pack_into("<IIII", img, 4, count, port, mode, value)
    return bytes(img)


class Counter:
    def __init__(self) -> None:
        self.reads = 0
        self.writes: list[int] = []

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return self.reads & 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append(value)


def test_ioloop_in_mode(guests):
    with Vm(mem_size=1 << 20) as vm:
        dev = Counter()
        vm.bus.map_ports(0x510, 0x510, dev)
        vm.load_image(ioloop(guests, 1000, 0x510, 0))
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(1000 & 0xFF)
        assert dev.reads == 1000 and dev.writes == []


def test_ioloop_out_mode_and_unmapped_port(guests):
    with Vm(mem_size=1 << 20) as vm:
        dev = Counter()
        vm.bus.map_ports(0x510, 0x510, dev)
        vm.load_image(ioloop(guests, 300, 0x510, 1, 0x5A))
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(0x5A)
        assert dev.writes == [0x5A] * 300
        before = vm.bus.unmapped_reads
        vm.load_image(ioloop(guests, 5, 0x1234, 0))
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(0xFF)
        assert vm.bus.unmapped_reads - before == 5


def test_ioloop_string_io(guests):
    with Vm(mem_size=1 << 20) as vm:
        dev = Counter()
        vm.bus.map_ports(0x510, 0x510, dev)
        n = 3000                                      # several exits with count > 1
        vm.load_image(ioloop(guests, n, 0x510, 2))
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(n & 0xFF)
        assert dev.reads == n
        assert dev.writes == [i & 0xFF for i in range(1, n + 1)]
        assert vm.memory.read(0x1000, 4) == bytes([1, 2, 3, 4])


def test_ioloop_count_zero_exits_with_value(guests):
    with Vm(mem_size=1 << 20) as vm:
        vm.load_image(ioloop(guests, 0, 0x510, 0, 0x7F))
        assert vm.run(timeout=RUN_TIMEOUT) == 0xFF


# ---------------------------------------------------------------------- mmio

class MmioRecorder:
    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.values = {0x00: 0x1122334455667788, 0x10: 0x0F0F0F0F, 0x18: 0xBEEF, 0x1C: 0x42}

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return self.values.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


def test_mmio64_exits(guests):
    with Vm(mem_size=4 << 20) as vm:
        dev = MmioRecorder()
        vm.bus.map_mmio(0xD000_0000, 0xD000_0FFF, dev)
        vm.load_image(guests / "mmio64.elf")
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(0x2A)
        assert dev.log == [
            ("r", 0x00, 8), ("w", 0x08, 8, 0x1122334455667789),
            ("r", 0x10, 4), ("w", 0x14, 4, 0xF0F0F0F0),
            ("r", 0x18, 2), ("w", 0x1A, 2, 0xBEEF),
            ("r", 0x1C, 1), ("w", 0x1D, 1, 0x42),
            ("w", 0x20, 4, 0xFFFF_FFFF),              # the unmapped read gave all ones
        ]
        assert vm.bus.unmapped_reads >= 1


# ------------------------------------------------------------------ concurrency

def test_two_guests_concurrently(guests):
    vm1, uart1 = new_vm()
    vm2, uart2 = new_vm(1 << 20)
    with vm1, vm2:
        dev = Counter()
        vm2.bus.map_ports(0x510, 0x510, dev)
        vm1.load_image(guests / "hello64.elf")
        vm2.load_image(ioloop(guests, 2000, 0x510, 0))
        bg1, bg2 = Background(vm1), Background(vm2)
        assert bg1.result() == STATUS_HALTED
        assert bg2.result() == debug_exit_status(2000 & 0xFF)
        assert bytes(uart1.out) == b"hello64\r\n" and uart2.out == b""
        assert dev.reads == 2000
