"""The vfio-user side of the bridge without QEMU.

First the sans-I/O parts, fed bytes directly: the protocol module (well-formed,
truncated, malformed and out-of-order input), the PCI template and the INTx auto-mask
rule. Then the front over a real UNIX socket, with a small vfio-user client in Python
playing QEMU's part and a real ``remote-hw server`` process holding the UART: config
space answered locally, BAR accesses reaching the server, INTx through an eventfd, a
broken client closed alone while another is still served, and a dead or silent server
turning into a removed device (all ones) instead of a hang, and then coming back by
itself: a stopped and continued server resumes the live sessions (registers, the write
in flight, the interrupt line), a restarted one gives them new instances, without QEMU
reconnecting.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import struct
import time

import pytest

from remote_hw.bridge import vfio_user as vu
from remote_hw.bridge.front import Bridge, Target
from remote_hw.bridge.intx import IntxLine
from remote_hw.bridge.pci import CONFIG_REGION, TEMPLATES, ConfigSpace
from remote_hw.net.security import TlsConfig

from helpers import (
    backend_port,
    free_port,
    make_keys,
    read_until,
    start_server,
    wait_until,
)

SERIAL = TEMPLATES["pci-serial"]


# ------------------------------------------------------------------ sans-I/O helpers

def cmd(msg_id: int, command: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return vu.encode_command(msg_id, command, payload, flags)


def version(msg_id: int = 1, caps: dict | None = None, major: int = 0, minor: int = 1) -> bytes:
    doc = json.dumps({"capabilities": caps or {"max_msg_fds": 16}}).encode() + b"\0"
    return cmd(msg_id, vu.Command.VERSION, struct.pack("<HH", major, minor) + doc)


def ready_conn() -> vu.ServerConnection:
    conn = vu.ServerConnection()
    conn.receive_data(version())
    assert isinstance(conn.next_event(), vu.Version)
    return conn


def region_read(msg_id: int, region: int, offset: int, count: int) -> bytes:
    return cmd(msg_id, vu.Command.REGION_READ, vu.REGION_ACCESS.pack(offset, region, count))


def region_write(msg_id: int, region: int, offset: int, data: bytes) -> bytes:
    return cmd(msg_id, vu.Command.REGION_WRITE,
               vu.REGION_ACCESS.pack(offset, region, len(data)) + data)


# ------------------------------------------------------------------- the protocol

def test_version_handshake_negotiates_and_replies_with_json():
    conn = vu.ServerConnection()
    conn.receive_data(version(7, {"max_msg_fds": 16, "pgsizes": 4096}, minor=2))
    ev = conn.next_event()
    assert isinstance(ev, vu.Version)
    assert (ev.msg_id, ev.major, ev.minor) == (7, 0, 2)
    assert ev.capabilities == {"max_msg_fds": 16, "pgsizes": 4096}
    msg_id, command, flags, error, payload = vu.decode_reply(
        conn.version_reply(ev, {"max_msg_fds": 8}))
    assert (msg_id, command, flags, error) == (7, vu.Command.VERSION, vu.FLAG_REPLY, 0)
    major, minor = struct.unpack_from("<HH", payload)
    assert (major, minor) == (0, vu.VERSION_MINOR)  # never above what we speak
    assert payload.endswith(b"\0")
    assert json.loads(payload[4:-1]) == {"capabilities": {"max_msg_fds": 8}}
    assert conn.state is vu.State.READY


def test_messages_split_at_every_byte_give_the_same_events():
    stream = (version(1) + region_read(2, 0, 5, 1) + region_write(3, 7, 4, b"\x07\x01")
              + cmd(4, vu.Command.DEVICE_RESET))
    conn = vu.ServerConnection()
    events = []
    for i in range(len(stream)):
        conn.receive_data(stream[i:i + 1])
        while (ev := conn.next_event()) is not vu.NEED_DATA:
            events.append(ev)
    assert [type(e) for e in events] == [vu.Version, vu.RegionRead, vu.RegionWrite,
                                         vu.DeviceReset]
    assert events[1] == vu.RegionRead(2, False, 5, 0, 1)
    assert events[2] == vu.RegionWrite(3, False, 4, 7, 2, b"\x07\x01")


def test_a_truncated_message_waits_for_the_rest():
    conn = ready_conn()
    frame = region_read(9, 0, 0, 1)
    conn.receive_data(frame[:20])
    assert conn.next_event() is vu.NEED_DATA
    conn.receive_data(frame[20:])
    assert conn.next_event() == vu.RegionRead(9, False, 0, 0, 1)


@pytest.mark.parametrize("frame, words", [
    (region_read(2, 0, 0, 1), "first message must be VERSION"),
    (cmd(2, vu.Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0)),
     "first message must be VERSION"),
])
def test_commands_before_version_are_refused(frame, words):
    conn = vu.ServerConnection()
    conn.receive_data(frame)
    with pytest.raises(vu.VfioUserError, match=words):
        conn.next_event()
    assert conn.state is vu.State.CLOSED
    with pytest.raises(vu.VfioUserError, match="closed"):
        conn.next_event()  # nothing more is parsed once the stream is untrusted


@pytest.mark.parametrize("frame, words", [
    (version(5), "VERSION sent twice"),
    (region_read(2, 0, 0, 1)[:-1] + b"", None),  # only truncated: handled below
    (cmd(2, vu.Command.REGION_READ, vu.REGION_ACCESS.pack(0, 0, 1)[:-1]),
     "payload of 15 bytes, expected 16"),
    (cmd(2, vu.Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0) + b"x"),
     "payload of 17 bytes, expected 16"),
    (cmd(2, vu.Command.REGION_WRITE, vu.REGION_ACCESS.pack(0, 0, 4) + b"\x01"),
     "count 4 but 1 data bytes follow"),
    (region_read(2, 0, 0, vu.MAX_DATA_XFER + 1), "more than max_data_xfer_size"),
    (region_read(2, 0, 0, 1)[:8] + struct.pack("<II", 0x1, 0) + region_read(2, 0, 0, 1)[16:],
     "type 1 in a client message"),
    (region_read(2, 0, 0, 1)[:8] + struct.pack("<II", 0x40, 0) + region_read(2, 0, 0, 1)[16:],
     "unknown flag bits"),
    (struct.pack("<HHIII", 2, 9, 8, 0, 0), "smaller than the header"),
    (struct.pack("<HHIII", 2, 9, 1 << 30, 0, 0), "over the limit"),
    (cmd(2, vu.Command.DMA_READ, struct.pack("<QQ", 0, 8)),
     "server-to-client command sent by the client"),
    (cmd(2, vu.Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, 0x21 | 0x10, 0, 0, 1)),
     "exactly one DATA and one ACTION bit"),
    (cmd(2, vu.Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(21, 0x12, 0, 0, 2) + b"\x01"),
     "DATA_BOOL for 2 vectors with 1 data bytes"),
], ids=lambda v: v if isinstance(v, str) else ("truncated" if v is None else ""))
def test_malformed_and_out_of_order_messages_name_the_error(frame, words):
    conn = ready_conn()
    conn.receive_data(frame)
    if words is None:
        assert conn.next_event() is vu.NEED_DATA
        return
    with pytest.raises(vu.VfioUserError, match=words) as info:
        conn.next_event()
    assert info.value.msg_id in (2, 5)  # the error names the message
    assert conn.state is vu.State.CLOSED


def test_bad_version_data_and_major_are_refused():
    conn = vu.ServerConnection()
    conn.receive_data(cmd(1, vu.Command.VERSION, struct.pack("<HH", 0, 1) + b"{not json\0"))
    with pytest.raises(vu.VfioUserError, match="not JSON"):
        conn.next_event()
    conn = vu.ServerConnection()
    conn.receive_data(version(major=1))
    with pytest.raises(vu.VfioUserError, match="major version 1"):
        conn.next_event()


def test_unknown_commands_get_an_error_reply_and_the_stream_goes_on():
    conn = ready_conn()
    conn.receive_data(cmd(3, 99, b"abc") + cmd(4, vu.Command.DEVICE_FEATURE, b"\0" * 8)
                      + region_read(5, 7, 0, 4))
    ev = conn.next_event()
    assert isinstance(ev, vu.Unsupported) and ev.command == 99
    assert vu.decode_reply(conn.error_reply(ev, vu.ENOSYS)) == (
        3, 99, vu.FLAG_REPLY | vu.FLAG_ERROR, vu.ENOSYS, b"")
    ev = conn.next_event()
    assert isinstance(ev, vu.Unsupported) and ev.command == vu.Command.DEVICE_FEATURE
    assert conn.next_event() == vu.RegionRead(5, False, 0, 7, 4)


def test_no_reply_commands_get_no_reply():
    conn = ready_conn()
    conn.receive_data(region_write(3, 0, 0, b"A")[:8] + struct.pack("<II", vu.FLAG_NO_REPLY, 0)
                      + region_write(3, 0, 0, b"A")[16:])
    ev = conn.next_event()
    assert isinstance(ev, vu.RegionWrite) and ev.no_reply
    assert conn.reply(ev) == b""


def test_descriptors_go_with_their_message_and_stray_ones_are_returned():
    conn = ready_conn()
    irq = cmd(2, vu.Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(24, 0x24, 0, 0, 1))
    conn.receive_data(irq, [101])
    ev = conn.next_event()
    assert isinstance(ev, vu.SetIrqs)
    assert (ev.fds, ev.action, ev.data_type) == ((101,), vu.IRQ_SET_ACTION_TRIGGER,
                                                 vu.IRQ_SET_DATA_EVENTFD)
    conn.receive_data(region_read(3, 0, 0, 1), [102, 103])
    with pytest.raises(vu.VfioUserError, match="2 file descriptor"):
        conn.next_event()
    assert conn.close_fds() == [102, 103]  # for the caller to close


# ------------------------------------------------------------------ the PCI template

def test_pci_serial_template_is_qemus_pci_serial():
    cfg = ConfigSpace(SERIAL)
    vendor, device, command, status = struct.unpack("<HHHH", cfg.read(0, 8))
    assert (vendor, device, command, status) == (0x1B36, 0x0002, 0, 0)
    assert cfg.read(0x09, 3) == bytes([0x02, 0x00, 0x07])  # class 0x070002
    assert struct.unpack("<I", cfg.read(0x10, 4))[0] & 1 == 1  # BAR0 is an I/O BAR
    assert cfg.read(0x3D, 1) == b"\x01"  # INTA#
    assert SERIAL.region_info(0)[1] == 8  # 8 bytes, so Linux makes one port
    assert SERIAL.region_info(CONFIG_REGION)[1] == 256
    assert SERIAL.region_info(1) == (0, 0)
    assert SERIAL.irq_info(0) == (vu.IRQ_INFO_EVENTFD | vu.IRQ_INFO_MASKABLE
                                  | vu.IRQ_INFO_AUTOMASKED, 1)
    assert SERIAL.irq_info(1)[1] == 0  # no MSI


def test_mmio_serial_template_has_a_memory_bar_and_ids_8250_pci_binds():
    """mmio-serial: the UART behind a 16-byte memory BAR0 (QEMU posts writes to a
    memory BAR) with Realtek's RealManage ids, which 8250_pci's table maps to one
    16550 on BAR0; the BAR's type bits are read-only and say "memory, 32-bit"."""
    t = TEMPLATES["mmio-serial"]
    cfg = ConfigSpace(t)
    assert struct.unpack("<HH", cfg.read(0, 4)) == (0x10EC, 0x816A)
    assert cfg.read(0x09, 3) == bytes([0x02, 0x00, 0x07])  # class 0x070002
    assert struct.unpack("<I", cfg.read(0x10, 4))[0] & 0xF == 0  # memory, 32-bit
    cfg.write(0x10, struct.pack("<I", 0xFFFFFFFF))  # sizing: 16 bytes, type bits kept
    assert struct.unpack("<I", cfg.read(0x10, 4))[0] == 0xFFFFFFF0
    assert t.region_info(0)[1] == 16 and t.window == {0: 8}
    assert cfg.read(0x3D, 1) == b"\x01"  # INTA#


