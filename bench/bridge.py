"""The vfio-user bridge against the native client: per-access cost and guest throughput.

    python3 bench/bridge.py [--count N] [--rounds R] [--mode pinned|unpinned|both]
                            [--seconds S] [--size BYTES] [--no-latency] [--no-throughput]

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
QEMU): one QEMU 11.1 boots Debian's stock kernel (TCG, q35: each port on its own
interrupt line) with three 16550s on PCI, each bound by the guest's unmodified
8250_pci and driven by interrupts, in raw mode at 115200:

* (a) ``pci-serial``: QEMU's own, on a socket chardev read by this process: the local
      ceiling;
* (b) ``bridge-sync``: a remote-hw UART (``vfio-user-pci`` served by a bridge child
      run with ``--no-posting``, BAR0 to a server child on loopback, its tcp backend
      read by this process): every BAR access waits for the server;
* (c) ``bridge-posted``: the same with a second bridge child in its default mode,
      posting (THR writes posted, LSR/MSR/IER/LCR/MCR answered from the shadow);
* (d) ``bridge-mmio``: (c) with ``--template mmio-serial``: the UART behind a memory
      BAR, which QEMU may post writes to (it waits for every write to an I/O BAR).

A bridge has one mode per process, so (b), (c) and (d) are three bridge children,
three ``vfio-user-pci`` devices of the same guest and three UARTs (uart1, uart0,
uart2) of the same server: one boot for all four. Two measurements, each R rounds
visiting the ports in turn:

1. ``cat`` of a --size file (64 KiB of seeded random bytes, every byte value) to the
   port; bytes/s from the first byte's arrival at the host socket to the last's. Every
   transfer is checked: the bytes at the server's backend (QEMU's socket for (a)) must
   be exactly the file, none more, and the guest driver's own tx count
   (/proc/tty/driver/serial) must have grown by the size;
2. what this bench measured before: ``dd`` from /dev/zero for S seconds; bytes/s from
   the first byte to the end of the window.

At the end, over the whole boot: every byte the guest's driver counted as sent arrived,
and every dd byte was a zero. It prints the ratios (c)/(b), (c)/(a) and (b)/(a) of the
medians, paired per round too, and the bridges' own counters. Bounded: each wait has
a deadline. Exit status 1 if a transfer was not exact (each one is named).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import importlib.util
import json
import os
import random
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
                 c_path: bool = True, log_level: str = "warning", device: str = "uart0",
                 posting: bool = True, template: str = "pci-serial") -> Child:
    env = dict(os.environ) if c_path else dict(os.environ, REMOTE_HW_FASTIO="0")
    br = remote_hw("bridge", "--socket", sock, "--device", f"a/{device}", "--server",
                   f"a=127.0.0.1:{port}", "--log-level", log_level, "--template", template,
                   *([] if posting else ["--no-posting"]), preexec=preexec, env=env)
    br.wait_for(rf"serving a/{device}")
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
# PCI slots: which ttyS is which is read from sysfs.
BRIDGED_SLOT, NATIVE_SLOT, SYNC_SLOT, MMIO_SLOT = 4, 5, 6, 7
DATA = "/data"  # the file the guest cats: a seeded pseudo-random stream (every byte value)


def payload(size: int) -> bytes:
    """What the guest sends in the cat transfers: the same bytes every run."""
    return random.Random(0x5EED).randbytes(size)


def initramfs(folder: Path, data: bytes = b"") -> tuple[Path, Path]:
    """(kernel, initrd): Debian's stock kernel and a busybox initramfs whose /init is
    scripts/initramfs/bridge-init (a remote shell on the console), as the tests use;
    ``data``, if any, is the file /data."""
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
    if data:
        entries.append((DATA.lstrip("/"), stat.S_IFREG | 0o644, data, 0, 0))
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
    """Counts the bytes arriving on a socket (a thread reads it), with their times.
    Outside a capture it counts the bytes that are not zero (``dd if=/dev/zero`` sends
    none); during one (:meth:`capture`) it keeps what arrives."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(None)  # a port may stay quiet for long; its reader must not end
        self.sock = sock
        self.total = 0
        self.nonzero = 0
        self.last = time.monotonic()
        self.cond = threading.Condition()
        self.kept: bytearray | None = None
        self.target = 0
        self.first = self.done = 0.0  # arrival of a capture's first and target-th byte
        self.first_len = 0
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            with self.cond:
                self.total += len(data)
                self.last = now
                kept = self.kept
                if kept is None:
                    self.nonzero += len(data) - data.count(0)
                else:
                    if not kept:
                        self.first, self.first_len = now, len(data)
                    had = len(kept)
                    kept += data
                    if had < self.target <= len(kept):
                        self.done = now
                self.cond.notify_all()

    def rate(self, seconds: float, what: str = "") -> float:
        """Bytes/s from the first byte after now until ``seconds`` later."""
        start = self.total
        deadline = time.monotonic() + STEP_TIMEOUT
        while self.total == start:
            if time.monotonic() > deadline:
                raise SystemExit(f"throughput: no byte arrived {what}".rstrip())
            time.sleep(0.002)
        t0, b0 = time.monotonic(), self.total
        time.sleep(seconds)
        return (self.total - b0) / (time.monotonic() - t0)

    def drain(self, quiet: float = 1.0) -> None:
        """Wait until nothing has arrived for ``quiet`` seconds (bounded)."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() - self.last < quiet and time.monotonic() < deadline:
            time.sleep(0.1)

    def capture(self, size: int) -> None:
        """Keep what arrives from now on; ``size`` bytes are expected."""
        with self.cond:
            self.kept, self.target, self.done = bytearray(), size, 0.0

    def captured(self, timeout: float) -> tuple[bytes, float]:
        """The capture's bytes, once ``size`` have arrived (or ``timeout`` has passed
        without) and then nothing for half a second more (a byte too many shows), and
        the bytes/s from the first byte's arrival to the size-th's (0 if short)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            assert self.kept is not None
            while len(self.kept) < self.target and time.monotonic() < deadline:
                self.cond.wait(0.5)
        self.drain(0.5)
        with self.cond:
            data, self.kept = bytes(self.kept or b""), None
            span = self.done - self.first
            rate = (self.target - self.first_len) / span if self.done and span > 0 else 0.0
        return data, rate


