"""``unix:PATH[,mode=0600][,owner=USER][,group=GROUP][,token=FILE]`` - a UNIX socket.

Why: a TCP port, even on loopback, lets every local user type into the VM. A UNIX
socket is a file, so who may connect is who may write to it: by default only the
server's own user (mode 0600); ``group=dialout,mode=0660`` lets a group in. Reach
it with ``socat - UNIX-CONNECT:PATH`` or ``nc -U PATH``.

The socket appears with its final mode and owner: it is bound inside a fresh private
directory (mode 0700) next to PATH, given its mode and owner there, then renamed onto
PATH, so nobody can connect in between. A stale socket left at PATH by a server that
died is replaced; any other file there is an error. ``{index}`` in PATH is replaced
by the instance's index; without it, instances other than the first listen on
``PATH.<index>``. Closing removes the socket file (if it is still ours).
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
import tempfile

from .base import BackendError
from .file import expand_path
from .listening import ListeningBackend

DEFAULT_MODE = 0o600


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise BackendError(f"unix: mode {text!r} is not an octal number (e.g. 0660)") \
            from None
    if mode & ~0o777:
        raise BackendError(f"unix: mode {text!r} must be permission bits (at most 0777)")
    return mode


def _uid(text: str) -> int:
    try:
        return int(text) if text.isdigit() else pwd.getpwnam(text).pw_uid
    except KeyError:
        raise BackendError(f"unix: no user {text!r}") from None


def _gid(text: str) -> int:
    try:
        return int(text) if text.isdigit() else grp.getgrnam(text).gr_gid
    except KeyError:
        raise BackendError(f"unix: no group {text!r}") from None


class UnixBackend(ListeningBackend):
    """Listen on a UNIX socket at PATH with a mode and owner (module docstring)."""

    name = "unix"
    options = frozenset({"token", "mode", "owner", "group"})
    hold_limit = 64 << 10   # scrollback for the next peer, as the tcp backend keeps

    def _open(self, address: str, index: int) -> socket.socket:
        if not address:
            raise BackendError("unix: no path given (expected unix:PATH)")
        opts = self._options
        mode = _mode(opts.get("mode", f"{DEFAULT_MODE:o}"))
        uid = _uid(opts["owner"]) if "owner" in opts else -1
        gid = _gid(opts["group"]) if "group" in opts else -1
        path = os.path.abspath(expand_path(address, index))
        self.path = path
        self._remove_stale(path)
        try:
            private = tempfile.mkdtemp(prefix=".remote-hw-", dir=os.path.dirname(path))
        except OSError as e:
            raise BackendError(f"unix: cannot create a socket next to {path!r}: "
                               f"{e.strerror or e}") from None
        tmp = os.path.join(private, "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(tmp)
            os.chmod(tmp, mode)
            if uid != -1 or gid != -1:
                os.chown(tmp, uid, gid)
            sock.listen(4)
            os.rename(tmp, path)
        except OSError as e:
            sock.close()
            raise BackendError(f"unix: cannot listen on {path!r}: {e.strerror or e}") \
                from None
        finally:
            for leftover in (tmp, private):
                try:
                    os.unlink(leftover) if leftover == tmp else os.rmdir(leftover)
                except OSError:
                    pass
        self._inode = os.stat(path).st_ino
        sock.setblocking(False)
        return sock

    @staticmethod
    def _remove_stale(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise BackendError(f"unix: cannot use {path!r}: {e.strerror or e}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise BackendError(f"unix: {path!r} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a stale socket of a server that died
            return
        finally:
            probe.close()
        raise BackendError(f"unix: {path!r} is in use by another listener")

    def _release_locked(self) -> None:
        super()._release_locked()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except (OSError, AttributeError):
            pass

    def describe(self) -> str:
        return f"unix:{self.path}" + (" (token)" if self._token is not None else "")
