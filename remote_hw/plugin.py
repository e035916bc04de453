"""The public API for remote-hw plugins: device models and backends.

A plugin imports what it needs of remote-hw from this module only, so the names below
are the contract that :data:`API_VERSION` versions (docs/plugin-api.md): within one
major version they keep their meaning, and a minor version only adds. Everything else
in the package may move between releases.

As in nbdkit, the server does the checking so a plugin stays small: it calls a model
only with offsets inside its ``window`` and sizes 1, 2, 4 or 8, one call at a time
(the instance lock), checks a plugin class when it loads (base class, name, window,
``api_version``), and turns an exception in a model into an error answer for that one
access instead of a dropped connection.
"""

from __future__ import annotations

from remote_hw.backends.base import (
    Backend,
    BackendError,
    BackendUnavailable,
    KeyBackend,
    StreamBackend,
    ToGuest,
)
from remote_hw.devices.base import (
    EVENT_RESET_REQUEST,
    ByteRegisters,
    Device,
    EventSink,
    GuestMemory,
    IrqLine,
    NullIrq,
    StreamDevice,
)
from remote_hw.devices.capabilities import ByteStream, Clock, Keyboard, TextInput
from remote_hw.entry_points import API_VERSION, PluginError
from remote_hw.input.keys import KeySink

__all__ = [
    "API_VERSION",
    "PluginError",
    # device models
    "Device",
    "ByteRegisters",
    "StreamDevice",
    "IrqLine",
    "NullIrq",
    "GuestMemory",
    "EventSink",
    "EVENT_RESET_REQUEST",
    "KeySink",
    # optional abilities a model declares by having the methods (structural Protocols)
    "Clock",
    "Keyboard",
    "TextInput",
    "ByteStream",
    # backends
    "Backend",
    "StreamBackend",
    "KeyBackend",
    "BackendError",
    "BackendUnavailable",
    "ToGuest",
]
