"""sshd host keys as announced by agents: untrusted text that ends up in known_hosts.

An agent announces its sshd's public host keys; the server stores them and
hands them to every client that opens a stream, which writes them into
``known_hosts/<peer>`` for ``StrictHostKeyChecking yes``. So a key line is
untrusted input on its way into a file ssh parses: a newline would add a line
for another host, a ``@cert-authority`` marker would vouch for every host, and
junk would make ssh refuse the real key. Only real OpenSSH public keys pass.

Text form (one line, ASCII; sshd's ``*.pub`` files, ``ssh-keyscan`` without the
host field)::

    TYPE SP BASE64(BLOB) [SP COMMENT]

* ``TYPE`` is one of :data:`KEY_TYPES`; the comment is dropped
  (:meth:`HostKey.line` renders ``TYPE SP BASE64``).
* ``BASE64`` is strict, canonical base64 (RFC 4648 alphabet, ``=`` padding only
  at the end, zero pad bits): re-encoding the blob gives the same text.
* The whole line is at most :data:`MAX_HOST_KEY_LEN` characters, printable
  ASCII plus space and tab.

``BLOB`` is a sequence of SSH wire fields (RFC 4251 §5): ``string`` is a uint32
big-endian length and that many bytes; ``mpint`` is a ``string`` holding a
two's-complement big-endian integer without redundant leading bytes. The first
field is always ``string TYPE``, equal to the text's ``TYPE``; the rest, which
must be consumed exactly::

    ssh-ed25519                         string key[32]                   (RFC 8709)
    ecdsa-sha2-nistpN (256/384/521)     string "nistpN", string Q        (RFC 5656)
                                        (Q = 0x04 || X || Y: 65/97/133 bytes,
                                        a point on the curve)
    ssh-rsa                             mpint e, mpint n                 (RFC 4253)
                                        (n of 1024..16384 bits, e > 0)
    sk-ssh-ed25519@openssh.com          string key[32], string application
    sk-ecdsa-sha2-nistp256@openssh.com  string "nistp256", string Q[65],
                                        string application    (OpenSSH PROTOCOL.u2f)

Pure: no I/O. :func:`parse_host_key_untrusted` raises only :class:`WireError`.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable
from dataclasses import dataclass

from homeport.wire.errors import TooLarge, WireError

#: Longest key line we look at (characters); an RSA-16384 key is ~2.8 KiB of base64.
MAX_HOST_KEY_LEN = 4096
#: Most host keys kept for one node (a real sshd has 3 or 4).
MAX_HOST_KEYS = 16
#: Longest FIDO application string of an ``sk-`` key (OpenSSH uses ``ssh:`` + a short name).
MAX_APPLICATION = 256
#: RSA modulus size bounds (bits), as OpenSSH accepts them.
MIN_RSA_BITS, MAX_RSA_BITS = 1024, 16384

ED25519 = "ssh-ed25519"
RSA = "ssh-rsa"
SK_ED25519 = "sk-ssh-ed25519@openssh.com"
SK_ECDSA = "sk-ecdsa-sha2-nistp256@openssh.com"
#: ECDSA key types → (curve name in the blob, length of the uncompressed point Q).
ECDSA_CURVES = {
    "ecdsa-sha2-nistp256": ("nistp256", 65),
    "ecdsa-sha2-nistp384": ("nistp384", 97),
    "ecdsa-sha2-nistp521": ("nistp521", 133),
}
#: NIST curves (FIPS 186-4 D.1.2): the prime p and the coefficient b of y² = x³ - 3x + b.
#: OpenSSH refuses a point that is not on its curve, so we do too.
_CURVE_P_B = {
    "nistp256": (
        0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF,
        0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B,
    ),
    "nistp384": (
        2**384 - 2**128 - 2**96 + 2**32 - 1,
        int(
            "b3312fa7e23ee7e4988e056be3f82d19181d9c6efe8141120314088f"
            "5013875ac656398d8a2ed19d2a85c8edd3ec2aef",
            16,
        ),
    ),
    "nistp521": (
        2**521 - 1,
        int(
            "051953eb9618e1c9a1f929a21a0b68540eea2da725b99b315f3b8b48"
            "9918ef109e156193951ec7e937b1652c0bd3bb1bf073573df883d2c3"
            "4f1ef451fd46b503f00",
            16,
        ),
    ),
}
#: The key types we accept (what OpenSSH's sshd serves; no DSA, no certificates).
KEY_TYPES = frozenset({ED25519, RSA, SK_ED25519, SK_ECDSA, *ECDSA_CURVES})

_ED25519_KEY_LEN = 32
_U32 = 4


@dataclass(frozen=True, slots=True)
class HostKey:
    """A parsed public host key: its type and its decoded SSH wire blob."""

    key_type: str
    blob: bytes

    def line(self) -> str:
        """``TYPE BASE64``, the form written to known_hosts (no comment)."""
        return f"{self.key_type} {binascii.b2a_base64(self.blob, newline=False).decode()}"


def _fields(blob: bytes) -> list[bytes]:
    """Split ``blob`` into SSH ``string`` fields, consuming it exactly."""
    out: list[bytes] = []
    pos = 0
    while pos < len(blob):
        if len(blob) - pos < _U32:
            raise WireError("host key blob ends inside a length field")
        n = int.from_bytes(blob[pos : pos + _U32], "big")
        pos += _U32
        if n > len(blob) - pos:
            raise WireError("host key blob field runs past its end")
        out.append(blob[pos : pos + n])
        pos += n
    return out


def _check_mpint(value: bytes, what: str) -> int:
    """A positive, minimally encoded mpint → its bit length."""
    if not value or value[0] & 0x80:
        raise WireError(f"host key {what} is not a positive integer")
    if value[0] == 0 and (len(value) == 1 or not value[1] & 0x80):
        raise WireError(f"host key {what} has a redundant leading zero")
    return int.from_bytes(value, "big").bit_length()


def _check_point(q: bytes, curve: str, length: int) -> None:
    if len(q) != length or q[0] != 0x04:
        raise WireError("host key ECDSA point is not an uncompressed point of its curve")
    p, b = _CURVE_P_B[curve]
    half = (length - 1) // 2
    x, y = int.from_bytes(q[1 : 1 + half], "big"), int.from_bytes(q[1 + half :], "big")
    if x >= p or y >= p or (y * y - (x * x * x - 3 * x + b)) % p:
        raise WireError("host key ECDSA point is not on its curve")


def _check_application(app: bytes) -> None:
    if not 0 < len(app) <= MAX_APPLICATION:
        raise WireError("host key FIDO application string has a bad length")


def _check_blob(key_type: str, blob: bytes) -> None:
    fields = _fields(blob)
    if not fields or fields[0] != key_type.encode():
        raise WireError("host key blob does not start with its key type")
    rest = fields[1:]
    if key_type == ED25519:
        if len(rest) != 1 or len(rest[0]) != _ED25519_KEY_LEN:
            raise WireError("ssh-ed25519 host key must hold one 32-byte key")
    elif key_type == SK_ED25519:
        if len(rest) != 2 or len(rest[0]) != _ED25519_KEY_LEN:
            raise WireError("sk-ssh-ed25519 host key must hold a 32-byte key and an application")
        _check_application(rest[1])
    elif key_type == RSA:
        if len(rest) != 2:
            raise WireError("ssh-rsa host key must hold e and n")
        _check_mpint(rest[0], "RSA exponent")
        bits = _check_mpint(rest[1], "RSA modulus")
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise WireError(f"ssh-rsa host key modulus has {bits} bits")
    elif key_type == SK_ECDSA:
        if len(rest) != 3 or rest[0] != b"nistp256":
            raise WireError("sk-ecdsa host key must hold nistp256, a point and an application")
        _check_point(rest[1], "nistp256", ECDSA_CURVES["ecdsa-sha2-nistp256"][1])
        _check_application(rest[2])
    else:
        curve, point_len = ECDSA_CURVES[key_type]
        if len(rest) != 2 or rest[0] != curve.encode():
            raise WireError(f"{key_type} host key must hold curve {curve} and a point")
        _check_point(rest[1], curve, point_len)


def _printable(line: str) -> bool:
    return all(" " <= c <= "~" or c == "\t" for c in line)


def parse_host_key_untrusted(line: str) -> HostKey:
    """Parse one ``TYPE BASE64 [COMMENT]`` line from the network or a file.

    Raises:
        WireError: anything but one real OpenSSH public key of an allowed type
        (:class:`~homeport.wire.errors.TooLarge` past :data:`MAX_HOST_KEY_LEN`).
    """
    if not isinstance(line, str):
        raise WireError("host key is not text")
    if len(line) > MAX_HOST_KEY_LEN:
        raise TooLarge(f"host key line longer than {MAX_HOST_KEY_LEN} characters")
    if not line.isascii() or not _printable(line):
        raise WireError("host key line must be one line of printable ASCII")
    parts = line.split(None, 2)
    if len(parts) < 2:
        raise WireError("host key must be 'type base64'")
    key_type, text = parts[0], parts[1]
    if key_type not in KEY_TYPES:
        raise WireError(f"unknown host key type {key_type[:40]!r}")
    try:
        blob = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise WireError("host key is not strict base64") from None
    if binascii.b2a_base64(blob, newline=False).decode() != text:
        raise WireError("host key is not canonical base64")
    _check_blob(key_type, blob)
    return HostKey(key_type, blob)


def sanitize_host_keys(lines: Iterable[object]) -> tuple[str, ...]:
    """The valid keys of ``lines`` as ``TYPE BASE64``: in order, deduplicated, at most
    :data:`MAX_HOST_KEYS`. Invalid lines (and non-strings) are dropped."""
    out: list[str] = []
    for raw in lines:
        if len(out) >= MAX_HOST_KEYS:
            break
        if not isinstance(raw, str):
            continue
        try:
            key = parse_host_key_untrusted(raw).line()
        except WireError:
            continue
        if key not in out:
            out.append(key)
    return tuple(out)
