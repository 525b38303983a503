"""Client pieces without a network: nc arguments and errors, ssh argv, units, status table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from homeport.agent.cli import register as register_agent
from homeport.client import nc, service, ssh, status
from homeport.client.cli import register
from homeport.client.forward import format_event, parse_target
from homeport.wire.control import NetMap, NodeInfo, ServiceInfo


def test_nc_parse_args() -> None:
    assert nc.parse_args(["labpc", "22"]) == nc.NcArgs("labpc", "22")
    a = nc.parse_args(["--state", "/s", "labpc", "ssh", "--timeout=3"])
    assert (a.state, a.host, a.service, a.timeout) == ("/s", "labpc", "ssh", 3.0)
    assert nc.parse_args(["--state=/x", "--", "h", "80"]).state == "/x"


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        ([], "expected HOST and PORT"),
        (["h"], "expected HOST and PORT"),
        (["h", "1", "2"], "expected HOST and PORT"),
        (["--state"], "needs a value"),
        (["-x", "h", "22"], "unknown option"),
        (["h", "0"], "out of range"),
        (["h", "70000"], "out of range"),
        (["h", "a b"], "bad PORT"),
        (["--timeout", "x", "h", "22"], "not a number"),
    ],
)
def test_nc_parse_errors(argv: list[str], why: str) -> None:
    with pytest.raises(nc.UsageError, match=why):
        nc.parse_args(argv)


def test_nc_error_line_is_one_line() -> None:
    assert nc.format_error("labpc", "node\nis  offline") == "homeport nc: labpc: node is offline"


def test_nc_main_not_enrolled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert nc.main(["--state", str(tmp_path), "labpc", "22"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("homeport nc: labpc: not enrolled")
    assert err.count("\n") == 1


def test_nc_main_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert nc.main(["onlyhost"]) == 2
    assert "Usage: homeport nc" in capsys.readouterr().err
    assert nc.main(["--help"]) == 0


def test_nc_main_rejects_bad_host_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert nc.main(["--state", str(tmp_path), "../etc", "22"]) == 1
    assert "bad host name" in capsys.readouterr().err


def test_nc_imports_stay_light() -> None:
    code = (
        "import sys, homeport.client.nc, homeport.io.dial, homeport.io.pump;"
        "bad = [m for m in ('click', 'asyncio', 'cryptography') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ""


def test_ssh_argv(tmp_path: Path) -> None:
    argv = ssh.ssh_argv(["labpc", "-v", "uptime"], tmp_path, python="/usr/bin/python3")
    assert argv[0] == "ssh"
    assert argv[-3:] == ["labpc", "-v", "uptime"]
    opts = dict(o.split("=", 1) for o in argv[2:-3:2])
    assert argv[1:-3:2] == ["-o"] * 5
    launcher = f"{ssh.package_root()}/homeport/ncfast.py"
    assert opts["ProxyCommand"] == (
        f"/usr/bin/python3 -I -S {launcher} --state {tmp_path} --profile default --fdpass %h %p"
    )
    assert opts["ProxyUseFdpass"] == "yes"
    assert opts["UserKnownHostsFile"] == f"{tmp_path}/ssh_known_hosts"  # no %h: paramiko reads it
    assert opts["StrictHostKeyChecking"] == "yes"
    assert opts["UpdateHostKeys"] == "no"


def test_ssh_quotes_paths_with_spaces(tmp_path: Path) -> None:
    d = tmp_path / "my state"
    assert f"--state '{d}'" in ssh.proxy_command(d, "/py")


def test_ssh_g_accepts_the_options(tmp_path: Path) -> None:
    """OpenSSH takes the options; the known-hosts file is the one nc keeps merged."""
    argv = ssh.ssh_argv(["labpc"], tmp_path, python="/py")
    out = subprocess.run(
        [argv[0], "-G", "-F", "/dev/null", *argv[1:]], capture_output=True, text=True, check=True
    ).stdout.lower()
    assert f"userknownhostsfile {tmp_path}/ssh_known_hosts".lower() in out
    assert "stricthostkeychecking true" in out
    assert "proxyusefdpass yes" in out


def test_ssh_config_block(tmp_path: Path) -> None:
    text = ssh.ssh_config_block(["labpc", "nas"], tmp_path, python="/py")
    lines = text.splitlines()
    assert "Host labpc nas" in lines
    assert any(line.strip().startswith("ProxyCommand ") for line in lines)
    assert f"    UserKnownHostsFile {tmp_path}/ssh_known_hosts" in lines
    assert ssh.ssh_config_block([], tmp_path).startswith("#")


def test_systemd_agent_unit(tmp_path: Path) -> None:
    p = service.plan(
        server=False, directory=tmp_path, system=True, command=["/usr/local/bin/homeport"]
    )
    assert p.path == Path("/etc/systemd/system/homeport-agent.service")
    assert f"ExecStart=/usr/local/bin/homeport up --state {tmp_path}" in p.text
    for line in (
        "Restart=always",
        "RestartSec=2",
        "After=network-online.target",
        "Wants=network-online.target",
        "WantedBy=multi-user.target",
    ):
        assert line in p.text.splitlines()
    assert "systemctl enable --now homeport-agent.service" in p.enable_command


def test_systemd_server_user_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    p = service.plan(
        server=True,
        directory=tmp_path / "data",
        listen="0.0.0.0:443",
        system=False,
        command=["/opt/hp/bin/homeport"],
        user="ignored-for-user-units",
    )
    assert p.path == tmp_path / "cfg/systemd/user/homeport-server.service"
    assert (
        f"ExecStart=/opt/hp/bin/homeport server --data {tmp_path}/data --listen 0.0.0.0:443"
        in p.text
    )
    assert "User=" not in p.text
    assert "WantedBy=default.target" in p.text
    assert "systemctl --user" in p.enable_command


def test_service_install_print_via_cli(tmp_path: Path) -> None:
    group = click.Group()
    register(group)
    res = CliRunner().invoke(
        group, ["service", "install", "--print", "--state", str(tmp_path), "--user", "bob"]
    )
    assert res.exit_code == 0, res.output
    assert f"up --state {tmp_path}" in res.output
    assert "Restart=always" in res.output


def test_cli_lists_commands() -> None:
    group = click.Group()
    register(group)
    register_agent(group)
    out = CliRunner().invoke(group, ["--help"]).output
    for cmd in ("up", "status", "nc", "ssh", "ssh-config", "forward", "service"):
        assert f"  {cmd} " in out or f"  {cmd}\n" in out


def test_up_not_enrolled_is_fatal(tmp_path: Path) -> None:
    group = click.Group()
    register_agent(group)
    res = CliRunner().invoke(group, ["up", "--state", str(tmp_path)])
    assert res.exit_code == 1
    assert "not enrolled" in res.output


@pytest.mark.parametrize(("name", "says"), [("LabPC", "lowercase"), ("x" * 300, "300 characters")])
def test_up_bad_name_is_a_usage_error_before_any_network(
    tmp_path: Path, name: str, says: str
) -> None:
    group = click.Group()
    register_agent(group)
    args = ["up", "--state", str(tmp_path), "--server", "127.0.0.1:1", "--authkey", "k"]
    res = CliRunner().invoke(group, [*args, "--name", name])
    assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output
    assert len(res.output) < 300


def test_up_bad_auth_key_is_fatal(tmp_path: Path) -> None:
    group = click.Group()
    register_agent(group)
    res = CliRunner().invoke(
        group,
        [
            "up",
            "--state",
            str(tmp_path),
            "--server",
            "127.0.0.1:1",
            "--authkey",
            "nope",
            "--name",
            "x",
        ],
    )
    assert res.exit_code == 1
    assert "bad-auth-key" in res.output


def test_forward_target_parsing() -> None:
    assert parse_target("labpc:8888").service == "8888"
    assert parse_target("labpc:jupyter").node == "labpc"
    for bad in ("labpc", ":22", "labpc:", "labpc:99999", "labpc:a b"):
        with pytest.raises(ValueError):
            parse_target(bad)
    line = format_event({"event": "open", "from": "127.0.0.1:5", "to": "labpc:22", "peer": "labpc"})
    assert line == "127.0.0.1:5 → labpc:22: connected to labpc"


def test_status_table_and_json() -> None:
    nm = NetMap(
        self_id="n1",
        nodes=(
            NodeInfo("n2", "labpc", False, 1000.0 - 180, "sha256:x", (ServiceInfo("ssh", 22),)),
            NodeInfo("n1", "laptop", True, 1000.0, "sha256:y"),
            NodeInfo("n3", "nas", True, 1000.0, "sha256:z", (ServiceInfo("web", 8080),)),
        ),
    )
    table = status.render_table(nm, now=1000.0).splitlines()
    assert table[0].split() == ["NAME", "ONLINE", "LAST", "SEEN", "SERVICES", "PATH"]
    assert table[1].startswith("laptop (this node)")
    assert "3m ago" in table[2] and "ssh/22" in table[2] and table[2].endswith(" -")  # offline
    assert "now" in table[3] and "web/8080" in table[3] and "relay" in table[3]
    js = status.to_json(nm, now=1000.0)
    assert [n["self"] for n in js["nodes"]] == [False, True, False]
    assert [n["path"] for n in js["nodes"]] == ["", "", "relay"]
    # with the agent's view: .path is the kind it took (as the table), and the self row
    # carries no detail (the agent's "no node with id …" about itself is not a path)
    paths: dict[str, dict[str, object]] = {
        "n3": {"kind": "local", "endpoint": "192.0.2.2:41641", "rtt_ms": 0.4},
        "n1": {"kind": "relay", "code": "unknown-node", "reason": "no node with id 'n1'"},
    }
    js = status.to_json(nm, now=1000.0, paths=paths)
    by = {n["name"]: n for n in js["nodes"]}
    assert by["nas"]["path"] == "local" and by["nas"]["path_detail"]["kind"] == "local"
    assert by["laptop"]["path"] == "" and by["laptop"]["path_detail"] is None
    assert "local 192.0.2.2:41641 0.4ms" in status.render_table(nm, 1000.0, paths)


@pytest.mark.parametrize(
    ("secs", "text"),
    [(0, "now"), (30, "30s ago"), (180, "3m ago"), (7200, "2h ago"), (2e5, "2d ago")],
)
def test_ago(secs: float, text: str) -> None:
    assert status.ago(secs) == text


def test_agent_unit_does_not_restart_a_removed_node(tmp_path: Path) -> None:
    from homeport.agent.runtime import ExitCode

    assert int(ExitCode.NODE_REMOVED) == service.NODE_REMOVED_EXIT
    text = service.plan(
        server=False, directory=tmp_path, system=True, command=["/usr/local/bin/homeport"]
    ).text
    assert f"RestartPreventExitStatus={int(ExitCode.NODE_REMOVED)}" in text.splitlines()


def test_status_map_gets_this_nodes_row_when_the_policy_hides_it() -> None:
    """Under a policy a node's map may lack its own row; status adds it from local state."""
    from types import SimpleNamespace

    from homeport.client.cli import _with_self
    from homeport.wire.control import NetMap, NodeInfo

    peer = NodeInfo(node_id="n2", name="labpc", online=True, last_seen=1.0, fingerprint="x")
    st = SimpleNamespace(name="laptop", services=())
    nm = _with_self(NetMap(self_id="n1", nodes=(peer,)), st)
    assert [n.name for n in nm.nodes] == ["laptop", "labpc"] and nm.nodes[0].node_id == "n1"
    assert _with_self(nm, st) is nm  # already there: unchanged


