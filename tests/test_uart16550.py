"""The 16550A model against what Linux's 8250 driver checks, and the RX/IRQ paths."""

from __future__ import annotations

import pytest

from remote_hw.devices.base import NullIrq
from remote_hw.devices.registry import DEVICE_KINDS, create_device
from remote_hw.devices.uart16550 import Uart16550

from helpers import RecordingIrq

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7


@pytest.fixture
def irq() -> RecordingIrq:
    return RecordingIrq()


@pytest.fixture
def uart(irq: RecordingIrq) -> Uart16550:
    u = Uart16550(irq=irq)
    u.sent = bytearray()  # type: ignore[attr-defined]
    u.tx_sink = u.sent.extend  # type: ignore[attr-defined]
    return u


def r(u: Uart16550, off: int) -> int:
    return u.read(off, 1)


def w(u: Uart16550, off: int, val: int) -> None:
    u.write(off, 1, val)


def test_registry_knows_uart() -> None:
    assert DEVICE_KINDS["uart16550"] is Uart16550
    assert Uart16550.window == 8
    assert isinstance(create_device("uart16550"), Uart16550)


def test_reset_values(uart: Uart16550) -> None:
    assert r(uart, IIR) == 0x01
    assert r(uart, LSR) == 0x60
    assert r(uart, MSR) == 0xB0
    assert r(uart, MCR) == 0x08
    assert r(uart, IER) == 0x00
    assert r(uart, LCR) == 0x00
    assert r(uart, SCR) == 0x00


def test_reset_restores_power_on_state(uart: Uart16550) -> None:
    w(uart, LCR, 0x83)
    w(uart, MCR, 0x1F)
    w(uart, FCR, 0x01)
    w(uart, SCR, 0x55)
    uart.feed(b"abc")
    uart.reset()
    assert [r(uart, o) for o in (IIR, LSR, MSR, MCR, LCR, SCR)] == [0x01, 0x60, 0xB0, 0x08, 0, 0]
    assert uart.status()["rx_bytes"] == 3   # counters survive a reset


def test_options() -> None:
    with pytest.raises(ValueError, match="bogus"):
        Uart16550(bogus=1)
    assert create_device("uart16550", backlog="4096").backlog_limit == 4096  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="backlog"):
        Uart16550(backlog="lots")
    with pytest.raises(ValueError, match="backlog"):
        Uart16550(backlog=-1)


def test_linux_scratch_and_ier_probe(uart: Uart16550) -> None:
    # autoconfig(): IER=0 reads 0, IER=0x0F reads back 0x0F (low nibble only).
    w(uart, IER, 0x00)
    assert r(uart, IER) & 0x0F == 0
    w(uart, IER, 0x0F)
    assert r(uart, IER) & 0x0F == 0x0F
    w(uart, IER, 0xFF)
    assert r(uart, IER) == 0x0F        # bits 7:4 (e.g. Xscale's UUE, bit 6) read 0
    w(uart, IER, 0)
    for v in (0x00, 0xA5, 0x5A, 0xFF):
        w(uart, SCR, v)
        assert r(uart, SCR) == v


def test_linux_loopback_probe(uart: Uart16550) -> None:
    save_mcr = r(uart, MCR)
    w(uart, MCR, 0x1A)                 # LOOP | OUT2 | RTS
    assert r(uart, MSR) & 0xF0 == 0x90  # DCD (from OUT2) | CTS (from RTS)
    w(uart, MCR, 0x10)                 # LOOP only: all inputs inactive
    assert r(uart, MSR) & 0xF0 == 0x00
    w(uart, MCR, 0x10 | 0x01 | 0x04)   # DTR -> DSR, OUT1 -> RI
    assert r(uart, MSR) & 0xF0 == 0x60
    w(uart, MCR, save_mcr)
    assert r(uart, MSR) & 0xF0 == 0xB0  # the external lines again


def test_msr_delta_bits_cleared_on_read(uart: Uart16550) -> None:
    w(uart, MCR, 0x1A)                 # lines go 0xB0 -> 0x90: DSR dropped
    first = r(uart, MSR)
    assert first == 0x90 | 0x02         # DDSR
    assert r(uart, MSR) == 0x90         # deltas cleared by the read
    w(uart, MCR, 0x1E)                 # RI rises: no TERI (trailing edge only)
    assert r(uart, MSR) == 0xD0
    w(uart, MCR, 0x1A)                 # RI falls: TERI
    assert r(uart, MSR) == 0x90 | 0x04


