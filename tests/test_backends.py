"""Backends on real sockets and files (127.0.0.1, ephemeral ports only)."""

from __future__ import annotations

import os
import queue
import socket
import time

import pytest

from remote_hw.backends.base import BackendError
from remote_hw.backends.file import FileBackend
from remote_hw.backends.registry import BACKENDS, open_backend
from remote_hw.backends.tcp import TcpBackend

WAIT = 5.0   # upper bound for events to happen; tests normally finish in milliseconds


def wait_for(cond, timeout: float = WAIT) -> bool:
    """Poll ``cond`` until true (the I/O thread runs asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(WAIT)
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def recv_all(sock: socket.socket) -> bytes:
    sock.settimeout(WAIT)
    buf = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return buf
        buf += chunk


@pytest.fixture
def tcp():
    backends: list[TcpBackend] = []
    received: queue.Queue[bytes] = queue.Queue()

    def make(arg: str = "127.0.0.1:0", label: str = "uart0", index: int = 0) -> TcpBackend:
        b = open_backend(f"tcp:{arg}", label, index)
        assert isinstance(b, TcpBackend)
        backends.append(b)
        b.start(received.put)
        return b

    make.received = received  # type: ignore[attr-defined]
    yield make
    for b in backends:
        b.close()


def connect(b: TcpBackend) -> socket.socket:
    s = socket.create_connection(b.address, timeout=WAIT)
    return s


def test_registry() -> None:
    from remote_hw.backends.evdev import EvdevBackend
    from remote_hw.backends.tty import TtyBackend
    from remote_hw.backends.unix import UnixBackend
    assert {"tcp": TcpBackend, "file": FileBackend, "tty": TtyBackend,
            "evdev": EvdevBackend, "unix": UnixBackend} == BACKENDS


def test_tcp_both_directions(tcp) -> None:
    b = tcp()
    host, port = b.address
    assert host == "127.0.0.1" and port > 0
    assert b.describe() == f"tcp:127.0.0.1:{port}"
    with connect(b) as peer:
        assert wait_for(lambda: b.connected)
        peer.sendall(b"hello guest")
        got = b""
        while len(got) < 11:
            got += tcp.received.get(timeout=WAIT)
        assert got == b"hello guest"
        b.from_guest(b"hello peer")
        assert recv_exactly(peer, 10) == b"hello peer"
    st = b.status()
    assert st["bytes_to_guest"] == 11 and st["bytes_from_guest"] == 10


def test_tcp_keeps_recent_output_for_the_next_peer(tcp) -> None:
    from remote_hw.backends.tcp import HOLD_LIMIT
    b = tcp()
    b.from_guest(b"x" * HOLD_LIMIT)
    b.from_guest(b"banner\r\n")  # the oldest 8 bytes fall out of the scrollback
    assert b.status()["dropped"] == 8
    with connect(b) as peer:
        assert wait_for(lambda: b.connected)
        got = recv_exactly(peer, HOLD_LIMIT)
        assert got.endswith(b"banner\r\n") and got.count(b"x") == HOLD_LIMIT - 8
        b.from_guest(b"now")
        assert recv_exactly(peer, 3) == b"now"


def test_tcp_second_peer_is_busy_then_next_accepted(tcp) -> None:
    b = tcp(label="ttyS0@vm1")
    first = connect(b)
    assert wait_for(lambda: b.connected)
    with connect(b) as second:
        assert recv_all(second) == b"remote-hw: ttyS0@vm1 is busy\r\n"
    assert b.status()["peers_rejected"] == 1
    # The first peer is still the one served.
    b.from_guest(b"A")
    assert recv_exactly(first, 1) == b"A"
    first.close()
    assert wait_for(lambda: not b.connected)
    with connect(b) as third:
        assert wait_for(lambda: b.connected)
        b.from_guest(b"B")
        assert recv_exactly(third, 1) == b"B"
        third.sendall(b"x")
        assert tcp.received.get(timeout=WAIT) == b"x"
    assert b.status()["peers_accepted"] == 2


def test_tcp_port_plus_index() -> None:
    # Find a free pair of consecutive ports by asking the kernel for one and trying
    # the next; retry a few times in case a neighbour is taken.
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base >= 65535:
            continue
        try:
            b0 = open_backend(f"tcp:127.0.0.1:{base}", "dev", 0)
        except BackendError:
            continue
        try:
            b1 = open_backend(f"tcp:127.0.0.1:{base}", "dev", 1)
        except BackendError:
            b0.close()
            continue
        try:
            assert b0.address[1] == base and b1.address[1] == base + 1
        finally:
            b0.close()
            b1.close()
        return
    pytest.skip("no two consecutive free ports found")


def test_tcp_port_in_use(tcp) -> None:
    b = tcp()
    with pytest.raises(BackendError, match="cannot listen"):
        open_backend(f"tcp:127.0.0.1:{b.address[1]}", "dev", 0)


def test_tcp_close_is_idempotent_and_releases_port() -> None:
    b = open_backend("tcp:127.0.0.1:0", "dev", 0)
    b.start(lambda data: None)
    port = b.address[1]
    b.close()
    b.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    b.from_guest(b"after close")          # harmless


def test_tcp_close_without_start() -> None:
    b = open_backend("tcp:127.0.0.1:0", "dev", 0)
    b.close()


def test_tcp_slow_peer_does_not_block_guest(tcp) -> None:
    b = tcp()
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # before connecting
    peer.connect(b.address)
    with peer:
        assert wait_for(lambda: b.connected)
        chunk = b"x" * 65536
        total = 0
        for _ in range(512):              # 32 MiB, never read by the peer
            b.from_guest(chunk)
            total += len(chunk)
            if b.status()["dropped"]:
                break
        st = b.status()
        assert st["dropped"] > 0          # the 1 MiB queue overflowed instead of blocking
        assert st["queued"] <= 1 << 20
        assert st["bytes_from_guest"] + st["queued"] + st["dropped"] == total


@pytest.mark.parametrize("spec,message", [
    ("tcp:127.0.0.1", "port"),
    ("tcp:127.0.0.1:", "no port"),
    ("tcp:127.0.0.1:http", "bad port"),
    ("tcp:127.0.0.1:70000", "out of range"),
    ("tcp:127.0.0.1:-1", "out of range"),
    ("nosuch:x", "known backends: evdev, file, tcp, tty"),
    ("tcp", "NAME:ARG"),
    (":x", "NAME:ARG"),
    ("file:", "no path"),
    ("file:/nonexistent-dir-remote-hw/x.log", "cannot open"),
])
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        open_backend(spec, "dev", 0)


def test_tcp_port_plus_index_overflow() -> None:
    with pytest.raises(BackendError, match="above 65535"):
        open_backend("tcp:127.0.0.1:65535", "dev", 1)


def test_file_appends(tmp_path) -> None:
    path = tmp_path / "uart.log"
    path.write_bytes(b"old\n")
    b = open_backend(f"file:{path}", "uart0", 0)
    b.start(lambda data: pytest.fail("a file has no input"))
    b.from_guest(b"he")
    assert path.read_bytes() == b"old\nhe"   # flushed at once, appended
    b.from_guest(b"llo")
    assert path.read_bytes() == b"old\nhello"
    b.close()
    b.close()
    b.from_guest(b"lost")                    # after close: dropped, no exception
    assert path.read_bytes() == b"old\nhello"
    assert b.status()["dropped"] == 4


def test_file_index_placeholder(tmp_path) -> None:
    spec = f"file:{tmp_path}/vm{{index}}.log"
    bs = [open_backend(spec, "uart0", i) for i in range(3)]
    for i, b in enumerate(bs):
        b.from_guest(f"vm{i}".encode())
        b.close()
    assert [(tmp_path / f"vm{i}.log").read_bytes() for i in range(3)] == [b"vm0", b"vm1", b"vm2"]


def test_file_index_suffix_without_placeholder(tmp_path) -> None:
    spec = f"file:{tmp_path}/out.log"
    b0 = open_backend(spec, "uart0", 0)
    b2 = open_backend(spec, "uart0", 2)
    assert isinstance(b0, FileBackend) and isinstance(b2, FileBackend)
    assert b0.path == f"{tmp_path}/out.log" and b2.path == f"{tmp_path}/out.log.2"
    assert b2.describe() == f"file:{tmp_path}/out.log.2"
    b0.close()
    b2.close()
    assert sorted(os.listdir(tmp_path)) == ["out.log", "out.log.2"]


def test_file_directory_is_an_error(tmp_path) -> None:
    with pytest.raises(BackendError, match="cannot open"):
        open_backend(f"file:{tmp_path}", "dev", 0)


def test_file_parent_not_a_directory(tmp_path) -> None:
    # Unwritable even for root (the suite may run as root, where chmod does not bite).
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(BackendError, match="cannot open .*plain/x.log"):
        open_backend(f"file:{tmp_path}/plain/x.log", "dev", 0)
