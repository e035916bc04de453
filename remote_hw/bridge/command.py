"""``remote-hw bridge``: its options and what it does.

Kept out of cli.py/commands.py (cli.py only calls :func:`add_parser`): the bridge is a
client of its own kind (QEMU's VMs instead of remote-hw's monitor), and its options
read as the ``vm`` command's where they mean the same thing (``--server``, ``--via``,
``--vm-id``, ``--timeout``, ``--no-posting``, ``--tls-dir``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from remote_hw.config import ConfigError, check_ident, parse_pair, parse_server, vm_id_arg

log = logging.getLogger("remote_hw.bridge")

#: QEMU's vfio-user-pci waits this long for each reply (x-msg-timeout, ms) by default.
QEMU_MSG_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 1.0


def _typed(fn: Any) -> Any:
    def convert(text: str) -> object:
        try:
            return fn(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = getattr(fn, "__name__", "value").removeprefix("parse_")
    return convert


def parse_target(text: str) -> tuple[str, str]:
    """``SERVER/DEVICE``, e.g. ``a/uart0``."""
    server, sep, device = text.partition("/")
    if not sep:
        raise ConfigError(f"{text!r} must be SERVER/DEVICE, e.g. a/uart0")
    return check_ident(server, "server id"), check_ident(device, "device id")


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    # A QEMU that connects while the link is down waits for the link's reconnect
    # (Bridge.link_wait: what the timeout leaves of QEMU's, less a second) and then an
    # attach (one timeout) before its VERSION reply: all of it must fit in QEMU's reply
    # timeout, or QEMU fails the device instead of seeing a removed one.
    if not 0 < value < QEMU_MSG_TIMEOUT / 2:
        raise argparse.ArgumentTypeError(
            f"{value:g} must be above 0 and below {QEMU_MSG_TIMEOUT / 2:g}, half of QEMU's "
            f"{QEMU_MSG_TIMEOUT:g} s reply timeout (x-msg-timeout)")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bridge`` to ``remote-hw``'s subcommands; it runs :func:`run`."""
    from remote_hw.bridge.pci import TEMPLATES
    b = subparsers.add_parser(
        "bridge", help="give QEMU VMs a remote device over vfio-user (vfio-user-pci)",
        description="Serve a remote device to QEMU's vfio-user-pci on a UNIX socket: "
                    "config space from a PCI template, BAR accesses forwarded to the "
                    "server as this VM's register accesses, the server's interrupts "
                    "delivered as INTx. Each QEMU that connects is its own VM (ids from "
                    "--vm-id up) with its own device instance. A device on a server "
                    "the bridge does not connect to is reached through an entry server "
                    "(--via). A lost server reads as a removed device, and the link "
                    "comes back by itself: the live sessions resume (or, after a server "
                    "restart, get new instances) without QEMU reconnecting. See "
                    "docs/bridge.md.")
    b.add_argument("--socket", required=True, metavar="PATH",
                   help="UNIX socket QEMU connects to: -device '{\"driver\":\"vfio-user-pci\","
                        "\"socket\":{\"type\":\"unix\",\"path\":\"PATH\"}}'")
    b.add_argument("--device", required=True, type=_typed(parse_target),
                   metavar="SERVER/DEVICE", help="the remote device, e.g. a/uart0")
    b.add_argument("--server", type=_typed(parse_server), action="append", default=[],
                   metavar="NAME=HOST:PORT", help="a server to connect to; repeat")
    b.add_argument("--via", type=_typed(lambda t: parse_pair(t, "SERVER=ENTRY")),
                   action="append", default=[], metavar="SERVER=ENTRY",
                   help="reach SERVER's devices through the --server ENTRY (requests name "
                        "SERVER; the entry forwards), e.g. --device b/uart0 --server "
                        "a=HOST:PORT --via b=a; repeat")
    b.add_argument("--template", choices=sorted(TEMPLATES), default="pci-serial",
                   help="the PCI identity shown to the guest: pci-serial (default; QEMU's "
                        "own, an I/O BAR) or mmio-serial (a memory BAR, which QEMU posts "
                        "writes to without waiting); Linux's 8250_pci binds either as a "
                        "16550")
    b.add_argument("--vm-id", type=vm_id_arg, default=1, metavar="N",
                   help="VM id of the first QEMU; each further QEMU connected at the same "
                        "time takes the next free id (default 1)")
    b.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="how long one access may wait for the server before the device "
                        f"reads as removed (default {DEFAULT_TIMEOUT:g}; must stay below "
                        f"half of QEMU's {QEMU_MSG_TIMEOUT:g} s x-msg-timeout: a QEMU "
                        "that connects while the link is down waits for it up to "
                        f"{QEMU_MSG_TIMEOUT - 1:g} s less this, then one attach)")
    b.add_argument("--no-posting", dest="posting", action="store_false",
                   help="wait for the server's answer to every access: do not post writes "
                        "or answer shadowed registers locally (docs/protocol.md)")
    b.add_argument("--tls-dir", metavar="DIR",
                   help="mutual TLS: the key directory from 'remote-hw keys' (ca.pem, "
                        "NAME.pem, NAME.key); without it connections are plain TCP")
    b.add_argument("--tls-name", metavar="NAME",
                   help="which certificate in --tls-dir is this bridge's (default: client)")
    b.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="how much to log on stderr (default: info)")
    b.set_defaults(func=run)
    return b


def _usage_error(message: str) -> int:
    print(f"remote-hw bridge: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 2 for a usage error, 1 if the server is unreachable."""
    from remote_hw.bridge.front import Bridge, Target
    from remote_hw.bridge.pci import TEMPLATES
    from remote_hw.net.link import LinkError
    from remote_hw.net.security import KeyMaterialError, TlsConfig
    from remote_hw.signals import wait_for_signal

    servers = dict(args.server)
    vias = dict(args.via)
    if not servers:
        return _usage_error("argument --server: at least one NAME=HOST:PORT is needed")
    for entry in vias.values():
        if entry not in servers:
            return _usage_error(f"argument --via: entry {entry!r} is not given with "
                                "--server NAME=HOST:PORT")
    server, device = args.device
    if server not in servers and server not in vias:
        return _usage_error(f"argument --device: server {server!r} is not given with "
                            "--server NAME=HOST:PORT (or --via)")
    tls = None
    if args.tls_dir:
        tls = TlsConfig(Path(args.tls_dir), args.tls_name or "client")
        try:
            tls._paths()  # fail now, naming the missing file
        except KeyMaterialError as e:
            return _usage_error(f"argument --tls-dir: {e}")
    elif args.tls_name:
        return _usage_error("argument --tls-name: needs --tls-dir")
    bridge = Bridge(args.socket, Target(server, device), servers, TEMPLATES[args.template],
                    vias=vias, tls=tls, timeout=args.timeout, first_vm_id=args.vm_id,
                    client_name=tls.name if tls else "bridge", posting=args.posting)
    try:
        bridge.start()
    except LinkError as e:
        bridge.link.close()
        print(f"remote-hw bridge: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        bridge.link.close()
        print(f"remote-hw bridge: cannot listen on {args.socket}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    print(f"remote-hw bridge: serving {server}/{device} on {args.socket}", flush=True)
    stop = threading.Event()
    try:
        wait_for_signal(stop)
    finally:
        bridge.stop()
    return 0
