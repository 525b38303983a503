"""Direct paths through the coordinator core and node cores, in memory (no sockets).

The whole PATH_REQ → PUNCH (both nodes at once) / PATH_FAILED → PATH_REPORT flow,
PEER_PING forwarding, an old (capver 2) peer, a relay-only server and agent, an
offline peer and the rate limits, on the fake clock of tests/test_proto_pair.py.
"""

from __future__ import annotations

import pytest

from homeport.policy.services import Service
from homeport.proto import coord as c
from homeport.proto import node as n
from homeport.proto import path as hpath
from homeport.proto.nat import NatKind
from homeport.proto.path import PathKind
from homeport.wire import control as m
from tests.coordsim import Sim
from tests.test_proto_pair import Net, Peer

SSH = Service("ssh", 22, "127.0.0.1", 2222)


def eps(public: str, *, nat: str = "eim", local: str = "") -> m.Endpoints:
    cands = [m.Candidate("public", public)]
    if local:
        cands.append(m.Candidate("local", local))
    return m.Endpoints(candidates=tuple(cands), nat=nat, direct_port=41641)


A_EPS = eps("198.51.100.10:41641", local="10.0.0.7:41641")
B_EPS = eps("203.0.113.20:41641", local="192.168.1.9:41641")


class DirectNet(Net):
    def __init__(self, **sim_kw: object) -> None:
        super().__init__()
        if sim_kw:
            self.sim = Sim(open_timeout=10.0, unpaired_timeout=10.0, **sim_kw)

    def join_with(
        self, name: str, services: tuple[Service, ...] = (), *, relay_only: bool = False
    ) -> Peer:
        record = self.sim.new_node(name)
        config = n.NodeConfig(
            name=name, server="hp.example:8443", services=services, relay_only=relay_only
        )
        peer = Peer(record, n.NodeCore(config))
        self.peers.append(peer)
        self.connect(peer)
        return peer

    def pair(
        self, *, a_eps: m.Endpoints | None = A_EPS, b_eps: m.Endpoints | None = B_EPS
    ) -> tuple[Peer, Peer]:
        a = self.join_with("laptop")
        b = self.join_with("labpc", (SSH,))
        for peer, e in ((a, a_eps), (b, b_eps)):
            if e is not None:
                peer.core.set_endpoints(e, self.sim.now)
        self.settle()
        return a, b


def codes(peer: Peer) -> list[str]:
    return [e.choice.code for e in peer.events if isinstance(e, n.PathChanged)]


def punches(peer: Peer) -> list[m.Punch]:
    return [e.punch for e in peer.events if isinstance(e, n.StartPunch)]


@pytest.fixture
def net() -> DirectNet:
    return DirectNet()


def test_welcome_says_direct_and_the_probe_port_and_endpoints_reach_the_server() -> None:
    net = DirectNet(probe_port=8444)
    a, b = net.pair()
    assert a.core.direct_expected and a.core.probe_port == 8444
    assert net.sim.core.endpoints_of(a.record.node_id) == A_EPS
    assert net.sim.core.endpoints_of(b.record.node_id) == B_EPS
    assert a.core.path_choice(b.record.node_id, net.sim.now).code == "not-tried"


