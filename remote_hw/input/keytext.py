"""Keys written as text: the key-event stream (``hello<enter><ctrl-c>``) and key
commands (``ctrl+alt+delete``, ``+shift a -shift``).

These are the two ways a person writes keys: the stream a keyboard's byte backend
carries (``nc`` to the i8042's tcp backend, the FUSE ``input`` file with markup) and
the one-line commands of the FUSE ``keys`` file. Both parse text into key events
(Linux key code, pressed) for any :class:`~remote_hw.input.keys.KeySink`, so they
live here rather than in one device model; characters are typed with
:mod:`remote_hw.input.layout`.
"""

from __future__ import annotations

import codecs

from . import keys as keymap
from .layout import char_keys, tap


def parse_key_commands(text: str) -> list[tuple[int, bool]]:
    """Key events for a line of commands separated by blanks:

    ``NAME`` taps a key, ``A+B+C`` taps a chord (``ctrl+alt+delete``), ``+NAME``
    presses and ``-NAME`` releases (``+shift a b -shift``). Names are KEY_* names,
    single characters of a US keyboard, or aliases (ctrl, alt, shift, enter, ...).
    """
    events: list[tuple[int, bool]] = []
    for word in text.split():
        if len(word) > 1 and word[0] in "+-":
            events.append((keymap.key_code(word[1:]), word[0] == "+"))
        elif "+" in word.strip("+") and len(word) > 1:
            events += tap(keymap.key_code(part) for part in word.split("+"))
        else:
            try:
                code = keymap.key_code(word)
            except keymap.UnknownKey:
                if len(word) != 1:
                    raise
                key, mods = char_keys(word)     # a symbol such as ! or ?
                events += tap((*mods, key))
                continue
            events += tap((code,))
    return events


# QEMU-style names and other spellings people type, on top of keys.ALIASES.
EXTRA_ALIASES = {
    "ret": "KEY_ENTER", "spc": "KEY_SPACE", "caps": "KEY_CAPSLOCK",
    "shift_r": "KEY_RIGHTSHIFT", "ctrl_r": "KEY_RIGHTCTRL", "alt_r": "KEY_RIGHTALT",
    "meta_l": "KEY_LEFTMETA", "meta_r": "KEY_RIGHTMETA", "print": "KEY_SYSRQ",
    "lt": "<", "gt": ">",
}
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+-")
MAX_NAME = 40


def key_events_for_name(name: str) -> list[tuple[int, bool]]:
    """The key events of one bracketed name (without the brackets).

    ``NAME`` taps a key; ``A-B-C`` (or ``A+B+C``) presses A, B, C in order and
    releases them in reverse (``ctrl-c``, ``ctrl-alt-delete``, ``shift-f1``); ``+NAME``
    only presses and ``-NAME`` only releases. A name is a ``KEY_*`` name, an alias of
    remote_hw.input.keys (``enter``, ``esc``, ``ctrl``, ...), the same with
    underscores (``caps_lock``, ``page_up``), a QEMU key name (``ret``, ``spc``,
    ``shift_r``) or a single character (``a``, ``!``). Raises keys.UnknownKey.
    """
    if len(name) > 1 and name[0] in "+-":
        return [(_one_key(name[1:])[-1], name[0] == "+")]
    parts = name.replace("+", "-").split("-")
    if not all(parts):
        raise keymap.UnknownKey(f"bad key name <{name}>")
    chord: list[int] = []
    for part in parts:
        for code in _one_key(part):
            if code not in chord:
                chord.append(code)
    return tap(chord)


def _one_key(part: str) -> list[int]:
    """[modifiers..., key] for one name part (a shifted character brings its shift)."""
    alias = EXTRA_ALIASES.get(part.lower())
    if alias is not None:
        part = alias
    if len(part) == 1 and not part.isalnum():
        key, mods = char_keys(part)
        return [*mods, key]
    try:
        return [keymap.key_code(part)]
    except keymap.UnknownKey:
        if "_" in part:
            return [keymap.key_code(part.replace("_", ""))]
        raise


class KeyText:
    """Incremental parser of the key-event stream: text in, key events out.

    * Characters are typed on a US layout (capitals and symbols with Shift); ``\\n``,
      ``\\r`` and ``\\r\\n`` are one Enter, ``\\t`` Tab, ``\\b`` Backspace, ESC Escape,
      control characters Ctrl+letter.
    * ``<name>`` is a key or chord (see :func:`key_events_for_name`): ``<enter>``,
      ``<f1>``, ``<ctrl-c>``, ``<caps_lock>``, ``<+shift>``/``<-shift>``.
    * ``<<`` types ``<``. A ``<`` that does not begin a well-formed ``<name>`` (a name
      is 1-40 of ``A-Z a-z 0-9 _ + -``) is typed as it is, as is ``>`` on its own; an
      unknown name is skipped and counted in ``errors``.

    The input may be split anywhere (even inside a UTF-8 sequence or a ``<name>``): an
    open ``<name`` waits for the next chunk; :meth:`flush` types it literally.
    """

    def __init__(self, markup: bool = True) -> None:
        self.markup = markup            # False: every character is text, '<' too
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._open: str | None = None   # text of an unfinished <name, without '<'
        self._after_cr = False
        self.errors = 0

    def feed(self, data: bytes | str) -> list[tuple[int, bool]]:
        text = self._decoder.decode(data) if isinstance(data, (bytes, bytearray)) else data
        out: list[tuple[int, bool]] = []
        for ch in text:
            self._char(ch, out)
        return out

    def flush(self) -> list[tuple[int, bool]]:
        """End of input: an unfinished ``<name`` is typed as text."""
        out: list[tuple[int, bool]] = []
        for ch in self._decoder.decode(b"", True):
            self._char(ch, out)
        if self._open is not None:
            pending, self._open = self._open, None
            self._type("<", out)
            for ch in pending:
                self._type(ch, out)
        return out

    def _char(self, ch: str, out: list[tuple[int, bool]]) -> None:
        name = self._open
        if name is None:
            if ch == "<" and self.markup:
                self._open = ""
            else:
                self._type(ch, out)
            return
        if ch == "<" and name == "":
            self._open = None
            self._type("<", out)            # "<<": a literal '<'
        elif ch == ">" and name:
            self._open = None
            self._after_cr = False
            try:
                out.extend(key_events_for_name(name))
            except keymap.UnknownKey:
                self.errors += 1
        elif ch in _NAME_CHARS and len(name) < MAX_NAME:
            self._open = name + ch
        else:                               # not a name after all: type it as text
            self._open = None
            self._type("<", out)
            for c in name:
                self._type(c, out)
            self._char(ch, out)

    def _type(self, ch: str, out: list[tuple[int, bool]]) -> None:
        if ch == "\n" and self._after_cr:
            self._after_cr = False
            return
        self._after_cr = ch == "\r"
        try:
            key, mods = char_keys(ch)
        except keymap.UnknownKey:
            self.errors += 1
            return
        out.extend(tap((*mods, key)))
