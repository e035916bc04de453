"""Connection tests: handshake, state rules, framing and stream splitting."""

from __future__ import annotations

import pytest

from remote_hw.protocol import (
    CLOSED,
    FEATURE_EVENTS,
    NEED_DATA,
    PRE_HANDSHAKE_MAX_PAYLOAD,
    AccessKind,
    Attach,
    Connection,
    Detach,
    Direction,
    Error,
    ErrorCode,
    Event,
    Feedback,
    Hello,
    Interrupt,
    IoRequest,
    LocalProtocolError,
    Ping,
    Pong,
    RemoteProtocolError,
    Role,
    State,
    Status,
    Welcome,
    decode_payload,
    encode,
)


def le(v: int, n: int) -> bytes:
    return v.to_bytes(n, "little")


def frame(t: int, payload: bytes = b"", *, flags: int = 0, magic: bytes = b"RH",
          length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return magic + bytes([t, flags]) + le(n, 4) + payload


def drain(conn: Connection) -> list:
    """All events currently available, up to (not including) NEED_DATA/CLOSED."""
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            return out
        out.append(ev)


def handshake(client_max=65536, server_max=65536, client_features=FEATURE_EVENTS,
              server_features=FEATURE_EVENTS, role=Role.CLIENT):
    c = Connection(Role.CLIENT)
    s = Connection(Role.SERVER)
    hello = Hello(name="vmhost", max_payload=client_max, features=client_features, role=role)
    s.receive_data(c.send(hello))
    assert c.state is State.AWAIT_WELCOME
    assert drain(s) == [hello]
    assert s.state is State.SEND_WELCOME
    welcome = Welcome(client_id=42, name="srv1", max_payload=server_max, features=server_features)
    c.receive_data(s.send(welcome))
    assert s.state is State.READY
    assert drain(c) == [welcome]
    assert c.state is State.READY
    return c, s


def expect_remote(conn: Connection, code: ErrorCode) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as ei:
        conn.next_event()
    assert ei.value.code is code, ei.value
    assert conn.state is State.ERROR
    # Stays failed: the same error again, whatever arrives afterwards.
    conn.receive_data(encode(Ping(nonce=1)))
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert (again.value.code, again.value.text) == (ei.value.code, ei.value.text)
    return ei.value


CLIENT_MSGS = [
    IoRequest(request_id=1, vm_id=2, offset=0x3F8, kind=AccessKind.PORT, size=1,
              direction=Direction.WRITE, data=0x41, device_id="uart0"),
    IoRequest(request_id=2, vm_id=2, offset=0x1000, kind=AccessKind.MMIO, size=8,
              direction=Direction.READ, server_id="srv2", device_id="ram.x", hops=3),
    Attach(request_id=3, vm_id=2, device_id="uart0"),
    Detach(request_id=4, vm_id=2),
    Ping(nonce=5),
    Pong(nonce=6),
    Error(request_id=7, code=ErrorCode.DENIED, text="no ✓"),
]
SERVER_MSGS = [
    Feedback(request_id=2, vm_id=2, client_id=42, size=8, data=(1 << 64) - 1),
    Feedback(request_id=1, vm_id=2, client_id=42, status=Status.UNKNOWN_DEVICE, size=1),
    Interrupt(vm_id=2, client_id=42, line=4, level=1, device_id="uart0"),
    Event(vm_id=2, client_id=42, device_id="wdt", name="reset-request"),
    Ping(nonce=8),
    Pong(nonce=5),
    Error(code=ErrorCode.INTERNAL, text="oops"),
]


# ------------------------------------------------------------------------ handshake


def test_handshake_negotiates_and_records_the_peer():
    c, s = handshake(client_max=4096, server_max=8192, client_features=3,
                     server_features=FEATURE_EVENTS | 4, role=Role.PEER)
    assert c.max_payload == s.max_payload == 4096
    assert c.features == s.features == FEATURE_EVENTS
    assert c.client_id == s.client_id == 42
    assert c.peer_name == "srv1" and s.peer_name == "vmhost"
    assert s.peer_role is Role.PEER and c.peer_role is None
    assert c.peer_version == s.peer_version == (1, 0)
    c2, s2 = handshake(client_max=1 << 20, server_max=2048)
    assert c2.max_payload == s2.max_payload == 2048


def test_roles():
    assert Connection(Role.CLIENT).state is State.START
    assert Connection(Role.PEER).state is State.START  # a forwarding server connects
    assert Connection(Role.SERVER).state is State.AWAIT_HELLO
    assert Connection(3).role is Role.SERVER
    with pytest.raises(ValueError):
        Connection(0)


def test_a_peer_connection_behaves_like_a_client():
    p = Connection(Role.PEER)
    s = Connection(Role.SERVER)
    s.receive_data(p.send(Hello(name="srv2", role=Role.PEER)))
    assert drain(s)[0].role is Role.PEER and s.peer_role is Role.PEER
    p.receive_data(s.send(Welcome(client_id=7, name="srv1")))
    drain(p)
    s.receive_data(p.send(CLIENT_MSGS[1]))
    assert drain(s) == [CLIENT_MSGS[1]]
    with pytest.raises(LocalProtocolError):
        p.send(SERVER_MSGS[0])


def test_limits_before_handshake():
    c = Connection(Role.CLIENT)
    assert c.max_payload == PRE_HANDSHAKE_MAX_PAYLOAD and c.features == 0
    assert c.client_id is None and c.peer_name is None


# ------------------------------------------------------------------- round trips


def test_every_message_crosses_between_connections():
    c, s = handshake()
    for m in CLIENT_MSGS:
        s.receive_data(c.send(m))
        assert drain(s) == [m]
    for m in SERVER_MSGS:
        c.receive_data(s.send(m))
        assert drain(c) == [m]
    assert c.state is s.state is State.READY


def test_fast_send_methods_match_send():
    c, s = handshake()
    m = CLIENT_MSGS[1]
    fast = c.send_io_request(m.request_id, m.vm_id, m.client_id, m.offset, m.data, m.kind,
                             m.size, m.direction, m.hops, m.server_id, m.device_id)
    assert fast == c.send(m)
    s.receive_data(fast)
    assert drain(s) == [m]
    f = SERVER_MSGS[0]
    fast = s.send_feedback(f.request_id, f.vm_id, f.client_id, f.status, f.size, f.data)
    assert fast == s.send(f)
    c.receive_data(fast)
    assert drain(c) == [f]


def test_out_of_order_feedback_is_just_events():
    c, s = handshake()
    reqs = [IoRequest(request_id=i, vm_id=1, offset=i, kind=1, size=4, direction=0,
                      device_id="dev") for i in (1, 2, 3)]
    for r in reqs:
        s.receive_data(c.send(r))
    assert [e.request_id for e in drain(s)] == [1, 2, 3]
    for rid in (3, 1, 2):
        c.receive_data(s.send(Feedback(request_id=rid, vm_id=1, size=4, data=rid * 10)))
    assert [(e.request_id, e.data) for e in drain(c)] == [(3, 30), (1, 10), (2, 20)]


def test_many_frames_in_one_chunk_and_buffer_compaction():
    c, s = handshake()
    # Well over the compaction threshold, fed in odd-sized chunks so frames straddle
    # chunk boundaries while consumed bytes pile up at the front of the buffer.
    stream = b"".join(s.send(Ping(nonce=i)) for i in range(20000))
    got = []
    for i in range(0, len(stream), 1000):
        c.receive_data(stream[i : i + 1000])
        got.extend(e.nonce for e in drain(c))
    assert got == list(range(20000))
    assert c.next_event() is NEED_DATA


# ------------------------------------------------------------ splitting the stream


def recorded_streams():
    """(bytes the client sent, bytes the server sent, events each side received)."""
    c = Connection(Role.CLIENT)
    s = Connection(Role.SERVER)
    up = [c.send(Hello(name="vmhost"))]
    s.receive_data(up[0])
    up_events = drain(s)
    down = [s.send(Welcome(client_id=1, name="srv1"))]
    c.receive_data(down[0])
    down_events = drain(c)
    for m in CLIENT_MSGS:
        up.append(c.send(m))
    for m in SERVER_MSGS:
        down.append(s.send(m))
    s.receive_data(b"".join(up[1:]))
    up_events += drain(s)
    c.receive_data(b"".join(down[1:]))
    down_events += drain(c)
    return b"".join(up), b"".join(down), up_events, down_events


UP, DOWN, UP_EVENTS, DOWN_EVENTS = recorded_streams()


def fresh_receiver(side: Role) -> Connection:
    """A connection ready to receive the recorded stream for ``side``."""
    conn = Connection(side)
    if side is Role.CLIENT:
        conn.send(Hello(name="vmhost"))  # the recorded server stream starts with WELCOME
    return conn


def pull(conn: Connection) -> list:
    """drain(), but a server answers HELLO at once, as its owner would.

    Bytes after a HELLO may sit in the same chunk here (the recorded stream is fed
    whole), so the WELCOME must go out before the next frame is looked at.
    """
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            return out
        out.append(ev)
        if conn.role is Role.SERVER and conn.state is State.SEND_WELCOME:
            conn.send(Welcome(client_id=1, name="srv1"))


def feed(side: Role, chunks: list[bytes]) -> list:
    conn = fresh_receiver(side)
    events = []
    for chunk in chunks:
        if chunk:  # b"" would mean EOF
            conn.receive_data(chunk)
        events.extend(pull(conn))
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED and conn.state is State.CLOSED
    return events


def test_recorded_streams_are_complete():
    assert [Hello(name="vmhost"), *CLIENT_MSGS] == UP_EVENTS
    assert [Welcome(client_id=1, name="srv1"), *SERVER_MSGS] == DOWN_EVENTS


@pytest.mark.parametrize("side, stream, events", [
    (Role.SERVER, UP, UP_EVENTS), (Role.CLIENT, DOWN, DOWN_EVENTS)])
def test_one_byte_at_a_time(side, stream, events):
    assert feed(side, [stream[i : i + 1] for i in range(len(stream))]) == events


@pytest.mark.parametrize("side, stream, events", [
    (Role.SERVER, UP, UP_EVENTS), (Role.CLIENT, DOWN, DOWN_EVENTS)])
def test_every_two_way_split(side, stream, events):
    for cut in range(len(stream) + 1):
        assert feed(side, [stream[:cut], stream[cut:]]) == events, cut


@pytest.mark.parametrize("side, stream", [(Role.SERVER, UP), (Role.CLIENT, DOWN)])
def test_eof_at_every_point_inside_a_frame(side, stream):
    boundaries = set()
    pos = 0
    while pos < len(stream):
        boundaries.add(pos)
        pos += 8 + int.from_bytes(stream[pos + 4 : pos + 8], "little")
    boundaries.add(len(stream))
    for cut in range(len(stream) + 1):
        conn = fresh_receiver(side)
        conn.receive_data(stream[:cut])
        pull(conn)
        conn.receive_data(b"")
        if cut in boundaries:
            assert conn.next_event() is CLOSED, cut
        else:
            e = expect_remote(conn, ErrorCode.MALFORMED)
            assert e.text == "connection closed in the middle of a frame"


# ------------------------------------------------------------------- bad framing


def test_bad_magic():
    c, s = handshake()
    s.receive_data(b"GET / HTTP/1.1\r\n")
    e = expect_remote(s, ErrorCode.MALFORMED)
    assert "magic" in e.text and "b'GE'" in e.text


def test_bad_flags():
    c, s = handshake()
    s.receive_data(frame(7, le(1, 8), flags=0x80))
    assert "flags" in expect_remote(s, ErrorCode.MALFORMED).text


@pytest.mark.parametrize("t", [0, 16, 200])
def test_unknown_type(t):
    c, s = handshake()
    s.receive_data(frame(t, b"abc"))
    assert str(t) in expect_remote(s, ErrorCode.UNKNOWN_TYPE).text


def test_oversized_is_rejected_from_the_header_alone():
    s = Connection(Role.SERVER)
    s.receive_data(frame(1, length=PRE_HANDSHAKE_MAX_PAYLOAD + 1))  # 8 bytes only
    e = expect_remote(s, ErrorCode.OVERSIZED)
    assert "1025" in e.text and "1024" in e.text


def test_oversized_after_handshake_uses_the_negotiated_limit():
    c, s = handshake(client_max=4096, server_max=8192)
    s.receive_data(frame(6, length=4096))  # exactly the limit: wait for the payload
    assert s.next_event() is NEED_DATA
    c2, s2 = handshake(client_max=4096, server_max=8192)
    s2.receive_data(frame(6, length=4097))
    expect_remote(s2, ErrorCode.OVERSIZED)
    c3, s3 = handshake()
    c3.receive_data(frame(4, length=0xFFFFFFFF))
    expect_remote(c3, ErrorCode.OVERSIZED)


def test_a_bad_field_fails_the_connection():
    c, s = handshake()
    good = c.send(CLIENT_MSGS[0])
    bad = good[:-5] + b"uart/"
    s.receive_data(bad)
    e = expect_remote(s, ErrorCode.BAD_ID)
    assert "device_id" in e.text and e.request_id == 1


def test_frames_before_the_error_are_still_delivered():
    c, s = handshake()
    s.receive_data(c.send(Ping(nonce=1)) + b"XX" + b"\0" * 10)
    assert s.next_event() == Ping(nonce=1)
    expect_remote(s, ErrorCode.MALFORMED)


# ----------------------------------------------------------- state and direction


@pytest.mark.parametrize("msg", [CLIENT_MSGS[0], Attach(request_id=1, vm_id=1, device_id="d"),
                                 Ping(nonce=1), Welcome(client_id=1, name="x")])
def test_client_cannot_send_before_hello_or_server_messages(msg):
    c = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError) as ei:
        c.send(msg)
    assert ei.value.code is ErrorCode.UNEXPECTED
    assert c.state is State.START  # a local mistake changes nothing


