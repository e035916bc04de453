"""``tcp:HOST:PORT`` - a listening socket a person reaches with ``nc``/``telnet``.

Instance ``index`` listens on ``PORT + index``, so per-VM instances of one device get
consecutive ports (``PORT`` 0 picks an ephemeral port for every instance; read
``.address``). One peer at a time is served; a second one is told
``remote-hw: <label> is busy`` and closed. When the peer goes away the next one is
accepted.

One I/O thread per backend does accept, receive and the deferred part of sending;
``from_guest`` first tries a non-blocking send itself (no thread hop on the request
path) and only queues what the socket does not take (the queue, the thread and the
counters are :class:`~remote_hw.backends.queued.QueuedStreamBackend`'s).
"""

from __future__ import annotations

import select
import socket
from typing import Any

from .base import BackendError
from .queued import OUT_LIMIT, QueuedStreamBackend  # noqa: F401  (OUT_LIMIT kept here)

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



class TcpBackend(QueuedStreamBackend):
    """Listen on ``HOST:PORT+index``; relay bytes between one peer and the guest.

    The socket is bound in the constructor, so a bad argument or a port in use
    raises BackendError before the device is exposed. Attributes: ``address``
    (bound ``(host, port)``), counters ``bytes_to_guest``, ``bytes_from_guest``
    (delivered to a peer's socket), ``dropped`` (guest bytes with no peer or over
    the queue limit), ``peers_accepted``, ``peers_rejected``.
    """

    name = "tcp"
    hold_limit = HOLD_LIMIT    # the scrollback for the next peer (module docstring)

    def __init__(self, arg: str, label: str, index: int = 0) -> None:
        super().__init__(arg, label, index)
        try:
            sock = self._listen(arg, index)
        except BackendError:
            self._close_wake_pipe()
            raise
        self._listener: socket.socket | None = sock
        bound = sock.getsockname()
        self.address: tuple[str, int] = (bound[0], bound[1])
        self._peer: socket.socket | None = None    # guarded by self._lock
        self.peers_accepted = 0
        self.peers_rejected = 0

    @staticmethod
    def _listen(arg: str, index: int) -> socket.socket:
        """A non-blocking socket listening on ``HOST:PORT+index``."""
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
        return sock

    def describe(self) -> str:
        host, port = self.address
        return f"tcp:{host}:{port}"

    def status(self) -> dict[str, Any]:
        """Address, connection state and counters."""
        with self._lock:
            return {
                "address": f"{self.address[0]}:{self.address[1]}",
                **self._queue_status_locked(),
                "peers_accepted": self.peers_accepted,
                "peers_rejected": self.peers_rejected,
            }

    # -- QueuedStreamBackend -----------------------------------------------------------

    def _target(self) -> socket.socket | None:
        return self._peer

    def _write(self, target: socket.socket, data: bytes | bytearray) -> int:
        return target.send(data)

    def _lost(self, target: socket.socket, why: str) -> None:
        # A peer that hangs up or fails is dropped quietly; the next one is accepted.
        with self._lock:
            if self._peer is target:
                self._drop_peer_locked()

    def _release_locked(self) -> None:
        """Close the peer and the listener."""
        self._drop_peer_locked()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _drop_peer_locked(self) -> None:
        if self._peer is not None:
            try:
                self._peer.close()
            except OSError:
                pass
            self._peer = None
        self._discard_queue_locked()

    # -- I/O thread --------------------------------------------------------------------

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
            wlist: list[Any] = [peer] if want_write else []
            try:
                readable, writable, _ = select.select(rlist, wlist, [])
            except (OSError, ValueError):
                if self._closed:
                    return
                raise
            if self._closed:
                return
            if self._wake_r in readable:
                self._drain_wake()
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
            self._log.warning("tcp backend %s: accept failed: %s", self.label, e)
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

    def _receive(self, peer: socket.socket) -> None:
        try:
            data = peer.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost(peer, "closed")
            return
        self._deliver(data)
