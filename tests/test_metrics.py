"""The server's metrics adapter: real coordinator events in, metric values out.

The coordinator is the in-memory :class:`tests.coordsim.Sim` (no sockets); every
command it makes is shown to :meth:`ServerMetrics.observe` before it runs, as the
server's shell does, and the relay's events are fed by hand. Values are read back
through the text exposition, parsed with prometheus_client's own parser.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from homeport import relay as hprelay
from homeport.proto import audit as au
from homeport.proto import coord as c
from homeport.proto.audit import Audit
from homeport.relay.pairing import StreamState
from homeport.server.metrics import MAX_TIMED_SETUPS, ServerMetrics
from homeport.server.service import ConnectionRefused, Refusal
from homeport.wire import control as m
from tests.coordsim import Sim

SSH = m.ServiceInfo(name="ssh", port=22)
TOKEN = "aa" * 16

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: bytes) -> Samples:
    """Every sample of an exposition, by (sample name, labels)."""
    out: Samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeRelay:
    """Just what the adapter reads at scrape time: the live streams' byte counts."""

    streams: list[hprelay.StreamStats] = field(default_factory=list)

    def statistics(self) -> hprelay.RelayStats:
        return hprelay.RelayStats(tuple(self.streams), 0, 0, 0, splice=False)


@dataclass
class FakeService:
    control_connections: int = 3
    unauthenticated: int = 2


