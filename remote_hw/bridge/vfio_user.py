"""The vfio-user wire protocol, server side, sans-I/O: bytes (and fds) in, events out.

QEMU's ``vfio-user-pci`` device is a vfio-user *client*; the bridge is the *server*.
This module knows the message layouts (QEMU's docs/interop/vfio-user.rst, and what
QEMU 11.1 was seen to send, docs/bridge.md "What QEMU sends") and the order they may come in,
and nothing else: no sockets, no threads, no device. As in :mod:`remote_hw.protocol`,
keeping the parser free of I/O is what lets the tests feed it truncated, malformed
and out-of-order input byte by byte and check that each gives a named error.

Use::

    conn = ServerConnection()
    conn.receive_data(chunk, fds)        # fds that came with the chunk (SCM_RIGHTS)
    while (ev := conn.next_event()) is not NEED_DATA:
        ...                              # answer with conn.reply(ev, payload)

A :class:`VfioUserError` from :meth:`ServerConnection.next_event` means the stream can
no longer be trusted: the caller closes that one socket (and :meth:`close_fds` the
descriptors no event took). A well-formed command this side does not implement is an
:class:`Unsupported` event, answered with an error reply; the stream goes on.

All integers are little-endian (the spec says host order; both ends are x86 here).
"""

from __future__ import annotations

import enum
import errno as _errno
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

# ------------------------------------------------------------------------- constants

#: ``u16 id, u16 command, u32 size (header included), u32 flags, u32 error``.
HEADER: Final = struct.Struct("<HHIII")
HEADER_SIZE: Final = HEADER.size

FLAG_REPLY: Final = 0x1  # type bits 0-3: 0 command, 1 reply
FLAG_TYPE_MASK: Final = 0xF
FLAG_NO_REPLY: Final = 0x10
FLAG_ERROR: Final = 0x20

VERSION_MAJOR: Final = 0
VERSION_MINOR: Final = 1

#: Largest REGION_READ/WRITE this side offers (``max_data_xfer_size``); BAR accesses
#: are at most 8 bytes and config space is 256, so this is generous.
MAX_DATA_XFER: Final = 4096
#: Largest message accepted at all: a write of MAX_DATA_XFER plus its fixed part, or a
#: VERSION with a few KiB of JSON. Anything bigger is an error, not a big allocation.
MAX_MESSAGE: Final = HEADER_SIZE + 16 + MAX_DATA_XFER + 4096
#: File descriptors accepted with one message (SET_IRQS hands one per vector).
MAX_MSG_FDS: Final = 8


