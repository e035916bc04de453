"""The probes' Python side without a kernel: model, filters, rendering, CLI errors.

The real probes on real KVM guests are in test_probes.py.
"""

from __future__ import annotations

import argparse
import ctypes
import random
from types import SimpleNamespace

import pytest

from remote_hw.probes import cli as pcli
from remote_hw.probes import loader
from remote_hw.probes import model as M
from remote_hw.probes.agent_hook import DisabledProbeSession, ProbeSession, ranges_of_maps
from remote_hw.probes.model import CountRow, Histogram, RangeSpec, Snapshot
from remote_hw.probes.render import (
    DeviceSelector,
    EventFilter,
    VmSelector,
    format_event,
    render_top,
    top_rows,
)

# ------------------------------------------------------------------ header and model

def test_constants_agree_with_the_shared_header():
    assert M.mismatched_constants() == []


def test_header_structs_have_no_hidden_padding():
    # every struct is padded by hand: the ctypes size is the sum of its fields
    for name in ("rhw_range_key", "rhw_range_val", "rhw_vcpu_val", "rhw_pub", "rhw_proc",
                 "rhw_count_key", "rhw_count_val", "rhw_hist_key", "rhw_access_event"):
        cls = M.header_struct(name)
        total = sum(ctypes.sizeof(t) for _, t in cls._fields_)
        assert ctypes.sizeof(cls) == total, name
    assert ctypes.sizeof(M.header_struct("rhw_range_key")) * 8 == 32 + M.RANGE_KEY_BITS


def _covers(prefixes, bits):
    out = set()
    for value, plen in prefixes:
        assert value % (1 << (bits - plen)) == 0  # aligned
        out.update(range(value, value + (1 << (bits - plen))))
    return out


def test_range_prefixes_cover_exactly_small_space():
    bits = 8
    for start in range(0, 256, 7):
        for end in range(start, 256, 11):
            ps = list(M.range_prefixes(start, end, bits))
            assert _covers(ps, bits) == set(range(start, end + 1))
            assert len(ps) <= 2 * bits
            # disjoint: sizes add up
            assert sum(1 << (bits - p) for _, p in ps) == end - start + 1


def test_range_prefixes_64_bit():
    rnd = random.Random(5)
    for _ in range(200):
        a, b = sorted(rnd.randrange(1 << 64) for _ in range(2))
        ps = list(M.range_prefixes(a, b))
        assert sum(1 << (64 - p) for _, p in ps) == b - a + 1
        assert ps[0][0] == a and len(ps) <= 128
    assert list(M.range_prefixes(0x3F8, 0x3FF)) == [(0x3F8, 61)]
    assert list(M.range_prefixes(0, (1 << 64) - 1)) == [(0, 0)]
    with pytest.raises(ValueError):
        list(M.range_prefixes(5, 4))


def test_buckets_linear_then_log():
    assert M.bucket_of(0) == 0 and M.bucket_of(999) == 0 and M.bucket_of(1000) == 1
    assert M.bucket_of(255_999) == 255
    assert M.bucket_of(256_000) == 256 and M.bucket_of(511_999) == 256
    assert M.bucket_of(512_000) == 257
    assert M.bucket_of(10**18) == M.NBUCKETS - 1
    for ns in (0, 1500, 255_500, 256_000, 300_000, 5_000_000):
        lo, hi = M.bucket_bounds_us(M.bucket_of(ns))
        assert lo <= ns / 1000 < hi


def test_histogram_percentiles_and_delta():
    h = Histogram()
    for us in range(1, 101):                      # 1..100 us, one each
        h.add_ns(us * 1000)
    assert h.total == 100
    assert h.percentile(50) == 51.0              # bucket 50 holds [50, 51)
    assert h.percentile(99) == 100.0
    assert h.percentile(100) == 101.0
    assert Histogram().percentile(50) is None
    old = Histogram({5: 3})
    new = Histogram({5: 10, 7: 2})
    assert new.minus(old).buckets == {5: 7, 7: 2}
    assert Histogram({300: 1}).percentile(50) == float(1 << 53)


def test_rangespec_from_tuples_and_checks():
    assert RangeSpec.of(("port", 0x3F8, 0x3FF, "a/uart0")).cls == "remote"
    assert RangeSpec.of(("port", 0xF4, 0xF4, "dbg", "local")).cls == "local"
    assert RangeSpec.of(("mmio", 0xD000_0000, 0xD000_0FFF)).label == "mmio:0xd0000000-0xd0000fff"
    for bad in [("pci", 0, 1, "x"), ("port", 0x10, 0x0F, "x"), ("port", 0, 0x10000, "x"),
                ("port", 1, 2, "x", "elsewhere"), ("port", 1)]:
        with pytest.raises(ValueError):
            RangeSpec.of(bad)
    with pytest.raises(ValueError, match="overlap"):
        M.check_disjoint([RangeSpec.of(("port", 0, 7, "a")), RangeSpec.of(("port", 7, 9, "b"))])
    M.check_disjoint([RangeSpec.of(("port", 0, 7, "a")), RangeSpec.of(("mmio", 0, 7, "b"))])


