"""The FUSE view end to end: real KVM guests (guests/build) talk to a real server over
loopback TCP; people's side is a real FUSE mount of that server.

* hello: ``tail -f`` on the UART's tx file shows what the guest prints;
* echo: writing the rx file types into the guest, which echoes it back into tx;
* rtc: the time set through the view is the time the guest reads and prints;
* the session folder exists while the VM is attached and goes when it leaves.

Server, view and agent run in this process (as tests/test_e2e.py does for the
interrupt routing test). No wall-clock assertions: deadlines only bound a broken run.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from remote_hw.client.agent import Agent
from remote_hw.config import DeviceSpec, VmConfig, parse_map
from remote_hw.guest_images import guest_image
from remote_hw.server.controller import Controller
from remote_hw.server.fuse import FuseView
from remote_hw.server.listener import Server

from helpers import wait_until

UART_MAP = "port:0x3f8-0x3ff=a/uart0,irq=4"
RTC_MAP = "port:0x70-0x71=a/rtc0"
WAIT = 60


pytestmark = [pytest.mark.kvm, pytest.mark.fuse]


class Rig:
    """A server with a UART and an RTC, its FUSE view, and an agent for one VM."""

    def __init__(self, tmp_path: Path, image: str, maps: list[str]) -> None:
        self.ctl = Controller("a", [DeviceSpec("uart0", "uart16550"),
                                    DeviceSpec("rtc0", "cmos-rtc")])
        self.server = Server(self.ctl, "127.0.0.1", 0).start()
        self.view = FuseView(self.ctl, str(tmp_path / "mnt")).start()
        self.mnt = Path(self.view.mountpoint)
        self.agent = Agent({"a": self.server.address}, client_name="fuse-e2e")
        self.agent.add_vm(VmConfig(1, str(guest_image(image)), 2 << 20,
                                   [parse_map(m) for m in maps]))

    def session(self) -> Path:
        """The VM's session folder (exactly one session exists)."""
        names = wait_until(lambda: os.listdir(self.mnt / "sessions"), "the VM's session", WAIT)
        assert len(names) == 1, names
        return self.mnt / "sessions" / names[0]

    def close(self) -> None:
        self.agent.stop()
        self.view.stop()
        self.server.stop()


@pytest.fixture
def make_rig(tmp_path):
    rigs: list[Rig] = []

    def make(image: str, *maps: str) -> Rig:
        rig = Rig(tmp_path, image, list(maps))
        rigs.append(rig)
        return rig
    yield make
    for rig in rigs:
        rig.close()


class Tail:
    """``tail -f`` on a file of the view, collecting its output."""

    def __init__(self, path: Path) -> None:
        self.p = subprocess.Popen(["tail", "-c", "+1", "-f", "-s", "0.1", str(path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.set_blocking(self.p.stdout.fileno(), False)
        self.out = b""

    def wait_for(self, needle: bytes, timeout: float = WAIT) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.out:
            try:
                chunk = os.read(self.p.stdout.fileno(), 4096)
            except BlockingIOError:
                chunk = b""
            if chunk:
                self.out += chunk
                continue
            if self.p.poll() is not None:
                raise AssertionError(f"tail ended: {self.p.stderr.read()!r}; got {self.out!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"waited for {needle!r} in tail -f, got {self.out!r}")
            time.sleep(0.05)
        return self.out

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


def test_tail_follows_the_uart_while_the_guest_prints(make_rig):
    rig = make_rig("hello.bin", UART_MAP)
    rig.agent.connect()
    tx = rig.session() / "uart0" / "tx"
    tail = Tail(tx)                     # following before the guest prints a byte
    try:
        rig.agent.start()
        assert tail.wait_for(b"Hello from remote-hw guest\r\n") == \
            b"Hello from remote-hw guest\r\n"
        assert rig.agent.wait(WAIT) == {1: 0}
    finally:
        tail.close()
    assert tx.read_bytes() == b"Hello from remote-hw guest\r\n"


def test_writing_rx_is_echoed_by_the_guest(make_rig):
    rig = make_rig("echo.bin", UART_MAP)
    rig.agent.connect()
    uart = rig.session() / "uart0"
    tail = Tail(uart / "tx")
    try:
        rig.agent.start()
        tail.wait_for(b"echo ready\r\n")
        with open(uart / "rx", "wb", buffering=0) as f:
            f.write(b"through fuse")
        tail.wait_for(b"echo ready\r\nthrough fuse")
        subprocess.run(f"printf '\\004' > {uart / 'rx'}", shell=True, check=True)  # Ctrl-D
        tail.wait_for(b"bye\r\n")
        assert rig.agent.wait(WAIT) == {1: 0}
    finally:
        tail.close()
    status = (uart / "status").read_text()
    assert "rx_bytes: 13 (0xd)" in status


def test_time_set_through_the_view_is_what_the_guest_reads(make_rig):
    rig = make_rig("rtc.bin", UART_MAP, RTC_MAP)
    rig.agent.connect()
    sess = rig.session()
    (sess / "rtc0" / "time").write_text("2031-05-06 07:08:00\n")
    rig.agent.start()
    assert rig.agent.wait(WAIT) == {1: 0}
    line = (sess / "uart0" / "tx").read_bytes().decode()
    assert line.startswith("RTC 2031-05-06 07:08:"), line


def test_the_session_folder_goes_when_the_vm_leaves(make_rig):
    rig = make_rig("hello.bin", UART_MAP, RTC_MAP)
    rig.agent.connect()
    sess = rig.session()
    assert sorted(os.listdir(sess)) == ["rtc0", "uart0"]
    rig.agent.start()
    assert rig.agent.wait(WAIT) == {1: 0}
    rig.agent.stop()                    # detaches the VM, closes the connection
    wait_until(lambda: not sess.exists(), "the session folder to go", WAIT)
    assert os.listdir(rig.mnt / "sessions") == []
    assert os.listdir(rig.mnt / "devices" / "uart0") == ["config"]
