"""Reconnecting without a full map (capability ``mapdelta``, capver 4), on the pure cores.

A coordinator core and node cores wired in memory (``Net``): a node that reconnects names
the map it holds in HELLO (the server run's ``map_epoch`` and the version) and gets a delta
from that version; a full map when the server cannot answer with one (another run, history
gone, a map it never completed). Old peers (capver 3, no ``mapdelta``) in both directions
keep getting and applying full maps.
"""

from __future__ import annotations

import pytest

from homeport.proto import coord as c
from homeport.proto import node as n
from homeport.proto.netmap import PeerView
from homeport.wire import control as m
from tests.test_proto_pair import Net, Peer

CAPS_V3 = tuple(x for x in m.OUR_CAPS if x != m.CAP_MAPDELTA)


def _peers_sent(net: Net, peer: Peer) -> list[m.Peers]:
    """Reconnect ``peer`` and return the PEERS frames its new session was sent."""
    sent: list[m.Peers] = []
    receive = peer.core.message_received

    def spy(msg: m.Message, now: float) -> None:
        if isinstance(msg, m.Peers):
            sent.append(msg)
        receive(msg, now)

    peer.core.message_received = spy  # type: ignore[method-assign]
    net.connect(peer)
    net.advance(c.NETMAP_COALESCE_MAX)
    return sent


def _drop(net: Net, peer: Peer) -> None:
    net.sim.end(peer.sid)
    peer.core.session_ended("network blinked", net.sim.now)
    net.settle()


def _full_view(net: Net, peer: Peer) -> dict[str, m.Peer]:
    """What a new session of ``peer`` would be sent: the book's full map for it."""
    view = PeerView()
    for frame in net.sim.core.book.updates_for(peer.record.node_id, 0):
        view.receive(frame)
    return dict(view.peers)


@pytest.fixture
def net() -> Net:
    return Net()


def test_a_reconnect_gets_a_delta_from_the_version_it_holds(net: Net) -> None:
    nodes = [net.join(f"node{i}") for i in range(30)]
    net.advance(c.NETMAP_COALESCE)
    me = nodes[0]
    held = me.core.peers.version
    assert me.core.peers.count == 30 and held > 0
    _drop(net, me)
    net.join("latecomer")  # one more change while we were away
    net.advance(c.NETMAP_COALESCE)
    frames = _peers_sent(net, me)
    assert frames and not any(f.reset for f in frames)
    assert frames[0].base == held
    changed = {p.node_id for f in frames for p in f.peers}
    assert len(changed) <= 3  # the latecomer, ourselves (online again), not all 31
    assert dict(me.core.peers.peers) == _full_view(net, me)
    delta_bytes = sum(len(m.encode(f)) for f in frames)
    full_bytes = sum(len(m.encode(f)) for f in net.sim.core.book.updates_for(me.record.node_id, 0))
    assert delta_bytes * 5 < full_bytes


def test_another_server_run_sends_a_full_map(net: Net) -> None:
    nodes = [net.join(f"node{i}") for i in range(5)]
    net.advance(c.NETMAP_COALESCE)
    me = nodes[0]
    _drop(net, me)
    net.sim.core.map_epoch = "another-run"  # versions of the old run mean nothing here
    frames = _peers_sent(net, me)
    assert frames[0].reset
    assert dict(me.core.peers.peers) == _full_view(net, me)


def test_history_gone_sends_a_full_map(net: Net) -> None:
    nodes = [net.join(f"node{i}") for i in range(5)]
    net.advance(c.NETMAP_COALESCE)
    me = nodes[0]
    _drop(net, me)
    net.sim.core.book.reset_all()  # e.g. a policy change: every older version is below horizon
    frames = _peers_sent(net, me)
    assert frames[0].reset
    assert dict(me.core.peers.peers) == _full_view(net, me)


