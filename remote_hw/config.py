"""Parsing of the textual specs people type: devices, maps, server addresses.

Every parser raises :class:`ConfigError` with a message that names what is wrong; the
CLI turns that into "argument --map: ..." and exit status 2, the agent's TOML loader
into "FILE: vm 2: ...".
"""

from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

_IDENT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ConfigError(ValueError):
    """A spec or configuration value is wrong; the message says which and why."""


def check_ident(value: str, what: str) -> str:
    """Return ``value`` if it is a valid identifier (1-64 of ``[A-Za-z0-9._-]``)."""
    if not _IDENT.match(value):
        raise ConfigError(f"{what} {value!r} must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return value


def parse_int(text: str, what: str) -> int:
    """Parse decimal or 0x-hex; a clear error otherwise."""
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a number (decimal or 0x-hex)") from None


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what} {text!r} must be HOST:PORT")
    host = host.strip("[]")
    port = parse_int(port_text, f"{what} port")
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what} port {port} is out of range 0-65535")
    return host, port


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes with an optional K/M/G suffix (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.I)
    if not m:
        raise ConfigError(f"{what} {text!r} must be a number with an optional K, M or G suffix")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


@dataclass(frozen=True)
class DeviceSpec:
    """A software device a server holds: ``ID=KIND[,backend=NAME:ARG][,shared][,opt=val]``."""

    id: str
    kind: str
    backend: str | None = None
    shared: bool = False
    options: dict[str, str] = field(default_factory=dict)


def _backend_options(backend: str) -> frozenset[str]:
    """Option keys of the backend named in ``backend=NAME:ARG`` (``token``, ...)."""
    from remote_hw.backends.registry import backend_options
    return backend_options(backend)


def parse_device(text: str) -> DeviceSpec:
    """Parse ``uart0=uart16550,backend=tcp:127.0.0.1:7701`` and friends."""
    ident, sep, rest = text.partition("=")
    if not sep or not rest:
        raise ConfigError(f"{text!r} must be ID=KIND[,backend=...][,shared]")
    check_ident(ident, "device id")
    kind, *params = rest.split(",")
    if not kind:
        raise ConfigError(f"{text!r}: the device kind is missing")
    backend = None
    shared = False
    options: dict[str, str] = {}
    backend_keys: frozenset[str] = frozenset()
    for p in params:
        key, eq, value = p.partition("=")
        if key == "backend":
            if ":" not in value:
                raise ConfigError(f"backend {value!r} must be NAME:ARG (e.g. tcp:127.0.0.1:7701)")
            backend = value
            backend_keys = _backend_options(value)
        elif backend is not None and eq and key in backend_keys:
            backend += f",{p}"  # the backend's own option (token=FILE, mode=0660)
        elif key == "shared" and not eq:
            shared = True
        elif eq and key:
            options[key] = value
        else:
            raise ConfigError(f"{text!r}: option {p!r} must be KEY=VALUE, 'shared' or backend=...")
    return DeviceSpec(ident, kind, backend, shared, options)


@dataclass(frozen=True)
class MapSpec:
    """A guest address range sent to a server's device: ``port:0x3f8-0x3ff=a/uart0,irq=4``.

    ``irqs[n]`` is the guest IRQ that the device's interrupt line ``n`` drives (the
    ``line`` field of the wire's INTERRUPT): ``irq=1:12`` gives the i8042's keyboard
    line IRQ 1 and its mouse line IRQ 12. A line with no IRQ here is not delivered.
    """

    kind: str  # "port" or "mmio"
    start: int
    end: int  # inclusive
    server: str
    device: str
    irqs: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    @property
    def irq(self) -> int | None:
        """The guest IRQ of the device's first line, if it has one."""
        return self.irqs[0] if self.irqs else None


_MAP_LIMITS = {"port": 0xFFFF, "mmio": (1 << 64) - 1}


