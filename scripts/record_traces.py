#!/usr/bin/env python3
"""Record the register traffic of Linux's real 8250 and i8042 drivers, using QEMU as an oracle.

Builds a small initramfs (busybox-static + ``scripts/initramfs/init``), boots Debian's
kernel under ``qemu-system-x86_64`` with TCG (no KVM), drives a short scripted session
(serial text both ways at several speeds and parities, key presses through the QMP
``send-key`` command, a keyboard LED change, a reboot through the i8042) and converts
QEMU's trace log into the compact per-device traces described in ``docs/traces.md``::

    sudo apt-get install -y qemu-system-x86 busybox-static linux-image-amd64
    python3 scripts/record_traces.py            # writes tests/traces/*.trace.gz

QEMU trace events used (``-trace``): ``memory_region_ops_read``/``_write`` (absolute
port, value, size, region name), ``serial_*`` and ``pckbd_*`` (cross-checks),
``ps2_*`` (key codes entering the keyboard queue, LED state, data reads) and
``x86_gsi_interrupt`` (every level a device puts on an ISA interrupt line).
``-msg timestamp=on`` prefixes each log line with ``<thread id>@<wall clock>:``; the
thread id tells register accesses (vCPU thread) from events the main loop delivers
(bytes from the serial backend, key events, timers), and the wall clock places the
bytes the recorder sent.

A recording takes about 10 s (QEMU runs about 8 s); see ``--help`` for the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import gzip
import io
import json
import os
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from remote_hw.devices.tracefmt import TraceRecord, write_trace  # noqa: E402

INIT_SCRIPT = REPO / "scripts" / "initramfs" / "init"
DEFAULT_OUT = REPO / "tests" / "traces"
QEMU = "qemu-system-x86_64"
KERNEL_CMDLINE = "console=ttyS0,115200n8 reboot=k pci=off quiet panic=-1"
APPLETS = ["sh", "mount", "stty", "echo", "cat", "sleep", "reboot", "uname", "ls"]


# --------------------------------------------------------------------------------------
# initramfs


def _cpio_newc(entries: Iterable[tuple[str, int, bytes, int, int]]) -> bytes:
    """A newc cpio archive of (name, mode, data, rdev_major, rdev_minor) entries."""
    out = io.BytesIO()

    def add(name: str, mode: int, data: bytes, major: int, minor: int, ino: int) -> None:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(nb), 0))
        out.write(hdr.encode() + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    ino = 1
    for name, mode, data, major, minor in entries:
        add(name, mode, data, major, minor, ino)
        ino += 1
    add("TRAILER!!!", 0, b"", 0, 0, 0)
    return out.getvalue()


def _elf_has_interp(elf: bytes) -> bool:
    """True if a 64-bit little-endian ELF image has a PT_INTERP (is dynamically linked)."""
    import struct
    if elf[4] != 2 or elf[5] != 1:
        raise SystemExit("expected a 64-bit little-endian ELF binary")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3  # PT_INTERP
               for i in range(phnum))


def build_initramfs(busybox: Path, init: Path, dest: Path) -> None:
    bb = busybox.read_bytes()
    if bb[:4] != b"\x7fELF":
        raise SystemExit(f"{busybox} is not an ELF binary")
    if _elf_has_interp(bb):
        raise SystemExit(f"{busybox} is dynamically linked; install busybox-static")
    entries: list[tuple[str, int, bytes, int, int]] = []
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        entries.append((d, stat.S_IFDIR | 0o755, b"", 0, 0))
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", 5, 1))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, bb, 0, 0))
    for a in APPLETS:
        entries.append((f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox", 0, 0))
    entries.append(("init", stat.S_IFREG | 0o755, init.read_bytes(), 0, 0))
    dest.write_bytes(gzip.compress(_cpio_newc(entries), mtime=0))


def newest_kernel() -> Path:
    kernels = sorted(glob.glob("/boot/vmlinuz-*-amd64"))
    if not kernels:
        raise SystemExit("no /boot/vmlinuz-*-amd64; apt-get install linux-image-amd64")
    return Path(kernels[-1])


# --------------------------------------------------------------------------------------
# the session


class Console:
    """One serial port's host side: a reader thread and byte-at-a-time typing.

    QEMU's ``pipe`` chardev uses two FIFOs, ``<path>.in`` (host to guest) and
    ``<path>.out``. A pipe holds 64 KiB whatever the write sizes, so QEMU's one-byte
    writes never find it full. (A UNIX socket charges every one-byte send as a whole
    buffer and fills after a few hundred bytes when the reader lags; QEMU then retries
    the transmission from its main loop later, with LSR showing the transmitter busy
    meanwhile: an artefact of the recording, not something to put in a trace.)
    """

    def __init__(self, name: str, fifo: Path, log: Path) -> None:
        self.name = name
        # O_RDWR: opening does not wait for QEMU, and reads never see a premature EOF
        self.rfd = os.open(f"{fifo}.out", os.O_RDWR)
        self.wfd = os.open(f"{fifo}.in", os.O_RDWR)
        self.buf = bytearray()
        self.cond = threading.Condition()
        self.closed = False
        self.proc: subprocess.Popen | None = None   # QEMU, to stop waiting when it died
        self.sent: list[tuple[float, int]] = []  # (wall clock just before the write, byte)
        self._log = open(log, "wb")
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        while not self.closed:
            ready, _, _ = select.select([self.rfd], [], [], 0.2)
            data = os.read(self.rfd, 65536) if ready else b""
            with self.cond:
                if data:
                    self.buf += data
                    self._log.write(data)
                    self._log.flush()
                    self.cond.notify_all()
        self._log.close()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self._thread.join(2)
        os.close(self.rfd)
        os.close(self.wfd)

    def wait_for(self, marker: bytes, timeout: float, start: int = 0) -> int:
        """Wait until ``marker`` appears at or after ``start``; return the index after it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                i = self.buf.find(marker, start)
                if i >= 0:
                    return i + len(marker)
                left = deadline - time.monotonic()
                dead = self.proc is not None and self.proc.poll() is not None
                if left <= 0 or self.closed or dead:
                    tail = bytes(self.buf[-400:]).decode("ascii", "replace")
                    why = "QEMU exited" if dead else "timed out"
                    raise TimeoutError(f"{self.name}: no {marker!r} ({why}); "
                                       f"last output:\n{tail}")
                self.cond.wait(min(left, 0.5))

    def type(self, text: bytes, echo_timeout: float = 5.0) -> None:
        """Send one byte at a time, each once the tty has echoed the previous one.

        One byte per send makes QEMU deliver each byte in its own ``serial_receive1``
        call, and the echo (n_tty echoes a byte after the driver read it from RBR)
        means the UART's receive FIFO is empty again before the next byte is sent, so
        the converter can tell each delivery from a character-timeout event.
        """
        for b in text:
            echo = b"\n" if b in b"\r\n" else bytes([b])
            with self.cond:
                start = len(self.buf)
            self.sent.append((time.time(), b))
            os.write(self.wfd, bytes([b]))
            try:
                self.wait_for(echo, echo_timeout, start)
            except TimeoutError:
                print(f"  {self.name}: no echo for {bytes([b])!r}", file=sys.stderr)
            time.sleep(0.01)


