"""Forwarding: an entry server relays requests for devices that live elsewhere.

The entry server keeps no state of another server's devices. It remembers only the
*route* of each attached (client, VM, device): which server holds it. Requests are
sent there over a server-to-server link (a :class:`ServerLink` in the PEER role, with
the server's own certificate), carrying the original client's id so the device's
server can keep that client's instances apart and tag interrupts with it. Before the
first ATTACH for a client on a device server, that client's authenticated name goes
there too (ORIGIN): the device's server applies its own ``--allow`` to it, so a list
on the device's server holds whichever server a client enters by. Feedback returns on
the same call; interrupts and events come back on the peer link and are handed to the
session of the client they name.

Posted writes (docs/protocol.md, POSTED) pass through too: a client's POST is sent on
along its route without waiting, under a request id of the peer link, remembered for
a while so that a failure the device's server reports goes back to the client under
the client's own id; the device's SHADOWs for the client come back on the peer link
and are handed to the client's session like its interrupts. An entry server keeps no
shadow of its own, but it keeps the client's *count* right: SHADOW's ``applied`` is
the device server's count of the client's POSTs it processed, and the client takes
its credits back by it. A POST the entry refuses (its link down) never reaches the
device server, and a device server that restarted counts from 0 again; either way
the client, which counts every POST it sent, would wait for credits that never come
and stop posting. So the entry counts the POSTs of each route and adds to the
relayed ``applied`` those the device server cannot know of (``_PostCount``).

A link to a device server is resumable, as an agent's is (``reconnect=True``,
net/recovery.py; the device's server parks the link's session with every client it
speaks for, resume.py). When it breaks (a partition between the servers, the device
server stopped and continued), the link reconnects by itself with back-off, asking
the directory where the server is now, and takes its session back: the devices are
as the guests left them, and a write in flight is retried under its request id and
applied once. When the device server has restarted (or the grace period ran out), the
link names its clients again (ORIGIN) and re-attaches their devices, which start
from power-on state. Meanwhile accesses fail at once with UNREACHABLE (the VM sees a
removed device) and never wait for the recovery. A device the directory now places
on *another* server is followed there at the next access (at most once a second).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from remote_hw.net.link import LinkError, ServerLink
from remote_hw.net.security import TlsConfig
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import FEATURE_ORIGIN, Role, Status
from remote_hw.server.directory import Directory

log = logging.getLogger("remote_hw.forward")

# A request may cross at most this many servers: enough for entry -> owner -> moved
# owner, and a loop in stale directories ends quickly instead of circling.
MAX_HOPS = 3
RETRY_INTERVAL = 1.0

#: How many forwarded POSTs are remembered for their failure reports: more than a
#: client's window of unacknowledged POSTs, so a failure always finds its client.
POST_MEMORY = 8192

RouteKey = tuple[int, int, str]  # (client id on this server, vm id, device)
_U32 = 0xFFFF_FFFF


class _PostCount:
    """One route's POSTs as the entry saw them (see the module docstring)."""

    __slots__ = ("total", "base")

    def __init__(self) -> None:
        self.total = 0  # every POST of the route that reached this server
        self.base = 0   # of those, the ones the device server's count does not include
Relay = Callable[[int, int, str, int, bool], None]  # client, vm, device, line, level
EventRelay = Callable[[int, int, str, str], None]  # client, vm, device, event name
ShadowRelay = Callable[[int, m.Shadow], None]  # client, the device server's SHADOW
FailureRelay = Callable[[int, int, int, int], None]  # client, vm, request id, status


