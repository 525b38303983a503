"""Metrics end to end: a real server, two real agents, real OpenSSH through the relay.

The server runs in this process (``start_server_thread``) so the test scrapes
``ServerMetrics.exposition()`` exactly as the admin listener's GET /metrics will;
the agents are ``homeport up`` processes, one of them serving its own metrics on
a loopback port (``--metrics-listen``), scraped over HTTP. Expositions are parsed
with prometheus_client's parser.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from homeport.server.app import ServerHandle, start_server_thread
from homeport.testing.deadline import wait_for
from homeport.testing.sshd import SshdServer, make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport, free_port

pytestmark = pytest.mark.integration

ok, why = sshd_available()
if not ok:
    pytest.skip(f"needs OpenSSH sshd: {why}", allow_module_level=True)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
#: Bytes the ssh command prints: they flow destination -> opener ("down").
OUTPUT = 300_000


def parse(body: bytes) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class Net:
    hp: Homeport
    srv: ServerHandle
    sshd: SshdServer
    laptop: Path
    lab_metrics: int

    def server(self) -> Samples:
        metrics = self.srv.metrics
        assert metrics is not None
        body, ctype = self.srv.call(metrics.exposition)  # on the server's loop, as /metrics
        assert ctype.startswith("text/plain; version=0.0.4")
        return parse(body)

    def agent(self) -> Samples:
        url = f"http://127.0.0.1:{self.lab_metrics}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            return parse(resp.read())

    def ssh(self, command: str) -> subprocess.CompletedProcess[bytes]:
        argv = [
            *self.hp.ssh_args(self.laptop, self.sshd.client_key, self.sshd.user),
            "labpc",
            command,
        ]
        return subprocess.run(argv, capture_output=True, timeout=60, env=self.hp.env)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("hpm")
    hp = Homeport(root)
    sshd = make_sshd(root / "sshd")
    srv = start_server_thread(hp.data_dir)
    try:
        hp.server_addr = srv.address
        sshd.start()
        port = free_port()
        lab = hp.up(
            "labpc",
            "--expose",
            f"ssh=127.0.0.1:{sshd.port}",
            "--metrics-listen",
            f"127.0.0.1:{port}",
        )
        hp.wait_online("labpc", lab)
        laptop = hp.up("laptop", "--relay-only")  # every stream through the relay
        hp.wait_online("laptop", laptop)
        yield Net(hp, srv, sshd, hp.state("laptop"), port)
    finally:
        hp.close()
        srv.stop()
        sshd.stop()


def test_server_counters_move_as_ssh_traffic_flows_through_the_relay(net: Net) -> None:
    before = net.server()
    assert value(before, "homeport_nodes_online") == 2
    metrics = net.srv.metrics
    assert metrics is not None  # from this thread: exposition() reads the core on its loop
    assert value(parse(metrics.exposition()[0]), "homeport_nodes_online") == 2
    assert value(before, "homeport_control_connections") >= 2
    assert value(before, "homeport_enrollments_total", result="ok") == 2
    res = net.ssh(f"head -c {OUTPUT} /dev/zero")
    assert res.returncode == 0 and len(res.stdout) == OUTPUT, res.stderr

    def moved() -> bool:
        now = net.server()
        return (
            value(now, "homeport_relay_bytes_total", direction="down")
            >= value(before, "homeport_relay_bytes_total", direction="down") + OUTPUT
            and value(now, "homeport_streams_open", state="live") == 0
        )

    wait_for(moved, 20, "the relay's byte counter to take the ssh output")
    after = net.server()
    ok_relay = ("homeport_streams_total", {"path": "relay", "result": "ok"})
    assert value(after, ok_relay[0], **ok_relay[1]) >= value(before, ok_relay[0], **ok_relay[1]) + 1
    setups = "homeport_stream_setup_seconds_count"
    assert value(after, setups) >= value(before, setups) + 1
    assert 0 < value(after, "homeport_stream_setup_seconds_sum") < 60
    up = "homeport_relay_bytes_total"
    assert value(after, up, direction="up") > value(before, up, direction="up")  # ssh's side
    assert value(after, "homeport_streams_total", path="relay", result="failed") == 0


def test_a_junk_connection_is_counted_as_refused(net: Net) -> None:
    name, labels = "homeport_refused_total", {"stage": "connection", "reason": "unknown-protocol"}
    before = value(net.server(), name, **labels)
    host, port = net.srv.host, net.srv.port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):  # a reset: our bytes were never read
            assert s.recv(100) == b""  # closed without an answer
    wait_for(lambda: value(net.server(), name, **labels) == before + 1, 10, "the refusal count")


def test_the_agent_serves_its_own_metrics(net: Net) -> None:
    before = net.agent()
    assert value(before, "homeport_agent_control_connected") == 1
    assert value(before, "homeport_agent_control_sessions_total") >= 1
    res = net.ssh(f"head -c {OUTPUT} /dev/zero")
    assert res.returncode == 0 and len(res.stdout) == OUTPUT, res.stderr
    name = "homeport_agent_relay_bytes_total"

    def pumped() -> bool:
        now = net.agent()
        return value(now, name, direction="out") >= value(before, name, direction="out") + OUTPUT

    wait_for(pumped, 20, "the agent's relayed byte counter")
    after = net.agent()
    served = ("homeport_agent_relay_streams_total", "incoming")
    assert value(after, served[0], direction=served[1]) >= (
        value(before, served[0], direction=served[1]) + 1
    )
    assert value(after, "homeport_agent_peer_paths", path="relay") == 1  # laptop is relay-only


def test_a_metrics_port_in_use_stops_the_agent_with_one_line(net: Net) -> None:
    proc = net.hp.up("third", "--metrics-listen", f"127.0.0.1:{net.lab_metrics}")
    assert proc.wait(timeout=60) == 2
    log = net.hp.log("agent-third")
    assert f"cannot start: --metrics-listen 127.0.0.1:{net.lab_metrics}: " in log
    assert "Traceback" not in log


def test_direct_streams_punches_and_the_ratio(net: Net) -> None:
    """A node that may go direct: its streams move from the relay to a punched path."""
    desk = net.hp.up("desk")
    net.hp.wait_online("desk", desk)
    before, agent_before = net.server(), net.agent()
    direct_ok = {"path": "direct", "result": "ok"}

    def went_direct() -> bool:
        argv = [
            *net.hp.ssh_args(net.hp.state("desk"), net.sshd.client_key, net.sshd.user),
            "labpc",
            "true",
        ]
        res = subprocess.run(argv, capture_output=True, timeout=60, env=net.hp.env)
        assert res.returncode == 0, res.stderr
        return value(net.server(), "homeport_streams_total", **direct_ok) > value(
            before, "homeport_streams_total", **direct_ok
        )  # the destination's STREAM_LOG reached the server

    wait_for(went_direct, 30, f"a direct stream\n{net.hp.log('agent-desk')}", interval=0.2)
    after, agent_after = net.server(), net.agent()
    assert value(after, "homeport_punch_attempts_total") >= 1
    assert value(after, "homeport_punch_successes_total") >= 1
    assert 0 < value(after, "homeport_direct_path_ratio") < 1  # the earlier ones were relayed
    name = "homeport_agent_direct_streams_total"
    assert value(agent_after, name, direction="incoming") > value(
        agent_before, name, direction="incoming"
    )
    assert value(agent_after, "homeport_agent_punch_attempts_total") >= 1


def test_up_refuses_a_non_loopback_metrics_address(tmp_path: Path) -> None:
    res = subprocess.run(
        [*HOMEPORT, "up", "--state", str(tmp_path), "--metrics-listen", "192.0.2.1:9101"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    assert "not a loopback address" in res.stderr and "--metrics-allow-remote" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