def test_exit_target_refuses_this_node_and_an_offline_node_at_start() -> None:
    """socks --via / forward NODE:HOST:PORT: what would fail every connection fails the start."""
    from homeport.client.forward import ForwardSpec, target_problem

    nm = NetMap(
        self_id="n1",
        nodes=(
            NodeInfo("n1", "laptop", True, 1000.0, "fp"),
            NodeInfo("n2", "labpc", True, 1000.0, "fp"),
            NodeInfo("n3", "pi", False, 900.0, "fp"),
        ),
    )

    def via(name: str) -> tuple[bool, str] | None:
        return target_problem(nm, ForwardSpec(name, "", exit="*"))

    assert via("labpc") is None
    assert via("laptop") == (True, "laptop is this node; name another node as the exit")
    offline = via("pi")
    assert offline is not None and offline[0] and "pi is offline" in offline[1]
    unknown = via("nosuch")
    assert unknown is not None and unknown[0]


# -- homeport ssh finds the destination the way OpenSSH does --------------------------------

#: (ssh arguments, destination host, user, port, the remote command). Each row is also
#: checked against what the real ``ssh -G`` makes of the same arguments.
SSH_ARGS_TABLE: list[tuple[list[str], str, str | None, str | None, list[str]]] = [
    (["labpc"], "labpc", None, None, []),
    (["-i", "/k", "labpc"], "labpc", None, None, []),
    (["-i/k", "labpc", "uptime"], "labpc", None, None, ["uptime"]),
    (["-p", "2222", "labpc"], "labpc", None, "2222", []),
    (["-p2222", "labpc"], "labpc", None, "2222", []),
    (["-p", "2200", "-p", "2300", "labpc"], "labpc", None, "2200", []),  # the first wins
    (["-l", "alice", "labpc"], "labpc", "alice", None, []),
    (["-l", "alice", "bob@labpc"], "labpc", "alice", None, []),  # -l before user@ wins
    (["bob@labpc", "-l", "alice"], "labpc", "bob", None, []),  # ... after it, loses
    (["-o", "User=carol", "-l", "alice", "labpc"], "labpc", "carol", None, []),
    (["-o", "Port=2400", "-p", "2300", "labpc"], "labpc", None, "2400", []),
    (["-oPort=7", "labpc"], "labpc", None, "7", []),
    (["-o", "port=10", "labpc"], "labpc", None, "10", []),
    (["-o", "Port 11", "labpc"], "labpc", None, "11", []),
    (["-o", "ProxyJump=none", "labpc"], "labpc", None, None, []),
    (["-J", "jump", "labpc"], "labpc", None, None, []),
    (["-F", "/dev/null", "labpc"], "labpc", None, None, []),
    (["-L", "8080:localhost:80", "labpc"], "labpc", None, None, []),
    (["-D", "1080", "-R", "9000:localhost:9000", "labpc"], "labpc", None, None, []),
    (["-vli", "bob", "labpc"], "bob", "i", None, ["labpc"]),  # getopt: -l takes "i"
    (["-4vC", "-i", "/k", "labpc"], "labpc", None, None, []),
    (["-tt", "labpc", "-p", "5", "top"], "labpc", None, "5", ["top"]),  # options after NAME
    (["labpc", "echo", "-p", "5"], "labpc", None, None, ["echo", "-p", "5"]),  # the command's
    (["--", "labpc", "-p", "5"], "labpc", None, None, ["-p", "5"]),
    (["labpc", "--", "-p", "5"], "labpc", None, None, ["--", "-p", "5"]),
    (["ssh://al@labpc:2022"], "labpc", "al", "2022", []),
    (["ssh://al@labpc:2022", "-p", "5"], "labpc", "al", "2022", []),
    (["-p", "5", "ssh://al@labpc:2022"], "labpc", "al", "5", []),
    (["-e", "none", "-c", "aes128-ctr", "-m", "hmac-sha2-256", "labpc"], "labpc", None, None, []),
    (["-E", "/dev/null", "-b", "127.0.0.1", "-S", "none", "-W", "x:22", "h"], "h", None, None, []),
]