def test_a_relayed_stream_makes_the_server_punch_both_nodes_at_once(net: DirectNet) -> None:
    a, b = net.pair()
    a_id, b_id = a.record.node_id, b.record.node_id
    a.core.stream_wanted(b_id, net.sim.now)
    net.settle()  # one settle: PATH_REQ in, both PUNCHes out in the same step
    [pa], [pb] = punches(a), punches(b)
    assert pa.punch_id == pb.punch_id == 1
    assert (pa.tls_role, pb.tls_role) == ("client", "server")
    assert pa.candidates == B_EPS.candidates and pb.candidates == A_EPS.candidates
    assert pa.peer.fingerprint == b.record.fingerprint and pa.peer.node_id == b_id
    assert pb.peer.fingerprint == a.record.fingerprint and pb.peer.node_id == a_id
    assert (pa.nat, pb.nat) == ("eim", "eim")
    assert net.sim.core.pair_stats(a_id, b_id) == c.PairStats(punches=1, direct_ups=0)
    assert a.core.path_choice(b_id, net.sim.now).code == "probing"
    # the punch wins on both sides; each reports, the server counts one success
    a.core.punch_succeeded(b_id, PathKind.DIRECT, "203.0.113.20:41641", net.sim.now, rtt_ms=4)
    b.core.punch_succeeded(a_id, PathKind.DIRECT, "198.51.100.10:41641", net.sim.now)
    net.settle()
    choice = a.core.path_choice(b_id, net.sim.now)
    assert (choice.kind, choice.endpoint) == (PathKind.DIRECT, "203.0.113.20:41641")
    rec = net.sim.core.path_record(a_id, b_id)
    assert rec is not None and (rec.kind, rec.code, rec.rtt_ms) == ("direct", "direct-up", 4.0)
    assert (rec.punch_attempts, rec.punch_successes, rec.streams_relay) == (1, 1, 1)
    assert net.sim.core.pair_stats(a_id, b_id).direct_ups == 1
    # later streams go direct, no more requests
    a.core.stream_wanted(b_id, net.sim.now, direct=True)
    net.settle()
    assert len(punches(a)) == 1


def test_a_punch_that_times_out_is_retried_with_backoff(net: DirectNet) -> None:
    a, b = net.pair()
    b_id = b.record.node_id
    a.core.stream_wanted(b_id, net.sim.now)
    net.settle()
    [pa] = punches(a)
    a.core.punch_failed(b_id, pa.punch_id, "punch-timeout", "punch timed out", net.sim.now)
    net.settle()
    choice = a.core.path_choice(b_id, net.sim.now)
    assert choice.code == "punch-timeout" and "re-probing in 2 s" in choice.reason
    rec = net.sim.core.path_record(a.record.node_id, b_id)
    assert rec is not None and rec.code == "punch-timeout"
    net.advance(2.0)  # the retry is due while the peer is in use: a second punch
    assert len(punches(a)) == 2 and len(punches(b)) == 2


def test_both_request_at_once_one_punch_runs(net: DirectNet) -> None:
    a, b = net.pair()
    a.core.stream_wanted(b.record.node_id, net.sim.now)
    b.core.stream_wanted(a.record.node_id, net.sim.now)
    net.settle()
    assert len(punches(a)) == 1 and len(punches(b)) == 1
    assert "busy" not in codes(a) + codes(b)  # the busy answer met a punch already running
    assert a.core.path_choice(b.record.node_id, net.sim.now).code == "probing"
    assert b.core.path_choice(a.record.node_id, net.sim.now).code == "probing"


def raw_req(net: DirectNet, who: Peer, dst: str, punch_id: int) -> m.Message:
    """Send PATH_REQ straight to the coordinator; return its answer to ``who``."""
    box = net.sim.out[who.sid]
    box.take()  # only the answer to this request
    net.sim.send(who.sid, m.PathReq(dst=dst, punch_id=punch_id))
    [answer] = [x for x in box.take() if isinstance(x, m.Punch | m.PathFailed)]
    return answer


def test_offline_peer(net: DirectNet) -> None:
    a, b = net.pair()
    b_id = b.record.node_id
    net.sim.end(b.sid)
    net.peers.remove(b)
    assert net.sim.core.endpoints_of(b_id) is None  # endpoints are per session, memory only
    a.core.stream_wanted(b_id, net.sim.now)
    net.settle()
    choice = a.core.path_choice(b_id, net.sim.now)
    assert (choice.kind, choice.code) == (PathKind.RELAY, "peer-offline")
    assert "labpc is offline" in choice.reason


