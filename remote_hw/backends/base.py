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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

ToGuest = Callable[[bytes], None]


class BackendError(ValueError):
    """A backend argument is wrong or its resource cannot be opened."""


class StreamBackend(ABC):
    """A byte-stream far side (see the module docstring for the life cycle)."""

    name: ClassVar[str]

    def __init__(self, arg: str, label: str, index: int = 0) -> None:
        self.arg = arg
        self.label = label
        self.index = index

    @abstractmethod
    def start(self, to_guest: ToGuest) -> None:
        """Begin serving; deliver bytes for the guest through ``to_guest``."""

    @abstractmethod
    def from_guest(self, data: bytes) -> None:
        """Take bytes the guest transmitted."""

    @abstractmethod
    def close(self) -> None:
        """Stop and release everything; safe to call twice."""

    def describe(self) -> str:
        """One line for logs and status: where a person reaches this backend."""
        return f"{self.name}:{self.arg}"
