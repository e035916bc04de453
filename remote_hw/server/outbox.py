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

**A peer that falls behind.** Interrupt levels are the bulk of what a busy device
sends (a shared UART's line toggled 100 times a second, fanned out to a client's 100
VMs, is 20 000 frames a second). Once more than ``behind`` bytes wait, here or in
the kernel's send queue (``unsent()``: bytes the peer's window has not let the kernel
send, ``SIOCOUTQNSD``), a new level is not encoded at all: the outbox keeps only the
newest level per line (``hold_level``), at the cost of a dict store. The kernel's
queue matters most: it grows to megabytes (TCP autotuning) before a write blocks,
and a peer that never reads would otherwise cost the server ~140 000 encoded frames
before anything here noticed. When both queues have drained to half of ``behind``
(the writer thread looks every ``_RECHECK`` s while levels are held), or before any
other frame is queued (so order holds), each held line goes out as one frame with its
newest level; a line that changed and came back to the level the peer last had goes
out as a pulse (the other level, then that one), so an edge the guest's interrupt
controller would have seen is still seen. A peer that is merely slow thus gets the
current state, not a backlog of stale edges.

A peer that takes nothing at all is still ended: :meth:`stalled` says how long
frames have waited (queued or held) with no progress (a write completing, the
kernel's queue shrinking), and the watchdog closes the connection past
``--send-timeout``. Writes are cut into pieces of at most ``_PIECE`` bytes, so a
slow but moving link completes one often enough not to look stalled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger("remote_hw.server")

#: the most one write of the writer thread takes from the queue (see the docstring)
_PIECE = 64 * 1024
#: ``behind`` by default: levels are held once this many bytes wait (or limit/4)
BEHIND = 64 * 1024
#: seconds between looks at the kernel's queue while levels are held
_RECHECK = 0.02


class Outbox:
    """Frames waiting for one connection, written in order by one writer thread.

    ``write(data)`` sends bytes on the connection; the outbox calls it holding
    ``wlock``, the session's write lock (it may block while the peer does not read).
    ``on_overflow(text)`` is called once, without any lock of this object held, when
    the queue would exceed ``limit`` bytes. ``encode_level(key, level)`` makes the
    frame of a held interrupt level (``hold_level``); without it nothing is held.
    ``unsent()`` is how many bytes the kernel still holds for the peer (0 if unknown).
    """

    def __init__(self, write: Callable[[bytes], None], wlock: threading.Lock, limit: int,
                 name: str, on_overflow: Callable[[str], None],
                 encode_level: Callable[[Hashable, bool], bytes] | None = None,
                 behind: int | None = None,
                 unsent: Callable[[], int] | None = None) -> None:
        self._write = write
        self._wlock = wlock
        self.limit = limit
        self.name = name
        self._on_overflow = on_overflow
        self._encode_level = encode_level
        self._unsent = unsent
        self._kernel = 0          # unsent() after the writer's last look
        self.behind = behind if behind is not None else min(BEHIND, max(1, limit // 4))
        self._cond = threading.Condition(threading.Lock())
        self._frames: deque[bytes] = deque()
        self._queued = 0          # bytes queued or handed to a write still in progress
        # held lines: key -> [level the peer last had, newest level, changes since]
        self._held: dict[Hashable, list[Any]] = {}
        self._closed = False
        self._thread: threading.Thread | None = None
        # When the queue last moved: it became non-empty, or a write completed.
        self._progress = time.monotonic()
        self.sent_frames = 0
        self.dropped_frames = 0
        #: levels that were held and never became a frame of their own
        self.coalesced = 0

    @property
    def queued(self) -> int:
        """Bytes not yet written (a write in progress counts until it returns)."""
        return self._queued

    def stalled(self, now: float) -> float:
        """Seconds frames have waited, queued or held, with no progress (0 when none
        wait)."""
        return now - self._progress if self._queued or self._held else 0.0

    def _measure(self) -> int:
        if self._unsent is None:
            return 0
        try:
            return self._unsent()
        except OSError:
            return 0

    def hold_level(self, key: Hashable, level: bool) -> bool:
        """Hold ``level`` for the line ``key`` instead of queueing a frame, if the peer
        is behind (more than ``behind`` bytes wait). False: it is not behind, and the
        caller queues the frame as usual (``put``)."""
        # The common case, a peer that keeps up, without the lock: a stale read only
        # queues one frame more, or is looked at again under the lock below.
        if self._queued + self._kernel <= self.behind and not self._closed:
            return False
        with self._cond:
            if self._closed:
                self.dropped_frames += 1
                return True
            if self._queued + self._kernel <= self.behind or self._encode_level is None:
                return False
            held = self._held.get(key)
            if held is None:
                if not self._held:
                    # Holding starts. The kernel's figure is the writer's last look,
                    # maybe long ago: look again before holding on its word.
                    if self._queued <= self.behind:
                        self._kernel = self._measure()
                        if self._queued + self._kernel <= self.behind:
                            return False
                    if not self._queued:   # the stall clock starts now
                        self._progress = time.monotonic()
                    self._cond.notify()    # the writer, idle, must start looking (_run)
                # Only changes travel, so the peer last had the other level.
                self._held[key] = [not level, level, 1]
            else:
                held[1] = level
                held[2] += 1
            return True

    def _release_held(self) -> None:
        """Queue a frame per held line (called holding ``_cond``; see the docstring)."""
        encode = self._encode_level
        held, self._held = self._held, {}
        assert encode is not None
        for key, (known, newest, changes) in held.items():
            levels = (newest,) if newest != known else (not newest, newest) if changes > 1 else ()
            self.coalesced += changes - len(levels)
            for level in levels:
                try:
                    frame = encode(key, level)
                except Exception as e:   # the connection ended meanwhile
                    log.debug("%s: held level not sent: %s", self.name, e)
                    continue
                self._frames.append(frame)
                self._queued += len(frame)

    def put(self, frame: bytes, wake: bool = True) -> bool:
        """Queue ``frame``; never blocks on the network. False when it was dropped
        (the outbox is closed, or this frame overflowed it). ``wake=False``: the
        caller writes the queue itself right after (``take``), so the writer thread
        is not woken for it."""
        with self._cond:
            if self._closed:
                self.dropped_frames += 1
                return False
            if self._held:   # held levels were raised first: they go first
                self._release_held()
            queued = self._queued
            if queued + len(frame) <= self.limit:
                if not queued:
                    self._progress = time.monotonic()
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
            self._held.clear()
            self._cond.notify()
        self._on_overflow(why)
        return False

    def take(self) -> bytes:
        """Everything queued, removed from the queue; call only holding the session's
        write lock and write the result at once, before anything else."""
        with self._cond:
            if self._held:
                self._release_held()
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
            self._held.clear()
            self._cond.notify()

    def _run(self) -> None:
        cond, frames = self._cond, self._frames
        while True:
            with cond:
                while not frames and not self._closed:
                    if not self._held:
                        cond.wait()
                        continue
                    # Levels are held: see whether the peer has taken enough.
                    cond.wait(_RECHECK)
                    if self._held and not frames:
                        kernel = self._measure()
                        if kernel < self._kernel:
                            self._progress = time.monotonic()
                        self._kernel = kernel
                        if self._queued + kernel <= self.behind // 2:
                            self._release_held()
                if self._closed:
                    return
            # Frames leave the queue only under the write lock (see the module
            # docstring): a direct writer may have taken them meanwhile.
            with self._wlock:
                with cond:
                    if not frames:
                        continue
                    if len(frames) == 1:
                        batch, n = frames.popleft(), 1
                    else:   # at most _PIECE bytes (one frame at least)
                        take = [frames.popleft()]
                        size = len(take[0])
                        while frames and size + len(frames[0]) <= _PIECE:
                            size += len(frames[0])
                            take.append(frames.popleft())
                        batch, n = b"".join(take), len(take)
                try:
                    self._write(batch)
                except OSError as e:
                    log.debug("%s: queued frames not sent: %s", self.name, e)
                    self.close()
                    return
                finally:
                    kernel = self._measure()
                    with cond:
                        self._queued -= len(batch)
                        self.sent_frames += n
                        self._progress = time.monotonic()
                        self._kernel = kernel
                        if self._held and self._queued + kernel <= self.behind // 2:
                            self._release_held()
