"""Keys: Linux key codes, their names and aliases, and the key-event sink contract.

A key is identified by its Linux key code (``KEY_A`` = 30, from
``linux/input-event-codes.h``); every function that takes a key also accepts its name
(``"KEY_A"``, ``"a"``, ``"ctrl"``) and normalizes it with :func:`key_code`. This is the
table every other part of :mod:`remote_hw.input` builds on, and the one shared
contract: whatever takes key presses and releases (a keyboard model, a uinput
device, a test recorder) is a :class:`KeySink`. Pure tables, no I/O.

The other modules of the wing: :mod:`.scancodes` (PC scancode sets 1 and 2),
:mod:`.layout` (typing characters on a US layout), :mod:`.keytext` (keys written as
text), :mod:`.linux_events` (Linux input events), :mod:`.device_events` (key events
on the wire), :mod:`.evdev_keyboard` (reading a real keyboard) and :mod:`.uinput`
(writing a virtual one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable


@runtime_checkable
class KeySink(Protocol):
    """Something that takes key presses and releases (a keyboard model, a uinput
    device, a test recorder). ``code`` is a Linux key code or a key name."""

    def key(self, code: str | int, pressed: bool) -> None: ...


class UnknownKey(ValueError):
    """An unknown key name or code, or text that cannot be typed."""


# -- Linux key codes (linux/input-event-codes.h) ----------------------------------

KEY_CODES: dict[str, int] = {
    "KEY_ESC": 1, "KEY_1": 2, "KEY_2": 3, "KEY_3": 4, "KEY_4": 5, "KEY_5": 6,
    "KEY_6": 7, "KEY_7": 8, "KEY_8": 9, "KEY_9": 10, "KEY_0": 11, "KEY_MINUS": 12,
    "KEY_EQUAL": 13, "KEY_BACKSPACE": 14, "KEY_TAB": 15, "KEY_Q": 16, "KEY_W": 17,
    "KEY_E": 18, "KEY_R": 19, "KEY_T": 20, "KEY_Y": 21, "KEY_U": 22, "KEY_I": 23,
    "KEY_O": 24, "KEY_P": 25, "KEY_LEFTBRACE": 26, "KEY_RIGHTBRACE": 27,
    "KEY_ENTER": 28, "KEY_LEFTCTRL": 29, "KEY_A": 30, "KEY_S": 31, "KEY_D": 32,
    "KEY_F": 33, "KEY_G": 34, "KEY_H": 35, "KEY_J": 36, "KEY_K": 37, "KEY_L": 38,
    "KEY_SEMICOLON": 39, "KEY_APOSTROPHE": 40, "KEY_GRAVE": 41, "KEY_LEFTSHIFT": 42,
    "KEY_BACKSLASH": 43, "KEY_Z": 44, "KEY_X": 45, "KEY_C": 46, "KEY_V": 47,
    "KEY_B": 48, "KEY_N": 49, "KEY_M": 50, "KEY_COMMA": 51, "KEY_DOT": 52,
    "KEY_SLASH": 53, "KEY_RIGHTSHIFT": 54, "KEY_KPASTERISK": 55, "KEY_LEFTALT": 56,
    "KEY_SPACE": 57, "KEY_CAPSLOCK": 58, "KEY_F1": 59, "KEY_F2": 60, "KEY_F3": 61,
    "KEY_F4": 62, "KEY_F5": 63, "KEY_F6": 64, "KEY_F7": 65, "KEY_F8": 66,
    "KEY_F9": 67, "KEY_F10": 68, "KEY_NUMLOCK": 69, "KEY_SCROLLLOCK": 70,
    "KEY_KP7": 71, "KEY_KP8": 72, "KEY_KP9": 73, "KEY_KPMINUS": 74, "KEY_KP4": 75,
    "KEY_KP5": 76, "KEY_KP6": 77, "KEY_KPPLUS": 78, "KEY_KP1": 79, "KEY_KP2": 80,
    "KEY_KP3": 81, "KEY_KP0": 82, "KEY_KPDOT": 83, "KEY_102ND": 86, "KEY_F11": 87,
    "KEY_F12": 88, "KEY_KPENTER": 96, "KEY_RIGHTCTRL": 97, "KEY_KPSLASH": 98,
    "KEY_SYSRQ": 99, "KEY_RIGHTALT": 100, "KEY_HOME": 102, "KEY_UP": 103,
    "KEY_PAGEUP": 104, "KEY_LEFT": 105, "KEY_RIGHT": 106, "KEY_END": 107,
    "KEY_DOWN": 108, "KEY_PAGEDOWN": 109, "KEY_INSERT": 110, "KEY_DELETE": 111,
    "KEY_MUTE": 113, "KEY_VOLUMEDOWN": 114, "KEY_VOLUMEUP": 115, "KEY_POWER": 116,
    "KEY_PAUSE": 119, "KEY_LEFTMETA": 125, "KEY_RIGHTMETA": 126, "KEY_COMPOSE": 127,
    "KEY_SLEEP": 142, "KEY_WAKEUP": 143,
}
KEY_NAMES: dict[int, str] = {code: name for name, code in KEY_CODES.items()}

# Friendly names accepted by key_code() (lower case) besides "KEY_X" and "x".
ALIASES: dict[str, str] = {
    "ctrl": "KEY_LEFTCTRL", "control": "KEY_LEFTCTRL", "lctrl": "KEY_LEFTCTRL",
    "rctrl": "KEY_RIGHTCTRL", "shift": "KEY_LEFTSHIFT", "lshift": "KEY_LEFTSHIFT",
    "rshift": "KEY_RIGHTSHIFT", "alt": "KEY_LEFTALT", "lalt": "KEY_LEFTALT",
    "ralt": "KEY_RIGHTALT", "altgr": "KEY_RIGHTALT", "meta": "KEY_LEFTMETA",
    "super": "KEY_LEFTMETA", "win": "KEY_LEFTMETA", "menu": "KEY_COMPOSE",
    "enter": "KEY_ENTER", "return": "KEY_ENTER", "esc": "KEY_ESC", "escape": "KEY_ESC",
    "tab": "KEY_TAB", "space": "KEY_SPACE", "backspace": "KEY_BACKSPACE",
    "bs": "KEY_BACKSPACE", "del": "KEY_DELETE", "delete": "KEY_DELETE",
    "ins": "KEY_INSERT", "insert": "KEY_INSERT", "home": "KEY_HOME", "end": "KEY_END",
    "pgup": "KEY_PAGEUP", "pageup": "KEY_PAGEUP", "pgdn": "KEY_PAGEDOWN",
    "pagedown": "KEY_PAGEDOWN", "up": "KEY_UP", "down": "KEY_DOWN", "left": "KEY_LEFT",
    "right": "KEY_RIGHT", "capslock": "KEY_CAPSLOCK", "numlock": "KEY_NUMLOCK",
    "scrolllock": "KEY_SCROLLLOCK", "printscreen": "KEY_SYSRQ", "prtsc": "KEY_SYSRQ",
    "sysrq": "KEY_SYSRQ", "pause": "KEY_PAUSE", "break": "KEY_PAUSE",
    "minus": "KEY_MINUS", "equal": "KEY_EQUAL", "comma": "KEY_COMMA", "dot": "KEY_DOT",
    "period": "KEY_DOT", "slash": "KEY_SLASH", "backslash": "KEY_BACKSLASH",
    "semicolon": "KEY_SEMICOLON", "apostrophe": "KEY_APOSTROPHE", "grave": "KEY_GRAVE",
}

MODIFIERS = frozenset(KEY_CODES[n] for n in (
    "KEY_LEFTCTRL", "KEY_RIGHTCTRL", "KEY_LEFTSHIFT", "KEY_RIGHTSHIFT", "KEY_LEFTALT",
    "KEY_RIGHTALT", "KEY_LEFTMETA", "KEY_RIGHTMETA"))


def key_code(key: str | int) -> int:
    """The Linux key code of ``key``: a code (30), a name (``KEY_A``, ``a``, ``A``,
    ``f5``) or an alias (``ctrl``, ``enter``). Raises UnknownKey for anything else."""
    if isinstance(key, bool):
        raise UnknownKey(f"not a key: {key!r}")
    if isinstance(key, int):
        if key in KEY_NAMES:
            return key
        raise UnknownKey(f"unknown key code {key}")
    text = key.strip()
    if not text:
        raise UnknownKey("empty key name")
    upper = text.upper()
    for candidate in (upper, "KEY_" + upper, ALIASES.get(text.lower(), "")):
        code = KEY_CODES.get(candidate)
        if code is not None:
            return code
    if re.fullmatch(r"\d+", text):
        return key_code(int(text))
    raise UnknownKey(f"unknown key {key!r} (use a KEY_* name such as KEY_A or an alias "
                    f"such as ctrl, shift, enter)")


def key_name(code: str | int) -> str:
    """The ``KEY_*`` name of a key code or name."""
    return KEY_NAMES[key_code(code)]


def send(sink: KeySink, events: Iterable[tuple[int, bool]]) -> int:
    """Deliver ``events`` to ``sink``; returns how many."""
    n = 0
    for code, pressed in events:
        sink.key(code, pressed)
        n += 1
    return n


class RecordingSink:
    """A KeySink that records what it gets (tests, dry runs)."""

    def __init__(self) -> None:
        self.events: list[tuple[int, bool]] = []

    def key(self, code: str | int, pressed: bool) -> None:
        self.events.append((key_code(code), bool(pressed)))

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        return iter(self.events)
