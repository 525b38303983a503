"""Issue 9 (A4, A7, B1, B4) end to end with real processes and real OpenSSH.

One network ("home"): a server, "labpc" exposing a real sshd, and the client
node "laptop". Tests that need a second network start their own server.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homeport.testing.deadline import wait_for
from homeport.testing.sshd import SshdServer, make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport

pytestmark = pytest.mark.integration

ok, why = sshd_available()
if not ok:
    pytest.skip(f"needs OpenSSH sshd: {why}", allow_module_level=True)


@dataclass
class Net:
    hp: Homeport
    sshd: SshdServer
    lab: Path
    laptop: Path
    home: Path  # a $HOME for ssh-config --install
    keys: list[Path]  # client keys the sshds accept (the work network's sshd adds one)

    def env(self, **extra: str) -> dict[str, str]:
        return {**self.hp.env, "HOME": str(self.home), **extra}

    def homeport(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*HOMEPORT, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.env(),
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def plain_ssh(
        self, config: Path, host: str, *cmd: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        keys = [a for k in self.keys for a in ("-i", str(k))]
        argv = [
            "ssh", "-F", str(config), *keys, "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-l", self.sshd.user, host, *cmd,
        ]  # fmt: skip
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env or self.env(),
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("hpprof")
    hp = Homeport(root)
    sshd = make_sshd(root / "sshd")
    home = root / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    try:
        sshd.start()
        hp.start_server()
        lab = hp.up("labpc", "--expose", f"ssh=127.0.0.1:{sshd.port}")
        hp.wait_online("labpc", lab)
        laptop = hp.up("laptop")
        hp.wait_online("laptop", laptop)
        yield Net(hp, sshd, hp.state("labpc"), hp.state("laptop"), home, [sshd.client_key])
    finally:
        hp.close()
        sshd.stop()


# -- A7: one clean line -----------------------------------------------------------------


def _config(net: Net, tmp_path: Path, *names: str, extra: tuple[str, ...] = ()) -> Path:
    res = net.homeport("ssh-config", "--state", str(net.laptop), *extra, *names)
    assert res.returncode == 0, res.stderr
    path = tmp_path / "config"
    path.write_text(res.stdout)
    return path


def test_plain_ssh_failure_is_one_line_without_openssh_noise(net: Net, tmp_path: Path) -> None:
    config = _config(net, tmp_path, "labpc", "laptop", "nosuch")
    ok = net.plain_ssh(config, "labpc", "echo", "ok")
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
    for host, expect in (("nosuch", "no node named 'nosuch'"), ("laptop", "does not expose")):
        res = net.plain_ssh(config, host, "true")
        assert res.returncode == 255
        lines = res.stderr.splitlines()
        assert len(lines) == 1, res.stderr
        assert expect in lines[0] and lines[0].startswith("homeport nc: ")
        assert f"{host}: {host}" not in lines[0]  # the name is not doubled


def test_without_precheck_openssh_adds_its_two_lines(net: Net, tmp_path: Path) -> None:
    # what --no-precheck (and an agent that cannot tell) leaves: the reason, then the noise
    config = _config(net, tmp_path, "nosuch", extra=("--no-precheck",))
    res = net.plain_ssh(config, "nosuch", "true")
    assert res.returncode == 255
    assert "no node named 'nosuch'" in res.stderr.splitlines()[0]
    assert "proxy dialer did not pass back a connection" in res.stderr


def test_homeport_ssh_to_an_unknown_node_does_not_start_ssh(net: Net, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "ssh-ran"
    fake = bin_dir / "ssh"
    fake.write_text(f'#!/bin/sh\necho "$@" > {marker}\n')
    fake.chmod(0o755)
    env = net.env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    res = net.homeport("ssh", "--state", str(net.laptop), "--no-cert", "nosuch", "true", env=env)
    assert res.returncode == 255
    assert res.stderr.strip().splitlines() == [
        "homeport: nosuch: no node named 'nosuch' that this node can reach (see: homeport status)"
    ]
    assert not marker.exists()
    # the check passes for a reachable node: the (fake) ssh is started
    res = net.homeport("ssh", "--state", str(net.laptop), "--no-cert", "labpc", "true", env=env)
    assert res.returncode == 0, res.stderr
    assert marker.read_text().split()[-2:] == ["labpc", "true"]


def test_homeport_ssh_checks_through_the_server_without_an_agent(net: Net, tmp_path: Path) -> None:
    copy = tmp_path / "state"
    shutil.copytree(net.laptop, copy, ignore=shutil.ignore_patterns("agent.*"))
    res = net.homeport("ssh", "--state", str(copy), "--no-cert", "laptop", "true")
    assert res.returncode == 255
    assert res.stderr.strip() == "homeport: laptop does not expose '22' (exposed: nothing)"


def test_installed_config_checks_first_and_stays_portable(net: Net) -> None:
    pi = net.hp.up("pi")  # exposes nothing: ssh to it must fail with one line
    net.hp.wait_online("pi", pi)
    res = net.homeport("ssh-config", "--install", "--state", str(net.laptop))
    assert res.returncode == 0, res.stderr
    ssh_dir = net.home / ".ssh"
    conf = (ssh_dir / "homeport.conf").read_text()
    assert conf.startswith(f"Include {ssh_dir / 'homeport-check.conf'}\n")
    assert "Match" not in conf  # paramiko reads homeport.conf and ignores the Include
    assert "Match originalhost labpc,pi !exec" in (ssh_dir / "homeport-check.conf").read_text()
    assert f"'Include {ssh_dir / 'homeport.conf'}'" in res.stdout  # the line actually written
    config = ssh_dir / "config"
    assert net.plain_ssh(config, "labpc", "echo", "ok").stdout.strip() == "ok"
    res = net.plain_ssh(config, "pi", "true")
    assert res.returncode == 255
    assert res.stderr.splitlines() == ["homeport nc: pi does not expose '22' (exposed: nothing)"]


# -- A4: move to a new server address, rename --------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, net: Net) -> Iterator[Homeport]:
    """A second, unrelated network ("work") whose "labpc" exposes an sshd of its own
    (the same user and key as the home one; its port tells them apart)."""
    root = tmp_path_factory.mktemp("hpwork")
    hp = Homeport(root)
    sshd = make_sshd(root / "sshd")
    try:
        sshd.start()
        hp.start_server()
        lab = hp.up("labpc", "--expose", f"ssh=127.0.0.1:{sshd.port}")
        hp.wait_online("labpc", lab)
        net.keys.append(sshd.client_key)
        hp.sshd_port = sshd.port  # type: ignore[attr-defined]
        yield hp
    finally:
        hp.close()
        sshd.stop()


def _copy_state(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("agent.*"))
    return dst


def _saved(state: Path) -> dict[str, object]:
    return dict(json.loads((state / "node.json").read_text()))


def test_set_server_verifies_the_network_before_saving(
    net: Net, work: Homeport, tmp_path: Path
) -> None:
    copy = _copy_state(net.laptop, tmp_path / "state")
    other = net.homeport("set", "--state", str(copy), "--server", work.server_addr)
    assert other.returncode == 2, other
    assert "is not this node's network" in other.stderr and "not saved" in other.stderr
    assert _saved(copy)["server"] == net.hp.server_addr
    _host, port = net.hp.server_addr.rsplit(":", 1)
    moved = f"localhost:{port}"  # the same server under another name
    res = net.homeport("set", "--state", str(copy), "--server", moved)
    assert res.returncode == 0, res.stderr
    assert f"server {net.hp.server_addr} -> {moved} (same network, saved)" in res.stdout
    assert _saved(copy)["server"] == moved
    # the same check guards `up --server` on an enrolled node
    res = net.homeport("up", "--state", str(copy), "--server", work.server_addr, timeout=30)
    assert res.returncode == 2 and "is not this node's network" in res.stderr
    assert _saved(copy)["server"] == moved


def test_rename_is_done_by_the_server_and_the_node_follows(net: Net) -> None:
    res = net.homeport("set", "--state", str(net.laptop), "--name", "newname")
    assert res.returncode == 2
    assert "homeport nodes rename laptop newname" in res.stderr
    pi = net.hp.up("pi2", "--expose", f"ssh=127.0.0.1:{net.sshd.port}")
    net.hp.wait_online("pi2", pi)
    nouser = net.homeport("keys", "create", "--user", "nobody", "--data", str(net.hp.data_dir))
    assert nouser.returncode != 0 and "bad request" not in nouser.stderr
    assert "no user 'nobody'" in nouser.stderr
    taken = net.homeport("nodes", "rename", "pi2", "labpc", "--data", str(net.hp.data_dir))
    assert taken.returncode != 0 and "already called 'labpc'" in taken.stderr
    res = net.homeport("nodes", "rename", "pi2", "berry", "--data", str(net.hp.data_dir))
    assert res.returncode == 0, res.stderr
    state = net.hp.state("pi2")
    wait_for(lambda: _saved(state)["name"] == "berry", 30, "the node saves its new name")
    wait_for(lambda: net.hp.node_online("berry"), 30, "berry online")
    names = {n["name"] for n in net.hp.nodes()}
    assert "berry" in names and "pi2" not in names
    # peers reach it under the new name at once (the laptop's agent got the map push)
    config = _config(net, Path(net.home), "berry")
    ok = net.plain_ssh(config, "berry", "echo", "ok")
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr


# -- B1: several networks (profiles) ------------------------------------------------------


def _server_port(res: subprocess.CompletedProcess[str]) -> int:
    """The sshd port a session reached (the last word of $SSH_CONNECTION)."""
    assert res.returncode == 0, res.stderr
    return int(res.stdout.split()[-1])


@pytest.fixture(scope="module")
def laptop_work(net: Net, work: Homeport) -> Iterator[Path]:
    """The laptop joins "work" as a second profile; its agent runs beside the home one."""
    proc = net.hp.spawn(
        [*HOMEPORT, "up", "--state", str(net.laptop), "--profile", "work",
         "--server", work.server_addr, "--authkey", work.keys_create(), "--name", "laptop"],
        "agent-laptop-work",
    )  # fmt: skip
    work.wait_online("laptop", timeout=60)
    assert proc.poll() is None, net.hp.log("agent-laptop-work")
    yield net.laptop / "profiles" / "work"
    proc.terminate()
    proc.wait(timeout=10)


def test_two_profiles_run_side_by_side_and_list(
    net: Net, work: Homeport, laptop_work: Path
) -> None:
    assert (laptop_work / "node.json").exists() and (net.laptop / "node.json").exists()
    assert net.hp.node_online("laptop")  # the home agent was not disturbed
    res = net.homeport("profiles", "--state", str(net.laptop), "--json")
    rows = {r["profile"]: r for r in json.loads(res.stdout)["profiles"]}
    assert rows["default"]["default"] and not rows["work"]["default"]
    assert rows["work"]["server"] == work.server_addr and rows["work"]["agent"]
    assert rows["default"]["server"] == net.hp.server_addr and rows["default"]["agent"]
    # a second agent on the same profile refuses (the lock is per profile)
    again = net.homeport("up", "--state", str(net.laptop), "--profile", "work", timeout=30)
    assert again.returncode == 1 and "another 'homeport up'" in again.stderr
    # --profile and $HOMEPORT_PROFILE pick the network for every command
    for args, env in (
        (["--profile", "work"], None),
        ([], net.env(HOMEPORT_PROFILE="work")),
    ):
        res = net.homeport("status", "--state", str(net.laptop), "--json", *args, env=env)
        assert res.returncode == 0, res.stderr
        assert {n["name"] for n in json.loads(res.stdout)["nodes"]} == {"labpc", "laptop"}
    bad = net.homeport("status", "--state", str(net.laptop), "--profile", "../x")
    assert bad.returncode == 2 and "bad profile name" in bad.stderr


def test_ssh_names_resolve_per_profile(net: Net, work: Homeport, laptop_work: Path) -> None:
    home_port, work_port = net.sshd.port, work.sshd_port  # type: ignore[attr-defined]
    keys = [a for k in net.keys for a in ("-i", str(k))]
    where = ["echo", "$SSH_CONNECTION"]

    def hp_ssh(name: str) -> subprocess.CompletedProcess[str]:
        return net.homeport(
            "ssh", "--state", str(net.laptop), "--no-cert", name, *keys,
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-l", net.sshd.user, *where,
        )  # fmt: skip

    assert _server_port(hp_ssh("labpc")) == home_port
    assert _server_port(hp_ssh("labpc.work")) == work_port
    assert _server_port(hp_ssh("labpc.default")) == home_port
    res = net.homeport("ssh-config", "--install", "--state", str(net.laptop))
    assert res.returncode == 0, res.stderr
    config = net.home / ".ssh" / "config"
    assert _server_port(net.plain_ssh(config, "labpc", *where)) == home_port
    assert _server_port(net.plain_ssh(config, "labpc.work", *where)) == work_port
    # switch: bare names follow the default profile (after ssh-config --install)
    res = net.homeport("switch", "--state", str(net.laptop), "work")
    assert res.returncode == 0 and "ssh-config --install" in res.stdout, res.stderr
    try:
        assert _server_port(hp_ssh("labpc")) == work_port
        assert net.homeport("ssh-config", "--install", "--state", str(net.laptop)).returncode == 0
        assert _server_port(net.plain_ssh(config, "labpc", *where)) == work_port
        assert _server_port(net.plain_ssh(config, "labpc.default", *where)) == home_port
        status = net.homeport("status", "--state", str(net.laptop), "--json")
        assert {n["name"] for n in json.loads(status.stdout)["nodes"]} == {"labpc", "laptop"}
        nosuch = net.plain_ssh(config, "nosuch.work", "true")  # not a host of ours: plain ssh
        assert nosuch.returncode == 255
    finally:
        assert net.homeport("switch", "--state", str(net.laptop), "default").returncode == 0
        net.homeport("ssh-config", "--install", "--state", str(net.laptop))


def test_the_one_line_proxycommand_understands_name_dot_profile(
    net: Net, work: Homeport, laptop_work: Path, tmp_path: Path
) -> None:
    """``ssh -o ProxyCommand='homeport nc %h %p' labpc.work``: nc sees ``labpc.work`` (no
    generated Host block turned it into ``labpc``) and must pick the work profile itself,
    through its agent and, without one, by dialling with the profile's own identity."""
    home_port, work_port = net.sshd.port, work.sshd_port  # type: ignore[attr-defined]
    nc_cmd = shlex.join([*HOMEPORT, "nc"]) + " %h %p"
    where = ["echo", "$SSH_CONNECTION"]

    def one_liner(state: Path, host: str, profile_dir: Path) -> subprocess.CompletedProcess[str]:
        # what README's one-liner adds for host keys, pointed at the profile's file
        known = profile_dir / "ssh_known_hosts"
        node = host.partition(".")[0]
        opts = [
            "-o", f"ProxyCommand={nc_cmd}", "-o", f"UserKnownHostsFile={known}",
            "-o", "StrictHostKeyChecking=yes", "-o", f"HostKeyAlias={node}",
        ]  # fmt: skip
        keys = [a for k in net.keys for a in ("-i", str(k))]
        argv = ["ssh", "-F", "/dev/null", *keys, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                *opts, "-l", net.sshd.user, host, *where]  # fmt: skip
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            env=net.env(HOMEPORT_STATE=str(state)), check=False,
        )  # fmt: skip

    assert _server_port(one_liner(net.laptop, "labpc.work", laptop_work)) == work_port
    assert _server_port(one_liner(net.laptop, "labpc.default", net.laptop)) == home_port
    assert _server_port(one_liner(net.laptop, "labpc", net.laptop)) == home_port
    # the suffix wins over $HOMEPORT_PROFILE (the name says which network)
    res = net.homeport(
        "nc",
        "labpc.default",
        "22",
        env=net.env(HOMEPORT_STATE=str(net.laptop), HOMEPORT_PROFILE="work"),
    )
    assert res.returncode == 0 and res.stdout.startswith("SSH-2.0-"), res.stderr
    # no agent: nc dials the work server itself, as the work node
    copy = _copy_state(net.laptop, tmp_path / "state")
    assert _server_port(one_liner(copy, "labpc.work", copy / "profiles" / "work")) == work_port
    # one line that says what went wrong, for a missing node and a profile typo
    for host, line in (
        ("nosuch.work", "homeport nc: nosuch.work: no node named 'nosuch' in this network "
                        "(profile 'work')"),
        ("labpc.wrk", "homeport nc: labpc.wrk: no node named 'labpc.wrk' in this network "
                      "('wrk' is not a profile here: profiles: default, work)"),
    ):  # fmt: skip
        res = net.homeport("nc", "--state", str(net.laptop), host, "22")
        assert res.returncode == 1 and res.stderr.splitlines() == [line], res.stderr