def parse_map(text: str) -> MapSpec:
    """Parse ``port:START-END=SERVER/DEVICE[,irq=N[:M...]]`` or the ``mmio:`` form."""
    m = re.fullmatch(r"(port|mmio):([^-=]+)-([^=]+)=([^/,]+)/([^,]+)((?:,[^,]+)*)", text)
    if not m:
        raise ConfigError(f"{text!r} must be port:START-END=SERVER/DEVICE[,irq=N[:M...]] "
                          "or mmio:START-END=SERVER/DEVICE[,irq=N[:M...]]")
    kind = m.group(1)
    start = parse_int(m.group(2), "range start")
    end = parse_int(m.group(3), "range end")
    if not 0 <= start <= end <= _MAP_LIMITS[kind]:
        raise ConfigError(f"{text!r}: range {start:#x}-{end:#x} is empty or outside {kind} space")
    server = check_ident(m.group(4), "server id")
    device = check_ident(m.group(5), "device id")
    irqs: tuple[int, ...] = ()
    for p in filter(None, m.group(6).split(",")):
        key, _, value = p.partition("=")
        if key != "irq":
            raise ConfigError(f"{text!r}: unknown option {key!r} (only irq=N[:M...])")
        # One guest IRQ per device line, in line order (line 0 first).
        irqs = tuple(parse_int(v, "irq") for v in value.split(":"))
        for irq in irqs:
            if not 0 <= irq <= 23:
                raise ConfigError(f"{text!r}: irq {irq} is outside 0-23 (the IOAPIC's pins)")
        if len(set(irqs)) != len(irqs):
            raise ConfigError(f"{text!r}: two lines of one device on the same irq")
    return MapSpec(kind, start, end, server, device, irqs)


class DeviceRef(NamedTuple):
    """A device of a server as a client names it: ``SERVER/DEVICE`` (``a/kbd0``)."""

    server: str
    device: str

    def __str__(self) -> str:
        return f"{self.server}/{self.device}"


def parse_device_ref(text: str) -> DeviceRef:
    """Parse ``SERVER/DEVICE``, the right-hand side of a ``--map`` (``--uinput a/kbd0``)."""
    server, sep, device = text.partition("/")
    if not sep:
        raise ConfigError(f"{text!r} must be SERVER/DEVICE (e.g. a/kbd0)")
    return DeviceRef(check_ident(server, "server id"), check_ident(device, "device id"))


def check_mapped(ref: DeviceRef, maps: list[MapSpec]) -> DeviceRef:
    """``ref`` if one of ``maps`` sends a range to it: a device's events reach a VM only
    through a session, and a VM holds a session only with the devices it maps."""
    if not any(m.server == ref.server and m.device == ref.device for m in maps):
        raise ConfigError(f"{ref} is not mapped by this VM (map a range to it, e.g. "
                          f"port:0x60-0x64={ref},irq=1)")
    return ref


def parse_server(text: str) -> tuple[str, tuple[str, int]]:
    """Parse ``NAME=HOST:PORT`` (a server the client may talk to)."""
    name, sep, addr = text.partition("=")
    if not sep:
        raise ConfigError(f"{text!r} must be NAME=HOST:PORT")
    return check_ident(name, "server name"), parse_address(addr, f"server {name}")


@dataclass
class VmConfig:
    """One VM run by the agent."""

    vm_id: int
    image: str
    memory: int = 2 << 20
    maps: list[MapSpec] = field(default_factory=list)
    on_reset: str = "stop"  # what an i8042 reset request does: "stop" or "restart"
    # mapped keyboards whose key events a virtual keyboard re-emits on this host
    uinput: list[DeviceRef] = field(default_factory=list)


@dataclass
class AgentConfig:
    """The agent's TOML file: servers (direct, or reached through another), VMs, TLS."""

    servers: dict[str, tuple[str, int]]
    vms: list[VmConfig]
    tls: dict[str, str] = field(default_factory=dict)
    vias: dict[str, str] = field(default_factory=dict)


