"""Which input device to read, as devices come and go: matching and hot-plug.

A server follows one keyboard across unplug and re-plug. The decision (does this
device match what the user named, is it a keyboard, which one to take next when the
current one goes away) is kept apart from the kernel here, so it is tested with plain
records; :mod:`.evdev_keyboard` feeds it the devices pyudev reports.

Which keyboard: ``match`` is

* empty or ``any``: the first keyboard found;
* a path (``/dev/input/event3``, ``/dev/input/by-id/usb-...-event-kbd``);
* ``KEY=VALUE``: a udev property (``ID_SERIAL=Logitech_USB_Keyboard``,
  ``ID_PATH=pci-0000:00:14.0-usb-0:2:1.0``);
* any other text: part of the device's name (case-insensitive).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .keys import KEY_CODES

log = logging.getLogger("remote_hw.input")

# The keys that make an event device a keyboard (what udev's input_id checks too).
_KEYBOARD_PROBE = tuple(KEY_CODES[n] for n in ("KEY_A", "KEY_Z", "KEY_ENTER", "KEY_SPACE"))


def looks_like_keyboard(key_caps: Iterable[int]) -> bool:
    """Whether an EV_KEY capability list is a keyboard's (letters, Enter, Space)."""
    caps = set(key_caps)
    return all(k in caps for k in _KEYBOARD_PROBE)


@dataclass
class InputDeviceInfo:
    """What the follower needs to know about one event device."""

    devnode: str
    name: str = ""
    keyboard: bool | None = None          # None: unknown until opened
    properties: dict[str, str] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)


def matches(info: InputDeviceInfo, match: str) -> bool:
    """Whether ``info`` is the device ``match`` names (see the module docstring)."""
    m = match.strip()
    if m in ("", "any"):
        return info.keyboard is not False
    if m.startswith("/"):
        if m == info.devnode or m in info.links:
            return True
        try:
            return os.path.realpath(m) == os.path.realpath(info.devnode)
        except OSError:
            return False
    if "=" in m:
        key, _, value = m.partition("=")
        return info.properties.get(key.strip()) == value.strip()
    return m.lower() in info.name.lower()


class HotplugFollower:
    """Which device to read, as devices come and go.

    ``open_fn(info)`` opens a device and returns a handle, or raises OSError (then the
    device is skipped) or returns None (not a keyboard after all); ``close_fn(handle,
    gone)`` closes one (``gone`` when it was unplugged). At most one device is
    followed; when it goes away, the next matching device present is taken.
    """

    def __init__(self, match: str, open_fn: Callable[[InputDeviceInfo], Any],
                 close_fn: Callable[[Any, bool], None]) -> None:
        self.match = match
        self.open_fn = open_fn
        self.close_fn = close_fn
        self.present: dict[str, InputDeviceInfo] = {}
        self.current: InputDeviceInfo | None = None
        self.handle: Any = None
        self.switches = 0

    def add(self, info: InputDeviceInfo) -> bool:
        """A device appeared (or was found at start); True if we now read it."""
        self.present[info.devnode] = info
        if self.current is None and matches(info, self.match):
            return self._take(info)
        return False

    def remove(self, devnode: str) -> bool:
        """A device disappeared; True if it was the one we read."""
        self.present.pop(devnode, None)
        if self.current is None or self.current.devnode != devnode:
            return False
        self._drop(gone=True)
        for info in sorted(self.present.values(), key=lambda i: i.devnode):
            if matches(info, self.match) and self._take(info):
                break
        return True

    def close(self) -> None:
        if self.current is not None:
            self._drop(gone=False)

    def _take(self, info: InputDeviceInfo) -> bool:
        try:
            handle = self.open_fn(info)
        except OSError as e:
            log.warning("input: cannot open %s (%s): %s", info.devnode, info.name,
                        e.strerror or e)
            return False
        if handle is None:
            return False
        self.current, self.handle = info, handle
        self.switches += 1
        return True

    def _drop(self, gone: bool) -> None:
        handle, self.handle, self.current = self.handle, None, None
        self.close_fn(handle, gone)


def info_from_udev(device: Any) -> InputDeviceInfo | None:
    """An InputDeviceInfo from a pyudev Device of the input subsystem (event nodes
    only). Without udevd the ID_INPUT_* properties are missing: ``keyboard`` is then
    left unknown and decided from the capabilities when the device is opened."""
    node = device.device_node
    if not node or not os.path.basename(node).startswith("event"):
        return None
    props = {k: device.properties.get(k) for k in device.properties}
    name = ""
    parent = device.parent
    if parent is not None:
        raw = parent.attributes.get("name")
        if raw:
            name = raw.decode(errors="replace").strip() if isinstance(raw, bytes) else str(raw)
    keyboard = None
    if "ID_INPUT" in props:
        keyboard = props.get("ID_INPUT_KEYBOARD") == "1"
    links = list(device.device_links) if hasattr(device, "device_links") else []
    return InputDeviceInfo(node, name, keyboard, props, links)
