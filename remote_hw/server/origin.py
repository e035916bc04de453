"""Whose request is it? The identity access control checks, through forwarding.

A device's server applies its own ``--allow`` lists. For a client connected to it
that is the client's certificate name. For a request a peer server forwards, it is
the client the peer speaks for: the entry server authenticated that client and names
it first (ORIGIN, docs/protocol.md), and the device's server takes that name only
from a connection that proved it is a server allowed to speak for others
(:meth:`~.policy.AccessPolicy.may_name_origins`). Without ORIGIN (a peer of before
FEATURE_ORIGIN) a forwarded request names nobody, and a device with a list refuses it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import ErrorCode, Status

if TYPE_CHECKING:
    from remote_hw.server.session import ClientSession

log = logging.getLogger("remote_hw.server")


def acting_name(session: ClientSession, claimed: int) -> str | None:
    """The name access control checks for a request of ``session`` that carries the
    client id ``claimed``: the connection's own name, or the origin a peer named for
    that id (None when it named none)."""
    if not session.is_peer or claimed == 0:
        return session.name
    return session.origin_names.get(claimed)


def on_origin(session: ClientSession, req: m.Origin) -> None:
    """ORIGIN: a peer server names the client behind one of its client ids."""
    if not session.is_peer or not session.server.policy.may_name_origins(session.identity):
        session._refuse(ErrorCode.DENIED,
                        f"{session.name!r} named a client it speaks for (ORIGIN), but only "
                        "an authenticated server peer may")
    known = session.origin_names.get(req.client_id)
    if req.client_id == 0 or (known is not None and known != req.name):
        status = Status.DENIED
        log.warning("%s: peer server %s named client %d %r, which it named %r before; "
                    "refused", session.peer, session.name, req.client_id, req.name, known)
    else:
        status = Status.OK
        if known is None:
            session.origin_names[req.client_id] = req.name
            log.info("%s: peer server %s speaks for client %d, authenticated as %s",
                     session.peer, session.name, req.client_id, req.name)
    session.send(m.Feedback(request_id=req.request_id, vm_id=0, client_id=session.client_id,
                            status=status, size=0, data=0))
