"""The register-trace format (remote_hw/devices/tracefmt.py) and the committed traces."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from remote_hw.devices.tracefmt import (
    TraceFormatError,
    TraceRecord,
    format_record,
    parse_line,
    parse_trace,
    read_trace,
    write_trace,
)

TRACES = Path(__file__).parent / "traces"

SAMPLE = """\
# remote-hw register trace v1
# device: uart0 uart16550 base=0x3f8 irq=4 (COM1)
# session: first line
# session: second line

uart0 W 1 1 0x02
uart0 IRQ 1          # trailing comment
uart0 R 2 1 0xc2
uart0 IRQ 0
# a comment between records: not header
uart0 IN 0x41
uart0 TIMEOUT
kbd KEY 0xf0
kbd AUXIRQ 1
kbd W 4 1 0xfe
kbd RESET
dev R 0x10 4 0xdeadbeef
"""

EXPECTED = [
    TraceRecord("uart0", "W", 1, 1, 0x02),
    TraceRecord("uart0", "IRQ", value=1),
    TraceRecord("uart0", "R", 2, 1, 0xC2),
    TraceRecord("uart0", "IRQ", value=0),
    TraceRecord("uart0", "IN", value=0x41),
    TraceRecord("uart0", "TIMEOUT"),
    TraceRecord("kbd", "KEY", value=0xF0),
    TraceRecord("kbd", "AUXIRQ", value=1),
    TraceRecord("kbd", "W", 4, 1, 0xFE),
    TraceRecord("kbd", "RESET"),
    TraceRecord("dev", "R", 0x10, 4, 0xDEADBEEF),
]


def test_parse_sample(tmp_path: Path) -> None:
    p = tmp_path / "a.trace"
    p.write_text(SAMPLE)
    recs = parse_trace(p)
    assert recs == EXPECTED
    assert [r.line for r in recs[:3]] == [6, 7, 8]
    assert recs[-1].line == 17


def test_header(tmp_path: Path) -> None:
    p = tmp_path / "a.trace"
    p.write_text(SAMPLE)
    meta = read_trace(p).meta
    assert meta["device"].startswith("uart0 uart16550 base=0x3f8")
    assert meta["session"] == "first line\nsecond line"
    assert not any("comment" in k for k in meta)


def test_gzip_detected_by_content(tmp_path: Path) -> None:
    p = tmp_path / "a.trace"          # no .gz suffix: detected by magic
    p.write_bytes(gzip.compress(SAMPLE.encode()))
    assert parse_trace(p) == EXPECTED


@pytest.mark.parametrize("name", ["r.trace", "r.trace.gz"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    write_trace(p, [EXPECTED[0], "a note", *EXPECTED[1:]],
                {"device": "uart0 test", "session": "one\ntwo"})
    t = read_trace(p)
    assert t.records == EXPECTED
    assert t.meta == {"device": "uart0 test", "session": "one\ntwo"}
    if name.endswith(".gz"):
        first = p.read_bytes()
        write_trace(p, [EXPECTED[0], "a note", *EXPECTED[1:]],
                    {"device": "uart0 test", "session": "one\ntwo"})
        assert p.read_bytes() == first      # reproducible bytes (no gzip timestamp)
        text = gzip.decompress(first).decode()
    else:
        text = p.read_text()
    assert "# a note\n" in text


def test_format_record() -> None:
    assert format_record(TraceRecord("uart0", "R", 5, 1, 0x60)) == "uart0 R 5 1 0x60"
    assert format_record(TraceRecord("d", "W", 8, 2, 0x1)) == "d W 8 2 0x0001"
    assert format_record(TraceRecord("kbd", "KEY", value=0x1C)) == "kbd KEY 0x1c"
    assert format_record(TraceRecord("uart0", "IRQ", value=1)) == "uart0 IRQ 1"
    assert format_record(TraceRecord("kbd", "RESET")) == "kbd RESET"
    for r in EXPECTED:
        assert parse_line(format_record(r)) == r


def test_blank_and_comment_lines() -> None:
    assert parse_line("") is None
    assert parse_line("   \n") is None
    assert parse_line("# uart0 R 0 1 0x00") is None


@pytest.mark.parametrize("bad, words", [
    ("uart0 R 5 1", "R takes 3 argument(s), got 2"),
    ("uart0 R 5 1 0x100", "does not fit in 1 byte"),
    ("uart0 R 5 3 0x01", "size 3"),
    ("uart0 R -1 1 0x01", "negative offset"),
    ("uart0 R 5 1 zz", "value 'zz' is not an integer"),
    ("uart0 JUMP 1", "unknown op 'JUMP'"),
    ("uart0 IRQ 2", "level must be 0 or 1"),
    ("uart0 IRQ", "IRQ takes 1 argument(s), got 0"),
    ("uart0 IN 0x141", "byte value"),
    ("uart0 RESET 1", "RESET takes 0 argument(s)"),
    ("uart0", "expected '<device> <op> ...'"),
    ("0uart R 0 1 0x00", "bad device name"),
])
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, words: str) -> None:
    p = tmp_path / "bad.trace"
    p.write_text("# header: x\nuart0 W 1 1 0x02\n\n" + bad + "\nuart0 R 0 1 0x00\n")
    with pytest.raises(TraceFormatError) as ei:
        parse_trace(p)
    msg = str(ei.value)
    assert f"{p}:4: " in msg
    assert words in msg
    assert repr(bad) in msg                   # the offending text is quoted
    assert ei.value.line == 4 and ei.value.path == str(p)


def test_error_in_gzip_file_names_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.trace.gz"
    p.write_bytes(gzip.compress(b"uart0 W 1 1 0x02\nuart0 W 1 1 0x02 0x03\n"))
    with pytest.raises(TraceFormatError, match=r"bad\.trace\.gz:2: W takes 3 argument"):
        parse_trace(p)


def test_non_ascii_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.trace"
    p.write_bytes(b"uart0 W 1 1 0x02\nuart0 W 1 1 0x\xff\n")
    with pytest.raises(TraceFormatError, match="not ASCII"):
        parse_trace(p)


def test_record_validation_in_code() -> None:
    with pytest.raises(ValueError):
        TraceRecord("uart0", "R", 0, 1)                 # no value
    with pytest.raises(ValueError):
        TraceRecord("uart0", "IN", 0, 1, 0x41)          # IN has no offset/size
    with pytest.raises(ValueError):
        TraceRecord("uart0", "TIMEOUT", value=1)
    assert TraceRecord("a", "IRQ", value=1, line=3) == TraceRecord("a", "IRQ", value=1)


# -- the committed traces (recorded by scripts/record_traces.py) -----------------------

COMMITTED = sorted(TRACES.glob("*.trace*"))


def test_committed_traces_exist() -> None:
    names = {p.name.split(".")[0] for p in COMMITTED}
    assert {"linux-8250-com1", "linux-i8042"} <= names


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_trace_parses(path: Path) -> None:
    assert path.stat().st_size < 300_000
    t = read_trace(path)
    dev = t.meta["device"].split()[0]
    assert t.records and {r.device for r in t.records} == {dev}
    ops = {r.op for r in t.records}
    assert {"R", "W", "IRQ"} <= ops
    counts = dict(kv.split("=") for kv in t.meta["records"].split())
    assert sum(map(int, counts.values())) == len(t.records)


@pytest.mark.parametrize("path", [p for p in COMMITTED if "8250" in p.name],
                         ids=lambda p: p.name)
def test_committed_uart_trace_is_consistent(path: Path) -> None:
    """QEMU's 16550 raises its line exactly while IIR shows an interrupt: every IIR
    read must agree with the IRQ level the trace shows at that point."""
    recs = parse_trace(path)
    assert {"IN", "TIMEOUT"} <= {r.op for r in recs}
    level, lcr, checked = 0, 0, 0
    rx: list[int] = []
    for r in recs:
        if r.op == "IRQ":
            level = r.value
        elif r.op == "IN":
            rx.append(r.value)
        elif r.op == "W" and r.offset == 3:
            lcr = r.value
        elif r.op == "R" and r.offset == 2 and not lcr & 0x80:
            assert level == (0 if r.value & 1 else 1), f"line {r.line}"
            checked += 1
        elif r.op == "R" and r.offset == 0 and not lcr & 0x80 and rx:
            assert r.value == rx.pop(0), f"line {r.line}"   # bytes read in order
    assert checked > 10 and not rx


def test_committed_i8042_trace_ends_in_reset() -> None:
    recs = parse_trace(next(p for p in COMMITTED if p.name.startswith("linux-i8042")))
    assert recs[-2:] == [TraceRecord("kbd", "W", 4, 1, 0xFE), TraceRecord("kbd", "RESET")]
    keys = [r.value for r in recs if r.op == "KEY"]
    assert keys[:4] == [0x33, 0xF0, 0x33, 0x43]       # set-2 codes for h down, h up, i
    # the LED command (0xED, then the LED bits) goes out after the caps lock key
    writes = [r.value for r in recs if r.op == "W" and r.offset == 0]
    assert any(a == 0xED and b == 0x04 for a, b in zip(writes, writes[1:]))
