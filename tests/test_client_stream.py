"""Agent, dialer and nc against a real in-process server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from homeport.agent.runtime import Agent, ExitCode, StreamRecord, run_in_loop
from homeport.client.cli import register
from homeport.io.dial import DialError, enroll, open_stream, request_netmap
from homeport.io.pump import PumpResult, pump
from homeport.node.state import NodeState
from homeport.policy.services import Service
from homeport.proto.backoff import Backoff
from homeport.server.admin import admin_request
from homeport.server.app import ServerHandle, start_server_thread
from homeport.testing.deadline import wait_for
from homeport.wire.authkey import parse_untrusted

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJCM22JZUrvyZbfuD74UOXyFBC4Z3UDAooS0XFHTNSR+"
DEADLINE = 20.0


class Echo:
    """A loopback echo server (the agent's local target)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Net:
    root: Path
    srv: ServerHandle
    agent_state: NodeState
    client: NodeState
    agent: Agent
    thread: threading.Thread
    result: list[int]
    decisions: list[StreamRecord]
    echo: Echo
    dead_port: int

    def key(self) -> str:
        return str(admin_request(self.srv.data_dir, {"op": "keys.create"})["key"])


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    srv = start_server_thread(tmp_path / "srv")
    echo = Echo()
    dead_port = free_port()
    try:

        def key() -> str:
            return str(admin_request(srv.data_dir, {"op": "keys.create"})["key"])

        agent_state = enroll(srv.address, key(), "labpc", tmp_path / "a")
        client = enroll(srv.address, key(), "laptop", tmp_path / "c")
        services = (
            Service("echo", echo.port, "127.0.0.1", echo.port),
            Service("down", dead_port, "127.0.0.1", dead_port),
        )
        decisions: list[StreamRecord] = []
        agent = Agent(
            agent_state,
            services,
            host_keys=(HOST_KEY,),
            ping_interval=0.5,
            idle_timeout=1.5,
            backoff=Backoff(base=0.05, cap=0.2),
            on_decision=decisions.append,
        )
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(run_in_loop(agent)), daemon=True)
        thread.start()
        assert agent.connected.wait(DEADLINE), "agent did not connect"
        n = Net(
            tmp_path, srv, agent_state, client, agent, thread, result, decisions, echo, dead_port
        )
        yield n
        agent.stop()
        thread.join(DEADLINE)
        assert not thread.is_alive()
    finally:
        echo.close()
        srv.stop()


def run_pump_echo(tls_stream: object, payload: bytes) -> tuple[bytes, PumpResult]:
    from homeport.io.tlsstream import TlsStream

    assert isinstance(tls_stream, TlsStream)
    app, mine = socket.socketpair()
    results: list[PumpResult] = []
    t = threading.Thread(
        target=lambda: results.append(pump(tls_stream, mine.fileno(), mine.fileno()))
    )
    t.start()

    def send() -> None:
        app.sendall(payload)
        app.shutdown(socket.SHUT_WR)

    s = threading.Thread(target=send)
    s.start()
    chunks = []
    while data := app.recv(1 << 20):
        chunks.append(data)
    s.join(DEADLINE)
    t.join(DEADLINE)
    app.close()
    mine.close()
    return b"".join(chunks), results[0]


def test_stream_echo_byte_exact(net: Net) -> None:
    stream = open_stream(net.client, "labpc", "echo")
    assert stream.opened.peer.name == "labpc"
    assert stream.opened.peer.host_keys == (HOST_KEY,)
    payload = os.urandom(3 * 1024 * 1024)
    got, res = run_pump_echo(stream.tls, payload)
    assert got == payload
    assert res.ok, res
    wait_for(lambda: net.agent.active_streams == 0, DEADLINE, "the agent's stream to end")
    assert net.decisions[-1].accepted


def test_stream_by_port(net: Net) -> None:
    stream = open_stream(net.client, "labpc", str(net.echo.port))
    got, res = run_pump_echo(stream.tls, b"ping")
    assert (got, res.ok) == (b"ping", True)


def test_rejections_have_precise_reasons(net: Net) -> None:
    with pytest.raises(DialError) as info:
        open_stream(net.client, "labpc", "down")
    assert info.value.code == "service-down"
    assert info.value.message == f"connection refused to 127.0.0.1:{net.dead_port}"
    assert net.decisions[-1].code == "service-down"
    with pytest.raises(DialError) as info:
        open_stream(net.client, "labpc", "nope")
    assert info.value.code == "not-exposed"
    with pytest.raises(DialError) as info:
        open_stream(net.client, "ghost", "echo")
    assert info.value.code == "unknown-node"


def test_netmap_and_status_cli(net: Net) -> None:
    nm = request_netmap(net.client)
    by_name = {n.name: n for n in nm.nodes}
    assert by_name["labpc"].online
    assert nm.self_id == net.client.node_id
    group = click.Group()
    register(group)
    res = CliRunner().invoke(group, ["status", "--state", str(net.client.dir)])
    assert res.exit_code == 0, res.output
    assert "laptop (this node)" in res.output
    assert "echo/" in res.output
    res = CliRunner().invoke(group, ["ssh-config", "--state", str(net.client.dir)])
    assert "Host labpc" in res.output


