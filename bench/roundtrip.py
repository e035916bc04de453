"""Forwarded port read vs. the floor it is built from, measured in one run.

    python3 bench/roundtrip.py [--count N] [--rounds R] [--mode pinned|unpinned|both]
                               [--no-python-path]

Five figures per mode, each the distribution of per-access latency as the guest
experiences it (the time between two consecutive handler calls of a guest looping on
``in al, dx``: exit, dispatch, answer, re-entry and one loop iteration):

* local:     a KVM port exit answered by a trivial local handler (no network);
* ping-pong: a blocking Python TCP request/response between this process and a child
             process, with the byte sizes of an IO_REQUEST and a FEEDBACK frame;
* forwarded: the guest's IN answered by a real ``remote-hw server`` child process over
             loopback TCP (UART scratch register);
* forwarded-py: the same with the C fast path off at both ends (REMOTE_HW_FASTIO=0,
             remote_hw/net/fastio.py): the pure-Python path, as TLS links and machines
             without a compiler run it;
* bare:      for reference, the guest's IN answered by the ping-pong child straight
             from the exit handler (no protocol, no device, no server logic): what
             composing the two floors costs by itself.

It prints median and p99 of each and the ratio forwarded / (local + ping-pong) of the
medians; and, since the machine's speed drifts between rounds, the same ratio paired
within each round (median over the rounds). "pinned" runs this process and its
children on CPU 0 (on a 2-core machine a wake-up across cores costs ~30 µs, which
would dominate); "unpinned" lets the kernel place them.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remote_hw.client.agent import RemoteDevice  # noqa: E402
from remote_hw.client.vmm import Vm  # noqa: E402
from remote_hw.config import parse_map  # noqa: E402
from remote_hw.guest_images import guest_image  # noqa: E402
from remote_hw.net import fastio  # noqa: E402
from remote_hw.net.link import ServerLink  # noqa: E402
from remote_hw.protocol import codec  # noqa: E402

PORT = 0x3FF  # COM1 scratch register: a read with no side effects


class Timed:
    """Wraps a handler and stamps every call; intervals = per-access round trips."""

    def __init__(self, inner, count: int) -> None:
        self.inner = inner
        self.stamps = [0] * (count + 8)
        self.n = 0

    def read(self, offset: int, size: int) -> int:
        self.stamps[self.n] = time.perf_counter_ns()
        self.n += 1
        return self.inner.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.inner.write(offset, size, value)

    def intervals_us(self) -> list[float]:
        s = self.stamps[: self.n]
        # Drop the first 5%: warm-up (page faults, first leadership hand-over).
        d = [(b - a) / 1000 for a, b in zip(s, s[1:])]
        return d[len(d) // 20:]


class Trivial:
    def read(self, offset: int, size: int) -> int:
        return 0x42

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def _ioloop(count: int) -> bytes:
    img = bytearray(guest_image("ioloop.bin").read_bytes())
    struct.pack_into("<IIII", img, 4, count, PORT, 0, 0)
    return bytes(img)


def run_guest(handler, count: int, base: int = PORT) -> list[float]:
    """Run the ioloop guest with ``handler`` mapped at ports base..PORT; intervals."""
    timed = Timed(handler, count)
    with Vm(mem_size=1 << 20) as vm:
        vm.bus.map_ports(base, PORT, timed)
        vm.load_image(_ioloop(count))
        status = vm.run(timeout=600)
    if timed.n != count:
        raise SystemExit(f"guest made {timed.n} reads, expected {count} (status {status:#x})")
    return timed.intervals_us()


def _frame_sizes() -> tuple[int, int]:
    req = codec.encode_io_request(1, 1, 0, 7, 0, 0, 1, 0, 0, "", "uart0")
    fb = codec.encode_feedback(1, 1, 1, 0, 1, 0x42)
    return len(req), len(fb)


PINGPONG_SERVER = r"""
import socket, sys
req, fb = int(sys.argv[1]), int(sys.argv[2])
ls = socket.create_server(("127.0.0.1", 0))
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(req); view = memoryview(buf); out = b"F" * fb
while True:
    got = 0
    while got < req:
        n = c.recv_into(view[got:])
        if not n:
            sys.exit(0)
        got += n
    c.sendall(out)
