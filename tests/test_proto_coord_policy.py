"""The coordinator under an ACL policy, in memory: early refusal, POLICY pushes, visibility, cuts.

Users and tags are set on the node records directly (the identity work fills
them at enrollment); the fake clock and the in-memory registry come from
``tests.coordsim``.
"""

from __future__ import annotations

from dataclasses import replace

from homeport.policy.acl import compile_policy
from homeport.proto import audit
from homeport.proto import coord as c
from homeport.proto.netmap import PeerView
from homeport.proto.policy import policy_from_message
from homeport.wire import control as m
from tests.coordsim import Sim

SSH = m.ServiceInfo("ssh", 22)
PG = m.ServiceInfo("postgres", 5432)
TOKEN = "ab" * 16
TOKEN2 = "cd" * 16

POLICY = """{
  "groups": {"group:dev": ["bob@example.com"], "group:admin": ["alice@example.com"]},
  "tagOwners": {"tag:db": ["group:admin"], "tag:web": ["group:admin"]},
  "acls": [
    {"action": "accept", "src": ["group:admin"], "dst": ["*:*"]},
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:web:22"]},
  ],
}"""


def who(sim: Sim, node: c.NodeRecord, *, user: str = "", tags: tuple[str, ...] = ()) -> None:
    """Give ``node`` a user or tags, as enrollment with a bound auth key will."""
    sim.core._add_node(replace(node, user=user, tags=tags))


def network(sim: Sim) -> dict[str, c.NodeRecord]:
    nodes = {n: sim.new_node(n) for n in ("alice", "bob", "db", "web")}
    who(sim, nodes["alice"], user="alice@example.com")
    who(sim, nodes["bob"], user="bob@example.com")
    who(sim, nodes["db"], tags=("tag:db",))
    who(sim, nodes["web"], tags=("tag:web",))
    return nodes


def audits(sim: Sim, kind: str) -> list[dict[str, str]]:
    return [x.as_dict() for x in sim.audits if x.kind == kind]


def view(sim: Sim, sid: int) -> PeerView:
    v = PeerView()
    for msg in sim.out[sid].messages:
        if isinstance(msg, m.Peers):
            v.receive(msg)
    return v


def test_a_denied_open_is_refused_early_with_one_line() -> None:
    sim = Sim(policy=compile_policy(POLICY))
    network(sim)
    db = sim.agent(sim.core.node_by_name("db"), (SSH, PG))  # type: ignore[arg-type]
    bob = sim.hello(sim.core.node_by_name("bob"), "client")  # type: ignore[arg-type]
    sim.send(bob, m.Open(dst="db", service="5432", token=TOKEN))
    [failed] = sim.out[bob].of(m.OpenFailed)
    assert isinstance(failed, m.OpenFailed)
    assert (failed.code, failed.message) == (
        "policy",
        "denied by policy: no rule lets group:dev reach tag:db:5432",
    )
    assert not sim.out[db].of(m.Incoming)  # the destination never heard of it
    assert any(isinstance(x, c.RelayRefuse) for x in sim.relay)
    [rec] = audits(sim, audit.STREAM)
    assert {k: rec[k] for k in ("src", "dst", "service", "verdict", "code", "rule", "reason")} == {
        "src": "bob",
        "dst": "db",
        "service": "5432",
        "verdict": "denied",
        "code": "policy",
        "rule": "default-deny",
        "reason": "denied by policy: no rule lets group:dev reach tag:db:5432",
    }


def test_an_allowed_open_names_its_rule() -> None:
    sim = Sim(policy=compile_policy(POLICY))
    nodes = network(sim)
    web = sim.agent(nodes["web"], (SSH,))
    bob = sim.hello(nodes["bob"], "client")
    sim.send(bob, m.Open(dst="web", service="ssh", token=TOKEN))
    [inc] = sim.out[web].of(m.Incoming)
    assert isinstance(inc, m.Incoming)
    sim.send(web, m.Accept(stream_id=inc.stream_id))  # the destination's answer is audited
    assert [(r["verdict"], r["rule"]) for r in audits(sim, audit.STREAM)] == [
        ("allowed", "acls[1]")
    ]


def test_without_a_policy_every_exposed_service_is_reachable() -> None:
    sim = Sim()
    nodes = network(sim)
    db = sim.agent(nodes["db"], (PG,))
    bob = sim.hello(nodes["bob"], "client")
    sim.send(bob, m.Open(dst="db", service="5432", token=TOKEN))
    assert sim.out[db].of(m.Incoming)
    assert not sim.out[db].of(m.Policy)  # nothing to push: the node starts without one


