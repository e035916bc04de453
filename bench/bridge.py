"""The vfio-user bridge against the native client: per-access cost and guest throughput.

    python3 bench/bridge.py [--count N] [--rounds R] [--mode pinned|unpinned|both]
                            [--seconds S] [--no-latency] [--no-throughput]

**Per-access cost** (``--no-latency`` skips it). Each figure is the distribution of one
register read of the UART's scratch register (no side effects) answered by a real
``remote-hw server`` child on loopback, measured in R interleaved rounds (this
machine's speed drifts from minute to minute, so every figure and its baseline come
from the same run):

* native-link:  ``ServerLink.io`` in this process: what remote-hw's own monitor pays
                from the moment its vCPU thread has the access in hand until the answer;
* native-fwd:   bench/roundtrip.py's "forwarded": a KVM guest's ``in al, dx`` answered
                over that link, exit and re-entry included (the figure issue 10 names;
                needs a usable /dev/kvm);
* bridge:       a vfio-user REGION_READ of BAR0 sent over a UNIX socket, as QEMU's
                vfio-user-pci sends it, answered by a ``remote-hw bridge`` child through
                its own link to the same server: from the moment QEMU's vfio-user
                thread has the access in hand until the answer;
* bridge-py:    the same with the C calls off in the bridge child (REMOTE_HW_FASTIO=0:
                its vfio-user and link paths are pure Python, as on a machine where
                setup.py found no compiler);
* relay:        the bridge's place taken by a minimal Python relay child (read a
                message, ``ServerLink.io``, send the reply; no checks, no protocol
                state): the process structure's own cost;
* hop:          a UNIX-socket ping-pong with a minimal Python child, message sizes of a
                REGION_READ and its reply: the extra hop QEMU -> bridge by itself.

It prints median and p99 of each, and the ratios of the medians: bridge / native-fwd
(the issue's goal: at most 1.5), bridge / native-link (the same boundary on both
sides: neither includes its VMM's exit), relay / native-link and (native-link + hop)
/ native-link (what a bridge with next to no code, or none, would cost: the floors of
the second ratio).

**Throughput** (``--no-throughput`` skips it; needs root and scripts/install_qemu.sh's
QEMU): one QEMU 11.1 boots Debian's stock kernel (TCG) with two 16550s on PCI, the
remote-hw UART (``vfio-user-pci`` served by a bridge child, BAR0 to a server child on
loopback, its tcp backend read by this process) and QEMU's own ``pci-serial`` on a
socket chardev (read by this process). In that one guest, ``dd`` from /dev/zero to
each port in raw mode, alternately, R rounds of S seconds each; the bytes/s arriving
at each host socket (first byte to end of the window) and their ratio are printed.
Bounded: each window lasts S seconds whatever the speed, and every wait has a deadline.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import importlib.util
import json
import os
import re
import socket
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remote_hw.bridge import fastpath  # noqa: E402
from remote_hw.bridge import qemu as bridge_qemu  # noqa: E402
from remote_hw.bridge import vfio_user as vu  # noqa: E402
from remote_hw.net import fastio  # noqa: E402
from remote_hw.net.link import ServerLink  # noqa: E402
from remote_hw.protocol.messages import AccessKind, Direction, Status  # noqa: E402

SCRATCH = 7
STEP_TIMEOUT = 60.0
BOOT_TIMEOUT = 180.0

# ------------------------------------------------------------------------ children


class Child:
    """A child process whose output is read (and kept) by a thread, so it never blocks
    on a full pipe; ``wait_for`` finds a line in it."""

    def __init__(self, argv: list[str], preexec: Callable[[], None] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, cwd=ROOT, preexec_fn=preexec,
                                  env=dict(env or os.environ, PYTHONUNBUFFERED="1"))
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = STEP_TIMEOUT) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.p.poll() is not None:
                    raise SystemExit(f"no {pattern!r} from {self.p.args!r}:\n"
                                     + "".join(self.lines[-30:]))
                self.cond.wait(min(left, 0.5))

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


def remote_hw(*argv: str, preexec: Callable[[], None] | None = None,
              env: dict[str, str] | None = None) -> Child:
    return Child([sys.executable, "-m", "remote_hw.cli", *argv], preexec, env)


def start_server(*devices: str, preexec: Callable[[], None] | None = None
                 ) -> tuple[Child, int]:
    argv = ["server", "--listen", "127.0.0.1:0", "--server-id", "a", "--no-mount"]
    for d in devices:
        argv += ["--device", d]
    server = remote_hw(*argv, preexec=preexec)
    return server, int(server.wait_for(r"listening on [\d.]+:(\d+)").group(1))


def start_bridge(sock: str, port: int, preexec: Callable[[], None] | None = None,
                 c_path: bool = True, log_level: str = "warning") -> Child:
    env = dict(os.environ) if c_path else dict(os.environ, REMOTE_HW_FASTIO="0")
    br = remote_hw("bridge", "--socket", sock, "--device", "a/uart0", "--server",
                   f"a=127.0.0.1:{port}", "--log-level", log_level, preexec=preexec, env=env)
    br.wait_for(r"serving a/uart0")
    return br

# ----------------------------------------------------------------- per-access cost


def _trim(ns: list[int]) -> list[float]:
    """µs, without the first 5% (warm-up: page faults, first leadership hand-over)."""
    return [n / 1000 for n in ns[len(ns) // 20:]]


def native_link(port: int, count: int) -> list[float]:
    link = ServerLink("a", ("127.0.0.1", port), client_name="bench", timeout=5).connect()
    try:
        if link.attach(1, "uart0") != Status.OK:
            raise SystemExit("attach failed")
        kind, rd = int(AccessKind.PORT), int(Direction.READ)
        link.io(1, "uart0", kind, SCRATCH, 1, int(Direction.WRITE), 0x5A)
        out = []
        clock = time.perf_counter_ns
        for _ in range(count):
            t0 = clock()
            status, value = link.io(1, "uart0", kind, SCRATCH, 1, rd)
            out.append(clock() - t0)
        if (status, value) != (0, 0x5A):
            raise SystemExit(f"native read gave {(status, value)}")
        return _trim(out)
    finally:
        link.close()


def _exact(s: socket.socket, view: memoryview, n: int) -> None:
    got = 0
    while got < n:
        k = s.recv_into(view[got:n])
        if not k:
            raise SystemExit("the peer closed the socket")
        got += k


def bridge_reads(sock_path: str, count: int) -> list[float]:
    """REGION_READs of BAR0 as QEMU sends them, each waiting for its reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    buf = bytearray(4096)
    view = memoryview(buf)

    def call(msg_id: int, command: int, payload: bytes) -> int:
        s.sendall(vu.encode_command(msg_id, command, payload))
        _exact(s, view, vu.HEADER_SIZE)
        size = vu.HEADER.unpack_from(buf)[2]
        _exact(s, view[vu.HEADER_SIZE:], size - vu.HEADER_SIZE)
        return size

    try:
        call(1, vu.Command.VERSION, struct.pack("<HH", 0, 1) + b"{}\0")
        call(2, vu.Command.REGION_WRITE, vu.REGION_ACCESS.pack(SCRATCH, 0, 1) + b"\x5a")
        frame = vu.encode_command(3, vu.Command.REGION_READ, vu.REGION_ACCESS.pack(SCRATCH, 0, 1))
        want = fastpath.FIXED + 1
        out = []
        clock = time.perf_counter_ns
        for _ in range(count):
            t0 = clock()
            s.sendall(frame)
            _exact(s, view, want)  # the reply's size is known: one read, as QEMU's
            out.append(clock() - t0)
        if buf[fastpath.FIXED] != 0x5A:
            raise SystemExit(f"bridge read gave {bytes(buf[:want]).hex()}")
        return _trim(out)
    finally:
        s.close()