def test_local_direction_and_state_errors_are_explained():
    c, s = handshake()
    with pytest.raises(LocalProtocolError, match="a client cannot send WELCOME"):
        c.send(Welcome(client_id=1, name="x"))
    with pytest.raises(LocalProtocolError, match="a server cannot send IO_REQUEST"):
        s.send(CLIENT_MSGS[0])
    with pytest.raises(LocalProtocolError, match="HELLO in state READY"):
        c.send(Hello(name="again"))
    with pytest.raises(LocalProtocolError, match="a server cannot send IO_REQUEST"):
        s.send_io_request(1, 1, 0, 0, 0, 0, 1, 0, 0, "", "d")
    with pytest.raises(LocalProtocolError, match="a client cannot send FEEDBACK"):
        c.send_feedback(1, 1, 0, 0, 1, 0)
    c0 = Connection(Role.CLIENT)
    c0.send(Hello(name="h"))
    with pytest.raises(LocalProtocolError, match="waiting for WELCOME"):
        c0.send_io_request(1, 1, 0, 0, 0, 0, 1, 0, 0, "", "d")
    s0 = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError, match="FEEDBACK in state AWAIT_HELLO"):
        s0.send(SERVER_MSGS[0])
    with pytest.raises(LocalProtocolError, match="WELCOME in state AWAIT_HELLO"):
        s0.send(Welcome(client_id=1, name="x"))
    # Still usable after all of that.
    s.receive_data(c.send(Ping(nonce=3)))
    assert drain(s) == [Ping(nonce=3)]


