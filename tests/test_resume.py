"""Resumable sessions: the write window, the token table, RESUME on a real server.

The parts without sockets first (remote_hw/server/resume.py), then an in-process
server over mutual TLS: a token works only for the identity it was given to, a
parked session keeps its devices until the grace period ends, and a client that does
not ask for a token (an older one) is released at once as it always was.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from remote_hw.config import DeviceSpec
from remote_hw.net.link import ServerLink
from remote_hw.net.recovery import MAX_DELAY, backoff
from remote_hw.net.security import TlsConfig
from remote_hw.protocol import (
    NEED_DATA,
    Connection,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    codec,
)
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import AccessKind, Direction, ErrorCode, Status
from remote_hw.server.controller import Controller
from remote_hw.server.listener import Server
from remote_hw.server.resume import ResumeTable, SinkRelay, WriteWindow

from helpers import make_keys, wait_until

R, W, PORT = Direction.READ, Direction.WRITE, AccessKind.PORT
SCRATCH = 7


# ----------------------------------------------------------------- without sockets


def test_a_write_window_applies_each_request_id_once():
    applied: list[int] = []

    def access(v: int) -> tuple[int, int]:
        applied.append(v)
        return 0, v

    w = WriteWindow(size=3)
    assert w.once(10, access, 1) == (0, 1)
    assert w.once(10, access, 99) == (0, 1)  # a retry: the first answer, not applied
    assert applied == [1] and w.repeats == 1
    for rid in (11, 12, 13):
        w.once(rid, access, rid)
    assert len(w) == 3  # bounded: 10 fell out
    w.once(10, access, 5)
    assert applied == [1, 11, 12, 13, 5]


def test_a_write_window_is_atomic_across_threads():
    """Two connections of one session applying the same id at once: one applies."""
    applied = []
    gate = threading.Barrier(8)

    def access() -> tuple[int, int]:
        applied.append(1)
        time.sleep(0.01)
        return 0, 0

    w = WriteWindow()

    def go() -> None:
        gate.wait()
        w.once(7, access)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert applied == [1] and w.repeats == 7


class Owner:
    def __init__(self) -> None:
        self.irqs: list[tuple[int, str, int, bool]] = []

    def interrupt(self, vm_id: int, device: str, line: int, level: bool) -> None:
        self.irqs.append((vm_id, device, line, level))

    def event(self, vm_id: int, device: str, name: str) -> None:
        pass


def test_the_table_gives_a_session_only_to_its_identity_and_expires_it():
    expired: list[int] = []
    table = ResumeTable(expired.append, grace=0.2)
    first = Owner()
    relay = SinkRelay(first)
    res = table.open(5, "alice", relay, first)
    assert res.token != 0
    assert table.claim(res.token, "bob", Owner())[0] is None  # another identity
    assert table.claim(12345, "alice", Owner())[2] == "unknown"
    table.park(res, first)
    relay.interrupt(1, "uart0", 0, True)  # parked: dropped
    assert first.irqs == []
    second = Owner()
    got, previous, why = table.claim(res.token, "alice", second)
    assert got is res and previous is None and why == ""
    relay.interrupt(1, "uart0", 0, True)
    assert second.irqs == [(1, "uart0", 0, True)]
    time.sleep(0.4)
    assert expired == []  # claimed in time: not released
    table.park(res, first)  # the old connection closing late changes nothing
    assert res.owner is second
    table.park(res, second)
    wait_until(lambda: expired == [5], "the grace period to end", 5)
    assert table.claim(res.token, "alice", Owner())[2] == "unknown"


def test_a_peer_servers_session_is_parked_with_the_clients_it_speaks_for():
    """An entry server's link: its session holds the local ids of the clients it
    speaks for (origins); they expire with it, and only a peer can claim it (a client
    of the same name cannot, nor can a peer claim a client's)."""
    expired: list[int] = []
    table = ResumeTable(expired.append, grace=0.2)
    peer, client = Owner(), Owner()
    res = table.open(3, "a", SinkRelay(peer), peer)
    res.origins = {101: (7, None), 102: (8, None)}   # origin id -> (local id, sink)
    res.origin_names = {101: "alice", 102: "bob"}
    mine = table.open(4, "a", SinkRelay(client), client)
    assert table.claim(res.token, "a", Owner(), peer=False)[0] is None
    assert table.claim(mine.token, "a", Owner(), peer=True)[0] is None
    table.park(res, peer)
    wait_until(lambda: sorted(expired) == [3, 7, 8], "the peer session and its origins", 5)
    table.close()


def test_parked_sessions_are_capped_per_identity_and_in_all():
    """Parked sessions hold devices without a connection: a client that connects,
    attaches and leaves in a loop must not pile them up."""
    expired: list[int] = []
    table = ResumeTable(expired.append, grace=60, max_parked_per_name=2, max_parked=3)
    owners = [Owner() for _ in range(5)]
    sessions = [table.open(i, "alice" if i < 3 else f"c{i}", SinkRelay(o), o)
                for i, o in enumerate(owners)]
    for res, owner in zip(sessions[:3], owners):
        table.park(res, owner)
    assert expired == [0]  # a third parked alice session: her oldest goes
    table.park(sessions[3], owners[3])
    table.park(sessions[4], owners[4])
    assert expired == [0, 1]  # four parked in all, cap 3: the oldest goes
    assert table.claim(sessions[0].token, "alice", Owner())[2] == "unknown"
    assert table.claim(sessions[2].token, "alice", Owner())[0] is sessions[2]
    table.close()


def test_backoff_doubles_up_to_a_cap_with_jitter():
    delays = [backoff(n) for n in range(12)]
    assert all(0 < d <= MAX_DELAY for d in delays)
    assert delays[0] <= 0.05 and delays[-1] >= MAX_DELAY / 2
    assert len({backoff(3) for _ in range(20)}) > 1  # jitter


def test_resume_and_origin_need_their_feature_bits():
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    s.receive_data(c.send(m.Hello(name="old", features=m.FEATURE_EVENTS)))
    s.next_event()
    c.receive_data(s.send(m.Welcome(client_id=1, name="srv")))
    c.next_event()
    with pytest.raises(LocalProtocolError) as e:
        c.send(m.Resume(request_id=1, token=0))
    assert e.value.code == ErrorCode.UNEXPECTED
    s.receive_data(codec.encode(m.Origin(request_id=2, client_id=1, name="x")))
    with pytest.raises(RemoteProtocolError) as e2:
        s.next_event()
    assert e2.value.code == ErrorCode.UNEXPECTED


# ----------------------------------------------------------------- on a server


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"), ["a"], ["c1", "c2"])


@pytest.fixture
def server(keys, caplog):
    caplog.set_level(logging.INFO, logger="remote_hw")
    srv = Server(Controller("a", [DeviceSpec("uart0", "uart16550")]), "127.0.0.1", 0,
                 tls=TlsConfig(keys, "a")).start()
    srv.router.resumes.grace = 1.0
    yield srv
    srv.stop()


def tls_link(keys, name: str, srv: Server, **kw) -> ServerLink:
    return ServerLink("a", srv.address, client_name=name, tls=TlsConfig(keys, name),
                      timeout=3.0, **kw).connect()


def raw_tls(keys, name: str, srv: Server, features: int = m.SUPPORTED_FEATURES):
    sock = TlsConfig(keys, name).client_context().wrap_socket(
        socket.create_connection(srv.address, timeout=5))
    conn = Connection(Role.CLIENT)

    def roundtrip(msg):
        sock.sendall(conn.send(msg))
        while True:
            ev = conn.next_event()
            if isinstance(ev, (m.Welcome, m.Feedback, m.Error)):
                return ev
            if ev is NEED_DATA:  # other events (interrupts) may share a read: drain first
                conn.receive_data(sock.recv(4096))

    roundtrip(m.Hello(name=name, features=features))
    return sock, roundtrip


def test_a_token_is_refused_to_another_identity(keys, server):
    c1 = tls_link(keys, "c1", server, reconnect=True)
    try:
        assert c1.recovery is not None
        token = c1.recovery.token
        assert token
        assert c1.attach(1, "uart0") == Status.OK
        assert c1.io(1, "uart0", PORT, SCRATCH, 1, W, 0x77)[0] == Status.OK
        sock, rt = raw_tls(keys, "c2", server)
        fb = rt(m.Resume(request_id=1, token=token))
        assert fb.status == Status.DENIED
        # c2 got nothing of c1's: its VM 1 is its own, unattached.
        fb = rt(m.IoRequest(request_id=2, vm_id=1, offset=SCRATCH, kind=PORT, size=1,
                            direction=R, device_id="uart0"))
        assert fb.status == Status.NOT_ATTACHED
        sock.close()
        assert c1.io(1, "uart0", PORT, SCRATCH, 1, R) == (Status.OK, 0x77)
    finally:
        c1.close()


def test_a_parked_session_keeps_its_devices_until_the_grace_ends(keys, server):
    sock, rt = raw_tls(keys, "c1", server)
    fb = rt(m.Resume(request_id=1, token=0))
    assert fb.status == Status.OK and fb.size == 8
    token = fb.data
    assert rt(m.Attach(request_id=2, vm_id=1, device_id="uart0")).status == Status.OK
    assert rt(m.IoRequest(request_id=3, vm_id=1, offset=SCRATCH, kind=PORT, size=1,
                          direction=W, data=0x42, device_id="uart0")).status == Status.OK
    sock.close()
    wait_until(lambda: len(server.router.resumes) == 1 and
               server.controller.instances(), "the session to be parked")
    sock2, rt2 = raw_tls(keys, "c1", server)
    fb = rt2(m.Resume(request_id=9, token=token))
    assert (fb.status, fb.data) == (Status.OK, token)
    # The same registers, and request id 3 is remembered: a retry is not applied again.
    fb = rt2(m.IoRequest(request_id=3, vm_id=1, offset=SCRATCH, kind=PORT, size=1,
                         direction=W, data=0x99, device_id="uart0"))
    assert fb.status == Status.OK
    fb = rt2(m.IoRequest(request_id=10, vm_id=1, offset=SCRATCH, kind=PORT, size=1,
                         direction=R, device_id="uart0"))
    assert (fb.status, fb.data) == (Status.OK, 0x42)
    sock2.close()
    # Nobody comes back: after the grace period the devices are released.
    wait_until(lambda: not server.controller.instances(), "the grace period to end", 10)
    sock3, rt3 = raw_tls(keys, "c1", server)
    assert rt3(m.Resume(request_id=1, token=token)).status == Status.NOT_ATTACHED
    sock3.close()


def test_a_client_without_the_feature_is_released_at_once(keys, server):
    sock, rt = raw_tls(keys, "c1", server, features=m.FEATURE_EVENTS)
    assert rt(m.Attach(request_id=1, vm_id=1, device_id="uart0")).status == Status.OK
    sock.close()
    wait_until(lambda: not server.controller.instances(), "the devices to be released", 5)
    assert len(server.router.resumes) == 0