def _tty_of_slot(con: Console, slot: int) -> str:
    out = con.run(f"grep -l PCI_SLOT_NAME=0000:00:{slot:02x}.0 "
                  "/sys/class/tty/ttyS*/device/uevent")
    m = re.search(r"/sys/class/tty/(ttyS\d+)/", out)
    if not m:
        raise SystemExit(f"throughput: no ttyS on PCI slot {slot}: {out}")
    return m.group(1)


def _serial_info(con: Console) -> dict[str, tuple[int, int]]:
    """ttyS name -> (irq, tx): the guest driver's own count of bytes it put in THR."""
    out = con.run("cat /proc/tty/driver/serial")
    return {f"ttyS{m.group(1)}": (int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^(\d+): uart:\S+ (?:port|mmio):\S+ irq:(\d+) tx:(\d+)", out,
                                 re.M)}


def _irq_counts(con: Console) -> dict[int, int]:
    """IRQ number -> interrupts so far (all CPUs), from /proc/interrupts."""
    out = con.run("cat /proc/interrupts")
    return {int(m.group(1)): sum(int(n) for n in m.group(2).split())
            for m in re.finditer(r"^\s*(\d+):((?:\s+\d+)+)", out, re.M)}


def _difference(got: bytes, want: bytes) -> str:
    """How a capture differs from what the guest sent (empty when exact)."""
    if got == want:
        return ""
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got),
                                                                          len(want)))
    text = (f"got {len(got)} bytes of {len(want)}; first difference at offset {k}: "
            f"sent {want[k:k + 16].hex()} received {got[k:k + 16].hex()}")
    if len(got) < len(want) and got == want[:len(got)]:
        return text + " (a prefix: the rest never came)"
    import difflib  # lost, doubled or reordered stretches
    sm = difflib.SequenceMatcher(None, want, got, autojunk=False)
    ops = [op for op in sm.get_opcodes() if op[0] != "equal"][:8]
    return text + "; edits (sent range -> received range): " + ", ".join(
        f"{tag} {i1}:{i2}->{j1}:{j2}" for tag, i1, i2, j1, j2 in ops)


