"""Test helpers: real remote-hw processes and their output."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
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
        except socket.timeout:
            continue
        if not chunk:
            raise AssertionError(f"connection closed while waiting for {needle!r}; got {buf!r}")
        buf += chunk
    return buf
