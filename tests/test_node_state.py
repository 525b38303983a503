"""The node state directory: load/save, errors, known_hosts rendering, host key parsing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from homeport.node import hostkeys
from homeport.node import state as ns
from homeport.policy.services import Service

ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJCM22JZUrvyZbfuD74UOXyFBC4Z3UDAooS0XFHTNSR+"
EC = (
    "ecdsa-sha2-nistp256 "
    "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBMlaCzgJAqx+bxyVVZ"
    "QgPkY9kM2Qb5AB2O1+OOa54wqJnqtpzflpTP8rGcKnwlVyPWK7yzqeB8cGqNvSl5bu8qc="
)


def enrolled(tmp_path: Path) -> ns.NodeState:
    st = ns.NodeState(
        dir=tmp_path / "state",
        server="hp.example.org:8443",
        server_pin="sha256:" + "ab" * 32,
        node_id="n123",
        name="laptop",
        services=(Service("ssh", 22, "127.0.0.1", 2222),),
    )
    ns.save(st)
    for f in (ns.KEY_FILE, ns.CERT_FILE, ns.CA_FILE):
        (st.dir / f).write_text("pem")
    return st


def test_save_load_roundtrip_and_modes(tmp_path: Path) -> None:
    st = enrolled(tmp_path)
    assert ns.load(st.dir) == st
    assert stat.S_IMODE(st.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((st.dir / ns.STATE_FILE).stat().st_mode) == 0o600
    assert st.server_address() == ("hp.example.org", 8443)
    assert ns.load_services(st.dir) == st.services


def test_not_enrolled_message(tmp_path: Path) -> None:
    with pytest.raises(ns.NotEnrolled) as info:
        ns.load(tmp_path / "nothing")
    assert "not enrolled" in str(info.value)
    assert "homeport up --server" in str(info.value)
    assert ns.load_services(tmp_path / "nothing") == ()


def test_missing_key_is_not_enrolled(tmp_path: Path) -> None:
    st = enrolled(tmp_path)
    (st.dir / ns.KEY_FILE).unlink()
    with pytest.raises(ns.NotEnrolled, match=r"node\.key is missing"):
        ns.load(st.dir)


@pytest.mark.parametrize("content", ["not json", "[]", '{"server": 1}', json.dumps({"x": 1})])
def test_malformed_state(tmp_path: Path, content: str) -> None:
    d = tmp_path / "s"
    d.mkdir()
    (d / ns.STATE_FILE).write_text(content)
    with pytest.raises(ns.StateError) as info:
        ns.load(d)
    assert not isinstance(info.value, ns.NotEnrolled)
    assert "malformed" in str(info.value)


def test_resolve_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ns.ENV_STATE, str(tmp_path / "env"))
    assert ns.resolve_dir(None) == tmp_path / "env"
    assert ns.resolve_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    monkeypatch.delenv(ns.ENV_STATE)
    assert ns.resolve_dir(None) == Path(ns.DEFAULT_STATE).expanduser()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host:1", ("host", 1)),
        ("host", ("host", 8443)),
        ("[::1]:9", ("::1", 9)),
        ("[::1]", ("::1", 8443)),
        ("10.0.0.1:443", ("10.0.0.1", 443)),
    ],
)
def test_parse_server(text: str, expected: tuple[str, int]) -> None:
    assert ns.parse_server(text) == expected


@pytest.mark.parametrize("text", ["", ":1", "h:x", "h:0", "h:70000", "[::1"])
def test_parse_server_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        ns.parse_server(text)


def test_render_known_hosts_port_22_and_other() -> None:
    assert ns.render_known_hosts("labpc", 22, [ED, EC]) == f"labpc {ED}\nlabpc {EC}\n"
    text = ns.render_known_hosts("labpc", 2222, [ED])
    assert text == f"labpc {ED}\n[labpc]:2222 {ED}\n"


@pytest.mark.parametrize(
    "bad",
    [
        ED + "\nevil ssh-ed25519 AAAA",
        ED + "\r",
        "@cert-authority * " + ED,
        "ssh-foo AAAA",
        "ssh-ed25519 not*base64",
        "ssh-ed25519",
        "x" * 10000,
    ],
)
def test_render_known_hosts_rejects_injection(bad: str) -> None:
    with pytest.raises(ValueError):
        ns.render_known_hosts("labpc", 22, [ED, bad])


@pytest.mark.parametrize("host", ["../etc", ".hidden", "a/b", "a b", "", "x\n", "*"])
def test_bad_host_names(host: str) -> None:
    with pytest.raises(ValueError):
        ns.render_known_hosts(host, 22, [ED])


def test_write_known_hosts_atomic_replace(tmp_path: Path) -> None:
    path = ns.write_known_hosts(tmp_path, "labpc", 22, [ED])
    assert path == tmp_path / "known_hosts" / "labpc"
    path = ns.write_known_hosts(tmp_path, "labpc", 22, [EC])
    assert path.read_text() == f"labpc {EC}\n"
    assert sorted(os.listdir(tmp_path / "known_hosts")) == ["labpc"]  # no temp files left


def test_hostkeys_parse_keyscan_and_files(tmp_path: Path) -> None:
    scan = ["# 127.0.0.1:22 SSH-2.0-OpenSSH_9.2", f"127.0.0.1 {ED}", f"127.0.0.1 {ED}", "junk"]
    assert hostkeys.parse_keys(scan, with_host=True) == (ED,)
    # ssh-keyscan's order varies from scan to scan: any order gives the same announce
    both = [f"h {ED}", f"h {EC}"]
    assert hostkeys.parse_keys(both, with_host=True) == hostkeys.parse_keys(
        both[::-1], with_host=True
    )
    (tmp_path / "ssh_host_ed25519_key.pub").write_text(ED + " root@box\n")
    (tmp_path / "ssh_host_ecdsa_key.pub").write_text(EC + "\n")
    keys = hostkeys.from_files(str(tmp_path / "ssh_host_*_key.pub"))
    assert set(keys) == {ED, EC}


def test_hostkeys_collect_falls_back_to_files(tmp_path: Path) -> None:
    (tmp_path / "ssh_host_ed25519_key.pub").write_text(ED + "\n")
    # Port 1 on loopback: nothing answers, so ssh-keyscan returns nothing quickly.
    keys = hostkeys.collect(("127.0.0.1", 1), pattern=str(tmp_path / "ssh_host_*_key.pub"))
    assert keys == (ED,)
    assert hostkeys.collect(None) == ()
