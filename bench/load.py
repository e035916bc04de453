"""Load on one link, with and without hostile clients: what an attacker costs others.

    python3 bench/load.py [--vms 1,8,32,64] [--seconds 1.5] [--rounds 5] [--idle 1000]
                          [--only all|idle|reader]

For each VM count N, N threads share one client link (a ``ServerLink``, as the VMs
of one agent do) to a real ``remote-hw server`` child, each thread a VM reading its
own UART's scratch register in a loop for ``--seconds``; it reports accesses/s and
the p99 latency of one access. Each N runs in two conditions, alternately:

* **quiet**: nothing else talks to the server;
* **hostile**: the load's link is connected first (as an agent's is before an
  attack: once the server is full, a new client waits for a slot the handshake
  deadline frees); then a separate process holds (tries to hold) ``--idle``
  connections that never say HELLO, from 16 loopback addresses (127.0.0.2 ...),
  re-opening once a second each one the server refused or closed; and a client
  attached to a *shared* UART for 100 VM ids, whose receive buffer is 4 KB and which
  never reads (attached again whenever the server disconnects it), while the same
  process toggles that UART's interrupt 50 times a second (for the client that does
  not read, 100 INTERRUPT frames per edge, and as many SHADOW frames). The load
  starts once the idle connections fill the server (or after 12.5 s).

It prints, per N, both figures (medians) and the ratios quiet/hostile of the
throughput and hostile/quiet of the p99 (goal: both <= 1.2), and how many
connections the server had open around the hostile figure (``ss``, just before and
just after it: those admitted, at most 512 by default, and those waiting in its
listen queue). Loopback
only; the server runs with its default limits. Each pair is run ``--rounds`` times
and the ratios are the medians of the paired ones, since the machine's speed
drifts. After each hostile figure the benchmark waits until the server has dropped
what the hostile process left, so the next quiet figure does not pay for it.
Bounded: every phase has a deadline, the hostile process is killed after each
figure, and the whole run stops by itself (about ``len(vms) * rounds * (2 * seconds
+ 3)`` s: 2 min by default; at most 25 s more per figure, for the ramp and the
teardown).

Fixed on 2026-12-05: ``ss`` ran every 0.5 s *during* the hostile figure (to count
the connections held), and its fork and exec took CPU from the load that only the
hostile figures paid for; it now runs just before and after. Fixed on 2026-12-04
(docs/performance.md): the idle connections' peek waited up to
1 s on each silent socket (a timeout was set, and Python polls before a recv with
one, MSG_DONTWAIT or not), so the process re-opened about 100 connections a second
instead of ~500; the client that does not read never came back once disconnected
(its unread bytes hid the end of the stream from the peek); the load's link,
connected after the idle connections, was at times refused (server full).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import select
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
#: the server's --max-connections (its default): the hostile process fills it
FULL = 512


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ------------------------------------------------------------------ the hostile side

def _raw_client(port: int, rcvbuf: int | None = None, deadline: float | None = None
                ) -> tuple[socket.socket, Connection]:
    """A client through its WELCOME. Until ``deadline``, a refusal (the server full
    of the idle connections) is retried every 0.1 s instead of ending the thread."""
    while True:
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        conn = Connection(Role.CLIENT)
        s.sendall(conn.send(m.Hello(name="hostile")))
        ev = conn.next_event()
        while ev is NEED_DATA:
            conn.receive_data(s.recv(65536))
            ev = conn.next_event()
        if isinstance(ev, m.Welcome):
            return s, conn
        s.close()
        if deadline is None or time.monotonic() > deadline:
            raise SystemExit(f"hostile: no WELCOME: {ev}")
        time.sleep(0.1)


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
                    # Non-blocking from now on: with a timeout set, Python polls
                    # up to it before a recv, MSG_DONTWAIT or not, and the peek
                    # above waited 1 s on every silent socket (so the process
                    # re-opened about 100 connections a second, not ~500).
                    n.setblocking(False)
                    held[i] = n
                except OSError:
                    pass
            time.sleep(1.0)   # holding, not hammering: re-open what was closed each second

    attached = threading.Event()

    def stopped_reader() -> None:
        while time.monotonic() < deadline:
            s, conn = _raw_client(port, rcvbuf=4096, deadline=deadline)
            out = b"".join(conn.send(m.Attach(request_id=vm, vm_id=vm, client_id=0,
                                              server_id="", device_id="s"))
                           for vm in range(1, 101))
            s.sendall(out)
            attached.set()
            # ... and never reads again; the server closes it when its queue is full.
            # Its unread bytes hide the end of the stream from a recv (a peek
            # returns them, never b""): POLLRDHUP says the server closed, and the
            # process attaches again at once (it used to stay away for good).
            gone = select.poll()
            gone.register(s, select.POLLRDHUP)
            while time.monotonic() < deadline and not gone.poll(0):
                time.sleep(0.5)
            s.close()

    def stirrer() -> None:
        s, conn = _raw_client(port, deadline=deadline)
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

    # The reader first: once the idle connections fill the server, a new client
    # waits for a slot the handshake deadline frees.
    if parts in ("all", "reader"):
        for fn in (stopped_reader, stirrer):
            threading.Thread(target=fn, daemon=True).start()
        attached.wait(10)
    if parts in ("all", "idle"):
        threading.Thread(target=hold, daemon=True).start()
    while time.monotonic() < deadline:
        time.sleep(1)


# ------------------------------------------------------------------ the load

def connect_load(port: int, vms: int) -> ServerLink:
    """One link with ``vms`` VMs attached to their own UARTs."""
    link = ServerLink("a", ("127.0.0.1", port), client_name=f"load{vms}").connect()
    for vm in range(1, vms + 1):
        if link.attach(vm, "u") != 0:
            link.close()
            raise SystemExit(f"attach of vm {vm} failed")
    return link


def run_load(link: ServerLink, vms: int, seconds: float) -> tuple[float, float]:
    """(accesses/s, p99 latency in µs) of ``vms`` threads on ``link``."""
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


def _quiet(port: int, n: int, args: argparse.Namespace) -> tuple[float, float]:
    link = connect_load(port, n)
    try:
        return run_load(link, n, args.seconds)
    finally:
        link.close()


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def _settle(pid: int, baseline: int) -> None:
    """Wait until the server has dropped what the hostile process left (a thread
    per connection it had admitted), so that the next quiet figure does not pay for
    the teardown of 512 connections (up to 15 s)."""
    deadline = time.monotonic() + 15
    while _threads(pid) > baseline + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)


def _established(port: int) -> int:
    """Connections the server has open on ``port`` (its side), as ``ss`` sees them."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    return len(out.splitlines())


