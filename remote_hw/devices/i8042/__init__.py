"""An i8042 PS/2 controller (port 0x60/0x64) with a PS/2 keyboard and an idle mouse.

Window of 5 bytes from port 0x60: offset 0 is the data port (0x60), offset 4 the
status/command port (0x64). Offsets 1-3 (0x61-0x63) are not the controller's: port
0x61 belongs to the PIT/speaker logic, which KVM's in-kernel PIT answers before an exit
ever reaches a device map, and 0x62/0x63 are unused on a PC. They read 0xFF and ignore
writes, so one map ``port:0x60-0x64=SERVER/DEV,irq=1`` covers the controller.

Three parts, as on a PC, one module each:

* the **controller** (8042, :mod:`.controller`; its scan code translation in
  :mod:`.translation`): status register, a 32-byte RAM whose byte 0 is the command
  byte, the output buffer (one byte, from the controller itself, the keyboard or the
  aux device), the output port (reset line, A20) and the set-2 -> set-1 translation;
* the **keyboard** behind its first port (:mod:`.keyboard`): the command set Linux's
  atkbd and firmware use (reset, LEDs, echo, ID, scancode set, typematic,
  enable/disable, defaults, resend), answering unknown commands with 0xFE (resend) as
  keyboards do;
* an **idle PS/2 mouse** behind the aux port (:mod:`.mouse`; ``aux=none`` removes
  it): it answers the standard mouse commands and never moves.

The bytes both PS/2 devices answer with are in :mod:`.ps2`.

The key-event backend (the server's stream backend) talks to :meth:`I8042.feed`: UTF-8
text to type, with key names in angle brackets (syntax in
:class:`remote_hw.input.keytext.KeyText`). Host code (the evdev backend, the FUSE
view) calls :meth:`I8042.key_event` (one press or release) or :meth:`I8042.type_text`.
Every key the host side types is also published as a device event ``key.CODE.0|1``
(:mod:`remote_hw.input.device_events`), so a client can re-emit the keyboard on its
own host (``remote-hw vm --uinput``).

Interrupts: ``irq`` is IRQ 1 (output buffer holds keyboard-side data and command-byte
bit 0 is set); ``aux_irq`` (keyword, default unconnected) is IRQ 12. When the guest reads
a byte and another one is waiting, the line drops and rises again within that read, so
an edge-triggered 8259 sees one edge per byte, as with the real chip's gap between
bytes. A guest write of 0xFE (any pulse command with bit 0 clear) to port 0x64, or an
output-port write with bit 0 clear, calls ``events("reset-request")``.

Deliberate differences from the hardware are listed in docs/devices.md.
"""

from .controller import DATA, DEFAULT_BACKLOG, I8042, STATUS, WINDOW
from .keyboard import PS2Keyboard
from .mouse import PS2Mouse
from .translation import XLAT_TABLE, translate

__all__ = ["I8042", "PS2Keyboard", "PS2Mouse", "XLAT_TABLE", "translate", "DATA", "STATUS",
           "WINDOW", "DEFAULT_BACKLOG"]
