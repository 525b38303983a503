"""A stream whose data phase uses homeport's own record layer (``homeport-stream/2``).

The TLS 1.3 handshake (mutual, pinned) is unchanged; when both ends offered
``homeport-stream/2`` in ALPN, :func:`negotiate` runs a fresh X25519 exchange
*inside* that TLS session, derives per-direction AES-256-GCM keys bound to it
(:func:`homeport.proto.records.derive_keys`), and from then on the TCP bytes are
:mod:`homeport.proto.records` records instead of TLS records. Why, and the
security argument: that module and docs/architecture.md ("Threat model").

Why a stand-in for ``SSLObject`` and two ``MemoryBIO``: the pump
(:mod:`homeport.io.pump`) and the direct-path mux (:mod:`homeport.io.muxlink`)
drive a :class:`~homeport.io.tlsstream.TlsStream` through exactly these calls
(``obj.write/read/pending/unwrap``, ``incoming.write/write_eof/pending``,
``outgoing.read/pending``) with exact half-close semantics. :class:`RecStream`
is a ``TlsStream`` whose three members implement the same calls over the record
machine, so both loops run over it unchanged, with the same guarantees:

* ``obj.read`` raises ``ssl.SSLWantReadError`` when no whole record is buffered,
  ``ssl.SSLZeroReturnError`` after the peer's authenticated END record, an
  ``ssl.SSLEOFError`` subclass for a transport EOF without END (truncation) and
  an ``ssl.SSLError`` subclass for anything unauthentic or malformed (the loops
  abort on it). Nothing from a record that failed is ever returned.
* ``obj.unwrap`` queues our END record; it returns when the peer's END was
  already received, else raises ``ssl.SSLWantReadError`` (as TLS 1.3's
  close_notify does through ``unwrap``).
* ``incoming.pending`` counts only *whole* records (a partial record is already
  "consumed" into the reassembly buffer, as OpenSSL does), so the loops' rule
  "read the socket only when the BIO is empty" still holds.

Copies: records are sealed straight into one of two preallocated send buffers
(``encrypt_into``; ``outgoing.read`` hands out a view of the filled one and
swaps, so a view stays valid until the next ``read``), and opened straight into
the caller's buffer when it has room for a whole record (``decrypt_into``).

This module imports only the standard library at module level; the record
machine (and ``cryptography``) is imported when a stream actually uses it, so
``homeport nc`` pays that import only for a ``homeport-stream/2`` stream.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from homeport.io.tlsstream import TlsStream
from homeport.wire.errors import WireError

if TYPE_CHECKING:
    from homeport.proto.records import Opener, Sealer

#: The ALPN name of the record layer (same value as proto.records.ALPN_RECORDS,
#: repeated here so that choosing it needs no import of ``cryptography``).
ALPN_RECORDS = "homeport-stream/2"
# The record machine's sizes, repeated so that the hot loop needs no import
# (a test checks they equal homeport.proto.records').
_HEADER = 4
_TAG = 16
_MAX_RECORD = 64 * 1024
_KIND_END = 0x02

#: Environment switch: "0" stops offering (and accepting) the record layer.
ENV_SWITCH = "HOMEPORT_RECORDS"
#: Key-exchange message inside TLS: version (1) | X25519 public key (32) | random (32)
#: | SHA-256 of the certificate the sender authenticated as its peer (32).
KEX_VERSION = 1
KEX_LEN = 1 + 32 + 32 + 32
#: Initial capacity of each of the two send buffers (one whole record); a bulk
#: stream grows them by doubling to what it needs (the pump: ~512 KiB), so an
#: interactive stream never pays for bulk buffers (zeroing 1.8 MiB per stream end
#: measured 1.5 ms of set-up).
OUT_BUFFER = 80 * 1024
#: Initial reassembly buffer for received bytes (grown by doubling as needed).
IN_BUFFER = 80 * 1024
#: Bytes read per ``recv`` while waiting for the peer's key-exchange message.
KEX_READ_SIZE = 64 * 1024


def enabled() -> bool:
    """Whether this process offers ``homeport-stream/2``: only with ``HOMEPORT_RECORDS=1``
    (off by default: measured too small a gain to switch, see docs/benchmarks.md)."""
    return os.environ.get(ENV_SWITCH, "0") == "1"


class RecordError(ssl.SSLError):
    """A record failed (unauthentic, malformed, after END): the stream must abort."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RecordTruncated(ssl.SSLEOFError):
    """The transport ended before the peer's END record: a truncation, never a clean EOF."""