def test_an_old_capver_2_peer_gets_no_punch(net: DirectNet) -> None:
    a = net.join_with("laptop")
    a.core.set_endpoints(A_EPS, net.sim.now)
    old = net.sim.new_node("oldpc")
    sid = net.sim.connect(old.fingerprint)
    net.sim.send(sid, m.Hello(proto=1, role="agent", capver=2, caps=(m.CAP_PEERS,)))
    net.sim.send(sid, m.Announce(services=(m.ServiceInfo("ssh", 22),), host_keys=()))
    [welcome] = net.sim.out[sid].of(m.Welcome)
    assert isinstance(welcome, m.Welcome) and m.CAP_DIRECT in welcome.caps  # it just ignores it
    net.settle()
    a.core.stream_wanted(old.node_id, net.sim.now)
    net.settle()
    assert a.core.path_choice(old.node_id, net.sim.now).code == "peer-no-direct"
    assert not any(isinstance(x, m.Punch | m.PeerPing) for x in net.sim.out[sid].messages)
    # a ping to it is not forwarded either (it would not understand it)
    assert a.core.peer_ping(old.node_id, 1)
    net.settle()
    assert not any(isinstance(x, m.PeerPing) for x in net.sim.out[sid].messages)
    assert not net.sim.out[sid].closed


def test_a_direct_message_from_a_node_without_the_capability_is_ignored(net: DirectNet) -> None:
    _a, b = net.pair()
    old = net.sim.new_node("oldpc")
    sid = net.sim.connect(old.fingerprint)
    net.sim.send(sid, m.Hello(proto=1, role="agent", capver=2, caps=(m.CAP_PEERS,)))
    net.sim.send(sid, m.PathReq(dst=b.record.node_id, punch_id=1))
    assert not any(isinstance(x, m.PathFailed | m.Punch) for x in net.sim.out[sid].messages)
    assert net.sim.out[sid].closed is None
    assert punches(b) == []


def test_a_relay_only_server_never_probes() -> None:
    net = DirectNet(relay_only=True)
    a, b = net.pair()
    b_id = b.record.node_id
    a.core.stream_wanted(b_id, net.sim.now)
    net.settle()
    choice = a.core.path_choice(b_id, net.sim.now)
    assert (choice.kind, choice.code) == (PathKind.RELAY, "relay-only-server")
    assert punches(a) == [] and punches(b) == []
    # even a node that asks anyway is told why
    answer = raw_req(net, a, b_id, 77)
    assert isinstance(answer, m.PathFailed) and answer.code == "relay-only-server"


def test_a_relay_only_agent_says_so_and_is_never_punched(net: DirectNet) -> None:
    a = net.join_with("laptop")
    a.core.set_endpoints(A_EPS, net.sim.now)
    b = net.join_with("labpc", (SSH,), relay_only=True)
    b.core.set_endpoints(B_EPS, net.sim.now)  # ignored: relay-only
    net.settle()
    ep = net.sim.core.endpoints_of(b.record.node_id)
    assert ep is not None and ep.relay_only and ep.candidates == ()
    a.core.stream_wanted(b.record.node_id, net.sim.now)
    net.settle()
    assert a.core.path_choice(b.record.node_id, net.sim.now).code == "peer-relay-only"
    b.core.stream_wanted(a.record.node_id, net.sim.now)
    net.settle()
    assert b.core.path_choice(a.record.node_id, net.sim.now).code == "relay-only-local"
    assert punches(a) == [] and punches(b) == []


@pytest.mark.parametrize(
    ("a_eps", "b_eps", "code"),
    [
        (None, B_EPS, "no-candidates"),
        (A_EPS, None, "peer-no-candidates"),
        (eps("198.51.100.10:1", nat="edm"), eps("203.0.113.20:2", nat="edm"), "both-edm"),
        (eps("198.51.100.10:1", nat="eim"), eps("203.0.113.20:2", nat="edm"), "peer-edm"),
        (eps("198.51.100.10:1", nat="edm"), eps("203.0.113.20:2", nat="eim"), "self-edm"),
    ],
)
def test_hopeless_or_impossible_requests_fail_with_a_reason(
    net: DirectNet, a_eps: m.Endpoints | None, b_eps: m.Endpoints | None, code: str
) -> None:
    a, b = net.pair(a_eps=a_eps, b_eps=b_eps)
    a.core.stream_wanted(b.record.node_id, net.sim.now)
    net.settle()
    assert a.core.path_choice(b.record.node_id, net.sim.now).code == code
    assert punches(b) == []


