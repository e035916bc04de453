"""``tcp:[HOST:]PORT[,token=FILE][,tls=DIR[,tls-name=NAME][,allow=NAME:...]]`` - a
listening socket a person reaches with ``nc`` (or ``openssl s_client`` with TLS).

Whoever connects types into the guest, so the default is the narrowest: with no HOST
(``tcp:7701``, ``tcp::7701``) the backend listens on loopback only, and listening
anywhere else must be asked for by naming the address (``tcp:0.0.0.0:7701``,
``tcp:10.0.0.5:7701``); such a backend with neither a token nor TLS logs a warning
that anyone who can reach the address can type into the VM. ``token=FILE`` makes the
peer's first line the secret in FILE (mode 600) before anything reaches the guest
(:mod:`.listening`). ``tls=DIR`` makes the peer speak TLS 1.3 with a client
certificate from ``DIR/ca.pem``'s CA (``allow=`` narrows it to named certificates,
:mod:`.tcp_tls`): the handshake runs on the I/O thread, non-blocking, within the
token's 10 s; a peer without a certificate, with one of another CA or not in
``allow``, or speaking plain TCP is refused with one log line (rate-limited). A
token, if also given, is then the first line inside TLS.

Instance ``index`` listens on ``PORT + index``, so per-VM instances of one device get
consecutive ports (``PORT`` 0 picks an ephemeral port for every instance; read
``.address``). One peer at a time is served; a second one is told
``remote-hw: <label> is busy`` and closed (with TLS, closed before its handshake:
the I/O thread never waits for a second peer).

``from_guest`` first tries a non-blocking send itself (no thread hop on the request
path) and only queues what the socket does not take (the queue, the thread and the
counters are :class:`~remote_hw.backends.queued.QueuedStreamBackend`'s).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from typing import Any, cast

from remote_hw.net.logsafe import RateLimitedLog, safe_text
from remote_hw.net.security import KeyMaterialError, peer_identity

from .base import BackendError
from .listening import RECV_SIZE, TOKEN_TIMEOUT, ListeningBackend, split_options
from .queued import OUT_LIMIT  # noqa: F401  (OUT_LIMIT kept here)
from .tcp_tls import TLS_HANDSHAKE_RECORD, BackendTls, handshake_failure, load_tls

# While nobody is connected, the most recent guest output is kept (like a console's
# scrollback) and sent to the next peer on connect: a person who connects after the
# guest printed its banner still sees it.
HOLD_LIMIT = 64 << 10
#: where a backend with no HOST listens
DEFAULT_HOST = "127.0.0.1"
#: seconds a TLS peer has to complete its handshake (as long as for a token line)
TLS_HANDSHAKE_TIMEOUT = TOKEN_TIMEOUT


def parse_host_port(arg: str) -> tuple[str, int]:
    """Split ``[HOST:]PORT`` (``[v6addr]:PORT`` for IPv6); no HOST means loopback."""
    host, sep, port_text = arg.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port_text = port_text.strip()
    if not port_text:
        raise BackendError(f"tcp: no port in {arg!r} (expected [HOST:]PORT)")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise BackendError(f"tcp: bad port {port_text!r} in {arg!r}") from None
    if not 0 <= port <= 65535:
        raise BackendError(f"tcp: port {port} out of range 0-65535")
    return host or DEFAULT_HOST, port


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class TcpBackend(ListeningBackend):
    """Listen on ``HOST:PORT+index``; relay bytes between one peer and the guest.

    The socket is bound in the constructor, so a bad argument or a port in use
    raises BackendError before the device is exposed. Attributes: ``address``
    (bound ``(host, port)``), counters ``bytes_to_guest``, ``bytes_from_guest``
    (delivered to a peer's socket), ``dropped`` (guest bytes with no peer or over
    the queue limit), ``peers_accepted``, ``peers_rejected``; with TLS, ``peer_name``
    (the connected peer's certificate name, once verified).
    """

    name = "tcp"
    options = frozenset({"token", "tls", "tls-name", "allow"})
    hold_limit = HOLD_LIMIT    # the scrollback for the next peer (module docstring)

    @classmethod
    def check(cls, arg: str) -> None:
        """Options and TLS key material, at server start (an instance per VM is
        opened only when a VM attaches)."""
        _address, options = split_options(arg, cls.options, cls.name)
        load_tls(options)

    def _open(self, address: str, index: int) -> socket.socket:
        self._tls: BackendTls | None = load_tls(self._options)
        self._tls_done = False            # the peer's handshake is complete
        self._tls_seen = False            # its first byte was a TLS record
        self._peer_addr = ""
        self.peer_name: str | None = None
        self._refusals = RateLimitedLog(self._log)
        sock = self._listen(address, index)
        bound = sock.getsockname()
        self.address: tuple[str, int] = (bound[0], bound[1])
        if not is_loopback(bound[0]) and self._token is None and self._tls is None:
            self._log.warning(
                "tcp backend %s listens on %s:%d with no token: anyone who can reach "
                "that address can type into the VM (add token=FILE or tls=DIR, or "
                "listen on 127.0.0.1)", self.label, *self.address)
        return sock

    @staticmethod
    def _listen(arg: str, index: int) -> socket.socket:
        """A non-blocking socket listening on ``HOST:PORT+index``."""
        host, port = parse_host_port(arg)
        if port:
            port += index
            if port > 65535:
                raise BackendError(f"tcp: port {port} (base + index {index}) is above 65535")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
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
                f"tcp: cannot listen on {host}:{port}: {e.strerror or e}") from None
        sock.setblocking(False)
        return sock

    def describe(self) -> str:
        host, port = self.address
        guards = ([self._tls.describe()] if self._tls is not None else []) + \
            (["token"] if self._token is not None else [])
        return f"tcp:{host}:{port}" + (f" ({', '.join(guards)})" if guards else "")

    def status(self) -> dict[str, Any]:
        st = super().status()
        st["tls"] = self._tls is not None
        if self._tls is not None:
            with self._lock:
                st["peer_name"] = self.peer_name if self._tls_done else None
        return st

    # -- TLS on the I/O thread (plain TCP takes ListeningBackend's path) ---------------
    #
    # The peer is the backend's ``_peer`` from accept on, not yet ``_authed``, so the
    # guest's output is held and nothing it sends reaches the guest; the loop waits
    # for it to be readable with the token's deadline. Each readable turn moves the
    # handshake on (``_receive``); once verified, a token (if any) is read inside
    # TLS as on plain TCP. OpenSSL calls on the peer's SSL object are made with the
    # lock held: ``from_guest`` writes from another thread.

    def _write(self, target: socket.socket, data: bytes | bytearray) -> int:
        try:
            return target.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            # The same bytes (and maybe more) are offered again when it is writable,
            # as OpenSSL requires after a partial record.
            raise BlockingIOError from None

    def _accept(self, listener: socket.socket) -> None:
        if self._tls is None:
            super()._accept(listener)
            return
        try:
            conn, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._log.warning("tcp backend %s: accept failed: %s", self.label, e)
            return
        with self._lock:
            if self._peer is None:
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    peer = self._tls.context.wrap_socket(
                        conn, server_side=True, do_handshake_on_connect=False)
                except (OSError, ValueError) as e:
                    conn.close()
                    self._log.warning("tcp backend %s: cannot start TLS: %s",
                                      self.label, e)
                    return
                self._peer = peer
                self._peer_addr = f"{addr[0]}:{addr[1]}"
                self._authed = self._tls_done = self._tls_seen = False
                self.peer_name = None
                self._auth_deadline = time.monotonic() + TLS_HANDSHAKE_TIMEOUT
                self.peers_accepted += 1
                return
            self.peers_rejected += 1
        # Busy: a TLS client cannot read a plain line, and a handshake would make the
        # I/O thread wait for a second peer; it is closed before its handshake.
        conn.close()

    def _receive(self, peer: socket.socket) -> None:
        if self._tls is None:
            super()._receive(peer)
            return
        tls_peer = cast(ssl.SSLSocket, peer)
        if not self._tls_done and not self._handshake(tls_peer):
            return
        data, gone = self._tls_read(tls_peer)
        if data and not self._authed:
            rest = self._check_token(peer, data)   # a token inside TLS
            data = rest or b""
        if data:
            self._deliver(data)
        if gone:
            self._lost(peer, "closed")

    def _tls_read(self, peer: ssl.SSLSocket) -> tuple[bytes, bool]:
        """What the peer sent (all records OpenSSL has), and whether it is gone."""
        chunks: list[bytes] = []
        gone = False
        with self._lock:
            if self._peer is not peer:
                return b"", False
            try:
                while True:
                    data = peer.recv(RECV_SIZE)
                    if not data:
                        gone = True
                        break
                    chunks.append(data)
                    if not peer.pending():
                        break
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError,
                    InterruptedError):
                pass
            except OSError:
                gone = True
        return b"".join(chunks), gone

    def _handshake(self, peer: ssl.SSLSocket) -> bool:
        """Move the peer's handshake on; True once it is verified (and allowed)."""
        tls = self._tls
        assert tls is not None
        if not self._tls_seen:
            try:    # the plain socket's recv: the SSL object has not started yet
                first = socket.socket.recv(peer, 1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                first = b""
            if not first:
                self._lost(peer, "closed")
                return False
            if first[0] != TLS_HANDSHAKE_RECORD:
                self._refuse_tls(peer, "it speaks plain TCP, not TLS", plain=True)
                return False
            self._tls_seen = True
        try:
            peer.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False    # more to come (a peer that stops reading meets the deadline)
        except ssl.SSLError as e:
            self._refuse_tls(peer, handshake_failure(e))
            return False
        except OSError:
            self._lost(peer, "closed")
            return False
        try:
            name = peer_identity(peer).name
        except KeyMaterialError as e:
            self._refuse_tls(peer, f"its certificate has no remote-hw role ({e})",
                             tell="your certificate is not a remote-hw one")
            return False
        if tls.allow is not None and name not in tls.allow:
            self._refuse_tls(peer, f"certificate {safe_text(name, 64)!r} is not in "
                             f"allow={':'.join(sorted(tls.allow))}",
                             tell=f"certificate {name} may not use {self.label}")
            return False
        with self._lock:
            if self._peer is not peer:
                return False
            self._tls_done = True
            self.peer_name = name
            self._authed = self._token is None
            self._auth_deadline = time.monotonic() + TOKEN_TIMEOUT   # for a token
        self._log.info("tcp backend %s: %s connected with certificate %r", self.label,
                       self._peer_addr, name)
        if self._authed:
            self._wake()    # held guest output can go to the peer now
        return True

    def _drop_peer_locked(self) -> None:
        super()._drop_peer_locked()
        self._tls_done = self._tls_seen = False
        self.peer_name = None

    def _refuse_peer(self, peer: socket.socket, tell: str, why: str) -> None:
        if self._tls is not None and not self._tls_done:
            # The deadline ran out before the handshake completed (ListeningBackend's
            # loop calls this with the token's words). A peer that sent nothing is
            # likely a plain one waiting to be spoken to: it is told in plain text.
            self._refuse_tls(cast(ssl.SSLSocket, peer),
                             f"no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:g} s",
                             plain=not self._tls_seen)
            return
        if self._tls is not None:
            why = f"{why} (certificate {self.peer_name!r}, {self._peer_addr})"
        super()._refuse_peer(peer, tell, why)

    def _refuse_tls(self, peer: ssl.SSLSocket, why: str, *, plain: bool = False,
                    tell: str | None = None) -> None:
        """Log one line (rate-limited: a peer can repeat this at will), tell the peer
        what it can read (plain text to a plain peer; over TLS once established), and
        close it."""
        self._refusals("tcp backend %s: peer %s refused: %s", self.label,
                       self._peer_addr, why)
        with self._lock:
            if self._peer is not peer:
                return
            try:
                if plain:
                    socket.socket.send(peer, (
                        f"remote-hw: {self.label} needs TLS with a client certificate "
                        f"(e.g. openssl s_client -quiet -cert NAME.pem -key NAME.key "
                        f"-CAfile ca.pem -connect HOST:PORT)\r\n").encode(),
                        socket.MSG_DONTWAIT)
                elif tell is not None:
                    peer.send(f"remote-hw: {tell}\r\n".encode())
            except OSError:
                pass
            _drain_before_close(peer)
            self.peers_rejected += 1
            self._drop_peer_locked()


def _drain_before_close(sock: socket.socket) -> None:
    """Send our FIN after what was written, and read what the peer sent meanwhile:
    closing with unread bytes would reset the connection, and the peer could lose
    the sentence (or TLS alert) it was told before reading it. The plain socket's
    calls, on an SSL socket too; never blocks."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
        for _ in range(4):
            if not socket.socket.recv(sock, RECV_SIZE, socket.MSG_DONTWAIT):
                break
    except OSError:
        pass
