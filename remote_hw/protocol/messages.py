"""Every message of the remote-hw wire protocol, defined in one place.

This module is the single source of truth for the wire layouts (docs/protocol.md is
the prose version).  Each message is a frozen, slotted dataclass; :data:`MESSAGES`
maps each :class:`MsgType` to ``(class, struct.Struct of the fixed part, names of the
trailing variable-length strings)``, and the codec derives both encoding and decoding
from that table.

Layout convention (every message follows it, the codec relies on it):

* the dataclass fields are declared in wire order;
* the fixed part holds the non-string fields, then one length field per trailing
  string (in the same order as the strings), then the strings themselves follow;
* a pad byte (``x`` in the struct format) is a reserved byte: written as 0, and a
  receiver rejects any other value.

Nothing here does I/O or validation; see :mod:`remote_hw.protocol.codec`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple, TypeVar, dataclass_transform

# --------------------------------------------------------------------------- constants

MAGIC = b"RH"
PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0

#: Frame header: magic (as a little-endian u16 so it is compared as one int on the hot
#: path), type, flags, payload length.
HEADER = struct.Struct("<HBBI")
HEADER_SIZE = HEADER.size
MAGIC_U16 = int.from_bytes(MAGIC, "little")

#: Largest payload either side accepts before the handshake has negotiated one.
PRE_HANDSHAKE_MAX_PAYLOAD = 1024
#: No implementation accepts a payload larger than this, whatever is negotiated.
ABSOLUTE_MAX_PAYLOAD = 1 << 20
#: What this implementation offers in HELLO/WELCOME unless told otherwise.
DEFAULT_MAX_PAYLOAD = 65536
#: How many recent writes (request ids, POSTs included) a resumable session's server
#: remembers, so that a write re-sent after RESUME is applied once (docs/protocol.md).
#: A client may rely on it: a write it re-sends within this many requests of the
#: newest it issued is answered from memory if it was applied.
WRITE_WINDOW = 4096

#: Longest identifier (server id, device id, names), in bytes.
MAX_ID_LENGTH = 64
#: Characters allowed in identifiers.
ID_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"

# Feature bits (HELLO/WELCOME ``features``; the negotiated set is the AND of both).
FEATURE_EVENTS = 1 << 0  #: the server may send EVENT messages
FEATURE_DMA = 1 << 1  #: reserved for device DMA into guest memory (not in v1.0)
#: a client may send RESUME: its session outlives a lost connection for a grace period
FEATURE_RESUME = 1 << 2
#: a peer server may send ORIGIN: the authenticated name of a client it speaks for
FEATURE_ORIGIN = 1 << 3
#: the client may send POST (a write answered only when it fails) and the server may
#: send SHADOW (registers the client may answer itself, and posting credits)
FEATURE_POSTED = 1 << 4
#: Features this implementation knows how to use.
SUPPORTED_FEATURES = FEATURE_EVENTS | FEATURE_RESUME | FEATURE_ORIGIN | FEATURE_POSTED

#: SHADOW: offsets a shadow can describe (bit i of its masks is offset i).
SHADOW_OFFSETS = 64
#: SHADOW: at most this many shadowed registers (their bytes fill one u64).
SHADOW_MAX_READS = 8


# ------------------------------------------------------------------------------- enums


class MsgType(enum.IntEnum):
    """The ``type`` byte of the frame header."""

    HELLO = 1
    WELCOME = 2
    IO_REQUEST = 3
    FEEDBACK = 4
    INTERRUPT = 5
    ERROR = 6
    PING = 7
    PONG = 8
    ATTACH = 9
    DETACH = 10
    EVENT = 11
    RESUME = 12
    ORIGIN = 13
    POST = 14
    SHADOW = 15


class Status(enum.IntEnum):
    """FEEDBACK status codes."""

    OK = 0
    UNKNOWN_DEVICE = 1
    UNKNOWN_SERVER = 2
    BAD_ACCESS = 3
    NOT_ATTACHED = 4
    DEVICE_ERROR = 5
    UNREACHABLE = 6
    DENIED = 7
    HOP_LIMIT = 8
    TIMEOUT = 9


class ErrorCode(enum.IntEnum):
    """ERROR message codes (also carried by :class:`~.errors.ProtocolError`)."""

    MALFORMED = 1
    OVERSIZED = 2
    UNKNOWN_TYPE = 3
    VERSION_MISMATCH = 4
    UNEXPECTED = 5
    BAD_ID = 6
    DENIED = 7
    INTERNAL = 8


class AccessKind(enum.IntEnum):
    """Address space of an I/O request."""

    PORT = 0
    MMIO = 1


class Direction(enum.IntEnum):
    """Read or write."""

    READ = 0
    WRITE = 1


class Role(enum.IntEnum):
    """The part one end of a connection plays.

    ``CLIENT`` (a VM host) and ``PEER`` (a server forwarding requests to another
    server) are the connecting end and are what HELLO's ``role`` field carries;
    ``SERVER`` is the accepting end and never appears on the wire.
    ``Connection(role)`` takes any of the three.
    """

    CLIENT = 1
    PEER = 2
    SERVER = 3


# ---------------------------------------------------------------------------- messages


class Message:
    """Base class of every message (for ``isinstance`` and type hints)."""

    __slots__ = ()
    MSG_TYPE: ClassVar[MsgType]
    # Declared so that type checkers see every message as a dataclass (``fields()``).
    __dataclass_fields__: ClassVar[dict[str, Any]]


# All messages are keyword-only: several have ten-odd integer fields, and positional
# construction would make swapping two of them silent.  Field order is wire order.
# ``dataclass_transform`` tells type checkers this decorator makes dataclasses (a bare
# alias of ``dataclass(...)`` is opaque to them).
_M = TypeVar("_M", bound="Message")


@dataclass_transform(frozen_default=True, kw_only_default=True)
def _message(cls: type[_M]) -> type[_M]:
    return dataclass(frozen=True, slots=True, kw_only=True)(cls)


@_message
class Hello(Message):
    """First message of a connection, from the connecting side."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.HELLO
    major: int = PROTOCOL_MAJOR
    minor: int = PROTOCOL_MINOR
    #: largest payload this side accepts (1024 .. 1 MiB)
    max_payload: int = DEFAULT_MAX_PAYLOAD
    features: int = SUPPORTED_FEATURES
    role: Role = Role.CLIENT
    #: identifier of the connecting host/process (for logs)
    name: str


