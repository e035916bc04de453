"""``evdev:MATCH`` - a real keyboard of the server types into a keyboard model.

This is glue: :class:`~remote_hw.input.evdev_keyboard.EvdevKeyboard` (in the input
wing) finds the keyboard, reads it and follows it across hot-plug; this backend hands
its key events to the device instance, whose model (the i8042's PS/2 keyboard) turns
them into scancodes for the guest. ``remote-hw server --device
kbd0=i8042,backend=evdev:/dev/input/by-id/usb-...-event-kbd`` is the whole set-up.

MATCH is what :mod:`remote_hw.input.hotplug` accepts: a path (it must exist when the
server starts), a udev property ``KEY=VALUE``, part of the device's name, or ``any``
(these wait for a keyboard to be plugged in). The keyboard is grabbed, so its keys go
to the guest only; one keyboard has one reader, so only instance 0 of a device may
read it (make the device ``shared`` to give several VMs the same keyboard), as with
the tty backend.
"""

from __future__ import annotations

from typing import ClassVar

from remote_hw.input.evdev_keyboard import (
    DEV_INPUT,
    EvdevKeyboard,
    InputUnavailable,
    check_keyboard,
)
from remote_hw.input.keys import KeySink

from .base import BackendError, BackendUnavailable, KeyBackend


class EvdevBackend(KeyBackend):
    """Feed a keyboard model from a real keyboard (see the module docstring)."""

    name = "evdev"
    dev_input: ClassVar[str] = DEV_INPUT    # where the kernel's input devices are

    @classmethod
    def check(cls, arg: str) -> None:
        """Fail at server start, in one sentence, where the keyboard cannot be read
        (no /dev/input, no such path, python-evdev or pyudev missing)."""
        try:
            check_keyboard(arg, cls.dev_input)
        except InputUnavailable as e:
            raise BackendUnavailable(str(e)) from None

    def __init__(self, arg: str, label: str, index: int = 0) -> None:
        super().__init__(arg, label, index)
        if index > 0:
            raise BackendError(f"evdev: the keyboard {arg or 'any'} is already read by "
                               "instance 0 of this device; make the device shared to give "
                               "several VMs the same keyboard")
        self.match = arg
        self._reader: EvdevKeyboard | None = None

    def start(self, sink: KeySink) -> None:
        reader = EvdevKeyboard(sink, self.match, dev_input=self.dev_input)
        try:
            reader.start()
        except InputUnavailable as e:
            reader.close()
            raise BackendUnavailable(f"evdev: {e}") from None
        self._reader = reader

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def describe(self) -> str:
        if self._reader is not None:
            return self._reader.describe()
        return f"evdev:{self.match or 'any'}"