def test_config_writes_keep_only_writable_bits():
    cfg = ConfigSpace(SERIAL)
    cfg.write(0x00, b"\xff\xff\xff\xff")  # ids are read-only
    assert cfg.read(0, 4) == struct.pack("<HH", 0x1B36, 0x0002)
    cfg.write(0x04, struct.pack("<H", 0x0103))  # I/O + memory + SERR
    assert struct.unpack("<H", cfg.read(4, 2))[0] == 0x0103
    cfg.write(0x10, struct.pack("<I", 0xFFFFFFFF))  # BAR sizing: 8-byte I/O BAR
    assert struct.unpack("<I", cfg.read(0x10, 4))[0] == 0xFFFFFFF9
    cfg.write(0x10, struct.pack("<I", 0xC010))
    assert struct.unpack("<I", cfg.read(0x10, 4))[0] == 0xC011
    cfg.write(0x3C, b"\x0a\x00")  # line writable, pin not
    assert cfg.read(0x3C, 2) == b"\x0a\x01"
    assert cfg.read(0xFE, 4) == b"\x00\x00\xff\xff"  # past the end: all ones
    cfg.reset()
    assert cfg.read(0x04, 2) == b"\x00\x00"


# ------------------------------------------------------------------ the INTx rule

def test_intx_follows_vfios_auto_mask_rule():
    line = IntxLine()
    assert not line.set_level(True)  # no eventfd yet: nothing to signal
    assert line.enable()  # the line was already high: fire at once, now masked
    assert not line.set_level(True)  # masked: no second edge
    assert line.unmask()  # QEMU's EOI while still high: fire again
    assert not line.set_level(False)
    assert not line.unmask()  # low at EOI: nothing
    assert line.set_level(True)  # a new rise while unmasked fires
    line.mask()  # QEMU's own MASK
    assert not line.set_level(True)
    assert line.unmask()  # unmasked while high: fires
    line.disable()
    assert not line.set_level(True)
    assert line.triggers == 4


