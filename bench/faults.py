"""What a guest sees when its server is stopped, partitioned away or restarted.

    python3 bench/faults.py [--only stop,partition,restart,servers] [--timeout S]

A real KVM guest (ioloop.bin in mode 3: a counting byte stream written to COM1's THR,
tests/seqstream.py) in this process, its UART on a real ``remote-hw server`` child
process with a file backend, the link the agent uses (reconnect on). For each fault
it prints:

* the longest wait of one guest access, against ``--timeout`` (the bound it must
  keep; a partition shorter than the timeout is waited out, as TCP delivers);
* the guest's writes: answered, dropped while the device was away (the guest saw a
  removed device), and in flight when the fault hit (retried on a resumed session);
* the bytes at the backend: lost (a write that should have arrived and did not) and
  doubled (applied twice), and whether the stream is in order.

Faults: ``stop`` (SIGSTOP for 4 s with ``--timeout 10``, waited out; then for twice
the timeout, then SIGCONT: the session resumes),
``partition`` (the server's network namespace link down 4 s with ``--timeout 10``,
then 4 s with a 2 s timeout; needs root and ``ip netns``), ``restart`` (kill -9, then a
new server on the same port: devices start from power-on state, so only what the
guest wrote after the reset point counts), ``servers`` (the guest's server is an entry
server forwarding to a device server in a network namespace, and *that* link is down
4 s; the entry's ``--forward-timeout`` is 1 s: its link to the device server breaks
and resumes its session; the guest's own link stays up, and its writes meanwhile are
refused by the entry and reported, counted under "away"). Bounded: about a minute
and a half, stops by itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from remote_hw.client.agent import RemoteDevice  # noqa: E402
from remote_hw.client.vmm import Vm  # noqa: E402
from remote_hw.config import parse_map  # noqa: E402
from remote_hw.net.link import ServerLink  # noqa: E402
from remote_hw.net.security import TlsConfig  # noqa: E402

from helpers import make_keys  # noqa: E402
from seqstream import judge, sequence_guest  # noqa: E402

COM1 = 0x3F8


class CountingDevice(RemoteDevice):
    """RemoteDevice counting the accesses it saw fail (a posted write's only sign
    is this call: ``failing`` stays set until a synchronous access answers)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.failures = 0

    def _failed(self, status: int) -> None:
        self.failures += 1
        super()._failed(status)


@dataclass
class Watched:
    """Wraps the guest's UART: times every access and sorts every write by outcome."""

    dev: CountingDevice
    link: ServerLink
    longest: float = 0.0
    answered: int = 0
    away: int = 0       # issued while the link was down: dropped (a removed device)
    in_flight: int = 0  # issued while up, not answered: retried on a resume
    #: the server is an entry: a write it answers with a failure while the link is up
    #: was refused (its own link to the device is down), as if the device were away
    entry: bool = False
    #: answered writes by connection (recovery.reconnects when the write was made)
    answered_on: dict[int, int] = field(default_factory=dict)

    def write(self, offset: int, size: int, value: int) -> None:
        was_up = self.link.up
        rec = self.link.recovery
        gen = rec.reconnects if rec is not None else 0
        failures = self.dev.failures
        t0 = time.perf_counter()
        self.dev.write(offset, size, value)
        took = time.perf_counter() - t0
        self.longest = max(self.longest, took)
        if not was_up:
            self.away += 1
        elif self.dev.failures != failures:
            if self.entry and self.link.up:
                self.away += 1
            else:
                self.in_flight += 1
        else:
            self.answered += 1
            self.answered_on[gen] = self.answered_on.get(gen, 0) + 1

    def read(self, offset: int, size: int) -> int:
        return self.dev.read(offset, size)


class Server:
    """A remote-hw server child process, optionally inside a network namespace."""

    def __init__(self, listen: str, out: Path | None, netns: str | None = None,
                 server_id: str = "a", extra: tuple[str, ...] = (),
                 log: Path | None = None) -> None:
        argv = [sys.executable, "-m", "remote_hw.cli", "server", "--listen", listen,
                "--server-id", server_id, "--no-mount", "--log-level", "warning", *extra]
        if out is not None:
            argv += ["--device", f"uart0=uart16550,backend=file:{out}"]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self._log = open(log, "w") if log is not None else None  # noqa: SIM115
        self.p = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=self._log or subprocess.DEVNULL)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(10)
        if self._log is not None:
            self._log.close()


