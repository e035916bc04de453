"""``--allow`` holds through forwarding, on the rig (issue 11, failure 3).

client ──TLS──► server a (--peer b --route bdev=b) ──TLS──► server b (--allow bdev=alice)

Real remote-hw processes and real guests on network namespaces, mutual TLS, a static
directory as in the issue. Bob is refused on b directly and through a; alice gets
the device through a and the guest's output reaches it.
"""

from __future__ import annotations

import pytest

from remote_hw.guest_images import guest_image

from helpers import Proc, make_keys, remote_hw_cmd
from rig import rig_down, rig_up

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.netns]

HELLO = b"Hello from remote-hw guest\r\n"


@pytest.fixture(scope="module")
def rig():
    r = rig_up()
    yield r
    rig_down(r)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"), ["a", "b"], ["alice", "bob"])


@pytest.fixture(scope="module")
def platform(rig, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bdev.out"
    common = ["--no-mount", "--tls-dir", str(keys)]
    b = Proc(rig.cmd("b", remote_hw_cmd(
        "server", "--listen", f"{rig.addr('b')}:7700", "--server-id", "b", *common,
        "--device", f"bdev=uart16550,backend=file:{out}", "--allow", "bdev=alice")))
    a = Proc(rig.cmd("a", remote_hw_cmd(
        "server", "--listen", f"{rig.addr('a')}:7700", "--server-id", "a", *common,
        "--peer", f"b={rig.addr('b')}:7700", "--route", "bdev=b")))
    try:
        for p in (a, b):
            p.wait_for(r"listening on")
        yield rig, keys, a, b, out
    finally:
        a.stop()
        b.stop()


def vm(rig, keys, name: str, server: str) -> Proc:
    return Proc(rig.cmd("client", remote_hw_cmd(
        "vm", "--image", str(guest_image("hello.bin")),
        "--server", f"{server}={rig.addr(server)}:7700",
        "--tls-dir", str(keys), "--tls-name", name,
        "--map", f"port:0x3f8-0x3ff={server}/bdev,irq=4")))


def test_bob_is_refused_on_b_directly(platform):
    rig, keys, _, b, out = platform
    bob = vm(rig, keys, "bob", "b")
    assert bob.wait(60) == 1, bob.output()
    assert "refused device 'bdev': DENIED" in bob.output()
    b.wait_for(r"client bob may not use device bdev")


def test_bob_is_refused_through_a(platform):
    rig, keys, a, b, out = platform
    bob = vm(rig, keys, "bob", "a")
    assert bob.wait(60) == 1, bob.output()
    assert "refused device 'bdev': DENIED" in bob.output()
    # b decided, on the name a authenticated and passed on (ORIGIN), not on a's own.
    b.wait_for(r"peer server a speaks for client \d+, authenticated as bob")
    b.wait_for(r"client bob \(through peer server a\) may not use device bdev")
    assert not out.exists() or HELLO not in out.read_bytes()


def test_alice_is_allowed_through_a(platform):
    rig, keys, a, b, out = platform
    alice = vm(rig, keys, "alice", "a")
    assert alice.wait(60) == 0, alice.output()
    assert out.read_bytes() == HELLO
    b.wait_for(r"authenticated as alice")
