"""PC scancodes: what a PS/2 keyboard sends for a key (sets 1 and 2), and back.

Pure tables and a small state machine, no I/O, so a keyboard model (the i8042's PS/2
keyboard) and the trace tools share one definition that is testable apart from any
device. Linux's key codes are the PC's set-1 make codes for the original 83/84-key
keyboard, so set 1 is mostly the identity; set 2 (what a PS/2 keyboard sends before
the i8042 translates it) has its own table.

Scancode sequences (bytes):

* set 1: make = code (E0-prefixed for the extended keys), break = make with bit 7 set
  on the last byte;
* set 2: make = code (E0-prefixed), break = ``F0`` before the last byte;
* Print Screen sends a fake shift around its code, Pause sends its whole sequence on
  press and nothing on release, as real keyboards do (with no modifier held).
"""

from __future__ import annotations

from .keys import KEY_CODES, KEY_NAMES, UnknownKey, key_code

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