ECHO = r"""
import socket, sys
ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
ls.bind(sys.argv[1]); ls.listen(1)
print("ready", flush=True)
c, _ = ls.accept()
req, rep = int(sys.argv[2]), b"R" * int(sys.argv[3])
buf = bytearray(req); view = memoryview(buf)
while True:
    got = 0
    while got < req:
        n = c.recv_into(view[got:])
        if not n:
            sys.exit(0)
        got += n
    c.sendall(rep)
"""


RELAY = r"""
import socket, struct, sys
sys.path.insert(0, sys.argv[3])
from remote_hw.net.link import ServerLink
link = ServerLink("a", ("127.0.0.1", int(sys.argv[2])), client_name="relay").connect()
assert link.attach(9, "uart0") == 0
ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
ls.bind(sys.argv[1]); ls.listen(1)
print("ready", flush=True)
c, _ = ls.accept()
frame = struct.Struct("<HHIIIQII")
buf = bytearray(4096); io = link.io
while c.recv_into(buf):  # one message per read, as the client sends them
    msg_id, cmd, size, _, _, off, region, count = frame.unpack_from(buf)
    if cmd == 9:
        st, v = io(9, "uart0", 0, off, count, 0)
        c.send(frame.pack(msg_id, cmd, 33, 1, 0, off, region, count) + bytes([v & 0xFF]))
    elif cmd == 10:
        io(9, "uart0", 0, off, count, 1, buf[32])
        c.send(frame.pack(msg_id, cmd, 32, 1, 0, off, region, count))
    else:
        c.send(struct.pack("<HHIII", msg_id, cmd, 16, 1, 0))
"""


