"""The homeport-stream/2 record machine: vectors, round trips, and every attack on records."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from homeport.io import recstream
from homeport.proto import records as r
from homeport.wire.errors import TooLarge, WireError

SHARED = bytes(range(32))
C_RANDOM = b"\x11" * 32
S_RANDOM = b"\x22" * 32
C_FP = b"\x33" * 32
S_FP = b"\x44" * 32


def keys(shared: bytes = SHARED, c_random: bytes = C_RANDOM) -> tuple[r.DirectionKeys, ...]:
    return r.derive_keys(shared, c_random, S_RANDOM, client_fp=C_FP, server_fp=S_FP)


def open_one(opener: r.Opener, record: bytes) -> tuple[r.RecordKind, bytes]:
    buf = bytearray(r.MAX_RECORD)
    kind, n = opener.open_into_untrusted(record, buf)
    return kind, bytes(buf[:n])


def test_hkdf_matches_rfc5869_case_1() -> None:
    prk = r.hkdf_extract(bytes(range(13)), b"\x0b" * 22)
    assert prk.hex() == "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
    okm = r.hkdf_expand(prk, bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_golden_vectors() -> None:
    """Pin the key schedule and the wire format (a change here breaks old peers)."""
    c2s, s2c = keys()
    assert c2s.secret.hex() == "526cc5dc7472c260384bfc1f6b8cdf2596532db036de4a632ceacff5a695128b"
    assert s2c.secret.hex() == "8b375bbdfcb73867efcb0dc071ce17a7b3bfb093a89df117b524bb9f38b75356"
    sealer = r.Sealer(c2s)
    data = sealer.seal(b"homeport")
    end = sealer.seal(b"", end=True)
    assert data.hex() == "010000180de3cb50e883168829f2fa953fb029dcad5c3e950dc1fa83"
    assert end.hex() == "020000100002b441c4792f340c7fe201a6b1e772"
    # The same bytes from the spec in the module doc, computed independently here.
    key = r.hkdf_expand(c2s.secret, b"hp2 key", 32)
    base = int.from_bytes(r.hkdf_expand(c2s.secret, b"hp2 iv", 12), "big")
    aead = AESGCM(key)
    assert data[4:] == aead.encrypt(base.to_bytes(12, "big"), b"homeport", data[:4])
    assert end[4:] == aead.encrypt((base ^ 1).to_bytes(12, "big"), b"", end[:4])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=12))
def test_round_trip_in_order(chunks: list[bytes]) -> None:
    c2s, _ = keys()
    sealer, opener = r.Sealer(c2s, rekey_records=5), r.Opener(c2s, rekey_records=5)
    for chunk in chunks:
        assert open_one(opener, sealer.seal(chunk)) == (r.RecordKind.DATA, chunk)
    assert open_one(opener, sealer.seal(b"", end=True)) == (r.RecordKind.END, b"")
    assert opener.ended and sealer.ended


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_wire_error(blob: bytes) -> None:
    c2s, _ = keys()
    opener = r.Opener(c2s)
    with pytest.raises(WireError):
        if len(blob) >= 4:
            opener.record_size_untrusted(blob[:4])
        opener.open_into_untrusted(blob, bytearray(r.MAX_RECORD))


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=(4 + 40 + 16) * 8 - 1))
def test_any_flipped_bit_is_refused(bit: int) -> None:
    c2s, _ = keys()
    record = bytearray(r.Sealer(c2s).seal(bytes(40)))
    record[bit // 8] ^= 1 << (bit % 8)
    buf = bytearray(r.MAX_RECORD)
    with pytest.raises(WireError):
        r.Opener(c2s).open_into_untrusted(bytes(record), buf)


def test_reorder_replay_and_drop_are_refused() -> None:
    c2s, _ = keys()
    sealer = r.Sealer(c2s)
    r0, r1 = sealer.seal(b"first"), sealer.seal(b"second")
    with pytest.raises(r.RecordAuthFailed):  # reordered (or r0 dropped)
        open_one(r.Opener(c2s), r1)
    opener = r.Opener(c2s)
    assert open_one(opener, r0)[1] == b"first"
    with pytest.raises(r.RecordAuthFailed):  # replayed
        open_one(opener, r0)


def test_reflected_record_is_refused() -> None:
    c2s, s2c = keys()
    mine = r.Sealer(c2s).seal(b"to the server")
    with pytest.raises(r.RecordAuthFailed):  # sent back at the client, which opens s2c
        open_one(r.Opener(s2c), mine)


def test_injected_or_forged_end_is_refused() -> None:
    c2s, _ = keys()
    data = r.Sealer(c2s).seal(b"payload")
    forged = bytearray(data)
    forged[0] = r.KIND_END  # turn a data record into END
    with pytest.raises(WireError):
        open_one(r.Opener(c2s), bytes(forged))
    fake_end = bytes([r.KIND_END, 0, 0, 16]) + bytes(16)
    with pytest.raises(r.RecordAuthFailed):
        open_one(r.Opener(c2s), fake_end)
    # ... and a genuine END moved earlier than it was sent fails as a reordering.
    sealer = r.Sealer(c2s)
    sealer.seal(b"a")
    end = sealer.seal(b"", end=True)
    with pytest.raises(r.RecordAuthFailed):
        open_one(r.Opener(c2s), end)


def test_nothing_after_end() -> None:
    c2s, _ = keys()
    sealer, opener = r.Sealer(c2s), r.Opener(c2s)
    open_one(opener, sealer.seal(b"", end=True))
    with pytest.raises(r.RecordAfterEnd):
        sealer.seal(b"more")
    with pytest.raises(r.RecordAfterEnd):
        opener.record_size_untrusted(bytes([1, 0, 0, 17]))


def test_key_separation_per_stream_and_direction() -> None:
    a_c2s, a_s2c = keys()
    b_c2s, _ = keys(c_random=b"\x12" * 32)  # another stream: another random
    secrets = {a_c2s.secret, a_s2c.secret, b_c2s.secret}
    assert len(secrets) == 3
    with pytest.raises(r.RecordAuthFailed):  # a record of stream A spliced into stream B
        open_one(r.Opener(b_c2s), r.Sealer(a_c2s).seal(b"x"))
    other_peer = r.derive_keys(SHARED, C_RANDOM, S_RANDOM, client_fp=C_FP, server_fp=C_FP)
    assert other_peer[0].secret != a_c2s.secret  # bound to the certificates


def test_rekey_is_implicit_and_must_agree() -> None:
    c2s, _ = keys()
    sealer, opener = r.Sealer(c2s, rekey_records=3), r.Opener(c2s, rekey_records=3)
    sealed = [sealer.seal(bytes([i])) for i in range(10)]
    assert [open_one(opener, x)[1] for x in sealed] == [bytes([i]) for i in range(10)]
    assert sealer.seq == 1  # 10 records = 3 epochs of 3, then 1
    late = r.Opener(c2s, rekey_records=4)  # a peer that would rekey elsewhere
    for x in sealed[:3]:
        open_one(late, x)
    with pytest.raises(r.RecordAuthFailed):
        open_one(late, sealed[3])
    # Each epoch has its own key: epoch 1's first record differs from epoch 0's.
    assert sealed[3][4:] != r.Sealer(c2s).seal(b"\x03")[4:]


def test_record_limit_stops_the_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(r, "MAX_EPOCHS", 2)
    c2s, _ = keys()
    sealer = r.Sealer(c2s, rekey_records=2)
    for _ in range(4):
        sealer.seal(b"x")
    with pytest.raises(r.RecordLimit):
        sealer.seal(b"x")


def test_limits_on_lengths() -> None:
    c2s, _ = keys()
    opener = r.Opener(c2s)
    with pytest.raises(TooLarge):
        opener.record_size_untrusted(bytes([1]) + (r.MAX_RECORD + 17).to_bytes(3, "big"))
    with pytest.raises(WireError):
        opener.record_size_untrusted(bytes([1, 0, 0, 15]))
    with pytest.raises(WireError):
        opener.record_size_untrusted(bytes([2, 0, 0, 17]))  # END with data
    with pytest.raises(ValueError):
        r.Sealer(c2s).seal(bytes(r.MAX_RECORD + 1))
    assert opener.record_size_untrusted(bytes([1, 1, 0, 16])) == r.MAX_WIRE_RECORD


def test_io_layer_constants_match() -> None:
    assert recstream._HEADER == r.HEADER
    assert recstream._TAG == r.TAG
    assert recstream._MAX_RECORD == r.MAX_RECORD
    assert recstream._KIND_END == r.KIND_END
    assert recstream.ALPN_RECORDS == r.ALPN_RECORDS
