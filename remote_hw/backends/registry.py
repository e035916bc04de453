"""Backends by name, and the parser for ``backend=NAME:ARG`` specifications."""

from __future__ import annotations

from .base import BackendError, StreamBackend
from .file import FileBackend
from .tcp import TcpBackend
from .tty import TtyBackend

BACKENDS: dict[str, type[StreamBackend]] = {
    TcpBackend.name: TcpBackend,
    FileBackend.name: FileBackend,
    TtyBackend.name: TtyBackend,
}


def open_backend(spec: str, label: str, index: int = 0) -> StreamBackend:
    """Construct the backend ``spec`` ("NAME:ARG", e.g. ``tcp:127.0.0.1:4000``) for the
    device instance ``label`` with ``index`` among its siblings.

    The backend's resources are opened here (socket bound, file opened) but it does
    not serve until ``start``. Raises BackendError for a malformed spec, an unknown
    name (listing the known ones) or an argument the backend rejects.
    """
    name, sep, arg = spec.partition(":")
    if not sep or not name:
        raise BackendError(f"backend {spec!r}: expected NAME:ARG "
                           f"(known backends: {', '.join(sorted(BACKENDS))})")
    cls = BACKENDS.get(name)
    if cls is None:
        raise BackendError(f"unknown backend {name!r} "
                           f"(known backends: {', '.join(sorted(BACKENDS))})")
    if index < 0:
        raise BackendError(f"backend {spec!r}: index must be >= 0, got {index}")
    return cls(arg, label, index)
