"""No guest access waits past ``--timeout``, whatever signals arrive meanwhile.

Reproduces issue 11's first failure with real processes: a VM reading a remote UART
register in a tight loop, and its server stopped with SIGSTOP (alive, connected, and
silent). Before the fix the vCPU watchdog's kick (every 50 ms, shorter than the 100 ms
read slice) restarted the read for as long as the server stayed stopped. Now the
first unanswered access ends at its deadline, the client says the device is
unavailable, and the guest goes on with all-ones reads.

The bound asserted is a correctness bound (the timeout plus scheduling slack, far
below the 10 s the server stays stopped), not a speed figure.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path

import pytest

from remote_hw.guest_images import guest_image

from helpers import Proc, remote_hw_cmd, start_server

TIMEOUT = 2.0
STOPPED_FOR = 10.0
SLACK = 1.5          # scheduling slack on a loaded 2-core machine


def _looping_guest(tmp_path: Path) -> Path:
    """ioloop.bin patched to read COM1's scratch register ~forever."""
    img = bytearray(guest_image("ioloop.bin").read_bytes())
    struct.pack_into("<IIII", img, 4, 0x7FFFFFFF, 0x3FF, 0, 0)
    path = tmp_path / "loop.bin"
    path.write_bytes(bytes(img))
    return path


@pytest.mark.kvm
@pytest.mark.parametrize("fastio", ["1", "0"], ids=["c-path", "python-path"])
def test_a_stopped_server_ends_the_wait_at_the_timeout(tmp_path, monkeypatch, fastio):
    monkeypatch.setenv("REMOTE_HW_FASTIO", fastio)
    server, port = start_server("uart0=uart16550")
    vm = Proc(remote_hw_cmd("vm", "--image", str(_looping_guest(tmp_path)), "--vm-id", "1",
                            "--server", f"a=127.0.0.1:{port}", "--timeout", str(TIMEOUT),
                            "--map", "port:0x3f8-0x3ff=a/uart0"))
    stopped = False
    try:
        server.wait_for(r"client \d+ vm 1 attached", timeout=60)
        time.sleep(0.3)                      # the guest is looping on the register now
        os.kill(server.p.pid, signal.SIGSTOP)
        stopped = True
        t0 = time.monotonic()
        vm.wait_for(r"device unavailable", timeout=STOPPED_FOR)
        waited = time.monotonic() - t0
        assert waited <= TIMEOUT + SLACK, (waited, vm.output())
        # The guest was not blocked: the VM is still running, now on all-ones reads.
        assert vm.p.poll() is None, vm.output()
    finally:
        if stopped:
            os.kill(server.p.pid, signal.SIGCONT)
        vm.stop()
        server.stop()


@pytest.mark.parametrize("fastio,tls", [("1", False), ("0", False), ("0", True)],
                         ids=["c-path", "python-path", "tls"])
def test_a_stopped_server_does_not_hold_a_sender_past_the_timeout(tmp_path, monkeypatch,
                                                                  fastio, tls):
    """Writes that are not answered (POSTs; an entry server passing them on) fill the
    socket's buffers when the server is stopped. The send that finds them full gives
    up after the link's timeout and the link reads as down, saying why; before, it
    blocked for as long as the server stayed stopped (an entry server's session, and
    its client, with it)."""
    from remote_hw.net.link import ServerLink
    from remote_hw.net.security import TlsConfig

    from helpers import make_keys
    monkeypatch.setenv("REMOTE_HW_FASTIO", fastio)
    extra: tuple[str, ...] = ()
    tls_config = None
    if tls:
        keys = make_keys(tmp_path / "keys", ["a"], ["c1"])
        extra = ("--tls-dir", str(keys))
        tls_config = TlsConfig(keys, "c1")
    server, port = start_server("uart0=uart16550", extra=extra)
    link = ServerLink("a", ("127.0.0.1", port), client_name="c1", timeout=1.0,
                      tls=tls_config).connect()
    stopped = False
    try:
        os.kill(server.p.pid, signal.SIGSTOP)
        stopped = True
        slowest = 0.0
        for _ in range(2_000_000):           # ~MBs of frames fill the buffers first
            t0 = time.monotonic()
            sent = link.forward_post(link.post_id(), 1, 1, 0, 7, 1, 0x41, 0, "", "uart0")
            slowest = max(slowest, time.monotonic() - t0)
            if not sent:
                break
        assert not link.up, "the buffers never filled"
        assert "took nothing sent to it for 1 s" in link.down_reason, link.down_reason
        assert slowest <= 1.0 + SLACK, slowest
    finally:
        if stopped:
            os.kill(server.p.pid, signal.SIGCONT)
        link.close()
        server.stop()