def test_policy_push_carries_only_the_rules_for_that_node() -> None:
    sim = Sim(policy=compile_policy(POLICY))
    nodes = network(sim)
    web = sim.agent(nodes["web"], (SSH,))
    db = sim.agent(nodes["db"], (PG,))
    [for_web] = sim.out[web].of(m.Policy)
    [for_db] = sim.out[db].of(m.Policy)
    assert isinstance(for_web, m.Policy) and isinstance(for_db, m.Policy)
    assert for_web.active and for_web.tags == ("tag:web",)
    assert [r.name for r in for_web.rules] == ["acls[0]", "acls[1]"]
    assert [r.name for r in for_db.rules] == ["acls[0]"]  # dev's rule cannot reach db
    assert [s.text for s in for_web.rules[1].src] == ["group:dev"]
    assert [s.value for s in for_web.rules[1].src] == ["bob@example.com"]  # expanded
    # a new policy is pushed, with a higher version
    sim.core.policy_changed(None, sim.now)
    sim.run()
    newer = sim.out[web].of(m.Policy)[-1]
    assert isinstance(newer, m.Policy)
    assert not newer.active and newer.version > for_web.version
    assert policy_from_message(newer) is None


def test_agents_without_the_capability_get_no_policy() -> None:
    sim = Sim(policy=compile_policy(POLICY))
    nodes = network(sim)
    sid = sim.connect(nodes["web"].fingerprint)
    sim.send(sid, m.Hello(proto=1, role="agent", capver=2, caps=(m.CAP_PEERS,)))
    assert not sim.out[sid].of(m.Policy)
    sim.core.policy_changed(None, sim.now)
    sim.run()
    assert not sim.out[sid].of(m.Policy)


def test_peer_maps_hold_only_reachable_peers_and_follow_changes() -> None:
    sim = Sim(policy=compile_policy(POLICY))
    nodes = network(sim)
    sids = {n: sim.agent(nodes[n]) for n in ("alice", "bob", "db", "web")}
    sim.advance(c.NETMAP_COALESCE)
    names = {n: sorted(p.name for p in view(sim, sid).peers.values()) for n, sid in sids.items()}
    assert names == {
        "alice": ["alice", "bob", "db", "web"],  # admins reach everything
        "bob": ["web"],
        "db": [],
        "web": [],
    }
    # bob and a brand-new dev see the same peers: one shared encoding per audience
    sim.core.policy_changed(
        compile_policy(POLICY.replace('"tag:web:22"', '"tag:web:22", "tag:db:5432"')), sim.now
    )
    sim.run()
    sim.advance(c.NETMAP_COALESCE)
    assert sorted(p.name for p in view(sim, sids["bob"]).peers.values()) == ["db", "web"]
    sim.core.policy_changed(None, sim.now)  # no policy: everyone sees everyone again
    sim.run()
    sim.advance(c.NETMAP_COALESCE)
    assert len(view(sim, sids["db"]).peers) == 4


def test_live_and_waiting_streams_denied_by_a_change_are_cut_at_once() -> None:
    sim = Sim(policy=compile_policy(POLICY))
    nodes = network(sim)
    web = sim.agent(nodes["web"], (SSH,))
    bob = sim.hello(nodes["bob"], "client")
    alice = sim.hello(nodes["alice"], "client")
    sim.send(bob, m.Open(dst="web", service="ssh", token=TOKEN))
    [live] = sim.out[web].of(m.Incoming)
    assert isinstance(live, m.Incoming)
    sim.send(web, m.Accept(stream_id=live.stream_id))
    sim.core.relay_event(c.StreamStarted(live.stream_id), sim.now)
    sim.send(bob, m.Open(dst="web", service="ssh", token=TOKEN2))  # left waiting
    sim.send(alice, m.Open(dst="web", service="ssh", token="ef" * 16))
    incoming = [x for x in sim.out[web].of(m.Incoming) if isinstance(x, m.Incoming)]
    assert len(incoming) == 3
    sim.relay.clear()
    # dev loses access to web; admins keep it
    ended = sim.core.policy_changed(
        compile_policy(POLICY.replace('"tag:web:22"', '"tag:db:22"')), sim.now
    )
    sim.run()
    assert ended == 2
    assert set(sim.core.stream_states()) == {incoming[2].stream_id}  # alice's stays
    cuts = [x for x in sim.relay if isinstance(x, c.RelayCutStream)]
    assert [x.stream_id for x in cuts] == [live.stream_id]
    assert cuts[0].reason == "denied by policy: no rule lets group:dev reach tag:web:22"
    failed = [x for x in sim.out[bob].of(m.OpenFailed) if isinstance(x, m.OpenFailed)]
    assert [(f.token, f.code) for f in failed] == [(TOKEN2, "policy")]
    cut = [r for r in audits(sim, audit.STREAM) if r["by"] == "policy-change"]
    assert [(r["verdict"], r["code"]) for r in cut] == [("denied", "policy")] * 2
    [setrec] = audits(sim, audit.POLICY_SET)
    assert setrec["acls"] == "2"


def test_a_refused_policy_is_audited() -> None:
    sim = Sim()
    sim.core.policy_refused("3:5: acls[0].x: unknown field 'x'", sim.now)
    sim.run()
    assert audits(sim, audit.POLICY_REFUSED) == [{"reason": "3:5: acls[0].x: unknown field 'x'"}]
