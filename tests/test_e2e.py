"""End to end: real remote-hw processes, real KVM guests, real loopback TCP."""

from __future__ import annotations

import signal
import socket
import struct
import textwrap
import time

import pytest

from remote_hw.client.agent import Agent
from remote_hw.config import DeviceSpec, VmConfig, parse_map
from remote_hw.guest_images import guest_image
from remote_hw.server.controller import Controller
from remote_hw.server.listener import Server

from helpers import Proc, backend_port, free_port, read_until, remote_hw_cmd, start_server

pytestmark = pytest.mark.kvm

UART_MAP = "port:0x3f8-0x3ff=a/uart0,irq=4"


def vm_cmd(image: str, port: int, *maps: str, vm_id: int = 1, extra=()) -> list[str]:
    argv = ["vm", "--image", str(guest_image(image)), "--vm-id", str(vm_id),
            "--server", f"a=127.0.0.1:{port}", *extra]
    for mp in maps:
        argv += ["--map", mp]
    return remote_hw_cmd(*argv)


def test_hello_text_reaches_the_servers_file_backend(tmp_path):
    out = tmp_path / "uart1.out"
    server, port = start_server(f"uart1=uart16550,backend=file:{out}", "rtc0=cmos-rtc")
    try:
        vm = Proc(vm_cmd("hello.bin", port, "port:0x3f8-0x3ff=a/uart1,irq=4"))
        assert vm.wait(60) == 0, vm.output()
        assert out.read_bytes() == b"Hello from remote-hw guest\r\n"
    finally:
        server.stop()


@pytest.mark.parametrize("image, text", [("hello32.elf", b"hello32\r\n"),
                                         ("hello64.elf", b"hello64\r\n")])
def test_elf_guests_print_through_the_remote_uart(tmp_path, image, text):
    out = tmp_path / "out"
    server, port = start_server(f"uart0=uart16550,backend=file:{out}")
    try:
        vm = Proc(vm_cmd(image, port, UART_MAP))
        assert vm.wait(60) == 0, vm.output()
        assert out.read_bytes() == text
    finally:
        server.stop()


def test_rtc_guest_reads_the_remote_clock(tmp_path):
    out = tmp_path / "out"
    server, port = start_server(f"uart0=uart16550,backend=file:{out}", "rtc0=cmos-rtc")
    try:
        before = time.gmtime()
        vm = Proc(vm_cmd("rtc.bin", port, UART_MAP, "port:0x70-0x71=a/rtc0"))
        assert vm.wait(60) == 0, vm.output()
        line = out.read_bytes().decode()
        assert line.startswith("RTC ") and line.endswith("\r\n"), line
        assert line[4:14] in (time.strftime("%Y-%m-%d", before),
                              time.strftime("%Y-%m-%d", time.gmtime()))
    finally:
        server.stop()


def test_echo_through_interrupts():
    server, port = start_server("uart0=uart16550,backend=tcp:127.0.0.1:0")
    vm = Proc(vm_cmd("echo.bin", port, UART_MAP))
    try:
        uart = socket.create_connection(("127.0.0.1", backend_port(server, "uart0")))
        read_until(uart, b"echo ready\r\n")
        uart.sendall(b"remote")
        read_until(uart, b"remote")
        uart.sendall(b"\x04")  # Ctrl-D: the guest says bye and halts
        read_until(uart, b"bye\r\n")
        assert vm.wait(60) == 0, vm.output()
        uart.close()
    finally:
        vm.stop()
        server.stop()


def test_two_vms_in_one_agent_never_see_each_others_traffic(tmp_path):
    """Two echo VMs over one connection: bytes and interrupts stay with their VM."""
    server, port = start_server("uart0=uart16550,backend=tcp:127.0.0.1:0")
    cfg = tmp_path / "agent.toml"
    echo = guest_image("echo.bin")
    cfg.write_text(textwrap.dedent(f"""
        [servers]
        a = "127.0.0.1:{port}"
        [[vm]]
        id = 1
        image = "{echo}"
        map = ["{UART_MAP}"]
        [[vm]]
        id = 2
        image = "{echo}"
        map = ["{UART_MAP}"]
    """))
    agent = Proc(remote_hw_cmd("agent", "--config", str(cfg)))
    try:
        # One connection from the agent for both VMs.
        agent.wait_for(r"connected as client")
        ports = [backend_port(server, "uart0", 0), backend_port(server, "uart0", 1)]
        socks = [socket.create_connection(("127.0.0.1", p)) for p in ports]
        for s in socks:
            read_until(s, b"echo ready\r\n")
        got = [b"", b""]
        for i in range(6):  # interleave: each VM gets its own alphabet
            for n, s in enumerate(socks):
                s.sendall(bytes([ord("a" if n == 0 else "A") + i]))
        for n, s in enumerate(socks):
            want = (b"abcdef", b"ABCDEF")[n]
            got[n] = read_until(s, want)
        assert got[0] == b"abcdef" and got[1] == b"ABCDEF"
        for s in socks:
            s.sendall(b"\x04")
            read_until(s, b"bye\r\n")
        assert agent.wait(60) == 0, agent.output()
        assert len(server.wait_for(r"client (\d+) \(agent\) connected").groups()) == 1
        assert sum("connected" in line and "(agent)" in line
                   for line in server.output().splitlines()) == 1
    finally:
        agent.stop()
        server.stop()


