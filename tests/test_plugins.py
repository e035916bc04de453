"""The plugin API: entry-point registries, their errors, and the sample plugins of
samples/remote-hw-sample installed with pip and serving a real KVM guest.

The sample is installed with ``pip install --target`` into a folder of this session
(put on PYTHONPATH / sys.path by the tests that want it), never into the project's
environment: other tests, and other people running the suite in the same checkout at
the same time, keep seeing the built-in set, and the folder is removed at the end of
the session. Broken plugins for the error tests are real distributions too (a
``*.dist-info`` folder with ``entry_points.txt`` beside a module), which is all
importlib.metadata looks at.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import pytest

from remote_hw.backends.base import BackendError
from remote_hw.backends.registry import BACKENDS, backend_class, open_backend
from remote_hw.devices.base import ByteRegisters
from remote_hw.devices.registry import DEVICE_KINDS, create_device, device_class
from remote_hw.devices.uart16550 import Uart16550
from remote_hw.entry_points import API_VERSION, PluginError
from remote_hw.guest_images import guest_image
from remote_hw.net.link import ServerLink
from remote_hw.protocol.messages import AccessKind, Direction, Status

from helpers import REPO, Proc, remote_hw_cmd, start_server, wait_until

SAMPLE = REPO / "samples" / "remote-hw-sample"
BUILT_IN_DEVICES = {"uart16550", "cmos-rtc", "i8042"}
BUILT_IN_BACKENDS = {"tcp", "file", "tty", "evdev", "unix"}
SCRATCH_MAP = "port:0x300-0x309=a/s0"
ECHO_UART_MAP = "port:0x3f8-0x3ff=a/u0,irq=4"
GUEST_PASSED = 85          # guests/scratch.S: 0x2a to port 0xf4
FINAL_REGS = b"scratcOK"   # what guests/scratch.S leaves in the scratch registers


# ------------------------------------------------------------------ installing

def _offline_build_possible() -> bool:
    """Whether this environment's setuptools can build a wheel by itself (it needs
    the ``wheel`` package before setuptools 70.1); then pip builds without fetching
    anything (``--no-build-isolation``)."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        major, minor = (int(p) for p in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)


