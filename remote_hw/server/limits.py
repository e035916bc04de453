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
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


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
        for name in ("handshake_timeout", "idle_timeout"):
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
    def total(self) -> int:
        return self._total


class QuotaExceeded(Exception):
    """An attach would take a client past ``--max-instances-per-client``; the text
    names the client, the quota and what to do."""
