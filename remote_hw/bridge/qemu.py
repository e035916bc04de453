"""Run the QEMU that has ``vfio-user-pci`` (from scripts/install_qemu.sh's chroot).

Debian 12's own QEMU (7.2) has no vfio-user client; trixie-backports' 11.1 has, but
needs a newer glibc, so scripts/install_qemu.sh puts it in a trixie chroot. This
module runs it there: in a private mount namespace (``unshare --mount``), so the bind
mounts of /proc, /dev and the folders QEMU must read (kernel, initramfs, the bridge's
socket folder, a QMP socket folder) vanish with the process and nothing is left
mounted on the host. ``exec`` all the way down: the process you start *is* QEMU (its
pid, its exit status, its signals).

Command line::

    python -m remote_hw.bridge.qemu [--bind DIR]... -- QEMU-ARGS...

Folders of ``-kernel``/``-initrd`` files and of ``unix`` socket paths in the QEMU
arguments are bound automatically; ``--bind`` adds others.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

#: Where scripts/install_qemu.sh puts the trixie chroot (REMOTE_HW_QEMU_ROOT overrides).
DEFAULT_ROOT = Path("/var/lib/remote-hw/trixie")
STAMP = ".remote-hw-qemu-ready"
QEMU = "/usr/bin/qemu-system-x86_64"

# Mounts made inside the namespace, before the folders: /run and /tmp of the chroot
# become empty tmpfs, so binding a /tmp/... folder leaves no empty directory behind.
_SCRIPT = r"""
set -eu
root=$1; shift
mount --rbind /proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"
mount -t tmpfs tmpfs "$root/run"
while [ "$1" != -- ]; do
  mkdir -p "$root$1"
  mount --bind "$1" "$root$1"
  shift
done
shift
exec chroot "$root" "$@"
"""


def root() -> Path:
    return Path(os.environ.get("REMOTE_HW_QEMU_ROOT", str(DEFAULT_ROOT)))


def available() -> tuple[bool, str]:
    """Whether the chroot QEMU is installed and usable here, and why not."""
    r = root()
    if not (r / STAMP).is_file() or not (r / QEMU.lstrip("/")).is_file():
        return False, f"no vfio-user QEMU in {r}: run scripts/install_qemu.sh as root"
    if os.geteuid() != 0:
        return False, "running QEMU in its chroot needs root (chroot, mount namespace)"
    return True, (r / STAMP).read_text().strip()


def _auto_binds(args: Sequence[str]) -> list[str]:
    """Folders named by -kernel/-initrd/-D/-pidfile and unix socket paths."""
    dirs: list[str] = []
    for i, a in enumerate(args):
        if a in ("-kernel", "-initrd", "-D", "-pidfile") and i + 1 < len(args):
            dirs.append(os.path.dirname(os.path.abspath(args[i + 1])))
        for m in re.finditer(r'"path"\s*:\s*"([^"]+)"|(?:unix:|path=)([^,\s"]+)', a):
            p = m.group(1) or m.group(2)
            dirs.append(os.path.dirname(os.path.abspath(p)))
    return dirs


def command(qemu_args: Sequence[str], binds: Iterable[str | os.PathLike[str]] = (),
            qemu_root: Path | None = None) -> list[str]:
    """The argv that runs the chroot's QEMU with ``qemu_args``."""
    r = str(qemu_root or root())
    seen: list[str] = []
    for d in [*map(str, binds), *_auto_binds(qemu_args)]:
        d = os.path.realpath(d)
        if d != "/" and d not in seen and os.path.isdir(d):
            seen.append(d)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _SCRIPT,
            "qemu-vfio-user", r, *seen, "--", QEMU, *qemu_args]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m remote_hw.bridge.qemu",
        description="Run the vfio-user-capable QEMU of scripts/install_qemu.sh's chroot.")
    p.add_argument("--bind", action="append", default=[], metavar="DIR",
                   help="a host folder QEMU must see at the same path; repeat")
    p.add_argument("qemu_args", nargs=argparse.REMAINDER, help="-- then QEMU's arguments")
    args = p.parse_args(argv)
    qargs = args.qemu_args[1:] if args.qemu_args[:1] == ["--"] else args.qemu_args
    ok, why = available()
    if not ok:
        print(f"qemu-vfio-user: {why}", file=sys.stderr)
        return 1
    argv2 = command(qargs, args.bind)
    os.execvp(argv2[0], argv2)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