@pytest.fixture(scope="session")
def sample_site(tmp_path_factory):
    """A folder with the sample distribution pip-installed into it (its dist-info
    with the entry points, and the package); removed when the session ends."""
    base = tmp_path_factory.mktemp("plugin-sample")
    src = base / "src"        # a copy: pip builds in the source tree (build/, egg-info)
    shutil.copytree(SAMPLE, src, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    site = base / "site"
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-input",
            "--disable-pip-version-check", "--target", str(site)]
    if _offline_build_possible():
        argv.append("--no-build-isolation")
    r = subprocess.run([*argv, str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"pip install of the sample failed:\n{r.stdout}{r.stderr}"
    yield site
    shutil.rmtree(base, ignore_errors=True)


def _forget_module(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


@pytest.fixture
def on_path(monkeypatch):
    """Put folders on this process's sys.path and the registries' view of the
    metadata; both are restored (and the plugins' modules forgotten) afterwards."""
    added: list[Path] = []

    def add(folder: Path) -> None:
        monkeypatch.syspath_prepend(str(folder))
        added.append(folder)
        DEVICE_KINDS.refresh()
        BACKENDS.refresh()

    yield add
    for folder in added:
        for py in folder.glob("*.py"):
            _forget_module(py.stem)
        for pkg in folder.glob("*/__init__.py"):
            _forget_module(pkg.parent.name)
    DEVICE_KINDS.refresh()
    BACKENDS.refresh()


def make_dist(site: Path, name: str, entry_points: dict[str, dict[str, str]],
              modules: dict[str, str]) -> Path:
    """A minimal installed distribution in ``site``: METADATA, entry_points.txt and
    the given top-level modules (name -> source)."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for mod, source in modules.items():
        (site / f"{mod}.py").write_text(textwrap.dedent(source))
    return site


def run_cli(*args: str, pythonpath: Sequence[Path] = ()) -> subprocess.CompletedProcess:
    """Run this checkout's remote-hw with ``pythonpath`` before it on PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, pythonpath), str(REPO)]))
    return subprocess.run(remote_hw_cmd(*args), capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60, stdin=subprocess.DEVNULL)


# Device plugins with one thing wrong each, in one distribution.
BAD_DEVICES = """
    from remote_hw.plugin import ByteRegisters, Device

    class Good(ByteRegisters):
        kind = "good"
        window = 1
        api_version = (1, 0)
        def read_byte(self, offset): return 0x42
        def write_byte(self, offset, value): pass

    class Future(Good):
        kind = "future"
        api_version = (2, 0)

    class NewerMinor(Good):
        kind = "newer-minor"
        api_version = (1, 99)

    class BadVersion(Good):
        kind = "bad-version"
        api_version = "1.0"

    class Misnamed(Good):
        kind = "something-else"

    class NoWindow(Good):
        kind = "no-window"
        window = 0

    class Abstract(ByteRegisters):
        kind = "abstract"
        window = 1
        def read_byte(self, offset): return 0

    class NotADevice:
        kind = "not-a-device"
        window = 1

    class ClaimsUart(Good):
        kind = "uart16550"

    class BadLines(Good):
        kind = "bad-lines"
        irq_lines = "irq"
"""


@pytest.fixture
def bad_plugins(tmp_path, on_path):
    site = make_dist(tmp_path / "site", "bad-plugins", {
        "remote_hw.devices": {
            "good": "rhw_bad_devices:Good",
            "future": "rhw_bad_devices:Future",
            "newer-minor": "rhw_bad_devices:NewerMinor",
            "bad-version": "rhw_bad_devices:BadVersion",
            "misnamed": "rhw_bad_devices:Misnamed",
            "no-window": "rhw_bad_devices:NoWindow",
            "abstract": "rhw_bad_devices:Abstract",
            "not-a-device": "rhw_bad_devices:NotADevice",
            "broken": "rhw_broken_import:Broken",
            "missing": "rhw_bad_devices:NoSuchClass",
            "uart16550": "rhw_bad_devices:ClaimsUart",
            "bad-lines": "rhw_bad_devices:BadLines",
        },
        "remote_hw.backends": {
            "broken-backend": "rhw_broken_import:Broken",
        },
    }, {
        "rhw_bad_devices": BAD_DEVICES,
        "rhw_broken_import": """
            raise RuntimeError("this plugin is broken on purpose")
        """,
    })
    on_path(site)
    return site


# ------------------------------------------------------------------ registries

def test_the_built_ins_are_registered_through_entry_points():
    """Not a literal table: remote-hw's own metadata names every built-in."""
    eps = {ep.name: ep for ep in metadata.entry_points(group="remote_hw.devices")}
    assert set(eps) >= BUILT_IN_DEVICES
    assert all(eps[k].dist.name == "remote-hw" for k in BUILT_IN_DEVICES)
    backends = {ep.name for ep in metadata.entry_points(group="remote_hw.backends")}
    assert backends >= BUILT_IN_BACKENDS
    rows = {r.name: r for r in DEVICE_KINDS.registered()}
    assert rows["uart16550"].source == "built-in"
    assert rows["uart16550"].value == "remote_hw.devices.uart16550:Uart16550"
    assert device_class("uart16550") is Uart16550
    assert set(BACKENDS) >= BUILT_IN_BACKENDS


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown device kind 'nope' \(known: cmos-rtc, "
                                         r"i8042, uart16550\)"):
        create_device("nope")
    with pytest.raises(BackendError, match=r"unknown backend 'nope' \(known backends: "
                                           r"evdev, file, tcp, tty, unix\)"):
        backend_class("nope:x")


def test_a_broken_plugin_is_one_line_and_the_others_still_load(bad_plugins):
    with pytest.raises(PluginError) as e:
        create_device("broken")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("device kind 'broken' (entry point broken = rhw_broken_import:Broken, "
                   "from bad-plugins) failed to load: RuntimeError: this plugin is broken "
                   "on purpose")
    assert isinstance(e.value, ValueError)        # the CLI reports it as a usage error
    assert create_device("good").read(0, 1) == 0x42
    assert isinstance(create_device("uart16550"), Uart16550)
    with pytest.raises(PluginError, match=r"'missing' .*failed to load: AttributeError"):
        device_class("missing")


def test_a_failure_message_over_several_lines_is_reported_on_one(tmp_path, on_path):
    on_path(make_dist(tmp_path, "chatty", {"remote_hw.devices": {"chatty": "rhw_chatty:X"}},
                      {"rhw_chatty": "raise OSError('first line\\n   second line')\n"}))
    with pytest.raises(PluginError) as e:
        device_class("chatty")
    assert str(e.value).endswith("failed to load: OSError: first line second line")


def test_a_broken_backend_plugin_is_a_backend_error(bad_plugins):
    with pytest.raises(BackendError, match=r"^backend 'broken-backend' \(entry point "
                                           r"broken-backend = rhw_broken_import:Broken, "
                                           r"from bad-plugins\) failed to load: RuntimeError"):
        backend_class("broken-backend:")
    assert backend_class("file:/tmp/x")[1] == "/tmp/x"


@pytest.mark.parametrize("kind, why", [
    ("future", r"written for plugin API 2\.0, this remote-hw has 1\.0"),
    ("newer-minor", r"written for plugin API 1\.99, this remote-hw has 1\.0"),
    ("bad-version", r"api_version must be a \(major, minor\) tuple of ints, got '1\.0'"),
])
def test_the_api_version_a_plugin_declares_is_checked(bad_plugins, kind, why):
    assert API_VERSION == (1, 0)
    with pytest.raises(PluginError, match=why):
        device_class(kind)


@pytest.mark.parametrize("kind, why", [
    ("misnamed", r"the class says kind = 'something-else', the entry point 'misnamed'"),
    ("no-window", r"window must be a positive int"),
    ("abstract", r"the class is abstract: it does not implement write_byte"),
    ("bad-lines", r"irq_lines must be a tuple of keyword names, got 'irq'"),
    ("not-a-device", r"is not a subclass of remote_hw\.devices\.base\.Device"),
])
def test_the_server_checks_a_plugin_class_before_using_it(bad_plugins, kind, why):
    with pytest.raises(PluginError, match=why):
        device_class(kind)


def test_a_plugin_cannot_take_a_built_in_name(bad_plugins):
    assert device_class("uart16550") is Uart16550
    assert DEVICE_KINDS.source("uart16550") == "built-in"
    loaded, errors = DEVICE_KINDS.load_all()
    assert ("device kind 'uart16550' from bad-plugins (rhw_bad_devices:ClaimsUart) "
            "ignored: built-in registers that name too") in errors


def test_load_all_reports_every_failure_and_keeps_the_rest(bad_plugins):
    loaded, errors = DEVICE_KINDS.load_all()
    assert {row.name for row, _ in loaded} == BUILT_IN_DEVICES | {"good"}
    failed = {re.match(r"device kind '([^']+)'", line).group(1) for line in errors}
    assert failed == {"future", "newer-minor", "bad-version", "misnamed", "no-window",
                      "abstract", "not-a-device", "broken", "missing", "uart16550",
                      "bad-lines"}
    assert all("\n" not in line for line in errors)


def test_in_process_registration_overrides_and_is_removed_again():
    class Local(ByteRegisters):
        kind = "local"
        window = 1

        def read_byte(self, offset: int) -> int:
            return 7

        def write_byte(self, offset: int, value: int) -> None:
            pass

    DEVICE_KINDS["local"] = Local
    try:
        assert create_device("local").read(0, 1) == 7
        assert DEVICE_KINDS.source("local") == "in-process"
    finally:
        del DEVICE_KINDS["local"]
    assert "local" not in DEVICE_KINDS
    with pytest.raises(KeyError, match="only in-process registrations can be removed"):
        del DEVICE_KINDS["uart16550"]


# ------------------------------------------------------------------ the CLI

def test_list_devices_and_backends_show_the_installed_sample(sample_site):
    r = run_cli("server", "--list-devices", pythonpath=[sample_site])
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:]}
    assert rows["scratch"] == ["remote-hw-sample", "remote_hw_sample.scratch:Scratch"]
    assert rows["uart16550"] == ["built-in", "remote_hw.devices.uart16550:Uart16550"]
    assert set(rows) == BUILT_IN_DEVICES | {"scratch"}
    r = run_cli("server", "--list-backends", pythonpath=[sample_site])
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:]}
    assert rows["echo"] == ["remote-hw-sample", "remote_hw_sample.echo:EchoBackend"]
    assert set(rows) == BUILT_IN_BACKENDS | {"echo"}