@_message
class Welcome(Message):
    """The server's answer to HELLO; completes the handshake."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.WELCOME
    major: int = PROTOCOL_MAJOR
    minor: int = PROTOCOL_MINOR
    max_payload: int = DEFAULT_MAX_PAYLOAD
    features: int = SUPPORTED_FEATURES
    #: the id the server assigned to this connection's client
    client_id: int
    #: the server's identifier
    name: str


@_message
class IoRequest(Message):
    """A guest register access (port or MMIO) forwarded to a device."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.IO_REQUEST
    request_id: int
    vm_id: int
    #: 0 from clients; only a trusted forwarding server sets it
    client_id: int = 0
    #: offset inside the device's window
    offset: int
    #: the value for writes (fits in ``size`` bytes); ignored for reads (send 0)
    data: int = 0
    kind: AccessKind
    size: int
    direction: Direction
    hops: int = 0
    #: "" means "any server": the entry server looks the device up
    server_id: str = ""
    device_id: str


@_message
class Feedback(Message):
    """The answer to IO_REQUEST, ATTACH or DETACH (matched by ``request_id``)."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.FEEDBACK
    request_id: int
    vm_id: int
    client_id: int = 0
    status: Status = Status.OK
    #: the request's size for I/O replies; 0 for ATTACH/DETACH replies
    size: int = 0
    # (one reserved byte, always 0, sits here on the wire)
    #: the value read (fits in ``size`` bytes); 0 when there is none
    data: int = 0


@_message
class Interrupt(Message):
    """A device's interrupt line changed level."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.INTERRUPT
    vm_id: int
    client_id: int = 0
    line: int
    #: 0 deassert, 1 assert
    level: int
    device_id: str


@_message
class Error(Message):
    """A protocol error; after most codes the sender closes the connection."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.ERROR
    #: the request this error is about, 0 when none
    request_id: int = 0
    code: ErrorCode
    #: human-readable UTF-8 text
    text: str = ""


@_message
class Ping(Message):
    """Liveness check; answered by PONG with the same nonce."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.PING
    nonce: int


@_message
class Pong(Message):
    """Answer to PING (nonce echoed)."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.PONG
    nonce: int


@_message
class Attach(Message):
    """Attach a device to a VM; answered by FEEDBACK."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.ATTACH
    request_id: int
    vm_id: int
    client_id: int = 0
    server_id: str = ""
    device_id: str


@_message
class Detach(Message):
    """Detach every device of a VM; answered by FEEDBACK."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.DETACH
    request_id: int
    vm_id: int
    client_id: int = 0


@_message
class Event(Message):
    """A named device event (e.g. ``reset-request``); needs FEATURE_EVENTS."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.EVENT
    vm_id: int
    client_id: int = 0
    device_id: str
    name: str


