"""Mutual TLS for the tcp backend: ``tls=DIR[,tls-name=NAME][,allow=NAME[:NAME...]]``.

Whoever reaches a UART's or a keyboard's backend types into the VM. A token is a
shared secret; TLS lets the person's side prove who it is with a certificate of the
platform's CA (``remote-hw keys init DIR``, ``remote-hw keys issue DIR alice --role
client``) and encrypts what is typed and what the guest prints. With ``tls=DIR``:

* the backend presents ``DIR/NAME.pem`` (a ``server`` certificate: ``--role server``),
  NAME being ``tls-name=NAME``, or else the only server certificate in DIR (the
  server's own, when DIR is its ``--tls-dir``);
* the peer must present a certificate signed by ``DIR/ca.pem`` (TLS 1.3); a peer
  without one, with one from another CA, or speaking plain TCP is refused, with one
  log line each saying which;
* ``allow=alice:bob`` narrows it to the certificates with those names: without it,
  every certificate of the CA, the clients' and servers' of the platform too, may type.

This module finds the key material and turns TLS failures into sentences;
:class:`~remote_hw.backends.tcp.TcpBackend` runs the handshake on its I/O thread.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from remote_hw.net.security import KeyMaterialError, TlsConfig

from .base import BackendError

#: the first byte of every TLS connection (a handshake record: the ClientHello)
TLS_HANDSHAKE_RECORD = 0x16


@dataclass(frozen=True)
class BackendTls:
    """A tcp backend's TLS settings, loaded: the context and who may connect."""

    context: ssl.SSLContext
    directory: Path
    name: str                        # the certificate the backend presents
    allow: frozenset[str] | None     # certificate names allowed (None: any of the CA)

    def describe(self) -> str:
        allow = f", allow={':'.join(sorted(self.allow))}" if self.allow else ""
        return f"tls {self.name}{allow}"


def _role(pem: Path) -> str | None:
    """The remote-hw role (organizational unit) of a certificate file, if any."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
    except (OSError, ValueError):
        return None
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    value = ou[0].value if ou else None
    return value if isinstance(value, str) else None


def server_certificate(directory: Path) -> str:
    """The name of the only server certificate (with its key) in ``directory``."""
    names = [p.stem for p in sorted(directory.glob("*.pem"))
             if p.name != "ca.pem" and (directory / f"{p.stem}.key").exists()
             and _role(p) == "server"]
    if not names:
        raise BackendError(
            f"tcp: tls={directory}: no server certificate there (make one with "
            f"'remote-hw keys issue {directory} NAME --role server', or name one with "
            f"tls-name=NAME)")
    if len(names) > 1:
        raise BackendError(f"tcp: tls={directory}: several server certificates "
                           f"({', '.join(names)}); choose one with tls-name=NAME")
    return names[0]


def load_tls(options: dict[str, str]) -> BackendTls | None:
    """The TLS settings of a tcp backend's options (None without ``tls=``); raises
    BackendError with one sentence when the key material is missing or wrong."""
    if "tls" not in options:
        for key in ("tls-name", "allow"):
            if key in options:
                raise BackendError(f"tcp: {key}= needs tls=DIR")
        return None
    if not options["tls"]:
        raise BackendError("tcp: tls= needs the key directory (tls=DIR)")
    directory = Path(options["tls"])
    if not (directory / "ca.pem").exists():
        raise BackendError(f"tcp: tls={directory}: no ca.pem there (make the CA with "
                           f"'remote-hw keys init {directory}')")
    name = options.get("tls-name") or server_certificate(directory)
    role = _role(directory / f"{name}.pem")
    if role is not None and role != "server":
        raise BackendError(f"tcp: tls-name={name}: {name}.pem is a {role} certificate; "
                           f"the backend needs a server one (--role server)")
    allow = None
    if "allow" in options:
        allow = frozenset(n for n in options["allow"].split(":") if n)
        if not allow:
            raise BackendError("tcp: allow= needs certificate names (allow=alice:bob)")
    try:
        context = TlsConfig(directory, name).server_context()
    except (KeyMaterialError, ssl.SSLError, OSError) as e:
        raise BackendError(f"tcp: tls={directory}: {e}") from None
    return BackendTls(context, directory, name, allow)


def handshake_failure(e: ssl.SSLError) -> str:
    """Why a peer's TLS handshake failed, as the log line says it."""
    reason = (getattr(e, "reason", None) or "").upper()
    if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"):
        return "TLS handshake failed: it presented no client certificate"
    if reason == "CERTIFICATE_VERIFY_FAILED":
        detail = getattr(e, "verify_message", "") or "not verified"
        return (f"TLS handshake failed: its certificate is not from this backend's CA "
                f"({detail})")
    if reason in ("WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "HTTP_REQUEST",
                  "NO_PROTOCOLS_AVAILABLE", "TLSV1_ALERT_PROTOCOL_VERSION"):
        return f"TLS handshake failed: it does not speak TLS 1.3 ({reason.lower()})"
    return f"TLS handshake failed: {getattr(e, 'reason', None) or e}"
