"""``homeport users``, the new ``keys create`` options and ``nodes approve|expire|extend|…``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from homeport.io.dial import enroll
from homeport.server.app import start_server_thread
from homeport.server.datadir import prepare_data_dir
from homeport.wire import authkey
from tests.test_server_cli import run


def test_users_and_bound_keys_offline(tmp_path: Path) -> None:
    data = tmp_path / "srv"
    prepare_data_dir(data)
    d = ("--data", str(data))
    assert run("users", "create", "alice@example.com", *d)[:2] == (
        0,
        "created user alice@example.com\n",
    )
    code, _, err = run("users", "create", "alice@example.com", *d)
    assert code == 1 and "already exists" in err
    code, _, err = run("users", "create", "Alice", *d)
    assert code == 1 and "bad user name" in err
    code, out, _ = run("users", "list", "--json", *d)
    assert [u["name"] for u in json.loads(out)] == ["alice@example.com"]
    code, out, err = run("keys", "create", "--user", "alice@example.com", "--approval", *d)
    assert code == 0 and len(out.splitlines()) == 1
    assert "user alice@example.com" in err and "needs approval" in err
    code, _, err = run("keys", "create", "--user", "bob", *d)
    assert code == 1 and "no user 'bob'" in err and "users create" in err
    code, _, err = run("keys", "create", "--tag", "server", *d)
    assert code == 1 and "bad tag" in err
    code, _, err = run("keys", "create", "--tag", "tag:db", "--user", "alice@example.com", *d)
    assert code == 1 and "not both" in err
    code, out, _ = run("keys", "create", "--tag", "tag:db", "--ephemeral", "--json", *d)
    made = json.loads(out)
    assert (made["tags"], made["ephemeral"], made["user"]) == (["tag:db"], True, "")
    code, out, _ = run("keys", "list", *d)
    assert "alice@example.com" in out and "approval" in out and "tag:db" in out
    assert "ephemeral" in out
    code, out, _ = run("users", "remove", "alice@example.com", *d)
    assert code == 0 and out == "removed user alice@example.com\n"
    code, _, err = run("users", "remove", "alice@example.com", *d)
    assert code == 1 and "no user" in err


def test_server_key_expiry_option_is_checked() -> None:
    code, _, err = run("server", "--key-expiry", "1h", "--data", "/nonexistent")
    assert code == 2 and "at least 1d" in err
    code, _, err = run("server", "--key-expiry", "soon", "--data", "/nonexistent")
    assert code == 2 and "--key-expiry" in err


def test_live_approval_expiry_and_user_removal(tmp_path: Path) -> None:
    data = tmp_path / "live"
    d = ("--data", str(data))
    with start_server_thread(data) as srv:
        server = f"{srv.host}:{srv.port}"
        assert run("users", "create", "alice", *d)[0] == 0
        key = run("keys", "create", "--user", "alice", "--approval", "--reusable", *d)[1].strip()
        authkey.parse_untrusted(key)
        enroll(server, key, "laptop", tmp_path / "s1")
        enroll(server, key, "phone", tmp_path / "s2")
        code, out, err = run("nodes", "list", *d)
        assert code == 0 and "pending" in out and "alice" in out
        assert "laptop waits for approval: homeport nodes approve laptop" in err
        assert run("nodes", "approve", "laptop", *d)[1] == "approved laptop\n"
        code, out, _ = run("nodes", "list", "--json", *d)
        by_name = {n["name"]: n for n in json.loads(out)}
        assert by_name["laptop"]["approved"] and not by_name["phone"]["approved"]
        # 180 days by default for a user's node
        left = by_name["laptop"]["expires_at"] - time.time()
        assert 179 * 86400 < left <= 180 * 86400
        code, out, _ = run("nodes", "expire", "laptop", *d)
        assert out == "laptop: node key expired now\n"
        code, out, err = run("nodes", "list", *d)
        assert "EXPIRED" in out and "laptop: node key expired (homeport nodes extend laptop)" in err
        code, out, _ = run("nodes", "extend", "laptop", "--json", *d)
        assert json.loads(out)["expires_at"] > time.time() + 179 * 86400
        code, out, _ = run("nodes", "disable-expiry", "laptop", *d)
        assert out == "laptop: key expiry disabled\n"
        code, _, err = run("nodes", "approve", "ghost", *d)
        assert code == 1 and "no node named 'ghost'" in err
        code, _, err = run("users", "remove", "alice", *d)
        assert code == 1 and "2 node(s): laptop, phone" in err and "--force" in err
        code, out, _ = run("users", "remove", "alice", "--force", *d)
        assert out == "removed user alice and laptop, phone\n"
        code, out, _ = run("nodes", "list", "--json", *d)
        assert json.loads(out) == []
        code, out, _ = run("keys", "list", "--json", *d)
        assert [k["status"] for k in json.loads(out)] == ["revoked"]


def test_status_shows_pending_approval_and_expiry() -> None:
    from dataclasses import replace

    from homeport.client.status import self_status
    from homeport.wire import control as m

    now = 1_800_000_000.0
    base = m.Welcome(proto=1, node_id="n1", name="laptop", ping_interval=5.0)
    assert self_status(base, now).warnings == ()
    pending = self_status(replace(base, approved=False), now)
    assert not pending.approved and "homeport nodes approve laptop" in pending.warnings[0]
    soon = self_status(replace(base, expires_at=now + 3 * 86400), now)
    [warning] = soon.warnings
    assert "in 3 days" in warning and "homeport nodes extend laptop" in warning
    far = self_status(replace(base, expires_at=now + 30 * 86400), now)
    assert far.warnings == () and far.as_json()["key_expires_at"] == now + 30 * 86400


def test_scrub_argv_drops_only_a_literal_key() -> None:
    from homeport.agent.cli import _scrub_argv

    assert _scrub_argv(["up", "--authkey", "K", "--name", "x"]) == ["up", "--name", "x"]
    assert _scrub_argv(["up", "--authkey=K", "--ssh"]) == ["up", "--ssh"]
    assert _scrub_argv(["up", "--authkey", "-"]) is None  # stdin: nothing to hide
    assert _scrub_argv(["up", "--name", "x"]) is None


def test_bad_authkey_inputs_are_clear_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from homeport.agent.cli import up

    def fails(args: list[str], needle: str, stdin: str | None = None) -> None:
        env = {"HOMEPORT_AUTHKEY": ""}
        res = CliRunner().invoke(up, [*args, "--state", str(tmp_path / "s")], stdin, env=env)
        assert res.exit_code == 2, res.output
        assert needle in res.stderr

    fails(["--authkey-file", str(tmp_path / "missing")], "cannot read auth key file")
    big = tmp_path / "big"
    big.write_text("x" * 5000)
    fails(["--authkey-file", str(big)], "longer than 4096 bytes")
    two = tmp_path / "two"
    two.write_text("hpk1_a\nhpk1_b\n")
    fails(["--authkey-file", str(two)], "exactly one auth key line")
    fails(["--authkey", "-"], "exactly one auth key line", stdin="")
    fails(["--authkey", "k", "--authkey-file", str(two)], "one way only")
