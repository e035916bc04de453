"""The plugin contract for a device's far side on the server.

A backend is what a person or program on the server touches: a TCP listener that
``nc`` talks to, a file that collects a UART's output, a real tty, a keyboard. Like an
nbdkit plugin it is small and has a fixed life cycle:

1. constructed from its argument string (the part after ``name:`` in ``backend=``),
   with the label of the device instance and the instance's index among the live
   instances of the same device (so per-VM instances can get their own port/file);
2. ``start(to_guest)``: begin serving; call ``to_guest(data)`` (thread-safe, provided by
   the server) whenever bytes arrive for the guest;
3. ``from_guest(data)`` is called by the server with bytes the guest transmitted; it
   must not block for long (it runs on the request path);
4. ``close()``: stop threads, close sockets and files; idempotent.

A backend either carries bytes (:class:`StreamBackend`: TCP, file, tty; its device is
a :class:`~remote_hw.devices.base.StreamDevice`) or key events
(:class:`KeyBackend`: a real keyboard; ``start(sink)`` gets a
:class:`~remote_hw.input.keys.KeySink` instead of ``to_guest``, and its device must
be a keyboard). Before any of that, the server calls the class's ``check(arg)`` once
when it starts, so what this machine lacks (a kernel device, a module) stops the
server at once with one sentence instead of failing a VM's attach later.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

from remote_hw.input.keys import KeySink

ToGuest = Callable[[bytes], None]


class BackendError(ValueError):
    """A backend argument is wrong or its resource cannot be opened."""


class BackendUnavailable(BackendError):
    """The argument is fine but this machine lacks what the backend needs (a kernel
    device, a Python module): not a usage error, so the server exits with status 1."""


class Backend(ABC):
    """What every far side has: its argument, label, index, and the life cycle's
    ``check`` and ``close`` (see the module docstring)."""

    name: ClassVar[str]
    #: option keys the backend takes after its argument (``tcp:HOST:PORT,token=FILE``);
    #: in a ``--device`` spec they follow ``backend=`` as ``KEY=VALUE`` items
    options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, arg: str, label: str, index: int = 0) -> None:
        self.arg = arg
        self.label = label
        self.index = index

    @classmethod
    def check(cls, arg: str) -> None:  # noqa: B027  (optional: a no-op unless overridden)
        """Raise BackendError (or BackendUnavailable) if ``arg`` cannot work on this
        machine; called once when the server starts. Most backends find out only when
        they open (a port may be free now and taken later), so the default checks
        nothing."""

    @abstractmethod
    def close(self) -> None:
        """Stop and release everything; safe to call twice."""

    def describe(self) -> str:
        """One line for logs and status: where a person reaches this backend."""
        return f"{self.name}:{self.arg}"


class StreamBackend(Backend):
    """A byte-stream far side (see the module docstring for the life cycle)."""

    @abstractmethod
    def start(self, to_guest: ToGuest) -> None:
        """Begin serving; deliver bytes for the guest through ``to_guest``."""

    @abstractmethod
    def from_guest(self, data: bytes) -> None:
        """Take bytes the guest transmitted."""


class KeyBackend(Backend):
    """A far side that produces key events (a keyboard), for a keyboard model."""

    @abstractmethod
    def start(self, sink: KeySink) -> None:
        """Begin serving; deliver key presses and releases through ``sink.key``
        (thread-safe, provided by the server)."""
