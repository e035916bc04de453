"""The files of an instance folder: which models have each one and what it does.

A file type is an object with a name, a mode and four operations (``applies``,
``render``, ``write``, ``flush``): ``status`` and ``status.json`` for every model,
``tx``/``rx`` for a :class:`~remote_hw.devices.capabilities.ByteStream`, ``time`` for a
:class:`~remote_hw.devices.capabilities.Clock`, ``input`` and ``keys`` for a
:class:`~remote_hw.devices.capabilities.Keyboard` (or, for ``input``, a
:class:`~remote_hw.devices.capabilities.TextInput`). Abilities are the capability
Protocols, so a new model that has the methods gets the files without changes here.
Every model call is made with the instance's lock held, as a guest access is.
"""

from __future__ import annotations

import codecs
import errno
import json
import logging
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from remote_hw.devices.base import Device
from remote_hw.devices.capabilities import ByteStream, Clock, Keyboard, TextInput
from remote_hw.input.keys import UnknownKey
from remote_hw.input.keytext import parse_key_commands
from remote_hw.input.layout import text_events
from remote_hw.server.controller import Instance
from remote_hw.server.fuse.taps import Taps

if TYPE_CHECKING:
    from remote_hw.server.fuse.tree import Node

log = logging.getLogger("remote_hw.fuse")


class Handle:
    """An open file: its node, a snapshot for text files, a write buffer."""

    __slots__ = ("node", "snapshot", "wbuf", "decoder")

    def __init__(self, node: Node, snapshot: bytes | None) -> None:
        self.node = node
        self.snapshot = snapshot
        self.wbuf = bytearray()
        self.decoder: codecs.IncrementalDecoder = \
            codecs.getincrementaldecoder("utf-8")("replace")


class FileType:
    """One kind of instance file: which models have it and what it does."""

    name = ""
    mode = 0o444
    readable = True
    writable = False
    size_from_tap = False     # a growing file: size and content from the instance's TxTap

    def applies(self, model: Device) -> bool:
        return True

    def render(self, inst: Instance, taps: Taps) -> bytes:
        return b""

    def write(self, inst: Instance, handle: Handle, data: bytes) -> None:
        raise OSError(errno.EACCES, "read-only")

    def flush(self, inst: Instance, handle: Handle) -> None:
        pass