# ----------------------------------------------------- the front, over real sockets

class VfioClient:
    """A minimal vfio-user client (QEMU's part) over a UNIX socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.next_id = 1

    def call(self, command: int, payload: bytes = b"", fds: list[int] = (),
             flags: int = 0) -> tuple[int, int, bytes]:
        """Send a command, return (reply flags, errno, payload)."""
        msg_id = self.next_id
        self.next_id += 1
        frame = cmd(msg_id, command, payload, flags)
        if fds:
            self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", fds))])
        else:
            self.sock.sendall(frame)
        header = self._exact(vu.HEADER_SIZE)
        rid, rcmd, size, rflags, error = vu.HEADER.unpack(header)
        body = self._exact(size - vu.HEADER_SIZE)
        assert (rid, rcmd) == (msg_id, command)
        return rflags, error, body

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def handshake(self) -> None:
        flags, error, body = self.call(vu.Command.VERSION, struct.pack("<HH", 0, 1)
                                       + b'{"capabilities":{"max_msg_fds":16}}\0')
        assert flags == vu.FLAG_REPLY and error == 0

    def bar_read(self, offset: int) -> int:
        flags, error, body = self.call(vu.Command.REGION_READ,
                                       vu.REGION_ACCESS.pack(offset, 0, 1))
        assert flags == vu.FLAG_REPLY, error
        return body[16]

    def bar_write(self, offset: int, value: int) -> None:
        flags, error, _ = self.call(vu.Command.REGION_WRITE,
                                    vu.REGION_ACCESS.pack(offset, 0, 1) + bytes([value]))
        assert flags == vu.FLAG_REPLY, error

    def config(self, offset: int, count: int) -> bytes:
        flags, error, body = self.call(vu.Command.REGION_READ,
                                       vu.REGION_ACCESS.pack(offset, CONFIG_REGION, count))
        assert flags == vu.FLAG_REPLY, error
        return body[16:]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def uart_server():
    proc, port = start_server("uart0=uart16550")
    yield proc, port
    if proc.p.poll() is None:
        os.kill(proc.p.pid, signal.SIGCONT)
    proc.stop()


@pytest.fixture
def bridge(tmp_path, uart_server):
    _, port = uart_server
    b = Bridge(tmp_path / "uart.sock", Target("a", "uart0"), {"a": ("127.0.0.1", port)},
               SERIAL, timeout=1.0).start()
    yield b
    b.stop()


def test_front_answers_config_locally_and_forwards_bar0(bridge):
    c = VfioClient(str(bridge.socket_path))
    try:
        c.handshake()
        flags, _, body = c.call(vu.Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0))
        assert vu.DEVICE_INFO.unpack(body) == (16, vu.DEVICE_FLAGS_PCI | vu.DEVICE_FLAGS_RESET,
                                               9, 5)
        _, _, body = c.call(vu.Command.DEVICE_GET_REGION_INFO,
                            vu.REGION_INFO.pack(32, 0, 0, 0, 0, 0))
        assert vu.REGION_INFO.unpack(body)[4] == 8
        flags, error, _ = c.call(vu.Command.DEVICE_GET_REGION_INFO,
                                 vu.REGION_INFO.pack(32, 0, 42, 0, 0, 0))
        assert flags & vu.FLAG_ERROR and error == vu.EINVAL
        assert c.config(0, 4) == struct.pack("<HH", 0x1B36, 0x0002)
        # The UART's scratch register (offset 7) lives on the server.
        c.bar_write(7, 0x5A)
        assert c.bar_read(7) == 0x5A
        assert c.bar_read(5) == 0x60  # LSR at reset: THR empty, transmitter empty
        flags, error, _ = c.call(vu.Command.REGION_READ, vu.REGION_ACCESS.pack(6, 0, 4))
        assert flags & vu.FLAG_ERROR and error == vu.EINVAL  # past the 8-byte BAR
        flags, error, _ = c.call(77)
        assert flags & vu.FLAG_ERROR and error == vu.ENOSYS
        assert c.bar_read(7) == 0x5A  # still served after the error replies
    finally:
        c.close()


def test_posted_writes_in_one_burst_are_all_applied_in_order(bridge):
    """QEMU 11.1 posts BAR writes (NO_REPLY) without waiting: several arrive in one
    read. Each must reach the server in order, none may be answered, and the read
    that follows sees the last one."""
    c = VfioClient(str(bridge.socket_path))
    try:
        c.handshake()
        posted = b"".join(cmd(100 + i, vu.Command.REGION_WRITE,
                              vu.REGION_ACCESS.pack(7, 0, 1) + bytes([0x10 + i]),
                              vu.FLAG_NO_REPLY) for i in range(5))
        c.sock.sendall(posted + region_read(200, 0, 7, 1))
        header = c._exact(vu.HEADER_SIZE)
        msg_id, command, size, flags, _ = vu.HEADER.unpack(header)
        assert (msg_id, command, flags) == (200, vu.Command.REGION_READ, vu.FLAG_REPLY)
        assert c._exact(size - vu.HEADER_SIZE)[16] == 0x14  # the last write, the 5th
        device = bridge.sessions[1].device
        # Six accesses reached the server, the SCR writes posted (not waited for).
        assert device.forwarded == 6 and device.posted == 5
    finally:
        c.close()


def test_every_posted_bar_write_is_counted_however_it_arrives(bridge):
    """The figure the bridge logs at the end ("QEMU waited for no answer to N BAR
    writes") counts every NO_REPLY BAR write: the fast path's lone and batched ones,
    and also those in a read the fast path passes over (a message cut in two by the
    socket, as a loaded machine does), which the general decoder takes."""
    c = VfioClient(str(bridge.socket_path))
    try:
        c.handshake()
        posted = [cmd(100 + i, vu.Command.REGION_WRITE,
                      vu.REGION_ACCESS.pack(7, 0, 1) + bytes([0x20 + i]), vu.FLAG_NO_REPLY)
                  for i in range(6)]
        c.sock.sendall(posted[0])                  # lone
        c.sock.sendall(b"".join(posted[1:3]))      # a batch
        burst = b"".join(posted[3:])               # cut inside the 4th message
        c.sock.sendall(burst[:7])
        time.sleep(0.2)   # lets the bridge read the piece alone (a split, not a measure)
        c.sock.sendall(burst[7:])
        assert c.bar_read(7) == 0x25  # the last write, the 6th: all were applied
        c.bar_write(7, 0x55)          # one QEMU waits for: not counted
        session = bridge.sessions[1]
        assert session.unanswered == 6, session.unanswered
    finally:
        c.close()


def test_a_broken_client_is_closed_alone_and_vms_keep_their_own_instances(bridge):
    good, bad = VfioClient(str(bridge.socket_path)), VfioClient(str(bridge.socket_path))
    try:
        good.handshake()
        bad.handshake()
        assert sorted(wait_until(lambda: len(bridge.sessions) == 2 and bridge.sessions,
                                 "two sessions")) == [1, 2]
        good.bar_write(7, 0x11)
        bad.bar_write(7, 0x22)
        assert good.bar_read(7) == 0x11  # separate VM ids, separate instances
        assert bad.bar_read(7) == 0x22
        bad.sock.sendall(cmd(50, vu.Command.REGION_READ, b"\0" * 7))  # malformed
        bad.sock.settimeout(30)
        assert bad.sock.recv(100) == b""  # closed, with nothing sent
        wait_until(lambda: list(bridge.sessions) == [1], "the broken session to end")
        assert good.bar_read(7) == 0x11
        # The freed VM id is taken by the next QEMU, with a fresh instance.
        again = VfioClient(str(bridge.socket_path))
        again.handshake()
        assert again.bar_read(7) == 0x00
        again.close()
    finally:
        good.close()
        bad.close()


def _eventfd_fired(fd: int, timeout: float) -> bool:
    if not select.select([fd], [], [], timeout)[0]:
        return False
    os.eventfd_read(fd)
    return True


def test_interrupts_become_eventfd_triggers_with_auto_mask(bridge):
    c = VfioClient(str(bridge.socket_path))
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        c.handshake()
        flags, _, _ = c.call(vu.Command.DEVICE_SET_IRQS,
                             vu.IRQ_SET.pack(24, vu.IRQ_SET_DATA_EVENTFD
                                             | vu.IRQ_SET_ACTION_TRIGGER, 0, 0, 1), [efd])
        assert flags == vu.FLAG_REPLY
        assert not _eventfd_fired(efd, 0.2)
        c.bar_write(4, 0x08)  # MCR OUT2: the 16550's interrupt output enable on PCs
        c.bar_write(1, 0x02)  # IER: THR empty interrupt; THR is empty: the line rises
        assert _eventfd_fired(efd, 20)
        unmask = vu.IRQ_SET.pack(20, vu.IRQ_SET_DATA_NONE | vu.IRQ_SET_ACTION_UNMASK, 0, 0, 1)
        c.call(vu.Command.DEVICE_SET_IRQS, unmask)
        assert _eventfd_fired(efd, 20)  # still high at the EOI: triggered again
        assert c.bar_read(2) & 0x0F == 0x02  # IIR: THRE; reading it clears the cause
        c.call(vu.Command.DEVICE_SET_IRQS, unmask)
        assert not _eventfd_fired(efd, 0.5)  # low at the EOI: no trigger
        session = bridge.sessions[1]
        assert session.intx.triggers == 2 and session.intx.unmasks == 2
    finally:
        c.close()
        os.close(efd)


def _proc_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, T for stopped, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def test_a_dead_or_silent_server_reads_as_a_removed_device(bridge, uart_server):
    proc, _ = uart_server
    c = VfioClient(str(bridge.socket_path))
    try:
        c.handshake()
        c.bar_write(7, 0x42)
        assert c.bar_read(7) == 0x42
        os.kill(proc.p.pid, signal.SIGSTOP)  # silent: the link times out (1 s)
        # kill() returns before the stop takes hold: a request sent meanwhile would
        # still be answered.
        wait_until(lambda: _proc_state(proc.p.pid) == "T", "the server to stop")
        assert c.bar_read(7) == 0xFF
        assert c.bar_read(5) == 0xFF  # the link is down now: at once, no second wait
        # Killed while stopped: continued first, it could answer the link's reconnect.
        proc.stop(signal.SIGKILL)
        assert c.bar_read(0) == 0xFF
        c.bar_write(0, 0x41)  # dropped, and answered
        assert c.config(0, 2) == b"\x36\x1b"  # config space stays local
    finally:
        c.close()


def test_front_reaches_a_device_through_an_entry_server(tmp_path):
    """--via: requests name server b and go to entry a, which forwards them."""
    b_proc, b_port = start_server("uart0=uart16550", server_id="b")
    a_proc, a_port = start_server(server_id="a", extra=("--peer", f"b=127.0.0.1:{b_port}",
                                                        "--route", "uart0=b"))
    br = Bridge(tmp_path / "fwd.sock", Target("b", "uart0"), {"a": ("127.0.0.1", a_port)},
                SERIAL, vias={"b": "a"}, timeout=2.0).start()
    c = VfioClient(str(br.socket_path))
    try:
        c.handshake()
        c.bar_write(7, 0x77)
        assert c.bar_read(7) == 0x77
        assert c.bar_read(5) == 0x60
    finally:
        c.close()
        br.stop()
        a_proc.stop()
        b_proc.stop()


# ------------------------------------------- the link going away and coming back by itself

def _set_trigger(c: VfioClient) -> int:
    """Hand the bridge an INTx trigger eventfd, as QEMU does; returns it."""
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    flags, _, _ = c.call(vu.Command.DEVICE_SET_IRQS,
                         vu.IRQ_SET.pack(24, vu.IRQ_SET_DATA_EVENTFD
                                         | vu.IRQ_SET_ACTION_TRIGGER, 0, 0, 1), [efd])
    assert flags == vu.FLAG_REPLY
    return efd


UNMASK = vu.IRQ_SET.pack(20, vu.IRQ_SET_DATA_NONE | vu.IRQ_SET_ACTION_UNMASK, 0, 0, 1)


def _stop(proc) -> None:
    os.kill(proc.p.pid, signal.SIGSTOP)
    wait_until(lambda: _proc_state(proc.p.pid) == "T", "the server to stop")


def _continue(proc) -> None:
    os.kill(proc.p.pid, signal.SIGCONT)


@pytest.fixture
def uart_tcp(tmp_path):
    """A server whose uart0 has a tcp backend, and a bridge on it (timeout 1 s)."""
    proc, port = start_server("uart0=uart16550,backend=tcp:127.0.0.1:0")
    b = Bridge(tmp_path / "uart.sock", Target("a", "uart0"), {"a": ("127.0.0.1", port)},
               SERIAL, timeout=1.0).start()
    yield proc, b
    b.stop()
    if proc.p.poll() is None:
        os.kill(proc.p.pid, signal.SIGCONT)
    proc.stop()


def test_a_stopped_and_continued_server_resumes_the_live_session(uart_tcp):
    """The server is stopped (SIGSTOP) past the link timeout, then continued. Without
    QEMU reconnecting: while it is stopped the device reads as removed and raises no
    interrupt; then the link comes back by itself and resumes the session: the
    registers as they were, the write that was on its way applied once, the interrupt
    line that was high when the link went down raised again."""
    proc, bridge = uart_tcp
    c = VfioClient(str(bridge.socket_path))
    efd = -1
    try:
        c.handshake()
        efd = _set_trigger(c)
        backend = socket.create_connection(("127.0.0.1", backend_port(proc, "uart0")),
                                           timeout=10)
        for ch in b"before\n":
            c.bar_write(0, ch)  # THR
        assert read_until(backend, b"before\n") == b"before\n"
        c.bar_write(7, 0x42)  # SCR: state only the server's instance holds
        c.bar_write(4, 0x08)  # MCR OUT2
        c.bar_write(1, 0x02)  # IER THRE: the line rises (THR is empty)
        assert _eventfd_fired(efd, 20)
        # The line stays high (IIR not read) and masked until the guest's EOI.

        _stop(proc)
        c.bar_write(0, ord("!"))  # on its way when the link goes (posted or timed out)
        # SCR: read on the server, without side effects (LSR could be answered by the
        # bridge, from the device's shadow). No answer within 1 s: the link is down.
        assert c.bar_read(7) == 0xFF
        assert c.bar_read(5) == 0xFF  # at once now, shadow dropped: a removed device
        c.call(vu.Command.DEVICE_SET_IRQS, UNMASK)  # the guest's EOI
        assert not _eventfd_fired(efd, 0.5)  # a removed device raises nothing
        assert not bridge.link.up

        _continue(proc)
        wait_until(lambda: c.bar_read(7) == 0x42, "the device to answer again, as it was",
                   timeout=30, interval=0.05)
        rec = bridge.link.recovery
        assert rec is not None and rec.resumed == 1
        assert list(bridge.sessions) == [1]  # the same session, the same VM id
        # The server says the line's level again: high (THRE is still pending).
        assert _eventfd_fired(efd, 20)
        assert c.bar_read(2) & 0x0F == 0x02  # IIR: THRE
        for ch in b"after\n":
            c.bar_write(0, ch)
        # The "!" on its way when the server stopped arrived once.
        assert read_until(backend, b"after\n") == b"!after\n"
        backend.close()
    finally:
        c.close()
        if efd >= 0:
            os.close(efd)


def test_a_restarted_server_gives_the_live_session_a_new_instance(tmp_path):
    """The server is killed and started again on the same port: the session's device
    comes back in power-on state (as a re-plugged device), with no QEMU reconnect."""
    port = free_port()
    listen = ("--listen", f"127.0.0.1:{port}")
    proc, _ = start_server("uart0=uart16550", extra=listen)
    second = None
    bridge = Bridge(tmp_path / "uart.sock", Target("a", "uart0"), {"a": ("127.0.0.1", port)},
                    SERIAL, timeout=1.0).start()
    c = VfioClient(str(bridge.socket_path))
    try:
        c.handshake()
        c.bar_write(7, 0x42)
        assert c.bar_read(7) == 0x42
        proc.stop(signal.SIGKILL)
        wait_until(lambda: not bridge.link.up, "the link to see the server gone")
        assert c.bar_read(7) == 0xFF
        second, _ = start_server("uart0=uart16550", extra=listen)
        wait_until(lambda: c.bar_read(5) == 0x60, "the device to answer again (LSR)",
                   timeout=30, interval=0.05)
        assert c.bar_read(7) == 0x00  # power-on state: a new instance
        c.bar_write(7, 0x24)
        assert c.bar_read(7) == 0x24
        rec = bridge.link.recovery
        assert rec is not None and rec.resumed == 0 and rec.reconnects == 1
    finally:
        c.close()
        bridge.stop()
        proc.stop()
        if second is not None:
            second.stop()


def test_sessions_that_start_or_end_while_the_link_is_down(uart_server, tmp_path):
    """A session that ends while the server is stopped leaves its instance there (a
    resumed session still holds it); a QEMU that connects meanwhile gets a removed
    device. When the link is back the old instance is released first, then the new
    session, which took the same VM id, gets a fresh one and works."""
    proc, port = uart_server
    bridge = Bridge(tmp_path / "uart.sock", Target("a", "uart0"), {"a": ("127.0.0.1", port)},
                    SERIAL, timeout=1.0).start()
    bridge.link_wait = 0.5  # how long a new QEMU waits for the link: short, here
    first = VfioClient(str(bridge.socket_path))
    late = None
    try:
        first.handshake()
        first.bar_write(7, 0x11)
        assert first.bar_read(7) == 0x11
        _stop(proc)
        assert first.bar_read(7) == 0xFF  # the link times out
        first.close()  # ends while the link is down: its instance cannot be released
        wait_until(lambda: 1 not in bridge.sessions, "the first session to end")
        assert bridge._stale == {1}
        late = VfioClient(str(bridge.socket_path))
        late.handshake()  # answered although the link is down
        assert sorted(bridge.sessions) == [1]  # the same VM id
        assert late.bar_read(7) == 0xFF
        _continue(proc)
        wait_until(lambda: late.bar_read(5) == 0x60, "the late session's device",
                   timeout=30, interval=0.05)
        assert not bridge._stale
        assert late.bar_read(7) == 0x00  # a fresh instance, not the ended session's 0x11
        late.bar_write(7, 0x22)
        assert late.bar_read(7) == 0x22
        rec = bridge.link.recovery
        assert rec is not None and rec.resumed == 1
    finally:
        first.close()
        if late is not None:
            late.close()
        bridge.stop()


def test_a_cut_connection_to_an_entry_server_in_mutual_tls_is_resumed(tmp_path):
    """The bridge's TLS connection to the entry server ``a`` drops with both ends alive
    (a partition): the link resumes its session on a, whose route to b was kept, so
    the device on b is found as the guest left it."""
    keys = make_keys(tmp_path / "keys", ["a", "b"], ["client"])
    tls = ("--tls-dir", str(keys))
    b_proc, b_port = start_server("uart0=uart16550", server_id="b", extra=tls)
    a_proc, a_port = start_server(server_id="a", extra=(*tls, "--peer",
                                                        f"b=127.0.0.1:{b_port}",
                                                        "--route", "uart0=b"))
    br = Bridge(tmp_path / "fwd.sock", Target("b", "uart0"), {"a": ("127.0.0.1", a_port)},
                SERIAL, vias={"b": "a"}, tls=TlsConfig(keys, "client"), timeout=1.0,
                client_name="client").start()
    c = VfioClient(str(br.socket_path))
    try:
        c.handshake()
        c.bar_write(7, 0x5C)
        assert c.bar_read(7) == 0x5C
        for last in (0x5C, 0x5D):
            t = br.link._t
            assert t is not None
            t.shutdown()  # the connection drops under the link
            wait_until(lambda: not br.link.up, "the link to notice")
            wait_until(lambda v=last: c.bar_read(7) == v, "the device as it was",
                       timeout=30)
            c.bar_write(7, last + 1)
        rec = br.link.recovery
        assert rec is not None and rec.resumed == 2
    finally:
        c.close()
        br.stop()
        a_proc.stop()
        b_proc.stop()
