"""The PC's CMOS real-time clock (MC146818A) behind ports 0x70/0x71.

Offset 0 is the index port (0x70; bit 7 of a write is the NMI mask and is not part of
the index), offset 1 the data port (0x71) for the register the index selects:

======= ==================================================================
index   register
======= ==================================================================
0x00    seconds             0x01 seconds alarm
0x02    minutes             0x03 minutes alarm
0x04    hours (12h: bit 7 = PM)  0x05 hours alarm
0x06    day of week (1 = Sunday)
0x07    day of month        0x08 month          0x09 year (00-99)
0x0A    A: bit 7 UIP (read-only), bits 6:4 divider, bits 3:0 periodic rate
0x0B    B: 7 SET, 6 PIE, 5 AIE, 4 UIE, 3 SQWE, 2 DM (1 = binary), 1 24h, 0 DSE
0x0C    C: 7 IRQF, 6 PF, 5 AF, 4 UF (read-only, cleared by reading)
0x0D    D: bit 7 VRT, always 1 (read-only)
0x0E-7F battery-backed RAM; 0x32 is the century (same format as the year)
======= ==================================================================

The time is not stored: it is ``clock() + offset`` (a UTC epoch in seconds), broken
down as UTC. Guest writes to the time registers and the host's ``set_time`` change the
offset. Nothing runs in the background: the update/alarm/periodic flags are brought up
to date from the clock at every register access (and by ``poll``), so an interrupt
becomes visible when the guest next touches the chip or the server calls ``poll``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from .base import ByteRegisters

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32

TIME_REGS = frozenset((REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY,
                       REG_MONTH, REG_YEAR, REG_CENTURY))

A_UIP = 0x80
A_DV_MASK = 0x70
A_RS_MASK = 0x0F
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_SQWE = 0x08
B_DM_BINARY = 0x04
B_24H = 0x02
B_DSE = 0x01
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
D_VRT = 0x80
HOURS_PM = 0x80
ALARM_DONT_CARE = 0xC0

# Power-on values: 32.768 kHz time base with 1024 Hz periodic rate (what BIOSes
# leave), BCD and 24-hour mode.
RESET_A = 0x26
RESET_B = B_24H

# UIP rises this long before the update at each second boundary (MC146818A datasheet,
# 32.768 kHz time base).
UIP_WINDOW = 244e-6

_UTC = timezone.utc


def _divider_in_reset(reg_a: int) -> bool:
    """DV = 11x holds the divider chain in reset: the clock stands still."""
    return reg_a & 0x60 == 0x60


def _periodic_hz(reg_a: int) -> int:
    """Periodic interrupt rate for the RS bits (32.768 kHz time base); 0 = off."""
    rs = reg_a & A_RS_MASK
    if rs == 0:
        return 0
    if rs < 3:          # 1 and 2 repeat the rates of 8 and 9 on this time base
        rs += 7
    return 65536 >> rs


class CmosRtc(ByteRegisters):
    """An MC146818A-compatible RTC with 128 bytes of CMOS RAM.

    Options: ``clock`` - a callable returning the current UTC epoch as a float
    (default ``time.time``); tests inject a fake one.

    Host-side API: ``now()`` and ``set_time(dt)`` read and set the guest-visible
    time; ``poll()`` and ``next_event()`` let a server drive the interrupt without
    waiting for guest accesses. Like ``feed`` on stream devices, call them with the
    instance lock held. The time and the RAM survive ``reset()`` (they are
    battery-backed); the interrupt enables and flags do not.
    """

    kind = "cmos-rtc"
    window = 2

    def __init__(self, *args: Any, clock: Callable[[], float] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock: Callable[[], float] = clock if clock is not None else time.time
        self._ram = bytearray(128)
        self._ram[REG_A] = RESET_A
        self._ram[REG_B] = RESET_B
        self._ram[REG_D] = D_VRT
        self.index = 0
        self.nmi_masked = False
        self._offset = 0.0          # guest time = clock() + _offset while running
        self._flags = 0             # register C bits 6:4
        self._halted = False        # SET or divider reset: time registers frozen
        self._frozen_at: datetime | None = None
        self._last_sec = math.floor(self.clock())   # last second whose update was seen
        self._last_tick: int | None = None           # last periodic tick seen
        self._irq_level = False
        self.interrupts = 0
        # Data-port handlers by index; everything else is plain RAM.
        self._readers: dict[int, Callable[[int], int]] = {
            REG_A: self._read_a, REG_B: self._read_ram, REG_C: self._read_c,
            REG_D: self._read_d}
        self._writers: dict[int, Callable[[int, int], None]] = {
            REG_A: self._write_a, REG_B: self._write_b, REG_C: self._write_ignored,
            REG_D: self._write_ignored}
        for reg in TIME_REGS:
            self._readers[reg] = self._read_time
            self._writers[reg] = self._write_time

    # -- the Device interface ----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Bring the flags up to date once, read the bytes (ByteRegisters splits a
        wide access), then recompute the interrupt line."""
        self._evaluate()
        value = super().read(offset, size)
        self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """As ``read``: flags first, the bytes, then the interrupt line."""
        self._evaluate()
        super().write(offset, size, value)
        self._update_irq()

    def read_byte(self, offset: int) -> int:
        """Offset 0 (index port) reads 0xFF, as on chipsets where it is write-only;
        offset 1 returns the selected register."""
        if offset != 1:
            return 0xFF
        idx = self.index
        return self._readers.get(idx, self._read_ram)(idx)

    def write_byte(self, offset: int, value: int) -> None:
        """Offset 0 selects a register (bit 7: NMI mask); offset 1 writes it."""
        if offset == 0:
            self.index = value & 0x7F
            self.nmi_masked = bool(value & 0x80)
        else:
            idx = self.index
            self._writers.get(idx, self._write_ram)(idx, value)

    def reset(self) -> None:
        """A RESET pulse: clears PIE, AIE, UIE, SQWE and the flags; keeps the time."""
        self._ram[REG_B] &= ~(B_PIE | B_AIE | B_UIE | B_SQWE) & 0xFF
        self._flags = 0
        self._update_irq()

    def status(self) -> dict[str, Any]:
        """Time, registers (read without side effects) and counters."""
        self._evaluate()
        self._update_irq()
        b = self._ram[REG_B]
        return {
            "time": self.now().isoformat(),
            "running": not self._halted,
            "offset": self._offset,
            "index": self.index,
            "nmi_masked": self.nmi_masked,
            "reg_a": self._reg_a_value(),
            "reg_b": b,
            "reg_c": self._reg_c_value(),
            "reg_d": D_VRT,
            "binary": bool(b & B_DM_BINARY),
            "hour_24": bool(b & B_24H),
            "irq_level": self._irq_level,
            "interrupts": self.interrupts,
        }

    # -- host-side API -----------------------------------------------------------------

    def now(self) -> datetime:
        """The time the guest sees, as an aware UTC datetime.

        While the guest holds the clock (SET or divider reset) this is what the time
        registers hold; if they do not form a valid date, the time at which the clock
        was stopped.
        """
        if self._halted:
            dt = self._decode_time()
            if dt is None:
                assert self._frozen_at is not None
                return self._frozen_at
            return dt
        return datetime.fromtimestamp(self.clock() + self._offset, _UTC)

    def set_time(self, dt: datetime) -> None:
        """Set the guest-visible time. A naive ``dt`` is taken as the RTC's own wall
        time (UTC); an aware one is converted to UTC. Sub-second parts are kept."""
        dt = dt.replace(tzinfo=_UTC) if dt.tzinfo is None else dt.astimezone(_UTC)
        self._evaluate()
        if self._halted:
            # The guest is setting the clock itself; the registers it will release
            # are what counts, so put the host's time there.
            self._store_time(dt)
            self._frozen_at = dt
        else:
            self._offset = dt.timestamp() - self.clock()
            self._rebase()
        self._update_irq()

    def poll(self) -> None:
        """Bring the interrupt flags and the IRQ line up to date with the clock."""
        self._evaluate()
        self._update_irq()

    def next_event(self) -> float | None:
        """The earliest ``clock()`` value at which an enabled interrupt may become due
        (call ``poll`` then; it may find nothing, e.g. an alarm that does not match
        yet), or None when no interrupt is enabled."""
        b = self._ram[REG_B]
        now = self.clock()
        due: list[float] = []
        if b & (B_UIE | B_AIE) and not self._halted:
            t = now + self._offset
            due.append(now + (math.floor(t) + 1 - t))
        hz = _periodic_hz(self._ram[REG_A])
        if b & B_PIE and hz and not _divider_in_reset(self._ram[REG_A]):
            due.append((math.floor(now * hz) + 1) / hz)
        return min(due) if due else None

    # -- time keeping ------------------------------------------------------------------

    def _guest_time(self) -> float:
        return self.clock() + self._offset

    def _rebase(self) -> None:
        """After the time was set: the updates seen so far end here (no spurious UF)."""
        self._last_sec = math.floor(self._guest_time())

    def _evaluate(self) -> None:
        """Raise UF/AF for every update since the last look, PF for periodic ticks."""
        now = self.clock()
        if not self._halted:
            sec = math.floor(now + self._offset)
            last = self._last_sec
            if sec > last:
                self._flags |= C_UF
                if not self._flags & C_AF and self._alarm_hit(last + 1, sec):
                    self._flags |= C_AF
            self._last_sec = sec
        reg_a = self._ram[REG_A]
        hz = _periodic_hz(reg_a)
        if hz and not _divider_in_reset(reg_a):
            tick = math.floor(now * hz)
            if self._last_tick is not None and tick > self._last_tick:
                self._flags |= C_PF
            self._last_tick = tick
        else:
            self._last_tick = None

    def _alarm_hit(self, first: int, last: int) -> bool:
        """Whether an update at any second in [first, last] matches the alarm."""
        ram = self._ram
        want_s = self._alarm_field(ram[REG_SECONDS_ALARM], self._dec, 59)
        want_m = self._alarm_field(ram[REG_MINUTES_ALARM], self._dec, 59)
        want_h = self._alarm_field(ram[REG_HOURS_ALARM], self._dec_hour, 23)
        if -1 in (want_s, want_m, want_h):
            return False            # an impossible alarm value never matches
        if last - first >= 86399:
            return True             # a whole day passed: every alarm time occurred
        a, b = first % 86400, last % 86400
        if a <= b:
            return self._alarm_in(a, b, want_h, want_m, want_s)
        return (self._alarm_in(a, 86399, want_h, want_m, want_s)
                or self._alarm_in(0, b, want_h, want_m, want_s))

    @staticmethod
    def _alarm_in(a: int, b: int, want_h: int | None, want_m: int | None,
                  want_s: int | None) -> bool:
        """Whether a second of the day in [a, b] matches (None = don't care)."""
        for h in (range(24) if want_h is None else (want_h,)):
            hs = h * 3600
            if hs > b or hs + 3599 < a:
                continue
            for m in (range(60) if want_m is None else (want_m,)):
                ms = hs + m * 60
                if ms > b or ms + 59 < a:
                    continue
                if want_s is None or a <= ms + want_s <= b:
                    return True
        return False

    @staticmethod
    def _alarm_field(raw: int, decode: Callable[[int], int | None], top: int) -> int | None:
        """None for don't-care (11xxxxxx), -1 for a value that can never match."""
        if raw & ALARM_DONT_CARE == ALARM_DONT_CARE:
            return None
        v = decode(raw)
        return -1 if v is None or v > top else v

    def _set_halted(self, halted: bool, divider_restart: bool) -> None:
        """Stop or restart the clock as SET / the divider reset change."""
        if halted == self._halted:
            return
        if halted:
            frozen = datetime.fromtimestamp(self._guest_time(), _UTC)
            self._store_time(frozen)
            self._frozen_at = frozen
            self._halted = True
            return
        dt = self._decode_time()
        now = self.clock()
        if divider_restart:
            # Releasing the divider chain: the first update comes 500 ms later.
            phase = 0.5
        else:
            # SET only inhibited the updates; the divider chain kept its phase.
            t = now + self._offset
            phase = t - math.floor(t)
        if dt is not None:
            self._offset = dt.timestamp() + phase - now
        # else: the registers hold no valid date; carry on from the old time.
        self._halted = False
        self._frozen_at = None
        self._rebase()

    # -- register formats --------------------------------------------------------------

    def _enc(self, v: int) -> int:
        if self._ram[REG_B] & B_DM_BINARY:
            return v
        return ((v // 10) << 4) | (v % 10)

    def _dec(self, raw: int) -> int | None:
        if self._ram[REG_B] & B_DM_BINARY:
            return raw
        hi, lo = raw >> 4, raw & 0x0F
        if hi > 9 or lo > 9:
            return None
        return hi * 10 + lo

    def _enc_hour(self, h: int) -> int:
        if self._ram[REG_B] & B_24H:
            return self._enc(h)
        return self._enc(h % 12 or 12) | (HOURS_PM if h >= 12 else 0)

    def _dec_hour(self, raw: int) -> int | None:
        if self._ram[REG_B] & B_24H:
            return self._dec(raw)
        h = self._dec(raw & 0x7F)
        if h is None or not 1 <= h <= 12:
            return None
        return h % 12 + (12 if raw & HOURS_PM else 0)

    def _time_field(self, reg: int, dt: datetime) -> int:
        if reg == REG_SECONDS:
            return self._enc(dt.second)
        if reg == REG_MINUTES:
            return self._enc(dt.minute)
        if reg == REG_HOURS:
            return self._enc_hour(dt.hour)
        if reg == REG_WEEKDAY:
            return self._enc(dt.isoweekday() % 7 + 1)    # Sunday = 1
        if reg == REG_DAY:
            return self._enc(dt.day)
        if reg == REG_MONTH:
            return self._enc(dt.month)
        if reg == REG_YEAR:
            return self._enc(dt.year % 100)
        return self._enc(dt.year // 100)                  # REG_CENTURY

    def _store_time(self, dt: datetime) -> None:
        for reg in TIME_REGS:
            self._ram[reg] = self._time_field(reg, dt)

    def _decode_time(self, regs: dict[int, int] | None = None) -> datetime | None:
        """The registers (or ``regs`` overriding them) as a UTC datetime, or None."""
        ram = self._ram

        def get(reg: int) -> int:
            return regs[reg] if regs and reg in regs else ram[reg]

        sec = self._dec(get(REG_SECONDS))
        minute = self._dec(get(REG_MINUTES))
        hour = self._dec_hour(get(REG_HOURS))
        day = self._dec(get(REG_DAY))
        month = self._dec(get(REG_MONTH))
        year = self._dec(get(REG_YEAR))
        century = self._dec(get(REG_CENTURY))
        fields = (sec, minute, hour, day, month, year, century)
        if any(f is None for f in fields) or year > 99 or century > 99:  # type: ignore[operator]
            return None
        try:
            return datetime(century * 100 + year, month, day, hour, minute, sec,  # type: ignore[operator,arg-type]
                            tzinfo=_UTC)
        except ValueError:
            return None

    # -- registers ---------------------------------------------------------------------

    def _reg_a_value(self) -> int:
        a = self._ram[REG_A] & 0x7F
        if not self._halted:
            t = self._guest_time()
            if t - math.floor(t) >= 1.0 - UIP_WINDOW:
                a |= A_UIP
        return a

    def _reg_c_value(self) -> int:
        c = self._flags
        if c & self._ram[REG_B] & (B_PIE | B_AIE | B_UIE):
            c |= C_IRQF
        return c

    def _update_irq(self) -> None:
        # IRQF is combinational: a flag with its enable set. The line follows IRQF.
        level = bool(self._flags & self._ram[REG_B] & (B_PIE | B_AIE | B_UIE))
        if level != self._irq_level:
            self._irq_level = level
            if level:
                self.interrupts += 1
            self.irq.set_level(level)

    def _read_ram(self, idx: int) -> int:
        return self._ram[idx]

    def _write_ram(self, idx: int, v: int) -> None:
        self._ram[idx] = v

    def _write_ignored(self, idx: int, v: int) -> None:
        pass

    def _read_time(self, reg: int) -> int:
        if self._halted:
            return self._ram[reg]
        return self._time_field(reg, datetime.fromtimestamp(self._guest_time(), _UTC))

    def _write_time(self, reg: int, v: int) -> None:
        if self._halted:
            self._ram[reg] = v
            return
        if reg == REG_WEEKDAY:
            return      # derived from the date while the clock runs
        # A running clock takes the new field at once: rebuild the time from the
        # current fields with this one replaced, keeping the sub-second phase.
        t = self._guest_time()
        current = datetime.fromtimestamp(t, _UTC)
        regs = {r: self._time_field(r, current) for r in TIME_REGS}
        regs[reg] = v
        dt = self._decode_time(regs)
        if dt is None:
            return      # not a valid date: a real chip would count garbage; we ignore it
        self._offset = dt.timestamp() + (t - math.floor(t)) - self.clock()
        self._rebase()

    def _read_a(self, idx: int) -> int:
        return self._reg_a_value()

    def _write_a(self, idx: int, v: int) -> None:
        was_reset = _divider_in_reset(self._ram[REG_A])
        self._ram[REG_A] = v & 0x7F     # UIP is read-only
        now_reset = _divider_in_reset(v)
        self._set_halted(bool(self._ram[REG_B] & B_SET) or now_reset,
                         divider_restart=was_reset and not now_reset)

    def _write_b(self, idx: int, v: int) -> None:
        if v & B_SET:
            # Setting SET clears UIE (MC146818A): no update interrupts while the
            # guest sets the time.
            v &= ~B_UIE & 0xFF
            # Freeze before the format bits change: the registers keep the format
            # they were updated in.
            self._set_halted(True, divider_restart=False)
            self._ram[REG_B] = v
        else:
            # Release after the format bits change, so the guest's values are read
            # in the format it wrote them in (Linux writes B once, with SET clear).
            self._ram[REG_B] = v
            self._set_halted(_divider_in_reset(self._ram[REG_A]), divider_restart=False)

    def _read_c(self, idx: int) -> int:
        c = self._reg_c_value()
        self._flags = 0       # reading C acknowledges everything
        return c

    def _read_d(self, idx: int) -> int:
        return D_VRT          # the battery is always good
