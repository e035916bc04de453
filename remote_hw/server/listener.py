"""The server object: a TCP (or mutual TLS) listener that runs a session per connection.

``Server`` puts the pieces together: the controller (devices held here), the
:class:`~.router.Router` (local or forwarded, and the client table), the
:class:`~.policy.AccessPolicy` (peers, ``--allow``) and one
:class:`~.session.ClientSession` thread per accepted connection. TLS is negotiated
here, before a session exists, so an unauthenticated peer never reaches protocol code.

Limits (:mod:`.limits`) are applied here at accept: a connection over
``--max-connections`` or ``--max-per-peer`` is refused at once, with an ERROR where
the connection is plain TCP, and costs no thread. The :class:`~.watchdog.Watchdog`
watches every admitted connection from accept on (handshake deadline, idle timeout).
When the process runs out of descriptors, ``accept`` fails with EMFILE/ENFILE while
the connection stays queued: the loop then waits (50 ms, doubling to 1 s) instead of
retrying at once, which used to spin a CPU at 100 %; existing sessions are served
meanwhile and the queued connection is accepted once descriptors are free again.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
import time

from remote_hw.net import fastio
from remote_hw.net.logsafe import RateLimitedLog
from remote_hw.net.security import KeyMaterialError, TlsConfig
from remote_hw.net.transport import TlsTransport, Transport
from remote_hw.protocol import Connection, ProtocolError, Role
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import ErrorCode
from remote_hw.server.controller import Controller
from remote_hw.server.directory import Directory, StaticDirectory
from remote_hw.server.limits import ConnectionGate, Limits
from remote_hw.server.policy import AccessPolicy
from remote_hw.server.router import Router
from remote_hw.server.session import ClientSession
from remote_hw.server.watchdog import Watchdog

log = logging.getLogger("remote_hw.server")

# accept() errors that mean "out of a resource": wait before trying again.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 1.0


def _hard_shutdown(sock: socket.socket) -> None:
    """Shut the socket down under whatever call blocks on it (recv, send, a TLS
    handshake). The plain socket's method, also for an SSLSocket, whose own
    ``shutdown`` would drop its SSL object under a thread still using it."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Handshaking:
    """An accepted connection before its session exists (in its TLS handshake), as
    the watchdog sees it: not ready, so only the handshake deadline applies."""

    ready = False
    rx = 0

    def __init__(self, sock: socket.socket, peer: str, closing_log: RateLimitedLog) -> None:
        self.closing_log = closing_log
        self.sock = sock
        self.peer = peer
        self.accepted_at = time.monotonic()
        self.aborted = False

    def ping(self, nonce: int) -> None:
        pass

    def abort(self, why: str) -> None:
        self.aborted = True
        self.closing_log("%s: closing: %s", self.peer, why)
        _hard_shutdown(self.sock)


