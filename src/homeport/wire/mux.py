"""Stream-multiplexer framing for direct paths, mux version 1 (inside node-to-node TLS 1.3).

Why a mux: a direct path costs a hole punch (a coordinated TCP simultaneous
open through two NATs) and a TLS handshake. Doing that per ``ssh`` would add
seconds and fail often; keeping *one* punched, mutually authenticated TLS
connection per peer and carrying every stream inside it makes a new stream cost
one round trip (OPEN → OPEN_OK), keeps the NAT mapping warm with keepalives,
and lets the path manager measure the path (RTT from PING/PONG) and notice its
death within seconds.

Byte layout of one frame (10-byte header, big endian)::

    0                   1                   2                   3
    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |   type (u8)   |  flags (u8)   |    stream_id (u32) ...        |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |   ... stream_id               |    length (u32) ...           |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |   ... length                  |  payload: length bytes ...    |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

Types and their payloads (``sid`` = stream_id; 0 means the connection):

==========  ====  =====  =============================================
type        code  sid    payload
==========  ====  =====  =============================================
DATA        0x00  ≠ 0    1 … 65536 stream bytes
OPEN        0x01  ≠ 0    JSON object (service, …) — opens stream sid
OPEN_OK     0x02  ≠ 0    JSON object (host_keys, …)
OPEN_FAIL   0x03  ≠ 0    JSON object {code, reason}
WINDOW      0x04  ≠ 0    u32 increment ≥ 1 of the sender's receive window
FIN         0x05  ≠ 0    empty — the sender will send no more DATA
RST         0x06  ≠ 0    JSON object {reason} — abort both directions
PING        0x07  0      u64 opaque (the sender's sequence number)
PONG        0x08  0      u64 echoed from the PING
GOAWAY      0x09  0      JSON object {code, reason}
==========  ====  =====  =============================================

``flags`` is reserved and must be 0 in version 1. Every check that needs only
the header (type known, flags, stream id 0 or not, payload length allowed for
the type, length ≤ :data:`MAX_MUX_PAYLOAD`) is made *before* the payload is
buffered, so a peer cannot make the decoder hold more than one header plus
one maximal payload. DATA payloads are not copied more than once on the way
in (see :class:`MuxDecoder`).

Why JSON for OPEN/OPEN_OK/…: they are once per stream, extensible (unknown keys
are ignored) and debuggable; the DATA hot path is a fixed binary header.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

from homeport.wire.errors import TooLarge, UnknownType, WireError

#: Mux protocol version (announced by the ALPN / capability that selects the mux).
MUX_VERSION = 1
#: Header: type u8, flags u8, stream_id u32, length u32.
HEADER = struct.Struct(">BBII")
HEADER_LEN = HEADER.size
#: Largest payload of one frame; DATA is cut into frames of at most this size.
MAX_MUX_PAYLOAD = 64 * 1024
#: Bytes one DATA frame occupies at most (header + largest payload): drivers that
#: read stream bytes straight into frame layout (:func:`data_payload_slots`) space
#: payloads this far apart.
DATA_SLOT = HEADER_LEN + MAX_MUX_PAYLOAD
#: Largest stream id (u32); ids are never reused within a connection.
MAX_STREAM_ID = 0xFFFFFFFF
#: Largest WINDOW increment (a window may never exceed 2**31 - 1, as in HTTP/2).
MAX_WINDOW_INCREMENT = 0x7FFFFFFF
#: Longest code in OPEN_FAIL / GOAWAY, and reason in OPEN_FAIL / RST / GOAWAY (characters).
MAX_CODE_LEN = 64
MAX_REASON_LEN = 1024

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class MuxError(WireError):
    """The peer broke the mux protocol (bad frame or illegal frame for the stream's state)."""

    code = "mux"


class MuxType(enum.IntEnum):
    DATA = 0x00
    OPEN = 0x01
    OPEN_OK = 0x02
    OPEN_FAIL = 0x03
    WINDOW = 0x04
    FIN = 0x05
    RST = 0x06
    PING = 0x07
    PONG = 0x08
    GOAWAY = 0x09


#: Frame types that belong to the connection (stream id 0); all others need id ≠ 0.
CONNECTION_TYPES = frozenset({MuxType.PING, MuxType.PONG, MuxType.GOAWAY})
#: Frame types whose payload is a JSON object.
JSON_TYPES = frozenset(
    {MuxType.OPEN, MuxType.OPEN_OK, MuxType.OPEN_FAIL, MuxType.RST, MuxType.GOAWAY}
)
#: Exact payload length per fixed-size type.
_FIXED_LEN = {MuxType.WINDOW: 4, MuxType.FIN: 0, MuxType.PING: 8, MuxType.PONG: 8}
_TYPES = {int(t): t for t in MuxType}


@dataclass(frozen=True, slots=True)
class MuxFrame:
    """One decoded frame; ``payload`` is raw (see the ``*_untrusted`` helpers to read it)."""

    type: MuxType
    stream_id: int
    #: ``bytes``, or a view of the fed buffer for DATA from a ``borrow_data`` decoder.
    payload: bytes | memoryview


# -- encoding (local; misuse raises ValueError) -----------------------------------


def header(msg_type: MuxType, stream_id: int, length: int) -> bytes:
    """The 10-byte header of a frame (the DATA path writes header and payload separately)."""
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range")
    if not 0 <= length <= MAX_MUX_PAYLOAD:
        raise ValueError(f"payload of {length} bytes exceeds MAX_MUX_PAYLOAD")
    return HEADER.pack(msg_type, 0, stream_id, length)


def encode(msg_type: MuxType, stream_id: int, payload: bytes = b"") -> bytes:
    """One whole frame."""
    return header(msg_type, stream_id, len(payload)) + payload


def encode_json(msg_type: MuxType, stream_id: int, obj: dict[str, Any]) -> bytes:
    """A frame whose payload is ``obj`` as compact UTF-8 JSON."""
    if msg_type not in JSON_TYPES:
        raise ValueError(f"{msg_type.name} does not carry JSON")
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return encode(msg_type, stream_id, body)


def encode_window(stream_id: int, increment: int) -> bytes:
    if not 1 <= increment <= MAX_WINDOW_INCREMENT:
        raise ValueError(f"window increment {increment} out of range")
    return encode(MuxType.WINDOW, stream_id, _U32.pack(increment))


def data_payload_slots(buf: memoryview, n: int) -> list[memoryview]:
    """Views of ``buf`` where ``n`` stream bytes go when laid out as DATA frames:
    frame ``i`` starts at ``i * DATA_SLOT``, its payload :data:`HEADER_LEN` later;
    all but the last payload are full, so the frames are contiguous. A driver reads
    into these (one ``recvmsg_into``) and lets the mux write the headers, so the
    bytes are never copied between the socket and the TLS layer."""
    slots = []
    off = 0
    while n > 0:
        size = min(MAX_MUX_PAYLOAD, n)
        slots.append(buf[off + HEADER_LEN : off + HEADER_LEN + size])
        off += DATA_SLOT
        n -= size
    return slots


def encode_ping(msg_type: MuxType, value: int) -> bytes:
    """PING or PONG carrying the u64 ``value``."""
    if msg_type not in (MuxType.PING, MuxType.PONG):
        raise ValueError("not PING/PONG")
    return encode(msg_type, 0, _U64.pack(value & 0xFFFFFFFFFFFFFFFF))


# -- decoding (untrusted) ----------------------------------------------------------


def check_header_untrusted(msg_type: int, flags: int, stream_id: int, length: int) -> MuxType:
    """Validate a header before its payload is buffered. Raises WireError subclasses only."""
    t = _TYPES.get(msg_type)
    if t is None:
        raise UnknownType(f"unknown mux frame type 0x{msg_type:02x}")
    if flags != 0:
        raise MuxError(f"{t.name} frame with reserved flags 0x{flags:02x}")
    if length > MAX_MUX_PAYLOAD:
        raise TooLarge(f"mux frame of {length} bytes exceeds limit {MAX_MUX_PAYLOAD}")
    if (t in CONNECTION_TYPES) != (stream_id == 0):
        raise MuxError(f"{t.name} frame on stream id {stream_id}")
    fixed = _FIXED_LEN.get(t)
    if fixed is not None and length != fixed:
        raise MuxError(f"{t.name} payload must be {fixed} bytes, got {length}")
    if t is MuxType.DATA and length == 0:
        raise MuxError("empty DATA frame")
    return t


def json_untrusted(payload: bytes | memoryview) -> dict[str, Any]:
    """The JSON object of an OPEN/OPEN_OK/OPEN_FAIL/RST/GOAWAY payload."""
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MuxError(f"mux JSON payload does not parse: {exc}") from None
    if not isinstance(obj, dict):
        raise MuxError("mux JSON payload is not an object")
    return obj


def code_reason_untrusted(payload: bytes | memoryview) -> tuple[str, str]:
    """``(code, reason)`` of OPEN_FAIL / GOAWAY, or ``("", reason)`` of RST; both bounded."""
    obj = json_untrusted(payload)
    code = obj.get("code", "")
    reason = obj.get("reason", "")
    if not isinstance(code, str) or not isinstance(reason, str):
        raise MuxError("code and reason must be strings")
    if len(code) > MAX_CODE_LEN or len(reason) > MAX_REASON_LEN:
        raise MuxError("code or reason too long")
    return code, reason


def u32_untrusted(payload: bytes | memoryview) -> int:
    if len(payload) != 4:
        raise MuxError("expected a u32 payload")
    return int(_U32.unpack(payload)[0])


def u64_untrusted(payload: bytes | memoryview) -> int:
    if len(payload) != 8:
        raise MuxError("expected a u64 payload")
    return int(_U64.unpack(payload)[0])


class MuxDecoder:
    """Incremental decoder: feed decrypted bytes, get complete frames.

    Copies: frames that arrive whole inside one ``feed`` are sliced straight out
    of the caller's buffer (one copy, into the frame's ``bytes``); only a frame
    that straddles two feeds is assembled in :attr:`_partial`, which never holds
    more than :data:`HEADER_LEN` + :data:`MAX_MUX_PAYLOAD` bytes.

    With ``borrow_data``, DATA frames that arrive whole are not copied at all: their
    payload is a read-only view of the fed buffer, valid only until the caller
    changes that buffer (a driver that writes them out at once, and copies what it
    could not write, saves a copy of every stream byte).

    After a WireError the decoder is poisoned (``failed``): framing is lost.
    """

    def __init__(self, *, borrow_data: bool = False) -> None:
        self._borrow = borrow_data
        self._partial = bytearray()
        self._need = 0  # total bytes of the frame in _partial, once its header is known
        self._ptype = MuxType.DATA
        self._psid = 0
        self.failed: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held of an incomplete frame (≤ HEADER_LEN + MAX_MUX_PAYLOAD)."""
        return len(self._partial)

    def feed_untrusted(self, data: bytes | bytearray | memoryview) -> list[MuxFrame]:
        """Return every frame ``data`` completes. Raises WireError (and stays failed)."""
        if self.failed is not None:
            raise self.failed
        try:
            view = memoryview(data).toreadonly()
            return self._feed(view.cast("B") if view.format != "B" else view)
        except WireError as exc:
            self.failed = exc
            raise

    def _feed(self, view: memoryview) -> list[MuxFrame]:
        frames: list[MuxFrame] = []
        off = 0
        end = len(view)
        part = self._partial
        if part:
            if len(part) < HEADER_LEN:
                take = min(HEADER_LEN - len(part), end)
                part += view[:take]
                off = take
                if len(part) < HEADER_LEN:
                    return frames
                t, flags, sid, length = HEADER.unpack_from(part)
                self._ptype = check_header_untrusted(t, flags, sid, length)
                self._psid = sid
                self._need = HEADER_LEN + length
            take = min(self._need - len(part), end - off)
            part += view[off : off + take]
            off += take
            if len(part) < self._need:
                return frames
            with memoryview(part) as whole:  # one copy, not a slice and then bytes
                frames.append(MuxFrame(self._ptype, self._psid, whole[HEADER_LEN:].tobytes()))
            part.clear()
        unpack = HEADER.unpack_from
        borrow = self._borrow
        while end - off >= HEADER_LEN:
            t, flags, sid, length = unpack(view, off)
            mtype = check_header_untrusted(t, flags, sid, length)
            stop = off + HEADER_LEN + length
            if stop > end:
                self._ptype, self._psid, self._need = mtype, sid, HEADER_LEN + length
                break
            payload: bytes | memoryview = view[off + HEADER_LEN : stop]
            if not (borrow and mtype is MuxType.DATA):
                payload = bytes(payload)
            frames.append(MuxFrame(mtype, sid, payload))
            off = stop
        if off < end:
            part += view[off:]
        return frames
