"""One client connection on the server: handshake, message handlers, the hot path.

Why threads and blocking sockets rather than asyncio: a guest's register read waits
for this answer with its vCPU stopped, and on this class of machine an asyncio stream
round trip costs about four times a blocking one (docs/performance.md). A connection
thread reads a frame, asks the controller (or the router, for a device held
elsewhere), and writes the feedback in one write together with any interrupts the
access raised.

Identity. A connection's client id is assigned by the server's router, never taken
from the client. With TLS, the certificate names the client (access control uses that
name) and says whether the other end is a server; only a server may open a PEER
connection (:mod:`.policy` decides), and only a PEER's requests may carry the id of
the client it speaks for. Each such origin client gets a local id of its own on this
server, so two entry servers' clients never share a VM's device instances.

The per-access code (``_serve``, ``_io``, ``_local``) keeps what it needs in local
names and attributes: one call from the socket read to the controller's ``access``.

Nobody waits for this connection's socket but this connection. Frames raised on other
threads (another client's access to a shared device, a backend, a relayed interrupt,
the watchdog's PING), often with a device lock held, go to the session's bounded
:class:`~.outbox.Outbox` and its writer thread; a client that does not read them is
disconnected when the queue is full. Only the connection thread's own replies (its
feedback, with the interrupts its access raised) are written directly.

What the peer sends is logged through :mod:`remote_hw.net.logsafe`: texts escaped and capped,
per-request warnings rate-limited with a count.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from remote_hw.net import fastio
from remote_hw.net.logsafe import RateLimitedLog, safe_text
from remote_hw.net.security import Identity
from remote_hw.net.transport import Transport
from remote_hw.protocol import (
    CLOSED,
    NEED_DATA,
    Connection,
    IoRequestFields,
    ProtocolError,
    Role,
)
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import ErrorCode, Status
from remote_hw.server.controller import SessionSink
from remote_hw.server.limits import QuotaExceeded
from remote_hw.server.origin import acting_name, on_origin
from remote_hw.server.outbox import Outbox
from remote_hw.server.posting import counted_access, shadow_message
from remote_hw.server.resume import Resumable, SinkRelay, WriteWindow, on_resume, release

if TYPE_CHECKING:
    from remote_hw.server.listener import Server

log = logging.getLogger("remote_hw.server")
_send_feedback = fastio.send_feedback
_NOT_ATTACHED = int(Status.NOT_ATTACHED)
#: ioctl: bytes in a TCP socket's send queue not yet sent (linux/sockios.h)
_SIOCOUTQNSD = 0x894B
_WRITE = int(m.Direction.WRITE)
#: The longest ERROR text accepted from a peer (bytes); a longer one closes the
#: connection (our own are a line; a peer has no reason to send pages).
MAX_PEER_ERROR_TEXT = 1024
#: At most this many of one connection's forwarded calls wait at once on threads of
#: their own (_hand_off); beyond it the reader waits for its call itself, as before.
MAX_WORKERS = 16


def _forward_post(router: Any, *args: Any) -> tuple[int, int]:
    """Router.forward_post as an access for the window of recent writes."""
    return router.forward_post(*args), 0


class _Closing(Exception):
    """The peer did something that ends its connection without an ERROR back (it
    sent an ERROR itself, which is never answered with another)."""


class _OriginSink:
    """Interrupts (and shadows, failed POSTs) for a client a peer server speaks for:
    tagged with *its* client id, sent on whichever connection holds the peer's
    session now (``relay.target``: a resumed peer session takes its origins along;
    None while the session is parked, and then they are dropped as a client's are)."""

    __slots__ = ("relay", "origin", "applied")

    def __init__(self, relay: SinkRelay, origin: int) -> None:
        self.relay = relay
        self.origin = origin
        self.applied: dict[tuple[int, str], int] = {}  # POSTs applied (posting.py)

    def wants_shadow(self) -> bool:
        s = self.relay.target
        return s is not None and s.wants_shadow()

    def shadow(self, vm_id: int, device: str, shadow: Any) -> None:
        s = self.relay.target
        if s is not None:
            s._emit(shadow_message(vm_id, self.origin, device, shadow,
                                   self.applied.get((vm_id, device), 0)))

    def forwarded_shadow(self, msg: m.Shadow) -> None:
        s = self.relay.target
        if s is not None and s.wants_shadow():
            s._emit(dataclasses.replace(msg, client_id=self.origin))

    def forwarded_post_failed(self, vm_id: int, rid: int, status: int) -> None:
        s = self.relay.target
        if s is not None:
            s.send(m.Feedback(request_id=rid, vm_id=vm_id, client_id=self.origin,
                              status=Status(status), size=0, data=0))

    def interrupt(self, vm_id: int, device: str, line: int, level: bool) -> None:
        s = self.relay.target
        if s is not None:
            s._levels(self.origin, (vm_id,), device, line, level)

    def interrupt_vms(self, vm_ids: tuple[int, ...], device: str, line: int,
                      level: bool) -> None:
        s = self.relay.target
        if s is not None:
            s._levels(self.origin, vm_ids, device, line, level)

    def event(self, vm_id: int, device: str, name: str) -> None:
        s = self.relay.target
        if s is not None and s._events_ok(vm_id, device, name):
            s._emit(m.Event(vm_id=vm_id, client_id=self.origin, device_id=device, name=name))


class ClientSession:
    """One connection: protocol state, identity, the write lock, the session sink."""

    def __init__(self, server: Server, transport: Transport, peer: str) -> None:
        self.server = server
        self._router = server.router
        self._policy = server.policy
        self._server_id = server.server_id
        self.t = transport
        self.peer = peer
        self.identity: Identity | None = transport.identity
        self.client_id = 0  # assigned at the handshake, from the connection
        self.name = "?"
        self.is_peer = False
        self.conn = Connection(Role.SERVER)
        self._wlock = threading.Lock()
        self._thread_id = 0
        # While this thread handles a request, the frames it raises (interrupts,
        # shadows) are queued without waking the writer and go out with its feedback
        # in one write, in their place among frames other threads raise meanwhile.
        self._batching = False
        # PEER connections: origin client id (the entry server's) -> our local id for
        # it and the sink that tags its interrupts with the origin id.
        self._origins: dict[int, tuple[int, _OriginSink]] = {}
        # Warnings a peer can repeat per request: a few lines, then a count (logsafe).
        self._noisy = RateLimitedLog(log)
        self._events_dropped = 0
        limits = server.limits
        self._outbox = Outbox(self._write, self._wlock, limits.max_queue, peer,
                              self._overflow, encode_level=self._level_frame,
                              unsent=self._unsent)
        # What the watchdog looks at: accept time, the handshake, receive progress.
        self.accepted_at = time.monotonic()
        self.ready = False
        self.rx = 0
        self._registry = server.controller.registry  # hot path: one lookup, not three
        self._access = server.controller.access
        self.closed = False
        # Where this client's interrupts go: a relay, so that a connection that resumes
        # the session (resume.py) takes them over; and, once the client asked for a
        # resumable session, the window that applies a retried write once.
        self._sink = SinkRelay(self)
        self._window: WriteWindow | None = None
        self.resumable: Resumable | None = None
        # PEER connections: origin client id -> the name the peer vouched for (ORIGIN).
        self.origin_names: dict[int, str] = {}
        # The C fast path (remote_hw/net/fastio.py): plain TCP, from the handshake on.
        self._fast = False
        # Set when this connection's threads have finished (a resume waits for it).
        self.finished = threading.Event()
        # Who reads the client's requests (see _hand_off): the reader's thread ident,
        # the spare waiting for its turn, workers in a forwarded call.
        self._reader = 0
        self._turn = threading.Condition(threading.Lock())
        self._handed = False
        self._spares = 0
        self._workers = 0
        self._vms: set[int] = set()  # VMs this client attached devices for

    # -- SessionSink --------------------------------------------------------------

    def interrupt(self, vm_id: int, device: str, line: int, level: bool) -> None:
        self._levels(self.client_id, (vm_id,), device, line, level)

    def interrupt_vms(self, vm_ids: tuple[int, ...], device: str, line: int,
                      level: bool) -> None:
        """One device's line change for several of this client's VMs at once."""
        self._levels(self.client_id, vm_ids, device, line, level)

    def event(self, vm_id: int, device: str, name: str) -> None:
        if self._events_ok(vm_id, device, name):
            self._emit(m.Event(vm_id=vm_id, client_id=self.client_id, device_id=device,
                               name=name))

    # -- shadows and posted writes (posting.py) ------------------------------------------

    def wants_shadow(self) -> bool:
        """Whether this connection negotiated POSTED (so it may be sent SHADOW)."""
        return bool(self.conn.features & m.FEATURE_POSTED)

    def shadow_out(self, vm_id: int, device: str, shadow: Any, applied: int) -> None:
        """Send a SHADOW (called with the device's lock held, like interrupts)."""
        self._emit(shadow_message(vm_id, self.client_id, device, shadow, applied))

    def forwarded_shadow(self, msg: m.Shadow) -> None:
        """A device server's SHADOW for this client, relayed by the forwarder."""
        if self.wants_shadow():
            self._emit(dataclasses.replace(msg, client_id=self.client_id))

    def forwarded_post_failed(self, vm_id: int, rid: int, status: int) -> None:
        """A forwarded POST of this client failed on the device's server."""
        self._feedback(rid, vm_id, status, 0, 0)

    def _apply(self, rid: int, client_id: int, vm_id: int, device: str, offset: int,
               size: int, data: int, applied: dict[tuple[int, str], int]) -> int:
        """A POST to a device held here, for ``client_id``, counted in ``applied``."""
        # Interrupts (and the credit SHADOW) this write raises leave in one write after it.
        self._batching = True
        try:
            args = (self.server.controller, self._access, applied, client_id, vm_id,
                    device, offset, size, data)
            if self._window is not None:  # a resumable session: a re-sent POST applies once
                status = self._window.once(rid, counted_access, *args)[0]
            else:
                status = counted_access(*args)[0]
        finally:
            self._batching = False
        if self._outbox.queued:
            self._send_raw(b"")
        return status

    def post_failed(self, rid: int, vm_id: int, device: str, status: int, size: int) -> None:
        """A POST failed: FEEDBACK with its id tells the client (success is silent)."""
        if status == _NOT_ATTACHED:
            self._log_denied(("vm", vm_id, device),
                             f"client {self.client_id} ({self.name}) posted to vm {vm_id} "
                             f"device {device}, which it has not attached")
        self._feedback(rid, vm_id, status, size, 0)

    def _events_ok(self, vm_id: int, device: str, name: str) -> bool:
        """Whether EVENT may go to this peer. A client that did not negotiate EVENTS
        (HELLO features without bit 0x1) cannot be sent one: the event is dropped
        and counted, logged once per connection (an i8042 reset request, a key)."""
        if self.conn.features & m.FEATURE_EVENTS:
            return True
        self._events_dropped += 1
        if self._events_dropped == 1:
            log.warning("%s (client %d, %s): vm %d device %s event %s dropped: the client "
                        "did not negotiate EVENTS (later events are dropped silently)",
                        self.peer, self.client_id, self.name, vm_id, device, name)
        return False

    def _emit(self, msg: m.Message) -> None:
        """Send an interrupt or event: with this thread's feedback when its own access
        raised it, else through the outbox (never a blocking send: the caller may
        hold a device lock, or be another connection's thread)."""
        if self.closed:
            return
        try:
            frame = self.conn.send(msg)
        except ProtocolError as e:
            log.debug("%s: not sent: %s", self.peer, e)
            return
        # Queued either way, so frames keep the order they were raised in; this thread's
        # own are sent with its feedback (see _local), others' by the writer thread.
        self._outbox.put(frame, not (self._batching and threading.get_ident() == self._thread_id))

    def _levels(self, client_id: int, vm_ids: tuple[int, ...], device: str, line: int,
                level: bool) -> None:
        """An interrupt line changed for ``vm_ids``: held while this peer is behind
        (see outbox.py), else queued as INTERRUPT frames (one per VM, in one piece)."""
        if self.closed:
            return
        if self._outbox.hold_level((client_id, vm_ids, device, line), level):
            return
        try:
            frames = self.conn.send_interrupts(client_id, vm_ids, line, int(level), device)
        except ProtocolError as e:
            log.debug("%s: not sent: %s", self.peer, e)
            return
        self._outbox.put(frames, not (self._batching and threading.get_ident() == self._thread_id))

    def _level_frame(self, key: Any, level: bool) -> bytes:
        """The INTERRUPT frames of a held level (the outbox's ``encode_level``)."""
        client_id, vm_ids, device, line = key
        return self.conn.send_interrupts(client_id, vm_ids, line, int(level), device)

    def stalled(self, now: float) -> float:
        """Seconds frames for this peer have waited with no write completing."""
        return self._outbox.stalled(now)

    def _unsent(self) -> int:
        """Bytes the kernel holds for the peer, not yet sent (its window is closed)."""
        return int.from_bytes(fcntl.ioctl(self.t.sock.fileno(), _SIOCOUTQNSD, b"\0" * 4),
                              sys.byteorder, signed=True)

    def ping(self, nonce: int) -> None:
        """The watchdog's keep-alive (queued: never blocks the watchdog)."""
        if self.ready and not self.closed:
            self._outbox.put(self.conn.send(m.Ping(nonce=nonce)))

    def abort(self, why: str) -> None:
        """End this connection for ``why`` (a limit): one log line, an ERROR if it
        can be written without waiting (plain TCP and nobody writing), then the
        socket is shut down under whatever call blocks on it."""
        if self.closed:
            return
        self.server.closing_log("%s (client %d, %s): closing: %s", self.peer,
                                self.client_id, self.name, why)
        if not self.t.secure and self._wlock.acquire(blocking=False):
            try:
                self.t.sock.send(self.conn.error_frame(ProtocolError(ErrorCode.DENIED, why)),
                                 socket.MSG_DONTWAIT)
            except OSError:
                pass
            finally:
                self._wlock.release()
        self._outbox.close()
        try:
            socket.socket.shutdown(self.t.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def _overflow(self, why: str) -> None:
        self.abort(why)

    def _write(self, data: bytes) -> None:
        """The outbox's writer, called with the write lock held (raises OSError)."""
        self.t.send(data)

    # -- sending ----------------------------------------------------------------

    def send(self, msg: m.Message) -> None:
        """Send one message from any thread; a dead peer is noticed by the reader."""
        if self.closed:
            return
        try:
            frame = self.conn.send(msg)
        except ProtocolError as e:
            log.debug("%s: not sent: %s", self.peer, e)
            return
        self._send_raw(frame)

    def _send_raw(self, data: bytes) -> None:
        try:
            with self._wlock:
                if self._outbox.queued:  # what was queued before goes first
                    data = self._outbox.take() + data
                self.t.send(data)
        except OSError as e:
            log.debug("%s: send failed: %s", self.peer, e)

    # -- the connection thread --------------------------------------------------

    def run(self) -> None:
        """The connection's thread: it reads the client's requests until the
        connection ends, or until it hands the reading on (see :meth:`_hand_off`)."""
        self._reader = self._thread_id = threading.get_ident()
        self._read()

    def _read(self) -> None:
        """Serve as the reader; when handed off, wait to be the reader again."""
        while True:
            ended = True
            try:
                ended = self._serve()
            except ProtocolError as e:
                log.warning("%s (client %d %s): protocol error, closing: %s",
                            self.peer, self.client_id, self.name, e)
                self._send_raw(self.conn.error_frame(e))
            except _Closing as e:
                self.server.closing_log("%s (client %d, %s): closing: %s", self.peer,
                                        self.client_id, self.name, e)
            except OSError as e:
                log.info("%s (client %d): connection lost: %s", self.peer, self.client_id,
                         e)
            except Exception:
                log.exception("%s: internal error, closing this connection", self.peer)
            if ended:
                self._end()
                return
            if not self._await_turn():
                return

    # -- handing the reading on (forwarded calls) --------------------------------------
    #
    # Why: a request for a device held elsewhere waits for a round trip to its server.
    # Handled inline, it would hold up every other VM of this client behind it (an
    # agent runs many VMs over one connection). So before such a call, a reader of a
    # client with several VMs hands the reading of the connection to a spare thread and
    # makes the call as a worker; when it has answered, it becomes the spare. The call
    # itself is made exactly as before (this thread still reads the peer's answer), so
    # it costs no extra wake-up on its own path; only the spare's wake-up, in parallel.

    def _hand_off(self) -> bool:
        """Let another thread read the client's requests while this one waits for a
        forwarded call; False (keep reading here) when it would not pay."""
        if len(self._vms) < 2 or self._workers >= MAX_WORKERS or self.closed:
            return False
        with self._turn:
            self._workers += 1
            self._reader = 0  # nobody until a spare takes it; this thread stops reading
            self._handed = True
            if self._spares:
                self._turn.notify()
                return True
        try:
            threading.Thread(target=self._spare_main, name=f"session-{self.client_id}",
                             daemon=True).start()
        except RuntimeError:  # the machine's thread limit: take the turn back
            with self._turn:
                self._workers -= 1
                self._handed = False
                self._reader = threading.get_ident()
            return False
        return True

    def _done_working(self) -> None:
        with self._turn:
            self._workers -= 1
            last = self.closed and not self._workers
        if last:
            self.finished.set()

    def _spare_main(self) -> None:
        if self._await_turn():
            self._read()

    def _await_turn(self) -> bool:
        """As the spare: wait until the reading is handed here (True) or the
        connection has ended (False). One spare is enough; others end."""
        with self._turn:
            if self._spares:
                return False
            self._spares += 1
            try:
                while not self._handed and not self.closed:
                    self._turn.wait()
            finally:
                self._spares -= 1
            if self.closed:
                return False
            self._handed = False
            self._reader = self._thread_id = threading.get_ident()
            return True

    def _end(self) -> None:
        """The connection ended: close it; ``finished`` once no call is in progress."""
        self.close()
        with self._turn:
            self._turn.notify_all()
            last = not self._workers
        if last:
            self.finished.set()

    def _serve(self) -> bool:
        """Read and answer requests; True when the connection ended, False when the
        reading was handed to another thread."""
        me = threading.get_ident()
        t, conn = self.t, self.conn
        recv = t.recv_raw
        handlers = self._handlers
        next_io = conn.next_io_request
        next_post = conn.next_post
        io = self._io
        post = self._post
        recv_io, fileno, io_fields = fastio.recv_io, t.fileno, IoRequestFields
        # Frames a reader before this one had read: answered before reading more.
        take_buffered = bool(conn.buffered)
        while True:
            self.rx += 1  # progress, for the watchdog's idle timeout
            if take_buffered:
                take_buffered = False
            elif self._fast and not conn.buffered:
                # C: read once; a lone valid IO_REQUEST comes back as its fields, and
                # anything else as bytes for the Connection below.
                data = recv_io(fileno())
                if type(data) is io_fields:
                    io(data)
                    if self._reader != me:
                        return False
                    continue
                if data is None:
                    continue
                conn.receive_data(data)
            else:
                data = recv(65536)
                if data is None:
                    continue
                conn.receive_data(data)
            while True:
                f = next_io()  # the common frame, without building a message object
                if f is not None:
                    io(f)
                    if self._reader != me:
                        return False
                    if conn.buffered:
                        continue
                    break
                f = next_post()  # the next most common, a posted write (posting.py)
                if f is not None:
                    post(f)
                    if conn.buffered:
                        continue
                    break
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                if ev is CLOSED:
                    log.info("%s (client %d, %s): disconnected", self.peer, self.client_id,
                             self.name)
                    return True
                handler = handlers.get(type(ev))
                if handler is None:
                    raise ProtocolError(ErrorCode.UNEXPECTED,
                                        f"{type(ev).__name__} is not accepted by a server")
                handler(self, ev)
                if self._reader != me:  # an IO_REQUEST decoded the long way, handed off
                    return False

    def _refuse(self, code: ErrorCode, text: str) -> None:
        log.warning("%s: refused: %s", self.peer, text)
        raise ProtocolError(code, text)

    def _on_hello(self, hello: m.Hello) -> None:
        ident = self.identity
        if hello.role == m.Role.PEER:
            if not self._policy.peer_allowed(ident, self.peer):
                self._refuse(ErrorCode.DENIED,
                             f"{hello.name!r} asked to be a server peer, but "
                             + (f"its certificate is a {ident.role}'s ({ident.name})" if ident
                                else "peers must authenticate with a server certificate"))
            self.is_peer = True
        if ident is not None and hello.name != ident.name:
            self._refuse(ErrorCode.DENIED,
                         f"HELLO names {hello.name!r} but the certificate is {ident.name!r}")
        self.name = ident.name if ident else hello.name
        self.client_id = self._router.add_client(self._sink)  # relays find it now
        self._fast = not self.t.secure and fastio.enabled()  # before the client hears back
        self.send(m.Welcome(major=m.PROTOCOL_MAJOR, minor=m.PROTOCOL_MINOR,
                            max_payload=self.server.max_payload,
                            features=self.server.features, client_id=self.client_id,
                            name=self._server_id))
        self.ready = True
        log.info("%s: %s %d (%s%s) connected", self.peer,
                 "peer server" if self.is_peer else "client", self.client_id, self.name,
                 ", TLS" if ident else "")

    # -- whose request is it? --------------------------------------------------------

    def _who(self, claimed: int, vm_id: int, what: str) -> tuple[int, SessionSink] | None:
        """(local client id, sink) for a request, or None when it must be refused.

        A client speaks only for itself: a client id in its requests must be 0 or its
        own. A peer server speaks for the client it names.
        """
        if not self.is_peer:
            if claimed in (0, self.client_id):
                return self.client_id, self._sink
            self._log_denied(("claim", claimed),
                             f"client {self.client_id} ({self.name}) sent {what} for vm "
                             f"{vm_id} claiming to be client {claimed}; refused")
            return None
        if claimed == 0:
            return self.client_id, self._sink
        who = self._origins.get(claimed)
        if who is None:
            sink = _OriginSink(self._sink, claimed)
            who = self._origins[claimed] = (self._router.add_client(sink), sink)
        return who

    def _log_denied(self, key: tuple[str | int, ...], text: str) -> None:
        # A few lines per interval, then a count: a client naming 100 k VM ids gets
        # neither 100 k lines nor 100 k remembered keys (logsafe.RateLimitedLog).
        self._noisy("%s: %s", self.peer, text)

    # -- requests ---------------------------------------------------------------------

    def _io(self, f: IoRequestFields) -> None:
        """Answer one IO_REQUEST given as fields (see Connection.next_io_request)."""
        rid, vm_id, claimed, offset, data, kind, size, direction, hops, server_id, \
            device = f
        if claimed or server_id or device not in self._registry:
            self._io_other(f)  # a peer's client, a named server, or not held here
        else:  # the common case: this client's own VM and a device held here
            self._local(rid, vm_id, self.client_id, device, offset, size, direction, data)

    def _post(self, f: IoRequestFields) -> None:
        """Apply one POST given as fields; answer only a failure (posting.py)."""
        rid, vm_id, claimed, offset, data, kind, size, _, hops, server_id, device = f
        if not (claimed or server_id or device not in self._registry):  # the common case
            status = self._apply(rid, self.client_id, vm_id, device, offset, size, data,
                                 self._sink.applied)
        else:
            who = (self._who(claimed, vm_id, "a posted write") if claimed
                   else (self.client_id, self._sink))
            if who is None:
                status = int(Status.DENIED)
            elif (server_id and server_id != self._server_id) or device not in self._registry:
                # Held elsewhere: sent on without waiting (forward.py).
                args = (who[0], vm_id, device, server_id, kind, offset, size, data, hops, rid)
                if self._window is not None:
                    status = self._window.once(rid, _forward_post, self._router, *args)[0]
                else:
                    status = self._router.forward_post(*args)
            else:  # a peer's client, counted under its own sink
                status = self._apply(rid, who[0], vm_id, device, offset, size, data,
                                     getattr(who[1], "applied", {}))
        if status:
            self.post_failed(rid, vm_id, device, status, size)

    def _io_other(self, f: IoRequestFields) -> None:
        """An IO_REQUEST that names a client or a server, or a device not held here."""
        rid, vm_id, claimed, offset, data, kind, size, direction, hops, server_id, \
            device = f
        who = (self._who(claimed, vm_id, "a request") if claimed
               else (self.client_id, self._sink))
        if who is None:
            self._feedback(rid, vm_id, Status.DENIED, size, 0)
        elif (server_id and server_id != self._server_id) or device not in self._registry:
            forward = self._router.forward_io
            args = (who[0], vm_id, device, server_id, kind, offset, size, direction, data,
                    hops)
            working = self._hand_off()  # other VMs' requests need not wait for this one
            try:
                if self._window is not None and direction == _WRITE:  # a retry: once
                    status, value = self._window.once(rid, forward, *args)
                else:
                    status, value = forward(*args)
                self._feedback(rid, vm_id, status, size, value)
            finally:
                if working:
                    self._done_working()
        else:
            self._local(rid, vm_id, who[0], device, offset, size, direction, data)

    def _local(self, rid: int, vm_id: int, client_id: int, device: str, offset: int,
               size: int, direction: int, data: int) -> None:
        """One access to a device held here, for ``client_id``; sends the feedback."""
        self._batching = True
        try:
            if self._window is None or direction != _WRITE:
                status, value = self._access(client_id, vm_id, device, offset, size,
                                             direction, data)
            else:  # a resumable session's write: a retry of it is answered, not re-applied
                status, value = self._window.once(rid, self._access, client_id, vm_id,
                                                  device, offset, size, direction, data)
        finally:
            self._batching = False
        if status == _NOT_ATTACHED:
            self._log_denied(("vm", vm_id, device),
                             f"client {self.client_id} ({self.name}) used vm {vm_id} "
                             f"device {device}, which it has not attached")
        # Frames this access raised (and any raised meanwhile) are queued: _feedback
        # sends them first, in the same write.
        if self._fast and not self._outbox.queued:  # else _feedback sends the queue first
            try:
                with self._wlock:
                    if _send_feedback(self.t.fileno(), rid, vm_id, self.client_id, status,
                                      size, value):
                        return
            except OSError as e:
                log.debug("%s: send failed: %s", self.peer, e)
                return
            # A value the C encoder refuses: the codec below says what is wrong with it.
        self._feedback(rid, vm_id, status, size, value)

    def _feedback(self, rid: int, vm_id: int, status: int, size: int, value: int) -> None:
        self._send_raw(self.conn.send_feedback(rid, vm_id, self.client_id, status, size,
                                               value))

    def _on_io(self, req: m.IoRequest) -> None:
        # An IO_REQUEST the fast path passed over (it never does for valid frames).
        self._io(IoRequestFields(req.request_id, req.vm_id, req.client_id, req.offset,
                                 req.data, req.kind, req.size, req.direction, req.hops,
                                 req.server_id, req.device_id))

    def _on_post(self, req: m.Post) -> None:
        # A POST the field reader passed over (it never does for valid frames).
        self._post(IoRequestFields(req.request_id, req.vm_id, req.client_id, req.offset,
                                   req.data, req.kind, req.size, req.direction, req.hops,
                                   req.server_id, req.device_id))

    def _on_attach(self, req: m.Attach) -> None:
        who = self._who(req.client_id, req.vm_id, "an attach")
        if who is None:
            status = Status.DENIED
        elif not self._policy.allowed(acting_name(self, req.client_id), req.device_id):
            status = Status.DENIED
            who_for = acting_name(self, req.client_id)
            log.warning("%s: client %s may not use device %s (access control)", self.peer,
                        who_for if not self.is_peer else
                        f"{who_for or 'unnamed'} (through peer server {self.name})",
                        req.device_id)
        else:
            local, sink = who
            if len(self._vms) < MAX_WORKERS:
                self._vms.add(req.vm_id)
            applied = getattr(sink, "applied", None)
            if applied is not None:  # a new attachment counts its POSTs from 0
                applied.pop((req.vm_id, req.device_id), None)
            try:
                status = self._router.attach(local, req.vm_id, req.device_id,
                                             req.server_id, sink,
                                             origin=acting_name(self, req.client_id) or "")
            except QuotaExceeded as e:
                self._noisy("%s: attach of vm %d device %s refused: %s", self.peer,
                            req.vm_id, req.device_id, e)
                self.send(m.Feedback(request_id=req.request_id, vm_id=req.vm_id,
                                     client_id=self.client_id, status=Status.DENIED, size=0,
                                     data=0))
                # The reason, for the client's log (not fatal: the connection goes on).
                self.send(m.Error(request_id=req.request_id, code=ErrorCode.DENIED,
                                  text=str(e)))
                return
        if status != Status.OK:
            self._noisy("client %d (%s) vm %d: attach %s/%s refused: %s", self.client_id,
                        self.name, req.vm_id, req.server_id or "-", req.device_id,
                        Status(status).name)
        self.send(m.Feedback(request_id=req.request_id, vm_id=req.vm_id,
                             client_id=self.client_id, status=status, size=0, data=0))

    def _on_detach(self, req: m.Detach) -> None:
        who = self._who(req.client_id, req.vm_id, "a detach")
        status = Status.DENIED
        if who is not None:
            self._router.detach(who[0], req.vm_id)
            status = Status.OK
        self.send(m.Feedback(request_id=req.request_id, vm_id=req.vm_id,
                             client_id=self.client_id, status=status, size=0, data=0))

    def _on_ping(self, ping: m.Ping) -> None:
        self.send(m.Pong(nonce=ping.nonce))

    def _on_pong(self, pong: m.Pong) -> None:
        pass

    def _on_error(self, err: m.Error) -> None:
        size = len(err.text.encode("utf-8", "surrogatepass"))
        if size > MAX_PEER_ERROR_TEXT:
            raise _Closing(f"it sent an ERROR with {size} bytes of text (at most "
                           f"{MAX_PEER_ERROR_TEXT} accepted)")
        self._noisy("%s (client %d): peer reported error %s: %s", self.peer,
                    self.client_id, err.code, safe_text(err.text))

    # A table, not an if-chain: message class -> handler (Any: each handler takes
    # the message class it is filed under).
    _handlers: dict[type, Callable[[ClientSession, Any], None]] = {
        m.Hello: _on_hello, m.IoRequest: _on_io, m.Attach: _on_attach,
        m.Detach: _on_detach, m.Ping: _on_ping, m.Pong: _on_pong, m.Error: _on_error,
        m.Resume: on_resume, m.Origin: on_origin, m.Post: _on_post,
    }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._outbox.close()
        self._noisy.flush(f"{self.peer} (client {self.client_id})")
        self.t.close()
        # A resumable session is parked, not released (a peer's with the clients it
        # speaks for: their devices wait for the peer's link to come back).
        if not release(self):
            for local in [self.client_id, *(local for local, _ in self._origins.values())]:
                if local:
                    self._router.detach(local)
                    self._router.remove_client(local)
        self.server.forget(self)
