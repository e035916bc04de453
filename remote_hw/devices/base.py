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
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol


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


class RegisterShadow(NamedTuple):
    """What a client may do for a while without asking the model (docs/protocol.md,
    "Posted writes and shadows").

    ``posted``: offsets whose one-byte writes the client may *post*: send without
    waiting, applied later in order with every other access. ``reads``: (offset, value)
    pairs of one-byte registers the client may answer itself, in increasing offset
    order (at most eight, offsets below 64).

    The model promises, for as long as this shadow is its current one: a write at a
    posted offset changes neither the shadow nor anything a shadowed read returns,
    and reading a shadowed register has no side effect. The server publishes a new
    shadow whenever :meth:`Device.shadow` returns a different one (after an access,
    or after a backend fed the model), before the answer or interrupt that follows.
    """

    posted: frozenset[int] = frozenset()
    reads: tuple[tuple[int, int], ...] = ()


class Device(ABC):
    """A register-level device model.

    Subclasses set ``kind`` (the name used on command lines, e.g. ``uart16550``) and
    ``window`` (how many bytes of port or MMIO space the device decodes).
    """

    kind: ClassVar[str]
    window: ClassVar[int]
    #: The constructor keywords of the model's interrupt lines, in line order: line
    #: ``n`` is ``irq_lines[n]``, the ``line`` field of the wire's INTERRUPT, which a
    #: client maps to a guest IRQ (``irq=1:12``). Most devices have the one line.
    irq_lines: ClassVar[tuple[str, ...]] = ("irq",)

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

    def shadow(self) -> RegisterShadow | None:
        """The shadow a client may use now (see :class:`RegisterShadow`); None (the
        default): every access goes to the model and waits for its answer."""
        return None

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


class ByteRegisters(Device):
    """A device whose registers are each one byte wide: the PC's 8-bit ISA devices
    (UART, CMOS clock, keyboard controller) and most small plugins.

    Subclasses implement :meth:`read_byte` and :meth:`write_byte`; this class turns a
    2-, 4- or 8-byte access into byte accesses at consecutive offsets, low byte first,
    as the ISA bus does for an 8-bit device (so a 16-bit ``inw`` from offset 0 reads
    offset 0, then offset 1). Bytes outside ``0 <= offset < window`` read 0xFF and
    are not written, so the two methods only ever see offsets inside the window and
    byte values. Each model used to repeat this loop with its own small differences;
    here it is written, and tested, once.

    Work a model does once per access rather than per byte (bring a clock up to date
    first, recompute the interrupt line after) goes in an override of ``read`` /
    ``write`` that calls ``super()``.
    """

    @abstractmethod
    def read_byte(self, offset: int) -> int:
        """The byte the guest reads at ``offset`` (``0 <= offset < window``)."""

    @abstractmethod
    def write_byte(self, offset: int, value: int) -> None:
        """Apply the guest's write of the byte ``value`` at ``offset``."""

    def read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes as byte reads, low byte first (see the class)."""
        window = self.window
        if size == 1:  # nearly every access to an 8-bit device: no loop
            return self.read_byte(offset) & 0xFF if 0 <= offset < window else 0xFF
        value = 0
        for i in range(size):
            off = offset + i
            b = self.read_byte(off) & 0xFF if 0 <= off < window else 0xFF
            value |= b << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes of ``value`` as byte writes, low byte first."""
        window = self.window
        for i in range(size):
            off = offset + i
            if 0 <= off < window:
                self.write_byte(off, (value >> (8 * i)) & 0xFF)