def test_class_totals():
    rows = [CountRow(10, 1, 0, M.CLS_REMOTE, 0, 0x3F8, 5),
            CountRow(10, 1, 0, M.CLS_REMOTE, 1, 0x3F8, 2),
            CountRow(10, 2, 0, M.CLS_LOCAL, 1, 0xF4, 1),
            CountRow(11, 0, 1, M.CLS_UNMAPPED, 0, 0x1000, 9)]
    assert M.class_totals(rows) == {"remote": 7, "local": 1, "unmapped": 9}
    assert M.class_totals(rows, tgid=10, vm=1) == {"remote": 7, "local": 0, "unmapped": 0}


def test_agent_ranges_of_maps():
    maps = [SimpleNamespace(kind="port", start=0x3F8, end=0x3FF, server="a", device="uart0")]
    got = ranges_of_maps(maps)
    assert got == [RangeSpec("port", 0x3F8, 0x3FF, "a/uart0", "remote"),
                   RangeSpec("port", 0xF4, 0xF4, "debug-exit", "local")]


def test_disabled_session_is_inert():
    s = DisabledProbeSession("no bcc here")
    assert not s.available and s.reason == "no bcc here"
    s.publish_ranges(1, [("port", 1, 2, "x")])
    assert s.counts() == [] and s.report() == [] and s.report_lines() == []
    assert s.vm_lines() == []
    assert s.class_totals() == {"unmapped": 0, "remote": 0, "local": 0}
    s.close()


def test_optional_open_gives_disabled_session(monkeypatch):
    def boom(**kw):
        raise loader.ProbeUnavailable("the probes need a unicorn")
    monkeypatch.setattr("remote_hw.probes.agent_hook.KvmProbe", boom)
    s = ProbeSession.open(optional=True)
    assert not s.available and s.reason == "the probes need a unicorn"
    with pytest.raises(loader.ProbeUnavailable):
        ProbeSession.open()


# ---------------------------------------------------------------------- filters

def _ev(**kw):
    base = dict(ts_ns=2_000_000_000, addr=0x3FF, val=0x5A, stall_ns=42_000, range_start=0x3F8,
                tgid=100, tid=101, vm=1, count=1, kind=M.KIND_PORT, dir=M.DIR_READ,
                cls=M.CLS_REMOTE, size=1, flags=M.EV_USERSPACE)
    base.update(kw)
    return SimpleNamespace(**base)


def test_selectors_parse_and_match():
    assert VmSelector.parse("100") == VmSelector(pid=100)
    assert VmSelector.parse("100/2") == VmSelector(pid=100, vm=2)
    assert VmSelector.parse("qemu*") == VmSelector(name="qemu*")
    for bad in ("", "100/x", "qemu/1"):
        with pytest.raises(ValueError):
            VmSelector.parse(bad)
    assert VmSelector.parse("qemu*").matches(5, 0, "qemu-system-x86")
    assert not VmSelector.parse("100/2").matches(100, 1, "x")
    d = DeviceSelector.parse("port:0x3f8-0x3ff")
    assert d.matches(M.KIND_PORT, 0x3FA, 1, 1, "") and not d.matches(M.KIND_PORT, 0x400, 1, 1, "")
    assert not d.matches(M.KIND_MMIO, 0x3FA, 1, 1, "")
    m = DeviceSelector.parse("mmio:0x1000-0x1fff")
    assert m.matches(M.KIND_MMIO, 0xFFE, 4, 1, "")          # straddles the start
    assert DeviceSelector.parse("A/UART").matches(M.KIND_PORT, 0, 1, 1, "vm 1: a/uart0")
    for bad in ("", "port:zz", "port:5-4"):
        with pytest.raises(ValueError):
            DeviceSelector.parse(bad)


def test_event_filter():
    f = EventFilter.from_args(vms=["100"], dirs=["read"], classes=["remote"])
    assert f.kernel_tgid() == 100
    assert f.wants_event(_ev(), "python3", "a/uart0")
    assert not f.wants_event(_ev(dir=M.DIR_WRITE), "python3", "a/uart0")
    assert not f.wants_event(_ev(cls=M.CLS_LOCAL), "python3", "a/uart0")
    assert not f.wants_event(_ev(tgid=7), "python3", "a/uart0")
    assert EventFilter.from_args(vms=["1", "2"]).kernel_tgid() == 0
    assert EventFilter.from_args(vms=["qemu"]).kernel_tgid() == 0
    assert EventFilter().wants_event(_ev(), "", "")
    g = EventFilter.from_args(devices=["uart"], kinds=["port"])
    assert g.wants_event(_ev(), "p", "a/uart0") and not g.wants_event(_ev(), "p", "a/rtc0")


