"""remote-hw installed as a user installs it: a wheel, ``pip install``-ed (non-editable)
into a new venv outside the checkout, and run from a folder outside it.

Why: the rest of the suite runs an editable install, which finds ``ebpf/`` and
``guests/`` beside the package whether or not the package carries them. A non-editable
install once failed in every command, ``--version`` included, because the argument
parser read the BPF header from a folder that only a checkout has (issue 14).

The wheel is built from a copy of the checkout's sources (so nothing is written into
the shared tree, and nothing built there, such as guests/build, can leak in). It is built offline
with the project venv's setuptools when that can build wheels, else by pip's isolated
build, which fetches setuptools from the package index. The new venv gets remote-hw's
dependencies by a ``.pth`` line naming the project venv's site-packages (a plain path:
that folder's own ``.pth`` files, among them the editable remote-hw, are not run, and
the new venv's own site-packages comes first), so nothing is downloaded for them.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

import pytest

import remote_hw
from remote_hw import guest_images, resources
from remote_hw.probes import model as M

REPO = Path(__file__).resolve().parent.parent
PACKAGED = {"ebpf": ["*.c", "*.h"], "guests": ["*.S", "*.inc", "build.sh"]}  # as setup.py
# what a copy of the checkout leaves out: VCS data, environments, build products
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                    "__pycache__", ".pytest_cache", "*.so")
BUILD_TIMEOUT = 300


class Installed(NamedTuple):
    src: Path           # the copy of the checkout the wheel was built from
    wheel: Path
    venv: Path
    site: Path          # the new venv's site-packages
    outside: Path       # a folder outside the checkout to run commands from
    cache: Path         # $XDG_CACHE_HOME for the installed commands

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.venv / "bin" / "remote-hw"), *args],
                              capture_output=True, text=True, timeout=timeout,
                              cwd=self.outside, env=self.env())

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["XDG_CACHE_HOME"] = str(self.cache)
        return env


def _can_build_offline() -> bool:
    """True if this interpreter's setuptools builds wheels without downloading anything:
    from 70.1 it has bdist_wheel itself; before, only with the ``wheel`` package."""
    import setuptools
    major, minor = (int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _build_wheel(src: Path, dist: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
           "-w", str(dist), str(src)]
    if _can_build_offline():
        cmd[5:5] = ["--no-build-isolation", "--no-index"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    fetch_failed = any("Installing build dependencies" in line and "error" in line
                       for line in r.stdout.splitlines())
    if r.returncode != 0 and fetch_failed:
        pytest.skip("the project venv cannot build wheels offline (setuptools < 70.1 and "
                    "no wheel package) and pip could not fetch a build backend: "
                    + (r.stderr.strip().splitlines() or ["no output"])[-1])
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(dist.glob("remote_hw-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _dependency_dirs() -> list[str]:
    """The site-packages folders this interpreter imports remote-hw's dependencies from."""
    dirs = [p for p in sys.path if Path(p).name == "site-packages" and Path(p).is_dir()]
    assert dirs, sys.path
    return dirs


def _copy_checkout(dest: Path) -> None:
    """The checkout's files as a clone plus the uncommitted work would have them: what
    git tracks or would add (ignored files, such as builds and venvs, left out); a
    filtered copy where git is not at hand."""
    listed = None
    if (REPO / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached",
                                 "--others", "--exclude-standard"],
                                capture_output=True, timeout=60)
    if listed is None or listed.returncode != 0:
        shutil.copytree(REPO, dest, ignore=NOT_COPIED, symlinks=True)
        return
    for name in filter(None, listed.stdout.decode().split("\0")):
        f = REPO / name
        if f.is_file():                   # a tracked file moved away is listed but gone
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    top = tmp_path_factory.mktemp("install")
    assert not top.resolve().is_relative_to(REPO)
    src = top / "src"
    _copy_checkout(src)
    wheel = _build_wheel(src, top / "dist")

    venv = top / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    site = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    (site / "remote-hw-test-deps.pth").write_text("".join(f"{d}\n" for d in _dependency_dirs()))
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                        "install", "--no-deps", "--no-index", "--disable-pip-version-check",
                        str(wheel)], capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    outside = top / "elsewhere"
    outside.mkdir()
    yield Installed(src, wheel, venv, site, outside, top / "cache")


