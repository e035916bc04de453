"""Key translation: names, scancode sets 1 and 2, text, evdev events, uinput events,
hot-plug following - all apart from the kernel; the kernel parts (uinput, evdev) run
where the machine has /dev/uinput and /dev/input and skip with the reason elsewhere."""

from __future__ import annotations

import time

import pytest

from remote_hw.input import device_events, keys, keytext, layout, linux_events
from remote_hw.input import scancodes as sc
from remote_hw.input.evdev_keyboard import (
    EvdevKeyboard,
    InputUnavailable,
    check_dev_input,
    check_keyboard,
)
from remote_hw.input.hotplug import HotplugFollower, InputDeviceInfo, looks_like_keyboard, matches
from remote_hw.input.keys import RecordingSink, UnknownKey, key_code
from remote_hw.input.linux_events import EV_KEY, EV_SYN, SYN_DROPPED, SYN_REPORT, EvdevTranslator
from remote_hw.input.scancodes import ScancodeDecoder, scancodes
from remote_hw.input.uinput import UinputKeyboard, UinputUnavailable, open_uinput

K = keys.KEY_CODES


# ------------------------------------------------------------------ names

def test_key_code_accepts_codes_names_and_aliases():
    assert key_code(30) == key_code("KEY_A") == key_code("a") == key_code("A") == 30
    assert key_code("ctrl") == K["KEY_LEFTCTRL"]
    assert key_code("Enter") == key_code("return") == K["KEY_ENTER"]
    assert key_code("f5") == K["KEY_F5"]
    assert key_code("30") == 30
    assert keys.key_name("esc") == "KEY_ESC"
    for bad in ("KEY_NOPE", "", "ctl", 0, 999, True):
        with pytest.raises(UnknownKey):
            key_code(bad)


def test_key_codes_match_linux_input_event_codes():
    ecodes = pytest.importorskip("evdev.ecodes", reason="python-evdev not installed")
    wrong = {n: (c, ecodes.ecodes.get(n)) for n, c in K.items() if ecodes.ecodes.get(n) != c}
    assert not wrong


# ------------------------------------------------------------------ scancodes

def test_scancodes_of_ordinary_keys():
    assert scancodes("a", True, 1) == b"\x1e"
    assert scancodes("a", False, 1) == b"\x9e"
    assert scancodes("a", True, 2) == b"\x1c"
    assert scancodes("a", False, 2) == b"\xf0\x1c"
    assert scancodes("enter", True, 2) == b"\x5a"
    assert scancodes("F7", True, 2) == b"\x83"       # the one set-2 code above 0x7F
    assert scancodes("esc", False, 1) == b"\x81"


def test_scancodes_of_extended_keys():
    assert scancodes("up", True, 1) == b"\xe0\x48"
    assert scancodes("up", False, 1) == b"\xe0\xc8"
    assert scancodes("up", True, 2) == b"\xe0\x75"
    assert scancodes("up", False, 2) == b"\xe0\xf0\x75"
    assert scancodes("rctrl", False, 2) == b"\xe0\xf0\x14"
    assert scancodes("KEY_KPENTER", True, 1) == b"\xe0\x1c"


def test_print_screen_and_pause_sequences():
    assert scancodes("sysrq", True, 1) == b"\xe0\x2a\xe0\x37"
    assert scancodes("sysrq", False, 1) == b"\xe0\xb7\xe0\xaa"
    assert scancodes("sysrq", True, 2) == b"\xe0\x12\xe0\x7c"
    assert scancodes("sysrq", False, 2) == b"\xe0\xf0\x7c\xe0\xf0\x12"
    assert scancodes("pause", True, 1) == bytes.fromhex("e11d45e19dc5")
    assert scancodes("pause", True, 2) == bytes.fromhex("e11477e1f014f077")
    assert scancodes("pause", False, 1) == scancodes("pause", False, 2) == b""


