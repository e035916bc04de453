"""The remote-hw wire protocol, sans-I/O: bytes in, events out.

* :mod:`.messages` — every message (frozen dataclasses), the enums, the constants and
  the layout table everything else is derived from;
* :mod:`.codec` — ``encode(msg) -> bytes`` and ``decode_payload(type, payload)``,
  with full validation, plus fast paths for the per-I/O messages, whose fields the
  hot paths get as named tuples (``FeedbackFields``, ``IoRequestFields``);
* :mod:`.connection` — :class:`Connection`, the per-connection state machine
  (handshake, negotiation, what may be sent/received when).

See docs/protocol.md for the wire format.
"""

from ._fields import FeedbackFields, IoRequestFields
from .codec import (
    decode_feedback,
    decode_payload,
    encode,
    encode_feedback,
    encode_io_request,
)
from .connection import CLOSED, NEED_DATA, Connection, State
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .messages import (
    ABSOLUTE_MAX_PAYLOAD,
    DEFAULT_MAX_PAYLOAD,
    FEATURE_DMA,
    FEATURE_EVENTS,
    HEADER,
    HEADER_SIZE,
    ID_CHARS,
    MAGIC,
    MAX_ID_LENGTH,
    MESSAGES,
    PRE_HANDSHAKE_MAX_PAYLOAD,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    SUPPORTED_FEATURES,
    AccessKind,
    Attach,
    Detach,
    Direction,
    Error,
    ErrorCode,
    Event,
    Feedback,
    Hello,
    Interrupt,
    IoRequest,
    Message,
    MessageSpec,
    MsgType,
    Ping,
    Pong,
    Role,
    Status,
    Welcome,
)

__all__ = [
    # messages
    "Message", "Hello", "Welcome", "IoRequest", "Feedback", "Interrupt", "Error",
    "Ping", "Pong", "Attach", "Detach", "Event",
    "MsgType", "Status", "ErrorCode", "AccessKind", "Direction", "Role",
    "MESSAGES", "MessageSpec",
    "MAGIC", "PROTOCOL_MAJOR", "PROTOCOL_MINOR", "HEADER", "HEADER_SIZE",
    "PRE_HANDSHAKE_MAX_PAYLOAD", "ABSOLUTE_MAX_PAYLOAD", "DEFAULT_MAX_PAYLOAD",
    "MAX_ID_LENGTH", "ID_CHARS", "FEATURE_EVENTS", "FEATURE_DMA", "SUPPORTED_FEATURES",
    # codec
    "encode", "decode_payload", "encode_io_request", "encode_feedback", "decode_feedback",
    "FeedbackFields", "IoRequestFields",
    # connection
    "Connection", "State", "NEED_DATA", "CLOSED",
    # errors
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
]
