"""Forwarded port reads through one and two servers, and the cost of TLS, on the rig.

    python3 bench/hops.py [--count N] [--mode pinned|unpinned|both]

Builds the several-hosts rig (scripts/netns_rig.sh: client, a, b in their own network
namespaces), starts real ``remote-hw server`` processes, and runs a guest looping on
``in al, dx`` in the client namespace against:

* one hop:  client -> b (b holds the UART), mutual TLS;
* two hops: client -> a -> b (a forwards by its static directory), mutual TLS on both
            (a server accepts a peer only with a server certificate off the loopback);
* one hop over plain TCP: client -> b', the same server without certificates.

Prints median and p99 per-access latency of each (µs, from the guest's point of view:
time between consecutive handler calls), the ratio two hops / one hop (target <= 1.6)
and TLS / plain on one hop. For reference it also measures the bare floor of the same
topology with no remote-hw code: a plain TCP ping-pong client -> b and client -> a -> b
through a minimal blocking relay on a (frames of the same sizes), and prints that ratio.
Needs root (network namespaces) and /dev/kvm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RIG = ROOT / "scripts" / "netns_rig.sh"
PREFIX = "rhbench"
NET = "10.77.251"
ADDR = {"client": f"{NET}.10", "a": f"{NET}.11", "b": f"{NET}.12"}


def measure(address: str, count: int, tls_dir: str | None) -> dict:
    """Run in the client namespace: one figure, as JSON on stdout."""
    import roundtrip as rt

    from remote_hw.client.agent import RemoteDevice
    from remote_hw.config import parse_map
    from remote_hw.net.link import ServerLink
    from remote_hw.net.security import TlsConfig
    host, port = address.rsplit(":", 1)
    tls = TlsConfig(Path(tls_dir), "bench") if tls_dir else None
    link = ServerLink("x", (host, int(port)), client_name="bench", tls=tls).connect()
    try:
        if link.attach(1, "uart0"):
            raise SystemExit("attach failed")
        dev = RemoteDevice(link, 1, parse_map("port:0x3f8-0x3ff=x/uart0"))
        med, p99 = rt.stats(rt.run_guest(dev, count, base=0x3F8))
    finally:
        link.close()
    return {"median": med, "p99": p99}


ECHO = r"""
import socket, sys
ls = socket.create_server((sys.argv[1], int(sys.argv[2]))); print("ready", flush=True)
c, _ = ls.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = c.recv(65536)
    if not d: break
    c.sendall(b"F" * int(sys.argv[3]))
"""

RELAY = r"""
import socket, sys
ls = socket.create_server((sys.argv[1], int(sys.argv[2])))
up = socket.create_connection((sys.argv[3], int(sys.argv[4])))
up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); print("ready", flush=True)
c, _ = ls.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = c.recv(65536)
    if not d: break
    up.sendall(d)
    c.sendall(up.recv(65536))
"""

PINGPONG = r"""
import socket, sys, time, statistics, json
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg, n, out = b"R" * int(sys.argv[3]), int(sys.argv[4]), []
for _ in range(n):
    t0 = time.perf_counter_ns(); s.sendall(msg); s.recv(65536)
    out.append((time.perf_counter_ns() - t0) / 1000)