class Qmp:
    def __init__(self, conn: socket.socket) -> None:
        self.f = conn.makefile("rwb", buffering=0)
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.f.readline()
            if not line:
                raise EOFError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name: str, **args: object) -> dict:
        req: dict = {"execute": name}
        if args:
            req["arguments"] = args
        self.f.write(json.dumps(req).encode() + b"\n")
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error']}")
        return reply

    def sendkey(self, key: str, hold_ms: int = 100) -> float:
        t = time.time()
        self.cmd("send-key", keys=[{"type": "qcode", "data": key}], **{"hold-time": hold_ms})
        return t


@dataclasses.dataclass
class Recording:
    log: Path
    qemu_pid: int
    sent: dict[str, list[tuple[float, int]]]   # device -> bytes typed into it
    keys: list[tuple[float, str]]
    seconds: float
    qemu_version: str
    kernel: str
    com2: bool


def record(workdir: Path, kernel: Path, busybox: Path, com2: bool, timeout: float,
           verbose: bool) -> Recording:
    initrd = workdir / "initrd.gz"
    build_initramfs(busybox, INIT_SCRIPT, initrd)
    log = workdir / "qemu-trace.log"
    if log.exists():
        log.unlink()

    for n in ("com1", "com2") if com2 else ("com1",):
        for end in (".in", ".out"):
            p = workdir / f"{n}{end}"
            if p.exists() or p.is_symlink():
                p.unlink()
            os.mkfifo(p, 0o600)
    qmp_path = workdir / "qmp.sock"
    if qmp_path.exists():
        qmp_path.unlink()
    qmp_listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qmp_listen.bind(str(qmp_path))
    qmp_listen.listen(1)
    qmp_listen.settimeout(30)
    consoles: dict[str, Console] = {
        "uart0": Console("com1", workdir / "com1", workdir / "console-com1.log")}
    if com2:
        consoles["uart1"] = Console("com2", workdir / "com2", workdir / "console-com2.log")

    cmd = [
        QEMU, "-machine", "pc", "-accel", "tcg", "-cpu", "qemu64", "-smp", "1", "-m", "256",
        "-nodefaults", "-no-reboot", "-display", "none", "-vga", "none",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", KERNEL_CMDLINE,
        "-chardev", f"pipe,id=com1,path={workdir / 'com1'}", "-serial", "chardev:com1",
    ]
    if com2:
        cmd += ["-chardev", f"pipe,id=com2,path={workdir / 'com2'}",
                "-serial", "chardev:com2"]
    cmd += [
        "-chardev", f"socket,id=qmp,path={qmp_path}", "-mon", "chardev=qmp,mode=control",
        "-msg", "timestamp=on", "-D", str(log),
        "-trace", "memory_region_ops_*", "-trace", "serial_*", "-trace", "pckbd_*",
        "-trace", "ps2_*", "-trace", "x86_gsi_interrupt",
    ]
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[0]
    t0 = time.monotonic()
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    for c in consoles.values():
        c.proc = qemu
    keys: list[tuple[float, str]] = []
    watchdog = threading.Timer(timeout, qemu.kill)   # a hung guest ends the recording
    watchdog.daemon = True
    watchdog.start()
    try:
        com1 = consoles["uart0"]
        qmp = Qmp(qmp_listen.accept()[0])

        def step(msg: str) -> None:
            if verbose:
                print(f"  [{time.monotonic() - t0:6.2f}s] {msg}", file=sys.stderr)

        pos = com1.wait_for(b"@@READY", 90)
        step("guest ready")
        pos = com1.wait_for(b"@@SEND1\r\n", 20, pos)
        com1.type(b"hello\r")
        pos = com1.wait_for(b"@@GOT1 hello", 20, pos)
        pos = com1.wait_for(b"@@SEND2\r\n", 20, pos)
        com1.type(b"world\r")
        pos = com1.wait_for(b"@@GOT2 world", 20, pos)
        step("serial lines done")
        if com2:
            pos = com1.wait_for(b"@@SEND3", 20, pos)
            consoles["uart1"].wait_for(b"hello from ttyS1\r\n", 20)
            consoles["uart1"].type(b"two\r")
            pos = com1.wait_for(b"@@GOT3 two", 20, pos)
            step("com2 done")
        pos = com1.wait_for(b"@@KEYS", 20, pos)
        time.sleep(0.3)
        for k in ("h", "i", "ret"):
            keys.append((qmp.sendkey(k), k))
            time.sleep(0.3)
        pos = com1.wait_for(b"@@KEYGOT hi", 20, pos)
        step("keys done")
        pos = com1.wait_for(b"@@LEDS\r\n", 20, pos)
        for k in ("caps_lock", "caps_lock"):
            time.sleep(0.3)
            keys.append((qmp.sendkey(k), k))
        time.sleep(0.5)
        com1.type(b"go\r")
        pos = com1.wait_for(b"@@REBOOT go", 20, pos)
        step("reboot requested")
        qemu.wait(timeout=30)
    except BaseException:
        if qemu.poll() is None:
            qemu.kill()
        out = qemu.communicate()[0].decode(errors="replace")
        if out:
            print(out, file=sys.stderr)
        raise
    finally:
        watchdog.cancel()
        qmp_listen.close()
        for c in consoles.values():
            c.close()
    seconds = time.monotonic() - t0
    out = qemu.communicate()[0].decode(errors="replace")
    if qemu.returncode != 0:
        raise SystemExit(f"QEMU exited with {qemu.returncode}:\n{out}")
    return Recording(log=log, qemu_pid=qemu.pid,
                     sent={d: c.sent for d, c in consoles.items()}, keys=keys,
                     seconds=seconds, qemu_version=version, kernel=kernel.name, com2=com2)


