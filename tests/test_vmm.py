"""The KVM monitor (remote_hw.client.vmm) on the real /dev/kvm.

Guest code here is a few hand-assembled real-mode bytes (loaded at 0x7c00, DS=0), so
these tests do not depend on the guest build; tests/test_guests.py runs the built
guests. No wall-clock assertions: timeouts only bound a broken run.
"""

from __future__ import annotations

import ctypes
import struct
import threading

import pytest

from remote_hw.client.vmm import (
    STATUS_HALTED,
    STATUS_RESET,
    Bus,
    GuestExit,
    GuestMemoryError,
    GuestRam,
    ImageError,
    Vm,
    VmError,
    VmTimeout,
    debug_exit_status,
    kvm,
    parse_image,
)
from remote_hw.client.vmm.loader import BOOT_AREA, RAW_LOAD_ADDR

RUN_TIMEOUT = 30      # seconds; only bounds a broken run

# --------------------------------------------------------------- hand-made guests

# mov al, 0x2a ; out 0xf4, al
DEBUG_EXIT_2A = bytes.fromhex("b02a e6f4")
# jmp $
SPIN = bytes.fromhex("ebfe")
# cli ; hlt
CLI_HLT = bytes.fromhex("faf4")
# l: sti ; hlt ; jmp l
STI_HLT = bytes.fromhex("fbf4 ebfd")


def elf32(code: bytes, entry: int = 0x100000) -> bytes:
    """A minimal ELF32 executable with one PT_LOAD segment holding ``code``."""
    ehdr, phdr = struct.Struct("<16sHHIIIIIHHHHHH"), struct.Struct("<IIIIIIII")
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    off = ehdr.size + phdr.size
    return (ehdr.pack(ident, 2, 3, 1, entry, ehdr.size, 0, 0, ehdr.size, phdr.size, 1, 0, 0, 0)
            + phdr.pack(1, off, entry, entry, len(code), len(code), 5, 0x1000) + code)


# 32-bit protected mode, empty IDT: ud2 -> #UD -> #GP -> #DF -> triple fault
TRIPLE_FAULT = elf32(bytes.fromhex("0f0b"))
# int3 with an empty IDT: a triple fault on hardware KVM; kvm_pvm's emulator gives up
# on the software-interrupt delivery instead (INTERNAL_ERROR, emulation failure)
INT3_NO_IDT = elf32(bytes.fromhex("cc ebfe"))
UNMAPPED = bytes.fromhex(
    "ba3412"        # mov dx, 0x1234
    "ec"            # in al, dx
    "a20005"        # mov [0x500], al
    "ed"            # in ax, dx
    "a30205"        # mov [0x502], ax
    "66ed"          # in eax, dx
    "66a30405"      # mov [0x504], eax
    "ee"            # out dx, al        (unmapped write)
    "faf4")         # cli ; hlt
MAPPED = bytes.fromhex(
    "ba0205"        # mov dx, 0x502
    "ec"            # in al, dx          -> read(2, 1)
    "ba0105"        # mov dx, 0x501
    "b4a5"          # mov ah, 0xa5
    "ef"            # out dx, ax         -> write(1, 2, 0xa5..)
    "66ed"          # in eax, dx         -> read(1, 4)
    "66a30006"      # mov [0x600], eax
    "e6f4")         # out 0xf4, al
# out 0x80... : mov dx, 0x510 ; out dx, al ; mov al, 7 ; out 0xf4, al
RESET_PROBE = bytes.fromhex("ba1005 ee b007 e6f4")


def counter_guest(value: int, n: int) -> bytes:
    """mov cx, n ; mov al, value ; mov dx, 0x520 ; l: out dx, al ; loop l ; out 0xf4, al"""
    return (bytes.fromhex("b9") + struct.pack("<H", n) + bytes([0xB0, value])
            + bytes.fromhex("ba2005 ee e2fd e6f4"))


