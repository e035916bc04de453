"""What the tcp and unix backends share: a listening socket, one peer at a time, and an
optional token the peer must present before it reaches the guest.

Why a token: whoever connects to a UART's or a keyboard's backend types into the VM.
A port on loopback is still open to every local user, so a backend can require that
the peer's first line be a secret read from a file (``token=FILE``); until it is,
the peer neither sends to the guest nor sees its output, and a wrong line, a line
over ``TOKEN_LINE_MAX`` bytes or no line within ``TOKEN_TIMEOUT`` seconds closes
the connection with one log line. The unix backend adds file permissions on top.

One peer is served at a time; a second one is told ``remote-hw: <label> is busy``
and closed. When the peer goes away the next one is accepted. A subclass opens the
listening socket (``_open``) and says where it is (``describe``); the I/O thread,
the queue and the counters are :class:`~remote_hw.backends.queued.QueuedStreamBackend`'s.
"""

from __future__ import annotations

import hmac
import os
import select
import socket
import stat
import time
from abc import abstractmethod
from typing import Any, ClassVar

from .base import BackendError
from .queued import QueuedStreamBackend

RECV_SIZE = 65536
#: seconds a connected peer has to send its token line
TOKEN_TIMEOUT = 10.0
#: the longest token line accepted (bytes, newline included)
TOKEN_LINE_MAX = 512


def split_options(arg: str, allowed: frozenset[str], backend: str
                  ) -> tuple[str, dict[str, str]]:
    """``ADDRESS[,KEY=VALUE...]`` -> (ADDRESS, {KEY: VALUE}); unknown keys are errors."""
    address, *rest = arg.split(",")
    options: dict[str, str] = {}
    for item in rest:
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            known = ", ".join(f"{k}=..." for k in sorted(allowed)) or "none"
            raise BackendError(f"{backend}: unknown option {item!r} (options: {known})")
        options[key] = value
    return address, options


def read_token(path: str, backend: str) -> bytes:
    """The secret in ``path`` (its first line, surrounding blanks stripped)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(TOKEN_LINE_MAX + 1)
            mode = os.fstat(f.fileno()).st_mode
    except OSError as e:
        raise BackendError(f"{backend}: cannot read token file {path!r}: "
                           f"{e.strerror or e}") from None
    token = raw.split(b"\n", 1)[0].strip()
    if not token or len(token) >= TOKEN_LINE_MAX:
        raise BackendError(f"{backend}: token file {path!r} must hold one line of 1-"
                           f"{TOKEN_LINE_MAX - 1} bytes")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BackendError(f"{backend}: token file {path!r} is readable by others "
                           f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
    return token


class ListeningBackend(QueuedStreamBackend):
    """A listener with one peer at a time and an optional token (module docstring).

    Counters besides the queue's: ``peers_accepted``, ``peers_rejected`` (busy, or a
    wrong or missing token).
    """

    #: option keys this backend takes after its address (``token`` for all)
    options: ClassVar[frozenset[str]] = frozenset({"token"})

    def __init__(self, arg: str, label: str, index: int = 0) -> None:
        super().__init__(arg, label, index)
        try:
            address, self._options = split_options(arg, self.options, self.name)
            token_file = self._options.get("token")
            self._token = read_token(token_file, self.name) if token_file else None
            sock = self._open(address, index)
        except BackendError:
            self._close_wake_pipe()
            raise
        self._listener: socket.socket | None = sock
        self._peer: socket.socket | None = None    # guarded by self._lock
        self._authed = False                       # the peer gave the token (or none needed)
        self._auth_buf = bytearray()
        self._auth_deadline = 0.0
        self.peers_accepted = 0
        self.peers_rejected = 0

    @abstractmethod
    def _open(self, address: str, index: int) -> socket.socket:
        """A non-blocking socket listening at ``address`` for instance ``index``."""

    # -- QueuedStreamBackend -----------------------------------------------------------

    def _target(self) -> socket.socket | None:
        # A peer that has not given the token yet sees nothing of the guest.
        return self._peer if self._authed else None

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
            was_authed = self._authed
            self._peer = None
            self._authed = False
            self._auth_buf.clear()
            if was_authed:
                self._discard_queue_locked()

    def status(self) -> dict[str, Any]:
        """Address, connection state and counters."""
        with self._lock:
            return {
                "address": self.describe(),
                "token": self._token is not None,
                **self._queue_status_locked(),
                "peers_accepted": self.peers_accepted,
                "peers_rejected": self.peers_rejected,
            }

    # -- I/O thread --------------------------------------------------------------------

    def _loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closed:
            with self._lock:
                peer = self._peer
                want_write = peer is not None and self._authed and bool(self._outbuf)
                waiting = peer is not None and not self._authed
            rlist: list[Any] = [listener, self._wake_r]
            if peer is not None:
                rlist.append(peer)
            wlist: list[Any] = [peer] if want_write else []
            timeout = max(0.0, self._auth_deadline - time.monotonic()) if waiting else None
            try:
                readable, writable, _ = select.select(rlist, wlist, [], timeout)
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
            elif waiting and peer is not None and time.monotonic() >= self._auth_deadline:
                self._refuse_peer(peer, "no token", f"no token line within "
                                  f"{TOKEN_TIMEOUT:g} s")

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._log.warning("%s backend %s: accept failed: %s", self.name, self.label, e)
            return
        with self._lock:
            if self._peer is None:
                conn.setblocking(False)
                if conn.family in (socket.AF_INET, socket.AF_INET6):
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._peer = conn
                self._authed = self._token is None
                self._auth_deadline = time.monotonic() + TOKEN_TIMEOUT
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
        if not self._authed:
            rest = self._check_token(peer, data)
            if not rest:
                return
            data = rest
        self._deliver(data)

    def _check_token(self, peer: socket.socket, data: bytes) -> bytes | None:
        """Collect the peer's first line and compare it with the token; returns what
        followed the line (for the guest) once it matched, else None."""
        assert self._token is not None
        buf = self._auth_buf
        buf += data
        line, nl, rest = bytes(buf).partition(b"\n")
        if not nl:
            if len(buf) >= TOKEN_LINE_MAX:
                self._refuse_peer(peer, "wrong token", "a first line over "
                                  f"{TOKEN_LINE_MAX} bytes")
            return None
        if len(line) >= TOKEN_LINE_MAX or \
                not hmac.compare_digest(line.strip(), self._token):
            self._refuse_peer(peer, "wrong token", "a wrong token")
            return None
        with self._lock:
            if self._peer is not peer:
                return None
            self._authed = True
            buf.clear()
        self._wake()  # held guest output can go to the peer now
        return rest

    def _refuse_peer(self, peer: socket.socket, tell: str, why: str) -> None:
        self._log.warning("%s backend %s: peer refused: %s", self.name, self.label, why)
        try:
            peer.send(f"remote-hw: {tell}\r\n".encode())
        except OSError:
            pass
        with self._lock:
            if self._peer is peer:
                self.peers_rejected += 1
                self._drop_peer_locked()