# --------------------------------------------------------------------------------------
# conversion of QEMU's log into per-device traces

# QEMU's "log" trace backend writes one line per event, "NAME ARGS". Only under
# "-msg timestamp=on" does QEMU 7.2 (Debian 12's, the oracle here) put
# "<thread id>@<seconds>.<microseconds>:" in front (scripts/tracetool/backend/log.py);
# QEMU's 2025 rework of log timestamps (for 10.1) writes an ISO date there instead, with
# no thread id. (The "simple" backend writes a binary file, not this text.) So QEMU's
# trace format does allow lines without the prefix, but the conversion cannot use them:
# the thread id is what tells the vCPU's register accesses from the main loop's host
# input (typed bytes, key events), and the clock is what places the bytes the recorder
# typed. Guessing would write traces that look right and are wrong, so a trace event
# without the prefix stops the conversion (LogError, naming the line); the recorder
# always passes "-msg timestamp=on".
LINE_RE = re.compile(r"(\d+)@(\d+)\.(\d+):(\w+) ?(.*)")
# a trace event the converter reads, wherever it stands in a line (any other prefix)
BARE_EVENT_RE = re.compile(r"(?:^|\s)(memory_region_ops_(?:read|write)|x86_gsi_interrupt|"
                           r"serial_\w+|pckbd_kbd_\w+|ps2_\w+) ")
MR_RE = re.compile(r"cpu -?\d+ mr 0x[0-9a-f]+ addr 0x([0-9a-f]+) value 0x([0-9a-f]+) "
                   r"size (\d+) name '([^']*)'")
GSI_RE = re.compile(r"GSI interrupt #(\d+) level:(\d+)")
SERIAL_RW_RE = re.compile(r"(?:read|write) addr 0x([0-9a-f]+) val 0x([0-9a-f]+)")
PARAMS_RE = re.compile(r"baudrate=(\d+) parity='(.)' data=(\d+) stop=(\d+)")
PS2_RE = re.compile(r"(0x[0-9a-f]+|\(nil\))(?: (.*))?")