class Recorder:
    """A handler recording every access; reads answer from ``values`` by offset."""

    def __init__(self, values: dict[int, int] | None = None) -> None:
        self.values = values or {}
        self.log: list[tuple] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return self.values.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


@pytest.fixture
def vm():
    machine = Vm(mem_size=2 << 20)
    yield machine
    machine.close()


# ------------------------------------------------------------------------ tables

def test_ioctl_numbers_and_struct_sizes():
    assert kvm.KVM_RUN == 0xAE80
    assert kvm.KVM_GET_MP_STATE == 0x8004AE98
    assert kvm.KVM_SET_TSS_ADDR == 0xAE47
    assert kvm.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert ctypes.sizeof(kvm.KvmRegs) == 144
    assert ctypes.sizeof(kvm.KvmSregs) == 312
    assert kvm.KvmSregs.cr0.offset == 224 and kvm.KvmSregs.efer.offset == 264
    assert kvm.KVM_RUN_FIELDS["io.data_offset"] == (40, "Q")
    assert kvm.KVM_RUN_FIELDS["mmio.is_write"] == (52, "B")


# --------------------------------------------------------------------------- bus

def test_bus_overlapping_maps_rejected():
    bus = Bus()
    bus.map_ports(0x3F8, 0x3FF, Recorder())
    with pytest.raises(ValueError):
        bus.map_ports(0x3FF, 0x400, Recorder())
    with pytest.raises(ValueError):
        bus.map_ports(0x3F0, 0x3F8, Recorder())
    with pytest.raises(ValueError):                 # the debug-exit port is taken
        bus.map_ports(0xF0, 0xFF, Recorder())
    bus.map_ports(0x3F0, 0x3F7, Recorder())         # adjacent is fine
    bus.map_mmio(0x1000, 0x1FFF, Recorder())
    with pytest.raises(ValueError):
        bus.map_mmio(0x1800, 0x27FF, Recorder())
    with pytest.raises(ValueError):
        bus.map_mmio(0x0, 0x1000, Recorder())
    bus.map_mmio(0x2000, 0x2FFF, Recorder())
    with pytest.raises(TypeError):
        bus.map_ports(0x100, 0x101, object())


def test_bus_dispatch_offsets_and_unmapped():
    bus = Bus()
    dev = Recorder({3: 0x1234})
    bus.map_ports(0x100, 0x107, dev)
    mm = Recorder({0x10: 0xAB})
    bus.map_mmio(0xD000_0000, 0xD000_0FFF, mm)
    assert bus.port_read(0x103, 2) == 0x1234
    bus.port_write(0x105, 1, 7)
    assert dev.log == [("r", 3, 2), ("w", 5, 1, 7)]
    assert bus.mmio_read(0xD000_0010, 4) == 0xAB
    bus.mmio_write(0xD000_0FFF, 1, 1)
    assert mm.log == [("r", 0x10, 4), ("w", 0xFFF, 1, 1)]
    assert bus.port_read(0x108, 1) == 0xFF
    assert bus.port_read(0x2000, 2) == 0xFFFF
    assert bus.mmio_read(0xD000_1000, 4) == 0xFFFF_FFFF
    assert bus.mmio_read(0xCFFF_FFFF, 8) == (1 << 64) - 1
    bus.port_write(0x2000, 1, 0)
    bus.mmio_write(0x1000, 4, 0)
    assert (bus.unmapped_reads, bus.unmapped_writes) == (4, 2)
    with pytest.raises(GuestExit) as e:
        bus.port_write(0xF4, 1, 3)
    assert e.value.status == 7 == debug_exit_status(3)
    bus.unmap_ports(0x100)
    assert bus.port_read(0x103, 1) == 0xFF


# ------------------------------------------------------------------------ loader

