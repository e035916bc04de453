"""Cost of one BAR access through the vfio-user bridge vs. the native client's access.

    python3 bench/bridge.py [--count N] [--mode pinned|unpinned|both]

Two figures per mode, each the distribution of one register read (the UART's scratch
register, no side effects) answered by a real ``remote-hw server`` child on loopback:

* native: ``ServerLink.io`` in this process, as a vCPU of remote-hw's own monitor
          calls it (the hot path of bench/roundtrip.py's "forwarded", minus the exit);
* bridge: a vfio-user REGION_READ of BAR0 sent over a UNIX socket, as QEMU's
          vfio-user-pci sends it, to a ``remote-hw bridge`` child, which forwards it over
          its own link to the same server.

It prints median and p99 of each and the ratio of the medians (the issue's goal: bridge
at most 1.5 x native). What it does not include: QEMU's own part of a guest access
(the vCPU handing the access to its vfio-user thread and back), which BRIDGE.md saw
at ~65 µs between consecutive accesses under TCG. "pinned" runs everything on CPU 0
(a wake-up across the 2 cores here costs ~30 µs per hop); "unpinned" lets the kernel
place them.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remote_hw.bridge import vfio_user as vu  # noqa: E402
from remote_hw.net.link import ServerLink  # noqa: E402
from remote_hw.protocol.messages import AccessKind, Direction, Status  # noqa: E402

SCRATCH = 7


def _child(argv: list[str], pinned: bool, pattern: str) -> tuple[subprocess.Popen, str]:
    """Start a remote-hw child and wait for the line matching ``pattern``."""
    cmd = (["taskset", "-c", "0"] if pinned else []) + [sys.executable, "-m",
                                                         "remote_hw.cli", *argv]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert p.stdout is not None
    for line in p.stdout:
        m = re.search(pattern, line)
        if m:
            return p, m.group(1) if m.groups() else line
    raise SystemExit(f"{argv[0]} did not start: {p.wait()}")


def _stats(ns: list[int]) -> tuple[float, float]:
    us = sorted(n / 1000 for n in ns)
    return statistics.median(us), us[int(len(us) * 0.99) - 1]


def native(port: int, count: int) -> list[int]:
    link = ServerLink("a", ("127.0.0.1", port), client_name="bench", timeout=5).connect()
    try:
        assert link.attach(1, "uart0") == Status.OK
        kind, rd = int(AccessKind.PORT), int(Direction.READ)
        link.io(1, "uart0", kind, SCRATCH, 1, int(Direction.WRITE), 0x5A)
        out = []
        clock = time.perf_counter_ns
        for _ in range(count):
            t0 = clock()
            status, value = link.io(1, "uart0", kind, SCRATCH, 1, rd)
            out.append(clock() - t0)
        assert (status, value) == (0, 0x5A)
        return out
    finally:
        link.close()


def bridge(sock_path: str, count: int) -> list[int]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    ids = iter(range(1, 1 << 16))

    def call(command: int, payload: bytes) -> bytes:
        s.sendall(vu.encode_command(next(ids), command, payload))
        head = s.recv(vu.HEADER_SIZE, socket.MSG_WAITALL)
        size = vu.HEADER.unpack(head)[2]
        return s.recv(size - vu.HEADER_SIZE, socket.MSG_WAITALL) if size > 16 else b""

    try:
        call(vu.Command.VERSION, struct.pack("<HH", 0, 1) + b"{}\0")
        call(vu.Command.REGION_WRITE, vu.REGION_ACCESS.pack(SCRATCH, 0, 1) + b"\x5a")
        read = vu.REGION_ACCESS.pack(SCRATCH, 0, 1)
        out = []
        clock = time.perf_counter_ns
        for _ in range(count):
            t0 = clock()
            body = call(vu.Command.REGION_READ, read)
            out.append(clock() - t0)
        assert body[16] == 0x5A, body
        return out
    finally:
        s.close()


def run(mode: str, count: int) -> None:
    pinned = mode == "pinned"
    if pinned:
        os.sched_setaffinity(0, {0})
    else:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    server, port = _child(["server", "--listen", "127.0.0.1:0", "--no-mount",
                           "--device", "uart0=uart16550"], pinned, r"listening on [\d.]+:(\d+)")
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "bench.sock")
        br, _ = _child(["bridge", "--socket", sock, "--device", "a/uart0", "--server",
                        f"a=127.0.0.1:{port}", "--vm-id", "2", "--log-level", "warning"],
                       pinned, r"serving a/uart0")
        try:
            n_med, n_p99 = _stats(native(int(port), count))
            b_med, b_p99 = _stats(bridge(sock, count))
        finally:
            br.terminate()
            br.wait(10)
            server.terminate()
            server.wait(10)
    print(f"{mode:>9}: native median {n_med:6.1f} µs p99 {n_p99:6.1f} | bridge median "
          f"{b_med:6.1f} µs p99 {b_p99:6.1f} | bridge/native {b_med / n_med:4.2f} "
          f"(goal <= 1.5)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--mode", choices=["pinned", "unpinned", "both"], default="both")
    args = ap.parse_args()
    for mode in (["pinned", "unpinned"] if args.mode == "both" else [args.mode]):
        run(mode, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