def test_without_the_sample_only_the_built_ins_are_listed():
    r = run_cli("server", "--list-devices", "--list-backends")
    assert r.returncode == 0, r.stderr
    names = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert names == BUILT_IN_DEVICES | BUILT_IN_BACKENDS | {"KIND", "BACKEND"}


def test_listing_with_a_broken_plugin_lists_the_rest_and_says_why(tmp_path):
    site = make_dist(tmp_path, "broken-one", {"remote_hw.devices": {"broken": "rhw_b:X"}},
                     {"rhw_b": "import rhw_no_such_module\n"})
    r = run_cli("server", "--list-devices", pythonpath=[site])
    assert r.returncode == 1
    assert {line.split()[0] for line in r.stdout.splitlines()[1:]} == BUILT_IN_DEVICES
    assert r.stderr.strip() == (
        "remote-hw: device kind 'broken' (entry point broken = rhw_b:X, from broken-one) "
        "failed to load: ModuleNotFoundError: No module named 'rhw_no_such_module'")


def test_a_server_naming_a_broken_plugin_stops_with_one_line(tmp_path):
    site = make_dist(tmp_path, "broken-one", {"remote_hw.devices": {"broken": "rhw_b:X"}},
                     {"rhw_b": "raise ImportError('needs libfoo')\n"})
    r = run_cli("server", "--listen", "127.0.0.1:0", "--no-mount", "--device", "b0=broken",
                pythonpath=[site])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "remote-hw server: error: device kind 'broken' (entry point broken = rhw_b:X, "
        "from broken-one) failed to load: ImportError: needs libfoo")