def test_send_checks_the_negotiated_limit():
    c, s = handshake(client_max=1024, server_max=1024)
    with pytest.raises(LocalProtocolError) as ei:
        s.send(Error(code=ErrorCode.INTERNAL, text="x" * 1013))
    assert ei.value.code is ErrorCode.OVERSIZED
    assert len(s.send(Error(code=ErrorCode.INTERNAL, text="x" * 1012))) == 8 + 1024


def test_client_receiving_a_request_is_unexpected():
    c, s = handshake()
    c.receive_data(encode(CLIENT_MSGS[0]))
    e = expect_remote(c, ErrorCode.UNEXPECTED)
    assert "IO_REQUEST from the server" in e.text


def test_server_receiving_feedback_is_unexpected():
    c, s = handshake()
    s.receive_data(encode(SERVER_MSGS[0]))
    assert "FEEDBACK from the client" in expect_remote(s, ErrorCode.UNEXPECTED).text


@pytest.mark.parametrize("msg", [CLIENT_MSGS[0], Ping(nonce=1), Detach(request_id=1, vm_id=1)])
def test_server_receiving_anything_but_hello_first_is_unexpected(msg):
    s = Connection(Role.SERVER)
    s.receive_data(encode(msg))
    assert "AWAIT_HELLO" in expect_remote(s, ErrorCode.UNEXPECTED).text


