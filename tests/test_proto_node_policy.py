"""The node core enforces the pushed policy on every INCOMING, even if the server let it through."""

from __future__ import annotations

from homeport.policy.acl import Subject, compile_policy
from homeport.proto import node as n
from homeport.proto.policy import policy_message
from homeport.wire import control as m
from tests.test_proto_node import Node, incoming, node, tok  # noqa: F401 (fixture)

POLICY = """{
  "groups": {"group:dev": ["bob@example.com"]},
  "tagOwners": {"tag:lab": []},
  "acls": [{"action": "accept", "src": ["group:dev"], "dst": ["tag:lab:22"]}],
}"""
ME = Subject("n-labpc", "labpc", "", ("tag:lab",))
BOB = m.PeerInfo("n-bob", "bob-pc", "sha256:" + "ab" * 32, user="bob@example.com")
EVE = m.PeerInfo("n-eve", "eve-pc", "sha256:" + "ef" * 32, user="eve@example.com")


def pushed(version: int = 2) -> m.Policy:
    msg = policy_message(compile_policy(POLICY), ME, version)
    return m.decode_untrusted(m.MsgType.POLICY, m.encode(msg)[5:])  # type: ignore[return-value]


def decided(cmds: list[n.Command]) -> n.StreamRecord:
    [rec] = [c.record for c in cmds if isinstance(c, n.Decided)]
    return rec


def test_the_destination_refuses_by_policy_what_the_server_let_through(node: Node) -> None:  # noqa: F811
    node.connect()
    node.recv(pushed())
    assert node.core.policy is not None and node.core.tags == ("tag:lab",)
    eve = m.Incoming(stream_id="s1", token=tok(1).hex(), src=EVE, service="ssh")
    cmds = node.recv(eve)
    rec = decided(cmds)
    assert (rec.accepted, rec.code, rec.rule) == (False, "policy", "default-deny")
    [reject] = [c.msg for c in cmds if isinstance(c, n.Send)]
    assert isinstance(reject, m.Reject)
    assert reject.message == "denied by policy: no rule lets eve@example.com reach tag:lab:22"
    assert not [c for c in cmds if isinstance(c, n.ConnectTarget)]
    # the allowed source gets through, naming the rule
    ok = node.recv(m.Incoming(stream_id="s2", token=tok(2).hex(), src=BOB, service="ssh"))
    assert [c.service.name for c in ok if isinstance(c, n.ConnectTarget)] == ["ssh"]
    # a port the rule does not grant is refused even for bob
    web = node.recv(m.Incoming(stream_id="s3", token=tok(3).hex(), src=BOB, service="web"))
    assert decided(web).code == "policy"


def test_no_policy_pushed_keeps_the_default(node: Node) -> None:  # noqa: F811
    node.connect()
    cmds = node.recv(incoming())
    assert any(isinstance(c, n.ConnectTarget) for c in cmds)
    node.recv(pushed())
    node.recv(m.Policy(version=3, active=False))  # the admin removed the policy
    assert node.core.policy is None
    assert any(isinstance(c, n.ConnectTarget) for c in node.recv(incoming("s5")))
    node.recv(pushed(version=4))
    node.core.session_ended("test", node.clock.now)
    node.connect()  # a new session starts without a policy until the server sends one
    assert node.core.policy is None and node.core.policy_version == 0


def test_an_older_push_never_overrides_a_newer_one(node: Node) -> None:  # noqa: F811
    node.connect()
    node.recv(pushed(version=5))
    node.recv(m.Policy(version=4, active=False))
    assert node.core.policy is not None and node.core.policy_version == 5


def test_an_unreadable_policy_refuses_every_stream(node: Node) -> None:  # noqa: F811
    node.connect()
    bad = m.Policy(
        version=2,
        active=True,
        rules=(m.PolicyRule("acls[0]", (m.PolicySel("martian"),), (m.PolicySel("any"),)),),
    )
    node.recv(bad)
    rec = decided(node.recv(incoming()))
    assert (rec.accepted, rec.code, rec.rule) == (False, "policy", n.RULE_POLICY_UNREADABLE)
