"""The idle PS/2 mouse behind the controller's aux port.

It answers the standard mouse commands (resolution, sample rate, scaling, stream and
remote mode, wrap mode, status, ID, reset) and never moves: enough for firmware and
Linux's psmouse probe to find a mouse there, which is what a guest expects of a PC.
``aux=none`` on the controller removes it (aux writes then time out).
"""

from __future__ import annotations

from collections import deque

from .ps2 import KBD_ACK, KBD_BAT_OK, KBD_RESEND


class PS2Mouse:
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
