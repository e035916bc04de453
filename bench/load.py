"""Load on one link, with and without hostile clients: what an attacker costs others.

    python3 bench/load.py [--vms 1,8,32,64] [--seconds 1.5] [--rounds 3] [--idle 1000]
                          [--only all|idle|reader]

For each VM count N, N threads share one client link (a ``ServerLink``, as the VMs
of one agent do) to a real ``remote-hw server`` child, each thread a VM reading its
own UART's scratch register in a loop for ``--seconds``; it reports accesses/s and
the p99 latency of one access. Each N runs in two conditions, alternately:

* **quiet**: nothing else talks to the server;
* **hostile**: a separate process holds (tries to hold) ``--idle`` connections that
  never say HELLO, from 16 loopback addresses (127.0.0.2 ...), re-opening once a
  second each one the server refused or closed; and a client attached to a *shared*
  UART for 100 VM ids, whose receive buffer is 4 KB and which never reads, while the
  same process toggles that UART's interrupt 50 times a second (100 INTERRUPT frames
  per edge for the client that does not read).

It prints, per N, both figures (medians) and the ratios quiet/hostile of the
throughput and hostile/quiet of the p99 (goal: both <= 1.2), and how many idle
connections the hostile process had open at most (the server refuses those beyond
its limits: 64 per address, 512 in all by default). Loopback only; the server runs
with its default limits. Each pair is run ``--rounds`` times and the ratios are the
medians of the paired ones, since the machine's speed drifts. Bounded: every phase
has a deadline, the hostile process is killed after each figure, and the whole run
stops by itself (about ``len(vms) * rounds * (2 * seconds + 4)`` s: 90 s by default).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remote_hw.net.link import ServerLink  # noqa: E402
from remote_hw.protocol import NEED_DATA, Connection, Role  # noqa: E402
from remote_hw.protocol import messages as m  # noqa: E402

SCRATCH = 7


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ------------------------------------------------------------------ the hostile side

def _raw_client(port: int, rcvbuf: int | None = None) -> tuple[socket.socket, Connection]:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    conn = Connection(Role.CLIENT)
    s.sendall(conn.send(m.Hello(name="hostile")))
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            conn.receive_data(s.recv(65536))
            continue
        if not isinstance(ev, m.Welcome):
            raise SystemExit(f"hostile: no WELCOME: {ev}")
        return s, conn


def hostile(port: int, idle: int, seconds: float, parts: str = "all") -> None:
    """The hostile process (``--hostile``): idle connections and a client that does
    not read, until killed or ``seconds`` have passed."""
    _raise_fd_limit()
    deadline = time.monotonic() + seconds
    held: list[socket.socket | None] = [None] * idle
    sources = [f"127.0.0.{2 + i % 16}" for i in range(idle)]

    def hold() -> None:
        while time.monotonic() < deadline:
            for i, s in enumerate(held):
                if s is not None:
                    try:   # closed by the server (refused, or the handshake deadline)?
                        if s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                            raise OSError
                        s.close()      # an ERROR: refused or timed out
                        held[i] = None
                    except BlockingIOError:
                        continue
                    except OSError:
                        s.close()
                        held[i] = None
                try:
                    n = socket.socket()
                    n.bind((sources[i], 0))
                    n.settimeout(1)
                    n.connect(("127.0.0.1", port))
                    held[i] = n
                except OSError:
                    pass
            time.sleep(1.0)   # holding, not hammering: re-open what was closed each second

    def stopped_reader() -> None:
        while time.monotonic() < deadline:
            s, conn = _raw_client(port, rcvbuf=4096)
            out = b"".join(conn.send(m.Attach(request_id=vm, vm_id=vm, client_id=0,
                                              server_id="", device_id="s"))
                           for vm in range(1, 101))
            s.sendall(out)
            # ... and never reads again; the server closes it when its queue is full.
            while time.monotonic() < deadline:
                try:
                    if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                        break
                except BlockingIOError:
                    pass
                except OSError:
                    break
                time.sleep(0.5)
            s.close()

    def stirrer() -> None:
        s, conn = _raw_client(port)
        rid = 0

        def io(offset: int, value: int) -> None:
            nonlocal rid
            rid += 1
            s.sendall(conn.send(m.IoRequest(
                request_id=rid, vm_id=1, client_id=0, offset=offset, data=value,
                kind=m.AccessKind.PORT, size=1, direction=m.Direction.WRITE, hops=0,
                server_id="", device_id="s")))
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    conn.receive_data(s.recv(65536))
                elif isinstance(ev, m.Feedback) and ev.request_id == rid:
                    return
        s.sendall(conn.send(m.Attach(request_id=0x7FFFFFFF, vm_id=1, client_id=0,
                                     server_id="", device_id="s")))
        io(4, 0x08)   # MCR.OUT2: the line reaches the clients
        while time.monotonic() < deadline:
            io(1, 0x02)
            io(1, 0x00)
            time.sleep(0.02)

    for fn in ((hold,) if parts in ("all", "idle") else ()) + \
            ((stopped_reader, stirrer) if parts in ("all", "reader") else ()):
        threading.Thread(target=fn, daemon=True).start()
    while time.monotonic() < deadline:
        time.sleep(1)
        print(sum(1 for s in held if s is not None), flush=True)


# ------------------------------------------------------------------ the load

def run_load(port: int, vms: int, seconds: float) -> tuple[float, float]:
    """(accesses/s, p99 latency in µs) of ``vms`` threads on one link."""
    link = ServerLink("a", ("127.0.0.1", port), client_name=f"load{vms}").connect()
    try:
        for vm in range(1, vms + 1):
            if link.attach(vm, "u") != 0:
                raise SystemExit(f"attach of vm {vm} failed")
        lat: list[list[float]] = [[] for _ in range(vms)]
        start = threading.Barrier(vms + 1)
        stop_at = [0.0]

        def vcpu(i: int) -> None:
            out = lat[i]
            io, clock = link.io, time.perf_counter
            start.wait()
            end = stop_at[0]
            while True:
                t0 = clock()
                if t0 >= end:
                    return
                status, _ = io(i + 1, "u", 0, SCRATCH, 1, 0, 0)
                out.append(clock() - t0)
                if status != 0:
                    raise SystemExit(f"vm {i + 1}: status {status}")

        threads = [threading.Thread(target=vcpu, args=(i,), daemon=True) for i in range(vms)]
        for t in threads:
            t.start()
        stop_at[0] = time.perf_counter() + seconds
        start.wait()
        for t in threads:
            t.join(seconds + 10)
        all_lat = sorted(x for per in lat for x in per)
        if not all_lat:
            raise SystemExit("no access completed")
        p99 = all_lat[min(len(all_lat) - 1, int(len(all_lat) * 0.99))] * 1e6
        return len(all_lat) / seconds, p99
    finally:
        link.close()


def _attacked(port: int, n: int, args: argparse.Namespace, env: dict[str, str]
              ) -> tuple[tuple[float, float], int]:
    """The load of ``n`` VMs while the hostile process runs; and how many idle
    connections it had open at most."""
    hp = subprocess.Popen(
        [sys.executable, __file__, "--hostile", str(port), "--idle", str(args.idle),
         "--hostile-seconds", str(args.seconds + 20), "--only", args.only],
        stdout=subprocess.PIPE, text=True, env=env)
    held = [0]

    def count() -> None:
        for line in hp.stdout or []:
            held[0] = max(held[0], int(line))
    threading.Thread(target=count, daemon=True).start()
    time.sleep(2.5)       # let it open its connections and stop reading
    try:
        return run_load(port, n, args.seconds), held[0]
    finally:
        hp.send_signal(signal.SIGKILL)
        hp.wait()
        time.sleep(1.0)   # the server drops what the hostile process left


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", default="1,8,32,64", help="VM counts (default 1,8,32,64)")
    ap.add_argument("--seconds", type=float, default=1.5,
                    help="load per figure (default 1.5)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="quiet/hostile pairs per VM count; the ratios printed are the "
                         "medians of the paired ones (default 3)")
    ap.add_argument("--idle", type=int, default=1000,
                    help="idle connections the hostile process tries to hold (default 1000)")
    ap.add_argument("--only", choices=("all", "idle", "reader"), default="all",
                    help="which hostile client to run: both (default), only the idle "
                         "connections, or only the client that does not read")
    ap.add_argument("--hostile", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--hostile-seconds", type=float, default=60, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hostile:
        hostile(args.hostile, args.idle, args.hostile_seconds, args.only)
        return
    _raise_fd_limit()
    counts = [int(x) for x in args.vms.split(",")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = subprocess.Popen(
        [sys.executable, "-m", "remote_hw.cli", "server", "--listen", "127.0.0.1:0",
         "--no-mount", "--log-level", "warning", "--device", "u=uart16550",
         "--device", "s=uart16550,shared"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    port = None
    log_lines: list[str] = []
    try:
        # --log-level warning hides "listening on"; find the port from /proc instead.
        deadline = time.monotonic() + 20
        while port is None:
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
            for line in out.splitlines():
                if f"pid={server.pid}," in line:
                    port = int(re.search(r":(\d+)\s", line).group(1))  # type: ignore[union-attr]
            time.sleep(0.1)
        threading.Thread(target=lambda: log_lines.extend(server.stderr or []),
                         daemon=True).start()
        print(f"load on one link: {args.seconds:g} s per figure; hostile: {args.idle} idle "
              f"connections + a client that does not read (see bench/load.py)")
        print(f"{'VMs':>4} {'quiet acc/s':>12} {'p99 µs':>8} {'hostile acc/s':>14} "
              f"{'p99 µs':>8} {'held':>5}  ratios (thru, p99)")
        for n in counts:
            rounds = []
            for _ in range(args.rounds):
                quiet = run_load(port, n, args.seconds)
                attacked, held = _attacked(port, n, args, env)
                rounds.append((quiet, attacked, held))
            # The machine's speed drifts between runs: ratios are paired within a
            # round, and the median over the rounds is printed (as bench/roundtrip.py).
            thru = statistics.median(q[0] / a[0] for q, a, _ in rounds)
            p99 = statistics.median(a[1] / q[1] for q, a, _ in rounds)
            med = [statistics.median(fig[j] for fig in figs) for figs in
                   ([q for q, _, _ in rounds], [a for _, a, _ in rounds]) for j in (0, 1)]
            print(f"{n:>4} {med[0]:>12.0f} {med[1]:>8.0f} {med[2]:>14.0f} {med[3]:>8.0f} "
                  f"{max(r[2] for r in rounds):>5}  {thru:.2f}, {p99:.2f}   (goal <= 1.2)",
                  flush=True)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    refused = sum("refused" in ln for ln in log_lines)
    print(f"server log: {len(log_lines)} lines ({refused} about refused connections)")


if __name__ == "__main__":
    main()