def fmt_value(v: object) -> str:
    """A status value for people: yes/no, numbers above 9 also in hex, lists joined."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v} ({v:#x})" if v > 9 else str(v)
    if isinstance(v, float):
        return f"{v:.6f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) or "-"
    return "-" if v is None else str(v)


class _StatusFile(FileType):
    name = "status"

    def render(self, inst: Instance, taps: Taps) -> bytes:
        st = inst.status()
        head = [f"device: {inst.spec.id}", f"kind: {inst.spec.kind}",
                f"instance: {inst.index}", f"shared: {fmt_value(inst.spec.shared)}"]
        lines = head + [f"{k}: {fmt_value(v)}" for k, v in st.items()]
        tap = taps.peek(inst)
        if tap is not None:
            lines.append(f"tx_kept: {len(tap.buf)} of {tap.total}")
        return ("\n".join(lines) + "\n").encode()


class _StatusJsonFile(FileType):
    name = "status.json"

    def render(self, inst: Instance, taps: Taps) -> bytes:
        st = {"device": inst.spec.id, "kind": inst.spec.kind, "instance": inst.index,
              "shared": inst.spec.shared, **inst.status()}
        return (json.dumps(st, indent=1, sort_keys=True, default=str) + "\n").encode()


class _TxFile(FileType):
    name = "tx"
    size_from_tap = True

    def applies(self, model: Device) -> bool:
        return isinstance(model, ByteStream)


class _RxFile(FileType):
    name = "rx"
    mode = 0o200
    readable = False
    writable = True

    def applies(self, model: Device) -> bool:
        return isinstance(model, ByteStream)

    def write(self, inst: Instance, handle: Handle, data: bytes) -> None:
        inst.to_guest(data)


def parse_time(text: str) -> datetime:
    """A time for the RTC: ISO 8601 (``2030-01-02T03:04:05Z``, ``2030-01-02
    03:04:05``, with an offset or not: naive means UTC), ``@EPOCH`` or ``now``."""
    t = text.strip()
    if t == "now":
        return datetime.now(timezone.utc)
    if t.startswith("@"):
        try:
            return datetime.fromtimestamp(float(t[1:]), timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise ValueError(f"bad epoch time {t!r}") from None
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"cannot read {t!r} as a time (use YYYY-MM-DD HH:MM:SS, "
                         "@EPOCH or now)") from None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt


class _LineFile(FileType):
    """A writable file that acts on whole lines: each complete line written is
    passed to ``_apply`` as it arrives, a last line without a newline on flush
    (close). A line ``_apply`` rejects fails that write with its OSError."""

    def write(self, inst: Instance, handle: Handle, data: bytes) -> None:
        handle.wbuf += data
        while b"\n" in handle.wbuf:
            line, _, rest = bytes(handle.wbuf).partition(b"\n")
            handle.wbuf = bytearray(rest)
            self._apply(inst, line)

    def flush(self, inst: Instance, handle: Handle) -> None:
        if handle.wbuf.strip():
            line, handle.wbuf = bytes(handle.wbuf), bytearray()
            self._apply(inst, line)

    @staticmethod
    def _apply(inst: Instance, line: bytes) -> None:
        """Act on one line (without its newline); raise OSError to reject it."""
        raise NotImplementedError


class _TimeFile(_LineFile):
    name = "time"
    mode = 0o644
    writable = True

    def applies(self, model: Device) -> bool:
        return isinstance(model, Clock)

    def render(self, inst: Instance, taps: Taps) -> bytes:
        with inst.lock:
            model = inst.model
            assert isinstance(model, Clock)
            dt = model.now()
        return (dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") + "\n").encode()

    @staticmethod
    def _apply(inst: Instance, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return
        try:
            dt = parse_time(text)
        except ValueError as e:
            log.warning("FUSE view: %s time: %s", inst.spec.id, e)
            raise OSError(errno.EINVAL, str(e)) from None
        with inst.lock:
            model = inst.model
            assert isinstance(model, Clock)
            model.set_time(dt)
            inst.changed_outside()
        log.info("FUSE view: %s#%d time set to %s", inst.spec.id, inst.index,
                 dt.isoformat())


def _deliver_keys(inst: Instance, events: Iterable[tuple[int, bool]]) -> None:
    model = inst.model
    assert isinstance(model, Keyboard)
    with inst.lock:
        for code, pressed in events:
            model.key(code, pressed)
        inst.changed_outside()


class _InputFile(FileType):
    """Text typed into the guest: the model's ``type_text`` if it has one, else
    its ``key(code, pressed)`` fed with US-layout key events."""

    name = "input"
    mode = 0o200
    readable = False
    writable = True

    def applies(self, model: Device) -> bool:
        return isinstance(model, (TextInput, Keyboard))

    def write(self, inst: Instance, handle: Handle, data: bytes) -> None:
        text = handle.decoder.decode(data)
        if not text:
            return
        model = inst.model
        if isinstance(model, TextInput):
            with inst.lock:
                model.type_text(text)
                inst.changed_outside()
            return
        try:
            events = text_events(text)
        except UnknownKey as e:
            raise OSError(errno.EINVAL, str(e)) from None
        _deliver_keys(inst, events)


class _KeysFile(_LineFile):
    """Key commands, one line at a time (see remote_hw.input.keytext.parse_key_commands)."""

    name = "keys"
    mode = 0o200
    readable = False
    writable = True

    def applies(self, model: Device) -> bool:
        return isinstance(model, Keyboard)

    @staticmethod
    def _apply(inst: Instance, line: bytes) -> None:
        try:
            events = parse_key_commands(line.decode("utf-8", "replace"))
        except UnknownKey as e:
            raise OSError(errno.EINVAL, str(e)) from None
        _deliver_keys(inst, events)


FILE_TYPES: list[FileType] = [_StatusFile(), _StatusJsonFile(), _TxFile(), _RxFile(),
                              _TimeFile(), _InputFile(), _KeysFile()]
FILE_BY_NAME: dict[str, FileType] = {f.name: f for f in FILE_TYPES}
