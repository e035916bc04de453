"""The server's network interface: a TCP listener and one thread per connection.

Why threads and blocking sockets rather than asyncio: a guest's register read waits
for this answer with its vCPU stopped, and on this class of machine an asyncio stream
round trip costs about four times a blocking one (docs/performance.md). A connection
thread reads a frame, asks the controller, and writes the feedback in one ``sendall``
together with any interrupts the access raised.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from typing import Callable

from remote_hw.protocol import (CLOSED, NEED_DATA, Connection, ProtocolError, Role)
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import Status
from remote_hw.server.controller import Controller

log = logging.getLogger("remote_hw.server")

RECV_SIZE = 65536


class ClientSession:
    """One client connection: protocol state, the write lock, the session sink."""

    def __init__(self, server: "Server", sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.client_id = 0  # assigned at the handshake, from the connection, not the client
        self.name = "?"
        self.conn = Connection(Role.SERVER)
        self._wlock = threading.Lock()
        self._thread_id = 0
        # Frames raised (interrupts, events) while this thread handles a request are
        # sent with its feedback in one write instead of one write each.
        self._batch: list[bytes] | None = None
        self.closed = False

    # -- SessionSink --------------------------------------------------------------

    def interrupt(self, vm_id: int, device: str, line: int, level: bool) -> None:
        self._emit(m.Interrupt(vm_id=vm_id, client_id=self.client_id, line=line,
                               level=int(level), device_id=device))

    def event(self, vm_id: int, device: str, name: str) -> None:
        self._emit(m.Event(vm_id=vm_id, client_id=self.client_id, device_id=device, name=name))

    def _emit(self, msg: m.Message) -> None:
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
            with self._wlock:
                self.sock.sendall(self.conn.send(msg))
        except OSError as e:
            log.debug("%s: send failed: %s", self.peer, e)

    def _send_raw(self, data: bytes) -> None:
        try:
            with self._wlock:
                self.sock.sendall(data)
        except OSError as e:
            log.debug("%s: send failed: %s", self.peer, e)

    # -- the connection thread --------------------------------------------------

    def run(self) -> None:
        self._thread_id = threading.get_ident()
        try:
            self._serve()
        except ProtocolError as e:
            log.warning("%s (client %d): protocol error, closing: %s",
                        self.peer, self.client_id, e)
            self._send_raw(self.conn.error_frame(e))
        except OSError as e:
            log.info("%s (client %d): connection lost: %s", self.peer, self.client_id, e)
        except Exception:
            log.exception("%s: internal error, closing this connection", self.peer)
        finally:
            self.close()

    def _serve(self) -> None:
        sock, conn = self.sock, self.conn
        handlers = self._handlers
        next_io = conn.next_io_request
        io = self._io
        while True:
            data = sock.recv(RECV_SIZE)
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
                    raise ProtocolError(m.ErrorCode.UNEXPECTED,
                                        f"{type(ev).__name__} is not accepted by a server")
                handler(self, ev)

    def _on_hello(self, hello: m.Hello) -> None:
        self.client_id = self.server.authenticate(self, hello)
        self.name = hello.name
        self.send(m.Welcome(major=m.PROTOCOL_MAJOR, minor=m.PROTOCOL_MINOR,
                            max_payload=self.server.max_payload, features=m.SUPPORTED_FEATURES,
                            client_id=self.client_id, name=self.server.server_id))
        log.info("%s: client %d (%s) connected", self.peer, self.client_id, hello.name)

    def _io(self, f: tuple) -> None:
        """Answer one IO_REQUEST given as fields (see Connection.next_io_request).

        The client id in the request is ignored: the connection's own id is used.
        """
        rid, vm_id, _claimed, offset, data, kind, size, direction, hops, server_id, \
            device = f
        if server_id and server_id != self.server.server_id:
            status, value = Status.UNKNOWN_SERVER, 0
        else:
            self._batch = batch = []
            status, value = self.server.controller.access(
                self.client_id, vm_id, device, offset, size, direction, data)
            self._batch = None
            if batch:  # interrupts this access raised travel in the same write
                batch.append(self.conn.send_feedback(rid, vm_id, self.client_id, status,
                                                     size, value))
                self._send_raw(b"".join(batch))
                return
        self._send_raw(self.conn.send_feedback(rid, vm_id, self.client_id, status, size,
                                               value))

    def _on_io(self, req: m.IoRequest) -> None:
        # An IO_REQUEST the fast path passed over (it never does for valid frames).
        self._io((req.request_id, req.vm_id, req.client_id, req.offset, req.data, req.kind,
                  req.size, req.direction, req.hops, req.server_id, req.device_id))

    def _on_attach(self, req: m.Attach) -> None:
        if req.server_id and req.server_id != self.server.server_id:
            status = Status.UNKNOWN_SERVER
        else:
            status = self.server.controller.attach(self.client_id, req.vm_id, req.device_id,
                                                   self)
        if status != Status.OK:
            log.warning("client %d vm %d: attach %s/%s refused: %s", self.client_id,
                        req.vm_id, req.server_id or "-", req.device_id, status.name)
        self.send(m.Feedback(request_id=req.request_id, vm_id=req.vm_id,
                             client_id=self.client_id, status=status, size=1, data=0))

    def _on_detach(self, req: m.Detach) -> None:
        self.server.controller.detach(self.client_id, req.vm_id)
        self.send(m.Feedback(request_id=req.request_id, vm_id=req.vm_id,
                             client_id=self.client_id, status=Status.OK, size=1, data=0))

    def _on_ping(self, ping: m.Ping) -> None:
        self.send(m.Pong(nonce=ping.nonce))

    def _on_pong(self, pong: m.Pong) -> None:
        pass

    def _on_error(self, err: m.Error) -> None:
        log.warning("%s (client %d): peer reported error %s: %s", self.peer, self.client_id,
                    err.code, err.text)

    # A table, not an if-chain: message class -> handler.
    _handlers: dict[type, Callable[["ClientSession", object], None]] = {
        m.Hello: _on_hello, m.IoRequest: _on_io, m.Attach: _on_attach,
        m.Detach: _on_detach, m.Ping: _on_ping, m.Pong: _on_pong, m.Error: _on_error,
    }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        if self.client_id:
            self.server.controller.detach(self.client_id)
        self.server._forget(self)


class Server:
    """Accepts connections and runs a :class:`ClientSession` thread for each."""

    def __init__(self, controller: Controller, host: str = "127.0.0.1", port: int = 7700,
                 max_payload: int = m.DEFAULT_MAX_PAYLOAD) -> None:
        self.controller = controller
        self.server_id = controller.server_id
        self.max_payload = max_payload
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=64)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._sessions: set[ClientSession] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def authenticate(self, session: ClientSession, hello: m.Hello) -> int:
        """The client id of a new connection: from the connection, never from Hello."""
        return next(self._ids)

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._thread.start()
        log.info("server %s listening on %s:%d", self.server_id, *self.address)
        return self

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = ClientSession(self, sock, f"{addr[0]}:{addr[1]}")
            with self._lock:
                self._sessions.add(session)
            threading.Thread(target=session.run, name=f"conn-{addr[1]}", daemon=True).start()

    def _forget(self, session: ClientSession) -> None:
        with self._lock:
            self._sessions.discard(session)

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
            try:
                s.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.controller.close()

    def serve_forever(self) -> None:
        self.start()
        self._stopped.wait()
