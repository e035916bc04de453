"""The per-connection state machine, sans-I/O (in the style of h11).

A :class:`Connection` never touches a socket.  The owner feeds it received bytes with
:meth:`~Connection.receive_data`, pulls messages out with
:meth:`~Connection.next_event`, and writes whatever :meth:`~Connection.send` returns.
The connection checks that each message is allowed in the current state and direction,
runs the handshake and negotiates the largest payload and the features.

Typical server loop::

    conn = Connection(Role.SERVER)
    while True:
        try:
            ev = conn.next_event()
        except RemoteProtocolError as exc:
            sock.sendall(conn.error_frame(exc))
            break
        if ev is NEED_DATA:
            conn.receive_data(sock.recv(65536))   # b"" at EOF
        elif ev is CLOSED:
            break
        elif isinstance(ev, Hello):
            sock.sendall(conn.send(Welcome(client_id=7, name="srv1")))
        ...
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Final, TypeVar

from .codec import (
    DECODERS,
    MSG_NAMES,
    FeedbackFields,
    IoRequestFields,
    encode,
    encode_feedback,
    encode_interrupts,
    encode_io_request,
    encode_post,
    feedback_fields,
    io_request_fields,
    post_fields,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .messages import (
    FEATURE_EVENTS,
    FEATURE_ORIGIN,
    FEATURE_POSTED,
    FEATURE_RESUME,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAGIC_U16,
    MESSAGES,
    PRE_HANDSHAKE_MAX_PAYLOAD,
    AccessKind,
    Direction,
    Error,
    ErrorCode,
    Hello,
    Message,
    MsgType,
    Role,
    Status,
    Welcome,
)

__all__ = ["Connection", "State", "NEED_DATA", "CLOSED"]


class State(enum.Enum):
    """Connection state (one for both directions; see docs/protocol.md)."""

    #: client: HELLO not sent yet
    START = "START"
    #: server: waiting for the client's HELLO
    AWAIT_HELLO = "AWAIT_HELLO"
    #: client: HELLO sent, waiting for WELCOME
    AWAIT_WELCOME = "AWAIT_WELCOME"
    #: server: HELLO received, the owner must send WELCOME (or ERROR and close)
    SEND_WELCOME = "SEND_WELCOME"
    #: handshake done
    READY = "READY"
    #: the peer closed the connection at a frame boundary
    CLOSED = "CLOSED"
    #: the peer violated the protocol; next_event keeps raising
    ERROR = "ERROR"


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: next_event(): no complete frame buffered yet; call receive_data
NEED_DATA: Final = _Sentinel("NEED_DATA")
#: next_event(): the peer closed the connection cleanly (EOF at a frame boundary)
CLOSED: Final = _Sentinel("CLOSED")


_T = MsgType
# The two ends of a connection.  Role.CLIENT and Role.PEER both connect (a peer is a
# server acting as a client of another server), so the rules only know two sides.
_CLIENT = "client"
_SERVER = "server"
_SIDE_OF = {Role.CLIENT: _CLIENT, Role.PEER: _CLIENT, Role.SERVER: _SERVER}
_OTHER = {_CLIENT: _SERVER, _SERVER: _CLIENT}

#: what each side may ever send (the direction column of docs/protocol.md)
_SENDS: dict[str, frozenset[int]] = {
    _CLIENT: frozenset(
        {_T.HELLO, _T.IO_REQUEST, _T.ATTACH, _T.DETACH, _T.ERROR, _T.PING, _T.PONG,
         _T.RESUME, _T.ORIGIN, _T.POST}
    ),
    _SERVER: frozenset(
        {_T.WELCOME, _T.FEEDBACK, _T.INTERRUPT, _T.EVENT, _T.ERROR, _T.PING, _T.PONG,
         _T.SHADOW}
    ),
}

#: (side, state) -> (types this side may send, types it may receive).  ERROR may go
#: either way in every live state (e.g. to refuse a HELLO); PING/PONG only once READY.
_ALLOWED: dict[tuple[str, State], tuple[frozenset[int], frozenset[int]]] = {
    (_CLIENT, State.START): (frozenset({_T.HELLO, _T.ERROR}), frozenset({_T.ERROR})),
    (_CLIENT, State.AWAIT_WELCOME): (frozenset({_T.ERROR}), frozenset({_T.WELCOME, _T.ERROR})),
    (_CLIENT, State.READY): (
        _SENDS[_CLIENT] - {_T.HELLO},
        _SENDS[_SERVER] - {_T.WELCOME},
    ),
    (_SERVER, State.AWAIT_HELLO): (frozenset({_T.ERROR}), frozenset({_T.HELLO, _T.ERROR})),
    (_SERVER, State.SEND_WELCOME): (frozenset({_T.WELCOME, _T.ERROR}), frozenset({_T.ERROR})),
    (_SERVER, State.READY): (
        _SENDS[_SERVER] - {_T.WELCOME},
        _SENDS[_CLIENT] - {_T.HELLO},
    ),
}
_NOTHING: frozenset[int] = frozenset()
#: message types that need a negotiated feature bit
_NEEDS_FEATURE: dict[int, int] = {_T.EVENT: FEATURE_EVENTS, _T.RESUME: FEATURE_RESUME,
                                   _T.ORIGIN: FEATURE_ORIGIN, _T.POST: FEATURE_POSTED,
                                   _T.SHADOW: FEATURE_POSTED}

_HANDSHAKE = frozenset({_T.HELLO, _T.WELCOME})
_IO_REQUEST = int(_T.IO_REQUEST)
_FEEDBACK = int(_T.FEEDBACK)
_POST = int(_T.POST)
_INTERRUPT = int(_T.INTERRUPT)
_F = TypeVar("_F", FeedbackFields, IoRequestFields)  # what a field reader returns
_ERROR_FIXED = MESSAGES[_T.ERROR].fixed.size
#: Compact the receive buffer once this many consumed bytes sit at its front.  The
#: common case (every buffered frame consumed) empties the buffer outright instead.
_COMPACT_AT = 1 << 16


class Connection:
    """One end of a remote-hw connection, as a state machine (no I/O).

    ``role`` is the :class:`Role` this end plays: ``Role.CLIENT`` or ``Role.PEER``
    for the connecting end (it sends HELLO), ``Role.SERVER`` for the accepting end.

    Read-only attributes:

    * ``role`` (:class:`Role`), ``state`` (:class:`State`)
    * ``max_payload`` — the largest payload either way: 1024 until the handshake,
      then ``min(client's, server's)``
    * ``features`` — negotiated feature bits (0 until the handshake)
    * ``peer_name`` — the peer's name from HELLO/WELCOME, else None
    * ``peer_role`` — server side: the :class:`Role` from HELLO, else None
    * ``peer_version`` — ``(major, minor)`` from the peer's HELLO/WELCOME, else None
    * ``client_id`` — the id from WELCOME (both sides), else None

    Local mistakes raise :class:`LocalProtocolError` and change nothing.  Remote ones
    raise :class:`RemoteProtocolError` and put the connection in ``State.ERROR``.
    """

    __slots__ = (
        "_role", "_side", "_state", "_send_ok", "_recv_ok", "_max_payload", "_features",
        "_peer_name", "_peer_role", "_peer_version", "_client_id", "_offer_max",
        "_offer_features", "_buf", "_off", "_eof", "_error",
    )

    def __init__(self, role: Role | int) -> None:
        self._role = Role(role)
        self._side = _SIDE_OF[self._role]
        self._max_payload = PRE_HANDSHAKE_MAX_PAYLOAD
        self._features = 0
        self._peer_name: str | None = None
        self._peer_role: Role | None = None
        self._peer_version: tuple[int, int] | None = None
        self._client_id: int | None = None
        # The HELLO's offer (ours on the client side, the peer's on the server side),
        # kept until WELCOME completes the negotiation.
        self._offer_max = 0
        self._offer_features = 0
        # Receive buffer: bytes before _off are consumed.  Decoders read straight out
        # of it (struct.unpack_from with an offset), so a frame is never copied whole.
        self._buf = bytearray()
        self._off = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._set_state(State.START if self._side is _CLIENT else State.AWAIT_HELLO)

    # ----------------------------------------------------------------- attributes

    @property
    def role(self) -> Role:
        return self._role

    @property
    def state(self) -> State:
        return self._state

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @property
    def features(self) -> int:
        return self._features

    @property
    def peer_name(self) -> str | None:
        return self._peer_name

    @property
    def peer_role(self) -> Role | None:
        return self._peer_role

    @property
    def peer_version(self) -> tuple[int, int] | None:
        return self._peer_version

    @property
    def client_id(self) -> int | None:
        return self._client_id

    def __repr__(self) -> str:
        return (
            f"<Connection {self._role.name} {self._state.name} "
            f"max_payload={self._max_payload} peer={self._peer_name!r}>"
        )

    # ----------------------------------------------------------------- sending

    def send(self, msg: Message) -> bytes:
        """Check that ``msg`` may be sent now, encode it and return the frame bytes.

        Sending HELLO (client) or WELCOME (server) advances the handshake; WELCOME
        fixes the negotiated ``max_payload`` and ``features``.  Raises
        :class:`LocalProtocolError` (``UNEXPECTED`` for a message not allowed in this
        state or from this side, ``OVERSIZED`` beyond ``max_payload``, or the field
        error from :func:`encode`); the state is unchanged then.
        """
        t = getattr(type(msg), "MSG_TYPE", None)
        if t is None:
            raise TypeError(f"not a protocol message: {msg!r}")
        if t not in self._send_ok:
            raise LocalProtocolError(ErrorCode.UNEXPECTED, self._why_not(t, sending=True))
        frame = encode(msg)
        if len(frame) - HEADER_SIZE > self._max_payload:
            raise LocalProtocolError(
                ErrorCode.OVERSIZED,
                f"{t.name} payload of {len(frame) - HEADER_SIZE} bytes exceeds the "
                f"limit of {self._max_payload}",
            )
        if t in _HANDSHAKE:
            self._sent_handshake(msg)
        return frame

    def send_io_request(
        self,
        request_id: int,
        vm_id: int,
        client_id: int,
        offset: int,
        data: int,
        kind: AccessKind | int,
        size: int,
        direction: Direction | int,
        hops: int,
        server_id: str,
        device_id: str,
    ) -> bytes:
        """Fast ``send(IoRequest(...))`` from plain values, arguments in wire order."""
        if _IO_REQUEST not in self._send_ok:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED, self._why_not(_T.IO_REQUEST, sending=True)
            )
        # No size check: an IO_REQUEST is at most 38 + 2 * 64 bytes and the
        # negotiated limit is never below 1024.
        return encode_io_request(
            request_id, vm_id, client_id, offset, data, kind, size, direction, hops,
            server_id, device_id,
        )

    def send_post(
        self,
        request_id: int,
        vm_id: int,
        client_id: int,
        offset: int,
        data: int,
        kind: AccessKind | int,
        size: int,
        hops: int,
        server_id: str,
        device_id: str,
    ) -> bytes:
        """Fast ``send(Post(...))`` from plain values (needs FEATURE_POSTED)."""
        if _POST not in self._send_ok:
            raise LocalProtocolError(ErrorCode.UNEXPECTED, self._why_not(_T.POST, sending=True))
        return encode_post(request_id, vm_id, client_id, offset, data, kind, size, hops,
                           server_id, device_id)

    def send_interrupts(self, client_id: int, vm_ids: tuple[int, ...] | list[int], line: int,
                        level: int, device_id: str) -> bytes:
        """Fast ``send(Interrupt(...))`` for each VM of ``vm_ids`` (one device's line
        change, fanned out to a client's VMs), the frames joined."""
        if _INTERRUPT not in self._send_ok:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED, self._why_not(_T.INTERRUPT, sending=True)
            )
        # No size check: an INTERRUPT is at most 14 + 64 bytes.
        return encode_interrupts(client_id, vm_ids, line, level, device_id)

    def send_feedback(
        self,
        request_id: int,
        vm_id: int,
        client_id: int,
        status: Status | int,
        size: int,
        data: int,
    ) -> bytes:
        """Fast ``send(Feedback(...))`` from plain values, arguments in wire order."""
        if _FEEDBACK not in self._send_ok:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED, self._why_not(_T.FEEDBACK, sending=True)
            )
        return encode_feedback(request_id, vm_id, client_id, status, size, data)

    def error_frame(self, exc: BaseException, request_id: int | None = None) -> bytes:
        """Encode an ERROR frame describing ``exc``, to send just before closing.

        Works in any state (typically ERROR, after :class:`RemoteProtocolError`).  A
        :class:`ProtocolError` gives its code, text and request id; any other
        exception gives ``INTERNAL`` with only the exception's type name (no internals
        leak to the peer).  The text is cut, on a UTF-8 boundary, to what the peer
        accepts.  Does not change the state.
        """
        if isinstance(exc, ProtocolError):
            code, text, rid = exc.code, exc.text, exc.request_id
        else:
            code, text, rid = ErrorCode.INTERNAL, f"internal error ({type(exc).__name__})", 0
        if request_id is not None:
            rid = request_id
        room = min(self._max_payload - _ERROR_FIXED, 0xFFFF)
        raw = text.encode("utf-8", "backslashreplace")
        if len(raw) > room:
            raw = raw[:room]
        text = raw.decode("utf-8", "ignore")  # drops a character cut in half
        return encode(Error(request_id=rid, code=code, text=text))

    # ----------------------------------------------------------------- receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; ``b""`` means the peer closed its side (EOF)."""
        if self._error is not None:
            return  # nothing more will be parsed; do not let the buffer grow
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data() called with data after EOF")
        if self._off >= _COMPACT_AT:
            del self._buf[: self._off]
            self._off = 0
        self._buf += data

    def next_event(self) -> Message | _Sentinel:
        """Return the next received message, ``NEED_DATA`` or ``CLOSED``.

        A received ERROR message is returned like any other message.  Raises
        :class:`RemoteProtocolError` for bad magic or flags (``MALFORMED``), an unknown
        type (``UNKNOWN_TYPE``), a length above ``max_payload`` (``OVERSIZED``, as soon
        as the header is in), a message not allowed now or from that side
        (``UNEXPECTED``), a bad field (see :func:`decode_payload`), or EOF in the
        middle of a frame (``MALFORMED``).  After that the state is ERROR and every
        call raises the same error again.
        """
        if self._error is not None:
            e = self._error
            raise RemoteProtocolError(e.code, e.text, e.request_id)
        buf = self._buf
        off = self._off
        have = len(buf) - off
        if have >= HEADER_SIZE:
            magic, t, flags, length = HEADER.unpack_from(buf, off)
            if (
                magic != MAGIC_U16
                or flags
                or length > self._max_payload
                or t not in self._recv_ok
            ):
                self._reject_header(buf, off, magic, t, flags, length)
            end = off + HEADER_SIZE + length
            if end <= len(buf):
                try:
                    msg = DECODERS[t](buf, off + HEADER_SIZE, end)
                except RemoteProtocolError as exc:
                    self._fail(exc)
                    raise
                if end == len(buf):
                    buf.clear()
                    self._off = 0
                else:
                    self._off = end
                if t in _HANDSHAKE:
                    self._received_handshake(msg)
                return msg
        if self._eof:
            if have == 0:
                self._set_state(State.CLOSED)
                return CLOSED
            eof = RemoteProtocolError(
                ErrorCode.MALFORMED, "connection closed in the middle of a frame"
            )
            self._fail(eof)
            raise eof
        return NEED_DATA

    # Hot-path variants of next_event.  They consume the next frame only when it is a
    # complete, valid frame of the one type asked for, and return its fields as a named
    # tuple (no message object).  Anything else - another type, a partial frame, a bad field,
    # EOF - returns None and is left for next_event, which returns or raises exactly as
    # it always does.  So a caller may try the fast path first and fall back.

    @property
    def buffered(self) -> int:
        """Received bytes not yet consumed (0: the next call would return NEED_DATA,
        or CLOSED after EOF)."""
        return len(self._buf) - self._off

    def next_io_request(self) -> IoRequestFields | None:
        """The next frame's fields if it is an IO_REQUEST (see io_request_fields)."""
        return self._next_fields(_IO_REQUEST, io_request_fields)

    def next_post(self) -> IoRequestFields | None:
        """The next frame's fields if it is a POST (``direction`` is always WRITE)."""
        return self._next_fields(_POST, post_fields)

    def next_feedback(self) -> FeedbackFields | None:
        """The next frame's fields if it is a FEEDBACK (see feedback_fields)."""
        return self._next_fields(_FEEDBACK, feedback_fields)

    def _next_fields(self, want: int, fields: Callable[[Any, int, int], _F | None]
                     ) -> _F | None:
        buf = self._buf
        off = self._off
        if len(buf) - off < HEADER_SIZE or self._error is not None:
            return None
        magic, t, flags, length = HEADER.unpack_from(buf, off)
        end = off + HEADER_SIZE + length
        if (t != want or magic != MAGIC_U16 or flags or length > self._max_payload
                or end > len(buf) or t not in self._recv_ok):
            return None
        f = fields(buf, off + HEADER_SIZE, end)
        if f is None:
            return None
        if end == len(buf):
            buf.clear()
            self._off = 0
        else:
            self._off = end
        return f

    # ----------------------------------------------------------------- internals

    def _set_state(self, state: State) -> None:
        self._state = state
        send_ok, recv_ok = _ALLOWED.get((self._side, state), (_NOTHING, _NOTHING))
        for t, bit in _NEEDS_FEATURE.items():
            if state is State.READY and not self._features & bit:
                send_ok = send_ok - {t}
                recv_ok = recv_ok - {t}
        self._send_ok = send_ok
        self._recv_ok = recv_ok

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._error = exc
        self._buf = bytearray()
        self._off = 0
        self._set_state(State.ERROR)

    def _reject_header(
        self, buf: bytearray, off: int, magic: int, t: int, flags: int, length: int
    ) -> None:
        # Order matters: a stream that is not ours at all should be reported as such,
        # not as an "unknown type" of whatever byte happens to sit at offset 2.
        if magic != MAGIC_U16:
            exc = RemoteProtocolError(
                ErrorCode.MALFORMED,
                f"bad magic {bytes(buf[off : off + 2])!r} (expected {MAGIC!r}): "
                "not a remote-hw stream or lost framing",
            )
        elif flags:
            exc = RemoteProtocolError(
                ErrorCode.MALFORMED,
                f"frame flags must be 0 in protocol v1, got {flags:#04x} "
                f"(type {MSG_NAMES.get(t, t)})",
            )
        elif t not in MSG_NAMES:
            exc = RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {t}")
        elif length > self._max_payload:
            exc = RemoteProtocolError(
                ErrorCode.OVERSIZED,
                f"{MSG_NAMES[t]} frame announces a {length}-byte payload; the limit is "
                f"{self._max_payload}"
                + (" until the handshake completes" if self._state is not State.READY else ""),
            )
        else:
            exc = RemoteProtocolError(ErrorCode.UNEXPECTED, self._why_not(t, sending=False))
        self._fail(exc)
        raise exc

    def _why_not(self, t: int, *, sending: bool) -> str:
        name = MSG_NAMES[t]
        sender = self._side if sending else _OTHER[self._side]
        verb = "cannot send" if sending else "received"
        if t not in _SENDS[sender]:
            if sending:
                return f"a {sender} cannot send {name}"
            return f"received {name} from the {sender}; only a {_OTHER[sender]} may send it"
        bit = _NEEDS_FEATURE.get(t)
        if bit is not None and self._state is State.READY and not self._features & bit:
            return f"{verb} {name}, but its feature bit {bit:#x} was not negotiated"
        hint = {
            State.START: "send HELLO first",
            State.AWAIT_HELLO: "the handshake has not started",
            State.AWAIT_WELCOME: "the handshake is not complete (waiting for WELCOME)",
            State.SEND_WELCOME: "the handshake is not complete (WELCOME not sent yet)",
            State.CLOSED: "the connection is closed",
            State.ERROR: "the connection failed; use error_frame() and close",
        }.get(self._state, "")
        return f"{verb} {name} in state {self._state.name}" + (f": {hint}" if hint else "")

    def _sent_handshake(self, msg: Message) -> None:
        if isinstance(msg, Hello):
            self._offer_max = msg.max_payload
            self._offer_features = msg.features
            self._set_state(State.AWAIT_WELCOME)
        else:
            assert isinstance(msg, Welcome)
            self._negotiate(msg)

    def _received_handshake(self, msg: Message) -> None:
        if isinstance(msg, Hello):
            self._offer_max = msg.max_payload
            self._offer_features = msg.features
            self._peer_name = msg.name
            self._peer_role = msg.role
            self._peer_version = (msg.major, msg.minor)
            self._set_state(State.SEND_WELCOME)
        else:
            assert isinstance(msg, Welcome)
            self._peer_name = msg.name
            self._peer_version = (msg.major, msg.minor)
            self._negotiate(msg)

    def _negotiate(self, welcome: Welcome) -> None:
        # Both ends compute the same values from HELLO and WELCOME, so nothing needs
        # to be confirmed: the limit is the smaller offer, features both support.
        self._max_payload = min(self._offer_max, welcome.max_payload)
        self._features = self._offer_features & welcome.features
        self._client_id = welcome.client_id
        self._set_state(State.READY)
