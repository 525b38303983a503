"""Exit streams through one coordinator core and node cores, in memory (no sockets).

The whole decision path of ``homeport socks --via labpc``: the exit node's
ANNOUNCE, the server's early decision (networks, policy, capability), the
INCOMING that carries the destination, the exit node's authoritative
decision and dial command, failure lines back to the opener, and the audit
log's record with the destination.
"""

from __future__ import annotations

import pytest

from homeport.policy.acl import compile_policy
from homeport.policy.services import Service
from homeport.proto import coord as c
from homeport.proto import node as n
from homeport.proto.policy import policy_from_message, policy_message
from homeport.wire import control as m
from tests.test_proto_pair import TOKEN, Net

SSH = Service("ssh", 22, "127.0.0.1", 2222)
LAN = ("192.168.1.0/24",)


def _exit_node(net: Net, nets: tuple[str, ...] = LAN) -> object:
    lab = net.join("labpc", (SSH,))
    lab.core.set_exit(nets)
    net.settle()
    return lab


@pytest.fixture
def net() -> Net:
    return Net()


def test_the_exit_node_announces_its_networks_and_the_server_keeps_them(net: Net) -> None:
    lab = _exit_node(net)
    node = net.sim.core.node(lab.record.node_id)  # type: ignore[attr-defined]
    assert node is not None and node.exit_nets == LAN
    lab.core.set_exit(())  # type: ignore[attr-defined]
    net.settle()
    node = net.sim.core.node(lab.record.node_id)  # type: ignore[attr-defined]
    assert node is not None and node.exit_nets == ()


def test_bad_announced_networks_are_dropped(net: Net) -> None:
    lab = _exit_node(net, ("192.168.1.0/24", "not-a-net", "10.0.0.1/8", "x" * 20000))
    node = net.sim.core.node(lab.record.node_id)  # type: ignore[attr-defined]
    assert node is not None and node.exit_nets == LAN


def test_an_exit_stream_carries_its_destination_to_the_exit_node(net: Net) -> None:
    lab = _exit_node(net)
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "labpc", "", net.sim.now, exit="192.168.1.50:80")
    net.settle()
    [dial] = lab.of(n.ConnectExit)  # type: ignore[attr-defined]
    assert isinstance(dial, n.ConnectExit)
    assert (dial.host, dial.port, dial.nets) == ("192.168.1.50", 80, LAN)
    assert not lab.of(n.ConnectTarget)  # type: ignore[attr-defined]
    lab.core.target_connected(dial.stream_id)  # type: ignore[attr-defined]
    net.settle()
    [start] = lab.of(n.StartStream)  # type: ignore[attr-defined]
    assert isinstance(start, n.StartStream) and start.service.target_host == "192.168.1.50"
    [ok] = laptop.of(n.LocalOpenSucceeded)
    assert isinstance(ok, n.LocalOpenSucceeded) and ok.opened.port == 80
    streams = [a.as_dict() for a in net.sim.audits if a.kind == "stream"]
    assert streams and all(s["exit"] == "192.168.1.50:80" for s in streams)
    assert {s["verdict"] for s in streams} == {"allowed"}
    assert streams[-1]["rule"] == "exit-same-owner" and streams[-1]["service"] == "(exit)"


def test_a_name_is_passed_on_for_the_exit_node_to_resolve(net: Net) -> None:
    lab = _exit_node(net)
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "labpc", "", net.sim.now, exit="printer.lab:631")
    net.settle()
    [dial] = lab.of(n.ConnectExit)  # type: ignore[attr-defined]
    assert isinstance(dial, n.ConnectExit) and (dial.host, dial.port) == ("printer.lab", 631)


def test_a_dial_failure_reaches_the_opener_as_one_line(net: Net) -> None:
    lab = _exit_node(net)
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "labpc", "", net.sim.now, exit="192.168.1.50:81")
    net.settle()
    [dial] = lab.of(n.ConnectExit)  # type: ignore[attr-defined]
    assert isinstance(dial, n.ConnectExit)
    why = "connection refused by 192.168.1.50:81"
    lab.core.target_failed(dial.stream_id, why, code="refused")  # type: ignore[attr-defined]
    net.settle()
    [failed] = laptop.of(n.LocalOpenFailed)
    assert isinstance(failed, n.LocalOpenFailed)
    assert (failed.code, failed.message) == ("refused", why)
    denied = [a.as_dict() for a in net.sim.audits if a.as_dict().get("verdict") == "denied"]
    assert denied[-1]["exit"] == "192.168.1.50:81" and denied[-1]["by"] == "destination"


