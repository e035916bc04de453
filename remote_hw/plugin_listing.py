"""``remote-hw server --list-devices`` / ``--list-backends``: what is registered.

Loads every plugin of the group (the one place that does; a server loads only what
its ``--device`` options name) so that a plugin which would fail later fails here,
with its one-line reason, while the others are still listed.
"""

from __future__ import annotations

import sys
from typing import TextIO, TypeVar

from remote_hw.entry_points import PluginTable

T = TypeVar("T")


def print_table(table: PluginTable[T], heading: str, out: TextIO = sys.stdout,
                err: TextIO = sys.stderr) -> int:
    """Print ``heading``, then one row per name that loads: name, source (``built-in``
    or the distribution's name), entry point. Each failure goes to ``err`` as one line.
    Returns 0 when every plugin loaded, else 1."""
    loaded, errors = table.load_all()
    rows = [(row.name, row.source, row.value) for row, _cls in loaded]
    widths = [max([len(heading), *(len(r[0]) for r in rows)]),
              max([len("SOURCE"), *(len(r[1]) for r in rows)])]
    print(f"{heading:<{widths[0]}}  {'SOURCE':<{widths[1]}}  ENTRY POINT", file=out)
    for name, source, value in rows:
        print(f"{name:<{widths[0]}}  {source:<{widths[1]}}  {value}", file=out)
    for line in errors:
        print(f"remote-hw: {line}", file=err)
    return 1 if errors else 0


def list_plugins(devices: bool, backends: bool) -> int:
    """The two listings the server options ask for, devices first."""
    from remote_hw.backends.registry import BACKENDS
    from remote_hw.devices.registry import DEVICE_KINDS
    status = 0
    if devices:
        status |= print_table(DEVICE_KINDS, "KIND")
    if devices and backends:
        print()
    if backends:
        status |= print_table(BACKENDS, "BACKEND")
    return status
