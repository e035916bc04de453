"""Guest images, told apart by content.

* ELF (``\\x7fELF``), ELFCLASS32, EM_386: PT_LOAD segments copied to ``p_paddr``, vCPU
  in flat 32-bit protected mode (CS=0x08, data=0x10, base 0, limit 4 GiB, paging off),
  EIP = ``e_entry``.
* ELF, ELFCLASS64, EM_X86_64: same loading, vCPU in 64-bit long mode (CS=0x18 with L=1)
  with identity paging of the low 4 GiB in 2 MiB pages (PML4 -> PDPT -> 4 PDs), so
  MMIO windows below 4 GiB are reachable too.
* anything else: a raw boot-sector-style binary loaded at 0x7c00 and entered in real
  mode at 0000:7c00 (all segments 0, SP=0x7c00, DL=0x80 as a BIOS would leave it).

For ELF guests the monitor owns the "boot area" 0x500..0x7fff (GDT at 0x500, page
tables at 0x1000..0x6fff, a 4 KiB stack at 0x7000..0x7fff, initial RSP=0x8000); a
PT_LOAD segment overlapping it is an ImageError. Interrupts are off (IF=0), the IDT is
empty: a guest that wants interrupts sets up its own IDT.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass, field
from typing import Union

from . import kvm

RAW_LOAD_ADDR = 0x7C00
RAW_LIMIT = 0xA0000            # conventional memory ends here (VGA / BIOS above on a PC)
BOOT_AREA = (0x500, 0x8000)    # [start, end) reserved for ELF boot structures
GDT_ADDR = 0x500
PML4_ADDR = 0x1000
PDPT_ADDR = 0x2000
PD_ADDR = 0x3000               # 4 page directories: 0x3000..0x6fff
STACK_TOP = 0x8000
SEL_CODE32, SEL_DATA, SEL_CODE64 = 0x08, 0x10, 0x18
GDT_ENTRIES = (
    0,
    0x00CF9B000000FFFF,        # 0x08: code, 32-bit, base 0, limit 4 GiB
    0x00CF93000000FFFF,        # 0x10: data, base 0, limit 4 GiB
    0x00AF9B000000FFFF,        # 0x18: code, 64-bit (L=1)
)
MAX_IMAGE_SIZE = 256 << 20

ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EM_386, EM_X86_64 = 3, 62
ET_EXEC = 2
PT_LOAD = 1

# class -> (ELF header struct, program header struct, e_machine, field order of phdr)
_ELF_LAYOUT = {
    ELFCLASS32: (struct.Struct("<16sHHIIIIIHHHHHH"), struct.Struct("<IIIIIIII"), EM_386,
                 ("p_type", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz",
                  "p_flags", "p_align")),
    ELFCLASS64: (struct.Struct("<16sHHIQQQIHHHHHH"), struct.Struct("<IIQQQQQQ"), EM_X86_64,
                 ("p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr", "p_filesz",
                  "p_memsz", "p_align")),
}
_EHDR_FIELDS = ("e_ident", "e_type", "e_machine", "e_version", "e_entry", "e_phoff",
                "e_shoff", "e_flags", "e_ehsize", "e_phentsize", "e_phnum",
                "e_shentsize", "e_shnum", "e_shstrndx")


class ImageError(ValueError):
    """The guest image cannot be loaded (malformed, truncated, does not fit RAM)."""


@dataclass
class Segment:
    addr: int
    data: bytes
    memsz: int


@dataclass
class BootImage:
    """A parsed image: what to put in RAM and how to start the vCPU."""

    kind: str                   # "raw", "elf32" or "elf64"
    entry: int
    segments: list[Segment] = field(default_factory=list)
    size: int = 0               # bytes of the image file

    # ------------------------------------------------------------------ memory

    def load_into(self, mem) -> None:
        for seg in self.segments:
            mem.write(seg.addr, seg.data)
            if seg.memsz > len(seg.data):
                mem.write(seg.addr + len(seg.data), bytes(seg.memsz - len(seg.data)))
        if self.kind != "raw":
            gdt = b"".join(struct.pack("<Q", d) for d in GDT_ENTRIES)
            mem.write(GDT_ADDR, gdt)
        if self.kind == "elf64":
            mem.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | 3) + bytes(4088))
            pdpt = b"".join(struct.pack("<Q", (PD_ADDR + i * 0x1000) | 3) for i in range(4))
            mem.write(PDPT_ADDR, pdpt + bytes(4096 - len(pdpt)))
            pd = b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(4 * 512))
            mem.write(PD_ADDR, pd)

    # --------------------------------------------------------------------- vCPU

    def setup_cpu(self, regs: kvm.KvmRegs, sregs: kvm.KvmSregs) -> None:
        """Fill ``regs`` (zeroed here) and adjust ``sregs`` (a reset-state copy)."""
        ctypes.memset(ctypes.addressof(regs), 0, ctypes.sizeof(regs))
        regs.rflags = kvm.RFLAGS_RESERVED
        regs.rip = self.entry
        if self.kind == "raw":
            regs.rsp = RAW_LOAD_ADDR
            regs.rdx = 0x80
            for name in kvm.SEGMENT_NAMES[:6]:
                seg = getattr(sregs, name)
                seg.base, seg.selector, seg.limit = 0, 0, 0xFFFF
                seg.present, seg.s, seg.dpl, seg.db, seg.l, seg.g, seg.unusable = \
                    1, 1, 0, 0, 0, 0, 0
                seg.type = 0xB if name == "cs" else 0x3
            sregs.cr0 &= ~(kvm.CR0_PE | kvm.CR0_PG)
            return
        regs.rsp = STACK_TOP
        long_mode = self.kind == "elf64"
        sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, 8 * len(GDT_ENTRIES) - 1
        sregs.idt.base, sregs.idt.limit = 0, 0
        for name in kvm.SEGMENT_NAMES[:6]:
            seg = getattr(sregs, name)
            seg.base, seg.limit, seg.present, seg.s, seg.dpl, seg.g, seg.avl = \
                0, 0xFFFFFFFF, 1, 1, 0, 1, 0
            seg.unusable = 0
            if name == "cs":
                seg.type = 0xB
                seg.selector = SEL_CODE64 if long_mode else SEL_CODE32
                seg.db, seg.l = (0, 1) if long_mode else (1, 0)
            else:
                seg.type, seg.selector, seg.db, seg.l = 0x3, SEL_DATA, 1, 0
        cr0 = (sregs.cr0 | kvm.CR0_PE | kvm.CR0_ET) & ~0x6000_0000  # caches on
        if long_mode:
            sregs.cr3 = PML4_ADDR
            sregs.cr4 |= kvm.CR4_PAE
            sregs.cr0 = cr0 | kvm.CR0_PG
            sregs.efer |= kvm.EFER_LME | kvm.EFER_LMA
        else:
            sregs.cr0 = cr0 & ~kvm.CR0_PG


ImageSource = Union[str, bytes, bytearray, memoryview, "os.PathLike[str]"]


def read_image(source: ImageSource) -> bytes:
    """Bytes of an image given as bytes or as a file path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        size = os.path.getsize(source)
        if size > MAX_IMAGE_SIZE:
            raise ImageError(f"{source}: {size} bytes is too large an image")
        with open(source, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError(f"cannot read image {source}: {e.strerror or e}") from e


def parse_image(data: bytes, mem_size: int) -> BootImage:
    """Check ``data`` against a RAM of ``mem_size`` bytes and say how to boot it."""
    if len(data) == 0:
        raise ImageError("empty image")
    if len(data) > MAX_IMAGE_SIZE:
        raise ImageError(f"image of {len(data)} bytes is too large")
    if data[:4] == b"\x7fELF":
        return _parse_elf(data, mem_size)
    end = RAW_LOAD_ADDR + len(data)
    limit = min(mem_size, RAW_LIMIT)
    if end > limit:
        raise ImageError(f"raw image of {len(data)} bytes does not fit at {RAW_LOAD_ADDR:#x}"
                         f" below {limit:#x} ({limit - RAW_LOAD_ADDR} bytes at most)")
    return BootImage("raw", RAW_LOAD_ADDR, [Segment(RAW_LOAD_ADDR, data, len(data))],
                     len(data))


def _parse_elf(data: bytes, mem_size: int) -> BootImage:
    if len(data) < 20:
        raise ImageError("truncated ELF header")
    elf_class, elf_data = data[4], data[5]
    layout = _ELF_LAYOUT.get(elf_class)
    if layout is None:
        raise ImageError(f"unsupported ELF class {elf_class}")
    if elf_data != ELFDATA2LSB:
        raise ImageError("ELF image is not little-endian")
    ehdr_s, phdr_s, machine, phdr_fields = layout
    if len(data) < ehdr_s.size:
        raise ImageError(f"truncated ELF header ({len(data)} < {ehdr_s.size} bytes)")
    eh = dict(zip(_EHDR_FIELDS, ehdr_s.unpack_from(data, 0)))
    kind = "elf32" if elf_class == ELFCLASS32 else "elf64"
    if eh["e_machine"] != machine:
        raise ImageError(f"{kind} image for machine {eh['e_machine']}, expected {machine}")
    if eh["e_type"] != ET_EXEC:
        raise ImageError(f"ELF type {eh['e_type']} is not an executable (ET_EXEC)")
    if eh["e_phnum"] == 0:
        raise ImageError("ELF image has no program headers")
    if eh["e_phentsize"] != phdr_s.size:
        raise ImageError(f"ELF program header size {eh['e_phentsize']} != {phdr_s.size}")
    ph_end = eh["e_phoff"] + eh["e_phnum"] * phdr_s.size
    if ph_end > len(data):
        raise ImageError(f"truncated ELF: program headers end at {ph_end}, "
                         f"file has {len(data)} bytes")
    segments: list[Segment] = []
    for i in range(eh["e_phnum"]):
        ph = dict(zip(phdr_fields, phdr_s.unpack_from(data, eh["e_phoff"] + i * phdr_s.size)))
        if ph["p_type"] != PT_LOAD or ph["p_memsz"] == 0:
            continue
        off, filesz, memsz, paddr = ph["p_offset"], ph["p_filesz"], ph["p_memsz"], ph["p_paddr"]
        if filesz > memsz:
            raise ImageError(f"segment {i}: p_filesz {filesz:#x} > p_memsz {memsz:#x}")
        if off + filesz > len(data):
            raise ImageError(f"truncated ELF: segment {i} needs file bytes "
                             f"{off:#x}..{off + filesz:#x}, file has {len(data):#x}")
        if paddr + memsz > mem_size:
            raise ImageError(f"segment {i} at {paddr:#x}..{paddr + memsz:#x} is outside "
                             f"guest RAM (0..{mem_size:#x})")
        if paddr < BOOT_AREA[1] and paddr + memsz > BOOT_AREA[0]:
            raise ImageError(f"segment {i} at {paddr:#x}..{paddr + memsz:#x} overlaps the "
                             f"monitor's boot area {BOOT_AREA[0]:#x}..{BOOT_AREA[1]:#x}")
        segments.append(Segment(paddr, data[off:off + filesz], memsz))
    if not segments:
        raise ImageError("ELF image has no PT_LOAD segment")
    entry = eh["e_entry"]
    if not any(s.addr <= entry < s.addr + s.memsz for s in segments):
        raise ImageError(f"ELF entry point {entry:#x} is not inside a loaded segment")
    if mem_size < BOOT_AREA[1]:
        raise ImageError(f"guest RAM of {mem_size:#x} bytes has no room for the boot area")
    return BootImage(kind, entry, segments, len(data))
