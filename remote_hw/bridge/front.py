"""The bridge's front: a vfio-user server on a UNIX socket, for QEMU's vfio-user-pci.

Each QEMU that connects is one VM. Its config space is answered here from a
:mod:`~remote_hw.bridge.pci` template; its BAR accesses become ordinary register
accesses of that VM's id, sent through the same :class:`ServerLink` and
:class:`RemoteDevice` the native client uses, so plain TCP, mutual TLS, entry-server
forwarding and the removed-device behaviour (reads all ones, writes dropped, no wait
past the link timeout) come from there unchanged. Interrupts the server pushes for the
VM become writes to the INTx eventfd QEMU handed over (:mod:`~remote_hw.bridge.intx`).

The link reconnects by itself, as the native client's (``reconnect=True``,
:mod:`remote_hw.net.recovery`): a live session is resumed, or its instance attached
anew after a server restart, without QEMU reconnecting. The bridge's own part
(:meth:`Bridge._on_link_state`): lower every INTx line while the link is down, and
when it is back, release the instances of sessions that ended meanwhile and attach
the sessions that could not attach while it was down.

Threads: one accepts connections; one per connected QEMU reads its socket and answers
in order (vfio-user allows pipelining, and the spec asks for in-order processing, so
one thread per socket is both simplest and correct); the links' own threads deliver
interrupts, which only touch the session's INTx state under its lock.

The common message, one BAR access, takes a short way (:mod:`.fastpath`): the thread
that reads QEMU's socket recognises it in one call (C when built), makes the register
access on the link itself (no hand-off to another thread) and sends the reply in one
more call. Everything else goes through the ServerConnection and :meth:`Session.handle`.

A broken message from one QEMU closes that QEMU's socket only (QEMU then sees the
device as gone); every other VM carries on.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from remote_hw.bridge import fastpath
from remote_hw.bridge import vfio_user as vu
from remote_hw.bridge.command import QEMU_MSG_TIMEOUT
from remote_hw.bridge.intx import IntxLine
from remote_hw.bridge.pci import (
    CONFIG_REGION,
    INTX_IRQ,
    NUM_IRQS,
    NUM_REGIONS,
    ConfigSpace,
    Template,
)
from remote_hw.client.agent import RemoteDevice
from remote_hw.config import MapSpec
from remote_hw.net.link import ServerLink
from remote_hw.net.security import TlsConfig
from remote_hw.protocol.messages import Status

log = logging.getLogger("remote_hw.bridge")

_READ = fastpath.READ
_UNREACHABLE = int(Status.UNREACHABLE)
# What a request gets when the link, not the server, failed it.
_LINK_FAILURES = (int(Status.UNREACHABLE), int(Status.TIMEOUT))
_ONE = (1).to_bytes(8, "little")  # an eventfd write adds this counter value


@dataclass(frozen=True)
class Target:
    """The remote device a bridge serves: ``SERVER/DEVICE`` (``a/uart0``)."""

    server: str
    device: str

    def __str__(self) -> str:
        return f"{self.server}/{self.device}"


class Session:
    """One connected QEMU (one VM id): its protocol state, config space and INTx."""

    def __init__(self, bridge: Bridge, sock: socket.socket, vm_id: int) -> None:
        self.bridge = bridge
        self.sock = sock
        self.vm_id = vm_id
        self.conn = vu.ServerConnection()
        self.config = ConfigSpace(bridge.template)
        self.intx = IntxLine()
        self.lock = threading.Lock()  # INTx state and the eventfds
        self.trigger_fd: int | None = None
        self.unmask_fd: int | None = None  # KVM's resample eventfd, when QEMU uses one
        self.device: RemoteDevice | None = None
        # Whether the server holds this VM's instance: False until an ATTACH succeeds
        # (one refused, or tried while the link was down, is tried again whenever the
        # link comes back). ``released`` once the session ended. Both change under the
        # bridge's lock for this VM id (Bridge._id_lock), so that a late attach never
        # re-creates an instance the session gave back.
        self.attached = False
        self.released = False
        self.error: str | None = None
        self.closed = threading.Event()
        self.thread: threading.Thread | None = None
        # BAR region -> size: the regions whose accesses go to the server.
        self._bar_sizes = {index: bar.size for index, bar in bridge.template.bars.items()}
        #: BAR writes QEMU sent without waiting for the answer (NO_REPLY): a memory
        #: BAR's, by default; never an I/O BAR's (docs/bridge.md)
        self.unanswered = 0
        self._recv = fastpath.reader(sock)
        self._reply = fastpath.replier(sock)
        self._fds: list[int] = []  # descriptors of the last read (the reader appends)

    @property
    def label(self) -> str:
        return f"vm {self.vm_id}"

    # -- life cycle -------------------------------------------------------------

    def run(self) -> None:
        try:
            self.bridge.attach(self)
            self._serve()
        except vu.VfioUserError as e:
            self.error = str(e)
            log.error("%s: protocol error from QEMU: %s; closing its socket", self.label, e)
        except OSError as e:
            self.error = f"socket error: {e.strerror or e}"
            log.error("%s: %s", self.label, self.error)
        except Exception as e:  # a bug here must end this VM's session only
            self.error = f"internal error: {e!r}"
            log.exception("%s: internal error; closing its socket", self.label)
        finally:
            self._close()

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        watched_unmask: int | None = None
        while not self.closed.is_set():
            if self.unmask_fd is None and watched_unmask is None:
                # Only the socket to read (TCG: no resample fd): block in recvmsg and
                # spare the hot path a poll() call; stop() wakes it with a shutdown.
                if not self._serve_socket():
                    return
                continue
            if self.unmask_fd != watched_unmask:  # SET_IRQS changed the resample fd
                if watched_unmask is not None:
                    poller.unregister(watched_unmask)
                watched_unmask = self.unmask_fd
                if watched_unmask is not None:
                    poller.register(watched_unmask, select.POLLIN)
            for fd, _ in poller.poll(500):
                if fd == watched_unmask:
                    try:
                        os.read(fd, 8)
                    except OSError:
                        pass
                    self._unmask()
                    continue
                if not self._receive():
                    return

    def _serve_socket(self) -> bool:
        """Read and answer until QEMU hangs up (False) or hands over a resample
        eventfd (True: the caller polls both from then on)."""
        receive = self._receive
        while receive():
            if self.unmask_fd is not None:
                return True
        return False

    def _receive(self) -> bool:
        """Read once and answer; False when QEMU hung up.

        The per-access hot path, kept flat on purpose (every Python call level and
        attribute lookup costs, and more so right after the context switch that woke
        this thread): a lone BAR access is read in one call, forwarded on the link by
        this same thread, and answered in one call.
        """
        r = self._recv(self._fds, self.conn.idle)
        if type(r) is tuple:  # one lone access (fastpath.Access)
            msg_id, command, flags, offset, region, count, value = r
            size = self._bar_sizes.get(region)
            dev = self.device
            if size is not None and offset + count <= size and dev is not None:
                if command == _READ:
                    value = dev.read(offset, count)
                else:
                    dev.write(offset, count, value)
                if not flags:  # flags is 0 or NO_REPLY here
                    self._reply(msg_id, command, offset, region, count, value)
                else:
                    self.unanswered += 1
                return True
            return self._other_access(r)
        if type(r) is list:  # several: writes QEMU posted without waiting for replies
            for access in r:
                self._access(access)
            return True
        return self._general(r)  # type: ignore[arg-type]

    def _access(self, a: fastpath.Access) -> None:
        """One access of a batch (what :meth:`_receive` does inline for a lone one)."""
        msg_id, command, flags, offset, region, count, value = a
        size = self._bar_sizes.get(region)
        dev = self.device
        if size is None or offset + count > size or dev is None:
            self._other_access(a)
            return
        if command == _READ:
            value = dev.read(offset, count)
        else:
            dev.write(offset, count, value)
        if not flags:
            self._reply(msg_id, command, offset, region, count, value)
        else:
            self.unanswered += 1

    def _other_access(self, a: fastpath.Access) -> bool:
        """An access that is not to a BAR: config space, or an error reply."""
        out = self.handle(fastpath.event(a))
        if out:
            self.sock.sendall(out)
        return True

    def _general(self, r: bytes) -> bool:
        """Everything but accesses: the other commands, and whatever the fast path
        does not recognise, through the ServerConnection; False when QEMU hung up."""
        fds = self._fds[:]
        self._fds.clear()
        if not r:
            for fd in fds:
                _close_fd(fd)
            log.info("%s: QEMU closed the connection", self.label)
            return False
        conn = self.conn
        conn.receive_data(r, fds)
        while True:
            ev = conn.next_event()
            if ev is vu.NEED_DATA:
                return True
            out = self.handle(ev)  # type: ignore[arg-type]
            if out:
                self.sock.sendall(out)

    def stop(self) -> None:
        """Wake the session's thread (from another thread) so it ends."""
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _close(self) -> None:
        self.closed.set()
        with self.lock:
            self.intx.disable()
            fds = [fd for fd in (self.trigger_fd, self.unmask_fd) if fd is not None]
            self.trigger_fd = self.unmask_fd = None
        for fd in fds + self.conn.close_fds():
            _close_fd(fd)
        self.sock.close()
        self.bridge.release(self)

    # -- messages ---------------------------------------------------------------

    def handle(self, ev: vu.Event) -> bytes:
        """Answer one command (the reply bytes, empty for no-reply commands)."""
        conn = self.conn
        t = self.bridge.template
        if isinstance(ev, vu.Version):
            caps: dict[str, object] = {"max_msg_fds": vu.MAX_MSG_FDS,
                                       "max_data_xfer_size": vu.MAX_DATA_XFER}
            for key in ("pgsizes", "max_dma_maps"):  # echo what we do not restrict
                if key in ev.capabilities:
                    caps[key] = ev.capabilities[key]
            log.info("%s: QEMU speaks vfio-user %d.%d", self.label, ev.major, ev.minor)
            return conn.version_reply(ev, caps)
        if isinstance(ev, vu.RegionRead):
            data = self._region_read(ev.region, ev.offset, ev.count)
            if data is None:
                return conn.error_reply(ev, vu.EINVAL)
            return conn.reply(ev, vu.REGION_ACCESS.pack(ev.offset, ev.region, ev.count) + data)
        if isinstance(ev, vu.RegionWrite):
            if not self._region_write(ev.region, ev.offset, ev.data):
                return conn.error_reply(ev, vu.EINVAL)
            if ev.no_reply and ev.region in self._bar_sizes:
                # Counted here too: the fast path passes over reads it cannot take
                # whole (a message cut by the socket), and their writes come here.
                self.unanswered += 1
            return conn.reply(ev, vu.REGION_ACCESS.pack(ev.offset, ev.region, ev.count))
        if isinstance(ev, vu.SetIrqs):
            errno = self._set_irqs(ev)
            return conn.error_reply(ev, errno) if errno else conn.reply(ev)
        if isinstance(ev, vu.GetDeviceInfo):
            if ev.argsz < vu.DEVICE_INFO.size:
                return conn.error_reply(ev, vu.EINVAL)
            return conn.reply(ev, vu.DEVICE_INFO.pack(
                vu.DEVICE_INFO.size, vu.DEVICE_FLAGS_PCI | vu.DEVICE_FLAGS_RESET,
                NUM_REGIONS, NUM_IRQS))
        if isinstance(ev, vu.GetRegionInfo):
            if ev.argsz < vu.REGION_INFO.size or ev.index >= NUM_REGIONS:
                return conn.error_reply(ev, vu.EINVAL)
            flags, size = t.region_info(ev.index)
            return conn.reply(ev, vu.REGION_INFO.pack(vu.REGION_INFO.size, flags, ev.index,
                                                      0, size, 0))
        if isinstance(ev, vu.GetIrqInfo):
            if ev.argsz < vu.IRQ_INFO.size or ev.index >= NUM_IRQS:
                return conn.error_reply(ev, vu.EINVAL)
            flags, count = t.irq_info(ev.index)
            return conn.reply(ev, vu.IRQ_INFO.pack(vu.IRQ_INFO.size, flags, ev.index, count))
        if isinstance(ev, vu.DmaMap):
            for fd in ev.fds:  # the UART does no DMA: nothing to map
                _close_fd(fd)
            return conn.reply(ev)
        if isinstance(ev, vu.DmaUnmap):
            return conn.reply(ev, vu.DMA_UNMAP.pack(ev.argsz, ev.flags, ev.address, ev.size))
        if isinstance(ev, vu.DeviceReset):
            self.config.reset()
            with self.lock:
                self.intx.masked = False
            log.info("%s: device reset by QEMU", self.label)
            return conn.reply(ev)
        assert isinstance(ev, vu.Unsupported)
        for fd in ev.fds:
            _close_fd(fd)
        log.debug("%s: unsupported command %d answered ENOSYS", self.label, ev.command)
        return conn.error_reply(ev, vu.ENOSYS)

    def _region_read(self, region: int, offset: int, count: int) -> bytes | None:
        if region == CONFIG_REGION:
            return self.config.read(offset, count)
        bar = self.bridge.template.bars.get(region)
        if bar is None or offset + count > bar.size or self.device is None:
            return None
        dev = self.device
        if count in (1, 2, 4, 8):
            return dev.read(offset, count).to_bytes(count, "little")
        return bytes(dev.read(offset + i, 1) for i in range(count))

    def _region_write(self, region: int, offset: int, data: bytes) -> bool:
        if region == CONFIG_REGION:
            self.config.write(offset, data)
            return True
        bar = self.bridge.template.bars.get(region)
        if bar is None or offset + len(data) > bar.size or self.device is None:
            return False
        dev = self.device
        if len(data) in (1, 2, 4, 8):
            dev.write(offset, len(data), int.from_bytes(data, "little"))
        else:
            for i, b in enumerate(data):
                dev.write(offset + i, 1, b)
        return True

    # -- interrupts -------------------------------------------------------------

    def _set_irqs(self, ev: vu.SetIrqs) -> int:
        """Apply a SET_IRQS; returns 0 or the errno to answer with."""
        _, count = self.bridge.template.irq_info(ev.index)
        fds = list(ev.fds)
        try:
            if ev.index != INTX_IRQ or ev.start + ev.count > max(count, 1) \
                    or (count == 0 and ev.count):
                if ev.count == 0 and ev.data_type == vu.IRQ_SET_DATA_NONE:
                    return 0  # "disable all" of an index we never enabled
                return vu.EINVAL
            if ev.data_type == vu.IRQ_SET_DATA_BOOL and not any(ev.data):
                return 0  # the action applies to no vector
            action = ev.action
            with self.lock:
                if action == vu.IRQ_SET_ACTION_TRIGGER:
                    if ev.data_type == vu.IRQ_SET_DATA_EVENTFD:
                        old, self.trigger_fd = self.trigger_fd, (fds.pop(0) if fds else None)
                        if old is not None:
                            _close_fd(old)
                        if self.trigger_fd is None:
                            self.intx.disable()
                        elif self.intx.enable():
                            self._signal()
                    elif ev.count == 0:  # DATA_NONE, count 0: disable the index
                        old, self.trigger_fd = self.trigger_fd, None
                        self.intx.disable()
                        if old is not None:
                            _close_fd(old)
                    elif self.trigger_fd is not None:  # the client triggers it itself
                        self._signal()
                elif action == vu.IRQ_SET_ACTION_UNMASK:
                    if ev.data_type == vu.IRQ_SET_DATA_EVENTFD:
                        # KVM's resample fd: signalled at the guest's EOI; we read it.
                        old, self.unmask_fd = self.unmask_fd, (fds.pop(0) if fds else None)
                        if old is not None:
                            _close_fd(old)
                    elif self.intx.unmask():
                        self._signal()
                else:  # MASK
                    if ev.data_type != vu.IRQ_SET_DATA_EVENTFD:
                        self.intx.mask()
            return 0
        finally:
            for fd in fds:  # descriptors we did not keep
                _close_fd(fd)

    def _unmask(self) -> None:
        with self.lock:
            if self.intx.unmask():
                self._signal()

    def interrupt(self, level: bool) -> None:
        """The server changed the device's line (called on a link's thread)."""
        with self.lock:
            if self.intx.set_level(level):
                self._signal()

    def link_lost(self) -> None:
        """The link went down: a removed device raises no interrupt. Without this a
        line left high would fire again at every EOI while the guest's handler reads
        all ones (an interrupt storm, and Linux would disable the IRQ: "nobody
        cared"). The server sends the real level again when the session resumes."""
        with self.lock:
            self.intx.set_level(False)

    def _signal(self) -> None:
        # Under self.lock. A full eventfd counter (never, in practice) or a closed fd
        # must not take the link's thread down.
        fd = self.trigger_fd
        if fd is None:
            return
        try:
            os.write(fd, _ONE)
        except OSError as e:
            log.warning("%s: cannot signal the INTx eventfd: %s", self.label, e)


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Bridge:
    """Serves one remote device to any number of QEMUs on one UNIX socket."""

    def __init__(self, socket_path: str | os.PathLike[str], target: Target,
                 servers: dict[str, tuple[str, int]], template: Template, *,
                 vias: dict[str, str] | None = None, tls: TlsConfig | None = None,
                 timeout: float = 1.0, first_vm_id: int = 1, client_name: str = "bridge",
                 posting: bool = True,
                 link_factory: Callable[..., ServerLink] = ServerLink) -> None:
        self.socket_path = Path(socket_path)
        self.target = target
        self.template = template
        self.timeout = timeout
        self.first_vm_id = first_vm_id
        self.vias = dict(vias or {})
        via = self.vias.get(target.server)
        # The link that carries the device's requests, and the server id they name:
        # "" when that link's server holds (or looks up) the device itself.
        link_name = target.server if target.server in servers else via
        if link_name is None or link_name not in servers:
            raise ValueError(f"no --server (or --via) for server {target.server!r}")
        self.server_id = "" if link_name == target.server else target.server
        self.sessions: dict[int, Session] = {}
        self._lock = threading.Lock()  # sessions and vm ids
        # VM ids of ended sessions whose instance could not be released (the link was
        # down): detached when the link is back, before a new session of the same id
        # attaches. Every detach and attach of one VM id happens under its _id_lock.
        self._stale: set[int] = set()
        self._id_locks: dict[int, threading.Lock] = {}
        self._link_cond = threading.Condition()  # notified when the link goes up or down
        # A QEMU that connects while the link is down waits this long for it to come
        # back before its VERSION reply (then the attach, up to one timeout): both
        # inside QEMU's x-msg-timeout, with a second to spare.
        self.link_wait = max(0.0, QEMU_MSG_TIMEOUT - 1.0 - timeout)
        # reconnect=True, as the native client's links: a lost connection is brought
        # back by the link itself (remote_hw/net/recovery.py), its session resumed
        # (the devices as the guests left them) or, after a server restart, every
        # attached instance attached anew; _on_link_state does the bridge's part.
        # posting=False (--no-posting): the link does not offer POSTED, so every BAR
        # access waits for the server's answer (docs/protocol.md).
        self.link = link_factory(link_name, servers[link_name], client_name=client_name,
                                 timeout=timeout, on_interrupt=self._on_interrupt,
                                 on_state=self._on_link_state, tls=tls, reconnect=True,
                                 posting=posting)
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- life cycle -------------------------------------------------------------

    def start(self) -> Bridge:
        """Connect to the server, then listen; raises LinkError or OSError."""
        self.link.connect(connect_timeout=max(self.timeout, 2.0))
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise OSError(f"{path} exists and is not a socket")
            path.unlink()  # a stale socket of an earlier run
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(str(path))
        lst.listen(8)
        lst.settimeout(0.5)
        self._listener = lst
        self._accept_thread = threading.Thread(target=self._accept, name="bridge-accept",
                                               daemon=True)
        self._accept_thread.start()
        c_on, why = fastpath.status()
        log.info("serving %s (%s) on %s; BAR accesses go to server %s at %s:%d; "
                 "per-access calls in %s", self.target, self.template.name, path,
                 self.link.name, *self.link.address, "C" if c_on else f"Python ({why})")
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._link_cond:
            self._link_cond.notify_all()  # an attach waiting for the link gives up
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            try:
                self.socket_path.unlink()
            except OSError:
                pass
        with self._lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            s.stop()
        for s in sessions:
            if s.thread is not None:
                s.thread.join(timeout=5)
        self.link.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if not self._stopping.is_set():
                    log.error("accept failed: %s", e)
                return
            sock.settimeout(None)
            with self._lock:
                vm_id = self.first_vm_id
                while vm_id in self.sessions:
                    vm_id += 1
                session = Session(self, sock, vm_id)
                self.sessions[vm_id] = session
            log.info("%s: QEMU connected", session.label)
            t = threading.Thread(target=session.run, name=f"bridge-vm{vm_id}", daemon=True)
            session.thread = t
            t.start()

    # -- the remote device --------------------------------------------------------

    def attach(self, session: Session) -> None:
        """Give ``session``'s VM its instance of the device (``session.device``).

        While the link is down (its own thread is bringing it back) this waits up to
        ``link_wait`` for it, so that a QEMU plugged right after its server came back
        gets a working device. A failure is logged and the device reads as removed;
        the session still answers QEMU, so the guest boots and sees no UART instead of
        hanging, and the attach is tried again when the link comes back.
        """
        window = self.template.window.get(0, 8)
        spec = MapSpec("port", 0, window - 1, self.target.server, self.target.device)
        dev = RemoteDevice(self.link, session.vm_id, spec, self.server_id)
        dev.label = f"vm {session.vm_id}: {self.target}"
        session.device = dev
        if not self.link.up and self.link.recovery is not None:
            with self._link_cond:
                self._link_cond.wait_for(lambda: self.link.up or self._stopping.is_set(),
                                         self.link_wait)
        self._attach(session)

    def _id_lock(self, vm_id: int) -> threading.Lock:
        with self._lock:
            return self._id_locks.setdefault(vm_id, threading.Lock())

    def _attach(self, session: Session) -> None:
        """ATTACH unless done (or the session ended); on failure the device reads as
        removed until the link's next return tries again."""
        dev = session.device
        assert dev is not None
        vm_id = session.vm_id
        with self._id_lock(vm_id):
            if session.released or session.attached:
                return
            # An ended session of the same id whose instance the server may still
            # hold (the link was down when it ended) goes first.
            status = self._release_stale(vm_id)
            if status == Status.OK:
                for _ in range(2):  # once more if the link broke under it and is back
                    status = self.link.attach(vm_id, self.target.device, self.server_id)
                    if status not in _LINK_FAILURES or not self.link.up:
                        break
            session.attached = status == Status.OK
        if session.attached:
            log.info("vm %d: attached %s", vm_id, self.target)
            return
        dev.failing = True  # its first success logs "device answers again"
        if status in _LINK_FAILURES:
            log.error("vm %d: server %s cannot be reached (%s); %s reads as removed until "
                      "the link is back", vm_id, self.link.name,
                      self.link.down_reason or Status(status).name, self.target)
        else:
            name = Status(status).name if status in Status._value2member_map_ else status
            log.error("vm %d: server %s refused device %s: %s; it reads as removed (tried "
                      "again when the link comes back)", vm_id, self.link.name,
                      self.target, name)

    def _release_stale(self, vm_id: int) -> int:
        """Under ``vm_id``'s lock: detach the instance an ended session of that id left
        on the server, if any. OK, or the link failure that keeps it for later."""
        with self._lock:
            if vm_id not in self._stale:
                return Status.OK
        status = self.link.detach(vm_id)
        if status in _LINK_FAILURES:
            return status
        with self._lock:
            self._stale.discard(vm_id)
        log.info("vm %d: the instance of the ended session is released", vm_id)
        return Status.OK

    def release(self, session: Session) -> None:
        """A session ended: free its VM id and the server's instance."""
        # Detach before the id is free again: a QEMU connecting meanwhile would get the
        # same id, and a later detach would take its new instance away. With the link
        # down the instance stays on the server (a resumed session still holds it)
        # and is detached when the link is back, before that id attaches again.
        vm_id = session.vm_id
        with self._id_lock(vm_id):
            session.released = True
            session.attached = False
            status = self.link.detach(vm_id)  # UNREACHABLE at once when down
            with self._lock:
                if self.sessions.get(vm_id) is session:
                    del self.sessions[vm_id]
                if status in _LINK_FAILURES:
                    self._stale.add(vm_id)
        fwd = session.device.forwarded if session.device else 0
        log.info("%s: ended (%d BAR accesses forwarded, %d INTx triggers, %d unmasks); "
                 "QEMU waited for no answer to %d BAR writes", session.label, fwd,
                 session.intx.triggers, session.intx.unmasks, session.unanswered)

    def _on_link_state(self, link: ServerLink, up: bool, how: str) -> None:
        """The link went down or came back (called on the thread that saw it; back:
        on the link's reconnect thread, with the session already resumed or its
        instances attached again)."""
        with self._link_cond:
            self._link_cond.notify_all()
        with self._lock:
            sessions = list(self.sessions.values())
            stale = sorted(self._stale)
        if not up:
            for s in sessions:
                s.link_lost()
            return
        for vm_id in stale:
            with self._id_lock(vm_id):
                if self._release_stale(vm_id) in _LINK_FAILURES:
                    return  # down again: its next return goes on from here
        for s in sessions:
            if not s.attached and s.device is not None:
                self._attach(s)

    def _on_interrupt(self, vm_id: int, device: str, line: int, level: bool,
                      client_id: int) -> None:
        session = self.sessions.get(vm_id)
        if session is None or device != self.target.device:
            log.debug("interrupt for vm %d device %s: no such session; dropped", vm_id, device)
            return
        session.interrupt(level)