def test_both_symmetric_on_one_lan_still_punch(net: DirectNet) -> None:
    a, b = net.pair(
        a_eps=eps("198.51.100.10:1000", nat="edm", local="10.0.0.7:41641"),
        b_eps=eps("198.51.100.10:2000", nat="edm", local="10.0.0.8:41641"),
    )
    a.core.stream_wanted(b.record.node_id, net.sim.now)
    net.settle()
    assert len(punches(b)) == 1  # same public address: the local candidates may work


def test_policy_refuses_a_path_to_a_node_that_exposes_nothing(net: DirectNet) -> None:
    a, b = net.pair()
    b.core.stream_wanted(a.record.node_id, net.sim.now)  # laptop exposes nothing
    net.settle()
    choice = b.core.path_choice(a.record.node_id, net.sim.now)
    assert choice.code == "policy" and "exposes no service" in choice.reason


def test_unknown_and_self_destinations(net: DirectNet) -> None:
    a, _b = net.pair()
    for dst in ("n-nope", a.record.node_id):
        answer = raw_req(net, a, dst, 5)
        assert isinstance(answer, m.PathFailed) and answer.code == "unknown-node"


def test_path_requests_are_rate_limited_per_pair(net: DirectNet) -> None:
    a, b = net.pair()
    b_id = b.record.node_id
    answers = [raw_req(net, a, b_id, i) for i in range(c.MAX_PATH_REQS_PER_PAIR + 1)]
    kinds = [x.code if isinstance(x, m.PathFailed) else "punch" for x in answers]
    assert kinds == ["punch"] + ["busy"] * (c.MAX_PATH_REQS_PER_PAIR - 1) + ["rate-limited"]
    assert "retry in 60 s" in answers[-1].reason  # type: ignore[attr-defined]
    net.sim.now += c.PATH_REQ_WINDOW
    assert isinstance(raw_req(net, a, b_id, 99), m.Punch)  # the window passed, no punch in flight


def test_a_path_report_ends_the_punch_in_flight(net: DirectNet) -> None:
    a, b = net.pair()
    b_id = b.record.node_id
    assert isinstance(raw_req(net, a, b_id, 1), m.Punch)
    net.sim.send(a.sid, m.PathReport(peer=b_id, kind="local", endpoint="192.168.1.9:41641"))
    assert isinstance(raw_req(net, a, b_id, 2), m.Punch)


def test_peer_ping_is_forwarded_answered_and_rate_limited(net: DirectNet) -> None:
    a, b = net.pair()
    a_id, b_id = a.record.node_id, b.record.node_id
    assert a.core.peer_ping(b_id, 1)
    net.settle()
    assert [e for e in a.events if isinstance(e, n.PeerPongReceived)] == [
        n.PeerPongReceived(b_id, 1)
    ]
    for seq in range(2, 2 + 2 * c.MAX_PEER_PINGS):
        net.sim.send(a.sid, m.PeerPing(peer=b_id, seq=seq))
    forwarded = [x for x in net.sim.out[b.sid].take() if isinstance(x, m.PeerPing)]
    assert len(forwarded) == c.MAX_PEER_PINGS - 1  # the first ping used one slot
    assert all(x.peer == a_id for x in forwarded)  # rewritten to the sender
    net.sim.now += c.PEER_PING_WINDOW
    net.sim.send(a.sid, m.PeerPing(peer=b_id, seq=999))
    assert [x for x in net.sim.out[b.sid].take() if isinstance(x, m.PeerPing)]


