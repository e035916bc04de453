"""The i8042 model: controller commands, keyboard commands, translation, the output
buffer and its interrupts, the reset request, and the key-event stream syntax."""

from __future__ import annotations

import pytest

from remote_hw.devices.base import EVENT_RESET_REQUEST, NullIrq
from remote_hw.devices.i8042 import I8042, XLAT_TABLE, translate
from remote_hw.devices.registry import DEVICE_KINDS, create_device
from remote_hw.input import keys, layout, scancodes
from remote_hw.input.keytext import KeyText, key_events_for_name

from helpers import RecordingIrq

DATA, CMD = 0, 4


@pytest.fixture
def irq() -> RecordingIrq:
    return RecordingIrq()


@pytest.fixture
def aux_irq() -> RecordingIrq:
    return RecordingIrq()


@pytest.fixture
def events() -> list[str]:
    return []


@pytest.fixture
def kb(irq, aux_irq, events) -> I8042:
    return I8042(irq=irq, aux_irq=aux_irq, events=events.append)


def status(k: I8042) -> int:
    return k.read(CMD, 1)


def data(k: I8042) -> int:
    return k.read(DATA, 1)


def command(k: I8042, c: int, arg: int | None = None) -> None:
    k.write(CMD, 1, c)
    if arg is not None:
        k.write(DATA, 1, arg)


def send(k: I8042, b: int) -> None:
    k.write(DATA, 1, b)


def drain(k: I8042) -> list[int]:
    out = []
    while status(k) & 0x01:
        out.append(data(k))
    return out


def setup(k: I8042, cb: int) -> None:
    command(k, 0x60, cb)
    drain(k)


# -- identity and power-on -------------------------------------------------------------

def test_registry_and_window() -> None:
    assert DEVICE_KINDS["i8042"] is I8042
    assert I8042.window == 5
    assert isinstance(create_device("i8042"), I8042)
    assert isinstance(create_device("i8042", aux="none", backlog="128"), I8042)


@pytest.mark.parametrize("opts", [{"aux": "joystick"}, {"backlog": "lots"},
                                  {"backlog": "8"}, {"colour": "red"}])
def test_bad_options(opts) -> None:
    with pytest.raises(ValueError):
        create_device("i8042", **opts)


def test_power_on_state(kb) -> None:
    assert status(kb) == 0x18            # keyboard unlocked, last write "command"
    command(kb, 0x20)
    assert status(kb) == 0x19
    assert data(kb) == 0x03              # both interrupts on, no translation
    assert status(kb) == 0x18
    assert kb.status()["scancode_set"] == 2 and kb.status()["scanning"]


def test_other_offsets_are_not_the_controller(kb) -> None:
    for off in (1, 2, 3):
        assert kb.read(off, 1) == 0xFF
        kb.write(off, 1, 0xFE)           # 0x64 is offset 4, not these
    assert kb.read(0, 2) == 0xFF00       # data (empty: last byte 0), then 0x61
    assert kb.read(3, 2) == 0x18FF       # 0x63, then the status register


# -- controller commands ------------------------------------------------------------------

def test_self_test_and_interface_tests(kb, irq) -> None:
    command(kb, 0xAD)                    # as firmware does: keyboard port off first
    command(kb, 0xAA)
    assert status(kb) == 0x1D            # OBF, system flag now set
    assert data(kb) == 0x55
    command(kb, 0xAB)
    assert drain(kb) == [0x00]
    command(kb, 0xA9)
    assert drain(kb) == [0x00]
    # The datasheet's IRQ 1 follows OBF and command byte bit 0 only; the disabled
    # keyboard port (bit 4) does not hold it back (QEMU differs, docs/devices.md).
    assert irq.calls == [True, False, True, False, True, False]


def test_command_byte_and_ram(kb) -> None:
    command(kb, 0x60, 0x45)
    command(kb, 0x20)
    assert data(kb) == 0x45
    assert status(kb) & 0x04             # system flag is command byte bit 2
    command(kb, 0x60, 0x41)
    assert not status(kb) & 0x04
    command(kb, 0x7F, 0x99)              # other RAM bytes are plain storage
    command(kb, 0x3F)
    assert data(kb) == 0x99


def test_status_bit_3_is_the_port_of_the_last_write(kb) -> None:
    command(kb, 0x60)
    assert status(kb) & 0x08
    send(kb, 0x00)
    assert not status(kb) & 0x08