def test_second_hello_and_request_before_welcome_are_unexpected():
    c, s = handshake()
    s.receive_data(encode(Hello(name="again")))
    expect_remote(s, ErrorCode.UNEXPECTED)
    s2 = Connection(Role.SERVER)
    s2.receive_data(encode(Hello(name="h")) + encode(CLIENT_MSGS[0]))
    assert isinstance(s2.next_event(), Hello)
    assert "SEND_WELCOME" in expect_remote(s2, ErrorCode.UNEXPECTED).text


def test_client_receiving_before_its_hello_or_a_second_welcome():
    c = Connection(Role.CLIENT)
    c.receive_data(encode(Welcome(client_id=1, name="s")))
    expect_remote(c, ErrorCode.UNEXPECTED)
    c2, s2 = handshake()
    c2.receive_data(encode(Welcome(client_id=1, name="s")))
    expect_remote(c2, ErrorCode.UNEXPECTED)


def test_events_need_the_feature():
    c, s = handshake(client_features=0)
    assert c.features == 0
    ev = Event(vm_id=1, device_id="wdt", name="reset-request")
    with pytest.raises(LocalProtocolError, match="not negotiated"):
        s.send(ev)
    c.receive_data(encode(ev))
    assert "not negotiated" in expect_remote(c, ErrorCode.UNEXPECTED).text