def _interrupt_counter(vm, counts: dict, key: int):
    real = vm.set_irq

    def counting(line: int, level) -> None:
        counts[key] = counts.get(key, 0) + 1
        real(line, level)
    vm.set_irq = counting


def test_interrupts_are_injected_only_into_their_vm():
    """In-process, so the test can count what each VM's interrupt line receives."""
    ctl = Controller("a", [DeviceSpec("uart0", "uart16550", backend="tcp:127.0.0.1:0")])
    srv = Server(ctl, "127.0.0.1", 0).start()
    agent = Agent({"a": srv.address})
    try:
        handles = [agent.add_vm(VmConfig(n, str(guest_image("echo.bin")), 2 << 20,
                                         [parse_map(UART_MAP)])) for n in (1, 2)]
        counts: dict[int, int] = {}
        for h in handles:
            _interrupt_counter(h.vm, counts, h.config.vm_id)
        agent.connect()
        agent.start()
        by_vm = {next(iter(i.sessions))[1]: i for i in ctl.instances()}
        socks = {n: socket.create_connection(by_vm[n].backend.address) for n in (1, 2)}
        for s in socks.values():
            read_until(s, b"echo ready\r\n")
        before = dict(counts)
        socks[1].sendall(b"xyz")
        read_until(socks[1], b"xyz")
        assert counts.get(1, 0) > before.get(1, 0)  # VM 1 took receive interrupts
        assert counts.get(2, 0) == before.get(2, 0)  # VM 2's line never moved
        for s in socks.values():
            s.sendall(b"\x04")
        assert agent.wait(60) == {1: 0, 2: 0}
    finally:
        agent.stop()
        srv.stop()


def test_server_killed_mid_run_leaves_no_vm_hanging(tmp_path):
    """The guest reads a remote register in a loop; the server dies under it."""
    image = bytearray(guest_image("ioloop.bin").read_bytes())
    struct.pack_into("<III", image, 4, 400000, 0x3FF, 0)  # count, port (UART scratch), IN
    img = tmp_path / "loop.bin"
    img.write_bytes(image)
    server, port = start_server("uart0=uart16550")
    vm = Proc(remote_hw_cmd("vm", "--image", str(img), "--server", f"a=127.0.0.1:{port}",
                            "--map", UART_MAP, "--timeout", "2"))
    try:
        vm.wait_for(r"connected as client")
        time.sleep(1.0)  # well inside the loop (400000 forwarded reads take much longer)
        assert vm.p.poll() is None
        server.stop(signal.SIGKILL)
        # The rest of the reads return all ones at once; the guest ends with al = 0xff
        # written to the debug-exit port: status (0xff << 1 | 1) & 0xff = 0xff.
        assert vm.wait(120) == 0xFF, vm.output()
        assert f"server a (127.0.0.1:{port}) is gone" in vm.output()
        assert "reads return all ones" in vm.output()
    finally:
        vm.stop()
        server.stop()


def test_vm_without_server_exits_1_with_reason():
    vm = Proc(vm_cmd("hello.bin", free_port(), UART_MAP))
    assert vm.wait(30) == 1
    assert "cannot connect" in vm.output()


def test_demo_runs_echoes_and_stops_cleanly():
    demo = Proc(remote_hw_cmd("demo", "--listen", "127.0.0.1:0", "--uart-port", "0"))
    try:
        mt = demo.wait_for(r"connect with:\s+nc (\S+) (\d+)", timeout=60)
        uart = socket.create_connection((mt.group(1), int(mt.group(2))))
        read_until(uart, b"echo ready\r\n")
        uart.sendall(b"hi")
        read_until(uart, b"hi")
        demo.wait_for(r"uart0 W \+0 = 0x69 'i'")  # the traffic display saw the echo
        uart.close()
        assert demo.stop(signal.SIGINT) == 0, demo.output()
        assert "remote-hw demo: stopped" in demo.output()
    finally:
        demo.stop(signal.SIGKILL)
