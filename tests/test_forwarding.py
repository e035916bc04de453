"""Forwarding between servers on loopback: entry server a, device server b."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from remote_hw.config import DeviceSpec
from remote_hw.net.link import ServerLink
from remote_hw.protocol.messages import AccessKind, Direction, Status
from remote_hw.server.controller import Controller
from remote_hw.server.directory import StaticDirectory
from remote_hw.server.listener import Server

from helpers import InterruptRecorder, free_port, until_ok

R, W, PORT = Direction.READ, Direction.WRITE, AccessKind.PORT


def make_b(port: int = 0) -> Server:
    return Server(Controller("b", [DeviceSpec("uart0", "uart16550")]), "127.0.0.1",
                  port).start()


def make_a(b_addr, routes=None, extra_servers=None) -> Server:
    servers = {"b": b_addr, **(extra_servers or {})}
    return Server(Controller("a", [DeviceSpec("rtc0", "cmos-rtc")]), "127.0.0.1", 0,
                  directory=StaticDirectory(servers, routes or {"uart0": "b"}),
                  forward_timeout=2.0).start()


@pytest.fixture
def platform():
    b = make_b()
    a = make_a(b.address)
    yield a, b
    a.stop()
    b.stop()


def test_request_reaches_device_on_b_through_a(platform):
    a, b = platform
    irqs = InterruptRecorder()
    link = ServerLink("a", a.address, on_interrupt=irqs).connect()
    try:
        assert link.attach(1, "uart0") == Status.OK
        assert link.io(1, "uart0", PORT, 7, 1, W, 0x5C)[0] == Status.OK
        assert link.io(1, "uart0", PORT, 7, 1, R) == (Status.OK, 0x5C)
        # the instance lives on b, keyed by b's own id for this client
        (inst,) = b.controller.instances()
        assert inst.reads == 1 and inst.writes == 1
        assert a.controller.instances() == []  # a keeps no device state of b's
        # a local device of a still works on the same link
        assert link.attach(1, "rtc0") == Status.OK
        # interrupts from b's device come back to this VM through a
        assert link.io(1, "uart0", PORT, 4, 1, W, 0x08)[0] == Status.OK
        assert link.io(1, "uart0", PORT, 1, 1, W, 0x02)[0] == Status.OK  # THRE interrupt
        assert irqs.wait_for((1, "uart0", 0, True))
    finally:
        link.close()


def test_two_clients_through_a_keep_separate_instances(platform):
    a, b = platform
    i1, i2 = InterruptRecorder(), InterruptRecorder()
    l1 = ServerLink("a", a.address, on_interrupt=i1).connect()
    l2 = ServerLink("a", a.address, on_interrupt=i2).connect()
    try:
        for link in (l1, l2):
            assert link.attach(5, "uart0") == Status.OK  # same VM id on both
        assert l1.io(5, "uart0", PORT, 7, 1, W, 0x01)[0] == Status.OK
        assert l2.io(5, "uart0", PORT, 7, 1, W, 0x02)[0] == Status.OK
        assert l1.io(5, "uart0", PORT, 7, 1, R) == (Status.OK, 0x01)
        assert l2.io(5, "uart0", PORT, 7, 1, R) == (Status.OK, 0x02)
        assert len(b.controller.instances()) == 2
        assert l1.io(5, "uart0", PORT, 4, 1, W, 0x08)[0] == Status.OK
        assert l1.io(5, "uart0", PORT, 1, 1, W, 0x02)[0] == Status.OK
        assert i1.wait_for((5, "uart0", 0, True))
        time.sleep(0.2)
        assert i2.seen == []  # client 2 never sees client 1's interrupt
    finally:
        l1.close()
        l2.close()
    deadline = time.monotonic() + 5
    while b.controller.instances() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.controller.instances() == []  # clients gone from a -> detached on b too


def test_naming_the_target_server(platform):
    a, b = platform
    link = ServerLink("a", a.address).connect()
    try:
        assert link.attach(1, "uart0", server_id="b") == Status.OK
        assert link.io(1, "uart0", PORT, 5, 1, R, server_id="b") == (Status.OK, 0x60)
        assert link.attach(1, "uart0", server_id="zz") == Status.UNKNOWN_SERVER
        assert link.io(1, "uart0", PORT, 5, 1, R, server_id="zz")[0] == Status.UNKNOWN_SERVER
        assert link.attach(1, "rtc0", server_id="b") == Status.UNKNOWN_DEVICE  # not on b
        assert link.attach(1, "nosuch") == Status.UNKNOWN_DEVICE
    finally:
        link.close()


def test_stale_directory_cannot_make_a_loop():
    """a thinks uart9 is on b, b thinks it is on a. A forwarded request names its
    target, so b answers for itself instead of sending it back: no loop."""
    pa, pb = free_port(), free_port()
    table = {"a": ("127.0.0.1", pa), "b": ("127.0.0.1", pb)}
    a = Server(Controller("a", []), "127.0.0.1", pa,
               directory=StaticDirectory(table, {"uart9": "b"})).start()
    b = Server(Controller("b", []), "127.0.0.1", pb,
               directory=StaticDirectory(table, {"uart9": "a"})).start()
    link = ServerLink("a", a.address).connect()
    try:
        assert link.attach(1, "uart9") == Status.UNKNOWN_DEVICE
        assert link.io(1, "uart0", PORT, 0, 1, R)[0] == Status.UNKNOWN_DEVICE
    finally:
        link.close()
        a.stop()
        b.stop()


def test_hop_count_is_bounded(platform):
    """A request that already crossed MAX_HOPS servers is not forwarded again."""
    from remote_hw.protocol import NEED_DATA, Connection, Role
    from remote_hw.protocol import messages as m
    from remote_hw.server.forward import MAX_HOPS
    a, b = platform
    sock = socket.create_connection(a.address, timeout=5)
    conn = Connection(Role.CLIENT)

    def roundtrip(msg):
        sock.sendall(conn.send(msg))
        while True:
            ev = conn.next_event()
            if isinstance(ev, (m.Welcome, m.Feedback)):
                return ev
            if ev is NEED_DATA:  # other events (interrupts) may share a read: drain first
                conn.receive_data(sock.recv(4096))
    try:
        roundtrip(m.Hello(name="raw"))
        assert roundtrip(m.Attach(request_id=1, vm_id=1, device_id="uart0")).status == 0
        ok = roundtrip(m.IoRequest(request_id=2, vm_id=1, offset=5, kind=PORT, size=1,
                                   direction=R, device_id="uart0", hops=MAX_HOPS - 1))
        assert (ok.status, ok.data) == (Status.OK, 0x60)
        fb = roundtrip(m.IoRequest(request_id=3, vm_id=1, offset=5, kind=PORT, size=1,
                                   direction=R, device_id="uart0", hops=MAX_HOPS))
        assert fb.status == Status.HOP_LIMIT
    finally:
        sock.close()


def test_device_server_gone_and_back(caplog):
    caplog.set_level(logging.INFO, logger="remote_hw")
    port = free_port()
    b = make_b(port)
    a = make_a(("127.0.0.1", port))
    link = ServerLink("a", a.address, timeout=3.0).connect()
    try:
        assert link.attach(1, "uart0") == Status.OK
        assert link.io(1, "uart0", PORT, 7, 1, W, 0x33)[0] == Status.OK
        b.stop()
        # removed device: fails at once, the entry server and the client stay up
        assert link.io(1, "uart0", PORT, 7, 1, R)[0] == Status.UNREACHABLE
        assert link.io(1, "uart0", PORT, 7, 1, R)[0] == Status.UNREACHABLE
        assert link.up
        b = make_b(port)  # restarted, same address
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status, value = link.io(1, "uart0", PORT, 7, 1, R)
            if status == Status.OK:
                break
            time.sleep(0.2)
        assert status == Status.OK and value == 0  # found again: a fresh instance
        assert "is back: a new session" in caplog.text  # the link came back by itself
    finally:
        link.close()
        a.stop()
        b.stop()


@pytest.mark.parametrize("cold_ids", [False, True], ids=["field-reader", "long-way"])
def test_a_vm_waiting_for_a_stopped_server_does_not_hold_up_another_vm(cold_ids):
    """Two VMs of one client over one connection to entry server a: VM 1's access to
    a device on server b waits while b is stopped; VM 2's access to a device on a is
    answered meanwhile, and VM 1's completes once b continues (its connection's
    reading moved to another thread while VM 1's call waited). ``long-way``: the
    identifier caches are empty, so the server decodes VM 1's request with the full
    decoder (a handler, not the field reader), which must hand off the same way."""
    import os
    import signal
    import threading

    from helpers import start_server, wait_until

    proc, port = start_server("uart0=uart16550", server_id="b")
    a = Server(Controller("a", [DeviceSpec("rtc0", "cmos-rtc")]), "127.0.0.1", 0,
               directory=StaticDirectory({"b": ("127.0.0.1", port)}, {"uart0": "b"}),
               forward_timeout=30.0).start()
    link = ServerLink("a", a.address, timeout=60.0).connect()
    stopped = False
    try:
        assert link.attach(1, "uart0") == Status.OK
        assert link.attach(2, "rtc0") == Status.OK
        assert link.io(1, "uart0", PORT, 7, 1, W, 0x3C)[0] == Status.OK
        os.kill(proc.p.pid, signal.SIGSTOP)
        stopped = True
        answers: list = []
        if cold_ids:
            from remote_hw.protocol import _rules
            _rules._ID_STR.clear()
        vm1 = threading.Thread(target=lambda: answers.append(
            link.io(1, "uart0", PORT, 7, 1, R)))
        vm1.start()
        peer = a.router.forwarder._links["b"]
        wait_until(lambda: peer._pending, "VM 1's request to reach b's link")
        assert link.io(2, "rtc0", PORT, 0, 1, W, 0x0B)[0] == Status.OK
        assert link.io(2, "rtc0", PORT, 1, 1, R)[0] == Status.OK
        assert vm1.is_alive() and answers == []  # still waiting for b
        os.kill(proc.p.pid, signal.SIGCONT)
        stopped = False
        vm1.join(30)
        assert answers == [(Status.OK, 0x3C)]
    finally:
        if stopped:
            os.kill(proc.p.pid, signal.SIGCONT)
        link.close()
        a.stop()
        proc.stop()


# ------------------------------------------------------------------ the link between servers

def _cut(a: Server) -> ServerLink:
    """Break a's connection to b under its link (as a NAT that forgets the flow, or a
    peer reset, would); the link must notice and come back by itself."""
    peer = a.router.forwarder._links["b"]
    t = peer._t
    assert t is not None
    t.shutdown()
    return peer


def test_a_cut_link_between_servers_resumes_the_devices_as_they_were(platform, caplog):
    """The entry's link to b breaks: it reconnects and resumes its session on b, so the
    UART is the same instance with the same registers (not power-on state), and its
    asserted interrupt line is said again."""
    caplog.set_level(logging.INFO, logger="remote_hw")
    a, b = platform
    irqs = InterruptRecorder()
    link = ServerLink("a", a.address, on_interrupt=irqs, timeout=3.0).connect()
    try:
        assert link.attach(1, "uart0") == Status.OK
        for offset, value in ((7, 0x5A), (3, 0x03), (4, 0x08), (1, 0x02)):
            assert link.io(1, "uart0", PORT, offset, 1, W, value)[0] == Status.OK
        assert irqs.wait_for((1, "uart0", 0, True))
        peer = _cut(a)
        assert until_ok(lambda: link.io(1, "uart0", PORT, 7, 1, R),
                         "the scratch register through a") == (Status.OK, 0x5A)
        assert link.io(1, "uart0", PORT, 3, 1, R) == (Status.OK, 0x03)   # LCR kept
        assert peer.recovery is not None and peer.recovery.resumed == 1
        assert len(b.controller.instances()) == 1     # the same instance, not a new one
        assert "resumed its session" in caplog.text
        with irqs.cond:   # the level is said again on the resumed session
            assert irqs.cond.wait_for(
                lambda: irqs.seen.count((1, "uart0", 0, True)) >= 2, 5)
    finally:
        link.close()


def test_a_vm_detached_while_the_link_between_servers_is_down_is_detached_on_b(platform):
    """A client detaches a VM while a's link to b is down: the resumed session would
    still hold that VM's device on b, so the link sends the DETACH once it is back."""
    a, b = platform
    link = ServerLink("a", a.address, timeout=3.0).connect()
    try:
        for vm in (1, 2):
            assert link.attach(vm, "uart0") == Status.OK
        assert len(b.controller.instances()) == 2
        _cut(a)
        assert link.detach(2) == Status.OK        # answered by a at once
        until_ok(lambda: link.io(1, "uart0", PORT, 7, 1, R), "vm 1's device through a")
        deadline = time.monotonic() + 5
        while len(b.controller.instances()) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [vm for i in b.controller.instances() for _c, vm in i.sessions] == [1]
    finally:
        link.close()


