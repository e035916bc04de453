"""Bringing a client's link back after its connection was lost.

Why. A VM outlives its server's connection: a partition, a server stopped and
continued, a server killed and restarted. Before this module a lost connection was
final and every later access of the VM was lost. Now a link created with
``reconnect=True`` (the agent's) hands a lost connection to a :class:`Recovery`,
which, in its own thread and never on a vCPU:

* reconnects with exponential back-off and jitter (so a server restarting under
  hundreds of clients is not hit by all of them at the same instant);
* presents the session's resume token (RESUME, docs/protocol.md). When the server
  still holds the session (a partition, a stopped server), the devices are as the
  guest left them, and each *write that was in flight* when the connection broke is
  sent again under its own request id: the server answers it from its window of
  recent writes if it applied it already, so it is applied once. When the server
  does not know the token (it restarted, or the grace period ran out), the devices
  are new instances in power-on state: Recovery re-attaches every device the link
  had attached, and drops the in-flight writes (they belonged to the old devices);
* only then marks the link up again.

Meanwhile accesses fail at once as they always did (reads return all ones, writes
are dropped: the guest sees a removed device) and no access ever waits for the
recovery: ``--timeout`` still bounds each one. Writes the guest makes while the
link is down are *not* kept: they were decided on all-ones reads, and replaying them
into a device that is back would write garbage. Reads are never retried: the guest
already went on with all ones, so a retried read's value would go nowhere.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import TYPE_CHECKING, Any

from remote_hw.protocol import CLOSED, NEED_DATA, Connection, ProtocolError
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import FEATURE_RESUME, Status

if TYPE_CHECKING:
    from remote_hw.net.link import ServerLink
    from remote_hw.net.transport import Transport

log = logging.getLogger("remote_hw.client")

#: First back-off delay after a loss, and the most it grows to (seconds); each delay
#: is scaled by a random factor in [0.5, 1] (jitter).
FIRST_DELAY = 0.05
MAX_DELAY = 2.0
#: Longest handshake attempt (a stopped server accepts TCP but never answers HELLO).
CONNECT_TIMEOUT = 2.0
#: At most this many in-flight writes are kept for a retry (one per vCPU is usual).
MAX_RETRIES = 1024

# An IO_REQUEST's fields in wire order (Connection.send_io_request's arguments):
# request id, vm id, client id, offset, data, kind, size, direction, hops, server id,
# device id.
IoArgs = tuple[int, int, int, int, int, int, int, int, int, str, str]
AttachKey = tuple[int, str, str, int]  # vm id, device, server id, client id


def backoff(attempt: int, first: float = FIRST_DELAY, most: float = MAX_DELAY) -> float:
    """The delay before reconnect attempt ``attempt`` (0-based): doubling, capped,
    with jitter."""
    return min(most, first * (2 ** min(attempt, 30))) * random.uniform(0.5, 1.0)


class Recovery:
    """What a link must remember to come back: its attachments, its resume token,
    the writes in flight when it broke; and the thread that brings it back."""

    def __init__(self, link: ServerLink) -> None:
        self.link = link
        self.token = 0  # the session's resume token (0: not resumable)
        self.attached: dict[AttachKey, None] = {}  # an ordered set
        # A server-to-server link: the clients it named (ORIGIN), named again before
        # their devices are attached again on a fresh session.
        self.origins: dict[int, str] = {}
        # DETACHes that could not be sent while the link was down (vm id, client id):
        # a resumed session still holds those devices.
        self.unsent_detaches: dict[tuple[int, int], None] = {}
        # Forwarded POSTs whose send the break cut off (sent again on a resume).
        self.cut_posts = 0
        self._retries: list[IoArgs] = []
        self._lock = threading.Lock()
        self._installing = False
        self._thread: threading.Thread | None = None
        self._running = False  # a recovery thread is at work (or finishing)
        self._again = ""  # why the link broke again while that thread finished
        self._stop = threading.Event()
        # Counters for logs, tests and bench/faults.py.
        self.reconnects = 0
        self.resumed = 0
        self.retried = 0
        self.dropped = 0

    # -- what the link tells us ---------------------------------------------------------

    def connected(self) -> None:
        """The link's first connection is up: ask for a resumable session."""
        if self.link.features & FEATURE_RESUME:
            status, token = self.link.request_resume(0)
            if status == Status.OK:
                self.token = token

    def attached_device(self, vm_id: int, device: str, server_id: str, client_id: int) -> None:
        self.attached[(vm_id, device, server_id, client_id)] = None

    def detached_vm(self, vm_id: int, client_id: int) -> None:
        for key in [k for k in self.attached if k[0] == vm_id and k[3] == client_id]:
            del self.attached[key]
        self.unsent_detaches.pop((vm_id, client_id), None)

    def in_flight(self, args: IoArgs) -> None:
        """A write that was sent (or about to be) when the link broke: retry it on
        the resumed session under the same request id."""
        with self._lock:
            if not self.token or self._installing or self.link.up:
                return  # nothing to resume, or too late: the link is back
            if len(self._retries) >= MAX_RETRIES:
                self.dropped += 1
                return
            self._retries.append(args)

    def lost(self, reason: str) -> None:
        """The connection broke: start bringing it back (one thread at a time; a
        thread that is just finishing is told to go round again)."""
        if self._stop.is_set():
            return
        with self._lock:
            if self._running:
                self._again = reason
                return
            self._running = True
            thread = threading.Thread(target=self._run, args=(reason,),
                                      name=f"reconnect-{self.link.name}", daemon=True)
            thread.start()
            # Published only once started (under the lock stop() takes): a stop()
            # racing with this must not join a thread that has not started.
            self._thread = thread

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=CONNECT_TIMEOUT + 1)

    # -- the recovery thread ---------------------------------------------------------------

    def _run(self, reason: str) -> None:
        try:
            while reason:
                self._reconnect(reason)
                with self._lock:
                    reason, self._again = self._again, ""
                    if not reason or self._stop.is_set():
                        self._running = False
                        return
        except BaseException:
            with self._lock:
                self._running = False
            raise

    def _reconnect(self, reason: str) -> None:
        """Attempts with back-off until the link is up again (or the link closes)."""
        link = self.link
        where = f"server {link.name} ({link.address[0]}:{link.address[1]})"
        log.warning("%s: reconnecting (%s)", where, reason)
        attempt = 0
        while not self._stop.wait(backoff(attempt)):
            attempt += 1
            if link.locate is not None:   # it may have moved (a directory's answer)
                try:
                    address = link.locate()
                except Exception as e:    # a directory that is down: try where it was
                    log.debug("%s: lookup failed: %s", where, e)
                    address = None
                if address is not None and address != link.address:
                    log.info("%s: now at %s:%d", where, *address)
                    link.address = address
            try:
                t, conn, welcome = link._handshake(min(link.timeout, CONNECT_TIMEOUT))
            except Exception as e:  # LinkError mostly; nothing may kill this thread
                if attempt == 1 or attempt % 20 == 0:
                    log.info("%s: not back yet (attempt %d): %s", where, attempt, e)
                continue
            try:
                how, client_id = self._restore(t, conn)
            except (OSError, ProtocolError, _Lost) as e:
                t.close()
                with self._lock:
                    self._installing = False
                log.info("%s: lost again while restoring the session: %s", where, e)
                continue
            if self._stop.is_set():
                t.close()
                return
            self.reconnects += 1  # before the link is up: a write answered now counts
            link._install(t, conn, welcome, how, client_id)
            with self._lock:
                self._installing = False
            return

    def _restore(self, t: Transport, conn: Connection) -> tuple[str, int | None]:
        """On a new connection not yet in use: resume or re-attach. Says which, and
        the resumed session's client id (None: the connection's own)."""
        ex = _Exchange(self.link, t, conn)
        resumed = False
        if self.token and conn.features & FEATURE_RESUME:
            status, _ = ex.call(m.Resume(request_id=ex.rid(), token=self.token))
            resumed = status == Status.OK
        if resumed:
            self.resumed += 1
            for vm_id, client_id in list(self.unsent_detaches):
                ex.call(m.Detach(request_id=ex.rid(), vm_id=vm_id, client_id=client_id))
                self.unsent_detaches.pop((vm_id, client_id), None)
            # POSTs not known applied go first, as they were sent first; the server
            # applies each request id once (posting.py), so re-sending is safe.
            reposted = self.link.resend_posts(t.send, conn)
            retried = 0
            while True:  # writes recorded while we replay are replayed too, in order
                with self._lock:
                    batch = list(self._retries)
                    if not batch:
                        self._installing = True  # from here on, in_flight() is too late
                        break
                ex.replay(batch)  # if this connection fails too, the next one retries
                with self._lock:
                    del self._retries[:len(batch)]
                retried += len(batch)
            self.retried += retried
            cut, self.cut_posts = self.cut_posts, 0
            return (f"session resumed, devices as the guest left them; {retried} write(s) "
                    "in flight retried under their request ids"
                    + (f", {reposted} posted write(s) sent again" if reposted else "")
                    + (f" ({cut} cut off while being sent)" if cut else "")
                    ), ex.client_id
        with self._lock:
            dropped, self._retries = len(self._retries), []
            self._installing = True
        dropped += self.link.forget_posts()  # their devices are new: nothing to re-send
        self.cut_posts = 0
        self.unsent_detaches.clear()          # a new session holds nothing to detach
        self.token = 0
        if conn.features & FEATURE_RESUME:
            status, token = ex.call(m.Resume(request_id=ex.rid(), token=0))
            if status == Status.OK:
                self.token = token
        if self.link.on_new_session is not None:
            self.link.on_new_session(self.link)
        failed = []
        if conn.features & m.FEATURE_ORIGIN:
            for client_id, name in list(self.origins.items()):
                status, _ = ex.call(m.Origin(request_id=ex.rid(), client_id=client_id,
                                             name=name))
                if status != Status.OK:
                    failed.append(f"client {client_id} ({name}): {Status(status).name}")
        for vm_id, device, server_id, client_id in list(self.attached):
            status, _ = ex.call(m.Attach(request_id=ex.rid(), vm_id=vm_id, client_id=client_id,
                                         server_id=server_id, device_id=device))
            if status != Status.OK:
                failed.append(f"vm {vm_id} {device}: {Status(status).name}")
        if failed:
            log.error("server %s: could not attach again: %s", self.link.name,
                      "; ".join(failed))
        return ("a new session: the server restarted or forgot this client, so its devices "
                "start again from power-on state; re-attached "
                f"{len(self.attached) - len(failed)} device(s)"
                + (f", {dropped} write(s) in flight dropped with the old devices"
                   if dropped else "")), None