class _Outgoing:
    """Stand-in for the outgoing ``MemoryBIO``: sealed records waiting for the socket."""

    __slots__ = ("_bufs", "_fill", "_len")

    def __init__(self) -> None:
        self._bufs = [memoryview(bytearray(OUT_BUFFER)), memoryview(bytearray(OUT_BUFFER))]
        self._fill = 0
        self._len = 0

    @property
    def pending(self) -> int:
        return self._len

    def room(self, need: int) -> tuple[memoryview, int]:
        """The fill buffer and offset with room for ``need`` more bytes (grown if needed)."""
        buf = self._bufs[self._fill]
        if self._len + need > len(buf):
            bigger = memoryview(bytearray(max(2 * len(buf), self._len + need)))
            bigger[: self._len] = buf[: self._len]
            self._bufs[self._fill] = buf = bigger
        return buf, self._len

    def advance(self, n: int) -> None:
        self._len += n

    def read(self, size: int = -1) -> memoryview:
        """Hand out every sealed byte (``size`` is ignored: records are not split).

        The view stays valid until the next ``read``; the buffers then swap.
        """
        del size
        out = self._bufs[self._fill][: self._len]
        self._fill ^= 1
        self._len = 0
        return out


class _Incoming:
    """Stand-in for the incoming ``MemoryBIO``: received bytes, reassembled into records.

    The header of the record at ``_start`` is parsed as soon as it is here, so that
    ``pending`` is exact (whole records only) and the reader is never called just to
    raise WANT_READ; a malformed header is kept in ``_err`` for the reader to raise.
    """

    __slots__ = ("_buf", "_end", "_err", "_mv", "_next", "_size_of", "_start", "eof")

    def __init__(self, size_of: Callable[[memoryview], int] | None = None) -> None:
        self._buf = bytearray(IN_BUFFER)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._next = 0  # wire size of the record at _start, 0 = not known yet
        self._size_of = size_of
        self._err: WireError | None = None
        self.eof = False

    @property
    def pending(self) -> int:
        """Bytes of whole records waiting (0 while only part of a record is here)."""
        avail = self._end - self._start
        if self._err is not None:
            return avail or 1
        return avail if self._next and avail >= self._next else 0

    def _parse(self) -> None:
        if self._end - self._start >= _HEADER and self._size_of is not None:
            try:
                self._next = self._size_of(self._mv[self._start : self._start + _HEADER])
            except WireError as exc:
                self._err = exc

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if self._end + n > len(self._buf):
            keep = self._end - self._start
            if keep + n > len(self._buf):
                bigger = bytearray(max(2 * len(self._buf), keep + n))
                bigger[:keep] = self._mv[self._start : self._end]
                self._mv.release()
                self._buf, self._mv = bigger, memoryview(bigger)
            else:
                self._mv[:keep] = self._mv[self._start : self._end]
            self._start, self._end = 0, keep
        self._mv[self._end : self._end + n] = data
        self._end += n
        if self._next == 0 and self._err is None:
            self._parse()
        return n

    def write_eof(self) -> None:
        self.eof = True