def relay(port: int, count: int, preexec: Callable[[], None] | None, folder: str
          ) -> list[float]:
    """bridge_reads() against the minimal relay child instead of the bridge."""
    path = os.path.join(folder, "relay.sock")
    child = subprocess.Popen([sys.executable, "-c", RELAY, path, str(port), str(ROOT)],
                             stdout=subprocess.PIPE, text=True, preexec_fn=preexec)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        return bridge_reads(path, count)
    finally:
        child.wait(10)
        os.unlink(path)


def hop(count: int, preexec: Callable[[], None] | None, folder: str) -> list[float]:
    """A UNIX-socket ping-pong with REGION_READ's sizes: the QEMU -> bridge hop alone."""
    path = os.path.join(folder, "echo.sock")
    req, rep = fastpath.FIXED, fastpath.FIXED + 1
    child = subprocess.Popen([sys.executable, "-c", ECHO, path, str(req), str(rep)],
                             stdout=subprocess.PIPE, text=True, preexec_fn=preexec)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        msg, buf = b"Q" * req, bytearray(rep)
        view = memoryview(buf)
        out = []
        clock = time.perf_counter_ns
        for _ in range(count):
            t0 = clock()
            s.sendall(msg)
            _exact(s, view, rep)
            out.append(clock() - t0)
        s.close()
        return _trim(out)
    finally:
        child.wait(10)
        os.unlink(path)


def _native_fwd() -> tuple[Callable[[int, Callable[[], None] | None], list[float]] | None, str]:
    """bench/roundtrip.py's forwarded figure, or None and why it cannot run here."""
    try:
        sys.path.insert(0, str(ROOT / "bench"))
        import roundtrip  # type: ignore[import-not-found]

        from remote_hw.client.vmm import Vm
        with Vm(mem_size=1 << 20):
            pass
    except Exception as e:  # no /dev/kvm, or a KVM that cannot run the guest
        return None, f"{type(e).__name__}: {e}"
    return roundtrip.forwarded, ""


def _stats(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(len(xs) * 0.99))]


