"""Authenticated connections: mutual TLS, identities, peers, access control."""

from __future__ import annotations

import logging
import socket
import ssl
import time

import pytest

from remote_hw.cli import main
from remote_hw.config import DeviceSpec
from remote_hw.net import security
from remote_hw.net.link import LinkError, ServerLink
from remote_hw.net.security import TlsConfig
from remote_hw.protocol import NEED_DATA, Connection, Role
from remote_hw.protocol import messages as m
from remote_hw.protocol.messages import AccessKind, Direction, Status
from remote_hw.server.controller import Controller
from remote_hw.server.directory import StaticDirectory
from remote_hw.server.listener import Server

R, W, PORT = Direction.READ, Direction.WRITE, AccessKind.PORT


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    security.init_ca(d)
    for name, role in [("a", "server"), ("b", "server"), ("c1", "client"),
                       ("c2", "client")]:
        security.issue(d, name, role)
    evil = tmp_path_factory.mktemp("evil")  # another CA: its certificates are strangers
    security.init_ca(evil)
    security.issue(evil, "b", "server")
    security.issue(evil, "c1", "client")
    return d, evil


@pytest.fixture
def server(keys, caplog):
    caplog.set_level(logging.INFO, logger="remote_hw")
    d, _ = keys
    ctl = Controller("a", [DeviceSpec("uart0", "uart16550"), DeviceSpec("secret", "uart16550")])
    srv = Server(ctl, "127.0.0.1", 0, tls=TlsConfig(d, "a"),
                 acl={"secret": {"c1"}}).start()
    yield srv
    srv.stop()


def logged(caplog, text: str, timeout: float = 5.0) -> bool:
    """Server threads log a moment after the client sees the refusal."""
    deadline = time.monotonic() + timeout
    while text not in caplog.text:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def client(keys_dir, name, srv, **kw) -> ServerLink:
    return ServerLink("a", srv.address, client_name=name, tls=TlsConfig(keys_dir, name),
                      **kw).connect()


def test_tls_client_works_and_is_named_by_its_certificate(keys, server, caplog):
    d, _ = keys
    link = client(d, "c1", server)
    try:
        assert link.peer == security.Identity("a", "server")
        assert link.attach(1, "uart0") == Status.OK
        assert link.io(1, "uart0", PORT, 7, 1, W, 0x42)[0] == Status.OK
        assert link.io(1, "uart0", PORT, 7, 1, R) == (Status.OK, 0x42)
        assert logged(caplog, "client 1 (c1, TLS) connected")
    finally:
        link.close()


def test_unauthenticated_connection_is_refused_and_logged(server, caplog):
    sock = socket.create_connection(server.address, timeout=5)
    conn = Connection(Role.CLIENT)
    sock.sendall(conn.send(m.Hello(name="plain")))
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        pass
    sock.close()
    assert m.MAGIC not in data  # never a protocol answer to an unauthenticated peer
    assert logged(caplog, "refused: TLS handshake failed")


def test_unknown_peer_is_refused_and_logged(keys, server, caplog):
    _, evil = keys
    with pytest.raises(LinkError, match="TLS handshake failed"):
        ServerLink("a", server.address, client_name="c1", tls=TlsConfig(evil, "c1")).connect()
    assert logged(caplog, "refused: TLS handshake failed")


def test_client_cannot_pose_as_a_server_peer(keys, server, caplog):
    d, _ = keys
    with pytest.raises(LinkError, match="peer"):
        ServerLink("a", server.address, client_name="c1", tls=TlsConfig(d, "c1"),
                   role=Role.PEER).connect()
    assert logged(caplog, "asked to be a server peer")


def test_hello_name_must_match_the_certificate(keys, server, caplog):
    d, _ = keys
    with pytest.raises(LinkError, match="certificate is 'c1'"):
        ServerLink("a", server.address, client_name="c2", tls=TlsConfig(d, "c1")).connect()
    assert logged(caplog, "HELLO names 'c2'")


