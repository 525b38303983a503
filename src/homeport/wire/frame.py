"""Control-channel framing (inside TLS), protocol version 1.

Byte layout of one frame::

    0                   1                   2                   3
    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |                  length (u32, big endian)                     |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |   type (u8)   |  body: length-1 bytes, a UTF-8 JSON object …  |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

``length`` counts the type byte and the body, so the smallest frame is
``00 00 00 01 TT`` (an empty body means ``{}``). A length of 0 or above
:data:`MAX_FRAME` is a protocol error: the decoder checks it before buffering
the body, so a peer cannot make us allocate more than MAX_FRAME + 4 bytes.

Why JSON bodies: control traffic is a few messages per connection per minute,
JSON is extensible (unknown keys are ignored, so newer peers can add fields)
and debuggable; the hot data path never touches this framing.
"""

from __future__ import annotations

import struct

from homeport.wire.errors import TooLarge, WireError

#: Largest frame (type + body). A network map of ~2000 nodes fits; anything
#: larger is refused before a byte of it is buffered.
MAX_FRAME = 1024 * 1024
HEADER = struct.Struct(">IB")


def encode_frame(msg_type: int, body: bytes) -> bytes:
    """Return one frame. Raises ValueError for a local misuse (too large, bad type)."""
    if not 0 <= msg_type <= 0xFF:
        raise ValueError(f"frame type {msg_type} out of range")
    if len(body) + 1 > MAX_FRAME:
        raise ValueError(f"frame body of {len(body)} bytes exceeds MAX_FRAME")
    return HEADER.pack(len(body) + 1, msg_type) + body


class FrameDecoder:
    """Incremental decoder: feed bytes, pop complete ``(type, body)`` frames.

    After a WireError the decoder is poisoned (``failed`` is set) because the
    stream has lost framing; the caller must close the connection.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        #: The largest frame accepted now; the owner may raise it later (pre-auth limits).
        self.max_frame = max_frame
        self.failed: WireError | None = None

    def feed_untrusted(self, data: bytes) -> list[tuple[int, bytes]]:
        """Append ``data`` and return every frame it completes.

        Raises:
            WireError: a zero or oversized length field; the decoder stays failed.
        """
        if self.failed is not None:
            raise self.failed
        self._buf += data
        frames: list[tuple[int, bytes]] = []
        while len(self._buf) >= 4:
            (length,) = struct.unpack_from(">I", self._buf, 0)
            if length == 0:
                self.failed = WireError("zero-length frame")
                raise self.failed
            if length > self.max_frame:
                self.failed = TooLarge(f"frame of {length} bytes exceeds limit {self.max_frame}")
                raise self.failed
            if len(self._buf) < 4 + length:
                break
            msg_type = self._buf[4]
            body = bytes(self._buf[5 : 4 + length])
            del self._buf[: 4 + length]
            frames.append((msg_type, body))
        return frames

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._buf)
