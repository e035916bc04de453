"""A device's ``--allow`` list holds through forwarding (issue 11, failure 3).

Server b holds ``bdev`` for alice only; server a forwards to b. Before the fix b
trusted whatever a forwarded, so bob, refused on b, attached ``bdev`` through a. Now a
names the client it speaks for (ORIGIN) and b applies its own list to that name; b
takes ORIGIN only from a peer that proved with a server certificate that it may speak
for others. In-process servers over mutual TLS on loopback; tests/test_platform_identity.py
does the same with real processes on the network-namespace rig.
"""

from __future__ import annotations

import logging
import time

import pytest

from remote_hw.config import DeviceSpec
from remote_hw.net.link import ServerLink
from remote_hw.net.security import TlsConfig
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import AccessKind, Direction, Role, Status
from remote_hw.server.controller import Controller
from remote_hw.server.directory import StaticDirectory
from remote_hw.server.listener import Server

from helpers import make_keys, until_ok

R, W, PORT = Direction.READ, Direction.WRITE, AccessKind.PORT
SCRATCH = 7


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"), ["a", "b"], ["alice", "bob"])


@pytest.fixture
def servers(keys, caplog):
    caplog.set_level(logging.INFO, logger="remote_hw")
    b = Server(Controller("b", [DeviceSpec("bdev", "uart16550"),
                                DeviceSpec("open0", "uart16550")]), "127.0.0.1", 0,
               tls=TlsConfig(keys, "b"), acl={"bdev": {"alice"}}).start()
    a = Server(Controller("a", []), "127.0.0.1", 0, tls=TlsConfig(keys, "a"),
               directory=StaticDirectory({"b": b.address}, {"bdev": "b"})).start()
    yield a, b
    a.stop()
    b.stop()


def link(keys, name: str, srv: Server, role: Role = Role.CLIENT) -> ServerLink:
    return ServerLink(srv.server_id, srv.address, client_name=name,
                      tls=TlsConfig(keys, name), role=role, timeout=3.0).connect()