def test_modem_status_interrupt(uart: Uart16550, irq: RecordingIrq) -> None:
    w(uart, IER, 0x08)
    assert r(uart, IIR) == 0x01
    w(uart, MCR, 0x1B)                 # loopback, but DTR/RTS/OUT2 keep 0xB0: no delta
    assert r(uart, IIR) == 0x01
    w(uart, MCR, 0x1A)                 # DTR off -> DSR off: delta
    assert r(uart, IIR) == 0x00
    assert irq.level is True
    r(uart, MSR)
    assert r(uart, IIR) == 0x01
    assert irq.level is False


def test_fifo_detection(uart: Uart16550) -> None:
    # autoconfig(): LCR=0xBF, EFR(=FCR on a 16550A)=0, LCR=0, FCR=ENABLE -> IIR>>6 == 3
    w(uart, LCR, 0xBF)
    w(uart, 2, 0)
    w(uart, LCR, 0)
    w(uart, FCR, 0x01)
    assert r(uart, IIR) >> 6 == 3
    # autoconfig_16550a(): IIR (read at offset 2 with DLAB set) must not be 0,
    w(uart, LCR, 0x80)
    assert r(uart, 2) != 0
    w(uart, LCR, 0xBF)
    assert r(uart, 2) != 0
    # ... and the 64-byte FIFO bit (IIR bit 5) must not stick: not a 16750.
    w(uart, LCR, 0)
    w(uart, FCR, 0x21)
    assert (r(uart, IIR) >> 5) & 1 == 0
    w(uart, FCR, 0x01)
    # FIFO off again: a 16450 view.
    w(uart, FCR, 0x00)
    assert r(uart, IIR) == 0x01


def test_thre_interrupt_test(uart: Uart16550, irq: RecordingIrq) -> None:
    # serial8250_do_startup(): IER=THRI -> IIR 0x02; IER=0; IER=THRI again -> 0x02.
    w(uart, IER, 0x02)
    assert irq.level is True
    iir1 = r(uart, IIR)
    assert iir1 == 0x02
    assert irq.level is False           # reading IIR acknowledged it
    assert r(uart, IIR) == 0x01
    w(uart, IER, 0x00)
    w(uart, IER, 0x02)
    assert r(uart, IIR) == 0x02         # re-armed by the rising edge of THRI
    w(uart, IER, 0)
    assert irq.level is False


def test_thre_interrupt_with_fifo_bits(uart: Uart16550) -> None:
    w(uart, FCR, 0x01)
    w(uart, IER, 0x02)
    assert r(uart, IIR) == 0xC2


def test_thr_write_transmits_and_rearms_thre(uart: Uart16550, irq: RecordingIrq) -> None:
    w(uart, IER, 0x02)
    assert r(uart, IIR) == 0x02
    assert irq.level is False
    w(uart, THR, ord("h"))
    w(uart, THR, ord("i"))
    assert bytes(uart.sent) == b"hi"    # type: ignore[attr-defined]
    assert r(uart, LSR) & 0x60 == 0x60   # transmitter always ready
    assert irq.level is True             # THR empty again: next chunk, please
    assert r(uart, IIR) == 0x02
    assert uart.status()["tx_bytes"] == 2


def test_thr_write_pulses_a_thre_only_line(uart: Uart16550, irq: RecordingIrq) -> None:
    """Each THR write is a new edge for an edge-triggered 8259 (QEMU and the silicon
    drop the line on the write and raise it when the THR is empty again), so a driver
    that writes one byte per interrupt without reading IIR keeps getting interrupts."""
    w(uart, IER, 0x02)
    assert irq.calls == [True]
    w(uart, THR, ord("a"))
    w(uart, THR, ord("b"))
    assert irq.calls == [True, False, True, False, True]
    # With another source pending (RX data), the line stays up: no edge, as in QEMU.
    w(uart, IER, 0x03)
    uart.feed(b"x")
    del irq.calls[:]
    w(uart, THR, ord("c"))
    assert irq.calls == []
    # With OUT2 off nothing reaches the line at all.
    r(uart, RBR)
    w(uart, MCR, 0x00)
    del irq.calls[:]
    w(uart, THR, ord("d"))
    assert irq.calls == []
    assert bytes(uart.sent) == b"abcd"   # type: ignore[attr-defined]


