"""Fuzz the codec and the connection state machine with mutated frames.

Whatever bytes arrive, decoding either yields a message or raises the protocol's own
error (never another exception, never a hang); a decoded message re-encodes to the
very bytes it came from (one encoding per message, so nothing is accepted in two
spellings); and the hot path's field readers (``next_io_request``/``next_feedback``)
agree with the generic decoder on every frame they accept.
"""

from __future__ import annotations

import random

from remote_hw.protocol import CLOSED, NEED_DATA, Connection, ProtocolError, codec
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import HEADER_SIZE, Role

from mutate import CLIENT_FRAMES, SERVER_FRAMES, Mutator, budget, seconds, seed


def test_decoding_mutated_frames_yields_a_message_or_a_protocol_error():
    rng = random.Random(seed())
    mut = Mutator(rng, CLIENT_FRAMES + SERVER_FRAMES)
    decoded = refused = 0
    for _ in budget():
        frame = mut.frame()
        if len(frame) < HEADER_SIZE:
            continue
        t = frame[2]
        try:
            msg = codec.decode_payload(t, frame[HEADER_SIZE:])
        except ProtocolError:
            refused += 1
            continue
        decoded += 1
        again = codec.encode(msg)
        assert again[HEADER_SIZE:] == frame[HEADER_SIZE:], (seed(), frame.hex(), msg)
    assert decoded and refused  # the mutator reaches both sides of the checks


def _ready_pair() -> tuple[Connection, Connection]:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    s.receive_data(c.send(m.Hello(name="fuzz")))
    assert isinstance(s.next_event(), m.Hello)
    c.receive_data(s.send(m.Welcome(client_id=1, name="srv")))
    assert isinstance(c.next_event(), m.Welcome)
    return c, s


def _drain(conn: Connection, fast) -> list[object]:
    """Every event of the buffered bytes, trying the hot path's reader first and
    checking it against the generic decoder on the same bytes."""
    out: list[object] = []
    while True:
        before = bytes(conn._buf[conn._off:])
        f = fast()
        if f is not None:
            n = HEADER_SIZE + int.from_bytes(before[4:8], "little")
            generic = codec.decode_payload(before[2], before[HEADER_SIZE:n])
            assert tuple(getattr(generic, k) for k in f._fields) == tuple(f), (f, generic)
            out.append(f)
            continue
        ev = conn.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            return out
        out.append(ev)


def test_connections_take_any_stream_and_fail_only_with_protocol_errors():
    rng = random.Random(seed() + 1)
    for side, corpus in ((Role.SERVER, CLIENT_FRAMES), (Role.CLIENT, SERVER_FRAMES)):
        mut = Mutator(rng, corpus)
        errors = 0
        for _ in budget(seconds() / 2):
            c, s = _ready_pair()
            conn = s if side is Role.SERVER else c
            fast = conn.next_io_request if side is Role.SERVER else conn.next_feedback
            stream = mut.stream()
            try:
                pos = 0
                while pos < len(stream):  # in random pieces, as a socket delivers them
                    step = rng.randint(1, 64)
                    conn.receive_data(stream[pos:pos + step])
                    pos += step
                    _drain(conn, fast)
                conn.receive_data(b"")
                _drain(conn, fast)
            except ProtocolError as e:
                errors += 1
                # A failed connection keeps failing the same way, and can say why.
                try:
                    conn.next_event()
                except ProtocolError as again:
                    assert again.code == e.code
                else:
                    raise AssertionError("a failed connection went on") from None
                assert conn.error_frame(e)[:2] == m.MAGIC
        assert errors
