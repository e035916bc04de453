"""A polled serial console's throughput: local model, remote synchronous, remote posted.

    python3 bench/console.py [--rounds R] [--seconds S] [--delays 1,10] [--pin]
                             [--relay]

The guest (guests/console.S) prints a byte stream on COM1 (0x3F8) exactly as Linux's
8250 console does per byte: poll LSR (0x3FD) until THRE (bit 5) is set, then write
the byte to THR. Three configurations, measured in the same run:

* (a) local:  the project's 16550 model (remote_hw.devices.uart16550) in this process,
              on the VM's bus at 0x3F8-0x3FF, writing to a file backend: no network,
              the ceiling;
* (b) sync:   a ``remote-hw server`` child with ``uart0=uart16550,backend=file:PATH``
              and ``remote-hw vm --no-posting``: every access waits for the server;
* (c) posted: the same VM without ``--no-posting``: the server's SHADOW lets the client
              answer LSR itself while nothing is received, and post THR writes.

(b) and (c) run on loopback, then across a veth pair between two network namespaces
(the VM in one, the server in the other) with each added one-way delay of
``--delays`` (ms; a round trip gains twice that). The delay is netem's on both veth
ends where the kernel has sch_netem; otherwise (or with ``--relay``) a delaying TCP
relay in the server's namespace, which releases each chunk it read, in order, that
many ms after it arrived, in both directions. The output says which was used.

Rate: bytes per second from the first byte's arrival at the sink to the last's (the
server's backend file, polled every ms; for (a), the model's transmit callback), so
process start-up, connection and the guest's buffer fill are not counted. Byte counts
are picked per configuration from a rough rate estimate so that each run takes about
``--seconds``. Every run is verified: the backend file must hold exactly the bytes the
guest printed, and the VM must end through its debug-exit (status 0x55); a run that
does not is reported with the server's and the VM's stderr, and the benchmark exits 1.

Prints a table (median over ``--rounds`` interleaved rounds), the ratios (c)/(b) and
(c)/(a), and the goals: (c)/(b) >= 5 on loopback, (c) within 2x of (a) on loopback,
(c) >= 11 520 bytes/s (115200 baud, 8N1) at 10 ms. Needs root (network namespaces) and
/dev/kvm. The namespaces are removed on exit, also on an error or a signal.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remote_hw.backends.file import FileBackend  # noqa: E402
from remote_hw.client.vmm import Vm  # noqa: E402
from remote_hw.devices.uart16550 import Uart16550  # noqa: E402
from remote_hw.guest_images import guest_image  # noqa: E402
from remote_hw.net import fastio  # noqa: E402

COM1 = 0x3F8
SEED = 0x12345678
EXIT_STATUS = 0x55      # console.S writes 0x2a to the debug-exit port: (0x2a << 1) | 1
BUFFER = 0x10000        # console.S prints byte i from buffer[i mod 64 KiB]
BAUD_115200 = 11520     # bytes/s of a 115200-baud 8N1 line (10 bits per byte)
POLL = 0.001            # seconds between two looks at the backend file
SERVER_PORT, RELAY_PORT = 7700, 7701

PID = os.getpid() % 100000
NS_CLIENT, NS_SERVER = f"rhcon{PID}-c", f"rhcon{PID}-s"
VETH_CLIENT, VETH_SERVER = f"rhcon{PID}c", f"rhcon{PID}s"
SUBNET = f"10.79.{PID % 250}"
ADDR_CLIENT, ADDR_SERVER = f"{SUBNET}.1", f"{SUBNET}.2"


# ------------------------------------------------------------------ the guest

def console_image(count: int, seed: int = SEED) -> bytes:
    """guests/console.bin patched to print ``count`` bytes of the stream of ``seed``."""
    img = bytearray(guest_image("console.bin").read_bytes())
    struct.pack_into("<II", img, 4, count, seed)
    return bytes(img)


def expected(count: int, seed: int = SEED) -> bytes:
    """The bytes console.S prints: xorshift32 low bytes, repeating every 64 KiB."""
    x, buf = seed, bytearray()
    for _ in range(min(count, BUFFER)):
        x ^= (x << 13) & 0xFFFF_FFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFF_FFFF
        buf.append(x & 0xFF)
    return bytes((buf * (count // BUFFER + 1))[:count])


# ------------------------------------------------------------------ results

@dataclass
class Run:
    config: str             # "a", "b" or "c"
    net: str                # "none", "loopback", "veth +1 ms", ...
    count: int
    seconds: float = 0.0
    rate: float = 0.0
    ok: bool = True
    problem: str = ""
    counters: str = ""      # the VM's own account: forwarded, posted, shadow reads
    round: int = 0
    cpu_client: float = 0.0  # CPU µs per byte streamed: the VM's process
    cpu_server: float = 0.0  # and the server's (user + system, all threads)
    logs: dict[str, str] = field(default_factory=dict)


def verify(run: Run, path: Path) -> None:
    """The backend file must hold exactly the bytes the guest printed."""
    want = expected(run.count)
    got = path.read_bytes() if path.exists() else b""
    if got == want:
        return
    run.ok = False
    i = next((k for k, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got),
                                                                          len(want)))
    run.problem += (f"output differs: {len(got)} bytes written, {len(want)} printed; "
                    f"first difference at offset {i} (got {got[i:i + 8].hex() or '-'}, "
                    f"expected {want[i:i + 8].hex() or '-'})")
    if len(got) != len(want) and got == want[:len(got)]:
        run.problem += f"; the file is a prefix: the last {len(want) - len(got)} bytes lost"


# ------------------------------------------------------------------ (a) local

def run_local(count: int, tmp: Path) -> Run:
    """The 16550 model on this process's bus, its output into a file backend."""
    run = Run("a", "none", count)
    path = tmp / "local.out"
    path.unlink(missing_ok=True)
    backend = FileBackend(str(path), "uart0")
    uart = Uart16550()
    stamps = [0.0, 0.0]
    got = [0]
    cpu = [0.0]
    clock = time.perf_counter

    def sink(data: bytes) -> None:
        now = clock()
        if not got[0]:
            stamps[0] = now
            cpu[0] = time.process_time()
        got[0] += len(data)
        stamps[1] = now
        backend.from_guest(data)

    uart.tx_sink = sink
    try:
        with Vm(mem_size=1 << 20) as vm:
            vm.bus.map_ports(COM1, COM1 + 7, uart)
            vm.load_image(console_image(count))
            status = vm.run(timeout=600)
            cpu[0] = time.process_time() - cpu[0]
    finally:
        backend.close()
    if status != EXIT_STATUS:
        run.ok = False
        run.problem = f"guest ended with status {status:#x}, expected {EXIT_STATUS:#x}; "
    run.seconds = stamps[1] - stamps[0]
    run.rate = (got[0] - 1) / run.seconds if run.seconds > 0 else 0.0
    run.cpu_client = cpu[0] / max(1, got[0] - 1) * 1e6
    verify(run, path)
    return run