class MeteredSim(Sim):
    """The coordinator simulator with the metrics adapter watching its commands."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.metrics = ServerMetrics(clock=self.clock)
        self.fake_relay = FakeRelay()
        self.metrics.bind(self.core, cast(Any, FakeService()), cast(hprelay.Relay, self.fake_relay))

    def _execute(self, cmd: c.Command) -> None:
        self.metrics.observe(cmd)
        super()._execute(cmd)

    def scrape(self) -> Samples:
        body, ctype = self.metrics.exposition()
        assert ctype.startswith("text/plain")
        return parse(body)


@pytest.fixture
def sim() -> Iterator[MeteredSim]:
    yield MeteredSim()


def _open(sim: MeteredSim, token: str = TOKEN) -> tuple[int, int, m.Incoming]:
    lab = sim.core.node_by_name("labpc") or sim.new_node("labpc")
    laptop = sim.core.node_by_name("laptop") or sim.new_node("laptop")
    agent = sim.core.agent_session(lab.node_id) or sim.agent(lab, (SSH,))
    client = sim.hello(laptop, "client")
    sim.send(client, m.Open(dst="labpc", service="22", token=token))
    [inc] = [x for x in sim.out[agent].take() if isinstance(x, m.Incoming)]
    return agent, client, inc


def test_a_relayed_stream_counts_ok_its_setup_time_and_its_bytes(sim: MeteredSim) -> None:
    agent, _client, inc = _open(sim)
    sim.send(agent, m.Accept(stream_id=inc.stream_id))
    before = sim.scrape()
    assert value(before, "homeport_streams_open", state="accepted") == 1
    assert value(before, "homeport_nodes_online") == 1  # labpc's agent (laptop is a client)
    assert value(before, "homeport_nodes") == 2
    sim.clock.t += 0.042
    sim.metrics.relay_event(hprelay.StreamStarted(inc.stream_id, "a", "b"))
    sim.core.relay_event(c.StreamStarted(inc.stream_id), sim.now)
    sim.fake_relay.streams = [
        hprelay.StreamStats(inc.stream_id, "a", "b", StreamState.SPLICING, 1000, 50, 0.0)
    ]
    live = sim.scrape()
    assert value(live, "homeport_streams_total", path="relay", result="ok") == 1
    assert value(live, "homeport_stream_setup_seconds_count") == 1
    assert value(live, "homeport_stream_setup_seconds_sum") == pytest.approx(0.042)
    assert value(live, "homeport_stream_setup_seconds_bucket", le="0.025") == 0
    assert value(live, "homeport_stream_setup_seconds_bucket", le="0.05") == 1
    assert value(live, "homeport_streams_open", state="live") == 1
    assert value(live, "homeport_relay_bytes_total", direction="up") == 1000  # a live stream
    # the stream ends: its final count moves from the relay's snapshot to the ended total
    sim.metrics.relay_event(hprelay.StreamEnded(inc.stream_id, 1500, 60, "closed"))
    assert value(sim.scrape(), "homeport_relay_bytes_total", direction="up") == 1000 + 1500
    sim.fake_relay.streams = []
    ended = sim.scrape()
    assert value(ended, "homeport_relay_bytes_total", direction="up") == 1500 + 1000  # never dips
    assert value(ended, "homeport_relay_bytes_total", direction="down") == 60 + 50
    assert value(ended, "homeport_streams_total", path="relay", result="failed") == 0


def test_a_rejected_stream_is_refused_not_failed(sim: MeteredSim) -> None:
    agent, _client, inc = _open(sim)
    sim.send(agent, m.Reject(stream_id=inc.stream_id, code="service-down", message="no sshd"))
    s = sim.scrape()
    assert value(s, "homeport_streams_total", path="relay", result="refused") == 1
    assert value(s, "homeport_streams_total", path="relay", result="failed") == 0
    assert value(s, "homeport_refused_total", stage="stream", reason="service-down") == 1


def test_an_accepted_stream_that_never_splices_failed(sim: MeteredSim) -> None:
    agent, _client, inc = _open(sim)
    sim.send(agent, m.Accept(stream_id=inc.stream_id))
    sim.advance(3600)  # the data connections never came: the core drops it
    s = sim.scrape()
    assert value(s, "homeport_streams_total", path="relay", result="failed") == 1
    assert value(s, "homeport_streams_total", path="relay", result="ok") == 0
    assert value(s, "homeport_stream_setup_seconds_count") == 0


def test_server_refusals_are_counted_by_bounded_reason(sim: MeteredSim) -> None:
    laptop = sim.new_node("laptop")
    client = sim.hello(laptop, "client")
    sim.send(client, m.Open(dst="nosuchnode", service="22", token=TOKEN))
    sim.send(client, m.Open(dst="nosuchnode", service="22", token="bb" * 16))
    s = sim.scrape()
    assert value(s, "homeport_refused_total", stage="stream", reason="unknown-node") == 2
    assert value(s, "homeport_streams_total", path="relay", result="refused") == 2
    # a destination's own code is peer-supplied text: it never becomes a label value
    agent, _client, inc = _open(sim, "cc" * 16)
    sim.send(agent, m.Reject(stream_id=inc.stream_id, code="zz-" + "x" * 40, message=""))
    s = sim.scrape()
    assert value(s, "homeport_refused_total", stage="stream", reason="other") == 1
    reasons = {dict(k[1]).get("reason") for k in s if k[0] == "homeport_refused_total"}
    assert not any(r is not None and r.startswith("zz-") for r in reasons)


def test_hello_refusals_count_as_refused_sessions_but_replaced_sessions_do_not(
    sim: MeteredSim,
) -> None:
    sid = sim.connect(None)  # no certificate
    sim.send(sid, m.Hello(proto=1, role="agent", capver=2, caps=m.OUR_CAPS))
    assert sim.out[sid].closed is not None
    lab = sim.new_node("labpc")
    sim.agent(lab)
    sim.agent(lab)  # replaces the first session: a Close of an authenticated one
    s = sim.scrape()
    assert value(s, "homeport_refused_total", stage="session", reason="unknown-node") == 1
    assert sum(v for k, v in s.items() if k[0] == "homeport_refused_total") == 1


def test_enrollments_by_result(sim: MeteredSim) -> None:
    sim.new_node("labpc")
    assert isinstance(sim.enroll("not-a-key", "x"), m.Error)
    key = sim.registry.create_auth_key(now=sim.now)
    sim.enroll(str(key), "one")
    assert isinstance(sim.enroll(str(key), "two"), m.Error)  # single use
    s = sim.scrape()
    assert value(s, "homeport_enrollments_total", result="ok") == 2
    assert value(s, "homeport_enrollments_total", result="auth-key-invalid") == 1
    assert value(s, "homeport_enrollments_total", result="auth-key-used") == 1
    assert value(s, "homeport_refused_total", stage="session", reason="auth-key-used") == 1


def test_direct_streams_and_the_direct_path_ratio() -> None:
    metrics = ServerMetrics()

    def stream_audit(allowed: bool, by: str, code: str) -> Audit:
        verdict = "allowed" if allowed else "denied"
        fields = (("stream", "s1"), ("verdict", verdict), ("code", code), ("by", by))
        return Audit(au.STREAM, 0.0, fields)

    assert value(parse(metrics.exposition()[0]), "homeport_direct_path_ratio") == 0
    for _ in range(3):
        metrics.observe(stream_audit(True, "destination-direct", "ok"))
    metrics.observe(stream_audit(False, "destination-direct", "policy"))
    metrics.relay_event(hprelay.StreamStarted("s9", "a", "b"))  # not timed: no OPEN seen
    s = parse(metrics.exposition()[0])
    assert value(s, "homeport_streams_total", path="direct", result="ok") == 3
    assert value(s, "homeport_streams_total", path="direct", result="refused") == 1
    assert value(s, "homeport_refused_total", stage="stream", reason="policy") == 1
    assert value(s, "homeport_direct_path_ratio") == pytest.approx(0.75)
    assert value(s, "homeport_stream_setup_seconds_count") == 0


def test_connection_refusals_and_punch_counters(sim: MeteredSim) -> None:
    sim.metrics.observe(ConnectionRefused(Refusal.EVICTED))
    sim.metrics.observe(ConnectionRefused(Refusal.EVICTED))
    sim.metrics.observe(ConnectionRefused(Refusal.TLS_FAILED))
    sim.core.punches_total, sim.core.punch_successes_total = 5, 4
    s = sim.scrape()
    assert value(s, "homeport_refused_total", stage="connection", reason="evicted") == 2
    assert value(s, "homeport_refused_total", stage="connection", reason="tls-failed") == 1
    assert value(s, "homeport_punch_attempts_total") == 5
    assert value(s, "homeport_punch_successes_total") == 4
    assert value(s, "homeport_control_connections") == 3
    assert value(s, "homeport_unauthenticated_connections") == 2


def test_two_servers_in_one_process_keep_apart() -> None:
    a, b = ServerMetrics(), ServerMetrics()
    a.observe(ConnectionRefused(Refusal.PROBE_BUSY))
    assert value(parse(a.exposition()[0]), "homeport_refused_total", stage="connection",
                 reason="probe-busy") == 1  # fmt: skip
    assert value(parse(b.exposition()[0]), "homeport_refused_total", stage="connection",
                 reason="probe-busy") == 0  # fmt: skip


def test_the_setup_timing_table_is_bounded() -> None:
    metrics = ServerMetrics()
    for i in range(MAX_TIMED_SETUPS + 10):
        metrics.observe(c.RelayExpect(f"s{i}", "a", "b", b"x", b"y", 1.0))
    assert len(metrics._setups) == MAX_TIMED_SETUPS
    metrics.relay_event(hprelay.StreamStarted("s0", "a", "b"))  # evicted: counted, not timed
    s = parse(metrics.exposition()[0])
    assert value(s, "homeport_streams_total", path="relay", result="ok") == 1
    assert value(s, "homeport_stream_setup_seconds_count") == 0
