"""One connection from a client process to one server, shared by all its VMs.

The hot path is a vCPU thread that has just taken an I/O exit and needs the server's
answer before the guest may continue. Handing the socket to a reader thread would add
a thread wake-up to every access (about 30 µs across cores here), so this link uses a
leader/follower scheme instead:

* a caller sends its request, then tries to become the *leader* (the only thread that
  reads the socket); the leader reads frames until its own feedback arrives, handing
  any other VM's feedback to that VM's waiting thread and delivering interrupts itself;
* a caller that cannot lead waits until its feedback was handed over or leadership is
  free;
* a background thread leads only while no vCPU has used the link for a short grace
  time, so interrupts still reach VMs that sit in HLT. A caller that finds the
  background thread leading pokes it through a pipe and it steps aside.

Nothing here blocks forever: every wait has the request timeout, and when the server
goes away every pending and later access fails at once with ``UNREACHABLE`` (the VM
then sees the device as removed: reads return all ones).
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from remote_hw.net import fastio
from remote_hw.net.logsafe import safe_text
from remote_hw.net.posting import POST_ID_BIT, DeviceShadow
from remote_hw.net.recovery import Recovery, poke
from remote_hw.net.security import Identity, KeyMaterialError, TlsConfig
from remote_hw.net.transport import TlsTransport, Transport
from remote_hw.protocol import CLOSED, NEED_DATA, Connection, ProtocolError, Role
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import Status

log = logging.getLogger("remote_hw.client")

# vm id, device, line, level, client id (the client id matters to a forwarding server)
InterruptCallback = Callable[[int, str, int, bool, int], None]
EventCallback = Callable[[int, str, str, int], None]  # vm id, device, event name, client id
StateCallback = Callable[["ServerLink", bool, str], None]  # link, up, reason

_now = time.monotonic
_request = fastio.request
_post = fastio.post
_UNREACHABLE = int(Status.UNREACHABLE)
# How long the link must be quiet before the background reader takes over. Short
# enough that an idle VM gets its interrupts promptly, long enough that a busy vCPU
# does not trade leadership with it on every access.
IDLE_GRACE = 0.002
# Slice of a blocking read; a leader re-checks its deadline this often.
READ_SLICE = 0.1


class LinkError(ConnectionError):
    """The server cannot be reached or refused the handshake."""


class _Slot:
    """Where a request's feedback lands."""

    __slots__ = ("done", "status", "value", "deadline")

    def __init__(self) -> None:
        self.done = False
        self.status: int = Status.TIMEOUT
        self.value = 0
        self.deadline = 0.0

    @classmethod
    def failed(cls) -> _Slot:
        """A request that could not be sent: the server is unreachable."""
        slot = cls()
        slot.status, slot.done = _UNREACHABLE, True
        return slot


