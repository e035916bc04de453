"""Reader and writer of register-trace files (format described in ``docs/traces.md``).

A trace is a text file, optionally gzip-compressed, with one record per line::

    # remote-hw register trace v1
    # device: uart0 uart16550 port=0x3f8 irq=4
    uart0 W 1 1 0x02       guest wrote 0x02 (1 byte) at offset 1
    uart0 IRQ 1            the device's interrupt line went to level 1
    uart0 R 2 1 0xc2       guest read offset 2 and got 0xc2
    uart0 IN 0x41          the host side delivered byte 0x41 to the device
    uart0 TIMEOUT          the device's own timer fired (16550 character timeout)
    kbd KEY 0x1c           the keyboard put scan code byte 0x1c into its queue
    kbd AUXIRQ 1           the device's second interrupt line (i8042: IRQ 12)
    kbd RESET              the device asked for a system reset (i8042 0xFE)

``#`` starts a comment (whole line or trailing). Comment lines of the form
``# key: value`` before the first record form the header (``read_trace().meta``).
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

__all__ = [
    "TraceRecord", "Trace", "TraceFormatError", "ACCESS_OPS", "LEVEL_OPS", "BYTE_OPS",
    "EVENT_OPS", "parse_line", "parse_trace", "read_trace", "format_record", "write_trace",
]

ACCESS_OPS = frozenset({"R", "W"})          # <dev> R|W <offset> <size> <value>
LEVEL_OPS = frozenset({"IRQ", "AUXIRQ"})    # <dev> IRQ|AUXIRQ <0|1>
BYTE_OPS = frozenset({"IN", "KEY"})         # <dev> IN|KEY <byte>
EVENT_OPS = frozenset({"TIMEOUT", "RESET"})  # <dev> TIMEOUT|RESET
ALL_OPS = ACCESS_OPS | LEVEL_OPS | BYTE_OPS | EVENT_OPS

_DEVICE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One line of a trace.

    ``offset`` and ``size`` are set for ``R``/``W`` only; ``value`` is the access value,
    the interrupt level (``IRQ``/``AUXIRQ``) or the byte (``IN``/``KEY``), and ``None``
    for ``TIMEOUT``/``RESET``. ``line`` is the 1-based line number in the file it came
    from (0 if built in code); it takes no part in comparisons.
    """

    device: str
    op: str
    offset: int | None = None
    size: int | None = None
    value: int | None = None
    line: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        _check(self)


@dataclass
class Trace:
    meta: dict[str, str]
    records: list[TraceRecord]


class TraceFormatError(ValueError):
    """A line that is not a valid record; the message names the file and line number."""

    def __init__(self, message: str, path: str | None = None, line: int = 0,
                 text: str | None = None) -> None:
        where = f"{path or '<trace>'}:{line}" if line else (path or "<trace>")
        full = f"{where}: {message}"
        if text is not None:
            full += f": {text.strip()!r}"
        super().__init__(full)
        self.path = path
        self.line = line


def _check(r: TraceRecord) -> None:
    if not isinstance(r.device, str) or not _DEVICE_RE.match(r.device):
        raise ValueError(f"bad device name {r.device!r}")
    if r.op in ACCESS_OPS:
        if r.offset is None or r.size is None or r.value is None:
            raise ValueError(f"{r.op} needs offset, size and value")
        if r.offset < 0:
            raise ValueError(f"negative offset {r.offset}")
        if r.size not in _SIZES:
            raise ValueError(f"size {r.size} is not 1, 2, 4 or 8")
        if not 0 <= r.value < 1 << (8 * r.size):
            raise ValueError(f"value {r.value:#x} does not fit in {r.size} byte(s)")
        return
    if r.offset is not None or r.size is not None:
        raise ValueError(f"{r.op} takes no offset or size")
    if r.op in LEVEL_OPS:
        if r.value not in (0, 1):
            raise ValueError(f"{r.op} level must be 0 or 1, not {r.value!r}")
    elif r.op in BYTE_OPS:
        if r.value is None or not 0 <= r.value <= 0xFF:
            raise ValueError(f"{r.op} needs a byte value (0..0xff), not {r.value!r}")
    elif r.op in EVENT_OPS:
        if r.value is not None:
            raise ValueError(f"{r.op} takes no value")
    else:
        raise ValueError(f"unknown op {r.op!r} (expected one of {', '.join(sorted(ALL_OPS))})")


