"""The guest's output, kept for the ``tx`` files from the first byte.

What a guest transmits must be captured whether or not anybody has the file open,
and from the moment its instance exists. The view does not wrap models for this: each
stream instance publishes its output to listeners
(:meth:`Instance.add_output_listener <remote_hw.server.controller.Instance.add_output_listener>`),
and :class:`Taps` adds one :class:`TxTap` per instance as the controller creates it
(:meth:`Controller.add_instance_listener
<remote_hw.server.controller.Controller.add_instance_listener>`; the instance is
complete and not yet reachable by a guest when that runs). Instances created before a
view started are adopted when it starts.
"""

from __future__ import annotations

import threading
import time
import weakref

from remote_hw.devices.capabilities import ByteStream
from remote_hw.server.controller import Controller, Instance

TX_KEEP = 1 << 20          # bytes of guest output kept per instance for the tx file


class TxTap:
    """The guest's transmitted bytes as a growing file: the last ``keep`` bytes are
    kept with absolute offsets, ``total`` counts everything (the file size)."""

    def __init__(self, keep: int = TX_KEEP) -> None:
        self.keep = keep
        self.lock = threading.Lock()
        self.buf = bytearray()
        self.start = 0            # absolute offset of buf[0]
        self.mtime = time.time()
        self.changed = threading.Condition(self.lock)

    @property
    def total(self) -> int:
        return self.start + len(self.buf)

    def append(self, data: bytes) -> None:
        with self.lock:
            self.buf += data
            over = len(self.buf) - self.keep
            if over > 0:
                del self.buf[:over]
                self.start += over
            self.mtime = time.time()
            self.changed.notify_all()

    def read(self, offset: int, size: int) -> bytes:
        """Bytes at [offset, offset+size). Bytes no longer kept read as NUL, so
        offsets stay those of the whole stream (tail -f relies on the size)."""
        with self.lock:
            end = min(offset + size, self.start + len(self.buf))
            if offset >= end:
                return b""
            lost = b""
            if offset < self.start:
                lost = bytes(min(self.start, end) - offset)
                offset = self.start
            return lost + bytes(self.buf[offset - self.start:end - self.start])


class Taps:
    """One view's taps: a :class:`TxTap` per stream instance of ``controller``, fed
    by the instance's output listeners. ``watch()`` starts, ``close()`` takes this
    view's listeners out again (other views' and the backend stay)."""

    def __init__(self, controller: Controller, keep: int = TX_KEEP) -> None:
        self.controller = controller
        self.keep = keep
        self._taps: weakref.WeakKeyDictionary[Instance, TxTap] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._watching = False

    def watch(self) -> None:
        """Tap every instance from now on, and the ones that exist already."""
        if not self._watching:
            self._watching = True
            self.controller.add_instance_listener(self._on_new)
        for inst in self.controller.instances():
            self.adopt(inst)

    def _on_new(self, inst: Instance) -> None:
        self.adopt(inst)

    def adopt(self, inst: Instance) -> TxTap | None:
        """Tap a stream instance's output (once); None for other devices."""
        if not isinstance(inst.model, ByteStream):
            return None
        with self._lock:
            tap = self._taps.get(inst)
            if tap is None:
                tap = TxTap(self.keep)
                self._taps[inst] = tap
                inst.add_output_listener(tap.append)
            return tap

    def get(self, inst: Instance) -> TxTap | None:
        """The tx tap of an instance, adopting it if it is new to this view."""
        return self._taps.get(inst) or self.adopt(inst)

    def peek(self, inst: Instance) -> TxTap | None:
        """The tx tap of an instance if this view has one (never adopts)."""
        return self._taps.get(inst)

    def known(self, inst: Instance) -> bool:
        return inst in self._taps

    def close(self) -> None:
        """Stop watching the controller and stop feeding this view's taps."""
        if self._watching:
            self._watching = False
            self.controller.remove_instance_listener(self._on_new)
        with self._lock:
            for inst, tap in list(self._taps.items()):
                inst.remove_output_listener(tap.append)