def test_a_broken_plugin_the_server_does_not_use_does_not_stop_it(tmp_path, monkeypatch):
    site = make_dist(tmp_path, "broken-one", {"remote_hw.devices": {"broken": "rhw_b:X"}},
                     {"rhw_b": "raise ImportError('needs libfoo')\n"})
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{REPO}")
    server, port = start_server("rtc0=cmos-rtc")
    try:
        assert port > 0
        assert "broken" not in server.output()
    finally:
        server.stop()


# ------------------------------------------------------------------ the sample in-process

def test_the_sample_scratch_device_through_the_registry(sample_site, on_path):
    on_path(sample_site)
    assert DEVICE_KINDS.source("scratch") == "remote-hw-sample"
    dev = create_device("scratch")
    assert isinstance(dev, ByteRegisters)
    assert dev.read(8, 1) == 0xA5
    dev.write(0, 8, int.from_bytes(b"scratch!", "little"))
    assert dev.read(0, 8).to_bytes(8, "little") == b"scratch!"
    assert dev.read(9, 1) == sum(b"scratch!") & 0xFF
    dev.write(8, 2, 0x0000)                       # ID and SUM are read-only
    assert dev.read(8, 2) == 0xA5 | (sum(b"scratch!") & 0xFF) << 8
    assert create_device("scratch", id="0x5a").read(8, 1) == 0x5A
    with pytest.raises(ValueError, match="scratch: unknown option"):
        create_device("scratch", colour="red")
    with pytest.raises(ValueError, match="id must be 0-255"):
        create_device("scratch", id="300")


