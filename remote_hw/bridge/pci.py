"""PCI device templates: the config space and regions a bridged device shows QEMU.

The remote-hw server holds a bare register model (a 16550 answers offsets 0-7); a PCI
guest also needs a config space (ids, class, a BAR, an interrupt pin) before a driver
binds. That part never changes at run time, so the bridge answers it locally from a
template instead of paying a network round trip for each of the 64 config reads a
guest makes while probing. QEMU's vfio-pci emulates the BAR registers itself (it sizes
BARs from the region size), so a template needs no BAR-sizing logic: it only keeps
what the guest writes to the few writable bits.

A template is data: :data:`TEMPLATES` maps a name (``--template``) to a
:class:`Template`. ``pci-serial`` copies QEMU's own ``pci-serial`` (``[1b36:0002]``,
class 0x070002), which Linux's unmodified ``8250_pci`` binds as a 16550A.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from remote_hw.bridge import vfio_user as vu

CONFIG_SIZE: Final = 256  # a conventional (non-express) PCI function

# vfio-pci's fixed region and IRQ indexes (<linux/vfio.h>).
NUM_REGIONS: Final = 9  # BAR0-5, ROM (6), CONFIG (7), VGA (8)
CONFIG_REGION: Final = 7
NUM_IRQS: Final = 5  # INTX (0), MSI, MSIX, ERR, REQ
INTX_IRQ: Final = 0

# Config space offsets (PCI Local Bus spec 3.0, type 0 header).
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, PROG_IF, SUBCLASS, CLASS = 0x08, 0x09, 0x0A, 0x0B
HEADER_TYPE, BAR0 = 0x0E, 0x10
SUBSYS_VENDOR, SUBSYS_ID = 0x2C, 0x2E
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D

#: Command bits a guest may set: I/O, memory, bus master, SERR, INTx disable.
_COMMAND_WRITABLE: Final = 0x0001 | 0x0002 | 0x0004 | 0x0100 | 0x0400


@dataclass(frozen=True)
class Bar:
    """One BAR: its size in bytes and whether it is an I/O (port) BAR."""

    size: int
    io: bool


@dataclass(frozen=True)
class Template:
    """What QEMU learns about the device: ids, BARs and the INTx pin."""

    name: str
    vendor: int
    device: int
    class_code: int  # 24 bits: class, subclass, prog-if
    revision: int
    bars: dict[int, Bar]
    interrupt_pin: int  # 1 = INTA#; 0 makes Linux's 8250_pci probe fail (-28)
    subsystem_vendor: int = 0
    subsystem_id: int = 0
    description: str = ""
    #: The register window forwarded to the server for each BAR, in bytes.
    window: dict[int, int] = field(default_factory=dict)

    def config_image(self) -> tuple[bytes, bytes]:
        """The reset config space and the mask of bits a guest may change."""
        cfg = bytearray(CONFIG_SIZE)
        wmask = bytearray(CONFIG_SIZE)
        struct.pack_into("<HH", cfg, VENDOR_ID, self.vendor, self.device)
        cfg[REVISION] = self.revision
        cfg[PROG_IF] = self.class_code & 0xFF
        cfg[SUBCLASS] = (self.class_code >> 8) & 0xFF
        cfg[CLASS] = (self.class_code >> 16) & 0xFF
        cfg[HEADER_TYPE] = 0x00
        struct.pack_into("<HH", cfg, SUBSYS_VENDOR, self.subsystem_vendor, self.subsystem_id)
        cfg[INTERRUPT_PIN] = self.interrupt_pin
        struct.pack_into("<H", wmask, COMMAND, _COMMAND_WRITABLE)
        wmask[INTERRUPT_LINE] = 0xFF
        for index, bar in self.bars.items():
            off = BAR0 + 4 * index
            struct.pack_into("<I", cfg, off, 0x1 if bar.io else 0x0)
            low = 0x3 if bar.io else 0xF  # type bits stay read-only
            struct.pack_into("<I", wmask, off, ~(bar.size - 1) & ~low & 0xFFFFFFFF)
        return bytes(cfg), bytes(wmask)

    def region_info(self, index: int) -> tuple[int, int]:
        """``(flags, size)`` of vfio region ``index``; unused regions are (0, 0)."""
        if index == CONFIG_REGION:
            return vu.REGION_INFO_FLAG_READ | vu.REGION_INFO_FLAG_WRITE, CONFIG_SIZE
        bar = self.bars.get(index)
        if bar is None:
            return 0, 0
        return vu.REGION_INFO_FLAG_READ | vu.REGION_INFO_FLAG_WRITE, bar.size

    def irq_info(self, index: int) -> tuple[int, int]:
        """``(flags, count)`` of vfio IRQ ``index``: INTx only, auto-masked as vfio's."""
        if index == INTX_IRQ and self.interrupt_pin:
            return (vu.IRQ_INFO_EVENTFD | vu.IRQ_INFO_MASKABLE | vu.IRQ_INFO_AUTOMASKED), 1
        return vu.IRQ_INFO_EVENTFD, 0


class ConfigSpace:
    """A template's config space for one connected QEMU: reads, and masked writes."""

    def __init__(self, template: Template) -> None:
        self.template = template
        reset, self._wmask = template.config_image()
        self._reset = reset
        self._cfg = bytearray(reset)

    def reset(self) -> None:
        self._cfg[:] = self._reset

    def read(self, offset: int, count: int) -> bytes:
        """Bytes at ``offset``; past the end reads as all ones (no extended space)."""
        end = offset + count
        inside = bytes(self._cfg[offset:min(end, CONFIG_SIZE)]) if offset < CONFIG_SIZE else b""
        return inside + b"\xff" * (count - len(inside))

    def write(self, offset: int, data: bytes) -> None:
        """Keep the writable bits of ``data``; the rest of the register is unchanged."""
        for i, b in enumerate(data):
            pos = offset + i
            if pos >= CONFIG_SIZE:
                break
            m = self._wmask[pos]
            self._cfg[pos] = (self._cfg[pos] & ~m & 0xFF) | (b & m)


#: ``--template`` names. 8 bytes for the UART's BAR, not 16: with 16, 8250_pci guesses
#: two ports from the BAR length and makes ttyS1 *and* ttyS2 (docs/bridge.md).
TEMPLATES: Final[dict[str, Template]] = {
    "pci-serial": Template(
        name="pci-serial", vendor=0x1B36, device=0x0002, class_code=0x070002, revision=1,
        bars={0: Bar(size=8, io=True)}, interrupt_pin=1,
        subsystem_vendor=0x1AF4, subsystem_id=0x1100,
        description="a 16550 UART as QEMU's pci-serial (Red Hat 1b36:0002, class 0x070002); "
                    "Linux's 8250_pci binds it",
        window={0: 8}),
    "mmio-serial": Template(
        name="mmio-serial", vendor=0x10EC, device=0x816A, class_code=0x070002, revision=0,
        bars={0: Bar(size=16, io=False)}, interrupt_pin=1,
        description="a 16550 UART behind a memory BAR, with the ids of Realtek's "
                    "RealManage UART (10ec:816a), which Linux's 8250_pci binds as one "
                    "port on BAR0; QEMU may post writes to a memory BAR",
        window={0: 8}),
}