@dataclasses.dataclass
class Ev:
    """A parsed log line. ``main`` is True for the main-loop thread."""
    main: bool
    t: float
    kind: str            # 'acc', 'gsi', 'params', 'ps2_read', 'put', 'keyev', 'led', 'xlate'
    op: str = ""         # 'R'/'W' for accesses
    port: int = 0
    size: int = 0
    value: int = 0
    text: str = ""
    ln: int = 0          # line number in QEMU's log


@dataclasses.dataclass
class DevSpec:
    name: str
    kind: str
    base: int
    regions: dict[int, str]       # absolute port -> QEMU region name
    gsis: dict[int, str]          # GSI -> 'IRQ' / 'AUXIRQ'
    stem: str                     # output file name without suffix
    describe: str


UARTS = [
    DevSpec("uart0", "uart16550", 0x3F8, {0x3F8 + i: "serial" for i in range(8)}, {4: "IRQ"},
            "linux-8250-com1", "COM1, ttyS0, the Linux console"),
    DevSpec("uart1", "uart16550", 0x2F8, {0x2F8 + i: "serial" for i in range(8)}, {3: "IRQ"},
            "linux-8250-com2", "COM2, ttyS1"),
]
KBD = DevSpec("kbd", "i8042", 0x60, {0x60: "i8042-data", 0x64: "i8042-cmd"},
              {1: "IRQ", 12: "AUXIRQ"}, "linux-i8042",
              "i8042 keyboard controller, PS/2 keyboard, idle PS/2 mouse")


class Stats(dict):
    """Counters, and where in QEMU's log the first few problems of each kind were."""

    def __init__(self) -> None:
        super().__init__()
        self.where: dict[str, list[int]] = {}

    def add(self, key: str, n: int = 1, ev: Ev | None = None) -> None:
        self[key] = self.get(key, 0) + n
        if ev is not None and len(self.where.setdefault(key, [])) < 5:
            self.where[key].append(ev.ln)


class DevConverter:
    """Turns one device's share of the log into trace records.

    Attribution of interrupt-line changes to accesses: QEMU logs a write's
    ``memory_region_ops_write`` *before* the device callback runs and a read's
    ``memory_region_ops_read`` *after* it, so the GSI lines between a write and the next
    read belong partly to each; ``read_claims`` says how many belong to the read.
    Lines of the main-loop thread (bytes from the chardev, key events, timers) can only
    run between two accesses, so they delimit too.
    """

    def __init__(self, spec: DevSpec, stats: Stats) -> None:
        self.spec = spec
        self.stats = stats
        self.out: list[TraceRecord | str] = []
        self.pending: list[Ev] = []
        self.last: str | None = None          # 'R', 'W' or 'async'
        self.levels = {op: 0 for op in spec.gsis.values()}
        self.comments: dict[str, str] = {}

    # -- helpers
    def rec(self, op: str, **kw: int | None) -> None:
        self.out.append(TraceRecord(self.spec.name, op, **kw))
        self.stats.add(f"{self.spec.name} {op}")

    def comment(self, key: str, text: str) -> None:
        if self.comments.get(key) != text:
            self.comments[key] = text
            self.out.append(text)

    def level(self, ev: Ev) -> None:
        op = self.spec.gsis[ev.port]
        if self.levels[op] != ev.value:
            self.levels[op] = ev.value
            self.rec(op, value=ev.value)

    def effect(self, ev: Ev) -> None:
        """An effect line of an access or event, in log order."""
        if ev.kind == "gsi":
            self.level(ev)
        elif ev.kind == "params":
            self.comment("params", f"qemu: line parameters {ev.text}")
        elif ev.kind == "led":
            self.comment("led", f"qemu: keyboard LED state {ev.value:#x}")
        elif ev.kind == "xlate":
            self.comment("xlate", f"qemu: keyboard translation (set 2 -> set 1) {ev.value}")

    def flush(self, evs: list[Ev]) -> None:
        for ev in evs:
            self.effect(ev)

    # -- device specific hooks
    def read_claims(self, pending: list[Ev], ev: Ev, offset: int) -> int | None:
        """How many trailing GSI lines of ``pending`` the read ``ev`` produced.

        ``None`` means "cannot tell": the caller then splits at the last marker.
        """
        return 0

    def after_access(self, op: str, offset: int, value: int) -> None:
        pass

    def on_main(self, ev: Ev) -> None:
        """A main-loop event for this device (the previous access is complete)."""
        if ev.kind == "gsi":
            self.stats.add(f"{self.spec.name} unexplained async irq line", ev=ev)
            self.level(ev)
        else:
            self.effect(ev)

    # -- dispatch
    def feed(self, ev: Ev) -> None:
        if ev.main:
            self.flush(self.pending)
            self.pending = []
            self.last = "async"
            self.on_main(ev)
            return
        if ev.kind != "acc":
            self.pending.append(ev)
            return
        offset = ev.port - self.spec.base
        if ev.op == "R":
            gsis = [i for i, p in enumerate(self.pending) if p.kind == "gsi"]
            n = self.read_claims(self.pending, ev, offset)
            if self.last != "W":
                # nothing of the previous access can be here: check the rule
                if n is not None and n != len(gsis) and self.last is not None:
                    self.stats.add(f"{self.spec.name} read-rule mismatch", ev=ev)
                split = 0
            elif n is None:
                self.stats.add(f"{self.spec.name} ambiguous write->read split", ev=ev)
                split = self.marker_split(self.pending)
            elif n == 0:
                split = len(self.pending)
            elif n <= len(gsis):
                split = gsis[-n]
            else:
                self.stats.add(f"{self.spec.name} read-rule mismatch", ev=ev)
                split = 0
            self.flush(self.pending[:split])
            self.rec("R", offset=offset, size=ev.size, value=ev.value)
            self.flush(self.pending[split:])
        else:
            if self.last == "R" and any(p.kind == "gsi" for p in self.pending):
                self.stats.add(f"{self.spec.name} irq lines after a read", ev=ev)
            self.flush(self.pending)
            self.rec("W", offset=offset, size=ev.size, value=ev.value)
        self.pending = []
        self.last = ev.op
        self.after_access(ev.op, offset, ev.value)

    def marker_split(self, pending: list[Ev]) -> int:
        return len(pending)

    def finish(self) -> None:
        self.flush(self.pending)
        self.pending = []


