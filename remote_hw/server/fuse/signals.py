"""Undoing what libfuse does to the server process's signals.

libfuse is a C library that expects to own its process: ``fuse_main`` installs
handlers for SIGINT, SIGTERM and SIGHUP where the default was set (so a SIGTERM would
end only the FUSE loop and leave the server running unmounted), and it sets SIGPIPE
back to its default when it stops (so the next write to a closed socket would kill
the server). The view calls these around its mount to put the process back as
Python expects it.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TypeAlias

# What signal.getsignal returns: a handler, SIG_DFL/SIG_IGN, or None (set from C).
Disposition: TypeAlias = Callable[[int, FrameType | None], object] | int | signal.Handlers | None

_RESTORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def signal_dispositions() -> dict[signal.Signals, Disposition]:
    """The dispositions of the signals libfuse takes over, before it does."""
    out: dict[signal.Signals, Disposition] = {}
    for sig in _RESTORED:
        try:
            out[sig] = signal.getsignal(sig)
        except ValueError:
            pass
    return out


def ignore_sigpipe() -> None:
    """libfuse ignores SIGPIPE while it serves and sets it back to the *default* when
    it stops, which would let the next write to a closed socket kill the server
    (Python runs with SIGPIPE ignored and reports EPIPE as an exception). Put it back
    to ignored, from any thread (through libc: signal.signal is main-thread only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.signal(int(signal.SIGPIPE), ctypes.c_void_p(1))  # SIG_IGN == (void (*)(int)) 1


def restore_signal_dispositions(before: dict[signal.Signals, Disposition]) -> None:
    """libfuse's fuse_main installs its own SIGINT/SIGTERM/SIGHUP handlers (at the C
    level, unseen by Python) where the default action was set, so a SIGTERM meant
    for the server would end only the FUSE loop. Re-assert the default and ignored
    dispositions the process had (Python-level handlers are left alone by libfuse).
    Only the main thread may do this; elsewhere the caller owns its signals."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, old in before.items():
        if old in (signal.SIG_DFL, signal.SIG_IGN):
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass
