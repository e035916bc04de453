"""``tty:PATH[@BAUD]`` - a real serial port as the far side of a UART model.

Exports a tty of the server (its own UART ``/dev/ttyS0``, a USB adapter
``/dev/ttyUSB0``, a stable ``/dev/serial/by-id/...`` link, a pty) so that what the
guest transmits leaves on the real line and what arrives on the line reaches the
guest. The port is put in raw mode (8N1, no echo, no line editing, no signals, no
CR/NL translation, no flow control) with termios; the original settings are put back
on close. ``@BAUD`` sets the line speed (default: leave it as it is).

``{index}`` in PATH is replaced by the instance's index, so per-VM instances can use
different ports (``tty:/dev/ttyUSB{index}``); without it only instance 0 may open the
port (a tty cannot be shared between two instances; configure the device ``shared``).

Hot-plug: when the port goes away (a USB adapter pulled: reads fail with EIO or
hang up), guest output is dropped and counted, and the port is reopened as soon as
PATH exists again, so re-plugging the adapter resumes the export by itself.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import termios
from typing import Any

from .base import BackendError
from .queued import OUT_LIMIT, QueuedStreamBackend  # noqa: F401  (OUT_LIMIT kept here)

log = logging.getLogger(__name__)

READ_SIZE = 4096
REOPEN_INTERVAL = 0.5      # seconds between attempts to reopen a vanished port

INDEX_PLACEHOLDER = "{index}"

_BAUDS = {int(name[1:]): getattr(termios, name) for name in dir(termios)
          if name.startswith("B") and name[1:].isdigit()}


def parse_tty_arg(arg: str, index: int = 0) -> tuple[str, int | None]:
    """``PATH[@BAUD]`` -> (path for instance ``index``, baud or None)."""
    path, sep, baud_text = arg.rpartition("@") if "@" in arg else (arg, "", "")
    if not path:
        raise BackendError("tty: no device path given (expected tty:PATH[@BAUD], "
                           "e.g. tty:/dev/ttyUSB0@115200)")
    baud = None
    if sep:
        try:
            baud = int(baud_text, 10)
        except ValueError:
            raise BackendError(f"tty: bad baud rate {baud_text!r} in {arg!r}") from None
        if baud not in _BAUDS:
            known = ", ".join(str(b) for b in sorted(_BAUDS) if b >= 1200)
            raise BackendError(f"tty: unsupported baud rate {baud} (one of {known})")
    if INDEX_PLACEHOLDER in path:
        path = path.replace(INDEX_PLACEHOLDER, str(index))
    elif index > 0:
        raise BackendError(f"tty: {path} is already used by instance 0 of this device; "
                           "make the device shared or put {index} in the path")
    return path, baud


def raw_attrs(attrs: list[Any], baud: int | None = None) -> list[Any]:
    """termios attributes for a raw 8N1 line (what cfmakeraw does, plus CLOCAL and
    CREAD, and no software flow control), optionally at ``baud``."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
               | termios.IXOFF | termios.IXANY | termios.INPCK)
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG
               | termios.IEXTEN)
    cflag &= ~(termios.CSIZE | termios.PARENB | termios.CSTOPB | termios.CRTSCTS)
    cflag |= termios.CS8 | termios.CREAD | termios.CLOCAL
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    if baud is not None:
        ispeed = ospeed = _BAUDS[baud]
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class TtyBackend(QueuedStreamBackend):
    """Relay bytes between a real tty and the guest (see the module docstring).

    The port is opened and put in raw mode in the constructor, so a missing port or
    a non-tty path raises BackendError before the device is exposed. Counters:
    ``bytes_to_guest``, ``bytes_from_guest`` (written to the port), ``dropped``
    (guest bytes while the port was gone or over the queue limit), ``reopened``.
    """

    name = "tty"
    hold_limit = 0     # while the port is gone guest output is dropped (module docstring)

    def __init__(self, arg: str, label: str, index: int = 0) -> None:
        super().__init__(arg, label, index)
        self._fd = -1                      # guarded by self._lock
        self._saved: list[Any] | None = None
        self.reopened = 0
        try:
            self.path, self.baud = parse_tty_arg(arg, index)
            self._open()
        except BackendError:
            self._close_wake_pipe()
            raise

    # -- the port ----------------------------------------------------------------------

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise BackendError(f"tty: cannot open {self.path}: {e.strerror}") from None
        try:
            if not os.isatty(fd):
                raise BackendError(f"tty: {self.path} is not a terminal device")
            saved = termios.tcgetattr(fd)
            termios.tcsetattr(fd, termios.TCSANOW, raw_attrs(saved, self.baud))
            termios.tcflush(fd, termios.TCIFLUSH)    # stale input is not the guest's
        except termios.error as e:
            os.close(fd)
            raise BackendError(f"tty: cannot set {self.path} to raw mode: {e.args[-1]}") from None
        except BackendError:
            os.close(fd)
            raise
        with self._lock:
            self._fd = fd
            self._saved = saved

    def _drop_port_locked(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        if self._saved is not None:
            try:
                termios.tcsetattr(fd, termios.TCSANOW, self._saved)
            except termios.error:
                pass     # the device is gone; nothing to restore
        try:
            os.close(fd)
        except OSError:
            pass
        self._discard_queue_locked()

    # -- StreamBackend -----------------------------------------------------------------

    def describe(self) -> str:
        return f"tty:{self.path}" + (f"@{self.baud}" if self.baud else "")

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"path": self.path, "baud": self.baud, **self._queue_status_locked(),
                    "reopened": self.reopened}

    # -- QueuedStreamBackend -----------------------------------------------------------

    def _target(self) -> int | None:
        fd = self._fd
        return fd if fd >= 0 else None

    def _write(self, target: int, data: bytes | bytearray) -> int:
        return os.write(target, data)

    def _lost(self, target: int, why: str) -> None:
        with self._lock:
            if self._fd != target:
                return
            self._drop_port_locked()
        log.warning("tty backend %s: %s went away (%s); guest output is dropped until "
                    "it returns", self.label, self.path, why)

    def _release_locked(self) -> None:
        """Restore the port's settings and close it."""
        self._drop_port_locked()

    # -- I/O thread --------------------------------------------------------------------

    def _loop(self) -> None:
        poller = select.poll()
        wake = self._wake_r
        poller.register(wake, select.POLLIN)
        registered = -1
        while not self._closed:
            with self._lock:
                fd = self._fd
                want_write = fd >= 0 and bool(self._outbuf)
            if fd != registered:
                if registered >= 0:
                    try:
                        poller.unregister(registered)
                    except (KeyError, ValueError):
                        pass
                registered = fd
            if fd >= 0:
                poller.register(fd, select.POLLIN | (select.POLLOUT if want_write else 0))
                events = poller.poll()
            else:
                events = poller.poll(REOPEN_INTERVAL * 1000)
                if self._closed:
                    return
                if not any(f == wake for f, _ in events):
                    self._try_reopen()
            if self._closed:
                return
            for f, ev in events:
                if f == wake:
                    self._drain_wake()
                elif f == fd:
                    if ev & select.POLLOUT:
                        self._flush(fd)
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL):
                        self._receive(fd, ev)

    def _try_reopen(self) -> None:
        if not os.path.exists(self.path):
            return
        try:
            self._open()
        except BackendError as e:
            log.debug("tty backend %s: %s", self.label, e)
            return
        with self._lock:
            self.reopened += 1
        log.warning("tty backend %s: %s is back; exporting it again", self.label, self.path)

    def _receive(self, fd: int, ev: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                self._lost(fd, "hang-up")
            return
        except OSError as e:
            self._lost(fd, e.strerror or errno.errorcode.get(e.errno or 0, "error"))
            return
        if not data:
            self._lost(fd, "end of file")
            return
        self._deliver(data)
