"""What a test needs of the machine, as markers, and the skips they turn into.

A test that needs KVM, root, FUSE, the eBPF toolchain, network namespaces, QEMU, etcd,
uinput or the C fast path says so with a marker (``pytestmark = [pytest.mark.kvm]``
or ``@pytest.mark.root``). Where the capability is missing, the test is skipped with a
sentence saying what is missing and, where it helps, how to get it: ``pytest -rs``
lists them. Where it is present, nothing is skipped, and a failure is a failure.

Each capability is probed for real (``/dev/kvm`` is opened and asked its API version,
a network namespace is created and removed, ...), once per session and only when a
collected test carries its marker. A probe returns ``None`` when the capability is
there and the reason otherwise. The markers are declared in ``pyproject.toml`` too
(``--strict-markers`` makes a misspelt one an error); ``MARKERS`` must stay in step.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import NamedTuple

import pytest

pytest_plugins = ["pytester"]   # tests/test_markers.py runs small suites of its own

# KVM_GET_API_VERSION is _IO(0xAE, 0x00); every KVM since Linux 2.6.22 answers 12
# (remote_hw/client/vmm/kvm.py declares both; not imported so this file needs no
# remote_hw module to import).
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12
QEMU_ROOT_ENV = "REMOTE_HW_QEMU_ROOT"            # scripts/install_qemu.sh's chroot
QEMU_ROOT_DEFAULT = "/var/lib/remote-hw/trixie"
QEMU_STAMP = ".remote-hw-qemu-ready"


def _run(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no message"


# ------------------------------------------------------------------ the probes
# Each returns None when the capability is there, else the reason a test skips.

def probe_kvm() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return "needs /dev/kvm (KVM): this machine has none"
    except OSError as e:
        return f"needs read/write access to /dev/kvm (KVM): {e.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as e:
        return f"needs a working /dev/kvm (KVM): KVM_GET_API_VERSION failed ({e.strerror})"
    finally:
        os.close(fd)
    if version != _KVM_API_VERSION:
        return f"needs KVM API version {_KVM_API_VERSION}: /dev/kvm answers {version}"
    return None


def probe_root() -> str | None:
    euid = os.geteuid()
    if euid != 0:
        return f"needs root (effective uid 0): running as uid {euid}"
    return None


def probe_fuse() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse (FUSE): this machine has none (modprobe fuse)"
    if shutil.which("fusermount3") is None:
        return "needs fusermount3 on PATH (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401  (loads libfuse3)
    except (ImportError, OSError) as e:
        return f"needs mfusepy on libfuse3 ({e}; apt-get install fuse3, pip install mfusepy)"
    return None


def probe_bpf() -> str | None:
    # The probes' own checks, so the skip says what `remote-hw trace` would say: root,
    # tracefs, the kvm tracepoints, kernel headers, and bcc from Debian's dist-packages.
    from remote_hw.probes.loader import ProbeUnavailable, check_environment, import_bcc
    try:
        check_environment()
        import_bcc()
    except ProbeUnavailable as e:
        return f"needs the eBPF toolchain (bcc): {e}"
    return None


def probe_netns() -> str | None:
    if shutil.which("ip") is None:
        return "needs ip (apt-get install iproute2) for network namespaces: not on PATH"
    name = f"rhprobe{os.getpid()}"
    steps = [["ip", "netns", "add", name],
             ["ip", "-n", name, "link", "add", "br0", "type", "bridge"],
             ["ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]]
    try:
        for argv in steps:
            r = _run(argv)
            if r.returncode != 0:
                return (f"needs network namespaces with bridges and veth pairs "
                        f"(`{' '.join(argv)}` failed: {_first_line(r.stderr)})")
    finally:
        _run(["ip", "netns", "del", name])
    return None


def probe_qemu() -> str | None:
    # A QEMU on PATH, or the one scripts/install_qemu.sh puts in a chroot (Debian 12's
    # own is too old for vfio-user); the install script writes its stamp when done.
    host = shutil.which("qemu-system-x86_64")
    if host is not None:
        r = _run([host, "--version"])
        return None if r.returncode == 0 else \
            f"needs a QEMU that runs: {host} --version failed ({_first_line(r.stderr)})"
    root = os.environ.get(QEMU_ROOT_ENV, QEMU_ROOT_DEFAULT)
    binary = os.path.join(root, "usr/bin/qemu-system-x86_64")
    if not os.access(binary, os.X_OK):
        return (f"needs QEMU: no qemu-system-x86_64 on PATH and none in {root} "
                "(run scripts/install_qemu.sh as root)")
    if not os.path.exists(os.path.join(root, QEMU_STAMP)):
        return (f"needs QEMU: {root} holds an unfinished install (no {QEMU_STAMP}; "
                "run scripts/install_qemu.sh as root)")
    return None


def probe_etcd() -> str | None:
    for tool, package, ask in (("etcd", "etcd-server", "--version"),
                               ("etcdctl", "etcd-client", "version")):
        path = shutil.which(tool)
        if path is None:
            return f"needs {tool} on PATH (apt-get install {package})"
        r = _run([path, ask])
        if r.returncode != 0:
            return f"needs a working {tool}: `{tool} {ask}` failed " \
                   f"({_first_line(r.stderr)})"
    return None


def probe_uinput() -> str | None:
    if not os.path.exists("/dev/uinput") or not os.path.isdir("/dev/input"):
        return ("needs /dev/uinput and /dev/input (this machine has no input subsystem "
                "devices; load the uinput module where it can)")
    try:
        fd = os.open("/dev/uinput", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return f"needs write access to /dev/uinput: {e.strerror}"
    os.close(fd)
    return None


def probe_fastio() -> str | None:
    from remote_hw.net import fastio
    ok, why = fastio.status()
    return None if ok else f"needs the C fast path (remote_hw.net._fastio): {why}"


class Capability(NamedTuple):
    marker: str
    help: str                           # what `pytest --markers` says
    probe: Callable[[], str | None]


CAPABILITIES: dict[str, Capability] = {c.marker: c for c in (
    Capability("kvm", "needs /dev/kvm, opened read/write (KVM guests)", probe_kvm),
    Capability("root", "needs an effective uid of 0", probe_root),
    Capability("fuse", "needs /dev/fuse, fusermount3 and mfusepy on libfuse3", probe_fuse),
    Capability("bpf", "needs bcc (Debian's python3-bpfcc), kernel headers, tracefs and "
               "the kvm tracepoints (the eBPF probes)", probe_bpf),
    Capability("netns", "needs network namespaces with bridges and veth pairs "
               "(ip netns; tests/rig.py)", probe_netns),
    Capability("qemu", "needs qemu-system-x86_64 on PATH or scripts/install_qemu.sh's "
               "chroot", probe_qemu),
    Capability("etcd", "needs etcd and etcdctl (the platform's directory)", probe_etcd),
    Capability("uinput", "needs /dev/uinput and /dev/input (virtual input devices)",
               probe_uinput),
    Capability("fastio", "needs the C fast path (remote_hw.net._fastio) built",
               probe_fastio),
)}


@functools.cache
def missing(marker: str) -> str | None:
    """Why ``marker``'s capability is missing here (None when present); probed once.

    A probe that raises counts as missing, with the error as the reason: a broken probe
    must not end the whole session.
    """
    try:
        return CAPABILITIES[marker].probe()
    except Exception as e:  # noqa: BLE001
        return f"cannot tell whether the {marker!r} capability is here: " \
               f"{type(e).__name__}: {e}"


def skip_reason(markers) -> str | None:
    """The reason to skip a test carrying ``markers`` (mark names), or None: the first
    missing capability, in the order the test names them."""
    for name in markers:
        if name in CAPABILITIES:
            why = missing(name)
            if why is not None:
                return why
    return None


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml declares them; registered here as well for runs without it (the
    # suites tests/test_markers.py builds), but never twice.
    declared = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for c in CAPABILITIES.values():
        if c.marker not in declared:
            config.addinivalue_line("markers", f"{c.marker}: {c.help}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A skip mark (not a skip raised here) so -rs points at the test, not at this file.
    for item in items:
        why = skip_reason([m.name for m in item.iter_markers()])
        if why is not None:
            item.add_marker(pytest.mark.skip(reason=why))
