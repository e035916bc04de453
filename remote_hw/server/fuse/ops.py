"""The FUSE adapter: :class:`~.fs.FileSystem` as an mfusepy ``Operations`` object.

mfusepy (the maintained fork of fusepy, on libfuse3; docs/fuse.md says why) is an
optional dependency, imported only when a view starts, so the class is built inside
:func:`build_operations`. The adapter only translates: ``OSError`` to
``FuseOSError`` with the same errno, times to nanoseconds, and caching off at init.
"""

from __future__ import annotations

import errno
import threading
from types import ModuleType
from typing import Any

from remote_hw.server.fuse.fs import FileSystem
from remote_hw.server.fuse.mounts import FuseError


def import_mfusepy() -> ModuleType:
    """Import mfusepy, turning its failures into one clear sentence."""
    try:
        import mfusepy
    except ImportError:
        raise FuseError("the FUSE view needs the mfusepy package "
                        "(pip install mfusepy) and libfuse3 (apt-get install fuse3)") from None
    except OSError as e:
        raise FuseError(f"the FUSE view needs libfuse3 (apt-get install fuse3 "
                        f"libfuse3-3): {e}") from None
    module: ModuleType = mfusepy
    return module


def build_operations(fs: FileSystem, mfusepy: ModuleType, ready: threading.Event) -> object:
    """The mfusepy Operations object for ``fs``; ``ready`` is set once libfuse has
    initialised the mount."""

    def oserror(e: OSError) -> Exception:
        err: Exception = mfusepy.FuseOSError(e.errno or errno.EIO)
        return err

    class Operations(mfusepy.Operations):  # type: ignore[name-defined]
        use_ns = True       # times in nanoseconds (mfusepy's non-deprecated form)

        # conn_info and config are libfuse's C structs (ctypes, untyped in mfusepy).
        def init_with_config(self, conn_info: Any, config: Any) -> None:
            if config is not None:
                # Nothing may be cached: sizes grow, sessions come and go.
                config.entry_timeout = 0.0
                config.negative_timeout = 0.0
                config.attr_timeout = 0.0
                config.direct_io = 1
                config.kernel_cache = 0
                config.auto_cache = 0
            ready.set()

        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            try:
                st = fs.getattr(path)
            except OSError as e:
                raise oserror(e) from None
            for key in ("st_atime", "st_mtime", "st_ctime"):
                st[key] = int(st[key] * 1e9)
            return {k: int(v) for k, v in st.items()}

        def readdir(self, path: str, fh: int) -> list[str]:
            try:
                return fs.readdir(path)
            except OSError as e:
                raise oserror(e) from None

        def readlink(self, path: str) -> str:
            try:
                return fs.readlink(path)
            except OSError as e:
                raise oserror(e) from None

        def open(self, path: str, flags: int) -> int:
            try:
                return fs.open(path, flags)
            except OSError as e:
                raise oserror(e) from None

        def create(self, path: str, mode: int, fi: object = None) -> int:
            raise oserror(OSError(errno.EACCES, path))

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            try:
                return fs.read(fh, size, offset)
            except OSError as e:
                raise oserror(e) from None

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            try:
                return fs.write(fh, data)
            except OSError as e:
                raise oserror(e) from None

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            try:
                fs.truncate(path)
            except OSError as e:
                raise oserror(e) from None
            return 0

        def flush(self, path: str, fh: int) -> int:
            try:
                fs.flush(fh)
            except OSError as e:
                raise oserror(e) from None
            return 0

        def release(self, path: str, fh: int) -> int:
            fs.release(fh)
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            return 0    # touch(1) on a device file is harmless

        def chmod(self, path: str, mode: int) -> int:
            raise oserror(OSError(errno.EPERM, path))

        def chown(self, path: str, uid: int, gid: int) -> int:
            raise oserror(OSError(errno.EPERM, path))

    return Operations()
