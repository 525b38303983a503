"""Schema migrations from EVERY earlier version to the current one, on SQLite and PostgreSQL.

How a version-``k`` database is made: the DDL a released server wrote, frozen
below as SQL that both engines accept (:data:`SNAPSHOTS`), then — for a version
newer than the newest snapshot — the real ``MIGRATIONS`` steps up to ``k``.
So a schema appended to ``MIGRATIONS`` (``api_keys``, schema 4) is covered
here without editing this file; freeze its DDL into SNAPSHOTS once it ships.

Every table of the version-``k`` schema is filled by reflection with
representative rows (two per table: one with every nullable column set, one
with them NULL), then the database is opened with the store, which migrates it.
The test then checks that every row survived with every value it had, that the
schema equals a fresh database's (tables, columns, types, nullability, keys,
indexes), that the nodes load and authenticate by fingerprint, and that a
second open changes nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Boolean,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    create_engine,
    insert,
    inspect,
    select,
)

from homeport.store.db import (
    MIGRATIONS,
    SCHEMA_VERSION,
    normalize_url,
    open_store,
    schema_version,
)
from homeport.store.registry import Registry
from tests.coordsim import PIN
from tests.pgfixture import fresh_pg_schema, sqlite_url

_NODES_V1 = (
    "CREATE TABLE nodes (id VARCHAR(32) NOT NULL, name VARCHAR(63) NOT NULL, "
    "fingerprint VARCHAR(80) NOT NULL, cert_pem TEXT NOT NULL, created_at FLOAT NOT NULL, "
    "last_seen FLOAT, last_address VARCHAR(128) NOT NULL, services_json TEXT NOT NULL, "
    "host_keys_json TEXT NOT NULL, removed_at FLOAT, PRIMARY KEY (id), UNIQUE (fingerprint))"
)
_LIVE_NAME = "CREATE UNIQUE INDEX ix_nodes_live_name ON nodes (name) WHERE removed_at IS NULL"
_KEYS_V1 = (
    "CREATE TABLE auth_keys (key_id VARCHAR(32) NOT NULL, secret_hash VARCHAR(64) NOT NULL, "
    "reusable BOOLEAN NOT NULL, expires_at FLOAT, created_at FLOAT NOT NULL, "
    "uses INTEGER NOT NULL, last_used_at FLOAT, revoked BOOLEAN NOT NULL, "
    "note VARCHAR(256) NOT NULL, PRIMARY KEY (key_id))"
)
_CERTS_V2 = (
    "CREATE TABLE node_certs (fingerprint VARCHAR(80) NOT NULL, node_id VARCHAR(32) NOT NULL, "
    "cert_pem TEXT NOT NULL, created_at FLOAT NOT NULL, PRIMARY KEY (fingerprint))",
    "CREATE INDEX ix_node_certs_node_id ON node_certs (node_id)",
)
_SCHEMA_VERSION = "CREATE TABLE schema_version (version INTEGER NOT NULL)"

#: The tables each released schema created, as SQLAlchemy's create_all wrote them then
#: (from the store module of that release; quoted "user" is valid on both engines).
SNAPSHOTS: dict[int, tuple[str, ...]] = {
    1: (_SCHEMA_VERSION, _NODES_V1, _LIVE_NAME, _KEYS_V1),
    2: (_SCHEMA_VERSION, _NODES_V1, _LIVE_NAME, _KEYS_V1, *_CERTS_V2),
    3: (
        _SCHEMA_VERSION,
        "CREATE TABLE nodes (id VARCHAR(32) NOT NULL, name VARCHAR(63) NOT NULL, "
        "fingerprint VARCHAR(80) NOT NULL, cert_pem TEXT NOT NULL, created_at FLOAT NOT NULL, "
        "last_seen FLOAT, last_address VARCHAR(128) NOT NULL, services_json TEXT NOT NULL, "
        'host_keys_json TEXT NOT NULL, removed_at FLOAT, "user" VARCHAR(128) NOT NULL, '
        "tags_json TEXT NOT NULL, approved BOOLEAN NOT NULL, expires_at FLOAT, "
        "ephemeral BOOLEAN NOT NULL, expiry_disabled BOOLEAN NOT NULL, PRIMARY KEY (id), "
        "UNIQUE (fingerprint))",
        _LIVE_NAME,
        "CREATE TABLE auth_keys (key_id VARCHAR(32) NOT NULL, secret_hash VARCHAR(64) NOT NULL, "
        "reusable BOOLEAN NOT NULL, expires_at FLOAT, created_at FLOAT NOT NULL, "
        "uses INTEGER NOT NULL, last_used_at FLOAT, revoked BOOLEAN NOT NULL, "
        'note VARCHAR(256) NOT NULL, "user" VARCHAR(128) NOT NULL, tags_json TEXT NOT NULL, '
        "ephemeral BOOLEAN NOT NULL, approval BOOLEAN NOT NULL, PRIMARY KEY (key_id))",
        "CREATE TABLE users (name VARCHAR(128) NOT NULL, created_at FLOAT NOT NULL, "
        "PRIMARY KEY (name))",
        *_CERTS_V2,
    ),
}
SNAPSHOTS[4] = (
    *SNAPSHOTS[3],
    "CREATE TABLE api_keys (key_id VARCHAR(32) NOT NULL, token_hash VARCHAR(64) NOT NULL, "
    'name VARCHAR(128) NOT NULL, scope VARCHAR(16) NOT NULL, "user" VARCHAR(128), '
    "created_at FLOAT NOT NULL, expires_at FLOAT, revoked BOOLEAN NOT NULL, "
    "PRIMARY KEY (key_id), UNIQUE (token_hash))",
)
#: Rows written per table: row 0 sets every nullable column, row 1 leaves them NULL.
ROWS_PER_TABLE = 2
#: Every version a database in the wild can have: 0 (empty) … today's.
VERSIONS = list(range(SCHEMA_VERSION + 1))


@pytest.fixture(params=["sqlite", "pg"])
def two_urls(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """Two fresh, empty databases on one backend: the one to migrate, a fresh reference."""
    if request.param == "sqlite":
        yield (
            sqlite_url(tmp_path_factory.mktemp("old")),
            sqlite_url(tmp_path_factory.mktemp("fresh")),
        )
        return
    with fresh_pg_schema() as old, fresh_pg_schema() as fresh:
        yield old, fresh


def _engine(url: str) -> Engine:
    return create_engine(normalize_url(url))


def build_version(url: str, version: int) -> None:
    """Make the database at ``url`` a schema-``version`` database (0: leave it empty)."""
    if version == 0:
        return
    base = max(v for v in SNAPSHOTS if v <= version)
    engine = _engine(url)
    with engine.begin() as conn:
        for stmt in SNAPSHOTS[base]:
            conn.exec_driver_sql(stmt)
        for step in range(base, version):
            MIGRATIONS[step](conn)
        conn.execute(insert(schema_version).values(version=version))
    engine.dispose()


def _value(table: str, column: Any, i: int) -> Any:
    """A representative value for one column of row ``i`` (NULL in row 1 where allowed)."""
    name, kind = column["name"], column["type"]
    if column["nullable"] and i == 1:
        return None
    if isinstance(kind, Boolean):
        return i % 2 == 0
    if isinstance(kind, Integer):
        return 7 + i
    if isinstance(kind, Float):
        return 1_700_000_000.25 + i
    if name in ("id", "node_id"):  # node_certs point at nodes, as the server writes them
        return f"n{i}"
    if name == "fingerprint":
        return f"sha256:{i:064x}"
    if name.endswith("_json"):
        return '[{"name": "ssh", "port": 22}]' if name == "services_json" else "[]"
    text = f"{table[:4]}-{name}-{i}"
    length = getattr(kind, "length", None) if isinstance(kind, String) else None
    return text[:length] if length else text


def fill(url: str) -> dict[str, list[dict[str, Any]]]:
    """Write representative rows into every table; returns them by table."""
    engine = _engine(url)
    written: dict[str, list[dict[str, Any]]] = {}
    with engine.begin() as conn:
        inspector = inspect(conn)
        for name in inspector.get_table_names():
            if name == schema_version.name:
                continue
            table = Table(name, MetaData(), autoload_with=conn)
            columns = inspector.get_columns(name)
            rows = [{c["name"]: _value(name, c, i) for c in columns} for i in range(ROWS_PER_TABLE)]
            conn.execute(insert(table), rows)
            written[name] = rows
    engine.dispose()
    return written


def shape(url: str) -> dict[str, Any]:
    """The schema as reflected: what a fresh and a migrated database must agree on."""
    engine = _engine(url)
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        inspector = inspect(conn)
        for name in sorted(inspector.get_table_names()):
            out[name] = {
                "columns": sorted(
                    (c["name"], str(c["type"].compile(dialect=conn.dialect)), c["nullable"])
                    for c in inspector.get_columns(name)
                ),
                "pk": sorted(inspector.get_pk_constraint(name)["constrained_columns"]),
                "unique": sorted(
                    tuple(u["column_names"]) for u in inspector.get_unique_constraints(name)
                ),
                "indexes": sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                    for i in inspector.get_indexes(name)
                ),
            }
    engine.dispose()
    return out


def rows_survived(url: str, written: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Rows (by table) that no longer exist with every value they were written with."""
    engine = _engine(url)
    lost: list[str] = []
    with engine.connect() as conn:
        for name, rows in written.items():
            table = Table(name, MetaData(), autoload_with=conn)
            for row in rows:
                match = and_(
                    *(
                        table.c[k].is_(None) if v is None else table.c[k] == v
                        for k, v in row.items()
                    )
                )
                if conn.execute(select(table).where(match)).first() is None:
                    lost.append(f"{name}: {row}")
    engine.dispose()
    return lost


