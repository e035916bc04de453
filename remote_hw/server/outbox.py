"""A session's bounded outbound queue and the thread that writes it.

Why: interrupts and events are raised wherever a device's state changes, which is
often on *another* connection's thread or a backend's, and with the instance's lock
held (a shared UART raises its interrupt while the writer's access holds the lock).
Sending them there meant that one client that stopped reading blocked that thread in
``send`` with the lock held: every other client of the device, and every ATTACH
(which takes the registry lock and then the instance's), waited for the slow client.

So frames for a session that arise on other threads are only *queued* here (a deque
append under a lock that is never held across I/O), and the session's own writer
thread, started on first use, sends them. A client that does not read lets its queue
grow to ``limit`` bytes; the next frame past that calls ``on_overflow`` once (the
session logs the reason and closes the connection) and the queue takes nothing
more. Nobody but the slow client's own writer ever waits for its socket.

A session's own replies (the feedback of its own access, with the interrupts that
access raised) are still written by its connection thread directly: that thread
has nothing else to do, and a thread hop there would cost every access a wake-up.
The frames its access raises are queued here too, without waking the writer
(``put(..., wake=False)``), so they keep their place among frames other threads
raise meanwhile: a shadow or an interrupt level raised by a backend just after the
access must not arrive before the older one the access raised.
Order still holds: frames queued before an access are on the wire before its
feedback. The writer thread takes frames out of the queue only while it holds the
session's write lock, and a direct writer that finds frames queued (``queued``)
sends them first, in the same write, under that lock (``take``). So an interrupt that
a backend raised before the guest's next access never arrives after that access's
answer, as it could not on the real bus.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger("remote_hw.server")


class Outbox:
    """Frames waiting for one connection, written in order by one writer thread.

    ``write(data)`` sends bytes on the connection; the outbox calls it holding
    ``wlock``, the session's write lock (it may block while the peer does not read).
    ``on_overflow(text)`` is called once, without any lock of this object held, when
    the queue would exceed ``limit`` bytes.
    """

    def __init__(self, write: Callable[[bytes], None], wlock: threading.Lock, limit: int,
                 name: str, on_overflow: Callable[[str], None]) -> None:
        self._write = write
        self._wlock = wlock
        self.limit = limit
        self.name = name
        self._on_overflow = on_overflow
        self._cond = threading.Condition(threading.Lock())
        self._frames: deque[bytes] = deque()
        self._queued = 0          # bytes queued or handed to a write still in progress
        self._closed = False
        self._thread: threading.Thread | None = None
        self.sent_frames = 0
        self.dropped_frames = 0

    @property
    def queued(self) -> int:
        """Bytes not yet written (a write in progress counts until it returns)."""
        return self._queued

    def put(self, frame: bytes, wake: bool = True) -> bool:
        """Queue ``frame``; never blocks on the network. False when it was dropped
        (the outbox is closed, or this frame overflowed it). ``wake=False``: the
        caller writes the queue itself right after (``take``), so the writer thread
        is not woken for it."""
        with self._cond:
            if self._closed:
                self.dropped_frames += 1
                return False
            queued = self._queued
            if queued + len(frame) <= self.limit:
                self._frames.append(frame)
                self._queued = queued + len(frame)
                if not wake:
                    return True
                if self._thread is not None:
                    self._cond.notify()
                    return True
                try:
                    thread = threading.Thread(target=self._run, name=f"out-{self.name}",
                                              daemon=True)
                    thread.start()
                    self._thread = thread
                    return True
                except RuntimeError as e:   # the machine's thread limit
                    why = f"no thread to write to it: {e}"
            else:
                why = (f"it does not read what the server sends: {queued} bytes queued, "
                       f"the limit is {self.limit} (--max-queue)")
            # This peer cannot be served: nothing more is queued for it.
            self._closed = True
            self.dropped_frames += 1 + len(self._frames)
            self._frames.clear()
            self._cond.notify()
        self._on_overflow(why)
        return False

    def take(self) -> bytes:
        """Everything queued, removed from the queue; call only holding the session's
        write lock and write the result at once, before anything else."""
        with self._cond:
            frames = self._frames
            if not frames:
                return b""
            data = b"".join(frames)
            self.sent_frames += len(frames)
            frames.clear()
            self._queued -= len(data)
            return data

    def close(self) -> None:
        """Drop what is queued and let the writer thread end."""
        with self._cond:
            self._closed = True
            self._frames.clear()
            self._cond.notify()

    def _run(self) -> None:
        cond, frames = self._cond, self._frames
        while True:
            with cond:
                while not frames and not self._closed:
                    cond.wait()
                if self._closed:
                    return
            # Frames leave the queue only under the write lock (see the module
            # docstring): a direct writer may have taken them meanwhile.
            with self._wlock:
                with cond:
                    if not frames:
                        continue
                    batch = b"".join(frames) if len(frames) > 1 else frames[0]
                    n = len(frames)
                    frames.clear()
                try:
                    self._write(batch)
                except OSError as e:
                    log.debug("%s: queued frames not sent: %s", self.name, e)
                    self.close()
                    return
                finally:
                    with cond:
                        self._queued -= len(batch)
                        self.sent_frames += n