@pytest.mark.parametrize("c, bit, value", [(0xAD, 0x10, True), (0xAE, 0x10, False),
                                           (0xA7, 0x20, True), (0xA8, 0x20, False)])
def test_port_enable_commands(kb, c, bit, value) -> None:
    command(kb, 0x60, 0x30 if not value else 0x00)
    command(kb, c)
    assert bool(kb.command_byte & bit) is value


def test_unknown_controller_command_is_ignored(kb, irq) -> None:
    command(kb, 0x42)
    command(kb, 0xB5)
    assert status(kb) == 0x18 and irq.calls == []
    assert kb.status()["bad_commands"] == 2


def test_output_and_input_ports(kb) -> None:
    command(kb, 0xD0)
    assert data(kb) & 0x03 == 0x03       # not in reset, A20 on
    command(kb, 0xDD)
    command(kb, 0xD0)
    assert data(kb) & 0x02 == 0
    command(kb, 0xDF)
    assert kb.status()["a20"]
    command(kb, 0xD1, 0x01)
    assert not kb.status()["a20"]
    command(kb, 0xC0)
    assert data(kb) == 0x80


def test_reset_requests(kb, events) -> None:
    command(kb, 0xFF)                    # pulse nothing
    command(kb, 0xFD)                    # bit 0 not pulsed (bit 1 is)
    command(kb, 0xD1, 0x03)
    assert events == []
    command(kb, 0xFE)
    assert events == [EVENT_RESET_REQUEST]
    command(kb, 0xF0)                    # all four bits pulsed: includes reset
    command(kb, 0xD1, 0x02)              # output port bit 0 low
    assert events == [EVENT_RESET_REQUEST] * 3
    assert kb.status()["reset_requests"] == 3


def test_typed_keys_are_published_as_device_events(kb, events) -> None:
    """Every key the host side types goes out as ``key.CODE.0|1`` (a client may
    re-emit the keyboard through uinput), whichever way it was typed, and even when
    the guest's keyboard drops it: the mirror follows what was typed."""
    kb.feed(b"A<ctrl-c>")
    assert events == ["key.42.1", "key.30.1", "key.30.0", "key.42.0",
                      "key.29.1", "key.46.1", "key.46.0", "key.29.0"]
    del events[:]
    kb.type_text("b")
    kb.key_event("KEY_ENTER", True)
    assert events == ["key.48.1", "key.48.0", "key.28.1"]
    del events[:]
    send(kb, 0xF5)                       # the guest disables scanning
    drain(kb)
    assert not kb.key_event("q", True)   # dropped for the guest ...
    assert events == ["key.16.1"]        # ... published all the same
    kb.feed(b"<nosuchkey>")
    assert events == ["key.16.1"]        # unknown names are not keys: nothing published


def test_write_output_buffer_commands(kb, irq, aux_irq) -> None:
    setup(kb, 0x43)                      # translation on, both interrupts
    irq.calls.clear()
    command(kb, 0xD2, 0x33)              # as if from the keyboard, NOT translated
    assert status(kb) & 0x21 == 0x01 and irq.level
    assert data(kb) == 0x33 and not irq.level
    command(kb, 0xD3, 0x5A)              # as if from the mouse
    assert status(kb) & 0x21 == 0x21 and aux_irq.level and not irq.level
    assert data(kb) == 0x5A and not aux_irq.level


def test_aux_interrupt_needs_command_byte_bit_1(kb, aux_irq) -> None:
    setup(kb, 0x01)
    command(kb, 0xD3, 0xA5)
    assert status(kb) & 0x21 == 0x21 and aux_irq.calls == []
    command(kb, 0x60, 0x03)              # enabling it with data waiting raises it
    assert aux_irq.level
    assert data(kb) == 0xA5 and not aux_irq.level


# -- the keyboard ---------------------------------------------------------------------------

def test_keyboard_reset_and_id(kb) -> None:
    setup(kb, 0x00)
    send(kb, 0xFF)
    assert drain(kb) == [0xFA, 0xAA]
    send(kb, 0xF2)
    assert drain(kb) == [0xFA, 0xAB, 0x83]
    setup(kb, 0x40)                      # translated: what Linux's atkbd sees
    send(kb, 0xF2)
    assert drain(kb) == [0xFA, 0xAB, 0x41]


