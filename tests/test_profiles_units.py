"""Pure parts of issue 9 A4/A7/B1: the precheck verdict, ssh config blocks, profile layout."""

from __future__ import annotations

from pathlib import Path

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
