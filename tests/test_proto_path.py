"""proto.path: choose_path and punch_outlook tabled, PathManager timelines on a fake clock."""

from __future__ import annotations

import pytest

from homeport.proto import path as p
from homeport.proto.nat import NatKind
from homeport.proto.path import PathFacts, PathKind

EDM, EIM, NONE, UNK = NatKind.EDM, NatKind.EIM, NatKind.NONE, NatKind.UNKNOWN

# (facts, kind, code, words in the reason)
CHOICES: list[tuple[PathFacts, PathKind, str, str]] = [
    (PathFacts(), PathKind.RELAY, "not-tried", "first stream"),
    (
        PathFacts(relay_only_local=True, up_kind=PathKind.DIRECT),
        PathKind.RELAY,
        "relay-only-local",
        "relay-only",
    ),
    (PathFacts(relay_only_server=True), PathKind.RELAY, "relay-only-server", "server"),
    (
        PathFacts(up_kind=PathKind.DIRECT, up_endpoint="203.0.113.5:41641"),
        PathKind.DIRECT,
        "direct-up",
        "203.0.113.5:41641",
    ),
    (
        PathFacts(up_kind=PathKind.LOCAL, up_endpoint="10.0.0.7:41641", peer_online=False),
        PathKind.LOCAL,
        "direct-up",
        "local 10.0.0.7",
    ),
    (PathFacts(peer_online=False), PathKind.RELAY, "peer-offline", "offline"),
    (PathFacts(probing=True, failure_code="punch-timeout"), PathKind.RELAY, "probing", "trying"),
    (
        PathFacts(failure_code="punch-timeout", retry_in=4.0),
        PathKind.RELAY,
        "punch-timeout",
        "punch timed out; re-probing in 4 s",
    ),
    (
        PathFacts(failure_code="punch-timeout", peer_nat=EDM, self_nat=EIM),
        PathKind.RELAY,
        "peer-edm",
        "peer behind endpoint-dependent NAT (punch timed out)",
    ),
    (PathFacts(failure_code="punch-timeout", self_nat=EDM), PathKind.RELAY, "self-edm", "this"),
    (
        PathFacts(failure_code="punch-timeout", self_nat=EDM, peer_nat=EDM),
        PathKind.RELAY,
        "both-edm",
        "both",
    ),
    (
        PathFacts(failure_code="punch-timeout", probe_port_ok=False),
        PathKind.RELAY,
        "no-probe-port",
        "probe port is unreachable",
    ),
    (
        PathFacts(failure_code="punch-timeout", probe_port_ok=False, self_nat=EIM),
        PathKind.RELAY,
        "punch-timeout",
        "punch timed out",
    ),
    (
        PathFacts(failure_code="path-lost", failure_reason="direct path lost", retry_in=2.0),
        PathKind.RELAY,
        "path-lost",
        "direct path lost; re-probing in 2 s",
    ),
    (
        PathFacts(failure_code="peer-no-direct"),
        PathKind.RELAY,
        "peer-no-direct",
        "older homeport",
    ),
    (PathFacts(failure_code="policy", failure_reason="x says no"), PathKind.RELAY, "policy", "no"),
    (PathFacts(failure_code="made-up"), PathKind.RELAY, "made-up", "made-up"),
]


@pytest.mark.parametrize(("facts", "kind", "code", "words"), CHOICES)
def test_choose_path(facts: PathFacts, kind: PathKind, code: str, words: str) -> None:
    choice = p.choose_path(facts)
    assert (choice.kind, choice.code) == (kind, code)
    assert words in choice.reason
    assert choice.direct == (kind is not PathKind.RELAY)


def test_every_code_has_a_sentence() -> None:
    codes = {v for k, v in vars(p).items() if k.isupper() and isinstance(v, str) and "-" in v}
    assert codes <= set(p.REASONS), codes - set(p.REASONS)


def reach(nat: NatKind, ip: str = "", mapped: bool = False) -> p.Reach:
    return p.Reach(nat, frozenset({ip}) if ip else frozenset(), mapped)


# the lab rows of docs/nat-traversal.md, as the coordinator predicts them
OUTLOOK: list[tuple[str, p.Reach, p.Reach, str | None]] = [
    ("cone-cone", reach(EIM, "198.51.100.1"), reach(EIM, "203.0.113.1"), None),
    ("same-lan both edm", reach(EDM, "198.51.100.1"), reach(EDM, "198.51.100.1"), None),
    ("public-sym", reach(NONE, "198.51.100.1"), reach(EDM, "203.0.113.1"), None),
    ("sym-public", reach(EDM, "198.51.100.1"), reach(NONE, "203.0.113.1"), None),
    ("fwd-sym", reach(EDM, "198.51.100.1", mapped=True), reach(EDM, "203.0.113.1"), None),
    ("upnp-sym", reach(EDM, "198.51.100.1"), reach(EDM, "203.0.113.1", mapped=True), None),
    ("sym-cone", reach(EDM, "198.51.100.1"), reach(EIM, "203.0.113.1"), "self-edm"),
    ("cone-sym", reach(EIM, "198.51.100.1"), reach(EDM, "203.0.113.1"), "peer-edm"),
    ("sym-sym", reach(EDM, "198.51.100.1"), reach(EDM, "203.0.113.1"), "both-edm"),
    ("unknown", reach(UNK), reach(EDM, "203.0.113.1"), None),
]


