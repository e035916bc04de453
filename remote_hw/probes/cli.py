"""``remote-hw trace`` and ``remote-hw top``: the probes on the command line.

``add_parsers(subparsers)`` adds both subcommands to the main parser; each sets
``func`` to its handler, which returns the exit status: 0, or 1 with one sentence on
stderr when the probes cannot run here. Argument errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import model as M
from .loader import KvmProbe, ProbeUnavailable
from .model import Snapshot
from .render import TRACE_HEADER, DeviceSelector, EventFilter, VmSelector, format_event, render_top

CLEAR = "\x1b[H\x1b[J"


def _checked(parse: Callable[[str], Any]) -> Callable[[str], str]:
    """Validate a selector at parse time (argparse error, exit 2); keep the text."""
    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    check.__name__ = parse.__qualname__.split(".")[0]
    return check


def _positive(kind: type) -> Callable[[str], Any]:
    def conv(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return v
    conv.__name__ = kind.__name__
    return conv


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vm", action="append", default=[], type=_checked(VmSelector.parse),
                   metavar="PID[/VM]|NAME",
                   help="only this monitor process (pid), VM of it, or process name "
                        "(a shell pattern); repeat for more")
    p.add_argument("--device", action="append", default=[],
                   type=_checked(DeviceSelector.parse), metavar="LABEL|port:A[-B]|mmio:A[-B]",
                   help="only accesses to this device: part of its label (e.g. a/uart0) "
                        "or an address range; repeat for more")
    p.add_argument("--dir", action="append", default=[], choices=sorted(M.DIRS),
                   help="only reads or only writes")
    p.add_argument("--kind", action="append", default=[], choices=sorted(M.KINDS),
                   help="only port or only MMIO accesses")
    p.add_argument("--class", dest="classes", action="append", default=[],
                   choices=sorted(M.CLASSES), help="only remote, local or unmapped accesses")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"],
                   help="how much to log on stderr (default: warning)")


def add_parsers(subparsers: Any) -> None:
    """Add ``trace`` and ``top`` to the main parser's subparsers."""
    t = subparsers.add_parser(
        "trace", help="stream every guest device access on this host (eBPF)",
        description="Print every port and MMIO access of every KVM guest on this host, "
                    "as the kernel sees it, with its class (remote, local, unmapped) and "
                    "how long it stalled the vCPU. Needs root and bcc "
                    "(scripts/install_bpf.sh).")
    _filters(t)
    t.add_argument("--count", type=_positive(int), metavar="N",
                   help="stop after N accesses shown")
    t.add_argument("--duration", type=_positive(float), metavar="SECONDS",
                   help="stop after this long")
    t.add_argument("--no-header", action="store_true", help="no column header line")
    t.set_defaults(func=cmd_trace)

    o = subparsers.add_parser(
        "top", help="per-VM and per-device access rates and stall times (eBPF)",
        description="Show, refreshed in place, the access rates of every KVM guest on "
                    "this host per VM and per device, and the percentiles of the time "
                    "accesses handled in user space stalled the vCPU. Needs root and bcc "
                    "(scripts/install_bpf.sh).")
    _filters(o)
    o.add_argument("--interval", type=_positive(float), default=1.0, metavar="SECONDS",
                   help="refresh period (default 1)")
    o.add_argument("--iterations", type=_positive(int), metavar="N",
                   help="stop after N frames (default: until interrupted)")
    o.add_argument("--limit", type=_positive(int), default=20, metavar="N",
                   help="rows per table (default 20)")
    o.set_defaults(func=cmd_top)


def _filter_of(args: argparse.Namespace) -> EventFilter:
    return EventFilter.from_args(args.vm, args.device, args.dir, args.kind, args.classes)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    return stop


def _open(command: str) -> KvmProbe | None:
    try:
        return KvmProbe()
    except ProbeUnavailable as e:
        print(f"remote-hw {command}: {e}", file=sys.stderr)
        return None


def cmd_trace(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    flt = _filter_of(args)
    probe = _open("trace")
    if probe is None:
        return 1
    stop = _stop_on_signals()
    shown = 0
    t0: list[int] = []

    def on_event(ev: Any) -> None:
        nonlocal shown
        if stop.is_set():
            return
        process = probe.process_name(ev.tgid)
        label = probe.label(ev.tgid, ev.vm, ev.kind, ev.range_start, ev.cls)
        if not flt.wants_event(ev, process, label):
            return
        if not t0:
            t0.append(ev.ts_ns)
        out.write(format_event(ev, t0[0], process, label) + "\n")
        shown += 1
        if args.count and shown >= args.count:
            stop.set()

    try:
        probe.on_event(on_event)
        probe.set_trace(True, flt.kernel_tgid())
        if not args.no_header:
            out.write(TRACE_HEADER + "\n")
        out.flush()
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.is_set():
            probe.poll(100)
            out.flush()
            if deadline is not None and time.monotonic() >= deadline:
                break
        lost = probe.stats()["lost_events"]
        print(f"remote-hw trace: {shown} accesses shown"
              + (f", {lost} lost (the ring buffer was full)" if lost else ""),
              file=sys.stderr)
    except BrokenPipeError:
        pass
    finally:
        probe.set_trace(False)
        probe.close()
    return 0


def cmd_top(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    flt = _filter_of(args)
    probe = _open("top")
    if probe is None:
        return 1
    stop = _stop_on_signals()
    in_place = hasattr(out, "isatty") and out.isatty()
    frames = 0
    try:
        prev = Snapshot(time.monotonic())
        while not stop.wait(args.interval):
            cur = probe.snapshot()
            frame = render_top(prev, cur, probe.process_name, probe.label, flt,
                               limit=args.limit, stats=probe.stats())
            out.write((CLEAR + frame + "\n") if in_place else (frame + "\n\n"))
            out.flush()
            prev = cur
            frames += 1
            if args.iterations and frames >= args.iterations:
                break
            if frames % 10 == 0:
                probe.prune()
                probe.forget_names()
    except BrokenPipeError:
        pass
    finally:
        probe.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m remote_hw.probes.cli trace|top ...`` (the same as remote-hw's)."""
    p = argparse.ArgumentParser(prog="remote-hw")
    add_parsers(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
