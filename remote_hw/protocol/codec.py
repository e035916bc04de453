"""Encoding and decoding of single messages, with full validation.

Everything here is derived from the table in :mod:`.messages`: at import time each
:class:`~.messages.MessageSpec` is compiled into a plan (field names, which validation
rule applies to which field, where the reserved bytes are, a fast constructor). The
generic :func:`encode` / :func:`decode_payload` walk a plan; the hot messages
(IO_REQUEST, FEEDBACK) additionally get hand-unrolled fast paths that use the *same*
``struct.Struct`` objects from the table and fall back to the generic code whenever
anything looks unusual, so the generic code alone decides what is an error and how it
is worded.

Decoding raises :class:`~.errors.RemoteProtocolError`, encoding raises
:class:`~.errors.LocalProtocolError`; both are :class:`~.errors.ProtocolError`.
Every field is validated before a message object is built.

This module is the codec's public face; the work is done by private modules with one
job each, as in h11:

* :mod:`._rules` — field rules (validate and convert one field, by name) and the
  identifier caches;
* :mod:`._plans` — each message's layout compiled once into a ``_Plan``;
* :mod:`._decode` — the reference decoder, which alone decides what is malformed;
* :mod:`._decoders` — the decoder of each type, with the hot two unrolled, and their
  field readers (named tuples, :mod:`._fields`);
* :mod:`._encode` — the reference encoder and the fast encoders of the hot two.
"""

from __future__ import annotations

from ._decode import _decode_generic as _decode_generic
from ._decoders import (
    DECODERS,
    MSG_NAMES,
    decode_feedback,
    decode_payload,
    feedback_fields,
    io_request_fields,
    post_fields,
)
from ._encode import _encode_generic as _encode_generic
from ._encode import (
    encode,
    encode_feedback,
    encode_interrupts,
    encode_io_request,
    encode_post,
)
from ._fields import FeedbackFields, IoRequestFields
from ._plans import _PLAN_BY_CLASS as _PLAN_BY_CLASS
from ._plans import _PLANS as _PLANS
from ._plans import _Plan as _Plan
from ._rules import id_caches

__all__ = [
    "encode",
    "decode_payload",
    "encode_io_request",
    "encode_feedback",
    "encode_post",
    "encode_interrupts",
    "decode_feedback",
    "feedback_fields",
    "io_request_fields",
    "post_fields",
    "FeedbackFields",
    "IoRequestFields",
    "DECODERS",
    "MSG_NAMES",
    "id_caches",
]