def test_divisor_latch(uart: Uart16550) -> None:
    w(uart, IER, 0x05)
    w(uart, LCR, 0x83)                  # DLAB | 8N1
    w(uart, DLL, 0x01)
    w(uart, DLM, 0x00)
    assert r(uart, DLL) == 0x01
    assert r(uart, DLM) == 0x00
    w(uart, DLM, 0x12)
    assert (r(uart, DLM), r(uart, DLL)) == (0x12, 0x01)
    w(uart, THR, 0x41)                   # a DLL write, not a transmitted byte
    assert bytes(uart.sent) == b""      # type: ignore[attr-defined]
    w(uart, LCR, 0x03)
    assert r(uart, IER) == 0x05         # IER untouched by the latch writes
    assert r(uart, LCR) == 0x03
    st = uart.status()
    assert st["divisor"] == 0x1241
    uart.write(LCR, 1, 0x83)
    uart.write(DLL, 1, 0x01)
    uart.write(DLM, 1, 0x00)
    assert uart.status()["baud"] == 115200


def test_rx_fifo_and_backlog(uart: Uart16550) -> None:
    w(uart, FCR, 0x07)                  # enable + clear both
    data = bytes(range(40))
    uart.feed(data)
    st = uart.status()
    assert (st["rx_fifo"], st["rx_backlog"]) == (16, 24)
    got = bytearray()
    while r(uart, LSR) & 0x01:
        got.append(r(uart, RBR))
        assert uart.status()["rx_fifo"] <= 16
    assert bytes(got) == data
    assert r(uart, LSR) == 0x60          # no overrun: the backlog absorbed the paste


def test_rx_without_fifo_holds_one_byte(uart: Uart16550) -> None:
    uart.feed(b"xyz")
    st = uart.status()
    assert (st["rx_fifo"], st["rx_backlog"]) == (1, 2)
    assert [r(uart, RBR) for _ in range(3)] == list(b"xyz")
    assert r(uart, LSR) & 0x01 == 0
    assert r(uart, RBR) == 0             # empty: reads 0


def test_backlog_overflow_sets_overrun(irq: RecordingIrq) -> None:
    u = Uart16550(irq=irq, backlog=8)
    w(u, FCR, 0x01)
    u.feed(bytes(30))                   # 16 in the FIFO, 8 in the backlog, 6 lost
    st = u.status()
    assert (st["rx_fifo"], st["rx_backlog"], st["rx_dropped"]) == (16, 8, 6)
    w(u, IER, 0x04)                      # line status interrupt
    assert r(u, IIR) == 0xC6
    assert r(u, LSR) == 0x63             # DR | OE | THRE | TEMT
    assert r(u, LSR) == 0x61             # OE cleared by the read
    assert r(u, IIR) == 0xC1


def test_fcr_clear_keeps_backlog(uart: Uart16550) -> None:
    w(uart, FCR, 0x01)
    uart.feed(bytes(range(20)))
    w(uart, FCR, 0x03)                   # clear RX FIFO: the 16 chip bytes go
    assert r(uart, RBR) == 16            # the backlog flows in behind them
    assert uart.status()["rx_fifo"] == 3


def test_lsr_never_ff(uart: Uart16550) -> None:
    seen = set()
    for fcr in (0x00, 0x01, 0xC7):
        w(uart, FCR, fcr)
        for mcr in (0x00, 0x08, 0x1F):
            w(uart, MCR, mcr)
            uart.feed(bytes(100))
            for _ in range(5):
                w(uart, THR, 0xFF)
                seen.add(r(uart, LSR))
    assert 0xFF not in seen
    assert all(v & 0x80 == 0 for v in seen)


def test_rx_interrupt_follows_enable_and_data(uart: Uart16550, irq: RecordingIrq) -> None:
    uart.feed(b"a")
    assert irq.level is False            # IER.RDI off
    assert r(uart, IIR) == 0x01
    w(uart, IER, 0x01)
    assert irq.level is True
    assert r(uart, IIR) == 0x04
    assert r(uart, IIR) == 0x04          # reading IIR does not clear RX data available
    assert r(uart, RBR) == ord("a")
    assert irq.level is False
    assert r(uart, IIR) == 0x01
    uart.feed(b"b")
    assert irq.level is True
    w(uart, IER, 0x00)
    assert irq.level is False
    assert uart.status()["interrupts"] == 2


