"""A network partition between a VM and its server, on the rig (issue 11).

client ──TLS──► server a, and the client's port on the rig's bridge set down for 4 s
(``ip link set ... down`` in the bridge's namespace: the hosts see nothing but
silence, as with a cable pulled between switches).

* ``--timeout 10``: the access in flight waits through the partition (TCP delivers it
  afterwards) and the guest goes on: 0 bytes lost, 0 doubled.
* ``--timeout 2``: the access in flight ends at its deadline, the device reads as
  removed, and when the partition heals the link resumes its session and retries
  that write under its request id: applied once (nothing doubled). Run twice: with
  the default send buffers the deadline finds a write waiting for its answer; with
  small ones it finds POSTs being sent, which are kept and sent again.

Real processes and guests, mutual TLS; asserts correctness, not speed.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from helpers import Proc, make_keys, remote_hw_cmd, wait_until
from rig import rig_down, rig_up
from seqstream import judge, outages, sequence_guest

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.netns]

PARTITION = 4.0


@pytest.fixture(scope="module")
def rig():
    r = rig_up()
    yield r
    rig_down(r)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"), ["a"], ["c1"])


def client_port(rig) -> str:
    """The client's veth end on the bridge (scripts/netns_rig.sh names it)."""
    return f"{rig.prefix[:10]}0p"


def link_state(rig, state: str) -> None:
    subprocess.run(["ip", "-n", f"{rig.prefix}-lan", "link", "set", client_port(rig), state],
                   check=True, capture_output=True)


def tcp_wmem(rig, value: str) -> str:
    """Set the client namespace's ``net.ipv4.tcp_wmem`` (through procfs: a fresh
    machine may have no sysctl binary); return what it was."""
    path = "/proc/sys/net/ipv4/tcp_wmem"
    return subprocess.run(["ip", "netns", "exec", f"{rig.prefix}-client", "sh", "-c",
                           f"cat {path}; echo '{value}' > {path}"], check=True,
                          capture_output=True, text=True).stdout.strip()


def size(path) -> int:
    return path.stat().st_size if path.exists() else 0


@pytest.fixture
def partitioned(rig, keys, tmp_path):
    """Run a server on a and a counting guest on the client; partition them 4 s."""
    procs: list[Proc] = []
    saved: list[str] = []

    def run(timeout: float, wmem: str | None = None) -> tuple[Proc, Proc, bytes]:
        out = tmp_path / "uart0.out"
        if wmem:  # the client host's TCP send buffers (min default max), for this run
            saved.append(tcp_wmem(rig, wmem))
        server = Proc(rig.cmd("a", remote_hw_cmd(
            "server", "--listen", f"{rig.addr('a')}:7700", "--server-id", "a",
            "--no-mount", "--tls-dir", str(keys),
            "--device", f"uart0=uart16550,backend=file:{out}")))
        procs.append(server)
        server.wait_for(r"listening on")
        vm = Proc(rig.cmd("client", remote_hw_cmd(
            "vm", "--image", str(sequence_guest(tmp_path / "seq.bin")),
            "--server", f"a={rig.addr('a')}:7700", "--tls-dir", str(keys),
            "--tls-name", "c1", "--timeout", str(timeout),
            "--map", "port:0x3f8-0x3ff=a/uart0")))
        procs.append(vm)
        wait_until(lambda: size(out) > 2000, "the guest's first bytes", 60)
        link_state(rig, "down")
        try:
            time.sleep(PARTITION)
        finally:
            link_state(rig, "up")
        return server, vm, out

    yield run
    link_state(rig, "up")
    if saved:
        tcp_wmem(rig, saved[0])
    for p in reversed(procs):
        p.stop()


def test_a_partition_within_the_timeout_loses_and_doubles_nothing(partitioned):
    server, vm, out = partitioned(10.0)
    grown = size(out) + 5000
    wait_until(lambda: size(out) > grown, "output after the partition", 30)
    assert vm.stop() == 130
    v = judge(out.read_bytes())
    assert (v.doubled, v.gaps) == (0, 0), v
    assert "is gone" not in vm.output()


@pytest.mark.parametrize("wmem", [None, "4096 4096 8192"],
                         ids=["default-buffers", "small-send-buffer"])
