"""Finding 6: data and state directories another user can write into, planted symlinks.

As root (this suite runs as root in the lab) a directory and a symlink are given to
another uid, exactly the attack of docs/reliability.md: a root server told
``--data /tmp/x``, where another user prepared ``/tmp/x/ca.key`` as a symlink to a file
of theirs, must not write the CA key into it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from homeport.node import state
from homeport.node.files import UnsafeDirectory, atomic_write, open_append, safe_dir
from homeport.server.datadir import prepare_data_dir
from homeport.store.db import default_url, open_store

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another uid")


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_world_writable_sticky_dir_is_refused_and_not_chmodded(tmp_path: Path) -> None:
    shared = tmp_path / "tmp-like"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(UnsafeDirectory, match="writable by others"):
        prepare_data_dir(shared)
    assert mode(shared) == 0o1777  # the sticky bit and the mode are left alone
    assert list(shared.iterdir()) == []
    with pytest.raises(UnsafeDirectory):
        state.ensure_dir(shared)


def test_group_writable_dir_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "g"
    d.mkdir()
    os.chmod(d, 0o770)
    with pytest.raises(UnsafeDirectory, match="its group"):
        safe_dir(d)
    assert mode(d) == 0o770


def test_own_readable_dir_is_tightened_and_db_is_private(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    os.chmod(d, 0o755)
    prepare_data_dir(d)
    assert mode(d) == 0o700
    assert mode(d / "ca.key") == 0o600
    store = open_store(default_url(str(d)))
    store.close()
    assert mode(d / "homeport.db") == 0o600


@as_root
def test_planted_symlink_in_another_users_dir_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim-file"
    victim.write_bytes(b"the other user's data\n")
    os.chown(victim, NOBODY, NOBODY)
    planted = tmp_path / "x"
    planted.mkdir(mode=0o755)
    (planted / "ca.key").symlink_to(victim)
    os.lchown(planted / "ca.key", NOBODY, NOBODY)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(UnsafeDirectory, match=f"owned by uid {NOBODY}"):
        prepare_data_dir(planted)
    assert victim.read_bytes() == b"the other user's data\n"
    assert (planted / "ca.key").is_symlink()
    assert mode(planted) == 0o755  # nothing changed


def test_symlink_at_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    d = safe_dir(tmp_path / "own")
    (d / "node.key").symlink_to(victim)
    atomic_write(d / "node.key", b"secret")
    assert victim.read_bytes() == b"keep"
    assert not (d / "node.key").is_symlink() and (d / "node.key").read_bytes() == b"secret"
    (d / "audit.log").symlink_to(victim)
    with pytest.raises(OSError):  # ELOOP: O_NOFOLLOW
        open_append(d / "audit.log")
    assert victim.read_bytes() == b"keep"
