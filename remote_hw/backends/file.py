"""``file:PATH`` - append what the guest transmits to a file (a UART log, say).

``{index}`` in PATH is replaced by the instance's index; without the placeholder,
instances other than the first write to ``PATH.<index>`` so per-VM instances of one
device never share a file. The file has no input side: nothing reaches the guest.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .base import BackendError, StreamBackend, ToGuest

log = logging.getLogger(__name__)

INDEX_PLACEHOLDER = "{index}"


def expand_path(arg: str, index: int) -> str:
    """The file name for instance ``index`` (see the module docstring)."""
    if INDEX_PLACEHOLDER in arg:
        return arg.replace(INDEX_PLACEHOLDER, str(index))
    return f"{arg}.{index}" if index > 0 else arg


class FileBackend(StreamBackend):
    """Append guest output to a file, unbuffered (each write reaches the file at once,
    so ``tail -f`` shows it live). The file is opened in the constructor, so an
    unwritable path raises BackendError before the device is exposed.

    Write errors later on (disk full) do not reach the guest: the bytes are counted
    in ``dropped`` and logged once.
    """

    name = "file"

    def __init__(self, arg: str, label: str, index: int = 0) -> None:
        super().__init__(arg, label, index)
        if not arg:
            raise BackendError("file: no path given (expected file:PATH)")
        self.path = expand_path(arg, index)
        try:
            # buffering=0: every from_guest() is one write(2), which is the "flush".
            self._file: Any = open(self.path, "ab", buffering=0)
        except OSError as e:
            raise BackendError(f"file: cannot open {self.path!r} for appending: "
                               f"{e.strerror or e}") from None
        self._lock = threading.Lock()
        self.bytes_written = 0
        self.dropped = 0
        self._error_logged = False

    def start(self, to_guest: ToGuest) -> None:
        """Nothing to start: a file has no input for the guest."""

    def from_guest(self, data: bytes) -> None:
        """Append ``data`` to the file."""
        if not data:
            return
        with self._lock:
            f = self._file
            if f is None:
                self.dropped += len(data)
                return
            try:
                # A raw file may write short; loop until everything is out.
                view = memoryview(data)
                while view:
                    n = f.write(view)
                    view = view[n:]
                self.bytes_written += len(data)
            except OSError as e:
                self.dropped += len(view)
                self.bytes_written += len(data) - len(view)
                if not self._error_logged:
                    self._error_logged = True
                    log.error("file backend %s: writing %s failed: %s", self.label,
                              self.path, e)

    def close(self) -> None:
        """Close the file; safe to call twice."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def describe(self) -> str:
        return f"file:{self.path}"

    def status(self) -> dict[str, Any]:
        """Path and counters."""
        with self._lock:
            return {"path": self.path, "bytes_written": self.bytes_written,
                    "dropped": self.dropped}
