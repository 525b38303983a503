"""Mux framing: golden bytes, header checks before buffering, split feeds, fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homeport.wire import mux as w
from homeport.wire.errors import TooLarge, UnknownType, WireError
from homeport.wire.mux import MuxDecoder, MuxError, MuxFrame, MuxType

GOLDEN = [
    (w.encode(MuxType.DATA, 1, b"hi"), "00000000000100000002" + "6869"),
    (
        w.encode_json(MuxType.OPEN, 3, {"service": "ssh"}),
        "01000000000300000011" + b'{"service":"ssh"}'.hex(),
    ),
    (w.encode_window(2, 65536), "04000000000200000004" + "00010000"),
    (w.encode(MuxType.FIN, 5), "05000000000500000000"),
    (w.encode_ping(MuxType.PING, 7), "07000000000000000008" + "0000000000000007"),
    (w.encode_ping(MuxType.PONG, 7), "08000000000000000008" + "0000000000000007"),
    (
        w.encode_json(MuxType.GOAWAY, 0, {"code": "shutdown", "reason": ""}),
        "0900000000000000001f" + b'{"code":"shutdown","reason":""}'.hex(),
    ),
]


def test_golden_bytes() -> None:
    for frame, hexed in GOLDEN:
        assert frame.hex() == hexed
    assert w.HEADER_LEN == 10 and w.MAX_MUX_PAYLOAD == 65536


def test_golden_decode_round_trip() -> None:
    blob = b"".join(f for f, _ in GOLDEN)
    frames = MuxDecoder().feed_untrusted(blob)
    assert [f.type for f in frames] == [
        MuxType.DATA,
        MuxType.OPEN,
        MuxType.WINDOW,
        MuxType.FIN,
        MuxType.PING,
        MuxType.PONG,
        MuxType.GOAWAY,
    ]
    assert frames[0] == MuxFrame(MuxType.DATA, 1, b"hi")
    assert w.json_untrusted(frames[1].payload) == {"service": "ssh"}
    assert w.u32_untrusted(frames[2].payload) == 65536
    assert w.u64_untrusted(frames[4].payload) == 7
    assert w.code_reason_untrusted(frames[6].payload) == ("shutdown", "")


def test_every_split_point_gives_the_same_frames() -> None:
    blob = b"".join(f for f, _ in GOLDEN) + w.encode(MuxType.DATA, 9, bytes(range(256)) * 250)
    whole = MuxDecoder().feed_untrusted(blob)
    for cut in [*range(40), len(blob) // 2, len(blob) - 5, len(blob)]:
        d = MuxDecoder()
        got = d.feed_untrusted(blob[:cut]) + d.feed_untrusted(memoryview(blob)[cut:])
        assert got == whole, cut
        assert d.buffered == 0
    d = MuxDecoder()
    byte_by_byte: list[MuxFrame] = []
    for i in range(len(blob) - 1000):
        byte_by_byte += d.feed_untrusted(blob[i : i + 1])
    byte_by_byte += d.feed_untrusted(blob[len(blob) - 1000 :])
    assert byte_by_byte == whole


@pytest.mark.parametrize(
    ("raw", "exc", "what"),
    [
        (bytes.fromhex("0a000000000100000000"), UnknownType, "unknown type"),
        (bytes.fromhex("00010000000100000001") + b"x", MuxError, "flags"),
        (bytes.fromhex("00000000000100010001"), TooLarge, "64 KiB + 1"),
        (bytes.fromhex("00000000000000000001") + b"x", MuxError, "DATA on stream 0"),
        (bytes.fromhex("07000000000100000008") + bytes(8), MuxError, "PING on a stream"),
        (bytes.fromhex("04000000000100000003") + bytes(3), MuxError, "short WINDOW"),
        (bytes.fromhex("05000000000100000001") + b"x", MuxError, "FIN with payload"),
        (bytes.fromhex("00000000000100000000"), MuxError, "empty DATA"),
    ],
)
def test_bad_headers_fail_before_the_payload_arrives(
    raw: bytes, exc: type[WireError], what: str
) -> None:
    d = MuxDecoder()
    with pytest.raises(exc):
        d.feed_untrusted(raw[: w.HEADER_LEN])  # the header alone is enough to refuse
    assert d.failed is not None
    with pytest.raises(exc):
        d.feed_untrusted(b"")  # poisoned


def test_header_checked_when_it_straddles_feeds() -> None:
    d = MuxDecoder()
    assert d.feed_untrusted(bytes.fromhex("0000000000")) == []
    with pytest.raises(TooLarge):
        d.feed_untrusted(bytes.fromhex("0100ffffffff"))


def test_decoder_never_holds_more_than_one_frame() -> None:
    d = MuxDecoder()
    frame = w.encode(MuxType.DATA, 1, bytes(w.MAX_MUX_PAYLOAD))
    d.feed_untrusted(frame[:-1])
    assert d.buffered == len(frame) - 1 == w.HEADER_LEN + w.MAX_MUX_PAYLOAD - 1
    assert d.feed_untrusted(frame[-1:]) == [MuxFrame(MuxType.DATA, 1, bytes(w.MAX_MUX_PAYLOAD))]


@pytest.mark.parametrize(
    "payload", [b"\xff", b"[1]", b"nope", b'{"code": 5}', b'{"reason": "' + b"x" * 2000 + b'"}']
)
def test_bad_json_payloads(payload: bytes) -> None:
    with pytest.raises(MuxError):
        w.code_reason_untrusted(payload)


def test_encoder_refuses_misuse() -> None:
    with pytest.raises(ValueError):
        w.encode(MuxType.DATA, 1, bytes(w.MAX_MUX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        w.encode_window(1, 0)
    with pytest.raises(ValueError):
        w.encode_json(MuxType.DATA, 1, {})
    with pytest.raises(ValueError):
        w.header(MuxType.DATA, -1, 0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_fuzz_decoder_raises_only_wire_errors(data: bytes, cut: int) -> None:
    d = MuxDecoder()
    try:
        for f in d.feed_untrusted(data[:cut]) + d.feed_untrusted(data[cut:]):
            if f.type in w.JSON_TYPES:
                w.code_reason_untrusted(f.payload)
    except WireError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([MuxType.DATA, MuxType.FIN]),
            st.integers(1, 9),
            st.binary(min_size=1, max_size=70),
        ),
        max_size=8,
    ),
    st.integers(min_value=1, max_value=50),
)
def test_fuzz_valid_streams_survive_any_chunking(
    frames: list[tuple[MuxType, int, bytes]], step: int
) -> None:
    wire = b"".join(w.encode(t, sid, p if t is MuxType.DATA else b"") for t, sid, p in frames)
    d = MuxDecoder()
    got: list[MuxFrame] = []
    for i in range(0, len(wire), step):
        got += d.feed_untrusted(wire[i : i + step])
    assert got == [MuxFrame(t, sid, p if t is MuxType.DATA else b"") for t, sid, p in frames]
