"""A new user's first hour, end to end with real processes: change settings, one agent per
state directory, ssh config every ssh reads, clear errors.

The network: one server, "labpc" exposing a real sshd, and the client node "laptop".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homeport.testing.deadline import wait_for
from homeport.testing.sshd import SshdServer, make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport, serve_in_threads

pytestmark = pytest.mark.integration

ok, why = sshd_available()
if not ok:
    pytest.skip(f"needs OpenSSH sshd: {why}", allow_module_level=True)


@dataclass
class Net:
    hp: Homeport
    sshd: SshdServer
    web_port: int
    lab: Path
    laptop: Path
    lab_agent: subprocess.Popen[bytes]

    def ssh(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [*self.hp.ssh_args(self.laptop, self.sshd.client_key, self.sshd.user), "labpc"]
        return subprocess.run(
            [*argv, *cmd], capture_output=True, text=True, timeout=timeout, env=self.hp.env
        )

    def nc(self, host: str, port: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*HOMEPORT, "nc", "--state", str(self.laptop), host, port],
            input=data,
            capture_output=True,
            timeout=30,
            env=self.hp.env,
        )

    def set(self, *args: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
        argv = [*HOMEPORT, "set", "--state", str(state or self.lab), *args]
        return self.hp.run(argv, check=False)


def _echo_server() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    serve_in_threads(sock, handle)
    return sock


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("hp1")
    hp = Homeport(root)
    sshd = make_sshd(root / "sshd")
    web = _echo_server()
    try:
        sshd.start()
        hp.start_server()
        lab = hp.up("labpc", "--expose", f"ssh=127.0.0.1:{sshd.port}")
        hp.wait_online("labpc", lab)
        laptop = hp.up("laptop")
        hp.wait_online("laptop", laptop)
        yield Net(hp, sshd, int(web.getsockname()[1]), hp.state("labpc"), hp.state("laptop"), lab)
    finally:
        hp.close()
        sshd.stop()
        web.close()


def test_set_expose_adds_a_service_to_the_running_agent_and_keeps_ssh(net: Net) -> None:
    before = net.nc("labpc", "web", b"hello")
    assert before.returncode != 0  # not exposed yet
    res = net.set("--expose", f"web=127.0.0.1:{net.web_port}")
    assert res.returncode == 0, res.stderr
    assert "applied to the running agent" in res.stderr + res.stdout
    assert "ssh=127.0.0.1" in res.stdout and "web=127.0.0.1" in res.stdout

    def web_works() -> bool:
        return net.nc("labpc", "web", b"hello").stdout == b"hello"

    wait_for(web_works, 20, "web reachable after set --expose")
    assert net.ssh("echo", "still-in").stdout.strip() == "still-in"
    saved = json.loads((net.lab / "node.json").read_text())
    assert sorted(s["name"] for s in saved["services"]) == ["ssh", "web"]


def test_set_refuses_to_drop_ssh_without_force(net: Net) -> None:
    for args in (["--no-ssh"], ["--unexpose", "ssh"]):
        res = net.set(*args)
        assert res.returncode == 2, res
        assert "--force" in res.stderr and "ssh" in res.stderr
    saved = json.loads((net.lab / "node.json").read_text())
    assert "ssh" in [s["name"] for s in saved["services"]]
    assert net.ssh("echo", "ok").returncode == 0


def test_set_unexpose_removes_and_a_typo_is_an_error(net: Net) -> None:
    net.set("--expose", f"tmp=127.0.0.1:{net.web_port}")
    res = net.set("--unexpose", "tmp")
    assert res.returncode == 0, res.stderr
    assert "tmp=" not in res.stdout
    wait_for(lambda: net.nc("labpc", "tmp").returncode != 0, 20, "tmp no longer reachable")
    typo = net.set("--unexpose", "nosuch")
    assert typo.returncode == 2 and "not exposed: nosuch" in typo.stderr


def test_up_with_expose_adds_instead_of_replacing(net: Net, tmp_path: Path) -> None:
    # a second `up` on the same state: refuses to start (the lock), but the
    # services it was given are added to the saved ones, never replacing ssh
    res = net.hp.run(
        [*HOMEPORT, "up", "--state", str(net.lab), "--expose", f"extra=127.0.0.1:{net.web_port}"],
        check=False,
        timeout=30,
    )
    assert res.returncode == 1
    assert "another 'homeport up'" in res.stderr and str(net.lab_agent.pid) in res.stderr
    assert f"server {net.hp.server_addr}" not in res.stderr  # refused before the route line
    saved = json.loads((net.lab / "node.json").read_text())
    assert {"ssh", "extra"} <= {s["name"] for s in saved["services"]}
    assert net.lab_agent.poll() is None  # the first agent is undisturbed
    assert net.hp.node_online("labpc")


def test_client_only_node_does_not_warn_and_offline_nodes_show_no_path(net: Net) -> None:
    log = net.hp.log("agent-laptop")
    assert not [ln for ln in log.splitlines() if "WARNING" in ln and "exposing nothing" in ln]
    res = net.hp.run([*HOMEPORT, "status", "--state", str(net.laptop), "--json"])
    nodes = {n["name"]: n for n in json.loads(res.stdout)["nodes"]}
    assert nodes["labpc"]["online"] and nodes["labpc"]["path"]


def test_set_on_a_client_only_node_applies_at_once(net: Net) -> None:
    res = net.set("--expose", f"web=127.0.0.1:{net.web_port}", state=net.laptop)
    assert res.returncode == 0, res.stderr
    assert "applied to the running agent" in res.stdout
    saved = json.loads((net.laptop / "node.json").read_text())
    assert [s["name"] for s in saved["services"]] == ["web"]
    assert os.stat(net.laptop / "node.json").st_mode & 0o077 == 0


def test_set_without_agent_saves_for_the_next_start(net: Net, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "state"
    shutil.copytree(net.lab, copy, ignore=shutil.ignore_patterns("agent.*"))
    res = net.set("--unexpose", "extra", state=copy)
    assert res.returncode == 0, res.stderr
    assert "no agent runs here now" in res.stderr and "next 'homeport up'" in res.stderr


# -- ssh config that every ssh reads (issue 9 items 5, 6; issue 8 item 3) ---------------


@pytest.fixture(scope="module")
def home(net: Net, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A $HOME whose ~/.ssh/config already has a ``Host *`` that would win if appended to."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "config").write_text(
        "Host *\n    UserKnownHostsFile /dev/null\n    StrictHostKeyChecking ask\n"
    )
    env = {**net.hp.env, "HOME": str(home)}
    for _ in range(2):  # idempotent
        res = subprocess.run(
            [*HOMEPORT, "ssh-config", "--install", "--state", str(net.laptop)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert res.returncode == 0, res.stderr
    config = (home / ".ssh" / "config").read_text()
    assert config.count("homeport.conf") == 1
    assert config.index("homeport.conf") < config.index("Host *")
    return home


def _plain_ssh(net: Net, home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        "ssh", "-F", str(home / ".ssh" / "config"), "-i", str(net.sshd.client_key),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-l", net.sshd.user, *extra,
        "labpc", "echo", "ok",
    ]  # fmt: skip
    env = {**net.hp.env, "HOME": str(home), "HOMEPORT_STATE": str(net.laptop)}
    return subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL
    )


def test_installed_config_lets_plain_ssh_in_despite_a_host_star(net: Net, home: Path) -> None:
    res = _plain_ssh(net, home)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    assert "authenticity" not in res.stderr


def test_proxycommand_one_liner_does_not_prompt_once_installed(net: Net, home: Path) -> None:
    bin_dir = home / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "homeport"
    wrapper.write_text(f'#!/bin/sh\nexec {" ".join(HOMEPORT)} "$@"\n')
    wrapper.chmod(0o755)
    proxy = f"ProxyCommand={wrapper} nc %h %p"
    res = _plain_ssh(net, home, "-o", proxy)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    assert "authenticity" not in res.stderr and "mm_receive_fd" not in res.stderr


def test_paramiko_connects_with_the_installed_config(net: Net, home: Path) -> None:
    paramiko = pytest.importorskip("paramiko")
    assert _plain_ssh(net, home).returncode == 0  # nc has pinned and written the keys
    cfg = paramiko.SSHConfig.from_path(str(home / ".ssh" / "homeport.conf")).lookup("labpc")
    known = str(cfg["userknownhostsfile"]).split()[0]
    assert "%" not in known and Path(known).exists()
    client = paramiko.SSHClient()
    client.load_host_keys(known)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    sock = paramiko.ProxyCommand(cfg["proxycommand"])
    try:
        client.connect(
            "labpc",
            port=22,
            username=net.sshd.user,
            key_filename=str(net.sshd.client_key),
            sock=sock,
            look_for_keys=False,
            allow_agent=False,
            timeout=30,
        )
        _in, out, _err = client.exec_command("echo ok")
        assert out.read().strip() == b"ok"
    finally:
        client.close()


def test_ssh_config_quotes_paths_and_refuses_hostile_names(tmp_path: Path) -> None:
    from homeport.client.ssh import ConfigError, ssh_config_block

    spaced = tmp_path / "my state"
    block = ssh_config_block(["labpc"], spaced, python="/usr/bin/python3")
    assert f'UserKnownHostsFile "{spaced}/ssh_known_hosts"' in block
    for bad in ("labpc\nHost *\n  ProxyCommand touch /tmp/pwned", "*", "a b", "x\x1b[2J"):
        with pytest.raises(ConfigError):
            ssh_config_block(["labpc", bad], tmp_path)
    with pytest.raises(ConfigError):
        ssh_config_block(["labpc"], tmp_path / 'q"uote')


def test_status_escapes_control_characters_from_the_server() -> None:
    from homeport.client.status import render_table
    from homeport.wire.control import NetMap, NodeInfo

    evil = NodeInfo("n2", "lab\x1b]0;owned\x07\nroot", online=False, last_seen=0, fingerprint="")
    table = render_table(NetMap(self_id="n1", nodes=(evil,)))
    assert "\x1b" not in table and "\x07" not in table and table.count("\n") == 2
    assert "lab\\x1b]0;owned\\x07\\x0aroot" in table


def test_forward_to_a_port_the_node_does_not_expose_fails_at_start_with_the_fix(
    net: Net,
) -> None:
    res = net.hp.run(
        [*HOMEPORT, "forward", "--state", str(net.laptop), "0", "labpc:8888"], check=False
    )
    assert res.returncode == 1
    assert "labpc does not expose 8888" in res.stderr
    assert "homeport set --expose NAME=127.0.0.1:8888" in res.stderr
    res = net.hp.run(
        [*HOMEPORT, "forward", "--state", str(net.laptop), "0", "nosuch:22"], check=False
    )
    assert res.returncode == 1 and "no node named 'nosuch'" in res.stderr


def test_first_join_to_something_else_fails_fast_with_the_reason(net: Net, tmp_path: Path) -> None:
    http = socket.socket()
    http.bind(("127.0.0.1", 0))
    http.listen(8)

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    serve_in_threads(http, answer)
    key = net.hp.keys_create()
    try:
        for server, words in (
            (f"127.0.0.1:{http.getsockname()[1]}", "not a homeport server"),
            (f"https://{net.hp.server_addr}", "no https://"),
        ):
            res = net.hp.run(
                [*HOMEPORT, "up", "--state", str(tmp_path / "s"), "--server", server,
                 "--authkey", key, "--name", "newpc"],
                check=False, timeout=30,
            )  # fmt: skip
            assert res.returncode == 1, res
            assert words in res.stderr and "Traceback" not in res.stderr
    finally:
        http.close()


def test_enrolled_node_follows_a_new_server_address_and_refuses_a_silent_rename(
    net: Net, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "state"
    shutil.copytree(net.laptop, copy, ignore=shutil.ignore_patterns("agent.*"))
    res = net.hp.run(
        [*HOMEPORT, "up", "--state", str(copy), "--name", "other"], check=False, timeout=30
    )
    assert res.returncode == 2 and "enrolled as 'laptop'" in res.stderr
    _host, port = net.hp.server_addr.rsplit(":", 1)
    moved = f"localhost:{port}"  # the same server under another name
    proc = net.hp.spawn(
        [*HOMEPORT, "up", "--state", str(copy), "--server", moved, "--ping-interval", "1"],
        "agent-moved",
    )
    try:
        wait_for(
            lambda: json.loads((copy / "node.json").read_text())["server"] == moved,
            20,
            "node.json follows --server",
        )
        wait_for(
            lambda: "connected to localhost" in net.hp.log("agent-moved"),
            30,
            f"agent connects to the new address\n{net.hp.log('agent-moved')}",
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_hung_local_agent_costs_at_most_a_second(net: Net) -> None:
    import signal
    import time

    laptop_agent = next(p for p in net.hp.procs if str(net.laptop) in str(p.args))
    warm = time.monotonic()
    assert net.nc("labpc", "ssh").stdout.startswith(b"SSH-")
    warm = time.monotonic() - warm
    os.kill(laptop_agent.pid, signal.SIGSTOP)
    try:
        cold = time.monotonic()
        res = net.nc("labpc", "ssh")
        cold = time.monotonic() - cold
    finally:
        os.kill(laptop_agent.pid, signal.SIGCONT)
    assert res.stdout.startswith(b"SSH-"), res.stderr  # it dialled by itself
    assert cold < 1.0 + 3.0, f"hung agent cost {cold:.1f}s (warm {warm:.2f}s)"


def test_agent_picks_up_an_sshd_that_starts_after_it(net: Net, tmp_path: Path) -> None:
    late = make_sshd(tmp_path / "late-sshd")  # port chosen, not started yet
    agent = net.hp.up(
        "latepc", "--expose", f"ssh=127.0.0.1:{late.port}", "--hostkey-refresh", "0.5"
    )
    try:
        net.hp.wait_online("latepc", agent)
        late.start()
        ed25519 = next(p for p in late.host_key_pubs if "ed25519" in p.name).read_text().split()[1]
        wait_for(
            lambda: "sshd host keys changed" in net.hp.log("agent-latepc"),
            30,
            f"agent re-reads the late sshd's keys\n{net.hp.log('agent-latepc')}",
        )
        argv = [*net.hp.ssh_args(net.laptop, late.client_key, late.user), "latepc", "echo", "ok"]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=net.hp.env)
        assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
        assert ed25519 in (net.laptop / "ssh_known_hosts").read_text()
    finally:
        agent.terminate()
        agent.wait(timeout=10)
        late.stop()
