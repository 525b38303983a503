"""The ALPN names a TLS ClientHello offers, read from its first record (RFC 8446 §4.1.2, RFC 7301).

Why: the server's one port tells a TLS-wrapped data connection (ALPN
``homeport-data/1``) from a control connection (``homeport-control/1``)
*before* its handshake, by peeking at the ClientHello — the control path stays
exactly what it was (asyncio runs its TLS), and only a wrapped data connection
goes to the relay's TLS terminator. The detection rule is documented in
:mod:`homeport.wire.data`.

Pure, untrusted input: :func:`offered_alpn_untrusted` returns None while the
first record is incomplete, the offered names once it is, and raises only
:class:`~homeport.wire.errors.WireError` on malformed bytes. A ClientHello
larger than one record (never the case for homeport's clients) is reported as
offering nothing, which the server treats as a control connection.
"""

from __future__ import annotations

from homeport.wire.errors import WireError

#: TLS record header: type (1), legacy version (2), length (2).
RECORD_HEADER = 5
#: Largest TLS plaintext record (RFC 8446 §5.1); a longer length is refused.
MAX_RECORD = 16 * 1024
#: Most bytes the server peeks to read a ClientHello (one full record).
MAX_PEEK = RECORD_HEADER + MAX_RECORD
#: Most ALPN names we collect from one ClientHello.
MAX_ALPN_NAMES = 16
CONTENT_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
EXT_ALPN = 16


class _Reader:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise WireError(f"ClientHello truncated in {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, len_bytes: int, what: str) -> _Reader:
        n = self.uint(len_bytes, what)
        start = self.pos
        self.take(n, what)
        return _Reader(self.data, start, start + n)

    @property
    def left(self) -> int:
        return self.end - self.pos


def record_length_untrusted(data: bytes) -> int | None:
    """Bytes the first record needs in all (header included), or None before its header.

    Raises:
        WireError: not a TLS handshake record, or a length over :data:`MAX_RECORD`.
    """
    if len(data) < RECORD_HEADER:
        if data and data[0] != CONTENT_HANDSHAKE:
            raise WireError("not a TLS handshake record")
        return None
    if data[0] != CONTENT_HANDSHAKE or data[1] != 0x03:
        raise WireError("not a TLS handshake record")
    length = int.from_bytes(data[3:5], "big")
    if length == 0 or length > MAX_RECORD:
        raise WireError(f"TLS record length {length} out of range")
    return RECORD_HEADER + length


def offered_alpn_untrusted(data: bytes) -> tuple[str, ...] | None:
    """The ALPN names the ClientHello in ``data``'s first record offers (None: need more bytes).

    Raises:
        WireError: malformed record or ClientHello.
    """
    need = record_length_untrusted(data)
    if need is None or len(data) < need:
        return None
    rec = _Reader(bytes(data), RECORD_HEADER, need)
    if rec.uint(1, "handshake type") != HANDSHAKE_CLIENT_HELLO:
        raise WireError("first handshake message is not a ClientHello")
    body_len = rec.uint(3, "handshake length")
    if body_len > rec.left:
        return ()  # spans records: not one of ours, so it is no data connection
    hello = _Reader(rec.data, rec.pos, rec.pos + body_len)
    hello.take(2 + 32, "version and random")
    hello.vector(1, "session id")
    hello.vector(2, "cipher suites")
    hello.vector(1, "compression methods")
    if hello.left == 0:
        return ()  # no extensions at all
    exts = hello.vector(2, "extensions")
    if hello.left:
        raise WireError("bytes after the ClientHello extensions")
    names: list[str] = []
    while exts.left:
        ext_type = exts.uint(2, "extension type")
        body = exts.vector(2, "extension body")
        if ext_type != EXT_ALPN:
            continue
        if names:
            raise WireError("two ALPN extensions")
        lst = body.vector(2, "ALPN list")
        if body.left:
            raise WireError("bytes after the ALPN list")
        while lst.left:
            raw = lst.vector(1, "ALPN name")
            name = raw.take(raw.left, "ALPN name")
            if not name:
                raise WireError("empty ALPN name")
            if len(names) >= MAX_ALPN_NAMES:
                raise WireError(f"over {MAX_ALPN_NAMES} ALPN names")
            names.append(name.decode("latin-1"))
        if not names:
            raise WireError("empty ALPN list")
    return tuple(names)
