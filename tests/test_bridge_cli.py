"""``remote-hw bridge`` as a user meets it: its usage errors, and the recipes of
docs/bridge.md (the libvirt XML is checked against libvirt's own schema, and the
QEMU device JSON is the one the QEMU tests boot with)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import REPO, free_port, remote_hw_cmd

DOC = REPO / "docs" / "bridge.md"
LIBVIRT_SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(remote_hw_cmd("bridge", *args), capture_output=True, text=True,
                          timeout=60, cwd=REPO)


@pytest.mark.parametrize("args, status, words", [
    (["--device", "a/uart0", "--server", "a=127.0.0.1:1"], 2, "--socket"),
    (["--socket", "S", "--device", "uart0", "--server", "a=127.0.0.1:1"], 2,
     "must be SERVER/DEVICE"),
    (["--socket", "S", "--device", "b/uart0", "--server", "a=127.0.0.1:1"], 2,
     "server 'b' is not given"),
    (["--socket", "S", "--device", "a/uart0"], 2, "at least one NAME=HOST:PORT"),
    (["--socket", "S", "--device", "a/uart0", "--server", "a=127.0.0.1:1", "--timeout", "3"],
     2, "half of QEMU's 5 s reply timeout"),
    (["--socket", "S", "--device", "a/uart0", "--server", "a=127.0.0.1:1",
      "--template", "pci-nic"], 2, "invalid choice"),
    (["--socket", "S", "--device", "b/uart0", "--server", "a=127.0.0.1:1", "--via", "b=c"],
     2, "entry 'c' is not given"),
    (["--socket", "S", "--device", "a/uart0", "--server", "a=127.0.0.1:1", "--tls-dir",
      "/nonexistent"], 2, "ca.pem is missing"),
])
def test_usage_errors_name_the_argument(args, status, words):
    r = run(*args)
    assert r.returncode == status, r.stderr
    assert words in r.stderr


def test_an_unreachable_server_exits_1_with_the_reason(tmp_path):
    port = free_port()
    r = run("--socket", str(tmp_path / "s.sock"), "--device", "a/uart0",
            "--server", f"a=127.0.0.1:{port}")
    assert r.returncode == 1
    assert f"server a at 127.0.0.1:{port}: cannot connect" in r.stderr
    assert not (tmp_path / "s.sock").exists()


def _doc_block(lang: str) -> str:
    m = re.search(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)
    assert m, f"docs/bridge.md has no {lang} block"
    return m.group(1)


def test_the_libvirt_recipe_is_valid_against_libvirts_schema(tmp_path):
    xmllint = shutil.which("xmllint")
    if xmllint is None or not LIBVIRT_SCHEMA.exists():
        pytest.skip("needs xmllint (libxml2-utils) and libvirt's schemas (libvirt0): "
                    "scripts/install_qemu.sh installs both")
    xml = tmp_path / "domain.xml"
    xml.write_text(_doc_block("xml"))
    r = subprocess.run([xmllint, "--noout", "--relaxng", str(LIBVIRT_SCHEMA), str(xml)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "validates" in r.stderr
    # The pass-through argument is the device the QEMU tests boot with.
    values = re.findall(r"<qemu:arg value='([^']*)'/>", xml.read_text())
    assert values[0] == "-device"
    dev = json.loads(values[1])
    assert dev["driver"] == "vfio-user-pci"
    assert dev["socket"]["type"] == "unix" and dev["socket"]["path"].endswith(".sock")


def test_the_documented_qemu_device_and_qmp_commands_are_valid_json():
    text = DOC.read_text()
    device = re.search(r"-device '(\{.*?\})'", text)
    assert device, "no -device line in docs/bridge.md"
    assert json.loads(device.group(1))["driver"] == "vfio-user-pci"
    qmp, objs, pos = _doc_block("json"), [], 0
    decoder = json.JSONDecoder()
    while qmp[pos:].strip():  # one JSON object after another, as sent to QMP
        obj, end = decoder.raw_decode(qmp, pos + len(qmp[pos:]) - len(qmp[pos:].lstrip()))
        objs.append(obj)
        pos = end
    assert [o["execute"] for o in objs] == ["qmp_capabilities", "device_add", "device_del"]
    assert objs[1]["arguments"]["driver"] == "vfio-user-pci"


@pytest.mark.parametrize("extra, posted", [([], True), (["--no-posting"], False)])
def test_no_posting_reaches_the_bridges_link(tmp_path, monkeypatch, extra, posted):
    """``--no-posting`` as ``remote-hw vm``'s: the bridge's ServerLink is made with
    posting=False, so against a real server (in this process) POSTED is not
    negotiated and every BAR access waits; without it, POSTED is."""
    import remote_hw.bridge.front as front
    import remote_hw.signals as signals
    from remote_hw.cli import build_parser
    from remote_hw.config import DeviceSpec
    from remote_hw.protocol import messages as m
    from remote_hw.server.controller import Controller
    from remote_hw.server.listener import Server

    srv = Server(Controller("a", [DeviceSpec("uart0", "uart16550")]), "127.0.0.1", 0).start()
    made: list[front.Bridge] = []
    seen: dict[str, object] = {}

    class Recorded(front.Bridge):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            made.append(self)

    def served(stop) -> None:  # instead of waiting for SIGTERM: look, then return
        link = made[0].link
        seen.update(posting=link.posting, offered=link.offered_features,
                    features=link.features)

    monkeypatch.setattr(front, "Bridge", Recorded)
    monkeypatch.setattr(signals, "wait_for_signal", served)
    try:
        args = build_parser().parse_args(
            ["bridge", "--socket", str(tmp_path / "b.sock"), "--device", "a/uart0",
             "--server", f"a=127.0.0.1:{srv.address[1]}", *extra])
        assert args.posting is posted
        assert args.func(args) == 0
    finally:
        srv.stop()
    assert seen["posting"] is posted
    assert bool(seen["offered"] & m.FEATURE_POSTED) is posted
    assert bool(seen["features"] & m.FEATURE_POSTED) is posted
    assert seen["features"] & m.FEATURE_RESUME  # the rest of the negotiation unchanged