def _elf64(entry=0x100000, paddr=0x100000, filesz=4, memsz=None, phnum=1, data=b"\xeb\xfe\x90\x90",
           truncate=None, elf_class=2, machine=62):
    ehdr = struct.Struct("<16sHHIQQQIHHHHHH")
    phdr = struct.Struct("<IIQQQQQQ")
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    head = ehdr.pack(ident, 2, machine, 1, entry, ehdr.size, 0, 0, ehdr.size, phdr.size,
                     phnum, 0, 0, 0)
    off = ehdr.size + phdr.size * phnum
    ph = phdr.pack(1, 5, off, paddr, paddr, filesz, memsz if memsz is not None else filesz, 0x1000)
    img = head + ph * phnum + data
    return img[:truncate] if truncate is not None else img


def test_loader_kinds_and_errors():
    raw = parse_image(b"\xf4", 1 << 20)
    assert (raw.kind, raw.entry) == ("raw", RAW_LOAD_ADDR)
    good = parse_image(_elf64(), 4 << 20)
    assert (good.kind, good.entry) == ("elf64", 0x100000)
    assert good.segments[0].data == b"\xeb\xfe\x90\x90"
    bad = {
        "empty": b"",
        "truncated header": b"\x7fELF\x02\x01\x01" + bytes(20),
        "truncated phdrs": _elf64(truncate=80),
        "truncated segment": _elf64(filesz=100),
        "segment outside RAM": _elf64(paddr=0x3FFFFE, entry=0x3FFFFE, memsz=0x10),
        "boot area overlap": _elf64(paddr=0x7000, entry=0x7000),
        "entry outside": _elf64(entry=0x200000),
        "bad class": _elf64(elf_class=3),
        "wrong machine": _elf64(machine=3),
        "raw too large": bytes(0xA0000 - RAW_LOAD_ADDR + 1),
    }
    for what, img in bad.items():
        with pytest.raises(ImageError):
            parse_image(img, 4 << 20)
            pytest.fail(f"{what}: accepted")
    with pytest.raises(ImageError):                 # raw image bigger than small RAM
        parse_image(bytes(0x9000), 0x10000)
    assert BOOT_AREA == (0x500, 0x8000)


@pytest.mark.kvm
def test_load_image_errors_from_vm(vm, tmp_path):
    with pytest.raises(ImageError):
        vm.load_image(str(tmp_path / "missing.bin"))
    with pytest.raises(ImageError):
        vm.load_image(_elf64(paddr=0x200000, entry=0x200000, memsz=0x100000))  # 2 MiB RAM
    with pytest.raises(VmError):
        vm.run(timeout=1)                           # nothing loaded


# ------------------------------------------------------------------------ memory

@pytest.mark.kvm
def test_guest_ram_read_write_bounds():
    ram = GuestRam(64 << 10)
    try:
        ram.write(0x100, b"abc")
        assert ram.read(0xFF, 5) == b"\0abc\0"
        with pytest.raises(GuestMemoryError):
            ram.read((64 << 10) - 2, 4)
        with pytest.raises(GuestMemoryError):
            ram.write(-1, b"x")
        ram.clear()
        assert ram.read(0x100, 3) == bytes(3)
    finally:
        ram.close()
    with pytest.raises(ValueError):
        GuestRam(1000)


# ------------------------------------------------------------------ running guests

@pytest.mark.kvm
def test_debug_exit_status(vm):
    vm.load_image(DEBUG_EXIT_2A)
    assert vm.run(timeout=RUN_TIMEOUT) == (0x2A << 1) | 1


@pytest.mark.kvm
def test_cli_hlt_is_status_zero(vm):
    vm.load_image(CLI_HLT)
    assert vm.run(timeout=RUN_TIMEOUT) == STATUS_HALTED
    assert vm.regs()["rip"] == RAW_LOAD_ADDR + 2


@pytest.mark.kvm
def test_sti_hlt_waits_for_interrupts(vm):
    vm.load_image(STI_HLT)
    with pytest.raises(VmTimeout):
        vm.run(timeout=0.5)
    vm.stop(9)                                      # a stop before run is kept
    assert vm.run(timeout=RUN_TIMEOUT) == 9