class Command(enum.IntEnum):
    """Command numbers (vfio-user.rst, "Commands")."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# <linux/vfio.h> flag values the bridge uses.
DEVICE_FLAGS_RESET: Final = 1 << 0
DEVICE_FLAGS_PCI: Final = 1 << 1
REGION_INFO_FLAG_READ: Final = 1 << 0
REGION_INFO_FLAG_WRITE: Final = 1 << 1
IRQ_INFO_EVENTFD: Final = 1 << 0
IRQ_INFO_MASKABLE: Final = 1 << 1
IRQ_INFO_AUTOMASKED: Final = 1 << 2
IRQ_INFO_NORESIZE: Final = 1 << 3
IRQ_SET_DATA_NONE: Final = 1 << 0
IRQ_SET_DATA_BOOL: Final = 1 << 1
IRQ_SET_DATA_EVENTFD: Final = 1 << 2
IRQ_SET_ACTION_MASK: Final = 1 << 3
IRQ_SET_ACTION_UNMASK: Final = 1 << 4
IRQ_SET_ACTION_TRIGGER: Final = 1 << 5
_IRQ_DATA_MASK: Final = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
_IRQ_ACTION_MASK: Final = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER

# ------------------------------------------------------------------- payload layouts
# One table: command -> (fixed part of the request, whether bytes may follow it).
# Replies built by this module use the layouts below it.

VERSION_FIXED: Final = struct.Struct("<HH")  # major, minor, then optional JSON + NUL
DMA_MAP: Final = struct.Struct("<IIQQQ")  # argsz, flags, offset, address, size
DMA_UNMAP: Final = struct.Struct("<IIQQ")  # argsz, flags, address, size (+ bitmap)
DEVICE_INFO: Final = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
REGION_INFO: Final = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
IRQ_INFO: Final = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_SET: Final = struct.Struct("<IIIII")  # argsz, flags, index, start, count, then data
REGION_ACCESS: Final = struct.Struct("<QII")  # offset, region, count, then data
EMPTY: Final = struct.Struct("")

_REQUESTS: Final[dict[Command, tuple[struct.Struct, bool]]] = {
    Command.VERSION: (VERSION_FIXED, True),
    Command.DMA_MAP: (DMA_MAP, False),
    Command.DMA_UNMAP: (DMA_UNMAP, True),
    Command.DEVICE_GET_INFO: (DEVICE_INFO, False),
    Command.DEVICE_GET_REGION_INFO: (REGION_INFO, False),
    Command.DEVICE_GET_IRQ_INFO: (IRQ_INFO, False),
    Command.DEVICE_SET_IRQS: (IRQ_SET, True),
    Command.REGION_READ: (REGION_ACCESS, False),
    Command.REGION_WRITE: (REGION_ACCESS, True),
    Command.DEVICE_RESET: (EMPTY, False),
}

# --------------------------------------------------------------------------- events


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: :meth:`ServerConnection.next_event` has no complete message yet.
NEED_DATA: Final = _NeedData()


@dataclass(frozen=True)
class Message:
    """Every command carries its message id (echoed in the reply) and no-reply bit."""

    msg_id: int
    no_reply: bool


@dataclass(frozen=True)
class Version(Message):
    major: int
    minor: int
    capabilities: dict[str, object]


@dataclass(frozen=True)
class DmaMap(Message):
    flags: int
    offset: int
    address: int
    size: int
    fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class DmaUnmap(Message):
    argsz: int
    flags: int
    address: int
    size: int


@dataclass(frozen=True)
class GetDeviceInfo(Message):
    argsz: int


@dataclass(frozen=True)
class GetRegionInfo(Message):
    argsz: int
    index: int


@dataclass(frozen=True)
class GetIrqInfo(Message):
    argsz: int
    index: int


@dataclass(frozen=True)
class SetIrqs(Message):
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""  # DATA_BOOL: one byte per vector
    fds: tuple[int, ...] = ()  # DATA_EVENTFD: one per vector, or none to de-assign

    @property
    def action(self) -> int:
        return self.flags & _IRQ_ACTION_MASK

    @property
    def data_type(self) -> int:
        return self.flags & _IRQ_DATA_MASK


@dataclass(frozen=True)
class RegionRead(Message):
    offset: int
    region: int
    count: int


@dataclass(frozen=True)
class RegionWrite(Message):
    offset: int
    region: int
    count: int
    data: bytes


@dataclass(frozen=True)
class DeviceReset(Message):
    pass


@dataclass(frozen=True)
class Unsupported(Message):
    """A well-formed command this server does not implement: reply with an error."""

    command: int
    fds: tuple[int, ...] = field(default=())


Event = (Version | DmaMap | DmaUnmap | GetDeviceInfo | GetRegionInfo | GetIrqInfo
         | SetIrqs | RegionRead | RegionWrite | DeviceReset | Unsupported)


class VfioUserError(Exception):
    """The peer broke the protocol; the connection must be closed.

    ``msg_id`` and ``command`` name the offending message when its header was read.
    """

    def __init__(self, text: str, msg_id: int | None = None,
                 command: int | None = None) -> None:
        where = ""
        if command is not None:
            name = Command(command).name if command in Command._value2member_map_ \
                else str(command)
            where = f"message {msg_id} ({name}): "
        super().__init__(where + text)
        self.msg_id = msg_id
        self.command = command


#: Makes the error for the message being decoded (it knows its id and command).
_Fail: TypeAlias = Callable[[str], VfioUserError]

# ------------------------------------------------------------------------ the state

class State(enum.Enum):
    AWAIT_VERSION = "await-version"  # nothing but VERSION is allowed first
    READY = "ready"
    CLOSED = "closed"  # after an error: nothing more is parsed


#: Which commands each state handles (a table, as remote_hw.protocol's ``_ALLOWED``).
#: Anything else in READY is either a protocol violation (below) or, if merely not
#: implemented here, an :class:`Unsupported` event.
_ALLOWED: Final[dict[State, frozenset[int]]] = {
    State.AWAIT_VERSION: frozenset({Command.VERSION}),
    State.READY: frozenset(int(c) for c in _REQUESTS if c is not Command.VERSION),
    State.CLOSED: frozenset(),
}
#: Commands only a server sends: from a client they are a violation, not a request.
_SERVER_TO_CLIENT: Final = frozenset({Command.DMA_READ, Command.DMA_WRITE})


class ServerConnection:
    """One vfio-user client (one QEMU device) seen from the server."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.state = State.AWAIT_VERSION
        self.max_message = max_message
        self._buf = bytearray()
        self._consumed = 0  # stream position of _buf[0]
        self._fds: list[tuple[int, int]] = []  # (stream position, fd) not yet handed out
        self.client_capabilities: dict[str, object] = {}

    # -- input ------------------------------------------------------------------

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Feed bytes read from the socket, with the descriptors that came with them.

        Over a stream socket, SCM_RIGHTS data arrives with the first byte of the
        sender's ``sendmsg``: the descriptors belong to the message that byte is in.
        """
        pos = self._consumed + len(self._buf)
        self._fds.extend((pos, fd) for fd in fds)
        self._buf += data

    @property
    def idle(self) -> bool:
        """Past VERSION with no partial message buffered: the next read starts a new
        message, so a lone access in it may be answered without this parser
        (:mod:`remote_hw.bridge.fastpath`)."""
        return self.state is State.READY and not self._buf and not self._fds

    def close_fds(self) -> list[int]:
        """Descriptors received but given to no event (to close on an error or end)."""
        out = [fd for _, fd in self._fds]
        self._fds.clear()
        return out

    def next_event(self) -> Event | _NeedData:
        """The next complete command, or NEED_DATA; raises :class:`VfioUserError`."""
        if self.state is State.CLOSED:
            raise VfioUserError("the connection is closed after an earlier error")
        if len(self._buf) < HEADER_SIZE:
            return NEED_DATA
        msg_id, command, size, flags, _error = HEADER.unpack_from(self._buf)
        try:
            if size < HEADER_SIZE:
                raise VfioUserError(f"size {size} is smaller than the header", msg_id, command)
            if size > self.max_message:
                raise VfioUserError(f"size {size} is over the limit of {self.max_message}",
                                    msg_id, command)
            if len(self._buf) < size:
                return NEED_DATA
            start = self._consumed
            payload = bytes(self._buf[HEADER_SIZE:size])
            del self._buf[:size]
            self._consumed += size
            fds = tuple(fd for pos, fd in self._fds if pos < start + size)
            self._fds = [(p, fd) for p, fd in self._fds if p >= start + size]
            try:
                return self._decode(msg_id, command, flags, payload, fds)
            except VfioUserError:
                self._fds[:0] = [(start, fd) for fd in fds]  # still ours to close
                raise
        except VfioUserError:
            self.state = State.CLOSED
            raise

    def _decode(self, msg_id: int, command: int, flags: int, payload: bytes,
                fds: tuple[int, ...]) -> Event:
        def fail(text: str) -> VfioUserError:
            return VfioUserError(text, msg_id, command)

        if flags & FLAG_TYPE_MASK != 0:
            raise fail(f"type {flags & FLAG_TYPE_MASK} in a client message (only commands, "
                       "type 0, are expected: this server sends no commands to reply to)")
        if flags & ~(FLAG_TYPE_MASK | FLAG_NO_REPLY):
            raise fail(f"unknown flag bits {flags:#x}")
        no_reply = bool(flags & FLAG_NO_REPLY)
        if command not in _ALLOWED[self.state]:
            if self.state is State.AWAIT_VERSION:
                raise fail("the first message must be VERSION")
            if command == Command.VERSION:
                raise fail("VERSION sent twice")
            if command in _SERVER_TO_CLIENT:
                raise fail("a server-to-client command sent by the client")
            return Unsupported(msg_id, no_reply, command, fds)
        cmd = Command(command)
        fixed, variable = _REQUESTS[cmd]
        if len(payload) < fixed.size or (not variable and len(payload) != fixed.size):
            want = f"at least {fixed.size}" if variable else str(fixed.size)
            raise fail(f"payload of {len(payload)} bytes, expected {want}")
        if fds and cmd not in (Command.DMA_MAP, Command.DEVICE_SET_IRQS):
            raise fail(f"{len(fds)} file descriptor(s) with a command that takes none")
        if len(fds) > MAX_MSG_FDS:
            raise fail(f"{len(fds)} file descriptors, more than the {MAX_MSG_FDS} offered")
        values = fixed.unpack_from(payload)
        rest = payload[fixed.size:]

        if cmd is Command.VERSION:
            major, minor = values
            if major != VERSION_MAJOR:
                raise fail(f"protocol major version {major}, this server speaks "
                           f"{VERSION_MAJOR}")
            caps = self._capabilities(rest, fail)
            self.client_capabilities = caps
            self.state = State.READY
            return Version(msg_id, no_reply, major, minor, caps)
        if cmd is Command.DMA_MAP:
            _argsz, mflags, offset, address, size = values
            return DmaMap(msg_id, no_reply, mflags, offset, address, size, fds)
        if cmd is Command.DMA_UNMAP:
            argsz, uflags, address, size = values
            return DmaUnmap(msg_id, no_reply, argsz, uflags, address, size)
        if cmd is Command.DEVICE_GET_INFO:
            return GetDeviceInfo(msg_id, no_reply, values[0])
        if cmd is Command.DEVICE_GET_REGION_INFO:
            return GetRegionInfo(msg_id, no_reply, values[0], values[2])
        if cmd is Command.DEVICE_GET_IRQ_INFO:
            return GetIrqInfo(msg_id, no_reply, values[0], values[2])
        if cmd is Command.DEVICE_SET_IRQS:
            return self._set_irqs(msg_id, no_reply, values, rest, fds, fail)
        if cmd is Command.REGION_READ:
            offset, region, count = values
            if count > MAX_DATA_XFER:
                raise fail(f"read of {count} bytes, more than max_data_xfer_size "
                           f"{MAX_DATA_XFER}")
            return RegionRead(msg_id, no_reply, offset, region, count)
        if cmd is Command.REGION_WRITE:
            offset, region, count = values
            if count != len(rest):
                raise fail(f"count {count} but {len(rest)} data bytes follow")
            if count > MAX_DATA_XFER:
                raise fail(f"write of {count} bytes, more than max_data_xfer_size "
                           f"{MAX_DATA_XFER}")
            return RegionWrite(msg_id, no_reply, offset, region, count, rest)
        return DeviceReset(msg_id, no_reply)

    @staticmethod
    def _capabilities(rest: bytes, fail: _Fail) -> dict[str, object]:
        text = rest.split(b"\0", 1)[0]
        if not text:
            return {}
        try:
            doc = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise fail(f"version data is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise fail("version data is not a JSON object")
        caps = doc.get("capabilities", {})
        if not isinstance(caps, dict):
            raise fail("'capabilities' in the version data is not an object")
        return caps

    @staticmethod
    def _set_irqs(msg_id: int, no_reply: bool, values: tuple[int, ...], rest: bytes,
                  fds: tuple[int, ...], fail: _Fail) -> SetIrqs:
        argsz, flags, index, start, count = values
        data_type, action = flags & _IRQ_DATA_MASK, flags & _IRQ_ACTION_MASK
        if bin(data_type).count("1") != 1 or bin(action).count("1") != 1 \
                or flags & ~(_IRQ_DATA_MASK | _IRQ_ACTION_MASK):
            raise fail(f"flags {flags:#x} must hold exactly one DATA and one ACTION bit")
        if argsz < IRQ_SET.size + len(rest):
            raise fail(f"argsz {argsz} is smaller than the {IRQ_SET.size + len(rest)}-byte "
                       "payload")
        if data_type == IRQ_SET_DATA_BOOL:
            if len(rest) != count:
                raise fail(f"DATA_BOOL for {count} vectors with {len(rest)} data bytes")
        elif data_type == IRQ_SET_DATA_EVENTFD:
            if fds and len(fds) != count:
                raise fail(f"DATA_EVENTFD for {count} vectors with {len(fds)} descriptors")
            if rest.strip(b"\0") and len(rest) != 4 * count:
                raise fail(f"DATA_EVENTFD with {len(rest)} unexpected data bytes")
            rest = b""
        elif rest:
            raise fail(f"DATA_NONE with {len(rest)} data bytes")
        if fds and data_type != IRQ_SET_DATA_EVENTFD:
            raise fail("file descriptors with a SET_IRQS that is not DATA_EVENTFD")
        return SetIrqs(msg_id, no_reply, flags, index, start, count, rest, fds)

    # -- output -----------------------------------------------------------------

    def reply(self, ev: Message, payload: bytes = b"") -> bytes:
        """The reply to ``ev`` (empty when it asked for none)."""
        if ev.no_reply:
            return b""
        cmd = ev.command if isinstance(ev, Unsupported) else _COMMAND_OF[type(ev)]
        return HEADER.pack(ev.msg_id, cmd, HEADER_SIZE + len(payload), FLAG_REPLY, 0) + payload

    def error_reply(self, ev: Message, errno: int) -> bytes:
        """An error reply (header only, as the spec asks) carrying ``errno``."""
        if ev.no_reply:
            return b""
        cmd = ev.command if isinstance(ev, Unsupported) else _COMMAND_OF[type(ev)]
        return HEADER.pack(ev.msg_id, cmd, HEADER_SIZE, FLAG_REPLY | FLAG_ERROR, errno)

    def version_reply(self, ev: Version, capabilities: dict[str, object]) -> bytes:
        """VERSION's reply: our major, the lower minor, our capabilities as JSON."""
        doc = json.dumps({"capabilities": capabilities}, separators=(",", ":")).encode()
        minor = min(ev.minor, VERSION_MINOR)
        return self.reply(ev, VERSION_FIXED.pack(VERSION_MAJOR, minor) + doc + b"\0")


