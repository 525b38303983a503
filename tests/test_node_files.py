"""The one atomic writer: exact modes, no half-written files, never through a symlink."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from homeport.node import files


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_modes_are_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        files.write_private(tmp_path / "key", b"secret")
        files.write_public(tmp_path / "crt", b"cert")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "key") == 0o600 and _mode(tmp_path / "crt") == 0o644
    old = os.umask(0o077)
    try:
        files.write_public(tmp_path / "crt2", b"cert")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "crt2") == 0o644


def test_replaces_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "node.json"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    files.write_private(target, b"new" * 100_000)
    assert target.read_bytes() == b"new" * 100_000 and _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.json"]


def test_a_symlink_target_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "authorized_keys"
    victim.write_bytes(b"keep me")
    link = tmp_path / "known_hosts"
    link.symlink_to(victim)
    files.write_private(link, b"host keys")
    assert victim.read_bytes() == b"keep me"
    assert not link.is_symlink() and link.read_bytes() == b"host keys"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "node.key"
    target.write_bytes(b"old key")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        files.write_private(target, b"new key")
    assert target.read_bytes() == b"old key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


def test_temporary_names_are_created_exclusively(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that already exists (planted, or a clash) is never opened: another is tried."""
    names = iter([b"\x00" * 4, b"\x00" * 4, b"\x01" * 4])
    monkeypatch.setattr(os, "urandom", lambda n: next(names))
    planted = tmp_path / f".f.{os.getpid()}.00000000.tmp"
    planted.symlink_to(tmp_path / "elsewhere")
    files.write_public(tmp_path / "f", b"data")
    assert (tmp_path / "f").read_bytes() == b"data"
    assert planted.is_symlink() and not (tmp_path / "elsewhere").exists()
