"""Host trust for keyless SSH: the authorized_keys line and the sshd drop-in, and ssh-config."""

from __future__ import annotations

from pathlib import Path

import pytest

from homeport.agent import sshtrust
from homeport.client.login import key_paths
from homeport.client.ssh import cert_match_block, ssh_argv, ssh_config_block
from homeport.crypto.sshca import SshCa

CA = SshCa(SshCa.generate()).public_line
OTHER_CA = SshCa(SshCa.generate()).public_line


def test_authorized_keys_line_is_validated_and_quoted() -> None:
    line = sshtrust.authorized_keys_line(CA + " comment", "alice")
    assert line == f'cert-authority,principals="alice" {CA} homeport-ssh-ca'
    for bad in ('al"ice', "a,b", "root x", ""):
        with pytest.raises(sshtrust.TrustError):
            sshtrust.authorized_keys_line(CA, bad)
    with pytest.raises(sshtrust.TrustError):
        sshtrust.authorized_keys_line("ssh-ed25519 AAAA", "alice")
    with pytest.raises(sshtrust.TrustError):
        sshtrust.authorized_keys_line(CA + "\ncommand=evil " + CA, "alice")


def test_install_user_is_idempotent_and_keeps_other_lines(tmp_path: Path) -> None:
    ssh = tmp_path / ".ssh"
    ssh.mkdir()
    theirs = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ1 mine\n# a comment\n"
    (ssh / "authorized_keys").write_text(theirs)
    path = sshtrust.install_user(CA, "alice", home=tmp_path)
    assert path == ssh / "authorized_keys"
    text = path.read_text()
    assert text.startswith(theirs) and text.count("homeport-ssh-ca") == 1
    assert path.stat().st_mode & 0o777 == 0o600
    assert sshtrust.install_user(CA, "alice", home=tmp_path) is None  # nothing to do
    assert path.read_text() == text
    # a new CA key replaces only our own line
    sshtrust.install_user(OTHER_CA, "alice", home=tmp_path)
    rotated = path.read_text()
    assert rotated.startswith(theirs) and OTHER_CA in rotated and CA not in rotated


def test_install_user_creates_ssh_dir(tmp_path: Path) -> None:
    path = sshtrust.install_user(CA, "bob", home=tmp_path)
    assert path is not None and (tmp_path / ".ssh").stat().st_mode & 0o777 == 0o700
    assert path.read_text() == sshtrust.authorized_keys_line(CA, "bob") + "\n"


def test_root_install_writes_the_dropin_and_ca_copy(tmp_path: Path) -> None:
    dropin, copy = tmp_path / "sshd_config.d" / "50-homeport.conf", tmp_path / "ca.pub"
    changed = sshtrust.install_root(CA, dropin, copy)
    assert changed == [copy, dropin]
    assert f"TrustedUserCAKeys {copy}\n" in dropin.read_text()
    assert copy.read_text() == f"{CA} homeport-ssh-ca\n"
    assert copy.stat().st_mode & 0o777 == 0o644
    assert sshtrust.install_root(CA, dropin, copy) == []


def test_ssh_gets_the_certificate_options(tmp_path: Path) -> None:
    key, cert = key_paths(tmp_path, "lab/pc", "alice")
    assert key.name == "lab_pc_alice" and cert.name == "lab_pc_alice-cert.pub"
    argv = ssh_argv(["lab", "true"], tmp_path, extra=[("IdentityFile", str(key))])
    assert argv[-3:] == [f"IdentityFile={key}", "lab", "true"]
    block = ssh_config_block(["lab", "db"], tmp_path, certs=True)
    match = cert_match_block(["lab", "db"], tmp_path)
    assert block.rstrip("\n").endswith("\n".join(match))
    assert match[0].startswith("Match host lab,db exec ")
    assert "ssh-cert --quiet --state" in match[0] and match[0].endswith(' --user %r %n"')
    assert match[1].endswith("ssh-certs/%n_%r") and match[2].endswith("ssh-certs/%n_%r-cert.pub")
    assert "Match host" not in ssh_config_block(["lab"], tmp_path)  # only the precheck
