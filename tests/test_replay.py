"""Differential replay: what Linux's drivers did to QEMU's devices, done to ours.

Every trace in tests/traces/ (docs/traces.md) is replayed through the real path: an
in-process remote-hw Server over a Controller, a real ServerLink as the client, real
loopback TCP. Each R record becomes a read over the link whose value is compared with
QEMU's; each W a write; IN bytes reach the device through the instance's ``to_guest``
(the path a backend uses); KEY bytes are decoded (set 2) into key events for the
model's ``key_event``. The interrupt transitions the client receives through the link
(``on_interrupt``) are compared with the IRQ records that follow each access or input,
and a RESET record must be matched by a ``reset-request`` event on the link.

Determinism without sleeping: interrupts raised by an access travel in the same write
as its feedback, so they have been delivered when ``link.io`` returns; interrupts
raised by an input are sent by the server before ``to_guest``/``key_event`` returns,
so a round trip on the same connection afterwards (a repeated ATTACH, which changes
nothing) is a barrier after which they have been delivered too.

IRQ 12 (the i8042's aux line, trace op AUXIRQ) has no wire line in protocol v1 (the
controller gives a model one line), so it is compared on the server side: a recorder
replaces the model's ``aux_irq``.

Mismatches are allowed only where ``ALLOWED`` (mirroring the list in docs/devices.md)
names the difference and its predicate, computed from the trace itself, holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from remote_hw.config import DeviceSpec
from remote_hw.devices.base import EVENT_RESET_REQUEST
from remote_hw.devices.tracefmt import TraceRecord, format_record, read_trace
from remote_hw.input.scancodes import ScancodeDecoder
from remote_hw.net.link import ServerLink
from remote_hw.protocol.messages import AccessKind, Direction, Status
from remote_hw.server.controller import Controller
from remote_hw.server.listener import Server

TRACES = sorted((Path(__file__).resolve().parent / "traces").glob("*.trace*"))
VM_ID = 1


# -- shadows: what the trace itself says about registers the predicates need ----------

class I8042Shadow:
    """Register state the trace implies (independent of the model under test)."""

    def __init__(self) -> None:
        self.a2 = 1            # status bit 3: the last write went to port 0x64
        self.sys = 0           # status bit 2: the system flag
        self.cb = 0x03         # the command byte (QEMU's power-on value)
        self.pending: int | None = None

    def write(self, offset: int, value: int) -> None:
        if offset == 4:
            self.a2 = 1
            self.pending = value if (0x60 <= value <= 0x7F or 0xD1 <= value <= 0xD4) else None
            if value == 0xAA:
                self.sys = 1
                self.cb |= 0x04
            elif value == 0xAD:
                self.cb |= 0x10
            elif value == 0xAE:
                self.cb &= ~0x10
            elif value == 0xA7:
                self.cb |= 0x20
            elif value == 0xA8:
                self.cb &= ~0x20
        elif offset == 0:
            self.a2 = 0
            cmd, self.pending = self.pending, None
            if cmd == 0x60:
                self.cb = value
                self.sys = (value >> 2) & 1
            elif cmd is None:
                self.cb &= ~0x10       # a byte sent to the keyboard enables its port
            elif cmd == 0xD4:
                self.cb &= ~0x20


class UartShadow:
    def __init__(self) -> None:
        self.mcr = 0x08        # the model's (and QEMU's) power-on MCR
        self.prev_mcr = 0x08

    def write(self, offset: int, value: int) -> None:
        self.prev_mcr = self.mcr
        if offset == 4:
            self.mcr = value & 0x1F


SHADOWS: dict[str, Callable[[], object]] = {"i8042": I8042Shadow, "uart16550": UartShadow}


# -- the documented differences (docs/devices.md, "Replay against QEMU") --------------

@dataclass(frozen=True)
class Allowance:
    kind: str              # device kind
    what: str              # "value" (a read) or "irq" (IRQ transitions after an access)
    name: str
    reason: str
    applies: Callable[[object, TraceRecord, object, object], bool]


def _status_bits_2_3(sh: I8042Shadow, rec: TraceRecord, expected: int, got: int) -> bool:
    # QEMU keeps status bit 3 at 1 and bit 2 at 1 after the first self-test; the
    # 8042 datasheet makes bit 3 the A2 line of the last write and bit 2 the system
    # flag of the command byte. Everything else in the status byte must agree.
    return (rec.offset == 4
            and got == (expected & ~0x0C) | (sh.a2 << 3) | (sh.sys << 2))


def _irq1_not_gated(sh: I8042Shadow, rec: TraceRecord, expected: list, got: list) -> bool:
    # QEMU holds IRQ 1 low while the keyboard port is disabled (command byte bit 4);
    # on the 8042 that bit only stops the keyboard clock, and bit 0 alone decides.
    return expected == [] and got in ([1], [0]) and sh.cb & 0x11 == 0x11


def _out2_gate(sh: UartShadow, rec: TraceRecord, expected: list, got: list) -> bool:
    # QEMU's 16550 drives the ISA line straight from INTR; on a PC it passes through a
    # buffer enabled by MCR.OUT2, which Linux has not set while it probes.
    return bool(expected) and got == [] and not (sh.mcr | sh.prev_mcr) & 0x08


ALLOWED: list[Allowance] = [
    Allowance("i8042", "value", "i8042-status-bits",
              "status bit 3 = last write was to 0x64, bit 2 = command byte's system flag "
              "(datasheet); QEMU keeps both at 1", _status_bits_2_3),
    Allowance("i8042", "irq", "i8042-irq1-not-gated-by-disable",
              "IRQ 1 follows output-buffer-full and command byte bit 0 only; QEMU also "
              "requires the keyboard port to be enabled (bit 4 clear)", _irq1_not_gated),
    Allowance("uart16550", "irq", "uart-out2-gates-irq",
              "the PC's OUT2 buffer gates the 16550's INTR pin; QEMU does not model it",
              _out2_gate),
]


# -- the replay --------------------------------------------------------------------------

@dataclass
class Mismatch:
    line: int
    what: str
    record: str
    expected: object
    got: object
    allowed: str | None = None

    def __str__(self) -> str:
        tag = f" [documented: {self.allowed}]" if self.allowed else ""
        exp, got = (f"{v:#04x}" if isinstance(v, int) else v for v in (self.expected, self.got))
        return f"line {self.line}: {self.what} after {self.record!r}: QEMU {exp}, " \
               f"remote-hw {got}{tag}"


@dataclass
class Result:
    trace: str
    device: str
    kind: str
    accesses: int = 0
    reads: int = 0
    inputs: int = 0
    irq_checks: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def undocumented(self) -> list[Mismatch]:
        return [m for m in self.mismatches if m.allowed is None]


def _fmt(rec: TraceRecord) -> str:
    return format_record(rec)


def replay(path: Path) -> Result:
    trace = read_trace(path)
    dev_id, kind = trace.meta["device"].split()[:2]
    records = trace.records
    result = Result(path.name, dev_id, kind)
    shadow = SHADOWS[kind]()
    allowed = [a for a in ALLOWED if a.kind == kind]

    levels: list[int] = []                      # IRQ transitions the client received
    events: list[str] = []
    ctl = Controller("replay", [DeviceSpec(dev_id, kind)])
    srv = Server(ctl, "127.0.0.1", 0).start()
    link = ServerLink("replay", srv.address, client_name="replay",
                      on_interrupt=lambda vm, dev, line, level, *_: levels.append(int(level)),
                      on_event=lambda vm, dev, name, *_: events.append(name))
    try:
        link.connect()
        assert link.attach(VM_ID, dev_id) == Status.OK
        (inst,) = ctl.instances()
        aux_levels: list[int] = []

        class AuxRecorder:
            def set_level(self, level: bool) -> None:
                aux_levels.append(int(level))

        if kind == "i8042":
            with inst.lock:
                inst.model.aux_irq = AuxRecorder()  # type: ignore[attr-defined]
        decoder = ScancodeDecoder(2)

        def check(what: str, rec: TraceRecord, expected, got) -> None:
            if expected == got:
                return
            mm = Mismatch(rec.line, what, _fmt(rec), expected, got)
            for a in allowed:
                if a.what == what and a.applies(shadow, rec, expected, got):
                    mm.allowed = a.name
                    break
            result.mismatches.append(mm)

        def take_levels(i: int) -> tuple[list[int], list[int], int]:
            irq, aux = [], []
            while i < len(records) and records[i].op in ("IRQ", "AUXIRQ"):
                (irq if records[i].op == "IRQ" else aux).append(records[i].value)
                i += 1
            return irq, aux, i

        i = 0
        while i < len(records):
            rec = records[i]
            del levels[:], aux_levels[:], events[:]
            if rec.op in ("R", "W"):
                result.accesses += 1
                if rec.op == "R":
                    result.reads += 1
                    status, value = link.io(VM_ID, dev_id, AccessKind.PORT, rec.offset,
                                            rec.size, Direction.READ)
                    assert status == Status.OK, f"line {rec.line}: {Status(status).name}"
                else:
                    status, _ = link.io(VM_ID, dev_id, AccessKind.PORT, rec.offset, rec.size,
                                        Direction.WRITE, rec.value)
                    assert status == Status.OK, f"line {rec.line}: {Status(status).name}"
                    shadow.write(rec.offset, rec.value)  # type: ignore[attr-defined]
                if rec.op == "R":
                    check("value", rec, rec.value, value)
                exp_irq, exp_aux, i = take_levels(i + 1)
                result.irq_checks += 1
                check("irq", rec, exp_irq, list(levels))
                if kind == "i8042":
                    check("auxirq", rec, exp_aux, list(aux_levels))
                want_reset = i < len(records) and records[i].op == "RESET"
                if want_reset:
                    i += 1
                check("reset", rec, [EVENT_RESET_REQUEST] if want_reset else [],
                      [e for e in events if e == EVENT_RESET_REQUEST])
            elif rec.op in ("IN", "KEY", "TIMEOUT"):
                # One group: the inputs QEMU's main loop delivered between two accesses
                # and the line changes they caused (for the 16550 that is IN, TIMEOUT,
                # IRQ: this model reports the character timeout at once, so the whole
                # group is compared as one).
                exp_irq: list[int] = []
                exp_aux: list[int] = []
                while i < len(records) and records[i].op in ("IN", "KEY", "TIMEOUT", "IRQ",
                                                            "AUXIRQ"):
                    q = records[i]
                    if q.op == "IN":
                        result.inputs += 1
                        inst.to_guest(bytes((q.value,)))
                    elif q.op == "KEY":
                        result.inputs += 1
                        model = inst.model
                        for code, pressed in decoder.feed(bytes((q.value,))):
                            with inst.lock:
                                assert model.key_event(code, pressed)  # type: ignore[attr-defined]
                    elif q.op == "IRQ":
                        exp_irq.append(q.value)
                    elif q.op == "AUXIRQ":
                        exp_aux.append(q.value)
                    i += 1
                assert link.attach(VM_ID, dev_id) == Status.OK   # the barrier
                result.irq_checks += 1
                check("irq-input", rec, exp_irq, list(levels))
                if kind == "i8042":
                    check("auxirq-input", rec, exp_aux, list(aux_levels))
            else:
                raise AssertionError(f"line {rec.line}: unexpected {_fmt(rec)}")
        assert decoder.unknown == 0
    finally:
        link.close()
        srv.stop()
    return result


_RESULTS: dict[str, Result] = {}


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.name.split(".")[0])
def test_replay_trace(path: Path) -> None:
    result = replay(path)
    _RESULTS[path.name] = result
    assert result.accesses > 50 and result.reads > 0
    bad = result.undocumented
    assert not bad, (f"{len(bad)} undocumented mismatch(es) in {path.name}:\n"
                     + "\n".join(str(m) for m in bad[:30]))


def test_replay_summary_and_allowances_are_all_used() -> None:
    """Every documented difference still occurs (else the list in docs/devices.md is
    stale), and the totals are printed for that table (pytest -s)."""
    missing = [p.name for p in TRACES if p.name not in _RESULTS]
    for name in missing:
        _RESULTS[name] = replay(next(p for p in TRACES if p.name == name))
    used = {m.allowed for r in _RESULTS.values() for m in r.mismatches}
    assert {a.name for a in ALLOWED} <= used
    print()
    print(f"{'trace':28} {'device':10} {'accesses':>8} {'reads':>6} {'inputs':>6} "
          f"{'mismatches':>10}  documented")
    for r in _RESULTS.values():
        per = {}
        for m in r.mismatches:
            per[m.allowed] = per.get(m.allowed, 0) + 1
        print(f"{r.trace:28} {r.kind:10} {r.accesses:8} {r.reads:6} {r.inputs:6} "
              f"{len(r.mismatches):10}  {per}")