def _attacked(port: int, n: int, args: argparse.Namespace, env: dict[str, str],
              settle: tuple[int, int]) -> tuple[tuple[float, float], int]:
    """The load of ``n`` VMs while the hostile process runs; and how many connections
    the server had open at most meanwhile. The load's link is connected first, as an
    agent's is before an attack: the idle connections fill the server, and a new
    client then waits for one the handshake deadline frees."""
    link = connect_load(port, n)
    hp = subprocess.Popen(
        [sys.executable, __file__, "--hostile", str(port), "--idle", str(args.idle),
         "--hostile-seconds", str(args.seconds + 30), "--only", args.only],
        stdout=subprocess.DEVNULL, env=env)
    # Let it open its connections and stop reading: the reader attaches at once; the
    # idle connections fill the server within a few seconds (its backlog overflows
    # while it starts a thread for each admitted one, and a dropped SYN costs that
    # connect a second).
    time.sleep(2.5)
    ramp = time.monotonic() + 10
    while args.only != "reader" and time.monotonic() < ramp and \
            _established(port) < FULL * 0.9:
        time.sleep(0.2)
    # Counted just before and just after the figure, not during it: running ``ss``
    # every 0.5 s meanwhile (as this did until 2026-12-05) cost the load CPU that
    # only the hostile figures paid for.
    held = _established(port)
    try:
        figure = run_load(link, n, args.seconds)
        return figure, max(held, _established(port))
    finally:
        link.close()
        hp.send_signal(signal.SIGKILL)
        hp.wait()
        _settle(*settle)   # the server drops what the hostile process left


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", default="1,8,32,64", help="VM counts (default 1,8,32,64)")
    ap.add_argument("--seconds", type=float, default=1.5,
                    help="load per figure (default 1.5)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="quiet/hostile pairs per VM count; the ratios printed are the "
                         "medians of the paired ones (default 5)")
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
        settle = (server.pid, _threads(server.pid))
        print(f"load on one link: {args.seconds:g} s per figure; hostile: {args.idle} idle "
              f"connections + a client that does not read (see bench/load.py)")
        print(f"{'VMs':>4} {'quiet acc/s':>12} {'p99 µs':>8} {'hostile acc/s':>14} "
              f"{'p99 µs':>8} {'held':>5}  ratios (thru, p99)")
        for n in counts:
            rounds = []
            for _ in range(args.rounds):
                quiet = _quiet(port, n, args)
                attacked, held = _attacked(port, n, args, env, settle)
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
