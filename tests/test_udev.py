"""udev-driven export: the rules (udevadm test in an isolated mount namespace), the
systemd units they start (systemd-analyze verify), the installer, and the hot-plug
path with what this machine can create (a pty as the tty device).

udevadm test changes the live system (device node permissions, /run/udev), so it
runs under ``unshare -m`` with tmpfs over /run and /dev and the rules under test
bind-mounted onto /etc/udev/rules.d.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remote_hw.export import export_settings
from remote_hw.net.link import ServerLink
from remote_hw.protocol.messages import AccessKind, Direction
from remote_hw.server.controller import Controller
from remote_hw.server.listener import Server

from helpers import Proc, Pty, remote_hw_cmd

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "udev_rules"
UNITS = REPO / "scripts" / "systemd"
INSTALL = REPO / "scripts" / "install_units.sh"
EXPORT_RULES = "90-remote-hw-export.rules"
LOCAL_RULES = "70-remote-hw-local.rules"
W, R = Direction.WRITE, Direction.READ


# ------------------------------------------------------------------ udevadm test

def _udev_unavailable() -> str | None:
    for tool in ("udevadm", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install udev util-linux)"
    if not os.path.isdir("/etc/udev/rules.d"):
        return "needs /etc/udev/rules.d to bind the rules under test onto"
    return None


# udevadm test in a private mount namespace: root (the marker) and the tools (here).
needs_udev = pytest.mark.skipif(_udev_unavailable() is not None,
                                reason=_udev_unavailable() or "")


def a_tty() -> str:
    """A tty this machine's sysfs has (the server's own UART when there is one)."""
    names = sorted(os.listdir("/sys/class/tty"))
    for name in ["ttyS0", *[n for n in names if n.startswith("ttyS")], "ptmx", "tty"]:
        if name in names:
            return name
    pytest.skip("no tty in /sys/class/tty")


def udevadm_test(rules_dir: Path, kernel_name: str, action: str = "add") -> tuple[dict, list]:
    """Run ``udevadm test`` for /sys/class/tty/NAME with ``rules_dir`` as the only
    local rules; returns (properties, problems reported against those rules)."""
    script = ("mount --make-rprivate / && mount -t tmpfs tmpfs /run && "
              "mount -t tmpfs tmpfs /dev && mount --bind \"$1\" /etc/udev/rules.d && "
              "exec udevadm test --action=\"$2\" \"$3\"")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(rules_dir), action,
                        f"/sys/class/tty/{kernel_name}"],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    props = {}
    for line in r.stdout.splitlines():
        key, eq, value = line.partition("=")
        if eq and re.fullmatch(r"[A-Z0-9_]+", key):
            props[key] = value
    problems = [line for line in out.splitlines()
                if "/etc/udev/rules.d/" in line and not line.startswith("Reading rules file")]
    return props, problems


def rules_dir(tmp_path: Path, local: str | None = None) -> Path:
    d = tmp_path / "rules.d"
    d.mkdir()
    shutil.copy(RULES / EXPORT_RULES, d)
    if local is None:
        shutil.copy(RULES / LOCAL_RULES, d)
    else:
        (d / LOCAL_RULES).write_text(local)
    return d


def admin_rule(kernel_name: str) -> str:
    """The shipped ttyS0 example, uncommented and pointed at ``kernel_name``: what an
    admin does to export the server's own UART."""
    line = next(ln for ln in (RULES / LOCAL_RULES).read_text().splitlines()
                if ln.startswith('#SUBSYSTEM=="tty", KERNEL=="ttyS0"'))
    return line[1:].replace('"ttyS0"', f'"{kernel_name}"') + "\n"


@pytest.mark.root
@needs_udev
def test_shipped_rules_parse_and_export_nothing_until_an_admin_tags_a_device(tmp_path):
    name = a_tty()
    props, problems = udevadm_test(rules_dir(tmp_path), name)
    assert problems == []
    assert "SYSTEMD_WANTS" not in props and "REMOTE_HW_EXPORT" not in props


@pytest.mark.root
@needs_udev
def test_a_tagged_tty_starts_the_export_unit_through_systemd(tmp_path):
    name = a_tty()
    props, problems = udevadm_test(rules_dir(tmp_path, admin_rule(name)), name)
    assert problems == []
    assert props["REMOTE_HW_EXPORT"] == "1"
    assert props["REMOTE_HW_DEVICE"] == "com1" and props["REMOTE_HW_BAUD"] == "115200"
    assert ":systemd:" in props["TAGS"]
    assert props["SYSTEMD_WANTS"] == f"remote-hw-export@{name}.service"
    assert "RUN" not in props


