"""Issue 11, server side: one test per failure found by trying the server adversarially,
each reproducing the attack with real processes and sockets and asserting the bound
that must hold (an answer within one timeout, a connection closed, a line count), never
a speed figure.

* a client that stops reading (SIGSTOP, a shrunken receive buffer) stalls nobody;
* silent connections are refused beyond the limits and closed at the handshake
  deadline; a client that stops answering PINGs is closed at the idle timeout, a
  live idle one is not; running out of descriptors does not spin the accept loop;
* one client cannot attach more than its quota;
* peer text cannot forge log lines, 64 KB ERROR frames close the connection, 100 k
  unattached VM ids give a bounded number of lines and no memory growth;
* an i8042 reset request to a client without EVENTS is dropped with one line;
* (backends) tcp listens on loopback unless told otherwise, token=FILE, unix:PATH.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from remote_hw.backends.base import BackendError
from remote_hw.backends.registry import open_backend
from remote_hw.protocol import CLOSED
from remote_hw.protocol import messages as m

from helpers import Proc, RawClient, backend_port, make_keys, read_until, start_server, wait_until

TIMEOUT = 2.0   # "one timeout": what no other client may be made to wait


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _count(proc: Proc, text: str) -> int:
    return proc.output().count(text)


def _closed(c: RawClient, timeout: float) -> list:
    """Read until EOF (fail after ``timeout``); returns what arrived before it."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"connection still open after {timeout} s; got {got}"
        try:
            ev = c.next(timeout=left)
        except TimeoutError:
            continue
        if ev is CLOSED:
            return got
        got.append(ev)


# ------------------------------------------------------------------ failure 2

SLOW_CLIENT = r"""
import socket, sys
sys.path.insert(0, sys.argv[2])
from helpers import RawClient
c = RawClient(int(sys.argv[1]), name="slow", rcvbuf=4096)
for vm in range(1, 101):     # 100 VMs: each edge of the shared line is 100 frames
    assert c.attach(vm, "u").status == 0
print("attached", flush=True)
sys.stdin.read()     # never reads the socket again
"""


