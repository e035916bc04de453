"""The mechanism the tcp and tty backends share: one I/O thread, a bounded output queue.

A :class:`QueuedStreamBackend` relays bytes between the guest and one far side at a
time (a connected peer, an open port), which can be absent and come back.
``from_guest`` first tries a non-blocking write itself (no thread hop on the request
path) and only queues what the far side does not take, up to ``OUT_LIMIT`` bytes;
beyond that guest output is dropped and counted, so the guest never waits for a
person's terminal or a slow line. The I/O thread (``_loop``, the subclass's) writes
the queue out when the far side becomes writable, reads what arrives for the guest
and notices when the far side goes away; a wake-up pipe interrupts its wait when
``from_guest`` queued something or ``close`` was called.

While no far side is there, guest output is kept up to ``hold_limit`` bytes (the most
recent ones, older bytes are dropped and counted) and sent to the next one; with
``hold_limit`` 0 (the default) it is dropped and counted at once.

A subclass provides ``_target`` (the far side or None), ``_write`` (one non-blocking
write), ``_lost`` (drop a far side that failed), ``_release_locked`` (what ``close``
frees besides the thread and the wake-up pipe) and ``_loop`` (the I/O thread's wait),
and calls ``_flush``, ``_deliver`` and ``_drain_wake`` from its loop. ``self._lock``
guards the far side, ``_outbuf`` and the counters ``bytes_to_guest``,
``bytes_from_guest`` and ``dropped``.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import abstractmethod
from typing import Any, ClassVar

from .base import BackendError, StreamBackend, ToGuest

# Guest bytes queued for a slow far side before further guest output is dropped; the
# guest must never wait for a person's terminal or a slow line.
OUT_LIMIT = 1 << 20


class QueuedStreamBackend(StreamBackend):
    """A far side served by one I/O thread, with a bounded queue for guest output
    (see the module docstring). Counters: ``bytes_to_guest``, ``bytes_from_guest``
    (delivered to the far side), ``dropped``."""

    # Guest bytes kept while no far side is there, for the next one (0: drop them).
    hold_limit: ClassVar[int] = 0

    def __init__(self, arg: str, label: str, index: int = 0) -> None:
        super().__init__(arg, label, index)
        # Log as the concrete backend's module (remote_hw.backends.tcp, ...).
        self._log = logging.getLogger(type(self).__module__)
        self._lock = threading.Lock()      # guards the far side, _outbuf and the counters
        self._outbuf = bytearray()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None
        self._to_guest: ToGuest | None = None
        self._closed = False
        self.bytes_to_guest = 0
        self.bytes_from_guest = 0
        self.dropped = 0

    # -- what a subclass provides ------------------------------------------------------

    @abstractmethod
    def _target(self) -> Any:
        """The far side now (a socket, a file descriptor), or None while it is absent.
        Compared with ``!=`` to notice that it changed (a socket by identity)."""

    @abstractmethod
    def _write(self, target: Any, data: bytes | bytearray) -> int:
        """Write without blocking; return how much was taken. Raises BlockingIOError
        or InterruptedError when nothing could be written, OSError when it failed."""

    @abstractmethod
    def _lost(self, target: Any, why: str) -> None:
        """``target`` failed (from the I/O thread, without the lock): drop it if it is
        still the far side (see ``_discard_queue_locked``)."""

    @abstractmethod
    def _release_locked(self) -> None:
        """Close what ``close`` frees besides the thread and the wake-up pipe (called
        with the lock held, after the thread has ended)."""

    @abstractmethod
    def _loop(self) -> None:
        """The I/O thread: wait for the far side and the wake-up pipe until closed."""

    # -- StreamBackend -----------------------------------------------------------------

    def start(self, to_guest: ToGuest) -> None:
        """Start the I/O thread; bytes from the far side go to ``to_guest``."""
        if self._closed:
            raise BackendError(f"{self.name}: {self.label}: backend is closed")
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._to_guest = to_guest
        self._thread = threading.Thread(target=self._run,
                                        name=f"remote-hw {self.name} {self.label}",
                                        daemon=True)
        self._thread.start()

    def from_guest(self, data: bytes) -> None:
        """Write to the far side without blocking; queue the rest (bounded, up to
        OUT_LIMIT). With no far side, keep the last ``hold_limit`` bytes for the next
        one (0: none). Count what is dropped."""
        if not data:
            return
        with self._lock:
            target = self._target()
            if target is None:
                if not self.hold_limit:
                    self.dropped += len(data)
                    return
                self._outbuf += data
                excess = len(self._outbuf) - self.hold_limit
                if excess > 0:
                    self.dropped += excess
                    del self._outbuf[:excess]
                return
            if not self._outbuf:
                try:
                    n = self._write(target, data)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:
                    # The far side is gone; the I/O thread will notice and clean up.
                    self.dropped += len(data)
                    return
                self.bytes_from_guest += n
                if n == len(data):
                    return
                data = data[n:]
            room = OUT_LIMIT - len(self._outbuf)
            if len(data) > room:
                self.dropped += len(data) - room
                data = data[:room]
            self._outbuf += data
        self._wake()   # let the I/O thread wait for the far side to become writable

    def close(self) -> None:
        """Stop the I/O thread, release the far side (``_release_locked``) and close
        the wake-up pipe."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        with self._lock:
            self._release_locked()
            self._close_wake_pipe()

    # -- extras ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the far side (a peer, a port) is there now."""
        return self._target() is not None

    def _queue_status_locked(self) -> dict[str, Any]:
        """The part of ``status()`` every queued backend has (call with the lock)."""
        return {
            "connected": self._target() is not None,
            "queued": len(self._outbuf),
            "bytes_to_guest": self.bytes_to_guest,
            "bytes_from_guest": self.bytes_from_guest,
            "dropped": self.dropped,
        }

    # -- for the I/O thread ------------------------------------------------------------

    def _close_wake_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        with self._lock:
            # Under the lock so a concurrent close() cannot let us write into a
            # recycled descriptor number.
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass    # a wake-up is already pending

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _discard_queue_locked(self) -> None:
        """The far side went away: what is still queued for it is dropped."""
        if self._outbuf:
            self.dropped += len(self._outbuf)
            self._outbuf.clear()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:   # keep the server alive; the backend just stops serving
            self._log.exception("%s backend %s failed", self.name, self.label)

    def _flush(self, target: Any) -> None:
        """Write queued guest output to ``target`` (writable now); on failure, drop it."""
        with self._lock:
            if self._target() != target or not self._outbuf:
                return
            try:
                n = self._write(target, self._outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                err = e
            else:
                self.bytes_from_guest += n
                del self._outbuf[:n]
                return
        self._lost(target, err.strerror or str(err))

    def _deliver(self, data: bytes) -> None:
        """Count ``data`` (non-empty, read from the far side) and pass it to the guest."""
        with self._lock:
            self.bytes_to_guest += len(data)
        to_guest = self._to_guest
        if to_guest is not None:
            try:
                to_guest(data)
            except Exception:
                self._log.exception("%s backend %s: delivering to the guest failed",
                                    self.name, self.label)
