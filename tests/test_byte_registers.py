"""remote_hw.devices.base.ByteRegisters: how a wide access becomes byte accesses.

A recording model logs every ``read_byte``/``write_byte`` call, so each test states
the exact byte accesses (order, offsets, values) a guest access turns into.
"""

from __future__ import annotations

import pytest

from remote_hw.devices.base import ByteRegisters
from remote_hw.devices.cmos_rtc import CmosRtc
from remote_hw.devices.uart16550 import Uart16550


class Recorder(ByteRegisters):
    """Six byte registers; reads answer ``0x10 + offset``; every call is logged."""

    kind = "recorder"
    window = 6

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, int, int]] = []
        self.answer = lambda off: 0x10 + off

    def read_byte(self, offset: int) -> int:
        value = self.answer(offset)
        self.log.append(("r", offset, value))
        return value

    def write_byte(self, offset: int, value: int) -> None:
        self.log.append(("w", offset, value))


@pytest.mark.parametrize("size", [1, 2, 4])
def test_a_read_is_byte_reads_low_byte_first(size):
    dev = Recorder()
    value = dev.read(1, size)
    assert dev.log == [("r", 1 + i, 0x11 + i) for i in range(size)]
    assert value == int.from_bytes(bytes(0x11 + i for i in range(size)), "little")


def test_a_write_is_byte_writes_low_byte_first():
    dev = Recorder()
    dev.write(0, 4, 0xA1B2C3D4)
    assert dev.log == [("w", 0, 0xD4), ("w", 1, 0xC3), ("w", 2, 0xB2), ("w", 3, 0xA1)]


def test_bytes_beyond_the_window_read_ff_and_are_not_written():
    dev = Recorder()
    assert dev.read(4, 4) == 0xFFFF1514          # offsets 6 and 7 are outside
    assert [e[1] for e in dev.log] == [4, 5]
    dev.log.clear()
    dev.write(4, 8, 0x0807060504030201)
    assert dev.log == [("w", 4, 0x01), ("w", 5, 0x02)]


def test_single_byte_accesses_outside_the_window_never_reach_the_model():
    dev = Recorder()
    assert dev.read(6, 1) == 0xFF
    assert dev.read(-1, 1) == 0xFF
    dev.write(6, 1, 0x12)
    assert dev.log == []


def test_an_eight_byte_access_spans_the_whole_window_and_beyond():
    dev = Recorder()
    assert dev.read(0, 8) == int.from_bytes(bytes([0x10, 0x11, 0x12, 0x13, 0x14, 0x15,
                                                   0xFF, 0xFF]), "little")


def test_a_model_answering_more_than_a_byte_cannot_spill_into_its_neighbour():
    dev = Recorder()
    dev.answer = lambda off: 0x100 | off          # a plugin bug: 9 bits
    assert dev.read(0, 2) == 0x0100
    assert dev.read(1, 1) == 0x01


def test_a_byte_register_class_must_say_what_a_byte_does():
    class Incomplete(ByteRegisters):
        kind = "incomplete"
        window = 1

        def read_byte(self, offset: int) -> int:
            return 0

    with pytest.raises(TypeError, match="write_byte"):
        Incomplete()  # type: ignore[abstract]


def test_the_built_in_8_bit_models_use_it():
    assert issubclass(Uart16550, ByteRegisters)
    assert issubclass(CmosRtc, ByteRegisters)


def test_uart_wide_write_then_read_goes_through_the_byte_registers():
    uart = Uart16550()
    uart.write(3, 1, 0x80)                  # DLAB: offsets 0/1 are the divisor latch
    uart.write(0, 2, 0x0180)                # DLL = 0x80, DLM = 0x01 in one access
    assert uart.read(0, 2) == 0x0180
    uart.write(7, 2, 0xEE5A)                # SCR = 0x5A; offset 8 is outside
    assert uart.read(7, 2) == 0xFF5A


def test_cmos_wide_access_selects_then_reads():
    rtc = CmosRtc(clock=lambda: 0.0)
    rtc.write(0, 2, 0x4D_20)                # index 0x20 (RAM), then data 0x4D
    assert rtc.read(0, 2) == 0x4D_FF        # index port reads 0xFF, data the RAM byte
    assert rtc.index == 0x20 and not rtc.nmi_masked