class _Lost(Exception):
    """The new connection failed while the session was being restored."""


class _Exchange:
    """Requests and their answers on a connection the link does not use yet (so no
    vCPU can read it): interrupts and events that arrive meanwhile are delivered."""

    def __init__(self, link: ServerLink, t: Transport, conn: Connection) -> None:
        self.link, self.t, self.conn = link, t, conn
        self.deadline = time.monotonic() + max(link.timeout, CONNECT_TIMEOUT)
        self.client_id: int | None = None  # as the last FEEDBACK named it

    def rid(self) -> int:
        return next(self.link._ids)

    def call(self, msg: Any) -> tuple[int, int]:
        self.t.send(self.conn.send(msg))
        return self._await({msg.request_id})[msg.request_id]

    def replay(self, batch: list[IoArgs]) -> None:
        self.t.send(b"".join(self.conn.send_io_request(*args) for args in batch))
        self._await({args[0] for args in batch})

    def _await(self, rids: set[int]) -> dict[int, tuple[int, int]]:
        got: dict[int, tuple[int, int]] = {}
        link, conn = self.link, self.conn
        while not rids <= got.keys():
            if time.monotonic() > self.deadline:
                raise _Lost("no answer in time")
            data = self.t.recv()
            if data is None:
                continue
            conn.receive_data(data)
            while True:
                ev: Any = conn.next_event()
                if ev is NEED_DATA:
                    break
                if ev is CLOSED:
                    raise _Lost("the server closed the connection")
                if isinstance(ev, m.Feedback):
                    got[ev.request_id] = (int(ev.status), ev.data)
                    self.client_id = ev.client_id
                elif isinstance(ev, m.Shadow):
                    link._on_shadow(ev)
                elif isinstance(ev, m.Interrupt):
                    link.on_interrupt(ev.vm_id, ev.device_id, ev.line, bool(ev.level),
                                      ev.client_id)
                elif isinstance(ev, m.Event):
                    link.on_event(ev.vm_id, ev.device_id, ev.name, ev.client_id)
                elif isinstance(ev, m.Ping):
                    self.t.send(conn.send(m.Pong(nonce=ev.nonce)))
                elif isinstance(ev, m.Error):
                    # About one of our requests (e.g. an attach over a quota, after its
                    # FEEDBACK): an answer. Anything fatal is followed by the close.
                    if ev.request_id in rids:
                        got.setdefault(ev.request_id, (int(Status.DEVICE_ERROR), 0))
                    log.warning("server %s reports %s: %r", link.name, ev.code.name,
                                ev.text[:200])
        return got


def poke(fd: int) -> None:
    """Wake a thread that polls ``fd`` (the link's background reader)."""
    try:
        os.write(fd, b"x")
    except OSError:
        pass
