"""Input end to end as commands: a server's real keyboard typed into a VM
(``--device kbd0=i8042,backend=evdev:MATCH``) and a device's keys re-emitted on the
client host (``remote-hw vm --uinput SERVER/DEVICE``, ``uinput = [...]`` in the agent's
file).

Real ``remote-hw`` processes throughout. Where the kernel lacks the devices each
command must stop at once with one sentence and a non-zero status, never a traceback;
those checks run everywhere. The full path (a uinput keyboard read through evdev by a
server, typed into a KVM guest, and mirrored by a virtual keyboard on the client) runs
where /dev/uinput exists and skips with the reason elsewhere.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from remote_hw.guest_images import guest_image
from remote_hw.input.keys import KEY_CODES
from remote_hw.net.link import ServerLink
from remote_hw.protocol.messages import Status

from helpers import Proc, backend_port, remote_hw_cmd, start_server, wait_until

NO_KEYBOARD = "/dev/input/by-id/remote-hw-test-no-such-keyboard-event-kbd"
KBD_MAP = "port:0x60-0x64=a/kbd0,irq=1"
UART_MAP = "port:0x3f8-0x3ff=a/uart0,irq=4"


def run(*args: str, timeout: float = 60) -> tuple[int, list[str]]:
    """Run a remote-hw command to its end; (exit status, stderr lines)."""
    proc = Proc(remote_hw_cmd(*args))
    status = proc.wait(timeout)
    time.sleep(0.1)                      # let the output pumps drain
    return status, [line for line in proc.output().splitlines() if line.strip()]


def assert_one_sentence(lines: list[str], prefix: str) -> str:
    """The command said exactly one thing, starting with ``prefix``, no traceback."""
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    said = [line for line in lines if line.startswith(prefix)]
    assert len(said) == 1, "\n".join(lines)
    return said[0]


def server_argv(*devices: str) -> list[str]:
    argv = ["server", "--listen", "127.0.0.1:0", "--no-mount"]
    for d in devices:
        argv += ["--device", d]
    return argv


# ------------------------------------------------------------------ the server side

def test_server_evdev_backend_without_the_keyboard_fails_in_one_sentence():
    status, lines = run(*server_argv(f"kbd0=i8042,backend=evdev:{NO_KEYBOARD}"))
    assert status == 1
    line = assert_one_sentence(lines, "remote-hw server:")
    assert line.startswith(f"remote-hw server: backend evdev:{NO_KEYBOARD}: {NO_KEYBOARD} "
                           "does not exist (")
    if not os.path.isdir("/dev/input"):
        assert "this kernel has no input devices" in line
    else:
        assert "no such keyboard is plugged in" in line


def test_server_evdev_backend_by_name_needs_an_input_subsystem():
    """A name match may wait for a keyboard to be plugged in, but not on a kernel
    without input devices at all."""
    argv = server_argv("kbd0=i8042,backend=evdev:remote-hw-test-keyboard")
    if os.path.isdir("/dev/input"):
        proc = Proc(remote_hw_cmd(*argv))
        try:
            proc.wait_for(r"listening on")          # it starts and waits for the keyboard
        finally:
            assert proc.stop() == 0
        return
    status, lines = run(*argv)
    assert status == 1
    line = assert_one_sentence(lines, "remote-hw server:")
    assert "backend evdev:remote-hw-test-keyboard: cannot read a real keyboard: /dev/input " \
           "does not exist" in line


def test_server_evdev_backend_on_a_uart_is_a_usage_error():
    status, lines = run(*server_argv("uart0=uart16550,backend=evdev:any"))
    assert status == 2
    line = assert_one_sentence(lines, "remote-hw server: error:")
    assert "device 'uart0' (uart16550) takes no key events" in line


def test_keys_typed_into_a_server_keyboard_reach_an_attached_client_as_events():
    """The server half of --uinput, with no kernel input device: keys typed into the
    i8042 (here through its tcp backend) arrive at the attached VM's link as
    ``key.CODE.0|1`` device events, in order."""
    server, port = start_server("kbd0=i8042,backend=tcp:127.0.0.1:0")
    events: list[tuple[int, str, str]] = []
    got = threading.Condition()

    def on_event(vm_id: int, device: str, name: str, *_: object) -> None:
        with got:
            events.append((vm_id, device, name))
            got.notify_all()
    link = ServerLink("a", ("127.0.0.1", port), client_name="input-test", on_event=on_event)
    try:
        link.connect()
        assert link.attach(7, "kbd0") == Status.OK
        kbd = socket.create_connection(("127.0.0.1", backend_port(server, "kbd0")))
        kbd.sendall(b"hI<enter>")
        h, i, shift, enter = (KEY_CODES[k] for k in ("KEY_H", "KEY_I", "KEY_LEFTSHIFT",
                                                     "KEY_ENTER"))
        want = [f"key.{h}.1", f"key.{h}.0", f"key.{shift}.1", f"key.{i}.1", f"key.{i}.0",
                f"key.{shift}.0", f"key.{enter}.1", f"key.{enter}.0"]
        with got:
            assert got.wait_for(lambda: len(events) >= len(want), 20), events
        assert events == [(7, "kbd0", name) for name in want]
        kbd.close()
    finally:
        link.close()
        server.stop()


# ------------------------------------------------------------------ the client side

def vm_argv(port: int, *extra: str, image: str = "kbd.bin") -> list[str]:
    return ["vm", "--image", str(guest_image(image)), "--vm-id", "1",
            "--server", f"a=127.0.0.1:{port}", "--map", UART_MAP, "--map", KBD_MAP, *extra]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_vm_uinput_without_uinput_fails_in_one_sentence():
    """Where /dev/uinput is missing the VM stops before touching KVM or the network;
    where it exists the option is accepted and the run fails later, on the server
    nobody listens on: either way status 1, one sentence, no traceback."""
    status, lines = run(*vm_argv(_closed_port(), "--uinput", "a/kbd0"))
    assert status == 1, "\n".join(lines)
    if not os.path.exists("/dev/uinput"):
        line = assert_one_sentence(lines, "remote-hw vm:")
        assert line == ("remote-hw vm: --uinput a/kbd0: cannot create a virtual keyboard: "
                        "/dev/uinput does not exist on this machine (load the uinput "
                        "module: modprobe uinput)")
    else:
        assert "cannot connect" in assert_one_sentence(lines, "remote-hw vm:")


def test_vm_uinput_names_a_mapped_device():
    status, lines = run(*vm_argv(_closed_port(), "--uinput", "a/kbd9"))
    assert status == 2
    line = assert_one_sentence(lines, "remote-hw vm: error:")
    assert "argument --uinput: a/kbd9 is not mapped by this VM" in line
    status, lines = run(*vm_argv(_closed_port(), "--uinput", "kbd0"))
    assert status == 2
    assert "must be SERVER/DEVICE" in assert_one_sentence(lines, "remote-hw vm: error:")


def _agent_file(tmp_path: Path, port: int, uinput: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[servers]\na = "127.0.0.1:{port}"\n\n[[vm]]\nid = 1\n'
                    f'image = "{guest_image("kbd.bin")}"\n'
                    f'map = ["{UART_MAP}", "{KBD_MAP}"]\nuinput = [{uinput}]\n')
    return path


def test_agent_uinput_without_uinput_fails_in_one_sentence(tmp_path):
    path = _agent_file(tmp_path, _closed_port(), '"a/kbd0"')
    status, lines = run("agent", "--config", str(path))
    assert status == 1, "\n".join(lines)
    if not os.path.exists("/dev/uinput"):
        line = assert_one_sentence(lines, "remote-hw agent:")
        assert line == (f"remote-hw agent: {path}: vm 1: uinput a/kbd0: cannot create a "
                        "virtual keyboard: /dev/uinput does not exist on this machine (load "
                        "the uinput module: modprobe uinput)")
    else:
        assert "cannot connect" in assert_one_sentence(lines, "remote-hw agent:")


def test_agent_uinput_names_a_mapped_device(tmp_path):
    path = _agent_file(tmp_path, _closed_port(), '"a/kbd9"')
    status, lines = run("agent", "--config", str(path))
    assert status == 2
    line = assert_one_sentence(lines, "remote-hw agent: error:")
    assert f"{path}: vm 1: uinput: a/kbd9 is not mapped by this VM" in line


def test_agent_file_uinput_entries(tmp_path):
    from remote_hw.config import ConfigError, DeviceRef, load_agent_config
    config = load_agent_config(_agent_file(tmp_path, 7700, '"a/kbd0"'))
    assert config.vms[0].uinput == [DeviceRef("a", "kbd0")]
    assert str(config.vms[0].uinput[0]) == "a/kbd0"
    for bad, message in (('"a/kbd0", 3', "must be a list"), ('"kbd0"', "SERVER/DEVICE"),
                         ('"a/kbd 0"', "device id")):
        with pytest.raises(ConfigError, match=message):
            load_agent_config(_agent_file(tmp_path, 7700, bad))
    path = _agent_file(tmp_path, 7700, "")
    path.write_text(path.read_text().replace("uinput = []", 'uinput = "a/kbd0"'))
    with pytest.raises(ConfigError, match="must be a list"):
        load_agent_config(path)


# ------------------------------------------------------------------ the whole path

@pytest.mark.kvm
@pytest.mark.uinput
def test_a_server_keyboard_types_into_the_guest_and_on_the_client_host(tmp_path):
    """A uinput keyboard stands in for a keyboard plugged into the server: the server
    reads it through evdev (backend=evdev:/dev/input/eventN) and the i8042 types its
    keys into the kbd guest, which prints them on the UART; the VM, run with
    ``--uinput a/kbd0``, re-emits the same keys through a virtual keyboard of its own
    host, read back here through evdev."""
    evdev = pytest.importorskip("evdev", reason="python-evdev not installed")
    from remote_hw.input.uinput import UinputKeyboard
    keyboard = UinputKeyboard(name="remote-hw test server keyboard")
    uart_out = tmp_path / "uart.out"
    server = vm = None
    try:
        node = keyboard.device_path
        assert node
        wait_until(lambda: os.path.exists(node), f"{node} to appear")
        server, port = start_server(f"uart0=uart16550,backend=file:{uart_out}",
                                    f"kbd0=i8042,backend=evdev:{node}")
        vm = Proc(remote_hw_cmd(*vm_argv(port, "--uinput", "a/kbd0")))
        wait_until(lambda: uart_out.exists() and b"kbd ready\r\n" in uart_out.read_bytes(),
                   "the guest's banner", timeout=60)
        mirror_name = "remote-hw a/kbd0 (vm 1)"

        def find_mirror():
            for path in evdev.list_devices():
                dev = evdev.InputDevice(path)
                if dev.name == mirror_name:
                    return dev
                dev.close()
            return None
        mirror = wait_until(find_mirror, f"the client's virtual keyboard {mirror_name!r}")
        for key in ("h", "i", "enter"):
            keyboard.key(key, True)
            time.sleep(0.05)
            keyboard.key(key, False)
            time.sleep(0.05)
        wait_until(lambda: b"hi\r\n" in uart_out.read_bytes(), "the guest to print hi")
        got: list[tuple[int, int]] = []

        def read_mirror():
            ev = mirror.read_one()
            while ev is not None:
                if ev.type == evdev.ecodes.EV_KEY:
                    got.append((ev.code, ev.value))
                ev = mirror.read_one()
            return len(got) >= 6
        wait_until(read_mirror, "the keys on the client's virtual keyboard")
        h, i, enter = KEY_CODES["KEY_H"], KEY_CODES["KEY_I"], KEY_CODES["KEY_ENTER"]
        assert got == [(h, 1), (h, 0), (i, 1), (i, 0), (enter, 1), (enter, 0)]
        mirror.close()
        keyboard.key("esc", True)
        keyboard.key("esc", False)
        assert vm.wait(60) == 0, vm.output()
    finally:
        if vm is not None:
            vm.stop()
        if server is not None:
            server.stop()
        keyboard.close()
