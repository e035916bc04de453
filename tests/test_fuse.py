"""The server's FUSE view: a real FUSE mount over a real Controller with real device
models; sessions attached through the controller with a sink that records interrupts.

Guest register accesses are made through ``Controller.access`` exactly as a
connection thread makes them; tests/test_fuse_e2e.py does the same with KVM guests.
No wall-clock assertions: deadlines only bound a broken run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from remote_hw.config import DeviceSpec
from remote_hw.devices import registry as device_registry
from remote_hw.devices.base import Device
from remote_hw.input.keys import KEY_CODES
from remote_hw.protocol.messages import Direction
from remote_hw.server.controller import Controller
from remote_hw.server.fuse import FuseError, FuseView, mount_at

from helpers import REPO, wait_until

pytestmark = pytest.mark.fuse

W, R = Direction.WRITE, Direction.READ
WAIT = 20


class RecordingSink:
    """A client's session sink: what the network layer would send."""

    def __init__(self) -> None:
        self.interrupts: list[tuple[int, str, int, bool]] = []
        self.events: list[tuple[int, str, str]] = []

    def interrupt(self, vm_id: int, device: str, line: int, level: bool) -> None:
        self.interrupts.append((vm_id, device, line, level))

    def event(self, vm_id: int, device: str, name: str) -> None:
        self.events.append((vm_id, device, name))


class FakeKeyboard(Device):
    """A keyboard model with only ``key_event`` (no type_text): the view must turn
    text into key events itself."""

    kind = "test-keyboard"
    window = 1

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keys: list[tuple[int, bool]] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    def key(self, code: int | str, pressed: bool) -> None:
        self.keys.append((code, pressed))

    def status(self):
        return {"keys": len(self.keys)}


@pytest.fixture
def fake_keyboard(monkeypatch):
    monkeypatch.setitem(device_registry.DEVICE_KINDS, FakeKeyboard.kind, FakeKeyboard)


@pytest.fixture
def ctl(fake_keyboard):
    c = Controller("a", [DeviceSpec("uart0", "uart16550"),
                         DeviceSpec("uart1", "uart16550", shared=True),
                         DeviceSpec("rtc0", "cmos-rtc"),
                         DeviceSpec("kbd0", "i8042"),
                         DeviceSpec("keys0", FakeKeyboard.kind)])
    yield c
    c.close()


@pytest.fixture
def view(ctl, tmp_path):
    v = FuseView(ctl, str(tmp_path / "mnt")).start()
    yield v
    v.stop()


def mnt(view) -> Path:
    return Path(view.mountpoint)


def guest_puts(ctl, vm: int, device: str, text: bytes, client: int = 1) -> None:
    for b in text:
        status, _ = ctl.access(client, vm, device, 0, 1, W, b)
        assert status == 0


def guest_read_rx(ctl, vm: int, device: str, client: int = 1) -> bytes:
    out = bytearray()
    while ctl.access(client, vm, device, 5, 1, R, 0)[1] & 0x01:    # LSR.DR
        out.append(ctl.access(client, vm, device, 0, 1, R, 0)[1])
    return bytes(out)


# ------------------------------------------------------------------ the tree

def test_layout_before_any_session(view):
    root = mnt(view)
    assert sorted(os.listdir(root)) == ["README", "devices", "server", "sessions"]
    assert sorted(os.listdir(root / "devices")) == ["kbd0", "keys0", "rtc0", "uart0", "uart1"]
    assert os.listdir(root / "devices" / "uart0") == ["config"]
    assert os.listdir(root / "sessions") == []
    assert "kind: uart16550" in (root / "devices" / "uart0" / "config").read_text()
    assert "shared: yes" in (root / "devices" / "uart1" / "config").read_text()
    assert "server: a" in (root / "server").read_text()
    assert "tail -f" in (root / "README").read_text()
    assert mount_at(view.mountpoint)["fstype"] == "fuse.remote-hw"


