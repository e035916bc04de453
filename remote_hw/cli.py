"""The ``remote-hw`` command line.

Every argument error names the argument and exits with status 2 (argparse's own
convention); run-time failures (a server that cannot be reached) exit with 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from remote_hw import __version__
from remote_hw.config import (
    ConfigError,
    parse_address,
    parse_allow,
    parse_device,
    parse_device_ref,
    parse_map,
    parse_pair,
    parse_server,
    parse_size,
    vm_id_arg,
)


def _typed(fn: Callable[[str], object]) -> Callable[[str], object]:
    """Turn a ConfigError into argparse's 'argument --x: ...' message and exit 2."""
    def convert(text: str) -> object:
        try:
            return fn(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = fn.__name__.removeprefix("parse_")
    return convert


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: a number above 0 (``kind`` int or float)."""
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value
    convert.__name__ = kind.__name__
    return convert


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="remote-hw %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


class _Version(argparse.Action):
    """--version, with the state of the C fast path (remote_hw/net/fastio.py)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from remote_hw.net import fastio
        on, why = fastio.status()
        print(f"remote-hw {__version__} (C fast path: {'on' if on else 'off, ' + why})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remote-hw",
        description="Let KVM guests use devices that live on other machines, at register "
                    "level.")
    p.add_argument("--version", action=_Version, help="show the version and whether the C "
                   "fast path is in use, then exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def tls(sp: argparse.ArgumentParser, who: str) -> None:
        sp.add_argument("--tls-dir", metavar="DIR",
                        help="mutual TLS: the key directory from 'remote-hw keys' (ca.pem, "
                             "NAME.pem, NAME.key); without it connections are plain TCP")
        sp.add_argument("--tls-name", metavar="NAME",
                        help=f"which certificate in --tls-dir is this {who}'s "
                             f"(default: {'the --server-id' if who == 'server' else 'client'})")

    def posting(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--no-posting", dest="posting", action="store_false",
                        help="wait for the server's answer to every access: do not post "
                             "writes or answer shadowed registers locally "
                             "(docs/protocol.md)")
        sp.add_argument("--no-coalescing", dest="coalescing", action="store_false",
                        help="let every posted write exit to the monitor, instead of KVM "
                             "queueing them in its coalesced ring until the next exit")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="how much to log on stderr (default: info)")

    def mount(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--mount", metavar="DIR", default=None,
                        help="where to mount the FUSE view of the devices (default: "
                             "/run/remote-hw/SERVER-ID, skipped with a warning where FUSE "
                             "is unavailable; with --mount a failure is an error)")
        sp.add_argument("--no-mount", action="store_true",
                        help="do not mount the FUSE view")

    def limits(sp: argparse.ArgumentParser) -> None:
        from remote_hw.server.limits import Limits
        d = Limits()
        g = sp.add_argument_group(
            "limits", "what one peer may cost the server; each refusal is one log line "
                      "and, where the protocol allows, an ERROR naming the limit")
        g.add_argument("--max-connections", type=_positive(int), metavar="N",
                       default=d.max_connections,
                       help=f"connections open at once (default {d.max_connections}); "
                            "more are refused at accept")
        g.add_argument("--max-per-peer", type=_positive(int), metavar="N",
                       default=d.max_per_peer,
                       help=f"connections open at once from one address (default "
                            f"{d.max_per_peer})")
        g.add_argument("--handshake-timeout", type=_positive(float), metavar="SECONDS",
                       default=d.handshake_timeout,
                       help=f"a connection must say HELLO (TLS handshake included) "
                            f"within this (default {d.handshake_timeout:g})")
        g.add_argument("--idle-timeout", type=_positive(float), metavar="SECONDS",
                       default=d.idle_timeout,
                       help=f"close a connection from which nothing arrives for this "
                            f"long; PINGs go out after a third of it, and clients answer "
                            f"them (default {d.idle_timeout:g})")
        g.add_argument("--send-timeout", type=_positive(float), metavar="SECONDS",
                       default=d.send_timeout,
                       help=f"close a connection that takes none of what the server "
                            f"sends for this long while frames wait for it (default "
                            f"{d.send_timeout:g})")
        g.add_argument("--max-instances-per-client", type=_positive(int), metavar="N",
                       default=d.max_instances_per_client,
                       help=f"device instances (attachments) one client may hold "
                            f"(default {d.max_instances_per_client})")
        g.add_argument("--max-queue", type=_positive(int), metavar="BYTES",
                       default=d.max_queue,
                       help=f"bytes queued for a client that does not read them before "
                            f"it is disconnected; interrupt levels stop queueing once "
                            f"{min(64 * 1024, d.max_queue // 4)} bytes wait (only the newest "
                            f"is kept) (default {d.max_queue})")

    s = sub.add_parser("server", help="serve software devices to clients over TCP",
                       description="Serve software devices to clients over TCP.")
    s.add_argument("--listen", type=_typed(lambda t: parse_address(t, "listen address")),
                   default=("127.0.0.1", 7700), metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:7700)")
    s.add_argument("--server-id", type=_typed(_server_id), default="a", metavar="ID",
                   help="this server's name in requests and maps (default: a)")
    s.add_argument("--device", type=_typed(parse_device), action="append", default=[],
                   metavar="ID=KIND[,backend=NAME:ARG][,shared]",
                   help="a software device, e.g. uart0=uart16550,backend=tcp:127.0.0.1:7701 "
                        "or rtc0=cmos-rtc; repeat for more. Whoever reaches a backend types "
                        "into the VM: tcp takes token=FILE and tls=DIR[,allow=NAME:...] "
                        "(a client certificate of DIR's CA), unix:PATH a socket with file "
                        "permissions (docs/limits.md); --list-backends lists them")
    s.add_argument("--trace", action="store_true",
                   help="print every register access on stdout")
    s.add_argument("--list-devices", action="store_true",
                   help="list the device kinds installed (built-in and plugins), then exit")
    s.add_argument("--list-backends", action="store_true",
                   help="list the backends installed (built-in and plugins), then exit")
    s.add_argument("--peer", type=_typed(parse_server), action="append", default=[],
                   metavar="ID=HOST:PORT",
                   help="another server of the platform (static directory); repeat")
    s.add_argument("--route", type=_typed(lambda t: parse_pair(t, "DEVICE=SERVER")),
                   action="append", default=[], metavar="DEVICE=SERVER",
                   help="a device that lives on a --peer server (static directory); repeat")
    from remote_hw.server.limits import FORWARD_TIMEOUT
    s.add_argument("--forward-timeout", type=_positive(float), default=FORWARD_TIMEOUT,
                   metavar="SECONDS",
                   help="how long an access forwarded to another server waits for its "
                        f"answer (default {FORWARD_TIMEOUT:g}); keep it below your "
                        "clients' --timeout, so "
                        "that a device server cut off from this one reads as a removed "
                        "device, not as this server gone")
    s.add_argument("--directory", metavar="URL",
                   help="etcd endpoint of the shared directory, e.g. http://10.0.0.4:2379; "
                        "this server registers its devices there under a lease")
    s.add_argument("--lease", type=int, default=5, metavar="SECONDS",
                   help="directory lease: how soon a dead server drops out (default 5)")
    s.add_argument("--advertise", type=_typed(lambda t: parse_address(t, "advertise address")),
                   metavar="HOST:PORT",
                   help="address other servers use to reach this one (default: --listen)")
    s.add_argument("--allow", type=_typed(parse_allow), action="append", default=[],
                   metavar="DEVICE=NAME[,NAME...]",
                   help="only these client certificates may use DEVICE (needs TLS); repeat")
    s.add_argument("--resume-grace", type=_positive(float), default=30.0, metavar="SECONDS",
                   help="how long a client's devices are kept after its connection is "
                        "lost, for it to reconnect and resume (default 30)")
    limits(s)
    tls(s, "server")
    mount(s)
    common(s)

    e = sub.add_parser("export", help="serve a serial port of this machine as a 16550 "
                                      "(started by udev through systemd)",
                       description="Export a tty of this machine as the far side of a "
                                   "16550 model, on a server of its own. Started by "
                                   "remote-hw-export@NAME.service when udev sees a port "
                                   "tagged for export (docs/udev.md).")
    e.add_argument("name", metavar="NAME",
                   help="the port: a kernel name (ttyUSB0), a node under /dev (pts/3) "
                        "or a path")
    e.add_argument("--listen", type=_typed(lambda t: parse_address(t, "listen address")),
                   default=None, metavar="HOST:PORT",
                   help="address to serve on (default: REMOTE_HW_LISTEN from the udev "
                        "rule, else 127.0.0.1:7710+N for a name ending in N)")
    e.add_argument("--server-id", type=_typed(_server_id), default=None, metavar="ID",
                   help="the export's server id (default: REMOTE_HW_SERVER_ID, else "
                        "export-NAME)")
    e.add_argument("--device-id", default=None, metavar="ID",
                   help="the device id clients map (default: REMOTE_HW_DEVICE, else NAME)")
    e.add_argument("--baud", type=int, default=None, metavar="BAUD",
                   help="line speed of the port (default: REMOTE_HW_BAUD, else unchanged)")
    mount(e)
    common(e)

    v = sub.add_parser("vm", help="run one VM whose mapped devices live on servers",
                       description="Run one KVM guest; mapped port/MMIO ranges are served "
                                   "by remote servers.")
    v.add_argument("--image", required=True, metavar="FILE",
                   help="guest image: a raw boot-sector binary (loaded at 0x7c00, real "
                        "mode) or an ELF file (32-bit: protected mode, 64-bit: long mode)")
    v.add_argument("--vm-id", type=vm_id_arg, default=1, metavar="N",
                   help="this VM's id in requests (default 1)")
    v.add_argument("--server", type=_typed(parse_server), action="append", default=[],
                   metavar="NAME=HOST:PORT", help="a server the maps refer to; repeat")
    v.add_argument("--map", type=_typed(parse_map), action="append", default=[],
                   metavar="port|mmio:START-END=SERVER/DEVICE[,irq=N]",
                   help="send a guest range to a server's device; repeat")
    v.add_argument("--memory", type=_typed(parse_size), default=2 << 20, metavar="SIZE",
                   help="guest RAM (default 2M)")
    v.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long one access may wait for its server (default 5)")
    posting(v)
    v.add_argument("--on-reset", choices=["stop", "restart"], default="stop",
                   help="what a device's reset request does to the VM (default stop)")
    v.add_argument("--via", type=_typed(lambda t: parse_pair(t, "SERVER=ENTRY")),
                   action="append", default=[], metavar="SERVER=ENTRY",
                   help="reach SERVER's devices through the --server ENTRY (requests name "
                        "SERVER; the entry forwards); repeat")
    v.add_argument("--uinput", type=_typed(parse_device_ref), action="append", default=[],
                   metavar="SERVER/DEVICE",
                   help="type the keys of a mapped keyboard device (i8042) on this host too, "
                        "through a virtual keyboard (needs /dev/uinput); repeat")
    tls(v, "client")
    common(v)

    a = sub.add_parser("agent", help="run several VMs from a TOML file",
                       description="Run the VMs described in a TOML file over one "
                                   "connection per server (see docs/agent.md).")
    a.add_argument("--config", required=True, metavar="FILE", help="the agent's TOML file")
    a.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long one access may wait for its server (default 5)")
    posting(a)
    a.add_argument("--probes", action="store_true",
                   help="watch every guest access on this host with the eBPF probes and log "
                        "which VMs touched which devices when stopping (needs root and bcc)")
    common(a)

    k = sub.add_parser("keys", help="make the CA and certificates for mutual TLS",
                       description="Make a private CA and one certificate per host. Give "
                                   "each host ca.pem and its own NAME.pem/NAME.key.")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    ki = ksub.add_parser("init", help="create ca.pem and ca.key in DIR")
    ki.add_argument("dir", metavar="DIR")
    kn = ksub.add_parser("issue", help="issue NAME.pem/NAME.key signed by DIR's CA")
    kn.add_argument("dir", metavar="DIR")
    kn.add_argument("name", metavar="NAME",
                    help="the identity: a server's --server-id, or a client's name")
    kn.add_argument("--role", choices=["client", "server"], required=True,
                    help="server certificates may also act as peers of other servers")
    common(k)

    d = sub.add_parser("demo", help="a local server and an echo VM on loopback",
                       description="Start a server and a VM on loopback with a UART and an "
                                   "RTC, run the echo guest, and show the traffic until "
                                   "interrupted.")
    d.add_argument("--listen", type=_typed(lambda t: parse_address(t, "listen address")),
                   default=("127.0.0.1", 7700), metavar="HOST:PORT",
                   help="the server's address (default 127.0.0.1:7700)")
    d.add_argument("--uart-port", type=int, default=7701, metavar="PORT",
                   help="TCP port where a person reaches the guest's serial port "
                        "(default 7701; 0 picks a free one)")
    d.add_argument("--image", metavar="FILE", default=None,
                   help="guest image (default: the echo guest from guests/)")
    d.add_argument("--quiet", action="store_true", help="do not print the traffic")
    common(d)

    from remote_hw.probes.cli import add_parsers as add_probe_parsers
    add_probe_parsers(sub)  # trace, top (they add their own --log-level)
    from remote_hw.bridge.command import add_parser as add_bridge_parser
    add_bridge_parser(sub)  # bridge (docs/bridge.md; adds its own --log-level)
    return p


def _server_id(text: str) -> str:
    from remote_hw.config import check_ident
    return check_ident(text, "server id")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    if getattr(args, "func", None) is not None:  # trace, top
        return int(args.func(args) or 0)
    from remote_hw import commands
    handler = getattr(commands, f"cmd_{args.command}")
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
