"""Device kinds by name, as used on command lines and in the server's configuration."""

from __future__ import annotations

from typing import Any

from .base import Device
from .cmos_rtc import CmosRtc
from .i8042 import I8042
from .uart16550 import Uart16550

DEVICE_KINDS: dict[str, type[Device]] = {
    Uart16550.kind: Uart16550,
    CmosRtc.kind: CmosRtc,
    I8042.kind: I8042,
}


def create_device(kind: str, **kw: Any) -> Device:
    """Instantiate the model registered as ``kind`` with keyword arguments ``kw``
    (``irq``, ``events``, ``dma`` and model options).

    Raises ValueError naming the known kinds when ``kind`` is unknown (and the model's
    own ValueError for unknown options).
    """
    try:
        cls = DEVICE_KINDS[kind]
    except KeyError:
        known = ", ".join(sorted(DEVICE_KINDS))
        raise ValueError(f"unknown device kind {kind!r} (known: {known})") from None
    return cls(**kw)
