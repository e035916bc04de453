"""The PS/2 keyboard behind the controller's first port: commands in, bytes out.

An MF2 keyboard with the command set Linux's atkbd and firmware use (reset, LEDs,
echo, ID, scancode set, typematic, enable/disable, defaults, resend), answering
unknown commands with 0xFE (resend) as keyboards do. It queues raw scan codes (set 1
or 2, as selected); the controller (:mod:`.controller`) pulls them one byte at a time
and translates them if its command byte says so. Host key events arrive by key code
(:meth:`PS2Keyboard.key`), with a bounded backlog that never leaves a key stuck.
"""

from __future__ import annotations

from collections import deque

from remote_hw.input.scancodes import scancodes

from .ps2 import KBD_ACK, KBD_BAT_OK, KBD_RESEND

# Keyboard replies (the ones every PS/2 device gives are in .ps2)
KBD_ECHO = 0xEE
KBD_ID = (0xAB, 0x83)     # MF2 keyboard; 0x83 reads 0x41 through the translation
DEFAULT_TYPEMATIC = 0x2B  # 10.9 characters/s after 500 ms


class PS2Keyboard:
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