def test_client_is_checked_as_server_too(keys, server):
    """A client refuses a 'server' whose certificate is a client's."""
    d, _ = keys
    fake = Server(Controller("c2", []), "127.0.0.1", 0, tls=TlsConfig(d, "c2")).start()
    try:
        # OpenSSL already refuses a client certificate as a server (no serverAuth usage).
        with pytest.raises(LinkError, match="unsuitable certificate purpose|not a server's"):
            ServerLink("x", fake.address, client_name="c1", tls=TlsConfig(d, "c1")).connect()
    finally:
        fake.stop()


def _raw_tls(keys_dir, name, srv):
    ctx = TlsConfig(keys_dir, name).client_context()
    sock = ctx.wrap_socket(socket.create_connection(srv.address, timeout=5))
    conn = Connection(Role.CLIENT)

    def roundtrip(msg):
        sock.sendall(conn.send(msg))
        while True:
            ev = conn.next_event()
            if isinstance(ev, (m.Welcome, m.Feedback, m.Error)):
                return ev
            if ev is NEED_DATA:  # other events (interrupts) may share a read: drain first
                conn.receive_data(sock.recv(4096))
    return sock, roundtrip


def test_presenting_another_clients_id_is_refused(keys, server, caplog):
    d, _ = keys
    victim = client(d, "c1", server)
    try:
        assert victim.attach(1, "uart0") == Status.OK
        assert victim.io(1, "uart0", PORT, 7, 1, W, 0x11)[0] == Status.OK
        sock, rt = _raw_tls(d, "c2", server)
        welcome = rt(m.Hello(name="c2"))
        assert welcome.client_id != victim.client_id
        fb = rt(m.IoRequest(request_id=1, vm_id=1, client_id=victim.client_id, offset=7,
                            kind=PORT, size=1, direction=W, data=0x66, device_id="uart0"))
        assert fb.status == Status.DENIED
        fb = rt(m.Attach(request_id=2, vm_id=1, client_id=victim.client_id,
                         device_id="uart0"))
        assert fb.status == Status.DENIED
        assert logged(caplog, "claiming to be client")
        sock.close()
        assert victim.io(1, "uart0", PORT, 7, 1, R) == (Status.OK, 0x11)
    finally:
        victim.close()


def test_forged_vm_id_is_refused_and_logged(keys, server, caplog):
    d, _ = keys
    victim = client(d, "c1", server)
    mallory = client(d, "c2", server)
    try:
        assert victim.attach(7, "uart0") == Status.OK
        # c2 names c1's VM id: on the server it is c2's own (unattached) VM 7
        assert mallory.io(7, "uart0", PORT, 7, 1, W, 0x99)[0] == Status.NOT_ATTACHED
        assert logged(caplog, "which it has not attached")
        assert victim.io(7, "uart0", PORT, 7, 1, R) == (Status.OK, 0x00)
    finally:
        victim.close()
        mallory.close()


def test_access_control_lists(keys, server, caplog):
    d, _ = keys
    c1, c2 = client(d, "c1", server), client(d, "c2", server)
    try:
        assert c1.attach(1, "secret") == Status.OK
        assert c2.attach(1, "secret") == Status.DENIED
        assert c2.io(1, "secret", PORT, 5, 1, R)[0] == Status.NOT_ATTACHED
        assert logged(caplog, "c2 may not use device secret")
        assert c2.attach(1, "uart0") == Status.OK  # no list: any authenticated client
    finally:
        c1.close()
        c2.close()