@pytest.mark.parametrize(("row", "a", "b", "code"), OUTLOOK, ids=[r[0] for r in OUTLOOK])
def test_punch_outlook(row: str, a: p.Reach, b: p.Reach, code: str | None) -> None:
    del row
    assert p.punch_outlook(a, b) == code


def test_backoff_doubles_from_2_to_30() -> None:
    assert [p.backoff_delay(i) for i in range(8)] == [0, 2, 4, 8, 16, 30, 30, 30]


# -- timelines ----------------------------------------------------------------------------


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def new() -> p.PathManager:
    return p.PathManager("n-peer", next_punch_id=Ids())


def drain(pm: p.PathManager) -> list[p.PathCommand]:
    out = []
    while (cmd := pm.next_command()) is not None:
        out.append(cmd)
    return out


def requests(cmds: list[p.PathCommand]) -> list[int]:
    return [c.punch_id for c in cmds if isinstance(c, p.RequestPath)]


def reports(cmds: list[p.PathCommand]) -> list[str]:
    return [c.choice.code for c in cmds if isinstance(c, p.ReportPath)]


def test_a_relayed_stream_asks_once_and_not_again_while_probing() -> None:
    pm = new()
    pm.stream_wanted(0.0)
    cmds = drain(pm)
    assert requests(cmds) == [1] and reports(cmds) == ["probing"]
    pm.stream_wanted(0.5)
    pm.stream_wanted(1.0)
    assert drain(pm) == []
    assert pm.punch_started(1, 1.2)
    pm.stream_wanted(1.5)
    assert requests(drain(pm)) == []
    assert pm.choose(1.5).code == "probing"


def test_punch_success_makes_later_streams_direct() -> None:
    pm = new()
    pm.stream_wanted(0.0)
    pm.punch_started(1, 0.1)
    drain(pm)
    pm.path_up(PathKind.DIRECT, "203.0.113.5:41641", 0.4, rtt_ms=3.0)
    [rep] = drain(pm)
    assert isinstance(rep, p.ReportPath) and rep.choice.kind is PathKind.DIRECT
    assert (rep.rtt_ms, rep.punch_attempts, rep.punch_successes) == (3.0, 1, 1)
    assert pm.choose(1.0).endpoint == "203.0.113.5:41641"
    pm.stream_wanted(1.0, direct=True)
    assert drain(pm) == [] and (pm.streams_direct, pm.streams_relay) == (1, 1)
    assert pm.get_timer() is None


def test_failures_back_off_2_4_8_16_30_then_stay_at_30() -> None:
    pm = new()
    now = 0.0
    pm.stream_wanted(now)
    assert requests(drain(pm)) == [1]
    gaps = []
    last_req = now
    for i in range(7):
        assert pm.punch_started(pm.punch_id, now)
        now += p.PUNCH_TIMEOUT + p.PUNCH_GRACE  # the driver never reported: safety net
        assert pm.get_timer() == now
        pm.handle_timer(now)
        assert pm.choose(now).code == "punch-timeout"
        pm.stream_wanted(now)  # streams keep coming, still no request before retry_at
        assert requests(drain(pm)) == []
        due = pm.get_timer()
        assert due is not None
        gaps.append(due - now)
        now = due
        pm.handle_timer(now)  # due while in use: asks by itself
        assert requests(drain(pm)) == [i + 2]
        last_req = now
    assert gaps == [2, 4, 8, 16, 30, 30, 30]
    assert last_req == now


def test_a_retry_needs_the_peer_in_use() -> None:
    pm = new()
    pm.stream_wanted(0.0)
    pm.path_failed(1, "punch-timeout", "x", 0.5)
    assert pm.get_timer() == 2.5
    pm2 = new()
    pm2.stream_wanted(0.0)
    drain(pm2)
    pm2.path_failed(1, "peer-offline", "gone", p.WANT_WINDOW + 1)
    assert pm2.get_timer() is None  # not in use any more: nothing scheduled
    pm2.stream_wanted(p.WANT_WINDOW + 2)
    assert requests(drain(pm2)) == []  # still inside the 2 s backoff
    pm2.stream_wanted(p.WANT_WINDOW + 4)
    assert requests(drain(pm2)) == [2]


def test_path_lost_falls_back_at_once_and_reprobes_in_2s() -> None:
    pm = new()
    pm.stream_wanted(0.0)
    pm.punch_started(1, 0.0)
    pm.path_up(PathKind.LOCAL, "10.0.0.7:41641", 0.2)
    drain(pm)
    pm.path_lost("no answer for 3.5 s", 10.0)
    choice = pm.choose(10.0)
    assert (choice.kind, choice.code) == (PathKind.RELAY, "path-lost")
    assert "re-probing in 2 s" in choice.reason
    assert reports(drain(pm)) == ["path-lost"]
    assert pm.get_timer() == 12.0
    pm.handle_timer(12.0)
    assert requests(drain(pm)) == [2]