def test_format_event():
    line = format_event(_ev(), 1_000_000_000, "python3", "a/uart0")
    assert line.split() == ["1.000000", "100", "1", "python3", "port", "read", "0x3ff", "1",
                            "1", "0x5a", "remote", "42.0", "a/uart0"]
    line = format_event(_ev(flags=0, dir=M.DIR_WRITE), 2_000_000_000, "x", "port 0x3ff")
    assert " - " in line and "write" in line


# ------------------------------------------------------------------------- top

def _snap(t, rows, hists=None):
    return Snapshot(t, {r.key: r for r in rows}, hists or {})


def test_top_rates_and_percentiles():
    prev = _snap(0.0, [CountRow(100, 1, 0, M.CLS_REMOTE, 0, 0x3F8, 100)],
                 {(100, 1, 0, M.CLS_REMOTE, 0x3F8): Histogram({20: 100})})
    cur = _snap(2.0, [CountRow(100, 1, 0, M.CLS_REMOTE, 0, 0x3F8, 300),
                      CountRow(100, 1, 0, M.CLS_LOCAL, 1, 0xF4, 2),
                      CountRow(200, 0, 0, M.CLS_UNMAPPED, 0, 0x80, 50),
                      CountRow(300, 0, 0, M.CLS_UNMAPPED, 0, 0x80, 7)],   # filtered below
                {(100, 1, 0, M.CLS_REMOTE, 0x3F8): Histogram({20: 100, 40: 200})})
    names = {100: "agent", 200: "qemu", 300: "other"}.get
    labels = (lambda t, v, k, a, c: "a/uart0" if a == 0x3F8 else M.address_text(k, a, c))
    flt = EventFilter.from_args(vms=["100", "200"])
    vms, devs = top_rows(prev, cur, names, labels, flt)
    assert [(v.tgid, v.rates["remote"], v.rates["local"], v.rates["unmapped"]) for v in vms] \
        == [(100, 100.0, 1.0, 0.0), (200, 0.0, 0.0, 25.0)]
    assert vms[0].stall.buckets == {40: 200}       # only the interval's stalls
    assert vms[1].stall.total == 0
    assert [(d.device, d.reads, d.writes) for d in devs] == \
        [("a/uart0", 100.0, 0.0), ("port 0x80", 25.0, 0.0), ("port 0xf4", 0.0, 1.0)]
    frame = render_top(prev, cur, names, labels, flt)
    assert "2 VM(s)" in frame and "agent" in frame and "qemu" in frame
    assert "other" not in frame
    row = next(line for line in frame.splitlines() if line.startswith("a/uart0"))
    assert row.split()[-3:] == ["41", "41", "41"]   # p50/p90/p99 upper bounds, us
    empty = render_top(cur, cur, names, labels)
    assert "(no guest accesses)" in empty


# ------------------------------------------------------------------------- CLI

def _parser():
    p = argparse.ArgumentParser(prog="remote-hw")
    pcli.add_parsers(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_parsers():
    a = _parser().parse_args(["trace", "--vm", "12/3", "--device", "port:0x3f8-0x3ff",
                              "--dir", "read", "--class", "remote", "--count", "5"])
    assert a.func is pcli.cmd_trace and a.vm == ["12/3"] and a.count == 5
    a = _parser().parse_args(["top", "--interval", "0.5", "--iterations", "2"])
    assert a.func is pcli.cmd_top and a.interval == 0.5


@pytest.mark.parametrize("argv", [["trace", "--vm", "1/x"], ["trace", "--device", "port:q"],
                                  ["trace", "--dir", "sideways"], ["top", "--interval", "0"],
                                  ["trace", "--count", "-1"], ["trace", "--class", "far"]])
def test_cli_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2
    assert "argument" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["trace", "top"])
def test_cli_unavailable_is_one_sentence_and_exit_1(command, monkeypatch, capsys):
    def boom(**kw):
        raise loader.ProbeUnavailable("bcc's Python module cannot be imported (no module "
                                      "named 'bcc'); run scripts/install_bpf.sh as root")
    monkeypatch.setattr(pcli, "KvmProbe", boom)
    args = _parser().parse_args([command])
    assert args.func(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"remote-hw {command}: bcc's Python module cannot be imported (no module "
                   "named 'bcc'); run scripts/install_bpf.sh as root"]


def test_missing_bcc_module_is_probe_unavailable(monkeypatch):
    monkeypatch.setattr(loader, "_bcc_module", None)
    monkeypatch.setattr(loader, "BCC_PATH", "/nonexistent")
    import sys
    monkeypatch.setitem(sys.modules, "bcc", None)     # import bcc -> ImportError
    with pytest.raises(loader.ProbeUnavailable, match="install_bpf.sh"):
        loader.import_bcc()
    assert "/nonexistent" not in sys.path


def test_not_root_is_probe_unavailable(monkeypatch):
    monkeypatch.setattr(loader.os, "geteuid", lambda: 1000)
    with pytest.raises(loader.ProbeUnavailable, match="need root"):
        loader.check_environment()
