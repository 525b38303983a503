"""The node core in memory: messages as the server sends them, a fake clock, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from homeport.policy.decide import RULE_NOT_EXPOSED, RULE_SERVICE_EXPOSED
from homeport.policy.services import Service
from homeport.proto import node as n
from homeport.proto.backoff import Backoff
from homeport.wire import control as m

SERVER = "hp.example:8443"
SSH = Service("ssh", 22, "127.0.0.1", 2222)
WEB = Service("web", 8080, "127.0.0.1", 8080)
SRC = m.PeerInfo(node_id="n-laptop", name="laptop", fingerprint="sha256:" + "ab" * 32)
KEYS = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOnly+a+test+key",)


def tok(i: int) -> bytes:
    return i.to_bytes(16, "big")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, s: float) -> float:
        self.now += s
        return self.now


@dataclass
class Node:
    core: n.NodeCore
    clock: Clock

    def drain(self) -> list[n.Command]:
        out = []
        while (cmd := self.core.next_command()) is not None:
            out.append(cmd)
        return out

    def sent(self) -> list[m.Message]:
        return [c.msg for c in self.drain() if isinstance(c, n.Send)]

    def connect(self, *, caps: tuple[str, ...] = m.OUR_CAPS, capver: int = m.CAPVER) -> None:
        self.core.session_started(self.clock.now)
        self.core.message_received(welcome(caps=caps, capver=capver), self.clock.now)
        self.drain()

    def recv(self, msg: m.Message) -> list[n.Command]:
        self.core.message_received(msg, self.clock.now)
        return self.drain()


def welcome(*, caps: tuple[str, ...] = m.OUR_CAPS, capver: int = m.CAPVER) -> m.Welcome:
    return m.Welcome(
        proto=m.PROTOCOL_VERSION,
        node_id="n-labpc",
        name="labpc",
        ping_interval=5.0,
        capver=capver,
        caps=caps,
    )


def incoming(sid: str = "s1", service: str = "ssh", token: str | None = None) -> m.Incoming:
    return m.Incoming(
        stream_id=sid, token=tok(7).hex() if token is None else token, src=SRC, service=service
    )


def opened(token: bytes, sid: str = "s9") -> m.Opened:
    peer = m.PeerInfo("n-pc2", "pc2", "sha256:" + "cd" * 32, host_keys=KEYS)
    return m.Opened(token=token.hex(), stream_id=sid, peer=peer, port=22)


@pytest.fixture
def node() -> Node:
    core = n.NodeCore(
        n.NodeConfig(name="labpc", server=SERVER, services=(SSH, WEB), software="test/1"),
        backoff=Backoff(rng=random.Random(1)),
    )
    core.set_host_keys(KEYS)
    return Node(core, Clock())


# -- session ------------------------------------------------------------------------------


def test_hello_then_announce_after_welcome(node: Node) -> None:
    node.core.session_started(node.clock.now)
    assert node.sent() == [
        m.Hello(
            proto=m.PROTOCOL_VERSION,
            role="agent",
            software="test/1",
            capver=m.CAPVER,
            caps=m.OUR_CAPS,
        )
    ]
    assert not node.core.ready
    cmds = node.recv(welcome())
    announce = m.Announce(
        services=(m.ServiceInfo("ssh", 22), m.ServiceInfo("web", 8080)), host_keys=KEYS
    )
    assert cmds == [
        n.Send(announce),
        n.SessionReady(node_id="n-labpc", name="labpc", services=2, host_keys=1, peers=True),
    ]
    assert node.core.ready and node.core.node_id == "n-labpc"


def test_host_keys_change_reannounces_only_when_ready_and_changed(node: Node) -> None:
    node.core.set_host_keys(("k2",))  # not connected: remembered, nothing sent
    assert node.drain() == []
    node.connect()
    node.core.set_host_keys(("k2",))
    assert node.drain() == []  # unchanged
    node.core.set_host_keys(("k3", "k4"))
    (msg,) = node.sent()
    assert isinstance(msg, m.Announce) and msg.host_keys == ("k3", "k4")


def test_reconnect_forever_with_backoff_and_reset_after_a_stable_session(node: Node) -> None:
    delays = []
    for _ in range(8):
        node.core.connect_failed("connection refused", node.clock.now)
        (cmd,) = node.drain()
        assert isinstance(cmd, n.Reconnect)
        delays.append(cmd.delay)
    assert delays[-1] > delays[0] and max(delays) <= node.core.backoff.cap
    node.core.session_started(node.clock.now)
    node.drain()
    node.clock.advance(node.core.backoff.stable_after + 1)
    node.core.session_ended("connection closed by peer [eof]", node.clock.now)
    cmds = node.drain()
    assert cmds[0] == n.SessionLost("connection closed by peer [eof]")
    assert isinstance(cmds[-1], n.Reconnect)
    assert cmds[-1].delay <= node.core.backoff.base  # a stable session reset the schedule


def test_every_session_starts_over(node: Node) -> None:
    node.connect()
    node.core.session_ended("timeout", node.clock.now)
    node.drain()
    assert not node.core.ready and node.core.server_caps == frozenset()
    node.core.session_started(node.clock.now)
    assert isinstance(node.sent()[0], m.Hello)
    node.recv(welcome(caps=()))
    assert node.core.ready and not node.core.peers_expected


# -- INCOMING: the destination decides ------------------------------------------------------

CASES = [
    # id, service, token, target outcome, (accepted, code, rule)
    ("by-name", "ssh", None, None, (True, "ok", RULE_SERVICE_EXPOSED)),
    ("by-port", "8080", None, None, (True, "ok", RULE_SERVICE_EXPOSED)),
    ("not-exposed", "smtp", None, None, (False, "not-exposed", RULE_NOT_EXPOSED)),
    ("bad-token", "ssh", "zz", None, (False, "protocol", n.RULE_MALFORMED)),
    ("short-token", "ssh", "abcd", None, (False, "protocol", n.RULE_MALFORMED)),
    (
        "service-down",
        "ssh",
        None,
        "connection refused to 127.0.0.1:2222",
        (False, "service-down", RULE_SERVICE_EXPOSED),
    ),
]


@pytest.mark.parametrize(
    ("service", "token", "fail", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_incoming_decisions(
    node: Node, service: str, token: str | None, fail: str | None, want: tuple[bool, str, str]
) -> None:
    node.connect()
    cmds = node.recv(incoming("s1", service, token))
    accepted, code, rule = want
    if want[0] or fail is not None:  # allowed by policy: the target is connected first
        assert cmds == [n.ConnectTarget("s1", SSH if service == "ssh" else WEB)]
        assert node.core.active == 1
        if fail is None:
            node.core.target_connected("s1")
        else:
            node.core.target_failed("s1", fail)
        cmds = node.drain()
    records = [c.record for c in cmds if isinstance(c, n.Decided)]
    sent = [c.msg for c in cmds if isinstance(c, n.Send)]
    (rec,) = records
    assert (rec.accepted, rec.code, rec.rule) == (accepted, code, rule)
    assert (rec.stream_id, rec.src, rec.service) == ("s1", "laptop (n-laptop)", service)
    if accepted:
        assert sent == [m.Accept("s1")]
        assert cmds[-1] == n.StartStream("s1", tok(7), SRC, SSH if service == "ssh" else WEB)
        assert "exposes" in rec.reason
        assert node.core.active == 1
        node.core.stream_ended("s1")
    else:
        assert sent == [m.Reject("s1", code, rec.reason)]
        assert not any(isinstance(c, n.StartStream) for c in cmds)
    assert node.core.active == 0
    if code == "not-exposed":
        assert rec.reason == "labpc does not expose 'smtp' (exposed: ssh/22, web/8080)"
    if code == "service-down":
        assert rec.reason == fail


def test_busy_at_the_limit_counts_pending_running_and_local_streams(node: Node) -> None:
    node.connect()
    for i in range(n.MAX_STREAMS - 1):
        node.recv(incoming(f"s{i}"))
        if i % 2:
            node.core.target_connected(f"s{i}")  # running; the others stay pending
    node.core.open_local(tok(1), "pc2", "ssh", node.clock.now)
    node.drain()
    assert node.core.active == n.MAX_STREAMS
    cmds = node.recv(incoming("over"))
    assert cmds[-1] == n.Send(m.Reject("over", "busy", f"{n.MAX_STREAMS} streams already active"))
    (rec,) = [c.record for c in cmds if isinstance(c, n.Decided)]
    assert (rec.accepted, rec.code, rec.rule) == (False, "busy", n.RULE_LIMIT)
    node.core.open_local(tok(2), "pc2", "ssh", node.clock.now)
    assert node.drain() == [
        n.LocalOpenFailed(tok(2), "busy", f"{n.MAX_STREAMS} streams already active", True, False)
    ]
    node.core.stream_ended("s1")
    assert node.recv(incoming("again")) == [n.ConnectTarget("again", SSH)]


def test_duplicate_stream_id_is_refused(node: Node) -> None:
    node.connect()
    node.recv(incoming("s1"))
    cmds = node.recv(incoming("s1"))
    assert cmds[-1] == n.Send(m.Reject("s1", "protocol", "duplicate stream id"))
    assert node.core.active == 1


def test_session_lost_while_connecting_the_target_drops_it(node: Node) -> None:
    node.connect()
    node.recv(incoming("s1"))
    node.recv(incoming("s2"))
    node.core.session_ended("timeout", node.clock.now)
    node.drain()
    node.connect()  # a new session before the old stream's target answered
    node.core.target_connected("s1")
    cmds = node.drain()
    assert cmds[0] == n.DropTarget("s1", "control connection lost")
    assert not any(isinstance(c, n.Send | n.StartStream) for c in cmds)
    node.core.target_failed("s2", "connection refused")
    assert not any(isinstance(c, n.Send) for c in node.drain())  # no REJECT on the new session
    assert node.core.active == 0


def test_target_report_for_an_unknown_stream(node: Node) -> None:
    node.connect()
    node.core.target_connected("ghost")
    assert node.drain() == [n.DropTarget("ghost", "unknown stream")]
    node.core.target_failed("ghost", "x")
    assert node.drain() == []


# -- local opens -------------------------------------------------------------------------------


def test_local_open_success_routes_by_token(node: Node) -> None:
    node.connect()
    node.core.open_local(tok(1), "pc2", "ssh", node.clock.now, timeout=5)
    node.core.open_local(tok(2), "pc3", "22", node.clock.now, timeout=5)
    assert node.drain() == [
        n.Send(m.Open("pc2", "ssh", tok(1).hex())),
        n.LocalOpenAdmitted(tok(1)),
        n.Send(m.Open("pc3", "22", tok(2).hex())),
        n.LocalOpenAdmitted(tok(2)),
    ]
    assert node.core.get_timer() == node.clock.now + 5
    ans = opened(tok(2))
    assert node.recv(ans) == [n.LocalOpenSucceeded(tok(2), ans)]
    assert node.recv(opened(tok(2))) == []  # a second answer for the same token: ignored
    assert node.core.active == 2
    node.core.local_open_ended(tok(2))
    node.core.local_open_ended(tok(2))  # idempotent
    assert node.core.active == 1


@pytest.mark.parametrize(
    ("code", "message", "fallback", "shown"),
    [
        ("offline", "pc2 is offline", False, "pc2 is offline"),
        ("not-exposed", "", False, "not-exposed"),
        ("busy", "pc2 is busy", True, "pc2 is busy"),
    ],
)
def test_local_open_failure(
    node: Node, code: str, message: str, fallback: bool, shown: str
) -> None:
    node.connect()
    node.core.open_local(tok(1), "pc2", "ssh", node.clock.now)
    node.drain()
    cmds = node.recv(m.OpenFailed(token=tok(1).hex(), code=code, message=message))
    assert cmds == [n.LocalOpenFailed(tok(1), code, shown, fallback, True)]
    assert node.core.active == 1  # until the driver says it is done
    node.core.local_open_ended(tok(1))
    assert node.core.active == 0


def test_local_open_refused_when_not_connected(node: Node) -> None:
    node.core.open_local(tok(1), "pc2", "ssh", node.clock.now)
    want = f"not connected to server {SERVER}"
    assert node.drain() == [n.LocalOpenFailed(tok(1), "not-connected", want, True, False)]
    node.core.session_started(node.clock.now)
    node.drain()
    node.core.open_local(tok(1), "pc2", "ssh", node.clock.now)  # HELLO sent, no WELCOME yet
    assert node.drain() == [n.LocalOpenFailed(tok(1), "not-connected", want, True, False)]
    assert node.core.active == 0


def test_session_loss_fails_every_pending_local_open(node: Node) -> None:
    node.connect()
    node.core.open_local(tok(1), "pc2", "ssh", node.clock.now)
    node.core.open_local(tok(2), "pc3", "ssh", node.clock.now)
    node.drain()
    node.recv(opened(tok(2)))  # answered: its stream is no longer the session's business
    node.core.session_ended("no data from peer for 15.0s (keepalive) [timeout]", node.clock.now)
    cmds = node.drain()
    fails = [c for c in cmds if isinstance(c, n.LocalOpenFailed)]
    reason = (
        f"server {SERVER} closed the connection (no data from peer for 15.0s (keepalive) [timeout])"
    )
    assert fails == [n.LocalOpenFailed(tok(1), "eof", reason, False, True)]
    assert isinstance(cmds[-1], n.Reconnect)
    assert node.core.get_timer() is None
    assert node.recv(opened(tok(1))) == []  # a late answer of the dead session


def test_local_open_timeout(node: Node) -> None:
    node.connect()
    node.core.open_local(tok(1), "pc2", "ssh", node.clock.now, timeout=3)
    node.clock.advance(1)
    node.core.open_local(tok(2), "pc2", "ssh", node.clock.now, timeout=3)
    node.drain()
    first = node.core.get_timer()
    assert first == node.clock.now + 2
    node.core.handle_timer(node.clock.advance(1.5))
    assert node.drain() == []  # early: nothing is due
    node.core.handle_timer(node.clock.advance(0.5))
    want = f"no answer from server {SERVER}"
    assert node.drain() == [n.LocalOpenFailed(tok(1), "timeout", want, False, True)]
    assert node.core.get_timer() == node.clock.now + 1
    assert node.recv(opened(tok(1))) == []  # too late
    ans = opened(tok(2))
    assert node.recv(ans) == [n.LocalOpenSucceeded(tok(2), ans)]
    assert node.core.get_timer() is None


def test_answers_for_tokens_that_are_not_ours_are_ignored(node: Node) -> None:
    node.connect()
    before = node.core.ignored
    assert node.recv(opened(tok(5))) == []
    assert node.recv(m.OpenFailed(token="nothex", code="x", message="y")) == []
    assert node.core.ignored == before + 2


# -- errors -------------------------------------------------------------------------------------


def test_node_removed_is_fatal(node: Node) -> None:
    node.connect()
    node.core.open_local(tok(1), "pc2", "ssh", node.clock.now)
    node.drain()
    cmds = node.recv(m.Error(code="node-removed", message="removed by admin"))
    fatal = [c for c in cmds if isinstance(c, n.Fatal)]
    assert fatal == [
        n.Fatal(
            3,
            "this node was removed by an admin (removed by admin); "
            "enroll again with a new auth key",
        )
    ]
    assert int(n.ExitCode.NODE_REMOVED) == 3
    assert any(isinstance(c, n.LocalOpenFailed) for c in cmds)
    node.core.session_ended("remote:node-removed", node.clock.now)
    node.core.connect_failed("x", node.clock.now)
    node.core.session_started(node.clock.now)
    assert node.drain() == []  # sticky: no reconnect, no HELLO


def test_other_errors_reconnect(node: Node) -> None:
    node.connect()
    assert node.recv(m.Error(code="internal", message="oops")) == []
    node.core.session_ended("oops [remote:internal]", node.clock.now)
    cmds = node.drain()
    assert cmds[0] == n.SessionLost("oops [remote:internal]")
    assert isinstance(cmds[-1], n.Reconnect)


def test_stop_fails_waiting_opens_and_schedules_nothing(node: Node) -> None:
    node.connect()
    node.core.open_local(tok(1), "pc2", "ssh", node.clock.now)
    node.drain()
    node.core.stop()
    assert node.drain() == [
        n.LocalOpenFailed(tok(1), "not-connected", "the agent is stopping", True, True)
    ]
    node.core.session_ended("closed", node.clock.now)
    node.core.open_local(tok(2), "pc2", "ssh", node.clock.now)
    assert node.drain() == [
        n.LocalOpenFailed(tok(2), "not-connected", "the agent is stopping", True, False)
    ]


# -- capabilities and the peer map --------------------------------------------------------------


def peer(i: int) -> m.Peer:
    return m.Peer(node_id=f"n{i}", name=f"pc{i}", online=True, last_seen=0.0, fingerprint="f")


def test_old_server_without_caps_is_still_served(node: Node) -> None:
    node.core.session_started(node.clock.now)
    node.drain()
    old = m.Welcome(proto=1, node_id="n-labpc", name="labpc", ping_interval=5.0)
    cmds = node.recv(old)
    assert isinstance(cmds[0], n.Send) and isinstance(cmds[0].msg, m.Announce)
    assert cmds[1] == n.SessionReady("n-labpc", "labpc", 2, 1, peers=False)
    assert not node.core.peers_expected and node.core.server_capver == 1
    # a capver-1 NETMAP push and a stray PEERS are skipped, streams still flow
    assert node.recv(m.NetMap(self_id="n-labpc", nodes=())) == []
    assert node.recv(m.Peers(version=1, base=0, reset=True, peers=(peer(1),))) == []
    assert node.core.peers.version == 0
    assert node.recv(incoming("s1")) == [n.ConnectTarget("s1", SSH)]


def test_peers_frames_update_the_map(node: Node) -> None:
    node.connect()
    assert node.core.peers_expected
    node.recv(m.Peers(version=3, base=0, reset=True, peers=(peer(1), peer(2)), more=True))
    node.recv(m.Peers(version=3, base=0, reset=True, peers=(peer(3),)))
    assert (node.core.peers.version, node.core.peers.count) == (3, 3)
    node.recv(m.Peers(version=4, base=3, reset=False, peers=(peer(4),), removed=("n1",)))
    assert (node.core.peers.version, node.core.peers.count) == (4, 3)
    node.recv(m.Peers(version=9, base=0, reset=True, peers=(peer(7),)))
    assert (node.core.peers.version, node.core.peers.count) == (9, 1)


def test_the_core_is_deterministic() -> None:
    """Same inputs, same commands: the driver's token and clock are the only sources."""

    def run() -> list[n.Command]:
        core = n.NodeCore(
            n.NodeConfig("labpc", SERVER, (SSH,)), backoff=Backoff(rng=random.Random(5))
        )
        node = Node(core, Clock())
        out: list[n.Command] = []
        for step in range(3):
            core.session_started(node.clock.now)
            core.message_received(welcome(), node.clock.now)
            core.open_local(tok(step), "pc2", "ssh", node.clock.now, timeout=1)
            core.message_received(incoming(f"s{step}"), node.clock.now)
            core.target_failed(f"s{step}", "refused")
            core.handle_timer(node.clock.advance(2))
            core.session_ended("eof", node.clock.now)
            core.local_open_ended(tok(step))
            out += node.drain()
        return out

    assert run() == run()


