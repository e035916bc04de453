"""Several servers as one platform, on a rig of network namespaces (one per host).

client ──TLS──► server a (entry) ──TLS──► server b (holds the devices)
                      └──── etcd (directory, leases) ────┘

Real remote-hw processes, a real etcd, real KVM guests, mutual TLS everywhere.
"""

from __future__ import annotations

import signal
import sys
import textwrap

import pytest

from remote_hw.guest_images import guest_image

from helpers import REPO, Proc, make_keys, remote_hw_cmd, wait_until
from rig import Etcd, rig_down, rig_up

# Real guests (kvm) in network namespaces (netns, root) with a real etcd.
pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.netns, pytest.mark.etcd]

LEASE = 2
CHAT = [sys.executable, str(REPO / "tests" / "tools" / "chat.py")]


@pytest.fixture(scope="module")
def rig():
    r = rig_up()
    yield r
    rig_down(r)


@pytest.fixture(scope="module")
def etcd(rig, tmp_path_factory):
    e = Etcd(rig, tmp_path_factory.mktemp("etcd"))
    yield e
    e.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"), ["a", "b"], ["c1"])


class Platform:
    def __init__(self, rig, etcd, keys) -> None:
        self.rig, self.etcd, self.keys = rig, etcd, keys
        self.procs: list[Proc] = []

    def server(self, sid: str, *devices: str) -> Proc:
        argv = ["server", "--listen", f"{self.rig.addr(sid)}:7700", "--server-id", sid,
                "--no-mount",
                "--directory", self.etcd.url, "--lease", str(LEASE),
                "--tls-dir", str(self.keys)]
        for d in devices:
            argv += ["--device", d]
        p = Proc(self.rig.cmd(sid, remote_hw_cmd(*argv)))
        self.procs.append(p)
        p.wait_for(r"registered server")
        return p

    def vm(self, image: str, *maps: str, extra: tuple[str, ...] = ()) -> Proc:
        argv = ["vm", "--image", str(guest_image(image)),
                "--server", f"a={self.rig.addr('a')}:7700",
                "--tls-dir", str(self.keys), "--tls-name", "c1", *extra]
        for mp in maps:
            argv += ["--map", mp]
        p = Proc(self.rig.cmd("client", remote_hw_cmd(*argv)))
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
def platform(rig, etcd, keys):
    p = Platform(rig, etcd, keys)
    yield p
    p.close()


def test_guest_output_reaches_a_device_on_b_through_a(platform, tmp_path):
    out = tmp_path / "uart0.out"
    platform.server("b", f"uart0=uart16550,backend=file:{out}")
    a = platform.server("a", "rtc0=cmos-rtc")
    vm = platform.vm("hello.bin", "port:0x3f8-0x3ff=a/uart0,irq=4", "port:0x70-0x71=a/rtc0")
    assert vm.wait(60) == 0, vm.output()
    assert out.read_bytes() == b"Hello from remote-hw guest\r\n"
    assert a.wait_for(r"linked to server b at [\d.]+:7700")
    assert platform.etcd.keys("/remote-hw/devices/") == ["/remote-hw/devices/rtc0",
                                                          "/remote-hw/devices/uart0"]


