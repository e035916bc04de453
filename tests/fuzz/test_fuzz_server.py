"""Fuzz a live ``remote-hw server`` while a well-behaved client uses it.

Connections send mutated frames (before, during and after a valid handshake); the
server must refuse each bad connection on its own and keep serving the good client:
every one of its accesses answered OK with the value it wrote, the process alive at
the end, and no internal error or traceback in its log.
"""

from __future__ import annotations

import random
import socket
import threading

from remote_hw.net.link import ServerLink
from remote_hw.protocol import codec
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import AccessKind, Direction, Status

from helpers import start_server
from mutate import CLIENT_FRAMES, Mutator, budget, seed

SCRATCH = 7


class GoodClient(threading.Thread):
    """Writes and reads back the scratch register until told to stop."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.link = ServerLink("a", ("127.0.0.1", port), timeout=5.0).connect()
        assert self.link.attach(1, "uart0") == Status.OK
        self.done = threading.Event()
        self.accesses = 0
        self.failures: list[str] = []

    def run(self) -> None:
        value = 0
        while not self.done.is_set():
            value = (value + 1) & 0xFF
            w = self.link.io(1, "uart0", AccessKind.PORT, SCRATCH, 1, Direction.WRITE, value)
            r = self.link.io(1, "uart0", AccessKind.PORT, SCRATCH, 1, Direction.READ)
            self.accesses += 2
            if w != (Status.OK, 0) or r != (Status.OK, value):
                self.failures.append(f"wrote {value:#x}: {w}, read back {r}")
                return


def _hostile(rng: random.Random, mut: Mutator, port: int) -> None:
    """One connection: maybe a valid HELLO first, then mutated frames; read a little."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.settimeout(0.2)
        if rng.random() < 0.7:
            s.sendall(codec.encode(m.Hello(name=f"fuzz{rng.randrange(100)}")))
        try:
            for _ in range(rng.randint(1, 4)):
                s.sendall(mut.stream())
            s.recv(65536)
        except OSError:
            pass  # refused and closed: that is the point


def test_a_live_server_survives_mutated_frames_and_keeps_serving(tmp_path):
    server, port = start_server("uart0=uart16550", "rtc0=cmos-rtc",
                                extra=("--log-level", "info"))
    good = GoodClient(port)
    good.start()
    try:
        rng = random.Random(seed() + 4)
        mut = Mutator(rng, CLIENT_FRAMES)
        connections = 0
        for _ in budget():
            _hostile(rng, mut, port)
            connections += 1
            assert not good.failures, good.failures
        good.done.set()
        good.join(10)
        assert not good.failures, good.failures
        assert good.accesses > 0 and connections > 10
        assert server.p.poll() is None, server.output()
        # Still serving, and a new client is welcome.
        again = ServerLink("a", ("127.0.0.1", port)).connect()
        assert again.attach(2, "rtc0") == Status.OK
        again.close()
    finally:
        good.done.set()
        good.link.close()
        server.stop()
    log = server.output()
    assert "Traceback" not in log and "internal error" not in log, log[-4000:]