def test_an_address_outside_the_networks_is_refused_by_the_server(net: Net) -> None:
    lab = _exit_node(net)
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "labpc", "", net.sim.now, exit="10.1.2.3:22")
    net.settle()
    [failed] = laptop.of(n.LocalOpenFailed)
    assert isinstance(failed, n.LocalOpenFailed) and failed.code == "not-allowed"
    assert "outside the exit's networks (192.168.1.0/24)" in failed.message
    assert not lab.of(n.ConnectExit)  # type: ignore[attr-defined]


def test_a_node_that_is_not_an_exit_is_refused_with_the_fix(net: Net) -> None:
    net.join("labpc", (SSH,))
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "labpc", "", net.sim.now, exit="192.168.1.50:80")
    net.settle()
    [failed] = laptop.of(n.LocalOpenFailed)
    assert isinstance(failed, n.LocalOpenFailed) and failed.code == "not-exit"
    assert "homeport set --advertise-exit" in failed.message


def test_an_old_exit_node_is_never_sent_an_exit_stream(net: Net) -> None:
    old = net.sim.new_node("oldpc")
    sid = net.sim.connect(old.fingerprint)
    caps = tuple(x for x in m.OUR_CAPS if x != m.CAP_EXIT)
    net.sim.send(sid, m.Hello(proto=1, role="agent", capver=3, caps=caps))
    net.sim.send(sid, m.Announce(services=(), host_keys=(), exit=LAN))  # ignored without cap
    net.sim.out[sid].take()
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "oldpc", "", net.sim.now, exit="192.168.1.50:80")
    net.settle()
    [failed] = laptop.of(n.LocalOpenFailed)
    assert isinstance(failed, n.LocalOpenFailed) and failed.code == "upgrade"
    assert "oldpc runs a homeport without exit nodes" in failed.message
    assert not [x for x in net.sim.out[sid].take() if isinstance(x, m.Incoming)]


def test_an_exit_open_never_matches_a_service_on_an_old_server() -> None:
    """OPEN's service for an exit stream is no valid service name: an old server says no."""
    from homeport.wire import names

    assert names.service_name_problem(m.EXIT_SERVICE) is not None


POLICY = """{
  "acls": [
    {"action": "accept", "src": ["laptop"], "dst": ["labpc:exit", "labpc:22"]},
    {"action": "accept", "src": ["intruder"], "dst": ["labpc:22"]},
  ],
  "tests": [
    {"src": "laptop", "accept": ["labpc:exit"]},
    {"src": "intruder", "accept": ["labpc:22"], "deny": ["labpc:exit"]},
  ],
}"""


def test_with_a_policy_only_a_granted_node_may_use_the_exit(net: Net) -> None:
    lab = _exit_node(net)
    laptop = net.join("laptop")
    intruder = net.join("intruder")
    net.sim.core.policy_changed(compile_policy(POLICY), net.sim.now)
    net.sim.run()
    net.settle()
    intruder.core.open_local(TOKEN, "labpc", "", net.sim.now, exit="192.168.1.50:80")
    net.settle()
    [failed] = intruder.of(n.LocalOpenFailed)
    assert isinstance(failed, n.LocalOpenFailed) and failed.code == "policy"
    assert "no rule lets intruder use labpc as an exit node" in failed.message
    laptop.core.open_local(TOKEN, "labpc", "", net.sim.now, exit="192.168.1.50:80")
    net.settle()
    [dial] = lab.of(n.ConnectExit)  # type: ignore[attr-defined]
    assert isinstance(dial, n.ConnectExit)
    lab.core.target_connected(dial.stream_id)  # type: ignore[attr-defined]
    net.settle()
    audit = [a.as_dict() for a in net.sim.audits if a.kind == "stream"]
    assert any(a["src"] == "intruder" and a["verdict"] == "denied" for a in audit)
    assert any(a["src"] == "laptop" and a["rule"] == "acls[0]" for a in audit)


