"""The agent's metrics: the observer's events in, counters out; the listen address rules."""

from __future__ import annotations

import urllib.request
from typing import Any, cast

import pytest

from homeport.agent.metrics import (
    AgentMetrics,
    AgentMetricsServer,
    ListenError,
    parse_metrics_listen,
)
from homeport.agent.runtime import StreamPumped
from homeport.proto import node as core
from tests.test_metrics import parse, value


@pytest.mark.parametrize(
    ("text", "allow", "want"),
    [
        ("9101", False, ("127.0.0.1", 9101)),
        (":9101", False, ("127.0.0.1", 9101)),
        ("127.0.0.2:9101", False, ("127.0.0.2", 9101)),
        ("[::1]:9101", False, ("::1", 9101)),
        ("localhost:9101", False, ("localhost", 9101)),
        ("192.0.2.7:9101", True, ("192.0.2.7", 9101)),
        ("0.0.0.0:9101", True, ("0.0.0.0", 9101)),
    ],
)
def test_metrics_listen_addresses(text: str, allow: bool, want: tuple[str, int]) -> None:
    assert parse_metrics_listen(text, allow_remote=allow) == want


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("192.0.2.7:9101", "not a loopback address"),
        ("0.0.0.0:9101", "not a loopback address"),
        ("[2001:db8::1]:9101", "not a loopback address"),
        ("metrics.example:9101", "not an IP address"),
        ("127.0.0.1:0", "port 1-65535"),
        ("127.0.0.1:70000", "port 1-65535"),
        ("127.0.0.1:http", "port 1-65535"),
    ],
)
def test_metrics_listen_refusals(text: str, why: str) -> None:
    with pytest.raises(ListenError, match=why):
        parse_metrics_listen(text)


def test_the_observer_counts_sessions_reconnects_streams_and_bytes() -> None:
    metrics = AgentMetrics()
    metrics.observe(core.SessionReady("n1", "labpc", 1, 1, True))
    metrics.observe(core.Reconnect(0.5))
    metrics.observe(core.Reconnect(1.0))
    metrics.observe(core.SessionReady("n1", "labpc", 1, 1, True))
    metrics.observe(core.StartStream("s1", b"t", cast(Any, None), cast(Any, None)))
    metrics.observe(StreamPumped(True, 100, 7))
    metrics.observe(core.LocalOpenSucceeded(b"t", cast(Any, None)))
    metrics.observe(StreamPumped(False, 5, 3000))
    metrics.observe(core.SessionLost("gone"))  # not counted by itself: Reconnect is
    s = parse(metrics.exposition()[0])
    assert value(s, "homeport_agent_control_sessions_total") == 2
    assert value(s, "homeport_agent_reconnects_total") == 2
    assert value(s, "homeport_agent_relay_streams_total", direction="incoming") == 1
    assert value(s, "homeport_agent_relay_streams_total", direction="outgoing") == 1
    assert value(s, "homeport_agent_relay_bytes_total", direction="out") == 105
    assert value(s, "homeport_agent_relay_bytes_total", direction="in") == 3007
    # without an agent to read, the scrape-time metrics are simply absent
    assert not any(k[0] == "homeport_agent_control_connected" for k in s)


def test_direct_link_bytes_never_go_down_when_a_link_closes() -> None:
    metrics = AgentMetrics()
    a, b = object(), object()
    assert metrics._direct_bytes({a: (10, 1), b: (20, 2)}) == (30, 3)
    assert metrics._direct_bytes({a: (15, 1), b: (25, 2)}) == (40, 3)
    assert metrics._direct_bytes({b: (26, 2)}) == (15 + 26, 3)  # a closed: its last count stays
    assert metrics._direct_bytes({}) == (41, 3)


def test_the_listener_serves_the_registry_over_http() -> None:
    metrics = AgentMetrics()
    metrics.observe(core.Reconnect(1.0))
    server = AgentMetricsServer(metrics, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            s = parse(resp.read())
    finally:
        server.close()
    assert value(s, "homeport_agent_reconnects_total") == 1
