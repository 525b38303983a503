"""TLS contexts: the properties every homeport connection relies on."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from homeport.crypto import identity, tls
from homeport.io import tlsctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca = identity.create_ca()
    (d / "ca.crt").write_bytes(ca.cert_pem)
    key = identity.new_private_key_pem()
    (d / "node.key").write_bytes(key)
    (d / "node.crt").write_bytes(identity.sign_node_csr(ca, identity.make_csr(key, "a"), "n1"))
    return d


def contexts(d: Path) -> list[ssl.SSLContext]:
    return [
        tlsctx.control_client_context(d / "node.crt", d / "node.key"),
        tlsctx.control_server_context(d / "node.crt", d / "node.key", d / "ca.crt"),
        tlsctx.stream_context(
            server_side=True, cert=d / "node.crt", key=d / "node.key", ca_cert=d / "ca.crt"
        ),
        tlsctx.stream_context(
            server_side=False, cert=d / "node.crt", key=d / "node.key", ca_cert=d / "ca.crt"
        ),
    ]


def test_every_context_is_tls13_only_and_treats_a_cut_as_an_error(pki: Path) -> None:
    for ctx in contexts(pki):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
        # Debian's Python 3.11.2 sets this by default: a truncation would read as a clean EOF.
        assert not ctx.options & ssl.OP_IGNORE_UNEXPECTED_EOF


def test_stream_contexts_require_a_peer_certificate(pki: Path) -> None:
    for ctx in contexts(pki)[2:]:
        assert ctx.verify_mode is ssl.CERT_REQUIRED


def test_pin_check() -> None:
    der = b"certificate bytes"
    tls.check_pin(der, tls.fingerprint(der))
    with pytest.raises(tls.PinMismatch):
        tls.check_pin(der, tls.fingerprint(b"another"))
    with pytest.raises(tls.PinMismatch):
        tls.check_pin(None, tls.fingerprint(der))
