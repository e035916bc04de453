"""The server and the client link over real loopback TCP (no VM involved)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from remote_hw.config import DeviceSpec
from remote_hw.net import fastio
from remote_hw.net.link import LinkError, ServerLink
from remote_hw.protocol import CLOSED, NEED_DATA, Connection, Role
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import AccessKind, Direction, Status
from remote_hw.server.controller import Controller
from remote_hw.server.listener import Server

from helpers import InterruptRecorder, free_port, wait_until

R, W, PORT = Direction.READ, Direction.WRITE, AccessKind.PORT


@pytest.fixture(autouse=True, params=[pytest.param("c-path", marks=pytest.mark.fastio),
                                      "python-path"])
def io_path(request, monkeypatch):
    """Every test here runs over both request paths: the C fast path (when built) and
    the pure-Python one that TLS links and machines without a compiler use."""
    if request.param == "python-path":
        monkeypatch.setattr(fastio, "_state", (False, "off for this test"))
    return request.param


@pytest.fixture
def server():
    ctl = Controller("a", [DeviceSpec("uart0", "uart16550"), DeviceSpec("rtc0", "cmos-rtc"),
                           DeviceSpec("clock", "cmos-rtc", shared=True)])
    srv = Server(ctl, "127.0.0.1", 0).start()
    yield srv
    srv.stop()


def link_to(srv: Server, **kw) -> ServerLink:
    return ServerLink("a", srv.address, **kw).connect()


def test_register_access_round_trip(server, io_path):
    link = link_to(server)
    try:
        assert link.client_id >= 1 and link.server_name == "a"
        # Both ends took the path this run is about.
        assert link._fast is (io_path == "c-path")
        assert [s._fast for s in server.sessions()] == [io_path == "c-path"]
        assert link.attach(1, "uart0") == Status.OK
        assert link.io(1, "uart0", PORT, 5, 1, R) == (Status.OK, 0x60)  # LSR after reset
        assert link.io(1, "uart0", PORT, 7, 1, W, 0xA5)[0] == Status.OK  # scratch
        assert link.io(1, "uart0", PORT, 7, 1, R) == (Status.OK, 0xA5)
    finally:
        link.close()


def test_errors_are_feedback_not_crashes(server):
    link = link_to(server)
    try:
        assert link.attach(1, "nosuch") == Status.UNKNOWN_DEVICE
        assert link.io(1, "nosuch", PORT, 0, 1, R)[0] == Status.UNKNOWN_DEVICE
        assert link.io(1, "uart0", PORT, 0, 1, R)[0] == Status.NOT_ATTACHED
        assert link.attach(1, "uart0") == Status.OK
        assert link.io(1, "uart0", PORT, 7, 2, R)[0] == Status.BAD_ACCESS  # past the window
        assert link.io(1, "uart0", PORT, 0, 1, R, server_id="b")[0] == Status.UNKNOWN_SERVER
        assert link.io(2, "uart0", PORT, 7, 1, R)[0] == Status.NOT_ATTACHED  # another VM id
        # and the connection still works afterwards
        assert link.io(1, "uart0", PORT, 5, 1, R) == (Status.OK, 0x60)
    finally:
        link.close()


def test_interrupts_reach_the_vm_that_owns_the_instance(server):
    rec1, rec2 = InterruptRecorder(), InterruptRecorder()
    l1 = link_to(server, on_interrupt=rec1)
    l2 = link_to(server, on_interrupt=rec2)
    try:
        for link in (l1, l2):
            assert link.attach(7, "uart0") == Status.OK  # same VM id, different clients
        assert l1.io(7, "uart0", PORT, 4, 1, W, 0x08)[0] == Status.OK  # MCR: OUT2
        assert l1.io(7, "uart0", PORT, 1, 1, W, 0x02)[0] == Status.OK  # IER: THRI
        assert rec1.wait_for((7, "uart0", 0, True))
        assert l1.io(7, "uart0", PORT, 2, 1, R) == (Status.OK, 0x02)  # IIR: THR empty
        assert rec1.wait_for((7, "uart0", 0, False))
        # client 2's instance has its own registers and saw no interrupt at all
        assert l2.io(7, "uart0", PORT, 1, 1, R) == (Status.OK, 0x00)
        assert rec2.seen == []
    finally:
        l1.close()
        l2.close()


def test_shared_device_is_one_instance(server):
    l1, l2 = link_to(server), link_to(server)
    try:
        for link in (l1, l2):
            assert link.attach(1, "clock") == Status.OK
        assert l1.io(1, "clock", PORT, 0, 1, W, 0x34)[0] == Status.OK  # index: CMOS RAM
        assert l1.io(1, "clock", PORT, 1, 1, W, 0x5A)[0] == Status.OK
        assert l2.io(1, "clock", PORT, 0, 1, W, 0x34)[0] == Status.OK
        assert l2.io(1, "clock", PORT, 1, 1, R) == (Status.OK, 0x5A)
        assert len([i for i in server.controller.instances() if i.spec.id == "clock"]) == 1
    finally:
        l1.close()
        l2.close()


def test_many_threads_share_one_link(server):
    """Leader/follower: concurrent VMs on one connection get their own answers."""
    link = link_to(server)
    errors: list[str] = []

    def worker(vm_id: int) -> None:
        for i in range(300):
            value = (vm_id * 31 + i) & 0xFF
            if link.io(vm_id, "uart0", PORT, 7, 1, W, value)[0] != Status.OK:
                errors.append(f"vm {vm_id}: write failed")
            got = link.io(vm_id, "uart0", PORT, 7, 1, R)
            if got != (Status.OK, value):
                errors.append(f"vm {vm_id}: read {got}, want {value}")
    try:
        for vm in range(1, 5):
            assert link.attach(vm, "uart0") == Status.OK
        threads = [threading.Thread(target=worker, args=(vm,)) for vm in range(1, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:5]
    finally:
        link.close()


def test_interrupt_reaches_idle_link(server):
    """No vCPU reads the socket: the background reader must deliver the interrupt."""
    rec = InterruptRecorder()
    link = link_to(server, on_interrupt=rec)
    try:
        assert link.attach(3, "uart0") == Status.OK
        assert link.io(3, "uart0", PORT, 4, 1, W, 0x08)[0] == Status.OK
        assert link.io(3, "uart0", PORT, 1, 1, W, 0x01)[0] == Status.OK  # IER: RX data
        time.sleep(0.05)  # let the link go idle
        inst = next(i for i in server.controller.instances() if (link.client_id, 3) in i.sessions)
        inst.to_guest(b"x")  # what a backend does when a person types
        assert rec.wait_for((3, "uart0", 0, True))
    finally:
        link.close()


def test_server_gone_fails_fast_and_clearly(server, caplog):
    link = link_to(server, timeout=5.0)
    assert link.attach(1, "uart0") == Status.OK
    server.stop()
    t0 = time.monotonic()
    status, _ = link.io(1, "uart0", PORT, 5, 1, R)
    assert status in (Status.UNREACHABLE, Status.TIMEOUT)
    assert link.io(1, "uart0", PORT, 5, 1, R)[0] == Status.UNREACHABLE
    assert time.monotonic() - t0 < 30  # a sanity bound on "never hangs", not a speed goal
    assert not link.up and "server" in " ".join(r.getMessage() for r in caplog.records)
    link.close()


def test_connect_to_nothing_is_a_clear_error():
    with pytest.raises(LinkError, match="cannot connect"):
        ServerLink("a", ("127.0.0.1", free_port())).connect(1.0)


def _raw_client(srv: Server) -> socket.socket:
    return socket.create_connection(srv.address, timeout=5)


def _read_events(sock: socket.socket, conn: Connection) -> list:
    events = []
    while True:
        data = sock.recv(65536)
        conn.receive_data(data)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)
            if ev is CLOSED:
                return events


def test_malformed_frame_gets_error_and_others_carry_on(server):
    good = link_to(server)
    try:
        assert good.attach(1, "uart0") == Status.OK
        bad = _raw_client(server)
        bad.sendall(b"XX\x01\x00\x00\x00\x00\x00")  # wrong magic
        # read the raw bytes: an ERROR frame then EOF
        data = b""
        while True:
            chunk = bad.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data[:2] == m.MAGIC and data[2] == m.MsgType.ERROR
        code = struct.unpack_from("<QH", data, 8)[1]
        assert code == m.ErrorCode.MALFORMED
        bad.close()
        assert good.io(1, "uart0", PORT, 5, 1, R) == (Status.OK, 0x60)
    finally:
        good.close()


def test_version_mismatch_is_refused_clearly(server):
    sock = _raw_client(server)
    conn = Connection(Role.CLIENT)
    # A future client: built by hand, since our encoder refuses other major versions.
    payload = struct.pack("<HHIIBB", 9, 0, 65536, 1, 1, 3) + b"old"
    sock.sendall(m.MAGIC + bytes([m.MsgType.HELLO, 0]) + struct.pack("<I", len(payload))
                 + payload)
    events = _read_events(sock, conn)
    errors = [e for e in events if isinstance(e, m.Error)]
    assert errors and errors[0].code == m.ErrorCode.VERSION_MISMATCH
    assert "9" in errors[0].text and "1" in errors[0].text
    sock.close()


def test_claiming_another_clients_id_is_denied_and_logged(server, caplog):
    """A client that writes another client's id into a request is refused."""
    l1 = link_to(server)
    try:
        assert l1.attach(1, "uart0") == Status.OK
        assert l1.io(1, "uart0", PORT, 7, 1, W, 0x11)[0] == Status.OK
        sock = _raw_client(server)
        conn = Connection(Role.CLIENT)
        sock.sendall(conn.send(m.Hello(name="mallory")))
        welcome = None
        while welcome is None:
            ev = conn.next_event()
            if ev is NEED_DATA:
                conn.receive_data(sock.recv(4096))
            elif isinstance(ev, m.Welcome):
                welcome = ev
        assert welcome.client_id != l1.client_id
        sock.sendall(conn.send(m.IoRequest(request_id=1, vm_id=1, client_id=l1.client_id,
                                           offset=7, kind=PORT, size=1, direction=W,
                                           data=0x99, device_id="uart0")))
        fb = None
        while fb is None:
            ev = conn.next_event()
            if ev is NEED_DATA:
                conn.receive_data(sock.recv(4096))
            elif isinstance(ev, m.Feedback):
                fb = ev
        assert fb.status == Status.DENIED and fb.client_id == welcome.client_id
        assert "claiming to be client" in caplog.text
        assert l1.io(1, "uart0", PORT, 7, 1, R) == (Status.OK, 0x11)  # untouched
        sock.close()
    finally:
        l1.close()