def test_sessions_appear_and_disappear_with_vms(ctl, view):
    root = mnt(view)
    s1, s2 = RecordingSink(), RecordingSink()
    ctl.attach(1, 1, "uart0", s1)
    ctl.attach(1, 1, "rtc0", s1)
    ctl.attach(1, 2, "uart0", s1)
    ctl.attach(2, 7, "uart1", s2)
    ctl.attach(1, 1, "uart1", s1)            # shared: the same instance as client 2's
    assert sorted(os.listdir(root / "sessions")) == ["client1-vm1", "client1-vm2",
                                                      "client2-vm7"]
    assert sorted(os.listdir(root / "sessions" / "client1-vm1")) == ["rtc0", "uart0", "uart1"]
    assert os.readlink(root / "sessions" / "client1-vm1" / "uart0") == "../../devices/uart0/0"
    assert os.readlink(root / "sessions" / "client1-vm2" / "uart0") == "../../devices/uart0/1"
    assert (os.readlink(root / "sessions" / "client2-vm7" / "uart1")
            == os.readlink(root / "sessions" / "client1-vm1" / "uart1"))
    assert sorted(os.listdir(root / "devices" / "uart0")) == ["0", "1", "config"]
    assert sorted(os.listdir(root / "sessions" / "client1-vm1" / "uart0")) == [
        "rx", "status", "status.json", "tx"]
    assert sorted(os.listdir(root / "sessions" / "client1-vm1" / "rtc0")) == [
        "status", "status.json", "time"]

    ctl.detach(1, 1)
    assert sorted(os.listdir(root / "sessions")) == ["client1-vm2", "client2-vm7"]
    assert sorted(os.listdir(root / "devices" / "uart0")) == ["1", "config"]
    assert not (root / "sessions" / "client1-vm1").exists()
    assert os.listdir(root / "devices" / "rtc0") == ["config"]
    ctl.detach(2)
    ctl.detach(1)
    assert os.listdir(root / "sessions") == []
    assert os.listdir(root / "devices" / "uart1") == ["config"]


def test_status_shows_registers_and_counters(ctl, view):
    ctl.attach(1, 1, "uart0", RecordingSink())
    ctl.access(1, 1, "uart0", 7, 1, W, 0x5A)          # scratch register
    ctl.access(1, 1, "uart0", 7, 1, R, 0)
    d = mnt(view) / "devices" / "uart0" / "0"
    text = (d / "status").read_text()
    assert "scr: 90 (0x5a)" in text
    assert "reads: 1" in text and "writes: 1" in text
    st = json.loads((d / "status.json").read_text())
    assert st["kind"] == "uart16550" and st["scr"] == 0x5A and st["sessions"] == [
        "client 1 vm 1"]


# ------------------------------------------------------------------ UART

def test_tx_holds_what_the_guest_sent_from_the_start(ctl, view):
    """Nobody looked at the view before the guest printed: nothing is lost."""
    ctl.attach(1, 1, "uart0", RecordingSink())
    guest_puts(ctl, 1, "uart0", b"boot message\r\n")
    tx = mnt(view) / "sessions" / "client1-vm1" / "uart0" / "tx"
    assert tx.read_bytes() == b"boot message\r\n"
    assert tx.stat().st_size == 14


