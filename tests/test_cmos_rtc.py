"""The CMOS RTC with an injected clock: formats, SET, UIP, flags and the host API."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from remote_hw.devices.cmos_rtc import CmosRtc
from remote_hw.devices.registry import DEVICE_KINDS, create_device

from helpers import RecordingIrq

UTC = timezone.utc
# Thursday, leap day, an afternoon hour (exercises PM) half-way through a second.
BASE = datetime(2024, 2, 29, 13, 45, 58, tzinfo=UTC).timestamp() + 0.5


class FakeClock:
    def __init__(self, t: float = BASE) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def irq() -> RecordingIrq:
    return RecordingIrq()


@pytest.fixture
def rtc(clock: FakeClock, irq: RecordingIrq) -> CmosRtc:
    return CmosRtc(irq=irq, clock=clock)


def get(rtc: CmosRtc, reg: int) -> int:
    rtc.write(0, 1, reg)
    return rtc.read(1, 1)


def put(rtc: CmosRtc, reg: int, val: int) -> None:
    rtc.write(0, 1, reg)
    rtc.write(1, 1, val)


TIME_REGS = (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)


def read_time(rtc: CmosRtc) -> tuple[int, ...]:
    return tuple(get(rtc, reg) for reg in TIME_REGS)


def test_registry_knows_rtc() -> None:
    assert DEVICE_KINDS["cmos-rtc"] is CmosRtc
    assert CmosRtc.window == 2
    assert isinstance(create_device("cmos-rtc"), CmosRtc)
    with pytest.raises(ValueError, match="cmos-rtc.*uart16550"):
        create_device("nope")


def test_default_clock_is_wall_time() -> None:
    rtc = CmosRtc()
    assert abs(rtc.now() - datetime.now(UTC)) < timedelta(seconds=5)


def test_bcd_24h_defaults(rtc: CmosRtc) -> None:
    assert get(rtc, 0x0A) == 0x26
    assert get(rtc, 0x0B) == 0x02
    # sec, min, hour, weekday (Thursday = 5), day, month, year, century
    assert read_time(rtc) == (0x58, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20)


def test_binary_mode(rtc: CmosRtc) -> None:
    put(rtc, 0x0B, 0x06)
    assert read_time(rtc) == (58, 45, 13, 5, 29, 2, 24, 20)


@pytest.mark.parametrize("hour,bcd,binary", [
    (0, 0x12, 12), (1, 0x01, 1), (11, 0x11, 11),
    (12, 0x92, 0x80 | 12), (13, 0x81, 0x81), (23, 0x91, 0x80 | 11)])
def test_12_hour_mode(rtc: CmosRtc, hour: int, bcd: int, binary: int) -> None:
    rtc.set_time(datetime(2024, 1, 1, hour, 0, 0))
    put(rtc, 0x0B, 0x00)                 # BCD, 12 h
    assert get(rtc, 0x04) == bcd
    put(rtc, 0x0B, 0x04)                 # binary, 12 h
    assert get(rtc, 0x04) == binary


def test_time_advances_with_clock(rtc: CmosRtc, clock: FakeClock) -> None:
    clock.t += 2                         # 13:46:00.5
    assert read_time(rtc)[:3] == (0x00, 0x46, 0x13)
    clock.t += 86400 * 366               # leap year: same date next year... 2025-03-01
    assert read_time(rtc)[4:8] == (0x01, 0x03, 0x25, 0x20)


def test_register_d_vrt(rtc: CmosRtc) -> None:
    assert get(rtc, 0x0D) == 0x80
    put(rtc, 0x0D, 0x00)
    assert get(rtc, 0x0D) == 0x80


def test_register_c_cleared_on_read(rtc: CmosRtc, clock: FakeClock, irq: RecordingIrq) -> None:
    assert get(rtc, 0x0C) == 0x00
    clock.t += 1                          # an update and many periodic ticks happened
    assert get(rtc, 0x0C) == 0x50         # UF and PF (set even with PIE off), no IRQF
    assert get(rtc, 0x0C) == 0x00
    put(rtc, 0x0A, 0x20)                  # periodic rate off
    clock.t += 1
    assert get(rtc, 0x0C) == 0x10         # UF alone
    assert get(rtc, 0x0C) == 0x00
    assert irq.calls == []
    put(rtc, 0x0C, 0xFF)                  # read-only
    assert get(rtc, 0x0C) == 0x00


def test_update_interrupt(rtc: CmosRtc, clock: FakeClock, irq: RecordingIrq) -> None:
    put(rtc, 0x0B, 0x12)                  # UIE, 24 h
    clock.t += 0.4
    assert get(rtc, 0x0B) == 0x12 and irq.level is False
    clock.t += 0.2                        # crosses the second boundary
    rtc.write(0, 1, 0x0C)                 # evaluated on any access
    assert irq.level is True
    assert rtc.read(1, 1) & 0xB0 == 0x90  # IRQF | UF (PF runs too, disabled)
    assert irq.level is False
    assert rtc.status()["interrupts"] == 1


def test_enabling_uie_with_uf_pending_raises_irq(rtc: CmosRtc, clock: FakeClock,
                                                 irq: RecordingIrq) -> None:
    clock.t += 1
    put(rtc, 0x0B, 0x12)
    assert irq.level is True              # IRQF is UF & UIE, whichever came first


def test_uip_window(rtc: CmosRtc, clock: FakeClock) -> None:
    sec = int(BASE)
    clock.t = sec + 0.5
    assert get(rtc, 0x0A) == 0x26
    clock.t = sec + 1 - 100e-6            # inside the 244 us before the update
    assert get(rtc, 0x0A) == 0xA6
    clock.t = sec + 1 - 400e-6            # before the window
    assert get(rtc, 0x0A) == 0x26
    clock.t = sec + 1 + 10e-6             # update done
    assert get(rtc, 0x0A) == 0x26
    put(rtc, 0x0A, 0xA6)                  # UIP is read-only
    clock.t = sec + 1.5
    assert get(rtc, 0x0A) == 0x26


def test_set_freezes_and_guest_sets_time(rtc: CmosRtc, clock: FakeClock) -> None:
    put(rtc, 0x0B, 0x82)                  # SET
    frozen = read_time(rtc)
    clock.t += 5
    assert read_time(rtc) == frozen       # no updates while SET
    assert get(rtc, 0x0A) & 0x80 == 0     # and no UIP
    for reg, val in zip(TIME_REGS, (0x50, 0x59, 0x23, 0x03, 0x31, 0x12, 0x30, 0x20)):
        put(rtc, reg, val)
    assert rtc.now() == datetime(2030, 12, 31, 23, 59, 50, tzinfo=UTC)
    put(rtc, 0x0B, 0x02)                  # release: runs on from the written time
    clock.t += 10
    assert read_time(rtc) == (0x00, 0x00, 0x00, 0x04, 0x01, 0x01, 0x31, 0x20)
    assert rtc.now().replace(microsecond=0) == datetime(2031, 1, 1, tzinfo=UTC)


def test_linux_set_time_sequence(rtc: CmosRtc, clock: FakeClock) -> None:
    # mc146818_set_time(): SET, divider reset, write, restore B, restore A.
    save_b = get(rtc, 0x0B)
    put(rtc, 0x0B, save_b | 0x80)
    save_a = get(rtc, 0x0A)
    put(rtc, 0x0A, save_a | 0x70)
    for reg, val in zip((0x09, 0x08, 0x07, 0x04, 0x02, 0x00), (0x01, 0x07, 0x04, 0x09, 0x30, 0x00)):
        put(rtc, reg, val)
    put(rtc, 0x0B, save_b)
    clock.t += 3                          # still held by the divider reset
    assert get(rtc, 0x00) == 0x00
    put(rtc, 0x0A, save_a)                # first update 500 ms after the release
    assert rtc.now() == datetime(2001, 7, 4, 9, 30, 0, 500000, tzinfo=UTC)
    clock.t += 0.6
    assert get(rtc, 0x00) == 0x01


def test_set_clears_uie(rtc: CmosRtc) -> None:
    put(rtc, 0x0B, 0x12)
    put(rtc, 0x0B, 0x92)
    assert get(rtc, 0x0B) == 0x82


def test_write_time_register_while_running(rtc: CmosRtc, clock: FakeClock) -> None:
    put(rtc, 0x02, 0x10)                  # minutes := 10, seconds and phase kept
    assert read_time(rtc)[:3] == (0x58, 0x10, 0x13)
    clock.t += 0.6
    assert get(rtc, 0x00) == 0x59
    put(rtc, 0x00, 0x7A)                  # not BCD: ignored
    assert get(rtc, 0x00) == 0x59


def test_set_time_and_now(rtc: CmosRtc, clock: FakeClock) -> None:
    rtc.set_time(datetime(1999, 12, 31, 23, 59, 59))
    assert rtc.now() == datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert read_time(rtc)[6:] == (0x99, 0x19)
    clock.t += 1
    assert rtc.now() == datetime(2000, 1, 1, tzinfo=UTC)
    assert read_time(rtc) == (0x00, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20)
    # An aware datetime is converted to UTC.
    rtc.set_time(datetime(2024, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))))
    assert rtc.now() == datetime(2024, 6, 1, 10, 0, tzinfo=UTC)
    assert get(rtc, 0x04) == 0x10


def test_set_time_while_guest_holds_clock(rtc: CmosRtc, clock: FakeClock) -> None:
    put(rtc, 0x0B, 0x82)
    rtc.set_time(datetime(2020, 5, 17, 8, 0, 0))
    assert get(rtc, 0x04) == 0x08
    assert rtc.now() == datetime(2020, 5, 17, 8, 0, 0, tzinfo=UTC)
    put(rtc, 0x0B, 0x02)
    clock.t += 1
    assert get(rtc, 0x00) in (0x00, 0x01)  # resumed with the divider's phase
    assert get(rtc, 0x04) == 0x08


def test_no_spurious_update_after_set_time(rtc: CmosRtc, clock: FakeClock) -> None:
    get(rtc, 0x0C)
    rtc.set_time(datetime(2090, 1, 1))     # a jump forward is not an update cycle
    assert get(rtc, 0x0C) == 0x00


def test_index_port(rtc: CmosRtc) -> None:
    rtc.write(0, 1, 0x80 | 0x09)          # NMI masked, index 9
    assert rtc.read(1, 1) == 0x24
    assert rtc.status()["nmi_masked"] is True and rtc.status()["index"] == 0x09
    assert rtc.read(0, 1) == 0xFF
    rtc.write(0, 1, 0x09)
    assert rtc.status()["nmi_masked"] is False


def test_nvram(rtc: CmosRtc) -> None:
    for reg in (0x0E, 0x10, 0x40, 0x7F):
        put(rtc, reg, reg ^ 0xA5)
    assert [get(rtc, reg) for reg in (0x0E, 0x10, 0x40, 0x7F)] == [
        reg ^ 0xA5 for reg in (0x0E, 0x10, 0x40, 0x7F)]


def test_alarm(rtc: CmosRtc, clock: FakeClock, irq: RecordingIrq) -> None:
    put(rtc, 0x05, 0x13)
    put(rtc, 0x03, 0x46)
    put(rtc, 0x01, 0x05)
    put(rtc, 0x0B, 0x22)                  # AIE
    clock.t += 3                          # 13:46:01.5: not yet
    assert get(rtc, 0x0C) & 0xB0 == 0x10
    clock.t += 10                         # 13:46:11.5: 13:46:05 passed meanwhile
    assert irq.level is False             # nothing looked yet
    rtc.poll()
    assert irq.level is True
    assert get(rtc, 0x0C) & 0xB0 == 0xB0  # IRQF | AF | UF
    assert irq.level is False


def test_alarm_dont_care(rtc: CmosRtc, clock: FakeClock) -> None:
    put(rtc, 0x05, 0xC0)
    put(rtc, 0x03, 0xC0)
    put(rtc, 0x01, 0x00)                  # once a minute, at :00
    get(rtc, 0x0C)
    clock.t += 1                          # 13:45:59.5
    assert get(rtc, 0x0C) & 0x20 == 0
    clock.t += 1                          # 13:46:00.5
    assert get(rtc, 0x0C) & 0x20 == 0x20


def test_periodic_flag(rtc: CmosRtc, clock: FakeClock, irq: RecordingIrq) -> None:
    put(rtc, 0x0B, 0x42)                  # PIE; A = 0x26: 1024 Hz
    get(rtc, 0x0C)
    clock.t += 1 / 2048                   # half a period at most: maybe, maybe not
    get(rtc, 0x0C)
    clock.t += 2 / 1024
    assert get(rtc, 0x0C) & 0xC0 == 0xC0
    put(rtc, 0x0A, 0x20)                  # RS = 0: off
    clock.t += 1 / 8
    assert get(rtc, 0x0C) & 0x40 == 0


def test_poll_and_next_event(rtc: CmosRtc, clock: FakeClock, irq: RecordingIrq) -> None:
    assert rtc.next_event() is None
    put(rtc, 0x0B, 0x12)
    assert rtc.next_event() == pytest.approx(BASE + 0.5)
    clock.t = BASE + 0.5
    rtc.poll()
    assert irq.level is True


def test_reset_keeps_time_clears_enables(rtc: CmosRtc, clock: FakeClock,
                                         irq: RecordingIrq) -> None:
    put(rtc, 0x40, 0x5A)
    put(rtc, 0x0B, 0x7A)
    clock.t += 1
    rtc.read(0, 1)
    assert irq.level is True
    rtc.reset()
    assert irq.level is False
    assert get(rtc, 0x0B) == 0x02
    assert get(rtc, 0x0C) == 0x00
    assert get(rtc, 0x40) == 0x5A
    assert get(rtc, 0x00) == 0x59


def test_status(rtc: CmosRtc) -> None:
    st = rtc.status()
    assert st["time"] == "2024-02-29T13:45:58.500000+00:00"
    assert st["running"] is True and st["reg_d"] == 0x80 and st["binary"] is False
