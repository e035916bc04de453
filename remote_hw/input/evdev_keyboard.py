"""A server's real keyboard, read through evdev and followed across hot-plug.

:class:`EvdevKeyboard` reads key events from a keyboard plugged into the server
(``/dev/input/eventN``, through python-evdev), translates them with
:class:`~remote_hw.input.linux_events.EvdevTranslator` and hands them to a
:class:`~remote_hw.input.keys.KeySink` (on a server: a device instance, whose
keyboard model types them into the guest; see ``remote_hw/backends/evdev.py``). The
keyboard is found with pyudev and followed across hot-plug with pyudev's monitor:
unplugging it releases every held key in the guest, plugging it (or another matching
one, see :mod:`.hotplug` for what ``match`` may be) back in resumes.

Where /dev/input is missing or python-evdev / pyudev is not installed, :meth:`start`
and :func:`check_keyboard` raise :class:`InputUnavailable` with one sentence saying
so; a server runs :func:`check_keyboard` when it starts, so a keyboard that cannot
be read stops it there rather than at a VM's first attach.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Any

from .hotplug import HotplugFollower, InputDeviceInfo, info_from_udev, looks_like_keyboard
from .keys import KeySink
from .linux_events import EvdevTranslator

log = logging.getLogger("remote_hw.input")

DEV_INPUT = "/dev/input"


class InputUnavailable(RuntimeError):
    """Real input devices cannot be used here (the message says why, in a sentence)."""


def require_evdev() -> Any:
    """python-evdev, imported only when a keyboard is read: it is an optional
    dependency (``pip install remote-hw[input]``) that needs kernel headers to build."""
    try:
        import evdev
    except ImportError:
        raise InputUnavailable("reading a real keyboard needs python-evdev "
                               "(pip install evdev)") from None
    return evdev


def require_pyudev() -> Any:
    """pyudev, which finds keyboards and reports hot-plug (imported when needed)."""
    try:
        import pyudev
    except ImportError:
        raise InputUnavailable("finding keyboards needs pyudev (pip install pyudev)") from None
    return pyudev


def check_dev_input(path: str = DEV_INPUT) -> None:
    """Fail in one sentence where the kernel has no input devices at all (containers,
    VMs without a keyboard, kernels without evdev)."""
    if not os.path.isdir(path):
        raise InputUnavailable(f"cannot read a real keyboard: {path} does not exist on "
                               "this machine (no input devices, or the evdev module is "
                               "not loaded: modprobe evdev)")


def check_keyboard(match: str, dev_input: str = DEV_INPUT) -> None:
    """Fail now, in one sentence, if a keyboard named by ``match`` cannot be read here.

    A path must exist when this runs (a ``/dev/input/by-id`` link of a keyboard that is
    unplugged later is still followed); a name or ``KEY=VALUE`` match only needs the
    input subsystem, since the keyboard may be plugged in later.
    """
    m = match.strip()
    if m.startswith("/"):
        if not os.path.isdir(dev_input):
            raise InputUnavailable(f"{m} does not exist (this kernel has no input devices: "
                                   f"{dev_input} is missing; load the evdev module with "
                                   "modprobe evdev)")
        if not os.path.exists(m):
            raise InputUnavailable(f"{m} does not exist (no such keyboard is plugged in; "
                                   f"ls {dev_input}/by-id lists the ones that are)")
        if not os.access(m, os.R_OK):
            raise InputUnavailable(f"no permission to read {m} (run the server as root or "
                                   "in the input group)")
    else:
        check_dev_input(dev_input)
    require_evdev()
    require_pyudev()


class EvdevKeyboard:
    """Follow a real keyboard of this machine and feed its keys to ``sink``.

    ``grab`` takes the keyboard exclusively (EVIOCGRAB) so its keys go only to the
    guest, not to the server's own console as well.
    """

    def __init__(self, sink: KeySink, match: str = "", *, grab: bool = True,
                 dev_input: str = DEV_INPUT) -> None:
        self.translator = EvdevTranslator(sink)
        self.match = match
        self.grab = grab
        self.dev_input = dev_input
        self.follower = HotplugFollower(match, self._open, self._close)
        self._evdev: Any = None
        self._monitor: Any = None
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._closed = False
        self._lock = threading.Lock()

    def describe(self) -> str:
        cur = self.follower.current
        where = f"{cur.devnode} ({cur.name})" if cur else "waiting for a keyboard"
        return f"evdev:{self.match or 'any'} - {where}"

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> EvdevKeyboard:
        check_dev_input(self.dev_input)
        self._evdev = require_evdev()
        pyudev = require_pyudev()
        context = pyudev.Context()
        # udevd's events carry the ID_INPUT_* properties; without udevd, follow the
        # kernel's own uevents instead.
        source = "udev" if os.path.exists("/run/udev/control") else "kernel"
        self._monitor = pyudev.Monitor.from_netlink(context, source=source)
        self._monitor.filter_by("input")
        self._monitor.start()
        for device in context.list_devices(subsystem="input"):
            info = info_from_udev(device)
            if info is not None:
                self.follower.add(info)
        if self.follower.current is None:
            log.warning("input: no keyboard matching %r yet; waiting for one to be "
                        "plugged in", self.match or "any")
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="evdev-keyboard", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.follower.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- devices --------------------------------------------------------------------

    def _open(self, info: InputDeviceInfo) -> Any:
        dev = self._evdev.InputDevice(info.devnode)
        caps = dev.capabilities().get(self._evdev.ecodes.EV_KEY, [])
        if info.keyboard is None and not looks_like_keyboard(caps):
            dev.close()
            return None
        if self.grab:
            try:
                dev.grab()
            except OSError as e:
                log.warning("input: cannot grab %s (%s); its keys also reach this "
                            "machine", info.devnode, e.strerror)
        log.info("input: reading keyboard %s (%s)", info.devnode, dev.name)
        return dev

    def _close(self, dev: Any, gone: bool) -> None:
        self.translator.release_all()
        if gone:
            log.warning("input: keyboard %s went away; held keys released", dev.path)
        try:
            if self.grab and not gone:
                dev.ungrab()
        except OSError:
            pass
        try:
            dev.close()
        except OSError:
            pass

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("input: the keyboard reader failed")

    def _loop(self) -> None:
        monitor = self._monitor
        while not self._closed:
            dev = self.follower.handle
            rlist: list[Any] = [self._wake_r, monitor.fileno()]
            if dev is not None:
                rlist.append(dev.fd)
            readable, _, _ = select.select(rlist, [], [])
            if self._closed:
                return
            if monitor.fileno() in readable:
                while True:
                    device = monitor.poll(timeout=0)
                    if device is None:
                        break
                    self._hotplug(device)
            if dev is not None and dev.fd in readable and dev is self.follower.handle:
                try:
                    for ev in dev.read():
                        self.translator.event(ev.type, ev.code, ev.value)
                except BlockingIOError:
                    pass
                except OSError:    # ENODEV: unplugged before the monitor said so
                    if self.follower.current is not None:
                        self.follower.remove(self.follower.current.devnode)

    def _hotplug(self, device: Any) -> None:
        action = device.action
        node = device.device_node
        if action == "remove" and node:
            self.follower.remove(node)
        elif action == "add":
            info = info_from_udev(device)
            if info is not None:
                self.follower.add(info)
