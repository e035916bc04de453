"""Typing text on a US keyboard layout: which keys (and modifiers) make a character.

The FUSE view's ``input`` file, the i8042's key-text stream and the key commands all
turn characters into key events the same way; this is that one place. A layout is a
table, so it stays pure and testable without any device.
"""

from __future__ import annotations

from collections.abc import Iterable

from .keys import KEY_CODES, UnknownKey

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
