"""A seeded byte mutator and the time budget of a fuzz run.

Why not only hypothesis: the targets here are byte streams (frames, several frames,
cut frames) and a live server; a small mutator over a corpus of valid frames reaches
the interesting inputs (a valid header with a wrong length, a known type with a bad
field, two frames glued) in a few thousand tries, and a seed printed with every
failure reproduces it exactly.

The budget: ``REMOTE_HW_FUZZ_SECONDS`` per target (default 3, what CI runs; ``make
fuzz`` sets more) and ``REMOTE_HW_FUZZ_SEED`` (default 11; ``make fuzz`` picks one
and prints it).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

from remote_hw.protocol import codec
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import AccessKind, Direction, ErrorCode, Role, Status

U32, U64 = 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 8, 64, 65)


def seconds() -> float:
    return float(os.environ.get("REMOTE_HW_FUZZ_SECONDS", "3"))


def seed() -> int:
    return int(os.environ.get("REMOTE_HW_FUZZ_SEED", "11"))


def budget(limit: float | None = None) -> Iterator[int]:
    """Iteration numbers until the time budget is spent."""
    end = time.monotonic() + (seconds() if limit is None else limit)
    i = 0
    while time.monotonic() < end:
        yield i
        i += 1


#: Valid messages of every type, each direction (the corpus mutations start from).
CLIENT_MSGS: list[m.Message] = [
    m.Hello(name="fuzz", role=Role.CLIENT),
    m.Hello(name="peer-x", role=Role.PEER, features=0, max_payload=1024),
    m.IoRequest(request_id=1, vm_id=1, offset=7, kind=AccessKind.PORT, size=1,
                direction=Direction.WRITE, data=0x5A, device_id="uart0"),
    m.IoRequest(request_id=U64, vm_id=U32, client_id=3, offset=U64, kind=AccessKind.MMIO,
                size=8, direction=Direction.READ, hops=2, server_id="a", device_id="rtc0"),
    m.Attach(request_id=2, vm_id=1, device_id="uart0"),
    m.Attach(request_id=3, vm_id=9, client_id=4, server_id="b", device_id="kbd0"),
    m.Detach(request_id=4, vm_id=1),
    m.Ping(nonce=5), m.Pong(nonce=U64),
    m.Error(request_id=0, code=ErrorCode.MALFORMED, text="bad \n frame"),
    m.Resume(request_id=6, token=0), m.Resume(request_id=7, token=U64),
    m.Origin(request_id=8, client_id=2, name="alice"),
]
SERVER_MSGS: list[m.Message] = [
    m.Welcome(client_id=1, name="a"),
    m.Feedback(request_id=1, vm_id=1, status=Status.OK, size=1, data=0x5A),
    m.Feedback(request_id=2, vm_id=1, status=Status.UNREACHABLE),
    m.Interrupt(vm_id=1, line=0, level=1, device_id="uart0"),
    m.Event(vm_id=1, device_id="kbd0", name="reset-request"),
    m.Ping(nonce=1), m.Error(code=ErrorCode.DENIED, text="no"),
]
CLIENT_FRAMES = [codec.encode(x) for x in CLIENT_MSGS]
SERVER_FRAMES = [codec.encode(x) for x in SERVER_MSGS]


class Mutator:
    """Derives inputs from a corpus of frames: flips, interesting bytes, cuts, glues,
    wrong lengths and types."""

    def __init__(self, rng: random.Random, corpus: list[bytes]) -> None:
        self.rng = rng
        self.corpus = corpus

    def frame(self) -> bytes:
        data = bytearray(self.rng.choice(self.corpus))
        for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
            self._mutate(data)
        return bytes(data)

    def stream(self, frames: int = 4) -> bytes:
        """Several frames, each valid or mutated, glued together."""
        rng = self.rng
        return b"".join(rng.choice(self.corpus) if rng.random() < 0.5 else self.frame()
                        for _ in range(rng.randint(1, frames)))

    def _mutate(self, d: bytearray) -> None:
        rng = self.rng
        op = rng.randrange(9)
        if not d:
            d += rng.randbytes(rng.randint(1, 16))
            return
        i = rng.randrange(len(d))
        if op == 0:
            d[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            d[i] = rng.choice(INTERESTING)
        elif op == 2:
            d[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del d[i:i + rng.randint(1, 8)]
        elif op == 4:  # the length field says something else
            if len(d) >= 8:
                n = rng.choice((0, 1, len(d) - 7, len(d) - 9, 0xFFFF, U32))
                d[4:8] = max(0, n).to_bytes(4, "little")
        elif op == 5:  # another (or no) message type
            if len(d) >= 3:
                d[2] = rng.choice((*range(0, 16), 0xFF))
        elif op == 6:  # cut short
            del d[rng.randrange(len(d)):]
        elif op == 7:  # glue another frame
            d += rng.choice(self.corpus)
        else:  # a string length byte or id byte gone wrong
            d[i] = rng.choice(b"\x00\x01\x40\x41\xff.-_ a")
