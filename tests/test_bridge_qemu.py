"""The vfio-user bridge for real: stock QEMU, stock Linux, a real remote-hw server.

Debian's own kernel (linux-image-amd64) boots with a busybox initramfs
(scripts/initramfs/bridge-init: a remote shell on the console) under the chroot's
QEMU 11.1 (scripts/install_qemu.sh; TCG, as this machine's KVM cannot boot Linux). Its
``vfio-user-pci`` device is served by a ``remote-hw bridge`` process whose BAR0 goes
over TCP to a ``remote-hw server`` process holding a ``uart16550`` with a tcp backend.
Linux's unmodified 8250_pci driver has to bind it, send and receive through it and
take its interrupts, with nothing in the guest knowing it is remote.

Boots are the expensive part (seconds each under TCG), so each test boots once and
checks several things in that one guest, in order.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from remote_hw.bridge import qemu as bridge_qemu

from helpers import (
    REPO,
    Proc,
    backend_port,
    make_keys,
    read_until,
    remote_hw_cmd,
    start_server,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.timeout(600)]

APPLETS = ["sh", "mount", "stty", "echo", "cat", "sleep", "uname", "ls", "grep", "dmesg",
           "printf", "dd", "poweroff", "kill", "head", "tr", "true"]
BOOT_TIMEOUT = 180.0  # TCG on a busy 2-core machine: usually ~10 s, bounded generously
STEP_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def qemu_ready() -> str:
    ok, why = bridge_qemu.available()
    if not ok:
        pytest.skip(why)
    return why  # the QEMU version line


@pytest.fixture(scope="module")
def guest(tmp_path_factory, qemu_ready) -> tuple[Path, Path]:
    """(kernel, initramfs): Debian's stock kernel and a busybox initramfs."""
    kernels = sorted(glob.glob("/boot/vmlinuz-*-amd64"))
    if not kernels:
        pytest.skip("needs Debian's stock kernel: apt-get install linux-image-amd64 "
                    "(scripts/install_qemu.sh does)")
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("needs busybox-static (scripts/install_qemu.sh installs it)")
    spec = importlib.util.spec_from_file_location("record_traces",
                                                  REPO / "scripts" / "record_traces.py")
    assert spec and spec.loader
    rt = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = rt  # its dataclasses look their module up
    spec.loader.exec_module(rt)
    bb = busybox.read_bytes()
    if rt._elf_has_interp(bb):
        pytest.skip("/bin/busybox is dynamically linked: install busybox-static")
    entries = [(d, stat.S_IFDIR | 0o755, b"", 0, 0) for d in ("bin", "dev", "proc", "sys",
                                                               "tmp")]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", 5, 1))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, bb, 0, 0))
    entries += [(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox", 0, 0) for a in APPLETS]
    init = (REPO / "scripts" / "initramfs" / "bridge-init").read_bytes()
    entries.append(("init", stat.S_IFREG | 0o755, init, 0, 0))
    d = tmp_path_factory.mktemp("guest")
    initrd = d / "initrd.gz"
    initrd.write_bytes(gzip.compress(rt._cpio_newc(entries), mtime=0))
    return Path(kernels[-1]), initrd


class Guest:
    """A QEMU running the bridge-init shell; ``run`` sends a command, returns its output."""

    def __init__(self, kernel: Path, initrd: Path, sock: Path | None,
                 qmp: Path | None = None, name: str = "guest") -> None:
        args = ["-accel", "tcg", "-m", "256M", "-nodefaults", "-display", "none",
                "-no-reboot", "-serial", "stdio", "-kernel", str(kernel), "-initrd",
                str(initrd), "-append", "console=ttyS0,115200 panic=-1 quiet"]
        if sock is not None:
            args += ["-device", json.dumps(vfio_user_device(sock))]
        if qmp is not None:
            args += ["-qmp", f"unix:{qmp},server=on,wait=off"]
        self.name = name
        # QEMU's own messages (stderr) apart from the guest's console (stdout).
        self.p = subprocess.Popen(bridge_qemu.command(args), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.buf = b""
        self.err = b""
        self.cond = threading.Condition()
        self._pos = 0
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        while True:
            chunk = os.read(self.p.stdout.fileno(), 65536)
            if not chunk:
                break
            with self.cond:
                self.buf += chunk
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def _pump_err(self) -> None:
        assert self.p.stderr is not None
        while chunk := os.read(self.p.stderr.fileno(), 65536):
            with self.cond:
                self.err += chunk

    def expect(self, pattern: bytes, timeout: float = STEP_TIMEOUT) -> re.Match[bytes]:
        """Wait for ``pattern`` after the last match; fail with the console output."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = rx.search(self.buf, self._pos)
                if m:
                    self._pos = m.end()
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None):
                    state = "runs" if self.p.poll() is None else f"exited {self.p.returncode}"
                    raise AssertionError(
                        f"{self.name}: no {pattern!r} on the console (QEMU {state}); "
                        f"console:\n{self.buf.decode(errors='replace')}\nQEMU's stderr:\n"
                        f"{self.err.decode(errors='replace')}")
                self.cond.wait(min(left, 0.5))

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def run(self, cmd: str, timeout: float = STEP_TIMEOUT) -> str:
        """Run ``cmd`` in the guest's shell; its output (the status must be 0)."""
        start = self._pos
        self.send(cmd)
        m = self.expect(rb"@@DONE (\d+)\r?\n", timeout)
        out = self.buf[start:m.start()].decode(errors="replace")
        assert m.group(1) == b"0", f"{self.name}: {cmd!r} failed ({m.group(1)!r}): {out}"
        return out

    def console(self) -> str:
        return self.buf.decode(errors="replace")

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
        return self.p.wait(15)


def vfio_user_device(sock: Path, dev_id: str = "uart") -> dict:
    """The device as docs/bridge.md writes it (command line and QMP alike)."""
    return {"driver": "vfio-user-pci", "id": dev_id,
            "socket": {"type": "unix", "path": str(sock)}}


class Qmp:
    """A QMP client on QEMU's monitor socket (commands, and the events in between)."""

    def __init__(self, path: Path) -> None:
        s = wait_until(lambda: _try_unix(path), f"QEMU's QMP socket {path}")
        s.settimeout(STEP_TIMEOUT)
        self.f = s.makefile("rwb")
        self.events: list[dict] = []
        assert "QMP" in self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.f.readline()
        if not line:
            raise AssertionError("QEMU closed its QMP socket")
        return json.loads(line)

    def execute(self, command: str, **arguments: object) -> object:
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            assert "error" not in reply, (command, reply)
            return reply["return"]

    def wait_event(self, name: str) -> dict:
        while True:
            for ev in self.events:
                if ev["event"] == name:
                    self.events.remove(ev)
                    return ev
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)


def _try_unix(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return s
    except OSError:
        s.close()
        return None


PORT_16550A = 4  # the kernel's PORT_16550A, in /sys/class/tty/ttyS1/type


def port_state(vm: Guest) -> tuple[bool, int]:
    """(whether the guest sees a 1b36:0002 PCI function, ttyS1's port type: 0 = none)."""
    # While 8250 swaps its ttyS1 placeholder for the real port the file may be missing
    # for a moment: that reads as -1 (neither state), and the caller polls again.
    out = vm.run("cat /sys/bus/pci/devices/*/vendor /sys/bus/pci/devices/*/device "
                 "| tr '\\n' ' '; echo; cat /sys/class/tty/ttyS1/type 2>/dev/null || echo -1")
    ids, _, kind = out.strip().rpartition("\n")
    return ("0x1b36" in ids.split() and "0x0002" in ids.split()), int(kind.strip())


def irq_count(interrupts: str, name: str = "ttyS1") -> int:
    """Total of a /proc/interrupts line's per-CPU counts."""
    for line in interrupts.splitlines():
        if line.rstrip().endswith(name):
            fields = line.split()[1:]
            return sum(int(f) for f in fields if f.isdigit())
    raise AssertionError(f"no {name} line in /proc/interrupts:\n{interrupts}")


def start_bridge(sock: Path, port: int, *extra: str) -> Proc:
    proc = Proc(remote_hw_cmd("bridge", "--socket", str(sock), "--device", "a/uart0",
                              "--server", f"a=127.0.0.1:{port}", *extra))
    proc.wait_for(r"serving a/uart0 on")
    return proc


def connect_backend(port: int) -> socket.socket:
    return wait_until(lambda: _try_connect(port), f"the tcp backend on {port}")


def _try_connect(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return None


TX_TEXT = "".join(f"line {i:02d}: the quick brown fox jumps over the lazy dog\n"
                  for i in range(40)).encode()
TX_CMD = ('i=0; while [ $i -lt 40 ]; do printf "line %02d: the quick brown fox jumps over '
          'the lazy dog\\n" $i; i=$((i+1)); done >&3')


def start_mounted_server(mnt: Path, *devices: str) -> tuple[Proc, int]:
    """A server with its FUSE view at ``mnt`` (docs/fuse.md) and --trace on."""
    argv = ["server", "--listen", "127.0.0.1:0", "--server-id", "a", "--mount", str(mnt),
            "--trace"]
    for d in devices:
        argv += ["--device", d]
    proc = Proc(remote_hw_cmd(*argv))
    port = int(proc.wait_for(r"listening on [\d.]+:(\d+)").group(1))
    wait_until(lambda: (mnt / "server").exists(), f"the FUSE view at {mnt}")
    return proc, port


def fuse_status(mnt: Path, device: str = "uart0", vm_id: int = 1) -> dict[str, int]:
    """The numbers of the FUSE ``status`` file of ``vm_id``'s instance of ``device``
    (lines ``name: value``, values above 9 followed by their hex: ``lcr: 26 (0x1a)``)."""
    paths = glob.glob(str(mnt / "sessions" / f"client*-vm{vm_id}" / device / "status"))
    assert len(paths) == 1, (paths, sorted(os.listdir(mnt / "sessions")))
    out = {}
    for line in Path(paths[0]).read_text().splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.split()[0].isdigit():
            out[name] = int(value.split()[0])
    return out


def registers_become(mnt: Path, what: str, ok: Callable[[dict[str, int]], bool]
                     ) -> dict[str, int]:
    """Wait until the FUSE status satisfies ``ok``; fail showing the last status."""
    last: dict[str, int] = {}

    def check() -> bool:
        last.clear()
        last.update(fuse_status(mnt))
        return ok(last)

    try:
        wait_until(check, f"{what} in the FUSE status", timeout=STEP_TIMEOUT)
    except AssertionError as e:
        raise AssertionError(f"{e}; it shows {last}") from None
    return last


def _unmount(mnt: Path) -> None:
    """Detach the view the killed server left, so the temporary folder can go.

    Read from /proc/self/mountinfo: a dead FUSE mount fails every stat with ENOTCONN,
    so os.path.ismount says False for it.
    """
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == str(mnt) for line in f)
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.fuse
def test_linux_drives_a_remote_uart_through_the_bridge(tmp_path, guest):
    """One boot: 8250_pci binds the bridged device as a 16550A; text out arrives byte
    for byte at the server's backend; text in is read by the guest through interrupts;
    stty's speed and parity show in the server's register state (its FUSE ``status``
    file); then the server is killed mid-write and QEMU, the guest and the bridge all
    carry on."""
    kernel, initrd = guest
    mnt = tmp_path / "view"
    server, port = start_mounted_server(mnt, "uart0=uart16550,backend=tcp:127.0.0.1:0")
    sock = tmp_path / "uart.sock"
    bridge = start_bridge(sock, port)
    vm = Guest(kernel, initrd, sock)
    try:
        vm.expect(rb"@@READY", BOOT_TIMEOUT)
        dmesg = vm.run("dmesg | grep -E '1b36:0002|ttyS1'")
        assert re.search(r"\[1b36:0002\] type 00 class 0x070002", dmesg), dmesg
        assert re.search(r"ttyS1 at I/O 0x[0-9a-f]+ \(irq = \d+, base_baud = 115200\) "
                         r"is a 16550A", dmesg), dmesg
        assert "ttyS2" not in dmesg  # an 8-byte BAR: one port, not two

        backend = connect_backend(backend_port(server, "uart0"))
        vm.run("stty -F /dev/ttyS1 115200 raw -echo clocal -crtscts && exec 3<>/dev/ttyS1")
        before = irq_count(vm.run("cat /proc/interrupts"))

        # Out: every byte the guest writes arrives, in order, at the server's backend.
        vm.run(TX_CMD)
        got = read_until(backend, TX_TEXT[-60:], timeout=STEP_TIMEOUT)
        assert got == TX_TEXT

        # In: bytes sent into the backend are read by the guest, by interrupts.
        rx = b"typed at the server end, 0123456789"
        vm.send(f"dd bs=1 count={len(rx)} <&3 2>/dev/null; echo")
        backend.sendall(rx)
        m = vm.expect(rb"([^\r\n]*)\r?\n@@DONE 0")
        assert m.group(1) == rx
        after = irq_count(vm.run("cat /proc/interrupts"))
        assert after > before, (before, after)

        # stty reaches the remote registers, as the server's FUSE view shows them:
        # 115200 8N1 is LCR word length 8 (bits 0-1 = 3) without parity (bit 3), with
        # divisor 1 (Linux sets the even-parity bit 4 all the same); 9600 baud 7E1 is
        # LCR 0x1a (7 bits, parity on, even) with divisor 12 (115200/9600), as a real
        # 16550 sees them. (Polled all the same: QEMU may post BAR writes,
        # x-no-posted-writes=off, and then stty could return before the last write
        # reached the server; for this I/O BAR it was seen to wait for each one.)
        registers_become(mnt, "115200 8N1", lambda r: r["lcr"] & 0x0B == 0x03
                         and (r["divisor"], r["baud"]) == (1, 115200))
        vm.run("stty -F /dev/ttyS1 9600 cs7 parenb -parodd")
        registers_become(mnt, "9600 7E1", lambda r: (r["lcr"], r["divisor"], r["baud"])
                         == (0x1A, 12, 9600))
        # And the register writes themselves, in the server's --trace.
        server.wait_for(r"uart0 W \+3 = 0x1a", STEP_TIMEOUT)
        server.wait_for(r"uart0 W \+0 = 0x0c", STEP_TIMEOUT)

        # The server dies while the guest writes: nothing hangs.
        vm.run("stty -F /dev/ttyS1 115200 cs8 -parenb")
        vm.run("(while true; do echo flooding the remote uart; done >&3) & echo $! >/tmp/w")
        read_until(backend, b"flooding the remote uart\n", timeout=STEP_TIMEOUT)
        server.stop(signal.SIGKILL)
        bridge.wait_for(r"device unavailable", STEP_TIMEOUT)
        out = vm.run("echo still here")
        assert "still here" in out
        # The device now reads as removed: all ones from its registers.
        vm.run("kill -9 $(cat /tmp/w)")
        assert vm.p.poll() is None, "QEMU ended when the server died"
        assert bridge.p.poll() is None, "the bridge ended when the server died"
        vm.send("poweroff -f")
        assert vm.p.wait(STEP_TIMEOUT) == 0
    finally:
        vm.stop()
        bridge.stop()
        server.stop()
        _unmount(mnt)
    assert "Traceback" not in bridge.output(), bridge.output()


def test_a_memory_bar_lets_qemu_post_the_guests_writes(tmp_path, guest):
    """``--template mmio-serial``: the UART behind a memory BAR, with the ids of
    Realtek's RealManage UART, which the unmodified 8250_pci binds as one port on BAR0
    (MMIO). Text out arrives byte for byte, text in is read by interrupts, and QEMU
    sent the guest's BAR writes without waiting for answers (to an I/O BAR it waits
    for every one, so each byte cost a round trip QEMU -> bridge -> QEMU)."""
    kernel, initrd = guest
    server, port = start_server("uart0=uart16550,backend=tcp:127.0.0.1:0")
    sock = tmp_path / "uart.sock"
    bridge = start_bridge(sock, port, "--template", "mmio-serial")
    vm = Guest(kernel, initrd, sock)
    try:
        vm.expect(rb"@@READY", BOOT_TIMEOUT)
        dmesg = vm.run("dmesg | grep -E '10ec:816a|ttyS1'")
        assert re.search(r"\[10ec:816a\] type 00 class 0x070002", dmesg), dmesg
        assert re.search(r"ttyS1 at MMIO 0x[0-9a-f]+ \(irq = \d+, base_baud = 115200\) "
                         r"is a 16550A", dmesg), dmesg
        assert "ttyS2" not in dmesg
        backend = connect_backend(backend_port(server, "uart0"))
        vm.run("stty -F /dev/ttyS1 115200 raw -echo clocal -crtscts && exec 3<>/dev/ttyS1")
        vm.run(TX_CMD)
        assert read_until(backend, TX_TEXT[-60:], timeout=STEP_TIMEOUT) == TX_TEXT
        rx = b"typed into a memory-mapped UART"
        vm.send(f"dd bs=1 count={len(rx)} <&3 2>/dev/null; echo")
        backend.sendall(rx)
        m = vm.expect(rb"([^\r\n]*)\r?\n@@DONE 0")
        assert m.group(1) == rx
        vm.send("poweroff -f")
        assert vm.p.wait(STEP_TIMEOUT) == 0
        ended = bridge.wait_for(r"ended \((\d+) BAR accesses forwarded.*QEMU waited for no "
                                r"answer to (\d+) BAR writes", STEP_TIMEOUT)
        # Every byte out is a THR write; with an I/O BAR this figure is 0.
        assert int(ended.group(2)) >= len(TX_TEXT), ended.group(0)
    finally:
        vm.stop()
        bridge.stop()
        server.stop()
    assert "Traceback" not in bridge.output(), bridge.output()


def test_two_vms_on_one_bridge_over_mutual_tls_get_their_own_uarts(tmp_path, guest):
    """Two QEMUs on one bridge, the link in mutual TLS: each guest binds its own
    16550, its text reaches only its own instance's backend, and text sent into a
    backend is read only by the guest that owns it."""
    kernel, initrd = guest
    keys = make_keys(tmp_path / "keys", ["a"], ["client"])
    server, port = start_server("uart0=uart16550,backend=tcp:127.0.0.1:0",
                                extra=("--tls-dir", str(keys)))
    sock = tmp_path / "uart.sock"
    bridge = start_bridge(sock, port, "--tls-dir", str(keys), "--vm-id", "5")
    vms = [Guest(kernel, initrd, sock, name="vm-A"), Guest(kernel, initrd, sock, name="vm-B")]
    try:
        for vm in vms:
            vm.expect(rb"@@READY", BOOT_TIMEOUT)
        for vm in vms:
            assert "is a 16550A" in vm.run("dmesg | grep ttyS1")
            vm.run("stty -F /dev/ttyS1 115200 raw -echo clocal -crtscts && exec 3<>/dev/ttyS1")
        bridge.wait_for(r"vm 5: attached a/uart0")
        bridge.wait_for(r"vm 6: attached a/uart0")
        backends = [connect_backend(backend_port(server, "uart0", i)) for i in (0, 1)]
        for vm in vms:
            vm.run(f"echo 'hello from {vm.name}' >&3")
        owner: dict[int, Guest] = {}
        for i, b in enumerate(backends):
            got = read_until(b, b"\n", timeout=STEP_TIMEOUT)
            m = re.fullmatch(rb"hello from (vm-[AB])\n", got)
            assert m, got
            owner[i] = next(vm for vm in vms if vm.name.encode() == m.group(1))
        assert {vm.name for vm in owner.values()} == {"vm-A", "vm-B"}
        for i, b in enumerate(backends):
            vm = owner[i]
            text = f"only for {vm.name}".encode()
            vm.send(f"dd bs=1 count={len(text)} <&3 2>/dev/null; echo")
            b.sendall(text)
            assert vm.expect(rb"([^\r\n]*)\r?\n@@DONE 0").group(1) == text
        for vm in vms:
            assert irq_count(vm.run("cat /proc/interrupts")) > 0
    finally:
        for vm in vms:
            vm.stop()
        bridge.stop()
        server.stop()
    assert "Traceback" not in bridge.output(), bridge.output()


def test_qmp_hot_plug_and_a_server_restart(tmp_path, guest):
    """The device is hot-plugged with QMP device_add; the server dies; device_del
    removes the dead device; with the server back, device_add again gives the guest a
    working port (a new session, the link reconnected)."""
    from helpers import free_port
    kernel, initrd = guest
    port = free_port()
    server, _ = start_server("uart0=uart16550,backend=tcp:127.0.0.1:0",
                             extra=("--listen", f"127.0.0.1:{port}"))
    sock = tmp_path / "uart.sock"
    bridge = start_bridge(sock, port)
    qmp_path = tmp_path / "qmp.sock"
    vm = Guest(kernel, initrd, None, qmp=qmp_path)
    second = None
    try:
        vm.expect(rb"@@READY", BOOT_TIMEOUT)
        assert port_state(vm) == (False, 0)  # no device yet: ttyS1 is a placeholder
        qmp = Qmp(qmp_path)
        qmp.execute("device_add", **vfio_user_device(sock))
        bridge.wait_for(r"vm 1: attached a/uart0", STEP_TIMEOUT)
        wait_until(lambda: port_state(vm) == (True, PORT_16550A),
                   "the hot-plugged port in the guest", timeout=STEP_TIMEOUT, interval=0.5)
        assert "is a 16550A" in vm.run("dmesg | grep ttyS1")
        backend = connect_backend(backend_port(server, "uart0"))
        vm.run("stty -F /dev/ttyS1 115200 raw -echo clocal -crtscts")
        vm.run("echo 'hot-plugged and working' > /dev/ttyS1")
        assert read_until(backend, b"\n", STEP_TIMEOUT) == b"hot-plugged and working\n"
        backend.close()

        server.stop(signal.SIGKILL)
        qmp.execute("device_del", id="uart")
        qmp.wait_event("DEVICE_DELETED")
        bridge.wait_for(r"vm 1: ended", STEP_TIMEOUT)
        wait_until(lambda: port_state(vm) == (False, 0),
                   "the port to leave the guest", timeout=STEP_TIMEOUT, interval=0.5)

        second, _ = start_server("uart0=uart16550,backend=tcp:127.0.0.1:0",
                                 extra=("--listen", f"127.0.0.1:{port}"))
        qmp.execute("device_add", **vfio_user_device(sock))
        wait_until(lambda: bridge.output().count("vm 1: attached a/uart0") == 2,
                   "the second attach", timeout=STEP_TIMEOUT)
        wait_until(lambda: port_state(vm) == (True, PORT_16550A),
                   "the port back in the guest", timeout=STEP_TIMEOUT, interval=0.5)
        backend = connect_backend(backend_port(second, "uart0"))
        vm.run("stty -F /dev/ttyS1 115200 raw -echo clocal -crtscts")
        vm.run("echo 'plugged in again' > /dev/ttyS1")
        assert read_until(backend, b"\n", STEP_TIMEOUT) == b"plugged in again\n"
        assert vm.p.poll() is None
    finally:
        vm.stop()
        bridge.stop()
        server.stop()
        if second is not None:
            second.stop()
    assert "Traceback" not in bridge.output(), bridge.output()


def test_the_same_through_an_entry_server_and_with_mutual_tls(tmp_path, guest):
    """One boot, the bridge's link in mutual TLS to an entry server ``a`` that holds no
    UART and forwards (``--peer``/``--route``) to server ``b``, which holds it and lets
    only the bridge's certificate use it (``--allow``): 8250_pci binds a 16550A; text
    out arrives byte for byte at b's backend; text in is read through interrupts; b
    decided on the name a authenticated (ORIGIN)."""
    kernel, initrd = guest
    keys = make_keys(tmp_path / "keys", ["a", "b"], ["qemu-host"])
    tls = ("--tls-dir", str(keys))
    b, b_port = start_server("uart0=uart16550,backend=tcp:127.0.0.1:0", server_id="b",
                             extra=(*tls, "--allow", "uart0=qemu-host"))
    a, a_port = start_server(server_id="a", extra=(*tls, "--peer", f"b=127.0.0.1:{b_port}",
                                                   "--route", "uart0=b"))
    sock = tmp_path / "uart.sock"
    bridge = Proc(remote_hw_cmd("bridge", "--socket", str(sock), "--device", "b/uart0",
                                "--server", f"a=127.0.0.1:{a_port}", "--via", "b=a", *tls,
                                "--tls-name", "qemu-host"))
    vm = None
    try:
        bridge.wait_for(r"serving b/uart0 on")
        vm = Guest(kernel, initrd, sock)
        vm.expect(rb"@@READY", BOOT_TIMEOUT)
        dmesg = vm.run("dmesg | grep -E '1b36:0002|ttyS1'")
        assert re.search(r"ttyS1 at I/O 0x[0-9a-f]+ \(irq = \d+, base_baud = 115200\) "
                         r"is a 16550A", dmesg), dmesg
        bridge.wait_for(r"vm 1: attached b/uart0")
        # The request went through a, and b applied its --allow to the bridge's name.
        b.wait_for(r"peer server a speaks for client \d+, authenticated as qemu-host")
        assert "uart0: backend" not in a.output()  # a holds no UART

        backend = connect_backend(backend_port(b, "uart0"))
        vm.run("stty -F /dev/ttyS1 115200 raw -echo clocal -crtscts && exec 3<>/dev/ttyS1")
        before = irq_count(vm.run("cat /proc/interrupts"))
        vm.run(TX_CMD)
        assert read_until(backend, TX_TEXT[-60:], timeout=STEP_TIMEOUT) == TX_TEXT

        rx = b"typed at b, through a and the bridge"
        vm.send(f"dd bs=1 count={len(rx)} <&3 2>/dev/null; echo")
        backend.sendall(rx)
        assert vm.expect(rb"([^\r\n]*)\r?\n@@DONE 0").group(1) == rx
        after = irq_count(vm.run("cat /proc/interrupts"))
        assert after > before, (before, after)
        vm.send("poweroff -f")
        assert vm.p.wait(STEP_TIMEOUT) == 0
    finally:
        if vm is not None:
            vm.stop()
        bridge.stop()
        a.stop()
        b.stop()
    assert "Traceback" not in bridge.output(), bridge.output()


def serial_line(vm: Guest) -> str:
    """ttyS1's line of /proc/tty/driver/serial (its modem lines come from a read of
    MSR: a removed device's all ones show as RI, which the UART never raises)."""
    return vm.run("grep '^1:' /proc/tty/driver/serial").strip().splitlines()[-1]


def test_a_stopped_server_comes_back_by_itself_under_a_live_guest(tmp_path, guest):
    """One boot: the server is stopped (SIGSTOP) while the guest writes, long past the
    link timeout, then continued. With no device_del/device_add, the guest sees the
    device as removed while the server is stopped (all ones: its modem status shows
    RI), then working again: the link resumed the session, the text written around
    the stop arrives byte for byte, and text in is read through interrupts again."""
    kernel, initrd = guest
    server, port = start_server("uart0=uart16550,backend=tcp:127.0.0.1:0")
    sock = tmp_path / "uart.sock"
    bridge = start_bridge(sock, port)
    vm = Guest(kernel, initrd, sock)
    try:
        vm.expect(rb"@@READY", BOOT_TIMEOUT)
        assert "is a 16550A" in vm.run("dmesg | grep ttyS1")
        backend = connect_backend(backend_port(server, "uart0"))
        vm.run("stty -F /dev/ttyS1 115200 raw -echo clocal -crtscts && exec 3<>/dev/ttyS1")
        vm.run("echo 'before the stop' >&3")
        assert read_until(backend, b"\n", STEP_TIMEOUT) == b"before the stop\n"
        assert "RI" not in serial_line(vm).split()[-1].split("|")

        os.kill(server.p.pid, signal.SIGSTOP)
        vm.run("echo 'written as the server stops' >&3")  # an IER write times out
        bridge.wait_for(r"server a .* is gone: no answer", STEP_TIMEOUT)
        time.sleep(2.0)  # stopped well past the 1 s timeout, the link retrying
        assert "RI" in serial_line(vm).split()[-1].split("|")  # all ones: removed
        assert vm.run("echo still here").strip().endswith("still here")

        os.kill(server.p.pid, signal.SIGCONT)
        bridge.wait_for(r"is back: session resumed", STEP_TIMEOUT)
        vm.run("echo 'after the server came back' >&3")
        want = b"written as the server stops\nafter the server came back\n"
        assert read_until(backend, want[-27:], STEP_TIMEOUT) == want
        assert "RI" not in serial_line(vm).split()[-1].split("|")

        before = irq_count(vm.run("cat /proc/interrupts"))
        rx = b"typed after the stop"
        vm.send(f"dd bs=1 count={len(rx)} <&3 2>/dev/null; echo")
        backend.sendall(rx)
        assert vm.expect(rb"([^\r\n]*)\r?\n@@DONE 0").group(1) == rx
        assert irq_count(vm.run("cat /proc/interrupts")) > before
        out = bridge.output()
        assert "vm 1: ended" not in out and out.count("vm 1: attached a/uart0") == 1
        assert re.search(r"vm 1: a/uart0: device answers again", out), out
        vm.send("poweroff -f")
        assert vm.p.wait(STEP_TIMEOUT) == 0
    finally:
        vm.stop()
        bridge.stop()
        if server.p.poll() is None:
            os.kill(server.p.pid, signal.SIGCONT)
        server.stop()
    assert "Traceback" not in bridge.output(), bridge.output()
