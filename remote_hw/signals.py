"""How a long-running command waits for its end: SIGINT/SIGTERM, or its own stop event.

Its own module because both the parser side (:mod:`remote_hw.cli`) and the commands
(:mod:`remote_hw.commands`, :mod:`remote_hw.bridge.command`) are above it: the commands
use it, and the CLI imports the commands, so it cannot live in either without a cycle.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["wait_for_signal"]


def wait_for_signal(stop: threading.Event) -> None:
    """Block until SIGINT/SIGTERM (or ``stop`` is set by someone else).

    The wait polls ``stop`` every half second rather than blocking on it outright so
    that the main thread returns to the interpreter often enough to run the handler
    (``signal.signal`` handlers only run in the main thread, between bytecodes).
    Call it from the main thread.
    """
    def handler(signum: int, frame: object) -> None:
        stop.set()
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop.wait(0.5):
        pass
