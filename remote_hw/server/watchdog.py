"""Deadlines on connections: the handshake deadline, keep-alive PINGs, the idle timeout.

Why a separate thread rather than socket timeouts in each connection thread: the
connection thread blocks in ``recv`` (or in the C fast path's ``recv``) with no
timeout, so an access costs no ``poll`` and no timer; and a connection stuck in a
TLS handshake or in a ``send`` to a peer that stopped reading has no reader to time
out at all. One thread looks at every connection a few times a second instead and
ends the ones past a deadline by shutting their socket down, which wakes whatever
call is blocked on it.

What it checks, per connection (:class:`Watched`):

* not through the handshake ``handshake_timeout`` seconds after accept: closed
  (a connection that never sends HELLO holds a thread and a descriptor otherwise);
* through it, and nothing received for a third of ``idle_timeout``: a PING is queued
  (again at two thirds); nothing at all, not even the PONG, for ``idle_timeout``:
  closed. A client's link answers PINGs from its background reader, so an idle but
  live VM is never dropped; a peer that stopped reading stops reading PINGs too, and
  one whose connection thread is blocked writing to it makes no progress either;
* through it, frames waiting for the peer and no write completing for
  ``send_timeout``: closed. A peer that stops reading while it still sends requests
  (or one that only receives interrupts) moves ``rx`` but not this clock; its
  outbound queue stops growing once it is behind (interrupt levels are held, see
  outbox.py), so without this it would hold its session for good.

If this process itself was stopped (SIGSTOP, a debugger) or starved, the gap between
two checks shows it, and every deadline restarts: the peers' bytes sent meanwhile
are still unread, so they are not late.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from remote_hw.server.limits import Limits

log = logging.getLogger("remote_hw.server")


class Watched(Protocol):
    """What the watchdog needs of a connection."""

    peer: str
    #: monotonic time of accept
    accepted_at: float

    @property
    def ready(self) -> bool:
        """Through the handshake (WELCOME sent)."""

    @property
    def rx(self) -> int:
        """A counter that moves whenever bytes arrive from the peer."""

    def ping(self, nonce: int) -> None:
        """Queue a PING (never blocks)."""

    def stalled(self, now: float) -> float:
        """Seconds frames for the peer have waited with no write completing."""

    def abort(self, why: str) -> None:
        """Log ``why`` once, tell the peer where the protocol allows, close."""


@dataclass
class _State:
    #: when the handshake clock started (accept, or the end of a pause)
    start: float
    rx: int = -1
    since: float = 0.0
    pings: int = 0
    #: the end of this process's last pause: no send stall is counted from before it
    resumed: float = float("-inf")

#: A gap between two checks longer than this many ticks means this process was
#: stopped (SIGSTOP) or starved, not that every peer fell silent: deadlines restart.
_PAUSED_TICKS = 5
#: Closing a connection costs ~30 us with the GIL held; connections opened together
#: (a crowd of idle ones) reach their deadline together. Every this many closes the
#: watchdog lets other threads run (sleep(0)), so a served client's access waits for
#: at most that many, not for the whole crowd (bench/load.py's p99).
YIELD_EVERY = 16


class Watchdog:
    """One thread checking every watched connection's deadlines (module docstring)."""

    def __init__(self, limits: Limits, *, tick: float | None = None,
                 on_tick: Callable[[], None] | None = None) -> None:
        self.limits = limits
        shortest = min(limits.handshake_timeout, limits.idle_timeout / 3)
        self.tick = tick if tick is not None else min(1.0, max(0.05, shortest / 5))
        self._on_tick = on_tick
        self._lock = threading.Lock()
        self._watched: dict[Watched, _State] = {}
        self._nonces = itertools.count(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_check: float | None = None

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()
        return self

    def watch(self, conn: Watched) -> None:
        with self._lock:
            self._watched[conn] = _State(start=conn.accepted_at)

    def forget(self, conn: Watched) -> None:
        with self._lock:
            self._watched.pop(conn, None)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.check(time.monotonic())
                if self._on_tick is not None:
                    self._on_tick()
            except Exception:  # the watchdog must outlive any one connection's bug
                log.exception("watchdog check failed")

    def check(self, now: float) -> None:
        """One pass over every connection (the thread calls it each tick)."""
        lim = self.limits
        idle = lim.idle_timeout
        paused = self._last_check is not None and \
            now - self._last_check > _PAUSED_TICKS * self.tick
        self._last_check = now
        with self._lock:
            items = list(self._watched.items())
        closed = 0
        for conn, st in items:
            if closed >= YIELD_EVERY:
                closed = 0
                time.sleep(0)   # let served connections run (see YIELD_EVERY)
            if paused:
                # The server itself was stopped: what peers sent meanwhile is still
                # unread, so nobody is late because of it.
                st.start = st.since = st.resumed = now
            if not conn.ready:
                late = now - max(conn.accepted_at, st.start)
                if late >= lim.handshake_timeout:
                    self.forget(conn)
                    conn.abort(f"no HELLO within {lim.handshake_timeout:g} s of connecting "
                               f"(--handshake-timeout)")
                    closed += 1
                continue
            stalled = min(conn.stalled(now), now - st.resumed)
            if stalled >= lim.send_timeout:
                self.forget(conn)
                conn.abort(f"it does not read what the server sends: nothing taken for "
                           f"{stalled:.0f} s while frames wait (--send-timeout "
                           f"{lim.send_timeout:g})")
                continue
            rx = conn.rx
            if rx != st.rx:
                st.rx, st.since, st.pings = rx, now, 0
                continue
            silent = now - st.since
            if silent >= idle:
                self.forget(conn)
                conn.abort(f"nothing received for {silent:.0f} s, not even an answer to "
                           f"{st.pings} PING(s) (--idle-timeout {idle:g})")
            elif silent >= idle * (st.pings + 1) / 3 and st.pings < 2:
                st.pings += 1
                conn.ping(next(self._nonces))