@pytest.mark.parametrize(("args", "host", "user", "port", "command"), SSH_ARGS_TABLE)
def test_ssh_args_find_the_destination_like_openssh(
    args: list[str],
    host: str,
    user: str | None,
    port: str | None,
    command: list[str],
    tmp_path: Path,
) -> None:
    line = ssh.parse_ssh_args(args)
    assert (line.host, line.user, line.port) == (host, user, port)
    assert line.argv() == args  # passed to ssh unchanged
    assert [*line.after][len(line.after) - len(command) :] == command
    # the real OpenSSH agrees (ssh -G prints the resolved hostname, user and port)
    env = {**os.environ, "USER": "nobody-in-particular"}
    shown = subprocess.run(
        ["ssh", "-G", *([] if "-F" in args else ["-F", "/dev/null"]), *args],
        capture_output=True, text=True, env=env, check=False, stdin=subprocess.DEVNULL,
        cwd=tmp_path,  # ssh -E FILE would write there
    ).stdout  # fmt: skip
    conf = dict(ln.split(" ", 1) for ln in shown.splitlines() if " " in ln)
    assert conf["hostname"] == host
    assert conf["port"] == (port or "22")
    if user is not None:
        assert conf["user"] == user


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ([], "no NAME"),
        (["-i", "/k"], "no NAME"),
        (["-v"], "no NAME"),
        (["labpc", "-p"], "-p needs an argument"),
        (["-i"], "-i needs an argument"),
        (["-Z", "labpc"], "unknown ssh option -Z"),
        (["-i", "/k", "--no-cert", "labpc"], "ssh has no option --no-cert"),  # no `own` given
    ],
)
def test_ssh_args_errors_are_one_line(args: list[str], why: str) -> None:
    with pytest.raises(ssh.SshArgsError, match=why):
        ssh.parse_ssh_args(args)


