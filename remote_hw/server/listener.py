"""The server object: a TCP (or mutual TLS) listener that runs a session per connection.

``Server`` puts the pieces together: the controller (devices held here), the
:class:`~.router.Router` (local or forwarded, and the client table), the
:class:`~.policy.AccessPolicy` (peers, ``--allow``) and one
:class:`~.session.ClientSession` thread per connection. TLS is negotiated there,
before a session exists, so an unauthenticated peer never reaches protocol code.

The accept thread waits on one selector: the listener, and the *waiting room*, the
admitted connections that have not sent a byte yet. A connection gets its thread
when its first bytes (HELLO, or a TLS ClientHello) arrive; one that stays silent
costs a descriptor and no thread, and is closed there at the handshake deadline or
when its peer hangs up. So a crowd of idle connections, opened again each time the
deadline closes them, costs no thread starts and no thread wake-ups.

Limits (:mod:`.limits`) are applied here at accept: a connection over
``--max-connections`` or ``--max-per-peer`` is refused at once, with an ERROR where
the connection is plain TCP, and costs no thread. A flood of refusals is paced
(:class:`~.limits.AcceptPacer`): after a burst of them, the listener is left out of
the selector for the rest of a 0.1 s window and new connections wait in the kernel's
queue (shortened meanwhile if the server is full, so a flood beyond it costs this
process nothing); what waited is then admitted if there is room, else refused with
the same ERROR. The :class:`~.watchdog.Watchdog` watches every admitted connection
from accept on (handshake deadline, idle timeout). When the process runs out of
descriptors, ``accept`` fails with EMFILE/ENFILE while the connection stays queued:
the listener is then left out for 50 ms, doubling to 1 s, instead of retrying at
once, which used to spin a CPU at 100 %; existing sessions are served meanwhile and
the queued connection is accepted once descriptors are free again.
"""

from __future__ import annotations

import errno
import logging
import selectors
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
from remote_hw.server.limits import (
    BACKLOG,
    FORWARD_TIMEOUT,
    PAUSED_BACKLOG,
    AcceptPacer,
    ConnectionGate,
    Limits,
)
from remote_hw.server.policy import AccessPolicy
from remote_hw.server.router import Router
from remote_hw.server.session import ClientSession
from remote_hw.server.watchdog import YIELD_EVERY, Watchdog

log = logging.getLogger("remote_hw.server")

# accept() errors that mean "out of a resource": wait before trying again.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 1.0
#: connections accepted in a row before the waiting room gets a turn
ACCEPT_BATCH = 64
#: how long stop() waits, in all, for session threads to finish closing
STOP_GRACE = 2.0


