"""Units behind the first-hour fixes: settings changes, ssh config Include, small items."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from homeport.client import service, ssh
from homeport.client.term import printable
from homeport.node.settings import ChangeVerdict, apply_changes
from homeport.policy.services import parse_expose

SSH = parse_expose("ssh=127.0.0.1:22")
WEB = parse_expose("web=127.0.0.1:8888")


def test_changes_add_and_remove_by_name_and_keep_ssh() -> None:
    added = apply_changes((SSH,), add=(WEB,))
    assert added.verdict is ChangeVerdict.CHANGED and added.services == (SSH, WEB)
    removed = apply_changes(added.services, remove=("web",))
    assert removed.verdict is ChangeVerdict.CHANGED and removed.services == (SSH,)
    same = apply_changes((SSH, WEB), add=(WEB,))
    assert same.verdict is ChangeVerdict.UNCHANGED


def test_changes_refuse_dropping_ssh_unless_forced_and_refuse_typos() -> None:
    refused = apply_changes((SSH, WEB), remove=("ssh",))
    assert refused.verdict is ChangeVerdict.REFUSED and "--force" in refused.reason
    assert refused.services == (SSH, WEB)
    forced = apply_changes((SSH, WEB), remove=("ssh",), force=True)
    assert forced.verdict is ChangeVerdict.CHANGED and forced.services == (WEB,)
    typo = apply_changes((SSH,), remove=("sssh",))
    assert typo.verdict is ChangeVerdict.REFUSED and "sssh" in typo.reason


def test_include_goes_first_once() -> None:
    old = "Host *\n    StrictHostKeyChecking ask\n"
    new = ssh.add_include(old)
    assert new is not None and new.index(ssh.INCLUDE_LINE) < new.index("Host *")
    assert ssh.add_include(new) is None
    assert ssh.add_include("Include /home/a/.ssh/homeport.conf\n") is None
    assert ssh.include_line(Path("/h"), Path("/h")) == ssh.INCLUDE_LINE
    assert ssh.include_line(Path("/t m"), Path("/h")) == 'Include "/t m/.ssh/homeport.conf"'


def test_printable_escapes_terminal_sequences() -> None:
    assert printable("labpc") == "labpc"
    assert printable("a\x1b[31mb\nc\u202ed\\") == "a\\x1b[31mb\\x0ac\\u202ed\\\\"


def test_server_unit_for_port_443_can_bind(tmp_path: Path) -> None:
    def text(listen: str, user: str | None) -> str:
        return service.plan(
            server=True, directory=tmp_path, listen=listen, user=user, system=True, command=["hp"]
        ).text

    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in text("0.0.0.0:443", "homeport")
    assert "AmbientCapabilities" not in text("0.0.0.0:8443", "homeport")


def test_linger_hint_names_the_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("USER", raising=False)
    p = service.plan(server=False, directory=tmp_path, system=False, command=["hp"])
    assert "$USER" not in p.enable_command and "'$USER'" not in p.enable_command
    assert p.enable_command.split()[-1] != ""


@pytest.mark.parametrize("expiry", ["3", "90"])
def test_key_expiry_needs_a_unit(expiry: str, tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "homeport", "keys", "create", "--data", str(tmp_path), "--expiry",
         expiry],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 2
    assert "no unit" in res.stderr and f"{expiry}h" in res.stderr
    assert "Traceback" not in res.stderr


def test_long_node_name_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("hpk1_notarealkey\n")
    res = subprocess.run(
        [sys.executable, "-m", "homeport", "up", "--state", str(tmp_path / "s"), "--server",
         "127.0.0.1:9", "--authkey-file", str(tmp_path / "key"), "--name", "x" * 80],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "the limit is 63" in res.stderr
