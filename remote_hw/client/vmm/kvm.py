"""The KVM ABI as tables: ioctl numbers, ``kvm_run`` field offsets, struct layouts.

Everything here is data (plus two tiny ioctl helpers). Numbers are computed from the
``_IOC`` encoding of ``<linux/kvm.h>`` and checked at import time against the values
that header's macros expand to (listed in docs/vmm.md, "The KVM ABI"), so a typo fails
loudly instead of turning into an ``EINVAL`` three calls later. Other modules use
these names, never the numbers (the exit loop binds them to locals).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import struct
from typing import Any

# --------------------------------------------------------------------------- ioctls

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


# name: (direction, nr, argument size in bytes)
_IOCTL_TABLE: dict[str, tuple[int, int, int]] = {
    # system fd
    "GET_API_VERSION": (_IOC_NONE, 0x00, 0),
    "CREATE_VM": (_IOC_NONE, 0x01, 0),
    "CHECK_EXTENSION": (_IOC_NONE, 0x03, 0),
    "GET_VCPU_MMAP_SIZE": (_IOC_NONE, 0x04, 0),
    "GET_SUPPORTED_CPUID": (_IOC_READ | _IOC_WRITE, 0x05, 8),
    # VM fd
    "CREATE_VCPU": (_IOC_NONE, 0x41, 0),
    "SET_USER_MEMORY_REGION": (_IOC_WRITE, 0x46, 32),
    "SET_TSS_ADDR": (_IOC_NONE, 0x47, 0),
    "SET_IDENTITY_MAP_ADDR": (_IOC_WRITE, 0x48, 8),
    "CREATE_IRQCHIP": (_IOC_NONE, 0x60, 0),
    "IRQ_LINE": (_IOC_WRITE, 0x61, 8),
    "REGISTER_COALESCED_MMIO": (_IOC_WRITE, 0x67, 16),     # struct kvm_coalesced_mmio_zone
    "UNREGISTER_COALESCED_MMIO": (_IOC_WRITE, 0x68, 16),
    "IRQFD": (_IOC_WRITE, 0x76, 32),
    "CREATE_PIT2": (_IOC_WRITE, 0x77, 64),
    "IOEVENTFD": (_IOC_WRITE, 0x79, 64),
    # vCPU fd
    "RUN": (_IOC_NONE, 0x80, 0),
    "GET_REGS": (_IOC_READ, 0x81, 144),
    "SET_REGS": (_IOC_WRITE, 0x82, 144),
    "GET_SREGS": (_IOC_READ, 0x83, 312),
    "SET_SREGS": (_IOC_WRITE, 0x84, 312),
    "SET_MSRS": (_IOC_WRITE, 0x89, 8),
    "SET_SIGNAL_MASK": (_IOC_WRITE, 0x8B, 4),
    "SET_FPU": (_IOC_WRITE, 0x8D, 416),
    "GET_LAPIC": (_IOC_READ, 0x8E, 1024),
    "SET_LAPIC": (_IOC_WRITE, 0x8F, 1024),
    "SET_CPUID2": (_IOC_WRITE, 0x90, 8),
    "GET_MP_STATE": (_IOC_READ, 0x98, 4),
    "SET_MP_STATE": (_IOC_WRITE, 0x99, 4),
    "GET_VCPU_EVENTS": (_IOC_READ, 0x9F, 64),
}

IOCTL: dict[str, int] = {name: _ioc(*spec) for name, spec in _IOCTL_TABLE.items()}

# What <linux/kvm.h>'s _IO*() macros expand to (docs/vmm.md); a mismatch is a bug above.
_EXPECTED = {
    "CREATE_VM": 0xAE01, "GET_VCPU_MMAP_SIZE": 0xAE04, "GET_SUPPORTED_CPUID": 0xC008AE05,
    "CREATE_VCPU": 0xAE41, "SET_USER_MEMORY_REGION": 0x4020AE46, "SET_TSS_ADDR": 0xAE47,
    "SET_IDENTITY_MAP_ADDR": 0x4008AE48, "CREATE_IRQCHIP": 0xAE60, "IRQ_LINE": 0x4008AE61,
    "IRQFD": 0x4020AE76, "CREATE_PIT2": 0x4040AE77, "IOEVENTFD": 0x4040AE79, "RUN": 0xAE80,
    "GET_REGS": 0x8090AE81, "SET_REGS": 0x4090AE82, "GET_SREGS": 0x8138AE83,
    "SET_SREGS": 0x4138AE84, "SET_MSRS": 0x4008AE89, "SET_SIGNAL_MASK": 0x4004AE8B,
    "SET_FPU": 0x41A0AE8D, "GET_LAPIC": 0x8400AE8E, "SET_LAPIC": 0x4400AE8F,
    "SET_CPUID2": 0x4008AE90, "GET_MP_STATE": 0x8004AE98, "GET_VCPU_EVENTS": 0x8040AE9F,
    # printed by a C program including <linux/kvm.h> (Debian 12, linux-libc-dev 6.1)
    "REGISTER_COALESCED_MMIO": 0x4010AE67, "UNREGISTER_COALESCED_MMIO": 0x4010AE68,
}
for _name, _value in _EXPECTED.items():
    if IOCTL[_name] != _value:  # pragma: no cover - table typo
        raise AssertionError(f"KVM ioctl {_name}: {IOCTL[_name]:#x} != {_value:#x}")

# Module-level names for the hot path and for readers grepping for KVM_RUN.
KVM_API_VERSION = 12
KVM_GET_API_VERSION = IOCTL["GET_API_VERSION"]
KVM_CREATE_VM = IOCTL["CREATE_VM"]
KVM_CHECK_EXTENSION = IOCTL["CHECK_EXTENSION"]
KVM_GET_VCPU_MMAP_SIZE = IOCTL["GET_VCPU_MMAP_SIZE"]
KVM_GET_SUPPORTED_CPUID = IOCTL["GET_SUPPORTED_CPUID"]
KVM_CREATE_VCPU = IOCTL["CREATE_VCPU"]
KVM_SET_USER_MEMORY_REGION = IOCTL["SET_USER_MEMORY_REGION"]
KVM_SET_TSS_ADDR = IOCTL["SET_TSS_ADDR"]
KVM_SET_IDENTITY_MAP_ADDR = IOCTL["SET_IDENTITY_MAP_ADDR"]
KVM_CREATE_IRQCHIP = IOCTL["CREATE_IRQCHIP"]
KVM_IRQ_LINE = IOCTL["IRQ_LINE"]
KVM_REGISTER_COALESCED_MMIO = IOCTL["REGISTER_COALESCED_MMIO"]
KVM_UNREGISTER_COALESCED_MMIO = IOCTL["UNREGISTER_COALESCED_MMIO"]
KVM_CREATE_PIT2 = IOCTL["CREATE_PIT2"]
KVM_RUN = IOCTL["RUN"]
KVM_GET_REGS = IOCTL["GET_REGS"]
KVM_SET_REGS = IOCTL["SET_REGS"]
KVM_GET_SREGS = IOCTL["GET_SREGS"]
KVM_SET_SREGS = IOCTL["SET_SREGS"]
KVM_SET_CPUID2 = IOCTL["SET_CPUID2"]
KVM_GET_MP_STATE = IOCTL["GET_MP_STATE"]
KVM_SET_MP_STATE = IOCTL["SET_MP_STATE"]
KVM_GET_VCPU_EVENTS = IOCTL["GET_VCPU_EVENTS"]

# ------------------------------------------------------------------------ constants

# kvm_run.exit_reason
EXIT_REASONS: dict[int, str] = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT",
    6: "MMIO", 7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR",
    11: "SET_TPR", 12: "TPR_ACCESS", 17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT",
}
EXIT_UNKNOWN = 0
EXIT_IO = 2
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_INTERNAL_ERROR = 17
EXIT_SYSTEM_EVENT = 24

IO_IN, IO_OUT = 0, 1

# kvm_mp_state.mp_state
MP_STATES: dict[int, str] = {
    0: "RUNNABLE", 1: "UNINITIALIZED", 2: "INIT_RECEIVED", 3: "HALTED",
    4: "SIPI_RECEIVED", 5: "STOPPED", 6: "CHECK_STOP", 7: "OPERATING", 8: "LOAD",
}
MP_STATE_RUNNABLE = 0
MP_STATE_HALTED = 3

# KVM_CHECK_EXTENSION capabilities. COALESCED_MMIO answers the ring's page offset in
# the vCPU mmap (0: no ring); COALESCED_PIO answers 1 when zones may be port ranges.
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_COALESCED_PIO = 162

KVM_PIT_SPEAKER_DUMMY = 1          # kvm_pit_config.flags: port 0x61 handled in the kernel
KVM_MEM_LOG_DIRTY_PAGES = 1

RFLAGS_IF = 1 << 9
RFLAGS_RESERVED = 1 << 1           # bit 1 always reads as one

CR0_PE, CR0_ET, CR0_NE, CR0_PG = 1 << 0, 1 << 4, 1 << 5, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10

# Hole for the TSS (3 pages) and the EPT identity map page, outside guest RAM.
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000

# --------------------------------------------------------------------------- kvm_run

# Offsets into the vCPU's kvm_run mmap: name -> (offset, struct format).
KVM_RUN_FIELDS: dict[str, tuple[int, str]] = {
    "request_interrupt_window": (0, "B"),
    "immediate_exit": (1, "B"),
    "exit_reason": (8, "I"),
    "ready_for_interrupt_injection": (12, "B"),
    "if_flag": (13, "B"),
    "flags": (14, "H"),
    "cr8": (16, "Q"),
    "apic_base": (24, "Q"),
    # exit_reason == IO
    "io.direction": (32, "B"),
    "io.size": (33, "B"),
    "io.port": (34, "H"),
    "io.count": (36, "I"),
    "io.data_offset": (40, "Q"),
    # exit_reason == MMIO
    "mmio.phys_addr": (32, "Q"),
    "mmio.data": (40, "8s"),
    "mmio.len": (48, "I"),
    "mmio.is_write": (52, "B"),
    # exit_reason == FAIL_ENTRY
    "fail_entry.hardware_entry_failure_reason": (32, "Q"),
    "fail_entry.cpu": (40, "I"),
    # exit_reason == INTERNAL_ERROR
    "internal.suberror": (32, "I"),
    "internal.ndata": (36, "I"),
    "internal.data": (40, "16Q"),
    # exit_reason == SYSTEM_EVENT
    "system_event.type": (32, "I"),
    "system_event.ndata": (36, "I"),
    "system_event.data": (40, "16Q"),
}
RUN_IMMEDIATE_EXIT = KVM_RUN_FIELDS["immediate_exit"][0]
RUN_EXIT_REASON = KVM_RUN_FIELDS["exit_reason"][0]
RUN_IO = KVM_RUN_FIELDS["io.direction"][0]          # start of the IO exit's fields
RUN_MMIO = KVM_RUN_FIELDS["mmio.phys_addr"][0]      # start of the MMIO exit's fields
RUN_MMIO_DATA = KVM_RUN_FIELDS["mmio.data"][0]      # where an MMIO read's answer goes
RUN_INTERNAL_DATA = KVM_RUN_FIELDS["internal.data"][0]


def _field_struct(name: str) -> struct.Struct:
    off, fmt = KVM_RUN_FIELDS[name]
    return struct.Struct("<" + fmt)


def run_field(buf, name: str):
    """Read one named kvm_run field (slow path: diagnostics, tests)."""
    off, fmt = KVM_RUN_FIELDS[name]
    value = struct.unpack_from("<" + fmt, buf, off)
    return value[0] if len(value) == 1 else value


# Hot-path decoders. One unpack at RUN_EXIT_REASON gives the exit reason and all IO
# fields: exit_reason @8, (20 bytes skipped), direction @32, size @33, port @34,
# count @36, data_offset @40.
EXIT_IO_STRUCT = struct.Struct("<I20xBBHIQ")          # at RUN_EXIT_REASON
EXIT_MMIO_STRUCT = struct.Struct("<Q8sIB")            # at RUN_MMIO
EXIT_REASON_STRUCT = struct.Struct("<I")              # at RUN_EXIT_REASON


def _check_run_decoders() -> None:
    """The hot-path structs must land on the offsets KVM_RUN_FIELDS names."""
    io = ("exit_reason", "io.direction", "io.size", "io.port", "io.count",
          "io.data_offset")
    mmio = ("mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write")
    for st, base, names in ((EXIT_IO_STRUCT, RUN_EXIT_REASON, io),
                            (EXIT_MMIO_STRUCT, RUN_MMIO, mmio)):
        fmt = st.format.lstrip("<")
        codes = re.findall(r"(\d*)([a-zA-Z])", fmt)
        off, k = base, 0
        for count, code in codes:
            width = struct.calcsize(f"<{count}{code}")
            if code != "x":
                want = KVM_RUN_FIELDS[names[k]]
                if (off, f"{count}{code}") != want:  # pragma: no cover - table typo
                    raise AssertionError(f"{names[k]}: decoder has @{off} {count}{code}, "
                                         f"KVM_RUN_FIELDS says {want}")
                k += 1
            off += width


_check_run_decoders()
SYSTEM_EVENT_TYPES = {1: "SHUTDOWN", 2: "RESET", 3: "CRASH", 4: "WAKEUP", 5: "SUSPEND",
                      6: "SEV_TERM", 7: "TDX_FATAL"}
SYSTEM_EVENT_RESET = 2
# kvm_run.internal.suberror
INTERNAL_ERRORS = {1: "emulation failure", 2: "simultaneous exception", 3: "delivery event",
                   4: "unexpected exit"}
INTERNAL_ERROR_EMULATION = 1       # data: u64 flags, u8 insn_size, u8 insn_bytes[15]

# ---------------------------------------------------------------------- struct types

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class KvmRegs(ctypes.Structure):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class KvmSregs(ctypes.Structure):
    _fields_ = ([(n, KvmSegment) for n in SEGMENT_NAMES]
                + [("gdt", KvmDtable), ("idt", KvmDtable), ("cr0", u64), ("cr2", u64),
                   ("cr3", u64), ("cr4", u64), ("cr8", u64), ("efer", u64),
                   ("apic_base", u64), ("interrupt_bitmap", u64 * 4)])


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


CPUID_MAX_ENTRIES = 256


class KvmCpuid2(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32),
                ("entries", KvmCpuidEntry2 * CPUID_MAX_ENTRIES)]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class KvmVcpuEvents(ctypes.Structure):
    _fields_ = [
        # exception
        ("exception_injected", u8), ("exception_nr", u8), ("exception_has_error_code", u8),
        ("exception_pending", u8), ("exception_error_code", u32),
        # interrupt
        ("interrupt_injected", u8), ("interrupt_nr", u8), ("interrupt_soft", u8),
        ("interrupt_shadow", u8),
        # nmi
        ("nmi_injected", u8), ("nmi_pending", u8), ("nmi_masked", u8), ("nmi_pad", u8),
        ("sipi_vector", u32), ("flags", u32),
        # smi
        ("smm", u8), ("smm_pending", u8), ("smm_inside_nmi", u8), ("smm_latched_init", u8),
        ("reserved", u8 * 27), ("exception_has_payload", u8), ("exception_payload", u64),
    ]


class KvmCoalescedMmioZone(ctypes.Structure):
    """KVM_(UN)REGISTER_COALESCED_MMIO's argument; ``pio`` (a union with ``pad``): 1 for a
    port range, 0 for guest-physical MMIO."""
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


class KvmCoalescedMmio(ctypes.Structure):
    """One entry of the coalesced ring: a write of ``len`` bytes of ``data``."""
    _fields_ = [("phys_addr", u64), ("len", u32), ("pio", u32), ("data", u8 * 8)]


class KvmCoalescedMmioRing(ctypes.Structure):
    """The ring's header; ``coalesced_mmio[]`` entries follow it to the end of the page.
    The kernel produces at ``last``, user space consumes at ``first``."""
    _fields_ = [("first", u32), ("last", u32)]


# Sizes the kernel expects (the ioctl numbers encode them too).
STRUCT_SIZES: dict[type, int] = {
    KvmRegs: 144, KvmSegment: 24, KvmDtable: 16, KvmSregs: 312, KvmCpuidEntry2: 40,
    KvmUserspaceMemoryRegion: 32, KvmPitConfig: 64, KvmIrqLevel: 8, KvmMpState: 4,
    KvmVcpuEvents: 64, KvmCoalescedMmioZone: 16, KvmCoalescedMmio: 24,
    KvmCoalescedMmioRing: 8,
}
for _cls, _size in STRUCT_SIZES.items():
    if ctypes.sizeof(_cls) != _size:  # pragma: no cover - layout typo
        raise AssertionError(f"{_cls.__name__}: {ctypes.sizeof(_cls)} bytes != {_size}")
if KvmSregs.gdt.offset != 192 or KvmSregs.cr0.offset != 224 or KvmSregs.efer.offset != 264:
    raise AssertionError("kvm_sregs layout")  # pragma: no cover


_STRUCT_CODES: dict[Any, str] = {u8: "B", u16: "H", u32: "I", u64: "Q"}


def struct_of(cls: type[ctypes.Structure]) -> struct.Struct:
    """``cls``'s layout as a ``struct.Struct`` (flat structs of fixed-width ints).

    For paths where building a ctypes object would cost more than the ioctl it feeds
    (an interrupt injection): the layout still has one definition, ``cls._fields_``.
    """
    st = struct.Struct("<" + "".join(_STRUCT_CODES[f[1]] for f in cls._fields_))
    if st.size != ctypes.sizeof(cls):  # pragma: no cover - padding in cls
        raise AssertionError(f"{cls.__name__}: struct {st.size} != ctypes {ctypes.sizeof(cls)}")
    return st


IRQ_LEVEL_STRUCT = struct_of(KvmIrqLevel)  # KVM_IRQ_LINE's argument (irq, level)
COALESCED_ZONE_STRUCT = struct_of(KvmCoalescedMmioZone)   # (addr, size, pio)

# ------------------------------------------------------------ the coalesced ring

# One page of the vCPU mmap, at the page offset KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO)
# answers (2 here: after kvm_run and the PIO data page). The kernel appends an entry
# unless (last + 1) % entries == first, so the ring holds entries - 1 writes; when it is
# full, the next write exits to user space as an ordinary IO/MMIO exit.
COALESCED_RING_FIRST = KvmCoalescedMmioRing.first.offset             # u32, user space's
COALESCED_RING_LAST = KvmCoalescedMmioRing.last.offset               # u32, the kernel's
COALESCED_RING_ENTRIES = ctypes.sizeof(KvmCoalescedMmioRing)         # entry 0 is here
COALESCED_ENTRY_SIZE = ctypes.sizeof(KvmCoalescedMmio)
COALESCED_ENTRY_DATA = KvmCoalescedMmio.data.offset
# Hot-path decoders: the header (first, last), an entry's (phys_addr, len, pio).
COALESCED_HEAD_STRUCT = struct_of(KvmCoalescedMmioRing)
COALESCED_ENTRY_STRUCT = struct.Struct("<QII")
if (COALESCED_ENTRY_STRUCT.size != COALESCED_ENTRY_DATA
        or KvmCoalescedMmio.pio.offset != 12):  # pragma: no cover - layout typo
    raise AssertionError("kvm_coalesced_mmio layout")


def coalesced_ring_entries(page_size: int) -> int:
    """KVM_COALESCED_MMIO_MAX: how many entries fit in the ring's page (170 for 4 KiB)."""
    return (page_size - COALESCED_RING_ENTRIES) // COALESCED_ENTRY_SIZE


