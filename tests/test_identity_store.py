"""Schema 3 on real SQLite files: the 2 → 3 migration, users, auth-key kinds, node access state."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeport.proto.coord import (
    EnrollRefused,
    EnrollRequest,
    NodeRecord,
    RenewCert,
    SetAccess,
)
from homeport.store.db import SCHEMA_VERSION, default_url, open_store
from homeport.store.registry import Registry
from tests.coordsim import PIN, T0

# The exact schema-2 tables a 0.2 server wrote (copied from that release's DDL, not generated).
SCHEMA_2 = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (2);
CREATE TABLE nodes (id VARCHAR(32) NOT NULL PRIMARY KEY, name VARCHAR(63) NOT NULL,
    fingerprint VARCHAR(80) NOT NULL UNIQUE, cert_pem TEXT NOT NULL,
    created_at FLOAT NOT NULL, last_seen FLOAT, last_address VARCHAR(128) NOT NULL,
    services_json TEXT NOT NULL, host_keys_json TEXT NOT NULL, removed_at FLOAT);
CREATE UNIQUE INDEX ix_nodes_live_name ON nodes (name) WHERE removed_at IS NULL;
CREATE TABLE auth_keys (key_id VARCHAR(32) NOT NULL PRIMARY KEY,
    secret_hash VARCHAR(64) NOT NULL, reusable BOOLEAN NOT NULL, expires_at FLOAT,
    created_at FLOAT NOT NULL, uses INTEGER NOT NULL, last_used_at FLOAT,
    revoked BOOLEAN NOT NULL, note VARCHAR(256) NOT NULL);
CREATE TABLE node_certs (fingerprint VARCHAR(80) NOT NULL PRIMARY KEY,
    node_id VARCHAR(32) NOT NULL, cert_pem TEXT NOT NULL, created_at FLOAT NOT NULL);
CREATE INDEX ix_node_certs_node_id ON node_certs (node_id);
INSERT INTO nodes VALUES ('n1', 'labpc', 'sha256:old', 'PEM', 1.0, 5.0, '192.0.2.7:1',
    '[{"name": "ssh", "port": 22}]', '[]', NULL);
INSERT INTO node_certs VALUES ('sha256:old', 'n1', 'PEM', 1.0);
INSERT INTO auth_keys VALUES ('k1', 'hash', 1, NULL, 1.0, 3, 2.0, 0, 'old key');
"""


def _request(node_id: str, name: str, key: str, secret: str, **kw: object) -> EnrollRequest:
    node = NodeRecord(
        node_id=node_id, name=name, fingerprints=(f"sha256:{node_id}",), created_at=T0
    )
    return EnrollRequest(0, key, secret, node, T0, **kw)  # type: ignore[arg-type]


def test_a_schema_2_database_is_migrated_to_3(tmp_path: Path) -> None:
    path = tmp_path / "homeport.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_2)
    db.commit()
    db.close()
    store = open_store(default_url(str(tmp_path)))
    assert store.schema_version() == SCHEMA_VERSION >= 3
    registry = Registry(store, server_pin=PIN)
    [node] = registry.load_nodes()
    # existing nodes: approved, no owner, no tags, never expire, not ephemeral; nothing lost
    assert (node.node_id, node.name, node.fingerprints, node.last_seen) == (
        "n1",
        "labpc",
        ("sha256:old",),
        5.0,
    )
    assert (node.user, node.tags, node.approved, node.expires_at) == ("", (), True, None)
    assert not node.ephemeral and not node.expiry_disabled
    [key] = registry.list_auth_keys(T0)
    assert (key.key_id, key.reusable, key.uses, key.note) == ("k1", True, 3, "old key")
    assert (key.user, key.tags, key.ephemeral, key.approval) == ("", (), False, False)
    # the new table and columns work on the migrated file
    assert registry.create_user("alice@example.com", T0)
    assert [u.name for u in registry.list_users()] == ["alice@example.com"]
    store.close()
    # and a second open is a no-op (the version is recorded)
    again = open_store(default_url(str(tmp_path)))
    assert again.schema_version() == SCHEMA_VERSION and len(again.list_nodes()) == 1
    again.close()
    cols = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(nodes)")}
    assert {"user", "tags_json", "approved", "expires_at", "ephemeral", "expiry_disabled"} <= cols