def test_nc_process_writes_known_hosts_and_pumps(net: Net) -> None:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "homeport", "nc", "--state", str(net.client.dir), "labpc", "echo"],
        input=b"hello through homeport",
        capture_output=True,
        env=env,
        timeout=DEADLINE,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hello through homeport"
    kh = (net.client.dir / "known_hosts" / "labpc").read_text()
    assert kh.splitlines()[0] == f"labpc {HOST_KEY}"
    assert f"[labpc]:{net.echo.port} {HOST_KEY}" in kh
    proc = subprocess.run(
        [sys.executable, "-m", "homeport", "nc", "--state", str(net.client.dir), "labpc", "down"],
        capture_output=True,
        env=env,
        timeout=DEADLINE,
    )
    assert proc.returncode == 1
    assert proc.stderr.decode() == (
        f"homeport nc: labpc: connection refused to 127.0.0.1:{net.dead_port}\n"
    )


def test_enroll_errors(net: Net) -> None:
    key = net.key()
    enroll(net.srv.address, key, "third", net.root / "third")
    with pytest.raises(DialError) as info:
        enroll(net.srv.address, key, "fourth", net.root / "fourth")
    assert info.value.code == "auth-key-used"
    with pytest.raises(DialError) as info:
        enroll(net.srv.address, net.key(), "labpc", net.root / "dup")
    assert info.value.code == "name-taken"
    # A key whose pin is not the server's: refused before the secret is sent.
    real = parse_untrusted(net.key())
    forged = f"hpk1_{real.key_id}_{real.secret}_{'0' * 64}"
    with pytest.raises(DialError) as info:
        enroll(net.srv.address, forged, "fifth", net.root / "fifth")
    assert info.value.code == "pin-mismatch"
    with pytest.raises(DialError) as info:
        enroll(f"127.0.0.1:{free_port()}", net.key(), "sixth", net.root / "sixth")
    assert info.value.code == "unreachable" and info.value.retriable


def test_removed_node_exits_nonzero(net: Net) -> None:
    res = admin_request(net.srv.data_dir, {"op": "nodes.remove", "name": "labpc"})
    assert res["ok"], res
    net.thread.join(DEADLINE)
    assert net.result == [int(ExitCode.NODE_REMOVED)]


def test_agent_survives_unreachable_server(tmp_path: Path, net: Net) -> None:
    """Booting before the network: the agent keeps retrying instead of exiting."""
    lost = NodeState(
        dir=net.agent_state.dir,
        server=f"127.0.0.1:{free_port()}",
        server_pin=net.agent_state.server_pin,
        node_id=net.agent_state.node_id,
        name=net.agent_state.name,
    )
    agent = Agent(lost, (), host_keys=(), backoff=Backoff(base=0.02, cap=0.05))
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(run_in_loop(agent)), daemon=True)
    t.start()
    wait_for(lambda: agent.backoff.attempt >= 5, DEADLINE, "several reconnect attempts")
    assert t.is_alive() and not result
    agent.stop()
    t.join(DEADLINE)
    assert result == [int(ExitCode.STOPPED)]


class FreezableProxy:
    """TCP proxy to the server that can silently stop forwarding (a dead NAT mapping)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen: list[socket.socket] = []
        self.live: list[tuple[socket.socket, socket.socket]] = []
        self.freeze = threading.Event()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            self.accepted += 1
            self.live.append((a, b))
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._copy, args=(x, y), daemon=True).start()

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data or self.freeze.is_set():
                return  # frozen: swallow everything, close nothing
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for a, b in self.live:
            a.close()
            b.close()


def test_dead_link_detected_by_keepalive(net: Net, caplog: pytest.LogCaptureFixture) -> None:
    proxy = FreezableProxy((net.srv.host, net.srv.port))
    via_proxy = NodeState(
        dir=net.agent_state.dir,
        server=f"127.0.0.1:{proxy.port}",
        server_pin=net.agent_state.server_pin,
        node_id=net.agent_state.node_id,
        name=net.agent_state.name,
    )
    net.agent.stop()
    net.thread.join(DEADLINE)
    agent = Agent(
        via_proxy,
        (),
        host_keys=(),
        ping_interval=0.3,
        idle_timeout=1.0,
        backoff=Backoff(base=0.05, cap=0.1),
    )
    t = threading.Thread(target=lambda: run_in_loop(agent), daemon=True)
    t.start()
    try:
        assert agent.connected.wait(DEADLINE)
        caplog.set_level(logging.WARNING, logger="homeport.agent")
        proxy.freeze.set()  # packets vanish; no FIN, no RST
        wait_for(lambda: not agent.connected.is_set(), DEADLINE, "the dead link to be noticed")
        # noticed by the keepalive (nothing arrived for idle_timeout), not by a TCP error
        lost = [r.getMessage() for r in caplog.records if "connection lost" in r.getMessage()]
        assert lost and "keepalive" in lost[-1] and "[timeout]" in lost[-1], lost
        proxy.freeze.clear()
        wait_for(agent.connected.is_set, DEADLINE, "the agent to reconnect")
        assert proxy.accepted >= 2
    finally:
        agent.stop()
        t.join(DEADLINE)
        proxy.close()