def test_a_gap_in_the_peer_map_asks_once_for_a_full_map(node: Node) -> None:
    node.connect()
    node.recv(m.Peers(version=3, base=0, reset=True, peers=(peer(1),)))
    sent = [
        c.msg
        for c in node.recv(m.Peers(version=6, base=5, reset=False, peers=(peer(2),)))
        if isinstance(c, n.Send)
    ]
    assert sent == [m.NetMapRequest()]
    # the next delta of the same gap is ignored, not asked for again
    assert node.recv(m.Peers(version=7, base=6, reset=False, peers=(peer(3),))) == []
    node.recv(m.Peers(version=7, base=0, reset=True, peers=(peer(1), peer(2), peer(3))))
    assert (node.core.peers.version, node.core.peers.count) == (7, 3)


# -- shields up ---------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["ssh", "web", "22", "nope"])
def test_shields_up_refuses_every_incoming_and_still_opens(service: str) -> None:
    core = n.NodeCore(
        n.NodeConfig(name="labpc", server=SERVER, services=(SSH, WEB), shields_up=True),
        backoff=Backoff(rng=random.Random(1)),
    )
    node = Node(core, Clock())
    node.connect()
    cmds = node.recv(incoming("s1", service))
    # nothing local is connected: the answer is at once, whatever the service
    assert not any(isinstance(c, n.ConnectTarget) for c in cmds)
    (rec,) = [c.record for c in cmds if isinstance(c, n.Decided)]
    assert (rec.accepted, rec.code, rec.rule) == (False, n.SHIELDS_UP, n.SHIELDS_UP)
    assert "shields up" in rec.reason
    sent = [c.msg for c in cmds if isinstance(c, n.Send)]
    assert sent == [m.Reject("s1", n.SHIELDS_UP, rec.reason)]
    assert core.shields_refused == 1 and core.active == 0
    # the node can still open streams itself
    core.open_local(tok(1), "pc2", "ssh", node.clock.now)
    assert any(isinstance(c, n.Send) and isinstance(c.msg, m.Open) for c in node.drain())
    node.recv(opened(tok(1)))
    assert core.active == 1


def test_shields_down_by_default(node: Node) -> None:
    node.connect()
    cmds = node.recv(incoming("s1", "ssh"))
    assert cmds == [n.ConnectTarget("s1", SSH)] and node.core.shields_refused == 0
