"""Client sessions that outlive their connection: resume tokens, the grace period, and
the window of recent writes that makes a retried write apply once.

Why. A VM's link to its server can break without the server going away: a network
partition, a server stopped (SIGSTOP) and continued, a NAT that forgot the flow. The
client then reconnects, and the guest should find its devices as it left them, not
reset. So a client that asks for it (RESUME with token 0, docs/protocol.md) gets a
random token; when its connection drops, its client id, device instances and
interrupt routing are *parked* for a grace period instead of released, and a new
connection of the same authenticated identity that presents the token takes them
back. A session nobody claims within the grace period is released as before.

A write that was in flight when the connection broke may or may not have been applied
(it may still sit in the old connection's receive buffer and be applied after the
client gave up). The client retries it on the new connection under the same request
id; the :class:`WriteWindow` remembers the answers of the session's recent writes, so
the retry is answered from memory and the device sees the write once. Reads are
never retried (the guest already went on with all ones), so they are not recorded:
the window costs nothing on the common read path.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import Status
from remote_hw.server.controller import interrupt_vms

if TYPE_CHECKING:
    from remote_hw.server.session import ClientSession

log = logging.getLogger("remote_hw.server")

#: How long a resuming connection waits for the old connection of its session to
#: finish what it had received (seconds).
RESUME_DRAIN = 2.0
#: How long a parked session keeps its device instances (seconds).
DEFAULT_GRACE = 30.0
#: How many recent writes a session remembers the answers of. A client retries only
#: what was in flight when its connection broke (one access per vCPU, and its
#: unacknowledged POSTs), so this is ample; it bounds the memory a client can make the
#: server hold. A protocol promise (m.WRITE_WINDOW): an entry server's peer link
#: re-sends forwarded POSTs by it.
WINDOW = m.WRITE_WINDOW

Answer = tuple[int, int]  # (status, value)


class WriteWindow:
    """The answers of a session's recent writes, by request id.

    :meth:`once` runs the access and records its answer under one lock, so two
    connections of the same session (the old one still draining its buffer, the new
    one retrying) cannot both apply the same request id.
    """

    __slots__ = ("size", "repeats", "_answers", "_order", "_lock")

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self.repeats = 0  # retries answered from memory (for logs and tests)
        self._answers: dict[int, Answer] = {}
        self._order: deque[int] = deque()
        self._lock = threading.Lock()

    def once(self, rid: int, access: Callable[..., Answer], *args: Any) -> Answer:
        """``access(*args)`` unless ``rid`` was applied already; its answer either way."""
        with self._lock:
            hit = self._answers.get(rid)
            if hit is not None:
                self.repeats += 1
                return hit
            answer = access(*args)
            self._answers[rid] = answer
            self._order.append(rid)
            if len(self._order) > self.size:
                self._answers.pop(self._order.popleft(), None)
            return answer

    def __len__(self) -> int:
        return len(self._answers)


class SinkRelay:
    """A client's interrupts, events and shadows go to whichever connection holds its
    session now (None while parked: they are dropped, and the levels re-sent on
    resume). The count of posted writes applied per (VM, device) lives here too, so
    that it carries on across a resumed connection as the client's count does."""

    __slots__ = ("target", "applied")

    def __init__(self, target: Any) -> None:
        self.target = target
        self.applied: dict[tuple[int, str], int] = {}

    def wants_shadow(self) -> bool:
        t = self.target
        return t is not None and t.wants_shadow()

    def shadow(self, vm_id: int, device: str, shadow: Any) -> None:
        t = self.target
        if t is not None:
            t.shadow_out(vm_id, device, shadow, self.applied.get((vm_id, device), 0))

    def forwarded_shadow(self, msg: Any) -> None:
        t = self.target
        if t is not None:
            t.forwarded_shadow(msg)

    def forwarded_post_failed(self, vm_id: int, rid: int, status: int) -> None:
        t = self.target
        if t is not None:
            t.forwarded_post_failed(vm_id, rid, status)

    def interrupt(self, vm_id: int, device: str, line: int, level: bool) -> None:
        t = self.target
        if t is not None:
            t.interrupt(vm_id, device, line, level)

    def interrupt_vms(self, vm_ids: tuple[int, ...], device: str, line: int,
                      level: bool) -> None:
        t = self.target
        if t is not None:
            interrupt_vms(t, vm_ids, device, line, level)

    def event(self, vm_id: int, device: str, name: str) -> None:
        t = self.target
        if t is not None:
            t.event(vm_id, device, name)


