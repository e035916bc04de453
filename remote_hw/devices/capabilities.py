"""Optional abilities a device model may have besides its registers.

The register contract (:class:`~remote_hw.devices.base.Device`) is all a model must
offer. Some models can do more for the people and programs on the server: a clock
can be read and set, a keyboard takes key presses, a stream device carries bytes both
ways. Code that offers such things (the FUSE view's ``time``, ``input``, ``keys``,
``tx`` and ``rx`` files) asks ``isinstance(model, Clock)`` rather than probing for
method names, so the ability is declared once, here, with its signature, and a new
model gains the matching files by having the methods: no registration, no base class
(the Protocols are structural and ``runtime_checkable``).

A ``runtime_checkable`` check sees only that the members exist; the signatures below
are the contract mypy holds models to.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol, runtime_checkable

from remote_hw.input.keys import KeySink

__all__ = ["ByteStream", "Clock", "Keyboard", "TextInput"]


@runtime_checkable
class Clock(Protocol):
    """A clock the host can read and set (the CMOS RTC)."""

    def now(self) -> datetime:
        """The time the guest sees, as an aware datetime."""
        ...

    def set_time(self, dt: datetime) -> None:
        """Set the guest-visible time; a naive ``dt`` is UTC."""
        ...


#: Takes key presses and releases one at a time (the i8042's PS/2 keyboard): the input
#: wing's one key contract, ``key(code, pressed)`` with a Linux key code or name
#: (unknown keys raise :class:`remote_hw.input.keys.UnknownKey`). The same Protocol
#: serves evdev readers, uinput devices and the FUSE ``keys`` file, so a model that is
#: a keyboard implements one method, not one per caller.
Keyboard = KeySink


@runtime_checkable
class TextInput(Protocol):
    """Types text itself, with its own keyboard layout (the i8042)."""

    def type_text(self, text: str) -> object:
        """Type ``text`` into the guest (``\\n`` is Enter)."""
        ...


@runtime_checkable
class ByteStream(Protocol):
    """Bytes both ways (a UART): ``feed`` delivers bytes towards the guest's receive
    side, ``tx_sink`` is called with what the guest transmits. The server owns
    ``tx_sink`` (it publishes the output to the instance's listeners and backend)."""

    tx_sink: Callable[[bytes], None]

    def feed(self, data: bytes) -> None:
        """Queue ``data`` for the guest to receive (raises the interrupt as due)."""
        ...
