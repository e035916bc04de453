"""The 8042 controller itself: ports 0x60/0x64, command byte, output buffer, IRQs.

The controller owns what a guest sees at the two ports: the status register, a
32-byte RAM whose byte 0 is the command byte, the one-byte output buffer (filled from
the controller itself, the keyboard or the aux device), the output port (reset line,
A20) and the set-2 -> set-1 translation. It also takes host key input (text, key
names, single key events) and hands it to the keyboard as key codes. The devices
behind its ports are :mod:`.keyboard` and :mod:`.mouse`; the package docstring
(:mod:`remote_hw.devices.i8042`) describes the whole.
"""

from __future__ import annotations

from typing import Any

from remote_hw.input import keys as keymap
from remote_hw.input.device_events import key_event_name
from remote_hw.input.keytext import KeyText

from ..base import EVENT_RESET_REQUEST, ByteRegisters, IrqLine, NullIrq, StreamDevice
from .keyboard import PS2Keyboard
from .mouse import PS2Mouse
from .ps2 import KBD_RESEND
from .translation import XLAT_TABLE

DATA = 0          # port 0x60
STATUS = 4        # port 0x64: read status, write command
WINDOW = 5

# Status register (port 0x64 read)
ST_OBF = 0x01         # output buffer full
ST_IBF = 0x02         # input buffer full (never: writes are taken at once)
ST_SYS = 0x04         # system flag = command byte bit 2 (set by the self-test)
ST_CMD = 0x08         # the last write went to port 0x64 (1) or 0x60 (0)
ST_UNLOCKED = 0x10    # keyboard not inhibited by the key lock
ST_AUXB = 0x20        # the output buffer holds aux (mouse) data
ST_TIMEOUT = 0x40     # the device did not answer (aux=none)
ST_PARITY = 0x80

# Command byte (RAM byte 0)
CB_KBD_INT = 0x01
CB_AUX_INT = 0x02
CB_SYS = 0x04
CB_KBD_DISABLE = 0x10
CB_AUX_DISABLE = 0x20
CB_XLAT = 0x40

# Output port
OP_RESET = 0x01       # 0 holds the CPU in reset
OP_A20 = 0x02
OP_KBD_OBF = 0x10
OP_AUX_OBF = 0x20
OP_ONES = 0xCC        # keyboard/aux clock and data lines idle high

# Power-on state (QEMU's pckbd after reset; no firmware runs in a remote-hw VM, so a
# guest that wants translated set-1 codes or interrupts programs the command byte).
POWER_ON_COMMAND_BYTE = CB_KBD_INT | CB_AUX_INT
POWER_ON_OUTPUT_PORT = OP_RESET | OP_A20 | OP_ONES
INPUT_PORT = 0x80

DEFAULT_BACKLOG = 64 * 1024  # bytes of scan codes the keyboard may hold