def test_a_fresh_database_is_schema_3(db_url: str) -> None:
    store = open_store(db_url)
    assert store.schema_version() == SCHEMA_VERSION >= 3
    store.close()


@pytest.fixture
def registry(db_url: str) -> Iterator[Registry]:
    """A registry on each backend (``db_url``: SQLite, PostgreSQL)."""
    reg = Registry(open_store(db_url), server_pin=PIN)
    yield reg
    reg.close()


def test_a_user_key_makes_that_users_nodes(registry: Registry) -> None:
    registry.create_user("alice", T0)
    key = registry.create_auth_key(now=T0, user="alice", ephemeral=True, approval=True)
    node = registry.enroll(_request("n1", "laptop", key.key_id, key.secret, key_lifetime=100.0))
    assert isinstance(node, NodeRecord)
    assert (node.user, node.tags, node.approved, node.ephemeral) == ("alice", (), False, True)
    assert node.expires_at == T0 + 100.0
    [stored] = registry.load_nodes()
    assert stored == node or (stored.user, stored.approved, stored.expires_at) == (
        "alice",
        False,
        T0 + 100.0,
    )


def test_a_tagged_key_makes_ownerless_nodes_exempt_from_expiry(registry: Registry) -> None:
    key = registry.create_auth_key(now=T0, tags=("tag:server", "tag:db"), reusable=True)
    node = registry.enroll(_request("n1", "db1", key.key_id, key.secret, key_lifetime=100.0))
    assert isinstance(node, NodeRecord)
    assert (node.user, node.tags, node.expires_at) == ("", ("tag:server", "tag:db"), None)
    both = registry.enroll(
        _request("n2", "db2", key.key_id, key.secret, key_lifetime=100.0, expire_tagged=True)
    )
    assert isinstance(both, NodeRecord) and both.expires_at == T0 + 100.0


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"user": "bob"}, "no user 'bob'"),
        ({"user": "Bob"}, "bad user name"),
        ({"tags": ("server",)}, "bad tag"),
        ({"tags": ("tag:ok",), "user": "alice"}, "not both"),
        ({"expiry_seconds": -1.0}, "positive"),
    ],
)
def test_bad_key_requests_are_refused(
    registry: Registry, kw: dict[str, object], needle: str
) -> None:
    registry.create_user("alice", T0)
    with pytest.raises(ValueError, match=needle):
        registry.create_auth_key(now=T0, **kw)  # type: ignore[arg-type]


def test_removing_a_user_revokes_its_keys(registry: Registry) -> None:
    registry.create_user("alice", T0)
    assert not registry.create_user("alice", T0)  # exists
    key = registry.create_auth_key(now=T0, user="alice", reusable=True)
    assert registry.remove_user("alice") and not registry.remove_user("alice")
    refused = registry.enroll(_request("n1", "laptop", key.key_id, key.secret))
    assert isinstance(refused, EnrollRefused) and refused.code == "auth-key-invalid"
    [info] = registry.list_auth_keys(T0)
    assert info.status.value == "revoked"


def test_access_and_renewed_certificates_are_written(registry: Registry) -> None:
    key = registry.create_auth_key(now=T0)
    registry.enroll(_request("n1", "labpc", key.key_id, key.secret))
    registry.apply(SetAccess("n1", approved=False, expires_at=T0 + 5, expiry_disabled=True))
    registry.apply(RenewCert("n1", "sha256:second", "PEM2", T0 + 1, keep=2))
    registry.apply(RenewCert("n1", "sha256:third", "PEM3", T0 + 2, keep=2))
    [node] = registry.load_nodes()
    assert (node.approved, node.expires_at, node.expiry_disabled) == (False, T0 + 5, True)
    # the newest two certificates remain; the first no longer authenticates
    assert set(node.fingerprints) == {"sha256:third", "sha256:second"}
    assert registry.store.node_by_fingerprint("sha256:n1") is None
    assert node.cert_pem == "PEM3"
