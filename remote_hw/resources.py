"""Where remote-hw's files that are not Python are: the BPF sources and the guest sources.

They are kept at the top of the repository (``ebpf/``, ``guests/``), beside the package,
because that is where people edit and build them. An installed (non-editable) package has
no repository beside it, so ``setup.py``'s ``build_py`` copies them into the package, as
``remote_hw/_data/ebpf`` and ``remote_hw/_data/guests``. This module is the one place that
knows both layouts: the copy inside the package wins when it exists (an installed
package), otherwise the repository's folders are used (a checkout, or an editable
install, whose ``build_py`` copies nothing).

Things remote-hw builds from these sources (the guest programs) go beside the sources in
a checkout, and into a writable cache otherwise (``cache_dir``): site-packages may be
read-only and is never the place for files made at run time.

Nothing here reads a file; the functions only compute paths (and test that folders
exist), so importing this module, or building the argument parser, cannot fail.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "_data"     # what setup.py's build_py fills in an installed package
REPO_DIR = PACKAGE_DIR.parent        # the checkout's top level, when there is one

EBPF = "ebpf"
GUESTS = "guests"


def _find(name: str) -> Path:
    """The packaged copy of the folder ``name`` if it is there, else the checkout's.

    When neither exists the packaged path is returned, so an error message names
    where an installed package should have had it.
    """
    packaged = DATA_DIR / name
    if packaged.is_dir():
        return packaged
    checkout = REPO_DIR / name
    return checkout if checkout.is_dir() else packaged


def ebpf_dir() -> Path:
    """The folder of ``kvm_access.bpf.c`` and ``remote_hw_events.h``."""
    return _find(EBPF)


def guests_dir() -> Path:
    """The folder of the guest programs' sources and ``build.sh``."""
    return _find(GUESTS)


def in_checkout(path: Path) -> bool:
    """True if ``path`` is one of the checkout's own folders (not a packaged copy)."""
    return not path.resolve().is_relative_to(DATA_DIR)


def cache_dir() -> Path:
    """A writable folder for what remote-hw builds when installed: ``$XDG_CACHE_HOME/
    remote-hw``, else ``/var/cache/remote-hw`` for root (system services have no home
    cache worth the name), else ``~/.cache/remote-hw``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):       # the XDG spec: a relative value is to be ignored
        return Path(xdg) / "remote-hw"
    if os.geteuid() == 0:
        return Path("/var/cache/remote-hw")
    return Path.home() / ".cache" / "remote-hw"