class ServerLink:
    """A connection to one server, shared by every VM of this process."""

    def __init__(self, name: str, address: tuple[str, int], *, client_name: str = "agent",
                 timeout: float = 5.0, on_interrupt: InterruptCallback | None = None,
                 on_event: EventCallback | None = None,
                 on_state: StateCallback | None = None, tls: TlsConfig | None = None,
                 role: Role = Role.CLIENT, reconnect: bool = False,
                 posting: bool = True, on_shadow: Callable[[m.Shadow], None] | None = None,
                 on_post_failed: Callable[[int, int, int], None] | None = None) -> None:
        self.name = name
        self.address = address
        self.client_name = client_name
        self.timeout = timeout
        self.tls = tls
        self.role = role
        self.peer: Identity | None = None  # the server's certificate identity (TLS)
        self.on_interrupt = on_interrupt or (lambda vm, dev, line, level, cid: None)
        self.on_event = on_event or (lambda vm, dev, name, cid: None)
        self.on_state = on_state or (lambda link, up, reason: None)
        self.client_id = 0
        self.server_name = ""
        self.up = False
        self.down_reason = "not connected"
        self._t: Transport | None = None
        self._conn = Connection(Role.CLIENT)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Slot] = {}
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._waiters = 0
        self._last_active = 0.0
        self._bg_leading = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._closing = False
        self._bg: threading.Thread | None = None
        # The C request path (remote_hw/net/fastio.py) serves plain TCP; TLS stays in Python.
        self._fast = False
        # reconnect=True: a lost connection is brought back (recovery.py), with its
        # session resumed or its devices attached again.
        self._recovery: Recovery | None = Recovery(self) if reconnect else None
        # Posted writes and shadows (posting.py): per (VM, device), shared with the
        # devices that use them; and POST frames held back while the link is corked.
        # False: do not offer POSTED, so every access waits for its answer (--no-posting).
        self.posting = posting
        self._shadows: dict[tuple[int, str], DeviceShadow] = {}
        # Server-to-server links: the recent POSTs passed on (forward_post), to send
        # again after a resumed session (see resend_posts).
        self._forwarded: deque[tuple[int, tuple[Any, ...]]] = deque(maxlen=m.WRITE_WINDOW)
        self._held: list[bytes] = []
        self._corks = 0
        self.post_failures = 0
        # Server-to-server links hand SHADOWs and failed POSTs (request id, vm, status)
        # to the forwarder instead of keeping them (server/forward.py).
        self.on_shadow = on_shadow
        self.on_post_failed = on_post_failed
        #: TLS: the certificate name the server must present (a server-to-server link
        #: names the server it means; None: any server certificate of the CA)
        self.expect_name: str | None = None
        #: where the server is now, asked again before each reconnect attempt (a
        #: directory's answer: a restarted server may listen elsewhere); None: fixed
        self.locate: Callable[[], tuple[str, int] | None] | None = None
        #: called when a reconnect finds the session gone (the server restarted),
        #: before the devices are attached again
        self.on_new_session: Callable[[ServerLink], None] | None = None

    # -- connection -------------------------------------------------------------

    def connect(self, connect_timeout: float = 5.0) -> ServerLink:
        """Connect and shake hands; raises :class:`LinkError` with the reason."""
        t, conn, welcome = self._handshake(connect_timeout)
        self._install(t, conn, welcome, "connected")
        if self._recovery is not None:
            self._recovery.connected()
        return self

    @property
    def features(self) -> int:
        """The feature bits negotiated on the current connection (0 before one)."""
        return self._conn.features

    @property
    def offered_features(self) -> int:
        """The feature bits this link offers in HELLO."""
        return m.SUPPORTED_FEATURES if self.posting else m.SUPPORTED_FEATURES & ~m.FEATURE_POSTED

    @property
    def recovery(self) -> Recovery | None:
        """What brings this link back after a loss (None: it stays down)."""
        return self._recovery

    def _handshake(self, connect_timeout: float) -> tuple[Transport, Connection, m.Welcome]:
        """A new connection with the handshake done, not yet used by the link."""
        host, port = self.address
        where = f"server {self.name} at {host}:{port}"
        try:
            raw = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as e:
            raise LinkError(f"{where}: cannot connect: {e.strerror or e}") from None
        try:
            if self.tls is not None:
                t: Transport = TlsTransport.wrap_client(raw, self.tls.client_context(),
                                                        READ_SLICE, connect_timeout,
                                                        send_timeout=self.timeout)
                if t.identity is None or t.identity.role != "server":
                    t.close()
                    raise LinkError(f"{where}: its certificate ({t.identity}) is not a "
                                    "server's; refusing to talk to it")
                if self.expect_name is not None and t.identity.name != self.expect_name:
                    t.close()
                    raise LinkError(f"{where}: presents certificate {t.identity.name!r}, "
                                    f"not {self.expect_name!r}; refused")
                self.peer = t.identity
            else:
                t = Transport(raw, READ_SLICE, send_timeout=self.timeout)
        except (ssl.SSLError, KeyMaterialError) as e:
            raw.close()
            raise LinkError(f"{where}: TLS handshake failed: {e}") from None
        except OSError as e:
            raw.close()
            raise LinkError(f"{where}: TLS handshake failed: {e.strerror or e}") from None
        conn = Connection(Role.CLIENT)
        deadline = _now() + connect_timeout
        try:
            t.send(conn.send(m.Hello(major=m.PROTOCOL_MAJOR, minor=m.PROTOCOL_MINOR,
                                     max_payload=m.DEFAULT_MAX_PAYLOAD,
                                     features=self.offered_features, role=self.role,
                                     name=self.client_name)))
            welcome = None
            while welcome is None:
                data = t.recv()
                if data is None:
                    if _now() > deadline:
                        raise TimeoutError
                    continue
                conn.receive_data(data)
                while True:
                    ev = conn.next_event()
                    if ev is NEED_DATA:
                        break
                    if ev is CLOSED:
                        raise LinkError(f"{where}: closed the connection during the handshake")
                    if isinstance(ev, m.Error):
                        raise LinkError(f"{where}: refused the handshake: "
                                        f"{safe_text(ev.text)}")
                    if isinstance(ev, m.Welcome):
                        welcome = ev
                        break
        except TimeoutError:
            t.close()
            raise LinkError(f"{where}: no answer to the handshake") from None
        except ProtocolError as e:
            t.close()
            raise LinkError(f"{where}: handshake failed: {e}") from None
        except LinkError:
            t.close()
            raise
        except OSError as e:
            t.close()
            raise LinkError(f"{where}: handshake failed: {e.strerror or e}") from None
        return t, conn, welcome

    def _install(self, t: Transport, conn: Connection, welcome: m.Welcome, how: str,
                 client_id: int | None = None) -> None:
        """Use the connection ``t`` from now on: the link is up. ``client_id``: the id
        of a resumed session, when it is not the one WELCOME gave."""
        old = self._bg
        if old is not None and old is not threading.current_thread() and old.is_alive():
            poke(self._wake_w)  # the last connection's reader must be gone first
            old.join(timeout=2)
        self._t, self._conn = t, conn
        self._fast = not t.secure and fastio.enabled()
        self.client_id = welcome.client_id if client_id is None else client_id
        self.server_name = welcome.name
        where = f"server {self.name} at {self.address[0]}:{self.address[1]}"
        if how == "connected":
            log.info("%s: connected as client %d (server calls itself %s)", where,
                     self.client_id, welcome.name)
        else:  # said before the first access succeeds, so the log reads in order
            log.warning("%s is back: %s", where, how)
        self.up = True
        self.down_reason = ""
        self._bg = threading.Thread(target=self._background, name=f"link-{self.name}",
                                    daemon=True)
        self._bg.start()
        self.on_state(self, True, how)

    def close(self) -> None:
        """Close the connection; pending requests fail with UNREACHABLE."""
        self._closing = True
        if self._recovery is not None:
            self._recovery.stop()
        self._down("closed by this client")
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._bg is not None and self._bg is not threading.current_thread():
            self._bg.join(timeout=2)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _lost(self, e: OSError) -> str:
        """Why the connection is taken for lost, from the error that said so."""
        if isinstance(e, (BlockingIOError, TimeoutError)):
            # The transport's send timeout (SO_SNDTIMEO, or TLS's own): the socket's
            # buffers are full because the server reads nothing.
            return (f"the server took nothing sent to it for {self.timeout:g} s "
                    "(stopped, or cut off)")
        return f"connection lost: {e.strerror or e}"

    def _down(self, reason: str) -> None:
        """Mark the link dead and fail everything that waits on it."""
        with self._cond:
            if not self.up and self._t is None:
                return
            was_up = self.up
            if was_up and not self._closing:
                # Logged before `up` turns false, under the lock: whoever sees the link
                # down (or gets UNREACHABLE from it) can rely on the reason being logged.
                log.error("server %s (%s:%d) is gone: %s; its devices now read as all ones "
                          "and writes are dropped", self.name, *self.address, reason)
            self.up = False
            self.down_reason = reason
            pending, self._pending = self._pending, {}
            for slot in pending.values():
                slot.status = Status.UNREACHABLE
                slot.done = True
            t, self._t = self._t, None
            self._cond.notify_all()
        if t is not None:
            t.shutdown()
            t.close()
        self._drop_shadows(reason)
        if was_up:
            self.on_state(self, False, reason)
            if not self._closing and self._recovery is not None:
                self._recovery.lost(reason)

    # -- requests ---------------------------------------------------------------

    def io(self, vm_id: int, device: str, kind: int, offset: int, size: int, direction: int,
           data: int = 0, server_id: str = "", client_id: int = 0,
           hops: int = 0) -> tuple[int, int]:
        """One register access; returns (status, value). Never blocks past the timeout.

        This is the vCPU's hot path: it stays flat on purpose (each Python call level
        costs a fraction of a microsecond, and a forwarded access is ~30 µs in all).
        """
        if not self.up:
            return _UNREACHABLE, 0
        if self._held:  # this VM's posted writes go first: the server applies in order
            self._flush_held()
        rid = next(self._ids)
        if self._fast and self._rlock.acquire(blocking=False):
            # Leader at once, plain TCP: the C path encodes, sends, reads once and parses
            # the common answer (fastio.py). Inline, not a method: this is the hot path.
            r: Any = NotImplemented
            try:
                t = self._t
                if t is not None and not self._conn.buffered:
                    self._last_active = _now()
                    # fileno() is -1 once the socket is closed: the C fails with EBADF.
                    r = _request(t.fileno(), self._wlock, rid, vm_id, client_id, offset,
                                 data, kind, size, direction, hops, server_id, device)
                    if r is not NotImplemented and type(r) is not tuple:
                        r = self._lead_from(rid, r)  # not only our answer: the long way
            except OSError as e:
                self._down(self._lost(e))
                r = _UNREACHABLE, 0
                if direction and self._recovery is not None:  # a write cut short
                    self._recovery.in_flight((rid, vm_id, client_id, offset, data, kind,
                                              size, direction, hops, server_id, device))
            finally:
                self._release_lead()
            if type(r) is tuple:
                return r
            if r is not NotImplemented:  # a slot still to be answered, now as a follower
                self._await(r, rid, r.deadline)
                if r.status and direction and self._recovery is not None and not self.up:
                    self._recovery.in_flight((rid, vm_id, client_id, offset, data, kind,
                                              size, direction, hops, server_id, device))
                return r.status, r.value
        try:
            # The positional fast path: building an IoRequest object costs more than the send.
            frame = self._conn.send_io_request(rid, vm_id, client_id, offset, data, kind,
                                               size, direction, hops, server_id, device)
        except ProtocolError:  # the connection closed between the check and here
            return Status.UNREACHABLE, 0
        slot = self._call(rid, frame)
        if slot.status and direction and self._recovery is not None and not self.up:
            # A write the connection broke under: the resumed session gets it again,
            # under the same request id, and applies it once (recovery.py).
            self._recovery.in_flight((rid, vm_id, client_id, offset, data, kind, size,
                                      direction, hops, server_id, device))
        return slot.status, slot.value

    def attach(self, vm_id: int, device: str, server_id: str = "", client_id: int = 0) -> int:
        """Ask the server for an instance of ``device`` for ``vm_id``; returns a status.

        ``client_id`` is only for server-to-server links: the client a forwarding
        server speaks for. A client's own requests carry 0.
        """
        if not client_id:  # a new attachment: its shadow (if any) comes with the answer
            self.shadow_for(vm_id, device).clear()
        status = self._call_msg(lambda rid: m.Attach(request_id=rid, vm_id=vm_id,
                                                     client_id=client_id,
                                                     server_id=server_id, device_id=device))
        if status == Status.OK and self._recovery is not None:
            self._recovery.attached_device(vm_id, device, server_id, client_id)
        return status

    def detach(self, vm_id: int, client_id: int = 0) -> int:
        """Release every device instance of ``vm_id`` on this server."""
        if self._recovery is not None:
            self._recovery.detached_vm(vm_id, client_id)
        status = self._call_msg(lambda rid: m.Detach(request_id=rid, vm_id=vm_id,
                                                     client_id=client_id))
        if status == Status.UNREACHABLE and self._recovery is not None:
            # The link is down: a resumed session still holds the VM's devices, so
            # the DETACH goes first once it is back.
            self._recovery.unsent_detaches[(vm_id, client_id)] = None
        return status

    def origin(self, client_id: int, name: str) -> int:
        """Server-to-server links: name the authenticated client behind ``client_id``
        (ORIGIN), so that the device's server applies its own ``--allow`` to it."""
        status = self._call_msg(lambda rid: m.Origin(request_id=rid, client_id=client_id,
                                                     name=name))
        if status == Status.OK and self._recovery is not None:
            self._recovery.origins[client_id] = name   # named again on a fresh session
        return status

    def forget_origin(self, client_id: int) -> None:
        """The client behind ``client_id`` is gone: a fresh session does not name it."""
        if self._recovery is not None:
            self._recovery.origins.pop(client_id, None)

    def request_resume(self, token: int) -> tuple[int, int]:
        """RESUME: (status, token). Token 0 asks the server to keep this session for a
        while when the connection is lost; the token it answers takes it back."""
        slot = self._call_slot(lambda rid: m.Resume(request_id=rid, token=token))
        return slot.status, slot.value

    def _call_msg(self, make: Callable[[int], m.Message]) -> int:
        return self._call_slot(make).status

    def _call_slot(self, make: Callable[[int], m.Message]) -> _Slot:
        """Send the message ``make(request id)`` and wait for its FEEDBACK."""
        if not self.up:
            return _Slot.failed()
        if self._held:
            self._flush_held()
        rid = next(self._ids)
        try:
            frame = self._conn.send(make(rid))
        except ProtocolError:
            return _Slot.failed()
        return self._call(rid, frame)

    def _lead_from(self, rid: int, data: bytes | None) -> _Slot:
        """As leader, after the C path sent ``rid`` and read ``data`` that is not just
        its answer: register the request and go on as the Python path does."""
        slot = self._pending[rid] = _Slot()
        slot.deadline = _now() + self.timeout
        if not self.up:  # went down after the check in io(): nobody will answer
            slot.status, slot.done = _UNREACHABLE, True
            return slot
        self._first_read(slot, rid, data, slot.deadline)
        return slot

    def _call(self, rid: int, frame: bytes) -> _Slot:
        slot = _Slot()
        self._last_active = _now()
        t = self._t
        if t is None:
            slot.status = Status.UNREACHABLE
            return slot
        self._pending[rid] = slot
        deadline = _now() + self.timeout
        # Common case first: nobody reads the socket, so this thread leads. Taking the
        # read lock *before* sending means no other thread can take our feedback, and
        # the answer is read by the thread that waits for it: no hand-over, no wake-up.
        if self._rlock.acquire(blocking=False):
            try:
                with self._wlock:
                    t.send(frame)
                # Inline first read: usually exactly our feedback arrives, and nothing else.
                data = t.recv()
            except OSError as e:
                self._down(self._lost(e))
            else:
                self._first_read(slot, rid, data, deadline)
            finally:
                self._release_lead()
        else:
            try:
                with self._wlock:
                    t.send(frame)
            except OSError as e:
                self._down(self._lost(e))
        if not slot.done:
            self._await(slot, rid, deadline)
        self._last_active = _now()
        return slot

    def _release_lead(self) -> None:
        """Give up leadership; wake followers, which may lead now or were answered."""
        self._rlock.release()
        if self._waiters:
            with self._cond:
                self._cond.notify_all()

    def _first_read(self, slot: _Slot, rid: int, data: bytes | None, deadline: float) -> None:
        """As leader with the request sent: take the first read, then lead until done."""
        try:
            if data:
                conn = self._conn
                conn.receive_data(data)
                f = conn.next_feedback()
                if f is not None and f.request_id == rid and not conn.buffered:
                    self._pending.pop(rid, None)  # _down() may have emptied it meanwhile
                    slot.status, slot.value, slot.done = f.status, f.data, True
                else:
                    if f is not None:  # someone else's: put it where it belongs
                        other = self._pending.pop(f.request_id, None)
                        if other is not None:
                            self._answer(other, f.status, f.data)
                        elif f.request_id & POST_ID_BIT:
                            self._post_failed(f)
                    self._dispatch()
            elif data is not None:
                self._down("the server closed the connection")
            if not slot.done:
                self._lead_until(slot, deadline)
        except ProtocolError as e:
            self._protocol_failure(e)
        except OSError as e:
            self._down(self._lost(e))

    def _await(self, slot: _Slot, rid: int, deadline: float) -> None:
        """Wait as a follower, or lead when leadership becomes free, until answered."""
        while not slot.done:
            if not self.up:  # a slot _down() did not see (registered after it ran)
                slot.status = _UNREACHABLE
                slot.done = True
                return
            if self._rlock.acquire(blocking=False):
                try:
                    self._lead_until(slot, deadline)
                finally:
                    self._release_lead()
            else:
                if self._bg_leading:
                    try:
                        os.write(self._wake_w, b"x")  # ask the background reader to yield
                    except OSError:
                        pass
                with self._cond:
                    self._waiters += 1
                    try:
                        while not slot.done and self._rlock.locked():
                            left = deadline - _now()
                            if left <= 0:
                                break
                            self._cond.wait(left)
                    finally:
                        self._waiters -= 1
            if not slot.done and _now() >= deadline:
                self._pending.pop(rid, None)
                slot.status = Status.TIMEOUT
                slot.done = True
                # A server that leaves a request unanswered this long is treated as gone:
                # otherwise every later access would stall the guest for the full timeout.
                self._down(f"no answer to a request within {self.timeout:g} s")

    def _lead_until(self, slot: _Slot, deadline: float) -> None:
        """As leader, read frames until ``slot`` is answered or the deadline passes."""
        while not slot.done and self.up:
            self._read_and_dispatch()
            if not slot.done and _now() >= deadline:
                return

    def _read_and_dispatch(self) -> None:
        t = self._t
        if t is None:
            return
        try:
            data = t.recv()
        except OSError as e:
            self._down(self._lost(e))
            return
        if data is None:
            return  # the read slice ended; caller checks its deadline
        try:
            self._conn.receive_data(data)
            self._dispatch()
        except ProtocolError as e:
            self._protocol_failure(e)

    def _protocol_failure(self, e: ProtocolError) -> None:
        t = self._t
        if t is not None:
            try:
                t.send(self._conn.error_frame(e))
            except OSError:
                pass
        self._down(f"protocol error from the server: {e}")

    def _answer(self, slot: _Slot, status: int, value: int) -> None:
        """Complete another caller's request and wake it. Its caller may already wait
        on the condition as a follower (it sent while this thread led the reading):
        without the wake-up it sleeps until the leader's own call ends, which for a
        forwarded call can be a whole timeout."""
        slot.status, slot.value, slot.done = status, value, True
        if self._waiters:
            with self._cond:
                self._cond.notify_all()

    def _dispatch(self) -> None:
        conn = self._conn
        pending = self._pending
        next_feedback = conn.next_feedback
        while True:
            f = next_feedback()  # the common frame, without building a message object
            if f is not None:
                slot = pending.pop(f.request_id, None)
                if slot is not None:  # _answer(), inline: the common frame's path
                    slot.status, slot.value = f.status, f.data
                    slot.done = True
                    if self._waiters:
                        with self._cond:
                            self._cond.notify_all()
                elif f.request_id & POST_ID_BIT:
                    self._post_failed(f)
                continue
            # Any: the identity checks on type(ev) below narrow it, which mypy cannot see
            # (they are cheaper than isinstance on this path).
            ev: Any = conn.next_event()
            if ev is NEED_DATA:
                return
            cls = type(ev)
            if cls is m.Feedback:
                slot = pending.pop(ev.request_id, None)
                if slot is None and ev.request_id & POST_ID_BIT:
                    self._post_failed(ev)
                    continue
                if slot is None:
                    log.debug("server %s: late or unknown feedback %d", self.name,
                              ev.request_id)
                    continue
                self._answer(slot, ev.status, ev.data)
            elif cls is m.Shadow:
                self._on_shadow(ev)
            elif cls is m.Interrupt:
                self.on_interrupt(ev.vm_id, ev.device_id, ev.line, bool(ev.level),
                                  ev.client_id)
            elif cls is m.Event:
                self.on_event(ev.vm_id, ev.device_id, ev.name, ev.client_id)
            elif ev is CLOSED:
                self._down("the server closed the connection")
                return
            elif cls is m.Error:
                log.error("server %s reports error %s: %s", self.name,
                          getattr(ev.code, "name", ev.code), safe_text(ev.text))
                slot = pending.pop(ev.request_id, None) if ev.request_id else None
                if slot is not None:
                    self._answer(slot, Status.DEVICE_ERROR, 0)
            elif cls is m.Ping:
                self._send_quiet(m.Pong(nonce=ev.nonce))
            # Pong and anything else a client may receive: nothing to do.

    # -- posted writes and shadows (posting.py) ------------------------------------

    def shadow_for(self, vm_id: int, device: str) -> DeviceShadow:
        """The shadow of ``device`` for ``vm_id`` on this link (made on first use and
        kept: a device holds on to it and reads it on every access)."""
        key = (vm_id, device)
        sh = self._shadows.get(key)
        if sh is None:
            sh = self._shadows[key] = DeviceShadow(vm_id, device,
                                                   keep=self._recovery is not None)
        return sh

    def post(self, sh: DeviceShadow, kind: int, offset: int, size: int, data: int,
             server_id: str = "") -> int:
        """Send a write without waiting for it (the caller checked ``sh.may_post``);
        returns a status: OK once it is on its way, UNREACHABLE when the link is down.
        A failure the server reports later is logged and counted (``post_failures``)."""
        rid = next(self._ids) | POST_ID_BIT
        sent = self._send_post(rid, sh.vm_id, 0, kind, offset, size, data, 0, server_id,
                               sh.device)
        if sent is None:
            return _UNREACHABLE
        sh.sent += 1
        if sh.kept is not None:
            sh.kept.append((rid, kind, offset, size, data, server_id))
        return 0 if sent and self.up else _UNREACHABLE

    def post_id(self) -> int:
        """A request id for :meth:`forward_post` (taken first, so the caller can file
        it before a failure report can come back)."""
        return next(self._ids) | POST_ID_BIT

    def forward_post(self, rid: int, vm_id: int, client_id: int, kind: int, offset: int,
                     size: int, data: int, hops: int, server_id: str,
                     device: str) -> bool | None:
        """Server-to-server links: pass a client's POST on under ``rid`` (from
        :meth:`post_id`). True: sent. False: the connection broke while sending it (it
        is sent again if the session resumes). None: not sent (the link is down). A
        failure the server reports comes back to ``on_post_failed``."""
        args = (rid, vm_id, client_id, kind, offset, size, data, hops, server_id, device)
        sent = self._send_post(*args)
        if sent and not self.up:
            sent = False   # it went out as the link broke: as if cut off
        if sent is not None and self._recovery is not None:
            # Kept also when the connection broke while sending it: it may have
            # reached the server, and sent again it is applied once, as a write in
            # flight is (its client was told it failed, as for a timed-out write).
            # Not kept when it was never sent: then it must never apply.
            self._forwarded.append((rid & ~POST_ID_BIT, args))
            if not sent:
                self._recovery.cut_posts += 1
        return sent

    def _send_post(self, rid: int, vm_id: int, client_id: int, kind: int, offset: int,
                   size: int, data: int, hops: int, server_id: str,
                   device: str) -> bool | None:
        """Send one POST: True when it went (or is held by cork()), False when the
        connection failed while sending it, None when it was not sent at all."""
        t = self._t
        if not self.up or t is None:
            return None
        if self._fast and not self._corks:
            # C: encode and send in one call (False: a value the codec must judge).
            try:
                if _post(t.fileno(), self._wlock, rid, vm_id, client_id, offset, data, kind,
                         size, hops, server_id, device):
                    return True
            except OSError as e:
                self._down(self._lost(e))
                return False
        try:
            frame = self._conn.send_post(rid, vm_id, client_id, offset, data, kind, size, hops,
                                         server_id, device)
        except ProtocolError:
            return None
        try:
            with self._wlock:
                if self._corks:
                    self._held.append(frame)
                else:
                    t.send(frame)
        except OSError as e:
            self._down(self._lost(e))
            return False
        return True

    def cork(self) -> None:
        """Hold POSTs back until :meth:`uncork`, to send them in one write (a vCPU
        draining KVM's coalesced ring posts several writes in a row)."""
        with self._wlock:
            self._corks += 1

    def uncork(self) -> None:
        """Send what :meth:`cork` held back, in one write."""
        with self._wlock:
            self._corks -= 1
        if not self._corks and self._held:
            self._flush_held()

    def _flush_held(self) -> None:
        t = self._t
        try:
            with self._wlock:
                held, self._held = self._held, []
                if held and t is not None:
                    t.send(b"".join(held))
        except OSError as e:
            self._down(self._lost(e))

    def _on_shadow(self, msg: m.Shadow) -> None:
        if not self.posting:
            return
        if self.on_shadow is not None:  # a server-to-server link relays it
            self.on_shadow(msg)
            return
        sh = self.shadow_for(msg.vm_id, msg.device_id)
        sh.update(msg)

    def _post_failed(self, fb: Any) -> None:
        """The FEEDBACK of a POST that failed: logged (a few lines, then counted)."""
        self.post_failures += 1
        if self.on_post_failed is not None:  # a server-to-server link relays it
            self.on_post_failed(fb.request_id, fb.vm_id, int(fb.status))
            return
        for sh in self._shadows.values():
            if sh.vm_id == fb.vm_id:
                sh.failed += 1
        if self.post_failures <= 5 or self.post_failures % 1000 == 0:
            name = Status(fb.status).name if fb.status in Status._value2member_map_ \
                else fb.status
            log.error("server %s: a posted write of vm %d failed: %s (%d so far)",
                      self.name, fb.vm_id, name, self.post_failures)

    def _drop_shadows(self, reason: str) -> None:
        """The connection is gone: nothing is answered locally any more; POSTs not
        known applied are kept for a resumed session (recovery re-sends them) or
        reported lost."""
        self._held = []  # held POSTs were counted as sent: kept or reported below
        lost = 0
        for sh in self._shadows.values():
            sh.reads = {}
            sh.posted = 0
            if sh.kept is None:
                n = sh.sent - sh.confirmed
                sh.lost += n
                lost += n
                sh.sent = sh.confirmed = 0
        if lost and not self._closing:
            log.error("server %s: up to %d posted write(s) may not have been applied (%s)",
                      self.name, lost, reason)

    def resend_posts(self, send: Callable[[bytes], None], conn: Connection) -> int:
        """After a resumed session: the POSTs not known applied, again, with their ids
        (the server applies each id once), encoded by ``conn``, the new connection's
        (the old one may be closed: a server that hung up). Returns how many."""
        n = 0
        frames = []
        for sh in self._shadows.values():
            if sh.kept:
                for rid, kind, offset, size, data, server_id in sh.kept:
                    frames.append(conn.send_post(rid, sh.vm_id, 0, offset, data, kind,
                                                       size, 0, server_id, sh.device))
                    n += 1
        # Forwarded POSTs (an entry server's link) are not acknowledged to this link,
        # so the recent ones are all sent again: those the server applied are in its
        # window of recent writes (m.WRITE_WINDOW) and answered from it, as long as
        # fewer requests than that were issued since. Older ones are not re-sent.
        newest = next(self._ids)
        for low, (rid, vm_id, client_id, kind, offset, size, data, hops, server_id,
                  device) in list(self._forwarded):
            if newest - low < m.WRITE_WINDOW:
                frames.append(conn.send_post(rid, vm_id, client_id, offset, data, kind,
                                                   size, hops, server_id, device))
                n += 1
        self._forwarded.clear()
        if frames:
            send(b"".join(frames))
        return n

    def forget_posts(self) -> int:
        """After a connection whose session was not resumed: every device starts again;
        returns how many POSTs may have been lost."""
        lost = 0
        self._forwarded.clear()   # mostly applied (they are never acknowledged here)
        for sh in self._shadows.values():
            n = sh.clear()
            sh.lost += n
            lost += n
        return lost

    def _send_quiet(self, msg: m.Message) -> None:
        t = self._t
        if t is None:
            return
        try:
            with self._wlock:
                t.send(self._conn.send(msg))
        except OSError:
            pass

    # -- background reader -------------------------------------------------------

    def _background(self) -> None:
        """Read the socket while no vCPU does, so interrupts reach idle VMs."""
        poller = select.poll()
        while self.up and not self._closing:
            idle_for = time.monotonic() - self._last_active
            if idle_for < IDLE_GRACE:
                time.sleep(IDLE_GRACE - idle_for)
                continue
            if not self._rlock.acquire(blocking=False):
                time.sleep(IDLE_GRACE)
                continue
            try:
                t = self._t
                if t is None:
                    return
                fd = t.fileno()
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                poller.register(self._wake_r, select.POLLIN)
                self._bg_leading = True
                while self.up and not self._closing:
                    # TLS may hold decrypted bytes that poll() cannot see.
                    events = {fd: 1} if t.has_buffered() else dict(poller.poll(1000))
                    if self._wake_r in events:
                        try:
                            while os.read(self._wake_r, 64):
                                pass
                        except OSError:
                            pass
                    if fd in events:
                        self._read_and_dispatch()
                    if self._wake_r in events:
                        break  # a vCPU wants to lead
            finally:
                self._bg_leading = False
                self._rlock.release()
                with self._cond:
                    self._cond.notify_all()
            # Stay out of the way while the caller that poked us is busy.
            self._last_active = time.monotonic()