out = sorted(out[n // 20:])
print(json.dumps({"median": statistics.median(out), "p99": out[int(len(out) * 0.99)]}))
"""


def bare(pinned: bool, count: int) -> dict[str, dict]:
    """The same topology with no remote-hw code: ping-pong, one and two hops."""
    from roundtrip import _frame_sizes
    req, fb = _frame_sizes()
    out = {}
    for name, host, port in [("bare one hop", "b", 7721), ("bare two hops", "a", 7722)]:
        echo = subprocess.Popen(_ns("b", [sys.executable, "-c", ECHO, ADDR["b"], str(port),
                                          str(fb)], pinned), stdout=subprocess.PIPE, text=True)
        procs = [echo]
        echo.stdout.readline()
        if host == "a":
            relay = subprocess.Popen(_ns("a", [sys.executable, "-c", RELAY, ADDR["a"],
                                               str(port), ADDR["b"], str(port)], pinned),
                                     stdout=subprocess.PIPE, text=True)
            relay.stdout.readline()
            procs.append(relay)
        try:
            r = subprocess.run(_ns("client", [sys.executable, "-c", PINGPONG, ADDR[host],
                                              str(port), str(req), str(count)], pinned),
                               capture_output=True, text=True, timeout=300)
            out[name] = json.loads(r.stdout.strip().splitlines()[-1])
        finally:
            for p in procs:
                p.kill()
                p.wait(10)
    return out


def _ns(host: str, argv: list[str], pinned: bool) -> list[str]:
    pin = ["taskset", "-c", "0"] if pinned else []
    return ["ip", "netns", "exec", f"{PREFIX}-{host}", *pin, *argv]


def _server(host: str, argv: list[str], pinned: bool) -> subprocess.Popen:
    p = subprocess.Popen(_ns(host, [sys.executable, "-m", "remote_hw.cli", "server",
                                    "--no-mount", *argv],
                             pinned), cwd=ROOT, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    for line in p.stderr:
        if "listening on" in line:
            return p
    raise SystemExit(f"server on {host} did not start")


def run(mode: str, count: int, keys: str) -> dict[str, dict]:
    pinned = mode == "pinned"
    procs = [
        _server("b", ["--listen", f"{ADDR['b']}:7700", "--server-id", "b",
                      "--device", "uart0=uart16550", "--tls-dir", keys], pinned),
        _server("b", ["--listen", f"{ADDR['b']}:7710", "--server-id", "b",
                      "--device", "uart0=uart16550"], pinned),
        _server("a", ["--listen", f"{ADDR['a']}:7700", "--server-id", "a", "--tls-dir", keys,
                      "--peer", f"b={ADDR['b']}:7700", "--route", "uart0=b"], pinned),
    ]
    out = {}
    try:
        for name, addr, tls in [("one hop", f"{ADDR['b']}:7700", keys),
                                ("two hops", f"{ADDR['a']}:7700", keys),
                                ("one hop, plain", f"{ADDR['b']}:7710", None)]:
            argv = [sys.executable, str(Path(__file__).resolve()), "--measure", addr,
                    "--count", str(count)] + (["--tls-dir", tls] if tls else [])
            r = subprocess.run(_ns("client", argv, pinned), capture_output=True, text=True,
                               cwd=ROOT, timeout=600)
            if r.returncode != 0:
                raise SystemExit(f"{name}: {r.stderr[-2000:]}")
            out[name] = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    out.update(bare(pinned, count))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--mode", choices=("pinned", "unpinned", "both"), default="both")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--tls-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.count, args.tls_dir)))
        return
    from remote_hw.net import security
    subprocess.run(["bash", str(RIG), "up", PREFIX, NET], check=True, capture_output=True)
    try:
        with tempfile.TemporaryDirectory() as keys:
            security.init_ca(keys)
            security.issue(keys, "a", "server")
            security.issue(keys, "b", "server")
            security.issue(keys, "bench", "client")
            for mode in (["pinned", "unpinned"] if args.mode == "both" else [args.mode]):
                r = run(mode, args.count, keys)
                print(f"[{mode}] per-access latency over {args.count} accesses (µs)")
                for name, v in r.items():
                    print(f"  {name:<14} median {v['median']:7.1f}   p99 {v['p99']:7.1f}")
                one, two, plain = (r[k]["median"] for k in ("one hop", "two hops",
                                                           "one hop, plain"))
                print(f"  ratio two hops / one hop = {two:.1f} / {one:.1f} = {two / one:.2f}"
                      "   (target <= 1.6)")
                print(f"  ratio TLS / plain (one hop) = {one:.1f} / {plain:.1f} = "
                      f"{one / plain:.2f}")
                b1, b2 = r["bare one hop"]["median"], r["bare two hops"]["median"]
                print(f"  bare floor, two hops / one hop = {b2:.1f} / {b1:.1f} = {b2 / b1:.2f}"
                      "   (plain TCP relay, no remote-hw code)")
                time.sleep(0.5)
    finally:
        subprocess.run(["bash", str(RIG), "down", PREFIX], capture_output=True)


if __name__ == "__main__":
    main()
