"""The Vagrant rig (a client and two servers, libvirt, nested KVM): ``vagrant validate``
checks the Vagrantfile offline - no box is downloaded, no machine is created - with
the libvirt provider's own option checks. Runs wherever vagrant is installed (CI)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VAGRANTFILE = REPO / "Vagrantfile"

needs_vagrant = pytest.mark.skipif(shutil.which("vagrant") is None,
                                   reason="needs vagrant (apt-get install vagrant, which "
                                          "brings vagrant-libvirt)")


def validate(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    """``vagrant validate`` on ``text`` in a scratch directory (vagrant writes a
    .vagrant directory next to the Vagrantfile, and a home under VAGRANT_HOME)."""
    d = tmp_path / "rig"
    d.mkdir(exist_ok=True)
    (d / "Vagrantfile").write_text(text)
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant-home"),
               VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_DEFAULT_PROVIDER="libvirt")
    return subprocess.run(["vagrant", "validate"], cwd=d, env=env, capture_output=True,
                          text=True, timeout=300)


@needs_vagrant
def test_vagrantfile_validates_offline(tmp_path):
    r = validate(tmp_path, VAGRANTFILE.read_text())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout
    assert not list((tmp_path / "vagrant-home").glob("boxes/*"))     # nothing downloaded


@needs_vagrant
def test_validate_catches_an_unknown_libvirt_option(tmp_path):
    broken = VAGRANTFILE.read_text().replace("lv.nested = true", "lv.nestd = true")
    assert broken != VAGRANTFILE.read_text()
    r = validate(tmp_path, broken)
    assert r.returncode != 0 and "nestd" in r.stdout + r.stderr


def test_the_rig_is_a_client_and_two_servers_on_libvirt_with_nested_kvm():
    text = VAGRANTFILE.read_text()
    servers = re.search(r"^SERVERS = \{(.*)\}$", text, re.M)
    assert servers and len(re.findall(r'"s\d" =>', servers.group(1))) == 2
    assert 'config.vm.define "client"' in text
    assert "config.vm.provider :libvirt" in text
    assert "lv.nested = true" in text and 'lv.cpu_mode = "host-passthrough"' in text


def test_the_rig_is_provisioned_with_the_projects_own_commands():
    text = VAGRANTFILE.read_text()
    assert "make install" in text                      # scripts/install.sh via Makefile
    assert "scripts/install_units.sh --enable server" in text
    assert "-m pytest" in text                         # the client runs the tests
    for path in ("scripts/install.sh", "scripts/install_units.sh", "Makefile",
                 "guests/build.sh"):
        assert (REPO / path).exists(), path
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^install:.*\n\t.*scripts/install\.sh", make, re.M)
