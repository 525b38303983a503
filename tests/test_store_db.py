"""The SQLAlchemy Core store: schema, migrations, tombstones, atomic key consumption.

Every test taking ``db_url`` runs on SQLite and on PostgreSQL (tests/pgfixture.py).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from homeport.store.db import (
    SCHEMA_VERSION,
    AuthKeyRow,
    KeyOutcome,
    NameTaken,
    NodeRow,
    StoreError,
    default_url,
    normalize_url,
    open_store,
)
from homeport.wire.control import ServiceInfo


def node(node_id: str, name: str, fp: str | None = None) -> NodeRow:
    return NodeRow(
        node_id=node_id,
        name=name,
        fingerprint=fp or f"sha256:{node_id}",
        cert_pem="PEM",
        created_at=1.0,
    )


def test_memory_store_is_migrated_and_shared() -> None:
    store = open_store("sqlite://")
    assert store.schema_version() == SCHEMA_VERSION
    store.insert_node(node("n1", "a"))
    assert store.get_node("n1") is not None
    store.close()


def test_file_store_uses_wal_and_reopens(tmp_path: Path) -> None:
    url = default_url(str(tmp_path))
    store = open_store(url)
    store.insert_node(node("n1", "a"))
    store.close()
    again = open_store(url)
    assert again.get_node("n1") is not None
    assert again.schema_version() == SCHEMA_VERSION
    again.close()
    with sqlite3.connect(tmp_path / "homeport.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopen_keeps_rows_and_version(db_url: str) -> None:
    store = open_store(db_url)
    store.insert_node(node("n1", "a"))
    store.close()
    again = open_store(db_url)
    assert again.get_node("n1") is not None
    assert again.schema_version() == SCHEMA_VERSION
    again.close()


def test_newer_schema_is_refused_in_one_line(db_url: str) -> None:
    open_store(db_url).close()
    engine = create_engine(normalize_url(db_url))
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = :v"), {"v": SCHEMA_VERSION + 1})
    engine.dispose()
    with pytest.raises(StoreError, match="newer") as info:
        open_store(db_url)
    assert str(info.value) == (
        f"database schema version {SCHEMA_VERSION + 1} is newer than this homeport "
        f"(knows {SCHEMA_VERSION}); upgrade homeport"
    )


def test_names_unique_among_live_nodes_only(db_url: str) -> None:
    store = open_store(db_url)
    store.insert_node(node("n1", "labpc"))
    with pytest.raises(NameTaken):
        store.insert_node(node("n2", "labpc"))
    assert store.remove_node("n1", now=5.0)
    assert not store.remove_node("n1", now=6.0)  # already a tombstone
    store.insert_node(node("n2", "labpc"))
    live = store.node_by_name("labpc")
    assert live is not None and live.node_id == "n2" and not live.removed
    tomb = store.node_by_fingerprint("sha256:n1")
    assert tomb is not None and tomb.removed_at == 5.0
    assert [n.node_id for n in store.list_nodes()] == ["n2"]
    assert {n.node_id for n in store.list_nodes(include_removed=True)} == {"n1", "n2"}
    store.remove_node("n2", now=7.0)
    latest = store.node_by_name("labpc")
    assert latest is not None and latest.node_id == "n2" and latest.removed


def test_announce_and_seen_round_trip(db_url: str) -> None:
    store = open_store(db_url)
    store.insert_node(node("n1", "a"))
    services = (ServiceInfo("ssh", 22), ServiceInfo("web", 8080))
    store.set_node_announce("n1", services, ("ssh-ed25519 AAAA",))
    store.set_node_seen("n1", 42.0, "198.51.100.7:5555")
    row = store.get_node("n1")
    assert row is not None
    assert row.services == services and row.host_keys == ("ssh-ed25519 AAAA",)
    assert row.last_seen == 42.0 and row.last_address == "198.51.100.7:5555"


SEEN_SEQUENCES = [
    [("n1", 1.0, "192.0.2.1:1"), ("n1", 2.0, None)],  # a later time keeps the last address
    [("n1", 1.0, None), ("n1", 2.0, "192.0.2.1:2")],  # a later address replaces it
    [("n1", 3.0, "192.0.2.1:3"), ("n2", 4.0, None), ("n1", 5.0, "198.51.100.1:5")],
    [("n2", 6.0, "192.0.2.2:6"), ("n2", 7.0, None), ("n1", 8.0, None)],
    [],
]


@pytest.mark.parametrize("seq", SEEN_SEQUENCES)
def test_last_seen_batches_equal_the_same_writes_one_by_one(
    db_url: str, seq: list[tuple[str, float, str | None]]
) -> None:
    one, many = open_store(db_url), open_store("sqlite://")
    for store in (one, many):
        store.insert_node(node("n1", "a"))
        store.insert_node(node("n2", "b"))
        store.set_node_seen("n2", 0.5, "203.0.113.9:9")
    for node_id, when, address in seq:
        one.set_node_seen(node_id, when, address)
    many.set_nodes_seen(seq)

    def seen(store: object) -> list[tuple[float | None, str | None]]:
        rows = [store.get_node(n) for n in ("n1", "n2")]  # type: ignore[attr-defined]
        return [(r.last_seen, r.last_address) for r in rows]

    assert seen(many) == seen(one)


def key(
    key_id: str = "k1", *, reusable: bool = False, expires_at: float | None = None
) -> AuthKeyRow:
    return AuthKeyRow(
        key_id=key_id,
        secret_hash="h" * 64,
        created_at=0.0,
        reusable=reusable,
        expires_at=expires_at,
    )


def test_consume_single_use_reusable_expired_revoked_unknown(db_url: str) -> None:
    store = open_store(db_url)
    store.insert_auth_key(key("once"))
    store.insert_auth_key(key("many", reusable=True))
    store.insert_auth_key(key("old", expires_at=10.0))
    store.insert_auth_key(key("gone"))
    store.revoke_auth_key("gone")
    assert store.consume_auth_key("once", 1.0) is KeyOutcome.CONSUMED
    assert store.consume_auth_key("once", 2.0) is KeyOutcome.USED
    for t in (1.0, 2.0, 3.0):
        assert store.consume_auth_key("many", t) is KeyOutcome.CONSUMED
    assert store.consume_auth_key("old", 9.0) is KeyOutcome.CONSUMED
    assert store.consume_auth_key("old", 9.5) is KeyOutcome.USED
    assert store.consume_auth_key("old", 10.0) is KeyOutcome.EXPIRED  # expiry is reported first
    row = store.get_auth_key("many")
    assert row is not None and row.uses == 3 and row.last_used_at == 3.0
    assert store.consume_auth_key("gone", 1.0) is KeyOutcome.REVOKED
    assert store.consume_auth_key("nope", 1.0) is KeyOutcome.UNKNOWN


def test_expired_key_is_expired(db_url: str) -> None:
    store = open_store(db_url)
    store.insert_auth_key(key("old", expires_at=10.0))
    assert store.consume_auth_key("old", 10.0) is KeyOutcome.EXPIRED
    row = store.get_auth_key("old")
    assert row is not None and row.uses == 0


def test_enroll_node_is_all_or_nothing(db_url: str) -> None:
    store = open_store(db_url)
    store.insert_auth_key(key("k"))
    store.insert_node(node("n1", "taken"))
    with pytest.raises(NameTaken):
        store.enroll_node("k", node("n2", "taken"), now=1.0)
    row = store.get_auth_key("k")
    assert row is not None and row.uses == 0  # the clash did not burn the key
    assert store.enroll_node("k", node("n2", "fresh"), now=2.0) is KeyOutcome.CONSUMED
    assert store.enroll_node("k", node("n3", "other"), now=3.0) is KeyOutcome.USED
    assert store.node_by_name("other") is None


def test_concurrent_consume_two_connections_one_winner(db_url: str) -> None:
    """Eight stores (eight engines, eight connections) race for each single-use key."""
    url = db_url
    setup = open_store(url)
    stores = [open_store(url) for _ in range(8)]
    rounds = 20
    for r in range(rounds):
        setup.insert_auth_key(key(f"k{r}"))
    results: list[list[KeyOutcome]] = [[] for _ in stores]
    barrier = threading.Barrier(len(stores))

    def worker(i: int) -> None:
        barrier.wait()
        for r in range(rounds):
            results[i].append(stores[i].consume_auth_key(f"k{r}", 1.0))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for r in range(rounds):
        outcomes = [results[i][r] for i in range(len(stores))]
        assert outcomes.count(KeyOutcome.CONSUMED) == 1, outcomes
        assert outcomes.count(KeyOutcome.USED) == len(stores) - 1
        row = setup.get_auth_key(f"k{r}")
        assert row is not None and row.uses == 1
    for s in [setup, *stores]:
        s.close()
