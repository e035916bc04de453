"""The file system's operations, apart from any FUSE binding: open files (handles),
reads, writes, attributes.

:class:`FileSystem` answers in plain Python (bytes, ints, dicts, ``OSError`` with an
errno); :mod:`.ops` adapts it to mfusepy, :mod:`.view` mounts it. Text files and
``status`` are snapshots taken at open; ``tx`` is read live from its tap, so its
size grows as the guest writes and ``tail -f`` follows it.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time

from remote_hw.server.controller import Controller
from remote_hw.server.fuse.files import Handle
from remote_hw.server.fuse.taps import Taps
from remote_hw.server.fuse.tree import Node, Tree

Stat = dict[str, "int | float"]   # st_* fields as os.stat names them; times in seconds


class FileSystem:
    """The view's tree and open files for one controller."""

    def __init__(self, controller: Controller, taps: Taps, mountpoint: str) -> None:
        self.controller = controller
        self.taps = taps
        self.tree = Tree(controller, taps, mountpoint)
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._hlock = threading.Lock()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started_at = time.time()

    def resolve(self, path: str) -> Node:
        return self.tree.resolve(path)

    def readdir(self, path: str) -> list[str]:
        node = self.resolve(path)
        if node.kind != "dir":
            raise OSError(errno.ENOTDIR, path)
        return [".", "..", *node.names]

    def readlink(self, path: str) -> str:
        node = self.resolve(path)
        if node.kind != "link":
            raise OSError(errno.EINVAL, path)
        return node.target

    def truncate(self, path: str) -> None:
        """``echo ... > file`` truncates first: fine for the write-only files."""
        node = self.resolve(path)
        if node.kind != "file" or node.file is None or not node.file.writable:
            raise OSError(errno.EACCES, path)

    # -- handles ------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
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
            ftype, inst = node.file, node.inst
            assert ftype is not None and inst is not None
            if (wants_read and not ftype.readable) or (wants_write and not ftype.writable):
                raise OSError(errno.EACCES, path)
            snapshot = None
            if wants_read and not ftype.size_from_tap:
                snapshot = ftype.render(inst, self.taps)
        with self._hlock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = Handle(node, snapshot)
        return fh

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, "stale handle")
        return h

    def read(self, fh: int, size: int, offset: int) -> bytes:
        h = self._handle(fh)
        if h.snapshot is not None:
            return h.snapshot[offset:offset + size]
        node = h.node
        if node.file is not None and node.file.size_from_tap and node.inst is not None:
            tap = self.taps.get(node.inst)
            return tap.read(offset, size) if tap else b""
        return b""

    def write(self, fh: int, data: bytes) -> int:
        h = self._handle(fh)
        node = h.node
        if node.file is None or not node.file.writable or node.inst is None:
            raise OSError(errno.EACCES, "read-only")
        node.file.write(node.inst, h, data)
        return len(data)

    def flush(self, fh: int) -> None:
        h = self._handles.get(fh)
        if h is not None and h.node.file is not None and h.node.inst is not None:
            h.node.file.flush(h.node.inst, h)

    def release(self, fh: int) -> None:
        with self._hlock:
            self._handles.pop(fh, None)

    # -- attributes ---------------------------------------------------------------

    def getattr(self, path: str) -> Stat:
        node = self.resolve(path)
        now = time.time()
        st: Stat = {"st_uid": self.uid, "st_gid": self.gid,
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
            ftype, inst = node.file, node.inst
            assert ftype is not None and inst is not None
            size = 0
            if ftype.size_from_tap:
                tap = self.taps.get(inst)
                if tap is not None:
                    size = tap.total
                    st["st_mtime"] = st["st_ctime"] = tap.mtime
            elif ftype.readable:
                size = len(ftype.render(inst, self.taps))
            st.update(st_mode=stat.S_IFREG | ftype.mode, st_nlink=1, st_size=size)
        return st