def test_hello_names_the_map_only_when_it_is_complete(net: Net) -> None:
    me = net.join("me")
    net.join("other")
    net.advance(c.NETMAP_COALESCE)
    epoch = net.sim.core.map_epoch
    _drop(net, me)
    me.core.session_started(net.sim.now)
    hello = me.core.next_command()
    assert isinstance(hello, n.Send) and isinstance(hello.msg, m.Hello)
    assert (hello.msg.map_epoch, hello.msg.map_version) == (epoch, me.core.peers.version)
    # a WELCOME of another run: the map no longer counts, even if this session dies at once
    me.core.message_received(
        m.Welcome(
            proto=1,
            node_id=me.record.node_id,
            name="me",
            ping_interval=5.0,
            capver=m.CAPVER,
            caps=m.OUR_CAPS,
            map_epoch="new-run",
        ),
        net.sim.now,
    )
    assert me.core.peers.awaiting_full
    me.core.session_ended("lost before the map", net.sim.now)
    while me.core.next_command() is not None:
        pass
    me.core.session_started(net.sim.now)
    hello = me.core.next_command()
    assert isinstance(hello, n.Send) and isinstance(hello.msg, m.Hello)
    assert (hello.msg.map_epoch, hello.msg.map_version) == ("", 0)


def test_an_old_node_without_mapdelta_gets_a_full_map(net: Net) -> None:
    """capver 3 node: even if it sent the fields, the server does not honour them."""
    nodes = [net.join(f"node{i}") for i in range(5)]
    net.advance(c.NETMAP_COALESCE)
    held = nodes[0].core.peers.version
    sim = net.sim
    old = sim.new_node("old")
    sid = sim.connect(old.fingerprint)
    sim.send(
        sid,
        m.Hello(
            proto=1,
            role="agent",
            capver=3,
            caps=CAPS_V3,
            map_epoch=sim.core.map_epoch,
            map_version=held,
        ),
    )
    [welcome] = sim.out[sid].of(m.Welcome)
    assert isinstance(welcome, m.Welcome) and welcome.map_epoch == ""
    sim.advance(c.NETMAP_COALESCE)
    frames = [x for x in sim.out[sid].messages if isinstance(x, m.Peers)]
    assert frames and frames[0].reset and frames[0].base == 0
    view = PeerView()
    for f in frames:
        view.receive(f)
    assert view.count == 6


def test_a_new_node_with_an_old_server_gets_and_applies_full_maps() -> None:
    """capver 3 server: WELCOME without mapdelta; the node drops its claim and takes full maps."""
    core = n.NodeCore(n.NodeConfig(name="me", server="hp.example:8443"))
    peer = m.Peer(node_id="nb", name="b", online=True, last_seen=0.0, fingerprint="sha256:00")

    def welcome(caps: tuple[str, ...], epoch: str = "") -> m.Welcome:
        return m.Welcome(
            proto=1,
            node_id="na",
            name="me",
            ping_interval=5.0,
            capver=3,
            caps=caps,
            map_epoch=epoch,
        )

    core.session_started(0.0)
    core.message_received(welcome(m.OUR_CAPS, "run1"), 0.0)
    core.message_received(m.Peers(version=7, base=0, reset=True, peers=(peer,)), 0.0)
    assert core.peers.version == 7 and core.peers.count == 1
    core.session_ended("gone", 1.0)
    while core.next_command() is not None:
        pass
    core.session_started(2.0)
    cmds = []
    while (cmd := core.next_command()) is not None:
        cmds.append(cmd)
    [hello] = [x.msg for x in cmds if isinstance(x, n.Send) and isinstance(x.msg, m.Hello)]
    assert isinstance(hello, m.Hello) and (hello.map_epoch, hello.map_version) == ("run1", 7)
    # the server was downgraded meanwhile: no mapdelta, so a full map must come
    core.message_received(welcome(CAPS_V3), 2.0)
    assert core.peers.awaiting_full
    # a delta now would be a guess: not applied
    core.message_received(m.Peers(version=8, base=7, reset=False, removed=("nb",)), 2.0)
    assert core.peers.count == 1
    core.message_received(m.Peers(version=3, base=0, reset=True, peers=()), 2.0)
    assert core.peers.version == 3 and core.peers.count == 0 and not core.peers.awaiting_full


def test_a_half_received_update_is_dropped_on_reconnect() -> None:
    view = PeerView()
    peer = m.Peer(node_id="nb", name="b", online=True, last_seen=0.0, fingerprint="sha256:00")
    assert view.apply(m.Peers(version=5, base=0, reset=True, peers=(peer,)))
    view.receive(m.Peers(version=6, base=5, reset=False, removed=("nb",), more=True))
    view.resume()
    assert view.version == 5 and view.count == 1 and not view.awaiting_full
    assert view.apply(m.Peers(version=7, base=5, reset=False, removed=("nb",)))
    assert view.count == 0
    fresh = PeerView()
    fresh.resume()  # no map yet: the same as expect_full
    assert fresh.awaiting_full
