"""The server's network interface: a TCP (or mutual TLS) listener, a thread per connection.

Why threads and blocking sockets rather than asyncio: a guest's register read waits
for this answer with its vCPU stopped, and on this class of machine an asyncio stream
round trip costs about four times a blocking one (docs/performance.md). A connection
thread reads a frame, asks the controller (or the forwarder), and writes the feedback
in one write together with any interrupts the access raised.

Identity. A connection's client id is assigned here, never taken from the client. With
TLS, the certificate names the client (access control uses that name) and says whether
the other end is a server; only a server may open a PEER connection, and only a PEER's
requests may carry the id of the client it speaks for. Each such origin client gets a
local id of its own on this server, so two entry servers' clients never share a VM's
device instances.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import socket
import ssl
import threading
from typing import Any, Callable

from remote_hw.net import fastio
from remote_hw.protocol import CLOSED, NEED_DATA, Connection, ProtocolError, Role
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import ErrorCode, Status
from remote_hw.net.security import Identity, KeyMaterialError, TlsConfig
from remote_hw.server.controller import Controller
from remote_hw.server.directory import Directory, StaticDirectory
from remote_hw.server.forward import MAX_HOPS, Forwarder
from remote_hw.net.transport import TlsTransport, Transport

log = logging.getLogger("remote_hw.server")
_send_feedback = fastio.send_feedback
_NOT_ATTACHED = int(Status.NOT_ATTACHED)


class _OriginSink:
    """Interrupts for a client a peer server speaks for: tagged with *its* client id."""

    __slots__ = ("session", "origin")

    def __init__(self, session: "ClientSession", origin: int) -> None:
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

    def __init__(self, server: "Server", transport: Transport, peer: str) -> None:
        self.server = server
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
        # PEER connections: origin client id (the entry server's) -> our local id.
        self._origins: dict[int, int] = {}
        self._denied_logged: set[tuple] = set()
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
            if not self.server.peer_allowed(self):
                self._refuse(ErrorCode.DENIED,
                             f"{hello.name!r} asked to be a server peer, but "
                             + (f"its certificate is a {ident.role}'s ({ident.name})" if ident
                                else "peers must authenticate with a server certificate"))
            self.is_peer = True
        if ident is not None and hello.name != ident.name:
            self._refuse(ErrorCode.DENIED,
                         f"HELLO names {hello.name!r} but the certificate is {ident.name!r}")
        self.client_id = self.server.new_client_id()
        self.name = ident.name if ident else hello.name
        self.server._register(self)
        self._fast = not self.t.secure and fastio.enabled()  # before the client hears back
        self.send(m.Welcome(major=m.PROTOCOL_MAJOR, minor=m.PROTOCOL_MINOR,
                            max_payload=self.server.max_payload,
                            features=m.SUPPORTED_FEATURES, client_id=self.client_id,
                            name=self.server.server_id))
        log.info("%s: %s %d (%s%s) connected", self.peer,
                 "peer server" if self.is_peer else "client", self.client_id, self.name,
                 ", TLS" if ident else "")

    # -- whose request is it? --------------------------------------------------------

    def _who(self, claimed: int, vm_id: int, what: str) -> tuple[int, object] | None:
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
        local = self._origins.get(claimed)
        if local is None:
            local = self._origins[claimed] = self.server.new_client_id()
            self.server._origin_sinks[local] = _OriginSink(self, claimed)
        return local, self.server._origin_sinks[local]

    def _log_denied(self, key: tuple, text: str) -> None:
        if key not in self._denied_logged:  # once per kind, not once per access
            self._denied_logged.add(key)
            log.warning("%s: %s", self.peer, text)

    # -- requests ---------------------------------------------------------------------

    def _io(self, f: tuple) -> None:
        """Answer one IO_REQUEST given as fields (see Connection.next_io_request)."""
        rid, vm_id, claimed, offset, data, kind, size, direction, hops, server_id, \
            device = f
        if claimed or server_id or device not in self._registry:
            self._io_other(f)  # a peer's client, a named server, or not held here
        else:  # the common case: this client's own VM and a device held here
            self._local(rid, vm_id, self.client_id, device, offset, size, direction, data)

    def _io_other(self, f: tuple) -> None:
        """An IO_REQUEST that names a client or a server, or a device not held here."""
        rid, vm_id, claimed, offset, data, kind, size, direction, hops, server_id, \
            device = f
        who = self._who(claimed, vm_id, "a request") if claimed else (self.client_id, self)
        if who is None:
            self._feedback(rid, vm_id, Status.DENIED, size, 0)
        elif (server_id and server_id != self.server.server_id) or \
                device not in self._registry:
            status, value = self.server.forward_io(who[0], vm_id, device, server_id, kind,
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
        elif not self.server.allowed(self, req.device_id):
            status = Status.DENIED
            log.warning("%s: client %s may not use device %s (access control)", self.peer,
                        self.name, req.device_id)
        else:
            local, sink = who
            status = self.server.attach(local, req.vm_id, req.device_id, req.server_id, sink)
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
            self.server.detach(who[0], req.vm_id)
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

    # A table, not an if-chain: message class -> handler.
    _handlers: dict[type, Callable[["ClientSession", Any], None]] = {
        m.Hello: _on_hello, m.IoRequest: _on_io, m.Attach: _on_attach,
        m.Detach: _on_detach, m.Ping: _on_ping, m.Pong: _on_pong, m.Error: _on_error,
    }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.t.close()
        for local in [self.client_id, *self._origins.values()]:
            if local:
                self.server.detach(local)
                self.server._origin_sinks.pop(local, None)
        self.server._forget(self)


class Server:
    """Accepts connections and runs a :class:`ClientSession` thread for each."""

    def __init__(self, controller: Controller, host: str = "127.0.0.1", port: int = 7700,
                 max_payload: int = m.DEFAULT_MAX_PAYLOAD, *, tls: TlsConfig | None = None,
                 directory: Directory | None = None, acl: dict[str, set[str]] | None = None,
                 forward_timeout: float = 5.0) -> None:
        self.controller = controller
        self.server_id = controller.server_id
        self.max_payload = max_payload
        self.tls = tls
        self._ssl = tls.server_context() if tls is not None else None
        self.acl = acl or {}
        if self.acl and tls is None:
            raise ValueError("access control (--allow) needs TLS: without certificates "
                             "there are no client names to check")
        self.directory: Directory = directory or StaticDirectory()
        self.forwarder = Forwarder(self.server_id, self.directory, tls=tls,
                                   timeout=forward_timeout,
                                   relay_interrupt=self._relay_interrupt,
                                   relay_event=self._relay_event)
        self._listener = socket.create_server((host, port), backlog=64)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._sessions: set[ClientSession] = set()
        self._by_client: dict[int, ClientSession] = {}
        self._origin_sinks: dict[int, _OriginSink] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # -- identity and access ---------------------------------------------------------

    def new_client_id(self) -> int:
        """Client ids are this server's own numbering, one per connection/origin."""
        return next(self._ids)

    def peer_allowed(self, session: ClientSession) -> bool:
        """May this connection act as a server peer (and speak for other clients)?"""
        if session.identity is not None:
            return session.identity.role == "server"
        if self.tls is not None:
            return False
        # Without TLS nothing proves who is calling; accept peers only from this host,
        # which is the one-machine default, and say so.
        host = session.peer.rsplit(":", 1)[0]
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
        if ok:
            log.warning("%s: accepting an unauthenticated server peer (no TLS; loopback only)",
                        session.peer)
        return ok

    def allowed(self, session: ClientSession, device: str) -> bool:
        """Access control: an --allow list for the device names who may use it."""
        names = self.acl.get(device)
        if names is None or session.is_peer:
            return True  # no list: any authenticated client; peers were checked at entry
        return session.name in names

    # -- attach / detach / forward ---------------------------------------------------------

    def attach(self, client_id: int, vm_id: int, device: str, server_id: str,
               sink) -> Status:
        if (not server_id or server_id == self.server_id) and device in self.controller.registry:
            return self.controller.attach(client_id, vm_id, device, sink)
        if server_id == self.server_id:
            return Status.UNKNOWN_DEVICE
        target = self.forwarder.resolve(device, server_id)
        if target is None:
            return Status.UNKNOWN_DEVICE
        if target == self.server_id:
            return Status.UNKNOWN_DEVICE  # the directory says here, but it is not here
        return self.forwarder.attach(client_id, vm_id, device, target)

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

    def detach(self, client_id: int, vm_id: int | None = None) -> None:
        self.controller.detach(client_id, vm_id)
        self.forwarder.detach(client_id, vm_id)

    def _relay_interrupt(self, client_id: int, vm_id: int, device: str, line: int,
                         level: bool) -> None:
        sink = self._by_client.get(client_id) or self._origin_sinks.get(client_id)
        if sink is None:
            log.debug("interrupt for client %d that is gone; dropped", client_id)
            return
        sink.interrupt(vm_id, device, line, level)

    def _relay_event(self, client_id: int, vm_id: int, device: str, name: str) -> None:
        sink = self._by_client.get(client_id) or self._origin_sinks.get(client_id)
        if sink is not None:
            sink.event(vm_id, device, name)

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._thread.start()
        on, why = fastio.status()
        if not on and not self.tls:
            log.info("server %s: C fast path off (%s): requests take the pure-Python path",
                     self.server_id, why)
        log.info("server %s listening on %s:%d%s", self.server_id, *self.address,
                 " (mutual TLS)" if self.tls else "")
        return self

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                continue
            threading.Thread(target=self._start_session, args=(sock, addr),
                             name=f"conn-{addr[1]}", daemon=True).start()

    def _start_session(self, sock: socket.socket, addr: tuple) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        try:
            if self._ssl is not None:
                t: Transport = TlsTransport.wrap_server(sock, self._ssl)
            else:
                t = Transport(sock)
        except (ssl.SSLError, KeyMaterialError, OSError) as e:
            # An unauthenticated or unknown peer: TLS refuses it before any byte of ours.
            log.warning("%s: refused: TLS handshake failed: %s", peer,
                        getattr(e, "reason", None) or e)
            try:
                sock.close()
            except OSError:
                pass
            return
        session = ClientSession(self, t, peer)
        with self._lock:
            self._sessions.add(session)
        session.run()

    def _register(self, session: ClientSession) -> None:
        with self._lock:
            self._by_client[session.client_id] = session

    def _forget(self, session: ClientSession) -> None:
        with self._lock:
            self._sessions.discard(session)
            if self._by_client.get(session.client_id) is session:
                del self._by_client[session.client_id]

    def sessions(self) -> list[ClientSession]:
        with self._lock:
            return list(self._sessions)

    def stop(self) -> None:
        """Stop accepting, close every connection, release devices and backends."""
        self._stopped.set()
        try:
            # shutdown wakes a thread blocked in accept(); close alone does not on Linux.
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._listener.close()
        except OSError:
            pass
        for s in self.sessions():
            s.t.shutdown()
            s.close()
        self.forwarder.close()
        self.directory.close()
        self.controller.close()
