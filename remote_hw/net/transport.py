"""Byte streams under a protocol connection: plain TCP or mutual TLS.

Both ends of remote-hw read a connection in one thread while other threads write to
it (a vCPU sending while a leader reads; a backend thread raising an interrupt while
the connection thread waits for the next request). A plain socket allows that. An
OpenSSL connection does not: one SSL object must not be used by two threads at once.
So the TLS transport keeps its socket non-blocking, makes every SSL call under a lock,
and waits for readiness with poll() outside the lock.

``recv`` returns bytes, ``b""`` at EOF, or None when ``read_slice`` seconds passed
without data (so a caller can check its deadline); ``read_slice=None`` waits forever.
``send`` raises ``TimeoutError`` (an OSError) when the peer takes nothing for
``send_timeout`` seconds (None: it waits forever). A client's link sets it to its
access timeout: a server that stopped reading (stopped, or cut off with the socket's
buffer full) must not hold a vCPU, or an entry server's session, in ``send``.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable

from remote_hw.net.security import Identity, KeyMaterialError, peer_identity

RECV_SIZE = 65536


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


class Transport:
    """Plain TCP."""

    identity: Identity | None = None

    def __init__(self, sock: socket.socket, read_slice: float | None = None,
                 send_timeout: float | None = None) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        if read_slice is not None:
            # A kernel-side receive timeout: no poll() per read on the hot path, yet a
            # reader wakes up every read_slice seconds to check its deadline.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(read_slice))
        if send_timeout is not None:
            # Kernel-side too: a send that makes no progress for this long fails with
            # EAGAIN (Python's sendall and the C fast path raise it as an OSError).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send_timeout))
        self.sock = sock
        # The server's hot path: recv_raw(size) -> bytes, b"" at EOF, None on timeout.
        self.recv_raw: Callable[[int], bytes | None] = sock.recv
        self.send = sock.sendall  # type: ignore[method-assign,assignment]  # one call less
        self.fileno = sock.fileno  # type: ignore[method-assign]  # -1 once closed

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes | None:
        try:
            return self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None

    def fileno(self) -> int:
        return self.sock.fileno()

    def has_buffered(self) -> bool:
        """Bytes already decrypted and waiting (never for plain TCP)."""
        return False

    def shutdown(self) -> None:
        """Wake whatever blocks on the connection and end it both ways.

        The plain socket's method, also under TLS: ``SSLSocket.shutdown`` drops the
        SSL object first, after which a thread still reading gets the raw TLS records
        left in the kernel's buffer as if they were the stream (a session then parsed
        encrypted bytes as frames: "bad magic b'\\x17\\x03'"). Kept, the records
        still buffered are decrypted and read as usual, and then the reader sees EOF.
        """
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    @property
    def secure(self) -> bool:
        return False


class TlsTransport(Transport):
    """Mutual TLS; safe for one reader and several writers at once."""

    def __init__(self, sock: ssl.SSLSocket, read_slice: float | None = None,
                 send_timeout: float | None = None) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.identity = peer_identity(sock)
        self.send_timeout = send_timeout
        sock.setblocking(False)
        self.sock: ssl.SSLSocket = sock  # narrower than the base
        self.read_slice = read_slice
        self._slice_ms = None if read_slice is None else int(read_slice * 1000)
        self._lock = threading.Lock()
        self._rpoll = select.poll()  # only the one reader thread polls with it
        self._rpoll.register(sock.fileno(), select.POLLIN)
        self.recv_raw = lambda size: self.recv()  # TLS decides its own record sizes

    @classmethod
    def wrap_server(cls, raw: socket.socket, ctx: ssl.SSLContext,
                    handshake_timeout: float = 10.0) -> TlsTransport:
        """TLS handshake as the accepting side; raises ssl.SSLError/OSError/KeyMaterialError."""
        raw.settimeout(handshake_timeout)
        sock = ctx.wrap_socket(raw, server_side=True)
        return cls(sock)

    @classmethod
    def wrap_client(cls, raw: socket.socket, ctx: ssl.SSLContext, read_slice: float | None,
                    handshake_timeout: float = 10.0,
                    send_timeout: float | None = None) -> TlsTransport:
        raw.settimeout(handshake_timeout)
        sock = ctx.wrap_socket(raw, server_side=False)
        return cls(sock, read_slice, send_timeout)

    def _wait(self, events: int, timeout: float | None) -> bool:
        p = select.poll()
        p.register(self.sock.fileno(), events)
        return bool(p.poll(None if timeout is None else int(timeout * 1000)))

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        limit = self.send_timeout
        stuck = 0.0   # seconds waited since the last progress
        while view:
            with self._lock:
                try:
                    n = self.sock.send(view)
                except ssl.SSLWantWriteError:
                    n = 0
                except ssl.SSLWantReadError:
                    n = -1
            if n > 0:
                view = view[n:]
                stuck = 0.0
                continue
            slice_ = 1.0 if limit is None else min(1.0, max(0.0, limit - stuck))
            if limit is not None and slice_ <= 0:
                raise TimeoutError(f"the peer took nothing for {limit:g} s")
            t0 = time.monotonic()
            self._wait(select.POLLOUT if n == 0 else select.POLLIN, slice_)
            stuck += time.monotonic() - t0

    def recv(self) -> bytes | None:
        sock = self.sock
        while True:
            # Wait first unless OpenSSL already holds decrypted bytes: after a request
            # the answer is rarely there yet, and a failed SSL read costs an exception.
            if not sock.pending() and not self._rpoll.poll(self._slice_ms):
                return None
            with self._lock:
                try:
                    return sock.recv(RECV_SIZE)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass  # a partial record: wait for the rest
                except ssl.SSLZeroReturnError:
                    return b""

    def has_buffered(self) -> bool:
        with self._lock:
            return self.sock.pending() > 0

    @property
    def secure(self) -> bool:
        return True


__all__ = ["Transport", "TlsTransport", "KeyMaterialError", "RECV_SIZE"]
