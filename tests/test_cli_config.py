"""Command-line and configuration parsing: every bad argument is named, exit 2."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from remote_hw.cli import main
from remote_hw.config import (
    ConfigError,
    load_agent_config,
    parse_device,
    parse_map,
    parse_server,
    parse_size,
)

from helpers import REPO, remote_hw_cmd


def test_parse_device_forms():
    d = parse_device("uart0=uart16550,backend=tcp:127.0.0.1:7701")
    assert (d.id, d.kind, d.backend, d.shared) == ("uart0", "uart16550", "tcp:127.0.0.1:7701",
                                                   False)
    d = parse_device("rtc0=cmos-rtc,shared")
    assert d.shared and d.backend is None
    assert parse_device("u=uart16550,backlog=16").options == {"backlog": "16"}


@pytest.mark.parametrize("text, needle", [
    ("uart0", "ID=KIND"), ("=uart16550", "device id"), ("bad id=uart16550", "device id"),
    ("u=uart16550,backend=tcp", "NAME:ARG"), ("u=uart16550,weird", "KEY=VALUE"),
])
def test_parse_device_errors(text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_device(text)


def test_parse_map_forms():
    mp = parse_map("port:0x3f8-0x3ff=a/uart0,irq=4")
    assert (mp.kind, mp.start, mp.end, mp.server, mp.device, mp.irq, mp.size) == \
        ("port", 0x3F8, 0x3FF, "a", "uart0", 4, 8)
    mp = parse_map("mmio:0xd0000000-0xd0000fff=b/virt")
    assert mp.kind == "mmio" and mp.irq is None and mp.size == 0x1000


@pytest.mark.parametrize("text, needle", [
    ("port:0x3ff-0x3f8=a/u", "empty"), ("port:0x3f8-0x10000=a/u", "outside"),
    ("io:1-2=a/u", "must be"), ("port:1-2=a/u,irq=99", "irq 99"),
    ("port:1-2=a/u,foo=1", "unknown option"), ("port:zz-2=a/u", "not a number"),
])
def test_parse_map_errors(text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_map(text)


def test_parse_server_and_size():
    assert parse_server("a=127.0.0.1:7700") == ("a", ("127.0.0.1", 7700))
    with pytest.raises(ConfigError, match="NAME=HOST:PORT"):
        parse_server("127.0.0.1:7700")
    with pytest.raises(ConfigError, match="out of range"):
        parse_server("a=h:70000")
    assert parse_size("2M") == 2 << 20 and parse_size("64K") == 65536
    with pytest.raises(ConfigError):
        parse_size("lots")


@pytest.mark.parametrize("argv, needle", [
    (["vm", "--image", "x", "--map", "port:1-2"], "argument --map"),
    (["vm", "--image", "x", "--server", "nope"], "argument --server"),
    (["vm", "--image", "x", "--vm-id", "0"], "argument --vm-id"),
    (["server", "--listen", "nohost"], "argument --listen"),
    (["server", "--device", "uart0"], "argument --device"),
    (["server", "--server-id", "a b"], "argument --server-id"),
    (["vm"], "--image"),
    (["server", "--send-timeout", "0"], "argument --send-timeout: 0 must be above 0"),
    (["server", "--forward-timeout", "soon"], "argument --forward-timeout: 'soon' is not"),
    (["bridge", "--socket", "/tmp/x.sock", "--device", "a/uart0", "--server",
      "a=127.0.0.1:7700", "--template", "isa-serial"], "argument --template: invalid choice"),
])
def test_cli_argument_errors_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_vm_map_to_unknown_server_exits_2(capsys):
    rc = main(["vm", "--image", "x", "--map", "port:1-2=b/u"])
    assert rc == 2 and "server 'b'" in capsys.readouterr().err


def test_vm_bad_image_exits_2(tmp_path, capsys):
    rc = main(["vm", "--image", str(tmp_path / "missing.bin")])
    assert rc == 2 and "argument --image" in capsys.readouterr().err


def test_server_unknown_device_kind_exits_2():
    r = subprocess.run(remote_hw_cmd("server", "--listen", "127.0.0.1:0", "--device",
                                     "x=no-such-kind"), capture_output=True, text=True,
                       cwd=REPO, timeout=30)
    assert r.returncode == 2 and "no-such-kind" in r.stderr


def test_help_lists_every_command():
    r = subprocess.run(remote_hw_cmd("--help"), capture_output=True, text=True, cwd=REPO,
                       timeout=30)
    for cmd in ("server", "vm", "agent", "demo"):
        assert cmd in r.stdout


def test_agent_config(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(textwrap.dedent("""
        [servers]
        a = "127.0.0.1:7700"
        [[vm]]
        id = 1
        image = "g.bin"
        map = ["port:0x3f8-0x3ff=a/uart0,irq=4"]
        [[vm]]
        id = 2
        image = "/abs/g.bin"
        memory = "4M"
        on_reset = "restart"
    """))
    conf = load_agent_config(cfg)
    assert conf.servers == {"a": ("127.0.0.1", 7700)}
    assert [v.vm_id for v in conf.vms] == [1, 2]
    assert conf.vms[0].image == str(tmp_path / "g.bin") and conf.vms[1].memory == 4 << 20
    assert conf.vms[1].on_reset == "restart" and conf.vms[0].maps[0].irq == 4


@pytest.mark.parametrize("body, needle", [
    ("[[vm]]\nid = 1\nimage = 'x'\n[[vm]]\nid = 1\nimage = 'y'\n", "used twice"),
    ("[[vm]]\nid = 1\nimage = 'x'\nmap = ['port:1-2=b/u']\n", "not in [servers]"),
    ("[[vm]]\nid = 1\n", "required"),
    ("[[vm]]\nid = 1\nimage = 'x'\ncolour = 'red'\n", "unknown key"),
    ("[servers]\na = 'nohost'\n[[vm]]\nid = 1\nimage = 'x'\n", "HOST:PORT"),
    ("this is not toml", "agent.toml"),
    ("", "no [[vm]]"),
])
def test_agent_config_errors(tmp_path, body, needle):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_agent_config(cfg)


def test_agent_cli_bad_config_exits_2(tmp_path, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[[vm]]\nid = 1\n")
    assert main(["agent", "--config", str(cfg)]) == 2
    assert "argument --config" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["server", "--listen", "127.0.0.1:0", "--no-mount", "--route", "uart0=b"],
     "server 'b' has no --peer address"),
    (["server", "--listen", "127.0.0.1:0", "--no-mount", "--device", "u=uart16550",
      "--allow", "u=c1"], "needs TLS"),
    (["server", "--listen", "127.0.0.1:0", "--no-mount", "--tls-name", "a"],
     "--tls-name: needs --tls-dir"),
    (["vm", "--image", "x", "--server", "a=127.0.0.1:1", "--via", "b=zz"],
     "argument --via: entry 'zz'"),
])
def test_platform_option_errors_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["server", "--allow", "u"], ["server", "--peer", "b"], ["server", "--route", "x"],
    ["vm", "--image", "x", "--via", "b"], ["keys", "issue", "d", "n", "--role", "root"],
])
def test_platform_option_syntax_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_agent_config_via_and_tls(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(textwrap.dedent("""
        [servers]
        a = "127.0.0.1:7700"
        b = "via:a"
        [tls]
        dir = "keys"
        name = "c1"
        [[vm]]
        id = 1
        image = "g.bin"
        map = ["port:0x3f8-0x3ff=b/uart0"]
    """))
    conf = load_agent_config(cfg)
    assert conf.vias == {"b": "a"} and conf.tls == {"dir": str(tmp_path / "keys"), "name": "c1"}
    cfg.write_text(cfg.read_text().replace('b = "via:a"', 'b = "via:zz"'))
    with pytest.raises(ConfigError, match="reached via 'zz'"):
        load_agent_config(cfg)
