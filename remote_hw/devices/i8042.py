"""An i8042 PS/2 controller (port 0x60/0x64) with a PS/2 keyboard and an idle mouse.

Window of 5 bytes from port 0x60: offset 0 is the data port (0x60), offset 4 the
status/command port (0x64). Offsets 1-3 (0x61-0x63) are not the controller's: port
0x61 belongs to the PIT/speaker logic, which KVM's in-kernel PIT answers before an exit
ever reaches a device map, and 0x62/0x63 are unused on a PC. They read 0xFF and ignore
writes, so one map ``port:0x60-0x64=SERVER/DEV,irq=1`` covers the controller.

Three parts, as on a PC:

* the **controller** (8042): status register, a 32-byte RAM whose byte 0 is the command
  byte, the output buffer (one byte, from the controller itself, the keyboard or the
  aux device), the output port (reset line, A20) and the set-2 -> set-1 translation;
* the **keyboard** behind its first port: the command set Linux's atkbd and firmware
  use (reset, LEDs, echo, ID, scancode set, typematic, enable/disable, defaults,
  resend), answering unknown commands with 0xFE (resend) as keyboards do;
* an **idle PS/2 mouse** behind the aux port (``aux=none`` removes it): it answers the
  standard mouse commands and never moves.

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

from __future__ import annotations

from collections import deque
from typing import Any

from remote_hw.input import keys as keymap
from remote_hw.input.device_events import key_event_name
from remote_hw.input.keytext import KeyText
from remote_hw.input.scancodes import scancodes

from .base import EVENT_RESET_REQUEST, ByteRegisters, IrqLine, NullIrq, StreamDevice

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

# Keyboard replies
KBD_ACK = 0xFA
KBD_RESEND = 0xFE
KBD_BAT_OK = 0xAA
KBD_ECHO = 0xEE
KBD_ID = (0xAB, 0x83)     # MF2 keyboard; 0x83 reads 0x41 through the translation
DEFAULT_TYPEMATIC = 0x2B  # 10.9 characters/s after 500 ms
DEFAULT_BACKLOG = 64 * 1024

# The 8042's set-2 -> set-1 translation table (bytes 0x80-0xFF pass unchanged except
# 0x83 (F7) and 0x84 (SysRq)). The 0xF0 break prefix is swallowed and sets bit 7 of the
# next translated byte.
_XLAT_LOW = bytes((
    0xff, 0x43, 0x41, 0x3f, 0x3d, 0x3b, 0x3c, 0x58, 0x64, 0x44, 0x42, 0x40, 0x3e, 0x0f, 0x29, 0x59,
    0x65, 0x38, 0x2a, 0x70, 0x1d, 0x10, 0x02, 0x5a, 0x66, 0x71, 0x2c, 0x1f, 0x1e, 0x11, 0x03, 0x5b,
    0x67, 0x2e, 0x2d, 0x20, 0x12, 0x05, 0x04, 0x5c, 0x68, 0x39, 0x2f, 0x21, 0x14, 0x13, 0x06, 0x5d,
    0x69, 0x31, 0x30, 0x23, 0x22, 0x15, 0x07, 0x5e, 0x6a, 0x72, 0x32, 0x24, 0x16, 0x08, 0x09, 0x5f,
    0x6b, 0x33, 0x25, 0x17, 0x18, 0x0b, 0x0a, 0x60, 0x6c, 0x34, 0x35, 0x26, 0x27, 0x19, 0x0c, 0x61,
    0x6d, 0x73, 0x28, 0x74, 0x1a, 0x0d, 0x62, 0x6e, 0x3a, 0x36, 0x1c, 0x1b, 0x75, 0x2b, 0x63, 0x76,
    0x55, 0x56, 0x77, 0x78, 0x79, 0x7a, 0x0e, 0x7b, 0x7c, 0x4f, 0x7d, 0x4b, 0x47, 0x7e, 0x7f, 0x6f,
    0x52, 0x53, 0x50, 0x4c, 0x4d, 0x48, 0x01, 0x45, 0x57, 0x4e, 0x51, 0x4a, 0x37, 0x49, 0x46, 0x54,
))
XLAT_TABLE = bytes(_XLAT_LOW + bytes(0x41 if b == 0x83 else 0x54 if b == 0x84 else b
                                     for b in range(0x80, 0x100)))


def translate(data: bytes) -> bytes:
    """What the 8042 makes of a set-2 byte stream with translation on (for tests)."""
    out = bytearray()
    brk = False
    for b in data:
        if b == 0xF0:
            brk = True
            continue
        out.append(XLAT_TABLE[b] | (0x80 if brk else 0))
        brk = False
    return bytes(out)


# -- the devices behind the two ports -------------------------------------------------

class _PS2Keyboard:
    """An MF2 keyboard: commands in, responses and scan codes out (raw, before the
    controller's translation)."""

    def __init__(self, backlog: int) -> None:
        self.backlog = backlog
        self.resp: deque[int] = deque()     # command responses: sent before scan codes
        self.power_on()

    def power_on(self) -> None:
        self.resp.clear()
        self.scan: deque[int] = deque()   # scan codes not yet sent (bounded)
        self.held: set[int] = set()         # keys pressed (as far as the guest knows)
        self.expect: int | None = None      # command waiting for its argument byte
        self.last_sent = KBD_ACK
        self.defaults()
        self.scanning = True

    def defaults(self) -> None:
        self.codeset = 2
        self.leds = 0
        self.typematic = DEFAULT_TYPEMATIC

    def pending(self) -> bool:
        return bool(self.resp or self.scan)

    def pop(self) -> int:
        b = self.resp.popleft() if self.resp else self.scan.popleft()
        self.last_sent = b
        return b

    def reply(self, *data: int) -> None:
        self.resp.extend(data)

    def write(self, b: int) -> None:
        """A byte from the host (through port 0x60)."""
        cmd = self.expect
        if cmd is not None and b < 0xED:     # an argument (a command byte aborts it)
            self.expect = None
            if cmd == 0xED:                  # set LEDs: bit 0 scroll, 1 num, 2 caps
                self.leds = b & 0x07
                self.reply(KBD_ACK)
            elif cmd == 0xF3:                # typematic rate/delay
                self.typematic = b & 0x7F
                self.reply(KBD_ACK)
            elif cmd == 0xF0:                # scancode set: 0 asks, 1 and 2 select
                if b == 0:
                    self.reply(KBD_ACK, self.codeset)
                elif b in (1, 2):
                    self.codeset = b
                    self.reply(KBD_ACK)
                else:                        # set 3 (or junk): not supported
                    self.expect = cmd
                    self.reply(KBD_RESEND)
            return
        self.expect = None
        if b in (0xED, 0xF0, 0xF3):
            self.expect = b
            self.reply(KBD_ACK)
        elif b == 0xEE:
            self.reply(KBD_ECHO)
        elif b == 0xF2:
            self.reply(KBD_ACK, *KBD_ID)
        elif b == 0xF4:
            self.clear()
            self.scanning = True
            self.reply(KBD_ACK)
        elif b in (0xF5, 0xF6):
            self.clear()
            self.defaults()
            self.scanning = b == 0xF6
            self.reply(KBD_ACK)
        elif 0xF7 <= b <= 0xFD:              # set-3 key type commands: no effect here
            self.reply(KBD_ACK)
        elif b == 0xFE:
            self.reply(self.last_sent)
        elif b == 0xFF:
            self.clear()
            self.resp.clear()
            self.defaults()
            self.scanning = True
            self.reply(KBD_ACK, KBD_BAT_OK)
        else:
            self.reply(KBD_RESEND)

    def key(self, code: int, pressed: bool) -> bool:
        """Queue the scan codes of one key event; False if it was dropped.

        When the backlog is full, presses are dropped; the release of a key whose
        press went in is always queued (beyond the limit if need be) and the release of
        one whose press was dropped is dropped, so the guest never sees a stuck key.
        """
        if not self.scanning:
            return False
        held = self.held
        if pressed:
            data = scancodes(code, True, self.codeset)
            if len(self.scan) + len(data) > self.backlog:
                return False
            held.add(code)
        else:
            if code not in held:
                return False
            held.discard(code)
            data = scancodes(code, False, self.codeset)
        self.scan.extend(data)
        return True

    def clear(self) -> None:
        self.scan.clear()
        self.held.clear()


class _PS2Mouse:
    """A PS/2 mouse that is never moved: enough for firmware and psmouse probes."""

    def __init__(self) -> None:
        self.resp: deque[int] = deque()
        self.power_on()

    def power_on(self) -> None:
        self.resp.clear()
        self.expect: int | None = None
        self.wrap = False
        self.last_sent = KBD_ACK
        self.defaults()

    def defaults(self) -> None:
        self.remote = False
        self.enabled = False
        self.scale21 = False
        self.resolution = 2
        self.rate = 100

    def pending(self) -> bool:
        return bool(self.resp)

    def pop(self) -> int:
        b = self.resp.popleft()
        self.last_sent = b
        return b

    def reply(self, *data: int) -> None:
        self.resp.extend(data)

    def status_byte(self) -> int:
        return (0x40 if self.remote else 0) | (0x20 if self.enabled else 0) | \
               (0x10 if self.scale21 else 0)

    def write(self, b: int) -> None:
        cmd = self.expect
        if cmd is not None:
            self.expect = None
            if cmd == 0xE8:
                self.resolution = b & 0x03
            else:
                self.rate = b
            self.reply(KBD_ACK)
            return
        if self.wrap and b not in (0xEC, 0xFF):
            self.reply(b)                    # wrap (echo) mode
            return
        if b in (0xE8, 0xF3):
            self.expect = b
            self.reply(KBD_ACK)
        elif b in (0xE6, 0xE7):
            self.scale21 = b == 0xE7
            self.reply(KBD_ACK)
        elif b == 0xE9:
            self.reply(KBD_ACK, self.status_byte(), self.resolution, self.rate)
        elif b == 0xEA:
            self.remote = False
            self.reply(KBD_ACK)
        elif b == 0xEB:
            self.reply(KBD_ACK, 0x08, 0x00, 0x00)   # no buttons, no movement
        elif b == 0xEC:
            self.wrap = False
            self.reply(KBD_ACK)
        elif b == 0xEE:
            self.wrap = True
            self.reply(KBD_ACK)
        elif b == 0xF0:
            self.remote = True
            self.reply(KBD_ACK)
        elif b == 0xF2:
            self.reply(KBD_ACK, 0x00)        # a standard mouse
        elif b in (0xF4, 0xF5):
            self.enabled = b == 0xF4
            self.reply(KBD_ACK)
        elif b == 0xF6:
            self.defaults()
            self.reply(KBD_ACK)
        elif b == 0xFE:
            self.reply(self.last_sent)
        elif b == 0xFF:
            self.resp.clear()
            self.wrap = False
            self.defaults()
            self.reply(KBD_ACK, KBD_BAT_OK, 0x00)
        else:
            self.reply(KBD_RESEND)


# -- the controller ------------------------------------------------------------------

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
        self.kbd = _PS2Keyboard(limit)
        self.mouse = _PS2Mouse() if aux == "mouse" else None
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
