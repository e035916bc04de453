"""The compiled parts of remote-hw: remote_hw.net._fastio (the link's hot path, see
remote_hw/net/fastio.py) and remote_hw.bridge._fastvfu (the bridge's BAR accesses, see
remote_hw/bridge/fastpath.py).

Everything else is in pyproject.toml.  The extensions are optional: where no C compiler
or Python headers exist the install still succeeds and remote-hw runs its pure-Python
path (``remote-hw --version`` and the benchmarks say which one is in use).

It also packs the BPF and guest sources, kept at the top of the repository, into the
package (``BuildPyWithData``), so a non-editable install has them.
"""

import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

# Files kept at the top of the repository that an installed package needs: folder ->
# patterns. build_py copies them into remote_hw/_data/<folder> (found there by
# remote_hw/resources.py); MANIFEST.in puts them in the sdist a wheel may be built from.
PACKAGE_DATA = {"ebpf": ["*.c", "*.h"], "guests": ["*.S", "*.inc", "build.sh"]}


class BuildPyWithData(build_py):
    """build_py that also copies ``ebpf/`` and ``guests/`` into the package.

    The project keeps those folders at the top level; a non-editable install has no
    top level, so the files must travel inside ``remote_hw``. An editable install
    copies nothing: there remote_hw/resources.py finds the checkout's own folders.
    """

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder, patterns in PACKAGE_DATA.items():
            src = Path(__file__).resolve().parent / folder
            files = sorted({f for pattern in patterns for f in src.glob(pattern)})
            if not files:
                raise SystemExit(f"setup.py: no {' '.join(patterns)} in {folder}/ to package")
            dest = Path(self.build_lib) / "remote_hw" / "_data" / folder
            dest.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(f, dest / f.name)


setup(ext_modules=[Extension("remote_hw.net._fastio", ["remote_hw/net/_fastio.c"], optional=True,
                             depends=["remote_hw/net/_sockio.h"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra",
                                                 "-Wno-unused-parameter"]),
                   # The bridge's per-access socket calls (remote_hw/bridge/fastpath.py).
                   Extension("remote_hw.bridge._fastvfu", ["remote_hw/bridge/_fastvfu.c"],
                             optional=True, depends=["remote_hw/net/_sockio.h"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra",
                                                 "-Wno-unused-parameter"])],
      cmdclass={"build_py": BuildPyWithData})
