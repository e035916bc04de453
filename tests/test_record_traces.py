"""``scripts/record_traces.py --convert-only``: QEMU's log into traces, without QEMU.

Why: a converter that parsed nothing used to exit 0 and write empty traces (issue 14),
which look like a recording of devices nobody touched; and it refused to start without
QEMU although converting runs none. The script is run as a user runs it, with a PATH
that holds no QEMU, on small logs written here in the format QEMU 7.2 writes under
``-msg timestamp=on`` (docs/traces.md lists the event formats).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from remote_hw.devices.tracefmt import TraceRecord, read_trace

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "record_traces.py"
QEMU = "qemu-system-x86_64"
MAIN, VCPU = 4000, 4001          # thread ids: QEMU's main loop (its pid) and the vCPU
TYPED_AT, TYPED = 10.5, 0x61     # the recorder typed "a" into COM1 at this wall-clock time

# A tiny session, as QEMU logs it: the guest enables COM1's receive interrupt, a byte
# arrives from the host (main loop), the guest reads IIR then the byte; a key press
# arrives (main loop), the guest reads the i8042 status then the scan code.
LOG = f"""\
{VCPU}@10.000001:memory_region_ops_write cpu 0 mr 0x5d0 addr 0x3f9 value 0x1 size 1 name 'serial'
{VCPU}@10.000002:serial_write write addr 0x01 val 0x01
{MAIN}@10.600000:x86_gsi_interrupt GSI interrupt #4 level:1
{VCPU}@10.700000:serial_read read addr 0x02 val 0x04
{VCPU}@10.700001:memory_region_ops_read cpu 0 mr 0x5d0 addr 0x3fa value 0x4 size 1 name 'serial'
{VCPU}@10.800000:serial_read read addr 0x00 val 0x61
{VCPU}@10.800001:x86_gsi_interrupt GSI interrupt #4 level:0
{VCPU}@10.800002:memory_region_ops_read cpu 0 mr 0x5d0 addr 0x3f8 value 0x61 size 1 name 'serial'
{MAIN}@20.000001:ps2_keyboard_event 0x55e0 qcode 35 down 1 modifier 0x0 modifiers 0x0 set 2 xlate 1
{MAIN}@20.000002:ps2_put_keycode 0x55e0 keycode 0x23
{MAIN}@20.000003:x86_gsi_interrupt GSI interrupt #1 level:1
{VCPU}@20.100000:pckbd_kbd_read_status 0x1d
{VCPU}@20.100001:memory_region_ops_read cpu 0 mr 0x5f0 addr 0x64 value 0x1d size 1 name 'i8042-cmd'
{VCPU}@20.200000:x86_gsi_interrupt GSI interrupt #1 level:0
{VCPU}@20.200001:x86_gsi_interrupt GSI interrupt #12 level:0
{VCPU}@20.200002:ps2_read_data 0x55e0
{VCPU}@20.200003:pckbd_kbd_read_data 0x23
{VCPU}@20.200004:memory_region_ops_read cpu 0 mr 0x5f1 addr 0x60 value 0x23 size 1 name 'i8042-data'
{MAIN}@20.300001:ps2_keyboard_event 0x55e0 qcode 35 down 0 modifier 0x0 modifiers 0x0 set 2 xlate 1
"""

# What docs/traces.md's rules make of LOG, record by record: an access is R/W at its
# offset from the device's base; an IRQ record follows each change of the line's level,
# after the access or input that changed it; a main-loop GSI 4 edge after a typed byte
# is that byte's arrival (IN); a key's scan code entering the queue is KEY.
EXPECTED = {
    "linux-8250-com1": [
        TraceRecord("uart0", "W", 1, 1, 0x01),
        TraceRecord("uart0", "IN", value=TYPED),
        TraceRecord("uart0", "IRQ", value=1),
        TraceRecord("uart0", "R", 2, 1, 0x04),
        TraceRecord("uart0", "R", 0, 1, TYPED),
        TraceRecord("uart0", "IRQ", value=0),
    ],
    "linux-i8042": [
        TraceRecord("kbd", "KEY", value=0x23),
        TraceRecord("kbd", "IRQ", value=1),
        TraceRecord("kbd", "R", 4, 1, 0x1D),
        TraceRecord("kbd", "R", 0, 1, 0x23),
        TraceRecord("kbd", "IRQ", value=0),
    ],
}


def _workdir(tmp_path: Path, log: str) -> Path:
    """A --workdir as a recording leaves it: QEMU's log and recording.json."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "qemu-trace.log").write_text(log)
    (work / "recording.json").write_text(json.dumps({
        "log": str(work / "qemu-trace.log"), "qemu_pid": MAIN,
        "sent": {"uart0": [[TYPED_AT, TYPED]]}, "keys": [[19.9, "h"]], "seconds": 1.0,
        "qemu_version": "QEMU emulator version 7.2.0", "kernel": "vmlinuz-6.1.0-test-amd64",
        "com2": False}))
    return work


