"""vfio's INTx auto-mask rule, as a small state machine with no I/O.

A remote-hw device reports a *level* (the server pushes each change of its interrupt
line). QEMU's vfio-pci takes INTx as *edges* on an eventfd and expects the device to
mask itself when it fires (``VFIO_IRQ_INFO_AUTOMASKED``): after a trigger nothing more
is sent until QEMU unmasks, which it does at the guest's next BAR access (its EOI
emulation). Translating one into the other:

* level rises while unmasked -> trigger, and the line is now masked;
* level rises while masked -> nothing yet (remembered in ``level``);
* UNMASK while the level is still high -> trigger again at once (otherwise an
  interrupt raised between the trigger and the EOI would be lost);
* MASK from QEMU -> masked until UNMASK.

Every method returns whether the caller must write the trigger eventfd now; the caller
does the write (outside this module) under the same lock it called us with.
"""

from __future__ import annotations


class IntxLine:
    """One INTx line of one connected QEMU."""

    __slots__ = ("level", "masked", "enabled", "triggers", "unmasks")

    def __init__(self) -> None:
        self.level = False  # the remote device's line, as last pushed by the server
        self.masked = False
        self.enabled = False  # a trigger eventfd is set
        self.triggers = 0
        self.unmasks = 0

    def _fire(self) -> bool:
        if self.enabled and self.level and not self.masked:
            self.masked = True
            self.triggers += 1
            return True
        return False

    def set_level(self, level: bool) -> bool:
        """The device's line changed; True: signal the trigger eventfd."""
        self.level = bool(level)
        return self._fire()

    def enable(self) -> bool:
        """A trigger eventfd was handed over; a line already high fires at once."""
        self.enabled = True
        self.masked = False
        return self._fire()

    def disable(self) -> None:
        """The trigger eventfd was taken away (or the device reset)."""
        self.enabled = False
        self.masked = False

    def mask(self) -> None:
        self.masked = True

    def unmask(self) -> bool:
        """QEMU's EOI; True: the line is still high, signal again."""
        self.unmasks += 1
        self.masked = False
        return self._fire()