@pytest.mark.root
@needs_udev
def test_removal_starts_nothing(tmp_path):
    name = a_tty()
    props, problems = udevadm_test(rules_dir(tmp_path, admin_rule(name)), name, "remove")
    assert problems == [] and "SYSTEMD_WANTS" not in props


@pytest.mark.root
@needs_udev
def test_every_example_match_is_valid_syntax(tmp_path):
    examples = "".join(ln[1:] + "\n" for ln in (RULES / LOCAL_RULES).read_text().splitlines()
                       if ln.startswith("#SUBSYSTEM"))
    assert examples.count("\n") >= 3
    props, problems = udevadm_test(rules_dir(tmp_path, examples), a_tty())
    assert problems == []


@pytest.mark.root
@needs_udev
def test_the_checker_catches_a_broken_rule(tmp_path):
    broken = 'SUBSYSTEM=="tty", FOO{bar}=="1", ENV{REMOTE_HW_EXPORT}="1"\n'
    props, problems = udevadm_test(rules_dir(tmp_path, broken), a_tty())
    assert problems and "Invalid key" in problems[0]


@pytest.mark.root
@needs_udev
def test_udevadm_test_leaves_the_real_dev_alone(tmp_path):
    name = a_tty()
    node = Path("/dev") / name
    before = node.stat() if node.exists() else None
    char_links = Path("/dev/char").exists()
    udevadm_test(rules_dir(tmp_path, admin_rule(name)), name)
    if before is not None:
        after = node.stat()
        assert (after.st_mode, after.st_uid, after.st_gid) == (
            before.st_mode, before.st_uid, before.st_gid)
    assert Path("/dev/char").exists() == char_links


# ------------------------------------------------------------------ the units

def unit(name: str) -> dict[str, list[str]]:
    """A unit file as {Section.Key: [values]}."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def test_the_rule_wants_the_shipped_template():
    text = (RULES / EXPORT_RULES).read_text()
    wants = re.search(r'ENV\{SYSTEMD_WANTS\}\+="([^"@]+)@%k\.service"', text)
    assert wants, "the export rule must use SYSTEMD_WANTS on a template unit"
    assert (UNITS / f"{wants.group(1)}@.service").exists()
    assert 'TAG+="systemd"' in text
    assert "RUN" not in re.sub(r"#.*", "", text)          # no long-running RUN


def test_the_export_template_follows_its_device():
    u = unit("remote-hw-export@.service")
    assert u["Unit.BindsTo"] == ["dev-%i.device"]          # stops when unplugged
    assert "dev-%i.device" in u["Unit.After"][0]
    exec_start = u["Service.ExecStart"][0]
    assert exec_start.startswith("/usr/local/bin/remote-hw export ") and exec_start.endswith("%I")
    assert "Install.WantedBy" not in u                     # started by udev only
    assert all(p.lstrip("-").startswith("/etc/remote-hw/") for p in u["Service.EnvironmentFile"])


def test_server_and_agent_units_use_etc_remote_hw():
    s = unit("remote-hw-server.service")
    assert s["Service.ExecStart"][0].startswith("/usr/local/bin/remote-hw server ")
    assert s["Service.EnvironmentFile"] == ["-/etc/remote-hw/server.env"]
    assert s["Install.WantedBy"] == ["multi-user.target"]
    a = unit("remote-hw-agent.service")
    assert "--config /etc/remote-hw/agent.toml" in a["Service.ExecStart"][0]
    assert a["Unit.ConditionPathExists"] == ["/etc/remote-hw/agent.toml"]


def _verify(tmp_path: Path, files: dict[str, str]) -> str:
    d = tmp_path / "units"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", *files], cwd=d, capture_output=True,
                       text=True, timeout=60)
    return (r.stdout + r.stderr).strip()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path):
    files = {}
    for path in UNITS.glob("*.service"):
        # The units run /usr/local/bin/remote-hw, which install_units.sh links; point
        # them at an executable that exists here so verify checks everything else.
        files[path.name] = path.read_text().replace("/usr/local/bin/remote-hw", sys.executable)
    files[f"remote-hw-export@{a_tty()}.service"] = files.pop("remote-hw-export@.service")
    assert _verify(tmp_path, files) == ""
    broken = {"broken.service": "[Unit]\nBindz=dev-x.device\n[Service]\nExecStart=/bin/true\n"}
    assert "Unknown key" in _verify(tmp_path, broken)      # the check can fail


# ------------------------------------------------------------------ the installer

def _install(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=60)


def test_install_units_into_a_staging_root(tmp_path):
    root = tmp_path / "root"
    r = _install(root, "--bin", sys.executable)
    assert r.returncode == 0, r.stderr
    for rel in ("etc/udev/rules.d/90-remote-hw-export.rules",
                "etc/udev/rules.d/70-remote-hw-local.rules",
                "etc/systemd/system/remote-hw-server.service",
                "etc/systemd/system/remote-hw-agent.service",
                "etc/systemd/system/remote-hw-export@.service",
                "etc/remote-hw/server.env", "etc/remote-hw/agent.env",
                "etc/remote-hw/export.env"):
        assert (root / rel).is_file(), rel
    assert os.readlink(root / "usr/local/bin/remote-hw") == sys.executable
    assert (root / "etc/systemd/system/remote-hw-export@.service").read_bytes() == \
        (UNITS / "remote-hw-export@.service").read_bytes()
    # The admin edits the matches and the settings; a second run keeps both.
    local = root / "etc/udev/rules.d/70-remote-hw-local.rules"
    local.write_text(admin_rule("ttyUSB0"))
    (root / "etc/remote-hw/server.env").write_text("REMOTE_HW_SERVER_ARGS=--server-id z\n")
    r = _install(root, "--bin", sys.executable)
    assert r.returncode == 0 and "wrote" not in r.stdout, r.stdout
    assert local.read_text() == admin_rule("ttyUSB0")
    assert "server-id z" in (root / "etc/remote-hw/server.env").read_text()


def test_install_units_rejects_bad_arguments(tmp_path):
    r = _install(tmp_path / "root", "--enable", "everything")
    assert r.returncode == 2 and "server or agent" in r.stderr
    r = _install(tmp_path / "root", "--frobnicate")
    assert r.returncode == 2 and "unknown argument" in r.stderr


# ------------------------------------------------------------------ the hot-plug path

def _drive(address: tuple[str, int], device: str, pty: Pty) -> None:
    """A client VM's view of the exported port: transmit, then receive."""
    link = ServerLink("x", address, client_name="udev-test").connect()
    try:
        assert link.attach(1, device) == 0
        for ch in b"ATZ\r":
            assert link.io(1, device, AccessKind.PORT, 0, 1, W, ch)[0] == 0
        assert pty.read(4) == b"ATZ\r"
        os.write(pty.master, b"OK")
        got = bytearray()
        # Poll the line status as a driver would, bounded in time rather than in count:
        # the tty backend's reader thread may be slow to run on a loaded machine.
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            status, lsr = link.io(1, device, AccessKind.PORT, 5, 1, R)
            if lsr & 1:
                got.append(link.io(1, device, AccessKind.PORT, 0, 1, R)[1])
            else:
                time.sleep(0.001)
        assert bytes(got) == b"OK"
    finally:
        link.close()