def test_every_key_has_distinct_codes_in_both_sets():
    for table in (sc.SET1, sc.SET2):
        # Pause has no make/break pair: scancodes() sends its fixed sequence.
        assert set(table) == set(keys.KEY_NAMES) - {K["KEY_PAUSE"]}
        assert len(set(table.values())) == len(table)


def test_set2_agrees_with_the_8042_translation_to_set1():
    """A PC's 8042 turns set 2 into set 1; the two tables must agree through it."""
    i8042 = pytest.importorskip("remote_hw.devices.i8042")
    for code in keys.KEY_NAMES:
        for pressed in (True, False):
            s2 = scancodes(code, pressed, 2)
            assert i8042.translate(s2) == scancodes(code, pressed, 1), keys.KEY_NAMES[code]


@pytest.mark.parametrize("codeset", [1, 2])
def test_decoder_round_trips_every_key(codeset):
    dec = ScancodeDecoder(codeset)
    for code in keys.KEY_NAMES:
        if code == K["KEY_PAUSE"]:
            assert dec.feed(scancodes(code, True, codeset)) == [(code, True), (code, False)]
            continue
        for pressed in (True, False):
            assert dec.feed(scancodes(code, pressed, codeset)) == [(code, pressed)]
    assert dec.unknown == 0


def test_decoder_keeps_prefixes_between_feeds_and_skips_garbage():
    dec = ScancodeDecoder(2)
    assert dec.feed(b"\xe0") == []
    assert dec.feed(b"\xf0") == []
    assert dec.feed(b"\x75") == [(K["KEY_UP"], False)]
    assert dec.feed(b"\x00\x1c") == [(K["KEY_A"], True)]
    assert dec.unknown == 1
    with pytest.raises(ValueError):
        ScancodeDecoder(3)
    with pytest.raises(ValueError):
        scancodes("a", True, 3)


# ------------------------------------------------------------------ text

def test_text_events_use_shift_for_capitals_and_symbols():
    ev = layout.text_events("Hi!")
    S = K["KEY_LEFTSHIFT"]
    assert ev == [(S, True), (K["KEY_H"], True), (K["KEY_H"], False), (S, False),
                  (K["KEY_I"], True), (K["KEY_I"], False),
                  (S, True), (K["KEY_1"], True), (K["KEY_1"], False), (S, False)]


def test_text_events_control_characters():
    enter = [(K["KEY_ENTER"], True), (K["KEY_ENTER"], False)]
    assert layout.text_events("\n") == enter
    assert layout.text_events("\r\n") == enter          # one Enter, not two
    assert layout.text_events("\t") == [(K["KEY_TAB"], True), (K["KEY_TAB"], False)]
    C = K["KEY_LEFTCTRL"]
    assert layout.text_events("\x03") == [(C, True), (K["KEY_C"], True), (K["KEY_C"], False),
                                        (C, False)]
    with pytest.raises(UnknownKey, match="US keyboard"):
        layout.text_events("é")


def test_key_commands():
    C, A, D = K["KEY_LEFTCTRL"], K["KEY_LEFTALT"], K["KEY_DELETE"]
    assert keytext.parse_key_commands("ctrl+alt+delete") == [
        (C, True), (A, True), (D, True), (D, False), (A, False), (C, False)]
    S = K["KEY_LEFTSHIFT"]
    assert keytext.parse_key_commands("+shift a -shift") == [
        (S, True), (K["KEY_A"], True), (K["KEY_A"], False), (S, False)]
    assert keytext.parse_key_commands("?") == [(S, True), (K["KEY_SLASH"], True),
                                           (K["KEY_SLASH"], False), (S, False)]
    assert keytext.parse_key_commands("-") == [(K["KEY_MINUS"], True), (K["KEY_MINUS"], False)]
    assert keytext.parse_key_commands("  ") == []
    with pytest.raises(UnknownKey):
        keytext.parse_key_commands("ctrl+nope")


