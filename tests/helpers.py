"""Test helpers shared by several test files: real remote-hw processes and their
output, polling with a deadline, free ports, a pty pair, and the fakes that stand in
for a device's interrupt line and for a link's interrupt callback.

Kept in one module so a fix reaches every test that uses them; a fake only one file
needs stays in that file."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def remote_hw_cmd(*args: str) -> list[str]:
    """The command line that runs this checkout's remote-hw with this interpreter."""
    return [sys.executable, "-m", "remote_hw.cli", *args]


class Proc:
    """A child process whose stdout and stderr are collected line by line."""

    def __init__(self, argv: list[str], **kw) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("PYTHONPATH", str(REPO))
        self.argv = argv
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, text=True, env=env, cwd=REPO,
                                  **kw)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        for stream in (self.p.stdout, self.p.stderr):
            threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match:
        """Wait for an output line matching ``pattern``; fail with the output so far."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    mt = rx.search(line)
                    if mt:
                        return mt
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and seen == len(self.lines)):
                    if self.p.poll() is not None:
                        time.sleep(0.1)  # let the pumps drain
                        for line in self.lines[seen:]:
                            mt = rx.search(line)
                            if mt:
                                return mt
                    raise AssertionError(f"no line matching {pattern!r} from {self.argv}; "
                                         f"output:\n" + "\n".join(self.lines))
                self._cond.wait(min(left, 0.2))

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait(self, timeout: float = 30.0) -> int:
        return self.p.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                return self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
        return self.p.wait(timeout)


def start_server(*device_args: str, server_id: str = "a", extra: tuple[str, ...] = ()
                 ) -> tuple[Proc, int]:
    """Start ``remote-hw server`` on a free loopback port; returns (proc, port)."""
    # No FUSE view unless a test asks for one: test servers share the default mount path.
    argv = ["server", "--listen", "127.0.0.1:0", "--server-id", server_id, "--no-mount",
            *extra]
    for d in device_args:
        argv += ["--device", d]
    proc = Proc(remote_hw_cmd(*argv))
    port = int(proc.wait_for(r"listening on [\d.]+:(\d+)").group(1))
    return proc, port


def backend_port(proc: Proc, device: str, index: int = 0) -> int:
    """The TCP port a server's stream backend for ``device`` listens on."""
    label = device if index == 0 else f"{device}#{index}"
    return int(proc.wait_for(rf"{re.escape(label)}: backend tcp:[\d.]+:(\d+)").group(1))


def read_until(sock: socket.socket, needle: bytes, timeout: float = 20.0) -> bytes:
    """Read from ``sock`` until ``needle`` has arrived; fail with what came instead."""
    sock.settimeout(0.5)
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        if time.monotonic() > deadline:
            raise AssertionError(f"waited for {needle!r}, got {buf!r}")
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            raise AssertionError(f"connection closed while waiting for {needle!r}; got {buf!r}")
        buf += chunk
    return buf