def test_endpoints_go_out_again_after_a_reconnect_and_changes_reprobe(net: DirectNet) -> None:
    a, b = net.pair()
    b_id = b.record.node_id
    net.sim.end(a.sid)
    a.core.session_ended("eof", net.sim.now)
    net.settle()
    assert net.sim.core.endpoints_of(a.record.node_id) is None
    net.connect(a)
    assert net.sim.core.endpoints_of(a.record.node_id) == A_EPS
    # a failure, then new endpoints: asked again at once, no backoff
    a.core.stream_wanted(b_id, net.sim.now)
    net.settle()
    [pa] = punches(a)
    a.core.punch_failed(b_id, pa.punch_id, "punch-timeout", "punch timed out", net.sim.now)
    net.settle()
    a.core.set_endpoints(eps("198.51.100.11:41641"), net.sim.now)
    net.settle()
    assert len(punches(a)) == 2
    assert a.core.paths.self_nat is NatKind.EIM


def test_a_lost_direct_path_falls_back_and_reprobes(net: DirectNet) -> None:
    a, b = net.pair()
    b_id = b.record.node_id
    a.core.stream_wanted(b_id, net.sim.now)
    net.settle()
    a.core.punch_succeeded(b_id, PathKind.LOCAL, "192.168.1.9:41641", net.sim.now)
    net.settle()
    assert a.core.path_choice(b_id, net.sim.now).kind is PathKind.LOCAL
    a.core.path_lost(b_id, "no answer for 3.5 s", net.sim.now)
    net.settle()
    assert a.core.path_choice(b_id, net.sim.now).code == hpath.PATH_LOST
    rec = net.sim.core.path_record(a.record.node_id, b_id)
    assert rec is not None and (rec.kind, rec.code) == ("relay", "path-lost")
    net.advance(hpath.BACKOFF_MIN)
    assert len(punches(a)) == 2


def test_a_punch_while_the_path_is_up_is_run(net: DirectNet) -> None:
    """The server only punches on the peer's request: the peer lost the path we still hold."""
    a, b = net.pair()
    b_id = b.record.node_id
    a.core.punch_succeeded(b_id, PathKind.DIRECT, "203.0.113.20:41641", net.sim.now)
    net.settle()
    ignored = a.core.ignored
    punch = m.Punch(
        punch_id=9,
        peer=b.record.peer_info(),
        candidates=B_EPS.candidates,
        nat="eim",
        tls_role="server",
    )
    a.core.message_received(punch, net.sim.now)
    net.settle()
    assert a.core.ignored == ignored and [p.punch_id for p in punches(a)] == [9]
    assert (
        a.core.path_choice(b_id, net.sim.now).code == "direct-up"
    )  # the old link serves meanwhile


# -- the server's reachability probe of a forwarded direct port ------------------------------

#: The address every simulated session comes from (tests.coordsim.Sim.connect).
OBSERVED = "192.0.2.10"
FWD_EPS = eps(f"{OBSERVED}:5555", nat="edm")  # symmetric NAT, a forward of :41641 maybe
EDM_EPS = eps("198.51.100.10:1", nat="edm")


def reach_probes(net: DirectNet) -> list[c.ProbeReach]:
    return [cmd for cmd in net.sim.relay if isinstance(cmd, c.ProbeReach)]


@pytest.mark.parametrize(("reachable", "code"), [(True, "probing"), (False, "both-edm")])
def test_a_forwarded_direct_port_the_server_reached_lets_edm_nodes_punch(
    net: DirectNet, reachable: bool, code: str
) -> None:
    a, b = net.pair(a_eps=EDM_EPS, b_eps=FWD_EPS)
    b_id = b.record.node_id
    # Only b names the address its own connection comes from; only its direct port is tried.
    assert reach_probes(net) == [c.ProbeReach(b_id, OBSERVED, 41641)]
    net.sim.core.reach_probed(b_id, OBSERVED, 41641, reachable, net.sim.now)
    a.core.stream_wanted(b_id, net.sim.now)
    net.settle()
    assert a.core.path_choice(b_id, net.sim.now).code == code
    if reachable:
        (punch,) = punches(a)
        assert punch.candidates[0] == m.Candidate("public", f"{OBSERVED}:41641")
        assert [p.candidates for p in punches(b)] == [EDM_EPS.candidates]
    else:
        assert punches(a) == punches(b) == []