# ------------------------------------------------------------------ evdev -> keys

def test_evdev_translator_press_repeat_release():
    sink = RecordingSink()
    tr = EvdevTranslator(sink)
    A = K["KEY_A"]
    tr.events([(EV_KEY, A, 1), (EV_SYN, SYN_REPORT, 0), (EV_KEY, A, 2), (EV_KEY, A, 2),
               (EV_KEY, A, 0), (EV_SYN, SYN_REPORT, 0)])
    assert sink.events == [(A, True), (A, True), (A, True), (A, False)]
    assert tr.held == []


def test_evdev_translator_ignores_buttons_other_types_and_stray_releases():
    sink = RecordingSink()
    tr = EvdevTranslator(sink)
    tr.events([(EV_KEY, 0x110, 1),         # BTN_LEFT
               (0x02, 0, 5),                # EV_REL
               (linux_events.EV_MSC, 4, 0x70004),   # MSC_SCAN
               (EV_KEY, K["KEY_B"], 0),     # release of a key never pressed
               (EV_KEY, K["KEY_B"], 2),     # repeat of a key never pressed
               (EV_KEY, 0x2C0, 1)])         # a key not in our table
    assert sink.events == []
    assert tr.ignored == 1


def test_evdev_translator_releases_held_keys_on_unplug_and_dropped_events():
    sink = RecordingSink()
    tr = EvdevTranslator(sink)
    S, A = K["KEY_LEFTSHIFT"], K["KEY_A"]
    tr.events([(EV_KEY, S, 1), (EV_KEY, A, 1)])
    tr.release_all()
    assert sink.events[-2:] == [(A, False), (S, False)]
    tr.events([(EV_KEY, A, 1), (EV_SYN, SYN_DROPPED, 0)])
    assert sink.events[-1] == (A, False) and tr.held == []


def test_input_events_for_uinput():
    assert linux_events.input_events("a", True) == [(EV_KEY, 30, 1), (EV_SYN, SYN_REPORT, 0)]
    assert linux_events.input_events(30, False) == [(EV_KEY, 30, 0), (EV_SYN, SYN_REPORT, 0)]


def test_key_event_names_round_trip():
    assert device_events.key_event_name("a", True) == "key.30.1"
    assert device_events.parse_key_event_name("key.30.0") == (30, False)
    for other in ("reset-request", "key.30.2", "key.999.1", "key.a.1", "key.30.1 "):
        assert device_events.parse_key_event_name(other) is None


def test_every_key_event_name_is_a_valid_protocol_event():
    """The names travel in EVENT messages, whose name field is an identifier: encode
    and decode one for every key, pressed and released (after the 8-byte header)."""
    from remote_hw.protocol import codec
    from remote_hw.protocol.messages import Event
    for code in keys.KEY_NAMES:
        for pressed in (True, False):
            name = device_events.key_event_name(code, pressed)
            frame = codec.encode(Event(vm_id=1, device_id="kbd0", name=name))
            assert codec.decode_payload(Event.MSG_TYPE, frame[8:]).name \
                == name


# ------------------------------------------------------------------ uinput (client)

def test_uinput_keyboard_writes_key_and_syn_events():
    written = []
    kb = UinputKeyboard(writer=lambda t, c, v: written.append((t, c, v)))
    kb.key("shift", True)
    kb.key("a", True)
    kb.key("a", False)
    kb.key("a", False)                  # a second release writes nothing
    assert kb.handle_event("key.30.1")
    assert not kb.handle_event("reset-request")
    kb.close()                          # releases KEY_A and shift
    S, A = K["KEY_LEFTSHIFT"], K["KEY_A"]
    keys_only = [(c, v) for t, c, v in written if t == EV_KEY]
    assert keys_only == [(S, 1), (A, 1), (A, 0), (A, 1), (A, 0), (S, 0)]
    assert written.count((EV_SYN, SYN_REPORT, 0)) == len(keys_only)


