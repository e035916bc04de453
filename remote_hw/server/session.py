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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from remote_hw.net import fastio
from remote_hw.net.security import Identity
from remote_hw.net.transport import Transport
from remote_hw.protocol import CLOSED, NEED_DATA, Connection, ProtocolError, Role
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import ErrorCode, Status
from remote_hw.server.controller import SessionSink

if TYPE_CHECKING:
    from remote_hw.server.listener import Server

log = logging.getLogger("remote_hw.server")
_send_feedback = fastio.send_feedback
_NOT_ATTACHED = int(Status.NOT_ATTACHED)

# An IO_REQUEST as fields (Connection.next_io_request, fastio.recv_io): request id,
# vm id, client id, offset, data, kind, size, direction, hops, server id, device id.
IoFields = tuple[int, int, int, int, int, int, int, int, int, str, str]


class _OriginSink:
    """Interrupts for a client a peer server speaks for: tagged with *its* client id."""

    __slots__ = ("session", "origin")

    def __init__(self, session: ClientSession, origin: int) -> None:
        self.session = session
        self.origin = origin

    def interrupt(self, vm_id: int, device: str, line: int, level: bool) -> None:
        self.session._emit(m.Interrupt(vm_id=vm_id, client_id=self.origin, line=line,
                                       level=int(level), device_id=device))

    def event(self, vm_id: int, device: str, name: str) -> None:
        self.session._emit(m.Event(vm_id=vm_id, client_id=self.origin, device_id=device,
                                   name=name))


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
        # Frames raised (interrupts, events) while this thread handles a request are
        # sent with its feedback in one write instead of one write each.
        self._batch: list[bytes] | None = None
        # PEER connections: origin client id (the entry server's) -> our local id for
        # it and the sink that tags its interrupts with the origin id.
        self._origins: dict[int, tuple[int, _OriginSink]] = {}
        self._denied_logged: set[tuple[str | int, ...]] = set()
        self._registry = server.controller.registry  # hot path: one lookup, not three
        self._access = server.controller.access
        self.closed = False
        # The C fast path (remote_hw/net/fastio.py): plain TCP, from the handshake on.
        self._fast = False

    # -- SessionSink --------------------------------------------------------------

    def interrupt(self, vm_id: int, device: str, line: int, level: bool) -> None:
        self._emit(m.Interrupt(vm_id=vm_id, client_id=self.client_id, line=line,
                               level=int(level), device_id=device))

    def event(self, vm_id: int, device: str, name: str) -> None:
        self._emit(m.Event(vm_id=vm_id, client_id=self.client_id, device_id=device, name=name))

    def _emit(self, msg: m.Message) -> None:
        if self.closed:
            return
        if self._batch is not None and threading.get_ident() == self._thread_id:
            self._batch.append(self.conn.send(msg))
        else:
            self.send(msg)

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
                self.t.send(data)
        except OSError as e:
            log.debug("%s: send failed: %s", self.peer, e)

    # -- the connection thread --------------------------------------------------

    def run(self) -> None:
        self._thread_id = threading.get_ident()
        try:
            self._serve()
        except ProtocolError as e:
            log.warning("%s (client %d %s): protocol error, closing: %s",
                        self.peer, self.client_id, self.name, e)
            self._send_raw(self.conn.error_frame(e))
        except OSError as e:
            log.info("%s (client %d): connection lost: %s", self.peer, self.client_id, e)
        except Exception:
            log.exception("%s: internal error, closing this connection", self.peer)
        finally:
            self.close()

    def _serve(self) -> None:
        t, conn = self.t, self.conn
        recv = t.recv_raw
        handlers = self._handlers
        next_io = conn.next_io_request
        io = self._io
        recv_io, fileno = fastio.recv_io, t.fileno
        while True:
            if self._fast and not conn.buffered:
                # C: read once; a lone valid IO_REQUEST comes back as its fields, and
                # anything else as bytes for the Connection below.
                data = recv_io(fileno())
                if type(data) is tuple:
                    io(data)
                    continue
            else:
                data = recv(65536)
            if data is None:
                continue
            conn.receive_data(data)
            while True:
                f = next_io()  # the common frame, without building a message object
                if f is not None:
                    io(f)
                    if conn.buffered:
                        continue
                    break
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                if ev is CLOSED:
                    log.info("%s (client %d, %s): disconnected", self.peer, self.client_id,
                             self.name)
                    return
                handler = handlers.get(type(ev))
                if handler is None:
                    raise ProtocolError(ErrorCode.UNEXPECTED,
                                        f"{type(ev).__name__} is not accepted by a server")
                handler(self, ev)

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
        self.client_id = self._router.add_client(self)  # relays find this session now
        self._fast = not self.t.secure and fastio.enabled()  # before the client hears back
        self.send(m.Welcome(major=m.PROTOCOL_MAJOR, minor=m.PROTOCOL_MINOR,
                            max_payload=self.server.max_payload,
                            features=m.SUPPORTED_FEATURES, client_id=self.client_id,
                            name=self._server_id))
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
                return self.client_id, self
            self._log_denied(("claim", claimed),
                             f"client {self.client_id} ({self.name}) sent {what} for vm "
                             f"{vm_id} claiming to be client {claimed}; refused")
            return None
        if claimed == 0:
            return self.client_id, self
        who = self._origins.get(claimed)
        if who is None:
            sink = _OriginSink(self, claimed)
            who = self._origins[claimed] = (self._router.add_client(sink), sink)
        return who

    def _log_denied(self, key: tuple[str | int, ...], text: str) -> None:
        if key not in self._denied_logged:  # once per kind, not once per access
            self._denied_logged.add(key)
            log.warning("%s: %s", self.peer, text)

    # -- requests ---------------------------------------------------------------------

    def _io(self, f: IoFields) -> None:
        """Answer one IO_REQUEST given as fields (see Connection.next_io_request)."""
        rid, vm_id, claimed, offset, data, kind, size, direction, hops, server_id, \
            device = f
        if claimed or server_id or device not in self._registry:
            self._io_other(f)  # a peer's client, a named server, or not held here
        else:  # the common case: this client's own VM and a device held here
            self._local(rid, vm_id, self.client_id, device, offset, size, direction, data)

    def _io_other(self, f: IoFields) -> None:
        """An IO_REQUEST that names a client or a server, or a device not held here."""
        rid, vm_id, claimed, offset, data, kind, size, direction, hops, server_id, \
            device = f
        who = self._who(claimed, vm_id, "a request") if claimed else (self.client_id, self)
        if who is None:
            self._feedback(rid, vm_id, Status.DENIED, size, 0)
        elif (server_id and server_id != self._server_id) or device not in self._registry:
            status, value = self._router.forward_io(who[0], vm_id, device, server_id, kind,
                                                    offset, size, direction, data, hops)
            self._feedback(rid, vm_id, status, size, value)
        else:
            self._local(rid, vm_id, who[0], device, offset, size, direction, data)

    def _local(self, rid: int, vm_id: int, client_id: int, device: str, offset: int,
               size: int, direction: int, data: int) -> None:
        """One access to a device held here, for ``client_id``; sends the feedback."""
        batch: list[bytes] = []
        self._batch = batch
        status, value = self._access(client_id, vm_id, device, offset, size, direction,
                                     data)
        self._batch = None
        if status == _NOT_ATTACHED:
            self._log_denied(("vm", vm_id, device),
                             f"client {self.client_id} ({self.name}) used vm {vm_id} "
                             f"device {device}, which it has not attached")
        if batch:  # interrupts this access raised travel in the same write
            batch.append(self.conn.send_feedback(rid, vm_id, self.client_id, status, size,
                                                 value))
            self._send_raw(b"".join(batch))
            return
        if self._fast:
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
        self._io((req.request_id, req.vm_id, req.client_id, req.offset, req.data, req.kind,
                  req.size, req.direction, req.hops, req.server_id, req.device_id))

    def _on_attach(self, req: m.Attach) -> None:
        who = self._who(req.client_id, req.vm_id, "an attach")
        if who is None:
            status = Status.DENIED
        elif not self._policy.allowed(self.name, self.is_peer, req.device_id):
            status = Status.DENIED
            log.warning("%s: client %s may not use device %s (access control)", self.peer,
                        self.name, req.device_id)
        else:
            local, sink = who
            status = self._router.attach(local, req.vm_id, req.device_id, req.server_id,
                                         sink)
        if status != Status.OK:
            log.warning("client %d (%s) vm %d: attach %s/%s refused: %s", self.client_id,
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
        log.warning("%s (client %d): peer reported error %s: %s", self.peer, self.client_id,
                    err.code, err.text)

    # A table, not an if-chain: message class -> handler (Any: each handler takes
    # the message class it is filed under).
    _handlers: dict[type, Callable[[ClientSession, Any], None]] = {
        m.Hello: _on_hello, m.IoRequest: _on_io, m.Attach: _on_attach,
        m.Detach: _on_detach, m.Ping: _on_ping, m.Pong: _on_pong, m.Error: _on_error,
    }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.t.close()
        for local in [self.client_id, *(local for local, _ in self._origins.values())]:
            if local:
                self._router.detach(local)
                self._router.remove_client(local)
        self.server.forget(self)