@dataclass(eq=False)
class Resumable:
    """One resumable client session: what a reconnecting connection takes back."""

    token: int
    client_id: int
    #: the identity that may resume it: the certificate name (TLS), else HELLO's name
    name: str
    relay: SinkRelay
    window: WriteWindow = field(default_factory=WriteWindow)
    #: the connection that holds it now; None while parked
    owner: Any = None
    #: while parked: when it is released (time.monotonic())
    expires: float = 0.0
    #: a peer server's session: the clients it speaks for (origin id -> (local client
    #: id, sink)) and their authenticated names; they are parked and resumed with it
    origins: dict[int, Any] | None = None
    origin_names: dict[int, str] | None = None

    def client_ids(self) -> list[int]:
        """The local client ids this session holds: its own, and a peer's origins'."""
        return [self.client_id, *(local for local, _ in (self.origins or {}).values())]


class ResumeTable:
    """Tokens of resumable sessions; parks them on disconnect and expires them.

    ``expire(client_id)`` releases a session nobody claimed in time (the router
    detaches its devices and forgets the client id). A parked session holds device
    instances without a connection, so their number is capped: per identity
    (``max_parked_per_name``) and in all (``max_parked``); past a cap the oldest parked
    session goes at once. One reaper thread does every expiry (no thread per session).
    """

    def __init__(self, expire: Callable[[int], None], grace: float = DEFAULT_GRACE,
                 max_parked_per_name: int = 16, max_parked: int = 1024) -> None:
        self.grace = grace
        self.max_parked_per_name = max_parked_per_name
        self.max_parked = max_parked
        self._expire_cb = expire
        self._by_token: dict[int, Resumable] = {}
        self._parked: dict[int, Resumable] = {}  # token -> session, oldest first
        self._cond = threading.Condition()
        self._reaper: threading.Thread | None = None
        self._closed = False

    def open(self, client_id: int, name: str, relay: SinkRelay, owner: Any) -> Resumable:
        """Make ``client_id``'s session resumable; its token is random and secret."""
        with self._cond:
            token = 0
            while token == 0 or token in self._by_token:
                token = secrets.randbits(64)
            res = Resumable(token, client_id, name, relay, owner=owner)
            self._by_token[token] = res
        return res

    def claim(self, token: int, name: str, owner: Any,
              peer: bool = False) -> tuple[Resumable | None, Any, str]:
        """Give the session of ``token`` to ``owner``: (session, its previous owner,
        ''), or (None, None, why) when the token is unknown, expired or another
        identity's (or a peer server's link's, and ``owner`` is not one: ``peer``)."""
        with self._cond:
            res = self._by_token.get(token)
            if res is None:
                return None, None, "unknown"
            if res.name != name:
                return None, None, f"belongs to {res.name!r}"
            if (res.origins is not None) != peer:
                return None, None, ("belongs to a peer server's link" if peer is False
                                    else "belongs to a client, not a peer server")
            self._parked.pop(token, None)
            previous, res.owner = res.owner, owner
            res.relay.target = owner
        return res, previous, ""

    def park(self, res: Resumable, owner: Any) -> None:
        """``owner``'s connection closed: keep the session for the grace period, unless
        another connection has taken it over already."""
        evicted: list[Resumable] = []
        with self._cond:
            if res.owner is not owner or self._by_token.get(res.token) is not res:
                return
            res.owner = None
            res.relay.target = None
            res.expires = time.monotonic() + self.grace
            self._parked[res.token] = res
            same = [r for r in self._parked.values() if r.name == res.name]
            for old in same[:max(0, len(same) - self.max_parked_per_name)]:
                evicted.append(self._forget(old))
            while len(self._parked) > self.max_parked:
                evicted.append(self._forget(next(iter(self._parked.values()))))
            if self._reaper is None and not self._closed:
                self._reaper = threading.Thread(target=self._reap, name="resume-reaper",
                                                daemon=True)
                self._reaper.start()
            self._cond.notify()
        log.info("client %d (%s): connection lost; its session is kept %g s for it to "
                 "resume", res.client_id, res.name, self.grace)
        for old in evicted:
            log.warning("client %d (%s): parked session released early: too many parked "
                        "sessions", old.client_id, old.name)
            for client_id in old.client_ids():
                self._expire_cb(client_id)

    def _forget(self, res: Resumable) -> Resumable:
        self._parked.pop(res.token, None)
        self._by_token.pop(res.token, None)
        return res

    def _reap(self) -> None:
        """Release parked sessions whose grace period ended."""
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = [r for r in self._parked.values() if r.expires <= now]
                for res in due:
                    self._forget(res)
                if not due:
                    soonest = min((r.expires for r in self._parked.values()), default=None)
                    self._cond.wait(None if soonest is None else soonest - now)
                    continue
            for res in due:
                log.info("client %d (%s): not resumed within %g s; its devices are "
                         "released", res.client_id, res.name, self.grace)
                for client_id in res.client_ids():
                    try:
                        self._expire_cb(client_id)
                    except Exception:  # one failed release must not stop the others
                        log.exception("releasing client %d failed", client_id)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._by_token.clear()
            self._parked.clear()
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._by_token)