def test_uinput_missing_device_fails_with_one_sentence(tmp_path):
    with pytest.raises(UinputUnavailable) as e:
        UinputKeyboard(devnode=str(tmp_path / "uinput"))
    msg = str(e.value)
    assert "does not exist" in msg and "modprobe uinput" in msg and "\n" not in msg


def test_dev_input_missing_fails_with_one_sentence(tmp_path):
    with pytest.raises(InputUnavailable) as e:
        check_dev_input(str(tmp_path / "input"))
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)
    kb = EvdevKeyboard(RecordingSink(), dev_input=str(tmp_path / "input"))
    with pytest.raises(InputUnavailable):
        kb.start()


def test_check_keyboard_says_what_is_missing_in_one_sentence(tmp_path):
    """What a server runs at start for backend=evdev:MATCH (no kernel needed)."""
    dev_input = tmp_path / "input"
    with pytest.raises(InputUnavailable) as e:
        check_keyboard("/dev/input/event3", str(dev_input))
    assert str(e.value).startswith("/dev/input/event3 does not exist (this kernel has no "
                                   "input devices")
    with pytest.raises(InputUnavailable, match="cannot read a real keyboard"):
        check_keyboard("any", str(dev_input))
    dev_input.mkdir()
    node = dev_input / "event3"
    with pytest.raises(InputUnavailable, match="no such keyboard is plugged in"):
        check_keyboard(str(node), str(dev_input))
    node.write_text("")
    check_keyboard(str(node), str(dev_input))     # python-evdev and pyudev are test deps
    check_keyboard("Logitech", str(dev_input))    # a name waits for the keyboard
    assert "\n" not in str(e.value)


def test_evdev_backend_is_checked_when_the_server_starts(monkeypatch, tmp_path):
    from remote_hw.backends.base import BackendError, BackendUnavailable
    from remote_hw.backends.evdev import EvdevBackend
    from remote_hw.config import DeviceSpec
    from remote_hw.server.controller import Controller
    monkeypatch.setattr(EvdevBackend, "dev_input", str(tmp_path / "input"))
    with pytest.raises(BackendUnavailable) as e:
        Controller("a", [DeviceSpec("kbd0", "i8042", backend="evdev:/dev/input/event3")])
    assert str(e.value).startswith("backend evdev:/dev/input/event3: /dev/input/event3 "
                                   "does not exist (this kernel has no input devices")
    with pytest.raises(ValueError, match="takes no key events") as e2:
        Controller("a", [DeviceSpec("uart0", "uart16550", backend="evdev:any")])
    assert not isinstance(e2.value, BackendError)   # a usage error, named before the kernel
    with pytest.raises(BackendError, match="make the device shared"):
        EvdevBackend("any", "kbd0", 1)


def test_missing_python_evdev_is_reported(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_evdev(name, *a, **kw):
        if name == "evdev" or name.startswith("evdev."):
            raise ImportError("no evdev")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_evdev)
    dev = tmp_path / "uinput"
    dev.write_text("")
    with pytest.raises(UinputUnavailable, match="pip install evdev"):
        open_uinput("x", str(dev))
    from remote_hw.input.evdev_keyboard import require_evdev
    with pytest.raises(InputUnavailable, match="pip install evdev"):
        require_evdev()


# ------------------------------------------------------------------ hot-plug logic

def _kbd(node, name="Kbd", keyboard=True, **props):
    return InputDeviceInfo(node, name, keyboard, dict(props), [])


def test_matches_by_path_name_and_property(tmp_path):
    info = InputDeviceInfo("/dev/input/event3", "Logitech USB Keyboard", True,
                           {"ID_SERIAL": "Logitech_USB"}, ["/dev/input/by-id/usb-kbd"])
    assert matches(info, "") and matches(info, "any")
    assert matches(info, "/dev/input/event3") and matches(info, "/dev/input/by-id/usb-kbd")
    assert matches(info, "logitech") and not matches(info, "dell")
    assert matches(info, "ID_SERIAL=Logitech_USB") and not matches(info, "ID_SERIAL=x")
    mouse = InputDeviceInfo("/dev/input/event4", "Mouse", False)
    assert not matches(mouse, "") and matches(mouse, "mouse")


