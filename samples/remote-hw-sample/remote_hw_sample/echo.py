"""An echo backend: every byte the guest sends comes back to it.

Use it behind a stream device (``--device u0=uart16550,backend=echo:``) to test a
guest's receive path with no one at the far side. It shows the one thread rule a
backend must keep: ``from_guest`` is called on the request path *inside* the device
model (the instance lock is held and the model is in the middle of its write), so a
backend never calls ``to_guest`` from there. It hands the bytes to its own thread,
which delivers them through ``to_guest`` as a TCP peer would, a moment later.
"""

from __future__ import annotations

import queue
import threading

from remote_hw.plugin import BackendError, StreamBackend, ToGuest

_STOP = b""   # the sentinel that ends the thread (the guest never sends empty data)


class EchoBackend(StreamBackend):
    """``echo:`` (no argument). ``echoed`` counts the bytes sent back."""

    name = "echo"
    api_version = (1, 0)

    def __init__(self, arg: str, label: str, index: int = 0) -> None:
        super().__init__(arg, label, index)
        if arg:
            raise BackendError(f"echo takes no argument (write 'echo:'), got {arg!r}")
        self.echoed = 0
        self._pending: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, to_guest: ToGuest) -> None:
        self._thread = threading.Thread(target=self._run, args=(to_guest,),
                                        name=f"echo {self.label}", daemon=True)
        self._thread.start()

    def _run(self, to_guest: ToGuest) -> None:
        while (data := self._pending.get()) != _STOP:
            to_guest(data)                    # thread-safe: takes the instance lock
            self.echoed += len(data)

    def from_guest(self, data: bytes) -> None:
        if data:
            self._pending.put(bytes(data))    # never blocks

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._pending.put(_STOP)
            thread.join(timeout=5)

    def status(self) -> dict[str, int]:
        return {"echoed": self.echoed}
