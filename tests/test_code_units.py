"""``homeport code``'s pure parts: target parsing, the URI VS Code opens, ``ssh -G`` reading;
and the command's checks before it writes ~/.ssh (no network: the map is faked)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import click
import click.testing
import pytest
from click.testing import CliRunner

from homeport.client.code import CodeTarget, code_argv, folder_uri, parse_target, routed
from homeport.wire.control import NetMap, NodeInfo


def test_targets_and_uris() -> None:
    assert parse_target("labpc") == CodeTarget("labpc", "")
    assert parse_target("labpc.work:/home/me") == CodeTarget("labpc.work", "/home/me")
    assert folder_uri(CodeTarget("labpc", "/srv/a b#c")) == (
        "vscode-remote://ssh-remote+labpc/srv/a%20b%23c"
    )
    assert code_argv("code", CodeTarget("labpc", "")) == ["code", "--remote", "ssh-remote+labpc"]
    assert code_argv("/x/code", CodeTarget("labpc", "/p"))[1:] == [
        "--folder-uri",
        "vscode-remote://ssh-remote+labpc/p",
    ]


@pytest.mark.parametrize("bad", ["labpc:rel/path", "-oProxyCommand=x", "a b:/x", "lab:/x\n"])
def test_bad_targets_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_target(bad)


def test_routed_reads_ssh_g() -> None:
    assert routed("hostname labpc\nproxycommand /py -I -S /h/ncfast.py --state s %h %p\n")
    assert not routed("hostname labpc\nport 22\n")
    assert not routed("proxycommand ssh -W %h:%p jump\n")


# -- the command, without a network: the name is checked before ~/.ssh is touched ----------


def _code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> tuple[click.testing.Result, Path]:
    from homeport.client import cli as client_cli
    from homeport.io import dial

    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no VS Code: the fallback line
    monkeypatch.setenv("HOMEPORT_PROFILE", "")
    st = SimpleNamespace(name="laptop", services=(), dir=tmp_path, server="192.0.2.1:8443")
    nm = NetMap(
        self_id="n1",
        nodes=(NodeInfo("n1", "laptop", True, 1.0, "x"), NodeInfo("n2", "labpc", True, 1.0, "x")),
    )
    monkeypatch.setattr(client_cli, "_load", lambda _s: st)
    monkeypatch.setattr(dial, "request_netmap", lambda *_a, **_k: nm)
    group = click.Group()
    client_cli.register(group)
    res = CliRunner().invoke(group, ["code", "--state", str(tmp_path / "state"), target])
    return res, home / ".ssh"


def test_code_for_an_unknown_node_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res, ssh_dir = _code(tmp_path, monkeypatch, "nosuch")
    assert res.exit_code == 1
    assert res.output.strip() == "homeport: no node named 'nosuch' in this network " + (
        "(see: homeport status)"
    )
    assert not ssh_dir.exists()


def test_code_keeps_the_users_homeport_conf_and_prints_a_usable_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("ssh") is None:
        pytest.skip("needs OpenSSH's ssh because code asks ssh -G how it routes the name")
    ssh_dir = tmp_path / "home" / ".ssh"
    ssh_dir.mkdir(parents=True)
    mine = (  # as 'HOMEPORT_STATE=/custom homeport ssh-config --install' wrote it
        "Host labpc\n    ProxyCommand /usr/bin/python3 -I -S /h/ncfast.py --state /custom "
        "--profile default --fdpass %h %p\n"
    )
    (ssh_dir / "homeport.conf").write_text(mine)
    res, _ = _code(tmp_path, monkeypatch, "labpc")
    assert (ssh_dir / "homeport.conf").read_text() == mine  # not rewritten for another state
    assert "homeport.conf" in (ssh_dir / "config").read_text()  # only the Include was added
    assert res.exit_code == 1, res.output
    assert "then run: code --remote ssh-remote+labpc;" in res.output  # not a bare authority
