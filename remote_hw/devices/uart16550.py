"""A 16550A UART (the PC's COM port) as Linux's 8250 driver probes and drives it.

Register map (offset within the 8-byte window; DLAB is LCR bit 7):

====== ======================= =========================
offset read                    write
====== ======================= =========================
0      RBR (DLAB=0) / DLL      THR (DLAB=0) / DLL
1      IER (DLAB=0) / DLM      IER (DLAB=0) / DLM
2      IIR                     FCR
3      LCR                     LCR
4      MCR                     MCR
5      LSR                     (ignored)
6      MSR                     (ignored)
7      SCR                     SCR
====== ======================= =========================

Deliberate differences from the silicon (see docs/devices.md):

* The transmitter is infinitely fast: a THR write goes to ``tx_sink`` at once, so THRE
  and TEMT always read 1 and the THR-empty interrupt re-arms straight after the write.
* Behind the 16-byte RX FIFO sits a bounded host-side backlog (64 KiB by default) that
  refills the FIFO as the guest reads, so a paste into a console is not lost.
* The character-timeout interrupt is reported as soon as the FIFO holds fewer bytes
  than the trigger level (bytes reaching us over the network are already "late"), so
  no timer is needed.
* No parity/framing errors or breaks are ever received.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import ByteRegisters, RegisterShadow, StreamDevice

# IER bits
IER_RDI = 0x01    # received data available
IER_THRI = 0x02   # transmitter holding register empty
IER_RLSI = 0x04   # receiver line status
IER_MSI = 0x08    # modem status

# IIR values (bits 3:0); bit 0 set means "no interrupt pending"
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_RX_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0   # bits 7:6 = 11 identify a 16550A with working FIFOs

# FCR bits
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
FCR_DMA_SELECT = 0x08
FCR_TRIGGER_MASK = 0xC0

# LCR bits
LCR_DLAB = 0x80

# MCR bits
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

# LSR bits
LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = 0x1E  # OE | PE | FE | BI: the sources of the line-status interrupt

# MSR bits
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

RX_FIFO_SIZE = 16
DEFAULT_BACKLOG = 64 * 1024
# Divisor latch value at power-on. The silicon leaves it undefined; 12 is 9600 baud
# with the PC's 1.8432 MHz crystal, the BIOS's usual choice.
DEFAULT_DIVISOR = 12
BAUD_BASE = 115200

# Offsets whose writes may be posted (see Uart16550.shadow).
_POSTED = frozenset((0, 7))
_POSTED_DLAB = frozenset((0, 1, 7))

# FCR bits 7:6 -> RX trigger level in bytes.
_TRIGGER_LEVELS = (1, 4, 8, 14)

# The modem inputs when not in loopback: a cable with a live peer on it (CTS, DSR and
# DCD asserted, no ring). This is what gives MSR its reset value 0xB0.
_EXTERNAL_MODEM_LINES = MSR_CTS | MSR_DSR | MSR_DCD


def _loopback_lines(mcr: int) -> int:
    """MSR bits 7:4 in loopback mode: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD."""
    return (((mcr & MCR_RTS) << 3) | ((mcr & MCR_DTR) << 5)
            | ((mcr & MCR_OUT1) << 4) | ((mcr & MCR_OUT2) << 4))


class Uart16550(ByteRegisters, StreamDevice):
    """A 16550A UART with a 16-byte RX FIFO, loopback, and a level IRQ gated by OUT2.

    Options: ``backlog`` (bytes the host side may queue beyond the RX FIFO before
    received bytes are dropped; default 64 KiB).

    ``tx_sink`` gets every byte the guest transmits (one call per THR write, outside
    loopback). ``feed`` queues bytes for the guest. Counters survive ``reset()``.
    """

    kind = "uart16550"
    window = 8

    def __init__(self, *args: Any, backlog: int | str = DEFAULT_BACKLOG, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Options may arrive as strings from a command line (backlog=4096).
        try:
            limit = int(backlog)
        except (TypeError, ValueError):
            raise ValueError(f"{self.kind}: backlog must be an integer, got {backlog!r}") from None
        if limit < 0:
            raise ValueError(f"{self.kind}: backlog must be >= 0, got {limit}")
        self.backlog_limit = limit
        # Per-offset dispatch tables; the DLAB variants replace offsets 0 and 1. The
        # active pair is swapped on LCR writes so read()/write() are one index each.
        self._read_normal: list[Callable[[], int]] = [
            self._read_rbr, self._read_ier, self._read_iir, self._read_lcr,
            self._read_mcr, self._read_lsr, self._read_msr, self._read_scr]
        self._read_dlab = list(self._read_normal)
        self._read_dlab[0] = self._read_dll
        self._read_dlab[1] = self._read_dlm
        self._write_normal: list[Callable[[int], None]] = [
            self._write_thr, self._write_ier, self._write_fcr, self._write_lcr,
            self._write_mcr, self._write_ignored, self._write_ignored, self._write_scr]
        self._write_dlab = list(self._write_normal)
        self._write_dlab[0] = self._write_dll
        self._write_dlab[1] = self._write_dlm
        # Counters for status(); kept across reset() because they describe the
        # instance's life on the server, not guest-visible state.
        self.rx_bytes = 0          # bytes accepted by feed()
        self.rx_dropped = 0        # bytes feed() had to drop (backlog full)
        self.tx_bytes = 0          # bytes passed to tx_sink
        self.loopback_bytes = 0    # THR writes looped back into RX
        self.interrupts = 0        # rising edges of the IRQ output
        self._irq_level = False
        self._power_on()

    # -- state -------------------------------------------------------------------------

    def _power_on(self) -> None:
        self.ier = 0
        self.lcr = 0
        self.mcr = MCR_OUT2          # REFERENCE: MCR reads 0x08 after reset
        self.fcr = 0
        self.scr = 0
        self.divisor = DEFAULT_DIVISOR
        self._overrun = False        # LSR.OE latch, cleared by reading LSR
        self._thr_ipending = False   # THR-empty interrupt latch (see _write_ier)
        self._msr_delta = 0          # MSR bits 3:0
        self._lines = _EXTERNAL_MODEM_LINES
        self._fifo = bytearray()     # what the chip holds (RX FIFO or the RBR)
        self._backlog = bytearray()  # host side, upstream of the chip
        self._fifo_cap = 1           # FIFO disabled: only the RBR
        self._trigger = 1
        self._rtab = self._read_normal
        self._wtab = self._write_normal

    def reset(self) -> None:
        """Power-on state; queued input is discarded, counters are kept."""
        self._power_on()
        self._update_irq()

    # -- the Device interface ----------------------------------------------------------

    # The UART is the device of the benchmarks and of every console byte: a one-byte
    # access goes straight to the register table (what ByteRegisters would do, without
    # its two extra calls, ~0.2 us); wider ones are split by ByteRegisters.

    def read(self, offset: int, size: int) -> int:
        """Read the register(s), then recompute the interrupt line once."""
        if size == 1 and 0 <= offset < 8:
            value = self._rtab[offset]()
        else:
            value = super().read(offset, size)
        self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write the register(s), then recompute the interrupt line once."""
        if size == 1 and 0 <= offset < 8:
            self._wtab[offset](value & 0xFF)
        else:
            super().write(offset, size, value)
        self._update_irq()

    def read_byte(self, offset: int) -> int:
        """One register, through the table of the current DLAB setting."""
        return self._rtab[offset]()

    def write_byte(self, offset: int, value: int) -> None:
        self._wtab[offset](value)

    def feed(self, data: bytes) -> None:
        """Queue received bytes: the FIFO first, then the bounded backlog.

        Bytes beyond the backlog limit are dropped, counted in ``rx_dropped``, and
        reported to the guest as an overrun (LSR.OE), since data was really lost.
        """
        if not data:
            return
        self.rx_bytes += len(data)
        backlog = self._backlog
        if not backlog and not (self.mcr & MCR_LOOP):
            room = self._fifo_cap - len(self._fifo)
            if room > 0:
                self._fifo += data[:room]
                data = data[room:]
        if data:
            room = self.backlog_limit - len(backlog)
            if len(data) > room:
                self.rx_dropped += len(data) - max(room, 0)
                self._overrun = True
                data = data[:max(room, 0)]
            backlog += data
        self._update_irq()

    def status(self) -> dict[str, Any]:
        """Registers (read without side effects) and counters."""
        return {
            "ier": self.ier,
            "iir": self._iir_value(),
            "fcr": self.fcr,
            "lcr": self.lcr,
            "mcr": self.mcr,
            "lsr": self._lsr_value(),
            "msr": self._lines | self._msr_delta,
            "scr": self.scr,
            "divisor": self.divisor,
            "baud": BAUD_BASE // self.divisor if self.divisor else 0,
            "fifo_enabled": bool(self.fcr & FCR_ENABLE_FIFO),
            "rx_trigger": self._trigger,
            "rx_fifo": len(self._fifo),
            "rx_backlog": len(self._backlog),
            "loopback": bool(self.mcr & MCR_LOOP),
            "irq_level": self._irq_level,
            "rx_bytes": self.rx_bytes,
            "rx_dropped": self.rx_dropped,
            "tx_bytes": self.tx_bytes,
            "loopback_bytes": self.loopback_bytes,
            "interrupts": self.interrupts,
        }

    # -- shadow (posted writes, registers the client answers) ---------------------------

    def shadow(self) -> RegisterShadow:
        """THR/DLL, DLM (with DLAB) and SCR writes may be posted: no value comes back,
        and none of them changes a register shadowed here (THR only leaves the chip
        outside loopback). IER, LCR and MCR change only by the guest's own (synchronous)
        writes; LSR and MSR are shadowed while reading them has no side effect and
        nothing received is waiting: the console's polling loop then stays local."""
        dlab = self.lcr & LCR_DLAB
        posted = _POSTED_DLAB if dlab else _POSTED
        if self.mcr & MCR_LOOP:
            # THR writes loop into the receiver: LSR and MSR are not stable then.
            reads: tuple[tuple[int, int], ...] = (
                ((3, self.lcr), (4, self.mcr)) if dlab else
                ((1, self.ier), (3, self.lcr), (4, self.mcr)))
            return RegisterShadow(posted, reads)
        quiet = not self._fifo and not self._overrun
        if dlab:
            reads = ((3, self.lcr), (4, self.mcr))
        else:
            reads = ((1, self.ier), (3, self.lcr), (4, self.mcr))
        if quiet:
            reads += ((5, LSR_THRE | LSR_TEMT),)
        if not self._msr_delta:
            reads += ((6, self._lines),)
        return RegisterShadow(posted, reads)

    # -- interrupts --------------------------------------------------------------------

    def _pending(self) -> int:
        """The highest-priority pending interrupt identification (IIR bits 3:0)."""
        ier = self.ier
        if ier & IER_RLSI and self._overrun:
            return IIR_RLSI
        if ier & IER_RDI and self._fifo:
            # With FIFOs, below the trigger level the silicon waits four character
            # times and then reports a timeout; our bytes are already late, so the
            # timeout is due at once.
            if len(self._fifo) >= self._trigger:
                return IIR_RDI
            return IIR_RX_TIMEOUT
        if ier & IER_THRI and self._thr_ipending:
            return IIR_THRI
        if ier & IER_MSI and self._msr_delta:
            return IIR_MSI
        return IIR_NO_INT

    def _iir_value(self) -> int:
        iir = self._pending()
        if self.fcr & FCR_ENABLE_FIFO:
            iir |= IIR_FIFO_ENABLED
        return iir

    def _update_irq(self) -> None:
        # The PC wires INTR through a buffer enabled by OUT2, so a driver that leaves
        # OUT2 clear gets no interrupts at all; Linux sets it.
        # OUT2 and IER first: they are cheap, and usually settle it without _pending().
        level = bool(self.mcr & MCR_OUT2 and self.ier and self._pending() != IIR_NO_INT)
        if level != self._irq_level:
            self._irq_level = level
            if level:
                self.interrupts += 1
            self.irq.set_level(level)

    # -- RX path -----------------------------------------------------------------------

    def _refill(self) -> None:
        """Move backlog bytes into the chip while there is room (not in loopback: the
        receiver input is disconnected from the line then, so the backlog waits)."""
        backlog = self._backlog
        if backlog and not (self.mcr & MCR_LOOP):
            room = self._fifo_cap - len(self._fifo)
            if room > 0:
                self._fifo += backlog[:room]
                del backlog[:room]

    def _receive_internal(self, b: int) -> None:
        """A byte produced by the chip itself (loopback): a full FIFO is an overrun."""
        if len(self._fifo) < self._fifo_cap:
            self._fifo.append(b)
        else:
            self._overrun = True

    # -- register handlers -------------------------------------------------------------

    def _read_rbr(self) -> int:
        fifo = self._fifo
        if not fifo:
            return 0
        b = fifo[0]
        del fifo[0]
        if self._backlog:
            self._refill()
        return b

    def _read_ier(self) -> int:
        return self.ier

    def _read_iir(self) -> int:
        iir = self._iir_value()
        # Reading IIR acknowledges a THR-empty interrupt, but only when that is the
        # source being reported (lower priority sources stay latched).
        if iir & 0x0F == IIR_THRI:
            self._thr_ipending = False
        return iir

    def _read_lcr(self) -> int:
        return self.lcr

    def _read_mcr(self) -> int:
        return self.mcr

    def _lsr_value(self) -> int:
        # Bit 7 (error in FIFO) and PE/FE/BI are never set, so LSR can never read 0xFF,
        # which Linux takes as "no UART here".
        lsr = LSR_THRE | LSR_TEMT
        if self._fifo:
            lsr |= LSR_DR
        if self._overrun:
            lsr |= LSR_OE
        return lsr

    def _read_lsr(self) -> int:
        lsr = self._lsr_value()
        self._overrun = False
        return lsr

    def _read_msr(self) -> int:
        msr = self._lines | self._msr_delta
        self._msr_delta = 0
        return msr

    def _read_scr(self) -> int:
        return self.scr

    def _read_dll(self) -> int:
        return self.divisor & 0xFF

    def _read_dlm(self) -> int:
        return self.divisor >> 8

    def _write_thr(self, b: int) -> None:
        # Writing THR clears the THR-empty interrupt: if it was the only source, the
        # line falls now ...
        self._thr_ipending = False
        self._update_irq()
        if self.mcr & MCR_LOOP:
            self.loopback_bytes += 1
            self._receive_internal(b)
        else:
            self.tx_bytes += 1
            self.tx_sink(bytes((b,)))
        # ... and the byte leaves at once, so the holding register is empty again and
        # the interrupt re-arms (write() raises the line again), as it would a
        # character time later on the silicon. The fall and rise are one edge for an
        # edge-triggered 8259: a driver that writes one byte per interrupt gets the
        # next interrupt, exactly as QEMU's model gives it.
        self._thr_ipending = True

    def _write_ier(self, v: int) -> None:
        v &= 0x0F   # bits 7:4 read back as 0; Linux's probe checks both halves
        changed = v ^ self.ier
        self.ier = v
        # Enabling THRI while the THR is empty raises the interrupt at once, even if
        # an earlier one was acknowledged by reading IIR (Linux's THRE test and
        # Windows rely on this; QEMU and Bochs sample on the rising edge too).
        if changed & IER_THRI:
            self._thr_ipending = bool(v & IER_THRI)

    def _write_fcr(self, v: int) -> None:
        enable = v & FCR_ENABLE_FIFO
        if (enable ^ self.fcr) & FCR_ENABLE_FIFO:
            # Switching the FIFOs on or off empties them.
            clear = True
        else:
            # The clear bits only act together with the enable bit.
            clear = bool(enable and v & FCR_CLEAR_RCVR)
        if clear:
            # Only the chip's FIFO is cleared; the host-side backlog models bytes
            # still on the wire and flows in right after.
            self._fifo.clear()
        # The other bits are only taken while the FIFO is (being) enabled.
        self.fcr = v & (FCR_ENABLE_FIFO | FCR_DMA_SELECT | FCR_TRIGGER_MASK) if enable else 0
        if enable:
            self._fifo_cap = RX_FIFO_SIZE
            self._trigger = _TRIGGER_LEVELS[v >> 6]
        else:
            self._fifo_cap = 1
            self._trigger = 1
            if len(self._fifo) > 1:     # cannot happen after the clear above; be safe
                del self._fifo[1:]
        self._refill()

    def _write_lcr(self, v: int) -> None:
        self.lcr = v
        if v & LCR_DLAB:
            self._rtab, self._wtab = self._read_dlab, self._write_dlab
        else:
            self._rtab, self._wtab = self._read_normal, self._write_normal

    def _write_mcr(self, v: int) -> None:
        v &= 0x1F   # bits 7:5 are 0 on a 16550A
        was_loop = self.mcr & MCR_LOOP
        self.mcr = v
        lines = _loopback_lines(v) if v & MCR_LOOP else _EXTERNAL_MODEM_LINES
        self._set_modem_lines(lines)
        if was_loop and not (v & MCR_LOOP):
            self._refill()   # the receiver is connected to the line again

    def _set_modem_lines(self, lines: int) -> None:
        old = self._lines
        if lines == old:
            return
        changed = old ^ lines
        delta = 0
        if changed & MSR_CTS:
            delta |= MSR_DCTS
        if changed & MSR_DSR:
            delta |= MSR_DDSR
        if changed & MSR_DCD:
            delta |= MSR_DDCD
        if old & MSR_RI and not lines & MSR_RI:
            delta |= MSR_TERI   # trailing edge of ring indicator only
        self._msr_delta |= delta
        self._lines = lines

    def _write_scr(self, v: int) -> None:
        self.scr = v

    def _write_dll(self, v: int) -> None:
        self.divisor = (self.divisor & 0xFF00) | v

    def _write_dlm(self, v: int) -> None:
        self.divisor = (self.divisor & 0x00FF) | (v << 8)

    def _write_ignored(self, v: int) -> None:
        # LSR and MSR writes are factory-test only on the silicon.
        pass