class RecordSession:
    """Stand-in for ``ssl.SSLObject`` over the record machine (see the module doc)."""

    __slots__ = (
        "_end_sent",
        "_in",
        "_opener",
        "_out",
        "_peer_cert",
        "_peer_ended",
        "_pt",
        "_pt_len",
        "_pt_off",
        "_sealer",
    )

    def __init__(
        self,
        sealer: Sealer,
        opener: Opener,
        incoming: _Incoming,
        outgoing: _Outgoing,
        peer_cert: bytes | None,
    ) -> None:
        self._sealer = sealer
        self._opener = opener
        self._in = incoming
        incoming._size_of = opener.record_size_untrusted
        incoming._parse()
        self._out = outgoing
        self._peer_cert = peer_cert
        self._pt = memoryview(bytearray(_MAX_RECORD))  # a record too big for the caller
        self._pt_off = self._pt_len = 0
        self._end_sent = False
        self._peer_ended = False

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._peer_cert if binary_form else None

    def selected_alpn_protocol(self) -> str:
        return ALPN_RECORDS

    def pending(self) -> int:
        return self._pt_len - self._pt_off

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Seal all of ``data`` into 64 KiB records (like ``SSLObject.write``, takes all)."""
        if self._end_sent:
            raise RecordError("write after our END record")
        n = len(data)
        if n == 0:
            return 0
        out = self._out
        seal = self._sealer.seal_into
        try:
            if n <= _MAX_RECORD:  # the common case: one record
                buf, off = out.room(n + _HEADER + _TAG)
                out._len = off + seal(buf, off, data)
                return n
            mv = data if type(data) is memoryview else memoryview(data)
            buf, off = out.room(n + -(-n // _MAX_RECORD) * (_HEADER + _TAG))
            pos = 0
            while pos < n:
                chunk = mv[pos : pos + _MAX_RECORD]
                off += seal(buf, off, chunk)
                pos += len(chunk)
            out._len = off
        except WireError as exc:  # the record limit
            raise RecordError(str(exc)) from None
        return n

    def unwrap(self) -> None:
        """Queue our END record; return if the peer's END already came, else WANT_READ."""
        if not self._end_sent:
            buf, off = self._out.room(_HEADER + _TAG)
            self._out.advance(self._sealer.seal_into(buf, off, b"", end=True))
            self._end_sent = True
        if not self._peer_ended:
            raise ssl.SSLWantReadError("END sent; the peer's END has not arrived")

    def read(self, size: int = 1024, buffer: Any = None) -> Any:
        """Deliver up to ``size`` authenticated bytes (into ``buffer`` if given)."""
        if self._pt_off < self._pt_len:  # the rest of a record that did not fit before
            k = min(size, self._pt_len - self._pt_off)
            chunk = self._pt[self._pt_off : self._pt_off + k]
            self._pt_off += k
            if self._pt_off == self._pt_len:
                self._pt_off = self._pt_len = 0
            if buffer is None:
                return bytes(chunk)
            buffer[:k] = chunk
            return k
        if self._peer_ended:
            raise ssl.SSLZeroReturnError("the peer's END record was received")
        inc = self._in
        if inc._err is not None:
            raise RecordError(str(inc._err))
        nxt = inc._next
        start = inc._start
        if nxt == 0 or inc._end - start < nxt:
            if inc.eof:
                raise RecordTruncated("connection truncated without END record")
            raise ssl.SSLWantReadError("no whole record buffered")
        direct = buffer is not None and nxt - _HEADER - _TAG <= size
        dst = self._pt
        if direct:
            dst = buffer if type(buffer) is memoryview else memoryview(buffer)
        try:
            got = self._opener.open_sized_untrusted(inc._mv, start, nxt, dst)
        except WireError as exc:
            raise RecordError(str(exc)) from None
        inc._next = 0
        if start + nxt == inc._end:
            inc._start = inc._end = 0
        else:
            inc._start = start + nxt
        if got < 0:  # the peer's END record
            self._peer_ended = True
            if inc._end != inc._start:
                raise RecordError("bytes after the peer's END record")
            raise ssl.SSLZeroReturnError("the peer's END record was received")
        if inc._start:
            inc._parse()
        if direct:
            return got
        self._pt_off, self._pt_len = 0, got
        return self.read(size, buffer)


