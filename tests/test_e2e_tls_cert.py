"""``homeport server --tls-cert/--tls-key``: an operator's own certificate.

The pin inside auth keys is then that certificate's fingerprint, so nodes still
authenticate the server on first contact, whatever issued it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from homeport.crypto.tls import fingerprint
from tests.harness import Homeport

pytestmark = pytest.mark.integration


def own_certificate(d: Path) -> tuple[Path, Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.example.org")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = d / "fullchain.pem", d / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, fingerprint(cert.public_bytes(serialization.Encoding.DER))


def test_server_with_an_operator_certificate(tmp_path: Path) -> None:
    cert, key, pin = own_certificate(tmp_path)
    hp = Homeport(tmp_path)
    try:
        hp.start_server(extra=["--tls-cert", str(cert), "--tls-key", str(key)])
        authkey = hp.keys_create()
        assert authkey.endswith("_" + pin.removeprefix("sha256:"))
        node = hp.up("labpc", key=authkey)
        hp.wait_online("labpc", node)
    finally:
        hp.close()