def test_follower_takes_the_first_match_and_switches_on_unplug():
    opened, closed = [], []
    f = HotplugFollower("", lambda i: opened.append(i.devnode) or i.devnode,
                        lambda h, gone: closed.append((h, gone)))
    assert not f.add(_kbd("/dev/input/event1", keyboard=False))     # a mouse
    assert f.add(_kbd("/dev/input/event2"))
    assert not f.add(_kbd("/dev/input/event5"))                      # one at a time
    assert f.current.devnode == "/dev/input/event2"
    assert not f.remove("/dev/input/event5")
    f.add(_kbd("/dev/input/event5"))
    assert f.remove("/dev/input/event2")                             # unplugged
    assert closed == [("/dev/input/event2", True)]
    assert f.current.devnode == "/dev/input/event5"                  # the other one
    assert f.remove("/dev/input/event5")
    assert f.current is None
    assert f.add(_kbd("/dev/input/event7"))                          # plugged back in
    f.close()
    assert closed[-1] == ("/dev/input/event7", False)
    assert opened == ["/dev/input/event2", "/dev/input/event5", "/dev/input/event7"]


def test_follower_skips_devices_that_fail_to_open_or_are_not_keyboards():
    def open_fn(info):
        if info.devnode.endswith("1"):
            raise PermissionError(13, "Permission denied")
        if info.devnode.endswith("2"):
            return None
        return info.devnode
    f = HotplugFollower("", open_fn, lambda h, gone: None)
    assert not f.add(_kbd("/dev/input/event1"))
    assert not f.add(_kbd("/dev/input/event2", keyboard=None))
    assert f.add(_kbd("/dev/input/event3"))


def test_unplug_releases_keys_held_in_the_guest():
    """The whole chain without a kernel: translator + follower, device unplugged
    while a key is down -> the guest sees the release."""
    sink = RecordingSink()
    tr = EvdevTranslator(sink)
    f = HotplugFollower("", lambda i: i, lambda h, gone: tr.release_all())
    f.add(_kbd("/dev/input/event2"))
    tr.event(EV_KEY, K["KEY_LEFTCTRL"], 1)
    f.remove("/dev/input/event2")
    assert sink.events == [(K["KEY_LEFTCTRL"], True), (K["KEY_LEFTCTRL"], False)]


def test_looks_like_keyboard():
    assert looks_like_keyboard(range(1, 120))
    assert not looks_like_keyboard([0x110, 0x111, 0x112])


def test_instance_is_the_key_sink_of_its_model_under_its_lock():
    from remote_hw.config import DeviceSpec
    from remote_hw.server.controller import Instance

    class Model:
        def __init__(self):
            self.got = []

        def key(self, code, pressed):
            assert inst.lock._is_owned()
            self.got.append((code, pressed))

    inst = Instance(DeviceSpec("kbd0", "i8042"), 0)
    inst.model = Model()
    assert isinstance(inst, keys.KeySink)
    keys.send(inst, layout.text_events("a"))
    assert inst.model.got == [(30, True), (30, False)]


