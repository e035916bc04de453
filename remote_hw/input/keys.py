"""Keys: names, Linux key codes, PC scancodes (sets 1 and 2), text, input events.

Pure tables and small state machines, no I/O, so every translation is testable apart
from the kernel. Three parties use them:

* a keyboard model (the i8042 / PS/2 keyboard) is a :class:`KeySink`: it receives
  ``key(code, pressed)`` and turns it into scancodes with :func:`scancodes`;
* the FUSE view's ``input`` and ``keys`` files turn text and key commands into key
  events (:func:`text_events`, :func:`parse_key_commands`);
* the evdev reader on a server (:class:`EvdevTranslator`) and the uinput writer on a
  client (:func:`input_events`) translate between Linux input events and key events,
  and :func:`key_event_name` / :func:`parse_key_event_name` carry key events in the
  protocol's named device events.

A key is identified by its Linux key code (``KEY_A`` = 30, from
``linux/input-event-codes.h``); every function that takes a key also accepts its name
(``"KEY_A"``, ``"a"``, ``"ctrl"``) and normalizes it with :func:`key_code`. Linux's key
codes are the PC's set-1 make codes for the original 83/84-key keyboard, so set 1 is
mostly the identity; set 2 (what a PS/2 keyboard sends before the i8042 translates it)
has its own table.

Scancode sequences (bytes):

* set 1: make = code (E0-prefixed for the extended keys), break = make with bit 7 set
  on the last byte;
* set 2: make = code (E0-prefixed), break = ``F0`` before the last byte;
* Print Screen sends a fake shift around its code, Pause sends its whole sequence on
  press and nothing on release, as real keyboards do (with no modifier held).
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Protocol


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


# -- PC scancodes ------------------------------------------------------------------

# Set 1 for keys whose make code is not simply their Linux code (the extended keys,
# sent with an E0 prefix). Keys 1-83 and 86-88 are their own set-1 make code.
_SET1_EXTENDED: dict[str, int] = {
    "KEY_KPENTER": 0x1C, "KEY_RIGHTCTRL": 0x1D, "KEY_KPSLASH": 0x35,
    "KEY_SYSRQ": 0x37, "KEY_RIGHTALT": 0x38, "KEY_HOME": 0x47, "KEY_UP": 0x48,
    "KEY_PAGEUP": 0x49, "KEY_LEFT": 0x4B, "KEY_RIGHT": 0x4D, "KEY_END": 0x4F,
    "KEY_DOWN": 0x50, "KEY_PAGEDOWN": 0x51, "KEY_INSERT": 0x52, "KEY_DELETE": 0x53,
    "KEY_MUTE": 0x20, "KEY_VOLUMEDOWN": 0x2E, "KEY_VOLUMEUP": 0x30, "KEY_POWER": 0x5E,
    "KEY_LEFTMETA": 0x5B, "KEY_RIGHTMETA": 0x5C, "KEY_COMPOSE": 0x5D,
    "KEY_SLEEP": 0x5F, "KEY_WAKEUP": 0x63,
}

# Set 2 make codes of the keys without prefix.
_SET2_BASE: dict[str, int] = {
    "KEY_ESC": 0x76, "KEY_1": 0x16, "KEY_2": 0x1E, "KEY_3": 0x26, "KEY_4": 0x25,
    "KEY_5": 0x2E, "KEY_6": 0x36, "KEY_7": 0x3D, "KEY_8": 0x3E, "KEY_9": 0x46,
    "KEY_0": 0x45, "KEY_MINUS": 0x4E, "KEY_EQUAL": 0x55, "KEY_BACKSPACE": 0x66,
    "KEY_TAB": 0x0D, "KEY_Q": 0x15, "KEY_W": 0x1D, "KEY_E": 0x24, "KEY_R": 0x2D,
    "KEY_T": 0x2C, "KEY_Y": 0x35, "KEY_U": 0x3C, "KEY_I": 0x43, "KEY_O": 0x44,
    "KEY_P": 0x4D, "KEY_LEFTBRACE": 0x54, "KEY_RIGHTBRACE": 0x5B, "KEY_ENTER": 0x5A,
    "KEY_LEFTCTRL": 0x14, "KEY_A": 0x1C, "KEY_S": 0x1B, "KEY_D": 0x23, "KEY_F": 0x2B,
    "KEY_G": 0x34, "KEY_H": 0x33, "KEY_J": 0x3B, "KEY_K": 0x42, "KEY_L": 0x4B,
    "KEY_SEMICOLON": 0x4C, "KEY_APOSTROPHE": 0x52, "KEY_GRAVE": 0x0E,
    "KEY_LEFTSHIFT": 0x12, "KEY_BACKSLASH": 0x5D, "KEY_Z": 0x1A, "KEY_X": 0x22,
    "KEY_C": 0x21, "KEY_V": 0x2A, "KEY_B": 0x32, "KEY_N": 0x31, "KEY_M": 0x3A,
    "KEY_COMMA": 0x41, "KEY_DOT": 0x49, "KEY_SLASH": 0x4A, "KEY_RIGHTSHIFT": 0x59,
    "KEY_KPASTERISK": 0x7C, "KEY_LEFTALT": 0x11, "KEY_SPACE": 0x29,
    "KEY_CAPSLOCK": 0x58, "KEY_F1": 0x05, "KEY_F2": 0x06, "KEY_F3": 0x04,
    "KEY_F4": 0x0C, "KEY_F5": 0x03, "KEY_F6": 0x0B, "KEY_F7": 0x83, "KEY_F8": 0x0A,
    "KEY_F9": 0x01, "KEY_F10": 0x09, "KEY_NUMLOCK": 0x77, "KEY_SCROLLLOCK": 0x7E,
    "KEY_KP7": 0x6C, "KEY_KP8": 0x75, "KEY_KP9": 0x7D, "KEY_KPMINUS": 0x7B,
    "KEY_KP4": 0x6B, "KEY_KP5": 0x73, "KEY_KP6": 0x74, "KEY_KPPLUS": 0x79,
    "KEY_KP1": 0x69, "KEY_KP2": 0x72, "KEY_KP3": 0x7A, "KEY_KP0": 0x70,
    "KEY_KPDOT": 0x71, "KEY_102ND": 0x61, "KEY_F11": 0x78, "KEY_F12": 0x07,
}

# Set 2 codes of the extended keys (sent after E0).
_SET2_EXTENDED: dict[str, int] = {
    "KEY_KPENTER": 0x5A, "KEY_RIGHTCTRL": 0x14, "KEY_KPSLASH": 0x4A,
    "KEY_SYSRQ": 0x7C, "KEY_RIGHTALT": 0x11, "KEY_HOME": 0x6C, "KEY_UP": 0x75,
    "KEY_PAGEUP": 0x7D, "KEY_LEFT": 0x6B, "KEY_RIGHT": 0x74, "KEY_END": 0x69,
    "KEY_DOWN": 0x72, "KEY_PAGEDOWN": 0x7A, "KEY_INSERT": 0x70, "KEY_DELETE": 0x71,
    "KEY_MUTE": 0x23, "KEY_VOLUMEDOWN": 0x21, "KEY_VOLUMEUP": 0x32, "KEY_POWER": 0x37,
    "KEY_LEFTMETA": 0x1F, "KEY_RIGHTMETA": 0x27, "KEY_COMPOSE": 0x2F,
    "KEY_SLEEP": 0x3F, "KEY_WAKEUP": 0x5E,
}

PAUSE_SET1 = bytes((0xE1, 0x1D, 0x45, 0xE1, 0x9D, 0xC5))
PAUSE_SET2 = bytes((0xE1, 0x14, 0x77, 0xE1, 0xF0, 0x14, 0xF0, 0x77))
_KEY_PAUSE = KEY_CODES["KEY_PAUSE"]
_KEY_SYSRQ = KEY_CODES["KEY_SYSRQ"]


def _build_set1() -> dict[int, bytes]:
    table: dict[int, bytes] = {}
    for name, code in KEY_CODES.items():
        if name in _SET1_EXTENDED:
            table[code] = bytes((0xE0, _SET1_EXTENDED[name]))
        elif 1 <= code <= 83 or 86 <= code <= 88:
            table[code] = bytes((code,))
    return table


def _build_set2() -> dict[int, bytes]:
    table = {KEY_CODES[n]: bytes((v,)) for n, v in _SET2_BASE.items()}
    table.update({KEY_CODES[n]: bytes((0xE0, v)) for n, v in _SET2_EXTENDED.items()})
    return table


# Linux key code -> make code (without the Pause special case).
SET1: dict[int, bytes] = _build_set1()
SET2: dict[int, bytes] = _build_set2()


def scancodes(key: str | int, pressed: bool, codeset: int = 2) -> bytes:
    """The bytes a PC keyboard sends in scancode set ``codeset`` (1 or 2) when ``key``
    is pressed or released (typematic repeat = another press)."""
    code = key_code(key)
    if codeset not in (1, 2):
        raise ValueError(f"scancode set {codeset} is not supported (1 or 2)")
    if code == _KEY_PAUSE:
        if not pressed:
            return b""
        return PAUSE_SET1 if codeset == 1 else PAUSE_SET2
    table = SET1 if codeset == 1 else SET2
    make = table.get(code)
    if make is None:
        raise UnknownKey(f"{KEY_NAMES[code]} has no set-{codeset} scancode")
    if code == _KEY_SYSRQ:
        # Print Screen: a fake left shift (E0 2A / E0 12) wraps the key.
        shift = table[KEY_CODES["KEY_LEFTSHIFT"]][0]
        if pressed:
            return bytes((0xE0, shift)) + make
        return _break(make, codeset) + _break(bytes((0xE0, shift)), codeset)
    return make if pressed else _break(make, codeset)


def _break(make: bytes, codeset: int) -> bytes:
    if codeset == 1:
        return make[:-1] + bytes((make[-1] | 0x80,))
    return make[:-1] + b"\xF0" + make[-1:]


class ScancodeDecoder:
    """Turn a scancode byte stream (set 1 or 2) back into (key code, pressed).

    Feed bytes with :meth:`feed`; complete keys come out as a list. Prefix bytes are
    kept between calls. Unknown codes are skipped (counted in ``unknown``).
    """

    def __init__(self, codeset: int = 2) -> None:
        if codeset not in (1, 2):
            raise ValueError(f"scancode set {codeset} is not supported (1 or 2)")
        self.codeset = codeset
        table = SET1 if codeset == 1 else SET2
        self._reverse = {make: code for code, make in table.items()}
        self._pause = PAUSE_SET1 if codeset == 1 else PAUSE_SET2
        self._buf = bytearray()
        self.unknown = 0

    def feed(self, data: bytes) -> list[tuple[int, bool]]:
        out: list[tuple[int, bool]] = []
        for b in data:
            self._buf.append(b)
            ev = self._step()
            if ev is not None:
                out.extend(ev)
        return out

    def _step(self) -> list[tuple[int, bool]] | None:
        buf = bytes(self._buf)
        if buf[0] == 0xE1:
            if self._pause.startswith(buf):
                if buf == self._pause:
                    self._buf.clear()
                    return [(_KEY_PAUSE, True), (_KEY_PAUSE, False)]
                return None
            self._buf.clear()
            self.unknown += 1
            return []
        if buf in (b"\xE0",) or (self.codeset == 2 and buf in (b"\xF0", b"\xE0\xF0")):
            return None     # a prefix: wait for more
        pressed = True
        if self.codeset == 1:
            key = buf[:-1] + bytes((buf[-1] & 0x7F,))
            pressed = not buf[-1] & 0x80
        else:
            key = buf.replace(b"\xF0", b"")
            pressed = b"\xF0" not in buf
        self._buf.clear()
        if key == (b"\xE0\x2A" if self.codeset == 1 else b"\xE0\x12"):
            return []       # Print Screen's fake shift
        code = self._reverse.get(key)
        if code is None:
            self.unknown += 1
            return []
        return [(code, pressed)]


# -- text and key commands ---------------------------------------------------------

_SHIFTED_SYMBOLS = {
    "!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8",
    "(": "9", ")": "0", "_": "-", "+": "=", "{": "[", "}": "]", "|": "\\", ":": ";",
    '"': "'", "~": "`", "<": ",", ">": ".", "?": "/",
}
_PLAIN_SYMBOLS = {
    "-": "KEY_MINUS", "=": "KEY_EQUAL", "[": "KEY_LEFTBRACE", "]": "KEY_RIGHTBRACE",
    "\\": "KEY_BACKSLASH", ";": "KEY_SEMICOLON", "'": "KEY_APOSTROPHE",
    "`": "KEY_GRAVE", ",": "KEY_COMMA", ".": "KEY_DOT", "/": "KEY_SLASH",
    " ": "KEY_SPACE", "\n": "KEY_ENTER", "\r": "KEY_ENTER", "\t": "KEY_TAB",
    "\b": "KEY_BACKSPACE", "\x7f": "KEY_BACKSPACE", "\x1b": "KEY_ESC",
}
_SHIFT = KEY_CODES["KEY_LEFTSHIFT"]
_CTRL = KEY_CODES["KEY_LEFTCTRL"]


def char_keys(ch: str) -> tuple[int, tuple[int, ...]]:
    """(key, modifiers) that type ``ch`` on a US keyboard layout."""
    if "a" <= ch <= "z" or "0" <= ch <= "9":
        return KEY_CODES["KEY_" + ch.upper()], ()
    if "A" <= ch <= "Z":
        return KEY_CODES["KEY_" + ch], (_SHIFT,)
    if ch in _PLAIN_SYMBOLS:
        return KEY_CODES[_PLAIN_SYMBOLS[ch]], ()
    if ch in _SHIFTED_SYMBOLS:
        return char_keys(_SHIFTED_SYMBOLS[ch])[0], (_SHIFT,)
    if "\x01" <= ch <= "\x1a":     # Ctrl-A .. Ctrl-Z (the ones not handled above)
        return KEY_CODES["KEY_" + chr(ord(ch) + 0x40)], (_CTRL,)
    raise UnknownKey(f"cannot type {ch!r} on a US keyboard layout")


def tap(keys: Iterable[int]) -> list[tuple[int, bool]]:
    """Press ``keys`` in order and release them in reverse (a chord like Ctrl+C)."""
    keys = list(keys)
    return [(k, True) for k in keys] + [(k, False) for k in reversed(keys)]


def text_events(text: str) -> list[tuple[int, bool]]:
    """The key events that type ``text`` (US layout). ``\\r\\n`` is one Enter."""
    events: list[tuple[int, bool]] = []
    prev = ""
    for ch in text:
        if ch == "\n" and prev == "\r":
            prev = ch
            continue
        prev = ch
        key, mods = char_keys(ch)
        events += tap((*mods, key))
    return events


def parse_key_commands(text: str) -> list[tuple[int, bool]]:
    """Key events for a line of commands separated by blanks:

    ``NAME`` taps a key, ``A+B+C`` taps a chord (``ctrl+alt+delete``), ``+NAME``
    presses and ``-NAME`` releases (``+shift a b -shift``). Names are KEY_* names,
    single characters of a US keyboard, or aliases (ctrl, alt, shift, enter, ...).
    """
    events: list[tuple[int, bool]] = []
    for word in text.split():
        if len(word) > 1 and word[0] in "+-":
            events.append((key_code(word[1:]), word[0] == "+"))
        elif "+" in word.strip("+") and len(word) > 1:
            events += tap(key_code(part) for part in word.split("+"))
        else:
            try:
                code = key_code(word)
            except UnknownKey:
                if len(word) != 1:
                    raise
                key, mods = char_keys(word)     # a symbol such as ! or ?
                events += tap((*mods, key))
                continue
            events += tap((code,))
    return events


def send(sink: KeySink, events: Iterable[tuple[int, bool]]) -> int:
    """Deliver ``events`` to ``sink``; returns how many."""
    n = 0
    for code, pressed in events:
        sink.key(code, pressed)
        n += 1
    return n


# -- Linux input events (evdev on the server, uinput on the client) ----------------

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


# -- key events in the protocol's named device events ------------------------------

_EVENT_RX = re.compile(r"key:(\d{1,4}):([01])")


def key_event_name(code: str | int, pressed: bool) -> str:
    """A key event as a device event name (``key:30:1`` = KEY_A pressed)."""
    return f"key:{key_code(code)}:{1 if pressed else 0}"


def parse_key_event_name(name: str) -> tuple[int, bool] | None:
    """(key code, pressed) from :func:`key_event_name`'s format, None for other
    events or unknown keys."""
    m = _EVENT_RX.fullmatch(name)
    if not m:
        return None
    code = int(m.group(1))
    if code not in KEY_NAMES:
        return None
    return code, m.group(2) == "1"


class RecordingSink:
    """A KeySink that records what it gets (tests, dry runs)."""

    def __init__(self) -> None:
        self.events: list[tuple[int, bool]] = []

    def key(self, code: str | int, pressed: bool) -> None:
        self.events.append((key_code(code), bool(pressed)))

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        return iter(self.events)