def wait_until(pred, what: str, timeout: float = 20.0, interval: float = 0.02):
    """Poll ``pred`` until it returns something true and return that; fail naming
    ``what`` after ``timeout`` seconds (the deadline only bounds a broken run)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A loopback TCP port nobody listened on a moment ago."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


class Pty:
    """A pty pair; ``path`` is the tty side a backend opens, ``master`` the far end."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        os.close(slave)     # the backend opens its own; devpts keeps the node for it

    def read(self, n: int, timeout: float = 10.0) -> bytes:
        """Exactly ``n`` bytes from the master side; fail with what came instead."""
        out = b""
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"waited for {n} bytes on the pty, got {out!r}")
            if select.select([self.master], [], [], left)[0]:
                out += os.read(self.master, n - len(out))
        return out

    def close(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


class RecordingIrq:
    """A device's interrupt line that records every ``set_level`` call, so tests see
    each edge and not just the last level."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    @property
    def level(self) -> bool:
        return self.calls[-1] if self.calls else False

    def set_level(self, level: bool) -> None:
        self.calls.append(bool(level))


def until_ok(fn, what: str, timeout: float = 15.0):
    """Call ``fn`` until its status (or the first item of what it returns) is OK, and
    return that: a link coming back by itself. Fails naming ``what`` (and the last
    status) after ``timeout`` seconds; the deadline only bounds a broken run."""
    from remote_hw.protocol.messages import Status
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        status = result[0] if isinstance(result, tuple) else result
        if status == Status.OK:
            return result
        assert time.monotonic() < deadline, f"{what}: still {Status(status).name}"
        time.sleep(0.05)


class InterruptRecorder:
    """A link's ``on_interrupt`` callback: records ``(vm, device, line, level)`` and
    lets a test wait for one of them (the link calls it from its reader thread)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, int, bool]] = []
        self.cond = threading.Condition()

    def __call__(self, vm: int, dev: str, line: int, level: bool, client_id: int = 0) -> None:
        with self.cond:
            self.seen.append((vm, dev, line, level))
            self.cond.notify_all()

    def wait_for(self, item: tuple[int, str, int, bool], timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: item in self.seen, timeout)


class RawClient:
    """A protocol client on a bare socket, for tests that must misbehave on purpose
    (not answer PINGs, stop reading, send what a real link never would). It speaks
    through a sans-I/O ``Connection``, so what it sends is valid unless it says so.
    """

    def __init__(self, port: int, *, features: int | None = None, name: str = "raw",
                 source: str | None = None, rcvbuf: int | None = None,
                 hello: bool = True, timeout: float = 10.0) -> None:
        from remote_hw.protocol import Connection, Role
        from remote_hw.protocol import messages as m
        self.m = m
        self.sock = socket.socket()
        if rcvbuf is not None:   # before connect, so the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.conn = Connection(Role.CLIENT)
        self.events: list = []
        self._rid = 0
        if hello:
            kw = {} if features is None else {"features": features}
            self.send(m.Hello(name=name, **kw))
            welcome = self.next()
            assert isinstance(welcome, m.Welcome), welcome

    def send(self, msg) -> None:
        self.sock.sendall(self.conn.send(msg))

    def next(self, timeout: float | None = None):
        """The next message (interrupts included), or CLOSED at EOF."""
        from remote_hw.protocol import NEED_DATA
        if timeout is not None:
            self.sock.settimeout(timeout)
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            self.conn.receive_data(data)

    def reply(self, rid: int, timeout: float | None = None):
        """The FEEDBACK (or ERROR) for request ``rid``; other messages are kept in
        ``events``."""
        m = self.m
        while True:
            ev = self.next(timeout)
            if isinstance(ev, (m.Feedback, m.Error)) and ev.request_id == rid:
                return ev
            self.events.append(ev)

    def rid(self) -> int:
        self._rid += 1
        return self._rid

    def attach(self, vm: int, device: str, timeout: float | None = None):
        rid = self.rid()
        self.send(self.m.Attach(request_id=rid, vm_id=vm, client_id=0, server_id="",
                                device_id=device))
        return self.reply(rid, timeout)

    def io(self, vm: int, device: str, offset: int, size: int = 1, write: bool = False,
           data: int = 0, timeout: float | None = None):
        rid = self.rid()
        self.send(self.m.IoRequest(request_id=rid, vm_id=vm, client_id=0, offset=offset,
                                   data=data, kind=0, size=size, direction=int(write),
                                   hops=0, server_id="", device_id=device))
        return self.reply(rid, timeout)

    def close(self) -> None:
        self.sock.close()


def make_keys(directory: Path, servers: Iterable[str] = (), clients: Iterable[str] = ()
              ) -> Path:
    """A CA in ``directory`` and a certificate for each server and client name (the
    layout ``--tls-dir`` reads); returns ``directory``."""
    from remote_hw.net import security
    security.init_ca(directory)
    for name in servers:
        security.issue(directory, name, "server")
    for name in clients:
        security.issue(directory, name, "client")
    return directory
