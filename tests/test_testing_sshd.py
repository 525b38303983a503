"""Self-tests for homeport.testing.sshd: the real-OpenSSH fixture must itself be trustworthy.

Every end-to-end test leans on this fixture, so these tests pin down the parts a
silent mistake would hide: host-key pinning really is strict, the printed
known_hosts lines are valid, and stop() really ends the server.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import homeport
from homeport.testing.sshd import SshdServer, make_sshd, sshd_available

_OK, _REASON = sshd_available()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not _OK, reason=_REASON),
]


def _ssh(
    sshd: SshdServer, *argv: str, known_hosts: Path | None = None, alias: str | None = None
) -> subprocess.CompletedProcess[str]:
    extra = ["-o", f"HostKeyAlias={alias}"] if alias else []
    return subprocess.run(
        [*sshd.ssh_base_args(known_hosts), *extra, "-p", str(sshd.port), sshd.host, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ssh_echo_with_strict_host_key_checking(tmp_path: Path) -> None:
    with make_sshd(tmp_path / "sshd") as sshd:
        assert sshd.process is not None
        proc = _ssh(sshd, "echo", "ok")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "ok\n"


def test_known_hosts_lines_are_well_formed(tmp_path: Path) -> None:
    sshd = make_sshd(tmp_path / "sshd")  # not started: key material only
    text = sshd.known_hosts_line("relay.example")
    lines = text.splitlines()
    assert text.endswith("\n")
    assert len(lines) == len(sshd.host_key_pubs) == 2
    types = set()
    for line in lines:
        hostname, key_type, blob_b64 = line.split(" ")
        assert hostname == "relay.example"
        blob = base64.b64decode(blob_b64, validate=True)
        # An SSH public key blob starts with its own type as a length-prefixed string.
        (length,) = struct.unpack(">I", blob[:4])
        assert blob[4 : 4 + length].decode() == key_type
        types.add(key_type)
    assert types == {"ssh-ed25519", "ecdsa-sha2-nistp256"}

    direct = (sshd.workdir / "known_hosts_direct").read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in direct] == [f"[127.0.0.1]:{sshd.port}"] * 2


def test_pinned_alias_accepted_and_wrong_key_rejected(tmp_path: Path) -> None:
    """Pinning under another name works, and a mismatching pin is refused.

    The relay reaches sshd under the node's name, so tests pin with
    known_hosts_line(alias) + HostKeyAlias; the negative half proves
    StrictHostKeyChecking would catch a wrong server.
    """
    with make_sshd(tmp_path / "sshd") as sshd:
        pinned = tmp_path / "known_hosts_alias"
        pinned.write_text(sshd.known_hosts_line("node-a"))
        ok = _ssh(sshd, "echo", "ok", known_hosts=pinned, alias="node-a")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout == "ok\n"

        other = make_sshd(tmp_path / "other")  # different host keys, never started
        pinned.write_text(other.known_hosts_line("node-a"))
        bad = _ssh(sshd, "echo", "ok", known_hosts=pinned, alias="node-a")
        assert bad.returncode == 255
        assert bad.stdout == ""
        assert "verification failed" in bad.stderr or "CHANGED" in bad.stderr


def test_stop_ends_server_and_is_idempotent(tmp_path: Path) -> None:
    sshd = make_sshd(tmp_path / "sshd")
    with sshd:
        assert sshd.process is not None
        pid = sshd.process.pid
    assert sshd.process is None
    assert not Path(f"/proc/{pid}").exists()
    sshd.stop()  # second stop: no-op
    with pytest.raises(ConnectionRefusedError), socket.socket() as sock:
        sock.settimeout(2.0)
        sock.connect((sshd.host, sshd.port))


def test_bad_extra_config_is_reported(tmp_path: Path) -> None:
    sshd = make_sshd(tmp_path / "sshd", extra_config="NoSuchKeyword yes")
    with pytest.raises(RuntimeError, match="NoSuchKeyword"):
        sshd.start()
    assert sshd.process is None


def _as_user(user: str) -> list[str]:
    # Through `env`: setpriv itself may resolve an inaccessible path
    # differently from how the unprivileged process would.
    return ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", "env"]


def _python_for(user: str) -> str:
    """A Python >= 3.11 that ``user`` may execute (root's pyenv build often is not)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(
            [*_as_user(user), candidate, "-c", "import sys; assert sys.version_info >= (3, 11)"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if probe.returncode == 0:
            return candidate
    pytest.skip(f"no Python >= 3.11 executable by {user}")


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to drop privileges",
)
def test_starts_unprivileged() -> None:
    """sshd starts and stops as a non-root user (developers run tests unprivileged).

    Only start/accept/stop is checked: the sole unprivileged account here,
    'nobody', is locked, and with UsePAM off sshd refuses locked accounts.
    """
    src = str(Path(homeport.__file__).resolve().parents[1])
    python = _python_for("nobody")
    script = (
        "import sys; from pathlib import Path; from homeport.testing.sshd import make_sshd\n"
        "s = make_sshd(Path(sys.argv[1]))\n"
        "with s:\n"
        "    assert s.user == 'nobody', s.user\n"
        "    pid = s.process.pid\n"
        "assert not Path(f'/proc/{pid}').exists()\n"
        "print('started-and-stopped')\n"
    )
    # pytest's tmp_path lives under a 0700 root directory, so use a fresh
    # directory the unprivileged user can enter.
    with tempfile.TemporaryDirectory(prefix="hp-sshd-nobody-") as tmp:
        os.chmod(tmp, 0o755)
        workdir = Path(tmp) / "w"
        workdir.mkdir()
        shutil.chown(workdir, "nobody", "nogroup")
        proc = subprocess.run(
            [
                *_as_user("nobody"),
                f"PYTHONPATH={src}",
                f"HOME={tmp}",
                python,
                "-c",
                script,
                str(workdir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "started-and-stopped"