# ------------------------------------------------------------------------ ioctl calls

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.restype = ctypes.c_int


def ioctl_ulong(fd: int, request: int, arg: int = 0) -> int:
    """ioctl with an unsigned long argument (fcntl.ioctl parses ints as signed C int).

    Releases the GIL (ctypes does for every foreign call). Raises OSError on failure.
    """
    ret = _libc_ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.c_ulong(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl {request:#x}: {os.strerror(err)}")
    return ret


def ioctl_struct(fd: int, request: int, obj) -> int:
    """ioctl with a pointer to ``obj`` (a ctypes structure, read and/or written)."""
    return fcntl.ioctl(fd, request, obj, True)


def regs_dict(regs: KvmRegs) -> dict[str, int]:
    return {f[0]: getattr(regs, f[0]) for f in KvmRegs._fields_}


def format_regs(regs: KvmRegs, sregs: KvmSregs | None = None) -> str:
    """One compact line of register state for error messages."""
    parts = [f"{name}={getattr(regs, name):#x}" for name in (
        "rip", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp")]
    if sregs is not None:
        parts += [f"cs={sregs.cs.selector:#x}/base={sregs.cs.base:#x}",
                  f"cr0={sregs.cr0:#x}", f"cr3={sregs.cr3:#x}", f"cr4={sregs.cr4:#x}",
                  f"efer={sregs.efer:#x}"]
    return " ".join(parts)
