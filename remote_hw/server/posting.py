"""Posted writes and shadows on the server side (FEATURE_POSTED, docs/protocol.md).

Why. A console's driver makes two register accesses per byte it prints (an LSR read,
then a THR write), and each used to cost a network round trip. A model says which
writes need no answer and which registers stay put for a while
(:class:`~remote_hw.devices.base.RegisterShadow`); the client then answers those reads
itself and sends those writes without waiting (POST). The server stays the authority:

* a POST is applied in order with everything else of its connection, exactly like a
  synchronous write, and answered only when it fails (FEEDBACK with its request id);
* a resumable session applies a POST through the same window of recent writes as any
  write, so one the client re-sends after a lost connection is applied once;
* every :data:`REPORT_EVERY` applied POSTs of a VM's device, the session sends that
  device's SHADOW again: its ``applied`` count returns the client's posting credits;
* the shadows themselves travel from :meth:`~.controller.Instance.refresh_shadow`.

Through an entry server (forward.py) a POST is sent on without waiting and the device
server's SHADOWs come back to the client the same way; the device's server counts a
peer's client's POSTs under that client's own sink.
"""

from __future__ import annotations

from typing import Any

from remote_hw.devices.base import RegisterShadow
from remote_hw.protocol import messages as m

#: How many POSTs a client may have sent and not yet seen acknowledged (SHADOW
#: ``window``). A console guest here posts ~45 000 writes/s, so a window must outlast
#: a round trip plus the wait for the next report: at 10 ms one way (bench/console.py)
#: 1024 ran out now and then (a few dozen stalls per 90 000 writes), 2048 does not. The
#: window of recent writes (resume.WINDOW) holds twice as many, so any POST a client
#: may re-send is still remembered.
POST_WINDOW = 2048
#: Acknowledge applied POSTs this often: a quarter of the window keeps the client
#: from waiting for credit on a steady stream, at one SHADOW per 512 writes.
REPORT_EVERY = POST_WINDOW // 4

_WRITE = int(m.Direction.WRITE)


def shadow_message(vm_id: int, client_id: int, device: str, shadow: RegisterShadow | None,
                   applied: int) -> m.Shadow:
    """The SHADOW that tells a client about ``shadow`` (None: nothing to post or read)."""
    posted = shadowed = values = 0
    if shadow is not None:
        for off in shadow.posted:
            if 0 <= off < m.SHADOW_OFFSETS:
                posted |= 1 << off
        n = 0
        for off, value in sorted(shadow.reads):  # the wire lists them by offset
            if 0 <= off < m.SHADOW_OFFSETS and n < m.SHADOW_MAX_READS:
                shadowed |= 1 << off
                values |= (value & 0xFF) << (8 * n)
                n += 1
    return m.Shadow(vm_id=vm_id, client_id=client_id, applied=applied & 0xFFFF_FFFF,
                    window=POST_WINDOW if posted else 0, posted=posted, shadowed=shadowed,
                    values=values, device_id=device)


def counted_access(controller: Any, access: Any, applied: dict[tuple[int, str], int],
                   client_id: int, vm_id: int, device: str, offset: int, size: int,
                   data: int) -> tuple[int, int]:
    """``access(...)`` of a POST, counted as applied for (VM, device) in ``applied`` (the
    sink's count, which the SHADOWs carry): through the window of recent writes this
    runs once per request id, so a re-sent POST is neither applied nor counted twice.
    Every :data:`REPORT_EVERY` the device's SHADOW goes out again with the count."""
    answer: tuple[int, int] = access(client_id, vm_id, device, offset, size, _WRITE, data)
    key = (vm_id, device)
    n = applied.get(key, 0) + 1
    applied[key] = n
    if n % REPORT_EVERY == 0:
        controller.republish(client_id, vm_id, device)
    return answer
