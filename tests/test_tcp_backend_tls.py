"""The tcp backend with mutual TLS (``tls=DIR``), on real sockets: who can type into a
VM. A peer with a certificate of the backend's CA types into the guest and reads its
output; one without a certificate, with one of another CA, outside ``allow=`` or
speaking plain TCP is refused with one log line, and the backend (and the server)
keeps serving the next peer."""

from __future__ import annotations

import logging
import queue
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from remote_hw.backends import tcp as tcp_mod
from remote_hw.backends.base import BackendError
from remote_hw.backends.registry import check_backend, open_backend
from remote_hw.backends.tcp import TcpBackend
from remote_hw.net import security

from helpers import RawClient, backend_port, make_keys, read_until, start_server, wait_until

WAIT = 5.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """The platform's CA with a server certificate ``a`` and clients ``alice`` and
    ``bob``; and, in ``other/``, another CA with its own ``alice``."""
    d = tmp_path_factory.mktemp("keys")
    make_keys(d, ["a"], ["alice", "bob"])
    make_keys(d / "other", [], ["alice"])
    return d


def _client_ctx(directory: Path, name: str | None, server_ca: Path | None = None
                ) -> ssl.SSLContext:
    """A person's TLS client: presents ``name``'s certificate of ``directory`` (none
    if None) and checks the backend's against ``ca.pem`` of ``server_ca`` (default:
    ``directory``; both CAs are called "remote-hw CA", so only one is loaded)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations((server_ca or directory) / "ca.pem")
    if name is not None:
        ctx.load_cert_chain(directory / f"{name}.pem", directory / f"{name}.key")
    return ctx


def _tls_connect(port: int, directory: Path, name: str | None,
                 server_ca: Path | None = None) -> ssl.SSLSocket:
    ctx = _client_ctx(directory, name, server_ca)
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return ctx.wrap_socket(raw, server_hostname="a")


def _refused(s: ssl.SSLSocket) -> bytes:
    """Read until the backend closes; fail if it keeps the connection. In TLS 1.3 the
    client's handshake ends before the server has checked its certificate, so the
    refusal shows at the first read (an alert, or the end of the stream)."""
    got = b""
    s.settimeout(WAIT)
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return got
            got += chunk
    except ssl.SSLError as e:
        return got + f"<{e.reason}>".encode()
    except (ConnectionResetError, BrokenPipeError):
        return got + b"<reset>"


@pytest.fixture
def tls_backend(keys):
    made: list[TcpBackend] = []
    received: queue.Queue[bytes] = queue.Queue()

    def make(options: str = "") -> TcpBackend:
        b = open_backend(f"tcp:127.0.0.1:0,tls={keys}{options}", "uart0")
        assert isinstance(b, TcpBackend)
        made.append(b)
        b.start(received.put)
        return b

    make.received = received  # type: ignore[attr-defined]
    yield make
    for b in made:
        b.close()


def _typed(received: queue.Queue[bytes], n: int, timeout: float = WAIT) -> bytes:
    """What reached the guest: ``n`` bytes, or less after ``timeout``."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        try:
            got += received.get(timeout=0.1)
        except queue.Empty:
            pass
    return got


def test_a_certificate_of_the_ca_types_and_reads_both_ways(tls_backend, keys, caplog):
    caplog.set_level(logging.INFO, logger="remote_hw.backends.tcp")
    b = tls_backend()
    assert b.describe().endswith("(tls a)")
    b.from_guest(b"banner\r\n")                 # printed before anyone came: held
    s = _tls_connect(b.address[1], keys, "alice")
    assert read_until(s, b"banner\r\n") == b"banner\r\n"
    assert s.version() == "TLSv1.3"
    assert s.getpeercert()["subject"][0][0] == ("commonName", "a")  # the server's
    s.sendall(b"typed")
    assert _typed(tls_backend.received, 5) == b"typed"
    b.from_guest(b"x" * 100_000)                # more than one TLS record
    assert read_until(s, b"x" * 100_000).count(b"x") == 100_000
    assert b.status()["peer_name"] == "alice" and b.status()["tls"]
    assert "connected with certificate 'alice'" in caplog.text
    s.close()


