"""Keys, certificates and TLS contexts: who is on the other end of a connection.

remote-hw authenticates every connection with mutual TLS. A small private CA (made
by ``remote-hw keys init``) signs one certificate per host (``remote-hw keys issue``).
A certificate says two things about its holder:

* its name (the subject's common name): the client or server identity that access
  control lists use and logs show;
* its role (the subject's organizational unit): ``client`` or ``server``. Only a
  ``server`` certificate may open a server-to-server (peer) connection and so speak
  for other clients; a client never can, whatever it writes into a message.

Files in a key directory: ``ca.pem`` (everyone), ``ca.key`` (keep it on the machine
that issues), ``NAME.pem`` and ``NAME.key`` for each host.
"""

from __future__ import annotations

import datetime as _dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("client", "server")


class KeyMaterialError(ValueError):
    """A key directory or certificate is missing or wrong; the message says which."""


@dataclass(frozen=True)
class Identity:
    """An authenticated peer: certificate name and role."""

    name: str
    role: str


def _x509():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    return x509, hashes, serialization, ec, NameOID, ExtendedKeyUsageOID


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init_ca(directory: str | Path, name: str = "remote-hw CA", days: int = 3650) -> Path:
    """Create ``ca.pem``/``ca.key`` in ``directory`` (refuses to overwrite)."""
    x509, hashes, serialization, ec, NameOID, _ = _x509()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if (d / "ca.key").exists():
        raise KeyMaterialError(f"{d / 'ca.key'} exists already; refusing to replace the CA")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_private(d / "ca.key", key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / "ca.pem"


def issue(directory: str | Path, name: str, role: str, days: int = 825) -> Path:
    """Issue ``NAME.pem``/``NAME.key`` signed by the CA in ``directory``."""
    from remote_hw.config import check_ident
    x509, hashes, serialization, ec, NameOID, EKU = _x509()
    check_ident(name, "certificate name")
    if role not in ROLES:
        raise KeyMaterialError(f"role {role!r} must be one of {', '.join(ROLES)}")
    d = Path(directory)
    try:
        ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    except FileNotFoundError as e:
        raise KeyMaterialError(f"{e.filename}: no CA here; run 'remote-hw keys init {d}' first") \
            from None
    key = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.timezone.utc)
    usage = [EKU.SERVER_AUTH, EKU.CLIENT_AUTH] if role == "server" else [EKU.CLIENT_AUTH]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                        role)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(d / f"{name}.key", key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / f"{name}.pem"


@dataclass(frozen=True)
class TlsConfig:
    """Where a host's key material is: ``DIR/ca.pem``, ``DIR/NAME.pem``, ``DIR/NAME.key``."""

    directory: Path
    name: str

    def _paths(self) -> tuple[Path, Path, Path]:
        d = self.directory
        paths = (d / "ca.pem", d / f"{self.name}.pem", d / f"{self.name}.key")
        for p in paths:
            if not p.exists():
                raise KeyMaterialError(f"{p} is missing (make it with 'remote-hw keys')")
        return paths

    def server_context(self) -> ssl.SSLContext:
        """Accepting side: requires a client certificate from our CA."""
        ca, cert, key = self._paths()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Connecting side: presents our certificate, checks the server's against our CA.

        Host names are not checked (servers are reached by address in labs); instead the
        caller checks the server certificate's role, and its name where it expects one.
        """
        ca, cert, key = self._paths()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def peer_identity(sock: ssl.SSLSocket) -> Identity:
    """Name and role from the verified certificate of the other end."""
    cert = sock.getpeercert()
    if not cert:
        raise KeyMaterialError("the peer presented no certificate")
    subject: Any = cert.get("subject", ())  # ((("commonName", "x"),), ...)
    fields = {k: v for rdn in subject for k, v in rdn}
    name = fields.get("commonName", "")
    role = fields.get("organizationalUnitName", "")
    if not name or role not in ROLES:
        raise KeyMaterialError(f"certificate of {name or '?'} has no remote-hw role "
                        f"(organizationalUnit {role!r})")
    return Identity(name, role)
