"""Exceptions of the protocol layer.

As in h11, the two subclasses say whose fault it is:

* :class:`RemoteProtocolError` — the bytes we received are wrong (or the peer speaks
  another major version).  The usual reaction is to send
  ``conn.error_frame(exc)`` and close the connection.
* :class:`LocalProtocolError` — this side tried to send something invalid or not
  allowed now.  Nothing was encoded; it is a bug in the caller.
"""

from __future__ import annotations

from .messages import ErrorCode


class ProtocolError(Exception):
    """A protocol violation, with the :class:`ErrorCode` an ERROR frame would carry.

    ``text`` is a human-readable message that names the offending field or frame.
    ``request_id`` is the request the error is about, when known (else 0).
    """

    code: ErrorCode
    text: str
    request_id: int

    def __init__(self, code: ErrorCode | int, text: str, request_id: int = 0) -> None:
        super().__init__(code, text, request_id)
        self.code = ErrorCode(code)
        self.text = text
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code.name}: {self.text}"


class LocalProtocolError(ProtocolError):
    """This side tried to encode/send something invalid or not allowed now."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid, oversized, unknown or not allowed now."""
