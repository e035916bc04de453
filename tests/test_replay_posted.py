"""Differential replay with shadows and posted writes on (FEATURE_POSTED).

The issue asks: "replay the recorded Linux traces with shadows and posting on, and get
the same read values and interrupt lines", and "every shadow answer must equal what
the model would have answered at that point". Every trace of tests/traces/ (see
tests/test_replay.py, whose trace-side shadows and documented QEMU differences are
reused here) is replayed through the real path, an in-process Server over loopback
TCP, in three ways:

* ``sync``: a ``ServerLink(posting=False)``, every access a ``link.io`` round trip,
  exactly as test_replay does: the reference;
* ``posted``: a ``ServerLink`` with posting on (the default), the accesses made by the
  guest-facing path, a :class:`~remote_hw.client.vmm.bus.Bus` port range mapped to a
  :class:`~remote_hw.client.agent.RemoteDevice` built from a ``MapSpec`` as the agent
  builds it: shadowed reads are answered locally, postable writes are posted. After
  every write (posted or not) and every locally answered read, a *barrier*: a round
  trip on the same connection that changes nothing (see :meth:`Replayer.barrier`).
  Posted writes are applied in order with everything else of the connection, so when
  the barrier's answer is back, every interrupt and SHADOW they caused has been
  delivered. Then, per access: the interrupt transitions must equal the ``sync`` run's;
  a locally answered read must equal the model's register, read on the server side
  under the instance lock with no side effect (``model.status()`` before and after must
  be equal); the client's shadow must be the model's current one, and must already
  have been when the last interrupt reached the client (the server sends the shadow
  first); and a posted write must have left the shadow as it was;
* ``stream``: as ``posted``, but with barriers only where the outside world acts (before
  and after the IN/KEY input groups, which the model must see after every access
  before them) and at the end, so posted writes really are in flight while later reads
  are answered locally or forwarded. Read values must still equal ``sync``'s one by
  one; the interrupt transitions are compared per stretch of accesses between inputs.

The ``posted`` and ``stream`` runs are also compared with QEMU's recording through
test_replay's ``ALLOWED`` list: the documented differences, and only those, may show,
and for ``posted`` they must be exactly the ``sync`` run's.

The barrier is a repeated ATTACH of a second VM's instance (``BARRIER_VM``), which
touches nothing of the VM replayed. (A repeated ATTACH of the device itself once
cleared the client's shadow without the server sending it again;
``test_repeated_attach_keeps_the_shadow`` keeps that fixed.)

``test_polled_input_reaches_the_shadow`` covers what the traces do not: input while
the driver polls with interrupts off, where only ``to_guest`` can publish the shadow.

``pytest -s`` prints a summary: per trace and run, reads answered locally and
forwarded, writes posted and synchronous, and how many answers were checked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_replay import ALLOWED, SHADOWS, TRACES, VM_ID, Mismatch

from remote_hw.client.agent import RemoteDevice
from remote_hw.client.vmm.bus import Bus
from remote_hw.config import DeviceSpec, MapSpec
from remote_hw.devices.base import EVENT_RESET_REQUEST, ByteRegisters
from remote_hw.devices.tracefmt import TraceRecord, format_record, read_trace
from remote_hw.input.scancodes import ScancodeDecoder
from remote_hw.net.link import ServerLink
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import AccessKind, Direction, Status
from remote_hw.server.controller import Controller, Instance
from remote_hw.server.listener import Server

#: A second VM with its own instance of the device: re-attaching it is the barrier.
BARRIER_VM = VM_ID + 1
MODES = ("sync", "posted", "stream")
_INPUT_OPS = ("IN", "KEY", "TIMEOUT", "IRQ", "AUXIRQ")

# What one access or input group was followed by: (trace line, "access" | "input",
# IRQ levels, AUXIRQ levels, reset-request events).
Lines = tuple[int, str, tuple[int, ...], tuple[int, ...], int]


@dataclass
class Run:
    trace: str
    kind: str
    mode: str
    reads: list[tuple[int, int]] = field(default_factory=list)   # (trace line, value)
    after: list[Lines] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)      # against QEMU
    local_reads: int = 0
    forwarded_reads: int = 0
    posted_writes: int = 0
    sync_writes: int = 0
    model_checks: int = 0     # local answers compared with the model's register
    shadow_checks: int = 0    # client shadow compared with the model's current one
    barriers: int = 0
    post_failures: int = 0
    shadow_state: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def undocumented(self) -> list[Mismatch]:
        return [mm for mm in self.mismatches if mm.allowed is None]


def _mask(offsets: object) -> int:
    return sum(1 << off for off in offsets)  # type: ignore[attr-defined]


def coarse(after: list[Lines]) -> list[Lines]:
    """Merge each stretch of accesses between inputs into one entry (keyed by the line
    of its last access): what a ``stream`` run can compare."""
    out: list[Lines] = []
    acc: list[Any] | None = None
    for line, what, irq, aux, resets in after:
        if what == "access":
            if acc is None:
                acc = [line, [], [], 0]
            acc[0] = line
            acc[1].extend(irq)
            acc[2].extend(aux)
            acc[3] += resets
            continue
        if acc is not None:
            out.append((acc[0], "access", tuple(acc[1]), tuple(acc[2]), acc[3]))
            acc = None
        out.append((line, what, irq, aux, resets))
    if acc is not None:
        out.append((acc[0], "access", tuple(acc[1]), tuple(acc[2]), acc[3]))
    return out


class Replayer:
    """One replay of one trace in one mode (see the module docstring)."""

    def __init__(self, path: Path, mode: str) -> None:
        assert mode in MODES
        self.path = path
        self.mode = mode
        trace = read_trace(path)
        self.records = trace.records
        words = trace.meta["device"].split()
        self.dev_id, self.kind = words[:2]
        opts = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        self.base = int(opts["base"], 0)
        self.irq = int(opts["irq"], 0)
        self.run = Run(path.name, self.kind, mode)
        self.trace_shadow: Any = SHADOWS[self.kind]()
        self.allowed = [a for a in ALLOWED if a.kind == self.kind]
        self.levels: list[int] = []
        self.aux_levels: list[int] = []
        self.events: list[str] = []
        # The client's shadow as each interrupt reached the client (posting runs).
        self.irq_shadows: list[tuple[dict[int, int], int]] = []

    # -- the observations -------------------------------------------------------------

    def _on_interrupt(self, vm: int, dev: str, line: int, level: bool, *_: Any) -> None:
        if vm == VM_ID and dev == self.dev_id:
            self.levels.append(int(level))
            sh = self.sh
            self.irq_shadows.append((dict(sh.reads), sh.posted))

    def _on_event(self, vm: int, dev: str, name: str, *_: Any) -> None:
        if vm == VM_ID and dev == self.dev_id:
            self.events.append(name)

    def _take(self) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        got = (tuple(self.levels), tuple(self.aux_levels),
               sum(1 for e in self.events if e == EVENT_RESET_REQUEST))
        del self.levels[:], self.aux_levels[:], self.events[:]
        return got

    def check(self, what: str, rec: TraceRecord, expected: object, got: object) -> None:
        """Against QEMU's recording, with test_replay's documented differences."""
        if expected == got:
            return
        mm = Mismatch(rec.line, what, format_record(rec), expected, got)
        for a in self.allowed:
            if a.what == what and a.applies(self.trace_shadow, rec, expected, got):
                mm.allowed = a.name
                break
        self.run.mismatches.append(mm)

    # -- the server side, read directly -----------------------------------------------

    def barrier(self) -> None:
        """A round trip on the replaying link that changes nothing of the VM replayed:
        once its answer is back, the server has applied every earlier frame (POSTs
        included) and the client has taken every INTERRUPT, EVENT and SHADOW sent
        before it."""
        assert self.link.attach(BARRIER_VM, self.dev_id) == Status.OK
        self.run.barriers += 1

    def check_shadow(self, rec: TraceRecord,
                     unchanged: tuple[dict[int, int], int] | None = None) -> None:
        """After a barrier: the client's shadow is the model's current one; so was it
        when the last interrupt since the previous check reached the client (the
        server sends the shadow first); and, after a posted write, it is the one
        before that write (``unchanged``: a posted write changes no shadow)."""
        sh = self.sh
        with self.inst.lock:
            want = self.inst.model.shadow()
        model = (dict(want.reads) if want is not None else {},
                 _mask(want.posted) if want is not None else 0)
        where = f"line {rec.line} ({format_record(rec)})"
        assert (sh.reads, sh.posted) == model, (
            f"{where}: the client's shadow is reads={sh.reads} posted={sh.posted:#x}, "
            f"the model's is reads={model[0]} posted={model[1]:#x}")
        if self.irq_shadows:
            at_irq = self.irq_shadows[-1]
            del self.irq_shadows[:]
            assert at_irq == model, (
                f"{where}: when the interrupt arrived the client's shadow was "
                f"reads={at_irq[0]} posted={at_irq[1]:#x}, the model's is "
                f"reads={model[0]} posted={model[1]:#x}")
        if unchanged is not None:
            assert unchanged == model, (
                f"{where}: a posted write changed the shadow from reads={unchanged[0]} "
                f"posted={unchanged[1]:#x} to reads={model[0]} posted={model[1]:#x}")
        self.run.shadow_checks += 1

    def check_local_read(self, rec: TraceRecord, offset: int, value: int) -> None:
        """After a barrier: what the model answers at ``offset`` now, read with no side
        effect (the shadow contract), equals the locally answered ``value``."""
        model = self.inst.model
        assert isinstance(model, ByteRegisters)
        with self.inst.lock:
            before = model.status()
            want = model.read_byte(offset) & 0xFF
            after = model.status()
        assert before == after, (
            f"line {rec.line} ({format_record(rec)}): reading shadowed offset {offset} "
            f"changed the model: {before} -> {after}")
        assert value == want, (
            f"line {rec.line} ({format_record(rec)}): answered {value:#04x} from the "
            f"shadow, the model holds {want:#04x}")
        self.run.model_checks += 1

    # -- the accesses -----------------------------------------------------------------

    def read(self, rec: TraceRecord) -> int:
        assert rec.offset is not None and rec.size is not None
        if self.mode == "sync":
            status, value = self.link.io(VM_ID, self.dev_id, AccessKind.PORT, rec.offset,
                                         rec.size, Direction.READ)
            assert status == Status.OK, f"line {rec.line}: {Status(status).name}"
            self.run.forwarded_reads += 1
            return value
        dev = self.dev
        local = dev.local_reads
        value = self.bus.port_read(self.base + rec.offset, rec.size)
        assert not dev.failing, f"line {rec.line}: the device failed"
        if dev.local_reads != local:
            self.run.local_reads += 1
            if self.mode == "posted":
                self.barrier()
                self.check_local_read(rec, rec.offset, value)
                self.check_shadow(rec)
        else:
            self.run.forwarded_reads += 1
            if self.mode == "posted":  # a round trip itself: no barrier needed
                self.check_shadow(rec)
        return value

    def write(self, rec: TraceRecord) -> None:
        assert rec.offset is not None and rec.size is not None and rec.value is not None
        if self.mode == "sync":
            status, _ = self.link.io(VM_ID, self.dev_id, AccessKind.PORT, rec.offset,
                                     rec.size, Direction.WRITE, rec.value)
            assert status == Status.OK, f"line {rec.line}: {Status(status).name}"
            self.run.sync_writes += 1
            return
        dev = self.dev
        posted = dev.posted
        before = (dict(self.sh.reads), self.sh.posted)
        self.bus.port_write(self.base + rec.offset, rec.size, rec.value)
        assert not dev.failing, f"line {rec.line}: the device failed"
        was_posted = dev.posted != posted
        if was_posted:
            self.run.posted_writes += 1
        else:
            self.run.sync_writes += 1
        if self.mode == "posted":
            # Interrupts a posted write raises arrive on their own: wait for them.
            self.barrier()
            self.check_shadow(rec, before if was_posted else None)

    # -- the replay -------------------------------------------------------------------

    def replay(self) -> Run:
        records = self.records
        run = self.run
        posting = self.mode != "sync"
        ctl = Controller("replay-posted", [DeviceSpec(self.dev_id, self.kind)])
        srv = Server(ctl, "127.0.0.1", 0).start()
        self.link = ServerLink("replay-posted", srv.address, client_name="replay-posted",
                               on_interrupt=self._on_interrupt, on_event=self._on_event,
                               posting=posting)
        self.sh = self.link.shadow_for(VM_ID, self.dev_id)
        start = time.perf_counter()
        try:
            self.link.connect()
            assert bool(self.link.features & m.FEATURE_POSTED) == posting
            assert self.link.attach(VM_ID, self.dev_id) == Status.OK
            (inst,) = ctl.instances()
            self.inst: Instance = inst
            assert self.link.attach(BARRIER_VM, self.dev_id) == Status.OK
            assert len(ctl.instances()) == 2  # the barrier VM has an instance of its own
            end = max(r.offset + r.size - 1 for r in records  # type: ignore[operator]
                      if r.op in ("R", "W"))
            spec = MapSpec("port", self.base, self.base + end, "replay-posted",
                           self.dev_id, (self.irq,))
            self.dev = RemoteDevice(self.link, VM_ID, spec)
            self.bus = Bus()
            self.bus.map_ports(spec.start, spec.end, self.dev)
            if self.mode == "posted":
                self.check_shadow(records[0])

            recorder = self

            class AuxRecorder:
                def set_level(self, level: bool) -> None:
                    recorder.aux_levels.append(int(level))

            if self.kind == "i8042":
                with inst.lock:
                    inst.model.aux_irq = AuxRecorder()  # type: ignore[attr-defined]
            decoder = ScancodeDecoder(2)
            self._take()

            def expected_lines(i: int) -> tuple[list[int], list[int], int]:
                irq: list[int] = []
                aux: list[int] = []
                while i < len(records) and records[i].op in ("IRQ", "AUXIRQ"):
                    (irq if records[i].op == "IRQ" else aux).append(records[i].value)
                    i += 1
                return irq, aux, i

            last_access = 0
            i = 0
            while i < len(records):
                rec = records[i]
                if rec.op in ("R", "W"):
                    if rec.op == "R":
                        value = self.read(rec)
                        run.reads.append((rec.line, value))
                        self.check("value", rec, rec.value, value)
                    else:
                        self.write(rec)
                        self.trace_shadow.write(rec.offset, rec.value)
                    exp_irq, exp_aux, i = expected_lines(i + 1)
                    want_reset = i < len(records) and records[i].op == "RESET"
                    if want_reset:
                        i += 1
                    last_access = rec.line
                    if self.mode == "stream":
                        continue  # compared per stretch, at the next barrier
                    irq, aux, resets = self._take()
                    run.after.append((rec.line, "access", irq, aux, resets))
                    self.check("irq", rec, exp_irq, list(irq))
                    if self.kind == "i8042":
                        self.check("auxirq", rec, exp_aux, list(aux))
                    self.check("reset", rec, int(want_reset), resets)
                elif rec.op in ("IN", "KEY", "TIMEOUT"):
                    if self.mode == "stream":
                        # The input comes after every access before it, as in QEMU.
                        self.barrier()
                        if last_access:
                            run.after.append((last_access, "access", *self._take()))
                            last_access = 0
                        del self.irq_shadows[:]
                    exp_irq, exp_aux = [], []
                    while i < len(records) and records[i].op in _INPUT_OPS:
                        q = records[i]
                        if q.op == "IN":
                            inst.to_guest(bytes((q.value,)))  # type: ignore[arg-type]
                        elif q.op == "KEY":
                            model = inst.model
                            for code, pressed in decoder.feed(bytes((q.value,))):  # type: ignore[arg-type]
                                with inst.lock:
                                    assert model.key_event(code, pressed)  # type: ignore[attr-defined]
                        elif q.op == "IRQ":
                            exp_irq.append(q.value)  # type: ignore[arg-type]
                        elif q.op == "AUXIRQ":
                            exp_aux.append(q.value)  # type: ignore[arg-type]
                        i += 1
                    self.barrier()
                    irq, aux, resets = self._take()
                    run.after.append((rec.line, "input", irq, aux, resets))
                    self.check("irq-input", rec, exp_irq, list(irq))
                    if self.kind == "i8042":
                        self.check("auxirq-input", rec, exp_aux, list(aux))
                    if posting:
                        self.check_shadow(rec)
                else:
                    raise AssertionError(f"line {rec.line}: unexpected {format_record(rec)}")
            if self.mode == "stream":
                self.barrier()
                if last_access:
                    run.after.append((last_access, "access", *self._take()))
                del self.irq_shadows[:]  # many accesses ago: only the last state counts
                self.check_shadow(records[-1])
            assert decoder.unknown == 0
            run.post_failures = self.link.post_failures
            if posting:
                run.shadow_state = self.dev.shadow.describe()
                assert self.dev.posted == run.posted_writes
                assert self.dev.local_reads == run.local_reads
        finally:
            run.seconds = time.perf_counter() - start
            self.link.close()
            srv.stop()
        return run


def replay(path: Path, mode: str) -> Run:
    return Replayer(path, mode).replay()


# -- the tests ---------------------------------------------------------------------------

_RUNS: dict[tuple[str, str], Run] = {}


def _run(path: Path, mode: str) -> Run:
    key = (path.name, mode)
    if key not in _RUNS:
        _RUNS[key] = replay(path, mode)
    return _RUNS[key]


def _first_difference(a: list, b: list, what: str, fmt: Callable[[Any], str] = str) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"first {what} difference: sync {fmt(x)}, posting {fmt(y)}"
    return f"{what}: sync has {len(a)}, posting {len(b)}"


def _key(mm: Mismatch) -> tuple[Any, ...]:
    return (mm.line, mm.what, mm.expected, mm.got, mm.allowed)


def _is_8250(path: Path) -> bool:
    return read_trace(path).meta["device"].split()[1] == "uart16550"


_IDS = [p.name.split(".")[0] for p in TRACES]


@pytest.mark.parametrize("path", TRACES, ids=_IDS)
def test_posted_replay_matches_sync(path: Path) -> None:
    """Shadows and posting on, a barrier after every write and local answer: the same
    read values and the same interrupt transitions after each access and input as the
    synchronous replay; every local answer is the model's register at that point."""
    sync, posted = _run(path, "sync"), _run(path, "posted")
    assert sync.local_reads == sync.posted_writes == 0
    assert sync.reads == posted.reads, _first_difference(
        sync.reads, posted.reads, "read", lambda r: f"line {r[0]}: {r[1]:#04x}")
    assert sync.after == posted.after, _first_difference(
        sync.after, posted.after, "interrupt/event")
    assert posted.model_checks == posted.local_reads
    assert posted.post_failures == 0 and posted.shadow_state.get("failed", 0) == 0
    assert posted.shadow_state.get("lost", 0) == 0
    # QEMU: the documented differences only, and exactly the synchronous run's.
    bad = posted.undocumented
    assert not bad, "\n".join(str(mm) for mm in bad[:30])
    assert [_key(mm) for mm in sync.mismatches] == [_key(mm) for mm in posted.mismatches]