def test_strangers_are_refused_and_the_next_peer_is_served(tls_backend, keys, caplog):
    b = tls_backend()
    port = b.address[1]
    # No client certificate: OpenSSL's alert says so on the peer's side too.
    nocert = _tls_connect(port, keys, None)
    assert b"<TLSV13_ALERT_CERTIFICATE_REQUIRED>" in _refused(nocert)
    # A certificate from another CA (the person trusts the backend's CA, though).
    other = _tls_connect(port, keys / "other", "alice", server_ca=keys)
    assert b"<" in _refused(other)
    # Plain TCP: told in plain text what the port needs.
    plain = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    plain.sendall(b"let me in\r\n")
    assert b"needs TLS with a client certificate" in read_until(plain, b"\r\n")
    plain.close()
    wait_until(lambda: b.peers_rejected == 3, "three refusals")
    assert "presented no client certificate" in caplog.text
    assert "its certificate is not from this backend's CA" in caplog.text
    assert "it speaks plain TCP, not TLS" in caplog.text
    assert _typed(tls_backend.received, 1, timeout=0.3) == b""   # none reached the guest
    # ... and the backend goes on serving.
    ok = _tls_connect(port, keys, "bob")
    ok.sendall(b"k")
    assert _typed(tls_backend.received, 1) == b"k"
    ok.close()


def test_a_silent_peer_is_closed_at_the_deadline(tls_backend, keys, monkeypatch, caplog):
    monkeypatch.setattr(tcp_mod, "TLS_HANDSHAKE_TIMEOUT", 0.5)
    b = tls_backend()
    silent = socket.create_connection(("127.0.0.1", b.address[1]), timeout=WAIT)
    t0 = time.monotonic()
    assert b"needs TLS" in read_until(silent, b"\r\n")   # it sent nothing: plain, likely
    assert silent.recv(100) == b"" and time.monotonic() - t0 < 3
    assert "no TLS handshake within 0.5 s" in caplog.text
    ok = _tls_connect(b.address[1], keys, "alice")
    ok.sendall(b"z")
    assert _typed(tls_backend.received, 1) == b"z"


def test_allow_narrows_to_named_certificates(tls_backend, keys, caplog):
    b = tls_backend(",allow=bob")
    assert "allow=bob" in b.describe()
    alice = _tls_connect(b.address[1], keys, "alice")
    assert b"certificate alice may not use uart0" in _refused(alice)
    assert "certificate 'alice' is not in allow=bob" in caplog.text
    bob = _tls_connect(b.address[1], keys, "bob")
    bob.sendall(b"b")
    assert _typed(tls_backend.received, 1) == b"b"