@pytest.mark.parametrize("version", VERSIONS)
def test_every_earlier_schema_migrates_to_the_current_one(
    two_urls: tuple[str, str], version: int
) -> None:
    url, fresh_url = two_urls
    build_version(url, version)
    written = fill(url) if version else {}
    started = time.monotonic()
    store = open_store(url)  # migrates
    took = time.monotonic() - started
    assert store.schema_version() == SCHEMA_VERSION
    # the tables and columns a fresh install has, with every old row and value intact
    open_store(fresh_url).close()
    assert shape(url) == shape(fresh_url)
    assert rows_survived(url, written) == []
    # the old nodes still load and authenticate by their certificate fingerprint
    registry = Registry(store, server_pin=PIN)
    loaded = registry.load_nodes()
    assert len(loaded) == len(written.get("nodes", []))
    for node in loaded:
        assert node.fingerprints
        found = store.node_by_fingerprint(node.fingerprints[-1])
        assert found is not None and found.node_id == node.node_id
    store.close()
    # a second open is a no-op
    again = open_store(url)
    assert again.schema_version() == SCHEMA_VERSION
    assert len(again.list_nodes(include_removed=True)) == len(written.get("nodes", []))
    again.close()
    print(f"schema {version} -> {SCHEMA_VERSION}: {took * 1000:.0f} ms")


def test_snapshots_cover_the_released_versions() -> None:
    """A snapshot per version up to the newest one, none from the future."""
    assert sorted(SNAPSHOTS) == list(range(1, max(SNAPSHOTS) + 1))
    assert max(SNAPSHOTS) <= SCHEMA_VERSION


def test_servers_starting_at_once_migrate_one_after_the_other(db_url: str) -> None:
    """Four stores open one empty database at the same moment: one migrates, all work."""
    build_version(db_url, 1)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            open_store(db_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    store = open_store(db_url)
    assert store.schema_version() == SCHEMA_VERSION
    engine = _engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(select(schema_version.c.version)).scalars().all() == [SCHEMA_VERSION]
    engine.dispose()
    store.close()