def _no_qemu_env(tmp_path: Path) -> dict[str, str]:
    """The environment with a PATH that certainly holds no QEMU."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    env = dict(os.environ, PATH=str(empty))
    assert shutil.which(QEMU, path=env["PATH"]) is None
    return env


def _convert(tmp_path: Path, log: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    work = _workdir(tmp_path, log)
    out = tmp_path / "traces"
    r = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(work), "--convert-only",
                        "--plain", "--out", str(out)],
                       capture_output=True, text=True, timeout=60, env=_no_qemu_env(tmp_path))
    return r, out


def _written(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_converts_a_small_log_record_by_record_without_qemu(tmp_path: Path) -> None:
    r, out = _convert(tmp_path, LOG)
    assert r.returncode == 0, r.stderr
    assert _written(out) == sorted(f"{stem}.trace" for stem in EXPECTED)
    for stem, expected in EXPECTED.items():
        trace = read_trace(out / f"{stem}.trace")
        assert trace.records == expected, stem
        counts = dict(kv.split("=") for kv in trace.meta["records"].split())
        assert sum(map(int, counts.values())) == len(expected)
    # the host's key press is kept as a comment, in order, down then up
    text = (out / "linux-i8042.trace").read_text()
    assert re.findall(r"host: key h (down|up)", text) == ["down", "up"]


def test_empty_log_fails_and_writes_nothing(tmp_path: Path) -> None:
    r, out = _convert(tmp_path, "")
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert "nothing to convert" in err[0] and "no traces written" in err[0]
    assert _written(out) == []


def test_log_without_thread_prefix_fails_naming_it(tmp_path: Path) -> None:
    # the same events as QEMU writes them without -msg timestamp=on
    bare = re.sub(r"^\d+@\d+\.\d+:", "", LOG, flags=re.M)
    assert bare != LOG and not re.search(r"^\d+@", bare, re.M)
    r, out = _convert(tmp_path, bare)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert "line 1 of" in err[0] and "-msg timestamp=on" in err[0]
    assert _written(out) == []


def test_a_device_without_records_fails_before_any_trace_is_written(tmp_path: Path) -> None:
    uart_only = "".join(ln + "\n" for ln in LOG.splitlines()
                        if "i8042" not in ln and "ps2_" not in ln and "pckbd" not in ln
                        and "#1 " not in ln and "#12 " not in ln)
    r, out = _convert(tmp_path, uart_only)
    assert r.returncode != 0
    assert "no access to kbd" in r.stderr
    assert _written(out) == []                  # not even the UART's good trace


def test_recording_still_needs_qemu(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "w"),
                        "--out", str(tmp_path / "traces")],
                       capture_output=True, text=True, timeout=60, env=_no_qemu_env(tmp_path))
    assert r.returncode != 0
    assert f"{QEMU} not found" in r.stderr