def test_keyboard_leds_typematic_echo(kb) -> None:
    send(kb, 0xED)
    send(kb, 0x04)
    send(kb, 0xF3)
    send(kb, 0x20)
    send(kb, 0xEE)
    assert drain(kb) == [0xFA, 0xFA, 0xFA, 0xFA, 0xEE]
    st = kb.status()
    assert st["leds"] == 0x04 and st["typematic"] == 0x20


def test_a_command_in_place_of_an_argument_is_a_command(kb) -> None:
    send(kb, 0xED)
    send(kb, 0xF2)                       # not an LED mask: GET ID instead
    assert drain(kb) == [0xFA, 0xFA, 0xAB, 0x83]
    assert kb.status()["leds"] == 0


def test_scancode_set_selection(kb) -> None:
    send(kb, 0xF0)
    send(kb, 0x00)
    assert drain(kb) == [0xFA, 0xFA, 0x02]
    send(kb, 0xF0)
    send(kb, 0x03)                       # set 3 is not supported: resend
    assert drain(kb) == [0xFA, 0xFE]
    send(kb, 0x01)                       # the argument again, now set 1
    assert drain(kb) == [0xFA]
    kb.key_event("a", True)
    kb.key_event("a", False)
    assert drain(kb) == [0x1E, 0x9E]
    setup(kb, 0x40)
    send(kb, 0xF0)
    send(kb, 0x00)
    assert drain(kb) == [0xFA, 0xFA, XLAT_TABLE[0x01]]   # the set number, translated too


def test_unknown_keyboard_commands_get_resend(kb) -> None:
    for b in (0x00, 0x42, 0xEF, 0xF1):
        send(kb, b)
    assert drain(kb) == [0xFE] * 4
    send(kb, 0xF7)                       # set-3 commands exist: acknowledged
    assert drain(kb) == [0xFA]


def test_resend_repeats_the_last_byte(kb) -> None:
    send(kb, 0xEE)
    assert drain(kb) == [0xEE]
    send(kb, 0xFE)
    assert drain(kb) == [0xEE]


def test_scanning_disable_enable(kb) -> None:
    kb.key_event("a", True)              # 0x1C goes on to the controller at once ...
    kb.key_event("a", False)             # ... F0 1C waits in the keyboard
    send(kb, 0xF5)                       # default + disable: its buffer is cleared
    assert drain(kb) == [0x1C, 0xFA]
    assert kb.key_event("b", True) is False
    assert kb.status()["keys_dropped"] == 1
    send(kb, 0xF4)
    assert drain(kb) == [0xFA]
    kb.key_event("b", True)
    assert drain(kb) == [0x32]


def test_writing_to_the_keyboard_enables_its_port(kb) -> None:
    command(kb, 0xAD)
    send(kb, 0xEE)
    assert not kb.command_byte & 0x10
    assert drain(kb) == [0xEE]


# -- translation ------------------------------------------------------------------------------

def test_keys_translated_and_not(kb) -> None:
    setup(kb, 0x00)
    kb.key_event("h", True)
    kb.key_event("h", False)
    kb.key_event("KEY_RIGHTCTRL", True)
    kb.key_event("KEY_RIGHTCTRL", False)
    assert drain(kb) == [0x33, 0xF0, 0x33, 0xE0, 0x14, 0xE0, 0xF0, 0x14]
    setup(kb, 0x40)
    kb.key_event("h", True)
    kb.key_event("h", False)
    kb.key_event("KEY_RIGHTCTRL", True)
    kb.key_event("KEY_RIGHTCTRL", False)
    assert drain(kb) == [0x23, 0xA3, 0xE0, 0x1D, 0xE0, 0x9D]


def test_translation_table_agrees_with_the_set_1_table() -> None:
    """For every key: the 8042's translation of its set-2 codes is its set-1 code."""
    checked = 0
    for code in scancodes.SET2:
        for pressed in (True, False):
            s2 = scancodes.scancodes(code, pressed, 2)
            s1 = scancodes.scancodes(code, pressed, 1)
            assert translate(s2) == s1, keys.key_name(code)
            checked += 1
    assert checked > 200
    assert XLAT_TABLE[0x83] == 0x41 and XLAT_TABLE[0xFA] == 0xFA and XLAT_TABLE[0xAA] == 0xAA


# -- the output buffer and IRQ 1 -------------------------------------------------------------

