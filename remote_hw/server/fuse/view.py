"""The FUSE view's life cycle: mount a :class:`~.fs.FileSystem` in a thread, unmount.

``FuseView.start()`` checks the mount point (creating it, refusing a live or foreign
mount, removing a dead remote-hw one: :mod:`.mounts`), starts tapping every stream
instance's output (:mod:`.taps`), runs libfuse's multi-threaded loop in a thread of
the server process (``fuse-view``) and returns once the kernel has initialised the
mount. ``stop()`` unmounts (lazily if a file is still open, then aborting the
connection), joins the thread and takes the view's listeners out of the controller.
A server killed hard leaves a dead mount; ``auto_unmount`` (via fusermount3) removes
it when the process dies, and ``start()`` removes one it finds in its place.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import threading
import time
from types import ModuleType, TracebackType

from remote_hw.server.controller import Controller, Instance
from remote_hw.server.fuse.fs import FileSystem
from remote_hw.server.fuse.mounts import (
    FSNAME,
    FuseError,
    abort_connection,
    end_auto_unmount_helper,
    mount_at,
    remove_stale_mount,
    umount,
)
from remote_hw.server.fuse.ops import build_operations, import_mfusepy
from remote_hw.server.fuse.signals import (
    ignore_sigpipe,
    restore_signal_dispositions,
    signal_dispositions,
)
from remote_hw.server.fuse.taps import TX_KEEP, Taps, TxTap
from remote_hw.server.fuse.tree import Node

log = logging.getLogger("remote_hw.fuse")

READY_TIMEOUT = 15.0


class FuseView:
    """The FUSE file system of one server's controller, mounted at ``mountpoint``.

    ``start()`` mounts and returns once the kernel has initialised the mount;
    ``stop()`` unmounts (detaching lazily if a file is still open) and waits for
    the serving thread. Options: ``tx_keep`` (bytes of guest output kept per
    instance), ``allow_other`` (default: when running as root, so other users can
    read what the modes allow), ``auto_unmount`` (default: when fusermount3 is
    installed; the mount then disappears by itself when the process dies).
    """

    def __init__(self, controller: Controller, mountpoint: str, *, tx_keep: int = TX_KEEP,
                 allow_other: bool | None = None, auto_unmount: bool | None = None,
                 debug: bool = False) -> None:
        self.controller = controller
        self.mountpoint = os.path.abspath(mountpoint)
        self.tx_keep = tx_keep
        self.allow_other = os.geteuid() == 0 if allow_other is None else allow_other
        self.auto_unmount = (shutil.which("fusermount3") is not None
                             if auto_unmount is None else auto_unmount)
        self.debug = debug
        self._taps = Taps(controller, tx_keep)
        self.fs = FileSystem(controller, self._taps, self.mountpoint)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._dev = ""
        self._created_dir = False

    # -- what callers may ask -------------------------------------------------------

    @property
    def mounted(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def tap(self, inst: Instance) -> TxTap | None:
        """The tx tap of an instance (tests and callers that want the stream)."""
        return self._taps.get(inst)

    def resolve(self, path: str) -> Node:
        """What ``path`` (relative to the mount point) is; OSError(ENOENT) if nothing."""
        return self.fs.resolve(path)

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> FuseView:
        if self._thread is not None:
            raise RuntimeError("FuseView.start() called twice")
        mfusepy = import_mfusepy()
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
        self._taps.watch()
        before = signal_dispositions()
        self._thread = threading.Thread(target=self._serve, args=(mfusepy,),
                                        name="fuse-view", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._taps.close()
                if self._created_dir:
                    try:
                        os.rmdir(self.mountpoint)
                    except OSError:
                        pass
                err = self._error
                self._thread.join(timeout=1)
                self._thread = None
                ignore_sigpipe()
                if err is None or (isinstance(err, RuntimeError) and err.args
                                   and isinstance(err.args[0], int)):
                    why = " (libfuse said why on stderr)"
                else:
                    why = f": {err}"
                raise FuseError(f"cannot mount the FUSE view at {self.mountpoint}{why}")
        restore_signal_dispositions(before)
        ignore_sigpipe()
        mnt = mount_at(self.mountpoint)
        self._dev = mnt["dev"] if mnt else ""
        log.info("FUSE view of server %s at %s", self.controller.server_id,
                 self.mountpoint)
        return self

    def _serve(self, mfusepy: ModuleType) -> None:
        ops = build_operations(self.fs, mfusepy, self._ready)
        opts: dict[str, str | bool | int] = dict(
            foreground=True, fsname=f"{FSNAME}:{self.controller.server_id}", subtype=FSNAME,
            default_permissions=True, attr_timeout=0, entry_timeout=0, negative_timeout=0,
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
        self._taps.close()
        if thread is None:
            return
        if thread.is_alive() and mount_at(self.mountpoint) is not None:
            try:
                umount(self.mountpoint, lazy=False)
            except OSError as e:
                log.warning("FUSE view: %s is busy (%s); detaching it", self.mountpoint,
                            e.strerror)
                try:
                    umount(self.mountpoint, lazy=True)
                except OSError as e2:
                    log.error("FUSE view: cannot unmount %s: %s", self.mountpoint, e2)
        thread.join(timeout=1)
        if thread.is_alive() and self._dev:
            # Files still open after a lazy detach keep the connection alive; cut it.
            abort_connection(self._dev)
            thread.join(timeout=5)
        if thread.is_alive():
            log.error("FUSE view: the serving thread of %s did not end", self.mountpoint)
        else:
            end_auto_unmount_helper(self.mountpoint)
        self._thread = None
        ignore_sigpipe()
        if self._created_dir:
            try:
                os.rmdir(self.mountpoint)
            except OSError:
                pass

    def __enter__(self) -> FuseView:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
