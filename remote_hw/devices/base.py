"""The contract every software device model follows.

A device model is pure: it sees register accesses (``read``/``write`` at an offset
within its own window), drives one interrupt line, and, when it needs one, reaches
guest memory through a DMA interface. It never knows about sockets, KVM, threads or
which VM it serves; the server wraps each instance with a lock and the routing.
Firecracker's ``BusDevice`` is the model for this shape.

Values are little-endian integers of ``size`` bytes (1, 2, 4 or 8), which is how both
port I/O and MMIO exits present them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Protocol


class IrqLine(Protocol):
    """An interrupt line a device drives as a level."""

    def set_level(self, level: bool) -> None:
        """Assert (True) or deassert (False) the line. Repeats are allowed and cheap."""


class NullIrq:
    """An unconnected line: remembers its level, tells nobody (tests, local use)."""

    def __init__(self) -> None:
        self.level = False

    def set_level(self, level: bool) -> None:
        self.level = bool(level)


class GuestMemory(Protocol):
    """Guest-physical memory as a device sees it for DMA."""

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


# Device events that are not register values or interrupts and must reach the client
# (for example the i8042's reset request). Names are stable strings on the wire.
EVENT_RESET_REQUEST = "reset-request"

EventSink = Callable[[str], None]


class Device(ABC):
    """A register-level device model.

    Subclasses set ``kind`` (the name used on command lines, e.g. ``uart16550``) and
    ``window`` (how many bytes of port or MMIO space the device decodes).
    """

    kind: ClassVar[str]
    window: ClassVar[int]

    def __init__(self, irq: IrqLine | None = None, events: EventSink | None = None,
                 dma: GuestMemory | None = None, **options: Any) -> None:
        self.irq: IrqLine = irq if irq is not None else NullIrq()
        self.events: EventSink = events if events is not None else (lambda name: None)
        self.dma = dma
        if options:
            raise ValueError(f"{self.kind}: unknown option(s) {', '.join(sorted(options))}")

    @abstractmethod
    def read(self, offset: int, size: int) -> int:
        """Return the value the guest reads at ``offset`` (``size`` bytes)."""

    @abstractmethod
    def write(self, offset: int, size: int, value: int) -> None:
        """Apply a guest write of ``value`` (``size`` bytes) at ``offset``."""

    def reset(self) -> None:
        """Return to power-on state (used when the client VM resets)."""

    def status(self) -> dict[str, Any]:
        """Registers and counters as plain values, for people and the FUSE view."""
        return {}

    def close(self) -> None:
        """Release anything held (timers); the instance is not used afterwards."""


class StreamDevice(Device):
    """A device with a byte stream on its far side (UART, keyboard text, ...).

    ``tx_sink`` receives what the guest sends; ``feed`` delivers bytes towards the guest.
    The server calls ``feed`` with the instance lock held, so models need no locking.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tx_sink: Callable[[bytes], None] = lambda data: None

    @abstractmethod
    def feed(self, data: bytes) -> None:
        """Queue ``data`` for the guest to receive (raises the interrupt as due)."""
