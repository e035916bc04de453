"""The two per-access messages as named tuples of plain values, for the hot paths.

A forwarded register access is one IO_REQUEST and one FEEDBACK. Building their
message objects (:class:`~.messages.IoRequest`, :class:`~.messages.Feedback`) costs
more than the socket calls around them, so the hot paths (the codec's field readers,
:meth:`~.connection.Connection.next_io_request`/``next_feedback``, and the C in
``remote_hw/net/_fastio.c``) hand over these tuples instead: fields in wire order,
ints and strs already validated, enums left as ints. A ``NamedTuple`` indexes as fast
as a bare tuple, so callers read ``f.status`` rather than ``f[3]`` at no cost.

The field names are the message classes' own, checked here at import so the two
cannot drift apart.
"""

from __future__ import annotations

from dataclasses import fields
from typing import NamedTuple

from .messages import Feedback, IoRequest, Message

__all__ = ["FeedbackFields", "IoRequestFields"]


class FeedbackFields(NamedTuple):
    """A valid FEEDBACK payload (``status`` a plain int of :class:`~.messages.Status`)."""

    request_id: int
    vm_id: int
    client_id: int
    status: int
    size: int
    data: int


class IoRequestFields(NamedTuple):
    """A valid IO_REQUEST payload (``kind``, ``direction``: plain ints of their enums)."""

    request_id: int
    vm_id: int
    client_id: int
    offset: int
    data: int
    kind: int
    size: int
    direction: int
    hops: int
    server_id: str
    device_id: str


def _check(tup: type[tuple[object, ...]], msg: type[Message]) -> None:
    names = tuple(f.name for f in fields(msg))
    if getattr(tup, "_fields", None) != names:  # pragma: no cover - a rename in one place
        raise AssertionError(f"{tup.__name__} fields differ from {msg.__name__}'s {names}")


_check(FeedbackFields, Feedback)
_check(IoRequestFields, IoRequest)