class UartConverter(DevConverter):
    """16550 (QEMU hw/char/serial.c): placing host bytes and knowing reads' IRQ updates."""

    def __init__(self, spec: DevSpec, stats: Stats, sent: list[tuple[float, int]]) -> None:
        super().__init__(spec, stats)
        self.sent = sorted(sent)
        self.next_sent = 0
        self.lcr = 0
        self.mcr = 0
        self.fifo_on = False
        self.rx: list[int] = []     # shadow of QEMU's receive FIFO / RBR

    def read_claims(self, pending: list[Ev], ev: Ev, offset: int) -> int | None:
        # serial_ioport_read calls serial_update_irq (one GSI line) for: RBR; IIR
        # showing THRI (reading clears it); LSR with BI/OE (cleared by the read); MSR
        # with delta bits (outside loopback).
        dlab = self.lcr & 0x80
        v = ev.value
        if offset == 0 and not dlab:
            return 1
        if offset == 2 and (v & 0x06) == 0x02:
            return 1
        if offset == 5 and v & 0x12:
            return 1
        if offset == 6 and not self.mcr & 0x10 and v & 0x0F:
            return 1
        return 0

    def after_access(self, op: str, offset: int, value: int) -> None:
        dlab = self.lcr & 0x80
        if op == "W":
            if offset == 3:
                self.lcr = value
            elif offset == 4:
                self.mcr = value & 0x1F
            elif offset == 2:
                if (value & 1) != self.fifo_on or value & 0x02:
                    self.rx.clear()
                self.fifo_on = bool(value & 1)
            elif offset == 0 and not dlab and self.mcr & 0x10:
                self._push(value)           # loopback: THR goes to the receiver
        elif offset == 0 and not dlab:
            if self.rx:
                b = self.rx.pop(0)
                if b != value:
                    self.stats.add(f"{self.spec.name} RBR value mismatch")
            # an empty FIFO reads 0 (or the stale RBR); nothing to check

    def _push(self, b: int) -> None:
        if self.fifo_on:
            if len(self.rx) < 16:
                self.rx.append(b)
        else:
            self.rx[:] = [b]

    def on_main(self, ev: Ev) -> None:
        if ev.kind != "gsi":
            return self.effect(ev)
        # One main-loop GSI line per serial_receive1() call (a byte from the chardev:
        # the recorder typed one byte per send) or per fifo_timeout_int() that found
        # the FIFO non-empty (character timeout, IIR 0xCC).
        if self.next_sent < len(self.sent) and self.sent[self.next_sent][0] <= ev.t + 2e-6:
            b = self.sent[self.next_sent][1]
            self.next_sent += 1
            self._push(b)
            self.rec("IN", value=b)
        elif self.rx:
            self.rec("TIMEOUT")
        else:
            self.stats.add(f"{self.spec.name} unexplained async irq line", ev=ev)
        self.level(ev)

    def finish(self) -> None:
        super().finish()
        if self.next_sent != len(self.sent):
            self.stats.add(f"{self.spec.name} typed bytes not seen",
                           len(self.sent) - self.next_sent)


