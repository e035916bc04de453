"""``tcp:HOST:PORT`` - a listening socket a person reaches with ``nc``/``telnet``.

Instance ``index`` listens on ``PORT + index``, so per-VM instances of one device get
consecutive ports (``PORT`` 0 picks an ephemeral port for every instance; read
``.address``). One peer at a time is served; a second one is told
``remote-hw: <label> is busy`` and closed. When the peer goes away the next one is
accepted.

One I/O thread per backend does accept, receive and the deferred part of sending;
``from_guest`` first tries a non-blocking send itself (no thread hop on the request
path) and only queues what the socket does not take.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from typing import Any

from .base import BackendError, StreamBackend, ToGuest

log = logging.getLogger(__name__)

# Bytes queued for a slow peer before further guest output is dropped; the guest
# must never wait for a person's terminal.
OUT_LIMIT = 1 << 20
# While nobody is connected, the most recent guest output is kept (like a console's
# scrollback) and sent to the next peer on connect: a person who connects after the
# guest printed its banner still sees it.
HOLD_LIMIT = 64 << 10
RECV_SIZE = 65536


def parse_host_port(arg: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6; empty HOST = all addresses)."""
    host, sep, port_text = arg.rpartition(":")
    if not sep:
        raise BackendError(f"tcp: no port in {arg!r} (expected HOST:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port_text = port_text.strip()
    if not port_text:
        raise BackendError(f"tcp: no port in {arg!r} (expected HOST:PORT)")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise BackendError(f"tcp: bad port {port_text!r} in {arg!r}") from None
    if not 0 <= port <= 65535:
        raise BackendError(f"tcp: port {port} out of range 0-65535")
    return host, port


class TcpBackend(StreamBackend):
    """Listen on ``HOST:PORT+index``; relay bytes between one peer and the guest.

    The socket is bound in the constructor, so a bad argument or a port in use
    raises BackendError before the device is exposed. Attributes: ``address``
    (bound ``(host, port)``), counters ``bytes_to_guest``, ``bytes_from_guest``
    (delivered to a peer's socket), ``dropped`` (guest bytes with no peer or over
    the queue limit), ``peers_accepted``, ``peers_rejected``.
    """

    name = "tcp"

    def __init__(self, arg: str, label: str, index: int = 0) -> None:
        super().__init__(arg, label, index)
        host, port = parse_host_port(arg)
        if port:
            port += index
            if port > 65535:
                raise BackendError(f"tcp: port {port} (base + index {index}) is above 65535")
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise BackendError(f"tcp: cannot resolve {host!r}: {e.strerror}") from None
        family, stype, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, stype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(4)
        except OSError as e:
            sock.close()
            raise BackendError(
                f"tcp: cannot listen on {host or '*'}:{port}: {e.strerror or e}") from None
        sock.setblocking(False)
        self._listener: socket.socket | None = sock
        bound = sock.getsockname()
        self.address: tuple[str, int] = (bound[0], bound[1])
        self._lock = threading.Lock()      # guards _peer, _outbuf and the counters
        self._peer: socket.socket | None = None
        self._outbuf = bytearray()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None
        self._to_guest: ToGuest | None = None
        self._closed = False
        self.bytes_to_guest = 0
        self.bytes_from_guest = 0
        self.dropped = 0
        self.peers_accepted = 0
        self.peers_rejected = 0

    # -- StreamBackend -----------------------------------------------------------------

    def start(self, to_guest: ToGuest) -> None:
        """Start the I/O thread; received bytes go to ``to_guest``."""
        if self._closed:
            raise BackendError(f"tcp: {self.label}: backend is closed")
        if self._thread is not None:
            raise RuntimeError("TcpBackend.start() called twice")
        self._to_guest = to_guest
        self._thread = threading.Thread(target=self._run, name=f"remote-hw tcp {self.label}",
                                        daemon=True)
        self._thread.start()

    def from_guest(self, data: bytes) -> None:
        """Send to the peer without blocking; queue the rest (bounded). With no peer,
        keep the last HOLD_LIMIT bytes for the next one; count what is dropped."""
        if not data:
            return
        with self._lock:
            peer = self._peer
            if peer is None:
                self._outbuf += data
                excess = len(self._outbuf) - HOLD_LIMIT
                if excess > 0:
                    self.dropped += excess
                    del self._outbuf[:excess]
                return
            if not self._outbuf:
                try:
                    n = peer.send(data)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:
                    # The peer is gone; the I/O thread will notice and clean up.
                    self.dropped += len(data)
                    return
                self.bytes_from_guest += n
                if n == len(data):
                    return
                data = data[n:]
            room = OUT_LIMIT - len(self._outbuf)
            if len(data) > room:
                self.dropped += len(data) - room
                data = data[:room]
            self._outbuf += data
        self._wake()   # let the I/O thread wait for the socket to become writable

    def close(self) -> None:
        """Stop the thread and close the listener, the peer and the wake-up pipe."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        with self._lock:
            self._drop_peer_locked()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wake_r = self._wake_w = -1

    def describe(self) -> str:
        host, port = self.address
        return f"tcp:{host}:{port}"

    # -- extras ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a peer is connected now."""
        return self._peer is not None

    def status(self) -> dict[str, Any]:
        """Address, connection state and counters."""
        with self._lock:
            return {
                "address": f"{self.address[0]}:{self.address[1]}",
                "connected": self._peer is not None,
                "queued": len(self._outbuf),
                "bytes_to_guest": self.bytes_to_guest,
                "bytes_from_guest": self.bytes_from_guest,
                "dropped": self.dropped,
                "peers_accepted": self.peers_accepted,
                "peers_rejected": self.peers_rejected,
            }

    # -- I/O thread --------------------------------------------------------------------

    def _wake(self) -> None:
        with self._lock:
            # Under the lock so a concurrent close() cannot let us write into a
            # recycled descriptor number.
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass    # a wake-up is already pending

    def _drop_peer_locked(self) -> None:
        if self._peer is not None:
            try:
                self._peer.close()
            except OSError:
                pass
            self._peer = None
        if self._outbuf:
            self.dropped += len(self._outbuf)
            self._outbuf.clear()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:   # keep the server alive; the backend just stops serving
            log.exception("tcp backend %s failed", self.label)

    def _loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closed:
            with self._lock:
                peer = self._peer
                want_write = peer is not None and bool(self._outbuf)
            rlist: list[Any] = [listener, self._wake_r]
            if peer is not None:
                rlist.append(peer)
            wlist = [peer] if want_write else []
            try:
                readable, writable, _ = select.select(rlist, wlist, [])
            except (OSError, ValueError):
                if self._closed:
                    return
                raise
            if self._closed:
                return
            if self._wake_r in readable:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            if listener in readable:
                self._accept(listener)
            if peer is not None and peer in writable:
                self._flush(peer)
            if peer is not None and peer in readable:
                self._receive(peer)

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("tcp backend %s: accept failed: %s", self.label, e)
            return
        with self._lock:
            if self._peer is None:
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._peer = conn
                self.peers_accepted += 1
                return
            self.peers_rejected += 1
        try:
            conn.setblocking(False)
            conn.send(f"remote-hw: {self.label} is busy\r\n".encode())
        except OSError:
            pass
        conn.close()

    def _flush(self, peer: socket.socket) -> None:
        with self._lock:
            if self._peer is not peer or not self._outbuf:
                return
            try:
                n = peer.send(self._outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop_peer_locked()
                return
            self.bytes_from_guest += n
            del self._outbuf[:n]

    def _receive(self, peer: socket.socket) -> None:
        try:
            data = peer.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            with self._lock:
                if self._peer is peer:
                    self._drop_peer_locked()
            return
        with self._lock:
            self.bytes_to_guest += len(data)
        to_guest = self._to_guest
        if to_guest is not None:
            try:
                to_guest(data)
            except Exception:
                log.exception("tcp backend %s: delivering to the guest failed", self.label)
