"""Path resolution: what each path of the view is, asked of the controller each time.

Nothing is cached: every lookup asks the controller for its live instances
(``Controller.instances()``, with each instance's ``sessions``), so the tree is
always current and needs no notification when VMs attach and leave::

    README, server                      text made when read
    devices/DEVICE/config               how DEVICE is configured
    devices/DEVICE/N/FILE               instance N's files (see .files)
    sessions/clientC-vmV/DEVICE         a symlink to ../../devices/DEVICE/N
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterable
from typing import Literal

from remote_hw.server.controller import Controller, Instance
from remote_hw.server.fuse.files import FILE_BY_NAME, FILE_TYPES, FileType, fmt_value
from remote_hw.server.fuse.taps import Taps

NodeKind = Literal["dir", "file", "link", "text"]

_SESSION_RX = re.compile(r"client(\d+)-vm(\d+)")

README = """\
remote-hw FUSE view of server {server}

devices/DEVICE/config        how DEVICE is configured
devices/DEVICE/N/            instance N of DEVICE (one per client/VM unless shared)
  status, status.json        registers and counters
  tx                         what the guest transmitted (tail -f follows it)
  rx                         write here: bytes for the guest's receive side
  time                       the guest's clock (UTC); write a time to set it
  input                      write text: it is typed into the guest
  keys                       write key commands: ctrl+alt+delete, +shift a -shift
sessions/clientC-vmV/DEVICE  the instance a client's VM uses (a symlink)

Files appear only where the device has them. Directories follow VMs attaching and
leaving. See docs/fuse.md in the remote-hw sources.
"""


def session_name(client_id: int, vm_id: int) -> str:
    return f"client{client_id}-vm{vm_id}"


def _session_sort_key(name: str) -> tuple[int, int, str]:
    m = _SESSION_RX.fullmatch(name)
    return (int(m.group(1)), int(m.group(2)), "") if m else (1 << 62, 0, name)


class Node:
    """A resolved path: a directory, a file bound to an instance, a symlink, or a
    text made when read."""

    __slots__ = ("kind", "names", "inst", "file", "target", "text")

    def __init__(self, kind: NodeKind, *, names: Iterable[str] = (),
                 inst: Instance | None = None, file: FileType | None = None,
                 target: str = "", text: Callable[[], bytes] | None = None) -> None:
        self.kind = kind
        self.names = list(names)
        self.inst = inst
        self.file = file
        self.target = target
        self.text = text


class Tree:
    """Resolves paths of the view of ``controller`` mounted at ``mountpoint``."""

    def __init__(self, controller: Controller, taps: Taps, mountpoint: str) -> None:
        self.controller = controller
        self.taps = taps
        self.mountpoint = mountpoint

    def _instances(self) -> list[Instance]:
        insts = self.controller.instances()
        for inst in insts:
            if not self.taps.known(inst):
                self.taps.adopt(inst)
        return insts

    def _server_text(self) -> bytes:
        insts = self.controller.instances()
        lines = [f"server: {self.controller.server_id}", f"mount: {self.mountpoint}",
                 f"devices: {', '.join(self.controller.registry) or '-'}",
                 f"instances: {len(insts)}"]
        for inst in insts:
            lines.append(f"  {inst.label()}")
        return ("\n".join(lines) + "\n").encode()

    def resolve(self, path: str) -> Node:
        """The node at ``path``; OSError(ENOENT) when there is none."""
        parts = [p for p in path.split("/") if p]
        n = len(parts)
        if n == 0:
            return Node("dir", names=["README", "server", "devices", "sessions"])
        top = parts[0]
        if top == "README" and n == 1:
            return Node("text", text=lambda: README.format(
                server=self.controller.server_id).encode())
        if top == "server" and n == 1:
            return Node("text", text=self._server_text)
        if top == "devices":
            return self._resolve_devices(parts[1:])
        if top == "sessions":
            return self._resolve_sessions(parts[1:])
        raise OSError(errno.ENOENT, path)

    def _resolve_devices(self, parts: list[str]) -> Node:
        registry = self.controller.registry
        if not parts:
            return Node("dir", names=sorted(registry))
        spec = registry.get(parts[0])
        if spec is None:
            raise OSError(errno.ENOENT, parts[0])
        insts = [i for i in self._instances() if i.spec.id == spec.id]
        if len(parts) == 1:
            return Node("dir", names=["config"] + [str(i.index) for i in
                                                   sorted(insts, key=lambda i: i.index)])
        if parts[1] == "config" and len(parts) == 2:
            def config() -> bytes:
                opts = ",".join(f"{k}={v}" for k, v in spec.options.items()) or "-"
                return (f"id: {spec.id}\nkind: {spec.kind}\nbackend: {spec.backend or '-'}"
                        f"\nshared: {fmt_value(spec.shared)}\noptions: {opts}\n").encode()
            return Node("text", text=config)
        if not parts[1].isdigit():
            raise OSError(errno.ENOENT, parts[1])
        index = int(parts[1])
        inst = next((i for i in insts if i.index == index), None)
        if inst is None:
            raise OSError(errno.ENOENT, parts[1])
        files = [f for f in FILE_TYPES if f.applies(inst.model)]
        if len(parts) == 2:
            return Node("dir", names=[f.name for f in files], inst=inst)
        if len(parts) == 3:
            ftype = FILE_BY_NAME.get(parts[2])
            if ftype is None or ftype not in files:
                raise OSError(errno.ENOENT, parts[2])
            return Node("file", inst=inst, file=ftype)
        raise OSError(errno.ENOENT, "/".join(parts))

    def _sessions(self) -> dict[str, dict[str, Instance]]:
        out: dict[str, dict[str, Instance]] = {}
        for inst in self._instances():
            for client_id, vm_id in list(inst.sessions):
                out.setdefault(session_name(client_id, vm_id), {})[inst.spec.id] = inst
        return out

    def _resolve_sessions(self, parts: list[str]) -> Node:
        sessions = self._sessions()
        if not parts:
            return Node("dir", names=sorted(sessions, key=_session_sort_key))
        devs = sessions.get(parts[0])
        if devs is None:
            raise OSError(errno.ENOENT, parts[0])
        if len(parts) == 1:
            return Node("dir", names=sorted(devs))
        inst = devs.get(parts[1])
        if inst is None or len(parts) > 2:
            raise OSError(errno.ENOENT, "/".join(parts))
        return Node("link", inst=inst, target=f"../../devices/{inst.spec.id}/{inst.index}")
