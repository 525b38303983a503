"""The stream record layer ``homeport-stream/2``: a sans-I/O AEAD record machine.

Why it exists. Each end of a stream used to push every byte through TLS 1.3 in
memory BIOs; measured alone that costs 0.53 (encrypt) / 0.59 (decrypt) CPU-s/GiB
on this class of machine, of which AES-GCM itself is ~0.3: the rest is OpenSSL's
16 KiB record layer and two extra copies. This module keeps the TLS 1.3
handshake (mutual, pinned) and replaces only the *records* of the data phase
with 64 KiB AES-256-GCM records sealed straight into the caller's buffers
(``cryptography``'s ``encrypt_into`` / ``decrypt_into``). The design and its
security argument are in docs/architecture.md ("Threat model", "The record
layer").

Wire format of one record (all integers big-endian)::

    kind (1 byte) | length (3 bytes) | ciphertext (length - 16 bytes) | tag (16 bytes)

``kind`` is :data:`KIND_DATA` or :data:`KIND_END`; the 4-byte header is the
AEAD's associated data, so neither kind nor length can be changed without the
tag failing. ``length`` counts ciphertext + tag (16 … :data:`MAX_RECORD` + 16).
An END record has an empty plaintext and closes its direction (half-close):
no record may follow it, and a transport EOF before it is a truncation.

Nonces: ``nonce_base XOR (0^4 || seq_be64)``; ``seq`` counts records of one
direction from 0, never repeats, and is never sent (a dropped, replayed,
reordered or reflected record fails authentication). Every
:data:`REKEY_RECORDS` records both ends ratchet the direction's secret
(HKDF-Expand, "hp2 next") and restart ``seq`` — no message, no renegotiation;
after :data:`MAX_EPOCHS` epochs the direction refuses to seal or open.

Theory of operation (no sockets, no clock)::

    c2s, s2c = derive_keys(shared, c_random, s_random, client_fp=..., server_fp=...)
    sealer = Sealer(c2s)                      # client side sends with c2s
    n = sealer.seal_into(out, off, plaintext) # writes header+ciphertext+tag at out[off:]
    opener = Opener(s2c)
    size = opener.record_size_untrusted(header4)      # WireError if malformed
    kind, n = opener.open_into_untrusted(record, dst) # WireError if not authentic

Every failure is a :class:`homeport.wire.errors.WireError`; the I/O layer aborts
the stream on the first one and delivers nothing from a record that failed.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from homeport.wire.errors import TooLarge, UnknownType, WireError

#: ALPN name of this record layer (offered before ``homeport-stream/1``).
ALPN_RECORDS = "homeport-stream/2"
#: Largest plaintext in one record: large records amortise the per-record cost
#: (Python call, header, tag) that dominates AES-GCM below ~16 KiB.
MAX_RECORD = 64 * 1024
#: AES-GCM tag length.
TAG = 16
#: Record header: kind (1) + length (3).
HEADER = 4
#: Largest whole record on the wire.
MAX_WIRE_RECORD = HEADER + MAX_RECORD + TAG
#: Records per direction before both ends ratchet that direction's key. 2^20
#: full records are 64 GiB = 2^32 AES blocks, far inside AES-GCM's per-key
#: margin (RFC 8446 §5.5 allows ~2^34.5 blocks per key for 2^-57).
REKEY_RECORDS = 1 << 20
#: Key epochs per direction; with REKEY_RECORDS this caps a direction at 2^32
#: records, after which it refuses to go on (the stream must be reopened).
MAX_EPOCHS = 1 << 12
#: Length of each side's key-exchange random.
RANDOM_LEN = 32
KEY_LEN = 32  # AES-256
NONCE_LEN = 12

KIND_DATA = 0x01
KIND_END = 0x02


class RecordKind(enum.Enum):
    """What an opened record was."""

    DATA = KIND_DATA
    END = KIND_END


class RecordLimit(WireError):
    """A direction used up its records (:data:`MAX_EPOCHS` times :data:`REKEY_RECORDS`)."""

    code = "record-limit"


class RecordAuthFailed(WireError):
    """A record failed AEAD authentication (tampered, replayed, reordered, reflected)."""

    code = "bad-record-mac"


class RecordAfterEnd(WireError):
    """A record after the direction's END record, or a seal after END."""

    code = "record-after-end"