def test_fifo_trigger_level_and_timeout(uart: Uart16550) -> None:
    w(uart, FCR, 0x81)                   # FIFO on, trigger at 8
    w(uart, IER, 0x01)
    uart.feed(b"1234")
    assert r(uart, IIR) == 0xCC          # below the trigger: character timeout
    uart.feed(b"5678")
    assert r(uart, IIR) == 0xC4          # at the trigger: RX data available


def test_interrupt_priority(uart: Uart16550) -> None:
    w(uart, IER, 0x0F)
    w(uart, MCR, 0x1A)                   # modem status delta
    uart.feed(b"x")                      # in loopback the line input waits in the backlog
    assert r(uart, IIR) == 0x02          # THRE beats modem status
    assert r(uart, IIR) == 0x00          # THRE acknowledged: modem status shows
    w(uart, THR, 0x41)                   # loops back into RX
    assert r(uart, IIR) == 0x04          # RX beats THRE
    assert r(uart, RBR) == 0x41
    assert r(uart, IIR) == 0x02


def test_loopback_routes_tx_to_rx(uart: Uart16550) -> None:
    w(uart, FCR, 0x01)
    w(uart, MCR, 0x18)
    for b in b"loop":
        w(uart, THR, b)
    assert bytes(uart.sent) == b""      # type: ignore[attr-defined]
    assert bytes(r(uart, RBR) for _ in range(4)) == b"loop"
    # Overrunning the FIFO in loopback loses the byte and sets OE.
    for _ in range(17):
        w(uart, THR, 0x55)
    assert r(uart, LSR) & 0x03 == 0x03
    st = uart.status()
    assert st["loopback_bytes"] == 21 and st["tx_bytes"] == 0


def test_input_waits_during_loopback(uart: Uart16550) -> None:
    w(uart, MCR, 0x18)
    uart.feed(b"typed")
    assert r(uart, LSR) & 0x01 == 0     # the receiver is off the line in loopback
    w(uart, MCR, 0x08)
    assert r(uart, LSR) & 0x01 == 1
    assert r(uart, RBR) == ord("t")


def test_out2_gates_irq(uart: Uart16550, irq: RecordingIrq) -> None:
    w(uart, MCR, 0x00)                   # OUT2 off
    w(uart, IER, 0x01)
    uart.feed(b"z")
    assert r(uart, IIR) == 0x04          # pending inside the chip ...
    assert irq.level is False            # ... but the PC's buffer blocks it
    w(uart, MCR, 0x08)
    assert irq.level is True
    w(uart, MCR, 0x00)
    assert irq.level is False


def test_irq_set_level_only_on_change(uart: Uart16550, irq: RecordingIrq) -> None:
    w(uart, IER, 0x01)
    uart.feed(b"a")
    uart.feed(b"b")
    r(uart, LSR)
    r(uart, SCR)
    assert irq.calls == [True]


def test_wide_access_is_split_into_bytes(uart: Uart16550) -> None:
    uart.write(LCR, 2, 0x0B03)           # LCR=0x03, MCR=0x0B
    assert r(uart, LCR) == 0x03 and r(uart, MCR) == 0x0B
    assert uart.read(LSR, 2) == 0xB060


def test_status_reports_registers(uart: Uart16550) -> None:
    w(uart, FCR, 0xC1)
    st = uart.status()
    assert st["fifo_enabled"] is True and st["rx_trigger"] == 14
    assert st["iir"] == 0xC1 and st["lsr"] == 0x60 and st["mcr"] == 0x08


def test_null_irq_default() -> None:
    u = Uart16550()
    assert isinstance(u.irq, NullIrq)
    u.write(IER, 1, 0x02)
    assert u.irq.level is True           # type: ignore[attr-defined]


