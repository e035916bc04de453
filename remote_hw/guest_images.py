"""Where the guest programs of guests/ are, building them on first use."""

from __future__ import annotations

import subprocess
from pathlib import Path

GUESTS_DIR = Path(__file__).resolve().parent.parent / "guests"
BUILD_DIR = GUESTS_DIR / "build"


class GuestBuildError(RuntimeError):
    """The guest programs are missing and could not be built."""


def guest_image(name: str) -> Path:
    """Path of a built guest (e.g. ``echo.bin``); runs guests/build.sh if it is missing."""
    path = BUILD_DIR / name
    if path.exists():
        return path
    script = GUESTS_DIR / "build.sh"
    if not script.exists():
        raise GuestBuildError(f"guest {name} is not built and {script} is missing "
                              "(guests are only available from a source checkout)")
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    if r.returncode != 0 or not path.exists():
        raise GuestBuildError(f"building guests failed ({script}): {r.stderr.strip()[-500:]}")
    return path