def latency(mode: str, count: int, rounds: int) -> None:
    pinned = mode == "pinned"
    saved = os.sched_getaffinity(0)
    preexec = (lambda: os.sched_setaffinity(0, {0})) if pinned else None
    os.sched_setaffinity(0, {0} if pinned else set(range(os.cpu_count() or 1)))
    fwd, why_not = _native_fwd()
    server, port = start_server("uart0=uart16550", preexec=preexec)
    folder = tempfile.mkdtemp(prefix="rhw-bench-")
    sock, sock_py = os.path.join(folder, "c.sock"), os.path.join(folder, "py.sock")
    children = [server]
    try:
        children.append(start_bridge(sock, port, preexec))
        children.append(start_bridge(sock_py, port, preexec, c_path=False))
        figures: dict[str, Callable[[], list[float]]] = {
            "native-link": lambda: native_link(port, count)}
        if fwd is not None:
            figures["native-fwd"] = lambda: fwd(count, preexec)
        figures.update({"bridge": lambda: bridge_reads(sock, count),
                        "bridge-py": lambda: bridge_reads(sock_py, count),
                        "relay": lambda: relay(port, count, preexec, folder),
                        "hop": lambda: hop(count, preexec, folder)})
        medians: dict[str, list[float]] = {k: [] for k in figures}
        samples: dict[str, list[float]] = {k: [] for k in figures}
        for _ in range(rounds):
            for name, fn in figures.items():
                xs = fn()
                medians[name].append(statistics.median(xs))
                samples[name] += xs
    finally:
        for c in children:
            c.stop()
        os.sched_setaffinity(0, saved)
        for f in glob.glob(os.path.join(folder, "*")):
            os.unlink(f)
        os.rmdir(folder)
    med = {k: statistics.median(v) for k, v in medians.items()}
    print(f"[{mode}] per-access cost, {rounds} rounds of {count} reads (µs; median of round "
          "medians, p99 of all)")
    for name in figures:
        print(f"  {name:<12} median {med[name]:7.1f}   p99 {_stats(samples[name])[1]:7.1f}")
    if fwd is None:
        print(f"  native-fwd   not measured: {why_not}")

    def ratio(a: str, b: str, note: str, floor: str = "") -> None:
        """Ratio of the medians, and paired within each round (a drift of the machine
        between rounds then moves both figures together: the steadier number)."""
        top = medians[a] if not floor else [x + y for x, y in zip(medians[a],
                                                                  medians[floor])]
        name = f"({a} + {floor})" if floor else a
        whole = statistics.median(top) / med[b]
        pair = statistics.median(x / y for x, y in zip(top, medians[b]))
        print(f"  {name + ' / ' + b:<34} = {whole:5.2f}   paired {pair:5.2f}   {note}")

    if fwd is not None:
        ratio("bridge", "native-fwd", "issue 10's goal: <= 1.5")
    ratio("bridge", "native-link", "same boundary, no exit on either side")
    ratio("relay", "native-link", "floor: a minimal Python relay in the bridge's place")
    ratio("native-link", "native-link", "floor: the extra hop alone, no relay code",
          floor="hop")
    ratio("bridge-py", "bridge", "what the C calls save")


# ---------------------------------------------------------------------- throughput


APPLETS = ["sh", "mount", "stty", "echo", "cat", "sleep", "dd", "kill", "grep", "tr",
           "poweroff", "true", "uname"]
BRIDGED_SLOT, NATIVE_SLOT = 4, 5  # PCI slots: which ttyS is which is read from sysfs