def _connect(address: tuple[str, int], timeout: float,
             tls: TlsConfig | None = None) -> ServerLink:
    deadline = time.monotonic() + 20
    while True:
        try:
            return ServerLink("a", address, client_name="bench", timeout=timeout,
                              reconnect=True, tls=tls).connect()
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _wait(pred, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(0.02)


def run_fault(name: str, address: tuple[str, int], timeout: float, out: Path,
              image: Path, fault, after: Path | None = None,
              tls: TlsConfig | None = None, entry_log: Path | None = None
              ) -> dict[str, object]:
    """Run the guest, apply ``fault()`` once it writes steadily, let it run on.
    ``entry_log``: the server is an entry server logging there (its link to the
    device server retries writes in flight too; they are counted from its log)."""
    link = _connect(address, timeout, tls)
    if link.attach(1, "uart0"):
        raise SystemExit("attach failed")
    watched = Watched(CountingDevice(link, 1, parse_map("port:0x3f8-0x3ff=a/uart0")), link,
                      entry=entry_log is not None)
    vm = Vm(mem_size=1 << 20)
    vm.bus.map_ports(COM1, COM1 + 7, watched)
    vm.load_image(image.read_bytes())
    runner = threading.Thread(target=vm.run, daemon=True)
    runner.start()
    try:
        _wait(lambda: out.exists() and out.stat().st_size > 5000, "the guest's first bytes")
        before = (watched.answered, watched.away, watched.in_flight)
        fault()
        _wait(lambda: link.up and not watched.dev.failing, "the device to answer again", 60)
        time.sleep(1.0)
    finally:
        vm.stop(0)
        runner.join(10)
        link.close()
        vm.close()
    rec = link.recovery
    assert rec is not None
    # Posted writes may still be on their way (through an entry server, two hops):
    # wait until the backend's file stops growing before counting.
    _settle(after or out)
    if after is None:  # stop, partition: one backend, every answered write expected
        data = out.read_bytes()
        # A POST counted answered when it was sent, and reported failed later, was
        # dropped (reports arrive after the write: counted here, not per write).
        late = link.post_failures
        watched.answered -= late
        watched.away += late
        # A write in flight when the link broke reached the server either before the
        # break (its answer lost) or as the retry after the resume: once either way.
        in_flight = watched.in_flight if rec.resumed else rec.retried
        expected = watched.answered + in_flight + _entry_retried(entry_log)
    else:  # restart: the new backend, from the reset point (the new connection) on
        data = after.read_bytes()
        expected = watched.answered_on.get(rec.reconnects, 0)
    v = judge(data)
    return {"fault": name, "timeout": timeout, "longest": watched.longest,
            "writes": watched.answered + watched.away + watched.in_flight,
            "away": watched.away, "in_flight": watched.in_flight - before[2],
            "retried": rec.retried + _entry_retried(entry_log), "resumed": rec.resumed,
            "lost": max(0, expected - len(data)), "doubled": max(0, len(data) - expected),
            "in_order": v.doubled == 0 and v.gaps <= (1 if watched.away else 0),
            "steps": str(v)}


def _settle(path: Path, quiet: float = 0.5, limit: float = 10.0) -> None:
    """Wait until ``path`` has not grown for ``quiet`` seconds (at most ``limit``)."""
    deadline = time.monotonic() + limit
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = path.stat().st_size if path.exists() else 0
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def _entry_retried(log: Path | None) -> int:
    """Writes an entry server's links retried after resuming (from its log)."""
    if log is None:
        return 0
    import re
    text = log.read_text()
    # Writes in flight, and forwarded POSTs whose send the break cut off: their
    # client was told they failed, and they are applied (once) after the resume.
    return sum(int(n) for n in re.findall(r"(\d+) write\(s\) in flight retried", text)) \
        + sum(int(n) for n in re.findall(r"\((\d+) cut off while being sent\)", text))


def stop_fault(tmp: Path, timeout: float, image: Path, length: float) -> dict[str, object]:
    out = tmp / f"stop{timeout:g}.out"
    port = _free_port()
    srv = Server(f"127.0.0.1:{port}", out)
    try:
        def fault() -> None:
            os.kill(srv.p.pid, signal.SIGSTOP)
            time.sleep(length)
            os.kill(srv.p.pid, signal.SIGCONT)
        r = run_fault("stop", ("127.0.0.1", port), timeout, out, image, fault)
        r["fault"] = f"stop {length:g} s"
        return r
    finally:
        os.kill(srv.p.pid, signal.SIGCONT)
        srv.kill()


def restart_fault(tmp: Path, timeout: float, image: Path) -> dict[str, object]:
    out, again = tmp / "first.out", tmp / "second.out"
    port = _free_port()
    servers = [Server(f"127.0.0.1:{port}", out)]
    try:
        def fault() -> None:
            servers[0].kill(signal.SIGKILL)
            time.sleep(1.0)
            servers.append(Server(f"127.0.0.1:{port}", again))
        return run_fault("restart", ("127.0.0.1", port), timeout, out, image, fault,
                         after=again)
    finally:
        for s in servers:
            s.kill()


class Netns:
    """A namespace joined to this one by a veth pair (10.78.N.1 here, .2 there)."""

    def __init__(self) -> None:
        n = os.getpid() % 250
        self.name, self.here, self.there = f"rhf{os.getpid()}", f"rhf{n}h", f"rhf{n}t"
        self.addr = f"10.78.{n}.2"
        for argv in (["ip", "netns", "add", self.name],
                     ["ip", "link", "add", self.here, "type", "veth", "peer", "name",
                      self.there],
                     ["ip", "link", "set", self.there, "netns", self.name],
                     ["ip", "addr", "add", f"10.78.{n}.1/24", "dev", self.here],
                     ["ip", "link", "set", self.here, "up"],
                     ["ip", "-n", self.name, "addr", "add", f"{self.addr}/24", "dev",
                      self.there],
                     ["ip", "-n", self.name, "link", "set", self.there, "up"],
                     ["ip", "-n", self.name, "link", "set", "lo", "up"]):
            subprocess.run(argv, check=True, capture_output=True)

    def link(self, state: str) -> None:
        subprocess.run(["ip", "-n", self.name, "link", "set", self.there, state],
                       check=True, capture_output=True)

    def cut(self, seconds: float) -> None:
        """The link down for ``seconds``, then up again (whatever happens meanwhile)."""
        self.link("down")
        try:
            time.sleep(seconds)
        finally:
            self.link("up")

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.here], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def partition_fault(tmp: Path, timeout: float, image: Path,
                    length: float = 4.0) -> dict[str, object]:
    ns = Netns()
    out = tmp / f"partition{timeout:g}.out"
    srv = Server(f"{ns.addr}:7700", out, netns=ns.name)
    try:
        r = run_fault("partition", (ns.addr, 7700), timeout, out, image,
                      lambda: ns.cut(length))
        r["fault"] = f"partition {length:g} s"
        return r
    finally:
        srv.kill()
        ns.close()


