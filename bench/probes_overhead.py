"""The cost of the eBPF probes on the forwarded-access round trip, in one run.

A VM run by remote-hw's agent reads the scratch register of a UART served by a
server on loopback N times (the ioloop guest); each read is one request the vCPU
thread sends and waits for. Rounds alternate between no probes and the probes attached
as the agent runs them (counters and stall histograms, ranges published; no trace
stream), so drifts of the machine hit both alike. The probes are compiled once and
detached / attached between rounds (``KvmProbe.pause``/``resume``). Prints the median
time per access of each and their ratio (target: <= 1.05), and the probes' own cost
per exit measured on accesses answered inside the monitor.

    python bench/probes_overhead.py [--accesses N] [--rounds R] [--with-trace]

``--with-trace`` adds a third configuration: a `remote-hw trace`-like consumer reading
every event from the ring buffer in this process.

By default the whole run (vCPU threads, server threads) is pinned to one CPU: on this
project's 2-vCPU machines a wake-up across CPUs costs 30-100 us and varies from round to
round with where the scheduler puts the threads (rounds of the same configuration
spread from 40 to 150 us unpinned), which buries an effect of a few per cent. Pinned,
rounds agree within a few per cent. ``--no-pin`` measures unpinned anyway.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from remote_hw.client.agent import Agent  # noqa: E402
from remote_hw.config import DeviceSpec, MapSpec, VmConfig  # noqa: E402
from remote_hw.probes.agent_hook import ProbeSession  # noqa: E402
from remote_hw.probes.loader import ProbeUnavailable  # noqa: E402
from remote_hw.server.controller import Controller  # noqa: E402
from remote_hw.server.listener import Server  # noqa: E402

IOLOOP = REPO / "guests" / "build" / "ioloop.bin"


def image(n: int) -> str:
    img = bytearray(IOLOOP.read_bytes())
    struct.pack_into("<II", img, 4, n, 0x3FF)
    f = tempfile.NamedTemporaryFile(prefix="ioloop-", suffix=".bin", delete=False)
    f.write(img)
    f.close()
    return f.name


def one_round(server: Server, session: ProbeSession, img: str, n: int, vm_id: int,
              mode: str) -> float:
    """Seconds per forwarded access in one run of the guest; ``mode`` is "off" (probes
    detached), "on" (attached, as the agent runs them) or "trace" (and streaming)."""
    probe = session.probe
    if mode == "off":
        probe.pause()
    else:
        probe.resume()
    probe.set_trace(mode == "trace")
    agent = Agent({"a": server.address})
    try:
        cfg = VmConfig(vm_id, img, maps=[MapSpec("port", 0x3F8, 0x3FF, "a", "uart0")])
        handle = agent.add_vm(cfg)
        session.publish_vm(handle.vm, cfg.maps, vm_id=vm_id)
        agent.connect()
        t0 = time.perf_counter()
        status = handle.vm.run()
        elapsed = time.perf_counter() - t0
        forwarded = sum(d.forwarded for d in handle.devices)
        if status & 1 == 0 or forwarded != n:
            raise SystemExit(f"the guest did not finish its {n} reads ({status=}, {forwarded=})")
        got = session.class_totals(pid=os.getpid(), vm_id=vm_id)["remote"]
        if got != (0 if mode == "off" else n):
            raise SystemExit(f"the probe counted {got} remote accesses in mode {mode}")
    finally:
        agent.stop()
        session.unpublish(os.getpid(), vm_id)
    return elapsed / n


class Scratch:
    def read(self, offset: int, size: int) -> int:
        return 0x5A

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def local_round(session: ProbeSession, img: str, n: int, probes: bool) -> float:
    """Seconds per access answered inside the monitor (no network): the probes' own
    cost per exit, without the round trip that hides it."""
    from remote_hw.client.vmm import Bus, Vm
    if probes:
        session.probe.resume()
    else:
        session.probe.pause()
    session.probe.set_trace(False)
    bus = Bus()
    bus.map_ports(0x3F8, 0x3FF, Scratch())
    with Vm(bus=bus) as vm:
        vm.load_image(img)
        t0 = time.perf_counter()
        vm.run()
        return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accesses", type=int, default=5000, help="reads per round (5000)")
    ap.add_argument("--rounds", type=int, default=25, help="rounds per configuration (25)")
    ap.add_argument("--with-trace", action="store_true",
                    help="also measure with every event streamed to a reader")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the run to one CPU (see the module docstring)")
    args = ap.parse_args()
    if not args.no_pin:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})      # threads started from now on inherit it
    if not IOLOOP.is_file():
        print(f"probes_overhead: {IOLOOP} is missing (run guests/build.sh)", file=sys.stderr)
        return 1
    try:
        session = ProbeSession.open()
    except ProbeUnavailable as e:
        print(f"probes_overhead: {e}", file=sys.stderr)
        return 1
    server = Server(Controller("a", [DeviceSpec("uart0", "uart16550")]), "127.0.0.1", 0)
    server.start()
    img = image(args.accesses)
    local_n = 5 * args.accesses
    local_img = image(local_n)
    modes = ["off", "on"] + (["trace"] if args.with_trace else [])
    times: dict[str, list[float]] = {m: [] for m in modes}
    local: dict[bool, list[float]] = {False: [], True: []}
    events = [0]
    stop = threading.Event()
    reader = None
    if args.with_trace:
        session.probe.on_event(lambda ev: events.__setitem__(0, events[0] + 1))

        def pump() -> None:
            while not stop.is_set():
                session.probe.poll(50)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
    vm_ids = iter(range(1, 1 << 30))
    try:
        one_round(server, session, img, args.accesses, next(vm_ids), "off")   # warm-up
        for r in range(args.rounds):
            order = modes if r % 2 == 0 else modes[::-1]
            for mode in order:
                times[mode].append(one_round(server, session, img, args.accesses,
                                             next(vm_ids), mode))
            for probes in ((False, True) if r % 2 == 0 else (True, False)):
                local[probes].append(local_round(session, local_img, local_n, probes))
    finally:
        stop.set()
        if reader:
            reader.join()
        session.close()
        server.stop()
        os.unlink(img)
        os.unlink(local_img)
    med = {m: statistics.median(v) * 1e6 for m, v in times.items()}
    where = "unpinned" if args.no_pin else "pinned to one CPU"
    print(f"forwarded-access round trip, median of {args.rounds} rounds of "
          f"{args.accesses} reads (port 0x3ff -> server uart0 on loopback, {where}):")
    print(f"  without probes:        {med['off']:8.2f} us/access  "
          f"(rounds: {', '.join(f'{t * 1e6:.2f}' for t in times['off'])})")
    print(f"  with probes (agent):   {med['on']:8.2f} us/access  "
          f"(rounds: {', '.join(f'{t * 1e6:.2f}' for t in times['on'])})")
    if args.with_trace:
        print(f"  with probes and trace: {med['trace']:8.2f} us/access  "
              f"(ratio {med['trace'] / med['off']:.3f})")
    loc = {k: statistics.median(v) * 1e6 for k, v in local.items()}
    print(f"access answered in the monitor (no network), median of {args.rounds} rounds of "
          f"{local_n}: without {loc[False]:.2f} us, with {loc[True]:.2f} us: the probes "
          f"cost {loc[True] - loc[False]:+.2f} us per exit")
    paired = statistics.median(on / off for on, off in zip(times["on"], times["off"]))
    print(f"ratio of the medians: {med['on'] / med['off']:.3f}")
    print(f"ratio with/without probes (median of the {args.rounds} paired rounds): "
          f"{paired:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