def test_a_client_that_stops_reading_stalls_nobody(tmp_path):
    """Failure 2: a stopped client attached to a shared device; another client's
    accesses that raise its interrupts, and anyone's ATTACH, are still answered
    within one timeout; the stopped client is disconnected with one reason (once it
    is behind, its levels are held, not queued: it is ended by --send-timeout)."""
    proc, port = start_server("u=uart16550,shared", "rtc0=cmos-rtc",
                              extra=("--max-queue", "32768", "--idle-timeout", "30",
                                     "--send-timeout", "2"))
    slow = subprocess.Popen([sys.executable, "-c", SLOW_CLIENT, str(port),
                             str(Path(__file__).parent)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    try:
        assert slow.stdout is not None and slow.stdout.readline().strip() == "attached"
        os.kill(slow.pid, signal.SIGSTOP)
        b = RawClient(port, name="busy")
        assert b.attach(1, "u").status == 0
        assert b.io(1, "u", 4, write=True, data=0x08).status == 0   # MCR: OUT2
        worst = 0.0
        toggles = 0
        gone_at = None
        stop = time.monotonic() + 30   # bounds a broken run only
        # Each toggle of IER.THRI raises and lowers the shared UART's line: two
        # INTERRUPT frames for the stopped client, which its socket soon stops taking.
        while time.monotonic() < stop and (gone_at is None or toggles < gone_at + 300):
            for ier in (0x02, 0x00):
                t0 = time.monotonic()
                fb = b.io(1, "u", 1, write=True, data=ier, timeout=TIMEOUT * 3)
                worst = max(worst, time.monotonic() - t0)
                assert fb.status == 0
            toggles += 1
            if gone_at is None and toggles % 50 == 0 and "does not read" in proc.output():
                gone_at = toggles
        assert worst < TIMEOUT, f"an access waited {worst:.2f} s for the stopped client"
        assert gone_at is not None, "the stopped client was never disconnected"
        assert _count(proc, "does not read what the server sends") == 1
        assert "--send-timeout 2" in proc.output()
        # ATTACH of the shared device and of another one: answered at once.
        c = RawClient(port, name="late")
        for dev in ("u", "rtc0"):
            t0 = time.monotonic()
            assert c.attach(7, dev, timeout=TIMEOUT).status == 0
            assert time.monotonic() - t0 < TIMEOUT
        b.close()
        c.close()
    finally:
        os.kill(slow.pid, signal.SIGCONT)
        slow.kill()
        slow.wait()
        proc.stop()


def test_a_client_that_fell_behind_gets_the_newest_levels_when_it_reads_again():
    """A client that stops reading for a while is not sent every edge it missed: once
    frames for it wait, its interrupt levels are held, and when it reads again it
    gets each line's newest level (a pulse where the line came back to the level it
    last had). It is not disconnected (within --send-timeout), and nobody waited."""
    proc, port = start_server("u=uart16550,shared", extra=("--send-timeout", "60"))
    slow = RawClient(port, name="slow", rcvbuf=4096)
    try:
        vms = range(1, 51)
        for vm in vms:
            assert slow.attach(vm, "u").status == 0
        # From here the test does not read `slow` until the end.
        b = RawClient(port, name="busy")
        assert b.attach(1, "u").status == 0
        assert b.io(1, "u", 4, write=True, data=0x08).status == 0   # MCR: OUT2
        toggles = 10000
        for _ in range(toggles):
            for ier in (0x02, 0x00):
                assert b.io(1, "u", 1, write=True, data=ier, timeout=TIMEOUT).status == 0
        # The line ends high (THR empty and THRI enabled): the newest level is 1.
        assert b.io(1, "u", 1, write=True, data=0x02, timeout=TIMEOUT).status == 0
        edges = 2 * toggles + 1
        # Read everything now; count the levels per VM and keep the last.
        last: dict[int, int] = {}
        frames = 0
        while True:
            try:
                ev = slow.next(timeout=1.5)
            except TimeoutError:
                break
            assert ev is not CLOSED, "the slow client was disconnected"
            if isinstance(ev, m.Interrupt):
                frames += 1
                last[ev.vm_id] = ev.level
        assert last == {vm: 1 for vm in vms}, "a VM did not get its line's newest level"
        # What the kernel took before the server saw the peer fall behind (64 KiB
        # unsent) arrives as it was; the rest was held: ~3 500 frames of 1 000 050
        # here (~140 000 when only the server's own queue counted: the kernel's send
        # buffer grows to 4 MiB before a write blocks).
        print(f"{frames} INTERRUPT frames for {edges * len(vms)} edges")
        assert frames < edges * len(vms) // 40, (frames, edges * len(vms))
        assert slow.attach(99, "u", timeout=TIMEOUT).status == 0   # still served
        assert "does not read" not in proc.output()
        b.close()
    finally:
        slow.close()
        proc.stop()


def test_attach_is_answered_while_a_stopped_client_socket_is_full():
    """Failure 2 as reported, with the server's defaults: the stopped client's socket
    fills (~10 MB of interrupts for it); neither another client's access nor an
    ATTACH (registry lock, then the instance lock) waits for it. (Before the outbox,
    the access that raised the interrupt blocked in the stopped client's send.)"""
    proc, port = start_server("u=uart16550,shared", "rtc0=cmos-rtc")
    slow = subprocess.Popen([sys.executable, "-c", SLOW_CLIENT, str(port),
                             str(Path(__file__).parent)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    try:
        assert slow.stdout is not None and slow.stdout.readline().strip() == "attached"
        os.kill(slow.pid, signal.SIGSTOP)
        b = RawClient(port, name="busy")
        assert b.attach(1, "u").status == 0
        b.io(1, "u", 4, write=True, data=0x08)
        for i in range(2000):
            for ier in (0x02, 0x00):
                assert b.io(1, "u", 1, write=True, data=ier, timeout=TIMEOUT).status == 0
            if i % 500 == 499:
                c = RawClient(port, name=f"late{i}")
                assert c.attach(2, "rtc0", timeout=TIMEOUT).status == 0
                c.close()
        assert _count(proc, "does not read what the server sends") <= 1
        b.close()
    finally:
        os.kill(slow.pid, signal.SIGCONT)
        slow.kill()
        slow.wait()
        proc.stop()


# ------------------------------------------------------------------ failure 4

def test_silent_connections_are_refused_and_closed_and_others_get_in():
    """Failure 4: 1,000 connections that never say HELLO, from one address. Beyond
    --max-per-peer they are refused at once with an ERROR and cost no thread; the
    admitted ones are closed at the handshake deadline; a client from another
    address connects meanwhile; the log does not grow a line per connection."""
    # The deadline is long enough that the 40 admitted ones are still held when the
    # 1001st comes (on one slow CPU, making 1,000 connections took over 3 s, and the
    # late one was admitted in a freed place instead of refused).
    handshake = 8
    proc, port = start_server("rtc0=cmos-rtc", extra=(
        "--max-per-peer", "40", "--max-connections", "100",
        "--handshake-timeout", str(handshake)))
    pid = proc.p.pid
    socks: list[socket.socket] = []
    try:
        for _ in range(1000):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", port))
            socks.append(s)
        # A refused one is told why. The server refuses the 960 queued before it first
        # (~0.3 s here, seconds on a loaded machine): the wait is for the ERROR, not a
        # measure of speed, and the refusal's text below tells it from the handshake
        # deadline's.
        late = RawClient(port, source="127.0.0.2", hello=False)
        err = _closed(late, 10 * TIMEOUT)
        assert err and isinstance(err[0], m.Error) and err[0].code == m.ErrorCode.DENIED
        assert "--max-per-peer 40" in err[0].text
        assert _threads(pid) < 40 + 20
        # Another address gets in while the silent ones are held.
        c = RawClient(port, name="ok", timeout=TIMEOUT)
        assert c.attach(1, "rtc0", timeout=TIMEOUT).status == 0
        # The 40 admitted silent ones are closed at the deadline, with an ERROR; the
        # refused ones were closed at once. A socket still open past the deadline
        # (a timeout here) is not counted as closed.
        closed = 0
        for s in socks:
            s.settimeout(handshake + 20.0)
            try:
                data = s.recv(4096)
                while data:
                    data = s.recv(4096)
                closed += 1
            except TimeoutError:
                pass
            except OSError:   # reset: closed with data unread
                closed += 1
        assert closed == len(socks)
        # Each closed with a line, rate-limited with a count (a flood of them must not
        # flood the log).
        assert 1 <= _count(proc, f"no HELLO within {handshake} s") <= 12
        assert _count(proc, "refused: too many connections") <= 12   # rate-limited
        assert c.io(1, "rtc0", 1, timeout=TIMEOUT).status == 0      # still served
    finally:
        for s in socks:
            s.close()
        proc.stop()


def test_handshake_deadline_covers_the_tls_handshake(tmp_path):
    """Failure 4 with TLS: a connection that never starts TLS, and one that completes
    TLS but never says HELLO, are both closed at the deadline; a real client gets in."""
    import ssl

    from remote_hw.net import security
    from remote_hw.net.link import ServerLink
    make_keys(tmp_path, ["a"], ["c1"])
    proc, port = start_server("rtc0=cmos-rtc", extra=(
        "--tls-dir", str(tmp_path), "--handshake-timeout", "1"))
    try:
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)
        tls = security.TlsConfig(tmp_path, "c1")
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        mute = tls.client_context().wrap_socket(raw, server_hostname="a")
        t0 = time.monotonic()
        assert silent.recv(100) == b""
        with pytest.raises((ssl.SSLError, OSError)):
            if mute.recv(100) == b"":
                raise OSError("closed")
        assert time.monotonic() - t0 < 4.0
        link = ServerLink("a", ("127.0.0.1", port), client_name="c1", tls=tls).connect()
        try:
            assert link.attach(1, "rtc0") == 0
        finally:
            link.close()
        # The silent one is ended by the watchdog or by the TLS handshake's own
        # timeout (the same deadline), whichever comes first; the mute one by the
        # watchdog.
        assert 1 <= _count(proc, "no HELLO within 1 s") <= 2
        assert _count(proc, "no HELLO within 1 s") + _count(proc, "TLS handshake failed") == 2
    finally:
        proc.stop()


def test_idle_timeout_closes_a_client_that_stops_answering_pings():
    """Failure 4 (idle): after HELLO, a peer that answers nothing is PINGed and then
    closed at --idle-timeout; a real link idle for longer is kept, answering PINGs."""
    from remote_hw.net.link import ServerLink
    proc, port = start_server("rtc0=cmos-rtc", extra=("--idle-timeout", "1.5"))
    try:
        mute = RawClient(port, name="mute")
        link = ServerLink("a", ("127.0.0.1", port)).connect()
        try:
            assert link.attach(1, "rtc0") == 0
            t0 = time.monotonic()
            got = _closed(mute, 5.0)
            assert time.monotonic() - t0 < 4.0
            assert any(isinstance(e, m.Ping) for e in got)
            assert isinstance(got[-1], m.Error) and "nothing received" in got[-1].text
            time.sleep(1.0)   # the link has now been idle for > 1.5 s
            assert link.io(1, "rtc0", 0, 1, 1, 0)[0] == 0
        finally:
            link.close()
        assert _count(proc, "nothing received for") == 1
    finally:
        proc.stop()


def test_accept_backs_off_when_descriptors_run_out():
    """Failure 4 (EMFILE): with its descriptors used up, the server waits before
    accepting again instead of spinning, keeps serving its sessions, logs once, and
    accepts new clients once descriptors are free."""
    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    proc = Proc([sys.executable, "-m", "remote_hw.cli", "server", "--listen",
                 "127.0.0.1:0", "--no-mount", "--device", "rtc0=cmos-rtc",
                 "--handshake-timeout", "2.5", "--max-per-peer", "500",
                 "--max-connections", "500"], preexec_fn=low_fd_limit)
    port = int(proc.wait_for(r"listening on [\d.]+:(\d+)").group(1))
    socks: list[socket.socket] = []
    try:
        c = RawClient(port, name="ok")
        assert c.attach(1, "rtc0").status == 0
        for _ in range(80):
            s = socket.socket()
            s.connect(("127.0.0.1", port))   # queued in the backlog once fds run out
            socks.append(s)
        proc.wait_for("accept failed: Too many open files", timeout=5)
        cpu0, t0 = _cpu_seconds(proc.p.pid), time.monotonic()
        for _ in range(20):
            assert c.io(1, "rtc0", 1, timeout=TIMEOUT).status == 0
            time.sleep(0.05)
        used = _cpu_seconds(proc.p.pid) - cpu0
        assert used < 0.5 * (time.monotonic() - t0), f"accept loop spins ({used:.2f} s CPU)"
        for s in socks:
            s.close()
        socks.clear()
        late = RawClient(port, name="late", timeout=8.0)   # descriptors free again
        assert late.attach(2, "rtc0", timeout=TIMEOUT).status == 0
        assert _count(proc, "accept failed") == 1
    finally:
        for s in socks:
            s.close()
        proc.stop()


# ------------------------------------------------------------------ failure 5

def test_one_client_cannot_take_every_instance(tmp_path):
    """Failure 5: 1,500 VM ids attaching a file-backed UART from one client stop at
    the quota with DENIED and an ERROR naming it; another client's attach works."""
    proc, port = start_server(f"u=uart16550,backend=file:{tmp_path}/u.out",
                              extra=("--max-instances-per-client", "200"))
    try:
        c = RawClient(port, name="greedy")
        out = b""
        for vm in range(1, 1501):
            out += c.conn.send(m.Attach(request_id=vm, vm_id=vm, client_id=0,
                                        server_id="", device_id="u"))
        c.sock.sendall(out)
        statuses: dict[int, int] = {}
        errors = []
        while len(statuses) < 1500 or len(errors) < 1300:
            ev = c.next(timeout=20)
            if isinstance(ev, m.Feedback):
                statuses[ev.request_id] = ev.status
            elif isinstance(ev, m.Error):
                errors.append(ev)
        assert sum(1 for s in statuses.values() if s == m.Status.OK) == 200
        assert all(statuses[vm] == m.Status.DENIED for vm in range(201, 1501))
        assert len(errors) == 1300 and "--max-instances-per-client 200" in errors[0].text
        other = RawClient(port, name="other")
        assert other.attach(1, "u", timeout=TIMEOUT).status == m.Status.OK
        # Detaching gives the quota back.
        rid = c.rid()
        c.send(m.Detach(request_id=rid, vm_id=1, client_id=0))
        assert c.reply(rid).status == 0
        assert c.attach(5000, "u").status == m.Status.OK
        assert _count(proc, "--max-instances-per-client 200") <= 12
    finally:
        proc.stop()


# ------------------------------------------------------------------ failure 6

def test_peer_text_cannot_forge_a_log_line():
    proc, port = start_server("rtc0=cmos-rtc")
    try:
        c = RawClient(port, name="forger")
        forged = "remote-hw INFO remote_hw.server: 127.0.0.1:1: client 99 (admin) connected"
        c.send(m.Error(request_id=0, code=m.ErrorCode.INTERNAL,
                       text="oops\n" + forged + "\r\x1b[2J"))
        assert c.attach(1, "rtc0").status == 0   # an ERROR alone is not fatal
        line = proc.wait_for("peer reported error").string
        assert "oops\\n" + forged + "\\r\\x1b[2J" in line
        assert not any(ln.startswith(forged) for ln in proc.output().splitlines())
    finally:
        proc.stop()


def test_an_oversized_error_frame_closes_the_connection():
    proc, port = start_server("rtc0=cmos-rtc")
    try:
        c = RawClient(port, name="big")
        c.send(m.Error(request_id=0, code=m.ErrorCode.INTERNAL, text="x" * 65000))
        assert _closed(c, TIMEOUT) == []    # no ERROR answers an ERROR
        proc.wait_for("sent an ERROR with 65000 bytes of text")
        assert "x" * 300 not in proc.output()
    finally:
        proc.stop()


def test_100k_unattached_vm_ids_give_few_lines_and_no_memory_growth():
    proc, port = start_server("u=uart16550")
    pid = proc.p.pid
    try:
        c = RawClient(port, name="flood")
        # Warm up (first allocations of the read path), then measure.
        def burst(first: int, n: int) -> None:
            out = b"".join(c.conn.send(m.IoRequest(
                request_id=vm, vm_id=vm, client_id=0, offset=0, data=0, kind=0, size=1,
                direction=0, hops=0, server_id="", device_id="u"))
                for vm in range(first, first + n))
            c.sock.sendall(out)
            seen = 0
            while seen < n:
                ev = c.next(timeout=20)
                if isinstance(ev, m.Feedback):
                    assert ev.status == m.Status.NOT_ATTACHED
                    seen += 1
        burst(1, 5000)
        before = _rss_kib(pid)
        for first in range(10001, 110001, 5000):
            burst(first, 5000)
        grown = _rss_kib(pid) - before
        assert grown < 3 * 1024, f"RSS grew by {grown} KiB"
        assert _count(proc, "which it has not attached") <= 12
        assert c.attach(1, "u").status == 0
    finally:
        proc.stop()


# ------------------------------------------------------------------ failure 7

def test_i8042_reset_request_without_events_is_dropped_with_one_line():
    proc, port = start_server("kbd0=i8042")
    try:
        c = RawClient(port, name="old", features=0)
        assert c.attach(1, "kbd0").status == 0
        for _ in range(3):
            fb = c.io(1, "kbd0", 4, write=True, data=0xFE, timeout=TIMEOUT)
            assert fb.status == m.Status.OK
        assert not any(isinstance(e, m.Event) for e in c.events)
        proc.wait_for("event reset-request dropped: the client did not negotiate EVENTS")
        out = proc.output()
        assert _count(proc, "did not negotiate EVENTS") == 1
        assert "Traceback" not in out and "LocalProtocolError" not in out
        # With EVENTS the request still arrives as before.
        e = RawClient(port, name="new")
        assert e.attach(1, "kbd0").status == 0
        assert e.io(1, "kbd0", 4, write=True, data=0xFE).status == 0
        if not e.events:
            e.events.append(e.next(timeout=TIMEOUT))
        assert any(isinstance(ev, m.Event) and ev.name == "reset-request"
                   for ev in e.events)
    finally:
        proc.stop()


# ------------------------------------------------------------------ failure 9

def test_tcp_backend_listens_on_loopback_unless_told(caplog):
    for arg in ("0", ":0"):
        b = open_backend(f"tcp:{arg}", "u")
        try:
            assert b.address[0] == "127.0.0.1"   # type: ignore[attr-defined]
        finally:
            b.close()
    caplog.clear()
    b = open_backend("tcp:0.0.0.0:0", "u")
    b.close()
    assert "anyone who can reach that address can type into the VM" in caplog.text


def _token_file(tmp_path: Path, mode: int = 0o600) -> Path:
    t = tmp_path / "token"
    t.write_text("s3cret-token\n")
    t.chmod(mode)
    return t


def test_token_file_readable_by_others_is_refused(tmp_path):
    with pytest.raises(BackendError, match="readable by others"):
        open_backend(f"tcp:0,token={_token_file(tmp_path, 0o644)}", "u")


def test_tcp_backend_token_keeps_strangers_out(tmp_path):
    """Failure 9: with token=FILE, a peer without the token neither types into the
    guest nor sees its output; with it, both directions work."""
    token = _token_file(tmp_path)
    proc, port = start_server(f"u=uart16550,backend=tcp:127.0.0.1:0,token={token}")
    try:
        c = RawClient(port, name="vm")
        assert c.attach(1, "u").status == 0
        bport = backend_port(proc, "u")
        for tx in b"hi":
            c.io(1, "u", 0, write=True, data=tx)      # guest output before anyone came
        stranger = socket.create_connection(("127.0.0.1", bport), timeout=5)
        stranger.sendall(b"guess\r\ntyped by a stranger\r\n")
        assert read_until(stranger, b"wrong token").find(b"hi") < 0
        proc.wait_for("peer refused: a wrong token")
        assert c.io(1, "u", 5).data & 0x01 == 0       # LSR: nothing received
        stranger.close()
        owner = socket.create_connection(("127.0.0.1", bport), timeout=5)
        owner.sendall(b"s3cret-token\nk")
        assert b"hi" in read_until(owner, b"hi")
        wait_until(lambda: c.io(1, "u", 5).data & 0x01, "the byte to reach the guest")
        assert c.io(1, "u", 0).data == ord("k")
        owner.close()
    finally:
        proc.stop()


def test_unix_backend_has_file_permissions(tmp_path):
    """Failure 9: a unix:PATH backend is a socket only its owner (by default) can
    connect to; another user is refused by the kernel; the owner types into the VM."""
    # A directory every user can reach (pytest's tmp_path is not), so only the
    # socket's own mode keeps another user out.
    public = Path(tempfile.mkdtemp(prefix="rh-unix-"))
    public.chmod(0o755)
    path = public / "uart.sock"
    proc, port = start_server(f"u=uart16550,backend=unix:{path}")
    try:
        c = RawClient(port, name="vm")
        assert c.attach(1, "u").status == 0
        proc.wait_for(r"u: backend unix:")
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        nobody = subprocess.run(
            ["/usr/bin/python3", "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); "
             "s.connect(sys.argv[1])", str(path)],
            user=65534, capture_output=True, text=True, timeout=10)
        assert nobody.returncode != 0 and "Permission denied" in nobody.stderr
        owner = socket.socket(socket.AF_UNIX)
        owner.connect(str(path))
        owner.sendall(b"z")
        wait_until(lambda: c.io(1, "u", 5).data & 0x01, "the byte to reach the guest")
        assert c.io(1, "u", 0).data == ord("z")
        c.io(1, "u", 0, write=True, data=ord("!"))
        assert read_until(owner, b"!")
        owner.close()
        nobody_ok = subprocess.run(["/usr/bin/python3", "-c", "import os,sys; "
                                    "print(os.access(sys.argv[1], os.X_OK))", str(public)],
                                   user=65534, capture_output=True, text=True, timeout=10)
        assert nobody_ok.stdout.strip() == "True"   # the directory did not stop it
    finally:
        proc.stop()
    assert not path.exists(), proc.output()   # removed with its instance
    public.rmdir()


def test_unix_backend_mode_group_and_stale_socket(tmp_path):
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                           # a socket file nobody listens on
    b = open_backend(f"unix:{path},mode=0660,group=0", "u")
    try:
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 0
        with pytest.raises(BackendError, match="in use"):
            open_backend(f"unix:{path}", "u")
    finally:
        b.close()
    path.write_text("not a socket")
    with pytest.raises(BackendError, match="not a socket"):
        open_backend(f"unix:{path}", "u")
    with pytest.raises(BackendError, match="unknown option"):
        open_backend(f"unix:{tmp_path}/x,colour=blue", "u")