def test_homeport_ssh_takes_ssh_options_before_the_name(
    net: Net, work: Homeport, laptop_work: Path
) -> None:
    """``homeport ssh -i KEY -l USER labpc``: ssh's options with arguments are not the node."""
    keys = [a for k in net.keys for a in ("-i", str(k))]
    where = ["echo", "$SSH_CONNECTION"]
    base = ["ssh", "--state", str(net.laptop), "--no-cert"]
    opts = [*keys, "-oIdentitiesOnly=yes", "-o", "BatchMode=yes", "-l", net.sshd.user]
    res = net.homeport(*base, *opts, "labpc", *where)
    assert _server_port(res) == net.sshd.port
    res = net.homeport(*base, *opts, "-p", "22", "labpc.work", *where)  # and a profile
    assert _server_port(res) == work.sshd_port  # type: ignore[attr-defined]
    # homeport's own options after the name (docs/policy.md: homeport ssh labpc --user X)
    res = net.homeport("ssh", "labpc.work", "--state", str(net.laptop), "--no-cert", *opts, *where)
    assert _server_port(res) == work.sshd_port  # type: ignore[attr-defined]
    # the port before the name is the one checked: one line, no ssh
    res = net.homeport(*base, "-p", "2222", *opts, "labpc", "true")
    assert res.returncode == 255
    assert res.stderr.splitlines() == ["homeport: labpc does not expose '2222' (exposed: ssh/22)"]
    # nothing that could be the name: one line, exit 2 (ssh's usage error, in homeport's words)
    res = net.homeport(*base, "-i", str(net.keys[0]))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "homeport: no NAME to connect to: homeport ssh [OPTIONS] [SSH OPTIONS] NAME [CMD]"
    ]
    assert "Traceback" not in res.stderr
    # the certificate is for one login: --user and ssh's -l must not disagree
    res = net.homeport("ssh", "--state", str(net.laptop), "--user", "ubuntu", "-l", "root", "labpc")
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "homeport: --user ubuntu and the ssh login root disagree: give one of them"
    ]