def linux_8250_autoconfig(u: Uart16550) -> str:
    """The register traffic of Linux's autoconfig()/autoconfig_16550a(), in order,
    returning the port type it would pick (only the branches a 16550A can take)."""
    save_ier = r(u, IER)
    w(u, IER, 0)
    scratch = r(u, IER) & 0x0F
    w(u, IER, 0x0F)
    scratch2 = r(u, IER) & 0x0F
    w(u, IER, save_ier)
    if scratch != 0 or scratch2 != 0x0F:
        return "none (IER test)"
    save_mcr = r(u, MCR)
    save_lcr = r(u, LCR)
    w(u, MCR, 0x1A)
    status1 = r(u, MSR) & 0xF0
    w(u, MCR, save_mcr)
    if status1 != 0x90:
        return "none (loopback test)"
    w(u, LCR, 0xBF)
    w(u, 2, 0)                       # EFR on 16650s
    w(u, LCR, 0)
    w(u, FCR, 0x01)
    kind = {0: "8250/16450", 1: "unknown", 2: "16550"}.get(r(u, IIR) >> 6, "16550A")
    if kind == "16550A":
        w(u, LCR, 0x80)
        if r(u, 2) == 0:
            kind = "16650"
        w(u, LCR, 0xBF)
        if r(u, 2) == 0:
            kind = "16650V2"
        w(u, LCR, 0)
        st1 = r(u, MCR)
        w(u, LCR, 0xE0)
        st2 = r(u, 2)
        if not ((st2 ^ st1) & 0x10):
            w(u, LCR, 0)
            w(u, MCR, st1 ^ 0x10)
            w(u, LCR, 0xE0)
            st2 = r(u, 2)
            w(u, LCR, 0)
            w(u, MCR, st1)
            if (st2 ^ st1) & 0x10:
                kind = "NS16550A"
        w(u, LCR, 0)
        w(u, FCR, 0x21)
        st1 = r(u, IIR) >> 5
        w(u, FCR, 0x01)
        w(u, LCR, 0x80)
        w(u, FCR, 0x21)
        st2 = r(u, IIR) >> 5
        w(u, FCR, 0x01)
        w(u, LCR, 0)
        if st1 == 6 and st2 == 7:
            kind = "16750"
        ier = r(u, IER)
        w(u, IER, ier & ~0x40)
        if not r(u, IER) & 0x40:
            w(u, IER, ier | 0x40)
            if r(u, IER) & 0x40:
                kind = "XScale"
        w(u, IER, ier)
    w(u, LCR, save_lcr)
    w(u, MCR, save_mcr)
    w(u, FCR, 0x01)                  # serial8250_clear_fifos()
    w(u, FCR, 0x07)
    w(u, FCR, 0x00)
    r(u, RBR)
    w(u, IER, 0)
    return kind


def test_linux_autoconfig_detects_16550a(uart: Uart16550, irq: RecordingIrq) -> None:
    uart.feed(b"early")                  # pending input must not disturb the probe
    assert linux_8250_autoconfig(uart) == "16550A"
    # serial8250_do_startup(): clear FIFOs, read the status registers, LSR safety check.
    w(uart, FCR, 0x01)
    w(uart, FCR, 0x07)
    w(uart, FCR, 0x00)
    for off in (LSR, RBR, IIR, MSR):
        r(uart, off)
    assert r(uart, LSR) != 0xFF
    w(uart, LCR, 0x03)
    # THRE test (UART_BUG_THRE must not be set)
    w(uart, IER, 0x02)
    iir1 = r(uart, IIR)
    w(uart, IER, 0)
    w(uart, IER, 0x02)
    iir = r(uart, IIR)
    w(uart, IER, 0)
    assert not (not (iir1 & 0x01) and (iir & 0x01))
    assert iir1 == iir == 0x02
    # Then: MCR = DTR|RTS|OUT2, FCR = 16550A default, IER = RLSI|RDI.
    w(uart, MCR, 0x0B)
    w(uart, FCR, 0x81)
    w(uart, IER, 0x05)
    # Input that was pending during the probe sits in the chip and was dropped by the
    # FIFO clears, as on hardware; drain whatever is left, then type.
    while r(uart, LSR) & 0x01:
        r(uart, RBR)
    assert irq.level is False
    uart.feed(b"hello")
    assert irq.level is True
    assert r(uart, IIR) == 0xCC          # below the trigger of 8: timeout
    got = bytearray()
    while r(uart, LSR) & 0x01:
        got.append(r(uart, RBR))
    assert bytes(got) == b"hello"
    assert irq.level is False