def test_ssh_args_with_host_keeps_user_and_port() -> None:
    line = ssh.parse_ssh_args(["-i", "/k", "al@labpc.work", "true"]).with_host("labpc")
    assert line.argv() == ["-i", "/k", "al@labpc", "true"] and line.user == "al"
    uri = ssh.parse_ssh_args(["ssh://al@labpc.work:2022"]).with_host("labpc")
    assert uri.argv() == ["ssh://al@labpc:2022"] and uri.port == "2022"


def test_ssh_args_take_homeports_own_options_where_sshs_may_be() -> None:
    """``homeport ssh labpc --user ubuntu`` (docs/policy.md): ssh has no long options."""
    own = {"--user": True, "--no-cert": False, "--state": True}
    line = ssh.parse_ssh_args(
        ["-i", "/k", "labpc", "--user", "ubuntu", "--state=/s", "--no-cert", "-p", "2", "ls"], own
    )
    assert line.argv() == ["-i", "/k", "labpc", "-p", "2", "ls"]
    assert line.own == (("--user", "ubuntu"), ("--state", "/s"), ("--no-cert", None))
    assert line.port == "2"
    cmd = ssh.parse_ssh_args(["labpc", "echo", "--user"], own)  # the command's, untouched
    assert cmd.argv() == ["labpc", "echo", "--user"] and cmd.own == ()
    for bad, why in (
        (["labpc", "--user"], "--user needs a value"),
        (["labpc", "--no-cert=1"], "--no-cert takes no value"),
        (["labpc", "--nocert"], "ssh has no option --nocert"),
    ):
        with pytest.raises(ssh.SshArgsError, match=why):
            ssh.parse_ssh_args(bad, own)
