"""Posted writes and shadows on the client side (FEATURE_POSTED, docs/protocol.md).

A :class:`DeviceShadow` is what a link knows about one VM's device from the server's
last SHADOW: which one-byte registers it may answer itself, which writes it may send
without waiting, and how many of those may be unacknowledged at once. The vCPU thread
reads it on every access; the thread that reads the socket replaces it. Each SHADOW
arrives before the FEEDBACK or INTERRUPT that follows it on the wire, and is applied
by whichever thread reads that frame before it hands the answer over, so a vCPU never
sees an answer that is newer than its shadow.

Pure bookkeeping: no sockets here (the link sends).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from remote_hw.protocol import messages as m

#: Request ids of POSTs carry this bit, so that the FEEDBACK of a failed one is told
#: apart from a late answer (the server treats request ids as opaque).
POST_ID_BIT = 1 << 62

_U32 = 0xFFFF_FFFF


class DeviceShadow:
    """What the client may do for one (VM, device) without asking the server.

    ``reads`` maps a shadowed offset to its byte; ``posted`` is the mask of offsets a
    one-byte write may be posted to (0 while posting is off or the link is down).
    ``sent`` counts POSTs sent, ``confirmed`` those known applied (from SHADOW's
    ``applied``, or because a later synchronous access of the same device was
    answered: the server applies one connection's frames in order). ``kept`` holds
    the POSTs not yet known applied, to re-send after a resumed connection (None
    when the link does not reconnect).
    """

    __slots__ = ("vm_id", "device", "reads", "posted", "window", "sent", "confirmed",
                 "kept", "failed", "lost")

    def __init__(self, vm_id: int, device: str, keep: bool = False) -> None:
        self.vm_id = vm_id
        self.device = device
        self.reads: dict[int, int] = {}
        self.posted = 0
        self.window = 0
        self.sent = 0
        self.confirmed = 0
        self.kept: deque[tuple[Any, ...]] | None = deque() if keep else None
        self.failed = 0  # POSTs the server reported failed
        self.lost = 0  # POSTs that may not have been applied (a connection lost)

    def update(self, msg: m.Shadow) -> None:
        """Take a SHADOW: the new registers, mask and window, and the credits back."""
        values = msg.values
        reads = {}
        mask = msg.shadowed
        n = 0
        while mask:
            low = mask & -mask
            reads[low.bit_length() - 1] = (values >> (8 * n)) & 0xFF
            mask ^= low
            n += 1
        # Applied is the server's count mod 2**32; ours is exact. One read of ``sent``:
        # the vCPU thread may post meanwhile, and a POST sent after this SHADOW left
        # the server must not count as applied.
        sent = self.sent
        behind = (sent - msg.applied) & _U32
        if behind <= sent:
            self.confirm(sent - behind)
        self.window = msg.window
        self.posted = msg.posted if msg.window else 0
        self.reads = reads

    def confirm(self, upto: int) -> None:
        """POSTs up to number ``upto`` are known applied."""
        if upto > self.confirmed:
            kept = self.kept
            if kept is not None:
                # ``kept`` holds POSTs confirmed+1 .. sent, oldest first; drop those
                # up to ``upto`` (counted here, as the vCPU may append meanwhile).
                for _ in range(min(upto - self.confirmed, len(kept))):
                    kept.popleft()
            self.confirmed = upto

    def may_post(self, offset: int, size: int) -> bool:
        """Whether a write of ``size`` bytes at ``offset`` may be posted now."""
        return (size == 1 and self.posted >> offset & 1 == 1
                and self.sent - self.confirmed < self.window)

    def clear(self) -> int:
        """Forget the shadow (the connection is gone or the device re-attached): every
        access asks the server again. Returns how many POSTs were not known applied."""
        self.reads = {}
        self.posted = 0
        self.window = 0
        unknown = self.sent - self.confirmed
        self.sent = self.confirmed = 0
        if self.kept is not None:
            self.kept.clear()
        return unknown

    def describe(self) -> dict[str, Any]:
        """For status displays and tests."""
        return {"reads": dict(self.reads), "posted": self.posted, "window": self.window,
                "sent": self.sent, "confirmed": self.confirmed, "failed": self.failed,
                "lost": self.lost}