def initramfs(folder: Path) -> tuple[Path, Path]:
    """(kernel, initrd): Debian's stock kernel and a busybox initramfs whose /init is
    scripts/initramfs/bridge-init (a remote shell on the console), as the tests use."""
    kernels = sorted(glob.glob("/boot/vmlinuz-*-amd64"))
    if not kernels:
        raise SystemExit("throughput: needs Debian's stock kernel (apt-get install "
                         "linux-image-amd64; scripts/install_qemu.sh does)")
    busybox = Path("/bin/busybox")
    spec = importlib.util.spec_from_file_location("record_traces",
                                                  ROOT / "scripts" / "record_traces.py")
    assert spec and spec.loader
    rt = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = rt
    spec.loader.exec_module(rt)
    bb = busybox.read_bytes() if busybox.exists() else b""
    if not bb or rt._elf_has_interp(bb):
        raise SystemExit("throughput: needs a static /bin/busybox (busybox-static)")
    entries = [(d, stat.S_IFDIR | 0o755, b"", 0, 0) for d in ("bin", "dev", "proc", "sys",
                                                               "tmp")]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", 5, 1))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, bb, 0, 0))
    entries += [(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox", 0, 0) for a in APPLETS]
    init = (ROOT / "scripts" / "initramfs" / "bridge-init").read_bytes()
    entries.append(("init", stat.S_IFREG | 0o755, init, 0, 0))
    initrd = folder / "initrd.gz"
    initrd.write_bytes(gzip.compress(rt._cpio_newc(entries), mtime=0))
    return Path(kernels[-1]), initrd


class Console:
    """QEMU's stdio console running bridge-init: a command per line, "@@DONE n" after."""

    def __init__(self, argv: list[str]) -> None:
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.buf = b""
        self.pos = 0
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        while chunk := os.read(self.p.stdout.fileno(), 65536):
            with self.cond:
                self.buf += chunk
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def expect(self, pattern: bytes, timeout: float = STEP_TIMEOUT) -> re.Match[bytes]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = rx.search(self.buf, self.pos)
                if m:
                    self.pos = m.end()
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or self.p.poll() is not None:
                    raise SystemExit(f"throughput: no {pattern!r} from the guest:\n"
                                     + self.buf[-3000:].decode(errors="replace"))
                self.cond.wait(min(left, 0.5))

    def run(self, cmd: str, timeout: float = STEP_TIMEOUT) -> str:
        start = self.pos
        assert self.p.stdin is not None
        self.p.stdin.write(cmd.encode() + b"\n")
        self.p.stdin.flush()
        m = self.expect(rb"@@DONE (\d+)\r?\n", timeout)
        out = self.buf[start:m.start()].decode(errors="replace")
        if m.group(1) != b"0":
            raise SystemExit(f"throughput: {cmd!r} failed in the guest: {out}")
        return out

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(15)


class Sink:
    """Counts the bytes arriving on a socket (a thread reads it), with their times."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.total = 0
        self.last = time.monotonic()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.total += len(data)
            self.last = time.monotonic()

    def rate(self, seconds: float) -> float:
        """Bytes/s from the first byte after now until ``seconds`` later."""
        start = self.total
        deadline = time.monotonic() + STEP_TIMEOUT
        while self.total == start:
            if time.monotonic() > deadline:
                raise SystemExit("throughput: no byte arrived")
            time.sleep(0.002)
        t0, b0 = time.monotonic(), self.total
        time.sleep(seconds)
        return (self.total - b0) / (time.monotonic() - t0)

    def drain(self, quiet: float = 1.0) -> None:
        """Wait until nothing has arrived for ``quiet`` seconds (bounded)."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() - self.last < quiet and time.monotonic() < deadline:
            time.sleep(0.1)


def _tty_of_slot(con: Console, slot: int) -> str:
    out = con.run(f"grep -l PCI_SLOT_NAME=0000:00:{slot:02x}.0 "
                  "/sys/class/tty/ttyS*/device/uevent")
    m = re.search(r"/sys/class/tty/(ttyS\d+)/", out)
    if not m:
        raise SystemExit(f"throughput: no ttyS on PCI slot {slot}: {out}")
    return m.group(1)


def throughput(seconds: float, rounds: int) -> None:
    ok, why = bridge_qemu.available()
    if not ok:
        print(f"[throughput] not measured: {why}")
        return
    folder = Path(tempfile.mkdtemp(prefix="rhw-bench-tp-"))
    kernel, initrd = initramfs(folder)
    server, port = start_server("uart0=uart16550,backend=tcp:127.0.0.1:0")
    sock = folder / "uart.sock"
    bridge = start_bridge(str(sock), port, log_level="info")  # its counters at the end
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(STEP_TIMEOUT)
    chardev_port = listener.getsockname()[1]
    args = ["-accel", "tcg", "-m", "256M", "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd), "-append",
            "console=ttyS0,115200 panic=-1 quiet",
            "-device", json.dumps({"driver": "vfio-user-pci", "id": "rhw",
                                   "addr": f"{BRIDGED_SLOT:#x}",
                                   "socket": {"type": "unix", "path": str(sock)}}),
            "-chardev", f"socket,id=ps,host=127.0.0.1,port={chardev_port}",
            "-device", f"pci-serial,chardev=ps,addr={NATIVE_SLOT:#x}"]
    con = Console(bridge_qemu.command(args))
    try:
        native_sock, _ = listener.accept()
        native = Sink(native_sock)
        con.expect(rb"@@READY", BOOT_TIMEOUT)
        backend_port = int(server.wait_for(r"uart0: backend tcp:[\d.]+:(\d+)").group(1))
        bridged = Sink(socket.create_connection(("127.0.0.1", backend_port), timeout=10))
        ports = {"bridge": (_tty_of_slot(con, BRIDGED_SLOT), bridged, 3),
                 "pci-serial": (_tty_of_slot(con, NATIVE_SLOT), native, 4)}
        for tty, _, fd in ports.values():
            # The shell keeps each port open, so dd's exit never waits for a drain.
            con.run(f"stty -F /dev/{tty} 115200 raw -echo -opost clocal -crtscts && "
                    f"exec {fd}<>/dev/{tty}")
        rates: dict[str, list[float]] = {k: [] for k in ports}
        for _ in range(rounds):
            for name, (_tty, sink, fd) in ports.items():
                con.run(f"dd if=/dev/zero bs=1024 >&{fd} 2>/dev/null & echo $! >/tmp/dd")
                rates[name].append(sink.rate(seconds))
                con.run("kill $(cat /tmp/dd)")
                sink.drain()
        con.run("true")
        assert con.p.stdin is not None
        con.p.stdin.write(b"poweroff -f\n")
        con.p.stdin.flush()
        con.p.wait(STEP_TIMEOUT)
        counters = bridge.wait_for(r"ended \((\d+) BAR accesses forwarded, (\d+) INTx "
                                   r"triggers, (\d+) unmasks\)")
    finally:
        con.stop()
        bridge.stop()
        server.stop()
        listener.close()
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"[throughput] one TCG guest, {rounds} alternating windows of {seconds:g} s per "
          "port, dd from /dev/zero in raw mode (bytes/s at the host socket)")
    for name, (tty, _, _) in ports.items():
        print(f"  {name:<11} ({tty}) median {med[name]:10.0f} B/s   rounds "
              + " ".join(f"{r:.0f}" for r in rates[name]))
    print(f"  ratio bridge / pci-serial = {med['bridge'] / med['pci-serial']:.3f}")
    moved = bridged.total
    accesses, triggers, unmasks = (int(x) for x in counters.groups())
    per_byte = accesses / moved
    print(f"  the bridge forwarded {per_byte:.2f} BAR accesses and {triggers / moved:.2f} INTx "
          f"triggers per byte (whole boot: {accesses} accesses, {triggers} triggers, "
          f"{unmasks} unmasks for {moved} bytes): a guest BAR access cost "
          f"~{1e6 / med['bridge'] / per_byte:.0f} µs in the windows")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=5000, help="reads per figure and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--mode", choices=["pinned", "unpinned", "both"], default="both")
    ap.add_argument("--seconds", type=float, default=4.0,
                    help="throughput window per port and round (default 4)")
    ap.add_argument("--no-latency", action="store_true", help="skip the per-access cost")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput")
    args = ap.parse_args()
    on, why = fastio.status()
    print("link C fast path (remote_hw/net/fastio.py): " + ("on" if on else f"OFF: {why}"))
    on, why = fastpath.status()
    print("bridge C calls (remote_hw/bridge/fastpath.py): " + ("on" if on else f"OFF: {why}"))
    if not args.no_latency:
        for mode in (["pinned", "unpinned"] if args.mode == "both" else [args.mode]):
            latency(mode, args.count, args.rounds)
    if not args.no_throughput:
        throughput(args.seconds, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
