"""What each ``remote-hw`` subcommand does (argument parsing lives in cli.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

from remote_hw.backends.base import BackendUnavailable
from remote_hw.client.agent import Agent
from remote_hw.client.vmm.vm import STATUS_RESET, STATUS_STOPPED
from remote_hw.config import (
    ConfigError,
    DeviceSpec,
    VmConfig,
    check_mapped,
    load_agent_config,
    parse_map,
)
from remote_hw.guest_images import GuestBuildError, guest_image
from remote_hw.input.uinput import UinputUnavailable
from remote_hw.net.link import LinkError
from remote_hw.net.security import KeyMaterialError, TlsConfig
from remote_hw.protocol.messages import Direction
from remote_hw.server.directory import DirectoryError
from remote_hw.server.fuse import FuseError, FuseView, default_mountpoint
from remote_hw.signals import wait_for_signal

log = logging.getLogger("remote_hw")


def _usage_error(command: str, message: str) -> int:
    print(f"remote-hw {command}: error: {message}", file=sys.stderr)
    return 2


def _trace_printer(out=sys.stdout):
    """An access hook that prints one line per register access (the demo's display)."""
    lock = threading.Lock()

    def hook(client_id: int, vm_id: int, device: str, index: int, offset: int, size: int,
             direction: int, value: int) -> None:
        arrow = "R" if direction == Direction.READ else "W"
        ch = ""
        if size == 1 and 0x20 <= value < 0x7F:
            ch = f" {chr(value)!r}"
        with lock:
            print(f"client {client_id} vm {vm_id} {device:>6} {arrow} +{offset} "
                  f"= {value:#0{2 + 2 * size}x}{ch}", file=out, flush=True)
    return hook


def _start_server(listen: tuple[str, int], server_id: str, devices: list[DeviceSpec],
                  trace: bool, **kw):
    from remote_hw.server.controller import Controller
    from remote_hw.server.listener import Server
    controller = Controller(server_id, devices)
    if trace:
        controller.access_hook = _trace_printer()
    return Server(controller, *listen, **kw).start()


def _tls(args: argparse.Namespace, default_name: str) -> TlsConfig | None:
    if not args.tls_dir:
        if args.tls_name:
            raise ConfigError("argument --tls-name: needs --tls-dir")
        return None
    tls = TlsConfig(Path(args.tls_dir), args.tls_name or default_name)
    tls._paths()  # fail now, naming the missing file
    return tls


def _limits(args: argparse.Namespace):
    """The server's Limits from its --max-*/--*-timeout options."""
    from remote_hw.server.limits import Limits
    return Limits(max_connections=args.max_connections, max_per_peer=args.max_per_peer,
                  handshake_timeout=args.handshake_timeout,
                  idle_timeout=args.idle_timeout, send_timeout=args.send_timeout,
                  max_instances_per_client=args.max_instances_per_client,
                  max_queue=args.max_queue)


def cmd_server(args: argparse.Namespace) -> int:
    if args.list_devices or args.list_backends:
        from remote_hw.plugin_listing import list_plugins
        return list_plugins(args.list_devices, args.list_backends)
    from remote_hw.server.directory import EtcdDirectory, LayeredDirectory, StaticDirectory
    if not args.device:
        log.warning("no --device given: this server holds no software devices")
    try:
        tls = _tls(args, args.server_id)
        static = StaticDirectory(dict(args.peer), dict(args.route))
        for _device, server in args.route:
            if server not in static.servers:
                raise ConfigError(f"argument --route: server {server!r} has no --peer address")
        dynamic = EtcdDirectory(args.directory, ttl=args.lease) if args.directory else None
        server = _start_server(args.listen, args.server_id, args.device, args.trace, tls=tls,
                               directory=LayeredDirectory(static, dynamic),
                               acl=dict(args.allow), limits=_limits(args),
                               forward_timeout=args.forward_timeout)
        server.router.resumes.grace = args.resume_grace
    except (ConfigError, KeyMaterialError) as e:
        return _usage_error("server", str(e))
    except BackendUnavailable as e:  # the machine lacks a device (evdev): not a usage error
        return _fail("server", str(e))
    except ValueError as e:
        return _usage_error("server", str(e))
    except OSError as e:
        return _fail("server", f"cannot listen on {args.listen[0]}:{args.listen[1]}: {e}")
    if dynamic is not None:
        advertise = args.advertise or server.address
        try:
            dynamic.register(args.server_id, advertise, sorted(server.controller.registry))
        except DirectoryError as e:
            server.stop()
            return _fail("server", str(e))
    return _serve_until_signal(server, args, "server")


def _serve_until_signal(server, args: argparse.Namespace, command: str) -> int:
    """Mount the FUSE view (unless --no-mount), serve until SIGINT/SIGTERM, clean up."""
    try:
        view = _mount_view(server.controller, args)
    except FuseError as e:
        server.stop()
        return _fail(command, str(e))
    stop = threading.Event()
    try:
        wait_for_signal(stop)
    finally:
        if view is not None:
            view.stop()
        server.stop()
    return 0


def _mount_view(controller, args: argparse.Namespace):
    """The FUSE view (docs/fuse.md): at --mount DIR (failure is fatal), else at
    /run/remote-hw/SERVER-ID when FUSE is available (a warning otherwise)."""
    if args.no_mount:
        return None
    path = args.mount or default_mountpoint(controller.server_id)
    try:
        return FuseView(controller, path).start()
    except FuseError as e:
        if args.mount:
            raise
        log.warning("no FUSE view of the devices: %s", e)
        return None


def cmd_export(args: argparse.Namespace) -> int:
    from remote_hw.backends.base import BackendError
    from remote_hw.backends.tty import TtyBackend
    from remote_hw.export import export_settings, resolve_devnode, udev_properties
    try:
        devnode = resolve_devnode(args.name)
        settings = export_settings(devnode, properties=udev_properties(devnode),
                                   device_id=args.device_id, server_id=args.server_id,
                                   listen=args.listen, baud=args.baud)
        backend = settings.device.backend or ""  # export_settings always names a tty: one
        TtyBackend(backend[len("tty:"):], settings.device.id).close()
    except LookupError as e:
        return _fail("export", str(e))
    except BackendError as e:
        return _fail("export", str(e))
    except ConfigError as e:
        return _usage_error("export", str(e))
    log.info("%s", settings.describe())
    try:
        server = _start_server(settings.listen, settings.server_id, [settings.device],
                               trace=False)
    except OSError as e:
        return _fail("export", f"cannot listen on {settings.listen[0]}:{settings.listen[1]}: {e}")
    return _serve_until_signal(server, args, "export")


def cmd_keys(args: argparse.Namespace) -> int:
    from remote_hw.net import security
    try:
        if args.keys_command == "init":
            path = security.init_ca(args.dir)
        else:
            path = security.issue(args.dir, args.name, args.role)
    except (KeyMaterialError, ConfigError) as e:
        return _usage_error("keys", str(e))
    print(path)
    return 0


def _fail(command: str, message: str) -> int:
    print(f"remote-hw {command}: {message}", file=sys.stderr)
    return 1


def _run_agent(agent: Agent, command: str) -> int:
    try:
        agent.connect()
    except LinkError as e:
        agent.stop()
        return _fail(command, str(e))
    agent.start()
    stop = threading.Event()

    def watch() -> None:
        agent.wait()
        stop.set()
    threading.Thread(target=watch, daemon=True).start()
    wait_for_signal(stop)
    statuses = agent.wait(timeout=0)
    agent.stop()
    if any(s is None for s in statuses.values()):
        return 130  # interrupted before the guests finished
    codes = [exit_code(h.status, h.error is not None) for h in agent.vms.values()]
    return next((c for c in codes if c), 0)


def exit_code(status: int | None, crashed: bool = False) -> int:
    """The process exit code for a VM's status (docs/vmm.md lists the statuses).

    A crashed guest gives 3, a reset request 4, a stopped VM 130; a debug-exit status
    ``(v << 1) | 1`` is truncated to 8 bits, as a QEMU with isa-debug-exit would be.
    """
    if crashed:
        return 3
    if status is None or status == STATUS_STOPPED:
        return 130
    if status == STATUS_RESET:
        return 4
    return status & 0xFF


def cmd_vm(args: argparse.Namespace) -> int:
    servers = dict(args.server)
    vias = dict(args.via)
    for entry in vias.values():
        if entry not in servers:
            return _usage_error("vm", f"argument --via: entry {entry!r} is not given with "
                                      "--server NAME=HOST:PORT")
    for spec in args.map:
        if spec.server not in servers and spec.server not in vias:
            return _usage_error("vm", f"argument --map: server {spec.server!r} is not given "
                                      "with --server NAME=HOST:PORT (or --via)")
    try:
        uinput = [check_mapped(ref, args.map) for ref in args.uinput]
    except ConfigError as e:
        return _usage_error("vm", f"argument --uinput: {e}")
    try:
        tls = _tls(args, "client")
    except (ConfigError, KeyMaterialError) as e:
        return _usage_error("vm", str(e))
    agent = Agent(servers, timeout=args.timeout,
                  client_name=tls.name if tls else f"vm{args.vm_id}", vias=vias, tls=tls,
                  posting=args.posting, coalescing=args.coalescing)
    try:
        agent.add_vm(VmConfig(args.vm_id, args.image, args.memory, list(args.map),
                              args.on_reset, uinput))
    except UinputUnavailable as e:  # the host lacks /dev/uinput: not a usage error
        return _fail("vm", f"--uinput {e}")
    except (OSError, ValueError) as e:
        return _usage_error("vm", f"argument --image: {e}")
    return _run_agent(agent, "vm")


def cmd_agent(args: argparse.Namespace) -> int:
    try:
        config = load_agent_config(args.config)
    except ConfigError as e:
        return _usage_error("agent", f"argument --config: {e}")
    tls = None
    if config.tls:
        tls = TlsConfig(Path(config.tls["dir"]), config.tls["name"])
        try:
            tls._paths()
        except KeyMaterialError as e:
            return _usage_error("agent", f"argument --config: [tls]: {e}")
    agent = Agent(config.servers, timeout=args.timeout,
                  client_name=tls.name if tls else "agent", vias=config.vias, tls=tls,
                  probes=args.probes, posting=args.posting, coalescing=args.coalescing)
    try:
        for vm in config.vms:
            agent.add_vm(vm)
    except UinputUnavailable as e:  # the host lacks /dev/uinput: not a usage error
        agent.stop()
        return _fail("agent", f"{args.config}: vm {vm.vm_id}: uinput {e}")
    except (OSError, ValueError) as e:
        agent.stop()
        return _usage_error("agent", f"argument --config: {e}")
    return _run_agent(agent, "agent")


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        image = args.image or str(guest_image("echo.bin"))
    except GuestBuildError as e:
        return _fail("demo", str(e))
    host = args.listen[0]
    devices = [DeviceSpec("uart0", "uart16550", backend=f"tcp:{host}:{args.uart_port}"),
               DeviceSpec("rtc0", "cmos-rtc")]
    try:
        server = _start_server(args.listen, "a", devices, trace=not args.quiet)
    except OSError as e:
        return _fail("demo", f"cannot listen on {host}:{args.listen[1]}: {e}")
    agent = Agent({"a": server.address}, client_name="demo")
    try:
        agent.add_vm(VmConfig(1, image, 2 << 20, [
            parse_map("port:0x3f8-0x3ff=a/uart0,irq=4"),
            parse_map("port:0x70-0x71=a/rtc0")]))
        agent.connect()
    except (OSError, ValueError, LinkError) as e:
        agent.stop()
        server.stop()
        return _fail("demo", str(e))
    uart = next(i for i in server.controller.instances() if i.spec.id == "uart0")
    uart_host, uart_port = uart.backend.address
    print(f"remote-hw demo: server a on {server.address[0]}:{server.address[1]}, "
          f"VM 1 runs {image}", flush=True)
    print(f"remote-hw demo: the guest's serial port (COM1) is at tcp {uart_host}:{uart_port}",
          flush=True)
    print(f"remote-hw demo: connect with:  nc {uart_host} {uart_port}   "
          "(type; the guest echoes; Ctrl-C here stops)", flush=True)
    agent.start()
    stop = threading.Event()
    try:
        wait_for_signal(stop)
    finally:
        agent.stop()
        server.stop()
    print("remote-hw demo: stopped", flush=True)
    return 0