def servers_fault(tmp: Path, timeout: float, image: Path,
                  length: float = 4.0) -> dict[str, object]:
    """Entry server a here, device server b in a namespace; a's link to b cut. Mutual
    TLS: a peer off loopback must prove it is a server."""
    ns = Netns()
    out = tmp / "servers.out"
    port = _free_port()
    keys = make_keys(tmp / "keys", ["a", "b"], ["bench"])
    b_log = tmp / "device-server.log"
    b = Server(f"{ns.addr}:7700", out, netns=ns.name, server_id="b", log=b_log,
               extra=("--tls-dir", str(keys), "--log-level", "info"))
    _wait(lambda: _listening((ns.addr, 7700)), "server b to listen")
    log = tmp / "entry.log"
    a = Server(f"127.0.0.1:{port}", None, log=log, extra=(
        "--tls-dir", str(keys), "--log-level", "info", "--peer", f"b={ns.addr}:7700",
        "--route", "uart0=b", "--forward-timeout", "1"))
    try:
        r = run_fault("servers", ("127.0.0.1", port), timeout, out, image,
                      lambda: ns.cut(length),
                      tls=TlsConfig(keys, "bench"), entry_log=log)
        r["fault"] = f"a-b cut {length:g} s"
        if r["lost"] or r["doubled"] or not r["in_order"]:   # say what the servers saw
            print(f"entry server a:\n{log.read_text()}\ndevice server b:\n"
                  f"{b_log.read_text()}")
        return r
    finally:
        a.kill()
        b.kill()
        ns.close()


def _listening(address: tuple[str, int]) -> bool:
    import socket
    try:
        socket.create_connection(address, timeout=0.5).close()
        return True
    except OSError:
        return False


def _free_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _partition_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return "" if r.returncode == 0 else f"needs ip netns ({r.stderr.strip()})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="stop,partition,restart,servers")
    ap.add_argument("--timeout", type=float, default=2.0,
                    help="--timeout of the stop and restart runs (default 2)")
    args = ap.parse_args()
    wanted = set(args.only.split(","))
    rows = []
    with TemporaryDirectory() as d:
        tmp = Path(d)
        image = sequence_guest(tmp / "seq.bin")
        if "stop" in wanted:
            rows.append(stop_fault(tmp, 10.0, image, 4.0))
            rows.append(stop_fault(tmp, args.timeout, image, 2 * args.timeout))
        if "partition" in wanted:
            why = _partition_unavailable()
            if why:
                print(f"partition: skipped ({why})")
            else:
                rows.append(partition_fault(tmp, 10.0, image))
                rows.append(partition_fault(tmp, args.timeout, image))
        if "restart" in wanted:
            rows.append(restart_fault(tmp, args.timeout, image))
        if "servers" in wanted:
            why = _partition_unavailable()
            if why:
                print(f"servers: skipped ({why})")
            else:
                rows.append(servers_fault(tmp, args.timeout, image))
    print(f"{'fault':<16}{'timeout':>8}{'longest wait':>14}{'writes':>9}{'away':>8}"
          f"{'in flight':>10}{'retried':>8}{'lost':>6}{'doubled':>8}  in order")
    for r in rows:
        print(f"{r['fault']:<16}{r['timeout']:>7g}s{r['longest']:>13.2f}s{r['writes']:>9}"
              f"{r['away']:>8}{r['in_flight']:>10}{r['retried']:>8}{r['lost']:>6}"
              f"{r['doubled']:>8}  {'yes' if r['in_order'] else 'NO'} ({r['steps']})")


if __name__ == "__main__":
    main()
