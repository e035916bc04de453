"""The one compiled part of remote-hw: remote_hw.net._fastio (see remote_hw/net/fastio.py).

Everything else is in pyproject.toml.  The extension is optional: where no C compiler
or Python headers exist the install still succeeds and remote-hw runs its pure-Python
path (``remote-hw --version`` and the benchmarks say which one is in use).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("remote_hw.net._fastio", ["remote_hw/net/_fastio.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra",
                                                 "-Wno-unused-parameter"])])
