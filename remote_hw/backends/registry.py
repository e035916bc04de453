"""Backends by name, and the parser for ``backend=NAME:ARG`` specifications.

A backend is an entry point of the group ``remote_hw.backends`` naming a
:class:`~remote_hw.backends.base.Backend` subclass; remote-hw's own (tcp, file, tty,
evdev) are registered in its ``pyproject.toml`` exactly as a plugin's are
(docs/plugin-api.md), and imported when first asked for (:mod:`remote_hw.entry_points`).
"""

from __future__ import annotations

import inspect

from remote_hw.entry_points import PluginError, PluginTable

from .base import Backend, BackendError, BackendUnavailable

GROUP = "remote_hw.backends"


def _check(name: str, cls: type[Backend]) -> None:
    """What the server relies on of a backend class, checked once at load."""
    declared = getattr(cls, "name", None)
    if declared != name:
        raise PluginError(f"the class says name = {declared!r}, the entry point {name!r}; "
                          f"they must be the same")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise PluginError(f"the class is abstract: it does not implement {missing}")


#: name -> backend class. Reading a name imports it; ``BACKENDS[n] = cls`` registers a
#: class in this process only (tests).
BACKENDS: PluginTable[Backend] = PluginTable(GROUP, Backend, "backend", _check)


def backend_class(spec: str) -> tuple[type[Backend], str]:
    """(class, argument) of the backend ``spec`` ("NAME:ARG"), nothing opened.

    Raises BackendError for a malformed spec, an unknown name (listing the known
    ones) or a plugin that fails to load (one line naming it and the exception), so a
    server can tell what kind of far side a device gets before it starts.
    """
    name, sep, arg = spec.partition(":")
    if not sep or not name:
        raise BackendError(f"backend {spec!r}: expected NAME:ARG "
                           f"(known backends: {BACKENDS.known()})")
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r} "
                           f"(known backends: {BACKENDS.known()})") from None
    except PluginError as e:
        raise BackendError(str(e)) from None
    return cls, arg


def backend_options(spec: str) -> frozenset[str]:
    """The option keys of the backend ``spec`` names (empty when it cannot be loaded:
    the error is reported where the backend is opened)."""
    try:
        return backend_class(spec)[0].options
    except BackendError:
        return frozenset()


def check_backend(spec: str) -> type[Backend]:
    """Run the backend's start-up check (``Backend.check``); returns its class.

    Errors name the spec (``backend evdev:/dev/input/event3: ...``); a
    BackendUnavailable stays one, so the caller can tell a machine that lacks
    something from a wrong argument.
    """
    cls, arg = backend_class(spec)
    try:
        cls.check(arg)
    except BackendUnavailable as e:
        raise BackendUnavailable(f"backend {spec}: {e}") from None
    except BackendError as e:
        raise BackendError(f"backend {spec}: {e}") from None
    return cls


def open_backend(spec: str, label: str, index: int = 0) -> Backend:
    """Construct the backend ``spec`` ("NAME:ARG", e.g. ``tcp:127.0.0.1:4000``) for the
    device instance ``label`` with ``index`` among its siblings.

    The backend's resources are opened here (socket bound, file opened) but it does
    not serve until ``start``. Raises BackendError for a malformed spec, an unknown
    name (listing the known ones) or an argument the backend rejects.
    """
    cls, arg = backend_class(spec)
    if index < 0:
        raise BackendError(f"backend {spec!r}: index must be >= 0, got {index}")
    return cls(arg, label, index)