def test_the_sample_echo_backend_feeds_a_uart(sample_site, on_path):
    import threading
    on_path(sample_site)
    uart = Uart16550()
    lock = threading.RLock()

    def to_guest(data: bytes) -> None:    # what the server's Instance.to_guest does
        with lock:
            uart.feed(data)

    backend = open_backend("echo:", "u0", 0)
    try:
        uart.tx_sink = backend.from_guest
        backend.start(to_guest)
        for ch in b"hi":
            with lock:
                uart.write(0, 1, ch)
        wait_until(lambda: uart.read(5, 1) & 0x01, "the echo in the UART's receiver")
        with lock:
            got = bytes([uart.read(0, 1), uart.read(0, 1)])
        assert got == b"hi"
        assert backend.describe() == "echo:"
    finally:
        backend.close()
    with pytest.raises(BackendError, match="echo takes no argument"):
        open_backend("echo:x", "u0", 0)


# ------------------------------------------------------------------ end to end on KVM

@pytest.mark.kvm
def test_a_guest_uses_the_installed_sample_through_a_real_server(sample_site, monkeypatch):
    """guests/scratch.S against ``remote-hw server --device s0=scratch,shared`` and a
    UART with the echo backend: the guest checks what it reads back and says so in its
    exit status; the server's trace and a second client, still attached to the shared
    scratch device after the guest has gone, show the registers it left."""
    monkeypatch.setenv("PYTHONPATH", f"{sample_site}{os.pathsep}{REPO}")
    server, port = start_server("s0=scratch,shared", "u0=uart16550,backend=echo:",
                                extra=("--trace",))
    link = None
    try:
        link = ServerLink("a", ("127.0.0.1", port)).connect()
        assert link.attach(99, "s0") == Status.OK   # keeps the shared instance alive
        assert link.io(99, "s0", AccessKind.PORT, 8, 1, Direction.READ) == (Status.OK, 0xA5)
        vm = Proc(remote_hw_cmd("vm", "--image", str(guest_image("scratch.bin")),
                                "--vm-id", "1", "--server", f"a=127.0.0.1:{port}",
                                "--map", SCRATCH_MAP, "--map", ECHO_UART_MAP))
        assert vm.wait(60) == GUEST_PASSED, vm.output()

        # The server's state, read by another client after the guest detached.
        status, regs = link.io(99, "s0", AccessKind.PORT, 0, 8, Direction.READ)
        assert status == Status.OK
        assert regs.to_bytes(8, "little") == FINAL_REGS
        assert link.io(99, "s0", AccessKind.PORT, 9, 1, Direction.READ) == \
            (Status.OK, sum(FINAL_REGS) & 0xFF)

        # The server's record of the guest's accesses: replaying its writes gives the
        # same registers, and the byte the guest sent came back through the echo.
        server.wait_for(r"vm 1 detached")
        trace = re.findall(r"client \d+ vm 1 +(\w+) ([RW]) \+(\d+) = (0x[0-9a-f]+)",
                           server.output())
        regs_seen = bytearray(8)
        for dev, rw, off, value in trace:
            if dev == "s0" and rw == "W":
                size = (len(value) - 2) // 2
                for i, b in enumerate(int(value, 16).to_bytes(size, "little")):
                    regs_seen[int(off) + i] = b
        assert bytes(regs_seen) == FINAL_REGS
        assert ("s0", "W", "6", "0x4b4f") in trace          # one 16-bit write, split
        assert ("u0", "W", "0", "0x45") in trace and ("u0", "R", "0", "0x45") in trace
    finally:
        if link is not None:
            link.close()
        server.stop()


def test_the_public_module_offers_what_the_guide_names():
    import remote_hw.plugin as plugin
    from remote_hw.devices import capabilities
    for name in plugin.__all__:
        assert getattr(plugin, name) is not None, name
    assert plugin.API_VERSION == API_VERSION
    assert plugin.ByteRegisters is ByteRegisters
    assert plugin.Clock is capabilities.Clock
    guide = (REPO / "docs" / "plugin-api.md").read_text()
    for name in ("Device", "ByteRegisters", "StreamBackend", "KeyBackend", "API_VERSION",
                 "Clock", "Keyboard", "TextInput", "ByteStream"):
        assert name in plugin.__all__ and f"`{name}`" in guide, name
