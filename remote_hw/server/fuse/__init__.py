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

One job per module:

* :mod:`.view` — :class:`FuseView`: mount in a thread, unmount, clean up;
* :mod:`.mounts` — the kernel's mount table, stale mounts, unmounting, fusectl;
* :mod:`.signals` — undoing what libfuse does to the process's signals;
* :mod:`.taps` — the guest's output kept for ``tx``, fed by instance output listeners;
* :mod:`.files` — the instance files and the device capabilities they need;
* :mod:`.tree` — path resolution against the controller's live instances;
* :mod:`.fs` — open files, reads, writes, attributes (no FUSE binding);
* :mod:`.ops` — the mfusepy adapter.

docs/fuse.md describes the view for its users.
"""

from __future__ import annotations

from remote_hw.server.fuse.files import parse_time
from remote_hw.server.fuse.mounts import (
    DEFAULT_ROOT,
    FSNAME,
    FuseError,
    default_mountpoint,
    mount_at,
    remove_stale_mount,
)
from remote_hw.server.fuse.taps import TX_KEEP, TxTap
from remote_hw.server.fuse.tree import session_name
from remote_hw.server.fuse.view import FuseView

__all__ = [
    "DEFAULT_ROOT",
    "FSNAME",
    "TX_KEEP",
    "FuseError",
    "FuseView",
    "TxTap",
    "default_mountpoint",
    "mount_at",
    "parse_time",
    "remove_stale_mount",
    "session_name",
]