def parse_pair(text: str, what: str) -> tuple[str, str]:
    """``KEY=VALUE`` with both sides identifiers (``--via b=a``, ``--route uart0=b``)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"{text!r} must be {what}")
    return check_ident(key, "name"), check_ident(value, "name")


def parse_allow(text: str) -> tuple[str, set[str]]:
    """``DEVICE=NAME[,NAME...]``: the certificate names that may use a device."""
    device, sep, names = text.partition("=")
    if not sep or not names:
        raise ConfigError(f"{text!r} must be DEVICE=NAME[,NAME...]")
    return (check_ident(device, "device id"),
            {check_ident(n, "client name") for n in names.split(",")})


def _vm_from_table(t: dict[str, Any], where: str, base: Path) -> VmConfig:
    known = {"id", "image", "memory", "map", "on_reset", "uinput"}
    extra = set(t) - known
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
    if "id" not in t or "image" not in t:
        raise ConfigError(f"{where}: 'id' and 'image' are required")
    vm_id = t["id"]
    if not isinstance(vm_id, int) or not 1 <= vm_id <= 0xFFFFFFFF:
        raise ConfigError(f"{where}: id must be an integer 1-4294967295")
    image = Path(str(t["image"]))
    if not image.is_absolute():
        image = base / image
    maps = []
    for i, m in enumerate(t.get("map", [])):
        try:
            maps.append(parse_map(str(m)))
        except ConfigError as e:
            raise ConfigError(f"{where}: map {i + 1}: {e}") from None
    on_reset = t.get("on_reset", "stop")
    if on_reset not in ("stop", "restart"):
        raise ConfigError(f"{where}: on_reset must be 'stop' or 'restart'")
    uinput = t.get("uinput", [])
    if not isinstance(uinput, list) or not all(isinstance(u, str) for u in uinput):
        raise ConfigError(f"{where}: uinput must be a list of \"SERVER/DEVICE\" strings")
    refs = []
    for u in uinput:
        try:
            refs.append(check_mapped(parse_device_ref(u), maps))
        except ConfigError as e:
            raise ConfigError(f"{where}: uinput: {e}") from None
    return VmConfig(vm_id, str(image), parse_size(t.get("memory", "2M"), f"{where}: memory"),
                    maps, on_reset, refs)


def load_agent_config(path: str | Path) -> AgentConfig:
    """Read the agent's TOML file (see docs/agent.md); errors name the file and entry."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    servers: dict[str, tuple[str, int]] = {}
    vias: dict[str, str] = {}
    for name, addr in data.get("servers", {}).items():
        check_ident(name, f"{path}: server name")
        if str(addr).startswith("via:"):
            vias[name] = check_ident(str(addr)[4:], f"{path}: server {name}: via")
        else:
            servers[name] = parse_address(str(addr), f"{path}: server {name}")
    for name, entry in vias.items():
        if entry not in servers:
            raise ConfigError(f"{path}: server {name} is reached via {entry!r}, which has no "
                              "address in [servers]")
    vms = [_vm_from_table(t, f"{path}: vm {i + 1}", path.parent)
           for i, t in enumerate(data.get("vm", []))]
    if not vms:
        raise ConfigError(f"{path}: no [[vm]] tables")
    seen: set[int] = set()
    for vm in vms:
        if vm.vm_id in seen:
            raise ConfigError(f"{path}: vm id {vm.vm_id} is used twice")
        seen.add(vm.vm_id)
        for m in vm.maps:
            if m.server not in servers and m.server not in vias:
                raise ConfigError(f"{path}: vm {vm.vm_id} maps to server {m.server!r}, "
                                  f"which is not in [servers]")
    tls = {k: str(v) for k, v in data.get("tls", {}).items()}
    if tls and set(tls) != {"dir", "name"}:
        raise ConfigError(f"{path}: [tls] takes exactly 'dir' and 'name'")
    if tls and not Path(tls["dir"]).is_absolute():
        tls["dir"] = str(path.parent / tls["dir"])
    return AgentConfig(servers, vms, tls, vias)


def vm_id_arg(text: str) -> int:
    """An argparse ``type=`` for a VM id (1 to 2**32 - 1, any base ``int(x, 0)`` reads);
    the commands that name a VM (``vm``, ``bridge``) share it."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{value} is outside 1-4294967295")
    return value
