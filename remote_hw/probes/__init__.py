"""eBPF probes on the kvm tracepoints: every guest device access on this host.

* ``model``      — constants (as ``ebpf/remote_hw_events.h``), ranges, histograms.
* ``loader``     — ``KvmProbe``: compiles ``ebpf/kvm_access.bpf.c`` with bcc, reads maps.
* ``agent_hook`` — ``ProbeSession``: what the agent uses (publish ranges, report).
* ``render``     — filters and text for ``remote-hw trace`` / ``remote-hw top``.
* ``cli``        — ``add_parsers(subparsers)`` for those two commands.

Importing this package never imports bcc; ``KvmProbe()`` does, and raises
``ProbeUnavailable`` with one sentence when the probes cannot run here.
See docs/ebpf.md.
"""

from .loader import KvmProbe, ProbeUnavailable
from .model import CountRow, Histogram, RangeSpec

__all__ = ["CountRow", "Histogram", "KvmProbe", "ProbeUnavailable", "RangeSpec"]
