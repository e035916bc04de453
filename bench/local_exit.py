"""Cost of one local port-I/O exit round trip, measured with guests/build/ioloop.bin.

    python3 bench/local_exit.py [--count N] [--runs R] [--mode in|out]

The guest executes ``in al, dx`` (or ``out dx, al``) N times on port 0x3ff; a trivial
Python handler answers. Prints the median over R runs of (wall time of vm.run) / N in
microseconds per exit. The guest's own loop costs ~1 µs per iteration on this machine's
emulating KVM, so the figure is the whole round trip: guest -> KVM exit -> Python
dispatch -> KVM_RUN -> guest. Pin with ``taskset -c 0`` to keep it on one core.
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


class Trivial:
    def read(self, offset: int, size: int) -> int:
        return 0x42

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mode", choices=("in", "out"), default="in")
    ap.add_argument("--image", default=str(ROOT / "guests" / "build" / "ioloop.bin"))
    args = ap.parse_args()
    img = bytearray(Path(args.image).read_bytes())
    mode = 0 if args.mode == "in" else 1
    struct.pack_into("<IIII", img, 4, args.count, PORT, mode, 0x42)
    per_exit = []
    for _ in range(args.runs):
        with Vm(mem_size=1 << 20) as vm:
            vm.bus.map_ports(PORT, PORT, Trivial())
            vm.load_image(bytes(img))
            t0 = time.perf_counter()
            status = vm.run(timeout=600)
            dt = time.perf_counter() - t0
        if status != debug_exit_status(0x42):
            raise SystemExit(f"unexpected exit status {status:#x}")
        per_exit.append(dt / args.count * 1e6)
    print(f"{args.mode} exits: median {statistics.median(per_exit):.2f} us/exit "
          f"(runs: {', '.join(f'{x:.2f}' for x in per_exit)}; count {args.count})")


if __name__ == "__main__":
    main()