@pytest.mark.kvm
def test_unmapped_reads_all_ones(vm):
    vm.load_image(UNMAPPED)
    reads, writes = vm.bus.unmapped_reads, vm.bus.unmapped_writes
    assert vm.run(timeout=RUN_TIMEOUT) == STATUS_HALTED
    assert vm.memory.read(0x500, 1) == b"\xff"
    assert vm.memory.read(0x502, 2) == b"\xff\xff"
    assert vm.memory.read(0x504, 4) == b"\xff" * 4
    assert vm.bus.unmapped_reads - reads == 3
    assert vm.bus.unmapped_writes - writes == 1


@pytest.mark.kvm
def test_port_handler_offsets_sizes_values(vm):
    dev = Recorder({2: 0x5A, 1: 0x12345678})
    vm.bus.map_ports(0x500, 0x503, dev)
    vm.load_image(MAPPED)
    assert vm.run(timeout=RUN_TIMEOUT) == (0x78 << 1) | 1
    assert dev.log == [("r", 2, 1), ("w", 1, 2, 0xA55A), ("r", 1, 4)]
    assert vm.memory.read_u32(0x600) == 0x12345678


@pytest.mark.kvm
def test_stop_from_another_thread(vm):
    vm.load_image(SPIN)
    timer = threading.Timer(0.2, vm.stop, (1234,))
    timer.start()
    try:
        assert vm.run(timeout=RUN_TIMEOUT) == 1234
    finally:
        timer.cancel()
    # the VM can be run again afterwards (it continues spinning)
    with pytest.raises(VmTimeout) as e:
        vm.run(timeout=0.2)
    assert e.value.regs["rip"] == RAW_LOAD_ADDR


@pytest.mark.kvm
def test_triple_fault_raises_with_registers(vm):
    vm.load_image(TRIPLE_FAULT)
    with pytest.raises(VmError) as e:
        vm.run(timeout=RUN_TIMEOUT)
    assert "SHUTDOWN" in str(e.value) and "rip=" in str(e.value)
    assert e.value.exit_reason == kvm.EXIT_SHUTDOWN
    assert e.value.status & 0x200


@pytest.mark.kvm
def test_crash_exit_raises_with_registers(vm):
    vm.load_image(INT3_NO_IDT)
    with pytest.raises(VmError) as e:
        vm.run(timeout=RUN_TIMEOUT)
    assert e.value.exit_reason in (kvm.EXIT_SHUTDOWN, kvm.EXIT_INTERNAL_ERROR)
    assert "rip=0x100000" in str(e.value) and e.value.regs["rip"] == 0x100000


@pytest.mark.kvm
def test_handler_exception_propagates(vm):
    class Boom(Recorder):
        def write(self, offset, size, value):
            raise RuntimeError("device on fire")

    vm.bus.map_ports(0x510, 0x510, Boom())
    vm.load_image(RESET_PROBE)
    with pytest.raises(RuntimeError, match="device on fire"):
        vm.run(timeout=RUN_TIMEOUT)


class ResetOnFirstWrite(Recorder):
    def __init__(self, vm):
        super().__init__()
        self.vm = vm

    def write(self, offset, size, value):
        super().write(offset, size, value)
        if len(self.log) == 1:
            self.vm.device_event("reset-request")


@pytest.mark.kvm
def test_reset_request_exit(vm):
    dev = ResetOnFirstWrite(vm)
    vm.bus.map_ports(0x510, 0x510, dev)
    vm.load_image(RESET_PROBE)
    assert vm.run(timeout=RUN_TIMEOUT) == STATUS_RESET
    assert vm.resets == 1 and not vm.reset_requested
    assert len(dev.log) == 1


