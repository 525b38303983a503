"""Key material for enrollment: the only node-side module that needs ``cryptography``.

Kept apart from :mod:`homeport.node.state` so that ``homeport nc`` never pays
for importing ``cryptography`` (≈90 ms); :func:`homeport.io.dial.enroll`
imports this module lazily.
"""

from __future__ import annotations

from pathlib import Path

from homeport.node.files import write_private, write_public
from homeport.node.state import CA_FILE, CERT_FILE, KEY_FILE, ensure_dir


def new_key_and_csr(state_dir: Path, name: str) -> bytes:
    """Generate this node's Ed25519 key into ``node.key`` (0600) and return a PEM CSR.

    The private key never leaves the node: only the CSR travels to the server.
    """
    from homeport.crypto import identity

    ensure_dir(state_dir)
    key_pem = identity.new_private_key_pem()
    write_private(state_dir / KEY_FILE, key_pem)
    return identity.make_csr(key_pem, name)


def store_certificates(state_dir: Path, cert_pem: bytes, ca_pem: bytes) -> None:
    """Write the node certificate and the network CA returned by ENROLLED."""
    write_public(state_dir / CERT_FILE, cert_pem)
    write_public(state_dir / CA_FILE, ca_pem)
