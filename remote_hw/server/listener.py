"""The server object: a TCP (or mutual TLS) listener that runs a session per connection.

``Server`` puts the pieces together: the controller (devices held here), the
:class:`~.router.Router` (local or forwarded, and the client table), the
:class:`~.policy.AccessPolicy` (peers, ``--allow``) and one
:class:`~.session.ClientSession` thread per accepted connection. TLS is negotiated
here, before a session exists, so an unauthenticated peer never reaches protocol code.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading

from remote_hw.net import fastio
from remote_hw.net.security import KeyMaterialError, TlsConfig
from remote_hw.net.transport import TlsTransport, Transport
from remote_hw.protocol import messages as m
from remote_hw.server.controller import Controller
from remote_hw.server.directory import Directory, StaticDirectory
from remote_hw.server.policy import AccessPolicy
from remote_hw.server.router import Router
from remote_hw.server.session import ClientSession

log = logging.getLogger("remote_hw.server")


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
        self.policy = AccessPolicy(tls, acl)
        self.acl = self.policy.acl
        self._ssl = tls.server_context() if tls is not None else None
        self.directory: Directory = directory or StaticDirectory()
        self.router = Router(controller, self.directory, tls=tls,
                             forward_timeout=forward_timeout)
        self.forwarder = self.router.forwarder
        self._listener = socket.create_server((host, port), backlog=64)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._sessions: set[ClientSession] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> Server:
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

    def _start_session(self, sock: socket.socket, addr: tuple[str, int]) -> None:
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

    def forget(self, session: ClientSession) -> None:
        """A session that closed: no longer one of :meth:`sessions`."""
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
            s.t.shutdown()
            s.close()
        self.router.close()
        self.directory.close()
        self.controller.close()
