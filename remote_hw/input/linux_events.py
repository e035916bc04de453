"""Linux input events (``struct input_event``) to and from key events.

A server reads a real keyboard through evdev and a client writes a virtual one
through uinput; both speak the kernel's (type, code, value) events while the rest of
remote-hw speaks key events (Linux key code, pressed). This module is the pure
translation between the two, so the rules (autorepeat, buttons, dropped events) are
tested without a kernel; the I/O lives in :mod:`.evdev_keyboard` and :mod:`.uinput`.
"""

from __future__ import annotations

from collections.abc import Iterable

from .keys import KEY_NAMES, KeySink, key_code

EV_SYN = 0x00
EV_KEY = 0x01
EV_MSC = 0x04
EV_REP = 0x14
SYN_REPORT = 0
SYN_DROPPED = 3
BTN_MISC = 0x100         # key codes from here on are buttons (mouse, joystick)
KEY_OK = 0x160           # ... and from here on keys again (remote controls)


def is_keyboard_key(code: int) -> bool:
    """Whether an EV_KEY code is a key (not a mouse or joystick button)."""
    return 0 < code < BTN_MISC or code >= KEY_OK


def input_events(code: str | int, pressed: bool) -> list[tuple[int, int, int]]:
    """The (type, code, value) events a keyboard reports for one key change: the
    EV_KEY event and the SYN_REPORT that ends the frame (what uinput is fed)."""
    return [(EV_KEY, key_code(code), 1 if pressed else 0), (EV_SYN, SYN_REPORT, 0)]


class EvdevTranslator:
    """Turn a real keyboard's evdev events into key events for a :class:`KeySink`.

    * EV_KEY value 1 (press) and 0 (release) of keyboard keys go through; value 2
      (autorepeat) becomes another press of a held key, which is what a PC keyboard's
      typematic repeat sends; buttons and other event types are ignored.
    * A SYN_DROPPED means the kernel's buffer overflowed: held keys are released so
      nothing stays stuck.
    * :meth:`release_all` releases every held key (in reverse order), for when the
      device goes away (hot-unplug) or the reader stops.

    Keys not in the project's key table are counted in ``ignored``.
    """

    def __init__(self, sink: KeySink, *, repeat: bool = True) -> None:
        self.sink = sink
        self.repeat = repeat
        self.held: list[int] = []
        self.ignored = 0
        self.delivered = 0

    def event(self, type_: int, code: int, value: int) -> None:
        if type_ == EV_SYN:
            if code == SYN_DROPPED:
                self.release_all()
            return
        if type_ != EV_KEY or not is_keyboard_key(code):
            return
        if code not in KEY_NAMES:
            self.ignored += 1
            return
        if value == 1:
            if code not in self.held:
                self.held.append(code)
            self._deliver(code, True)
        elif value == 0:
            if code in self.held:
                self.held.remove(code)
                self._deliver(code, False)
        elif value == 2 and self.repeat and code in self.held:
            self._deliver(code, True)

    def events(self, events: Iterable[tuple[int, int, int]]) -> None:
        for type_, code, value in events:
            self.event(type_, code, value)

    def release_all(self) -> None:
        while self.held:
            self._deliver(self.held.pop(), False)

    def _deliver(self, code: int, pressed: bool) -> None:
        self.delivered += 1
        self.sink.key(code, pressed)