# ------------------------------------------------------------------ network namespaces

def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def netns_up() -> None:
    netns_down()
    sh("ip", "netns", "add", NS_CLIENT)
    sh("ip", "netns", "add", NS_SERVER)
    sh("ip", "link", "add", VETH_CLIENT, "type", "veth", "peer", "name", VETH_SERVER)
    for ns, dev, addr in ((NS_CLIENT, VETH_CLIENT, ADDR_CLIENT),
                          (NS_SERVER, VETH_SERVER, ADDR_SERVER)):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def netns_down() -> None:
    """Remove both namespaces (their veth ends go with them)."""
    for ns in (NS_CLIENT, NS_SERVER):
        sh("ip", "netns", "del", ns, check=False)


def netem(delay_ms: float) -> str | None:
    """Put ``delay_ms`` on both veth ends with netem; None if it worked, else why not."""
    for ns, dev in ((NS_CLIENT, VETH_CLIENT), (NS_SERVER, VETH_SERVER)):
        r = sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
               "netem", "delay", f"{delay_ms}ms", "limit", "100000", check=False)
        if r.returncode != 0:
            return r.stderr.strip() or f"tc exited with {r.returncode}"
    return None


def netem_available() -> str | None:
    """None if this kernel has netem (loading sch_netem if needed), else why not."""
    why = netem(0)
    if why is not None:
        sh("modprobe", "sch_netem", check=False)
        why = netem(0)
    if why is None:
        for ns, dev in ((NS_CLIENT, VETH_CLIENT), (NS_SERVER, VETH_SERVER)):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root",
               check=False)
    return why