def test_the_reach_probe_is_rate_limited_and_only_for_the_observed_address(
    net: DirectNet,
) -> None:
    a, b = net.pair(a_eps=EDM_EPS, b_eps=FWD_EPS)
    b_id = b.record.node_id
    for _ in range(5):  # re-reports within the interval: no new connect
        net.sim.send(b.sid, FWD_EPS)
    assert len(reach_probes(net)) == 1
    net.sim.advance(c.REACH_PROBE_INTERVAL)
    net.sim.send(b.sid, FWD_EPS)
    assert len(reach_probes(net)) == 2
    # A public candidate naming any other address is never connected to.
    net.sim.advance(c.REACH_PROBE_INTERVAL)
    net.sim.send(b.sid, eps("203.0.113.99:5555", nat="edm"))
    assert len(reach_probes(net)) == 2
    # A late success for an address the node no longer reports counts for nothing.
    net.sim.core.reach_probed(b_id, OBSERVED, 41641, True, net.sim.now)
    a.core.stream_wanted(b_id, net.sim.now)
    net.settle()
    assert a.core.path_choice(b_id, net.sim.now).code == "both-edm"


def test_a_punch_for_a_relay_only_node_is_not_run(net: DirectNet) -> None:
    a, b = net.pair()
    ignored = a.core.ignored
    a.core.config = n.NodeConfig(name="laptop", server="hp.example:8443", relay_only=True)
    punch = m.Punch(
        punch_id=9,
        peer=b.record.peer_info(),
        candidates=B_EPS.candidates,
        nat="eim",
        tls_role="server",
    )
    a.core.message_received(punch, net.sim.now)
    net.settle()
    assert a.core.ignored == ignored + 1 and punches(a) == []


def test_a_server_without_direct_gets_no_direct_messages() -> None:
    core = n.NodeCore(n.NodeConfig(name="x", server="s:1"))
    core.session_started(0.0)
    core.message_received(
        m.Welcome(proto=1, node_id="n1", name="x", ping_interval=5.0, capver=2, caps=("peers",)),
        0.0,
    )
    core.set_endpoints(A_EPS, 0.0)
    core.stream_wanted("n2", 0.0)
    sent = []
    while (cmd := core.next_command()) is not None:
        if isinstance(cmd, n.Send):
            sent.append(type(cmd.msg).__name__)
    assert sent == ["Hello", "Announce"]
    assert not core.peer_ping("n2", 1)


def test_the_peer_map_says_offline_and_back_online_reprobes(net: DirectNet) -> None:
    a, b = net.pair()
    b_id = b.record.node_id
    net.advance(c.NETMAP_COALESCE)  # the peer maps are pushed
    a.core.stream_wanted(b_id, net.sim.now)
    net.settle()
    [pa] = punches(a)
    a.core.punch_failed(b_id, pa.punch_id, "punch-timeout", "punch timed out", net.sim.now)
    net.settle()
    net.sim.end(b.sid)  # B goes offline: the map says so
    net.peers.remove(b)
    net.advance(c.MAP_OFFLINE_GRACE + c.NETMAP_COALESCE)
    assert a.core.path_choice(b_id, net.sim.now).code == "peer-offline"
    a.core.stream_wanted(b_id, net.sim.now)
    net.advance(5.0)  # the backoff passes, but nobody asks for an offline peer
    assert len(punches(a)) == 1
    # B comes back (its core re-sends ENDPOINTS after WELCOME): A re-probes at once
    net.peers.append(b)
    net.connect(b)
    net.advance(c.NETMAP_COALESCE)
    assert len(punches(a)) == 2
    assert a.core.path_choice(b_id, net.sim.now).code == "probing"


