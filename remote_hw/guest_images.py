"""Where the guest programs of guests/ are, building them on first use.

In a checkout they are built into ``guests/build/`` (``scripts/install.sh`` does so, and
the tests and benchmarks look there). An installed package carries only their sources
(see ``remote_hw/resources.py``) and may sit in a read-only site-packages, so its guests
are built into the user's cache, in a folder named by a digest of the sources: a cache
filled by an older version is then never mistaken for this one's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from remote_hw import resources


class GuestBuildError(RuntimeError):
    """The guest programs are missing and could not be built."""


def _sources_digest(src: Path) -> str:
    """A short digest of every file in the guests' source folder (names and contents)."""
    h = hashlib.sha256()
    for p in sorted(src.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_dir(src: Path | None = None) -> Path:
    """Where the guests built from ``src`` (default: this installation's) go."""
    src = src or resources.guests_dir()
    if resources.in_checkout(src):
        return src / "build"
    return resources.cache_dir() / "guests" / _sources_digest(src)


def _build(script: Path, out: Path) -> None:
    """Run build.sh into a fresh folder beside ``out``, then move each image into
    ``out`` with one rename: a concurrent reader sees a whole image or none."""
    missing = [tool for tool in ("as", "ld") if shutil.which(tool) is None]
    if missing:
        raise GuestBuildError(f"building the guests needs {' and '.join(missing)} from "
                              "binutils, which is not on PATH (apt-get install binutils)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    except OSError as e:
        raise GuestBuildError(f"cannot create {out} to build the guests in ({e.strerror})") \
            from None
    try:
        r = subprocess.run(["sh", str(script), str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            raise GuestBuildError(f"building guests failed ({script}): "
                                  f"{r.stderr.strip()[-500:]}")
        for image in tmp.iterdir():
            os.replace(image, out / image.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stale(src: Path, image: Path) -> bool:
    """A checkout's image older than a source file (an edited guest, or an include
    it uses): rebuilt, so a test never runs yesterday's guest. An installation's
    build folder is named by the sources' digest and cannot go stale."""
    built = image.stat().st_mtime
    return any(p.is_file() and p.suffix in (".S", ".inc", ".sh") and p.stat().st_mtime > built
               for p in src.iterdir())


def guest_image(name: str) -> Path:
    """Path of a built guest (e.g. ``echo.bin``); runs guests/build.sh if it is missing."""
    src = resources.guests_dir()
    out = build_dir(src)
    path = out / name
    if path.exists() and not (resources.in_checkout(src) and _stale(src, path)):
        return path
    script = src / "build.sh"
    if not script.exists():
        raise GuestBuildError(f"guest {name} is not built and {script} is missing "
                              "(this installation carries no guest sources)")
    _build(script, out)
    if not path.exists():
        raise GuestBuildError(f"{script} does not build a guest named {name}")
    return path