def test_export_of_a_pty_serves_a_16550_to_a_client():
    """What `remote-hw export` sets up, in process: settings from the device, a server
    with one UART whose far side is the tty, a client using it."""
    pty = Pty()
    try:
        s = export_settings(pty.path, listen=("127.0.0.1", 0))
        ctl = Controller(s.server_id, [s.device])
        server = Server(ctl, *s.listen).start()
        try:
            _drive(server.address, s.device.id, pty)
        finally:
            server.stop()
    finally:
        pty.close()


@pytest.mark.fuse
def test_the_units_exec_start_exports_a_pty(tmp_path):
    """The command remote-hw-export@.service runs, with a pty as the device (%I); its
    FUSE view goes to a temporary directory instead of /run/remote-hw."""
    exec_start = unit("remote-hw-export@.service")["Service.ExecStart"][0]
    pty = Pty()
    try:
        instance = pty.path[len("/dev/"):]                      # pts/N
        args = f"--listen 127.0.0.1:0 --device-id uart1 --mount {tmp_path / 'mnt'}"
        argv = exec_start.replace("$REMOTE_HW_EXPORT_ARGS", args).replace("%I", instance).split()
        assert argv[:2] == ["/usr/local/bin/remote-hw", "export"]
        proc = Proc(remote_hw_cmd(*argv[1:]))
        try:
            port = int(proc.wait_for(r"listening on [\d.]+:(\d+)").group(1))
            proc.wait_for(r"FUSE view of server")
            _drive(("127.0.0.1", port), "uart1", pty)
            assert os.listdir(tmp_path / "mnt" / "devices") == ["uart1"]
        finally:
            assert proc.stop() == 0, proc.output()
        assert not (tmp_path / "mnt").exists()          # unmounted on SIGTERM
    finally:
        pty.close()
