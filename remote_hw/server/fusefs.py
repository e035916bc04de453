"""The server's FUSE view: the far side of every software device as files.

``remote-hw server`` mounts this (by default at ``/run/remote-hw/<server id>``) so
people and programs on the server reach each device instance with ordinary tools::

    MOUNT/
      README                     what is where (this layout)
      server                     server id, devices, live instances
      devices/
        uart0/
          config                 kind, backend, shared, options
          0/                     instance 0 of uart0 (one per client/VM session
                                 unless the device is shared)
            status               registers and counters, "name: value" lines
            status.json          the same as JSON
            tx                   (stream devices) what the guest transmitted; a
                                 growing file: tail -f follows it
            rx                   (stream devices) writes go to the guest's receive
                                 side, raising its interrupt
            time                 (clocks) the guest's time, ISO 8601 UTC; write a
                                 time ("2030-01-02 03:04:05", "@EPOCH", "now") to set it
            input                (keyboards) writing text types it into the guest
            keys                 (keyboards) key commands: "ctrl+alt+delete",
                                 "+shift a -shift", "enter"
      sessions/
        client1-vm1/
          uart0 -> ../../devices/uart0/0

Sessions and instances appear and disappear as VMs attach and leave: every lookup
asks the controller for its live instances (``Controller.instances()``), so the tree
is always current and needs no notification. The one thing that must be seen from
the start is the guest's output, so the view taps each stream device's ``tx_sink``
when the instance is created (see :class:`_InstanceWatch`).

The binding is mfusepy (the maintained fork of fusepy, on libfuse3); docs/fuse.md
says why. The mount is served by libfuse's multi-threaded loop in a thread of the
server process; :meth:`FuseView.stop` unmounts and joins it. A server killed hard
leaves a dead mount ("Transport endpoint is not connected"); ``auto_unmount`` (via
fusermount3) removes it when the process dies, and :meth:`FuseView.start` removes a
dead remote-hw mount it finds in its place.
"""

from __future__ import annotations

import codecs
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
import weakref
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from remote_hw.backends import keys
from remote_hw.devices.base import StreamDevice

log = logging.getLogger("remote_hw.fuse")

DEFAULT_ROOT = "/run/remote-hw"
TX_KEEP = 1 << 20          # bytes of guest output kept per instance for the tx file
FSNAME = "remote-hw"
READY_TIMEOUT = 15.0

_SESSION_RX = re.compile(r"client(\d+)-vm(\d+)")


class FuseError(RuntimeError):
    """The view cannot be mounted (missing library or /dev/fuse, busy mount point)."""


def default_mountpoint(server_id: str) -> str:
    """``/run/remote-hw/<server id>``: one folder per server on a host."""
    return os.path.join(DEFAULT_ROOT, server_id)


def session_name(client_id: int, vm_id: int) -> str:
    return f"client{client_id}-vm{vm_id}"


# ------------------------------------------------------------------ mounts

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


def _is_ours(mnt: dict[str, str]) -> bool:
    return mnt["fstype"] == f"fuse.{FSNAME}" or mnt["source"].startswith(FSNAME)


def _umount(path: str, lazy: bool) -> None:
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
        what = "another remote-hw server" if _is_ours(mnt) else f"a {mnt['fstype']} mount"
        raise FuseError(f"{path} is in use by {what}; stop it or choose another "
                        "mount point")
    if not _is_ours(mnt):
        raise FuseError(f"{path} holds a dead {mnt['fstype']} mount that is not "
                        f"remote-hw's; unmount it yourself (fusermount3 -u -z {path})")
    _umount(path, lazy=True)
    log.warning("removed the stale FUSE mount at %s left by a server that ended "
                "without unmounting", path)
    return True


def _end_auto_unmount_helper(mountpoint: str) -> None:
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


