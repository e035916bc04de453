"""tests/conftest.py's capability markers can fail: a missing capability skips exactly
the tests that carry its marker, with the probe's reason where `pytest -rs` shows it;
a present one skips nothing, so those tests still pass or fail on their own.

The probes are driven into their "missing" branches with monkeypatched system calls
(nothing here depends on what this machine has), and a small suite run by pytester
shows the skips as a user sees them.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

import conftest as caps

REPO = Path(__file__).resolve().parent.parent
KVM_MISSING = "needs /dev/kvm (KVM): this machine has none"


def test_this_is_the_suites_conftest():
    assert Path(caps.__file__).resolve() == REPO / "tests" / "conftest.py"


@pytest.fixture
def fresh_cache():
    """missing() probes once per session; start and leave these tests with no answers
    cached (the session's own skips were decided at collection, before any test)."""
    caps.missing.cache_clear()
    yield
    caps.missing.cache_clear()


# ------------------------------------------------------------------ each probe

def test_kvm_probe_says_when_there_is_no_dev_kvm(monkeypatch):
    def no_kvm(path, flags, *a):
        raise FileNotFoundError(2, "No such file or directory", path)
    monkeypatch.setattr(caps.os, "open", no_kvm)
    assert caps.probe_kvm() == KVM_MISSING


def test_kvm_probe_says_when_dev_kvm_is_not_writable(monkeypatch):
    def denied(path, flags, *a):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(caps.os, "open", denied)
    assert caps.probe_kvm() == "needs read/write access to /dev/kvm (KVM): Permission denied"


def test_kvm_probe_asks_the_api_version(monkeypatch):
    real_open = os.open
    monkeypatch.setattr(caps.os, "open", lambda path, flags, *a: real_open(os.devnull, flags))
    asked = []

    def ioctl(fd, request):
        asked.append(request)
        return 11
    monkeypatch.setattr(caps.fcntl, "ioctl", ioctl)
    assert caps.probe_kvm() == "needs KVM API version 12: /dev/kvm answers 11"
    assert asked == [0xAE00]
    monkeypatch.setattr(caps.fcntl, "ioctl", lambda fd, request: 12)
    assert caps.probe_kvm() is None


def test_root_probe_names_the_uid(monkeypatch):
    monkeypatch.setattr(caps.os, "geteuid", lambda: 1000)
    assert caps.probe_root() == "needs root (effective uid 0): running as uid 1000"
    monkeypatch.setattr(caps.os, "geteuid", lambda: 0)
    assert caps.probe_root() is None


def test_fuse_probe_needs_the_device_and_fusermount3(monkeypatch):
    monkeypatch.setattr(caps.os.path, "exists", lambda p: p != "/dev/fuse")
    assert caps.probe_fuse() == "needs /dev/fuse (FUSE): this machine has none (modprobe fuse)"
    monkeypatch.setattr(caps.os.path, "exists", lambda p: True)
    monkeypatch.setattr(caps.shutil, "which", lambda tool: None)
    assert caps.probe_fuse() == "needs fusermount3 on PATH (apt-get install fuse3)"


def test_uinput_probe_reason(monkeypatch):
    monkeypatch.setattr(caps.os.path, "exists", lambda p: False)
    assert caps.probe_uinput() == (
        "needs /dev/uinput and /dev/input (this machine has no input subsystem devices; "
        "load the uinput module where it can)")


def test_netns_probe_reports_the_failing_step_and_cleans_up(monkeypatch):
    ran: list[list[str]] = []

    def run(argv, timeout=20):
        ran.append(argv)
        if argv[1:3] == ["netns", "add"]:
            return subprocess.CompletedProcess(argv, 1, "", "mount --make-shared /run/netns "
                                               "failed: Operation not permitted\n")
        return subprocess.CompletedProcess(argv, 0, "", "")
    monkeypatch.setattr(caps.shutil, "which", lambda tool: "/usr/sbin/ip")
    monkeypatch.setattr(caps, "_run", run)
    name = f"rhprobe{os.getpid()}"
    assert caps.probe_netns() == (
        f"needs network namespaces with bridges and veth pairs (`ip netns add {name}` "
        "failed: mount --make-shared /run/netns failed: Operation not permitted)")
    assert ran == [["ip", "netns", "add", name], ["ip", "netns", "del", name]]
    monkeypatch.setattr(caps.shutil, "which", lambda tool: None)
    assert caps.probe_netns() == \
        "needs ip (apt-get install iproute2) for network namespaces: not on PATH"


def test_qemu_probe_wants_a_finished_chroot(monkeypatch, tmp_path):
    monkeypatch.setattr(caps.shutil, "which", lambda tool: None)
    monkeypatch.setenv(caps.QEMU_ROOT_ENV, str(tmp_path))
    assert caps.probe_qemu() == (
        f"needs QEMU: no qemu-system-x86_64 on PATH and none in {tmp_path} "
        "(run scripts/install_qemu.sh as root)")
    binary = tmp_path / "usr/bin/qemu-system-x86_64"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert "holds an unfinished install" in caps.probe_qemu()
    (tmp_path / caps.QEMU_STAMP).write_text("QEMU emulator version 10.1\n")
    assert caps.probe_qemu() is None


def test_etcd_probe_names_the_package(monkeypatch):
    monkeypatch.setattr(caps.shutil, "which", lambda tool: None)
    assert caps.probe_etcd() == "needs etcd on PATH (apt-get install etcd-server)"


# ------------------------------------------------------------------ the table

def test_probes_run_once_and_only_for_markers_in_use(monkeypatch, fresh_cache):
    calls: list[str] = []

    def probe(name, answer):
        def run():
            calls.append(name)
            return answer
        return caps.Capability(name, "", run)
    for name in caps.CAPABILITIES:
        monkeypatch.setitem(caps.CAPABILITIES, name, probe(name, f"no {name} here"))
    monkeypatch.setitem(caps.CAPABILITIES, "root", probe("root", None))
    assert caps.skip_reason(["parametrize", "root", "kvm"]) == "no kvm here"
    assert caps.skip_reason(["kvm", "root"]) == "no kvm here"
    assert caps.skip_reason(["root", "timeout"]) is None
    assert caps.skip_reason([]) is None
    assert calls == ["root", "kvm"]          # each once; fuse, bpf, ... never probed


def test_a_probe_that_raises_is_a_skip_with_the_error(monkeypatch, fresh_cache):
    def broken():
        raise RuntimeError("tracefs went away")
    monkeypatch.setitem(caps.CAPABILITIES, "bpf", caps.Capability("bpf", "", broken))
    assert caps.missing("bpf") == (
        "cannot tell whether the 'bpf' capability is here: RuntimeError: tracefs went away")


def test_pyproject_declares_every_marker_and_strict_markers():
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    declared = [line.split(":", 1)[0].strip() for line in ini["markers"]]
    assert sorted(declared) == sorted(caps.CAPABILITIES)
    assert "--strict-markers" in ini["addopts"].split()


# ------------------------------------------------------------------ as a user sees it

INNER_CONFTEST = """
import importlib.util

spec = importlib.util.spec_from_file_location("capabilities_under_test", {path!r})
caps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(caps)
answers = {{"kvm": {kvm!r}, "root": None, "uinput": "no uinput: module not loaded"}}
for name in caps.CAPABILITIES:
    caps.CAPABILITIES[name] = caps.CAPABILITIES[name]._replace(
        probe=lambda name=name: answers.get(name, "probed although no test is marked"))
pytest_configure = caps.pytest_configure
pytest_collection_modifyitems = caps.pytest_collection_modifyitems
"""

INNER_TESTS = """
import pytest


@pytest.mark.kvm
def test_needs_kvm():
    assert False, "ran although KVM is missing"


@pytest.mark.root
@pytest.mark.kvm
def test_needs_root_and_kvm():
    assert False, "ran although KVM is missing"


@pytest.mark.root
def test_needs_root_and_fails():
    assert False, "a present capability must not hide a failure"


@pytest.mark.root
def test_needs_root():
    pass


def test_plain():
    pass
"""


@pytest.fixture
def inner(pytester):
    def make(kvm_answer):
        pytester.makeconftest(INNER_CONFTEST.format(path=caps.__file__, kvm=kvm_answer))
        pytester.makepyfile(test_caps=INNER_TESTS,
                            test_module_mark="import pytest\n\n"
                                             "pytestmark = [pytest.mark.uinput]\n\n\n"
                                             "def test_types_a_key():\n"
                                             "    assert False\n")
        return pytester
    return make


def test_missing_capability_skips_marked_tests_with_the_reason(inner):
    p = inner(KVM_MISSING)
    result = p.runpytest_subprocess("-rs", "--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1, skipped=3)
    # -rs points at the tests (not at the conftest) and gives the probe's sentence
    result.stdout.re_match_lines([
        rf"SKIPPED \[1\] test_caps.py:\d+: {re.escape(KVM_MISSING)}",
        rf"SKIPPED \[1\] test_caps.py:\d+: {re.escape(KVM_MISSING)}",
        # a module's pytestmark skips are folded per file, so no line number there
        r"SKIPPED \[1\] test_module_mark.py(:\d+)?: no uinput: module not loaded",
    ], consecutive=False)
    assert "probed although" not in result.stdout.str()
    assert "a present capability must not hide a failure" in result.stdout.str()


def test_present_capability_skips_nothing(inner):
    p = inner(None)
    result = p.runpytest_subprocess("-rs", "--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=3, skipped=1)   # the KVM tests ran (and fail)
    assert "ran although KVM is missing" in result.stdout.str()


def test_strict_markers_refuses_a_misspelt_marker(pytester):
    pytester.makeconftest(INNER_CONFTEST.format(path=caps.__file__, kvm=None))
    pytester.makepyfile(test_typo="import pytest\n\n\n@pytest.mark.kvmm\n"
                                  "def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--strict-markers", "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*'kvmm' not found in `markers` configuration option*"])
