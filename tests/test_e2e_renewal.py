"""Issue 9 A.11: nodes survive a renewal of the server's publicly trusted certificate.

A test CA stands in for the public CA (``SSL_CERT_FILE``, as for any OpenSSL
client); the server is restarted on a renewed certificate (new key, same name)
under running agents, the way a certbot deploy hook does it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from homeport.crypto.tls import fingerprint
from homeport.testing.deadline import wait_for
from tests.harness import Homeport, free_port

pytestmark = pytest.mark.integration


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(d: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("test public CA"))
        .issuer_name(_name("test public CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _leaf(
    d: Path, tag: str, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> tuple[Path, Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = d / f"{tag}.crt", d / f"{tag}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, fingerprint(cert.public_bytes(serialization.Encoding.DER))


def test_agents_follow_a_renewed_public_certificate(tmp_path: Path) -> None:
    ca_key, ca = _ca(tmp_path)
    cert1, key1, pin1 = _leaf(tmp_path, "cert1", ca_key, ca)
    cert2, key2, pin2 = _leaf(tmp_path, "cert2", ca_key, ca)
    hp = Homeport(tmp_path)
    hp.env["SSL_CERT_FILE"] = str(tmp_path / "ca.pem")
    port = free_port()
    try:
        old = hp.start_server(port=port, extra=["--tls-cert", str(cert1), "--tls-key", str(key1)])
        lab = hp.up("labpc", "--ping-interval", "1")
        hp.wait_online("labpc", lab)
        other = hp.up("selfpc", "--ping-interval", "1")
        hp.wait_online("selfpc", other)
        assert (hp.state("labpc") / "server-webpki").read_text().strip() == "127.0.0.1"
        # a node that did not see a publicly valid certificate when it joined
        (hp.state("selfpc") / "server-webpki").unlink()

        old.terminate()
        old.wait(timeout=10)
        hp.start_server(port=port, extra=["--tls-cert", str(cert2), "--tls-key", str(key2)])

        hp.wait_online("labpc", lab, timeout=60)
        state = json.loads((hp.state("labpc") / "node.json").read_text())
        assert state["server_pin"] == pin2 != pin1
        assert "certificate was renewed" in hp.log("agent-labpc")
        wait_for(
            lambda: "does not match the pinned one" in hp.log("agent-selfpc"),
            30,
            f"selfpc refuses the new certificate\n{hp.log('agent-selfpc')}",
        )
        assert not hp.node_online("selfpc")
        selfstate = json.loads((hp.state("selfpc") / "node.json").read_text())
        assert selfstate["server_pin"] == pin1
    finally:
        hp.close()
