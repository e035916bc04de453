"""Mount plumbing for the FUSE view: finding, judging and removing mounts.

Everything here is about the kernel's mount table and the processes libfuse leaves
behind, nothing about what the file system shows: which mount sits at a path
(``/proc/self/mountinfo``), whether a mount there is a dead remote-hw one that may be
removed (a server killed hard leaves "Transport endpoint is not connected"), how to
unmount as root or not, how to abort a connection a lazy unmount left open (fusectl),
and ending the ``fusermount3`` helper that ``auto_unmount`` starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import signal
import subprocess

log = logging.getLogger("remote_hw.fuse")

DEFAULT_ROOT = "/run/remote-hw"
FSNAME = "remote-hw"


class FuseError(RuntimeError):
    """The view cannot be mounted (missing library or /dev/fuse, busy mount point)."""


def default_mountpoint(server_id: str) -> str:
    """``/run/remote-hw/<server id>``: one folder per server on a host."""
    return os.path.join(DEFAULT_ROOT, server_id)


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_at(path: str) -> dict[str, str] | None:
    """The mount whose mount point is exactly ``path`` (last one wins, as the kernel
    shows the top of a stack), as {'fstype', 'source', 'dev'}; None if none."""
    path = os.path.abspath(path)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields = pre.split()
                if len(fields) < 5 or _unescape_mountinfo(fields[4]) != path:
                    continue
                rest = post.split()
                found = {"dev": fields[2], "fstype": rest[0] if rest else "",
                         "source": rest[1] if len(rest) > 1 else ""}
    except OSError:
        return None
    return found


def is_ours(mnt: dict[str, str]) -> bool:
    return mnt["fstype"] == f"fuse.{FSNAME}" or mnt["source"].startswith(FSNAME)


def umount(path: str, lazy: bool) -> None:
    """Unmount ``path`` (MNT_DETACH when ``lazy``); raises OSError."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.umount2(os.fsencode(path), 2 if lazy else 0) != 0:   # 2 = MNT_DETACH
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
        return
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise OSError(errno.ENOENT, "fusermount3 not found", path)
    r = subprocess.run([tool, "-u", *(["-z"] if lazy else []), path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(errno.EBUSY if "busy" in r.stderr else errno.EPERM,
                      r.stderr.strip() or "fusermount failed", path)


def remove_stale_mount(path: str) -> bool:
    """If a dead remote-hw FUSE mount sits at ``path`` (its server crashed), detach
    it and return True. Raises FuseError if a live one or a foreign mount is there."""
    mnt = mount_at(path)
    if mnt is None:
        return False
    if not mnt["fstype"].startswith("fuse"):
        raise FuseError(f"{path} is already a mount point ({mnt['fstype']}); "
                        "choose another directory for the FUSE view")
    try:
        os.stat(path)
        alive = True
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise FuseError(f"cannot inspect the mount at {path}: {e.strerror}") from None
        alive = False
    if alive:
        what = "another remote-hw server" if is_ours(mnt) else f"a {mnt['fstype']} mount"
        raise FuseError(f"{path} is in use by {what}; stop it or choose another "
                        "mount point")
    if not is_ours(mnt):
        raise FuseError(f"{path} holds a dead {mnt['fstype']} mount that is not "
                        f"remote-hw's; unmount it yourself (fusermount3 -u -z {path})")
    umount(path, lazy=True)
    log.warning("removed the stale FUSE mount at %s left by a server that ended "
                "without unmounting", path)
    return True


def end_auto_unmount_helper(mountpoint: str) -> None:
    """With auto_unmount, libfuse leaves its fusermount3 child waiting on a socket
    it never closes, until this process exits. After a clean unmount it has nothing
    left to do: end and reap it, so a process that mounts and unmounts views does not
    collect them. Only our own children for this mount point are touched."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat_line = f.read()
            comm = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")]
            ppid = int(stat_line[stat_line.rindex(")") + 2:].split()[1])
            if ppid != me or not comm.startswith("fusermount"):
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if os.fsencode(mountpoint) not in argv:
            continue
        pid = int(entry)
        try:
            # It ignores SIGTERM by design (it must outlive us), and after a clean
            # unmount there is nothing it could leave half done.
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def abort_connection(dev: str) -> bool:
    """Abort a FUSE connection through fusectl (``dev`` = "0:NN" from mountinfo)."""
    minor = dev.split(":")[-1]
    base = "/sys/fs/fuse/connections"
    if (not os.path.exists(os.path.join(base, minor)) and mount_at(base) is None
            and os.geteuid() == 0):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", base], capture_output=True)
    try:
        with open(os.path.join(base, minor, "abort"), "w") as f:
            f.write("1")
        return True
    except OSError:
        return False
