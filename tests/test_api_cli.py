"""``homeport apikeys`` and ``homeport server --admin-listen``: the operator's side of the API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from homeport.server import apikeys
from homeport.server.admin import AdminError, AdminOps
from homeport.server.app import _start_admin_http
from homeport.server.cli import DEFAULT_ADMIN_LISTEN as CLI_DEFAULT
from homeport.server.datadir import prepare_data_dir
from homeport.server.web.listener import DEFAULT_ADMIN_LISTEN, parse_admin_listen
from homeport.store.db import SCHEMA_VERSION, default_url, open_store
from homeport.store.registry import ApiKeyRow, Registry
from tests.test_server_cli import DEADLINE, run


def test_apikeys_create_list_revoke_offline(tmp_path: Path) -> None:
    data = tmp_path / "server"
    prepare_data_dir(data)
    d = ("--data", str(data))
    code, out, err = run("apikeys", "create", "--name", "grafana", *d)
    assert code == 0, err
    [token] = out.splitlines()  # only the token on stdout: TOKEN=$(homeport apikeys create ...)
    key_id = apikeys.token_key_id(token)
    assert key_id is not None and f"API key {key_id}, scope read, never expires" in err
    code, out, err = run("apikeys", "list", *d)
    assert code == 0 and out.splitlines()[0].split() == [
        "KEY",
        "ID",
        "NAME",
        "SCOPE",
        "USER",
        "STATUS",
        "CREATED",
        "EXPIRES",
    ]
    assert out.splitlines()[1].split()[:5] == [key_id, "grafana", "read", "-", "valid"]
    assert token not in out
    code, out, err = run("apikeys", "create", "--name", "ops", "--scope", "admin", "--json", *d)
    made = json.loads(out)
    assert code == 0 and made["scope"] == "admin" and made["token"].startswith("hpk_")
    code, out, err = run("apikeys", "revoke", key_id, *d)
    assert code == 0 and out == f"revoked API key {key_id}\n"
    code, out, err = run("apikeys", "list", "--json", *d)
    assert {k["key_id"]: k["status"] for k in json.loads(out)}[key_id] == "revoked"
    assert "hpk_" not in out
    code, out, err = run("apikeys", "revoke", "000000000000", *d)
    assert code == 1 and err.strip() == "Error: no API key '000000000000'"
    # the audit log has both
    events = [json.loads(ln) for ln in (data / "audit.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["event"]) for e in events] == [
        ("api-key", "create"),
        ("api-key", "create"),
        ("api-key", "revoke"),
    ]


def test_apikeys_create_refusals_are_one_line(tmp_path: Path) -> None:
    data = tmp_path / "server"
    prepare_data_dir(data)
    d = ("--data", str(data))
    code, out, err = run("apikeys", "create", "--name", "x", "--user", "nobody", *d)
    assert code == 1 and out == "" and err.strip().startswith("Error: no user 'nobody'")
    code, out, err = run("apikeys", "create", "--name", "x", "--scope", "root", *d)
    assert code == 2 and "'root' is not one of 'read', 'admin'" in err
    code, out, err = run("apikeys", "create", "--name", "x", "--expiry", "30", *d)
    assert code == 2 and "has no unit" in err
    code, out, err = run("apikeys", "create", *d)
    assert code == 2 and "Missing option '--name'" in err
    code, out, err = run("apikeys", "create", "--name", "x", "--expiry", "30d", "--json", *d)
    assert code == 0 and json.loads(out)["expires_at"] is not None


def test_admin_listen_values() -> None:
    assert CLI_DEFAULT == DEFAULT_ADMIN_LISTEN  # the CLI keeps a copy (no uvicorn at --help)
    assert parse_admin_listen("127.0.0.1:8445") == ("127.0.0.1", 8445)
    assert parse_admin_listen("[::1]:0") == ("::1", 0)
    assert parse_admin_listen("off") is None
    for bad in ("8445", ":8445", "localhost:http", "127.0.0.1:70000"):
        with pytest.raises(ValueError, match="--admin-listen"):
            parse_admin_listen(bad)
    code, out, err = run("server", "--admin-listen", "nowhere", "--data", "/nonexistent")
    assert code == 2 and "--admin-listen 'nowhere': expected HOST:PORT" in err
    assert "Traceback" not in err
    code, out, err = run("server", "--help")
    assert "--admin-listen ADDR:PORT|off" in out and "127.0.0.1:8445" in out


def test_a_busy_admin_port_fails_the_start_only_when_chosen(tmp_path: Path) -> None:
    files = prepare_data_dir(tmp_path / "server")
    ops = AdminOps(Registry(open_store("sqlite://"), server_pin=files.pin))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(AdminError, match=f"cannot serve the admin API on {listen}"):
            asyncio.run(_start_admin_http(listen, False, ops, files))
        assert asyncio.run(_start_admin_http(listen, True, ops, files)) is None


def test_server_process_serves_the_api_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "proc"
    code = (
        "import sys, click\n"
        "from homeport.server.cli import register\n"
        "@click.group()\n"
        "def cli(): pass\n"
        "register(cli)\n"
        "cli(sys.argv[1:])\n"
    )
    argv = ["server", "--data", str(data), "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv, "--admin-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(8)]
        [line] = [ln for ln in lines if "admin API:" in ln]
        url = line.split()[2]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api/v1"), line
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url + "/status", timeout=DEADLINE)
        assert info.value.code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE)
    # an explicit address that cannot be served fails the start with one line
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-c", code, *argv, "--admin-listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode == 1
    assert f"cannot start: cannot serve the admin API on 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_schema_3_database_gains_the_api_keys_table(tmp_path: Path) -> None:
    store = open_store(default_url(str(tmp_path)))
    store.close()
    db = sqlite3.connect(tmp_path / "homeport.db")  # back to schema 3: no api_keys yet
    db.execute("DROP TABLE api_keys")
    db.execute("UPDATE schema_version SET version = 3")
    db.commit()
    db.close()
    store = open_store(default_url(str(tmp_path)))
    assert store.schema_version() == SCHEMA_VERSION == 4
    registry = Registry(store, server_pin="pin")
    row = ApiKeyRow("k1", apikeys.hash_token("t"), "n", "read", 1.0)
    registry.create_api_key(row)
    assert registry.find_api_key_by_hash(apikeys.hash_token("t")) == row
    assert registry.revoke_api_key("k1") and not registry.revoke_api_key("k2")
    assert registry.list_api_keys()[0].revoked
    store.close()


def test_judge_key_reasons() -> None:
    """The pure decision behind every 401: each reason, and the happy path."""
    base = {
        "token": "tok",
        "stored_hash": apikeys.hash_token("tok"),
        "key_id": "k",
        "name": "n",
        "scope": "admin",
        "user": None,
        "user_exists": True,
        "revoked": False,
        "expires_at": 100.0,
        "now": 50.0,
    }

    def judge(**kw: object) -> apikeys.KeyVerdict:
        return apikeys.judge_key(**{**base, **kw})  # type: ignore[arg-type]

    assert judge().principal == apikeys.ApiPrincipal("k", "n", apikeys.Scope.ADMIN, None)
    assert judge(stored_hash=None).reason == "unknown token"
    assert judge(token="other").reason == "unknown token"
    assert judge(revoked=True).reason == "API key k is revoked"
    assert judge(now=100.0).reason == "API key k expired"
    assert judge(user="alice", user_exists=False).reason == (
        "API key k belongs to removed user 'alice'"
    )
    assert judge(scope="root").principal is None
    assert apikeys.Scope.ADMIN.allows(apikeys.Scope.ADMIN)
    assert not apikeys.Scope.READ.allows(apikeys.Scope.ADMIN)
    new = apikeys.new_token()
    assert apikeys.token_key_id(new.token) == new.key_id
    assert new.token_hash == apikeys.hash_token(new.token)
    assert apikeys.token_key_id(new.token + "!") is None
    assert apikeys.token_key_id("x" * 1000) is None


def test_apikeys_revoke_takes_a_whole_token_and_never_echoes_a_secret(tmp_path: Path) -> None:
    data = tmp_path / "server"
    prepare_data_dir(data)
    d = ("--data", str(data))
    code, token, err = run("apikeys", "create", "--name", "ci", *d)
    token = token.strip()
    key_id = apikeys.token_key_id(token)
    code, out, err = run("apikeys", "revoke", token, *d)  # pasted the token: its key goes
    assert code == 0 and out == f"revoked API key {key_id}\n" and token not in out + err
    secret = token.split("_", 2)[2]
    for mangled in (token + "!", f"hpk_{secret}", secret):
        code, out, err = run("apikeys", "revoke", mangled, *d)
        assert code == 1 and secret not in out + err and secret[:20] not in err, err
        assert "give the key id" in err and "\n" not in err.strip()