def _int(tok: str, what: str) -> int:
    try:
        return int(tok, 0)
    except ValueError:
        raise ValueError(f"{what} {tok!r} is not an integer (decimal or 0x-hex)") from None


_NARGS = {**{o: 3 for o in ACCESS_OPS}, **{o: 1 for o in LEVEL_OPS | BYTE_OPS},
          **{o: 0 for o in EVENT_OPS}}


def parse_line(text: str, line: int = 0, path: str | None = None) -> TraceRecord | None:
    """Parse one line; ``None`` for blank and comment lines.

    Raises :class:`TraceFormatError` naming ``path`` and ``line``.
    """
    body = text.split("#", 1)[0].split()
    if not body:
        return None
    try:
        if len(body) < 2:
            raise ValueError("expected '<device> <op> ...'")
        dev, op, args = body[0], body[1], body[2:]
        if op not in _NARGS:
            raise ValueError(f"unknown op {op!r} (expected one of {', '.join(sorted(ALL_OPS))})")
        if len(args) != _NARGS[op]:
            raise ValueError(f"{op} takes {_NARGS[op]} argument(s), got {len(args)}")
        if op in ACCESS_OPS:
            return TraceRecord(dev, op, _int(args[0], "offset"), _int(args[1], "size"),
                               _int(args[2], "value"), line=line)
        if args:
            return TraceRecord(dev, op, value=_int(args[0], "value"), line=line)
        return TraceRecord(dev, op, line=line)
    except ValueError as e:
        raise TraceFormatError(str(e), path, line, text) from None


def _open_text(path: str | os.PathLike[str]) -> TextIO:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="ascii", newline=None)
    return open(path, encoding="ascii", newline=None)


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a trace file (plain or gzip, detected by content): header and records."""
    p = os.fspath(path)
    meta: dict[str, str] = {}
    records: list[TraceRecord] = []
    try:
        with _open_text(p) as f:
            for n, text in enumerate(f, 1):
                stripped = text.strip()
                if stripped.startswith("#"):
                    if not records:
                        key, sep, value = stripped[1:].partition(":")
                        key = key.strip()
                        if sep and key and " " not in key:
                            meta[key] = (meta[key] + "\n" if key in meta else "") + value.strip()
                    continue
                rec = parse_line(text, n, p)
                if rec is not None:
                    records.append(rec)
    except UnicodeDecodeError as e:
        raise TraceFormatError(f"not ASCII text ({e.reason})", p) from None
    return Trace(meta, records)


def parse_trace(path: str | os.PathLike[str]) -> list[TraceRecord]:
    """The records of a trace file (plain or gzip), in order."""
    return read_trace(path).records


def format_record(r: TraceRecord) -> str:
    """The canonical text of a record (no newline)."""
    if r.op in ACCESS_OPS:
        assert r.size is not None and r.value is not None
        return f"{r.device} {r.op} {r.offset} {r.size} 0x{r.value:0{2 * r.size}x}"
    if r.op in LEVEL_OPS:
        return f"{r.device} {r.op} {r.value}"
    if r.op in BYTE_OPS:
        return f"{r.device} {r.op} 0x{r.value:02x}"
    return f"{r.device} {r.op}"


def write_trace(path: str | os.PathLike[str], lines: Iterable[TraceRecord | str],
                header: dict[str, str] | None = None) -> None:
    """Write records (and ``str`` items as ``# comment`` lines) after a header.

    A path ending in ``.gz`` is gzip-compressed with a zero timestamp, so the same
    content gives the same bytes.
    """
    out: list[str] = ["# remote-hw register trace v1"]
    for k, v in (header or {}).items():
        for part in str(v).splitlines() or [""]:
            out.append(f"# {k}: {part}")
    for item in lines:
        out.append(f"# {item}" if isinstance(item, str) else format_record(item))
    data = ("\n".join(out) + "\n").encode("ascii")
    p = os.fspath(path)
    if p.endswith(".gz"):
        with open(p, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0,
                                                compresslevel=9) as g:
            g.write(data)
    else:
        with open(p, "wb") as f:
            f.write(data)