# -- the session's side: RESUME, and what a closing connection leaves behind -----------


def on_resume(session: ClientSession, req: m.Resume) -> None:
    """RESUME: token 0 makes this session resumable; another token takes one back."""
    table: ResumeTable = session._router.resumes
    status, token = Status.OK, 0
    if req.token == 0 or (session.resumable is not None
                          and session.resumable.token == req.token):
        if session.resumable is None:
            session.resumable = table.open(session.client_id, session.name, session._sink,
                                           session)
            session._window = session.resumable.window
            if session.is_peer:
                # A peer server's link: the clients it speaks for are its session's.
                session.resumable.origins = session._origins
                session.resumable.origin_names = session.origin_names
        token = session.resumable.token
    elif session.resumable is not None:
        status = Status.DENIED  # one session per connection: resume before anything else
    else:
        res, previous, why = table.claim(req.token, session.name, session,
                                         peer=session.is_peer)
        if res is None:
            status = Status.NOT_ATTACHED if why == "unknown" else Status.DENIED
            log.info("%s: client %d (%s) asked to resume a session that %s; it starts "
                     "afresh", session.peer, session.client_id, session.name,
                     "this server does not know (restarted, or expired)"
                     if why == "unknown" else why)
        else:
            for fresh in [session.client_id,
                          *(local for local, _ in session._origins.values())]:
                session._router.detach(fresh)
                session._router.remove_client(fresh)
            if res.origins is not None and res.origin_names is not None:
                session._origins, session.origin_names = res.origins, res.origin_names
            session.client_id = res.client_id
            session._sink = res.relay
            session._window = res.window
            session.resumable = res
            token = res.token
            if previous is not None and previous is not session:
                previous.t.shutdown()  # its client has moved to this connection
                # What the old connection still held is applied before anything of
                # this one: posted writes stay in order (posting.py).
                previous.finished.wait(RESUME_DRAIN)
            log.info("%s: client %d (%s) resumed its session", session.peer,
                     res.client_id, session.name)
    session.send(m.Feedback(request_id=req.request_id, vm_id=0, client_id=session.client_id,
                            status=status, size=8 if token else 0, data=token))
    if token and req.token == token:
        # Line changes while the session had no connection went nowhere: say them again.
        # (A peer's: for each client it speaks for, through that client's sink.)
        controller = session._router.controller
        holders: list[tuple[int, Any]] = [(session.client_id, session._sink),
                                          *session._origins.values()]
        for client_id, sink in holders:
            for vm, device, line, level in controller.line_levels(client_id):
                sink.interrupt(vm, device, line, level)
            # The client forgot its shadows with the connection: give them again.
            for vm, device in controller.attached(client_id):
                controller.republish(client_id, vm, device)


def release(session: ClientSession) -> bool:
    """A connection closes: park its session if it is resumable. True when the
    session's client id and devices must be kept (parked, or taken over already)."""
    res = session.resumable
    if res is None:
        return False
    session._router.resumes.park(res, session)
    return True
