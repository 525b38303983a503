"""Data-connection preamble, protocol version 1.

A data connection is a plain TCP connection to the server's one public port
that carries exactly one end of one stream. It starts with 20 bytes::

    0       1       2       3       4                               20
   +-------+-------+-------+-------+-------------- … --------------+
   |  'H'  |  'P'  |  'D'  | ver=1 |   token (16 random bytes)     |
   +-------+-------+-------+-------+-------------- … --------------+

after which the bytes are the end-to-end TLS 1.3 session between the two
nodes. The server pairs the two connections whose tokens it handed out (or
accepted) over the authenticated control channel, then splices them: it never
parses, decrypts or re-encrypts what follows the preamble.

Why the first byte is 'H' (0x48): a TLS connection starts with a handshake
record, byte 0x16, so one listening port can tell control (TLS) from data
connections by their first byte. Why the token is not secret-bearing: anyone
on the path can read it and race the real node, but the end-to-end TLS
handshake is mutually authenticated and pinned per stream, so a hijacker can
only break that stream — which an on-path attacker can always do.

**TLS-wrapped data connections** (``--tls-data``, for middleboxes that let only
TLS through on 443). The same preamble and the same end-to-end TLS bytes, but
inside an outer TLS 1.3 session between the node and the *server*: the node
offers exactly one ALPN name, :data:`ALPN_DATA` (``homeport-data/1``), and pins
the server's certificate as it does for the control link; the server
terminates the outer TLS, reads the preamble inside it and hands the plaintext
(still end-to-end encrypted) to the relay. Detection rule on the server port:

1. first byte ``'H'``: a plain data connection (or a whoami request), as above;
2. first byte ``0x16``: the server peeks (does not consume) the first TLS
   record and reads the ClientHello's ALPN list
   (:func:`homeport.wire.tlshello.offered_alpn_untrusted`). If it offers
   ``homeport-data/1`` the connection is a wrapped data connection; anything
   else — ``homeport-control/1``, no ALPN, a ClientHello spanning records, a
   malformed one — is a control connection, exactly as before (whose handshake
   then insists on ``homeport-control/1``);
3. anything else: closed.

A server that refuses wrapped data (``--no-tls-data``) skips rule 2's test, so
the connection takes the control path, whose handshake finds no common ALPN
name and closes it; the node then reports "does not accept TLS-wrapped data
connections" — exactly what it sees from a server older than this rule.
"""

from __future__ import annotations

import os

from homeport.wire.errors import BadVersion, WireError

MAGIC = b"HPD"
VERSION = 1
TOKEN_LEN = 16
PREAMBLE_LEN = len(MAGIC) + 1 + TOKEN_LEN
#: First byte of a TLS record carrying a handshake (RFC 8446 §5.1).
TLS_HANDSHAKE_BYTE = 0x16
#: The ALPN name of a TLS-wrapped data connection (the outer TLS to the server).
ALPN_DATA = "homeport-data/1"


def is_wrapped_data(offered_alpn: tuple[str, ...]) -> bool:
    """Rule 2 above: a ClientHello offering ``homeport-data/1`` opens a wrapped data connection."""
    return ALPN_DATA in offered_alpn


def new_token() -> bytes:
    """Return a fresh random token."""
    return os.urandom(TOKEN_LEN)


def encode_preamble(token: bytes) -> bytes:
    """Return the 20-byte preamble for ``token``."""
    if len(token) != TOKEN_LEN:
        raise ValueError("token must be 16 bytes")
    return MAGIC + bytes([VERSION]) + token


def parse_preamble_untrusted(data: bytes) -> bytes:
    """Return the token of a complete 20-byte preamble.

    Raises:
        WireError: wrong length or magic. BadVersion: a version we do not speak.
    """
    if len(data) != PREAMBLE_LEN:
        raise WireError(f"data preamble must be {PREAMBLE_LEN} bytes, got {len(data)}")
    if data[:3] != MAGIC:
        raise WireError("not a homeport data connection")
    if data[3] != VERSION:
        raise BadVersion(f"data protocol version {data[3]} is not {VERSION}")
    return bytes(data[4:])


def token_from_hex_untrusted(text: str) -> bytes:
    """Parse a token carried as hex in a control message."""
    try:
        token = bytes.fromhex(text)
    except ValueError as exc:
        raise WireError("token is not hex") from exc
    if len(token) != TOKEN_LEN:
        raise WireError("token must be 16 bytes")
    return token
