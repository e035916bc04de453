"""Logging what a peer sent without letting the peer write the log.

Two ways a peer could abuse the log (a client the server's, a server a client's),
and what this module does about them:

* **Forged lines.** An ERROR text (free UTF-8 on the wire) logged verbatim can hold a
  newline and a line that looks like the server's own ("client 99 (admin)
  connected"), or terminal escape sequences. :func:`safe_text` escapes every control
  character (and the backslash, so an escaped ``\\n`` cannot be mistaken for one the
  peer typed) and caps the length, so one peer field is one bounded piece of one line.
* **Floods.** A warning per request (a VM id that is not attached, say) lets a client
  write a line per frame, and remembering "already logged" per id grows without
  bound. :class:`RateLimitedLog` lets a few lines through per interval and counts the
  rest, keeping one counter per limiter whatever the ids: memory does not grow with
  what the peer sends.
"""

from __future__ import annotations

import logging
import threading
import time

#: Default cap on one peer-supplied field in a log line (characters, before escaping).
TEXT_CAP = 200

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_char(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    if ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


def safe_text(text: object, cap: int = TEXT_CAP) -> str:
    """``text`` as one safe piece of a log line: control and other non-printable
    characters (newlines, ESC, U+2028, ...) and backslashes escaped, at most ``cap``
    characters of the original kept, and a marker saying how many were cut."""
    s = text if isinstance(text, str) else str(text)
    cut = len(s) - cap
    if cut > 0:
        s = s[:cap]
    if not (s.isprintable() and "\\" not in s):
        s = "".join(map(_escape_char, s))
    return f"{s}...[{cut} more characters]" if cut > 0 else s


class RateLimitedLog:
    """At most ``burst`` lines per ``interval`` seconds; the rest are counted.

    The first line after a quiet spell says how many were suppressed before it, and
    :meth:`flush` (called periodically by the server's watchdog) reports a count that
    no later line would carry. Thread-safe; constant memory.
    """

    __slots__ = ("_log", "interval", "burst", "_lock", "_window", "_sent", "_suppressed",
                 "_level")

    def __init__(self, logger: logging.Logger, interval: float = 10.0, burst: int = 5,
                 level: int = logging.WARNING) -> None:
        self._log = logger
        self.interval = interval
        self.burst = burst
        self._level = level
        self._lock = threading.Lock()
        self._window = 0.0
        self._sent = 0
        self._suppressed = 0

    def __call__(self, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless over the rate; returns whether it was logged."""
        now = time.monotonic()
        with self._lock:
            if now - self._window >= self.interval:
                self._window = now
                self._sent = 0
            if self._sent >= self.burst:
                self._suppressed += 1
                return False
            self._sent += 1
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            msg += " (%d similar line(s) suppressed before this one)"
            args = (*args, suppressed)
        self._log.log(self._level, msg, *args)
        return True

    @property
    def suppressed(self) -> int:
        """Lines counted but not logged since the last one logged."""
        return self._suppressed

    def flush(self, what: str) -> None:
        """Report suppressed lines once the interval they fell in has passed."""
        with self._lock:
            if not self._suppressed or time.monotonic() - self._window < self.interval:
                return
            n, self._suppressed = self._suppressed, 0
            self._window = time.monotonic()
            self._sent = 1
        self._log.log(self._level, "%s: %d similar line(s) suppressed", what, n)