def test_server_keyboard_reaches_the_guest_and_a_client_host():
    """Server: evdev events -> translator -> the instance -> the i8042 model, which
    queues scancodes for the guest and publishes each key to the attached sessions.
    Client: those events -> the key mirror -> uinput events (no kernel on either
    side here)."""
    from remote_hw.client.key_mirror import KeyMirror
    from remote_hw.config import DeviceSpec
    from remote_hw.server.controller import Controller

    class Session:
        def __init__(self):
            self.events = []

        def interrupt(self, vm_id, device, line, level):
            pass

        def event(self, vm_id, device, name):
            self.events.append((vm_id, device, name))

    ctl = Controller("a", [DeviceSpec("kbd0", "i8042", shared=True)])
    try:
        s1, s2 = Session(), Session()
        ctl.attach(1, 1, "kbd0", s1)
        ctl.attach(2, 5, "kbd0", s2)
        (inst,) = ctl.instances()
        tr = EvdevTranslator(inst)
        tr.events([(EV_KEY, K["KEY_Q"], 1), (EV_SYN, SYN_REPORT, 0), (EV_KEY, K["KEY_Q"], 0)])
        assert s1.events == [(1, "kbd0", "key.16.1"), (1, "kbd0", "key.16.0")]
        assert s2.events == [(5, "kbd0", "key.16.1"), (5, "kbd0", "key.16.0")]
        got = []                                         # and the guest reads them
        while inst.model.status()["obf"]:
            got.append(inst.model.read(0, 1))
        assert bytes(got) == scancodes("q", True) + scancodes("q", False)
    finally:
        ctl.close()
    written = []
    opened = []

    def open_keyboard(name):
        opened.append(name)
        return UinputKeyboard(writer=lambda t, c, v: written.append((t, c, v)))
    mirror = KeyMirror(open_keyboard)
    mirror.add("a", 1, "kbd0", "a/kbd0")
    for vm, dev, name in s1.events + s2.events:
        assert mirror.deliver("a", vm, dev, name)      # key events: handled (vm 5: dropped)
    assert not mirror.deliver("a", 1, "kbd0", "reset-request")
    assert opened == ["remote-hw a/kbd0 (vm 1)"]
    assert written == [(EV_KEY, 16, 1), (EV_SYN, SYN_REPORT, 0),
                       (EV_KEY, 16, 0), (EV_SYN, SYN_REPORT, 0)]
    assert (mirror.delivered, mirror.dropped) == (2, 2)
    mirror.deliver("a", 1, "kbd0", "key.30.1")        # held when the agent stops
    mirror.close()
    assert written[-2:] == [(EV_KEY, 30, 0), (EV_SYN, SYN_REPORT, 0)]


# ------------------------------------------------------------------ the kernel

@pytest.mark.uinput
def test_uinput_keyboard_is_seen_by_evdev():
    evdev = pytest.importorskip("evdev", reason="python-evdev not installed")
    kb = UinputKeyboard(name="remote-hw test keyboard")
    try:
        dev = evdev.InputDevice(kb.device_path)
        got = []
        kb.key("a", True)
        kb.key("a", False)
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            ev = dev.read_one()
            if ev is None:
                time.sleep(0.01)
            elif ev.type == EV_KEY:
                got.append((ev.code, ev.value))
        assert got == [(30, 1), (30, 0)]
    finally:
        kb.close()


@pytest.mark.uinput
def test_evdev_keyboard_follows_a_hotplugged_keyboard():
    pytest.importorskip("evdev", reason="python-evdev not installed")
    pytest.importorskip("pyudev", reason="pyudev not installed")
    sink = RecordingSink()
    reader = EvdevKeyboard(sink, "remote-hw hotplug test").start()
    try:
        kb = UinputKeyboard(name="remote-hw hotplug test")
        deadline = time.monotonic() + 10
        while reader.follower.current is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reader.follower.current is not None, "the new keyboard was not noticed"
        kb.key("b", True)
        deadline = time.monotonic() + 10
        while (K["KEY_B"], True) not in sink.events and time.monotonic() < deadline:
            time.sleep(0.02)
        kb._ui.close()           # unplug with B held: the guest must see B released
        kb._ui = None
        deadline = time.monotonic() + 10
        while (K["KEY_B"], False) not in sink.events and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sink.events == [(K["KEY_B"], True), (K["KEY_B"], False)]
    finally:
        reader.close()
