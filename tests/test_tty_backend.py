"""``tty:PATH`` - a real tty as the far side of a 16550 model, with a pty standing in
for the server's UART or a USB serial adapter (the test holds the pty's master side,
which is where the cable's other end would be)."""

from __future__ import annotations

import os
import termios
import threading

import pytest

from remote_hw.backends.base import BackendError
from remote_hw.backends.registry import open_backend
from remote_hw.backends.tty import TtyBackend, parse_tty_arg
from remote_hw.config import ConfigError, DeviceSpec
from remote_hw.export import export_settings, resolve_devnode
from remote_hw.protocol.messages import Direction
from remote_hw.server.controller import Controller

from helpers import Pty, wait_until

W, R = Direction.WRITE, Direction.READ
WAIT = 10


@pytest.fixture
def pty():
    p = Pty()
    yield p
    p.close()


class Collect:
    def __init__(self) -> None:
        self.data = b""
        self.cond = threading.Condition()

    def __call__(self, data: bytes) -> None:
        with self.cond:
            self.data += data
            self.cond.notify_all()

    def wait_for(self, want: bytes) -> bytes:
        with self.cond:
            assert self.cond.wait_for(lambda: want in self.data, WAIT), self.data
            return self.data


# ------------------------------------------------------------------ arguments

def test_argument_parsing():
    assert parse_tty_arg("/dev/ttyUSB0") == ("/dev/ttyUSB0", None)
    assert parse_tty_arg("/dev/ttyUSB0@115200") == ("/dev/ttyUSB0", 115200)
    assert parse_tty_arg("/dev/ttyUSB{index}", 2) == ("/dev/ttyUSB2", None)
    for bad, msg in (("", "no device path"), ("@9600", "no device path"),
                     ("/dev/ttyS0@fast", "bad baud"), ("/dev/ttyS0@12345", "unsupported")):
        with pytest.raises(BackendError, match=msg):
            parse_tty_arg(bad)
    with pytest.raises(BackendError, match="already used by instance 0"):
        parse_tty_arg("/dev/ttyS0", 1)


def test_open_errors_name_the_path(tmp_path):
    with pytest.raises(BackendError, match="cannot open .*nope"):
        TtyBackend(str(tmp_path / "nope"), "uart0")
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(BackendError, match="not a terminal"):
        TtyBackend(str(plain), "uart0")


def test_registered_as_tty(pty):
    b = open_backend(f"tty:{pty.path}", "uart0")
    try:
        assert isinstance(b, TtyBackend) and b.describe() == f"tty:{pty.path}"
    finally:
        b.close()


# ------------------------------------------------------------------ the line

def test_raw_mode_and_both_directions(pty):
    b = TtyBackend(f"{pty.path}@115200", "uart0")
    got = Collect()
    b.start(got)
    try:
        iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(b._fd)
        assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert not iflag & (termios.ICRNL | termios.IXON)
        assert not oflag & termios.OPOST
        assert cflag & termios.CSIZE == termios.CS8
        assert ispeed == ospeed == termios.B115200
        # Bytes a cooked tty would change or act on pass unchanged both ways.
        os.write(pty.master, b"a\r\x03\x11\x7fz")
        assert got.wait_for(b"a\r\x03\x11\x7fz") == b"a\r\x03\x11\x7fz"
        b.from_guest(b"line\n\x04")
        assert pty.read(6) == b"line\n\x04"
        assert b.status()["bytes_to_guest"] == 6 and b.status()["bytes_from_guest"] == 6
    finally:
        b.close()


def test_close_restores_the_settings(pty):
    fd = os.open(pty.path, os.O_RDWR | os.O_NOCTTY)
    try:
        before = termios.tcgetattr(fd)
        assert before[3] & termios.ICANON
        b = TtyBackend(pty.path, "uart0")
        b.start(lambda data: None)
        assert not termios.tcgetattr(fd)[3] & termios.ICANON
        b.close()
        b.close()       # twice is fine
        assert termios.tcgetattr(fd) == before
    finally:
        os.close(fd)


