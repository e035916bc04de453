"""Per-write cost, as the guest sees it, of an ordinary port write and a coalesced one.

    python3 bench/coalesced.py [--count N] [--runs R]

The guest (guests/build/ioloop.bin, mode 1) executes ``out dx, al`` N times on port
0x3ff, answered by a trivial Python handler:

  (a) ordinary: every OUT is a KVM exit dispatched by the exit loop;
  (b) coalesced: the port is coalesced (``Vm.coalesce_ports``), so the kernel queues
      each OUT in the ring and the guest runs on; the ring is drained to the same
      handler at the next exit, which is the write that finds the ring full (one in
      170 here) or the final debug-exit write.

Prints the median over R runs (a and b alternate) of (wall time of vm.run) / N in
microseconds per write, and b/a. The guest's own loop (``out; dec ecx; jnz``) is
emulated by this machine's KVM and is part of both figures; (b) also includes the
Python drain. Pin with ``taskset -c 0`` to keep it on one core.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remote_hw.client.vmm import Vm, debug_exit_status  # noqa: E402

PORT = 0x3FF
VALUE = 0x42


class Trivial:
    def __init__(self) -> None:
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return VALUE

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1


def run_once(image: bytes, count: int, coalesce: bool) -> tuple[float, int, int]:
    """One run: (µs per write, writes delivered through the ring, drains)."""
    handler = Trivial()
    with Vm(mem_size=1 << 20) as vm:
        vm.bus.map_ports(PORT, PORT, handler)
        if coalesce:
            vm.coalesce_ports(PORT, 1)
        vm.load_image(image)
        t0 = time.perf_counter()
        status = vm.run(timeout=600)
        dt = time.perf_counter() - t0
        ring = vm._vt.coalesced
        via_ring, drains = (ring.delivered, ring.drains) if ring is not None else (0, 0)
    if status != debug_exit_status(VALUE):
        raise SystemExit(f"unexpected exit status {status:#x}")
    if handler.writes != count:
        raise SystemExit(f"the handler saw {handler.writes} writes, not {count}")
    return dt / count * 1e6, via_ring, drains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image", default=str(ROOT / "guests" / "build" / "ioloop.bin"))
    args = ap.parse_args()
    img = bytearray(Path(args.image).read_bytes())
    struct.pack_into("<IIII", img, 4, args.count, PORT, 1, VALUE)   # mode 1: out dx, al
    image = bytes(img)
    with Vm(mem_size=1 << 20) as probe:
        if not probe.coalescing_supported():
            raise SystemExit("this KVM cannot coalesce port writes")
    plain: list[float] = []
    ring: list[float] = []
    via_ring = drains = 0
    for _ in range(args.runs):
        plain.append(run_once(image, args.count, False)[0])
        cost, via_ring, drains = run_once(image, args.count, True)
        ring.append(cost)
    a, b = statistics.median(plain), statistics.median(ring)
    runs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
    print(f"(a) ordinary port write:  median {a:.2f} us/write (runs: {runs(plain)})")
    print(f"(b) coalesced port write: median {b:.2f} us/write (runs: {runs(ring)}; "
          f"{via_ring} of {args.count} through the ring in {drains} drains)")
    print(f"b/a = {b / a:.3f} (count {args.count})")


if __name__ == "__main__":
    main()