def test_tail_follows_the_tx_stream(ctl, view):
    ctl.attach(1, 1, "uart0", RecordingSink())
    guest_puts(ctl, 1, "uart0", b"first line\n")
    tx = mnt(view) / "devices" / "uart0" / "0" / "tx"
    tail = subprocess.Popen(["tail", "-f", "-s", "0.1", str(tx)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out = os.read(tail.stdout.fileno(), 4096)
        assert out == b"first line\n"
        guest_puts(ctl, 1, "uart0", b"second line\n")
        out = b""
        deadline = time.monotonic() + WAIT
        while b"second line\n" not in out and time.monotonic() < deadline:
            out += os.read(tail.stdout.fileno(), 4096)
        assert out == b"second line\n"
    finally:
        tail.kill()
        tail.wait()


def test_tx_keeps_offsets_when_old_output_is_dropped(ctl, tmp_path):
    v = FuseView(ctl, str(tmp_path / "m2"), tx_keep=8).start()
    try:
        ctl.attach(1, 1, "uart0", RecordingSink())
        guest_puts(ctl, 1, "uart0", b"0123456789abcdef")
        tx = Path(v.mountpoint) / "devices" / "uart0" / "0" / "tx"
        assert tx.stat().st_size == 16
        data = tx.read_bytes()
        assert data == b"\0" * 8 + b"89abcdef"
        with open(tx, "rb") as f:
            f.seek(12)
            assert f.read() == b"cdef"
    finally:
        v.stop()


def test_tx_tap_passes_output_on_to_the_backend(tmp_path):
    out = tmp_path / "uart.log"
    c = Controller("a", [DeviceSpec("uart0", "uart16550", backend=f"file:{out}")])
    v = FuseView(c, str(tmp_path / "m")).start()
    try:
        c.attach(1, 1, "uart0", RecordingSink())
        guest_puts(c, 1, "uart0", b"both")
        assert out.read_bytes() == b"both"
        assert (Path(v.mountpoint) / "devices/uart0/0/tx").read_bytes() == b"both"
    finally:
        v.stop()
        c.close()


def test_writing_rx_reaches_the_guest_and_raises_its_interrupt(ctl, view):
    sink = RecordingSink()
    ctl.attach(1, 1, "uart0", sink)
    ctl.access(1, 1, "uart0", 1, 1, W, 0x01)          # IER: received data interrupt
    ctl.access(1, 1, "uart0", 4, 1, W, 0x0B)          # MCR: DTR RTS OUT2
    assert sink.interrupts == []
    rx = mnt(view) / "sessions" / "client1-vm1" / "uart0" / "rx"
    with open(rx, "wb", buffering=0) as f:
        f.write(b"hi")
    assert sink.interrupts == [(1, "uart0", 0, True)]
    assert guest_read_rx(ctl, 1, "uart0") == b"hi"
    assert sink.interrupts[-1] == (1, "uart0", 0, False)
    subprocess.run(f"echo more > {rx}", shell=True, check=True)   # truncate + write
    assert guest_read_rx(ctl, 1, "uart0") == b"more\n"


def test_rx_goes_only_to_its_own_session(ctl, view):
    a, b = RecordingSink(), RecordingSink()
    ctl.attach(1, 1, "uart0", a)
    ctl.attach(1, 2, "uart0", b)
    (mnt(view) / "sessions" / "client1-vm2" / "uart0" / "rx").write_bytes(b"x")
    assert guest_read_rx(ctl, 2, "uart0") == b"x"
    assert guest_read_rx(ctl, 1, "uart0") == b""


def test_file_modes_are_enforced(ctl, view):
    ctl.attach(1, 1, "uart0", RecordingSink())
    d = mnt(view) / "devices" / "uart0" / "0"
    with pytest.raises(PermissionError):
        open(d / "rx", "rb")
    with pytest.raises(PermissionError):
        open(d / "tx", "wb")
    with pytest.raises(PermissionError):
        open(d / "status", "r+b")
    with pytest.raises(OSError):
        open(d / "newfile", "wb")
    with pytest.raises(FileNotFoundError):
        open(d / "time", "rb")              # a UART has no clock
    assert oct((d / "rx").stat().st_mode & 0o777) == "0o200"
    assert oct((d / "tx").stat().st_mode & 0o777) == "0o444"


# ------------------------------------------------------------------ RTC

def _guest_rtc(ctl, index: int, vm: int = 1) -> int:
    ctl.access(1, vm, "rtc0", 0, 1, W, index)
    return ctl.access(1, vm, "rtc0", 1, 1, R, 0)[1]


def test_setting_the_time_is_what_the_guest_reads(ctl, view):
    ctl.attach(1, 1, "rtc0", RecordingSink())
    t = mnt(view) / "sessions" / "client1-vm1" / "rtc0" / "time"
    t.write_text("2031-05-06 07:08:09\n")
    assert t.read_text().startswith("2031-05-06T07:")
    # The guest reads BCD registers: year 0x31, month 0x05, day 0x06, century 0x20.
    assert (_guest_rtc(ctl, 0x32), _guest_rtc(ctl, 0x09), _guest_rtc(ctl, 0x08),
            _guest_rtc(ctl, 0x07), _guest_rtc(ctl, 0x04)) == (0x20, 0x31, 0x05, 0x06, 0x07)
    subprocess.run(f"printf '@0' > {t}", shell=True, check=True)   # no newline: on close
    assert t.read_text().startswith("1970-01-01T00:00:0")
    t.write_text("2040-02-29T12:00:00+02:00\n")
    assert t.read_text().startswith("2040-02-29T10:00:0")


def test_a_bad_time_is_refused(ctl, view):
    ctl.attach(1, 1, "rtc0", RecordingSink())
    t = mnt(view) / "devices" / "rtc0" / "0" / "time"
    before = t.read_text()[:4]
    fd = os.open(t, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.write(fd, b"next tuesday\n")
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert t.read_text()[:4] == before


# ------------------------------------------------------------------ keyboards

def test_input_types_text_into_an_i8042(ctl, view):
    ctl.attach(1, 1, "kbd0", RecordingSink())
    d = mnt(view) / "sessions" / "client1-vm1" / "kbd0"
    assert {"input", "keys", "rx", "tx", "status"} <= set(os.listdir(d))
    (d / "input").write_text("a")
    got = []
    while ctl.access(1, 1, "kbd0", 4, 1, R, 0)[1] & 0x01:       # status: OBF
        got.append(ctl.access(1, 1, "kbd0", 0, 1, R, 0)[1])
    assert bytes(got) == b"\x1c\xf0\x1c"                         # set 2: A down, A up


def test_input_and_keys_for_a_model_with_key_only(ctl, view):
    ctl.attach(1, 1, "keys0", RecordingSink())
    inst = next(i for i in ctl.instances() if i.spec.id == "keys0")
    d = mnt(view) / "devices" / "keys0" / "0"
    assert sorted(os.listdir(d)) == ["input", "keys", "status", "status.json"]
    (d / "input").write_text("Ok\n")
    K = KEY_CODES
    S = K["KEY_LEFTSHIFT"]
    assert inst.model.keys == [(S, True), (K["KEY_O"], True), (K["KEY_O"], False), (S, False),
                               (K["KEY_K"], True), (K["KEY_K"], False),
                               (K["KEY_ENTER"], True), (K["KEY_ENTER"], False)]
    inst.model.keys.clear()
    (d / "keys").write_text("ctrl+c\n+alt -alt\n")
    C = K["KEY_LEFTCTRL"]
    assert inst.model.keys == [(C, True), (K["KEY_C"], True), (K["KEY_C"], False), (C, False),
                               (K["KEY_LEFTALT"], True), (K["KEY_LEFTALT"], False)]
    fd = os.open(d / "keys", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.write(fd, b"ctrl+nosuchkey\n")
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)


# ------------------------------------------------------------------ life cycle

def test_stop_unmounts_and_restores_the_controller(ctl, tmp_path):
    mp = tmp_path / "m"
    v = FuseView(ctl, str(mp)).start()
    ctl.attach(1, 1, "uart0", RecordingSink())
    inst = ctl.instances()[0]
    assert inst.output_listeners == (v.tap(inst).append,)    # the view's tap listens
    assert len(ctl._instance_listeners) == 1
    v.stop()
    assert mount_at(str(mp)) is None
    assert not v.mounted
    assert inst.output_listeners == ()
    assert ctl._instance_listeners == []
    assert not mp.exists()                     # the view made the directory; it goes too
    assert _fusermount_children(mp) == []      # no auto_unmount helper left behind
    guest_puts(ctl, 1, "uart0", b"still works")
    v.stop()                                    # twice is fine


def test_stop_with_a_file_still_open(ctl, tmp_path):
    mp = tmp_path / "m"
    v = FuseView(ctl, str(mp)).start()
    ctl.attach(1, 1, "uart0", RecordingSink())
    fd = os.open(mp / "devices" / "uart0" / "0" / "status", os.O_RDONLY)
    try:
        v.stop()
        assert mount_at(str(mp)) is None
        assert not v.mounted
        with pytest.raises(OSError):
            os.read(fd, 100)
    finally:
        try:
            os.close(fd)        # the fd is released even when close reports ENOTCONN
        except OSError:
            pass


def test_a_live_mount_is_not_taken_over(ctl, view):
    other = FuseView(ctl, view.mountpoint)
    with pytest.raises(FuseError, match="in use by another remote-hw server"):
        other.start()
    assert os.listdir(view.mountpoint)          # the first one still serves


@pytest.mark.root                   # to mount a tmpfs
def test_a_foreign_mount_is_refused(ctl, tmp_path):
    mp = tmp_path / "tmpfs"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mp)], check=True)
    try:
        with pytest.raises(FuseError, match="already a mount point"):
            FuseView(ctl, str(mp)).start()
    finally:
        subprocess.run(["umount", str(mp)], check=True)