@pytest.mark.kvm
def test_reset_request_restart():
    with Vm(mem_size=1 << 20, reset_action="restart") as vm:
        dev = ResetOnFirstWrite(vm)
        vm.bus.map_ports(0x510, 0x510, dev)
        vm.load_image(RESET_PROBE)
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(7)
        assert vm.resets == 1
        assert len(dev.log) == 2                    # the guest ran twice


@pytest.mark.kvm
def test_reset_during_pending_in_restarts_cleanly():
    # mov dx, 0x510 ; in al, dx ; out 0xf4, al -- the reset is requested inside the IN
    # handler, so KVM still owes the guest that IN's completion when the registers are
    # reset; it must not land on the restarted guest (rip + 1, al clobbered).
    class ResetOnFirstRead(Recorder):
        def read(self, offset, size):
            super().read(offset, size)
            if len(self.log) == 1:
                vm.request_reset()
                return 0x11
            return 0x22

    with Vm(mem_size=1 << 20, reset_action="restart") as vm:
        dev = ResetOnFirstRead()
        vm.bus.map_ports(0x510, 0x510, dev)
        vm.load_image(bytes.fromhex("ba1005 ec e6f4"))
        assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(0x22)
        assert vm.resets == 1 and len(dev.log) == 2


@pytest.mark.kvm
def test_guest_exit_from_in_handler_then_reload(vm):
    # The run ends inside an IN (the handler raises GuestExit): the IN's completion is
    # still pending in KVM and must not be applied to the next image's registers.
    class ExitOnRead(Recorder):
        def read(self, offset, size):
            raise GuestExit(0x5A5)

    vm.bus.map_ports(0x510, 0x510, ExitOnRead())
    vm.load_image(bytes.fromhex("ba1005 ec ebfe"))      # mov dx, 0x510 ; in al, dx
    assert vm.run(timeout=RUN_TIMEOUT) == 0x5A5
    vm.load_image(DEBUG_EXIT_2A)
    assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(0x2A)


@pytest.mark.kvm
def test_request_restart_overrides_reset_action(vm):
    class RestartOnFirstWrite(ResetOnFirstWrite):
        def write(self, offset, size, value):
            self.log.append(("w", offset, size, value))
            if len(self.log) == 1:
                self.vm.request_restart()

    dev = RestartOnFirstWrite(vm)                 # vm fixture: reset_action="exit"
    vm.bus.map_ports(0x510, 0x510, dev)
    vm.load_image(RESET_PROBE)
    assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(7)
    assert vm.resets == 1 and len(dev.log) == 2


@pytest.mark.kvm
def test_reload_image_after_run(vm):
    vm.load_image(DEBUG_EXIT_2A)
    assert vm.run(timeout=RUN_TIMEOUT) == debug_exit_status(0x2A)
    vm.load_image(UNMAPPED)
    assert vm.run(timeout=RUN_TIMEOUT) == STATUS_HALTED
    assert vm.memory.read(0x502, 2) == b"\xff\xff"


@pytest.mark.kvm
def test_two_vms_concurrently():
    n = 300
    results: dict[int, object] = {}
    devs: dict[int, Recorder] = {}
    vms = [Vm(mem_size=1 << 20, name=f"vm{i}") for i in range(2)]
    try:
        for i, machine in enumerate(vms):
            devs[i] = Recorder()
            machine.bus.map_ports(0x520, 0x520, devs[i])
            machine.load_image(counter_guest(0x10 + i, n))

        def go(i):
            try:
                results[i] = vms[i].run(timeout=RUN_TIMEOUT)
            except BaseException as e:  # pragma: no cover - reported below
                results[i] = e

        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(2):
            assert results[i] == debug_exit_status(0x10 + i)
            assert devs[i].log == [("w", 0, 1, 0x10 + i)] * n
    finally:
        for machine in vms:
            machine.close()


@pytest.mark.kvm
def test_set_irq_validates_line(vm):
    vm.set_irq(4, 1)
    vm.set_irq(4, 0)
    with pytest.raises(ValueError):
        vm.set_irq(99, 1)
