"""A guest that writes a counting byte stream, and the judge of what arrived.

The fault tests (tests/test_reconnect.py, tests/test_platform_partition.py) and
bench/faults.py run ``ioloop.bin`` in mode 3: ``out dx, al`` in a loop with al
counting up (mod 256), to COM1's THR, so the server's backend receives 0, 1, 2, ...
In that stream a doubled byte shows as a step of 0 and lost bytes as a step other
than 1; :func:`judge` counts both. Kept apart so tests and the benchmark judge alike.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from remote_hw.guest_images import guest_image

COM1 = 0x3F8
SEQUENCE_MODE = 3


def sequence_guest(dest: Path, count: int = 0x7FFFFFFF, port: int = COM1) -> Path:
    """ioloop.bin patched to write ``count`` counting bytes to ``port``; its path."""
    img = bytearray(guest_image("ioloop.bin").read_bytes())
    struct.pack_into("<IIII", img, 4, count, port, SEQUENCE_MODE, 0)
    dest.write_bytes(bytes(img))
    return dest


@dataclass
class Verdict:
    """What a backend received, judged against a counting stream."""

    length: int
    doubled: int   # steps of 0: a byte applied twice in a row
    gaps: int      # steps other than 0 and 1: bytes skipped (or a late duplicate)
    skipped: int   # bytes missing at the gaps, counted mod 256

    def __str__(self) -> str:
        return (f"{self.length} bytes, {self.doubled} doubled, {self.gaps} gap(s) "
                f"skipping {self.skipped} mod 256")


def judge(data: bytes) -> Verdict:
    doubled = gaps = skipped = 0
    for a, b in zip(data, data[1:]):
        step = (b - a) % 256
        if step == 0:
            doubled += 1
        elif step != 1:
            gaps += 1
            skipped += step - 1
    return Verdict(len(data), doubled, gaps, skipped)


def outages(client_log: str) -> int:
    """How many times a client's link went down (each may leave one gap: the writes
    the guest made while the device read as removed)."""
    return client_log.count(" is gone: ")

