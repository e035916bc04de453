"""Device kinds by name, as used on command lines and in the server's configuration.

A kind is an entry point of the group ``remote_hw.devices`` naming a
:class:`~remote_hw.devices.base.Device` subclass; remote-hw's own kinds are
registered in its ``pyproject.toml`` exactly as a plugin's are (docs/plugin-api.md).
A kind is imported when it is first asked for, so a server loads the models its
``--device`` options name and no others (see :mod:`remote_hw.entry_points`).
"""

from __future__ import annotations

import inspect
from typing import Any

from remote_hw.entry_points import PluginError, PluginTable

from .base import Device

GROUP = "remote_hw.devices"


def _check(name: str, cls: type[Device]) -> None:
    """What the server relies on of a model class, checked once at load."""
    kind = getattr(cls, "kind", None)
    if kind != name:
        raise PluginError(f"the class says kind = {kind!r}, the entry point {name!r}; "
                          f"they must be the same")
    window = getattr(cls, "window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise PluginError(f"window must be a positive int (bytes decoded), got {window!r}")
    lines = getattr(cls, "irq_lines", ())
    if not isinstance(lines, tuple) or not all(isinstance(n, str) and n.isidentifier()
                                               for n in lines):
        raise PluginError(f"irq_lines must be a tuple of keyword names, got {lines!r}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise PluginError(f"the class is abstract: it does not implement {missing}")


#: kind -> model class. Reading a kind imports it; ``DEVICE_KINDS[k] = cls`` registers
#: a class in this process only (tests).
DEVICE_KINDS: PluginTable[Device] = PluginTable(GROUP, Device, "device kind", _check)


def create_device(kind: str, **kw: Any) -> Device:
    """Instantiate the model registered as ``kind`` with keyword arguments ``kw``
    (``irq``, ``events``, ``dma`` and model options).

    Raises ValueError naming the known kinds when ``kind`` is unknown, a PluginError
    (a ValueError) when its plugin fails to load, and the model's own ValueError for
    unknown options.
    """
    return device_class(kind)(**kw)


def device_class(kind: str) -> type[Device]:
    """The model class registered as ``kind``; ValueError naming the known kinds, or
    PluginError (one line: the kind, its entry point, the exception)."""
    try:
        return DEVICE_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown device kind {kind!r} "
                         f"(known: {DEVICE_KINDS.known()})") from None
