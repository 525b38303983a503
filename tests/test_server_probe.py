"""The server's whoami probe, on real loopback sockets: the main port and the probe port.

A node connects *from one local port* to both and must read back that same
address and port from each (that is how it tells an endpoint-independent
mapping from a symmetric one); the probe port speaks nothing else, drops silent
connections and holds a bounded number at once.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeport.proto import coord
from homeport.server import service as svc
from homeport.server.app import ServerHandle, start_server_thread
from homeport.server.service import ServiceConfig
from homeport.testing.deadline import wait_for
from homeport.wire import probe
from homeport.wire.data import encode_preamble, new_token

DEADLINE = 10.0
CONFIG = ServiceConfig(handshake_timeout=2.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    with start_server_thread(tmp_path_factory.mktemp("srv"), config=CONFIG) as srv:
        yield srv


def _bound(host: str, port: int, family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    s.settimeout(DEADLINE)
    return s


def read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def whoami(
    server_host: str, server_port: int, local: tuple[str, int], family: int = socket.AF_INET
) -> tuple[str, int]:
    with _bound(local[0], local[1], family) as s:
        s.connect((server_host, server_port))
        nonce = probe.new_nonce()
        s.sendall(probe.encode_request(nonce))
        return probe.parse_answer_untrusted(read_all(s), nonce)


def test_both_ports_answer_with_the_observed_address(server: ServerHandle) -> None:
    assert server.service is not None
    probe_port = server.service.probe_port
    assert probe_port not in (0, server.port)
    assert server.call(lambda: server.service.core.probe_port) == probe_port  # type: ignore[union-attr]
    with _bound("127.0.0.1", 0) as holder:  # reserve a local port, like the agent's direct port
        local = holder.getsockname()
        for port in (server.port, probe_port):
            assert whoami("127.0.0.1", port, local) == ("127.0.0.1", local[1])
    other = whoami("127.0.0.1", probe_port, ("127.0.0.2", 0))
    assert other[0] == "127.0.0.2"  # the address it sees, not a fixed one


def test_the_main_port_still_relays_and_refuses_bad_whoami(server: ServerHandle) -> None:
    with socket.create_connection((server.host, server.port), timeout=DEADLINE) as s:
        s.sendall(b"HPW\x09" + bytes(16))  # a whoami version this server does not speak
        assert read_all(s) == b""
    # the server still serves: a good whoami right after
    assert whoami(server.host, server.port, ("127.0.0.1", 0))[0] == "127.0.0.1"


def test_the_probe_port_speaks_only_whoami(server: ServerHandle) -> None:
    assert server.service is not None
    with socket.create_connection((server.host, server.service.probe_port), DEADLINE) as s:
        s.sendall(encode_preamble(new_token()))  # a data preamble: not here
        assert read_all(s) == b""
    with socket.create_connection((server.host, server.service.probe_port), DEADLINE) as s:
        s.sendall(b"\x16\x03\x01" + bytes(17))  # a TLS hello: not here either
        assert read_all(s) == b""


def test_silent_probe_connections_time_out_and_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(svc, "PROBE_TIMEOUT", 0.5)
    monkeypatch.setattr(svc, "MAX_PROBE_CONNECTIONS", 2)
    with start_server_thread(tmp_path / "srv", config=CONFIG) as srv:
        assert srv.service is not None
        service = srv.service
        port = service.probe_port
        silent = [socket.create_connection((srv.host, port), DEADLINE) for _ in range(2)]
        try:
            wait_for(lambda: srv.call(lambda: service._probe_conns) == 2, DEADLINE)
            with socket.create_connection((srv.host, port), DEADLINE) as third:
                assert read_all(third) == b""  # over the limit: closed at once
            for s in silent:  # each silent one is closed after PROBE_TIMEOUT
                s.settimeout(DEADLINE)
                assert read_all(s) == b""
            wait_for(lambda: srv.call(lambda: service._probe_conns) == 0, DEADLINE)
            assert whoami(srv.host, port, ("127.0.0.1", 0))[0] == "127.0.0.1"
        finally:
            for s in silent:
                s.close()


def test_probe_port_zero_disables_it_and_relay_only_reaches_the_core(tmp_path: Path) -> None:
    cfg = ServiceConfig(probe_port=0, relay_only=True)
    with start_server_thread(tmp_path / "srv", config=cfg) as srv:
        assert srv.service is not None
        core = srv.service.core
        assert srv.service.probe_port == 0
        assert srv.call(lambda: (core.probe_port, core.relay_only)) == (0, True)
        # the main port answers whoami regardless
        assert whoami(srv.host, srv.port, ("127.0.0.1", 0))[0] == "127.0.0.1"


def test_ipv6_whoami(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1")
    with start_server_thread(tmp_path / "srv", listen="[::1]:0", config=CONFIG) as srv:
        assert srv.service is not None
        for port in (srv.port, srv.service.probe_port):
            host, _port = whoami("::1", port, ("::1", 0), socket.AF_INET6)
            assert host == "::1"


def test_cli_passes_probe_port_and_relay_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import click
    from click.testing import CliRunner

    from homeport.server import app
    from homeport.server.cli import register

    seen: dict[str, object] = {}

    def fake_run_server(*args: object, **kw: object) -> int:
        seen.update(kw)
        return 0

    monkeypatch.setattr(app, "run_server", fake_run_server)

    @click.group()
    def cli() -> None:
        pass

    register(cli)
    data = str(tmp_path / "d")
    r = CliRunner().invoke(cli, ["server", "--data", data, "--probe-port", "0", "--relay-only"])
    assert r.exit_code == 0, r.output
    assert (seen["probe_port"], seen["relay_only"]) == (0, True)
    r = CliRunner().invoke(cli, ["server", "--data", data])
    assert (seen["probe_port"], seen["relay_only"]) == (None, False)
    r = CliRunner().invoke(cli, ["server", "--data", data, "--probe-port", "70000"])
    assert r.exit_code == 2


def test_a_real_server_coordinates_a_punch_and_forwards_peer_pings(
    server: ServerHandle, tmp_path: Path
) -> None:
    """The direct-path messages through real TLS control sessions (capver 3)."""
    from homeport.wire import control as m
    from tests.test_server_service import Ctl, agent, enroll, unique

    assert server.service is not None
    one = enroll(server, unique("one"), tmp_path)
    two = enroll(server, unique("two"), tmp_path)
    probe_ctl = Ctl(server, one)
    probe_ctl.send(m.Hello(proto=1, role="client", capver=m.CAPVER, caps=m.OUR_CAPS))
    welcome = probe_ctl.recv()
    assert isinstance(welcome, m.Welcome)
    assert (welcome.direct, welcome.probe_port) == (True, server.service.probe_port)
    assert m.CAP_DIRECT in welcome.caps
    probe_ctl.close()
    a = agent(server, one, (), capver=m.CAPVER)
    b = agent(server, two, (m.ServiceInfo("ssh", 22),), capver=m.CAPVER)
    a.send(m.Endpoints(candidates=(m.Candidate("public", "198.51.100.1:4000"),), nat="eim"))
    b.send(m.Endpoints(candidates=(m.Candidate("local", "10.0.0.2:4000"),), nat="none"))
    core = server.service.core
    # b's ENDPOINTS travel on another connection: wait until the server holds them
    wait_for(lambda: server.call(lambda: core.endpoints_of(two.node_id)) is not None, DEADLINE)
    a.send(m.PathReq(dst=two.node_id, punch_id=5))
    pa, pb = a.recv_type(m.Punch), b.recv_type(m.Punch)
    assert isinstance(pa, m.Punch) and isinstance(pb, m.Punch)
    assert (pa.punch_id, pa.tls_role, pa.peer.fingerprint) == (5, "client", two.fingerprint)
    assert (pb.punch_id, pb.tls_role, pb.peer.fingerprint) == (5, "server", one.fingerprint)
    assert pa.candidates[0].addr == "10.0.0.2:4000"
    assert pb.candidates[0].addr == "198.51.100.1:4000"
    a.send(m.PeerPing(peer=two.node_id, seq=41))
    ping = b.recv_type(m.PeerPing)
    assert ping == m.PeerPing(peer=one.node_id, seq=41)
    b.send(m.PeerPong(peer=one.node_id, seq=41))
    assert a.recv_type(m.PeerPong) == m.PeerPong(peer=two.node_id, seq=41)
    a.close()
    b.close()


def test_discovery_from_a_direct_port_reads_the_same_mapping_from_both_ports(
    server: ServerHandle,
) -> None:
    """io.netcheck (the agent's discovery) against this server: one port, one observed address."""
    from homeport.io.netcheck import netcheck
    from homeport.io.punch import DirectPort
    from homeport.proto.natcheck import classify_nat

    assert server.service is not None
    port = DirectPort(0, "127.0.0.1")
    try:
        obs = netcheck(
            port,
            ("127.0.0.1", server.port),
            ("127.0.0.1", server.service.probe_port),
            portmap=False,
        )
    finally:
        port.close()
    assert obs.main == obs.probe == ("127.0.0.1", port.port), obs
    assert classify_nat(obs).kind.value in ("none", "eim")


class _Core:
    """Records :meth:`homeport.proto.coord.Coordinator.reach_probed` calls."""

    def __init__(self) -> None:
        self.answers: list[tuple[str, str, int, bool]] = []

    def reach_probed(self, node_id: str, host: str, port: int, ok: bool, now: float) -> None:
        self.answers.append((node_id, host, port, ok))


class _Shell:
    """Just the parts of :class:`homeport.server.service.Service` its reach probe uses."""

    _probe_reach = svc.Service._probe_reach

    def __init__(self) -> None:
        self.core = _Core()
        self._reach_probes: set[asyncio.Task[None]] = set()

    def _run(self) -> None:
        pass


def test_the_reach_probe_connects_once_sends_nothing_and_reports() -> None:
    """A listening direct port reads as reachable (and sees only an EOF); a closed one not."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    open_port = listener.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: the connect is refused
    closed_port = closed.getsockname()[1]
    shell = _Shell()

    async def main() -> None:
        for node, port in (("n1", open_port), ("n2", closed_port)):
            shell._probe_reach(coord.ProbeReach(node, "127.0.0.1", port))  # type: ignore[misc]
        while shell._reach_probes:
            await asyncio.gather(*shell._reach_probes)

    try:
        asyncio.run(main())
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(DEADLINE)
            assert conn.recv(1) == b""  # no bytes, just the close: the agent drops it
        assert sorted(shell.core.answers) == [
            ("n1", "127.0.0.1", open_port, True),
            ("n2", "127.0.0.1", closed_port, False),
        ]
    finally:
        listener.close()
        closed.close()
