"""The real server on PostgreSQL, and ``homeport server migrate-db`` from SQLite, end to end.

Real processes on loopback: ``homeport server --db postgresql://…``, agents,
OpenSSH through the relay; a PostgreSQL schema per test (tests/pgfixture.py).
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from homeport.store.db import PG_DRIVER_MISSING, StoreError, open_store
from homeport.testing.sshd import make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport

pytestmark = pytest.mark.integration


def _need_sshd() -> None:
    ok, why = sshd_available()
    if not ok:
        pytest.skip(f"needs OpenSSH sshd: {why}")


def _ssh_echo(hp: Homeport, sshd_key: Path, user: str, word: str) -> None:
    ssh = hp.ssh_args(hp.state("laptop"), sshd_key, user)
    res = subprocess.run(
        [*ssh, "labpc", "echo", word], capture_output=True, text=True, timeout=60, env=hp.env
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == word


def test_server_on_postgresql_enrolls_and_carries_ssh(tmp_path: Path, pg_url: str) -> None:
    _need_sshd()
    hp = Homeport(tmp_path)
    sshd = make_sshd(tmp_path / "sshd")
    try:
        sshd.start()
        server = hp.start_server(extra=["--db", pg_url])
        lab = hp.up("labpc", "--expose", f"ssh=127.0.0.1:{sshd.port}")
        hp.wait_online("labpc", lab)
        laptop = hp.up("laptop")
        hp.wait_online("laptop", laptop)
        _ssh_echo(hp, sshd.client_key, sshd.user, "via-postgresql")
        assert "postgresql+psycopg://" in hp.log("server")  # the start says which database
        # the state is in PostgreSQL, not in a SQLite file next to it
        assert not (hp.data_dir / "homeport.db").exists()
        store = open_store(pg_url)
        assert {n.name for n in store.list_nodes()} == {"labpc", "laptop"}
        store.close()
        # the URL is remembered (0600: it may carry a password) for admin commands offline
        recorded = hp.data_dir / "database.url"
        assert recorded.read_text().strip() == pg_url
        assert stat.S_IMODE(recorded.stat().st_mode) == 0o600
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0, hp.log("server")
        assert {n["name"] for n in hp.nodes()} == {"labpc", "laptop"}  # offline, from PG
        assert not (hp.data_dir / "homeport.db").exists()
    finally:
        hp.close()
        sshd.stop()


def test_migrate_db_from_sqlite_then_agents_reconnect_on_postgresql(
    tmp_path: Path, pg_url: str
) -> None:
    _need_sshd()
    hp = Homeport(tmp_path)
    sshd = make_sshd(tmp_path / "sshd")
    try:
        sshd.start()
        server = hp.start_server()
        host, port = hp.server_addr.rsplit(":", 1)
        lab = hp.up("labpc", "--expose", f"ssh=127.0.0.1:{sshd.port}")
        hp.wait_online("labpc", lab)
        laptop = hp.up("laptop")
        hp.wait_online("laptop", laptop)
        data = str(hp.data_dir)
        hp.run([*HOMEPORT, "users", "create", "alice", "--data", data])
        unused_key = hp.keys_create("--user", "alice", "--reusable")
        before = {n["name"]: n["node_id"] for n in hp.nodes()}
        migrate = [*HOMEPORT, "server", "migrate-db", "--from", data, "--to", pg_url]

        busy = hp.run(migrate, check=False)
        assert busy.returncode == 1 and "a server is running" in busy.stderr, busy.stderr
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0, hp.log("server")

        done = hp.run(migrate)
        assert "one transaction; row counts verified" in done.stdout, done.stdout
        rows = dict(
            line.split()
            for line in done.stdout.splitlines()
            if line.split()[:1] in (["nodes"], ["auth_keys"], ["users"], ["node_certs"])
        )
        assert rows == {"nodes": "2", "node_certs": "2", "auth_keys": "3", "users": "1"}
        password = make_url(pg_url).password
        assert "***" in done.stdout and (not password or password not in done.stdout)

        again = hp.run(migrate, check=False)  # the target holds rows now
        assert again.returncode == 1, again.stdout
        assert "already holds rows" in again.stderr and "--force" in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1, again.stderr
        forced = hp.run([*migrate, "--force", "--json"])
        report = json.loads(forced.stdout)
        assert report["replaced"] == 8 and report["tables"]["nodes"] == 2

        # the server on PostgreSQL: the running agents reconnect with their identities
        hp.start_server(host, int(port), extra=["--db", pg_url])
        hp.wait_online("labpc", lab, timeout=35)
        hp.wait_online("laptop", laptop, timeout=35)
        assert {n["name"]: n["node_id"] for n in hp.nodes()} == before
        _ssh_echo(hp, sshd.client_key, sshd.user, "migrated")
        late = hp.up("late", key=unused_key)  # a key made on SQLite enrolls on PostgreSQL
        hp.wait_online("late", late)
        assert next(n for n in hp.nodes() if n["name"] == "late")["user"] == "alice"
    finally:
        hp.close()
        sshd.stop()


def test_missing_driver_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    with pytest.raises(StoreError) as info:
        open_store("postgresql://u:p@127.0.0.1/db")
    assert str(info.value) == PG_DRIVER_MISSING
    # and the server says it in one line, no traceback
    code = (
        "import sys; sys.modules['psycopg'] = None; "
        "from homeport.__main__ import main; "
        f"sys.argv = ['homeport', 'server', '--data', {str(tmp_path / 'd')!r}, "
        "'--listen', '127.0.0.1:0', '--db', 'postgresql://u:p@127.0.0.1/db']; main()"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    [line] = [ln for ln in res.stderr.splitlines() if "cannot start" in ln]
    assert line.endswith(f"cannot start: --db: {PG_DRIVER_MISSING}")
    assert not (tmp_path / "d").exists()  # checked before the CA and TLS files are made


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("mysql://u:p@127.0.0.1/db", "unsupported database 'mysql'"),
        ("postgresql+psycopg2://u:p@127.0.0.1/db", "unsupported database"),
        ("not a url", "cannot parse the database URL"),
    ],
)
def test_unsupported_urls_are_refused_in_one_line(url: str, needle: str) -> None:
    with pytest.raises(StoreError, match=needle) as info:
        open_store(url)
    assert "\n" not in str(info.value)


def test_unreachable_postgresql_is_one_line_without_the_password() -> None:
    closed = "postgresql://someone:s3cret@127.0.0.1:1/db"  # port 1: nothing listens
    with pytest.raises(StoreError) as info:
        open_store(closed)
    text = str(info.value)
    assert text.startswith("cannot open database postgresql+psycopg://someone:***@127.0.0.1:1/db")
    assert "s3cret" not in text and "\n" not in text


def test_the_db_url_is_remembered_and_cleared(tmp_path: Path) -> None:
    from homeport.server.datadir import recorded_db_url, remember_db_url, resolve_db_url

    sqlite_here = f"sqlite:///{tmp_path}/homeport.db"
    assert resolve_db_url(tmp_path, None) == sqlite_here
    remember_db_url(tmp_path, None)  # no --db: nothing recorded
    assert recorded_db_url(tmp_path) is None
    pg = "postgresql://hp:secret@192.0.2.5/hp"
    remember_db_url(tmp_path, pg)
    assert resolve_db_url(tmp_path, None) == pg
    assert stat.S_IMODE((tmp_path / "database.url").stat().st_mode) == 0o600
    assert resolve_db_url(tmp_path, "sqlite:////elsewhere.db") == "sqlite:////elsewhere.db"
    remember_db_url(tmp_path, sqlite_here)  # back to the embedded default
    assert recorded_db_url(tmp_path) is None and resolve_db_url(tmp_path, None) == sqlite_here


def test_listings_survive_non_finite_times_stored_on_postgresql(pg_url: str) -> None:
    """PostgreSQL keeps Infinity and NaN in a double column (SQLite turns NaN into NULL):
    rows an older version stored that way list as never expiring, and the answers stay
    valid JSON."""
    from homeport.server.admin import AdminOps
    from homeport.store.registry import Registry

    registry = Registry(open_store(pg_url), server_pin="sha256:" + "ab" * 32)
    try:
        for bad in (float("inf"), float("nan")):  # the registry, as older ops called it
            registry.create_auth_key(now=1000.0, reusable=False, expiry_seconds=bad)
        ops = AdminOps(registry, clock=lambda: 2000.0)
        answer = ops.handle({"op": "keys.list"})
        assert answer["ok"] and [k["expires_at"] for k in answer["keys"]] == [None, None]
        json.dumps(answer, allow_nan=False)
        refused = ops.handle({"op": "keys.create", "expiry_seconds": float("inf")})
        assert refused["ok"] is False and "expiry_seconds" in refused["error"]
    finally:
        registry.close()
