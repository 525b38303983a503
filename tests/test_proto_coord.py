"""The coordinator core in memory: sessions, peer maps, every step of stream set-up.

A fake clock (``sim.now`` / ``sim.advance``) and no sockets: each test says what
arrives and checks what the core sends each session and asks of the relay.
"""

from __future__ import annotations

import base64
import struct

import pytest

from homeport.proto import audit as au
from homeport.proto import coord as c
from homeport.proto.netmap import PeerView
from homeport.wire import control as m
from tests.coordsim import HOST_KEY, T0, Sim

SSH = m.ServiceInfo("ssh", 22)
WEB = m.ServiceInfo("jupyter", 8888)
TOKEN = "ab" * 16


@pytest.fixture
def sim() -> Sim:
    return Sim(open_timeout=10.0, unpaired_timeout=10.0)


def one(box: list[m.Message], cls: type[m.Message]) -> m.Message:
    found = [x for x in box if isinstance(x, cls)]
    assert len(found) == 1, box
    return found[0]


def relay_kinds(sim: Sim) -> list[str]:
    return [type(x).__name__ for x in sim.relay]


# -- sessions -----------------------------------------------------------------------------


def test_hello_welcome_carries_capabilities(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    sid = sim.hello(lab, "client")
    w = one(sim.out[sid].messages, m.Welcome)
    assert isinstance(w, m.Welcome)
    assert (w.node_id, w.name, w.capver, w.caps) == (lab.node_id, "labpc", m.CAPVER, m.OUR_CAPS)


@pytest.mark.parametrize(
    ("fp", "hello", "code"),
    [
        (None, m.Hello(proto=1, role="agent"), "unknown-node"),
        ("sha256:nobody", m.Hello(proto=1, role="agent"), "unknown-node"),
        ("LAB", m.Hello(proto=2, role="agent"), "upgrade"),
        ("LAB", m.Hello(proto=1, role="agent", capver=0), "upgrade"),
        ("LAB", m.Hello(proto=1, role="root"), "bad-request"),
    ],
)
def test_hello_refusals(sim: Sim, fp: str | None, hello: m.Hello, code: str) -> None:
    lab = sim.new_node("labpc")
    sid = sim.connect(lab.fingerprint if fp == "LAB" else fp)
    sim.send(sid, hello)
    closed = sim.out[sid].closed
    assert closed is not None and closed[0] == code
    assert not sim.core.is_online(lab.node_id)


def test_agent_online_offline_and_last_seen(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    sid = sim.agent(lab, (SSH,))
    assert sim.core.is_online(lab.node_id)
    sim.now = T0 + 100
    sim.end(sid)
    assert not sim.core.is_online(lab.node_id)
    [stored] = sim.registry.load_nodes()
    assert stored.last_seen == T0 + 100 and stored.services == (SSH,)
    assert stored.host_keys == (HOST_KEY,)


def test_a_newer_agent_session_replaces_the_old_one(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    old = sim.agent(lab)
    new = sim.agent(lab)
    assert sim.out[old].closed == (
        "session-replaced",
        "a newer agent session of this node connected",
    )
    assert sim.core.agent_session(lab.node_id) == new
    sim.end(old)  # the replaced session's end must not take the node offline
    assert sim.core.is_online(lab.node_id)
    sim.end(new)
    assert not sim.core.is_online(lab.node_id)


def test_unexpected_messages_close_only_that_session(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    client = sim.hello(lab, "client")
    sim.send(client, m.Accept(stream_id="s1"))  # only agents answer INCOMING
    closed = sim.out[client].closed
    assert closed is not None and closed[0] == "bad-request"


# -- announce and peer maps ------------------------------------------------------------------


def test_announce_drops_unusable_entries(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    sid = sim.hello(lab)
    services = (
        SSH,
        m.ServiceInfo("ssh", 2222),  # duplicate name
        m.ServiceInfo("web", 0),
        m.ServiceInfo("web", 70000),
        m.ServiceInfo("8080", 8080),  # a name that looks like a port
        m.ServiceInfo("bad name", 80),
        WEB,
    )
    keys = (HOST_KEY + " comment", "", "garbage", "ssh-rsa AAAA\nssh-evil X")
    sim.send(sid, m.Announce(services=services, host_keys=keys))
    node = sim.core.node(lab.node_id)
    assert node is not None and node.services == (SSH, WEB)
    assert node.host_keys == (HOST_KEY,)


def _view(sim: Sim, sid: int) -> PeerView:
    view = PeerView()
    for msg in sim.out[sid].messages:
        if isinstance(msg, m.Peers):
            view.apply(msg)
    return view


def test_peer_maps_are_pushed_coalesced_and_carry_no_host_keys(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    laptop = sim.new_node("laptop")
    gone = sim.new_node("gone")
    sim.core.remove_node("gone", sim.now)
    sim.run()
    a = sim.agent(laptop)
    b = sim.agent(lab, (SSH,))
    assert not sim.out[a].of(m.Peers)  # nothing before the coalescing window ends
    sim.advance(c.NETMAP_COALESCE)
    for sid in (a, b):
        view = _view(sim, sid)
        assert set(view.peers) == {lab.node_id, laptop.node_id}
        assert gone.node_id not in view.peers
        p = view.peers[lab.node_id]
        assert p.online and p.services == (SSH,) and p.address == "192.0.2.10:40000"
        assert p.fingerprint == lab.fingerprint
    # a change is pushed as a delta from the version each agent has
    sim.out[a].take()
    sim.end(b)
    sim.advance(sim.core.offline_grace() + c.NETMAP_COALESCE)
    [delta] = sim.out[a].of(m.Peers)
    assert isinstance(delta, m.Peers) and not delta.reset
    assert [p.node_id for p in delta.peers] == [lab.node_id] and not delta.peers[0].online


def _reconnect(sim: Sim, node: c.NodeRecord, address: str) -> int:
    sid = sim.connect(node.fingerprint, address)
    sim.send(sid, m.Hello(proto=1, role="agent", capver=2, caps=m.OUR_CAPS))
    sim.send(sid, m.Announce(services=(SSH,), host_keys=(HOST_KEY,)))
    return sid


@pytest.fixture
def big(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole offline grace at any size (it scales with the agents online)."""
    monkeypatch.setattr(c, "MAP_GRACE_FULL_AT", 1)


def _lab_and_observer(sim: Sim) -> tuple[c.NodeRecord, int, int]:
    """labpc online (session b) and laptop (session a) holding the pushed map."""
    lab, laptop = sim.new_node("labpc"), sim.new_node("laptop")
    a = sim.agent(laptop)
    b = sim.agent(lab, (SSH,))
    sim.advance(c.NETMAP_COALESCE)
    return lab, a, b


def test_a_quick_reconnect_from_the_same_host_is_no_news_to_peers(sim: Sim, big: None) -> None:
    lab, a, b = _lab_and_observer(sim)
    before = sim.core.book.get(lab.node_id)
    assert before is not None and before.online
    sim.out[a].take()
    sim.end(b)
    assert not sim.core.is_online(lab.node_id)  # the server's own view is never delayed
    sim.advance(1.0)
    again = _reconnect(sim, lab, "192.0.2.10:40999")  # same host, a new source port
    assert sim.core.is_online(lab.node_id)
    sim.advance(2 * c.MAP_OFFLINE_GRACE)
    assert not sim.out[a].of(m.Peers)  # nothing for the other agents to hear
    assert sim.core.book.get(lab.node_id) == before  # same entry, same rev, old port
    # it leaves for longer than the grace: offline, last seen when it left
    left = sim.now
    sim.end(again)
    sim.advance(c.MAP_OFFLINE_GRACE + c.NETMAP_COALESCE)
    [delta] = sim.out[a].of(m.Peers)
    assert isinstance(delta, m.Peers)
    [p] = delta.peers
    assert not p.online and p.last_seen == left


def test_a_reconnect_from_another_host_is_pushed_with_its_new_address(sim: Sim, big: None) -> None:
    lab, a, b = _lab_and_observer(sim)
    sim.out[a].take()
    sim.end(b)
    sim.advance(1.0)
    back = sim.now
    _reconnect(sim, lab, "198.51.100.7:5000")  # the laptop moved to another network
    sim.advance(c.NETMAP_COALESCE)
    [delta] = sim.out[a].of(m.Peers)
    assert isinstance(delta, m.Peers)
    [p] = delta.peers
    assert p.online and p.address == "198.51.100.7:5000" and p.last_seen == back
    sim.out[a].take()
    sim.advance(2 * c.MAP_OFFLINE_GRACE)  # the old session's grace timer is void
    assert not sim.out[a].of(m.Peers)


def test_a_node_removed_within_the_grace_leaves_the_map_once(sim: Sim, big: None) -> None:
    lab, a, b = _lab_and_observer(sim)
    sim.out[a].take()
    sim.end(b)
    sim.core.remove_node("labpc", sim.now)
    sim.run()
    sim.advance(c.NETMAP_COALESCE)
    assert lab.node_id not in _view(sim, a).peers
    sim.out[a].take()
    sim.advance(2 * c.MAP_OFFLINE_GRACE)
    assert not sim.out[a].of(m.Peers) and lab.node_id not in sim.core.book


def test_the_grace_scales_with_the_agents_online(sim: Sim) -> None:
    assert sim.core.offline_grace() == 0.0
    for i in range(10):
        sim.agent(sim.new_node(f"n{i}"))
    assert sim.core.offline_grace() == pytest.approx(c.MAP_OFFLINE_GRACE * 10 / 1000)
    # a small network: peers hear "offline" within the normal push window
    lab, a, b = _lab_and_observer(sim)
    sim.out[a].take()
    sim.end(b)
    sim.advance(sim.core.offline_grace() + sim.core.push_delay())
    [delta] = sim.out[a].of(m.Peers)
    assert isinstance(delta, m.Peers) and not delta.peers[0].online
    assert delta.peers[0].node_id == lab.node_id


def test_with_no_grace_maps_say_offline_at_once() -> None:
    sim = Sim(map_offline_grace=0.0)
    _lab, a, b = _lab_and_observer(sim)
    sim.out[a].take()
    sim.end(b)
    sim.advance(c.NETMAP_COALESCE)
    [delta] = sim.out[a].of(m.Peers)
    assert isinstance(delta, m.Peers) and not delta.peers[0].online


def test_an_unchanged_announce_pushes_nothing(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    a = sim.agent(lab, (SSH,))
    sim.advance(1)
    sim.out[a].take()
    sim.send(a, m.Announce(services=(SSH,), host_keys=(HOST_KEY,)))
    sim.advance(1)
    assert sim.out[a].messages == []


def test_host_keys_in_another_order_are_no_new_announce(sim: Sim) -> None:
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes([7]) * 32
    ec = "ssh-ed25519 " + base64.b64encode(blob).decode("ascii")  # a second key
    lab = sim.new_node("labpc")
    a = sim.hello(lab)
    sim.send(a, m.Announce(services=(SSH,), host_keys=(HOST_KEY, ec)))
    stored = [n for n in sim.notes if "exposes" in n]  # one per announce that changed
    assert len(stored) == 1
    sim.send(a, m.Announce(services=(SSH,), host_keys=(ec, HOST_KEY)))  # ssh-keyscan reordered
    assert [n for n in sim.notes if "exposes" in n] == stored
    node = sim.core.node(lab.node_id)
    assert node is not None and node.host_keys == tuple(sorted((HOST_KEY, ec)))


def test_first_release_clients_get_the_old_netmap(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    sim.agent(lab, (SSH,))
    old = sim.hello(lab, "client", capver=1)
    sim.send(old, m.NetMapRequest())
    nm = one(sim.out[old].messages, m.NetMap)
    assert isinstance(nm, m.NetMap) and nm.self_id == lab.node_id
    assert [(n.name, n.online, n.host_keys) for n in nm.nodes] == [("labpc", True, ())]
    assert not sim.out[old].of(m.Peers)


def test_a_new_client_asking_gets_a_full_map(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    sid = sim.hello(lab, "client")
    sim.send(sid, m.NetMapRequest())
    frames = sim.out[sid].of(m.Peers)
    assert frames and all(isinstance(f, m.Peers) and f.reset for f in frames)


# -- opening streams: the refusals --------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "dst", "service", "code", "text"),
    [
        ("none", "nosuch", "22", "unknown-node", "no node named"),
        ("removed", "labpc", "22", "node-removed", "removed by an admin 60 s ago"),
        ("offline", "labpc", "22", "offline", "last seen 3 min ago"),
        ("never", "labpc", "ssh", "offline", "never seen"),
        ("online", "labpc", "80", "not-exposed", "exposed: ssh/22, jupyter/8888"),
        ("online", "labpc", "", "not-exposed", "does not expose"),
    ],
)
def test_open_refusals(sim: Sim, setup: str, dst: str, service: str, code: str, text: str) -> None:
    lab = sim.new_node("labpc")
    laptop = sim.new_node("laptop")
    if setup == "removed":
        sim.core.remove_node("labpc", sim.now)
        sim.run()
        sim.now += 60
    elif setup == "offline":
        sim.end(sim.agent(lab, (SSH, WEB)))
        sim.now += 180
    elif setup == "online":
        sim.agent(lab, (SSH, WEB))
    client = sim.hello(laptop, "client")
    sim.send(client, m.Open(dst=dst, service=service, token=TOKEN))
    failed = one(sim.out[client].messages, m.OpenFailed)
    assert isinstance(failed, m.OpenFailed) and failed.code == code and failed.token == TOKEN
    assert text in failed.message
    assert relay_kinds(sim)[-1:] == ["RelayRefuse"]  # its data connection is closed too


def test_a_bad_token_is_refused(sim: Sim) -> None:
    laptop = sim.new_node("laptop")
    client = sim.hello(laptop, "client")
    sim.send(client, m.Open(dst="laptop", service="22", token="zz"))
    failed = one(sim.out[client].messages, m.OpenFailed)
    assert isinstance(failed, m.OpenFailed) and failed.code == "bad-request"


def test_opens_in_flight_per_session_are_limited(sim: Sim) -> None:
    lab, laptop = sim.new_node("labpc"), sim.new_node("laptop")
    sim.agent(lab, (SSH,))
    client = sim.hello(laptop, "client")
    for i in range(c.MAX_PENDING_OPENS_PER_SESSION + 1):
        sim.send(client, m.Open(dst="labpc", service="ssh", token=f"{i:032x}"))
    codes = [x.code for x in sim.out[client].of(m.OpenFailed) if isinstance(x, m.OpenFailed)]
    assert codes == ["busy"]


def test_a_token_cannot_be_used_twice(sim: Sim) -> None:
    lab, laptop = sim.new_node("labpc"), sim.new_node("laptop")
    sim.agent(lab, (SSH,))
    client = sim.hello(laptop, "client")
    sim.send(client, m.Open(dst="labpc", service="ssh", token=TOKEN))
    sim.send(client, m.Open(dst="labpc", service="ssh", token=TOKEN))
    [failed] = sim.out[client].of(m.OpenFailed)
    assert isinstance(failed, m.OpenFailed) and failed.code == "bad-request"


# -- opening streams: the whole flow ---------------------------------------------------------------


def _open(sim: Sim) -> tuple[int, int, m.Incoming]:
    lab, laptop = sim.new_node("labpc"), sim.new_node("laptop")
    agent = sim.agent(lab, (SSH,))
    client = sim.hello(laptop, "client")
    sim.send(client, m.Open(dst="labpc", service="22", token=TOKEN))
    inc = one(sim.out[agent].messages, m.Incoming)
    assert isinstance(inc, m.Incoming)
    return agent, client, inc


def test_accepted_stream_lifecycle(sim: Sim) -> None:
    agent, client, inc = _open(sim)
    lab = sim.core.node_by_name("labpc")
    assert lab is not None
    assert inc.service == "ssh" and inc.src.name == "laptop" and inc.token != TOKEN
    expect = sim.relay[-1]
    assert isinstance(expect, c.RelayExpect)
    assert expect.src_token.hex() == TOKEN and expect.dst_token.hex() == inc.token
    sim.send(agent, m.Accept(stream_id=inc.stream_id))
    opened = one(sim.out[client].messages, m.Opened)
    assert isinstance(opened, m.Opened)
    assert opened.peer.fingerprint == lab.fingerprint and opened.peer.host_keys == (HOST_KEY,)
    assert opened.port == 22 and opened.stream_id == inc.stream_id
    assert sim.core.stream_states() == {inc.stream_id: c.StreamState.ACCEPTED}
    sim.core.relay_event(c.StreamStarted(inc.stream_id), sim.now)
    assert sim.core.stream_states() == {inc.stream_id: c.StreamState.LIVE}
    sim.advance(3600)  # a live stream has no deadline
    assert sim.core.stream_states() == {inc.stream_id: c.StreamState.LIVE}
    sim.core.relay_event(c.StreamEnded(inc.stream_id, 10, 20, "closed"), sim.now)
    assert sim.core.stream_states() == {}


def test_rejected_stream_passes_the_reason_on(sim: Sim) -> None:
    agent, client, inc = _open(sim)
    sim.send(agent, m.Reject(stream_id=inc.stream_id, code="service-down", message="refused"))
    failed = one(sim.out[client].messages, m.OpenFailed)
    assert isinstance(failed, m.OpenFailed)
    assert (failed.code, failed.message, failed.token) == ("service-down", "refused", TOKEN)
    assert relay_kinds(sim)[-1] == "RelayCancel" and sim.core.stream_states() == {}


def test_only_the_destination_may_answer_and_only_once(sim: Sim) -> None:
    agent, client, inc = _open(sim)
    laptop_agent = sim.agent(sim.core.node_by_name("laptop"))  # type: ignore[arg-type]
    sim.send(laptop_agent, m.Accept(stream_id=inc.stream_id))
    assert not sim.out[client].of(m.Opened)
    sim.send(agent, m.Accept(stream_id=inc.stream_id))
    sim.send(agent, m.Reject(stream_id=inc.stream_id, code="late", message=""))
    assert len(sim.out[client].of(m.Opened)) == 1 and not sim.out[client].of(m.OpenFailed)


def test_no_answer_times_out(sim: Sim) -> None:
    _agent, client, _inc = _open(sim)
    sim.advance(9.9)
    assert not sim.out[client].of(m.OpenFailed)
    sim.advance(0.2)
    failed = one(sim.out[client].messages, m.OpenFailed)
    assert isinstance(failed, m.OpenFailed) and failed.code == "timeout"
    assert "did not answer within 10s" in failed.message
    assert sim.core.stream_states() == {}


def test_accepted_but_never_spliced_is_dropped(sim: Sim) -> None:
    agent, _client, inc = _open(sim)
    sim.send(agent, m.Accept(stream_id=inc.stream_id))
    sim.advance(10.1)
    assert sim.core.stream_states() == {}
    assert isinstance(sim.relay[-1], c.RelayCancel)


def test_destination_going_offline_fails_waiting_streams(sim: Sim) -> None:
    agent, client, _inc = _open(sim)
    sim.end(agent)
    failed = one(sim.out[client].messages, m.OpenFailed)
    assert isinstance(failed, m.OpenFailed) and failed.code == "offline"
    assert sim.core.stream_states() == {}


def test_opener_leaving_cancels_its_streams(sim: Sim) -> None:
    _agent, client, _inc = _open(sim)
    sim.end(client)
    assert sim.core.stream_states() == {}
    assert isinstance(sim.relay[-1], c.RelayCancel)


def test_the_relay_refusing_fails_the_open(sim: Sim) -> None:
    _agent, client, inc = _open(sim)
    sim.core.relay_refused(inc.stream_id, "busy", "relay full")
    sim.run()
    failed = one(sim.out[client].messages, m.OpenFailed)
    assert isinstance(failed, m.OpenFailed) and failed.code == "busy"


def test_a_node_may_open_a_stream_to_itself(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    agent = sim.agent(lab, (SSH,))
    sim.send(agent, m.Open(dst="labpc", service="ssh", token=TOKEN))
    inc = one(sim.out[agent].messages, m.Incoming)
    assert isinstance(inc, m.Incoming) and inc.src.node_id == lab.node_id


# -- removal -------------------------------------------------------------------------------------


def test_removal_closes_sessions_fails_and_cuts_streams(sim: Sim) -> None:
    agent, client, _inc = _open(sim)
    lab = sim.core.node_by_name("labpc")
    assert lab is not None
    removed = sim.core.remove_node("labpc", sim.now)
    sim.run()
    assert removed.removed and removed.node_id == lab.node_id
    assert sim.out[agent].closed == ("node-removed", "this node was removed by an admin")
    failed = one(sim.out[client].messages, m.OpenFailed)
    assert isinstance(failed, m.OpenFailed) and failed.code == "node-removed"
    assert isinstance(sim.relay[-1], c.RelayCut) and sim.relay[-1].node_id == lab.node_id
    assert sim.core.stream_states() == {}
    with pytest.raises(KeyError):
        sim.core.remove_node("labpc", sim.now)
    # its certificate is refused from now on, with the reason; the name is free again
    again = sim.connect(lab.fingerprint)
    sim.send(again, m.Hello(proto=1, role="agent"))
    closed = sim.out[again].closed
    assert closed is not None and closed[0] == "node-removed"
    assert sim.new_node("labpc").node_id != lab.node_id
    [row] = [n for n in sim.registry.load_nodes() if n.node_id == lab.node_id]
    assert row.removed


def test_removal_cuts_live_streams(sim: Sim) -> None:
    agent, _client, inc = _open(sim)
    sim.send(agent, m.Accept(stream_id=inc.stream_id))
    sim.core.relay_event(c.StreamStarted(inc.stream_id), sim.now)
    sim.core.remove_node("laptop", sim.now)
    sim.run()
    assert sim.core.stream_states() == {}
    assert any(isinstance(x, c.RelayCut) for x in sim.relay)


# -- audit records ----------------------------------------------------------------------------


def _audits(sim: Sim, kind: str) -> list[dict[str, str]]:
    return [x.as_dict() for x in sim.audits if x.kind == kind]


def test_audit_records_enrollment_streams_and_removal(sim: Sim) -> None:
    agent, client, inc = _open(sim)
    lab, laptop = sim.core.node_by_name("labpc"), sim.core.node_by_name("laptop")
    assert lab is not None and laptop is not None
    enrolled = {e["node"]: e for e in _audits(sim, au.ENROLL)}
    assert enrolled["labpc"]["node_id"] == lab.node_id and enrolled["labpc"]["key_id"]
    assert enrolled["laptop"]["address"] == "192.0.2.10:40000"
    sim.send(agent, m.Accept(stream_id=inc.stream_id))
    (allowed,) = _audits(sim, au.STREAM)
    assert allowed == {
        "stream": inc.stream_id, "src": "laptop", "src_id": laptop.node_id, "dst": "labpc",
        "dst_id": lab.node_id, "service": "ssh", "verdict": "allowed", "code": "ok",
        "rule": "service-exposed", "by": "destination", "reason": "",
    }  # fmt: skip
    # refused by the server's early check: the requested service and the deciding rule
    sim.send(client, m.Open(dst="labpc", service="web", token="cd" * 16))
    denied = _audits(sim, au.STREAM)[-1]
    assert (denied["verdict"], denied["by"], denied["code"]) == ("denied", "server", "not-exposed")
    assert denied["service"] == "web" and denied["rule"] and denied["dst_id"] == ""
    # refused by the destination: its code, and who refused
    sim.send(client, m.Open(dst="labpc", service="ssh", token="ef" * 16))
    inc2 = [x for x in sim.out[agent].messages if isinstance(x, m.Incoming)][-1]
    sim.send(agent, m.Reject(stream_id=inc2.stream_id, code="shields-up", message="no"))
    rejected = _audits(sim, au.STREAM)[-1]
    assert (rejected["verdict"], rejected["by"], rejected["code"]) == (
        "denied",
        "destination",
        "shields-up",
    )
    assert rejected["stream"] == inc2.stream_id and rejected["reason"] == "no"
    sim.core.remove_node("labpc", sim.now)
    sim.run()
    assert _audits(sim, au.NODE_REMOVE) == [
        {"node": "labpc", "node_id": lab.node_id, "by": "admin"}
    ]


def test_map_pushes_coalesce_longer_as_the_fleet_grows(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every push writes to every online agent: the window scales with the agents online
    monkeypatch.setattr(c, "NETMAP_PUSH_RATE", 10.0)
    sids = [sim.agent(sim.new_node(f"n{i}")) for i in range(5)]
    sim.advance(c.NETMAP_COALESCE_MAX)
    assert sim.core.push_delay() == pytest.approx(0.5)
    for sid in sids:
        sim.out[sid].take()
    sim.end(sids[0])  # 4 agents left: 0.4 s (after the offline grace)
    sim.advance(sim.core.offline_grace())
    sim.advance(c.NETMAP_COALESCE)
    assert not sim.out[sids[1]].of(m.Peers)
    sim.advance(0.4 - c.NETMAP_COALESCE + 0.01)
    [delta] = sim.out[sids[1]].of(m.Peers)
    assert isinstance(delta, m.Peers) and not delta.reset
    monkeypatch.setattr(c, "NETMAP_PUSH_RATE", 1.0)
    assert sim.core.push_delay() == c.NETMAP_COALESCE_MAX  # capped
    monkeypatch.setattr(c, "NETMAP_PUSH_RATE", 1000.0)
    assert sim.core.push_delay() == c.NETMAP_COALESCE  # small networks: unchanged


def test_direct_stream_logs_are_checked_and_name_the_reporting_node(sim: Sim) -> None:
    lab, laptop, desk = sim.new_node("labpc"), sim.new_node("laptop"), sim.new_node("desk")
    agent = sim.agent(lab, (SSH,))

    def log(sid: int, src: str, **kw: object) -> None:
        fields: dict[str, object] = {
            "src": src, "service": "ssh", "allowed": True, "code": "ok", "rule": "acls[0]",
        }  # fmt: skip
        fields.update(kw)
        sim.send(sid, m.StreamLog(**fields))  # type: ignore[arg-type]

    log(agent, laptop.node_id, stream="direct-1", reason="x" * 2000)
    (rec,) = _audits(sim, au.STREAM)
    assert (rec["src"], rec["dst"], rec["dst_id"], rec["by"]) == (
        "laptop", "labpc", lab.node_id, "destination-direct",
    )  # fmt: skip
    assert rec["stream"] == "direct-1" and len(rec["reason"]) == c.MAX_REASON
    # an unknown source, itself as the source, a verdict its code contradicts: dropped
    log(agent, "n-nobody")
    log(agent, lab.node_id)
    log(agent, laptop.node_id, code="policy")
    log(agent, laptop.node_id, allowed=False)
    assert len(_audits(sim, au.STREAM)) == 1
    # an old agent (no capability policy) is ignored; a client may not send it at all
    old = sim.agent(desk, capver=1)
    log(old, laptop.node_id)
    assert len(_audits(sim, au.STREAM)) == 1
    client = sim.hello(laptop, "client")
    log(client, desk.node_id)
    assert len(_audits(sim, au.STREAM)) == 1
    closed = sim.out[client].closed
    assert closed is not None and closed[0] == "bad-request"
    # bounded per session and window (the dropped reports above counted too)
    sim.advance(c.STREAM_LOG_WINDOW)
    for _ in range(c.MAX_STREAM_LOGS_PER_SESSION + 10):
        log(agent, laptop.node_id)
    assert len(_audits(sim, au.STREAM)) == 1 + c.MAX_STREAM_LOGS_PER_SESSION
    sim.advance(c.STREAM_LOG_WINDOW)
    log(agent, laptop.node_id)
    assert len(_audits(sim, au.STREAM)) == 2 + c.MAX_STREAM_LOGS_PER_SESSION
