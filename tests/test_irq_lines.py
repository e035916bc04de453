"""A device with two interrupt lines, end to end: the i8042's keyboard line (wire line
0) and its aux (mouse) line (wire line 1) reach a real KVM guest as the IRQs the
client's ``--map ...,irq=K:M`` names, through a real server process.

The guest (guests/mouse.S) enables the aux port and asks the mouse to report; the
mouse's 0xFA answer raises line 1. The guest exits with 25 when it arrives by IRQ 12
and with 3 when it arrives by IRQ 1, so swapping the map's IRQs must swap the result.
"""

from __future__ import annotations

import pytest

from remote_hw.config import ConfigError, parse_map
from remote_hw.guest_images import guest_image

from helpers import Proc, remote_hw_cmd, start_server


def _run_mouse_guest(irqs: str) -> tuple[int, str]:
    server, port = start_server("kbd0=i8042")
    vm = Proc(remote_hw_cmd("vm", "--image", str(guest_image("mouse.bin")), "--vm-id", "1",
                            "--server", f"a=127.0.0.1:{port}",
                            "--map", f"port:0x60-0x64=a/kbd0,irq={irqs}"))
    try:
        return vm.wait(120), vm.output()
    finally:
        vm.stop()
        server.stop()


@pytest.mark.kvm
def test_the_aux_line_reaches_the_guest_as_irq_12():
    status, out = _run_mouse_guest("1:12")
    assert status == 25, out          # debug exit 12: IRQ 12 with the aux byte 0xFA


@pytest.mark.kvm
def test_the_line_number_not_the_device_picks_the_irq():
    status, out = _run_mouse_guest("12:1")   # aux line now on IRQ 1
    assert status == 3, out           # debug exit 1: the keyboard's ISR ran


def test_map_irq_list_parses_per_line():
    spec = parse_map("port:0x60-0x64=a/kbd0,irq=1:12")
    assert spec.irqs == (1, 12) and spec.irq == 1
    assert parse_map("port:0x3f8-0x3ff=a/uart0,irq=4").irqs == (4,)
    assert parse_map("port:0x3f8-0x3ff=a/uart0").irqs == () and \
        parse_map("port:0x3f8-0x3ff=a/uart0").irq is None


@pytest.mark.parametrize("bad, why", [
    ("irq=1:1", "same irq"),
    ("irq=1:24", "outside 0-23"),
    ("irq=1:", "irq"),
])
def test_map_irq_list_errors(bad: str, why: str):
    with pytest.raises(ConfigError, match=why):
        parse_map(f"port:0x60-0x64=a/kbd0,{bad}")


def test_an_unrouted_line_is_named_once_when_raised_and_not_when_lowered(caplog):
    """A resumed session re-sends every line's level (remote_hw/net/resume.py); a low
    level on a line no ``irq=`` routes changes nothing, so it is not worth a warning.
    A raised one is named, once per line."""
    from remote_hw.client.agent import Agent

    handlers = {}

    def link_factory(name, addr, **kw):
        handlers[name] = kw["on_interrupt"]
        return None

    Agent({"a": ("127.0.0.1", 9)}, link_factory=link_factory)
    deliver = handlers["a"]
    with caplog.at_level("WARNING", logger="remote_hw.client"):
        deliver(1, "uart0", 0, False, 1)
        assert "does not route" not in caplog.text
        deliver(1, "uart0", 0, True, 1)
        deliver(1, "uart0", 0, True, 1)
    assert caplog.text.count("does not route") == 1, caplog.text
    assert "vm 1 device uart0 line 0" in caplog.text