@pytest.mark.parametrize("path", TRACES, ids=_IDS)
def test_streamed_replay_matches_sync(path: Path) -> None:
    """Posted writes really in flight (barriers only around inputs): the same read
    values one by one, the same interrupt transitions per stretch between inputs."""
    sync, stream = _run(path, "sync"), _run(path, "stream")
    assert sync.reads == stream.reads, _first_difference(
        sync.reads, stream.reads, "read", lambda r: f"line {r[0]}: {r[1]:#04x}")
    assert coarse(sync.after) == stream.after, _first_difference(
        coarse(sync.after), stream.after, "interrupt/event")
    assert stream.post_failures == 0 and stream.shadow_state.get("failed", 0) == 0
    bad = stream.undocumented
    assert not bad, "\n".join(str(mm) for mm in bad[:30])
    assert ([_key(mm) for mm in sync.mismatches if mm.what == "value"]
            == [_key(mm) for mm in stream.mismatches])


@pytest.mark.parametrize("path", TRACES, ids=_IDS)
def test_posting_really_happened(path: Path) -> None:
    """The 8250's console loop (LSR polled, THR written) stays local; the i8042 has no
    shadow, so all its accesses wait for the server."""
    for mode in ("posted", "stream"):
        run = _run(path, mode)
        reads = run.local_reads + run.forwarded_reads
        writes = run.posted_writes + run.sync_writes
        if _is_8250(path):
            # com1 (the console) is ~95% local; com2 is mostly the driver's probe.
            assert run.local_reads >= reads // 3, (mode, run.local_reads, reads)
            assert run.posted_writes >= writes // 3, (mode, run.posted_writes, writes)
        else:
            assert run.local_reads == run.posted_writes == 0
            assert run.shadow_state["reads"] == {} and run.shadow_state["posted"] == 0