def test_a_token_too_is_read_inside_tls(tls_backend, keys, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    b = tls_backend(f",token={token}")
    assert b.describe().endswith("(tls a, token)")
    wrong = _tls_connect(b.address[1], keys, "alice")
    wrong.sendall(b"guess\n")
    assert b"wrong token" in _refused(wrong)
    right = _tls_connect(b.address[1], keys, "alice")
    right.sendall(b"s3cret\nhi")
    assert _typed(tls_backend.received, 2) == b"hi"


def test_busy_closes_a_second_peer_before_its_handshake(tls_backend, keys):
    b = tls_backend()
    first = _tls_connect(b.address[1], keys, "alice")
    first.sendall(b"1")
    assert _typed(tls_backend.received, 1) == b"1"
    with pytest.raises((ssl.SSLError, OSError)):
        second = _tls_connect(b.address[1], keys, "bob")
        if second.recv(10) == b"":
            raise OSError("closed")
    first.sendall(b"2")                                 # the first one is still served
    assert _typed(tls_backend.received, 1) == b"2"


def test_options_and_key_material_are_checked(keys, tmp_path):
    with pytest.raises(BackendError, match="tls-name= needs tls=DIR"):
        check_backend("tcp:0,tls-name=a")
    with pytest.raises(BackendError, match="no ca.pem"):
        check_backend(f"tcp:0,tls={tmp_path}")
    with pytest.raises(BackendError, match="alice.pem is a client certificate"):
        check_backend(f"tcp:0,tls={keys},tls-name=alice")
    with pytest.raises(BackendError, match="no server certificate there"):
        check_backend(f"tcp:0,tls={keys / 'other'}")
    two = make_keys(tmp_path / "two", ["a", "b"])
    with pytest.raises(BackendError, match=r"several server certificates \(a, b\)"):
        check_backend(f"tcp:0,tls={two}")
    check_backend(f"tcp:0,tls={two},tls-name=b")
    with pytest.raises(BackendError, match="allow= needs certificate names"):
        check_backend(f"tcp:0,tls={keys},allow=")


def test_no_warning_for_an_address_with_tls(keys, caplog):
    b = open_backend(f"tcp:0.0.0.0:0,tls={keys}", "u")
    b.close()
    assert "anyone who can reach" not in caplog.text


# ------------------------------------------------------------------ a real server

def test_server_uart_over_tls_and_strangers_refused(keys):
    """``remote-hw server --device u=uart16550,backend=tcp:...,tls=DIR``: a person with
    a client certificate types into the UART and reads the guest's output; one
    without a certificate, with another CA's or in plain TCP is refused with a log
    line, and the server keeps serving the VM and the next person."""
    proc, port = start_server(f"u=uart16550,backend=tcp:127.0.0.1:0,tls={keys}")
    try:
        c = RawClient(port, name="vm")
        assert c.attach(1, "u").status == 0
        bport = backend_port(proc, "u")
        for tx in b"hi":
            c.io(1, "u", 0, write=True, data=tx)        # guest output before anyone came
        assert b"TLSV13_ALERT_CERTIFICATE_REQUIRED" in _refused(
            _tls_connect(bport, keys, None))
        proc.wait_for("refused: TLS handshake failed: it presented no client certificate")
        assert b"<" in _refused(_tls_connect(bport, keys / "other", "alice", keys))
        proc.wait_for("its certificate is not from this backend's CA")
        plain = socket.create_connection(("127.0.0.1", bport), timeout=WAIT)
        plain.sendall(b"typed in plain\r\n")
        assert b"needs TLS" in read_until(plain, b"\r\n")
        plain.close()
        proc.wait_for("it speaks plain TCP, not TLS")
        assert c.io(1, "u", 5).data & 0x01 == 0           # LSR: nothing received
        person = _tls_connect(bport, keys, "alice")
        assert b"hi" in read_until(person, b"hi")
        person.sendall(b"k")
        wait_until(lambda: c.io(1, "u", 5).data & 0x01, "the byte to reach the guest")
        assert c.io(1, "u", 0).data == ord("k")
        c.io(1, "u", 0, write=True, data=ord("!"))
        assert read_until(person, b"!")
        proc.wait_for("connected with certificate 'alice'")
        person.close()
        assert c.io(1, "u", 7).status == 0               # the server still serves
    finally:
        proc.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_openssl_s_client_types_into_the_guest(keys):
    """What docs/limits.md tells a person to run: ``openssl s_client`` with the
    certificate ``remote-hw keys issue`` made."""
    proc, port = start_server(f"u=uart16550,backend=tcp:127.0.0.1:0,tls={keys}")
    client = None
    try:
        c = RawClient(port, name="vm")
        assert c.attach(1, "u").status == 0
        bport = backend_port(proc, "u")
        client = subprocess.Popen(
            ["openssl", "s_client", "-quiet", "-verify_return_error",
             "-connect", f"127.0.0.1:{bport}", "-CAfile", str(keys / "ca.pem"),
             "-cert", str(keys / "alice.pem"), "-key", str(keys / "alice.key")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert client.stdin is not None and client.stdout is not None
        proc.wait_for("connected with certificate 'alice'")
        client.stdin.write(b"q\n")
        client.stdin.flush()
        wait_until(lambda: c.io(1, "u", 5).data & 0x01, "the byte to reach the guest")
        assert c.io(1, "u", 0).data == ord("q")
        for tx in b"ok!":
            c.io(1, "u", 0, write=True, data=tx)
        assert client.stdout.read(3) == b"ok!"
    finally:
        if client is not None:
            client.kill()
            client.wait()
        proc.stop()


def test_keys_issue_makes_what_the_backend_takes(tmp_path):
    """``remote-hw keys`` as a person would run it: init, a server certificate for
    the backend, a client one for the person."""
    from helpers import remote_hw_cmd
    for argv in (["keys", "init", str(tmp_path)],
                 ["keys", "issue", str(tmp_path), "srv", "--role", "server"],
                 ["keys", "issue", str(tmp_path), "carol", "--role", "client"]):
        subprocess.run(remote_hw_cmd(*argv), check=True, capture_output=True, timeout=60)
    b = open_backend(f"tcp:127.0.0.1:0,tls={tmp_path}", "u")
    try:
        got: queue.Queue[bytes] = queue.Queue()
        b.start(got.put)
        s = _tls_connect(b.address[1], tmp_path, "carol")  # type: ignore[attr-defined]
        s.sendall(b"c")
        assert _typed(got, 1) == b"c"
        assert security.TlsConfig(tmp_path, "carol")  # the layout --tls-dir reads
    finally:
        b.close()
