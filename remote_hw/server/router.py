"""Where a request goes: a device held here (the controller) or one held elsewhere
(the forwarder), and which session an interrupt relayed back belongs to.

The router also numbers this server's clients: every connection, and every client a
peer server speaks for, gets a local client id here together with the sink that
takes its interrupts and events. Relayed interrupts (from a forwarded device) find
their session through that table.
"""

from __future__ import annotations

import itertools
import logging
import threading

from remote_hw.net.security import TlsConfig
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import Status
from remote_hw.server.controller import Controller, SessionSink
from remote_hw.server.directory import Directory
from remote_hw.server.forward import MAX_HOPS, Forwarder
from remote_hw.server.resume import ResumeTable

log = logging.getLogger("remote_hw.server")


class Router:
    """Local or forwarded: attach, access, detach; and the local client table."""

    def __init__(self, controller: Controller, directory: Directory, *,
                 tls: TlsConfig | None, forward_timeout: float) -> None:
        self.controller = controller
        self.server_id = controller.server_id
        self.directory = directory
        self.forwarder = Forwarder(self.server_id, directory, tls=tls,
                                   timeout=forward_timeout,
                                   relay_interrupt=self._relay_interrupt,
                                   relay_event=self._relay_event,
                                   relay_shadow=self._relay_shadow,
                                   relay_post_failed=self._relay_post_failed)
        self._clients: dict[int, SessionSink] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # Sessions that outlive their connection for a grace period (resume.py).
        self.resumes = ResumeTable(self._release)

    # -- the local client table ------------------------------------------------------

    def add_client(self, sink: SessionSink) -> int:
        """A new local client id (this server's own numbering, one per connection or
        origin client), whose relayed interrupts and events go to ``sink``."""
        with self._lock:
            client_id = next(self._ids)
            self._clients[client_id] = sink
        return client_id

    def client_sink(self, client_id: int) -> SessionSink | None:
        return self._clients.get(client_id)

    def remove_client(self, client_id: int) -> None:
        with self._lock:
            self._clients.pop(client_id, None)

    def _release(self, client_id: int) -> None:
        """A parked session nobody resumed: its devices go, as on a disconnect."""
        self.detach(client_id)
        self.remove_client(client_id)

    # -- attach / detach / forward ---------------------------------------------------

    def attach(self, client_id: int, vm_id: int, device: str, server_id: str,
               sink: SessionSink, origin: str = "") -> Status:
        """Attach here or along a route. ``origin`` is the client's authenticated name,
        passed to the device's server so that its own ``--allow`` applies."""
        if (not server_id or server_id == self.server_id) and device in self.controller.registry:
            return self.controller.attach(client_id, vm_id, device, sink)
        if server_id == self.server_id:
            return Status.UNKNOWN_DEVICE
        target = self.forwarder.resolve(device, server_id)
        if target is None:
            return Status.UNKNOWN_DEVICE
        if target == self.server_id:
            return Status.UNKNOWN_DEVICE  # the directory says here, but it is not here
        return self.forwarder.attach(client_id, vm_id, device, target, origin=origin)

    def forward_io(self, client_id: int, vm_id: int, device: str, server_id: str, kind: int,
                   offset: int, size: int, direction: int, data: int,
                   hops: int) -> tuple[int, int]:
        """An access for a device that is not here: along its route, or a clear status."""
        if hops >= MAX_HOPS:
            return Status.HOP_LIMIT, 0
        status, value = self.forwarder.io(client_id, vm_id, device, kind, offset, size,
                                          direction, data, hops,
                                          "" if server_id == self.server_id else server_id)
        if status == Status.NOT_ATTACHED:
            # Say why more precisely than "not attached" where we can.
            if server_id and server_id != self.server_id and \
                    self.directory.address(server_id) is None:
                status = Status.UNKNOWN_SERVER
            elif server_id == self.server_id or self.forwarder.resolve(device, "") is None:
                status = Status.UNKNOWN_DEVICE
        return status, value

    def forward_post(self, client_id: int, vm_id: int, device: str, server_id: str,
                     kind: int, offset: int, size: int, data: int, hops: int,
                     rid: int) -> int:
        """A posted write for a device that is not here: sent on along its route
        without waiting; a status (OK once on its way)."""
        if hops >= MAX_HOPS:
            return Status.HOP_LIMIT
        status = self.forwarder.post(client_id, vm_id, device, kind, offset, size, data,
                                     hops, "" if server_id == self.server_id else server_id,
                                     rid)
        if status == Status.NOT_ATTACHED and self.forwarder.resolve(device, "") is None:
            status = Status.UNKNOWN_DEVICE
        return status

    def detach(self, client_id: int, vm_id: int | None = None) -> None:
        self.controller.detach(client_id, vm_id)
        self.forwarder.detach(client_id, vm_id)

    # -- what forwarded devices send back ---------------------------------------------

    def _relay_interrupt(self, client_id: int, vm_id: int, device: str, line: int,
                         level: bool) -> None:
        sink = self._clients.get(client_id)
        if sink is None:
            log.debug("interrupt for client %d that is gone; dropped", client_id)
            return
        sink.interrupt(vm_id, device, line, level)

    def _relay_event(self, client_id: int, vm_id: int, device: str, name: str) -> None:
        sink = self._clients.get(client_id)
        if sink is not None:
            sink.event(vm_id, device, name)

    def _relay_shadow(self, client_id: int, msg: m.Shadow) -> None:
        sink = self._clients.get(client_id)
        relay = getattr(sink, "forwarded_shadow", None)
        if relay is not None:
            relay(msg)

    def _relay_post_failed(self, client_id: int, vm_id: int, rid: int, status: int) -> None:
        sink = self._clients.get(client_id)
        relay = getattr(sink, "forwarded_post_failed", None)
        if relay is not None:
            relay(vm_id, rid, status)

    def close(self) -> None:
        self.resumes.close()
        self.forwarder.close()