def logged(caplog, text: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while text not in caplog.text:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_bob_is_refused_through_the_entry_server_and_alice_is_not(keys, servers, caplog):
    a, b = servers
    bob = link(keys, "bob", a)
    alice = link(keys, "alice", a)
    try:
        assert bob.attach(1, "bdev") == Status.DENIED
        assert logged(caplog, "client bob (through peer server a) may not use device bdev")
        # Nothing attached, so nothing reaches the device either.
        assert bob.io(1, "bdev", PORT, SCRATCH, 1, W, 0x66)[0] != Status.OK
        assert alice.attach(1, "bdev") == Status.OK
        assert alice.io(1, "bdev", PORT, SCRATCH, 1, W, 0x5A)[0] == Status.OK
        assert alice.io(1, "bdev", PORT, SCRATCH, 1, R) == (Status.OK, 0x5A)
        assert logged(caplog, "speaks for client")
    finally:
        bob.close()
        alice.close()


def test_bob_is_refused_on_the_device_server_directly(keys, servers):
    _, b = servers
    bob = link(keys, "bob", b)
    try:
        assert bob.attach(1, "bdev") == Status.DENIED
    finally:
        bob.close()


def test_a_peer_that_names_nobody_gets_no_listed_device(keys, servers):
    """A peer of before FEATURE_ORIGIN forwards without ORIGIN: b cannot apply its list
    to a client it does not know, so it refuses; devices without a list still work."""
    _, b = servers
    peer = link(keys, "a", b, Role.PEER)
    try:
        assert peer.attach(1, "open0", server_id="b", client_id=7) == Status.OK
        assert peer.attach(1, "bdev", server_id="b", client_id=7) == Status.DENIED
        assert peer.origin(7, "alice") == Status.OK
        assert peer.attach(1, "bdev", server_id="b", client_id=7) == Status.OK
        assert peer.origin(8, "bob") == Status.OK
        assert peer.attach(1, "bdev", server_id="b", client_id=8) == Status.DENIED
        # Once named, a client id keeps its name: no renaming bob's id to alice.
        assert peer.origin(8, "alice") == Status.DENIED
        assert peer.attach(1, "bdev", server_id="b", client_id=8) == Status.DENIED
    finally:
        peer.close()


def test_a_client_cannot_name_an_origin(keys, servers, caplog):
    _, b = servers
    bob = link(keys, "bob", b)
    try:
        assert bob.origin(1, "alice") != Status.OK
        assert logged(caplog, "only an authenticated server peer may")
        assert not bob.up  # the server closed the connection
    finally:
        bob.close()


def test_an_entry_server_still_works_with_a_device_server_without_origin(keys, caplog,
                                                                        monkeypatch):
    """Both ends of an older platform: no ORIGIN is offered, so none is sent. A
    device without a list is reached through the entry as before; a listed one is
    refused, since its server cannot know whom the request is for."""
    caplog.set_level(logging.INFO, logger="remote_hw")
    monkeypatch.setattr(m, "SUPPORTED_FEATURES", m.FEATURE_EVENTS | m.FEATURE_RESUME)
    b = Server(Controller("b", [DeviceSpec("bdev", "uart16550"),
                                DeviceSpec("open0", "uart16550")]), "127.0.0.1", 0,
               tls=TlsConfig(keys, "b"), acl={"bdev": {"alice"}}).start()
    a = Server(Controller("a", []), "127.0.0.1", 0, tls=TlsConfig(keys, "a"),
               directory=StaticDirectory({"b": b.address},
                                         {"bdev": "b", "open0": "b"})).start()
    alice = link(keys, "alice", a)
    try:
        assert alice.attach(1, "open0") == Status.OK
        assert alice.io(1, "open0", PORT, SCRATCH, 1, W, 0x11)[0] == Status.OK
        assert alice.io(1, "open0", PORT, SCRATCH, 1, R) == (Status.OK, 0x11)
        assert alice.attach(1, "bdev") == Status.DENIED
        assert "speaks for client" not in caplog.text  # no ORIGIN went out
    finally:
        alice.close()
        a.stop()
        b.stop()


def test_after_the_device_server_restarts_the_entry_names_its_clients_again(keys, caplog):
    """b restarts (a new session for a's link): a's link names alice again (ORIGIN)
    before it attaches her device again, so b's --allow still lets her in, and bob,
    who was refused, is still refused."""
    caplog.set_level(logging.INFO, logger="remote_hw")

    def start_b(port: int = 0) -> Server:
        return Server(Controller("b", [DeviceSpec("bdev", "uart16550")]), "127.0.0.1", port,
                      tls=TlsConfig(keys, "b"), acl={"bdev": {"alice"}}).start()

    b = start_b()
    port = b.address[1]
    a = Server(Controller("a", []), "127.0.0.1", 0, tls=TlsConfig(keys, "a"),
               directory=StaticDirectory({"b": b.address}, {"bdev": "b"}),
               forward_timeout=2.0).start()
    alice = link(keys, "alice", a)
    bob = link(keys, "bob", a)
    try:
        assert alice.attach(1, "bdev") == Status.OK
        assert bob.attach(1, "bdev") == Status.DENIED
        assert alice.io(1, "bdev", PORT, SCRATCH, 1, W, 0x5A)[0] == Status.OK
        b.stop()
        b = start_b(port)    # the same address; it knows nothing of a's session
        value = until_ok(lambda: alice.io(1, "bdev", PORT, SCRATCH, 1, R),
                          "alice's device through a after b restarted")
        assert value == (Status.OK, 0)     # a new instance, from power-on state
        assert logged(caplog, "is back: a new session")
        assert logged(caplog, "peer server a speaks for client")
        assert bob.io(1, "bdev", PORT, SCRATCH, 1, R)[0] != Status.OK
        assert bob.attach(1, "bdev") == Status.DENIED
    finally:
        alice.close()
        bob.close()
        a.stop()
        b.stop()