class KbdConverter(DevConverter):
    """i8042 + PS/2 keyboard (QEMU hw/input/pckbd.c, ps2.c)."""

    def __init__(self, spec: DevSpec, stats: Stats, keys: list[tuple[float, str]]) -> None:
        super().__init__(spec, stats)
        self.keys = sorted(keys)
        self.key_events = 0
        self.cmd = 0
        self.last_main_kind = ""

    def read_claims(self, pending: list[Ev], ev: Ev, offset: int) -> int | None:
        if offset == 4:
            return 0                       # status reads touch no line
        return None                        # data reads: split at the deassert before ps2_read_data

    def marker_split(self, pending: list[Ev]) -> int:
        # kbd_read_data: kbd_deassert_irq (a GSI 1 + GSI 12 pair), then ps2_read_data,
        # then maybe a re-assert pair. Without ps2_read_data (controller byte or empty
        # output buffer) it is at most the one deassert pair.
        marks = [i for i, p in enumerate(pending) if p.kind == "ps2_read"]
        gsis = [i for i, p in enumerate(pending) if p.kind == "gsi"]
        if marks:
            before = [i for i in gsis if i < marks[-1]]
            return before[-2] if len(before) >= 2 else 0
        return gsis[-2] if len(gsis) >= 2 else len(pending)

    def after_access(self, op: str, offset: int, value: int) -> None:
        if op != "W":
            return
        if offset == 4:
            self.cmd = value
            # 0xF0-0xFF pulse output-port bits 3-0 low; bit 0 low is the CPU reset
            if (value & 0xF0) == 0xF0 and not value & 1:
                self.rec("RESET")
        elif offset == 0:
            if self.cmd == 0xD1 and not value & 1:     # write output port, reset bit low
                self.rec("RESET")
            self.cmd = 0

    def on_main(self, ev: Ev) -> None:
        if ev.kind == "keyev":
            i = self.key_events // 2          # each send-key gives a down and an up event
            name = self.keys[i][1] if i < len(self.keys) else "?"
            self.key_events += 1
            self.out.append(f"host: key {name} {'down' if ev.value else 'up'} ({ev.text})")
        elif ev.kind == "put":
            self.rec("KEY", value=ev.value)
        elif ev.kind == "gsi":
            # the effects of the KEY just recorded: key events are the only main-loop
            # source of i8042 interrupt changes in this session
            if self.last_main_kind != "put":
                self.stats.add(f"{self.spec.name} unexplained async irq line", ev=ev)
            self.level(ev)
        else:
            self.effect(ev)
        if ev.kind != "gsi":
            self.last_main_kind = ev.kind


class LogError(Exception):
    """QEMU's log cannot be converted into traces; ``str()`` is one sentence saying why."""


def parse_log(path: Path, main_tid: int) -> Iterable[Ev]:
    """The events of QEMU's log, in order; LogError at a trace event line that lacks the
    ``<thread id>@<time>:`` prefix (see LINE_RE)."""
    with open(path, errors="replace") as f:
        for ln, line in enumerate(f, 1):
            m = LINE_RE.match(line)
            if not m:
                bare = BARE_EVENT_RE.search(line)
                if bare:
                    raise LogError(
                        f"line {ln} of {path} is a QEMU trace event ({bare[1]}) without "
                        "the '<thread id>@<seconds>.<us>:' prefix that QEMU 7.2 writes "
                        "under -msg timestamp=on, and without the thread id the "
                        "vCPU's register accesses cannot be told from host input")
                continue
            tid, sec, usec, name, rest = m.groups()
            main = int(tid) == main_tid
            t = int(sec) + int(usec) / 1e6
            for ev in _parse_event(main, t, name, rest):
                ev.ln = ln
                yield ev


def _parse_event(main: bool, t: float, name: str, rest: str) -> Iterable[Ev]:
    if name.startswith("memory_region_ops_"):
        mm = MR_RE.match(rest)
        if mm:
            yield Ev(main, t, "acc", "R" if name.endswith("read") else "W",
                     int(mm[1], 16), int(mm[3]), int(mm[2], 16), mm[4])
    elif name == "x86_gsi_interrupt":
        mm = GSI_RE.match(rest)
        if mm:
            yield Ev(main, t, "gsi", port=int(mm[1]), value=int(mm[2]))
    elif name in ("serial_read", "serial_write"):
        mm = SERIAL_RW_RE.match(rest)
        if mm:
            yield Ev(main, t, "serial_rw", "R" if name == "serial_read" else "W",
                     int(mm[1], 16), 1, int(mm[2], 16))
    elif name == "serial_update_parameters":
        mm = PARAMS_RE.match(rest)
        if mm:
            yield Ev(main, t, "params", text=f"{mm[1]} {mm[3]}{mm[2]}{mm[4]}")
    elif name.startswith("pckbd_kbd_"):
        yield Ev(main, t, "pckbd", "R" if "_read_" in name else "W",
                 0x60 if name.endswith("_data") else 0x64, 1, int(rest, 16))
    elif name.startswith("ps2_"):
        mm = PS2_RE.match(rest)
        ptr, args = (mm[1], mm[2] or "") if mm else ("", rest)
        if name == "ps2_put_keycode":
            yield Ev(main, t, "put", text=ptr, value=int(args.split()[-1], 16))
        elif name == "ps2_keyboard_event":
            f2 = args.split()
            yield Ev(main, t, "keyev", text=f"qcode {f2[1]}", value=int(f2[3]), port=0)
        elif name == "ps2_read_data":
            yield Ev(main, t, "ps2_read", text=ptr)
        elif name == "ps2_set_ledstate":
            yield Ev(main, t, "led", text=ptr, value=int(args.split()[-1]))
        elif name == "ps2_keyboard_set_translation":
            yield Ev(main, t, "xlate", text=ptr, value=int(args.split()[-1]))