_COMMAND_OF: Final[dict[type, int]] = {
    Version: Command.VERSION, DmaMap: Command.DMA_MAP, DmaUnmap: Command.DMA_UNMAP,
    GetDeviceInfo: Command.DEVICE_GET_INFO, GetRegionInfo: Command.DEVICE_GET_REGION_INFO,
    GetIrqInfo: Command.DEVICE_GET_IRQ_INFO, SetIrqs: Command.DEVICE_SET_IRQS,
    RegionRead: Command.REGION_READ, RegionWrite: Command.REGION_WRITE,
    DeviceReset: Command.DEVICE_RESET,
}

# Errno values the front answers with, named here so the tests can check them.
EINVAL: Final = _errno.EINVAL
ENOSYS: Final = _errno.ENOSYS
ENODEV: Final = _errno.ENODEV


def encode_command(msg_id: int, command: int, payload: bytes = b"",
                   flags: int = 0) -> bytes:
    """A client-side command frame (used by tests and tools that play QEMU's part)."""
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, 0) + payload


def decode_reply(frame: bytes) -> tuple[int, int, int, int, bytes]:
    """``(msg_id, command, flags, error, payload)`` of one complete reply frame."""
    if len(frame) < HEADER_SIZE:
        raise VfioUserError(f"reply of {len(frame)} bytes is shorter than a header")
    msg_id, command, size, flags, error = HEADER.unpack_from(frame)
    if size != len(frame):
        raise VfioUserError(f"reply says {size} bytes but {len(frame)} were given")
    return msg_id, command, flags, error, frame[HEADER_SIZE:]
