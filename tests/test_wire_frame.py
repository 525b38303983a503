"""Control framing: golden bytes, limits, incremental decoding, malformed input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homeport.wire import control as m
from homeport.wire.errors import TooLarge, UnknownType, WireError
from homeport.wire.frame import MAX_FRAME, FrameDecoder, encode_frame

GOLDEN = [
    (m.Ping(seq=1), "0000000a0e7b22736571223a317d"),
    (m.NetMapRequest(), "00000003077b7d"),
    (m.Accept(stream_id="s1"), "000000130a7b2273747265616d5f6964223a227331227d"),
    (
        m.Hello(proto=1, role="agent", software="t", capver=2, caps=("peers",)),
        "00000065017b2270726f746f223a312c22726f6c65223a226167656e74222c22736f667477617265223a22"
        "74222c22636170766572223a322c2263617073223a5b227065657273225d2c226d61705f65706f6368223a"
        "22222c226d61705f76657273696f6e223a307d",
    ),
    (
        m.Peers(
            version=3,
            base=2,
            reset=False,
            peers=(
                m.Peer(
                    node_id="n1",
                    name="a",
                    online=True,
                    last_seen=1.5,
                    fingerprint="sha256:00",
                    rev=3,
                ),
            ),
            removed=("n2",),
        ),
        "000000d8807b2276657273696f6e223a332c2262617365223a322c227265736574223a66616c73652c2270"
        "65657273223a5b7b226e6f64655f6964223a226e31222c226e616d65223a2261222c226f6e6c696e65223a"
        "747275652c226c6173745f7365656e223a312e352c2266696e6765727072696e74223a227368613235363a"
        "3030222c227365727669636573223a5b5d2c2261646472657373223a22222c22726576223a332c22757365"
        "72223a22222c2274616773223a5b5d7d5d2c2272656d6f766564223a5b226e32225d2c226d6f7265223a66"
        "616c73657d",
    ),
]

#: The exact bytes a first-release (capver 1) node sends: they must keep decoding.
FIRST_RELEASE_HELLO = (
    "0000002a017b2270726f746f223a312c22726f6c65223a226167656e74222c22736f667477617265223a2274227d"
)


def test_first_release_hello_still_decodes() -> None:
    [(t, body)] = FrameDecoder().feed_untrusted(bytes.fromhex(FIRST_RELEASE_HELLO))
    assert m.decode_untrusted(t, body) == m.Hello(proto=1, role="agent", software="t", capver=1)


@pytest.mark.parametrize(("msg", "hexbytes"), GOLDEN)
def test_golden_encoding(msg: m.Message, hexbytes: str) -> None:
    assert m.encode(msg).hex() == hexbytes
    [(t, body)] = FrameDecoder().feed_untrusted(bytes.fromhex(hexbytes))
    assert m.decode_untrusted(t, body) == msg


def test_decoder_one_byte_at_a_time() -> None:
    msgs = [g[0] for g in GOLDEN]
    data = b"".join(m.encode(x) for x in msgs)
    dec = FrameDecoder()
    got = []
    for i in range(len(data)):
        got.extend(dec.feed_untrusted(data[i : i + 1]))
    assert [m.decode_untrusted(t, b) for t, b in got] == msgs
    assert dec.buffered == 0


def test_oversized_length_rejected_before_buffering() -> None:
    dec = FrameDecoder()
    with pytest.raises(TooLarge):
        dec.feed_untrusted((MAX_FRAME + 1).to_bytes(4, "big"))
    # the decoder is poisoned: framing is lost for good
    with pytest.raises(TooLarge):
        dec.feed_untrusted(b"")


def test_zero_length_rejected() -> None:
    with pytest.raises(WireError):
        FrameDecoder().feed_untrusted(b"\x00\x00\x00\x00")


def test_unknown_type() -> None:
    with pytest.raises(UnknownType):
        m.decode_untrusted(0xEE, b"{}")
    assert m.is_ignorable(0xEE) and not m.is_ignorable(0x7F)


def test_encode_refuses_local_misuse() -> None:
    with pytest.raises(ValueError):
        encode_frame(256, b"")
    with pytest.raises(ValueError):
        encode_frame(1, b"x" * MAX_FRAME)


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b"null",
        b'{"seq": "1"}',
        b'{"seq": true}',
        b"\xff\xfe",
        b'{"seq": 1e999}',
        b"[" * 5000,
    ],
)
def test_malformed_bodies_raise_wire_error(body: bytes) -> None:
    with pytest.raises(WireError):
        m.decode_untrusted(m.MsgType.PING, body)


def test_nested_messages_round_trip() -> None:
    msg = m.NetMap(
        self_id="n1",
        nodes=(
            m.NodeInfo(
                node_id="n1",
                name="labpc",
                online=True,
                last_seen=12.5,
                fingerprint="sha256:00",
                services=(m.ServiceInfo("ssh", 22),),
                host_keys=("ssh-ed25519 AAAA",),
            ),
        ),
    )
    [(t, b)] = FrameDecoder().feed_untrusted(m.encode(msg))
    assert m.decode_untrusted(t, b) == msg


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    assert m.decode_untrusted(m.MsgType.PING, b'{"seq": 4, "future": [1]}') == m.Ping(seq=4)


def test_optional_fields_default() -> None:
    msg = m.decode_untrusted(m.MsgType.HELLO, b'{"proto": 1, "role": "client"}')
    assert msg == m.Hello(proto=1, role="client", software="")


def test_oversized_list_rejected() -> None:
    body = (
        b'{"services": ['
        + b",".join([b'{"name":"a","port":1}'] * (m.MAX_LIST + 1))
        + b'], "host_keys": []}'
    )
    with pytest.raises(WireError):
        m.decode_untrusted(m.MsgType.ANNOUNCE, body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decoder_raises_only_wire_error(data: bytes) -> None:
    dec = FrameDecoder(max_frame=4096)
    try:
        for t, body in dec.feed_untrusted(data):
            m.decode_untrusted(t, body)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(m.MESSAGES)),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=20,
    ),
)
def test_fuzz_json_bodies_raise_only_wire_error(msg_type: int, obj: object) -> None:
    import json

    try:
        body = json.dumps(obj).encode()
    except ValueError:
        return
    with contextlib.suppress(WireError):
        m.decode_untrusted(msg_type, body)