def _fusermount_children(mp: Path) -> list[int]:
    """fusermount processes this process started for ``mp`` that still run."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat_line[stat_line.rindex(")") + 2:].split()[1])
        if ppid == os.getpid() and os.fsencode(str(mp)) in argv and " Z" not in stat_line:
            found.append(int(entry))
    return found


# ------------------------------------------------------------------ crashes

SERVER_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from remote_hw.config import DeviceSpec
    from remote_hw.server.controller import Controller
    from remote_hw.server.fuse import FuseView
    c = Controller("a", [DeviceSpec("uart0", "uart16550")])
    v = FuseView(c, sys.argv[1], auto_unmount=sys.argv[2] == "1").start()
    print("mounted", flush=True)
    time.sleep(600)
""")


def _start_server_process(tmp_path: Path, mp: Path, auto_unmount: bool) -> subprocess.Popen:
    script = tmp_path / "fuse_server.py"
    script.write_text(SERVER_SCRIPT.format(repo=str(REPO)))
    p = subprocess.Popen([sys.executable, str(script), str(mp), "1" if auto_unmount else "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if line.strip() != "mounted":
        p.kill()
        raise AssertionError(f"server did not mount: {line!r} {p.stderr.read()}")
    return p


def _is_dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def test_a_crashed_server_leaves_no_stale_mount_on_restart(ctl, tmp_path):
    mp = tmp_path / "m"
    p = _start_server_process(tmp_path, mp, auto_unmount=False)
    p.kill()
    p.wait()
    assert mount_at(str(mp)) is not None and _is_dead_mount(mp)    # what a crash leaves
    v = FuseView(ctl, str(mp)).start()                              # the restart
    try:
        assert sorted(os.listdir(mp)) == ["README", "devices", "server", "sessions"]
        with open("/proc/self/mountinfo") as f:
            assert sum(f" {mp} " in line for line in f) == 1
    finally:
        v.stop()
    assert mount_at(str(mp)) is None


def test_auto_unmount_cleans_up_after_a_crash(ctl, tmp_path):
    mp = tmp_path / "m"
    p = _start_server_process(tmp_path, mp, auto_unmount=True)
    p.kill()
    p.wait()
    wait_until(lambda: mount_at(str(mp)) is None, "fusermount3 to unmount after the crash")
    v = FuseView(ctl, str(mp)).start()
    v.stop()


def test_sigterm_still_ends_a_process_serving_the_view(tmp_path):
    """libfuse installs its own SIGTERM handler; the view must not let it swallow the
    signal meant for the server (the process would keep running, unmounted)."""
    mp = tmp_path / "m"
    p = _start_server_process(tmp_path, mp, auto_unmount=True)
    p.send_signal(signal.SIGTERM)
    try:
        assert p.wait(WAIT) == -signal.SIGTERM
    finally:
        p.kill()
    wait_until(lambda: mount_at(str(mp)) is None, "the mount to go away")


def test_missing_mfusepy_is_one_clear_sentence(monkeypatch, ctl, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_mfusepy(name, *a, **kw):
        if name == "mfusepy":
            raise ImportError("no mfusepy")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_mfusepy)
    with pytest.raises(FuseError, match=r"pip install mfusepy"):
        FuseView(ctl, str(tmp_path / "m")).start()
    assert ctl._instance_listeners == []


def test_mount_point_problems_are_one_clear_sentence(ctl, tmp_path):
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(FuseError, match="is not a directory"):
        FuseView(ctl, str(plain)).start()
    with pytest.raises(FuseError, match="cannot create the mount point"):
        FuseView(ctl, "/proc/remote-hw-test/m").start()      # /proc takes no mkdir
    assert ctl._instance_listeners == []


def test_two_views_of_one_controller(ctl, tmp_path):
    """Both see every instance from its first byte; stopping one leaves the other."""
    a = FuseView(ctl, str(tmp_path / "a")).start()
    b = FuseView(ctl, str(tmp_path / "b")).start()
    try:
        ctl.attach(1, 1, "uart0", RecordingSink())
        guest_puts(ctl, 1, "uart0", b"x")
        assert (tmp_path / "a" / "devices/uart0/0/tx").read_bytes() == b"x"
        a.stop()
        guest_puts(ctl, 1, "uart0", b"z")
        ctl.attach(1, 2, "uart0", RecordingSink())
        guest_puts(ctl, 2, "uart0", b"y")
        assert (tmp_path / "b" / "devices/uart0/0/tx").read_bytes() == b"xz"
        assert (tmp_path / "b" / "devices/uart0/1/tx").read_bytes() == b"y"
        inst0 = next(i for i in ctl.instances() if i.index == 0)
        assert inst0.output_listeners == (b.tap(inst0).append,)  # only b's tap is left
    finally:
        b.stop()
    assert ctl._instance_listeners == []


def test_sigpipe_stays_ignored_after_a_view_stops(ctl, tmp_path):
    """libfuse resets SIGPIPE to its default when it stops; a server must survive
    writing to a peer that went away afterwards (Python ignores SIGPIPE)."""
    import signal as _signal
    import socket as _socket
    FuseView(ctl, str(tmp_path / "m")).start().stop()
    assert _signal.getsignal(_signal.SIGPIPE) == _signal.SIG_IGN
    a, b = _socket.socketpair()
    b.close()
    with pytest.raises(BrokenPipeError):  # an exception, not the death of the process
        for _ in range(3):
            a.send(b"x" * 65536)
    a.close()
