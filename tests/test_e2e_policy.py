"""End to end: the ACL policy with a real server, real agents and ``homeport nc``.

Selectors here are node names (users and tags come with the identity work).
The network: ``labpc`` exposes an echo service; ``laptop`` is allowed by the
policy, ``intruder`` is not.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homeport.testing.deadline import wait_for
from tests.harness import HOMEPORT, Homeport, free_port, serve_in_threads

pytestmark = pytest.mark.integration

ALLOW_LAPTOP = """{
  // only the laptop may reach the lab PC
  "hosts": {"lab": "labpc"},
  "acls": [{"action": "accept", "src": ["laptop"], "dst": ["lab:*"]}],
  "tests": [{"src": "laptop", "accept": ["labpc:22"], "deny": ["laptop:22"]}],
}
"""
DENY_ALL = '{"acls": []}\n'
BAD = """{
  "acls": [
    {"action": "accept", "src": ["laptop"], "dst": ["labpc:*"], "ports": []},
  ],
}
"""


def echo_server() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    serve_in_threads(sock, handle)
    return sock


@dataclass
class Net:
    hp: Homeport
    echo_port: int
    root: Path

    def policy(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.hp.run(
            [*HOMEPORT, "policy", *args, "--data", str(self.hp.data_dir)], check=check
        )

    def policy_file(self, name: str, text: str) -> str:
        path = self.root / name
        path.write_text(text)
        return str(path)

    def nc(self, node: str, stdin: bytes = b"ping\n") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*HOMEPORT, "nc", "--state", str(self.hp.state(node)), "labpc", "echo"],
            input=stdin,
            capture_output=True,
            timeout=30,
            env=self.hp.env,
        )


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("hp-policy")
    hp = Homeport(root)
    echo = echo_server()
    port = int(echo.getsockname()[1])
    try:
        hp.start_server()
        lab = hp.up("labpc", "--expose", f"echo=127.0.0.1:{port}")
        hp.wait_online("labpc", lab)
        for name in ("laptop", "intruder"):
            proc = hp.up(name)
            hp.wait_online(name, proc)
        yield Net(hp, port, root)
    finally:
        hp.close()
        echo.close()


def test_policy_lifecycle_refusal_and_live_cut(net: Net) -> None:
    # without a policy both nodes reach the exposed service
    assert net.nc("intruder").stdout == b"ping\n"
    # a bad policy is refused with its position and path; nothing changes
    bad = net.policy("set", net.policy_file("bad.hujson", BAD), check=False)
    assert bad.returncode == 1
    assert "bad.hujson:3:65: acls[0].ports: unknown field 'ports'" in bad.stderr, bad.stderr
    assert "policy in force is unchanged" in bad.stderr
    assert "no policy" in net.policy("get").stderr
    # a good one is in force at once, and stored
    ok = net.policy("set", net.policy_file("good.hujson", ALLOW_LAPTOP))
    assert "in force" in ok.stdout
    assert net.policy("get").stdout == ALLOW_LAPTOP
    assert (net.hp.data_dir / "policy.hujson").stat().st_mode & 0o777 == 0o600
    # the denied source gets one clear line from nc; the allowed one gets through
    denied = net.nc("intruder")
    assert denied.returncode != 0 and denied.stdout == b""
    err = denied.stderr.decode().strip()
    assert len(err.splitlines()) == 1, err
    assert f"denied by policy: no rule lets intruder reach labpc:{net.echo_port}" in err, err
    assert net.nc("laptop").stdout == b"ping\n"
    # explain says the same, with the deciding rule
    explained = json.loads(net.policy("explain", "laptop", "labpc:echo", "--json").stdout)
    assert (explained["verdict"], explained["rule"]) == ("allow", "acls[0]")
    text = net.policy("explain", "intruder", f"labpc:{net.echo_port}").stdout
    assert text.startswith("deny  (rule default-deny)  denied by policy"), text

    # a live stream that a new policy denies ends within 5 s
    nc = subprocess.Popen(
        [*HOMEPORT, "nc", "--state", str(net.hp.state("laptop")), "labpc", "echo"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=net.hp.env,
    )
    try:
        assert nc.stdin is not None and nc.stdout is not None
        nc.stdin.write(b"hello\n")
        nc.stdin.flush()
        assert nc.stdout.readline() == b"hello\n"
        net.policy("set", net.policy_file("deny.hujson", DENY_ALL))
        wait_for(lambda: nc.poll() is not None, 5.0, "the denied live stream to end")
    finally:
        if nc.poll() is None:
            nc.kill()
        nc.wait()
    assert net.nc("laptop").returncode != 0


def test_a_bad_policy_file_stops_the_server_at_start(tmp_path: Path) -> None:
    data = tmp_path / "server"
    data.mkdir(mode=0o700)
    (data / "policy.hujson").write_text(BAD)
    res = subprocess.run(
        [*HOMEPORT, "server", "--data", str(data), "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert "cannot start" in res.stderr
    assert "policy.hujson:3:65: acls[0].ports: unknown field 'ports'" in res.stderr, res.stderr
