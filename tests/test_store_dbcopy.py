"""``store.dbcopy`` (``homeport server migrate-db``): every row, one target transaction, counts.

The target runs on each backend (``db_url``: SQLite, PostgreSQL); the source is a
SQLite file as a server writes it, and the copy is then copied back to SQLite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from homeport.proto.coord import EnrollRequest, NodeRecord, RenewCert, SetAccess, SetSeen
from homeport.store.db import (
    SCHEMA_VERSION,
    NodeRow,
    StoreError,
    metadata,
    normalize_url,
    open_store,
    schema_version,
)
from homeport.store.dbcopy import TargetNotEmpty, copy_database, data_tables
from homeport.store.registry import Registry
from homeport.wire.control import ServiceInfo
from tests.coordsim import PIN, T0
from tests.pgfixture import sqlite_url


def _enroll(registry: Registry, node_id: str, name: str, key_id: str, secret: str) -> None:
    node = NodeRecord(
        node_id=node_id, name=name, fingerprints=(f"sha256:{node_id}",), created_at=T0
    )
    res = registry.enroll(EnrollRequest(0, key_id, secret, node, T0, key_lifetime=100.0))
    assert isinstance(res, NodeRecord), res


def populate(url: str) -> None:
    """State of every kind: users, key kinds, nodes with renewals, a tombstone, services."""
    registry = Registry(open_store(url), server_pin=PIN)
    registry.create_user("alice", T0)
    registry.create_user("bob", T0 + 1)
    user_key = registry.create_auth_key(now=T0, user="alice", reusable=True, note="laptops")
    tag_key = registry.create_auth_key(now=T0, tags=("tag:server",), ephemeral=True)
    registry.create_auth_key(now=T0, expiry_seconds=60.0, approval=True)
    _enroll(registry, "n1", "laptop", user_key.key_id, user_key.secret)
    _enroll(registry, "n2", "db1", tag_key.key_id, tag_key.secret)
    _enroll(registry, "n3", "old", user_key.key_id, user_key.secret)
    registry.apply(SetSeen("n1", T0 + 5, "198.51.100.7:40000"))
    registry.apply(SetAccess("n1", approved=True, expires_at=None, expiry_disabled=True))
    registry.apply(RenewCert("n1", "sha256:n1-renewed", "PEM2", T0 + 9, keep=2))
    registry.store.set_node_announce("n2", (ServiceInfo("ssh", 22),), ("ssh-ed25519 AAAA",))
    registry.remove_node("old", T0 + 20)
    registry.close()


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    store = open_store(url)
    out: dict[str, list[tuple[Any, ...]]] = {}
    with store.transaction(write=False) as conn:
        for name in data_tables():
            table = metadata.tables[name]
            out[name] = sorted(tuple(r) for r in conn.execute(select(table)).all())
    store.close()
    return out


def test_copy_to_each_backend_and_back_keeps_every_value(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    source = sqlite_url(tmp_path / "src")
    populate(source)
    report = copy_database(source, db_url)
    expected = dump(source)
    assert dump(db_url) == expected
    assert dict(report.tables) == {t: len(rows) for t, rows in expected.items()}
    assert report.total == 12 and report.replaced == 0 and report.source_version == SCHEMA_VERSION
    # the copy is a working database: its nodes load and authenticate
    registry = Registry(open_store(db_url), server_pin=PIN)
    nodes = {n.name: n for n in registry.load_nodes()}
    assert nodes["laptop"].fingerprints == ("sha256:n1-renewed", "sha256:n1")
    assert nodes["old"].removed_at == T0 + 20 and nodes["db1"].ephemeral
    registry.close()
    # and back to SQLite (a portable copy of a PostgreSQL server)
    (tmp_path / "back").mkdir()
    back = sqlite_url(tmp_path / "back")
    copy_database(db_url, back)
    assert dump(back) == expected


def test_a_target_with_rows_is_refused_unless_forced(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    source = sqlite_url(tmp_path / "src")
    populate(source)
    target = open_store(db_url)
    target.insert_node(NodeRow("x1", "stranger", "sha256:x1", "PEM", T0))
    target.close()
    held = r"already holds rows \(node_certs 1, nodes 1\); --force"
    with pytest.raises(TargetNotEmpty, match=held):
        copy_database(source, db_url)
    assert {n.name for n in open_store(db_url).list_nodes()} == {"stranger"}  # untouched
    report = copy_database(source, db_url, force=True)
    assert report.replaced == 2
    assert dump(db_url) == dump(source)


def test_a_failed_copy_leaves_the_target_unchanged(pg_url: str, tmp_path: Path) -> None:
    """SQLite keeps a 70-character name VARCHAR(63) does not allow; PostgreSQL refuses it."""
    (tmp_path / "src").mkdir()
    source = sqlite_url(tmp_path / "src")
    populate(source)
    store = open_store(source)
    store.insert_node(NodeRow("n9", "x" * 70, "sha256:n9", "PEM", T0))
    store.close()
    with pytest.raises(StoreError, match="copy failed, the target is unchanged") as info:
        copy_database(source, pg_url)
    assert "\n" not in str(info.value)
    assert all(not rows for rows in dump(pg_url).values())


def test_nonsense_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    a = sqlite_url(tmp_path / "a")
    with pytest.raises(StoreError, match="holds no homeport database"):
        copy_database(a, sqlite_url(tmp_path))
    assert not (tmp_path / "a" / "homeport.db").exists()  # looking did not create it
    populate(a)
    with pytest.raises(StoreError, match="same database"):
        copy_database(a, a)


def test_every_table_is_copied() -> None:
    """The copy is generic: every table of the schema but the version record."""
    assert set(data_tables()) == set(metadata.tables) - {schema_version.name}


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("postgresql://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("postgres://u:p@h:5433/db", "postgresql+psycopg://u:p@h:5433/db"),
        ("postgresql+psycopg://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("sqlite:////var/lib/homeport/homeport.db", "sqlite:////var/lib/homeport/homeport.db"),
        ("sqlite://", "sqlite://"),
    ],
)
def test_urls_mean_psycopg_3(given: str, meant: str) -> None:
    assert normalize_url(given) == meant
