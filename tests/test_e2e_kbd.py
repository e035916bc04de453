"""End to end with the i8042: real remote-hw processes, real KVM guests, loopback TCP.

A key typed into the server's keyboard backend travels: TCP peer -> tcp backend ->
I8042.feed (text -> key events -> set-2 scan codes -> set-1 through the controller's
translation) -> IRQ 1 over the wire -> the guest's ISR reads port 0x60 over the wire
-> the guest prints the character on the remote UART -> the UART's tcp backend.
"""

from __future__ import annotations

import socket
import threading
import time

from remote_hw.guest_images import guest_image

from helpers import Proc, backend_port, read_until, remote_hw_cmd, start_server

UART_MAP = "port:0x3f8-0x3ff=a/uart0,irq=4"
KBD_MAP = "port:0x60-0x64=a/kbd0,irq=1"


def vm_argv(image: str, port: int, *extra: str) -> list[str]:
    return remote_hw_cmd("vm", "--image", str(guest_image(image)), "--vm-id", "1",
                         "--server", f"a=127.0.0.1:{port}", "--map", UART_MAP,
                         "--map", KBD_MAP, *extra)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class EarlyPeer(threading.Thread):
    """Connects to a backend port the moment it listens (the tcp backend drops guest
    output while it has no peer, and the guest prints its banner right after start)."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port))
                return
            except ConnectionRefusedError:
                time.sleep(0.001)

    def get(self) -> socket.socket:
        self.join(self.timeout)
        assert self.sock is not None, f"nothing listened on port {self.port}"
        return self.sock


def test_keys_typed_on_the_server_come_back_on_its_serial_backend():
    uart_port = _free_port()
    server, port = start_server(f"uart0=uart16550,backend=tcp:127.0.0.1:{uart_port}",
                                "kbd0=i8042,backend=tcp:127.0.0.1:0")
    peer = EarlyPeer(uart_port)          # connected before the guest can print
    vm = Proc(vm_argv("kbd.bin", port))
    try:
        uart = peer.get()
        kbd = socket.create_connection(("127.0.0.1", backend_port(server, "kbd0")))
        read_until(uart, b"kbd ready\r\n")
        kbd.sendall(b"hello<enter>")
        assert read_until(uart, b"hello\r\n") == b"hello\r\n"   # nothing else
        # Split sends, a chord the guest ignores (ctrl-c: ctrl is not printable and
        # its 'c' is printed) and digits; then Escape ends the guest.
        kbd.sendall(b"ab<sp")
        kbd.sendall(b"ace>42<ctrl-c>")
        assert read_until(uart, b"ab 42c") == b"ab 42c"
        kbd.sendall(b"<esc>")
        read_until(uart, b"bye\r\n")
        assert vm.wait(60) == 0, vm.output()
        uart.close()
        kbd.close()
    finally:
        vm.stop()
        server.stop()


def _reset_run(tmp_path, mode: str) -> tuple[int, bytes, Proc]:
    out = tmp_path / f"uart-{mode}.out"
    server, port = start_server(f"uart0=uart16550,backend=file:{out}", "kbd0=i8042")
    vm = Proc(vm_argv("reset.bin", port, "--on-reset", mode))
    try:
        status = vm.wait(60)
        return status, out.read_bytes(), vm
    finally:
        vm.stop()
        server.stop()


def test_reset_request_ends_the_vm_with_status_4(tmp_path):
    status, text, vm = _reset_run(tmp_path, "stop")
    assert status == 4, vm.output()
    assert text == b"boot 0\r\n"
    assert "asks for reset-request" in vm.output()


def test_reset_request_restarts_the_vm(tmp_path):
    """The guest runs again after the 0xFE write: its second boot finds the count it
    left in the (server-side) UART scratch register, prints it and halts."""
    status, text, vm = _reset_run(tmp_path, "restart")
    assert status == 0, vm.output()
    assert text == b"boot 0\r\nboot 1\r\ndone\r\n"
    assert vm.output().count("asks for reset-request") == 1
