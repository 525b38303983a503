"""Admin commands: offline (no server running), live (through admin.sock), and the real process."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from homeport.server.admin import AdminOps, admin_request, parse_duration
from homeport.server.app import start_server_thread
from homeport.server.cli import register
from homeport.server.datadir import prepare_data_dir
from homeport.store.db import open_store
from homeport.store.registry import Registry
from homeport.wire import authkey

DEADLINE = 20.0


def make_cli() -> click.Group:
    @click.group()
    def cli() -> None:
        pass

    register(cli)
    return cli


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(make_cli(), list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30m", 1800.0), ("1h", 3600.0), ("7d", 604800.0), ("90", 90.0), ("never", None)],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1y", "-1h", "h", "1.5.5h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_no_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    code, out, err = run("keys", "create", "--data", str(tmp_path / "nothing"))
    assert code == 1 and out == ""
    assert "no homeport server data in" in err and "--data DIR" in err


def test_offline_admin_uses_the_store(tmp_path: Path) -> None:
    data = tmp_path / "srv"
    files = prepare_data_dir(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "ca.key").stat().st_mode) == 0o600
    code, out, err = run("keys", "create", "--data", str(data), "--expiry", "1h")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1  # exactly the key, hints on stderr
    key = authkey.parse_untrusted(lines[0])
    assert key.server_pin == files.pin
    assert "homeport up" in err
    code, out, _ = run("keys", "list", "--json", "--data", str(data))
    [listed] = json.loads(out)
    assert listed["key_id"] == key.key_id and listed["status"] == "valid"
    assert key.secret not in out
    code, out, _ = run("keys", "list", "--data", str(data))
    assert key.key_id in out and "valid" in out
    code, out, _ = run("nodes", "list", "--json", "--data", str(data))
    assert code == 0 and json.loads(out) == []
    code, _, err = run("nodes", "remove", "ghost", "--data", str(data))
    assert code == 1 and "no node named 'ghost'" in err
    code, out, _ = run("keys", "revoke", key.key_id, "--json", "--data", str(data))
    assert json.loads(out) == {"key_id": key.key_id, "revoked": True}


def test_env_var_names_the_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "envsrv"
    prepare_data_dir(data)
    code, out, _ = run("keys", "create", "--json", "--reusable", env={"HOMEPORT_DATA": str(data)})
    assert code == 0
    answer = json.loads(out)
    assert answer["reusable"] is True and answer["key"].startswith("hpk1_")


def test_live_admin_through_socket(tmp_path: Path) -> None:
    data = tmp_path / "live"
    with start_server_thread(data) as srv:
        sock = data / "admin.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        ping = admin_request(data, {"op": "ping"})
        assert ping == {"ok": True, "live": True}
        code, out, _ = run("keys", "create", "--expiry", "never", "--data", str(data))
        assert code == 0 and authkey.parse_untrusted(out.strip()).server_pin == srv.pin
        assert admin_request(data, {"op": "bogus"})["ok"] is False
        assert admin_request(data, {"op": "keys.create", "reusable": "yes"})["ok"] is False
    assert not (data / "admin.sock").exists()  # removed on shutdown
    # offline again: the same data, through the store
    assert admin_request(data, {"op": "ping"}) == {"ok": True, "live": False}


def test_second_server_on_same_data_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "one"
    with start_server_thread(data), pytest.raises(RuntimeError, match="already running"):
        start_server_thread(data)


def test_admin_ops_bad_requests() -> None:
    ops = AdminOps(Registry(open_store("sqlite://"), server_pin="sha256:" + "ab" * 32))
    for bad in ([1, 2], {"op": 3}, {"op": "nodes.remove"}, {"op": "keys.revoke", "key_id": "x"}):
        answer = ops.handle(bad)
        assert answer["ok"] is False and answer["error"]
    answer = ops.handle({"op": "keys.create", "expiry_seconds": -5})
    assert answer["ok"] is False and "positive" in answer["error"]


def test_server_process_banner_and_sigterm(tmp_path: Path) -> None:
    """``homeport server`` as a real process: banner, serving, clean exit on SIGTERM."""
    data = tmp_path / "proc"
    code = (
        "import sys, click\n"
        "from homeport.server.cli import register\n"
        "@click.group()\n"
        "def cli(): pass\n"
        "register(cli)\n"
        "cli(sys.argv[1:])\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "server",
            "--data",
            str(data),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("homeport server listening on 127.0.0.1:"), first
        banner = [first] + [proc.stdout.readline() for _ in range(8)]
        text = "".join(banner)
        # the web UI refuses every action to a read token: the banner says which scope
        # ... and, as the keys line, names the data dir (copied as printed, it works)
        assert f"homeport apikeys create --data {data} --name NAME --scope admin" in text, text
        assert "server pin: sha256:" in text and "homeport keys create" in text
        assert "homeport up --server" in text
        answer = admin_request(data, {"op": "ping"})
        assert answer == {"ok": True, "live": True}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
        _, err = proc.communicate(timeout=DEADLINE)
        assert "shutting down" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE)


def test_keys_with_tags_need_the_policys_tag_owners(tmp_path: Path) -> None:
    ops = AdminOps(
        Registry(open_store("sqlite://"), server_pin="sha256:" + "ab" * 32), data_dir=tmp_path
    )

    def create(*tags: str) -> dict[str, object]:
        return ops.handle({"op": "keys.create", "tags": list(tags)})

    assert create("tag:anything")["ok"] is True  # no policy in force: any tag
    policy = '{"tagOwners": {"tag:lab": ["admin@example.com"]}, "acls": []}'
    assert ops.handle({"op": "policy.set", "text": policy})["ok"] is True
    assert create("tag:lab")["ok"] is True
    assert create()["ok"] is True
    refused = create("tag:lab", "tag:labb")
    assert refused["ok"] is False
    assert refused["error"] == (
        "tag 'tag:labb' is not declared in the policy's tagOwners; "
        "declare it there first (homeport policy set)"
    )
    assert len(ops.handle({"op": "keys.list"})["keys"]) == 3
    (tmp_path / "policy.hujson").write_text("{", encoding="utf-8")  # broken: refuse, one line
    broken = create("tag:lab")
    assert broken["ok"] is False and "\n" not in str(broken["error"])


def test_db_in_a_missing_directory_names_db_and_the_path(tmp_path: Path) -> None:
    """``--db sqlite:///REL`` is relative to the current directory (SQLAlchemy's reading);
    a missing directory is a one-line error naming --db, not --listen, and leaves no files."""
    code = (
        "import sys, click\n"
        "from homeport.server.cli import register\n"
        "@click.group()\n"
        "def cli(): pass\n"
        "register(cli)\n"
        "cli(sys.argv[1:])\n"
    )
    for url, shown in (
        ("sqlite:///nonexistent/dir/x.db", "'nonexistent/dir/x.db' (relative to the current"),
        (f"sqlite:///{tmp_path}/nope/x.db", f"'{tmp_path}/nope/x.db' (absolute)"),
    ):
        data = tmp_path / "data"
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                "server",
                "--data",
                str(data),
                "--listen",
                "127.0.0.1:0",
                "--db",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=DEADLINE * 3,
            cwd=tmp_path,
        )
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr and "--listen" not in res.stderr
        [line] = [ln for ln in res.stderr.splitlines() if "cannot start" in ln]
        assert "cannot start: --db: SQLite file " + shown in line, line
        assert not data.exists()


def test_migrate_db_refusal_while_running_reads_well(tmp_path: Path) -> None:
    data = tmp_path / "live"
    with start_server_thread(data):
        code, _, err = run(
            "server", "migrate-db", "--from", str(data), "--to", f"sqlite:///{tmp_path}/t.db"
        )
    assert code == 1
    assert "a server is running" in err and "stop it first" in err
    assert "see still" not in err and "nothing writes to" in err
