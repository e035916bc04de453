"""Who may do what on this server: act as a server peer, use a device.

Kept apart from the connection code so the rules read in one place and can be
tested without sockets. The inputs are what the connection proved, never what a
client claimed: the TLS identity (or, without TLS, the peer address) and the name
the session settled on at the handshake.
"""

from __future__ import annotations

import ipaddress
import logging

from remote_hw.net.security import Identity, TlsConfig

log = logging.getLogger("remote_hw.server")


class AccessPolicy:
    """Peers and ``--allow`` lists. ``acl`` maps a device id to the client names
    that may use it; a device without a list is open to every authenticated client."""

    def __init__(self, tls: TlsConfig | None, acl: dict[str, set[str]] | None = None
                 ) -> None:
        self.tls = tls
        self.acl: dict[str, set[str]] = acl or {}
        if self.acl and tls is None:
            raise ValueError("access control (--allow) needs TLS: without certificates "
                             "there are no client names to check")

    def peer_allowed(self, identity: Identity | None, peer: str) -> bool:
        """May this connection act as a server peer (and speak for other clients)?

        ``identity`` is the connection's certificate identity, ``peer`` its
        ``host:port``."""
        if identity is not None:
            return identity.role == "server"
        if self.tls is not None:
            return False
        # Without TLS nothing proves who is calling; accept peers only from this host,
        # which is the one-machine default, and say so.
        host = peer.rsplit(":", 1)[0]
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
        if ok:
            log.warning("%s: accepting an unauthenticated server peer (no TLS; loopback only)",
                        peer)
        return ok

    def may_name_origins(self, identity: Identity | None) -> bool:
        """May a peer connection name the clients it speaks for (ORIGIN)? Only one
        that proved with a ``server`` certificate that it is a server of this
        platform; without TLS there are no names to check, so nothing is at stake."""
        if self.tls is None:
            return True
        return identity is not None and identity.role == "server"

    def allowed(self, name: str | None, device: str) -> bool:
        """Access control: an --allow list for the device names who may use it.

        ``name`` is the authenticated name of the client the request is *for*: the
        connection's own certificate name, or, for a request a peer server forwards,
        the origin that peer named (ORIGIN). None means a peer forwarded without
        naming anyone (a peer of before FEATURE_ORIGIN): devices with a list refuse
        it, since this server cannot apply its list to a client it does not know.
        """
        names = self.acl.get(device)
        if names is None:
            return True  # no list: any authenticated client
        return name is not None and name in names
