"""client/vmm: a small KVM monitor in pure Python (see docs/vmm.md)."""

from .bus import DEBUG_EXIT_PORT, Bus, DebugExit, GuestExit
from .loader import BootImage, ImageError, parse_image
from .memory import GuestMemoryError, GuestRam
from .vcpu import STATUS_HALTED, STATUS_RESET, STATUS_STOPPED, VmError
from .vm import Vm, VmTimeout, debug_exit_status

__all__ = [
    "Bus", "BootImage", "DEBUG_EXIT_PORT", "DebugExit", "GuestExit", "GuestMemoryError",
    "GuestRam", "ImageError", "STATUS_HALTED", "STATUS_RESET", "STATUS_STOPPED", "Vm",
    "VmError", "VmTimeout", "debug_exit_status", "parse_image",
]
