"""Settings for ``remote-hw export NAME``: which tty, served as what, where.

``remote-hw export`` (started by ``remote-hw-export@NAME.service`` when udev sees a
tty tagged for export, docs/udev.md) serves one UART model whose far side is that
tty. Its settings come from the command line, else from ``REMOTE_HW_*`` properties the
admin's udev rule put on the device, else from defaults derived from the kernel name.

This lives apart from the tty backend (:mod:`remote_hw.backends.tty`) because building
the settings means parsing command-line style values (:mod:`remote_hw.config`) and
asking udev; a backend only opens the port it is given, and must not depend on the
CLI's parsers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from remote_hw.backends.base import BackendError
from remote_hw.backends.tty import parse_tty_arg
from remote_hw.config import ConfigError, DeviceSpec, check_ident, parse_address, parse_int

__all__ = ["EXPORT_BASE_PORT", "EXPORT_DEFAULT_HOST", "ExportSettings", "export_settings",
           "resolve_devnode", "udev_properties"]

EXPORT_BASE_PORT = 7710
EXPORT_DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class ExportSettings:
    """Everything `remote-hw export` needs to serve one exported tty."""

    devnode: str                 # /dev/ttyUSB0
    name: str                    # ttyUSB0 (the unit's instance name)
    device: DeviceSpec           # uart1=uart16550,backend=tty:/dev/ttyUSB0
    listen: tuple[str, int]
    server_id: str

    def describe(self) -> str:
        return (f"export {self.devnode} as {self.server_id}/{self.device.id} "
                f"({self.device.kind}) on {self.listen[0]}:{self.listen[1]}")


def resolve_devnode(name: str) -> str:
    """The device node of ``name``: a path (``/dev/ttyUSB0``), a node under /dev
    (``ttyUSB0``, ``pts/3``) or a kernel name whose node sysfs knows."""
    if name.startswith("/"):
        if os.path.exists(name):
            return name
        raise LookupError(f"{name} does not exist")
    candidate = os.path.join("/dev", name)
    if os.path.exists(candidate):
        return candidate
    uevent = os.path.join("/sys/class/tty", name, "uevent")
    try:
        with open(uevent) as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    node = os.path.join("/dev", line.split("=", 1)[1].strip())
                    if os.path.exists(node):
                        return node
    except OSError:
        pass
    raise LookupError(f"no device node for {name!r} (looked in /dev and /sys/class/tty)")


def udev_properties(devnode: str) -> dict[str, str]:
    """The udev properties of ``devnode`` (including the REMOTE_HW_* ones rules set),
    or {} when pyudev or the udev database (no udevd) is not there."""
    try:
        import pyudev
        device = pyudev.Devices.from_device_file(pyudev.Context(), devnode)
        return {k: device.properties[k] for k in device.properties}
    except Exception:   # ImportError, DeviceNotFoundError, permission: no properties
        return {}


def _ident(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", text).strip("-")[:64] or "tty"


def export_settings(name: str, *, properties: dict[str, str] | None = None,
                    device_id: str | None = None, server_id: str | None = None,
                    listen: tuple[str, int] | None = None, baud: int | None = None,
                    kind: str | None = None) -> ExportSettings:
    """Settings for exporting the tty ``name`` (see resolve_devnode). Explicit
    arguments win over udev ``properties`` (REMOTE_HW_DEVICE, REMOTE_HW_SERVER_ID,
    REMOTE_HW_LISTEN, REMOTE_HW_BAUD, REMOTE_HW_KIND), which win over defaults.
    Raises LookupError for a missing device, ConfigError for a bad value."""
    devnode = resolve_devnode(name)
    props = properties or {}
    short = _ident(os.path.relpath(devnode, "/dev") if devnode.startswith("/dev/")
                   else os.path.basename(devnode))
    dev_id = check_ident(device_id or props.get("REMOTE_HW_DEVICE") or short, "device id")
    srv_id = check_ident(server_id or props.get("REMOTE_HW_SERVER_ID") or
                         _ident(f"export-{short}"), "server id")
    if listen is None:
        text = props.get("REMOTE_HW_LISTEN")
        if text:
            listen = parse_address(text, "REMOTE_HW_LISTEN")
        else:
            m = re.search(r"(\d+)$", short)
            listen = (EXPORT_DEFAULT_HOST, EXPORT_BASE_PORT + (int(m.group(1)) if m else 0))
    if baud is None and props.get("REMOTE_HW_BAUD"):
        baud = parse_int(props["REMOTE_HW_BAUD"], "REMOTE_HW_BAUD")
    model = kind or props.get("REMOTE_HW_KIND") or "uart16550"
    backend = f"tty:{devnode}" + (f"@{baud}" if baud else "")
    try:
        parse_tty_arg(backend[4:])
    except BackendError as e:
        raise ConfigError(str(e)) from None
    return ExportSettings(devnode, short, DeviceSpec(dev_id, model, backend=backend),
                          listen, srv_id)