def test_a_parked_peer_session_releases_its_clients_devices_when_nobody_resumes_it():
    """a goes away for good: b parks a's session with the clients a spoke for, and
    releases their devices when the grace period ends (they are not kept forever)."""
    b = make_b()
    b.router.resumes.grace = 0.5
    a = make_a(b.address)
    link = ServerLink("a", a.address, timeout=3.0).connect()
    try:
        assert link.attach(1, "uart0") == Status.OK
        assert len(b.controller.instances()) == 1
        link.close()
        a.stop()
        deadline = time.monotonic() + 10
        while b.controller.instances() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b.controller.instances() == []
    finally:
        a.stop()
        b.stop()


def test_a_device_that_moved_is_followed_and_the_old_server_lets_it_go(caplog):
    """b goes away and the directory now places uart0 on c: the next access follows it
    there (a new instance). When b comes back, a's link to b (back by itself) does not
    attach the VM there again."""
    caplog.set_level(logging.INFO, logger="remote_hw")
    b = make_b()
    port = b.address[1]
    c = Server(Controller("c", [DeviceSpec("uart0", "uart16550")]), "127.0.0.1", 0).start()
    a = make_a(b.address, extra_servers={"c": c.address})
    link = ServerLink("a", a.address, timeout=3.0).connect()
    try:
        assert link.attach(1, "uart0") == Status.OK
        assert link.io(1, "uart0", PORT, 7, 1, W, 0x77)[0] == Status.OK
        peer_b = a.router.forwarder._links["b"]
        b.stop()
        deadline = time.monotonic() + 10
        while peer_b.up and time.monotonic() < deadline:
            time.sleep(0.02)
        a.router.forwarder.directory.routes["uart0"] = "c"   # moved, as etcd would say
        # The first access finds the move and is answered there (it named b, the old
        # route, until 2026-12-05, and failed).
        assert link.io(1, "uart0", PORT, 7, 1, R) == (Status.OK, 0)  # a new instance
        assert "uart0 found again on server c" in caplog.text
        assert len(c.controller.instances()) == 1
        b = make_b(port)                                      # b is back
        deadline = time.monotonic() + 10
        while not peer_b.up and time.monotonic() < deadline:
            time.sleep(0.05)
        assert peer_b.up
        time.sleep(0.2)
        assert b.controller.instances() == []                # not attached there again
    finally:
        link.close()
        a.stop()
        b.stop()
        c.stop()
