"""One coordinator core and node cores, wired in memory: the whole stream set-up, no sockets.

``Net`` carries each node core's ``Send`` to the coordinator as that node's
session and every message the coordinator sends back to the node core, until
nothing moves; time is a number the test advances. The local target (sshd)
and the relay are the only things the test plays by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from homeport.policy.services import Service
from homeport.proto import coord as c
from homeport.proto import node as n
from homeport.wire import control as m
from tests.coordsim import Sim

SSH = Service("ssh", 22, "127.0.0.1", 2222)


@dataclass
class Peer:
    record: c.NodeRecord
    core: n.NodeCore
    sid: int = 0
    events: list[n.Command] = field(default_factory=list)

    def of(self, cls: type) -> list[n.Command]:
        return [e for e in self.events if isinstance(e, cls)]


class Net:
    def __init__(self) -> None:
        self.sim = Sim(open_timeout=10.0, unpaired_timeout=10.0)
        self.peers: list[Peer] = []

    def join(self, name: str, services: tuple[Service, ...] = ()) -> Peer:
        record = self.sim.new_node(name)
        core = n.NodeCore(n.NodeConfig(name=name, server="hp.example:8443", services=services))
        peer = Peer(record, core)
        self.peers.append(peer)
        self.connect(peer)
        return peer

    def connect(self, peer: Peer) -> None:
        peer.sid = self.sim.connect(peer.record.fingerprint)
        peer.core.session_started(self.sim.now)
        self.settle()

    def settle(self) -> None:
        """Deliver messages both ways until nothing moves (bounded)."""
        for _ in range(1000):
            moved = False
            for p in self.peers:
                while (cmd := p.core.next_command()) is not None:
                    moved = True
                    if isinstance(cmd, n.Send):
                        if self.sim.out[p.sid].closed is None:
                            self.sim.send(p.sid, cmd.msg)
                    else:
                        p.events.append(cmd)
                box = self.sim.out[p.sid]
                for msg in box.take():
                    moved = True
                    p.core.message_received(msg, self.sim.now)
                if box.closed is not None and p.core.ready:
                    moved = True
                    code, text = box.closed
                    p.core.message_received(m.Error(code=code, message=text), self.sim.now)
                    self.sim.end(p.sid)
            if not moved:
                return
        raise AssertionError("the network did not settle")

    def advance(self, seconds: float) -> None:
        end = self.sim.now + seconds
        self.sim.advance(seconds)
        for p in self.peers:
            if (t := p.core.get_timer()) is not None and t <= end:
                p.core.handle_timer(end)
        self.settle()


TOKEN = bytes(range(16))


@pytest.fixture
def net() -> Net:
    return Net()


def test_both_nodes_come_online_and_see_each_other(net: Net) -> None:
    lab = net.join("labpc", (SSH,))
    laptop = net.join("laptop")
    net.advance(c.NETMAP_COALESCE)
    assert lab.core.ready and laptop.core.ready
    assert net.sim.core.is_online(lab.record.node_id)
    node = net.sim.core.node(lab.record.node_id)
    assert node is not None and node.services == (m.ServiceInfo("ssh", 22),)
    assert laptop.core.peers.count == 2  # both nodes, itself included


def test_a_local_open_goes_through_end_to_end(net: Net) -> None:
    lab = net.join("labpc", (SSH,))
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "labpc", "22", net.sim.now)
    net.settle()
    [connect] = lab.of(n.ConnectTarget)
    assert isinstance(connect, n.ConnectTarget) and connect.service == SSH
    lab.core.target_connected(connect.stream_id)
    net.settle()
    [start] = lab.of(n.StartStream)
    assert isinstance(start, n.StartStream) and start.src.name == "laptop"
    assert start.src.fingerprint == laptop.record.fingerprint
    [ok] = laptop.of(n.LocalOpenSucceeded)
    assert isinstance(ok, n.LocalOpenSucceeded) and ok.token == TOKEN
    assert ok.opened.peer.fingerprint == lab.record.fingerprint
    expect = next(x for x in net.sim.relay if isinstance(x, c.RelayExpect))
    assert expect.src_token == TOKEN and expect.dst_token == start.token
    [decided] = lab.of(n.Decided)
    assert isinstance(decided, n.Decided) and decided.record.accepted


def test_the_server_refuses_what_the_destination_would_refuse(net: Net) -> None:
    net.join("labpc", (SSH,))
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "labpc", "8888", net.sim.now)
    net.settle()
    [failed] = laptop.of(n.LocalOpenFailed)
    assert isinstance(failed, n.LocalOpenFailed) and failed.code == "not-exposed"
    assert not failed.fallback
    assert "labpc does not expose '8888'" in failed.message


def test_a_dead_target_is_refused_with_its_reason(net: Net) -> None:
    lab = net.join("labpc", (SSH,))
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "labpc", "ssh", net.sim.now)
    net.settle()
    [connect] = lab.of(n.ConnectTarget)
    assert isinstance(connect, n.ConnectTarget)
    lab.core.target_failed(connect.stream_id, "connection refused to 127.0.0.1:2222")
    net.settle()
    [failed] = laptop.of(n.LocalOpenFailed)
    assert isinstance(failed, n.LocalOpenFailed) and failed.code == "service-down"
    assert "connection refused" in failed.message
    assert net.sim.core.stream_states() == {}


def test_a_destination_that_never_answers_times_out(net: Net) -> None:
    lab = net.join("labpc", (SSH,))
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "labpc", "ssh", net.sim.now, timeout=30.0)
    net.settle()
    assert lab.of(n.ConnectTarget)  # the target connect hangs: nothing is reported
    net.advance(10.5)
    [failed] = laptop.of(n.LocalOpenFailed)
    assert isinstance(failed, n.LocalOpenFailed) and failed.code == "timeout"


def test_removing_the_destination_mid_open_fails_it_and_stops_the_node(net: Net) -> None:
    lab = net.join("labpc", (SSH,))
    laptop = net.join("laptop")
    laptop.core.open_local(TOKEN, "labpc", "ssh", net.sim.now)
    net.settle()
    net.sim.core.remove_node("labpc", net.sim.now)
    net.sim.run()
    net.settle()
    [failed] = laptop.of(n.LocalOpenFailed)
    assert isinstance(failed, n.LocalOpenFailed) and failed.code == "node-removed"
    [fatal] = lab.of(n.Fatal)
    assert isinstance(fatal, n.Fatal) and fatal.exit_code == int(n.ExitCode.NODE_REMOVED)


def test_a_reconnecting_node_replaces_its_session_and_streams_resume(net: Net) -> None:
    lab = net.join("labpc", (SSH,))
    laptop = net.join("laptop")
    old_sid = lab.sid
    lab.core.session_ended("network changed", net.sim.now)  # the node noticed first
    net.connect(lab)  # its new session arrives before the server saw the old one end
    closed = net.sim.out[old_sid].closed
    assert closed is not None and closed[0] == "session-replaced"
    assert net.sim.core.agent_session(lab.record.node_id) == lab.sid
    net.sim.end(old_sid)  # the replaced session ends: the node stays online
    assert net.sim.core.is_online(lab.record.node_id)
    laptop.core.open_local(TOKEN, "labpc", "ssh", net.sim.now)
    net.settle()
    [connect] = lab.of(n.ConnectTarget)
    assert isinstance(connect, n.ConnectTarget)
