"""What one peer may cost the server, and the gate that admits connections.

A server without limits can be taken down by anyone who can reach its port: a
thousand connections that never say HELLO hold a thread and a descriptor each, and
one client attaching a file-backed device for thousands of VM ids exhausts the
descriptors every other client's attach needs. :class:`Limits` holds the bounds (the
``remote-hw server`` options of the same names) and :class:`ConnectionGate` applies
the two that are decided at ``accept``: connections in total and per peer address.

The others are applied where the resource is spent: the handshake deadline and the
idle timeout by :mod:`.watchdog`, the outbound queue by :mod:`.outbox`, the instance
quota by the controller's attach. Each refusal is one log line (rate-limited where a
peer can repeat it) and, where the protocol allows, an ERROR to the peer that says
which limit and its value.

Refusing costs the server too: an accept, an ERROR, a close, some 30-50 us of CPU
each, taken in bursts on the accept thread while the served connections want the
GIL. :class:`AcceptPacer` bounds it whatever the rate of a flood: a refused
connection is answered at once, but after ``REFUSE_BURST`` refusals within ``PAUSE``
seconds the listener stops accepting until that window ends, and new connections
wait in the kernel's queue. If the server is full, every one of them would be
refused: the queue is shortened to ``PAUSED_BACKLOG`` meanwhile (SYNs beyond it are
dropped by the kernel and retried by the peer's, at no cost to this process). Then
whatever waited is accepted in order: admitted if there is room now, else refused
with the same ERROR, at most ``PAUSE`` s later than without a flood.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: the window of AcceptPacer: accepting pauses until its end after REFUSE_BURST
PAUSE = 0.1
#: refusals answered at once within PAUSE seconds (320 a second at most)
REFUSE_BURST = 32
#: the listen backlog while paused with the server full (the usual one is BACKLOG)
PAUSED_BACKLOG = 16
BACKLOG = 128
#: How long a forwarded access waits for the device's server (``--forward-timeout``):
#: below the clients' default ``--timeout`` (5 s), so that a device server that is cut
#: off answers the client UNREACHABLE (a removed device) before the client gives up on
#: the entry server itself and reconnects to it.
FORWARD_TIMEOUT = 4.0


@dataclass(frozen=True)
class Limits:
    """Bounds on what connections may hold. The defaults suit a server with the
    usual 1024 descriptors: connections plus file-backed instances stay below it."""

    #: connections open at once, handshake or not (``--max-connections``)
    max_connections: int = 512
    #: connections open at once from one peer address (``--max-per-peer``)
    max_per_peer: int = 64
    #: seconds from accept to HELLO (TLS handshake included) (``--handshake-timeout``)
    handshake_timeout: float = 10.0
    #: seconds with nothing received, PINGs included, before a connection is closed;
    #: PINGs go out after a third and two thirds of it (``--idle-timeout``)
    idle_timeout: float = 60.0
    #: seconds frames may wait for a peer with none of them taken before the
    #: connection is closed (``--send-timeout``)
    send_timeout: float = 30.0
    #: device attachments one client id may hold (``--max-instances-per-client``)
    max_instances_per_client: int = 256
    #: bytes queued for a connection that does not read them before it is dropped
    #: (``--max-queue``)
    max_queue: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_per_peer", "max_instances_per_client",
                     "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("handshake_timeout", "idle_timeout", "send_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be above 0 seconds")


class ConnectionGate:
    """Counts open connections, in total and per peer address, and refuses beyond the
    limits. ``admit`` and ``release`` pair up; a released address with no connection
    left is forgotten, so the table never outgrows the connections themselves."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._total = 0
        self._per_peer: dict[str, int] = {}

    def admit(self, host: str) -> str | None:
        """Count a new connection from ``host``; None when admitted, else why not (the
        text of the ERROR and of the log line)."""
        lim = self.limits
        with self._lock:
            if self._total >= lim.max_connections:
                return (f"server full: {self._total} connections open "
                        f"(--max-connections {lim.max_connections})")
            n = self._per_peer.get(host, 0)
            if n >= lim.max_per_peer:
                return (f"too many connections from {host}: {n} open "
                        f"(--max-per-peer {lim.max_per_peer})")
            self._per_peer[host] = n + 1
            self._total += 1
        return None

    def release(self, host: str) -> None:
        """A connection admitted from ``host`` closed."""
        with self._lock:
            n = self._per_peer.get(host, 0) - 1
            if n > 0:
                self._per_peer[host] = n
            else:
                self._per_peer.pop(host, None)
            self._total = max(0, self._total - 1)

    @property
    def full(self) -> bool:
        """``--max-connections`` connections are open: any new one would be refused."""
        return self._total >= self.limits.max_connections

    @property
    def total(self) -> int:
        return self._total


class AcceptPacer:
    """Counts refusals per window of ``pause`` seconds, for the accept loop (the
    module docstring says why it pauses): a steady trickle below ``burst`` per
    window never pauses anything, and a flood is answered ``burst`` connections per
    window at most."""

    def __init__(self, *, burst: int = REFUSE_BURST, pause: float = PAUSE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.pause = pause
        self._clock = clock
        self._window = -pause
        self._count = 0
        #: pauses so far (status, tests)
        self.pauses = 0

    def refused(self) -> bool:
        """Count one refused connection; True if this window's burst is used up
        (accepting should pause until the window ends)."""
        now = self._clock()
        if now - self._window >= self.pause:
            self._window, self._count = now, 0
        self._count += 1
        return self._count >= self.burst

    def pause_until(self) -> float:
        """When a pause starting now ends (the clock's time): the end of the
        current window, or ``pause`` from now if the window is over."""
        self.pauses += 1
        now = self._clock()
        end = self._window + self.pause
        return end if end > now else now + self.pause


class QuotaExceeded(Exception):
    """An attach would take a client past ``--max-instances-per-client``; the text
    names the client, the quota and what to do."""
