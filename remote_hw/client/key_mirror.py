"""A server's keyboard re-emitted on the client host through uinput (``--uinput``).

A keyboard model on a server (the i8042) publishes every key typed into it, by a real
keyboard of the server (the evdev backend), ``nc`` to its tcp backend or the FUSE
``input`` file, as a device event ``key.CODE.0|1`` to the VMs attached. A VM that
names the device with ``--uinput SERVER/DEVICE`` (``uinput = [...]`` in the agent's
file) gets a virtual keyboard on this host, so programs here see the remote keyboard
as a local one; :class:`KeyMirror` routes each key event, by the link it came on,
the VM id and the device, to that keyboard.

Key events for a device nobody mirrors are dropped quietly: a server publishes them
to every attached VM, and most VMs only want the scancodes their guest reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from remote_hw.input.device_events import parse_key_event_name
from remote_hw.input.uinput import UinputKeyboard

log = logging.getLogger("remote_hw.client")

RouteKey = tuple[str, int, str]   # (link name, vm id, device id)


class VirtualKeyboard(Protocol):
    """What the mirror needs of a keyboard on this host (a UinputKeyboard)."""

    def key(self, code: str | int, pressed: bool) -> None: ...

    def close(self) -> None: ...


def uinput_keyboard(name: str) -> VirtualKeyboard:
    """A virtual keyboard through /dev/uinput; raises UinputUnavailable, one sentence."""
    return UinputKeyboard(name=name)


class KeyMirror:
    """Virtual keyboards of this host, each fed by one device of one VM.

    ``open_keyboard(name)`` creates a keyboard (default: through /dev/uinput); tests
    give one that records. Thread-safety: routes are added before the links deliver
    anything (at VM set-up) and removed after they stop; :meth:`deliver` only reads.
    """

    def __init__(self, open_keyboard: Callable[[str], VirtualKeyboard] = uinput_keyboard
                 ) -> None:
        self._open = open_keyboard
        self._routes: dict[RouteKey, VirtualKeyboard] = {}
        self.delivered = 0      # key events typed on this host
        self.dropped = 0        # key events of devices nobody mirrors

    def add(self, link: str, vm_id: int, device: str, label: str) -> None:
        """Create the keyboard for ``device`` of ``vm_id`` on ``link``; ``label`` names
        it for people (``a/kbd0``). Raises UinputUnavailable where it cannot exist."""
        key = (link, vm_id, device)
        if key in self._routes:
            return
        self._routes[key] = self._open(f"remote-hw {label} (vm {vm_id})")
        log.info("vm %d: keys of %s are typed on this host by a virtual keyboard", vm_id,
                 label)

    def deliver(self, link: str, vm_id: int, device: str, name: str) -> bool:
        """Type a key event on its VM's keyboard; False when ``name`` is no key event
        (the caller handles it), True when it was one (typed or dropped)."""
        parsed = parse_key_event_name(name)
        if parsed is None:
            return False
        keyboard = self._routes.get((link, vm_id, device))
        if keyboard is None:
            self.dropped += 1
            return True
        try:
            keyboard.key(*parsed)
        except OSError as e:   # the virtual device went away: say so, keep the VM
            log.warning("vm %d: cannot type %s from %s on this host: %s", vm_id, name,
                        device, e)
            return True
        self.delivered += 1
        return True

    def remove_vm(self, vm_id: int) -> None:
        """Close the keyboards of ``vm_id`` (held keys are released first)."""
        for key in [k for k in self._routes if k[1] == vm_id]:
            self._routes.pop(key).close()

    def close(self) -> None:
        for key in list(self._routes):
            self._routes.pop(key).close()