def test_the_exit_node_decides_again_with_its_own_policy_copy(net: Net) -> None:
    """Authoritative at the destination: an INCOMING the server should not have sent is refused."""
    lab = _exit_node(net)
    net.sim.core.policy_changed(compile_policy(POLICY), net.sim.now)
    net.sim.run()
    net.settle()
    assert lab.core.policy is not None  # type: ignore[attr-defined]
    src = m.PeerInfo(node_id="n-x", name="intruder", fingerprint="sha256:00")
    lab.core.message_received(  # type: ignore[attr-defined]
        m.Incoming(
            stream_id="s1", token=TOKEN.hex(), src=src, service="(exit)", exit="192.168.1.5:80"
        ),
        net.sim.now,
    )
    net.settle()
    [rec] = [e for e in lab.of(n.Decided) if e.record.stream_id == "s1"]  # type: ignore[attr-defined]
    assert not rec.record.accepted and rec.record.code == "policy"
    assert not lab.of(n.ConnectExit)  # type: ignore[attr-defined]


def test_an_incoming_exit_outside_our_networks_is_refused_at_the_exit(net: Net) -> None:
    lab = _exit_node(net)
    src = m.PeerInfo(node_id="n-x", name="laptop", fingerprint="sha256:00")
    lab.core.message_received(  # type: ignore[attr-defined]
        m.Incoming(
            stream_id="s2", token=TOKEN.hex(), src=src, service="(exit)", exit="127.0.0.1:22"
        ),
        net.sim.now,
    )
    net.settle()
    [rec] = [e for e in lab.of(n.Decided) if e.record.stream_id == "s2"]  # type: ignore[attr-defined]
    assert not rec.record.accepted and rec.record.code == "not-allowed"


def test_a_policy_change_cuts_exit_streams_it_no_longer_allows(net: Net) -> None:
    lab = _exit_node(net)
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "labpc", "", net.sim.now, exit="192.168.1.50:80")
    net.settle()
    [dial] = lab.of(n.ConnectExit)  # type: ignore[attr-defined]
    assert isinstance(dial, n.ConnectExit)
    lab.core.target_connected(dial.stream_id)  # type: ignore[attr-defined]
    net.settle()
    deny_all = '{"acls": [{"action": "accept", "src": ["laptop"], "dst": ["labpc:22"]}]}'
    ended = net.sim.core.policy_changed(compile_policy(deny_all), net.sim.now)
    net.sim.run()
    assert ended == 1
    cut = [a.as_dict() for a in net.sim.audits if a.as_dict().get("by") == "policy-change"]
    assert cut and cut[0]["exit"] == "192.168.1.50:80"


def test_exit_grants_reach_only_nodes_that_can_read_them() -> None:
    """A node without cap exit gets the rules minus ``:exit`` entries (it could not parse them)."""
    from homeport.policy.acl import Subject

    policy = compile_policy(POLICY)
    lab = Subject("n1", "labpc")
    new = policy_message(policy, lab, 1)
    old = policy_message(policy, lab, 1, exit_entries=False)
    assert any(d.ports == "exit" for r in new.rules for d in r.dst)
    assert not any(d.ports == "exit" for r in old.rules for d in r.dst)
    back = policy_from_message(new)
    assert back is not None and any(d.exit for r in back.acls for d in r.dst)


def test_the_coordinator_timer_still_fails_a_silent_exit(net: Net) -> None:
    _exit_node(net)
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "labpc", "", net.sim.now, exit="192.168.1.50:80")
    net.settle()
    net.advance(c.OPEN_TIMEOUT + 1)
    [failed] = laptop.of(n.LocalOpenFailed)
    assert isinstance(failed, n.LocalOpenFailed) and failed.code in ("timeout", "eof")


def test_without_a_policy_an_exit_node_is_told_its_owner() -> None:
    """The default lends an exit to its owner's nodes: the exit node must know its user."""
    from tests.coordsim import Sim

    sim = Sim()
    lab = sim.new_node("labpc")
    sid = sim.hello(lab, capver=m.CAPVER)
    sim.send(sid, m.Announce(services=(), host_keys=()))
    assert not sim.out[sid].of(m.Policy)  # not an exit: nothing pushed (as before)
    sim.send(sid, m.Announce(services=(), host_keys=(), exit=LAN))
    [pol] = sim.out[sid].of(m.Policy)
    assert isinstance(pol, m.Policy) and not pol.active and pol.user == lab.user