RELAY = r"""
import collections, socket, sys, threading, time
host, port, up_host, up_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
delay = float(sys.argv[5]) / 1000

def pipe(src, dst):
    # Each chunk read from src goes to dst `delay` after it arrived, in order.
    q, cv = collections.deque(), threading.Condition()
    def reader():
        while True:
            try:
                d = src.recv(65536)
            except OSError:
                d = b""
            with cv:
                q.append((time.monotonic() + delay, d))
                cv.notify()
            if not d:
                return
    def writer():
        while True:
            with cv:
                while not q:
                    cv.wait()
                due, d = q.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not d:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(d)
            except OSError:
                return
    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=writer, daemon=True).start()

ls = socket.create_server((host, port))
print("ready", flush=True)
while True:
    c, _ = ls.accept()
    u = socket.create_connection((up_host, up_port))
    for s in (c, u):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pipe(c, u)
    pipe(u, c)
"""


# ------------------------------------------------------------------ (b), (c) remote

@dataclass
class Net:
    label: str
    ns_client: str | None   # None: this namespace (loopback)
    ns_server: str | None
    listen: str             # the server's --listen
    connect: str | None     # HOST:PORT the VM dials; None: the server's own port
    delay_ms: float = 0.0
    netem: bool = False     # the delay is netem's (else the relay's, when connect is set)


def _wrap(ns: str | None, argv: list[str], pin: bool) -> list[str]:
    pre = ["ip", "netns", "exec", ns] if ns else []
    return pre + (["taskset", "-c", "0"] if pin else []) + argv


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(net: Net, out: Path, log: Path, pin: bool) -> tuple[subprocess.Popen, int]:
    """A ``remote-hw server`` with the UART writing to ``out``; (process, its port)."""
    argv = [sys.executable, "-m", "remote_hw.cli", "server", "--listen", net.listen,
            "--no-mount", "--device", f"uart0=uart16550,backend=file:{out}"]
    with open(log, "w") as f:
        p = subprocess.Popen(_wrap(net.ns_server, argv, pin), cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=f)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"listening on \S+:(\d+)", _tail(log, 100000))
        if m:
            return p, int(m.group(1))
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.kill()
    p.wait()
    raise RuntimeError(f"the server did not start:\n{_tail(log)}")


