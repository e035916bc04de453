"""A remote keyboard as a local one on the client host, through uinput.

:class:`UinputKeyboard` is a :class:`~remote_hw.input.keys.KeySink` that creates a
virtual keyboard (``/dev/uinput``, through python-evdev) and writes each key change
as an EV_KEY event followed by SYN_REPORT, so programs on the client host (a desktop,
a console) see a local keyboard. The agent feeds it from key events a server sends
as device events named ``key.CODE.0|1`` (:meth:`UinputKeyboard.handle_event`); see
``remote-hw vm --uinput`` and ``remote_hw/client/key_mirror.py``.

Where /dev/uinput is missing, not writable, or python-evdev is not installed, the
constructor raises :class:`UinputUnavailable` with one sentence saying so. The event
translation is :func:`remote_hw.input.linux_events.input_events`, tested without a kernel
through the ``writer`` argument.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from .device_events import parse_key_event_name
from .keys import KEY_NAMES, key_code
from .linux_events import input_events

UINPUT = "/dev/uinput"

Writer = Callable[[int, int, int], None]


class UinputUnavailable(RuntimeError):
    """A virtual keyboard cannot be created here (the message says why)."""


def open_uinput(name: str, devnode: str = UINPUT) -> Any:
    """Create the virtual keyboard; returns python-evdev's UInput object."""
    if not os.path.exists(devnode):
        raise UinputUnavailable(f"cannot create a virtual keyboard: {devnode} does not "
                                "exist on this machine (load the uinput module: "
                                "modprobe uinput)")
    if not os.access(devnode, os.W_OK):
        raise UinputUnavailable(f"cannot create a virtual keyboard: no permission to "
                                f"write {devnode} (run as root or give your group "
                                "access with a udev rule)")
    try:
        import evdev
    except ImportError:
        raise UinputUnavailable("a virtual keyboard needs python-evdev "
                                "(pip install evdev)") from None
    try:
        return evdev.UInput({evdev.ecodes.EV_KEY: sorted(KEY_NAMES)}, name=name,
                            devnode=devnode)
    except (OSError, evdev.UInputError) as e:
        raise UinputUnavailable(f"cannot create a virtual keyboard on {devnode}: {e}") from None


class UinputKeyboard:
    """A virtual keyboard on this host that types what a remote keyboard types.

    ``writer(type, code, value)`` replaces the kernel device (tests); without it the
    device is created with :func:`open_uinput`. Keys held when the keyboard is
    closed are released first, so nothing stays pressed on the host.
    """

    def __init__(self, name: str = "remote-hw keyboard", devnode: str = UINPUT, *,
                 writer: Writer | None = None) -> None:
        self.name = name
        self._ui: Any = None
        if writer is None:
            self._ui = open_uinput(name, devnode)
            writer = self._ui.write
        self._writer = writer
        self._lock = threading.Lock()
        self.held: list[int] = []
        self.events_written = 0

    @property
    def device_path(self) -> str | None:
        """The /dev/input/eventN node of the virtual keyboard (None in tests)."""
        return getattr(self._ui, "device", None) and self._ui.device.path

    def key(self, code: str | int, pressed: bool) -> None:
        code = key_code(code)
        with self._lock:
            if pressed and code not in self.held:
                self.held.append(code)
            elif not pressed:
                if code not in self.held:
                    return          # a release for a key we never pressed
                self.held.remove(code)
            for type_, c, value in input_events(code, pressed):
                self._writer(type_, c, value)
                self.events_written += 1

    def handle_event(self, name: str) -> bool:
        """Apply a device event named ``key.CODE.0|1``; False for other events."""
        parsed = parse_key_event_name(name)
        if parsed is None:
            return False
        self.key(*parsed)
        return True

    def release_all(self) -> None:
        for code in list(reversed(self.held)):
            self.key(code, False)

    def close(self) -> None:
        self.release_all()
        if self._ui is not None:
            try:
                self._ui.close()
            except OSError:
                pass
            self._ui = None