def test_irq_needs_command_byte_bit_0(kb, irq) -> None:
    setup(kb, 0x40)
    kb.key_event("a", True)
    assert status(kb) & 0x01 and irq.calls == []
    command(kb, 0x60, 0x41)              # enabling the interrupt with data waiting
    assert irq.level
    assert data(kb) == 0x1E and not irq.level


def test_each_byte_is_its_own_edge(kb, irq) -> None:
    setup(kb, 0x41)
    irq.calls.clear()
    kb.key_event("h", True)
    kb.key_event("h", False)             # two bytes queued: 0x23, then 0xA3
    assert irq.calls == [True]
    assert data(kb) == 0x23
    assert irq.calls == [True, False, True]    # fell and rose again within the read
    assert data(kb) == 0xA3
    assert irq.calls == [True, False, True, False]
    assert data(kb) == 0xA3              # an empty buffer reads the last byte again
    assert irq.calls == [True, False, True, False]


def test_disabled_keyboard_port_holds_keys(kb, irq) -> None:
    setup(kb, 0x51)                      # translation, interrupt, keyboard port off
    irq.calls.clear()
    kb.key_event("a", True)
    assert not status(kb) & 0x01 and irq.calls == []
    command(kb, 0xAE)
    assert irq.level and data(kb) == 0x1E


def test_controller_answer_goes_before_waiting_keys(kb) -> None:
    setup(kb, 0x40)
    kb.key_event("a", True)
    kb.key_event("a", False)             # 0x1E is in the buffer, 0x9E waits
    command(kb, 0x20)
    assert drain(kb) == [0x1E, 0x40, 0x9E]


def test_backlog_keeps_a_paste_in_order() -> None:
    text = "the quick brown fox jumps over the lazy dog 0123456789"
    k = I8042()
    setup(k, 0x40)
    assert k.type_text(text) == 2 * len(text)
    assert scancodes.ScancodeDecoder(1).feed(bytes(drain(k))) == layout.text_events(text)


def test_full_backlog_drops_and_counts() -> None:
    text = "the quick brown fox jumps over the lazy dog"
    k = I8042(backlog=64)                # a letter is 3 bytes of set 2 (make, F0, code)
    setup(k, 0x40)
    accepted = k.type_text(text)
    assert accepted < 2 * len(text)
    assert k.status()["keys_dropped"] == 2 * len(text) - accepted
    got = scancodes.ScancodeDecoder(1).feed(bytes(drain(k)))
    assert got == layout.text_events(text)[:accepted]      # what got in is in order


def test_full_backlog_never_leaves_a_key_stuck() -> None:
    k = I8042(backlog=16)
    setup(k, 0x40)
    assert k.key_event("KEY_LEFTSHIFT", True)
    while k.key_event("a", True):        # typematic repeats fill the backlog
        pass
    assert k.key_event("b", True) is False
    assert k.key_event("b", False) is False      # its press never went in
    assert k.key_event("KEY_LEFTSHIFT", False)   # this one must, full or not
    assert k.key_event("a", False)
    got = scancodes.ScancodeDecoder(1).feed(bytes(drain(k)))
    assert got[-2:] == [(K["KEY_LEFTSHIFT"], False), (K["KEY_A"], False)]
    assert {c for c, p in got} == {K["KEY_LEFTSHIFT"], K["KEY_A"]}


# -- the aux port ----------------------------------------------------------------------------

def test_mouse_answers_linux_probes(kb, aux_irq) -> None:
    setup(kb, 0x43)
    for b in (0xF0, 0x56, 0xA4):         # Linux's "active MUX" loopback probe
        command(kb, 0xD3, b)
        assert status(kb) & 0x21 == 0x21
        assert data(kb) == b
    command(kb, 0xD4, 0xF2)
    assert drain(kb) == [0xFA, 0x00]
    command(kb, 0xD4, 0xFF)
    assert drain(kb) == [0xFA, 0xAA, 0x00]
    command(kb, 0xD4, 0xE9)
    assert drain(kb) == [0xFA, 0x00, 0x02, 100]
    command(kb, 0xD4, 0xF4)
    assert drain(kb) == [0xFA] and kb.status()["mouse_enabled"]
    assert aux_irq.calls.count(True) == 3 + 2 + 3 + 4 + 1


def test_no_aux_device_times_out(aux_irq) -> None:
    k = I8042(aux="none", aux_irq=aux_irq)
    setup(k, 0x02)
    command(k, 0xD4, 0xF2)
    assert status(k) & 0x61 == 0x61      # timeout, aux data, full
    assert data(k) == 0xFE
    assert status(k) & 0x40 == 0


