"""Pure parts of issue 9 A4/A7/B1: the precheck verdict, ssh config blocks, profile layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from homeport.client import precheck
from homeport.client.ssh import ssh_config_block

NOW = 1_000_000.0


def test_precheck_passes_whenever_the_agent_cannot_tell() -> None:
    for reply in (None, {}, {"ok": False}, {"ok": True, "ready": False, "known": False}):
        assert precheck.verdict(reply, "labpc", "22", NOW) is None


def test_precheck_names_the_reason_like_the_server() -> None:
    unknown = {"ok": True, "ready": True, "known": False}
    assert "no node named 'x'" in (precheck.verdict(unknown, "x", "22", NOW) or "")
    off = {"ok": True, "ready": True, "known": True, "online": False, "last_seen": NOW - 120}
    assert precheck.verdict(off, "labpc", "22", NOW) == (
        "labpc is offline (last seen 2 min ago); is 'homeport up' running there?"
    )
    never = {**off, "last_seen": 0}
    assert "never seen" in (precheck.verdict(never, "labpc", "22", NOW) or "")
    on = {"ok": True, "ready": True, "known": True, "online": True, "services": "ssh/22,web/80"}
    assert precheck.verdict(on, "labpc", "22", NOW) is None
    assert precheck.verdict(on, "labpc", "web", NOW) is None
    assert precheck.verdict(on, "labpc", "8888", NOW) == (
        "labpc does not expose '8888' (exposed: ssh/22, web/80)"
    )
    assert "exposed: nothing" in (precheck.verdict({**on, "services": ""}, "a", "22", NOW) or "")


def test_config_block_puts_the_precheck_first_and_can_leave_it_out(tmp_path: Path) -> None:
    block = ssh_config_block(["labpc", "nas"], tmp_path)
    lines = block.splitlines()
    match = next(i for i, ln in enumerate(lines) if ln.startswith("Match originalhost labpc,nas"))
    host = lines.index("Host labpc nas")
    assert match < host and "--check %h %p" in lines[match]
    assert lines[match + 1 : match + 3] == ["    LogLevel QUIET", "    ProxyCommand false"]
    assert "Match" not in ssh_config_block(["labpc"], tmp_path, precheck=False)


def test_config_block_for_a_profile_maps_suffixed_names_to_node_names(tmp_path: Path) -> None:
    block = ssh_config_block(["labpc"], tmp_path, suffix=".work")
    assert "Host labpc.work\n    Hostname labpc\n" in block
    assert "Match originalhost labpc.work " in block and "--suffix .work" in block


@pytest.mark.parametrize("how", ["option", "env"])
def test_a_profile_typo_is_no_such_profile_not_an_invitation_to_enroll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    import click
    from click.testing import CliRunner

    from homeport.agent.cli import register as register_agent
    from homeport.client.cli import add_profile_options, register

    (tmp_path / "profiles" / "home").mkdir(parents=True)
    monkeypatch.setenv("HOMEPORT_PROFILE", "")  # empty is unset; undone after --profile sets it
    group = click.Group()
    register(group)
    register_agent(group)
    add_profile_options(group)
    if how == "env":
        monkeypatch.setenv("HOMEPORT_PROFILE", "hme")
        pick: list[str] = []
    else:
        pick = ["--profile", "hme"]
    want = "homeport: no profile 'hme' (profiles: default, home); create it with 'homeport up"
    for cmd in (["status"], ["set"], ["ssh-config", "labpc"]):
        res = CliRunner().invoke(group, [*cmd, "--state", str(tmp_path), *pick])
        assert res.exit_code == 1 and res.output.startswith(want), (cmd, res.output)
        assert "AUTHKEY" not in res.output
    # up creates profiles: there a missing one is still "not enrolled: enroll it like this"
    res = CliRunner().invoke(group, ["up", "--state", str(tmp_path), *pick])
    assert res.exit_code == 1 and "not enrolled" in res.output and "AUTHKEY" in res.output
    # and the default profile of a fresh machine is "not enrolled", as always
    monkeypatch.setenv("HOMEPORT_PROFILE", "")
    res = CliRunner().invoke(group, ["status", "--state", str(tmp_path / "fresh")])
    assert res.exit_code == 1 and "not enrolled" in res.output


def test_ssh_to_a_node_of_another_profile_suggests_its_profile_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    import click
    from click.testing import CliRunner

    from homeport.client import cli as client_cli

    (tmp_path / "profiles" / "home" / "known_hosts").mkdir(parents=True)
    (tmp_path / "profiles" / "home" / "known_hosts" / "pi").write_text("pi ssh-ed25519 AAAA\n")
    (tmp_path / "profiles" / "work" / "pins").mkdir(parents=True)
    monkeypatch.setenv("HOMEPORT_PROFILE", "")
    monkeypatch.setattr(client_cli, "_load", lambda _s: SimpleNamespace(dir=tmp_path))
    monkeypatch.setattr(
        client_cli,
        "_precheck",
        lambda _st, host, _svc: f"no node named {host!r} that this node can reach (x)",
    )
    group = click.Group()
    client_cli.register(group)
    res = CliRunner().invoke(group, ["ssh", "--state", str(tmp_path), "pi"])
    assert res.exit_code == 255
    assert res.output.strip().endswith("; did you mean pi.home?"), res.output
    res = CliRunner().invoke(group, ["ssh", "--state", str(tmp_path), "nas"])
    assert res.exit_code == 255 and "did you mean" not in res.output


# -- nc NAME.PROFILE (the one-line ProxyCommand `homeport nc %h %p`) ------------------------


@pytest.mark.parametrize(
    ("host", "expect"),
    [
        ("labpc.work", ("labpc", "work")),  # an existing profile: its node
        ("labpc.default", ("labpc", "default")),  # the base directory's own profile
        ("labpc", ("labpc", None)),  # no dot: the chosen profile, as before
        ("labpc.wrk", ("labpc.wrk", None)),  # no such profile: left alone (and hinted)
        ("a.b.work", ("a.b.work", None)),  # "a.b" is no node name: never split
        ("labpc.Work", ("labpc.Work", None)),  # not a profile name (lowercase only)
        (".work", (".work", None)),
        ("labpc.", ("labpc.", None)),
        ("labpc.notadir", ("labpc.notadir", None)),  # a file, not a profile directory
    ],
)
def test_nc_splits_a_profile_suffix_only_for_an_existing_profile(
    tmp_path: Path, host: str, expect: tuple[str, str | None]
) -> None:
    from homeport.client import nc

    (tmp_path / "profiles" / "work").mkdir(parents=True)
    (tmp_path / "profiles" / "notadir").write_text("")
    assert nc.split_profile(host, str(tmp_path)) == expect


def test_nc_profile_suffix_wins_and_errors_name_what_was_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from homeport.client import nc

    (tmp_path / "profiles" / "work").mkdir(parents=True)
    monkeypatch.setenv(nc.ENV_PROFILE, "home")  # --profile home: the suffix still decides
    monkeypatch.setattr(nc, "_SHOWN", {})
    monkeypatch.setattr(nc, "_HINTS", {})
    args = nc.NcArgs("labpc.work", "22", state=str(tmp_path))
    nc.use_profile_suffix(args)
    assert args.host == "labpc" and os.environ[nc.ENV_PROFILE] == "work"
    assert nc.state_dir(args.state) == str(tmp_path / "profiles" / "work")
    nc._fail("labpc", "no node named 'labpc' in this network")
    typo = nc.NcArgs("labpc.wrk", "22", state=str(tmp_path))
    nc.use_profile_suffix(typo)
    assert typo.host == "labpc.wrk"
    nc._fail("labpc.wrk", "no node named 'labpc.wrk' in this network")
    assert capsys.readouterr().err.splitlines() == [
        "homeport nc: labpc.work: no node named 'labpc' in this network (profile 'work')",
        "homeport nc: labpc.wrk: no node named 'labpc.wrk' in this network "
        "('wrk' is not a profile here: profiles: default, work)",
    ]
