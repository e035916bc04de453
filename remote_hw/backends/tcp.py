"""``tcp:[HOST:]PORT[,token=FILE]`` - a listening socket a person reaches with ``nc``.

Whoever connects types into the guest, so the default is the narrowest: with no HOST
(``tcp:7701``, ``tcp::7701``) the backend listens on loopback only, and listening
anywhere else must be asked for by naming the address (``tcp:0.0.0.0:7701``,
``tcp:10.0.0.5:7701``); such a backend without a token logs a warning that anyone
who can reach the address can type into the VM. ``token=FILE`` makes the peer's
first line the secret in FILE (mode 600) before anything reaches the guest
(:mod:`.listening`).

Instance ``index`` listens on ``PORT + index``, so per-VM instances of one device get
consecutive ports (``PORT`` 0 picks an ephemeral port for every instance; read
``.address``). One peer at a time is served; a second one is told
``remote-hw: <label> is busy`` and closed.

``from_guest`` first tries a non-blocking send itself (no thread hop on the request
path) and only queues what the socket does not take (the queue, the thread and the
counters are :class:`~remote_hw.backends.queued.QueuedStreamBackend`'s).
"""

from __future__ import annotations

import ipaddress
import socket

from .base import BackendError
from .listening import ListeningBackend
from .queued import OUT_LIMIT  # noqa: F401  (OUT_LIMIT kept here)

# While nobody is connected, the most recent guest output is kept (like a console's
# scrollback) and sent to the next peer on connect: a person who connects after the
# guest printed its banner still sees it.
HOLD_LIMIT = 64 << 10
#: where a backend with no HOST listens
DEFAULT_HOST = "127.0.0.1"


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
    the queue limit), ``peers_accepted``, ``peers_rejected``.
    """

    name = "tcp"
    hold_limit = HOLD_LIMIT    # the scrollback for the next peer (module docstring)

    def _open(self, address: str, index: int) -> socket.socket:
        sock = self._listen(address, index)
        bound = sock.getsockname()
        self.address: tuple[str, int] = (bound[0], bound[1])
        if not is_loopback(bound[0]) and self._token is None:
            self._log.warning(
                "tcp backend %s listens on %s:%d with no token: anyone who can reach "
                "that address can type into the VM (add token=FILE, or listen on "
                "127.0.0.1)", self.label, *self.address)
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
        return f"tcp:{host}:{port}" + (" (token)" if self._token is not None else "")