def test_reset_returns_to_power_on(kb, irq) -> None:
    setup(kb, 0x41)
    kb.key_event("a", True)
    kb.reset()
    assert status(kb) == 0x18 and not irq.level
    assert kb.status()["key_events"] == 1     # counters survive


# -- the key-event stream syntax ---------------------------------------------------------------

K = keys.KEY_CODES


def taps(*names: str) -> list[tuple[int, bool]]:
    return layout.tap(K[n] for n in names)


def test_text_and_names() -> None:
    p = KeyText()
    ev = p.feed(b"Hi<enter><f1><caps_lock><ctrl-c><page_up><ret>")
    assert ev == (taps("KEY_LEFTSHIFT", "KEY_H") + taps("KEY_I") + taps("KEY_ENTER")
                  + taps("KEY_F1") + taps("KEY_CAPSLOCK") + taps("KEY_LEFTCTRL", "KEY_C")
                  + taps("KEY_PAGEUP") + taps("KEY_ENTER"))
    assert p.errors == 0


def test_escapes_and_literals() -> None:
    p = KeyText()
    ev = p.feed("a<<b> c < d >e <>")
    want = layout.text_events("a<b> c < d >e <>")
    assert ev == want


def test_split_anywhere() -> None:
    text = "x<ctrl-alt-delete>é€<<y\r\nz"
    whole = KeyText().feed(text.encode())
    p = KeyText()
    parts = []
    data = text.encode()
    for i in range(len(data)):
        parts += p.feed(data[i:i + 1])
    assert parts == whole
    assert p.errors == 2                 # é and € have no key on a US layout
    assert taps("KEY_LEFTCTRL", "KEY_LEFTALT", "KEY_DELETE") == whole[2:8]
    assert whole.count((K["KEY_ENTER"], True)) == 1     # \r\n is one Enter


def test_press_release_and_bad_names() -> None:
    p = KeyText()
    ev = p.feed("<+shift>ab<-shift><nosuchkey><ctrl->")
    assert ev[0] == (K["KEY_LEFTSHIFT"], True) and ev[-1] == (K["KEY_LEFTSHIFT"], False)
    assert len(ev) == 6 and p.errors == 2
    assert key_events_for_name("shift-1") == taps("KEY_LEFTSHIFT", "KEY_1")
    assert key_events_for_name("lt") == taps("KEY_LEFTSHIFT", "KEY_COMMA")
    assert key_events_for_name("Shift_R-RET") == taps("KEY_RIGHTSHIFT", "KEY_ENTER")
    assert key_events_for_name("ctrl-!") == taps("KEY_LEFTCTRL", "KEY_LEFTSHIFT", "KEY_1")
    with pytest.raises(keys.UnknownKey):
        key_events_for_name("hyper")


def test_open_name_waits_for_more_and_flush_types_it() -> None:
    p = KeyText()
    assert p.feed("<ent") == []
    assert p.feed("er>") == taps("KEY_ENTER")
    assert p.feed("<ab") == []
    assert p.flush() == layout.text_events("<ab")


def test_feed_and_type_text_reach_the_guest(kb) -> None:
    setup(kb, 0x40)
    kb.feed(b"ok<esc")
    kb.feed(b">")
    assert drain(kb) == [0x18, 0x98, 0x25, 0xA5, 0x01, 0x81]
    kb.feed(b"<bogus>\x00")
    assert kb.status()["bad_input"] == 2
    assert kb.type_text("a<") == 2 + 4   # 'a' and a literal '<' (shift + comma)
    drain(kb)
    kb.type_text("<esc>")                # plain text: no key names
    assert len(drain(kb)) == 5 * 2 + 2 * 2
    kb.type_text("<esc>x<", markup=True)  # the stream's syntax on request
    assert drain(kb) == [0x01, 0x81, 0x2D, 0xAD, 0x2A, 0x33, 0xB3, 0xAA]
    with pytest.raises(keys.UnknownKey):
        kb.key_event("bogus", True)


def test_null_irq_default() -> None:
    k = I8042()
    assert isinstance(k.irq, NullIrq) and isinstance(k.aux_irq, NullIrq)
    command(k, 0x20)
    assert k.irq.level is True           # type: ignore[attr-defined]