def run_remote(config: str, net: Net, count: int, tmp: Path, pin: bool, seq: int) -> Run:
    run = Run(config, net.label, count)
    out, slog, vlog = (tmp / f"{seq}.out", tmp / f"{seq}.server.log", tmp / f"{seq}.vm.log")
    image = tmp / f"{seq}.bin"
    image.write_bytes(console_image(count))
    out.write_bytes(b"")
    server, port = start_server(net, out, slog, pin)
    vm = None
    try:
        target = net.connect or f"{net.listen.rsplit(':', 1)[0]}:{port}"
        argv = [sys.executable, "-m", "remote_hw.cli", "vm", "--image", str(image),
                "--server", f"a={target}", "--map", "port:0x3f8-0x3ff=a/uart0"]
        if config == "b":
            argv.append("--no-posting")
        with open(vlog, "w") as f:
            vm = subprocess.Popen(_wrap(net.ns_client, argv, pin), cwd=ROOT, env=_env(),
                                  stdout=subprocess.DEVNULL, stderr=f)
        first = last = None
        seen = 0
        cpu_vm = cpu_server = 0.0
        usage = None
        exited = None
        clock = time.perf_counter
        # A VM that hangs (a lost answer, a posting window never refilled) is killed.
        start = clock()
        limit = start + 60 + 20 * count / byte_count(config, net, 1.0)
        while True:
            size = out.stat().st_size
            now = clock()
            if size != seen:
                seen = size
                last = (now, size)
                if first is None:
                    first = last
                    cpu_vm, cpu_server = cpu_seconds(vm.pid), cpu_seconds(server.pid)
            if usage is None:
                # wait4 rather than poll: the VM's own CPU time comes with its status.
                pid, wstatus, ru = os.wait4(vm.pid, os.WNOHANG)
                if pid:
                    vm.returncode = os.waitstatus_to_exitcode(wstatus)
                    usage = ru
            if usage is not None:
                exited = exited or now
                # Everything the guest posted must arrive; allow for the delay and a
                # slow machine, and look a little longer for bytes written twice.
                if (size >= count and now - exited > 0.3) or now - exited > 10:
                    break
            elif now > limit:
                vm.kill()
                vm.wait()
                run.ok = False
                run.problem = (f"remote-hw vm had not finished after {now - start:.0f} s "
                               f"({size} of {count} bytes arrived), killed; ")
                break
            time.sleep(POLL)
        if first is not None and last is not None and last[0] > first[0]:
            run.seconds = last[0] - first[0]
            run.rate = (last[1] - first[1]) / run.seconds
            streamed = max(1, last[1] - first[1])
            if usage is not None:
                run.cpu_client = (usage.ru_utime + usage.ru_stime - cpu_vm) / streamed * 1e6
            run.cpu_server = (cpu_seconds(server.pid) - cpu_server) / streamed * 1e6
        status = vm.returncode
        if run.ok and status != EXIT_STATUS:
            run.ok = False
            run.problem = f"remote-hw vm exited with {status}, expected {EXIT_STATUS}; "
    finally:
        for p in (vm, server):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    verify(run, out)
    vm_text = _tail(vlog, 100000)
    m = re.search(r"(\d+) accesses forwarded.*?(?:(\d+) writes posted, (\d+) reads answered"
                  r" from shadows)?$", vm_text, re.M)
    if m:
        # In the agent's own words (its log line at exit).
        run.counters = f"vm: {m.group(1)} forwarded"
        if m.group(2) is not None:
            run.counters += f", {m.group(2)} posted, {m.group(3)} read from shadow"
    notes = [line.split(": ", 1)[-1] for line in vm_text.splitlines()
             if "coalesc" in line.lower()]
    if notes:  # what the agent said about KVM's coalesced ring
        run.counters += "; " + "; ".join(notes)
    if not run.ok:
        run.logs = {"server stderr": _tail(slog), "vm stderr": _tail(vlog)}
    return run


# ------------------------------------------------------------------ sizes and the table