def convert(rec: Recording) -> tuple[dict[str, DevConverter], Stats]:
    stats = Stats()
    convs: list[tuple[DevSpec, DevConverter]] = []
    for spec in UARTS if rec.com2 else UARTS[:1]:
        convs.append((spec, UartConverter(spec, stats, rec.sent.get(spec.name, []))))
    convs.append((KBD, KbdConverter(KBD, stats, rec.keys)))
    by_gsi = {g: c for s, c in convs for g in s.gsis}
    by_port = {p: (s, c) for s, c in convs for p in s.regions}
    uart_last: DevConverter | None = None   # device of the last serial access (for markers)
    kbd = convs[-1][1]
    read_trace_ev: Ev | None = None         # serial_read/pckbd_kbd_read_* waiting for its mr line
    write_acc: tuple[DevSpec, Ev] | None = None  # mr write waiting for its serial_/pckbd_ line
    if not rec.log.is_file():
        raise LogError(f"QEMU's log {rec.log} does not exist")
    evs = list(parse_log(rec.log, rec.qemu_pid))
    if not evs:
        raise LogError(f"{rec.log} holds none of the QEMU trace events the converter "
                       "reads (memory_region_ops_*, x86_gsi_interrupt, serial_*, "
                       "pckbd_kbd_*, ps2_*), so there is nothing to convert")
    fwcfg = [i for i, ev in enumerate(evs)
             if ev.kind == "acc" and not ev.main and ev.text.startswith("fwcfg")]
    last_fwcfg = fwcfg[-1] if fwcfg else -1
    started = False

    def same(spec: DevSpec, acc: Ev, dev_ev: Ev | None) -> bool:
        if dev_ev is None or dev_ev.op != acc.op or dev_ev.value != acc.value:
            return False
        port = dev_ev.port + spec.base if spec.kind == "uart16550" else dev_ev.port
        return port == acc.port

    for i, ev in enumerate(evs):
        if not ev.main:
            started = True
        elif not started:
            continue                        # the machine reset, before the vCPU runs
        if i - 1 == last_fwcfg:
            for _, c in convs:
                c.out.append("---- firmware done: the Linux kernel starts after here "
                             "(last fw_cfg access) ----")
        if ev.kind == "acc":
            hit = by_port.get(ev.port)
            if hit is None or hit[0].regions[ev.port] != ev.text:
                continue
            spec, conv = hit
            if write_acc is not None:
                stats.add("device trace line missing after a write", ev=ev)
            write_acc = None
            if ev.op == "R":
                if not same(spec, ev, read_trace_ev):
                    stats.add("device trace line mismatch (read)", ev=ev)
            else:
                write_acc = (spec, ev)
            read_trace_ev = None
            if spec.kind == "uart16550":
                uart_last = conv
            conv.feed(ev)
            continue
        if ev.kind in ("serial_rw", "pckbd"):
            if ev.op == "R":
                read_trace_ev = ev
            else:
                if write_acc is None or not same(write_acc[0], write_acc[1], ev):
                    stats.add("device trace line mismatch (write)", ev=ev)
                write_acc = None
        elif ev.kind == "gsi":
            conv = by_gsi.get(ev.port)
            if conv is not None:
                conv.feed(ev)
        elif ev.kind == "params":
            if uart_last is not None:
                uart_last.feed(ev)
        elif ev.kind in ("put", "keyev", "ps2_read", "led", "xlate"):
            kbd.feed(ev)
    for _, c in convs:
        c.finish()
    return {s.name: c for s, c in convs}, stats


# --------------------------------------------------------------------------------------
# output

SESSION = """boot to a busybox /init (scripts/initramfs/init) with console=ttyS0,115200n8;
stty 9600 8E1, text out; host types "hello\\r" (one byte per send, after each echo);
stty 2400 7O2 and 115200 8N1 with text out; host types "world\\r";
COM2 at 19200 8N1: text out, host types "two\\r" (COM2 recordings only);
send-key h, i, ret (read by the guest from /dev/tty1); send-key caps_lock twice (LEDs on, off);
host types "go\\r"; reboot -f with reboot=k: i8042 0xFE pulse reset, QEMU -no-reboot exits"""


def check_not_empty(specs: list[DevSpec], convs: dict[str, DevConverter], log: Path) -> None:
    """LogError if a device got no record: its trace would be empty, which says nothing
    about the device and would pass for a recording where nobody touched it."""
    for spec in specs:
        if not any(isinstance(r, TraceRecord) for r in convs[spec.name].out):
            ports = ",".join(f"{p:#x}" for p in sorted(spec.regions))
            raise LogError(f"{log} has no access to {spec.name} (ports {ports}), so its "
                           "trace would be empty")


