"""Key events carried as the protocol's named device events (``key.30.1``).

A keyboard model publishes every key typed into it through its device-event sink;
the server sends those to the VMs attached (EVENT messages, feature EVENTS) and a
client may re-emit them on its own host through uinput. A name keeps the protocol
free of a key-event message type: a client that does not care ignores the names it
does not know, as it does any other device event.
"""

from __future__ import annotations

import re

from .keys import KEY_NAMES, key_code

_EVENT_RX = re.compile(r"key\.(\d{1,4})\.([01])")


def key_event_name(code: str | int, pressed: bool) -> str:
    """A key event as a device event name (``key.30.1`` = KEY_A pressed)."""
    return f"key.{key_code(code)}.{1 if pressed else 0}"


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
