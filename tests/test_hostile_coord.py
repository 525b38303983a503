"""Hostile peers against the pure coordinator: enrollment guessing, log forging, a node
announcing poison, token reuse (findings 4, 5, 7 of docs/reliability.md)."""

from __future__ import annotations

import pytest

from homeport.proto import coord as c
from homeport.proto.netmap import PeerView
from homeport.proto.ratelimit import ENROLL_BURST, TokenBuckets
from homeport.relay.pairing import Pairing
from homeport.wire import control as m
from homeport.wire.logtext import MAX_LOG_VALUE, esc
from tests.coordsim import HOST_KEY, Sim, csr


@pytest.fixture
def sim() -> Sim:
    return Sim()


SSH = m.ServiceInfo(name="ssh", port=22)
FORGED = "x\n2026-12-05 04:00:00 INFO homeport.server: node labpc (n1) removed"


# -- finding 7: enrollment rate limit ----------------------------------------------------------


def _guess(sim: Sim, address: str) -> tuple[str, str]:
    sid = sim.connect(None, address)
    sim.send(sid, m.Enroll(proto=1, auth_key="hpk_guess", name="x", csr_pem=csr("x")))
    box = sim.out[sid]
    assert box.closed is not None
    return box.closed


def test_enrollment_guessing_is_rate_limited_per_source_and_logged_once_per_burst(
    sim: Sim,
) -> None:
    codes = [_guess(sim, f"198.51.100.7:{40000 + i}")[0] for i in range(200)]
    assert codes[:ENROLL_BURST] == ["auth-key-invalid"] * ENROLL_BURST
    assert set(codes[ENROLL_BURST:]) == {"rate-limited"}
    limited_lines = [n for n in sim.notes if "rate-limited" in n]
    assert len(limited_lines) == 1, limited_lines  # one line per burst, not 190
    assert len(sim.notes) == ENROLL_BURST + 1
    # another source is not affected by the first one's burst
    assert _guess(sim, "203.0.113.9:1")[0] == "auth-key-invalid"
    # the bucket refills: one more guess per second, and a new burst logs again
    sim.now += 1.0
    assert _guess(sim, "198.51.100.7:1")[0] == "auth-key-invalid"
    assert _guess(sim, "198.51.100.7:2")[0] == "rate-limited"
    assert len([n for n in sim.notes if "rate-limited" in n]) == 2
    # a legitimate enrollment from a fresh source still works
    key = sim.registry.create_auth_key(now=sim.now)
    assert isinstance(sim.enroll(str(key), "late"), m.Enrolled)


def test_token_buckets_are_bounded_and_ignore_a_clock_going_back() -> None:
    b = TokenBuckets(rate=1.0, burst=2, max_keys=3)
    for i in range(10):
        assert b.take(f"h{i}", 100.0).allowed
    assert len(b) == 3
    assert b.take("x", 100.0).allowed and b.take("x", 100.0).allowed
    assert not b.take("x", 50.0).allowed  # time went back: nothing refilled


# -- finding 5: log injection --------------------------------------------------------------------


def test_peer_text_in_logs_is_escaped(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    laptop = sim.new_node("laptop")
    agent = sim.agent(lab, (SSH,))
    client = sim.hello(laptop, "client")
    sim.send(client, m.Open(dst=FORGED, service="ssh\r\x1b[2J", token="00" * 16))
    sim.send(client, m.Open(dst="labpc", service="22", token="11" * 16))
    [inc] = sim.out[agent].of(m.Incoming)
    assert isinstance(inc, m.Incoming)
    sim.send(agent, m.Reject(stream_id=inc.stream_id, code=FORGED, message=FORGED + "\u2028"))
    assert sim.notes
    for note in sim.notes:
        assert note.isprintable(), repr(note)
    assert any("OPEN 'x\\n2026-12-05" in n for n in sim.notes)  # repr'd by the core


def test_esc() -> None:
    assert esc("plain name:22") == "plain name:22"
    assert esc("a\nb\r\tc\\") == "a\\nb\\r\\tc\\"
    assert esc("\x1b[2J\u202e\ud800") == "\\x1b[2J\\u202e\\ud800"
    long = esc("y" * 10_000)
    assert long.startswith("y" * MAX_LOG_VALUE) and long.endswith(f"...(+{10_000 - MAX_LOG_VALUE})")
    assert esc(ValueError("bad\nline")) == "bad\\nline"


# -- finding 4: one node's announcement cannot break another's view ----------------------------


def test_hostile_announcement_does_not_affect_other_nodes_peers(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    evil = sim.new_node("evil")
    laptop = sim.new_node("laptop")
    watcher = sim.agent(laptop)
    sim.agent(lab, (SSH,))
    bad = sim.agent(evil)
    poison = m.Announce(
        services=(
            m.ServiceInfo(name="ok\nHost *", port=22),
            m.ServiceInfo(name="\ud800", port=1),
            m.ServiceInfo(name="w" * 70_000, port=2),
            m.ServiceInfo(name="web", port=70_000),
            *(m.ServiceInfo(name=f"s{i}", port=1000 + i) for i in range(5000)),
        ),
        host_keys=("ssh-ed25519 \ud800", "ssh-rsa " + "A" * 900_000, HOST_KEY),
    )
    sim.send(bad, poison)
    sim.advance(5)
    view = PeerView()
    for msg in sim.out[watcher].messages:
        if isinstance(msg, m.Peers):
            # what goes on the wire must encode and decode (one bad string would fail it)
            raw = m.encode(msg)
            again = m.decode_untrusted(raw[4], raw[5:])
            assert again == msg
            view.apply(msg)
    assert view.peers[lab.node_id].services == (SSH,)
    assert view.peers[lab.node_id].online
    shown = view.peers[evil.node_id].services
    assert len(shown) <= c.MAX_SERVICES
    assert all(s.name.isascii() and s.name.isprintable() and len(s.name) <= 63 for s in shown)
    assert all(0 < s.port < 65536 for s in shown)


# -- finding 7: a second OPEN reusing a live token ----------------------------------------------


def test_second_open_reusing_a_live_token_does_not_kill_the_first(sim: Sim) -> None:
    lab = sim.new_node("labpc")
    laptop = sim.new_node("laptop")
    sim.agent(lab, (SSH,))
    client = sim.hello(laptop, "client")
    token = "22" * 16
    sim.send(client, m.Open(dst="labpc", service="ssh", token=token))
    sim.relay.clear()
    sim.send(client, m.Open(dst="labpc", service="ssh", token=token))  # same token again
    sim.send(client, m.Open(dst="nosuch", service="ssh", token=token))  # and a failing one
    failed = sim.out[client].of(m.OpenFailed)
    assert len(failed) == 2
    assert not [r for r in sim.relay if isinstance(r, c.RelayRefuse)]
    # and the relay's pairing table leaves an expected stream's token alone
    p: Pairing[str] = Pairing()
    p.expect("s1", src_node="a", dst_node="b", src_token=b"A" * 16, dst_token=b"B" * 16, now=0.0)
    assert p.refuse_token(b"A" * 16, 0.0) is None
    assert p.attach(b"A" * 16, "conn-a", 0.0).__class__.__name__ == "Parked"