"""


def _pingpong_child(preexec) -> tuple[subprocess.Popen, socket.socket]:
    req, fb = _frame_sizes()
    child = subprocess.Popen([sys.executable, "-c", PINGPONG_SERVER, str(req), str(fb)],
                             stdout=subprocess.PIPE, text=True, preexec_fn=preexec)
    port = int(child.stdout.readline())
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return child, s


class Bare:
    """An exit handler that does one raw ping-pong per read."""

    def __init__(self, sock: socket.socket) -> None:
        req, self.fb = _frame_sizes()
        self.sock, self.msg = sock, b"R" * req
        self.view = memoryview(bytearray(self.fb))

    def read(self, offset: int, size: int) -> int:
        self.sock.sendall(self.msg)
        got = 0
        while got < self.fb:
            got += self.sock.recv_into(self.view[got:])
        return 0x42

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def bare(count: int, preexec) -> list[float]:
    child, s = _pingpong_child(preexec)
    try:
        return run_guest(Bare(s), count)
    finally:
        s.close()
        child.wait(10)


def pingpong(count: int, preexec) -> list[float]:
    req, fb = _frame_sizes()
    child, s = _pingpong_child(preexec)
    try:
        msg = b"R" * req
        buf = bytearray(fb)
        view = memoryview(buf)
        out = []
        clock = time.perf_counter_ns
        for _ in range(count):
            t0 = clock()
            s.sendall(msg)
            got = 0
            while got < fb:
                got += s.recv_into(view[got:])
            out.append((clock() - t0) / 1000)
        s.close()
        return out[len(out) // 20:]
    finally:
        child.wait(10)


def forwarded(count: int, preexec, c_path: bool = True) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if not c_path:
        env["REMOTE_HW_FASTIO"] = "0"
    server = subprocess.Popen(
        [sys.executable, "-m", "remote_hw.cli", "server", "--listen", "127.0.0.1:0",
         "--no-mount",
         "--device", "uart0=uart16550", "--log-level", "info"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=preexec, env=env)
    saved = fastio.status()
    if not c_path:  # this process's link: the same switch, without a restart
        fastio._state = (False, "off for the forwarded-py figure")
    try:
        port = None
        for line in server.stderr:
            if "listening on" in line:
                port = int(line.rsplit(":", 1)[1])
                break
        if port is None:
            raise SystemExit("the server did not start")
        link = ServerLink("a", ("127.0.0.1", port), client_name="bench").connect()
        try:
            if link.attach(1, "uart0"):
                raise SystemExit("attach failed")
            dev = RemoteDevice(link, 1, parse_map("port:0x3f8-0x3ff=a/uart0"))
            if link._fast != c_path:
                raise SystemExit(f"the link's C path is {link._fast}, wanted {c_path}")
            return run_guest(dev, count, base=0x3F8)
        finally:
            link.close()
    finally:
        fastio._state = saved
        server.terminate()
        server.wait(10)


def stats(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(len(xs) * 0.99))]


def measure(mode: str, count: int, rounds: int,
            python_path: bool = True) -> tuple[dict[str, tuple[float, float]],
                                               dict[str, list[float]]]:
    """Each figure measured in ``rounds`` interleaved rounds (this machine's speed
    drifts from second to second): (median of the round medians and p99 of all
    samples, per figure; and each figure's round medians, for paired ratios)."""
    pinned = mode == "pinned"
    saved = os.sched_getaffinity(0)
    preexec = (lambda: os.sched_setaffinity(0, {0})) if pinned else None
    if pinned:
        os.sched_setaffinity(0, {0})
    figures = {"local": lambda: run_guest(Trivial(), count),
               "ping-pong": lambda: pingpong(count, preexec),
               "forwarded": lambda: forwarded(count, preexec),
               "bare": lambda: bare(count, preexec)}
    if python_path:
        figures["forwarded-py"] = lambda: forwarded(count, preexec, c_path=False)
    medians: dict[str, list[float]] = {k: [] for k in figures}
    samples: dict[str, list[float]] = {k: [] for k in figures}
    try:
        for _ in range(rounds):
            for name, fn in figures.items():
                xs = fn()
                medians[name].append(statistics.median(xs))
                samples[name] += xs
    finally:
        os.sched_setaffinity(0, saved)
    return ({k: (statistics.median(medians[k]), stats(samples[k])[1]) for k in figures},
            medians)


def paired(rounds: dict[str, list[float]], name: str) -> float:
    """Median over rounds of figure / (local + ping-pong) of the same round: a drift of
    the machine between rounds then moves numerator and floor together."""
    return statistics.median(f / (lo + pp) for f, lo, pp in
                             zip(rounds[name], rounds["local"], rounds["ping-pong"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10000, help="accesses per figure and round")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--mode", choices=("pinned", "unpinned", "both"), default="both")
    ap.add_argument("--no-python-path", action="store_true",
                    help="skip the forwarded-py figure (C fast path off)")
    args = ap.parse_args()
    modes = ["pinned", "unpinned"] if args.mode == "both" else [args.mode]
    on, why = fastio.status()
    print("C fast path (remote_hw/net/fastio.py): " + ("on" if on else f"OFF: {why}"))
    for mode in modes:
        r, per_round = measure(mode, args.count, args.rounds,
                               python_path=on and not args.no_python_path)
        print(f"[{mode}] per-access latency, {args.rounds} rounds of {args.count} accesses "
              "(µs; median of round medians, p99 of all)")
        for name, (med, p99) in r.items():
            print(f"  {name:<12} median {med:7.1f}   p99 {p99:7.1f}")
        floor = r["local"][0] + r["ping-pong"][0]
        ratio = r["forwarded"][0] / floor
        print(f"  ratio forwarded / (local + ping-pong) = {r['forwarded'][0]:.1f} / {floor:.1f}"
              f" = {ratio:.2f}" + ("   (target <= 1.3 pinned)" if mode == "pinned" else ""))
        print(f"  paired per round (median of {args.rounds}): forwarded "
              f"{paired(per_round, 'forwarded'):.2f}, bare {paired(per_round, 'bare'):.2f}"
              + (f", forwarded-py {paired(per_round, 'forwarded-py'):.2f}"
                 if "forwarded-py" in r else ""))
        if "forwarded-py" in r:
            print(f"  ratio forwarded-py / (local + ping-pong) = {r['forwarded-py'][0]:.1f} / "
                  f"{floor:.1f} = {r['forwarded-py'][0] / floor:.2f}   (pure-Python path)")
        print(f"  ratio bare / (local + ping-pong)      = {r['bare'][0]:.1f} / {floor:.1f}"
              f" = {r['bare'][0] / floor:.2f}   (composition alone, no remote-hw code)")


if __name__ == "__main__":
    main()
