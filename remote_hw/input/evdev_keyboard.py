"""A server's real keyboard as the far side of a keyboard model (evdev + pyudev).

:class:`EvdevKeyboard` reads key events from a keyboard plugged into the server
(``/dev/input/eventN``, through python-evdev), translates them with
:class:`remote_hw.backends.keys.EvdevTranslator` and hands them to a
:class:`~remote_hw.backends.keys.KeySink` - the keyboard model of a device instance
(see :class:`InstanceKeySink`). The keyboard is found with pyudev and followed across
hot-plug with pyudev's monitor: unplugging it releases every held key in the guest,
plugging it (or another matching one) back in resumes.

Which keyboard: ``match`` is

* empty or ``any``: the first keyboard found;
* a path (``/dev/input/event3``, ``/dev/input/by-id/usb-...-event-kbd``);
* ``KEY=VALUE``: a udev property (``ID_SERIAL=Logitech_USB_Keyboard``,
  ``ID_PATH=pci-0000:00:14.0-usb-0:2:1.0``);
* any other text: part of the device's name (case-insensitive).

The choice logic (:class:`HotplugFollower`) is pure and tested apart from the kernel.
Where /dev/input is missing or python-evdev / pyudev is not installed, :meth:`start`
raises :class:`InputUnavailable` with one sentence saying so.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .keys import KEY_CODES, EvdevTranslator, KeySink, key_code, key_event_name

log = logging.getLogger(__name__)

DEV_INPUT = "/dev/input"


class InputUnavailable(RuntimeError):
    """Real input devices cannot be used here (the message says why, in a sentence)."""


def require_evdev() -> Any:
    try:
        import evdev
    except ImportError:
        raise InputUnavailable("reading a real keyboard needs python-evdev "
                               "(pip install evdev)") from None
    return evdev


def require_pyudev() -> Any:
    try:
        import pyudev
    except ImportError:
        raise InputUnavailable("finding keyboards needs pyudev (pip install pyudev)") from None
    return pyudev


def check_dev_input(path: str = DEV_INPUT) -> None:
    if not os.path.isdir(path):
        raise InputUnavailable(f"cannot read a real keyboard: {path} does not exist on "
                               "this machine (no input devices, or the evdev module is "
                               "not loaded: modprobe evdev)")


# The keys that make an event device a keyboard (what udev's input_id checks too).
_KEYBOARD_PROBE = tuple(KEY_CODES[n] for n in ("KEY_A", "KEY_Z", "KEY_ENTER", "KEY_SPACE"))


def looks_like_keyboard(key_caps: Iterable[int]) -> bool:
    """Whether an EV_KEY capability list is a keyboard's (letters, Enter, Space)."""
    caps = set(key_caps)
    return all(k in caps for k in _KEYBOARD_PROBE)


@dataclass
class InputDeviceInfo:
    """What the follower needs to know about one event device."""

    devnode: str
    name: str = ""
    keyboard: bool | None = None          # None: unknown until opened
    properties: dict[str, str] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)


def matches(info: InputDeviceInfo, match: str) -> bool:
    """Whether ``info`` is the device ``match`` names (see the module docstring)."""
    m = match.strip()
    if m in ("", "any"):
        return info.keyboard is not False
    if m.startswith("/"):
        if m == info.devnode or m in info.links:
            return True
        try:
            return os.path.realpath(m) == os.path.realpath(info.devnode)
        except OSError:
            return False
    if "=" in m:
        key, _, value = m.partition("=")
        return info.properties.get(key.strip()) == value.strip()
    return m.lower() in info.name.lower()


class HotplugFollower:
    """Which device to read, as devices come and go.

    ``open_fn(info)`` opens a device and returns a handle, or raises OSError (then the
    device is skipped) or returns None (not a keyboard after all); ``close_fn(handle,
    gone)`` closes one (``gone`` when it was unplugged). At most one device is
    followed; when it goes away, the next matching device present is taken.
    """

    def __init__(self, match: str, open_fn: Callable[[InputDeviceInfo], Any],
                 close_fn: Callable[[Any, bool], None]) -> None:
        self.match = match
        self.open_fn = open_fn
        self.close_fn = close_fn
        self.present: dict[str, InputDeviceInfo] = {}
        self.current: InputDeviceInfo | None = None
        self.handle: Any = None
        self.switches = 0

    def add(self, info: InputDeviceInfo) -> bool:
        """A device appeared (or was found at start); True if we now read it."""
        self.present[info.devnode] = info
        if self.current is None and matches(info, self.match):
            return self._take(info)
        return False

    def remove(self, devnode: str) -> bool:
        """A device disappeared; True if it was the one we read."""
        self.present.pop(devnode, None)
        if self.current is None or self.current.devnode != devnode:
            return False
        self._drop(gone=True)
        for info in sorted(self.present.values(), key=lambda i: i.devnode):
            if matches(info, self.match) and self._take(info):
                break
        return True

    def close(self) -> None:
        if self.current is not None:
            self._drop(gone=False)

    def _take(self, info: InputDeviceInfo) -> bool:
        try:
            handle = self.open_fn(info)
        except OSError as e:
            log.warning("input: cannot open %s (%s): %s", info.devnode, info.name,
                        e.strerror or e)
            return False
        if handle is None:
            return False
        self.current, self.handle = info, handle
        self.switches += 1
        return True

    def _drop(self, gone: bool) -> None:
        handle, self.handle, self.current = self.handle, None, None
        self.close_fn(handle, gone)


def info_from_udev(device: Any) -> InputDeviceInfo | None:
    """An InputDeviceInfo from a pyudev Device of the input subsystem (event nodes
    only). Without udevd the ID_INPUT_* properties are missing: ``keyboard`` is then
    left unknown and decided from the capabilities when the device is opened."""
    node = device.device_node
    if not node or not os.path.basename(node).startswith("event"):
        return None
    props = {k: device.properties.get(k) for k in device.properties}
    name = ""
    parent = device.parent
    if parent is not None:
        raw = parent.attributes.get("name")
        if raw:
            name = raw.decode(errors="replace").strip() if isinstance(raw, bytes) else str(raw)
    keyboard = None
    if "ID_INPUT" in props:
        keyboard = props.get("ID_INPUT_KEYBOARD") == "1"
    links = list(device.device_links) if hasattr(device, "device_links") else []
    return InputDeviceInfo(node, name, keyboard, props, links)


class InstanceKeySink:
    """A KeySink that delivers to a server device instance's keyboard model (its
    ``key_event(code, pressed)``) with the instance lock held."""

    def __init__(self, instance: Any) -> None:
        self.instance = instance
        if not hasattr(instance.model, "key_event"):
            raise ValueError(f"device {instance.spec.id} ({instance.spec.kind}) takes no "
                             "key events")

    def key(self, code: str | int, pressed: bool) -> None:
        with self.instance.lock:
            self.instance.model.key_event(key_code(code), pressed)


class InstanceEventSink:
    """A KeySink that forwards key events to every client VM attached to a device
    instance, as device events named ``key:CODE:0|1`` (keys.key_event_name). A client
    agent types them on its own host through uinput
    (remote_hw.client.uinput.UinputKeyboard.handle_event): a keyboard on the server
    becomes a local keyboard of the client host."""

    def __init__(self, instance: Any) -> None:
        self.instance = instance

    def key(self, code: str | int, pressed: bool) -> None:
        self.instance._event(key_event_name(code, pressed))


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

    def start(self) -> "EvdevKeyboard":
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