def test_error_messages_are_events_in_every_live_state():
    refusal = Error(code=ErrorCode.DENIED, text="go away")
    s = Connection(Role.SERVER)
    s.receive_data(encode(Error(code=ErrorCode.INTERNAL, text="client gives up")))
    assert s.next_event() == Error(code=ErrorCode.INTERNAL, text="client gives up")
    assert s.state is State.AWAIT_HELLO
    # The server refuses a HELLO instead of welcoming it.
    c = Connection(Role.CLIENT)
    s = Connection(Role.SERVER)
    s.receive_data(c.send(Hello(name="h")))
    drain(s)
    c.receive_data(s.send(refusal))
    assert c.next_event() == refusal and c.state is State.AWAIT_WELCOME
    c.receive_data(b"")
    assert c.next_event() is CLOSED


# --------------------------------------------------------------- version mismatch


def hello_v2_payload() -> bytes:
    return le(2, 2) + le(1, 2) + le(4096, 4) + le(0, 4) + b"\x01\x04host" + b"v2-extra"


def test_version_mismatch_gives_a_readable_error_frame():
    c = Connection(Role.CLIENT)
    c.send(Hello(name="h"))  # stands in for the v2 client, to read the reply
    s = Connection(Role.SERVER)
    s.receive_data(frame(1, hello_v2_payload()))
    with pytest.raises(RemoteProtocolError) as ei:
        s.next_event()
    exc = ei.value
    assert exc.code is ErrorCode.VERSION_MISMATCH
    assert "2.1" in exc.text and "1.0" in exc.text
    assert s.state is State.ERROR
    reply = s.error_frame(exc)
    assert reply[:4] == b"RH\x06\x00"
    c.receive_data(reply)
    err = c.next_event()
    assert err == Error(code=ErrorCode.VERSION_MISMATCH, text=exc.text)


def test_client_rejects_a_welcome_of_another_major_version():
    c = Connection(Role.CLIENT)
    c.send(Hello(name="h"))
    c.receive_data(frame(2, le(3, 2) + le(0, 2) + le(4096, 4) + le(0, 4) + le(1, 4) + b"\x01s"))
    e = expect_remote(c, ErrorCode.VERSION_MISMATCH)
    assert "3.0" in e.text and "1.0" in e.text


# -------------------------------------------------------------------- error_frame


def test_error_frame_is_cut_to_what_the_peer_accepts():
    s = Connection(Role.SERVER)
    exc = RemoteProtocolError(ErrorCode.MALFORMED, "é" * 3000, request_id=9)
    data = s.error_frame(exc)
    assert len(data) - 8 <= PRE_HANDSHAKE_MAX_PAYLOAD
    err = decode_payload(6, data[8:])
    assert err.code is ErrorCode.MALFORMED and err.request_id == 9
    assert err.text == "é" * ((PRE_HANDSHAKE_MAX_PAYLOAD - 12) // 2)  # whole characters
    assert decode_payload(6, s.error_frame(exc, request_id=3)[8:]).request_id == 3


def test_error_frame_for_other_exceptions_hides_details():
    s = Connection(Role.SERVER)
    err = decode_payload(6, s.error_frame(KeyError("secret-path"))[8:])
    assert err.code is ErrorCode.INTERNAL
    assert "KeyError" in err.text and "secret" not in err.text


# ---------------------------------------------------------------------------- EOF


def test_eof_at_a_boundary_is_closed_and_stays_closed():
    c, s = handshake()
    s.receive_data(c.send(Ping(nonce=1)))
    s.receive_data(b"")
    assert s.next_event() == Ping(nonce=1)  # what arrived before EOF comes first
    assert s.next_event() is CLOSED
    assert s.next_event() is CLOSED and s.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        s.send(Pong(nonce=1))


def test_eof_mid_header_and_mid_payload():
    for cut in (1, 7, 9, 20):
        c, s = handshake()
        s.receive_data(c.send(CLIENT_MSGS[0])[:cut])
        assert s.next_event() is NEED_DATA
        s.receive_data(b"")
        e = expect_remote(s, ErrorCode.MALFORMED)
        assert e.text == "connection closed in the middle of a frame"


def test_data_after_eof_is_a_usage_error():
    c = Connection(Role.CLIENT)
    c.receive_data(b"")
    with pytest.raises(RuntimeError):
        c.receive_data(b"x")