class I8042(ByteRegisters, StreamDevice):
    """The PC's keyboard controller with a PS/2 keyboard and (optionally) a mouse.

    Options: ``aux`` = ``mouse`` (default: an idle PS/2 mouse on the aux port) or
    ``none`` (nothing there: aux writes time out); ``backlog`` = bytes of scan codes the
    keyboard may hold before key events are dropped (default 65536; a real keyboard
    holds 16, the rest models keys still being typed, as the UART's backlog does).
    Keyword ``aux_irq``: the IRQ 12 line (default unconnected).
    """

    kind = "i8042"
    window = WINDOW
    irq_lines = ("irq", "aux_irq")  # line 0: IRQ 1 (keyboard), line 1: IRQ 12 (mouse)

    def __init__(self, *args: Any, aux: str = "mouse", backlog: int | str = DEFAULT_BACKLOG,
                 aux_irq: IrqLine | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if aux not in ("mouse", "none"):
            raise ValueError(f"{self.kind}: aux must be 'mouse' or 'none', got {aux!r}")
        try:
            limit = int(backlog)
        except (TypeError, ValueError):
            raise ValueError(f"{self.kind}: backlog must be an integer, got {backlog!r}") from None
        if limit < 16:
            raise ValueError(f"{self.kind}: backlog must be >= 16, got {limit}")
        self.aux_irq: IrqLine = aux_irq if aux_irq is not None else NullIrq()
        self.kbd = PS2Keyboard(limit)
        self.mouse = PS2Mouse() if aux == "mouse" else None
        self._text = KeyText()
        # Counters (kept across reset()).
        self.key_events = 0        # key presses/releases accepted from the host side
        self.keys_dropped = 0      # ... dropped (scanning off, backlog full)
        self.bad_input = 0         # unknown <names>, untypable characters, bad codes
        self.bad_commands = 0      # controller commands it does not implement
        self.reset_requests = 0
        self.interrupts = 0        # rising edges of IRQ 1
        self.aux_interrupts = 0    # rising edges of IRQ 12
        self._irq_level = False
        self._aux_level = False
        self._power_on()

    # -- state ---------------------------------------------------------------------------

    def _power_on(self) -> None:
        self.ram = bytearray(32)
        self.ram[0] = POWER_ON_COMMAND_BYTE
        self.outport = POWER_ON_OUTPUT_PORT
        self._last_cmd_port = True     # status bit 3
        self._timeout = False
        self._ob = 0                   # output buffer (also what an empty read returns)
        self._obf = False
        self._ob_aux = False
        self._ctrl: tuple[int, bool] | None = None   # controller's own byte, waiting
        self._expect: int | None = None              # command waiting for its data byte
        self._xlat_break = False
        self.kbd.power_on()
        if self.mouse is not None:
            self.mouse.power_on()

    def reset(self) -> None:
        """Power-on state; queued keys are discarded, counters are kept."""
        self._power_on()
        self._update_irq()

    @property
    def command_byte(self) -> int:
        return self.ram[0]

    def _status(self) -> int:
        st = ST_UNLOCKED | (self.ram[0] & CB_SYS)
        if self._last_cmd_port:
            st |= ST_CMD
        if self._obf:
            st |= ST_OBF
            if self._ob_aux:
                st |= ST_AUXB
        if self._timeout:
            st |= ST_TIMEOUT
        return st

    # -- the Device interface ------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Read the port(s) (ByteRegisters splits a wide access), then recompute the
        interrupt lines once."""
        value = super().read(offset, size)
        self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write the port(s), then move waiting bytes into the output buffer and
        recompute the interrupt lines once."""
        super().write(offset, size, value)
        self._pump()
        self._update_irq()

    def read_byte(self, offset: int) -> int:
        """Port 0x60 (offset 0) or 0x64 (offset 4); offsets 1-3 read 0xFF."""
        if offset == DATA:
            return self._read_data()
        if offset == STATUS:
            return self._status()
        return 0xFF

    def write_byte(self, offset: int, value: int) -> None:
        """Data to port 0x60 or a command to 0x64; offsets 1-3 ignore writes."""
        if offset == DATA:
            self._last_cmd_port = False
            self._write_data(value)
        elif offset == STATUS:
            self._last_cmd_port = True
            self._write_command(value)

    def feed(self, data: bytes) -> None:
        """The key-event backend's stream: text and <key names> (see KeyText)."""
        errors = self._text.errors
        events = self._text.feed(data)
        self.bad_input += self._text.errors - errors
        for code, pressed in events:
            self._key(code, pressed)
        self._pump()
        self._update_irq()

    def type_text(self, text: str, markup: bool = False) -> int:
        """Type ``text`` as it is (US layout; ``\n`` is Enter). With ``markup`` the
        stream's ``<name>`` syntax applies too (a trailing open ``<name`` is typed
        literally). Characters that cannot be typed are skipped and counted in
        ``bad_input``. Returns the number of key events queued."""
        parser = KeyText(markup)
        events = parser.feed(text) + parser.flush()
        self.bad_input += parser.errors
        n = sum(self._key(code, pressed) for code, pressed in events)
        self._pump()
        self._update_irq()
        return n

    def key_event(self, code: int | str, pressed: bool) -> bool:
        """One key press (typematic repeat = another press) or release: a Linux key
        code or key name. Returns False if the keyboard dropped it (scanning disabled,
        backlog full); raises keys.UnknownKey for unknown keys."""
        ok = self._key(keymap.key_code(code), bool(pressed))
        self._pump()
        self._update_irq()
        return ok

    key = key_event     # remote_hw.input.keys.KeySink

    def status(self) -> dict[str, Any]:
        cb = self.ram[0]
        return {
            "status": self._status(),
            "command_byte": cb,
            "output_port": self._outport_value(),
            "output_buffer": self._ob,
            "obf": self._obf,
            "translate": bool(cb & CB_XLAT),
            "kbd_interface": not cb & CB_KBD_DISABLE,
            "aux_interface": not cb & CB_AUX_DISABLE,
            "scanning": self.kbd.scanning,
            "scancode_set": self.kbd.codeset,
            "leds": self.kbd.leds,
            "typematic": self.kbd.typematic,
            "kbd_queue": len(self.kbd.resp) + len(self.kbd.scan),
            "aux_device": "mouse" if self.mouse is not None else "none",
            "mouse_enabled": bool(self.mouse and self.mouse.enabled),
            "a20": bool(self.outport & OP_A20),
            "irq_level": self._irq_level,
            "aux_irq_level": self._aux_level,
            "key_events": self.key_events,
            "keys_dropped": self.keys_dropped,
            "bad_input": self.bad_input,
            "bad_commands": self.bad_commands,
            "reset_requests": self.reset_requests,
            "interrupts": self.interrupts,
            "aux_interrupts": self.aux_interrupts,
        }

    # -- interrupts and the output buffer ------------------------------------------------

    def _update_irq(self) -> None:
        cb = self.ram[0]
        kbd = self._obf and not self._ob_aux and bool(cb & CB_KBD_INT)
        aux = self._obf and self._ob_aux and bool(cb & CB_AUX_INT)
        if kbd != self._irq_level:
            self._irq_level = kbd
            if kbd:
                self.interrupts += 1
            self.irq.set_level(kbd)
        if aux != self._aux_level:
            self._aux_level = aux
            if aux:
                self.aux_interrupts += 1
            self.aux_irq.set_level(aux)

    def _load(self, b: int, aux: bool) -> None:
        self._ob = b
        self._obf = True
        self._ob_aux = aux

    def _pump(self) -> None:
        """Fill an empty output buffer: the controller's own byte first, then the
        keyboard (unless its interface is disabled), then the aux device."""
        if self._obf:
            return
        if self._ctrl is not None:
            b, aux = self._ctrl
            self._ctrl = None
            self._load(b, aux)
            return
        cb = self.ram[0]
        kbd = self.kbd
        if not cb & CB_KBD_DISABLE:
            while kbd.pending():
                b = kbd.pop()
                if cb & CB_XLAT:
                    if b == 0xF0:
                        self._xlat_break = True
                        continue
                    b = XLAT_TABLE[b] | (0x80 if self._xlat_break else 0)
                    self._xlat_break = False
                self._load(b, False)
                return
        mouse = self.mouse
        if mouse is not None and not cb & CB_AUX_DISABLE and mouse.pending():
            self._load(mouse.pop(), True)

    def _read_data(self) -> int:
        if not self._obf:
            return self._ob               # the last byte again, as the chip does
        b = self._ob
        self._obf = False
        self._timeout = False
        if self._ctrl is not None or self.kbd.pending() or (self.mouse and self.mouse.pending()):
            # Another byte follows: let the line fall before it rises again for it.
            self._update_irq()
            self._pump()
        return b

    def _queue_ctrl(self, b: int, aux: bool = False) -> None:
        self._ctrl = (b & 0xFF, aux)      # one slot: a newer answer replaces an unread one

    # -- the host side -------------------------------------------------------------------

    def _key(self, code: int, pressed: bool) -> bool:
        """Queue one key for the guest and publish it (see the module docstring).

        The key is published even when the guest's keyboard drops it (scanning off,
        backlog full): a client re-emitting this keyboard mirrors what was typed, not
        what the guest chose to take."""
        try:
            ok = self.kbd.key(code, pressed)
        except keymap.UnknownKey:
            self.bad_input += 1
            return False
        self.events(key_event_name(code, pressed))
        if ok:
            self.key_events += 1
        else:
            self.keys_dropped += 1
        return ok

    # -- guest writes --------------------------------------------------------------------

    def _outport_value(self) -> int:
        v = self.outport & ~(OP_KBD_OBF | OP_AUX_OBF)
        if self._obf:
            v |= OP_AUX_OBF if self._ob_aux else OP_KBD_OBF
        return v

    def _reset_request(self) -> None:
        self.reset_requests += 1
        self.events(EVENT_RESET_REQUEST)

    def _write_command(self, c: int) -> None:
        self._expect = None
        ram = self.ram
        if 0x20 <= c <= 0x3F:
            self._queue_ctrl(ram[c & 0x1F])
        elif 0x60 <= c <= 0x7F or c in (0xD1, 0xD2, 0xD3, 0xD4):
            self._expect = c
        elif c == 0xA7:
            ram[0] |= CB_AUX_DISABLE
        elif c == 0xA8:
            ram[0] &= ~CB_AUX_DISABLE
        elif c in (0xA9, 0xAB):             # interface tests: 0 = no error
            self._queue_ctrl(0x00)
        elif c == 0xAA:                     # self-test passed; sets the system flag
            ram[0] |= CB_SYS
            self._queue_ctrl(0x55)
        elif c == 0xAD:
            ram[0] |= CB_KBD_DISABLE
        elif c == 0xAE:
            ram[0] &= ~CB_KBD_DISABLE
        elif c == 0xC0:
            self._queue_ctrl(INPUT_PORT)
        elif c == 0xD0:
            self._queue_ctrl(self._outport_value())
        elif c == 0xDD:
            self.outport &= ~OP_A20
        elif c == 0xDF:
            self.outport |= OP_A20
        elif c >= 0xF0:                     # pulse output port bits 3:0 (0 = pulse)
            if not c & 0x01:
                self._reset_request()
        else:
            self.bad_commands += 1          # a real 8042 ignores what it does not know

    def _write_data(self, b: int) -> None:
        cmd, self._expect = self._expect, None
        if cmd is None:
            # To the keyboard; clocking a byte out re-enables its interface.
            self.ram[0] &= ~CB_KBD_DISABLE
            self.kbd.write(b)
        elif 0x60 <= cmd <= 0x7F:
            self.ram[cmd & 0x1F] = b
        elif cmd == 0xD1:
            self.outport = b
            if not b & OP_RESET:
                self._reset_request()
        elif cmd == 0xD2:
            self._queue_ctrl(b, aux=False)  # as if from the keyboard, untranslated
        elif cmd == 0xD3:
            self._queue_ctrl(b, aux=True)   # as if from the mouse
        elif cmd == 0xD4:
            self.ram[0] &= ~CB_AUX_DISABLE
            if self.mouse is not None:
                self.mouse.write(b)
            else:                           # nobody there: the transfer times out
                self._timeout = True
                self._queue_ctrl(KBD_RESEND, aux=True)
