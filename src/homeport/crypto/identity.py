"""Key and certificate generation for the network CA, the server and the nodes.

Why a CA at all: Python's ``ssl`` module has no certificate-verify callback, so a
server that wants to *request* a client certificate (``CERT_OPTIONAL``) can only
accept certificates that chain to a trust anchor it loaded. The homeport server
therefore keeps a small network CA (Ed25519) and signs each node's public key at
enrollment. OpenSSL proves key possession and the chain; homeport then pins the
exact certificate (SHA-256 of its DER) per node and per stream, so the CA
signature is necessary but never sufficient: a removed node's certificate is
still CA-signed, yet its fingerprint is no longer in the node table and no
stream is ever set up for it.

The node's private key is generated on the node and never leaves it; only a
certificate signing request travels to the server.

Pure: every function takes and returns bytes. Writing keys to disk is
:mod:`homeport.node.files` (``write_private``), reading them is the caller's.

This module imports ``cryptography`` (≈90 ms); the ssh hot path (``homeport nc``)
never imports it — it only loads PEM files with the stdlib ``ssl`` module.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Node certificates are re-issued long before this; the CA outlives them.
CA_VALIDITY = _dt.timedelta(days=365 * 20)
SERVER_CERT_VALIDITY = _dt.timedelta(days=365 * 20)
NODE_CERT_VALIDITY = _dt.timedelta(days=365 * 10)
#: Clock skew tolerated between server and nodes when a certificate starts.
BACKDATE = _dt.timedelta(hours=1)
#: A node name travels inside a CSR; refuse absurd sizes before parsing.
MAX_CSR_PEM = 8 * 1024


class IdentityError(Exception):
    """A key, CSR or certificate is malformed or does not satisfy our rules."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A PEM private key and its PEM certificate."""

    key_pem: bytes
    cert_pem: bytes


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def new_private_key_pem() -> bytes:
    """Return a fresh Ed25519 private key in unencrypted PKCS#8 PEM."""
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(key_pem: bytes) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError("expected an Ed25519 private key")
    return key


def _serial() -> int:
    return int.from_bytes(os.urandom(16), "big") >> 1


def create_ca(common_name: str = "homeport network CA") -> KeyPair:
    """Create the network CA that signs node and server certificates."""
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, None)
    )
    return KeyPair(
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
    )


def _leaf(
    ca: KeyPair,
    subject_cn: str,
    public_key: ed25519.Ed25519PublicKey,
    validity: _dt.timedelta,
    usages: list[x509.ObjectIdentifier],
) -> bytes:
    ca_key = _load_key(ca.key_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def create_server_identity(ca: KeyPair, hostname: str = "homeport-server") -> KeyPair:
    """Create the server's TLS key and certificate, signed by the network CA."""
    key_pem = new_private_key_pem()
    key = _load_key(key_pem)
    cert_pem = _leaf(
        ca, hostname, key.public_key(), SERVER_CERT_VALIDITY, [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    return KeyPair(key_pem=key_pem, cert_pem=cert_pem)


def make_csr(key_pem: bytes, node_name: str) -> bytes:
    """Return a PEM CSR proving possession of ``key_pem`` for ``node_name``."""
    key = _load_key(key_pem)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .sign(key, None)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_node_csr(ca: KeyPair, csr_pem: bytes, node_id: str) -> bytes:
    """Verify a node's CSR and issue its certificate (CN = the server-chosen node id).

    Raises:
        IdentityError: the CSR is not PEM, not Ed25519, or its self-signature fails.
    """
    if len(csr_pem) > MAX_CSR_PEM:
        raise IdentityError("certificate request too large")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise IdentityError(f"malformed certificate request: {exc}") from exc
    if not csr.is_signature_valid:
        raise IdentityError("certificate request signature is invalid")
    public_key = csr.public_key()
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise IdentityError("node keys must be Ed25519")
    return _leaf(
        ca,
        node_id,
        public_key,
        NODE_CERT_VALIDITY,
        [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
    )


def cert_der_from_pem(cert_pem: bytes) -> bytes:
    """Return the DER encoding of a PEM certificate (what TLS peers see)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise IdentityError(f"malformed certificate: {exc}") from exc
    return cert.public_bytes(serialization.Encoding.DER)


__all__ = [
    "IdentityError",
    "KeyPair",
    "cert_der_from_pem",
    "create_ca",
    "create_server_identity",
    "make_csr",
    "new_private_key_pem",
    "sign_node_csr",
]