def test_a_server_that_stops_answering_is_dropped_after_one_timeout(caplog):
    """Alive but silent: the first access times out, the link is declared gone, and
    later accesses fail at once instead of stalling the guest a timeout each."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def silent_server() -> None:
        sock, _ = listener.accept()
        conn = Connection(Role.SERVER)
        while not stop.is_set():
            data = sock.recv(4096)
            if not data:
                break
            conn.receive_data(data)
            while (ev := conn.next_event()) is not NEED_DATA:
                if isinstance(ev, m.Hello):
                    sock.sendall(conn.send(m.Welcome(client_id=1, name="mute")))
                # everything else is swallowed
        sock.close()
    t = threading.Thread(target=silent_server, daemon=True)
    t.start()
    link = ServerLink("a", listener.getsockname(), timeout=0.5).connect()
    try:
        assert link.io(1, "uart0", PORT, 5, 1, R)[0] == Status.TIMEOUT
        assert not link.up and "no answer to a request within 0.5 s" in link.down_reason
        assert link.io(1, "uart0", PORT, 5, 1, R)[0] == Status.UNREACHABLE
    finally:
        stop.set()
        link.close()
        listener.close()


def test_a_backend_that_cannot_open_fails_only_that_attach():
    """The next VM's UART would listen on a port someone else holds."""
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    ctl = Controller("a", [DeviceSpec("uart0", "uart16550", backend=f"tcp:127.0.0.1:{port - 1}"),
                           DeviceSpec("rtc0", "cmos-rtc")])
    srv = Server(ctl, "127.0.0.1", 0).start()
    link = ServerLink("a", srv.address).connect()
    try:
        first = link.attach(1, "uart0")  # index 0 -> port-1 (usually free; not our point)
        second = link.attach(2, "uart0")  # index 1 -> port: taken
        assert second == Status.DEVICE_ERROR
        assert first in (Status.OK, Status.DEVICE_ERROR)
        assert link.up and link.attach(2, "rtc0") == Status.OK  # the connection carries on
        assert link.io(2, "rtc0", PORT, 0, 1, W, 0x0D)[0] == Status.OK
    finally:
        link.close()
        srv.stop()
        taken.close()


