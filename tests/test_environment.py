"""The machine has every outside tool the suite uses, or the suite says which package is
missing.

A tool that is absent makes some later test fail obscurely (a provider "could not be
found", a FileNotFoundError deep in a fixture) or skip quietly. These checks name the
Debian package instead, so that a brand-new machine whose install script forgot
something fails here, in one line. ``scripts/install.sh`` installs every package named
below; keep the two lists in step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Executable -> the Debian package that provides it, and what in the suite needs it.
TOOLS: dict[str, tuple[str, str]] = {
    "as": ("binutils", "guests/build.sh assembles the test guests"),
    "ld": ("binutils", "guests/build.sh links the test guests"),
    "ip": ("iproute2", "network-namespace rigs (tests/rig.py, bench/hops.py)"),
    "etcd": ("etcd-server", "the platform's shared directory (tests/rig.py)"),
    "etcdctl": ("etcd-client", "seeding and reading the etcd directory"),
    "fusermount3": ("fuse3", "unmounting the server's FUSE view"),
    "udevadm": ("udev", "checking the export rules (tests/test_udev.py)"),
    "systemd-analyze": ("systemd", "checking the export units (tests/test_udev.py)"),
    "unshare": ("util-linux", "private mount namespaces in the udev tests"),
    "vagrant": ("vagrant", "validating the Vagrant rig (tests/test_vagrant.py)"),
    "gcc": ("gcc", "building remote_hw's C fast path and python-evdev"),
    "git": ("git", "make fresh-check clones the tree"),
    "debootstrap": ("debootstrap", "scripts/install_qemu.sh builds the trixie chroot"),
    "busybox": ("busybox-static", "the bridge tests' guest userland (initramfs)"),
    "xmllint": ("libxml2-utils", "validating docs/bridge.md's libvirt XML"),
}


def _install_script_packages() -> set[str]:
    """The package names scripts/install*.sh mention (a plain word match is enough)."""
    words: set[str] = set()
    for script in (REPO / "scripts").glob("install*.sh"):
        words.update(script.read_text().replace("(", " ").replace(")", " ").split())
    return words


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tool_is_installed(tool: str) -> None:
    package, why = TOOLS[tool]
    assert shutil.which(tool), (f"`{tool}` is missing: apt-get install --no-install-recommends "
                                f"{package} (needed for {why}); scripts/install.sh should "
                                "have installed it")


def test_every_tool_package_is_named_by_the_install_script() -> None:
    named = _install_script_packages()
    missing = sorted({pkg for pkg, _ in TOOLS.values()} - named)
    assert not missing, f"scripts/install*.sh never installs: {', '.join(missing)}"


def test_vagrant_has_its_libvirt_provider() -> None:
    # The provider is a plugin in its own Debian package, only recommended by vagrant:
    # an install with --no-install-recommends leaves it out unless it is named.
    assert shutil.which("vagrant"), "vagrant is missing: apt-get install vagrant"
    env = dict(os.environ, VAGRANT_CHECKPOINT_DISABLE="1")
    r = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert "vagrant-libvirt" in r.stdout, (
        "vagrant's libvirt provider is missing: apt-get install --no-install-recommends "
        f"vagrant-libvirt (vagrant plugin list said: {(r.stdout + r.stderr).strip()!r})")


def test_bcc_and_kernel_headers_for_the_probes() -> None:
    # bcc is Debian's package (not on PyPI); the probes import it from dist-packages.
    assert Path("/usr/lib/python3/dist-packages/bcc/__init__.py").exists(), (
        "bcc's Python module is missing: apt-get install --no-install-recommends "
        "python3-bpfcc (scripts/install_bpf.sh)")
    build = Path("/lib/modules") / os.uname().release / "build"
    assert (build / "Makefile").exists(), (
        f"{build} has no kernel headers: apt-get install linux-headers-amd64, then "
        "scripts/install_bpf.sh links them for the running kernel")


def test_kernel_devices_the_suite_drives() -> None:
    # Not packages but the machine itself: say so plainly rather than fail later.
    for dev, what in (("/dev/kvm", "KVM guests"), ("/dev/fuse", "the FUSE view")):
        assert os.path.exists(dev), f"{dev} is missing: {what} cannot run on this machine"


def test_the_c_fast_path_is_built_and_in_use() -> None:
    # make test builds the extension (scripts/install.sh); if it did not, the fast path
    # is silently off and the benchmark loses its main gain, so that is a failure here,
    # not a skip (tests/test_fastio.py's tests skip, marked `fastio`).
    from remote_hw.net import fastio
    assert fastio._c is not None, fastio.status()[1]
    assert fastio.enabled(), fastio.status()[1]


def test_the_bridge_fast_path_is_built_and_in_use() -> None:
    # The same for the bridge's C helper (remote_hw/bridge/_fastvfu.c).
    from remote_hw.bridge import fastpath
    assert fastpath.status()[0], fastpath.status()[1]


def test_qemu_with_vfio_user_and_a_stock_kernel_for_the_bridge() -> None:
    # QEMU >= 10.1 lives in install_qemu.sh's trixie chroot (Debian 12 has 7.2).
    root = Path(os.environ.get("REMOTE_HW_QEMU_ROOT", "/var/lib/remote-hw/trixie"))
    assert (root / "usr/bin/qemu-system-x86_64").exists(), (
        f"no QEMU in {root}: run scripts/install_qemu.sh as root (debootstrap trixie, "
        "qemu-system-x86 from trixie-backports)")
    assert list(Path("/boot").glob("vmlinuz-*-amd64")), (
        "no Debian kernel in /boot: apt-get install --no-install-recommends linux-image-amd64")
    assert Path("/usr/share/libvirt/schemas/domain.rng").exists(), (
        "libvirt's schemas are missing: apt-get install --no-install-recommends libvirt0")