class Server:
    """Accepts connections and runs a :class:`ClientSession` thread for each."""

    def __init__(self, controller: Controller, host: str = "127.0.0.1", port: int = 7700,
                 max_payload: int = m.DEFAULT_MAX_PAYLOAD, *, tls: TlsConfig | None = None,
                 directory: Directory | None = None, acl: dict[str, set[str]] | None = None,
                 forward_timeout: float = 5.0, limits: Limits | None = None) -> None:
        self.controller = controller
        self.limits = limits or Limits()
        controller.max_instances_per_client = self.limits.max_instances_per_client
        self.gate = ConnectionGate(self.limits)
        # One line per refused connection would let a flood of them flood the log too.
        self._refused = RateLimitedLog(log)
        self._accept_trouble = RateLimitedLog(log, interval=30.0, burst=1)
        #: connections closed for a limit (handshake, idle, queue): a line each, but
        #: a flood of them is counted, not logged line by line
        self.closing_log = RateLimitedLog(log, burst=10)
        self.watchdog = Watchdog(self.limits, on_tick=self._flush_logs)
        self.server_id = controller.server_id
        self.max_payload = max_payload
        #: the feature bits offered in WELCOME (an older server's set can be imitated)
        self.features = m.SUPPORTED_FEATURES
        self.tls = tls
        self.policy = AccessPolicy(tls, acl)
        self.acl = self.policy.acl
        self._ssl = tls.server_context() if tls is not None else None
        self.directory: Directory = directory or StaticDirectory()
        self.router = Router(controller, self.directory, tls=tls,
                             forward_timeout=forward_timeout)
        self.forwarder = self.router.forwarder
        self._listener = socket.create_server((host, port), backlog=128)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._sessions: set[ClientSession] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> Server:
        self.watchdog.start()
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
        backoff = 0.0
        while not self._stopped.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError as e:
                if self._stopped.is_set():
                    return
                if e.errno in _EXHAUSTED:
                    backoff = min(_BACKOFF_MAX, backoff * 2 or _BACKOFF_FIRST)
                    self._accept_trouble(
                        "accept failed: %s; new connections wait (retrying every %g s "
                        "at most), existing ones are served", e.strerror or e,
                        _BACKOFF_MAX)
                    self._stopped.wait(backoff)
                elif e.errno not in (errno.EINTR, errno.ECONNABORTED, errno.EAGAIN):
                    self._accept_trouble("accept failed: %s", e)
                    self._stopped.wait(_BACKOFF_FIRST)
                continue
            backoff = 0.0
            self._admit(sock, addr)

    def _admit(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        """Refuse a connection over a limit at once, else start its session thread."""
        host, peer = addr[0], f"{addr[0]}:{addr[1]}"
        why = self.gate.admit(host)
        if why is not None:
            self._refuse(sock, peer, why)
            return
        pending = _Handshaking(sock, peer, self.closing_log)
        self.watchdog.watch(pending)
        try:
            threading.Thread(target=self._start_session, args=(sock, pending, host),
                             name=f"conn-{addr[1]}", daemon=True).start()
        except RuntimeError as e:  # can't start new thread: the machine's limit
            self.watchdog.forget(pending)
            self.gate.release(host)
            self._refuse(sock, peer, f"cannot start a thread for it: {e}")

    def _refuse(self, sock: socket.socket, peer: str, why: str) -> None:
        """Close a connection we will not serve: ERROR first on plain TCP (a TLS peer
        cannot read plain bytes), without ever blocking the accept loop."""
        self._refused("%s: refused: %s", peer, why)
        try:
            if self._ssl is None:
                frame = Connection(Role.SERVER).error_frame(
                    ProtocolError(ErrorCode.DENIED, why))
                sock.send(frame, socket.MSG_DONTWAIT)
                # Read what the peer already sent (its HELLO), so closing does not
                # reset the connection before it reads the ERROR.
                sock.shutdown(socket.SHUT_WR)
                sock.recv(4096, socket.MSG_DONTWAIT)
        except OSError:
            pass
        sock.close()

    def _start_session(self, sock: socket.socket, pending: _Handshaking, host: str) -> None:
        peer = pending.peer
        session: ClientSession | None = None
        try:
            try:
                if self._ssl is not None:
                    t: Transport = TlsTransport.wrap_server(
                        sock, self._ssl, handshake_timeout=self.limits.handshake_timeout)
                else:
                    t = Transport(sock)
            except (ssl.SSLError, KeyMaterialError, OSError) as e:
                # An unauthenticated or unknown peer: TLS refuses it before any byte of
                # ours.
                if not pending.aborted:
                    self._refused("%s: refused: TLS handshake failed: %s", peer,
                                  getattr(e, "reason", None) or e)
                try:
                    sock.close()
                except OSError:
                    pass
                return
            session = ClientSession(self, t, peer)
            session.accepted_at = pending.accepted_at
            with self._lock:
                self._sessions.add(session)
            self.watchdog.forget(pending)
            if pending.aborted:
                session.close()
                return
            self.watchdog.watch(session)
            session.run()
        finally:
            self.watchdog.forget(pending)
            if session is not None:
                self.watchdog.forget(session)
            self.gate.release(host)

    def _flush_logs(self) -> None:
        self._refused.flush("refused connections")
        self.closing_log.flush("connections closed for a limit")

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
        self.watchdog.stop()
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