@_message
class Resume(Message):
    """Make this session resumable, or take an earlier one back (needs FEATURE_RESUME).

    Token 0 asks for a token; another token asks for the session it was given to
    (same authenticated identity only). Answered by FEEDBACK: OK with ``size`` 8 and
    ``data`` the token to present next time, or NOT_ATTACHED (unknown or expired: the
    session's devices are gone) or DENIED (another identity's token)."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.RESUME
    request_id: int
    #: 0, or the token an earlier FEEDBACK to RESUME gave
    token: int


@_message
class Origin(Message):
    """A peer server names the authenticated client it speaks for under ``client_id``
    (needs FEATURE_ORIGIN; answered by FEEDBACK). Accepted only on a peer connection
    from a server allowed to speak for others; the device's server then applies its
    own access lists to ``name``."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.ORIGIN
    request_id: int
    #: the id the peer uses for this client in its requests
    client_id: int
    #: the client's certificate name, as the peer authenticated it
    name: str


@_message
class Post(Message):
    """A posted write (needs FEATURE_POSTED): IO_REQUEST's layout, ``direction`` always
    WRITE, applied in order with everything else of the connection and answered only
    when it fails (a FEEDBACK with its request id and a non-OK status). Success is
    acknowledged in bulk by SHADOW's ``applied`` count."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.POST
    request_id: int
    vm_id: int
    client_id: int = 0
    offset: int
    data: int = 0
    kind: AccessKind
    size: int
    direction: Direction = Direction.WRITE
    hops: int = 0
    server_id: str = ""
    device_id: str


@_message
class Shadow(Message):
    """What a client may do without asking, for one VM's device (needs FEATURE_POSTED).

    Sent by the server before the FEEDBACK of the access that changed it, before the
    INTERRUPT an outside event raised with it, and when posted writes were applied.
    Valid until the next SHADOW of that VM and device: a write at a ``posted`` offset
    changes nothing a ``shadowed`` read returns (the model guarantees it)."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.SHADOW
    vm_id: int
    client_id: int = 0
    #: POSTs of this VM to this device applied so far (mod 2**32)
    applied: int = 0
    #: how many POSTs may be unacknowledged at once; 0: do not post
    window: int = 0
    #: bit i: a one-byte write at offset i may be posted
    posted: int = 0
    #: bit i: a one-byte read at offset i is answered from ``values``
    shadowed: int = 0
    #: the shadowed registers' bytes, lowest offset in the lowest byte
    values: int = 0
    device_id: str


# ------------------------------------------------------------------------------- table


class MessageSpec(NamedTuple):
    """How one message type is laid out on the wire."""

    cls: type[Message]
    #: the fixed part: non-string fields in order, then one length per string
    fixed: struct.Struct
    #: names of the trailing variable-length strings, in wire order
    var: tuple[str, ...]


MESSAGES: dict[MsgType, MessageSpec] = {
    MsgType.HELLO: MessageSpec(Hello, struct.Struct("<HHIIBB"), ("name",)),
    MsgType.WELCOME: MessageSpec(Welcome, struct.Struct("<HHIIIB"), ("name",)),
    MsgType.IO_REQUEST: MessageSpec(
        IoRequest, struct.Struct("<QIIQQBBBBBB"), ("server_id", "device_id")
    ),
    MsgType.FEEDBACK: MessageSpec(Feedback, struct.Struct("<QIIHBxQ"), ()),
    MsgType.INTERRUPT: MessageSpec(Interrupt, struct.Struct("<IIHBB"), ("device_id",)),
    MsgType.ERROR: MessageSpec(Error, struct.Struct("<QHH"), ("text",)),
    MsgType.PING: MessageSpec(Ping, struct.Struct("<Q"), ()),
    MsgType.PONG: MessageSpec(Pong, struct.Struct("<Q"), ()),
    MsgType.ATTACH: MessageSpec(
        Attach, struct.Struct("<QIIBB"), ("server_id", "device_id")
    ),
    MsgType.DETACH: MessageSpec(Detach, struct.Struct("<QII"), ()),
    MsgType.EVENT: MessageSpec(Event, struct.Struct("<IIBB"), ("device_id", "name")),
    MsgType.RESUME: MessageSpec(Resume, struct.Struct("<QQ"), ()),
    MsgType.ORIGIN: MessageSpec(Origin, struct.Struct("<QIB"), ("name",)),
    MsgType.POST: MessageSpec(Post, struct.Struct("<QIIQQBBBBBB"), ("server_id", "device_id")),
    MsgType.SHADOW: MessageSpec(Shadow, struct.Struct("<IIIHQQQB"), ("device_id",)),
}

#: class -> message type (the inverse of the table, for encoding)
TYPE_OF: dict[type[Message], MsgType] = {spec.cls: t for t, spec in MESSAGES.items()}


def _check_table() -> None:
    # A typo in the table would silently shift every field after it, so the
    # convention described at the top of this module is verified once at import.
    for t, spec in MESSAGES.items():
        names = [f.name for f in fields(spec.cls)]
        assert spec.cls.MSG_TYPE is t, spec.cls
        assert tuple(names[len(names) - len(spec.var) :]) == spec.var, spec.cls
        items = [c for c in spec.fixed.format.lstrip("<") if c != "x"]
        assert len(items) == len(names), (spec.cls, items, names)


_check_table()
