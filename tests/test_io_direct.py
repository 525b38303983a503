"""The direct-port primitives on loopback (no root): punch, whoami, port mapping client."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from homeport.io.netcheck import local_addresses, netcheck, whoami
from homeport.io.portmap import PortMapFailure, default_gateway, request_mapping
from homeport.io.punch import DirectPort, PunchFailure, PunchSuccess, punch
from homeport.proto.natcheck import Candidate, MappedPort
from homeport.testing.labnode import _serve_whoami
from homeport.wire import natpmp


@pytest.fixture
def whoami_server() -> Iterator[tuple[str, int]]:
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, peer = srv.accept()
            except OSError:
                return
            _serve_whoami(conn, peer)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv.getsockname()
    stop.set()
    socket.create_connection(srv.getsockname()).close()  # wake accept()
    t.join(5)
    srv.close()


def test_whoami_from_the_direct_port(whoami_server: tuple[str, int]) -> None:
    with DirectPort(host="127.0.0.1") as port:
        assert whoami(port, whoami_server) == ("127.0.0.1", port.port)
        obs = netcheck(port, whoami_server, None, portmap=False)
    assert obs.main == ("127.0.0.1", port.port) and obs.probe is None
    assert obs.probe_error == "the server has no probe port"
    assert "127.0.0.1" not in local_addresses()


def test_punch_simultaneous_open_on_loopback() -> None:
    with DirectPort(host="127.0.0.1") as a, DirectPort(host="127.0.0.1") as b:
        results: dict[str, PunchSuccess | PunchFailure] = {}

        def side(name: str, me: DirectPort, peer: DirectPort) -> None:
            results[name] = punch(me, [Candidate("public", "127.0.0.1", peer.port)], 3.0)

        threads = [
            threading.Thread(target=side, args=("a", a, b)),
            threading.Thread(target=side, args=("b", b, a)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        ra, rb = results["a"], results["b"]
        assert isinstance(ra, PunchSuccess) and isinstance(rb, PunchSuccess)
        try:
            ra.sock.sendall(b"hello")
            assert rb.sock.recv(5) == b"hello"
        finally:
            ra.sock.close()
            rb.sock.close()


def test_a_connection_that_only_ended_does_not_win_a_punch() -> None:
    """The server's reach probe (connect, close, nothing sent) waits in the backlog."""
    with DirectPort(host="127.0.0.1") as me:
        probe = socket.create_connection(("127.0.0.1", me.port), timeout=5)
        probe.close()
        peer = socket.create_connection(("127.0.0.1", me.port), timeout=5)
        try:
            peer.sendall(b"hi")
            res = punch(me, [], 3.0)
            assert isinstance(res, PunchSuccess) and res.via == "accept"
            with res.sock:
                assert res.sock.getpeername() == peer.getsockname()
                assert res.sock.recv(2) == b"hi"
        finally:
            peer.close()


def test_punch_times_out_with_a_reason() -> None:
    with DirectPort(host="127.0.0.1") as me:
        # Nothing listens on loopback port 9: every dial is refused and redialled until the end.
        res = punch(me, [Candidate("public", "127.0.0.1", 9)], 0.3, accept=False)
    assert isinstance(res, PunchFailure) and res.code == "punch-timeout"
    assert "punch timed out" in res.reason and "ECONNREFUSED" in res.reason


def test_punch_skips_a_candidate_of_another_address_family() -> None:
    """An IPv6 candidate for an IPv4 direct port is recorded and skipped, never raised."""
    with DirectPort(host="127.0.0.1") as me:
        res = punch(me, [Candidate("local", "fd00::2", 9)], 0.3, accept=False)
    assert isinstance(res, PunchFailure) and res.code == "punch-timeout"
    assert "[fd00::2]:9" in res.reason


@pytest.fixture
def fake_gateway() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback NAT-PMP-only gateway that grants every TCP mapping."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    seen: list[bytes] = []

    def loop() -> None:
        while True:
            data, src = sock.recvfrom(2000)
            if data == b"stop":
                return
            seen.append(data)
            if data[0] == natpmp.PCP_VERSION:
                sock.sendto(b"\x00\x81\x00\x01\x00\x00\x00\x00", src)  # unsupported version
            elif data == b"\x00\x00":
                sock.sendto(natpmp.natpmp_public_address_response(0, 1, "203.0.113.9"), src)
            else:
                _op, internal, _ext, life = natpmp.natpmp_parse_request_untrusted(data) or (0,) * 4
                sock.sendto(
                    natpmp.natpmp_map_response(
                        0, 1, 2, internal=internal, external=50000, lifetime=life
                    ),
                    src,
                )

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield sock.getsockname()[1], seen
    sock.sendto(b"stop", sock.getsockname())
    t.join(5)
    sock.close()


def test_portmap_falls_back_from_pcp_to_natpmp(fake_gateway: tuple[int, list[bytes]]) -> None:
    port, seen = fake_gateway
    got = request_mapping(41641, gateway="127.0.0.1", server_port=port, lifetime=600)
    assert got == MappedPort("natpmp", "203.0.113.9", 50000, 41641, 600, "127.0.0.1")
    assert seen[0][0] == natpmp.PCP_VERSION and seen[1] == b"\x00\x00"


def test_portmap_no_answer_is_bounded() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never answers
        got = request_mapping(
            41641, gateway="127.0.0.1", server_port=silent.getsockname()[1], timeouts=(0.05, 0.05)
        )
    assert isinstance(got, PortMapFailure) and got.code == "no-answer"


def test_default_gateway_parses_proc_route(tmp_path: object) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    f = tmp_path / "route"
    f.write_text(
        "Iface\tDestination\tGateway \tFlags\n"
        "eth0\t0014A8C0\t00000000\t0001\n"
        "eth0\t00000000\t0114A80A\t0003\n"
    )
    assert default_gateway(str(f)) == "10.168.20.1"
    assert default_gateway(str(tmp_path / "missing")) is None


def test_punch_without_candidates_or_listener() -> None:
    with DirectPort(host="127.0.0.1") as me:
        res = punch(me, [], 1.0, accept=False)
    assert isinstance(res, PunchFailure) and res.code == "no-candidates"