def test_endpoints_changed_forgets_backoff_and_reprobes() -> None:
    pm = new()
    pm.stream_wanted(0.0)
    for _ in range(4):
        pm.handle_timer(pm.retry_at)
        pm.path_failed(pm.punch_id, "punch-timeout", "", pm.retry_at)
    drain(pm)
    assert pm.failures == 4 and pm.retry_at == 30.0  # 0 → 2 → 6 → 14 → 30
    pm.endpoints_changed(31.0)
    cmds = drain(pm)
    assert requests(cmds) == [5] and pm.failures == 0


def test_sticky_failures_wait_long() -> None:
    pm = new()
    pm.stream_wanted(0.0)
    pm.path_failed(1, "peer-no-direct", "old peer", 0.1)
    assert pm.retry_at == pytest.approx(0.1 + p.STICKY_RETRY)


@pytest.mark.parametrize("code", ["peer-edm", "self-edm", "both-edm"])
def test_nat_refusals_wait_for_new_endpoints(code: str) -> None:
    """A punch the server refused for the NATs' sake is not asked again until they change."""
    pm = new()
    pm.stream_wanted(0.0)
    pm.path_failed(1, code, "", 0.1)
    drain(pm)
    pm.stream_wanted(5.0)
    pm.handle_timer(40.0)
    assert requests(drain(pm)) == [] and pm.choose(40.0).code == code
    pm.endpoints_changed(41.0)
    assert requests(drain(pm)) == [2]


def test_stale_answers_are_ignored() -> None:
    pm = new()
    pm.stream_wanted(0.0)
    pm.path_failed(99, "busy", "", 0.1)  # not our request
    assert pm.state.value == "requested"
    pm.punch_started(5, 0.2)  # the peer's punch arrives: take it
    pm.path_failed(1, "busy", "", 0.3)  # our own request, answered busy: punching goes on
    pm.punch_failed(1, "punch-timeout", "", 0.4)  # not the punch in flight
    assert pm.state is p.PathState.PUNCHING
    pm.path_up(PathKind.DIRECT, "203.0.113.5:1", 0.5)
    assert pm.state.value == "up"


def test_punch_while_up_is_run_the_peer_lost_the_path() -> None:
    """The peer asks again (its NAT lost the mapping) while we still hold the old link."""
    pm = new()
    pm.stream_wanted(0.0)
    assert pm.punch_started(1, 0.1)
    pm.path_up(PathKind.DIRECT, "203.0.113.5:1", 0.2)
    assert pm.choose(0.3).direct
    assert pm.punch_started(7, 5.0)  # run, not ignored: the peer's new connection is accepted
    assert pm.choose(5.0).direct  # the old link serves meanwhile
    pm.path_up(PathKind.DIRECT, "203.0.113.5:2", 5.5)
    assert pm.choose(5.6).direct and pm.up_endpoint == "203.0.113.5:2"
    assert pm.punch_successes == 2 and pm.punch_attempts == 2
    assert pm.punch_started(8, 6.0)
    pm.punch_failed(8, "punch-timeout", "", 9.0)  # a failed re-punch changes nothing
    assert pm.choose(9.0).direct
    pm.path_lost("mux silent", 9.5)  # the old link's own death still counts
    assert not pm.choose(9.5).direct


def test_no_answer_to_a_request_is_a_failure() -> None:
    pm = new()
    pm.stream_wanted(0.0)
    assert pm.get_timer() == p.REQUEST_TIMEOUT
    pm.handle_timer(p.REQUEST_TIMEOUT)
    assert pm.choose(p.REQUEST_TIMEOUT).code == "no-answer"


def test_relay_only_never_asks() -> None:
    pm = new()
    pm.update(0.0, relay_only_local=True)
    pm.stream_wanted(0.0)
    assert requests(drain(pm)) == [] and pm.choose(0.0).code == "relay-only-local"
    pm2 = new()
    pm2.stream_wanted(0.0)
    pm2.update(0.1, relay_only_server=True)  # a request in flight is abandoned
    assert pm2.state is p.PathState.IDLE and pm2.get_timer() is None
    with pytest.raises(TypeError):
        pm2.update(0.2, bogus=True)


def test_table_shares_facts_and_punch_ids() -> None:
    t = p.PathTable()
    t.update_all(0.0, self_nat=EDM)
    a, b = t.manager("a"), t.manager("b")
    assert a is not None and b is not None and b.self_nat is EDM
    a.stream_wanted(0.0)
    b.stream_wanted(0.0)
    ids = []
    while (cmd := t.next_command()) is not None:
        if isinstance(cmd, p.RequestPath):
            ids.append((cmd.peer, cmd.punch_id))
    assert ids == [("a", 1), ("b", 2)]
    assert t.get_timer() == p.REQUEST_TIMEOUT
    t.handle_timer(p.REQUEST_TIMEOUT)
    assert t.choose("a", 10.0).code == "no-answer"
    assert t.choose("nobody", 10.0).code == "not-tried"
