"""End to end on loopback: real server, real agents, real OpenSSH sshd and ssh.

The network: one homeport server, the agent "labpc" exposing a real sshd (and two
small test services), and the client node "laptop". Everything a user would type
is run as a subprocess of the real CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homeport.testing.deadline import wait_for
from homeport.testing.sshd import SshdServer, make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport, free_port, serve_in_threads

pytestmark = pytest.mark.integration

ok, why = sshd_available()
if not ok:
    pytest.skip(f"needs OpenSSH sshd: {why}", allow_module_level=True)


class EchoServer:
    """A TCP service on 127.0.0.1 that echoes (or, as a sink, records) what it gets."""

    def __init__(self, sink: bool = False) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.sink = sink
        self.received: list[bytes] = []
        self.done = threading.Event()
        serve_in_threads(self.sock, self._handle)

    def _handle(self, conn: socket.socket) -> None:
        got = bytearray()
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                if self.sink:
                    got += data
                else:
                    conn.sendall(data)
        self.received.append(bytes(got))
        self.done.set()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Net:
    hp: Homeport
    sshd: SshdServer
    echo: EchoServer
    sink: EchoServer
    laptop: Path
    lab_agent: subprocess.Popen[bytes]

    def ssh(
        self, *cmd: str, state: Path | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = [
            *self.hp.ssh_args(state or self.laptop, self.sshd.client_key, self.sshd.user),
            "labpc",
            *cmd,
        ]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=self.hp.env
        )

    def nc(
        self, host: str, port: str, stdin: bytes = b"", state: Path | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*HOMEPORT, "nc", "--state", str(state or self.laptop), host, port],
            input=stdin,
            capture_output=True,
            timeout=30,
            env=self.hp.env,
        )


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("hp")
    hp = Homeport(root)
    sshd = make_sshd(root / "sshd")
    echo, sink = EchoServer(), EchoServer(sink=True)
    try:
        sshd.start()
        hp.start_server()
        lab = hp.up(
            "labpc",
            "--expose",
            f"ssh=127.0.0.1:{sshd.port}",
            "--expose",
            f"echo=127.0.0.1:{echo.port}",
            "--expose",
            f"sink=127.0.0.1:{sink.port}",
        )
        hp.wait_online("labpc", lab)
        laptop = hp.up("laptop")
        hp.wait_online("laptop", laptop)
        yield Net(hp, sshd, echo, sink, hp.state("laptop"), lab)
    finally:
        hp.close()
        sshd.stop()
        echo.close()
        sink.close()


def test_ssh_echo_ok_with_pinned_host_key(net: Net) -> None:
    res = net.ssh("echo", "ok")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    # the host key ssh verified came from the server, written by nc
    pinned = (net.laptop / "known_hosts" / "labpc").read_text()
    ed25519 = next(p for p in net.sshd.host_key_pubs if "ed25519" in p.name).read_text().split()[1]
    assert ed25519 in pinned


def test_homeport_ssh_command(net: Net) -> None:
    res = net.hp.run(
        [
            *HOMEPORT,
            "ssh",
            "--state",
            str(net.laptop),
            "labpc",
            "-i",
            str(net.sshd.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-l",
            net.sshd.user,
            "echo",
            "via-homeport-ssh",
        ],
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "via-homeport-ssh"


def test_scp_50mb_arrives_byte_identical(net: Net, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(50 * 1024 * 1024))
    dst = tmp_path / "copy.bin"
    scp = [
        *net.hp.scp_args(net.laptop, net.sshd.client_key),
        str(src),
        f"{net.sshd.user}@labpc:{dst}",
    ]
    res = subprocess.run(scp, capture_output=True, text=True, timeout=120, env=net.hp.env)
    assert res.returncode == 0, res.stderr
    assert (
        hashlib.sha256(dst.read_bytes()).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
    )


def test_nc_echo_service_round_trip_and_half_close(net: Net) -> None:
    payload = os.urandom(300_000)
    res = net.nc("labpc", "echo", stdin=payload)
    assert res.returncode == 0, res.stderr
    assert res.stdout == payload  # echoed in full after our EOF: half-close works both ways


def test_forward_tcp_service(net: Net) -> None:
    port = free_port()
    net.hp.spawn(
        [
            *HOMEPORT,
            "forward",
            "--json",
            "--state",
            str(net.laptop),
            str(port),
            f"labpc:{net.echo.port}",
        ],
        "forward",
    )
    # The forwarder reports "listening" once its socket accepts: wait for that event,
    # then connect exactly once (no retrying until something happens to work).
    wait_for(lambda: '"event": "listening"' in net.hp.log("forward"), 20, "forward listening")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"hello through forward")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data == b"hello through forward"
    wait_for(lambda: '"event": "closed"' in net.hp.log("forward"), 20, "the closed event")
    assert '"ok": true' in net.hp.log("forward"), net.hp.log("forward")


def test_status_json_shows_nodes(net: Net) -> None:
    import json

    out = net.hp.run([*HOMEPORT, "status", "--state", str(net.laptop), "--json"]).stdout
    data = json.loads(out)
    nodes = data["nodes"] if isinstance(data, dict) else data
    lab = next(n for n in nodes if n["name"] == "labpc")
    assert lab["online"] is True
    assert {"ssh", "echo", "sink"} <= {
        s["name"] if isinstance(s, dict) else s for s in lab["services"]
    }


# -- negative paths -----------------------------------------------------------


def test_unknown_node_is_a_clear_error(net: Net) -> None:
    res = net.nc("nosuchnode", "22")
    assert res.returncode != 0
    err = res.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "nosuchnode" in err and "no node named" in err, err


def test_service_not_exposed_is_refused(net: Net) -> None:
    res = net.nc("labpc", "3306")
    assert res.returncode != 0
    err = res.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "expose" in err.lower(), err


def test_wrong_auth_key_is_refused(net: Net) -> None:
    good = net.hp.keys_create()
    parts = good.split("_")
    parts[2] = ("0" if parts[2][0] != "0" else "1") + parts[2][1:]
    proc = net.hp.up("mallory", key="_".join(parts))
    assert proc.wait(timeout=30) != 0
    assert "invalid" in net.hp.log("agent-mallory").lower()


def test_used_auth_key_is_refused(net: Net) -> None:
    key = net.hp.keys_create()
    first = net.hp.up("once1", key=key)
    net.hp.wait_online("once1", first)
    second = net.hp.up("once2", key=key)
    assert second.wait(timeout=30) != 0
    assert "used" in net.hp.log("agent-once2").lower()


def test_expired_auth_key_is_refused(net: Net) -> None:
    """A key whose expiry has passed: made by injecting an admin clock an hour in the
    past (no waiting for a real expiry), through the same database the server uses."""
    import time

    from homeport.server.admin import AdminOps
    from homeport.server.datadir import open_offline_registry

    registry = open_offline_registry(net.hp.data_dir)
    try:
        an_hour_ago = time.time() - 3600
        answer = AdminOps(registry, clock=lambda: an_hour_ago).handle(
            {"op": "keys.create", "expiry_seconds": 60}
        )
    finally:
        registry.close()
    assert answer["ok"] and answer["expires_at"] < time.time(), answer
    key = str(answer["key"])
    proc = net.hp.up("late", key=key)
    assert proc.wait(timeout=30) != 0
    assert "expired" in net.hp.log("agent-late").lower()


def test_reusable_key_enrolls_twice(net: Net) -> None:
    key = net.hp.keys_create("--reusable")
    a = net.hp.up("multi1", key=key)
    b = net.hp.up("multi2", key=key)
    net.hp.wait_online("multi1", a)
    net.hp.wait_online("multi2", b)


def test_removed_node_is_cut_off_with_its_open_streams(net: Net) -> None:
    """Removing a node closes its live stream at once, and it cannot come back."""
    key = net.hp.keys_create()
    victim = net.hp.up("victim", key=key)
    net.hp.wait_online("victim", victim)
    state = net.hp.state("victim")
    # a long-lived stream from the victim to labpc's echo service
    nc = subprocess.Popen(
        [*HOMEPORT, "nc", "--state", str(state), "labpc", "echo"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=net.hp.env,
    )
    try:
        assert nc.stdin is not None and nc.stdout is not None
        nc.stdin.write(b"ping\n")
        nc.stdin.flush()
        assert nc.stdout.readline() == b"ping\n"  # the stream is up
        net.hp.run([*HOMEPORT, "nodes", "remove", "--data", str(net.hp.data_dir), "victim"])
        nc.wait(timeout=10)  # cut off at once, although stdin is still open
        assert victim.wait(timeout=10) != 0
        assert "removed" in net.hp.log("agent-victim").lower()
    finally:
        if nc.poll() is None:
            nc.kill()
            nc.wait()
    res = net.nc("labpc", "echo", state=state)
    assert res.returncode != 0 and b"removed" in res.stderr.lower()


class BitFlipper:
    """A TCP proxy in front of the server that flips one bit in data connections.

    Control connections (TLS, first byte 0x16) pass untouched. In data connections
    (first byte 'H'), the byte at offset ``at`` of the client→server direction is
    flipped: a relay that tampers with ciphertext.
    """

    def __init__(self, upstream: str, at: int) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.at = at
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.flipped = threading.Event()
        serve_in_threads(self.sock, self._proxy)

    def _proxy(self, c: socket.socket) -> None:
        u = socket.create_connection(self.upstream)
        threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()
        self._pipe(c, u, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream_dir: bool) -> None:
        seen = 0
        is_data: bool | None = None
        try:
            while data := src.recv(65536):
                buf = bytearray(data)
                if is_data is None:
                    is_data = buf[0] == ord("H")
                if upstream_dir and is_data and seen <= self.at < seen + len(buf):
                    buf[self.at - seen] ^= 0x01
                    self.flipped.set()
                seen += len(buf)
                dst.sendall(buf)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                src.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        self.sock.close()


def test_relay_that_flips_a_bit_breaks_the_stream_and_delivers_nothing_altered(net: Net) -> None:
    flipper = BitFlipper(net.hp.server_addr, at=200_000)
    try:
        node = net.hp.up("tamper-victim", server=flipper.addr)
        net.hp.wait_online("tamper-victim", node)
        payload = os.urandom(1_000_000)
        before = len(net.sink.received)
        net.sink.done.clear()
        res = net.nc("labpc", "sink", stdin=payload, state=net.hp.state("tamper-victim"))
        assert flipper.flipped.is_set()
        assert res.returncode != 0, "a tampered stream must fail"
        wait_for(lambda: len(net.sink.received) > before, 10, "sink connection closed")
        got = net.sink.received[-1]
        assert len(got) < len(payload)
        assert got == payload[: len(got)], "altered bytes were delivered"
    finally:
        flipper.close()
