"""Which wing may import which, for the input wing and the models that use it.

A device model must not depend on a backend (the far side is the server's business),
and ``remote_hw/input/`` is shared by models, the FUSE view, backends and the client,
so it may import nothing of the project but itself. Read from the source with ``ast``
so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "remote_hw"


def project_imports(path: Path) -> set[str]:
    """The ``remote_hw.*`` modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
    return {m for m in found if m == "remote_hw" or m.startswith("remote_hw.")}


def imports_of(wing: str) -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE.parent)): project_imports(p)
            for p in sorted((PACKAGE / wing).rglob("*.py"))}


def test_project_imports_sees_relative_and_lazy_imports():
    i8042 = project_imports(PACKAGE / "devices" / "i8042" / "controller.py")
    assert "remote_hw.devices.base" in i8042           # from ..base import ...
    assert "remote_hw.input.keytext" in i8042          # from remote_hw.input.keytext import
    backend = project_imports(PACKAGE / "backends" / "evdev.py")
    assert "remote_hw.input.evdev_keyboard" in backend


def test_device_models_import_no_backend():
    wrong = {f: sorted(m for m in mods if m.startswith("remote_hw.backends"))
             for f, mods in imports_of("devices").items()}
    assert not {f: m for f, m in wrong.items() if m}


def test_the_input_wing_imports_only_itself():
    wrong = {f: sorted(m for m in mods if not m.startswith("remote_hw.input"))
             for f, mods in imports_of("input").items()}
    assert not {f: m for f, m in wrong.items() if m}


def test_nothing_the_cli_runs_imports_the_cli():
    # cli.py parses arguments and imports the commands; a command that imported cli.py
    # back (for wait_for_signal, once) made a cycle. Shared helpers live below both.
    wrong = {f: "remote_hw.cli" for f, mods in imports_of(".").items()
             if "remote_hw.cli" in mods and f != "remote_hw/cli.py"}
    assert not wrong


def test_backends_import_no_cli_parser():
    # A backend opens what it is given; building `remote-hw export`'s settings from
    # command-line style values is remote_hw/export.py's job.
    wrong = {f: sorted(m for m in mods if m in ("remote_hw.config", "remote_hw.cli"))
             for f, mods in imports_of("backends").items()}
    assert not {f: m for f, m in wrong.items() if m}