class RecStream(TlsStream):
    """A :class:`TlsStream` whose ``obj``/``incoming``/``outgoing`` run the record layer.

    The members are typed as their ``ssl`` counterparts (``cast``) because the two
    loops that drive them use exactly that subset; tests run both loops over it.
    """

    __slots__ = ("tls_obj",)

    def __init__(
        self,
        sock: socket.socket,
        tls_obj: ssl.SSLObject,
        session: RecordSession,
        incoming: _Incoming,
        outgoing: _Outgoing,
    ) -> None:
        super().__init__(
            sock,
            cast(ssl.SSLObject, session),
            cast(ssl.MemoryBIO, incoming),
            cast(ssl.MemoryBIO, outgoing),
        )
        self.tls_obj = tls_obj

    def peer_cert_der(self) -> bytes | None:
        return self.tls_obj.getpeercert(binary_form=True)

    def send_blocking(self, data: bytes, timeout: float = 10.0) -> None:
        self.obj.write(data)
        self.sock.settimeout(timeout)
        self.sock.sendall(self.outgoing.read())


class KexError(ssl.SSLError):
    """The record layer's key exchange failed (malformed message, wrong certificate)."""


def negotiate(stream: TlsStream, *, server_side: bool, timeout: float) -> TlsStream:
    """If the handshake chose ``homeport-stream/2``, switch ``stream`` to records.

    Call after the pin check. Each side sends, as one TLS record, a fresh X25519
    public key, 32 random bytes and the SHA-256 of the peer certificate it pinned, and reads
    the peer's; keys come from :func:`homeport.proto.records.derive_keys`. The
    TLS session is not used again: the next byte on the socket is a record.

    Raises:
        KexError, ssl.SSLError: the exchange failed (the caller closes the stream).
        TimeoutError, OSError: the transport failed or was too slow.
    """
    if stream.obj.selected_alpn_protocol() != ALPN_RECORDS:
        return stream
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    from homeport.proto import records

    deadline = time.monotonic() + timeout
    peer_der = stream.peer_cert_der()
    if peer_der is None:
        raise KexError("peer presented no certificate")
    peer_fp = hashlib.sha256(peer_der).digest()  # the certificate TLS authenticated (pinned)
    priv = X25519PrivateKey.generate()
    random = os.urandom(records.RANDOM_LEN)
    obj, sock = stream.obj, stream.sock
    obj.write(bytes([KEX_VERSION]) + priv.public_key().public_bytes_raw() + random + peer_fp)
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    sock.sendall(stream.outgoing.read())
    got = b""
    while len(got) < KEX_LEN:
        try:
            got += obj.read(KEX_LEN - len(got))
            continue
        except ssl.SSLWantReadError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("record-layer key exchange timed out")
        sock.settimeout(left)
        chunk = sock.recv(KEX_READ_SIZE)
        if not chunk:
            raise KexError("connection closed during the record-layer key exchange")
        stream.incoming.write(chunk)
    sock.settimeout(None)
    if obj.pending() or stream.outgoing.pending:
        raise KexError("unexpected TLS data after the key exchange")
    if got[0] != KEX_VERSION:
        raise KexError(f"unknown key-exchange version {got[0]}")
    try:
        shared = priv.exchange(X25519PublicKey.from_public_bytes(got[1:33]))
    except ValueError as exc:  # an all-zero (low-order) share
        raise KexError(f"bad X25519 share: {exc}") from None
    peer_random = got[33:65]
    # Each side names the certificate it authenticated; both feed the key schedule,
    # so the keys are bound to this pair of identities as each end saw them.
    me_as_seen = got[65:97]
    if server_side:
        c2s, s2c = records.derive_keys(
            shared, peer_random, random, client_fp=peer_fp, server_fp=me_as_seen
        )
        sealer, opener = records.Sealer(s2c), records.Opener(c2s)
    else:
        c2s, s2c = records.derive_keys(
            shared, random, peer_random, client_fp=me_as_seen, server_fp=peer_fp
        )
        sealer, opener = records.Sealer(c2s), records.Opener(s2c)
    incoming, outgoing = _Incoming(), _Outgoing()
    leftover = stream.incoming.read()  # records the peer sent right behind its message
    if leftover:
        incoming.write(leftover)
    session = RecordSession(sealer, opener, incoming, outgoing, peer_der)
    return RecStream(sock, stream.obj, session, incoming, outgoing)