def byte_count(config: str, net: Net, seconds: float) -> int:
    """Bytes for about ``seconds`` of printing, from rough rates on this machine."""
    if config == "b":  # two round trips per byte (loopback ~80 µs; the veth pair and
        # the relay add some 300 µs)
        rtt = 2 * net.delay_ms / 1000 + (80e-6 if net.ns_client is None else 300e-6)
        rate = 1 / (2 * rtt)
    else:
        rate = 44_000.0 if config == "a" else 30_000.0
    return max(16, int(seconds * rate) // 16 * 16)


NAMES = {"a": "(a) local model", "b": "(b) remote, synchronous", "c": "(c) remote, posted"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--seconds", type=float, default=3.0,
                    help="about how long each run prints (default 3)")
    ap.add_argument("--delays", default="1,10",
                    help="one-way delays across the veth pair, ms (default 1,10; "
                         "0: the veth pair without added delay)")
    ap.add_argument("--pin", action="store_true",
                    help="run everything on CPU 0 (default: the kernel places processes)")
    ap.add_argument("--relay", action="store_true",
                    help="delay with the TCP relay even where netem is available")
    args = ap.parse_args()
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    if os.geteuid() != 0 and delays:
        raise SystemExit("bench/console.py needs root for the network namespaces "
                         "(or --delays '')")

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    if args.pin:
        os.sched_setaffinity(0, {0})
    on, why = fastio.status()
    print("C fast path (remote_hw/net/fastio.py): " + ("on" if on else f"OFF: {why}"))
    agent_src = (ROOT / "remote_hw" / "client" / "agent.py").read_text()
    print("coalesced PIO ring: " + ("Vm.coalesce_ports exists" if hasattr(Vm, "coalesce_ports")
                                    else "not in the VMM")
          + ("; the agent uses it" if "coalesce_ports" in agent_src
             else "; the agent does not use it"))
    print(f"placement: {'pinned to CPU 0' if args.pin else 'unpinned'}; "
          f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}")

    nets = [Net("loopback", None, None, "127.0.0.1:0", None)]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="rh-console-") as tmpname:
        tmp = Path(tmpname)
        try:
            if delays:
                netns_up()
                why_not = "--relay given" if args.relay else netem_available()
                method = ("netem on both veth ends" if why_not is None
                          else f"Python delaying TCP relay in the server's namespace "
                               f"(netem unavailable: {why_not})")
                print(f"delay: {method}")
                for d in delays:
                    label = f"veth +{d:g} ms"
                    if why_not is None or d == 0:
                        nets.append(Net(label, NS_CLIENT, NS_SERVER,
                                        f"{ADDR_SERVER}:{SERVER_PORT}", None, d,
                                        netem=why_not is None))
                    else:
                        nets.append(Net(label, NS_CLIENT, NS_SERVER,
                                        f"{ADDR_SERVER}:{SERVER_PORT}",
                                        f"{ADDR_SERVER}:{RELAY_PORT}", d))
            seq = 0
            for rnd in range(args.rounds):
                print(f"round {rnd + 1}/{args.rounds}", flush=True)
                r = run_local(byte_count("a", nets[0], args.seconds), tmp)
                r.round = rnd
                runs.append(r)
                _progress(r)
                for net in nets:
                    relay = None
                    if net.netem:
                        failed = netem(net.delay_ms)
                        if failed is not None:
                            raise RuntimeError(f"netem stopped working: {failed}")
                    elif net.connect is not None:
                        relay = subprocess.Popen(
                            _wrap(net.ns_server, [sys.executable, "-c", RELAY, ADDR_SERVER,
                                                  str(RELAY_PORT), ADDR_SERVER,
                                                  str(SERVER_PORT), str(net.delay_ms)],
                                  args.pin), stdout=subprocess.PIPE, text=True)
                        if relay.stdout is None or relay.stdout.readline() != "ready\n":
                            relay.kill()
                            relay.wait()
                            raise RuntimeError("the delaying relay did not start")
                    try:
                        for config in ("b", "c"):
                            seq += 1
                            r = run_remote(config, net, byte_count(config, net, args.seconds),
                                           tmp, args.pin, seq)
                            r.round = rnd
                            runs.append(r)
                            _progress(r)
                    finally:
                        if relay is not None:
                            relay.kill()
                            relay.wait()
        finally:
            if delays:
                netns_down()
    return report(runs, nets, args.rounds)


def _progress(r: Run) -> None:
    print(f"  {NAMES[r.config]:<24} {r.net:<13} {r.count:>7} bytes {r.seconds:7.2f} s "
          f"{r.rate:10.0f} bytes/s  CPU µs/byte {_cpu(r)}  {r.counters}"
          + ("" if r.ok else "  FAILED"), flush=True)


def _cpu(r: Run) -> str:
    """CPU per byte, client/server (µs)."""
    return f"{r.cpu_client:.0f}/{r.cpu_server:.0f}" if r.config != "a" else f"{r.cpu_client:.0f}/-"