def test_forwarding_between_tls_servers(keys):
    d, evil = keys
    b = Server(Controller("b", [DeviceSpec("uart0", "uart16550")]), "127.0.0.1", 0,
               tls=TlsConfig(d, "b")).start()
    a = Server(Controller("a", []), "127.0.0.1", 0, tls=TlsConfig(d, "a"),
               directory=StaticDirectory({"b": b.address}, {"uart0": "b"})).start()
    link = client(d, "c1", a)
    try:
        assert link.attach(1, "uart0") == Status.OK
        assert link.io(1, "uart0", PORT, 5, 1, R) == (Status.OK, 0x60)
        (peer,) = [s for s in b.sessions() if s.is_peer]
        assert peer.identity == security.Identity("a", "server")
    finally:
        link.close()
        a.stop()
        b.stop()
    # a server presenting a certificate from another CA is not trusted as peer b
    rogue = Server(Controller("b", [DeviceSpec("uart0", "uart16550")]), "127.0.0.1", 0,
                   tls=TlsConfig(evil, "b")).start()
    a = Server(Controller("a", []), "127.0.0.1", 0, tls=TlsConfig(d, "a"),
               directory=StaticDirectory({"b": rogue.address}, {"uart0": "b"})).start()
    link = client(d, "c1", a)
    try:
        assert link.attach(1, "uart0") == Status.UNREACHABLE
    finally:
        link.close()
        a.stop()
        rogue.stop()


def test_acl_without_tls_is_a_configuration_error():
    with pytest.raises(ValueError, match="needs TLS"):
        Server(Controller("a", [DeviceSpec("u", "uart16550")]), "127.0.0.1", 0,
               acl={"u": {"c1"}})


def test_keys_command(tmp_path, capsys):
    assert main(["keys", "init", str(tmp_path)]) == 0
    assert (tmp_path / "ca.pem").exists() and (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    assert main(["keys", "init", str(tmp_path)]) == 2  # never replaces a CA
    assert "refusing to replace" in capsys.readouterr().err
    assert main(["keys", "issue", str(tmp_path), "c9", "--role", "client"]) == 0
    cert = ssl._ssl._test_decode_cert(str(tmp_path / "c9.pem"))
    subject = {k: v for rdn in cert["subject"] for k, v in rdn}
    assert subject == {"commonName": "c9", "organizationalUnitName": "client"}
    assert main(["keys", "issue", str(tmp_path / "nope"), "c9", "--role", "client"]) == 2
    assert "no CA here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["keys", "issue", str(tmp_path), "c9", "--role", "admin"])


def test_server_with_missing_key_files_exits_2(tmp_path, capsys):
    rc = main(["server", "--listen", "127.0.0.1:0", "--tls-dir", str(tmp_path)])
    assert rc == 2 and "ca.pem is missing" in capsys.readouterr().err


def test_a_shut_down_tls_connection_never_reads_raw_records(keys):
    """Transport.shutdown under TLS: the records still buffered are read decrypted,
    then EOF; never the raw encrypted bytes as if they were the stream (Python's
    SSLSocket.shutdown drops the SSL object first: a resumed session's old reader
    then parsed TLS records as frames, "bad magic b'\\x17\\x03'")."""
    from remote_hw.net.transport import TlsTransport
    d, _ = keys
    listener = socket.create_server(("127.0.0.1", 0))
    raw_client = socket.create_connection(listener.getsockname())
    raw_server, _ = listener.accept()
    got: dict[str, TlsTransport] = {}

    def accept() -> None:
        got["s"] = TlsTransport.wrap_server(raw_server, TlsConfig(d, "a").server_context())

    import threading
    t = threading.Thread(target=accept)
    t.start()
    client_t = TlsTransport.wrap_client(raw_client, TlsConfig(d, "c1").client_context(), 1.0)
    t.join(5)
    server_t = got["s"]
    sent = b"RH" + bytes(range(200)) * 20
    client_t.send(sent)
    time.sleep(0.2)                      # the records now wait in the server's kernel buffer
    server_t.shutdown()
    data = b""
    while True:
        chunk = server_t.recv()
        if chunk is None:
            continue
        if not chunk:
            break
        data += chunk
    assert data == sent[:len(data)], "raw TLS bytes were read as the stream"
    assert not data.startswith(b"\x17\x03")
    for x in (client_t, server_t):
        x.close()
    listener.close()
