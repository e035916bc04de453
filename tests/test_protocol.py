"""Codec tests: layouts, round trips and validation of single messages."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remote_hw.protocol import (
    ABSOLUTE_MAX_PAYLOAD,
    HEADER_SIZE,
    MESSAGES,
    PRE_HANDSHAKE_MAX_PAYLOAD,
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
    LocalProtocolError,
    MsgType,
    Ping,
    Pong,
    ProtocolError,
    RemoteProtocolError,
    Role,
    Status,
    Welcome,
    codec,
    decode_feedback,
    decode_payload,
    encode,
    encode_feedback,
    encode_io_request,
)
from remote_hw.protocol import messages as m_

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
ID64 = "a" * 60 + "._-Z"  # the longest legal identifier, every special character

# One instance of every message type, plus a few edge variants.
SAMPLES = [
    Hello(name="host-1", max_payload=4096, features=3, role=Role.PEER, minor=7),
    Welcome(client_id=U32, name="srv.a", max_payload=PRE_HANDSHAKE_MAX_PAYLOAD, features=0),
    IoRequest(
        request_id=U64, vm_id=U32, client_id=5, offset=0x3F8, data=0x41,
        kind=AccessKind.PORT, size=1, direction=Direction.WRITE, hops=255,
        server_id="srv1", device_id="uart0",
    ),
    IoRequest(
        request_id=0, vm_id=0, offset=U64, data=U64, kind=AccessKind.MMIO, size=8,
        direction=Direction.READ, device_id=ID64, server_id=ID64,
    ),
    Feedback(request_id=9, vm_id=1, client_id=2, status=Status.OK, size=4, data=0xDEADBEEF),
    Feedback(request_id=10, vm_id=1, status=Status.TIMEOUT),
    Interrupt(vm_id=3, client_id=4, line=0xFFFF, level=1, device_id="uart0"),
    Error(request_id=77, code=ErrorCode.DENIED, text="nein — ça ne va pas ✓"),
    Error(code=ErrorCode.INTERNAL),
    Ping(nonce=U64),
    Pong(nonce=0),
    Attach(request_id=1, vm_id=2, client_id=3, server_id="", device_id="rtc"),
    Detach(request_id=U64, vm_id=U32, client_id=U32),
    Event(vm_id=1, client_id=2, device_id="wdt", name="reset-request"),
    m_.Resume(request_id=5, token=U64),
    m_.Origin(request_id=6, client_id=U32, name="alice"),
    m_.Post(request_id=U64 >> 1, vm_id=U32, offset=7, data=0xFF, kind=AccessKind.PORT,
            size=1, device_id="uart0"),
    m_.Shadow(vm_id=2, client_id=3, applied=U32, window=0xFFFF, posted=1 << 63,
              shadowed=0xFF << 56, values=U64, device_id="uart0"),
]

# The v1 layouts written out independently of the table in messages.py (from
# docs/protocol.md), so a mistake in the table cannot hide behind itself.
def le(v: int, n: int) -> bytes:
    return v.to_bytes(n, "little")


def expected_payload(m) -> bytes:
    if isinstance(m, Hello):
        return (le(m.major, 2) + le(m.minor, 2) + le(m.max_payload, 4) + le(m.features, 4)
                + le(m.role, 1) + le(len(m.name), 1) + m.name.encode())
    if isinstance(m, Welcome):
        return (le(m.major, 2) + le(m.minor, 2) + le(m.max_payload, 4) + le(m.features, 4)
                + le(m.client_id, 4) + le(len(m.name), 1) + m.name.encode())
    if isinstance(m, IoRequest):
        return (le(m.request_id, 8) + le(m.vm_id, 4) + le(m.client_id, 4) + le(m.offset, 8)
                + le(m.data, 8) + le(m.kind, 1) + le(m.size, 1) + le(m.direction, 1)
                + le(m.hops, 1) + le(len(m.server_id), 1) + le(len(m.device_id), 1)
                + m.server_id.encode() + m.device_id.encode())
    if isinstance(m, Feedback):
        return (le(m.request_id, 8) + le(m.vm_id, 4) + le(m.client_id, 4) + le(m.status, 2)
                + le(m.size, 1) + b"\0" + le(m.data, 8))
    if isinstance(m, Interrupt):
        return (le(m.vm_id, 4) + le(m.client_id, 4) + le(m.line, 2) + le(m.level, 1)
                + le(len(m.device_id), 1) + m.device_id.encode())
    if isinstance(m, Error):
        t = m.text.encode()
        return le(m.request_id, 8) + le(m.code, 2) + le(len(t), 2) + t
    if isinstance(m, (Ping, Pong)):
        return le(m.nonce, 8)
    if isinstance(m, Attach):
        return (le(m.request_id, 8) + le(m.vm_id, 4) + le(m.client_id, 4)
                + le(len(m.server_id), 1) + le(len(m.device_id), 1)
                + m.server_id.encode() + m.device_id.encode())
    if isinstance(m, Detach):
        return le(m.request_id, 8) + le(m.vm_id, 4) + le(m.client_id, 4)
    if isinstance(m, Event):
        return (le(m.vm_id, 4) + le(m.client_id, 4) + le(len(m.device_id), 1)
                + le(len(m.name), 1) + m.device_id.encode() + m.name.encode())
    if isinstance(m, m_.Resume):
        return le(m.request_id, 8) + le(m.token, 8)
    if isinstance(m, m_.Origin):
        return (le(m.request_id, 8) + le(m.client_id, 4) + le(len(m.name), 1)
                + m.name.encode())
    if isinstance(m, m_.Post):  # IO_REQUEST's layout
        return (le(m.request_id, 8) + le(m.vm_id, 4) + le(m.client_id, 4) + le(m.offset, 8)
                + le(m.data, 8) + le(m.kind, 1) + le(m.size, 1) + le(1, 1)
                + le(m.hops, 1) + le(len(m.server_id), 1) + le(len(m.device_id), 1)
                + m.server_id.encode() + m.device_id.encode())
    if isinstance(m, m_.Shadow):
        return (le(m.vm_id, 4) + le(m.client_id, 4) + le(m.applied, 4) + le(m.window, 2)
                + le(m.posted, 8) + le(m.shadowed, 8) + le(m.values, 8)
                + le(len(m.device_id), 1) + m.device_id.encode())
    raise AssertionError(m)


def frame(t: int, payload: bytes, *, flags: int = 0, magic: bytes = b"RH") -> bytes:
    return magic + bytes([t, flags]) + le(len(payload), 4) + payload


def ids(m) -> str:
    return type(m).__name__


def raises_remote(code: ErrorCode, t: int, payload: bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as ei:
        decode_payload(t, payload)
    assert ei.value.code is code, ei.value
    return ei.value


# ----------------------------------------------------------------------- layouts


def test_samples_cover_every_message_type():
    assert {type(m).MSG_TYPE for m in SAMPLES} == set(MsgType)
    assert set(MESSAGES) == set(MsgType)


def test_fixed_part_sizes_match_the_documented_layouts():
    sizes = {t: spec.fixed.size for t, spec in MESSAGES.items()}
    assert sizes == {
        MsgType.HELLO: 14, MsgType.WELCOME: 17, MsgType.IO_REQUEST: 38,
        MsgType.FEEDBACK: 28, MsgType.INTERRUPT: 12, MsgType.ERROR: 12,
        MsgType.PING: 8, MsgType.PONG: 8, MsgType.ATTACH: 18, MsgType.DETACH: 16,
        MsgType.EVENT: 10, MsgType.RESUME: 16, MsgType.ORIGIN: 13, MsgType.POST: 38,
        MsgType.SHADOW: 39,
    }


@pytest.mark.parametrize("m", SAMPLES, ids=ids)
def test_encode_matches_the_documented_bytes(m):
    payload = expected_payload(m)
    expected = b"RH" + bytes([type(m).MSG_TYPE, 0]) + le(len(payload), 4) + payload
    assert encode(m) == expected
    assert codec._encode_generic(m) == expected  # the table itself, not a fast path


@pytest.mark.parametrize("m", SAMPLES, ids=ids)
def test_round_trip_every_message(m):
    data = encode(m)
    magic, t, flags, length = struct.unpack_from("<2sBBI", data)
    assert (magic, t, flags, length) == (b"RH", type(m).MSG_TYPE, 0, len(data) - HEADER_SIZE)
    back = decode_payload(t, data[HEADER_SIZE:])
    assert back == m
    assert type(back) is type(m)
    # Also from a bytearray and a memoryview (what a receive buffer hands over).
    assert decode_payload(t, bytearray(data[HEADER_SIZE:])) == m
    assert decode_payload(t, memoryview(data)[HEADER_SIZE:]) == m


def test_decoded_enum_fields_are_enum_members():
    m = decode_payload(MsgType.IO_REQUEST, encode(SAMPLES[2])[HEADER_SIZE:])
    assert m.kind is AccessKind.PORT and m.direction is Direction.WRITE
    fb = decode_feedback(encode(SAMPLES[5])[HEADER_SIZE:])
    assert fb.status is Status.TIMEOUT
    h = decode_payload(MsgType.HELLO, encode(SAMPLES[0])[HEADER_SIZE:])
    assert h.role is Role.PEER
    e = decode_payload(MsgType.ERROR, encode(SAMPLES[7])[HEADER_SIZE:])
    assert e.code is ErrorCode.DENIED


def test_messages_are_frozen_and_hashable():
    m = SAMPLES[2]
    with pytest.raises(AttributeError):
        m.vm_id = 3  # type: ignore[misc]
    assert hash(m) == hash(decode_payload(3, encode(m)[8:]))


def test_plain_ints_encode_like_enum_members():
    a = IoRequest(request_id=1, vm_id=1, offset=0, kind=1, size=2, direction=0, device_id="d")
    b = IoRequest(request_id=1, vm_id=1, offset=0, kind=AccessKind.MMIO, size=2,
                  direction=Direction.READ, device_id="d")
    assert encode(a) == encode(b)


# ------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("m", SAMPLES, ids=ids)
def test_every_truncation_is_malformed(m):
    payload = encode(m)[HEADER_SIZE:]
    for n in range(len(payload)):
        raises_remote(ErrorCode.MALFORMED, type(m).MSG_TYPE, payload[:n])


@pytest.mark.parametrize("m", SAMPLES, ids=ids)
def test_trailing_garbage_is_malformed(m):
    payload = encode(m)[HEADER_SIZE:]
    e = raises_remote(ErrorCode.MALFORMED, type(m).MSG_TYPE, payload + b"x")
    assert type(m).MSG_TYPE.name in e.text


def test_string_lengths_that_do_not_consume_the_payload_are_named():
    p = bytearray(expected_payload(SAMPLES[2]))
    p[37] += 1  # device id length one too long: the strings overrun the payload
    e = raises_remote(ErrorCode.MALFORMED, 3, bytes(p))
    assert "device_id 6" in e.text and "server_id 4" in e.text


def test_a_post_must_be_a_write():
    post = m_.Post(request_id=1, vm_id=1, offset=0, data=0x41, kind=AccessKind.PORT, size=1,
                   device_id="uart0")
    payload = bytearray(encode(post)[HEADER_SIZE:])
    payload[34] = 0  # direction READ: a read cannot be posted, it needs its answer
    e = raises_remote(ErrorCode.MALFORMED, MsgType.POST, bytes(payload))
    assert "POST direction" in e.text
    with pytest.raises(LocalProtocolError):
        encode(m_.Post(request_id=1, vm_id=1, offset=0, kind=AccessKind.PORT, size=1,
                       direction=Direction.READ, device_id="uart0"))
    # The fast encoder validates like the generic one (a bad size is named).
    with pytest.raises(LocalProtocolError, match="size"):
        codec.encode_post(1, 1, 0, 0, 0x41, 0, 3, 0, "", "uart0")


def test_a_shadow_names_at_most_eight_registers():
    shadow = m_.Shadow(vm_id=1, shadowed=0xFF, values=U64, device_id="uart0")
    assert decode_payload(MsgType.SHADOW, encode(shadow)[HEADER_SIZE:]) == shadow
    payload = bytearray(encode(shadow)[HEADER_SIZE:])
    payload[22:30] = (0x1FF).to_bytes(8, "little")  # nine shadowed offsets
    e = raises_remote(ErrorCode.MALFORMED, MsgType.SHADOW, bytes(payload))
    assert "more than 8 registers" in e.text
    with pytest.raises(LocalProtocolError, match="more than 8"):
        encode(m_.Shadow(vm_id=1, shadowed=0x1FF, device_id="uart0"))


@pytest.mark.parametrize("t", [0, 16, 99, 255])
def test_unknown_type(t):
    e = raises_remote(ErrorCode.UNKNOWN_TYPE, t, b"")
    assert str(t) in e.text


def io_payload(**over) -> bytes:
    """An IO_REQUEST payload built by hand, so invalid values can be put in."""
    f = dict(request_id=5, vm_id=1, client_id=0, offset=0x10, data=0, kind=1, size=4,
             direction=0, hops=0, server_id=b"", device_id=b"uart0")
    f.update(over)
    return (le(f["request_id"], 8) + le(f["vm_id"], 4) + le(f["client_id"], 4)
            + le(f["offset"], 8) + le(f["data"], 8) + bytes([f["kind"], f["size"],
            f["direction"], f["hops"], len(f["server_id"]), len(f["device_id"])])
            + f["server_id"] + f["device_id"])


@pytest.mark.parametrize(
    "raw",
    [b"uart 0", b"uart/0", b"\xc3\xa9t\xc3\xa9", b"a\x00", b"a" * 65, b"tab\t", b"x:y"],
)
def test_bad_device_ids(raw):
    e = raises_remote(ErrorCode.BAD_ID, 3, io_payload(device_id=raw))
    assert "device_id" in e.text
    assert e.request_id == 5  # known by then, so an ERROR can point at the request


def test_empty_device_id_is_bad_but_empty_server_id_is_any_server():
    e = raises_remote(ErrorCode.BAD_ID, 3, io_payload(device_id=b""))
    assert "empty" in e.text and "device_id" in e.text
    m = decode_payload(3, io_payload(server_id=b""))
    assert m.server_id == "" and m.device_id == "uart0"
    raises_remote(ErrorCode.BAD_ID, 3, io_payload(server_id=b"bad id"))


def test_id_length_boundaries():
    assert decode_payload(3, io_payload(device_id=b"d" * 64)).device_id == "d" * 64
    raises_remote(ErrorCode.BAD_ID, 3, io_payload(device_id=b"d" * 65))


@pytest.mark.parametrize(
    "field, value",
    [("size", 0), ("size", 3), ("size", 16), ("direction", 2), ("kind", 2), ("kind", 255)],
)
def test_invalid_io_request_values(field, value):
    e = raises_remote(ErrorCode.MALFORMED, 3, io_payload(**{field: value}))
    assert f"IO_REQUEST {field}" in e.text and str(value) in e.text


@pytest.mark.parametrize("size, data", [(1, 0x100), (2, 0x10000), (4, 1 << 32)])
def test_data_must_fit_in_size(size, data):
    e = raises_remote(ErrorCode.MALFORMED, 3, io_payload(size=size, data=data))
    assert "data" in e.text
    assert decode_payload(3, io_payload(size=size, data=data - 1)).data == data - 1


def fb_payload(status=0, size=4, reserved=0, data=0) -> bytes:
    return le(1, 8) + le(2, 4) + le(3, 4) + le(status, 2) + bytes([size, reserved]) + le(data, 8)


def test_feedback_validation():
    assert decode_feedback(fb_payload(size=0)).size == 0  # ATTACH/DETACH replies
    for bad in (
        fb_payload(status=10),
        fb_payload(size=3),
        fb_payload(reserved=1),
        fb_payload(size=0, data=1),
        fb_payload(size=1, data=0x100),
        fb_payload() + b"\0",
        fb_payload()[:-1],
    ):
        with pytest.raises(RemoteProtocolError) as ei:
            decode_feedback(bad)
        assert ei.value.code is ErrorCode.MALFORMED
    with pytest.raises(RemoteProtocolError, match="reserved byte"):
        decode_feedback(fb_payload(reserved=1))


def test_other_enumerated_fields():
    # level, role, error code
    raises_remote(ErrorCode.MALFORMED, 5, le(1, 4) + le(0, 4) + le(4, 2) + b"\x02\x01u")
    hello = lambda role: le(1, 2) + le(0, 2) + le(4096, 4) + le(0, 4) + bytes([role, 1]) + b"h"
    raises_remote(ErrorCode.MALFORMED, 1, hello(0))
    raises_remote(ErrorCode.MALFORMED, 1, hello(3))  # Role.SERVER is never sent
    assert decode_payload(1, hello(2)).role is Role.PEER
    err = lambda code: le(0, 8) + le(code, 2) + le(0, 2)
    raises_remote(ErrorCode.MALFORMED, 6, err(0))
    raises_remote(ErrorCode.MALFORMED, 6, err(9))
    assert decode_payload(6, err(8)).code is ErrorCode.INTERNAL


def test_error_text_must_be_utf8():
    e = raises_remote(ErrorCode.MALFORMED, 6, le(0, 8) + le(1, 2) + le(3, 2) + b"a\xff\xfe")
    assert "UTF-8" in e.text and "ERROR text" in e.text
    # A multi-byte character cut in half is invalid too.
    raises_remote(ErrorCode.MALFORMED, 6, le(0, 8) + le(1, 2) + le(1, 2) + "é".encode()[:1])


@pytest.mark.parametrize("t", [MsgType.HELLO, MsgType.WELCOME])
def test_max_payload_bounds(t):
    def payload(mp: int) -> bytes:
        middle = le(0, 4) + (bytes([1]) if t == MsgType.HELLO else le(1, 4))
        return le(1, 2) + le(0, 2) + le(mp, 4) + middle + b"\x01n"

    assert decode_payload(t, payload(PRE_HANDSHAKE_MAX_PAYLOAD)).max_payload == 1024
    assert decode_payload(t, payload(ABSOLUTE_MAX_PAYLOAD)).max_payload == 1 << 20
    for bad in (0, PRE_HANDSHAKE_MAX_PAYLOAD - 1, ABSOLUTE_MAX_PAYLOAD + 1, U32):
        e = raises_remote(ErrorCode.MALFORMED, t, payload(bad))
        assert "max_payload" in e.text


def test_bad_names_in_hello_welcome_event():
    h = le(1, 2) + le(0, 2) + le(4096, 4) + le(0, 4) + b"\x01\x00"
    assert "HELLO name" in raises_remote(ErrorCode.BAD_ID, 1, h).text
    ev = le(1, 4) + le(0, 4) + b"\x03\x06" + b"wdtre set"
    assert "EVENT name" in raises_remote(ErrorCode.BAD_ID, 11, ev).text


@pytest.mark.parametrize("t", [MsgType.HELLO, MsgType.WELCOME])
def test_version_mismatch_names_both_versions(t):
    good = encode(SAMPLES[0] if t == MsgType.HELLO else SAMPLES[1])[HEADER_SIZE:]
    e = raises_remote(ErrorCode.VERSION_MISMATCH, t, le(2, 2) + le(3, 2) + good[4:])
    assert "2.3" in e.text and "1.0" in e.text
    # Checked before the layout: a v2 HELLO may be shaped differently.
    e = raises_remote(ErrorCode.VERSION_MISMATCH, t, le(2, 2) + le(0, 2))
    assert "2.0" in e.text


# --------------------------------------------------------------------------- encode


def test_encode_rejects_invalid_fields_with_named_errors():
    base = dict(request_id=1, vm_id=1, offset=0, kind=0, size=1, direction=0, device_id="d")
    cases = [
        (dict(device_id=""), ErrorCode.BAD_ID, "device_id"),
        (dict(device_id="a b"), ErrorCode.BAD_ID, "device_id"),
        (dict(device_id="é"), ErrorCode.BAD_ID, "device_id"),
        (dict(device_id="x" * 65), ErrorCode.BAD_ID, "device_id"),
        (dict(device_id=b"bytes"), ErrorCode.BAD_ID, "device_id"),
        (dict(server_id="no/slash"), ErrorCode.BAD_ID, "server_id"),
        (dict(size=3), ErrorCode.MALFORMED, "size"),
        (dict(kind=2), ErrorCode.MALFORMED, "kind"),
        (dict(direction=-1), ErrorCode.MALFORMED, "direction"),
        (dict(data=0x100), ErrorCode.MALFORMED, "data"),
        (dict(data=-1), ErrorCode.MALFORMED, "data"),
        (dict(vm_id=-1), ErrorCode.MALFORMED, "vm_id"),
        (dict(vm_id=1 << 32), ErrorCode.MALFORMED, "vm_id"),
        (dict(request_id=1 << 64), ErrorCode.MALFORMED, "request_id"),
        (dict(offset=1.5), ErrorCode.MALFORMED, "offset"),
        (dict(hops=256), ErrorCode.MALFORMED, "hops"),
    ]
    for over, code, field in cases:
        kw = {**base, **over}
        with pytest.raises(LocalProtocolError) as ei:
            codec._encode_generic(IoRequest(**kw))
        assert ei.value.code is code, (over, ei.value)
        assert f"IO_REQUEST {field}" in ei.value.text, (over, ei.value)
        # The public encoder and the plain-value fast path give the very same error.
        with pytest.raises(LocalProtocolError) as public:
            encode(IoRequest(**kw))
        assert (public.value.code, public.value.text) == (ei.value.code, ei.value.text)
        with pytest.raises(LocalProtocolError) as fast:
            encode_io_request(kw["request_id"], kw["vm_id"], 0, kw["offset"],
                              kw.get("data", 0), kw["kind"], kw["size"], kw["direction"],
                              kw.get("hops", 0), kw.get("server_id", ""), kw["device_id"])
        assert (fast.value.code, fast.value.text) == (ei.value.code, ei.value.text)


def test_encode_other_messages_validation():
    with pytest.raises(LocalProtocolError) as ei:
        encode(Error(code=ErrorCode.MALFORMED, text="x" * 70000))
    assert ei.value.code is ErrorCode.OVERSIZED and "ERROR text" in ei.value.text
    with pytest.raises(LocalProtocolError) as ei:
        encode(Hello(name="h", major=2))
    assert ei.value.code is ErrorCode.VERSION_MISMATCH
    with pytest.raises(LocalProtocolError, match="max_payload"):
        encode(Welcome(client_id=1, name="s", max_payload=100))
    with pytest.raises(LocalProtocolError, match="HELLO name"):
        encode(Hello(name=""))
    with pytest.raises(LocalProtocolError, match="HELLO role"):
        encode(Hello(name="h", role=Role.SERVER))
    with pytest.raises(LocalProtocolError, match="INTERRUPT level"):
        encode(Interrupt(vm_id=1, line=1, level=2, device_id="d"))
    with pytest.raises(LocalProtocolError, match="FEEDBACK status"):
        encode(Feedback(request_id=1, vm_id=1, status=42))
    with pytest.raises(LocalProtocolError, match="ERROR text"):
        encode(Error(code=1, text="\udc80"))  # lone surrogate
    with pytest.raises(LocalProtocolError, match="ERROR code"):
        encode(Error(code=99))
    with pytest.raises(TypeError):
        encode(object())  # type: ignore[arg-type]


def test_encode_feedback_fast_path_errors_match():
    for args in [(1, 1, 0, 99, 1, 0), (1, 1, 0, 0, 3, 0), (1, 1, 0, 0, 1, 256),
                 (-1, 1, 0, 0, 1, 0)]:
        with pytest.raises(LocalProtocolError) as fast:
            encode_feedback(*args)
        with pytest.raises(LocalProtocolError) as slow:
            codec._encode_generic(Feedback(request_id=args[0], vm_id=args[1], client_id=args[2],
                            status=args[3], size=args[4], data=args[5]))
        assert (fast.value.code, fast.value.text) == (slow.value.code, slow.value.text)


def test_protocol_error_str_and_hierarchy():
    e = RemoteProtocolError(ErrorCode.BAD_ID, "IO_REQUEST device_id: nope", 4)
    assert str(e) == "BAD_ID: IO_REQUEST device_id: nope"
    assert isinstance(e, ProtocolError) and e.request_id == 4
    assert issubclass(LocalProtocolError, ProtocolError)
    assert LocalProtocolError(2, "x").code is ErrorCode.OVERSIZED


# ------------------------------------------------- fast paths agree with the table


ident = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=64)
sizes = st.sampled_from([1, 2, 4, 8])


@st.composite
def io_requests(draw):
    size = draw(sizes)
    return IoRequest(
        request_id=draw(st.integers(0, U64)), vm_id=draw(st.integers(0, U32)),
        client_id=draw(st.integers(0, U32)), offset=draw(st.integers(0, U64)),
        data=draw(st.integers(0, (1 << (8 * size)) - 1)),
        kind=draw(st.sampled_from(AccessKind)), size=size,
        direction=draw(st.sampled_from(Direction)), hops=draw(st.integers(0, 255)),
        server_id=draw(st.one_of(st.just(""), ident)), device_id=draw(ident),
    )


@settings(max_examples=200, deadline=None)
@given(io_requests())
def test_io_request_fast_paths_agree_with_generic(m):
    data = encode(m)
    assert data == encode_io_request(
        m.request_id, m.vm_id, m.client_id, m.offset, m.data, m.kind, m.size,
        m.direction, m.hops, m.server_id, m.device_id,
    )
    assert data == encode_io_request(  # second call: identifiers now cached
        m.request_id, m.vm_id, m.client_id, m.offset, m.data, m.kind, m.size,
        m.direction, m.hops, m.server_id, m.device_id,
    )
    assert data == codec._encode_generic(m)
    assert decode_payload(3, data[8:]) == m
    assert codec._decode_generic(codec._PLANS[3], data, 8, len(data)) == m


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, U64), st.integers(0, U32), st.integers(0, U32),
    st.sampled_from(Status), st.sampled_from([0, 1, 2, 4, 8]), st.data(),
)
def test_feedback_fast_paths_agree_with_generic(rid, vm, cid, status, size, data):
    value = data.draw(st.integers(0, (1 << (8 * size)) - 1))
    m = Feedback(request_id=rid, vm_id=vm, client_id=cid, status=status, size=size, data=value)
    raw = encode(m)
    assert raw == encode_feedback(rid, vm, cid, status, size, value) == codec._encode_generic(m)
    assert decode_feedback(raw[8:]) == m == decode_payload(4, raw[8:])


def outcome(fn):
    try:
        return ("ok", fn())
    except RemoteProtocolError as e:
        return ("err", e.code, e.text)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=20, max_size=30), st.binary(min_size=30, max_size=60))
def test_fast_decoders_agree_with_generic_on_arbitrary_bytes(fb, io):
    # Bias towards almost-valid payloads so the fast paths' accept branch is hit too.
    fb = fb_payload(status=fb[0] % 11, size=fb[1] % 9, data=fb[2] % 300)[: len(fb)] + fb[28:]
    for t, p in ((4, fb), (3, io), (3, io_payload(device_id=io[:6], size=io[0] % 9))):
        plan = codec._PLANS[t]
        assert outcome(lambda t=t, p=p: decode_payload(t, p)) == outcome(
            lambda plan=plan, p=p: codec._decode_generic(plan, p, 0, len(p))
        )


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 13), st.binary(max_size=80))
def test_arbitrary_payloads_only_raise_remote_protocol_error(t, payload):
    try:
        m = decode_payload(t, payload)
    except RemoteProtocolError:
        return
    assert encode(m)[HEADER_SIZE:] == payload  # anything accepted re-encodes exactly


@settings(max_examples=200, deadline=None)
@given(st.integers(0, U32), st.lists(st.integers(0, U32), min_size=1, max_size=20),
       st.integers(0, 0xFFFF), st.integers(0, 1), ident)
def test_interrupts_fast_path_agrees_with_one_encode_per_vm(cid, vms, line, level, dev):
    """A line change fanned out to several VMs (encode_interrupts) is exactly the
    frames encode() makes for each VM, in order, and each decodes back."""
    from remote_hw.protocol.codec import encode_interrupts
    frames = [encode(m_.Interrupt(vm_id=vm, client_id=cid, line=line, level=level,
                                  device_id=dev)) for vm in vms]
    joined = encode_interrupts(cid, vms, line, level, dev)
    assert joined == b"".join(frames)
    assert encode_interrupts(cid, tuple(vms), line, level, dev) == joined  # ids cached


def test_interrupts_fast_path_names_a_bad_value_as_encode_does():
    from remote_hw.protocol.codec import encode_interrupts
    with pytest.raises(LocalProtocolError) as fast:
        encode_interrupts(1, [1, 2], 0x1_0000, 1, "uart0")     # line beyond u16
    with pytest.raises(LocalProtocolError) as ref:
        encode(m_.Interrupt(vm_id=1, client_id=1, line=0x1_0000, level=1, device_id="uart0"))
    assert fast.value.code == ref.value.code and str(fast.value) == str(ref.value)
    with pytest.raises(LocalProtocolError):
        encode_interrupts(1, [1], 0, 2, "uart0")               # level is 0 or 1