def report(runs: list[Run], nets: list[Net], rounds: int) -> int:
    def med(config: str, net: str) -> tuple[float, float, float, Run] | None:
        rs = [r for r in runs if r.config == config and r.net == net]
        if not rs:
            return None
        rates = [r.rate for r in rs]
        return (statistics.median(rates), min(rates), max(rates),
                sorted(rs, key=lambda r: r.rate)[len(rs) // 2])

    a = med("a", "none")
    print()
    print(f"median of {rounds} round(s); bytes/s from the first byte's arrival at the sink "
          "to the last's;")
    print("CPU vm/srv: CPU time (user + system) per byte of the VM's process and of the "
          "server, µs, of the median run")
    head = (f"{'configuration':<24} {'network':<13} {'bytes':>7} {'seconds':>8} "
            f"{'bytes/s':>9} {'(min-max)':>17} {'CPU vm/srv':>10} {'(c)/(b)':>8} "
            f"{'(c)/(a)':>8}")
    print(head)
    print("-" * len(head))
    if a:
        print(f"{NAMES['a']:<24} {'none':<13} {a[3].count:>7} {a[3].seconds:>8.2f} "
              f"{a[0]:>9.0f} {f'{a[1]:.0f}-{a[2]:.0f}':>17} {_cpu(a[3]):>10}")
    ratios: dict[str, tuple[float, float]] = {}
    for net in nets:
        b, c = med("b", net.label), med("c", net.label)
        for config, x in (("b", b), ("c", c)):
            if x is None:
                continue
            extra = ""
            if config == "c" and b and a and b[0] and a[0]:
                ratios[net.label] = (x[0] / b[0], x[0] / a[0])
                extra = f" {x[0] / b[0]:>8.2f} {x[0] / a[0]:>8.2f}"
            print(f"{NAMES[config]:<24} {net.label:<13} {x[3].count:>7} {x[3].seconds:>8.2f} "
                  f"{x[0]:>9.0f} {f'{x[1]:.0f}-{x[2]:.0f}':>17} {_cpu(x[3]):>10}{extra}")
    def paired(num: str, den: str, net: str) -> str:
        """Median and range over rounds of the ratio within each round."""
        den_net = "none" if den == "a" else net
        xs = []
        for rnd in sorted({r.round for r in runs}):
            n = [r for r in runs if r.round == rnd and r.config == num and r.net == net]
            d = [r for r in runs if r.round == rnd and r.config == den and r.net == den_net]
            if n and d and d[0].rate:
                xs.append(n[0].rate / d[0].rate)
        if not xs:
            return "-"
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

    print()
    print("paired per round (median and range of the ratio within each round):")
    for net in nets:
        print(f"  {net.label:<13} (c)/(b) {paired('c', 'b', net.label):<26} "
              f"(c)/(a) {paired('c', 'a', net.label)}")
    print()
    print("goals:")
    lo = ratios.get("loopback")
    if lo:
        print(f"  loopback: (c)/(b) = {lo[0]:.2f}  (goal >= 5: "
              f"{'met' if lo[0] >= 5 else 'NOT met'})")
        b = med("b", "loopback")
        if a and b:
            print(f"            (a)/(b) = {a[0] / b[0]:.2f}: no (c) can exceed the local "
                  "model, so this bounds (c)/(b) on this machine")
        print(f"  loopback: (c)/(a) = {lo[1]:.2f}  (goal: within 2x of (a), >= 0.5: "
              f"{'met' if lo[1] >= 0.5 else 'NOT met'})")
    for net in nets:
        c = med("c", net.label)
        if net.delay_ms >= 10 and c:
            print(f"  {net.label}: (c) = {c[0]:.0f} bytes/s  (goal >= {BAUD_115200} bytes/s, "
                  f"115200 baud: {'met' if c[0] >= BAUD_115200 else 'NOT met'})")
    bad = [r for r in runs if not r.ok]
    print()
    if not bad:
        print(f"correctness: all {len(runs)} runs verified (the sink held exactly the bytes "
              "the guest printed; every guest ended through its debug-exit)")
        return 0
    print(f"correctness: {len(bad)} of {len(runs)} runs FAILED")
    for r in bad:
        print(f"* {NAMES[r.config]}, {r.net}, {r.count} bytes: {r.problem}")
        for name, text in r.logs.items():
            print(f"  --- {name} (tail) ---")
            print("  " + text.rstrip().replace("\n", "\n  "))
    return 1


if __name__ == "__main__":
    sys.exit(main())
