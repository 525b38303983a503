"""Auth keys: the one line an admin hands to a new node.

Text form (version 1)::

    hpk1_<key id: 12 hex>_<secret: 32 hex>_<server pin: 64 hex>

* key id — public lookup handle, so the server finds the row without scanning.
* secret — 128 random bits; the server stores only SHA-256(secret) and
  compares in constant time.
* server pin — SHA-256 of the server's TLS certificate (DER). The node checks
  it during its very first TLS handshake, before it sends the secret, so
  joining needs no trust on first use.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from homeport.wire.errors import WireError

PREFIX = "hpk1"
_RE = re.compile(r"^hpk1_([0-9a-f]{12})_([0-9a-f]{32})_([0-9a-f]{64})$")


@dataclass(frozen=True, slots=True)
class AuthKey:
    key_id: str
    secret: str
    server_pin: str  # "sha256:<hex>"

    def __str__(self) -> str:
        return f"{PREFIX}_{self.key_id}_{self.secret}_{self.server_pin.removeprefix('sha256:')}"

    def __repr__(self) -> str:  # never show the secret in logs or tracebacks
        return f"AuthKey(key_id={self.key_id!r}, secret=<redacted>)"


def parse_untrusted(text: str) -> AuthKey:
    """Parse an auth key typed by a user or received by the server."""
    m = _RE.match(text.strip())
    if m is None:
        raise WireError("not a homeport auth key (expected hpk1_<id>_<secret>_<pin>)")
    return AuthKey(key_id=m.group(1), secret=m.group(2), server_pin="sha256:" + m.group(3))


def hash_secret(secret: str) -> str:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()