# -- key schedule (HKDF-SHA256, RFC 5869, stdlib hmac) ---------------------------------------


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256."""
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand with SHA-256 (``length`` at most 8160)."""
    out = b""
    block = b""
    i = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


@dataclass(frozen=True, slots=True)
class DirectionKeys:
    """One direction's traffic secret; key and nonce base are derived from it per epoch."""

    secret: bytes

    def epoch_material(self, epoch: int) -> tuple[bytes, bytes]:
        """(key, nonce base) of ``epoch``: epoch 0 expands ``secret``, each next one
        ratchets it (so an epoch's key says nothing about the earlier ones)."""
        secret = self.secret
        for _ in range(epoch):
            secret = hkdf_expand(secret, b"hp2 next", 32)
        return hkdf_expand(secret, b"hp2 key", KEY_LEN), hkdf_expand(secret, b"hp2 iv", NONCE_LEN)


def derive_keys(
    shared: bytes,
    client_random: bytes,
    server_random: bytes,
    *,
    client_fp: bytes,
    server_fp: bytes,
    alpn: str = ALPN_RECORDS,
) -> tuple[DirectionKeys, DirectionKeys]:
    """Return (client→server, server→client) secrets for one stream.

    ``shared`` is the X25519 secret of the two fresh key shares exchanged inside
    the pinned TLS 1.3 session; the salt binds both randoms, the info binds the
    ALPN and both certificate fingerprints (raw SHA-256, 32 bytes each), so keys
    of two streams, two peer pairs or two protocol versions never coincide, and
    the two directions get independent keys (a reflected record cannot open).
    """
    if len(client_random) != RANDOM_LEN or len(server_random) != RANDOM_LEN:
        raise ValueError("randoms must be 32 bytes")
    if len(client_fp) != 32 or len(server_fp) != 32:
        raise ValueError("fingerprints must be raw SHA-256 digests")
    prk = hkdf_extract(client_random + server_random, shared)
    context = alpn.encode() + b"\x00" + client_fp + server_fp
    c2s = hkdf_expand(prk, b"hp2 c2s " + context, 32)
    s2c = hkdf_expand(prk, b"hp2 s2c " + context, 32)
    return DirectionKeys(c2s), DirectionKeys(s2c)


# -- the record machines -------------------------------------------------------------------


class _Direction:
    """Counters and cipher of one direction (shared by Sealer and Opener)."""

    __slots__ = ("_aead", "_base", "_epoch", "_keys", "_rekey", "ended", "seq")

    def __init__(self, keys: DirectionKeys, rekey_records: int) -> None:
        self._keys = keys
        self._rekey = rekey_records
        self._epoch = 0
        self.seq = 0
        self.ended = False
        key, base = keys.epoch_material(0)
        self._base = int.from_bytes(base, "big")
        self._aead = AESGCM(key)

    def _next_epoch(self) -> None:
        if self._epoch + 1 >= MAX_EPOCHS:
            raise RecordLimit("record limit of this direction reached: reopen the stream")
        self._epoch += 1
        self.seq = 0
        # Ratchet one step from the current epoch (epoch_material(n) from 0 is O(n)).
        self._keys = DirectionKeys(hkdf_expand(self._keys.secret, b"hp2 next", 32))
        key, base = self._keys.epoch_material(0)
        self._base = int.from_bytes(base, "big")
        self._aead = AESGCM(key)

    def _next_nonce(self) -> bytes:
        if self.seq >= self._rekey:
            self._next_epoch()
        seq = self.seq
        self.seq = seq + 1
        return (self._base ^ seq).to_bytes(NONCE_LEN, "big")