@pytest.mark.parametrize("answer", ["feedback", "error"])
def test_an_answer_the_leaders_first_read_takes_wakes_its_waiting_caller(monkeypatch,
                                                                         answer):
    """Two VMs' accesses on one link: VM 1's caller leads (it sent first and reads), VM
    2's caller waits as a follower. The leader's *first* read of its call brings VM 2's
    answer, not its own. It must wake VM 2's caller at once; it used to leave it asleep
    until the leader's own call ended, which for an access an entry server forwards to
    a stopped server is a whole timeout (tests/test_forwarding.py caught this on a
    loaded machine). ``error``: the answer is an ERROR naming VM 2's request, which
    had the same flaw. The read slice is made long so that the first read is the one
    that takes VM 2's answer; the order is forced, not timed."""
    from remote_hw.net import link as link_mod
    monkeypatch.setattr(link_mod, "READ_SLICE", 5.0)
    # The background reader must not take the lead meanwhile (it does after 2 ms idle):
    # then VM 1's caller would be a follower too, and the leader's first read is the
    # path this is about.
    monkeypatch.setattr(link_mod, "IDLE_GRACE", 5.0)
    listener = socket.create_server(("127.0.0.1", 0))
    got: dict[int, int] = {}          # vm id -> request id, as the server read them
    answer_vm2 = threading.Event()
    answer_vm1 = threading.Event()
    arrived = threading.Condition()

    def server() -> None:
        sock, _ = listener.accept()
        conn = Connection(Role.SERVER)
        sock.settimeout(0.05)
        answered: set[int] = set()
        while True:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                data = None
            if data == b"":
                break
            if data:
                conn.receive_data(data)
                while (ev := conn.next_event()) is not NEED_DATA:
                    if isinstance(ev, m.Hello):
                        sock.sendall(conn.send(m.Welcome(client_id=1, name="a")))
                    elif isinstance(ev, m.Attach):  # makes "uart0" known to the C path
                        sock.sendall(conn.send(m.Feedback(request_id=ev.request_id,
                                                          vm_id=ev.vm_id, client_id=1)))
                    elif isinstance(ev, m.IoRequest):
                        with arrived:
                            got[ev.vm_id] = ev.request_id
                            arrived.notify_all()
            for vm, event in ((2, answer_vm2), (1, answer_vm1)):
                if vm not in answered and vm in got and event.is_set():
                    answered.add(vm)
                    if vm == 2 and answer == "error":
                        reply: m.Message = m.Error(request_id=got[vm],
                                                   code=m.ErrorCode.INTERNAL,
                                                   text="the device failed")
                    else:
                        reply = m.Feedback(request_id=got[vm], vm_id=vm, client_id=1,
                                           size=1, data=0x40 + vm)
                    sock.sendall(conn.send(reply))
        sock.close()

    srv = threading.Thread(target=server, daemon=True)
    srv.start()
    link = ServerLink("a", listener.getsockname(), timeout=30.0).connect()
    answers: dict[int, tuple[int, int]] = {}
    vm1 = threading.Thread(target=lambda: answers.__setitem__(1, link.io(1, "uart0", PORT,
                                                                           5, 1, R)))
    vm2 = threading.Thread(target=lambda: answers.__setitem__(2, link.io(2, "uart0", PORT,
                                                                           5, 1, R)))
    try:
        assert link.attach(1, "uart0") == Status.OK
        assert link.attach(2, "uart0") == Status.OK
        vm1.start()
        with arrived:
            assert arrived.wait_for(lambda: 1 in got, 10), "VM 1's request never arrived"
        vm2.start()
        with arrived:
            assert arrived.wait_for(lambda: 2 in got, 10), "VM 2's request never arrived"
        wait_until(lambda: link._waiters, "VM 2's caller to wait as a follower")
        answer_vm2.set()
        vm2.join(10)
        # VM 2 is answered while VM 1's answer has not even been sent.
        vm2_answer = (Status.OK, 0x42) if answer == "feedback" else (Status.DEVICE_ERROR, 0)
        assert not vm2.is_alive() and answers.get(2) == vm2_answer, answers
        assert vm1.is_alive() and 1 not in answers
        answer_vm1.set()
        vm1.join(10)
        assert answers.get(1) == (Status.OK, 0x41)
    finally:
        answer_vm1.set()
        answer_vm2.set()
        link.close()
        listener.close()
        vm1.join(5)
        vm2.join(5)
