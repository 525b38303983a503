"""PEERS_Z (capver 5, cap ``zpeers``): a PEERS frame with a deflated body.

The invariants: a PEERS_Z decodes to exactly the PEERS it deflates; whatever bytes arrive,
inflating raises only WireError and never holds more than one frame's worth; a server-side
machine refuses PEERS_Z (only the server sends maps); the book's deflated encoding is the
plain one, frame for frame, and only viewers with the capability get it.
"""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homeport.proto.control import ConnectionClosed, ControlConnection, Role
from homeport.proto.netmap import PeerBook
from homeport.wire import control as m
from homeport.wire.errors import WireError
from homeport.wire.frame import MAX_FRAME, FrameDecoder, encode_frame
from tests.test_proto_netmap import book_of, decode_all, mkpeer


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    return FrameDecoder().feed_untrusted(data)


def test_a_large_peers_body_goes_out_deflated_and_decodes_to_the_same_message() -> None:
    book = book_of(500)
    plain = book.encoded_updates_for("v", 0)
    packed = book.encoded_updates_for("v", 0, deflate=True)
    assert {t for t, _ in frames_of(plain)} == {m.MsgType.PEERS}
    assert {t for t, _ in frames_of(packed)} == {m.MsgType.PEERS_Z}
    assert decode_all(packed) == decode_all(plain)
    assert len(packed) * 3 < len(plain)  # measured ~3.8x on fleet-like entries


def test_a_small_body_stays_plain_even_for_a_zpeers_viewer() -> None:
    book = book_of(3)
    book.upsert(mkpeer(1, online=False))
    delta = book.encoded_updates_for("v", book.version - 1, deflate=True)
    assert [t for t, _ in frames_of(delta)] == [m.MsgType.PEERS]


def test_plain_and_deflated_encodings_are_cached_apart() -> None:
    book = book_of(300)
    a = book.encoded_updates_for("v", 0, deflate=True)
    b = book.encoded_updates_for("v", 0)
    assert book.encoded_updates_for("w", 0, deflate=True) is a
    assert book.encoded_updates_for("w", 0) is b and a != b


def _z(body: bytes) -> bytes:
    return zlib.compress(body, 1)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"not zlib at all", "not a zlib stream"),
        (_z(b'{"version":1}')[:-3], "truncated"),
        (_z(b'{"version":1}') + b"x", "after the zlib stream"),
        (_z(b" " * (MAX_FRAME + 10)), "more than"),  # a bomb: 1 KiB that inflates past a frame
        (_z(b"\xff\xfe"), "not UTF-8 JSON"),
        (_z(b'{"version":"x"}'), "version"),
    ],
)
def test_bad_peers_z_bodies_raise_the_wire_error(body: bytes, why: str) -> None:
    with pytest.raises(WireError, match=why):
        m.decode_untrusted(m.MsgType.PEERS_Z, body)


@settings(max_examples=400)
@given(st.binary(max_size=200) | st.binary(max_size=200).map(_z))
def test_peers_z_parses_or_raises_the_wire_error(body: bytes) -> None:
    try:
        msg = m.decode_untrusted(m.MsgType.PEERS_Z, body)
    except WireError:
        return
    assert isinstance(msg, m.Peers)


def test_a_server_side_machine_refuses_peers_z_from_a_node() -> None:
    conn = ControlConnection(Role.SERVER, 0.0)
    conn.receive_data(encode_frame(m.MsgType.PEERS_Z, _z(b"{}")), 1.0)
    ev = conn.next_event()
    assert isinstance(ev, ConnectionClosed) and ev.code == "protocol:malformed"
    assert "only the server sends peer maps" in ev.reason


def test_peers_z_needs_the_capability() -> None:
    assert not m.may_send(m.MsgType.PEERS_Z, frozenset({m.CAP_PEERS, m.CAP_MAPDELTA}))
    assert m.may_send(m.MsgType.PEERS_Z, frozenset({m.CAP_ZPEERS}))
    assert m.CAP_ZPEERS in m.OUR_CAPS and m.CAPVER == 5


def test_an_empty_book_is_still_one_plain_frame() -> None:
    assert [t for t, _ in frames_of(PeerBook().encoded_updates_for("v", 0, deflate=True))] == [
        m.MsgType.PEERS
    ]


def test_the_coordinator_deflates_maps_only_for_zpeers_sessions() -> None:
    from homeport.proto import coord as c
    from tests.coordsim import Sim

    raw: dict[int, list[int]] = {}

    class Recording(Sim):
        def _execute(self, cmd: c.Command) -> None:
            if isinstance(cmd, c.SendEncoded):
                raw.setdefault(cmd.session, []).extend(t for t, _ in frames_of(cmd.data))
            super()._execute(cmd)

    sim = Recording()
    nodes = [sim.new_node(f"n{i}") for i in range(8)]
    for n in nodes[2:]:
        sim.agent(n)
    old_caps = tuple(cap for cap in m.OUR_CAPS if cap != m.CAP_ZPEERS)
    old = sim.connect(nodes[0].fingerprint)
    sim.send(old, m.Hello(proto=1, role="agent", capver=4, caps=old_caps))
    new = sim.connect(nodes[1].fingerprint)
    sim.send(new, m.Hello(proto=1, role="agent", capver=m.CAPVER, caps=m.OUR_CAPS))
    sim.advance(c.NETMAP_COALESCE)
    assert raw[old] and set(raw[old]) == {m.MsgType.PEERS}
    assert m.MsgType.PEERS_Z in raw[new]
    # and both hold the same map
    views = []
    for sid in (old, new):
        got = {p.node_id for msg in sim.out[sid].of(m.Peers) for p in msg.peers}  # type: ignore[attr-defined]
        views.append(got)
    assert views[0] == views[1] and len(views[0]) >= 6