def test_a_single_network_state_dir_is_the_default_profile_unchanged(
    net: Net, tmp_path: Path
) -> None:
    # an existing install: no profiles/ and no profile file; nothing to migrate
    copy = _copy_state(net.lab, tmp_path / "state")
    res = net.homeport("profiles", "--state", str(copy))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].split()[:4] == ["*", "default", "labpc", "on"]
    out = net.homeport("ssh-config", "--state", str(copy)).stdout
    host_line = next(ln for ln in out.splitlines() if ln.startswith("Host "))
    assert "laptop" in host_line.split() and ".default" not in out
    assert "--profile default" in out  # the ProxyCommand pins this very directory
    assert not (copy / "profiles").exists() and not (copy / "profile").exists()


# -- B4: homeport code ----------------------------------------------------------------------


def test_code_installs_the_ssh_config_and_opens_the_remote_folder(net: Net, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_file = tmp_path / "code-argv"
    fake = bin_dir / "code"  # VS Code cannot run here: a fake that records its argv
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_file}\n')
    fake.chmod(0o755)
    env = net.env(HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}")
    target = "labpc:/srv/my project"
    res = net.homeport("code", "--state", str(net.laptop), target, env=env)
    assert res.returncode == 0, res.stderr
    assert "installing the homeport Include" in res.stdout and "wrote" in res.stdout
    assert argv_file.read_text().splitlines() == [
        "--folder-uri",
        "vscode-remote://ssh-remote+labpc/srv/my%20project",
    ]
    config = home / ".ssh" / "config"
    shown = subprocess.run(
        ["ssh", "-F", str(config), "-G", "labpc"], capture_output=True, text=True, check=True
    ).stdout
    proxy = next(ln for ln in shown.splitlines() if ln.startswith("proxycommand "))
    assert "ncfast.py" in proxy and "--fdpass" in proxy
    ok = net.plain_ssh(config, "labpc", "echo", "ok", env=env)  # what Remote-SSH runs
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
    again = net.homeport("code", "--state", str(net.laptop), "labpc", env=env)
    assert again.returncode == 0 and "installing" not in again.stdout
    assert argv_file.read_text().splitlines() == ["--remote", "ssh-remote+labpc"]


