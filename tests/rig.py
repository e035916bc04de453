"""The several-hosts rig for tests: network namespaces from scripts/netns_rig.sh, an etcd.

Each test session gets its own namespace prefix and subnet (from the pid), so a rig
left over by a crashed run never collides, and teardown removes what it made.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import REPO, Proc

RIG = REPO / "scripts" / "netns_rig.sh"
ETCD = REPO / "scripts" / "etcd.sh"
HOST_INDEX = {"client": 10, "a": 11, "b": 12, "etcd": 13}


@dataclass
class Rig:
    prefix: str
    net: str

    def addr(self, host: str) -> str:
        return f"{self.net}.{HOST_INDEX[host]}"

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def cmd(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``host`` (inside its network namespace)."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(host, argv), capture_output=True, text=True,
                              timeout=30, **kw)


def rig_up() -> Rig:
    pid = os.getpid()
    rig = Rig(f"rh{pid % 100000}", f"10.77.{pid % 250}")
    subprocess.run(["bash", str(RIG), "up", rig.prefix, rig.net], check=True,
                   capture_output=True, text=True)
    return rig


def rig_down(rig: Rig) -> None:
    subprocess.run(["bash", str(RIG), "down", rig.prefix], capture_output=True)


class Etcd:
    """A real etcd on the rig's etcd host."""

    def __init__(self, rig: Rig, data_dir: Path) -> None:
        self.rig = rig
        self.url = f"http://{rig.addr('etcd')}:2379"
        self.proc = Proc(rig.cmd("etcd", ["bash", str(ETCD), rig.addr("etcd"),
                                          str(data_dir)]))
        deadline = time.monotonic() + 30
        while self.ctl("endpoint", "health").returncode != 0:
            if time.monotonic() > deadline or self.proc.p.poll() is not None:
                raise RuntimeError("etcd did not start:\n" + self.proc.output())
            time.sleep(0.2)

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return self.rig.run("etcd", ["etcdctl", f"--endpoints={self.url}", *args])

    def keys(self, prefix: str) -> list[str]:
        r = self.ctl("get", "--prefix", "--keys-only", prefix)
        return [k for k in r.stdout.split() if k]

    def stop(self) -> None:
        self.proc.stop()