def test_a_partition_past_the_timeout_resumes_and_applies_the_write_once(partitioned,
                                                                        wmem):
    # With a small send buffer the partition catches the guest while its POSTs are
    # being sent (CI's machine did so with its own buffers): the send times out and
    # no write waits for an answer. Both are run so that both paths are exercised.
    server, vm, out = partitioned(2.0, wmem)
    back = vm.wait_for(r"is back: session resumed, devices as the guest left them; "
                       r"(\d+) write\(s\) in flight retried under their request ids"
                       r"(?:, (\d+) posted write\(s\) sent again)?", timeout=30)
    # Which write the deadline finds depends on where the partition caught the guest:
    # waiting for an answer (1 write in flight, retried under its request id) or
    # blocked sending POSTs the cut link no longer took (the send times out after the
    # link's timeout; those POSTs are kept and sent again). Either way something is
    # recovered, and the judge below shows it applied once.
    retried, reposted = int(back.group(1)), int(back.group(2) or 0)
    assert retried <= 1 and retried + reposted >= 1, vm.output()
    grown = size(out) + 5000
    wait_until(lambda: size(out) > grown, "output after the resume", 30)
    assert vm.stop() == 130
    v = judge(out.read_bytes())
    # One gap per time the link went down (once, unless a loaded machine stalls an
    # access past the 2 s again); a write applied twice, or late, would add a step
    # back and another gap.
    down = outages(vm.output())
    assert down >= 1 and v.doubled == 0 and v.gaps <= down, (str(v), vm.output())
    server.wait_for(r"resumed its session")
    # The stream was posted: POSTs cut off by the partition were sent again after the
    # resume ("N posted write(s) sent again") and, as the judge shows, applied once.
    assert int(re.search(r"(\d+) writes posted", vm.output()).group(1)) > 0


# ------------------------------------------------------------------ between two servers

SERVERS_PARTITION = 4.0   # past the entry server's --forward-timeout (1 s): its link drops


def host_port(rig, host: str) -> str:
    """``host``'s veth end on the rig's bridge (its index in scripts/netns_rig.sh)."""
    return f"{rig.prefix[:10]}{('client', 'a', 'b', 'etcd').index(host)}p"


@pytest.fixture(scope="module")
def server_keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys2"), ["a", "b"], ["c1"])


def test_a_partition_between_servers_resumes_the_forwarded_session(rig, server_keys,
                                                                    tmp_path):
    """client ──TLS──► entry server a ──TLS──► device server b, and b's port on the
    bridge down for 4 s. a's link to b breaks (its forwarded call times out), comes
    back by itself and *resumes* its session on b: the UART is the same instance (not
    attached again, not reset), the POSTs a had passed on are sent again and applied
    once, and the guest's stream goes on with nothing doubled."""
    out = tmp_path / "uart0.out"
    keys = str(server_keys)
    procs: list[Proc] = []
    port = host_port(rig, "b")
    try:
        b = Proc(rig.cmd("b", remote_hw_cmd(
            "server", "--listen", f"{rig.addr('b')}:7700", "--server-id", "b",
            "--no-mount", "--tls-dir", keys, "--device", f"uart0=uart16550,backend=file:{out}")))
        procs.append(b)
        b.wait_for(r"listening on")
        a = Proc(rig.cmd("a", remote_hw_cmd(
            "server", "--listen", f"{rig.addr('a')}:7700", "--server-id", "a",
            "--no-mount", "--tls-dir", keys, "--peer", f"b={rig.addr('b')}:7700",
            "--route", "uart0=b", "--forward-timeout", "1")))
        procs.append(a)
        a.wait_for(r"listening on")
        vm = Proc(rig.cmd("client", remote_hw_cmd(
            "vm", "--image", str(sequence_guest(tmp_path / "seq.bin")),
            "--server", f"a={rig.addr('a')}:7700", "--tls-dir", keys, "--tls-name", "c1",
            "--timeout", "2", "--map", "port:0x3f8-0x3ff=a/uart0")))
        procs.append(vm)
        wait_until(lambda: size(out) > 2000, "the guest's first bytes", 60)
        subprocess.run(["ip", "-n", f"{rig.prefix}-lan", "link", "set", port, "down"],
                       check=True, capture_output=True)
        try:
            time.sleep(SERVERS_PARTITION)
        finally:
            subprocess.run(["ip", "-n", f"{rig.prefix}-lan", "link", "set", port, "up"],
                           check=True, capture_output=True)
        a.wait_for(r"server b at \S+ is back: session resumed", timeout=30)
        b.wait_for(r"client \d+ \(a\) resumed its session")
        grown = size(out) + 5000
        wait_until(lambda: size(out) > grown, "output after the resume", 30)
        assert vm.stop() == 130
        v = judge(out.read_bytes())
        # Writes the guest made while its device read as removed are gone (a gap per
        # outage the client saw, and one for the time a answered UNREACHABLE); none
        # is applied twice.
        assert v.doubled == 0 and v.gaps <= outages(vm.output()) + 1, (str(v), vm.output())
        assert b.output().count("attached uart0") == 1, b.output()   # the same instance
        assert "starts afresh" not in b.output() and "a new session" not in a.output()
    finally:
        subprocess.run(["ip", "-n", f"{rig.prefix}-lan", "link", "set", port, "up"],
                       capture_output=True)
        for p in reversed(procs):
            p.stop()