def test_polled_input_reaches_the_shadow() -> None:
    """What the traces do not cover: a byte received while the driver polls with
    interrupts off (IER 0). No interrupt carries a shadow then; the input itself must
    (``Instance.to_guest``), or LSR would read "nothing received" locally forever."""
    ctl = Controller("polled", [DeviceSpec("uart0", "uart16550")])
    srv = Server(ctl, "127.0.0.1", 0).start()
    levels: list[bool] = []
    link = ServerLink("polled", srv.address, client_name="polled",
                      on_interrupt=lambda vm, dev, line, level, *_: levels.append(level))
    try:
        link.connect()
        assert link.attach(VM_ID, "uart0") == Status.OK
        (inst,) = ctl.instances()
        assert link.attach(BARRIER_VM, "uart0") == Status.OK
        dev = RemoteDevice(link, VM_ID, MapSpec("port", 0x3F8, 0x3FF, "polled", "uart0", (4,)))
        bus = Bus()
        bus.map_ports(0x3F8, 0x3FF, dev)
        assert bus.port_read(0x3F9, 1) == 0          # IER: interrupts off
        assert bus.port_read(0x3FD, 1) == 0x60       # LSR: nothing received ...
        assert dev.local_reads == 2                  # ... answered here
        for byte in b"ok":
            inst.to_guest(bytes((byte,)))
            assert link.attach(BARRIER_VM, "uart0") == Status.OK  # the barrier
            assert bus.port_read(0x3FD, 1) == 0x61, "LSR.DR not seen after a barrier"
            assert bus.port_read(0x3F8, 1) == byte
            local = dev.local_reads
            assert bus.port_read(0x3FD, 1) == 0x60 and dev.local_reads == local + 1
        assert levels == []
    finally:
        link.close()
        srv.stop()


