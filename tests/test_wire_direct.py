"""Direct-path control messages (capver 3, capability ``direct``): golden frames and refusals.

The golden frames pin the wire format: a change here is a protocol change and
must bump CAPVER and be written into wire/control.py's history.
"""

from __future__ import annotations

import pytest

from homeport.wire import control as m
from homeport.wire.errors import WireError
from homeport.wire.frame import FrameDecoder

NODE = "n0a0b0c0d0e0f"
PEER = m.PeerInfo(node_id=NODE, name="labpc", fingerprint="sha256:abababab")
CANDS = (m.Candidate("local", "10.0.0.7:41641"), m.Candidate("public", "[2001:db8::1]:41641"))

GOLDEN: list[tuple[m.Message, bytes]] = [
    (
        m.Endpoints(
            candidates=CANDS,
            nat="eim",
            nat_reason="same port to both",
            portmap="",
            direct_port=41641,
        ),
        b'\x00\x00\x00\xca\x81{"candidates":[{"kind":"local","addr":"10.0.0.7:41641"},'
        b'{"kind":"public","addr":"[2001:db8::1]:41641"}],"nat":"eim",'
        b'"nat_reason":"same port to both","portmap":"","direct_port":41641,"relay_only":false}',
    ),
    (m.PathReq(dst=NODE, punch_id=7), b'\x00\x00\x00%\x82{"dst":"n0a0b0c0d0e0f","punch_id":7}'),
    (
        m.Punch(punch_id=7, peer=PEER, candidates=CANDS, nat="edm", tls_role="client"),
        b'\x00\x00\x01\x0b\x83{"punch_id":7,"peer":{"node_id":"n0a0b0c0d0e0f","name":"labpc",'
        b'"fingerprint":"sha256:abababab","host_keys":[],"user":"","tags":[]},'
        b'"candidates":[{"kind":"local","addr":"10.0.0.7:41641"},'
        b'{"kind":"public","addr":"[2001:db8::1]:41641"}],"nat":"edm","tls_role":"client"}',
    ),
    (
        m.PathFailed(punch_id=7, dst=NODE, code="peer-offline", reason="labpc is offline"),
        b'\x00\x00\x00W\x84{"punch_id":7,"dst":"n0a0b0c0d0e0f","code":"peer-offline",'
        b'"reason":"labpc is offline"}',
    ),
    (
        m.PathReport(
            peer=NODE,
            kind="direct",
            endpoint="203.0.113.5:41641",
            rtt_ms=1.5,
            code="direct-up",
            reason="direct path up",
        ),
        b'\x00\x00\x00\xce\x85{"peer":"n0a0b0c0d0e0f","kind":"direct",'
        b'"endpoint":"203.0.113.5:41641","rtt_ms":1.5,"code":"direct-up",'
        b'"reason":"direct path up","punch_attempts":0,"punch_successes":0,'
        b'"streams_direct":0,"streams_relay":0}',
    ),
    (m.PeerPing(peer=NODE, seq=3), b'\x00\x00\x00!\x86{"peer":"n0a0b0c0d0e0f","seq":3}'),
    (m.PeerPong(peer=NODE, seq=3), b'\x00\x00\x00!\x87{"peer":"n0a0b0c0d0e0f","seq":3}'),
    (
        m.Welcome(
            proto=1,
            node_id="n1",
            name="a",
            ping_interval=5.0,
            capver=3,
            caps=("peers", "direct"),
            direct=False,
            probe_port=8444,
        ),
        b'\x00\x00\x00\xe1\x02{"proto":1,"node_id":"n1","name":"a","ping_interval":5.0,'
        b'"capver":3,"caps":["peers","direct"],"direct":false,"probe_port":8444,'
        b'"approved":true,"expires_at":0.0,"key_lifetime":0.0,"server_time":0.0,"ssh_ca":""'
        b',"map_epoch":""}',
    ),
]


def _decode(frame: bytes) -> m.Message:
    [(t, body)] = list(FrameDecoder().feed_untrusted(frame))
    return m.decode_untrusted(t, body)


@pytest.mark.parametrize(("msg", "frame"), GOLDEN, ids=lambda x: type(x).__name__)
def test_golden_frames(msg: m.Message, frame: bytes) -> None:
    assert m.encode(msg) == frame
    assert _decode(frame) == msg


def test_capver_3_announces_direct_and_numbers_are_ignorable() -> None:
    assert m.CAPVER >= 3 and m.CAP_DIRECT in m.OUR_CAPS
    for t in (0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87):
        assert m.is_ignorable(t)
        assert not m.may_send(m.MsgType(t), frozenset({m.CAP_PEERS}))
        assert m.may_send(m.MsgType(t), frozenset({m.CAP_DIRECT}))


def test_a_capver_2_welcome_reads_as_direct_with_no_probe_port() -> None:
    body = b'{"proto":1,"node_id":"n1","name":"a","ping_interval":5.0,"capver":2,"caps":["peers"]}'
    w = m.decode_untrusted(0x02, body)
    assert isinstance(w, m.Welcome) and w.direct and w.probe_port == 0


@pytest.mark.parametrize(
    "addr",
    [
        "example.com:22",  # host names are never dialled
        "10.0.0.7",  # no port
        "10.0.0.7:0",
        "10.0.0.7:65536",
        "2001:db8::1:22",  # IPv6 needs brackets
        "[10.0.0.7]:22",  # IPv4 must not have them
        "10.0.0.7:+22",
        "1" * 100,
    ],
)
def test_bad_candidate_addresses_are_wire_errors(addr: str) -> None:
    body = b'{"candidates":[{"kind":"local","addr":"%s"}]}' % addr.encode()
    with pytest.raises(WireError):
        m.decode_untrusted(0x81, body)


def test_unknown_candidate_kind_and_tls_role_are_refused() -> None:
    with pytest.raises(WireError):
        m.decode_untrusted(0x81, b'{"candidates":[{"kind":"relay","addr":"10.0.0.7:22"}]}')
    punch = m.encode(m.Punch(punch_id=1, peer=PEER, candidates=(), nat="eim", tls_role="server"))
    bad = punch.replace(b'"server"', b'"both"')
    with pytest.raises(WireError):
        m.decode_untrusted(0x83, bad[5:])


def test_more_than_16_candidates_are_refused() -> None:
    one = b'{"kind":"local","addr":"10.0.0.7:22"}'
    ok = b'{"candidates":[' + b",".join([one] * m.MAX_CANDIDATES) + b"]}"
    assert len(m.decode_untrusted(0x81, ok).candidates) == m.MAX_CANDIDATES  # type: ignore[attr-defined]
    too_many = b'{"candidates":[' + b",".join([one] * (m.MAX_CANDIDATES + 1)) + b"]}"
    with pytest.raises(WireError, match="more than 16"):
        m.decode_untrusted(0x81, too_many)


def test_an_unknown_nat_kind_still_decodes() -> None:
    # forward compatible: the coordinator reads an unknown kind as "unknown"
    msg = m.decode_untrusted(0x81, b'{"nat":"from-the-future"}')
    assert isinstance(msg, m.Endpoints) and msg.nat == "from-the-future" and msg.candidates == ()