def test_unplug_and_replug_of_the_adapter(tmp_path):
    """The stable name (like /dev/serial/by-id/...) goes away with the adapter and
    comes back with a new one: the export resumes by itself."""
    link = tmp_path / "usb-FTDI_A50285BI-if00-port0"
    first = Pty()
    os.symlink(first.path, link)
    b = TtyBackend(str(link), "uart1")
    got = Collect()
    b.start(got)
    second = None
    try:
        os.write(first.master, b"one")
        got.wait_for(b"one")
        first.close()                           # unplugged
        link.unlink()
        wait_until(lambda: not b.connected, "the backend to notice the unplug")
        b.from_guest(b"lost")
        assert b.status()["dropped"] == 4
        second = Pty()                          # plugged back in
        os.symlink(second.path, link)
        wait_until(lambda: b.connected, "the backend to reopen the port")
        assert b.status()["reopened"] == 1
        os.write(second.master, b"two")
        assert got.wait_for(b"onetwo") == b"onetwo"
        b.from_guest(b"back")
        assert second.read(4) == b"back"
    finally:
        b.close()
        if second:
            second.close()


# ------------------------------------------------------------------ with the model

def test_a_16550_exported_on_a_tty(pty):
    ctl = Controller("a", [DeviceSpec("uart0", "uart16550", backend=f"tty:{pty.path}")])
    irqs = []

    class Sink:
        def interrupt(self, vm_id, device, line, level):
            irqs.append(level)

        def event(self, vm_id, device, name):
            pass
    try:
        assert ctl.attach(1, 1, "uart0", Sink()) == 0
        for ch in b"AT\r":
            ctl.access(1, 1, "uart0", 0, 1, W, ch)          # the guest transmits
        assert pty.read(3) == b"AT\r"
        ctl.access(1, 1, "uart0", 1, 1, W, 0x01)            # IER: receive interrupt
        ctl.access(1, 1, "uart0", 4, 1, W, 0x0B)            # MCR: OUT2
        os.write(pty.master, b"OK")                         # the modem answers
        wait_until(lambda: irqs and irqs[-1], "the receive interrupt")
        got = bytearray()
        while ctl.access(1, 1, "uart0", 5, 1, R, 0)[1] & 1:
            got.append(ctl.access(1, 1, "uart0", 0, 1, R, 0)[1])
        assert bytes(got) == b"OK"
        assert irqs[-1] is False
    finally:
        ctl.close()


# ------------------------------------------------------------------ export settings

def test_export_settings_from_the_kernel_name_and_udev_properties(pty):
    s = export_settings(pty.path)
    assert s.devnode == pty.path
    assert s.device.kind == "uart16550" and s.device.backend == f"tty:{pty.path}"
    n = int(pty.path.rsplit("/", 1)[1])
    assert s.device.id == f"pts-{n}" and s.listen == ("127.0.0.1", 7710 + n)
    props = {"REMOTE_HW_DEVICE": "uart1", "REMOTE_HW_LISTEN": "0.0.0.0:7811",
             "REMOTE_HW_BAUD": "9600", "REMOTE_HW_SERVER_ID": "bench"}
    s = export_settings(pty.path, properties=props)
    assert (s.device.id, s.listen, s.server_id, s.device.backend) == (
        "uart1", ("0.0.0.0", 7811), "bench", f"tty:{pty.path}@9600")
    s = export_settings(pty.path, properties=props, device_id="uart9", listen=("::1", 1))
    assert s.device.id == "uart9" and s.listen == ("::1", 1)
    with pytest.raises(ConfigError):
        export_settings(pty.path, properties={"REMOTE_HW_BAUD": "12345"})
    with pytest.raises(ConfigError):
        export_settings(pty.path, properties={"REMOTE_HW_DEVICE": "bad id!"})
    with pytest.raises(LookupError):
        resolve_devnode("ttyNOPE99")
    assert resolve_devnode(pty.path[len("/dev/"):]) == pty.path