def _hard_shutdown(sock: socket.socket) -> None:
    """Shut the socket down under whatever call blocks on it (recv, send, a TLS
    handshake). The plain socket's method, also for an SSLSocket, whose own
    ``shutdown`` would drop its SSL object under a thread still using it."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Handshaking:
    """An accepted connection before its session exists (waiting for its first
    bytes, or in its TLS handshake), as the watchdog sees it: not ready, so only the
    handshake deadline applies. While it waits on a plain-TCP server (``plain``),
    ending it sends the ERROR first, as a session would (nothing else writes to it)."""

    ready = False
    rx = 0

    def __init__(self, sock: socket.socket, peer: str, closing_log: RateLimitedLog,
                 plain: bool = False) -> None:
        self.closing_log = closing_log
        self.sock = sock
        self.peer = peer
        self.plain = plain
        self.accepted_at = time.monotonic()
        self.aborted = False

    def ping(self, nonce: int) -> None:
        pass

    def stalled(self, now: float) -> float:
        return 0.0   # nothing is ever queued for a connection that has not spoken

    def abort(self, why: str) -> None:
        self.aborted = True
        self.closing_log("%s: closing: %s", self.peer, why)
        if self.plain:
            try:
                self.sock.send(Connection(Role.SERVER).error_frame(
                    ProtocolError(ErrorCode.DENIED, why)), socket.MSG_DONTWAIT)
            except OSError:
                pass
        _hard_shutdown(self.sock)


class Server:
    """Accepts connections and runs a :class:`ClientSession` thread for each."""

    def __init__(self, controller: Controller, host: str = "127.0.0.1", port: int = 7700,
                 max_payload: int = m.DEFAULT_MAX_PAYLOAD, *, tls: TlsConfig | None = None,
                 directory: Directory | None = None, acl: dict[str, set[str]] | None = None,
                 forward_timeout: float = FORWARD_TIMEOUT,
                 limits: Limits | None = None) -> None:
        self.controller = controller
        self.limits = limits or Limits()
        controller.max_instances_per_client = self.limits.max_instances_per_client
        self.gate = ConnectionGate(self.limits)
        self.pacer = AcceptPacer()
        self._backoff = 0.0   # the current wait after a failed accept (EMFILE)
        #: the ERROR frame of each recent refusal text, made once (10 us of Python)
        self._refusal_frames: dict[str, bytes] = {}
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
        self._listener = socket.create_server((host, port), backlog=BACKLOG)
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
        """One thread, one selector: the listener and the waiting room (admitted
        connections that have not sent a byte yet). The listener is left out of the
        selector while accepting pauses (a flood of refusals) or backs off (out of
        descriptors); the waiting room is served all along."""
        sel = selectors.DefaultSelector()
        listener = self._listener
        listener.setblocking(False)
        sel.register(listener, selectors.EVENT_READ, None)
        resume_at = 0.0      # monotonic time the listener is watched again; 0: it is
        shrunk = False       # the kernel's queue is PAUSED_BACKLOG long meanwhile
        try:
            while not self._stopped.is_set():
                timeout = max(0.0, resume_at - time.monotonic()) if resume_at else None
                for n, (key, _events) in enumerate(sel.select(timeout), 1):
                    if n % YIELD_EVERY == 0:
                        # A crowd closed at its deadline wakes together: let served
                        # connections run between (watchdog.YIELD_EVERY).
                        time.sleep(0)
                    if key.data is not None:
                        self._first_bytes(sel, key.fileobj, key.data)   # type: ignore[arg-type]
                    elif not resume_at:
                        resume_at = self._accept_some(sel)
                        if resume_at:
                            sel.unregister(listener)
                            if self.gate.full:
                                shrunk = self._listen(PAUSED_BACKLOG)
                if self._stopped.is_set():
                    return
                if resume_at and time.monotonic() >= resume_at:
                    resume_at = 0.0
                    if shrunk:
                        shrunk = not self._listen(BACKLOG)
                    sel.register(listener, selectors.EVENT_READ, None)
        except (OSError, ValueError):
            if not self._stopped.is_set():
                raise
        finally:
            for key in list(sel.get_map().values()):
                if key.data is not None:
                    self._drop_waiting(key.fileobj, *key.data)   # type: ignore[arg-type]
            sel.close()

    def _listen(self, backlog: int) -> bool:
        """Set the kernel's queue length; True if done."""
        try:
            self._listener.listen(backlog)
            return True
        except OSError:
            return False

    def _accept_some(self, sel: selectors.BaseSelector) -> float:
        """Accept what the kernel has queued (ACCEPT_BATCH at most, then the waiting
        room gets a turn); returns 0, or when to watch the listener again after a
        burst of refusals (AcceptPacer) or a failed accept (EMFILE: 50 ms, doubling
        to 1 s)."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self._listener.accept()
            except BlockingIOError:
                return 0.0
            except OSError as e:
                if self._stopped.is_set():
                    return 0.0
                if e.errno in _EXHAUSTED:
                    self._backoff = min(_BACKOFF_MAX, self._backoff * 2 or _BACKOFF_FIRST)
                    self._accept_trouble(
                        "accept failed: %s; new connections wait (retrying every %g s "
                        "at most), existing ones are served", e.strerror or e,
                        _BACKOFF_MAX)
                    return time.monotonic() + self._backoff
                if e.errno not in (errno.EINTR, errno.ECONNABORTED, errno.EAGAIN):
                    self._accept_trouble("accept failed: %s", e)
                    return time.monotonic() + _BACKOFF_FIRST
                continue
            self._backoff = 0.0
            if self._admit(sel, sock, addr) and self.pacer.refused():
                # A flood of refusals: the rest waits in the kernel's queue until this
                # window ends.
                return self.pacer.pause_until()
        return 0.0

    def _admit(self, sel: selectors.BaseSelector, sock: socket.socket,
               addr: tuple[str, int]) -> bool:
        """Refuse a connection over a limit at once (True), else put it in the
        waiting room until its first bytes arrive."""
        host, peer = addr[0], f"{addr[0]}:{addr[1]}"
        why = self.gate.admit(host)
        if why is not None:
            self._refuse(sock, peer, why)
            return True
        pending = _Handshaking(sock, peer, self.closing_log, plain=self._ssl is None)
        self.watchdog.watch(pending)
        try:
            sel.register(sock, selectors.EVENT_READ, (pending, host))
        except (OSError, ValueError) as e:
            self.watchdog.forget(pending)
            self.gate.release(host)
            self._refuse(sock, peer, f"cannot watch it: {e}")
            return True
        return False

    def _first_bytes(self, sel: selectors.BaseSelector, sock: socket.socket,
                     data: tuple[_Handshaking, str]) -> None:
        """A waiting connection is readable: its HELLO (or ClientHello) came, so it
        gets its session thread now. One the watchdog ended at the handshake
        deadline, or whose peer hung up, is closed here, without a thread."""
        pending, host = data
        sel.unregister(sock)
        if not pending.aborted:
            try:
                first = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                sel.register(sock, selectors.EVENT_READ, data)   # not yet, after all
                return
            except OSError:
                first = b""
            if first:
                pending.plain = False   # from now on the session thread writes
                try:
                    threading.Thread(target=self._start_session, args=(sock, pending, host),
                                     name=f"conn-{pending.peer.rsplit(':', 1)[-1]}",
                                     daemon=True).start()
                    return
                except RuntimeError as e:  # can't start new thread: the machine's limit
                    self.watchdog.forget(pending)
                    self.gate.release(host)
                    self._refuse(sock, pending.peer, f"cannot start a thread for it: {e}")
                    return
        self._drop_waiting(sock, pending, host)

    def _drop_waiting(self, sock: socket.socket, pending: _Handshaking, host: str) -> None:
        """Close a connection of the waiting room (its session never started)."""
        self.watchdog.forget(pending)
        self.gate.release(host)
        try:
            sock.close()
        except OSError:
            pass

    def _refuse(self, sock: socket.socket, peer: str, why: str) -> None:
        """Close a connection we will not serve: ERROR first on plain TCP (a TLS peer
        cannot read plain bytes), without ever blocking the accept loop."""
        self._refused("%s: refused: %s", peer, why)
        try:
            if self._ssl is None:
                frame = self._refusal_frames.get(why)
                if frame is None:
                    # The texts repeat (the limit's values; the host, per peer): each
                    # is encoded once. A few dozen at most are kept.
                    if len(self._refusal_frames) >= 64:
                        self._refusal_frames.clear()
                    frame = Connection(Role.SERVER).error_frame(
                        ProtocolError(ErrorCode.DENIED, why))
                    self._refusal_frames[why] = frame
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
        sessions = self.sessions()
        for s in sessions:
            s.t.shutdown()
            s.close()
        # A session's own thread may be closing it already (it saw the shutdown first),
        # releasing instances this thread no longer sees: let it finish, so every
        # backend is closed (a unix socket file removed) before the process may exit.
        deadline = time.monotonic() + STOP_GRACE
        for s in sessions:
            s.finished.wait(max(0.0, deadline - time.monotonic()))
        self.router.close()
        self.directory.close()
        self.controller.close()