def header(spec: DevSpec, conv: DevConverter, rec: Recording) -> dict[str, str]:
    counts: dict[str, int] = {}
    for r in conv.out:
        if isinstance(r, TraceRecord):
            counts[r.op] = counts.get(r.op, 0) + 1
    irqs = " ".join(f"{op.lower()}={gsi}" for gsi, op in spec.gsis.items())
    ports = ",".join(f"{p:#x}" for p in sorted(spec.regions))
    return {
        "device": f"{spec.name} {spec.kind} base={spec.base:#x} {irqs} ({spec.describe})",
        "ports": f"{ports} (offsets are relative to base)",
        "source": (f"{rec.qemu_version}, TCG, -machine pc -nodefaults -vga none -no-reboot, "
                   "-chardev pipe for the UARTs"),
        "guest": f"Linux {rec.kernel.removeprefix('vmlinuz-')} (Debian linux-image-amd64), "
                 "busybox-static initramfs",
        "cmdline": KERNEL_CMDLINE,
        "session": SESSION,
        "recorded": f"{datetime.date.today().isoformat()} by scripts/record_traces.py "
                    f"({rec.seconds:.1f} s)",
        "records": " ".join(f"{op}={n}" for op, n in sorted(counts.items())),
        "format": "docs/traces.md; IRQ/AUXIRQ lines appear only when the level changes, "
                  "after the access or input that changed it",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="directory for the traces (default: tests/traces)")
    ap.add_argument("--workdir", type=Path,
                    help="keep the initramfs, QEMU's raw log and console logs here "
                         "(default: a temporary directory, removed afterwards)")
    ap.add_argument("--kernel", type=Path, help="default: newest /boot/vmlinuz-*-amd64")
    ap.add_argument("--busybox", type=Path, default=Path("/bin/busybox"),
                    help="a static busybox (default: /bin/busybox from busybox-static)")
    ap.add_argument("--no-com2", action="store_true", help="give the machine COM1 only")
    ap.add_argument("--plain", action="store_true", help="write uncompressed .trace files")
    ap.add_argument("--convert-only", action="store_true",
                    help="convert the raw log of a previous run in --workdir again")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    # only recording runs QEMU: --convert-only works where it is not installed
    if not args.convert_only and shutil.which(QEMU) is None:
        raise SystemExit(f"{QEMU} not found: apt-get install qemu-system-x86")
    tmp = None
    if args.workdir is None:
        if args.convert_only:
            raise SystemExit("--convert-only needs --workdir")
        tmp = tempfile.TemporaryDirectory(prefix="remote-hw-record-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        meta = workdir / "recording.json"
        if args.convert_only:
            if not meta.is_file():
                raise SystemExit(f"--convert-only needs {meta}, which a recording with "
                                 "--workdir leaves, and it is missing")
            d = json.loads(meta.read_text())
            d["log"] = Path(d["log"])
            rec = Recording(**d)
        else:
            kernel = args.kernel or newest_kernel()
            print(f"recording: {kernel}, {args.busybox}, workdir {workdir}", file=sys.stderr)
            rec = record(workdir, kernel, args.busybox, not args.no_com2, 120, args.verbose)
            meta.write_text(json.dumps({**dataclasses.asdict(rec), "log": str(rec.log)}))
            print(f"QEMU ran {rec.seconds:.1f} s, log {rec.log.stat().st_size / 1e6:.1f} MB",
                  file=sys.stderr)
        specs = (UARTS if rec.com2 else UARTS[:1]) + [KBD]
        try:
            convs, stats = convert(rec)
            check_not_empty(specs, convs, rec.log)
        except LogError as e:
            raise SystemExit(f"record_traces.py: {e}; no traces written") from None
        args.out.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            conv = convs[spec.name]
            suffix = ".trace" if args.plain else ".trace.gz"
            path = args.out / (spec.stem + suffix)
            for old in (args.out / (spec.stem + ".trace"), args.out / (spec.stem + ".trace.gz")):
                if old != path and old.exists():
                    old.unlink()
            write_trace(path, conv.out, header(spec, conv, rec))
            n = sum(isinstance(r, TraceRecord) for r in conv.out)
            print(f"{path}: {n} records, {path.stat().st_size} bytes", file=sys.stderr)
        for k, v in sorted(stats.items()):
            where = stats.where.get(k)
            at = f" (QEMU log lines {', '.join(map(str, where))})" if where else ""
            print(f"  {k}: {v}{at}", file=sys.stderr)
        bad = [k for k in stats if any(w in k for w in
               ("mismatch", "missing", "unexplained", "not seen", "after a read"))]
        if bad:
            print("WARNING: the conversion found inconsistencies: " + ", ".join(bad),
                  file=sys.stderr)
            return 1
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