def test_repeated_attach_keeps_the_shadow() -> None:
    """A repeated ATTACH of an attached device (the agent attaches once per mapped
    range, so a device mapped twice is attached twice) must leave the client able to
    use the device's shadow: ``ServerLink.attach`` clears the shadow, and the server
    sends it again with the answer even when the device was attached already."""
    ctl = Controller("reattach", [DeviceSpec("uart0", "uart16550")])
    srv = Server(ctl, "127.0.0.1", 0).start()
    link = ServerLink("reattach", srv.address, client_name="reattach")
    try:
        link.connect()
        assert link.attach(VM_ID, "uart0") == Status.OK
        sh = link.shadow_for(VM_ID, "uart0")
        first = (dict(sh.reads), sh.posted)
        assert first[0] and first[1]
        assert link.attach(VM_ID, "uart0") == Status.OK
        # Something that changes nothing, so no shadow change brings it back either.
        assert link.io(VM_ID, "uart0", AccessKind.PORT, 7, 1, Direction.READ)[0] == Status.OK
        assert (dict(sh.reads), sh.posted) == first, sh.describe()
    finally:
        link.close()
        srv.stop()


def test_posted_replay_summary() -> None:
    """The numbers behind the tests above (pytest -s)."""
    for path in TRACES:
        for mode in MODES:
            _run(path, mode)
    print()
    print(f"{'trace':22} {'run':7} {'reads':>6} {'local':>6} {'fwd':>6} {'writes':>6} "
          f"{'posted':>6} {'sync':>6} {'checked':>7} {'shadows':>7} {'barriers':>8} "
          f"{'secs':>6}")
    for (name, mode), r in sorted(_RUNS.items(), key=lambda kv: (kv[0][0],
                                                                  MODES.index(kv[0][1]))):
        reads = r.local_reads + r.forwarded_reads
        writes = r.posted_writes + r.sync_writes
        print(f"{name.split('.')[0]:22} {mode:7} {reads:6} {r.local_reads:6} "
              f"{r.forwarded_reads:6} {writes:6} {r.posted_writes:6} {r.sync_writes:6} "
              f"{r.model_checks:7} {r.shadow_checks:7} {r.barriers:8} {r.seconds:6.2f}")