def _abort_connection(dev: str) -> bool:
    """Abort a FUSE connection through fusectl (``dev`` = "0:NN" from mountinfo)."""
    minor = dev.split(":")[-1]
    base = "/sys/fs/fuse/connections"
    if not os.path.exists(os.path.join(base, minor)):
        if mount_at(base) is None and os.geteuid() == 0:
            subprocess.run(["mount", "-t", "fusectl", "fusectl", base],
                           capture_output=True)
    try:
        with open(os.path.join(base, minor, "abort"), "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ tapping tx

class TxTap:
    """The guest's transmitted bytes as a growing file: the last ``keep`` bytes are
    kept with absolute offsets, ``total`` counts everything (the file size)."""

    def __init__(self, keep: int = TX_KEEP) -> None:
        self.keep = keep
        self.lock = threading.Lock()
        self.buf = bytearray()
        self.start = 0            # absolute offset of buf[0]
        self.mtime = time.time()
        self.changed = threading.Condition(self.lock)

    @property
    def total(self) -> int:
        return self.start + len(self.buf)

    def append(self, data: bytes) -> None:
        with self.lock:
            self.buf += data
            over = len(self.buf) - self.keep
            if over > 0:
                del self.buf[:over]
                self.start += over
            self.mtime = time.time()
            self.changed.notify_all()

    def read(self, offset: int, size: int) -> bytes:
        """Bytes at [offset, offset+size). Bytes no longer kept read as NUL, so
        offsets stay those of the whole stream (tail -f relies on the size)."""
        with self.lock:
            end = min(offset + size, self.start + len(self.buf))
            if offset >= end:
                return b""
            lost = b""
            if offset < self.start:
                lost = bytes(min(self.start, end) - offset)
                offset = self.start
            return lost + bytes(self.buf[offset - self.start:end - self.start])


class _Tee:
    """The tx_sink installed on a stream model: records, then calls the original."""

    __slots__ = ("tap", "original")

    def __init__(self, tap: TxTap, original: Callable[[bytes], None]) -> None:
        self.tap = tap
        self.original = original

    def __call__(self, data: bytes) -> None:
        self.tap.append(data)
        self.original(data)


class _InstanceWatch:
    """Sees every instance the controller creates, as it is created (through the
    controller's instance listeners). Instances created before a view started are
    adopted on its next lookup."""

    def __init__(self, controller: Any, on_new: Callable[[Any], None]) -> None:
        self.controller = controller
        self.on_new = on_new
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            self._installed = True
            self.controller.add_instance_listener(self.on_new)

    def remove(self) -> None:
        if self._installed:
            self._installed = False
            self.controller.remove_instance_listener(self.on_new)


# ------------------------------------------------------------------ the tree

class _Node:
    """A resolved path: a directory, a file bound to an instance, or a symlink."""

    __slots__ = ("kind", "names", "inst", "file", "target", "text")

    def __init__(self, kind: str, *, names: Iterable[str] = (), inst: Any = None,
                 file: "_FileType | None" = None, target: str = "",
                 text: Callable[[], bytes] | None = None) -> None:
        self.kind = kind              # "dir", "file", "link", "text"
        self.names = list(names)
        self.inst = inst
        self.file = file
        self.target = target
        self.text = text


class _FileType:
    """One kind of instance file: which models have it and what it does."""

    name = ""
    mode = 0o444
    readable = True
    writable = False
    size_from_tap = False

    def applies(self, model: Any) -> bool:
        return True

    def render(self, view: "FuseView", inst: Any) -> bytes:
        return b""

    def write(self, view: "FuseView", inst: Any, handle: "_Handle", data: bytes) -> None:
        raise OSError(errno.EACCES, "read-only")

    def flush(self, view: "FuseView", inst: Any, handle: "_Handle") -> None:
        pass


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v} ({v:#x})" if v > 9 else str(v)
    if isinstance(v, float):
        return f"{v:.6f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) or "-"
    return "-" if v is None else str(v)


class _StatusFile(_FileType):
    name = "status"

    def render(self, view: "FuseView", inst: Any) -> bytes:
        st = inst.status()
        head = [f"device: {inst.spec.id}", f"kind: {inst.spec.kind}",
                f"instance: {inst.index}", f"shared: {_fmt_value(inst.spec.shared)}"]
        lines = head + [f"{k}: {_fmt_value(v)}" for k, v in st.items()]
        tap = view._taps.get(inst)
        if tap is not None:
            lines.append(f"tx_kept: {len(tap.buf)} of {tap.total}")
        return ("\n".join(lines) + "\n").encode()


class _StatusJsonFile(_FileType):
    name = "status.json"

    def render(self, view: "FuseView", inst: Any) -> bytes:
        st = {"device": inst.spec.id, "kind": inst.spec.kind, "instance": inst.index,
              "shared": inst.spec.shared, **inst.status()}
        return (json.dumps(st, indent=1, sort_keys=True, default=str) + "\n").encode()


class _TxFile(_FileType):
    name = "tx"
    size_from_tap = True

    def applies(self, model: Any) -> bool:
        return isinstance(model, StreamDevice)


class _RxFile(_FileType):
    name = "rx"
    mode = 0o200
    readable = False
    writable = True

    def applies(self, model: Any) -> bool:
        return isinstance(model, StreamDevice)

    def write(self, view: "FuseView", inst: Any, handle: "_Handle", data: bytes) -> None:
        inst.to_guest(data)


def parse_time(text: str) -> datetime:
    """A time for the RTC: ISO 8601 (``2030-01-02T03:04:05Z``, ``2030-01-02
    03:04:05``, with an offset or not: naive means UTC), ``@EPOCH`` or ``now``."""
    t = text.strip()
    if t == "now":
        return datetime.now(timezone.utc)
    if t.startswith("@"):
        try:
            return datetime.fromtimestamp(float(t[1:]), timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise ValueError(f"bad epoch time {t!r}") from None
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"cannot read {t!r} as a time (use YYYY-MM-DD HH:MM:SS, "
                         "@EPOCH or now)") from None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt


class _LineFile(_FileType):
    """A writable file that acts on whole lines: each complete line written is
    passed to ``_apply`` as it arrives, a last line without a newline on flush
    (close). A line ``_apply`` rejects fails that write with its OSError."""

    def write(self, view: "FuseView", inst: Any, handle: "_Handle", data: bytes) -> None:
        handle.wbuf += data
        while b"\n" in handle.wbuf:
            line, _, rest = bytes(handle.wbuf).partition(b"\n")
            handle.wbuf = bytearray(rest)
            self._apply(inst, line)

    def flush(self, view: "FuseView", inst: Any, handle: "_Handle") -> None:
        if handle.wbuf.strip():
            line, handle.wbuf = bytes(handle.wbuf), bytearray()
            self._apply(inst, line)

    @staticmethod
    def _apply(inst: Any, line: bytes) -> None:
        """Act on one line (without its newline); raise OSError to reject it."""
        raise NotImplementedError


class _TimeFile(_LineFile):
    name = "time"
    mode = 0o644
    writable = True

    def applies(self, model: Any) -> bool:
        return hasattr(model, "now") and hasattr(model, "set_time")

    def render(self, view: "FuseView", inst: Any) -> bytes:
        with inst.lock:
            dt = inst.model.now()
        return (dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") + "\n").encode()

    @staticmethod
    def _apply(inst: Any, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return
        try:
            dt = parse_time(text)
        except ValueError as e:
            log.warning("FUSE view: %s time: %s", inst.spec.id, e)
            raise OSError(errno.EINVAL, str(e)) from None
        with inst.lock:
            inst.model.set_time(dt)
        log.info("FUSE view: %s#%d time set to %s", inst.spec.id, inst.index,
                 dt.isoformat())


def _deliver_keys(inst: Any, events: list[tuple[int, bool]]) -> None:
    model = inst.model
    with inst.lock:
        for code, pressed in events:
            model.key_event(code, pressed)


class _InputFile(_FileType):
    """Text typed into the guest: the model's ``type_text`` if it has one, else
    its ``key_event(code, pressed)`` fed with US-layout key events."""

    name = "input"
    mode = 0o200
    readable = False
    writable = True

    def applies(self, model: Any) -> bool:
        return hasattr(model, "type_text") or hasattr(model, "key_event")

    def write(self, view: "FuseView", inst: Any, handle: "_Handle", data: bytes) -> None:
        text = handle.decoder.decode(data)
        if not text:
            return
        model = inst.model
        if hasattr(model, "type_text"):
            with inst.lock:
                model.type_text(text)
            return
        try:
            events = keys.text_events(text)
        except keys.UnknownKey as e:
            raise OSError(errno.EINVAL, str(e)) from None
        _deliver_keys(inst, events)


class _KeysFile(_LineFile):
    """Key commands, one line at a time (see keys.parse_key_commands)."""

    name = "keys"
    mode = 0o200
    readable = False
    writable = True

    def applies(self, model: Any) -> bool:
        return hasattr(model, "key_event")

    @staticmethod
    def _apply(inst: Any, line: bytes) -> None:
        try:
            events = keys.parse_key_commands(line.decode("utf-8", "replace"))
        except keys.UnknownKey as e:
            raise OSError(errno.EINVAL, str(e)) from None
        _deliver_keys(inst, events)


FILE_TYPES: list[_FileType] = [_StatusFile(), _StatusJsonFile(), _TxFile(), _RxFile(),
                               _TimeFile(), _InputFile(), _KeysFile()]
_FILE_BY_NAME = {f.name: f for f in FILE_TYPES}


class _Handle:
    """An open file: its node, a snapshot for text files, a write buffer."""

    __slots__ = ("node", "snapshot", "wbuf", "decoder")

    def __init__(self, node: _Node, snapshot: bytes | None) -> None:
        self.node = node
        self.snapshot = snapshot
        self.wbuf = bytearray()
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")


_README = """\
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


def _mfusepy() -> Any:
    """Import mfusepy, turning its failures into one clear sentence."""
    try:
        import mfusepy
    except ImportError:
        raise FuseError("the FUSE view needs the mfusepy package "
                        "(pip install mfusepy) and libfuse3 (apt-get install fuse3)") from None
    except OSError as e:
        raise FuseError(f"the FUSE view needs libfuse3 (apt-get install fuse3 "
                        f"libfuse3-3): {e}") from None
    return mfusepy


class FuseView:
    """The FUSE file system of one server's controller, mounted at ``mountpoint``.

    ``start()`` mounts and returns once the kernel has initialised the mount;
    ``stop()`` unmounts (detaching lazily if a file is still open) and waits for
    the serving thread. Options: ``tx_keep`` (bytes of guest output kept per
    instance), ``allow_other`` (default: when running as root, so other users can
    read what the modes allow), ``auto_unmount`` (default: when fusermount3 is
    installed; the mount then disappears by itself when the process dies).
    """

    def __init__(self, controller: Any, mountpoint: str, *, tx_keep: int = TX_KEEP,
                 allow_other: bool | None = None, auto_unmount: bool | None = None,
                 debug: bool = False) -> None:
        self.controller = controller
        self.mountpoint = os.path.abspath(mountpoint)
        self.tx_keep = tx_keep
        self.allow_other = os.geteuid() == 0 if allow_other is None else allow_other
        self.auto_unmount = (shutil.which("fusermount3") is not None
                             if auto_unmount is None else auto_unmount)
        self.debug = debug
        self._taps: "weakref.WeakKeyDictionary[Any, TxTap]" = weakref.WeakKeyDictionary()
        self._tap_lock = threading.Lock()
        self._watch = _InstanceWatch(controller, self._adopt)
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._hlock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._dev = ""
        self._created_dir = False
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started_at = time.time()

    # -- life cycle -----------------------------------------------------------------

    @property
    def mounted(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def start(self) -> "FuseView":
        if self._thread is not None:
            raise RuntimeError("FuseView.start() called twice")
        mfusepy = _mfusepy()
        if not os.path.exists("/dev/fuse"):
            raise FuseError("cannot mount the FUSE view: /dev/fuse does not exist "
                            "(load the fuse module: modprobe fuse)")
        try:
            st = os.stat(self.mountpoint)
        except FileNotFoundError:
            try:
                os.makedirs(self.mountpoint)
            except OSError as e:
                raise FuseError(f"cannot create the mount point {self.mountpoint}: "
                                f"{e.strerror}") from None
            self._created_dir = True
        except OSError as e:
            if e.errno != errno.ENOTCONN:       # ENOTCONN: a dead mount, handled below
                raise FuseError(f"cannot use the mount point {self.mountpoint}: "
                                f"{e.strerror}") from None
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise FuseError(f"the mount point {self.mountpoint} is not a directory")
        remove_stale_mount(self.mountpoint)
        if os.listdir(self.mountpoint):
            log.warning("FUSE view: %s is not empty; its files are hidden while mounted",
                        self.mountpoint)
        self._watch.install()
        for inst in self.controller.instances():
            self._adopt(inst)
        before = _signal_dispositions()
        self._thread = threading.Thread(target=self._serve, args=(mfusepy,),
                                        name="fuse-view", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._watch.remove()
                self._untap_all()
                if self._created_dir:
                    try:
                        os.rmdir(self.mountpoint)
                    except OSError:
                        pass
                err = self._error
                self._thread.join(timeout=1)
                self._thread = None
                _ignore_sigpipe()
                if err is None or (isinstance(err, RuntimeError) and err.args
                                   and isinstance(err.args[0], int)):
                    why = " (libfuse said why on stderr)"
                else:
                    why = f": {err}"
                raise FuseError(f"cannot mount the FUSE view at {self.mountpoint}{why}")
        _restore_signal_dispositions(before)
        _ignore_sigpipe()
        mnt = mount_at(self.mountpoint)
        self._dev = mnt["dev"] if mnt else ""
        log.info("FUSE view of server %s at %s", self.controller.server_id,
                 self.mountpoint)
        return self

    def _serve(self, mfusepy: Any) -> None:
        ops = _Operations(self, mfusepy)
        opts: dict[str, Any] = dict(foreground=True, fsname=f"{FSNAME}:{self.controller.server_id}",
                                    subtype=FSNAME, default_permissions=True,
                                    attr_timeout=0, entry_timeout=0, negative_timeout=0,
                                    debug=self.debug)
        if self.allow_other:
            opts["allow_other"] = True
        if self.auto_unmount:
            opts["auto_unmount"] = True
        try:
            mfusepy.FUSE(ops, self.mountpoint, raw_fi=False, **opts)
        except BaseException as e:   # reported by start() or logged below
            self._error = e
            if self._ready.is_set():
                log.error("FUSE view at %s ended: %s", self.mountpoint, e)

    def stop(self) -> None:
        """Unmount and wait for the serving thread; safe to call twice."""
        thread = self._thread
        self._watch.remove()
        self._untap_all()
        if thread is None:
            return
        if thread.is_alive() and mount_at(self.mountpoint) is not None:
            try:
                _umount(self.mountpoint, lazy=False)
            except OSError as e:
                log.warning("FUSE view: %s is busy (%s); detaching it", self.mountpoint,
                            e.strerror)
                try:
                    _umount(self.mountpoint, lazy=True)
                except OSError as e2:
                    log.error("FUSE view: cannot unmount %s: %s", self.mountpoint, e2)
        thread.join(timeout=1)
        if thread.is_alive() and self._dev:
            # Files still open after a lazy detach keep the connection alive; cut it.
            _abort_connection(self._dev)
            thread.join(timeout=5)
        if thread.is_alive():
            log.error("FUSE view: the serving thread of %s did not end", self.mountpoint)
        else:
            _end_auto_unmount_helper(self.mountpoint)
        self._thread = None
        _ignore_sigpipe()
        if self._created_dir:
            try:
                os.rmdir(self.mountpoint)
            except OSError:
                pass

    def __enter__(self) -> "FuseView":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- instances ----------------------------------------------------------------

    def _adopt(self, inst: Any) -> TxTap | None:
        """Tap a stream instance's output (once)."""
        model = getattr(inst, "model", None)
        if not isinstance(model, StreamDevice):
            return None
        with self._tap_lock:
            tap = self._taps.get(inst)
            if tap is None:
                tap = TxTap(self.tx_keep)
                self._taps[inst] = tap
                with inst.lock:
                    model.tx_sink = _Tee(tap, model.tx_sink)
            return tap

    def _untap_all(self) -> None:
        """Take this view's tee out of each model's tx_sink chain (other views'
        tees, and the backend at the end of the chain, stay)."""
        with self._tap_lock:
            for inst, tap in list(self._taps.items()):
                model = inst.model
                with inst.lock:
                    sink = model.tx_sink
                    if isinstance(sink, _Tee) and sink.tap is tap:
                        model.tx_sink = sink.original
                        continue
                    while isinstance(sink, _Tee) and isinstance(sink.original, _Tee):
                        if sink.original.tap is tap:
                            sink.original = sink.original.original
                            break
                        sink = sink.original

    def tap(self, inst: Any) -> TxTap | None:
        """The tx tap of an instance (tests and callers that want the stream)."""
        return self._taps.get(inst) or self._adopt(inst)

    def _instances(self) -> list[Any]:
        insts = self.controller.instances()
        for inst in insts:
            if inst not in self._taps:
                self._adopt(inst)
        return insts

    # -- path resolution ----------------------------------------------------------

    def _server_text(self) -> bytes:
        insts = self.controller.instances()
        lines = [f"server: {self.controller.server_id}", f"mount: {self.mountpoint}",
                 f"devices: {', '.join(self.controller.registry) or '-'}",
                 f"instances: {len(insts)}"]
        for inst in insts:
            lines.append(f"  {inst.label()}")
        return ("\n".join(lines) + "\n").encode()

    def resolve(self, path: str) -> _Node:
        parts = [p for p in path.split("/") if p]
        n = len(parts)
        if n == 0:
            return _Node("dir", names=["README", "server", "devices", "sessions"])
        top = parts[0]
        if top == "README" and n == 1:
            return _Node("text", text=lambda: _README.format(
                server=self.controller.server_id).encode())
        if top == "server" and n == 1:
            return _Node("text", text=self._server_text)
        if top == "devices":
            return self._resolve_devices(parts[1:])
        if top == "sessions":
            return self._resolve_sessions(parts[1:])
        raise OSError(errno.ENOENT, path)

    def _resolve_devices(self, parts: list[str]) -> _Node:
        registry = self.controller.registry
        if not parts:
            return _Node("dir", names=sorted(registry))
        spec = registry.get(parts[0])
        if spec is None:
            raise OSError(errno.ENOENT, parts[0])
        insts = [i for i in self._instances() if i.spec.id == spec.id]
        if len(parts) == 1:
            return _Node("dir", names=["config"] + [str(i.index) for i in
                                                    sorted(insts, key=lambda i: i.index)])
        if parts[1] == "config" and len(parts) == 2:
            def config() -> bytes:
                opts = ",".join(f"{k}={v}" for k, v in spec.options.items()) or "-"
                return (f"id: {spec.id}\nkind: {spec.kind}\nbackend: {spec.backend or '-'}"
                        f"\nshared: {_fmt_value(spec.shared)}\noptions: {opts}\n").encode()
            return _Node("text", text=config)
        if not parts[1].isdigit():
            raise OSError(errno.ENOENT, parts[1])
        index = int(parts[1])
        inst = next((i for i in insts if i.index == index), None)
        if inst is None:
            raise OSError(errno.ENOENT, parts[1])
        files = [f for f in FILE_TYPES if f.applies(inst.model)]
        if len(parts) == 2:
            return _Node("dir", names=[f.name for f in files], inst=inst)
        if len(parts) == 3:
            ftype = _FILE_BY_NAME.get(parts[2])
            if ftype is None or ftype not in files:
                raise OSError(errno.ENOENT, parts[2])
            return _Node("file", inst=inst, file=ftype)
        raise OSError(errno.ENOENT, "/".join(parts))

    def _sessions(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for inst in self._instances():
            for client_id, vm_id in list(inst.sessions):
                out.setdefault(session_name(client_id, vm_id), {})[inst.spec.id] = inst
        return out

    def _resolve_sessions(self, parts: list[str]) -> _Node:
        sessions = self._sessions()
        if not parts:
            return _Node("dir", names=sorted(sessions, key=_session_sort_key))
        devs = sessions.get(parts[0])
        if devs is None:
            raise OSError(errno.ENOENT, parts[0])
        if len(parts) == 1:
            return _Node("dir", names=sorted(devs))
        inst = devs.get(parts[1])
        if inst is None or len(parts) > 2:
            raise OSError(errno.ENOENT, "/".join(parts))
        return _Node("link", inst=inst, target=f"../../devices/{inst.spec.id}/{inst.index}")

    # -- handles ------------------------------------------------------------------

    def _open(self, path: str, flags: int) -> int:
        node = self.resolve(path)
        if node.kind == "dir":
            raise OSError(errno.EISDIR, path)
        if node.kind == "link":
            raise OSError(errno.ELOOP, path)   # the kernel follows links itself
        acc = flags & os.O_ACCMODE
        wants_read = acc in (os.O_RDONLY, os.O_RDWR)
        wants_write = acc in (os.O_WRONLY, os.O_RDWR)
        if node.kind == "text":
            if wants_write:
                raise OSError(errno.EACCES, path)
            snapshot = node.text() if node.text else b""
        else:
            ftype = node.file
            assert ftype is not None
            if (wants_read and not ftype.readable) or (wants_write and not ftype.writable):
                raise OSError(errno.EACCES, path)
            snapshot = None
            if wants_read and not ftype.size_from_tap:
                snapshot = ftype.render(self, node.inst)
        with self._hlock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = _Handle(node, snapshot)
        return fh

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, "stale handle")
        return h

    def _read(self, fh: int, size: int, offset: int) -> bytes:
        h = self._handle(fh)
        if h.snapshot is not None:
            return h.snapshot[offset:offset + size]
        node = h.node
        if node.file is not None and node.file.size_from_tap:
            tap = self.tap(node.inst)
            return tap.read(offset, size) if tap else b""
        return b""

    def _write(self, fh: int, data: bytes) -> int:
        h = self._handle(fh)
        node = h.node
        if node.file is None or not node.file.writable:
            raise OSError(errno.EACCES, "read-only")
        node.file.write(self, node.inst, h, data)
        return len(data)

    def _flush(self, fh: int) -> None:
        h = self._handles.get(fh)
        if h is not None and h.node.file is not None:
            h.node.file.flush(self, h.node.inst, h)

    def _release(self, fh: int) -> None:
        with self._hlock:
            self._handles.pop(fh, None)

    def _getattr(self, path: str) -> dict[str, Any]:
        node = self.resolve(path)
        now = time.time()
        st: dict[str, Any] = {"st_uid": self.uid, "st_gid": self.gid,
                              "st_atime": now, "st_mtime": now, "st_ctime": now}
        if node.kind == "dir":
            st.update(st_mode=stat.S_IFDIR | 0o755, st_nlink=2)
            st["st_mtime"] = st["st_ctime"] = self.started_at
        elif node.kind == "link":
            st.update(st_mode=stat.S_IFLNK | 0o777, st_nlink=1, st_size=len(node.target))
        elif node.kind == "text":
            st.update(st_mode=stat.S_IFREG | 0o444, st_nlink=1,
                      st_size=len(node.text()) if node.text else 0)
        else:
            ftype = node.file
            assert ftype is not None
            size = 0
            if ftype.size_from_tap:
                tap = self.tap(node.inst)
                if tap is not None:
                    size = tap.total
                    st["st_mtime"] = st["st_ctime"] = tap.mtime
            elif ftype.readable:
                size = len(ftype.render(self, node.inst))
            st.update(st_mode=stat.S_IFREG | ftype.mode, st_nlink=1, st_size=size)
        return st


def _session_sort_key(name: str) -> tuple[int, int, str]:
    m = _SESSION_RX.fullmatch(name)
    return (int(m.group(1)), int(m.group(2)), "") if m else (1 << 62, 0, name)


def _signal_dispositions() -> dict[int, Any]:
    out = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            out[sig] = signal.getsignal(sig)
        except ValueError:
            pass
    return out


def _ignore_sigpipe() -> None:
    """libfuse ignores SIGPIPE while it serves and sets it back to the *default* when
    it stops, which would let the next write to a closed socket kill the server
    (Python runs with SIGPIPE ignored and reports EPIPE as an exception). Put it back
    to ignored, from any thread (through libc: signal.signal is main-thread only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.signal(int(signal.SIGPIPE), ctypes.c_void_p(1))  # SIG_IGN == (void (*)(int)) 1


def _restore_signal_dispositions(before: dict[int, Any]) -> None:
    """libfuse's fuse_main installs its own SIGINT/SIGTERM/SIGHUP handlers (at the C
    level, unseen by Python) where the default action was set, so a SIGTERM meant
    for the server would end only the FUSE loop. Re-assert the default and ignored
    dispositions the process had (Python-level handlers are left alone by libfuse).
    Only the main thread may do this; elsewhere the caller owns its signals."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, old in before.items():
        if old in (signal.SIG_DFL, signal.SIG_IGN):
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass


def _Operations(view: FuseView, mfusepy: Any) -> Any:
    """The mfusepy Operations object for ``view`` (built lazily: mfusepy is an
    optional dependency and is only imported when a view starts)."""

    def oserror(e: OSError) -> Exception:
        return mfusepy.FuseOSError(e.errno or errno.EIO)

    class Operations(mfusepy.Operations):
        use_ns = True       # times in nanoseconds (mfusepy's non-deprecated form)

        def init_with_config(self, conn_info: Any, config: Any) -> None:
            if config is not None:
                # Nothing may be cached: sizes grow, sessions come and go.
                config.entry_timeout = 0.0
                config.negative_timeout = 0.0
                config.attr_timeout = 0.0
                config.direct_io = 1
                config.kernel_cache = 0
                config.auto_cache = 0
            view._ready.set()

        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            try:
                st = view._getattr(path)
            except OSError as e:
                raise oserror(e) from None
            for key in ("st_atime", "st_mtime", "st_ctime"):
                st[key] = int(st[key] * 1e9)
            return st

        def readdir(self, path: str, fh: Any) -> list[str]:
            try:
                node = view.resolve(path)
            except OSError as e:
                raise oserror(e) from None
            if node.kind != "dir":
                raise mfusepy.FuseOSError(errno.ENOTDIR)
            return [".", "..", *node.names]

        def readlink(self, path: str) -> str:
            try:
                node = view.resolve(path)
            except OSError as e:
                raise oserror(e) from None
            if node.kind != "link":
                raise mfusepy.FuseOSError(errno.EINVAL)
            return node.target

        def open(self, path: str, flags: int) -> int:
            try:
                return view._open(path, flags)
            except OSError as e:
                raise oserror(e) from None

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            raise mfusepy.FuseOSError(errno.EACCES)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            try:
                return view._read(fh, size, offset)
            except OSError as e:
                raise oserror(e) from None

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            try:
                return view._write(fh, data)
            except OSError as e:
                raise oserror(e) from None

        def truncate(self, path: str, length: int, fh: Any = None) -> int:
            # "echo ... > file" truncates first: fine for the write-only files.
            try:
                node = view.resolve(path)
            except OSError as e:
                raise oserror(e) from None
            if node.kind != "file" or node.file is None or not node.file.writable:
                raise mfusepy.FuseOSError(errno.EACCES)
            return 0

        def flush(self, path: str, fh: int) -> int:
            try:
                view._flush(fh)
            except OSError as e:
                raise oserror(e) from None
            return 0

        def release(self, path: str, fh: int) -> int:
            view._release(fh)
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

        def utimens(self, path: str, times: Any = None) -> int:
            return 0    # touch(1) on a device file is harmless

        def chmod(self, path: str, mode: int) -> int:
            raise mfusepy.FuseOSError(errno.EPERM)

        def chown(self, path: str, uid: int, gid: int) -> int:
            raise mfusepy.FuseOSError(errno.EPERM)

    return Operations()
