"""The server's parts apart from sockets: the access policy, the router's client
table, device capabilities, and instances publishing a stream model's output."""

from __future__ import annotations

import pytest

from remote_hw.config import DeviceSpec
from remote_hw.devices.capabilities import ByteStream, Clock, Keyboard, TextInput
from remote_hw.devices.cmos_rtc import CmosRtc
from remote_hw.devices.i8042 import I8042
from remote_hw.devices.uart16550 import Uart16550
from remote_hw.net.security import Identity
from remote_hw.protocol.messages import Direction
from remote_hw.server.controller import Controller
from remote_hw.server.directory import StaticDirectory
from remote_hw.server.policy import AccessPolicy
from remote_hw.server.router import Router


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple] = []

    def interrupt(self, vm_id: int, device: str, line: int, level: bool) -> None:
        self.got.append(("irq", vm_id, device, line, level))

    def event(self, vm_id: int, device: str, name: str) -> None:
        self.got.append(("event", vm_id, device, name))


# ------------------------------------------------------------------ policy

def test_policy_without_tls_accepts_peers_from_loopback_only():
    p = AccessPolicy(None)
    assert p.peer_allowed(None, "127.0.0.1:5000")
    assert p.peer_allowed(None, "::1:5000")
    assert not p.peer_allowed(None, "192.0.2.7:5000")
    assert not p.peer_allowed(None, "not-an-address:1")


def test_policy_with_certificates_goes_by_the_role():
    p = AccessPolicy(object())  # type: ignore[arg-type]   # any TlsConfig: only "is set" counts
    assert p.peer_allowed(Identity("b", "server"), "192.0.2.7:1")
    assert not p.peer_allowed(Identity("c", "client"), "127.0.0.1:1")
    assert not p.peer_allowed(None, "127.0.0.1:1")


def test_policy_allow_lists():
    with pytest.raises(ValueError, match="needs TLS"):
        AccessPolicy(None, {"uart0": {"alice"}})
    p = AccessPolicy(object(), {"uart0": {"alice"}})  # type: ignore[arg-type]
    assert p.allowed("alice", "uart0")
    assert not p.allowed("bob", "uart0")
    # A forwarded request is checked against the origin the peer named; a peer that
    # named nobody (before FEATURE_ORIGIN) is refused where there is a list.
    assert not p.allowed(None, "uart0")
    assert p.allowed(None, "rtc0")
    assert p.allowed("bob", "rtc0")               # no list: open


# ------------------------------------------------------------------ router

def test_router_numbers_clients_and_relays_to_their_sinks():
    ctl = Controller("a", [])
    r = Router(ctl, StaticDirectory(), tls=None, forward_timeout=1.0)
    try:
        s1, s2 = Sink(), Sink()
        c1, c2 = r.add_client(s1), r.add_client(s2)
        assert (c1, c2) == (1, 2)
        assert r.client_sink(c2) is s2
        r._relay_interrupt(c2, 7, "uart0", 0, True)
        r._relay_event(c1, 3, "kbd0", "reset-request")
        assert s2.got == [("irq", 7, "uart0", 0, True)]
        assert s1.got == [("event", 3, "kbd0", "reset-request")]
        r.remove_client(c2)
        assert r.client_sink(c2) is None
        r._relay_interrupt(c2, 7, "uart0", 0, False)   # gone: dropped, no error
        assert r.add_client(Sink()) == 3               # ids are never reused
    finally:
        r.close()


# ------------------------------------------------------------------ capabilities

def test_the_built_in_models_declare_their_abilities():
    names = {ByteStream: "ByteStream", Clock: "Clock", Keyboard: "Keyboard",
             TextInput: "TextInput"}

    def abilities(model) -> set[str]:
        return {name for p, name in names.items() if isinstance(model, p)}
    assert abilities(CmosRtc()) == {"Clock"}
    assert abilities(Uart16550()) == {"ByteStream"}
    assert abilities(I8042()) == {"ByteStream", "Keyboard", "TextInput"}


# ------------------------------------------------------------------ output listeners

def test_an_instance_publishes_the_guests_output_to_its_listeners():
    ctl = Controller("a", [DeviceSpec("uart0", "uart16550")])
    try:
        assert ctl.attach(1, 1, "uart0", Sink()) == 0
        inst = ctl.instances()[0]
        assert inst.model.tx_sink == inst.from_guest
        seen: list[bytes] = []

        def broken(data: bytes) -> None:
            raise RuntimeError("an observer's bug")

        inst.add_output_listener(broken)
        inst.add_output_listener(seen.append)
        ctl.access(1, 1, "uart0", 0, 1, Direction.WRITE, ord("h"))
        inst.remove_output_listener(seen.append)
        ctl.access(1, 1, "uart0", 0, 1, Direction.WRITE, ord("i"))
        assert seen == [b"h"]                              # a broken one stops nobody
        inst.remove_output_listener(broken)
        assert inst.output_listeners == ()
    finally:
        ctl.close()


# ------------------------------------------------------------------ interrupt fan-out

class ManySink(Sink):
    """A sink that takes several VMs at once, as a session does."""

    def interrupt_vms(self, vm_ids: tuple[int, ...], device: str, line: int,
                      level: bool) -> None:
        self.got.append(("irqs", vm_ids, device, line, level))


def test_a_shared_devices_edge_goes_to_each_sink_once_with_all_its_vms():
    """The fan-out groups the attached VMs by sink: a session gets one call with all
    its VMs (one encode for them all), a plain sink one call per VM; a detach is
    seen by the next edge."""
    ctl = Controller("a", [DeviceSpec("u", "uart16550", shared=True)])
    many, plain = ManySink(), Sink()
    for vm in (1, 2, 3):
        assert ctl.attach(1, vm, "u", many) == 0
    assert ctl.attach(2, 9, "u", plain) == 0
    ctl.access(1, 1, "u", 4, 1, int(Direction.WRITE), 0x08)   # MCR.OUT2
    ctl.access(1, 1, "u", 1, 1, int(Direction.WRITE), 0x02)   # IER.THRI: the line rises
    assert many.got == [("irqs", (1, 2, 3), "u", 0, True)]
    assert plain.got == [("irq", 9, "u", 0, True)]
    ctl.detach(1, 2)
    ctl.access(1, 1, "u", 1, 1, int(Direction.WRITE), 0x00)   # the line falls
    assert many.got[-1] == ("irqs", (1, 3), "u", 0, False)
    ctl.close()
