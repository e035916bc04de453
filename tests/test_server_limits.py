"""The server's limit parts: safe log text, the rate limiter, the connection gate,
the accept pacer, the outbox and the watchdog's decisions, without sockets; and the
pacing of a flood of refused connections on a real listener (tests/test_hardening.py
drives the limits through real server processes)."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time

import pytest

from remote_hw.net.logsafe import RateLimitedLog, safe_text
from remote_hw.protocol import CLOSED
from remote_hw.protocol import messages as m
from remote_hw.server.limits import AcceptPacer, ConnectionGate, Limits
from remote_hw.server.outbox import Outbox
from remote_hw.server.watchdog import Watchdog

from helpers import wait_until


def test_safe_text_escapes_controls_and_caps():
    assert safe_text("plain text") == "plain text"
    assert safe_text("a\nb\r\x1b[2J\\n\u2028") == "a\\nb\\r\\x1b[2J\\\\n\\u2028"
    out = safe_text("x" * 500, cap=10)
    assert out == "x" * 10 + "...[490 more characters]"
    assert "\n" not in safe_text("\n" * 1000)


def test_rate_limited_log_counts_what_it_suppresses(caplog):
    lim = RateLimitedLog(logging.getLogger("t"), interval=0.2, burst=3)
    with caplog.at_level(logging.WARNING):
        sent = [lim("line %d", i) for i in range(100)]
        assert sent.count(True) == 3 and lim.suppressed == 97
        time.sleep(0.25)
        assert lim("again")
    assert "again (97 similar line(s) suppressed before this one)" in caplog.text
    assert len(caplog.records) == 4


def test_gate_counts_total_and_per_peer():
    gate = ConnectionGate(Limits(max_connections=3, max_per_peer=2))
    assert gate.admit("a") is None and gate.admit("a") is None
    assert "--max-per-peer 2" in (gate.admit("a") or "")
    assert gate.admit("b") is None
    assert "--max-connections 3" in (gate.admit("c") or "")
    gate.release("a")
    assert gate.admit("c") is None
    for host in ("a", "b", "c"):
        gate.release(host)
    assert gate.total == 0 and not gate._per_peer   # nothing remembered per address


def test_gate_says_full():
    gate = ConnectionGate(Limits(max_connections=1))
    assert not gate.full
    assert gate.admit("a") is None and gate.full
    gate.release("a")
    assert not gate.full


def test_pacer_pauses_a_flood_not_a_trickle():
    now = [10.0]     # times in quarters: exact in binary
    pacer = AcceptPacer(burst=4, pause=0.25, clock=lambda: now[0])
    assert [pacer.refused() for _ in range(4)] == [False, False, False, True]
    assert pacer.pause_until() == 10.25                 # the end of this window
    now[0] = 10.25
    assert not pacer.refused()                          # a new window
    for window in range(1, 40):                         # 3 per window, for 10 s
        now[0] = 10.25 + window * 0.25
        assert not any(pacer.refused() for _ in range(3))
    assert pacer.pauses == 1
    now[0] = 30.0                                       # the window is long over
    assert pacer.pause_until() == 30.25


def _told_why(s: socket.socket, deadline: float) -> str:
    """The ERROR text a refused connection reads before EOF ('' if none)."""
    from remote_hw.protocol import NEED_DATA, Connection, Role
    conn = Connection(Role.CLIENT)
    s.setblocking(True)
    s.settimeout(max(0.1, deadline - time.monotonic()))
    while True:
        ev = conn.next_event()
        if isinstance(ev, m.Error):
            return ev.text
        if ev is CLOSED:
            return ""
        assert ev is NEED_DATA, ev
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            data = b""
        conn.receive_data(data)


def test_a_flood_of_refused_connections_is_paced_and_each_is_told_why():
    """While the server is full, 80 connections at once: the first ones are refused
    at once, then accepting pauses (the kernel queues or drops the rest, its SYNs
    retried by the connecting side), and in the end every one of them reads the
    ERROR saying why; a client connected before is served all along."""
    from remote_hw.config import DeviceSpec
    from remote_hw.server.controller import Controller
    from remote_hw.server.listener import Server

    from helpers import RawClient
    srv = Server(Controller("a", [DeviceSpec("rtc0", "cmos-rtc")]), "127.0.0.1", 0,
                 limits=Limits(max_connections=3)).start()
    port = srv.address[1]
    flood: list[socket.socket] = []
    try:
        served = RawClient(port, name="served")
        assert served.attach(1, "rtc0").status == 0
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        deadline = time.monotonic() + 5
        while not srv.gate.full:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        lone = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        assert "server full" in _told_why(lone, t0 + 2)   # alone: refused at once
        assert time.monotonic() - t0 < 1.0
        for i in range(80):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i % 8}", 0))
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            flood.append(s)
        assert served.io(1, "rtc0", 1, timeout=2.0).status == 0   # served meanwhile
        deadline = time.monotonic() + 15          # SYNs dropped are retried at 1, 3 s
        told = []
        for s in flood:
            select.select([s], [], [], max(0.0, deadline - time.monotonic()))
            told.append(_told_why(s, deadline))
        assert all("server full: 3 connections open (--max-connections 3)" in t
                   for t in told), told
        assert srv.pacer.pauses >= 1
        assert served.io(1, "rtc0", 1, timeout=2.0).status == 0
        for s in idle:
            s.close()
        deadline = time.monotonic() + 5
        while srv.gate.full:        # their ends are seen in the waiting room
            assert time.monotonic() < deadline
            time.sleep(0.01)
        late = RawClient(port, name="late", timeout=5.0)   # room again: admitted
        assert late.attach(2, "rtc0", timeout=2.0).status == 0
    finally:
        for s in flood:
            s.close()
        srv.stop()


def test_silent_connections_wait_without_a_thread_and_are_told_at_the_deadline():
    """Admitted connections that send nothing wait in the accept thread's selector:
    50 of them start no thread; at the handshake deadline each is sent the ERROR and
    closed there; one that speaks gets its session."""
    from remote_hw.config import DeviceSpec
    from remote_hw.server.controller import Controller
    from remote_hw.server.listener import Server

    from helpers import RawClient
    srv = Server(Controller("a", [DeviceSpec("rtc0", "cmos-rtc")]), "127.0.0.1", 0,
                 limits=Limits(handshake_timeout=1.0)).start()
    port = srv.address[1]
    silent: list[socket.socket] = []
    try:
        before = threading.active_count()
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
        deadline = time.monotonic() + 5
        while srv.gate.total < 50:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert threading.active_count() <= before + 1
        c = RawClient(port, name="speaks")
        assert c.attach(1, "rtc0").status == 0
        t0 = time.monotonic()
        told = [_told_why(s, t0 + 5) for s in silent]
        assert all("no HELLO within 1 s of connecting (--handshake-timeout)" in t
                   for t in told), told
        deadline = time.monotonic() + 5
        while srv.gate.total > 1:       # only the one that spoke is left
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert c.io(1, "rtc0", 1).status == 0
    finally:
        for s in silent:
            s.close()
        srv.stop()


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="--max-queue"):
        Limits(max_queue=0)
    with pytest.raises(ValueError, match="--idle-timeout"):
        Limits(idle_timeout=0)
    with pytest.raises(ValueError, match="--send-timeout"):
        Limits(send_timeout=-1)


def test_outbox_never_blocks_and_overflows_once():
    release = threading.Event()
    written: list[bytes] = []

    def write(data: bytes) -> None:   # a peer that does not read: the write blocks
        release.wait(5)
        written.append(data)

    reasons: list[str] = []
    box = Outbox(write, threading.Lock(), limit=100, name="t", on_overflow=reasons.append)
    t0 = time.monotonic()
    results = [box.put(b"x" * 10) for _ in range(30)]
    assert time.monotonic() - t0 < 0.5        # queued, never waited for the peer
    assert results[:10] == [True] * 10 and not any(results[10:])
    assert len(reasons) == 1 and "100 (--max-queue)" in reasons[0]
    release.set()


def test_outbox_writes_in_order():
    written: list[bytes] = []
    done = threading.Event()

    def write(data: bytes) -> None:
        written.append(data)
        if b"".join(written).endswith(b"9"):
            done.set()

    box = Outbox(write, threading.Lock(), limit=1 << 20, name="t",
                 on_overflow=lambda why: None)
    for i in range(10):
        box.put(str(i).encode())
    assert done.wait(5)
    assert b"".join(written) == b"0123456789"
    box.close()


def test_a_direct_write_sends_what_was_queued_first():
    # The session's own feedback must not overtake an interrupt queued before it: the
    # writer thread only dequeues under the write lock, and a direct writer holding
    # that lock takes what is queued and sends it ahead of its own frame.
    wlock = threading.Lock()
    wire: list[bytes] = []
    box = Outbox(wire.append, wlock, limit=1 << 20, name="t", on_overflow=lambda why: None)
    with wlock:                        # the connection thread is writing its feedback
        box.put(b"irq1")              # a backend raises an interrupt meanwhile
        box.put(b"irq2")
        assert box.queued == 8
        wire.append(box.take() + b"feedback")
    assert box.take() == b"" and box.queued == 0
    time.sleep(0.2)                    # the writer thread found nothing left to send
    assert wire == [b"irq1irq2feedback"]
    box.close()


class _Conn:
    def __init__(self, ready: bool) -> None:
        self.peer = "p"
        self.accepted_at = 0.0
        self.ready = ready
        self.rx = 0
        self.pings: list[int] = []
        self.aborted: list[str] = []
        self.stalled_since: float | None = None

    def ping(self, nonce: int) -> None:
        self.pings.append(nonce)

    def stalled(self, now: float) -> float:
        return now - self.stalled_since if self.stalled_since is not None else 0.0

    def abort(self, why: str) -> None:
        self.aborted.append(why)


def test_watchdog_handshake_deadline():
    dog = Watchdog(Limits(handshake_timeout=2, idle_timeout=9))
    c = _Conn(ready=False)
    dog.watch(c)
    dog.check(1.9)
    assert not c.aborted
    dog.check(2.0)
    assert c.aborted == ["no HELLO within 2 s of connecting (--handshake-timeout)"]


def test_watchdog_pings_then_closes_a_silent_connection_but_not_a_live_one():
    dog = Watchdog(Limits(idle_timeout=9))
    silent, live = _Conn(ready=True), _Conn(ready=True)
    for c in (silent, live):
        dog.watch(c)
    for now in range(0, 10):
        dog.check(float(now))
        live.rx += 1 if now % 4 == 3 else 0   # answers (a PONG) now and then
    assert len(silent.pings) == 2 and len(silent.aborted) == 1
    assert "nothing received for 9 s" in silent.aborted[0]
    assert not live.aborted


def test_watchdog_does_not_blame_peers_for_its_own_pause():
    """A server stopped (SIGSTOP) longer than the timeouts: on SIGCONT nobody is
    closed for the time the server itself did not read."""
    dog = Watchdog(Limits(handshake_timeout=2, idle_timeout=9), tick=0.5)
    new, old = _Conn(ready=False), _Conn(ready=True)
    dog.watch(new)
    dog.watch(old)
    dog.check(0.0)
    dog.check(100.0)          # 100 s later: the process was stopped
    assert not new.aborted and not old.aborted
    dog.check(102.0)
    assert new.aborted        # the deadlines run again from the pause's end


# ------------------------------------------------------------------ a peer that falls behind

def _blocked_box(behind: int = 20):
    """An outbox whose writer is stuck in a write (a peer that stopped reading) until
    ``release`` is set; levels encode as ``b"<key>=<level>;"``."""
    release, writing = threading.Event(), threading.Event()
    wire: list[bytes] = []

    def write(data: bytes) -> None:
        writing.set()
        release.wait(5)
        wire.append(data)

    box = Outbox(write, threading.Lock(), limit=1 << 20, name="t",
                 on_overflow=lambda why: None,
                 encode_level=lambda key, level: f"{key}={int(level)};".encode(),
                 behind=behind)
    box.writing = writing    # type: ignore[attr-defined]
    return box, release, wire


def _drained(box: Outbox, wire: list[bytes]) -> bytes:
    wait_until(lambda: box.queued == 0, "the outbox drained", 5)
    return b"".join(wire)


def test_a_peer_that_is_behind_gets_the_newest_level_per_line_not_every_edge():
    box, release, wire = _blocked_box()
    box.put(b"F" * 30)                  # the writer takes it and blocks: 30 > behind
    assert box.writing.wait(2)         # the writer took it and is blocked
    held = []
    # "a" toggles 1001 times (ends high), "b" twice (back to low: a pulse), "c" once.
    for i in range(1001):
        held.append(box.hold_level("a", i % 2 == 0))
    held += [box.hold_level("b", True), box.hold_level("b", False), box.hold_level("c", True)]
    assert all(held) and box.queued == 30     # nothing was encoded or queued
    release.set()
    assert _drained(box, wire) == b"F" * 30 + b"a=1;b=1;b=0;c=1;"
    assert box.coalesced == 1000
    box.close()


def test_held_levels_go_before_any_later_frame_and_with_a_direct_write():
    box, release, wire = _blocked_box()
    box.put(b"F" * 30)
    assert box.writing.wait(2)         # the writer took it and is blocked
    assert box.hold_level("a", True)
    box.put(b"event;")                # raised after the level: must not overtake it
    assert box.hold_level("a", False)
    assert box.take() == b"a=1;event;a=0;"   # a direct writer (feedback) takes all, in order
    release.set()
    assert _drained(box, wire) == b"F" * 30
    box.close()


def test_levels_are_not_held_while_the_peer_keeps_up():
    box, release, wire = _blocked_box(behind=1000)
    release.set()
    assert not box.hold_level("a", True)    # the caller queues the frame itself
    box.put(b"a=1;")
    assert _drained(box, wire) == b"a=1;"
    assert box.stalled(time.monotonic()) == 0.0
    box.close()


def test_writes_are_cut_into_pieces_so_a_slow_peer_shows_progress():
    wire: list[bytes] = []
    wlock = threading.Lock()
    box = Outbox(wire.append, wlock, limit=1 << 22, name="t", on_overflow=lambda why: None)
    with wlock:                       # queue 3 MiB while nothing can be written
        for _ in range(48):
            box.put(b"x" * 65536)
    assert _drained(box, wire) == b"x" * (48 * 65536)
    assert max(len(w) for w in wire) <= 65536 and len(wire) >= 48
    box.close()


def test_watchdog_closes_a_peer_that_takes_nothing_for_the_send_timeout():
    dog = Watchdog(Limits(idle_timeout=60, send_timeout=5), tick=1)
    stuck, slow = _Conn(ready=True), _Conn(ready=True)
    for c in (stuck, slow):
        dog.watch(c)
        c.stalled_since = 0.0
    for now in range(0, 6):
        stuck.rx += 1                  # it still sends requests: rx moves, sends do not
        slow.rx += 1
        if now % 2:
            slow.stalled_since = float(now)   # a write completed now and then
        dog.check(float(now))
    assert len(stuck.aborted) == 1 and "nothing taken for 5 s" in stuck.aborted[0]
    assert "--send-timeout 5" in stuck.aborted[0]
    assert not slow.aborted


def test_watchdog_does_not_count_its_own_pause_as_a_send_stall():
    dog = Watchdog(Limits(idle_timeout=60, send_timeout=5), tick=0.5)
    c = _Conn(ready=True)
    dog.watch(c)
    c.stalled_since = 0.0
    dog.check(0.0)
    dog.check(20.0)                  # this process was stopped for 20 s
    for now in (20.5, 21.5, 22.5, 23.5, 24.5):
        c.rx += 1
        dog.check(now)
    assert not c.aborted
    dog.check(25.0)
    assert len(c.aborted) == 1


def test_a_level_held_while_the_writer_is_idle_goes_out_when_the_kernel_drains():
    """Behind because of the kernel's queue (SIOCOUTQNSD), not this one: the writer
    thread is idle when the level is held, and must still look again and send it
    once the peer has taken what the kernel held (it once slept until the next frame,
    and a client that had fallen behind never got its line's newest level)."""
    wire: list[bytes] = []
    unsent = [100_000]                    # what the kernel holds for the peer
    box = Outbox(wire.append, threading.Lock(), limit=1 << 20, name="t",
                 on_overflow=lambda why: None,
                 encode_level=lambda key, level: f"{key}={int(level)};".encode(),
                 behind=1000, unsent=lambda: unsent[0])
    box.put(b"F;")                        # the writer writes it and measures the kernel
    wait_until(lambda: box.queued == 0 and wire, "the first write")
    assert box.hold_level("a", True)      # behind: held, with the writer idle
    time.sleep(0.1)
    assert b"".join(wire) == b"F;"
    unsent[0] = 0                         # the peer read everything
    wait_until(lambda: b"".join(wire) == b"F;a=1;", "the held level to go out", 5)
    box.close()


def test_holding_starts_on_a_fresh_look_at_the_kernel_and_restarts_the_stall_clock():
    """The writer's last look at the kernel's queue may be old: a peer that was
    behind then and has read everything since is not held for (nor closed as
    stalled, by a clock that started at that old write)."""
    wire: list[bytes] = []
    unsent = [100_000]
    box = Outbox(wire.append, threading.Lock(), limit=1 << 20, name="t",
                 on_overflow=lambda why: None,
                 encode_level=lambda key, level: f"{key}={int(level)};".encode(),
                 behind=1000, unsent=lambda: unsent[0])
    box.put(b"F;")
    wait_until(lambda: box.queued == 0 and wire, "the first write")
    unsent[0] = 0                      # the peer read it all; nobody looked since
    assert not box.hold_level("a", True)   # so the caller queues the frame itself
    unsent[0] = 100_000                # behind again when that frame is written
    box.put(b"a=1;")
    wait_until(lambda: box.queued == 0 and len(wire) == 2, "the second write")
    time.sleep(0.3)                    # the writer's last progress: 0.3 s ago
    assert box.hold_level("a", False)  # holding starts, and so does its stall clock
    assert box.stalled(time.monotonic()) < 0.2
    box.close()