def test_removing_a_node_forgets_its_endpoints(net: DirectNet) -> None:
    a, b = net.pair()
    net.sim.core.remove_node("labpc", net.sim.now)
    net.sim.run()
    assert net.sim.core.endpoints_of(b.record.node_id) is None
    answer = raw_req(net, a, b.record.node_id, 3)
    assert isinstance(answer, m.PathFailed) and answer.code == "unknown-node"


def test_path_tables_are_bounded(net: DirectNet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(c, "MAX_PATH_RECORDS", 2)
    a, b = net.pair()
    x = net.join_with("third", (SSH,))
    x.core.set_endpoints(eps("192.0.2.30:41641"), net.sim.now)
    net.settle()
    a_id, b_id, x_id = a.record.node_id, b.record.node_id, x.record.node_id
    assert isinstance(raw_req(net, a, b_id, 1), m.Punch)
    assert isinstance(raw_req(net, a, x_id, 2), m.Punch)
    assert net.sim.core.pair_stats(a_id, b_id).punches == 1
    assert isinstance(raw_req(net, b, x_id, 3), m.Punch)  # a third pair: the oldest goes
    assert net.sim.core.pair_stats(a_id, b_id).punches == 0
    assert net.sim.core.pair_stats(b_id, x_id).punches == 1


# -- direct streams in the server's audit log (STREAM_LOG) ---------------------------------


def _stream_audits(net: DirectNet) -> list[dict[str, str]]:
    return [x.as_dict() for x in net.sim.audits if x.kind == "stream"]


def test_a_direct_stream_decision_reaches_the_servers_audit_log(net: DirectNet) -> None:
    a, b = net.pair()
    a_id, b_id = a.record.node_id, b.record.node_id
    # the destination's decision on a mux OPEN: reported, recorded as the session's node
    assert b.core.direct_decided(a_id, "ssh", True, "ok", "acls[0]", "", "direct-1", net.sim.now)
    net.settle()
    assert _stream_audits(net) == [
        {"stream": "direct-1", "src": "laptop", "src_id": a_id, "dst": "labpc", "dst_id": b_id,
         "service": "ssh", "verdict": "allowed", "code": "ok", "rule": "acls[0]",
         "by": "destination-direct", "reason": ""},
    ]  # fmt: skip
    b.core.direct_decided(a_id, "web", False, "not-exposed", "not-exposed", "no", "d-2", 0.0)
    net.settle()
    denied = _stream_audits(net)[-1]
    assert (denied["verdict"], denied["code"], denied["reason"]) == ("denied", "not-exposed", "no")


def test_direct_stream_reports_are_bounded_at_the_agent(net: DirectNet) -> None:
    a, b = net.pair()
    a_id, now = a.record.node_id, net.sim.now
    sent = [
        b.core.direct_decided(a_id, "ssh", True, "ok", "r", "", f"direct-{i}", now)
        for i in range(n.MAX_STREAM_LOGS + 5)
    ]
    assert sent.count(True) == n.MAX_STREAM_LOGS and b.core.stream_logs_dropped == 5
    net.settle()
    assert len(_stream_audits(net)) == n.MAX_STREAM_LOGS
    # a new window sends again
    assert b.core.direct_decided(a_id, "ssh", True, "ok", "r", "", "x", now + n.STREAM_LOG_WINDOW)


def test_no_stream_log_to_a_server_without_capability_policy() -> None:
    core = n.NodeCore(n.NodeConfig(name="labpc", server="hp.example:8443"))
    core.session_started(0.0)
    welcome = m.Welcome(1, "n1", "labpc", 5.0, capver=3, caps=(m.CAP_PEERS,))
    core.message_received(welcome, 0.0)
    assert core.ready
    while core.next_command() is not None:
        pass
    assert not core.direct_decided("n2", "ssh", True, "ok", "r", "", "direct-1", 0.0)
    assert core.next_command() is None and core.stream_logs_dropped == 1