def test_interrupts_from_b_reach_only_their_vm(platform, tmp_path):
    b_addr = platform.rig.addr("b")
    platform.server("b", f"uart1=uart16550,backend=tcp:{b_addr}:7701")
    platform.server("a")
    echo = guest_image("echo.bin")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(textwrap.dedent(f"""
        [servers]
        a = "{platform.rig.addr('a')}:7700"
        [tls]
        dir = "{platform.keys}"
        name = "c1"
        [[vm]]
        id = 1
        image = "{echo}"
        map = ["port:0x3f8-0x3ff=a/uart1,irq=4"]
        [[vm]]
        id = 2
        image = "{echo}"
        map = ["port:0x3f8-0x3ff=a/uart1,irq=4"]
    """))
    agent = Proc(platform.rig.cmd("client", remote_hw_cmd("agent", "--config", str(cfg))))
    platform.procs.append(agent)
    agent.wait_for(r"connected as client")
    # VM 1 attached first: its UART instance is b's first (port 7701). Type to it only,
    # and only after its banner (the backend's scrollback replays it if it went out
    # before we connected): until the guest has set up its UART, a real 16550 keeps one
    # byte, and the guest's FIFO reset then discards it.
    chat = platform.rig.run("b", [*CHAT, b_addr, "7701", "expect:echo ready",
                                  "send:remote", "expect:remote"])
    assert chat.returncode == 0, chat.stdout + chat.stderr
    assert agent.stop(signal.SIGTERM) == 130
    m1 = agent.wait_for(r"vm 1: (\d+) accesses forwarded, (\d+) interrupt changes")
    m2 = agent.wait_for(r"vm 2: (\d+) accesses forwarded, (\d+) interrupt changes")
    assert int(m1.group(2)) >= 2  # rose and fell at least once per received burst
    assert int(m2.group(2)) == 0 and int(m2.group(1)) > 0  # VM 2 ran, saw no interrupt


def test_server_b_killed_then_restarted(platform, tmp_path):
    first, second = tmp_path / "first.out", tmp_path / "second.out"
    b = platform.server("b", f"uart0=uart16550,backend=file:{first}")
    a = platform.server("a")
    vm = platform.vm("ticker.bin", "port:0x3f8-0x3ff=a/uart0,irq=4")
    wait_until(lambda: first.exists() and b"tick" in first.read_bytes(), "first ticks", 30)
    b.stop(signal.SIGKILL)
    # the directory drops the dead server when its lease runs out
    wait_until(lambda: "/remote-hw/servers/b" not in platform.etcd.keys("/remote-hw/servers/"),
               "the directory to drop server b", 3 * LEASE + 5, interval=0.1)
    assert "/remote-hw/devices/uart0" not in platform.etcd.keys("/remote-hw/devices/")
    vm.wait_for(r"device unavailable: UNREACHABLE")
    assert vm.p.poll() is None  # the guest keeps running: the device reads as all ones
    # b comes back: the entry server finds it again and the ticks flow to the new backend
    platform.server("b", f"uart0=uart16550,backend=file:{second}")
    wait_until(lambda: second.exists() and b"tick" in second.read_bytes(),
               "ticks after the restart", 30)
    assert a.wait_for(r"server b at \S+ is back: a new session")
    vm.wait_for(r"device answers again")
    assert vm.stop(signal.SIGTERM) == 130


def test_naming_the_server_through_the_entry(platform, tmp_path):
    out = tmp_path / "uart0.out"
    platform.server("b", f"uart0=uart16550,backend=file:{out}")
    platform.server("a")
    vm = platform.vm("hello.bin", "port:0x3f8-0x3ff=b/uart0,irq=4", extra=("--via", "b=a"))
    assert vm.wait(60) == 0, vm.output()
    assert out.read_bytes() == b"Hello from remote-hw guest\r\n"
    bad = platform.vm("hello.bin", "port:0x3f8-0x3ff=zz/uart0", extra=("--via", "zz=a"))
    assert bad.wait(60) == 1
    assert "refused device 'uart0': UNKNOWN_SERVER" in bad.output()


def test_unauthenticated_client_is_refused_on_the_rig(platform):
    a = platform.server("a")
    vm = Proc(platform.rig.cmd("client", remote_hw_cmd(
        "vm", "--image", str(guest_image("hello.bin")),
        "--server", f"a={platform.rig.addr('a')}:7700",
        "--map", "port:0x3f8-0x3ff=a/uart0")))
    platform.procs.append(vm)
    assert vm.wait(60) == 1
    assert "server a" in vm.output()
    a.wait_for(r"refused: TLS handshake failed")