class Sealer:
    """Seals one direction's records (the sending side)."""

    __slots__ = ("_d",)

    def __init__(self, keys: DirectionKeys, *, rekey_records: int = REKEY_RECORDS) -> None:
        self._d = _Direction(keys, rekey_records)

    @property
    def seq(self) -> int:
        return self._d.seq

    @property
    def ended(self) -> bool:
        return self._d.ended

    def seal_into(
        self,
        out: bytearray | memoryview,
        off: int,
        data: bytes | bytearray | memoryview,
        *,
        end: bool = False,
    ) -> int:
        """Seal ``data`` (≤ :data:`MAX_RECORD`, empty iff ``end``) into ``out[off:]``;
        return the record's length on the wire. ``out`` must have room for it."""
        d = self._d
        if d.ended:
            raise RecordAfterEnd("this direction already sent its END record")
        n = len(data)
        if end:
            if n:
                raise ValueError("an END record carries no data")
            kind = KIND_END
        elif 0 < n <= MAX_RECORD:
            kind = KIND_DATA
        else:
            raise ValueError(f"record plaintext must be 1..{MAX_RECORD} bytes")
        if d.seq >= d._rekey:
            d._next_epoch()
        seq = d.seq
        d.seq = seq + 1
        length = n + TAG
        header = ((kind << 24) | length).to_bytes(HEADER, "big")
        mv = out if type(out) is memoryview else memoryview(out)
        mv[off : off + HEADER] = header
        d._aead.encrypt_into(
            (d._base ^ seq).to_bytes(NONCE_LEN, "big"),
            data,
            header,
            mv[off + HEADER : off + HEADER + length],
        )
        if end:
            d.ended = True
        return HEADER + length

    def seal(self, data: bytes, *, end: bool = False) -> bytes:
        """Convenience (tests, one-off messages): seal into a new bytes object."""
        buf = bytearray(HEADER + len(data) + TAG)
        self.seal_into(buf, 0, data, end=end)
        return bytes(buf)


class Opener:
    """Opens one direction's records (the receiving side)."""

    __slots__ = ("_d",)

    def __init__(self, keys: DirectionKeys, *, rekey_records: int = REKEY_RECORDS) -> None:
        self._d = _Direction(keys, rekey_records)

    @property
    def ended(self) -> bool:
        return self._d.ended

    @property
    def seq(self) -> int:
        return self._d.seq

    def record_size_untrusted(self, header: bytes | bytearray | memoryview) -> int:
        """Whole wire length of the record starting with ``header`` (≥ 4 bytes)."""
        if self._d.ended:
            raise RecordAfterEnd("bytes after the peer's END record")
        if len(header) < HEADER:
            raise WireError("short record header")
        kind = header[0]
        if kind not in {KIND_DATA, KIND_END}:
            raise UnknownType(f"unknown record kind {kind:#x}")
        length = (header[1] << 16) | (header[2] << 8) | header[3]
        if length < TAG:
            raise WireError(f"record length {length} is shorter than its tag")
        if length > MAX_RECORD + TAG:
            raise TooLarge(f"record length {length} exceeds {MAX_RECORD + TAG}")
        if kind == KIND_END and length != TAG:
            raise WireError("END record with data")
        return HEADER + length

    def plaintext_size(self, record_len: int) -> int:
        """Plaintext length of a record whose wire length is ``record_len``."""
        return record_len - HEADER - TAG

    def open_into_untrusted(
        self, record: bytes | bytearray | memoryview, dst: bytearray | memoryview
    ) -> tuple[RecordKind, int]:
        """Authenticate and decrypt one whole record into ``dst`` (room for its
        plaintext); return its kind and plaintext length. On failure nothing in
        ``dst`` may be used (it may hold unauthenticated bytes) and the caller
        must abort: the machine does not recover (its counter moved on)."""
        size = self.record_size_untrusted(record[:HEADER])
        if len(record) != size:
            raise WireError("record length does not match its header")
        mv = record if isinstance(record, memoryview) else memoryview(record)
        out = dst if isinstance(dst, memoryview) else memoryview(dst)
        n = self.open_sized_untrusted(mv, 0, size, out)
        return (RecordKind.DATA, n) if n >= 0 else (RecordKind.END, 0)

    def open_sized_untrusted(self, buf: memoryview, start: int, size: int, dst: memoryview) -> int:
        """The I/O layer's fast path: open the record at ``buf[start:start+size]``
        whose ``size`` this opener's :meth:`record_size_untrusted` just returned
        for that very header (so it is not parsed again); decrypt into ``dst``.
        Return the plaintext length, or -1 for the END record."""
        d = self._d
        if d.seq >= d._rekey:
            d._next_epoch()
        seq = d.seq
        d.seq = seq + 1
        n = size - HEADER - TAG
        try:
            d._aead.decrypt_into(
                (d._base ^ seq).to_bytes(NONCE_LEN, "big"),
                buf[start + HEADER : start + size],
                buf[start : start + HEADER],
                dst[:n],
            )
        except InvalidTag:
            raise RecordAuthFailed("record authentication failed (bad record mac)") from None
        if buf[start] == KIND_END:
            d.ended = True
            return -1
        return n