class Forwarder:
    """Routes of forwarded devices and the links to the servers that hold them."""

    def __init__(self, server_id: str, directory: Directory, *, tls: TlsConfig | None,
                 timeout: float, relay_interrupt: Relay, relay_event: EventRelay,
                 relay_shadow: ShadowRelay | None = None,
                 relay_post_failed: FailureRelay | None = None) -> None:
        self.server_id = server_id
        self.directory = directory
        self.tls = tls
        self.timeout = timeout
        self.relay_interrupt = relay_interrupt
        self.relay_event = relay_event
        self.relay_shadow = relay_shadow
        self.relay_post_failed = relay_post_failed
        # peer link's request id of a forwarded POST -> (client here, its request id)
        self._posts: dict[int, tuple[int, int]] = {}
        self._post_order: deque[int] = deque()
        self._posts_lock = threading.Lock()
        self._lock = threading.Lock()
        self._links: dict[str, ServerLink] = {}
        self._next_try: dict[str, float] = {}
        self.routes: dict[RouteKey, str] = {}
        self._attached_on: dict[RouteKey, ServerLink] = {}
        # client id here -> its authenticated name, told to device servers (ORIGIN),
        # and the links that were told already.
        self._origins: dict[int, str] = {}
        self._told: dict[tuple[int, str], ServerLink] = {}
        self._counts: dict[RouteKey, _PostCount] = {}

    # -- links ---------------------------------------------------------------------

    def _link(self, target: str) -> ServerLink | None:
        """A live link to ``target``, connecting (rate-limited) when there is none."""
        link = self._links.get(target)
        if link is not None and link.up:
            return link
        with self._lock:
            link = self._links.get(target)
            if link is not None:
                # Up, or its recovery is bringing it back: accesses fail at once
                # meanwhile (they never wait for a reconnect).
                return link if link.up else None
            now = time.monotonic()
            if now < self._next_try.get(target, 0.0):
                return None
            self._next_try[target] = now + RETRY_INTERVAL
            address = self.directory.address(target)
            if address is None:
                log.warning("server %s is not in the directory", target)
                return None
            link = ServerLink(target, address, client_name=self.server_id,
                              timeout=self.timeout, tls=self.tls, role=Role.PEER,
                              reconnect=True,
                              on_interrupt=self._on_interrupt, on_event=self._on_event,
                              on_shadow=self._on_shadow, on_post_failed=self._on_post_failed)
            link.expect_name = target if self.tls is not None else None
            link.locate = lambda: self.directory.address(target)
            link.on_new_session = self._counts_restart
            try:
                link.connect(min(self.timeout, 5.0))
            except LinkError as e:
                log.warning("cannot reach server %s: %s", target, e)
                link.close()
                return None
            self._links[target] = link
            log.info("linked to server %s at %s:%d", target, *address)
            return link

    def _on_interrupt(self, vm_id: int, device: str, line: int, level: bool,
                      client_id: int) -> None:
        self.relay_interrupt(client_id, vm_id, device, line, level)

    def _on_event(self, vm_id: int, device: str, name: str, client_id: int) -> None:
        self.relay_event(client_id, vm_id, device, name)

    def _on_shadow(self, msg: m.Shadow) -> None:
        if self.relay_shadow is not None:
            count = self._counts.get((msg.client_id, msg.vm_id, msg.device_id))
            if count is not None and count.base:
                msg = dataclasses.replace(msg, applied=(msg.applied + count.base) & _U32)
            self.relay_shadow(msg.client_id, msg)

    def _counts_restart(self, link: ServerLink) -> None:
        """``link`` has a new session (its server restarted, or forgot it): the device
        server counts the routes' POSTs from 0 again, from here on."""
        for key, on in list(self._attached_on.items()):
            count = self._counts.get(key)
            if on is link and count is not None:
                count.base = count.total

    def _on_post_failed(self, rid: int, vm_id: int, status: int) -> None:
        with self._posts_lock:
            who = self._posts.pop(rid, None)
        if who is None:
            log.warning("a forwarded posted write of vm %d failed (%s), for a client no "
                        "longer known", vm_id, status)
        elif self.relay_post_failed is not None:
            self.relay_post_failed(who[0], vm_id, who[1], status)

    # -- requests --------------------------------------------------------------------

    def resolve(self, device: str, explicit: str) -> str | None:
        """The server to send ``device`` to: the one named, or the directory's."""
        if explicit:
            return explicit
        return self.directory.lookup(device)

    def attach(self, client_id: int, vm_id: int, device: str, target: str,
               hops: int = 0, origin: str = "") -> Status:
        """Attach on ``target`` for ``client_id``, whose authenticated name ``origin``
        the device's server gets first, so its own ``--allow`` applies to it."""
        if hops >= MAX_HOPS:
            return Status.HOP_LIMIT
        if self.directory.address(target) is None:
            return Status.UNKNOWN_SERVER
        link = self._link(target)
        if link is None:
            return Status.UNREACHABLE
        if origin:
            self._origins[client_id] = origin
        status = self._tell_origin(link, client_id, target)
        if status == Status.OK:
            status = Status(link.attach(vm_id, device, server_id=target,
                                        client_id=client_id))
        if status == Status.OK:
            key = (client_id, vm_id, device)
            self.routes[key] = target
            self._attached_on[key] = link
            self._counts[key] = _PostCount()  # a new attachment counts from 0 on both ends
        return status

    def io(self, client_id: int, vm_id: int, device: str, kind: int, offset: int, size: int,
           direction: int, data: int, hops: int, explicit: str = "") -> tuple[int, int]:
        """Forward one access along its route; (status, value).

        ``explicit`` is the server the request names, if any: it must be the route's.
        """
        key = (client_id, vm_id, device)
        target = self.routes.get(key)
        if explicit and explicit != target:
            known = self.directory.address(explicit) is not None
            return (Status.NOT_ATTACHED if known else Status.UNKNOWN_SERVER), 0
        if target is None:
            return Status.NOT_ATTACHED, 0
        if hops >= MAX_HOPS:
            return Status.HOP_LIMIT, 0
        link = self._attached_on.get(key)
        if link is None or not link.up:
            link = self._reattach(key)
            if link is None:
                return Status.UNREACHABLE, 0
            target = self.routes[key]   # it may have moved: name where it is now
        return link.io(vm_id, device, kind, offset, size, direction, data, server_id=target,
                       client_id=client_id, hops=hops + 1)

    def post(self, client_id: int, vm_id: int, device: str, kind: int, offset: int,
             size: int, data: int, hops: int, explicit: str, rid: int) -> int:
        """Pass a client's POST (its request id ``rid``) on along its route without
        waiting; a status: OK once sent. A failure there comes back later, under
        ``rid``, through ``relay_post_failed``."""
        key = (client_id, vm_id, device)
        count = self._counts.get(key)
        if count is not None:
            count.total += 1
        target = self.routes.get(key)
        if target is None or (explicit and explicit != target):
            if count is not None:   # refused here: the device server never counts it
                count.base += 1
            return Status.NOT_ATTACHED
        status = Status.UNREACHABLE
        if hops >= MAX_HOPS:
            status = Status.HOP_LIMIT
        else:
            link = self._attached_on.get(key)
            if link is None or not link.up:
                link = self._reattach(key, pending=1)
                target = self.routes[key]   # it may have moved: name where it is now
            if link is not None:
                peer_rid = link.post_id()
                with self._posts_lock:  # filed first: its failure may come back at once
                    self._posts[peer_rid] = (client_id, rid)
                    self._post_order.append(peer_rid)
                    if len(self._post_order) > POST_MEMORY:
                        self._posts.pop(self._post_order.popleft(), None)
                sent = link.forward_post(peer_rid, vm_id, client_id, kind, offset, size,
                                         data, hops + 1, target, device)
                if sent:
                    return Status.OK
                with self._posts_lock:
                    self._posts.pop(peer_rid, None)
                if sent is False:
                    # Cut off while being sent: the link sends it again when it resumes
                    # (counted there then), or its server starts afresh (_counts_restart).
                    return Status.UNREACHABLE
        # Refused here: the device server will never count it.
        if count is not None:
            count.base += 1
        return status

    def _tell_origin(self, link: ServerLink, client_id: int, target: str) -> Status:
        """Name the client behind ``client_id`` to ``target`` once per link (ORIGIN).
        A device server of before FEATURE_ORIGIN is not told: it trusts its peers, as
        it always did."""
        name = self._origins.get(client_id)
        if not name or not link.features & FEATURE_ORIGIN:
            return Status.OK
        if self._told.get((client_id, target)) is link:
            return Status.OK
        status = Status(link.origin(client_id, name))
        if status == Status.OK:
            self._told[(client_id, target)] = link
        return status

    def _reattach(self, key: RouteKey, pending: int = 0) -> ServerLink | None:
        """The route's server went away: find it again (it may have moved).
        ``pending``: POSTs counted already that the new instance will count too (the
        one being passed on)."""
        client_id, vm_id, device = key
        target = self.directory.lookup(device) or self.routes[key]
        link = self._link(target)
        if link is None:
            return None
        if link is self._attached_on.get(key):
            # The same link, back by itself: its recovery resumed the session or
            # attached the VM again already (attaching once more would reset counts).
            return link
        if self._tell_origin(link, client_id, target) != Status.OK or \
                link.attach(vm_id, device, server_id=target, client_id=client_id) != Status.OK:
            return None
        old = self._attached_on.get(key)
        if old is not None and old is not link:
            # Moved: the old link must not attach it again when it comes back, and a
            # session it resumes there lets the VM go (DETACH, sent once it is back)
            # unless other devices of the VM still live there.
            others = any(on is old and k[:2] == key[:2] and k != key
                         for k, on in self._attached_on.items())
            if not others:
                old.detach(vm_id, client_id=client_id)
            elif old.recovery is not None:
                old.recovery.attached.pop((vm_id, device, self.routes[key], client_id), None)
        self.routes[key] = target
        self._attached_on[key] = link
        count = self._counts.get(key)
        if count is not None:   # a new instance there counts from 0
            count.base = count.total - pending
        log.info("client %d vm %d: %s found again on server %s", client_id, vm_id, device,
                 target)
        return link

    def detach(self, client_id: int, vm_id: int | None = None) -> None:
        """Release forwarded sessions of a client (all its VMs when vm_id is None)."""
        keys = [k for k in list(self.routes)
                if k[0] == client_id and (vm_id is None or k[1] == vm_id)]
        done: set[tuple[int, str | None]] = set()
        links: set[ServerLink] = set()
        for key in keys:
            target = self.routes.pop(key, None)
            link = self._attached_on.pop(key, None)
            self._counts.pop(key, None)
            if link is not None and (key[1], target) not in done:
                # Also while the link is down: it sends the DETACH once it is back
                # (its session, resumed, still holds the VM's devices).
                done.add((key[1], target))
                link.detach(key[1], client_id=client_id)
                links.add(link)
        if vm_id is None:
            for link in links | set(self._links.values()):
                link.forget_origin(client_id)
            self._origins.pop(client_id, None)
            for told in [k for k in self._told if k[0] == client_id]:
                del self._told[told]

    def close(self) -> None:
        for link in list(self._links.values()):
            link.close()
        self._links.clear()
