"""A scratch-register device: the smallest useful remote-hw device model.

Window of 10 byte registers:

====== ======================================================================
offset register
====== ======================================================================
0-7    scratch: what the guest writes, it reads back (0 at power-on and reset)
8      ID: reads the ``id`` option (default 0xA5); writes are ignored
9      SUM: the sum of registers 0-7, modulo 256 (read-only)
====== ======================================================================

It is built on :class:`remote_hw.plugin.ByteRegisters`, so it only says what one byte
does: a 16- or 32-bit access is split into byte accesses by the base class, and the
server never calls it with an offset outside the window. It drives no interrupt.
"""

from __future__ import annotations

from typing import Any

from remote_hw.plugin import ByteRegisters

SCRATCH_REGS = 8
REG_ID = 8
REG_SUM = 9
DEFAULT_ID = 0xA5


class Scratch(ByteRegisters):
    """Eight read/write byte registers, an ID and a checksum (see the module).

    Options: ``id=N`` (0-255, decimal or 0x-hex) is what the ID register reads.
    """

    kind = "scratch"
    window = 10
    api_version = (1, 0)   # the plugin API this was written for (remote_hw.plugin)

    def __init__(self, *args: Any, id: int | str = DEFAULT_ID, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Options arrive as strings from a command line (``s0=scratch,id=0x5a``).
        ident = int(id, 0) if isinstance(id, str) else int(id)
        if not 0 <= ident <= 0xFF:
            raise ValueError(f"{self.kind}: id must be 0-255, got {id!r}")
        self.ident = ident
        self.regs = bytearray(SCRATCH_REGS)

    def read_byte(self, offset: int) -> int:
        if offset < SCRATCH_REGS:
            return self.regs[offset]
        if offset == REG_ID:
            return self.ident
        return sum(self.regs) & 0xFF          # REG_SUM

    def write_byte(self, offset: int, value: int) -> None:
        if offset < SCRATCH_REGS:
            self.regs[offset] = value
        # ID and SUM are read-only: writes are ignored, as on most hardware.

    def reset(self) -> None:
        self.regs[:] = bytes(SCRATCH_REGS)

    def status(self) -> dict[str, Any]:
        """The registers as the FUSE view's ``status`` shows them."""
        return {"regs": self.regs.hex(), "id": self.ident, "sum": sum(self.regs) & 0xFF}