def progress(text: str) -> None:
    print(f"  ... {text}", file=sys.stderr, flush=True)


# The three ports of one guest, in the order each round visits them.
PORTS = {"pci-serial": "(a) QEMU's built-in pci-serial, socket chardev",
         "bridge-sync": "(b) bridge --no-posting (every access waits)",
         "bridge-posted": "(c) bridge, posting (default)",
         "bridge-mmio": "(d) bridge, posting, --template mmio-serial (a memory BAR)"}


def throughput(seconds: float, rounds: int, size: int) -> int:
    """The guest measurements; 1 if a transfer did not arrive exactly as sent."""
    ok, why = bridge_qemu.available()
    if not ok:
        print(f"[throughput] not measured: {why}")
        return 0
    folder = Path(tempfile.mkdtemp(prefix="rhw-bench-tp-"))
    data = payload(size)
    kernel, initrd = initramfs(folder, data)
    # One server, two UARTs: uart0 for the posting bridge, uart1 for the --no-posting
    # one (a bridge has one mode per process); each its own tcp backend.
    server, port = start_server("uart0=uart16550,backend=tcp:127.0.0.1:0",
                                "uart1=uart16550,backend=tcp:127.0.0.1:0",
                                "uart2=uart16550,backend=tcp:127.0.0.1:0")
    children = [server]
    sock, sock_sync = folder / "uart.sock", folder / "sync.sock"
    sock_mmio = folder / "mmio.sock"
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(STEP_TIMEOUT)
    con: Console | None = None
    failures: list[str] = []
    try:
        # log level info: their counters at the end
        posted_br = start_bridge(str(sock), port, log_level="info")
        children.append(posted_br)
        sync_br = start_bridge(str(sock_sync), port, log_level="info", device="uart1",
                               posting=False)
        children.append(sync_br)
        mmio_br = start_bridge(str(sock_mmio), port, log_level="info", device="uart2",
                               template="mmio-serial")
        children.append(mmio_br)
        chardev_port = listener.getsockname()[1]
        # q35: each PCI slot here gets its own interrupt line (GSI 20, 21, 22). On `pc`
        # two of the three would share IRQ 10 or 11, and 8250's handler reads the IIR of
        # every port on its line at each pass: a transfer to QEMU's own port would pay a
        # remote read of the idle bridged port's IIR per 16 bytes (seen: 80-120 kB/s
        # instead of 220-360).
        args = ["-machine", "q35", "-accel", "tcg", "-m", "256M", "-nodefaults",
                "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
                "-initrd", str(initrd), "-append",
                "console=ttyS0,115200 panic=-1 quiet 8250.nr_uarts=8",
                "-device", json.dumps({"driver": "vfio-user-pci", "id": "rhw",
                                       "addr": f"{BRIDGED_SLOT:#x}",
                                       "socket": {"type": "unix", "path": str(sock)}}),
                "-device", json.dumps({"driver": "vfio-user-pci", "id": "rhw-sync",
                                       "addr": f"{SYNC_SLOT:#x}",
                                       "socket": {"type": "unix", "path": str(sock_sync)}}),
                "-device", json.dumps({"driver": "vfio-user-pci", "id": "rhw-mmio",
                                       "addr": f"{MMIO_SLOT:#x}",
                                       "socket": {"type": "unix", "path": str(sock_mmio)}}),
                "-chardev", f"socket,id=ps,host=127.0.0.1,port={chardev_port}",
                "-device", f"pci-serial,chardev=ps,addr={NATIVE_SLOT:#x}"]
        con = Console(bridge_qemu.command(args))
        native_sock, _ = listener.accept()
        native = Sink(native_sock)
        con.expect(rb"@@READY", BOOT_TIMEOUT)
        backends = {d: int(server.wait_for(rf"\b{d}: backend tcp:[\d.]+:(\d+)").group(1))
                    for d in ("uart0", "uart1", "uart2")}
        posted = Sink(socket.create_connection(("127.0.0.1", backends["uart0"]), timeout=10))
        sync = Sink(socket.create_connection(("127.0.0.1", backends["uart1"]), timeout=10))
        mmio = Sink(socket.create_connection(("127.0.0.1", backends["uart2"]), timeout=10))
        # name -> (guest tty, host sink, shell fd)
        ports = {"pci-serial": (_tty_of_slot(con, NATIVE_SLOT), native, 4),
                 "bridge-sync": (_tty_of_slot(con, SYNC_SLOT), sync, 5),
                 "bridge-posted": (_tty_of_slot(con, BRIDGED_SLOT), posted, 3),
                 "bridge-mmio": (_tty_of_slot(con, MMIO_SLOT), mmio, 6)}
        for tty, _, fd in ports.values():
            # The shell keeps each port open, so a writer's exit never waits for a drain.
            con.run(f"stty -F /dev/{tty} 115200 raw -echo -opost clocal -crtscts && "
                    f"exec {fd}<>/dev/{tty}")
        irqs_before = _irq_counts(con)

        # 1. cat of the same `size` bytes to each port, R interleaved rounds.
        cat_rates: dict[str, list[float]] = {k: [] for k in ports}
        slow = max(STEP_TIMEOUT, size / 400)  # bounded even at a few hundred bytes/s
        for r in range(rounds):
            for name, (tty, sink, fd) in ports.items():
                tx0 = _serial_info(con)[tty][1]
                sink.capture(size)
                con.run(f"cat {DATA} >&{fd}", timeout=slow)
                got, rate = sink.captured(slow)
                tx = _serial_info(con)[tty][1] - tx0
                diff = _difference(got, data)
                if tx != size:
                    diff = (diff + "; " if diff else "") + f"the guest driver counted tx {tx}"
                if diff:
                    failures.append(f"round {r + 1}, {name} ({tty}): {diff}")
                cat_rates[name].append(rate)
                progress(f"cat round {r + 1} {name}: {rate:.0f} B/s, "
                         + ("NOT EXACT: " + diff if diff else "exact"))

        # 2. What the bench measured before: dd from /dev/zero, S-second windows.
        dd_rates: dict[str, list[float]] = {k: [] for k in ports}
        for _ in range(rounds):
            for name, (_tty, sink, fd) in ports.items():
                con.run(f"dd if=/dev/zero bs=1024 >&{fd} 2>/dev/null & echo $! >/tmp/dd")
                dd_rates[name].append(sink.rate(seconds, f"from {name}'s dd"))
                progress(f"dd window {name}: {dd_rates[name][-1]:.0f} B/s")
                con.run("kill $(cat /tmp/dd)")
                sink.drain()
        after = _serial_info(con)
        irqs_after = _irq_counts(con)
        # What the guest's kernel said about its serial ports after probing them
        # (e.g. 8250's "too much work for irq"), or about anything going wrong.
        dmesg = con.run("dmesg").splitlines()
        probed = max((i for i, line in enumerate(dmesg) if "is a 16550A" in line), default=0)
        said = [line for line in dmesg[probed + 1:]
                if re.search(r"serial|8250|ttyS|vfio|nobody cared|too much work|disabling IRQ",
                             line, re.I)]
        # Whole boot: every byte the guest's driver put in THR arrived, no more, and
        # the dd bytes are all zeros.
        for name, (tty, sink, _fd) in ports.items():
            tx = after[tty][1]
            if sink.total != tx or sink.nonzero:
                failures.append(f"whole boot, {name} ({tty}): the guest driver counted tx "
                                f"{tx}, the host received {sink.total} ({sink.nonzero} of "
                                "the dd bytes not zero)")
        assert con.p.stdin is not None
        con.p.stdin.write(b"poweroff -f\n")
        con.p.stdin.flush()
        con.p.wait(STEP_TIMEOUT)
        ended = r"ended \((\d+) BAR accesses forwarded, (\d+) INTx triggers, (\d+) unmasks\)"
        counters = {"bridge-posted": posted_br.wait_for(ended),
                    "bridge-sync": sync_br.wait_for(ended),
                    "bridge-mmio": mmio_br.wait_for(ended)}
    finally:
        if con is not None:
            con.stop()
        for c in reversed(children):
            c.stop()
        listener.close()
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    print("[throughput] one TCG guest (Linux 8250_pci, interrupt-driven, raw mode, 115200), "
          "three 16550s on PCI:")
    for name, label in PORTS.items():
        tty = ports[name][0]
        irq = after[tty][0]
        n = irqs_after.get(irq, 0) - irqs_before.get(irq, 0)
        shared = [t for t, (i, _) in after.items() if i == irq and t != tty and
                  t in (p[0] for p in ports.values())]
        print(f"  {label}: {tty}, irq {irq}: {n} interrupts during the runs"
              + (f" (line shared with {', '.join(shared)})" if shared else ""))
    print(f"  cat of {size} bytes (seeded random) to each port, {rounds} interleaved rounds "
          "(bytes/s at the host socket, first byte to last)")
    for name in PORTS:
        print(f"    {name:<14} median {med(cat_rates[name]):10.0f} B/s   rounds "
              + " ".join(f"{x:.0f}" for x in cat_rates[name]))

    def ratio(a: str, b: str, rates: dict[str, list[float]], note: str) -> None:
        whole = med(rates[a]) / med(rates[b]) if med(rates[b]) else float("nan")
        pairs = [x / y for x, y in zip(rates[a], rates[b]) if y]
        span = f"{min(pairs):.3f}-{max(pairs):.3f}" if pairs else "-"
        print(f"    {a + ' / ' + b:<30} = {whole:7.3f}   paired per round {span}   {note}")

    ratio("bridge-posted", "bridge-sync", cat_rates, "(c)/(b): what posting gives")
    ratio("bridge-posted", "pci-serial", cat_rates, "(c)/(a): against QEMU's own")
    ratio("bridge-sync", "pci-serial", cat_rates, "(b)/(a)")
    ratio("bridge-mmio", "bridge-posted", cat_rates, "(d)/(c): what a memory BAR gives")
    ratio("bridge-mmio", "pci-serial", cat_rates, "(d)/(a)")
    verdict = "all exact" if not failures else f"{len(failures)} NOT EXACT"
    print(f"    check: each transfer's bytes at the server's backend (or QEMU's socket) "
          f"against the guest's file, and the guest driver's tx count: {verdict}")
    print(f"  dd from /dev/zero, {rounds} alternating windows of {seconds:g} s per port "
          "(bytes/s at the host socket)")
    for name in PORTS:
        print(f"    {name:<14} median {med(dd_rates[name]):10.0f} B/s   rounds "
              + " ".join(f"{x:.0f}" for x in dd_rates[name]))
    ratio("bridge-posted", "bridge-sync", dd_rates, "(c)/(b)")
    ratio("bridge-posted", "pci-serial", dd_rates, "(c)/(a)")
    ratio("bridge-sync", "pci-serial", dd_rates, "(b)/(a)")
    ratio("bridge-mmio", "bridge-posted", dd_rates, "(d)/(c)")
    ratio("bridge-mmio", "pci-serial", dd_rates, "(d)/(a)")
    for name, m in counters.items():
        sink = ports[name][1]
        moved = sink.total
        accesses, triggers, unmasks = (int(x) for x in m.groups())
        print(f"  {name}: {accesses / moved:.2f} BAR accesses sent to the server and "
              f"{triggers / moved:.3f} INTx triggers per byte (whole boot: {accesses} "
              f"accesses, posted writes included, shadowed reads not; {triggers} triggers, "
              f"{unmasks} unmasks for {moved} bytes)")
        if name == "bridge-sync":
            print(f"    (as bench/bridge.py printed before posting: a guest BAR access cost "
                  f"~{1e6 / med(dd_rates[name]) / (accesses / moved):.0f} µs in its dd "
                  "windows)")
    print("  guest kernel messages about serial ports or interrupts after probing: "
          + ("none" if not said else "\n    " + "\n    ".join(s.strip() for s in said)))
    for failure in failures:
        print(f"  NOT EXACT: {failure}")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=5000, help="reads per figure and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--mode", choices=["pinned", "unpinned", "both"], default="both")
    ap.add_argument("--seconds", type=float, default=4.0,
                    help="throughput window per port and round (default 4)")
    ap.add_argument("--size", type=int, default=64 * 1024,
                    help="bytes the guest cats to each port per round (default 65536)")
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
        return throughput(args.seconds, args.rounds, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