def _packaged_files(src: Path) -> dict[str, list[str]]:
    """folder -> names of the files of checkout ``src`` that must travel in the package."""
    return {folder: sorted({p.name for pat in pats for p in (src / folder).glob(pat)})
            for folder, pats in PACKAGED.items()}


def test_wheel_carries_the_bpf_and_guest_sources(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for folder, files in _packaged_files(installed.src).items():
        assert files, folder
        missing = [f for f in files if f"remote_hw/_data/{folder}/{f}" not in names]
        assert missing == [], f"{folder}: {missing}"
    assert not [n for n in names if n.endswith((".bin", ".elf"))]   # sources, not builds


def test_version_runs_outside_the_checkout(installed: Installed) -> None:
    r = installed.run("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"remote-hw {remote_hw.__version__} ("), r.stdout
    assert r.stderr == ""


def test_trace_help_runs_outside_the_checkout(installed: Installed) -> None:
    r = installed.run("trace", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: remote-hw trace"), r.stdout
    assert "--device" in r.stdout and r.stderr == ""


DEPENDENCY_PROBE = """
import json, re
from importlib.metadata import PackageNotFoundError, distribution, version
dist = distribution("remote-hw")
needed = [re.match(r"[A-Za-z0-9_.-]+", r)[0] for r in dist.requires or []
          if "extra ==" not in r]
missing = []
for name in needed:
    try:
        version(name)
    except PackageNotFoundError:
        missing.append(name)
print(json.dumps({"files": str(dist.locate_file("")), "needed": needed, "missing": missing}))
"""


def test_installed_package_has_its_dependencies(installed: Installed) -> None:
    """The new venv is a fair stand-in for a user's: every dependency the wheel declares
    is importable there (through the .pth line, not the checkout)."""
    r = subprocess.run([str(installed.venv / "bin" / "python"), "-c", DEPENDENCY_PROBE],
                       capture_output=True, text=True, timeout=60, cwd=installed.outside,
                       env=installed.env())
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert Path(got["files"]) == installed.site
    assert "cryptography" in got["needed"] and got["missing"] == []


def test_installed_package_reads_its_own_bpf_header(installed: Installed) -> None:
    code = ("import ctypes, json, remote_hw; from remote_hw import resources; "
            "from remote_hw.probes import model as M; print(json.dumps({"
            "'package': remote_hw.__file__, 'ebpf': str(resources.ebpf_dir()), "
            "'consts': M.header_constants(), 'mismatched': M.mismatched_constants(), "
            "'event_size': ctypes.sizeof(M.header_struct('rhw_access_event'))}))")
    r = subprocess.run([str(installed.venv / "bin" / "python"), "-c", code],
                       capture_output=True, text=True, timeout=60, cwd=installed.outside,
                       env=installed.env())
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert Path(got["package"]).is_relative_to(installed.site)
    assert Path(got["ebpf"]) == installed.site / "remote_hw" / "_data" / "ebpf"
    header = installed.src / "ebpf" / M.HEADER
    assert got["consts"] == M.header_constants(header)
    assert got["mismatched"] == []
    assert got["event_size"] == ctypes.sizeof(M.header_struct("rhw_access_event", header))


def _lines(stream: IO[str]) -> queue.Queue[str | None]:
    """The lines of ``stream`` as they come, read by a thread (None at EOF)."""
    q: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line)
        q.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_for_line(q: queue.Queue[str | None], pattern: str, seen: list[str],
                   timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no line like {pattern!r} in {timeout} s: {seen}") from None
        if line is None:
            raise AssertionError(f"output ended before a line like {pattern!r}: {seen}")
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m


def _recv_until(sock: socket.socket, want: bytes, timeout: float) -> bytes:
    got = b""
    sock.settimeout(timeout)
    while want not in got:
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.kvm
def test_demo_echoes_through_the_installed_package(installed: Installed) -> None:
    cache = installed.cache
    shutil.rmtree(cache, ignore_errors=True)
    proc = subprocess.Popen(
        [str(installed.venv / "bin" / "remote-hw"), "demo", "--listen", "127.0.0.1:0",
         "--uart-port", "0", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=installed.outside,
        env=installed.env())
    seen: list[str] = []
    try:
        out = _lines(proc.stdout)  # type: ignore[arg-type]
        m = _wait_for_line(out, r"connect with:\s+nc (\S+) (\d+)", seen, 60)
        with socket.create_connection((m[1], int(m[2])), timeout=10) as sock:
            assert b"echo ready" in _recv_until(sock, b"echo ready", 20)
            sock.sendall(b"hi!")
            assert _recv_until(sock, b"hi!", 20).endswith(b"hi!")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, seen
        _wait_for_line(out, r"remote-hw demo: stopped", seen, 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the echo guest was built from the packaged sources into the cache, not site-packages
    assert [p.name for p in cache.glob("remote-hw/guests/*/echo.bin")] == ["echo.bin"]
    packaged_guests = installed.site / "remote_hw" / "_data" / "guests"
    assert sorted(p.name for p in packaged_guests.iterdir()) == \
        _packaged_files(installed.src)["guests"]


# ------------------------------------------- the two layouts, without installing

def test_packaged_copy_is_preferred_to_the_checkout(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "DATA_DIR", tmp_path / "_data")
    assert resources.ebpf_dir() == REPO / "ebpf"                    # a checkout
    assert resources.in_checkout(resources.ebpf_dir())
    (tmp_path / "_data" / "ebpf").mkdir(parents=True)
    assert resources.ebpf_dir() == tmp_path / "_data" / "ebpf"      # an installed package
    assert not resources.in_checkout(resources.ebpf_dir())
    assert resources.guests_dir() == REPO / "guests"                # each folder on its own


def test_cache_dir_follows_xdg_then_root_then_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    assert resources.cache_dir() == Path("/somewhere/cache/remote-hw")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")          # ignored, as XDG says
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert resources.cache_dir() == Path("/var/cache/remote-hw")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", "/home/someone")
    assert resources.cache_dir() == Path("/home/someone/.cache/remote-hw")


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                    reason="building the guests needs as and ld (apt-get install binutils)")
def test_installed_guests_build_into_a_cache_keyed_by_their_sources(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = tmp_path / "_data" / "guests"
    shutil.copytree(REPO / "guests", packaged, ignore=shutil.ignore_patterns("build"))
    packaged.chmod(0o555)                       # site-packages may be read-only
    monkeypatch.setattr(resources, "DATA_DIR", tmp_path / "_data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        first = guest_images.guest_image("echo.bin")
        assert first.parent.parent == tmp_path / "cache" / "remote-hw" / "guests"
        # the same bytes as the checkout's build.sh makes (the build is reproducible)
        subprocess.run(["sh", str(REPO / "guests" / "build.sh"), str(tmp_path / "ref")],
                       check=True, capture_output=True, timeout=120)
        assert first.read_bytes() == (tmp_path / "ref" / "echo.bin").read_bytes()
        assert [p.name for p in first.parent.parent.iterdir()] == [first.parent.name]
        assert guest_images.guest_image("echo.bin") == first      # built once, then found
        packaged.chmod(0o755)
        with open(packaged / "echo.S", "a") as f:                 # new sources: new folder
            f.write("# changed\n")
        second = guest_images.guest_image("echo.bin")
        assert second.parent != first.parent and second.exists() and first.exists()
        assert sorted(p.name for p in packaged.iterdir()) == \
            sorted(p.name for p in (REPO / "guests").iterdir() if p.name != "build")
    finally:
        packaged.chmod(0o755)


PARSER_PROBE = """
import io, os, sys
from remote_hw import resources
blocked = tuple(str(p) for p in (resources.DATA_DIR, resources.REPO_DIR / "ebpf",
                                 resources.REPO_DIR / "guests"))
real_open = io.open
def guarded(file, *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and \\
            os.path.abspath(os.fspath(file)).startswith(blocked):
        raise AssertionError(f"read {file} while building the parser")
    return real_open(file, *args, **kwargs)
io.open = guarded
import builtins; builtins.open = guarded
from remote_hw import cli
parser = cli.build_parser()
for argv in (["trace"], ["top"], ["demo"], ["server", "--help"]):
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
print("parser built")
"""


def test_building_the_parser_reads_no_data_file() -> None:
    """No import and no parser construction may read the BPF or guest files: where they
    are missing, --help and --version must still work (they did not: issue 14)."""
    r = subprocess.run([sys.executable, "-c", PARSER_PROBE], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("parser built")
