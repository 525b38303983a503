"""The warm-agent fast path end to end: real server, agents, sshd, ssh and scp.

The network: a server, "labpc" exposing a real sshd and an echo service, "laptop"
whose agent runs (nc takes the fast path through its ``agent.sock``), and "bare",
enrolled but with its agent stopped (nc dials by itself). ssh runs with
``ProxyUseFdpass yes``, as ``homeport ssh`` and ``ssh-config`` configure it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homeport.io.localapi import MAX_REQUEST, SOCKET_NAME
from homeport.testing.deadline import wait_for
from homeport.testing.sshd import SshdServer, make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport, serve_in_threads

pytestmark = pytest.mark.integration

ok, why = sshd_available()
if not ok:
    pytest.skip(f"needs OpenSSH sshd: {why}", allow_module_level=True)

OPENED = "local stream "  # the laptop agent's log line for a stream it opened for nc


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


@dataclass
class Net:
    hp: Homeport
    sshd: SshdServer
    laptop: Path  # agent running: fast path
    bare: Path  # agent stopped: direct path
    laptop_agent: subprocess.Popen[bytes]

    def ssh(self, state: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
        argv = [*self.hp.ssh_args(state, self.sshd.client_key, self.sshd.user), "labpc", *cmd]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=self.hp.env)

    def nc(
        self, state: Path, host: str, port: str, stdin: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        argv = [*HOMEPORT, "nc", "--state", str(state), host, port]
        return subprocess.run(argv, input=stdin, capture_output=True, timeout=30, env=self.hp.env)

    def opened(self) -> int:
        """Streams the laptop agent opened for a local client so far."""
        log = self.hp.log("agent-laptop")
        return sum(1 for line in log.splitlines() if OPENED in line and " opened " in line)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("hpl")
    hp = Homeport(root)
    sshd = make_sshd(root / "sshd")
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen(16)
    serve_in_threads(echo, _echo)
    try:
        sshd.start()
        hp.start_server()
        lab = hp.up(
            "labpc",
            "--expose",
            f"ssh=127.0.0.1:{sshd.port}",
            "--expose",
            f"echo=127.0.0.1:{echo.getsockname()[1]}",
        )
        hp.wait_online("labpc", lab)
        laptop = hp.up("laptop")
        hp.wait_online("laptop", laptop)
        bare = hp.up("bare")
        hp.wait_online("bare", bare)
        bare.send_signal(signal.SIGTERM)
        assert bare.wait(timeout=10) == 0
        wait_for((hp.state("laptop") / SOCKET_NAME).exists, 10, "laptop agent.sock")
        assert not (hp.state("bare") / SOCKET_NAME).exists(), "a stopped agent removes its socket"
        yield Net(hp, sshd, hp.state("laptop"), hp.state("bare"), laptop)
    finally:
        hp.close()
        sshd.stop()
        echo.close()


def _nc_processes(state: Path) -> list[int]:
    """PIDs of nc processes (or their forked pumps) running for ``state``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"ncfast.py") for a in argv) and str(state).encode() in argv:
            pids.append(int(entry.name))
    return pids


def _assert_no_nc_left(state: Path) -> None:
    wait_for(lambda: not _nc_processes(state), 10, f"nc processes of {state} to exit")


def test_ssh_goes_through_the_warm_agent(net: Net) -> None:
    before = net.opened()
    res = net.ssh(net.laptop, "echo", "ok")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    wait_for(lambda: net.opened() == before + 1, 10, "the laptop agent's local stream log")
    assert "to labpc:22 opened" in net.hp.log("agent-laptop")
    _assert_no_nc_left(net.laptop)


def test_nc_copies_through_the_agent_without_fdpass(net: Net) -> None:
    before = net.opened()
    payload = os.urandom(300_000)
    res = net.nc(net.laptop, "labpc", "echo", stdin=payload)
    assert res.returncode == 0, res.stderr
    assert res.stdout == payload  # echoed in full after our EOF: half-close both ways
    assert net.opened() == before + 1


@pytest.mark.parametrize(
    ("host", "port", "words"),
    [("nosuchnode", "22", "no node named"), ("labpc", "3306", "expose")],
)
def test_fast_path_errors_are_the_direct_paths_one_line(
    net: Net, host: str, port: str, words: str
) -> None:
    fast = net.nc(net.laptop, host, port)
    direct = net.nc(net.bare, host, port)
    assert fast.returncode == direct.returncode == 1
    line = fast.stderr.decode()
    assert (
        line.count("\n") == 1
        and line.startswith("homeport nc: ")
        and host in line
        and words in line
    )
    assert fast.stderr == direct.stderr
    assert f"local open of {host}:{port} failed" in net.hp.log("agent-laptop")


def test_fallback_without_agent_through_fdpass(net: Net, tmp_path: Path) -> None:
    """No agent: nc dials itself, forks a pump and still hands ssh a descriptor."""
    res = net.ssh(net.bare, "echo", "direct")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "direct"
    _assert_no_nc_left(net.bare)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(50 * 1024 * 1024))
    dst = tmp_path / "copy.bin"
    scp = [
        *net.hp.scp_args(net.bare, net.sshd.client_key),
        str(src),
        f"{net.sshd.user}@labpc:{dst}",
    ]
    res2 = subprocess.run(scp, capture_output=True, text=True, timeout=120, env=net.hp.env)
    assert res2.returncode == 0, res2.stderr
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    _assert_no_nc_left(net.bare)


def test_stale_socket_of_a_killed_agent_means_direct_dial(net: Net) -> None:
    path = net.bare / SOCKET_NAME
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # what an agent killed with SIGKILL leaves behind
    try:
        res = net.ssh(net.bare, "echo", "ok")
        assert res.returncode == 0, res.stderr
    finally:
        path.unlink()
    _assert_no_nc_left(net.bare)


def _ask(path: Path, payload: bytes) -> dict[str, object] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = s.makefile("rb").readline()
    return dict(json.loads(data)) if data else None


def test_malformed_local_requests_do_not_hurt_the_agent(net: Net) -> None:
    path = net.laptop / SOCKET_NAME
    for payload in (
        b"garbage\n",
        b"{}\n",
        b"\xff\xfe\x00\n",
        b'{"op":"open","dst":"../../etc","service":"22"}\n',
        b'{"op":"open","dst":"labpc","service":"22","timeout":-1}\n',
        b"x" * (MAX_REQUEST * 4),
        b'{"op":"open"',  # no newline, then EOF
        b"",
    ):
        reply = _ask(path, payload)
        assert reply is not None, payload
        assert reply["ok"] is False and reply["code"] in ("bad-request", "unknown-op"), reply
    assert net.laptop_agent.poll() is None
    before = net.opened()
    res = net.ssh(net.laptop, "echo", "still-ok")
    assert res.returncode == 0 and res.stdout.strip() == "still-ok", res.stderr
    assert net.opened() == before + 1


def test_agent_sock_is_private(net: Net) -> None:
    mode = os.stat(net.laptop / SOCKET_NAME).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(net.laptop).st_mode) == 0o700