def test_code_without_vscode_prints_the_uri_to_open(net: Net, tmp_path: Path) -> None:
    env = net.env(HOME=str(net.home), PATH="/usr/bin:/bin")
    if shutil.which("code", path=env["PATH"]):
        pytest.skip("a real 'code' is installed in /usr/bin or /bin")
    assert net.homeport("ssh-config", "--install", "--state", str(net.laptop)).returncode == 0
    res = net.homeport("code", "--state", str(net.laptop), "labpc:/srv", env=env)
    assert res.returncode == 1
    assert "'code' command is not on PATH" in res.stderr
    assert "vscode-remote://ssh-remote+labpc/srv" in res.stderr
    rel = net.homeport("code", "--state", str(net.laptop), "labpc:project", env=env)
    assert rel.returncode == 2 and "absolute path" in rel.stderr


# -- B5: status --watch ----------------------------------------------------------------------


def _read_pty(fd: int, until: Callable[[bytes], bool], seconds: float) -> bytes:
    """Read the pty until ``until(everything read)`` holds, EOF (EIO) or the deadline."""
    import select

    from homeport.testing.deadline import Deadline

    out = b""
    deadline = Deadline(seconds)
    while not until(out) and not deadline.expired():
        if select.select([fd], [], [], deadline.remaining())[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal (it exited)
                break
            if not chunk:
                break
            out += chunk
    return out


def test_status_watch_redraws_under_a_pty_and_quits_on_ctrl_c(net: Net) -> None:
    import contextlib
    import pty
    import signal

    from homeport.client import watch as w

    argv = [*HOMEPORT, "status", "--watch", "--interval", "0.3", "--state", str(net.laptop)]
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session whose controlling terminal is the pty, 160 columns
        import fcntl
        import struct
        import termios

        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        os.execvpe(argv[0], argv, net.env())
    try:
        out = _read_pty(fd, lambda b: b.count(w.HOME.encode()) >= 3, 30)
        assert out.count(w.HOME.encode()) >= 3, out[-2000:]
        os.write(fd, b"\x03")  # Ctrl-C, through the terminal's line discipline
        out += _read_pty(fd, lambda b: w.SHOW_CURSOR.encode() in b, 20)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert text.count("\x1b[2J") == 1  # the screen is cleared once, then overwritten in place
    assert w.HIDE_CURSOR in text and w.SHOW_CURSOR in text  # the cursor comes back
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    # Ctrl-C may land while a frame is being written: judge the frames drawn in full.
    frames = text.split(w.HOME)[1:]
    full = [f for f in frames if "labpc" in f and "laptop (this node)" in f]
    assert len(full) >= 2 and all("STREAMS/MIN" in f for f in full), frames[-3:]


def test_status_watch_without_a_tty_prints_plain_frames(net: Net) -> None:
    res = net.homeport(
        "status", "--watch", "--count", "2", "--interval", "0.2", "--state", str(net.laptop)
    )
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout and res.stdout.count("NAME ") == 2
