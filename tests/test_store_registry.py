"""The registry on SQLite and PostgreSQL: auth keys, the enrollment transaction, write-behind.

Enrollment runs through the coordinator core (tests/coordsim.py) exactly as on
a server, so the order of checks (key before name) and every refusal code are
the real ones.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import select

from homeport.crypto import identity
from homeport.crypto.tls import fingerprint
from homeport.proto.coord import EnrollRefused, EnrollRequest, NodeRecord, SetSeen
from homeport.store.db import SCHEMA_VERSION, NodeRow, Store, default_url, metadata, open_store
from homeport.store.registry import KeyStatus, Registry, WriteBehind
from homeport.wire import control as m
from tests.coordsim import PIN, T0, Sim


@pytest.fixture
def sim(db_url: str) -> Iterator[Sim]:
    """The coordinator core over a registry on each backend (``db_url``)."""
    s = Sim()
    s.registry.close()
    s.registry = Registry(open_store(db_url), server_pin=PIN)
    yield s
    s.registry.close()


def code_of(msg: m.Message) -> str:
    assert isinstance(msg, m.Error), msg
    return msg.code


# -- auth keys and enrollment --------------------------------------------------------


def test_enroll_issues_cert_for_server_chosen_id(sim: Sim) -> None:
    key = sim.registry.create_auth_key(now=T0)
    e = sim.enroll(str(key), "labpc")
    assert isinstance(e, m.Enrolled)
    assert e.node_id.startswith("n") and len(e.node_id) == 13
    cert = x509.load_pem_x509_certificate(e.cert_pem.encode())
    assert cert.subject.rfc4514_string() == f"CN={e.node_id}"
    assert e.ca_pem == sim.ca.cert_pem.decode()
    fp = fingerprint(identity.cert_der_from_pem(e.cert_pem.encode()))
    [loaded] = sim.registry.load_nodes()
    assert loaded.fingerprints == (fp,) and loaded.name == "labpc"


def test_key_is_single_use_by_default(sim: Sim) -> None:
    key = sim.registry.create_auth_key(now=T0)
    assert isinstance(sim.enroll(str(key), "a"), m.Enrolled)
    assert code_of(sim.enroll(str(key), "b")) == "auth-key-used"
    [info] = sim.registry.list_auth_keys(T0)
    assert info.status is KeyStatus.USED and info.uses == 1


def test_reusable_key(sim: Sim) -> None:
    key = sim.registry.create_auth_key(now=T0, reusable=True)
    for i in range(3):
        assert isinstance(sim.enroll(str(key), f"n{i}"), m.Enrolled)
    [info] = sim.registry.list_auth_keys(T0)
    assert info.status is KeyStatus.VALID and info.uses == 3


def test_expired_key(sim: Sim) -> None:
    key = sim.registry.create_auth_key(now=T0, expiry_seconds=3600)
    sim.now = T0 + 3600
    assert code_of(sim.enroll(str(key), "a")) == "auth-key-expired"
    sim.now = T0 + 3599  # just in time
    assert isinstance(sim.enroll(str(key), "a"), m.Enrolled)


def test_wrong_secret_and_unknown_id_are_indistinguishable(sim: Sim) -> None:
    key = sim.registry.create_auth_key(now=T0)
    wrong_secret = str(key).replace(key.secret, "0" * 32)
    unknown_id = str(key).replace(key.key_id, "f" * 12)
    errors = [sim.enroll(text, "a") for text in (wrong_secret, unknown_id)]
    assert errors[0] == errors[1] and code_of(errors[0]) == "auth-key-invalid"
    assert isinstance(sim.enroll(str(key), "a"), m.Enrolled)  # the failures did not burn it


@pytest.mark.parametrize(
    "text",
    ["garbage", "hpk1_" + "0" * 12 + "_" + "0" * 32 + "_" + "cd" * 32],  # other server
)
def test_malformed_or_foreign_keys(sim: Sim, text: str) -> None:
    assert code_of(sim.enroll(text, "a")) == "auth-key-invalid"


def test_revoked_key(sim: Sim) -> None:
    key = sim.registry.create_auth_key(now=T0, reusable=True)
    assert sim.registry.revoke_auth_key(key.key_id)
    assert code_of(sim.enroll(str(key), "a")) == "auth-key-invalid"
    assert sim.registry.list_auth_keys(T0)[0].status is KeyStatus.REVOKED


def test_bad_name_bad_csr_name_taken(sim: Sim) -> None:
    key = sim.registry.create_auth_key(now=T0, reusable=True)
    assert code_of(sim.enroll(str(key), "Bad_Name")) == "bad-name"
    bad_csr = "-----BEGIN CERTIFICATE REQUEST-----\nxx\n"
    assert code_of(sim.enroll(str(key), "ok", bad_csr)) == "bad-request"
    assert isinstance(sim.enroll(str(key), "ok"), m.Enrolled)
    assert code_of(sim.enroll(str(key), "ok")) == "name-taken"
    assert sim.registry.list_auth_keys(T0)[0].uses == 1  # refused enrollments cost no use


def test_name_is_checked_only_after_the_key(sim: Sim) -> None:
    """Without a valid key nobody learns which names exist."""
    sim.new_node("labpc")
    assert code_of(sim.enroll("hpk1_" + "0" * 12 + "_" + "0" * 32 + "_" + PIN[7:], "labpc")) == (
        "auth-key-invalid"
    )


def _request(node_id: str, name: str, key: str, secret: str) -> EnrollRequest:
    return EnrollRequest(
        session=0,
        key_id=key,
        secret=secret,
        node=NodeRecord(
            node_id=node_id,
            name=name,
            fingerprints=(f"sha256:{node_id}",),
            created_at=T0,
            cert_pem="PEM",
        ),
        now=T0,
    )


def test_single_use_key_raced_by_threads_has_one_winner(db_url: str) -> None:
    url = db_url
    registries = [Registry(open_store(url), server_pin=PIN) for _ in range(6)]
    key = registries[0].create_auth_key(now=T0)
    outcomes: list[str] = ["?"] * len(registries)
    barrier = threading.Barrier(len(registries))

    def go(i: int) -> None:
        barrier.wait()
        res = registries[i].enroll(_request(f"n{i}", f"racer{i}", key.key_id, key.secret))
        outcomes[i] = res.code if isinstance(res, EnrollRefused) else "ok"

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(registries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes.count("ok") == 1, outcomes
    assert set(outcomes) == {"ok", "auth-key-used"}
    assert len(registries[0].load_nodes()) == 1
    for r in registries:
        r.close()


def _every_stored_value(store: Store) -> str:
    """Every value in every table, as text (what a stolen database file or dump reveals)."""
    with store.transaction(write=False) as conn:
        return "\n".join(
            repr(tuple(row))
            for table in metadata.sorted_tables
            for row in conn.execute(select(table)).all()
        )


def test_secret_never_stored(db_url: str, tmp_path: Path) -> None:
    registry = Registry(open_store(db_url), server_pin=PIN)
    key = registry.create_auth_key(now=T0, note="for labpc")
    assert isinstance(registry.enroll(_request("n1", "labpc", key.key_id, key.secret)), NodeRecord)
    dump = _every_stored_value(registry.store)
    registry.close()
    assert key.secret not in dump
    assert key.key_id in dump  # the id is stored (sanity check of the scan)
    assert key.secret not in repr(key)
    if db_url.startswith("sqlite"):  # and not in the file's free pages or WAL either
        blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
        assert key.secret.encode() not in blob
        assert key.key_id.encode() in blob


# -- several certificates per node; schema 1 databases ---------------------------------------


def test_a_node_authenticates_with_any_of_its_certificates(db_url: str) -> None:
    registry = Registry(open_store(db_url), server_pin=PIN)
    key = registry.create_auth_key(now=T0)
    registry.enroll(_request("n1", "labpc", key.key_id, key.secret))
    registry.store.add_node_cert("n1", "sha256:renewed", "PEM2", T0 + 10)
    [node] = registry.load_nodes()
    assert node.fingerprints == ("sha256:renewed", "sha256:n1")  # newest (current) first
    sim = Sim(nodes=registry.load_nodes())
    for fp in node.fingerprints:
        sid = sim.connect(fp)
        sim.send(sid, m.Hello(proto=1, role="client"))
        [welcome] = sim.out[sid].of(m.Welcome)
        assert isinstance(welcome, m.Welcome) and welcome.node_id == "n1"
    registry.close()


def test_a_schema_1_database_is_migrated(tmp_path: Path) -> None:
    """A first-release database: its nodes keep authenticating after the upgrade to schema 2."""
    path = tmp_path / "homeport.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1);
        CREATE TABLE nodes (id VARCHAR(32) PRIMARY KEY, name VARCHAR(63) NOT NULL,
            fingerprint VARCHAR(80) NOT NULL UNIQUE, cert_pem TEXT NOT NULL,
            created_at FLOAT NOT NULL, last_seen FLOAT, last_address VARCHAR(128) NOT NULL,
            services_json TEXT NOT NULL, host_keys_json TEXT NOT NULL, removed_at FLOAT);
        CREATE TABLE auth_keys (key_id VARCHAR(32) PRIMARY KEY, secret_hash VARCHAR(64) NOT NULL,
            reusable BOOLEAN NOT NULL, expires_at FLOAT, created_at FLOAT NOT NULL,
            uses INTEGER NOT NULL, last_used_at FLOAT, revoked BOOLEAN NOT NULL,
            note VARCHAR(256) NOT NULL);
        INSERT INTO nodes VALUES ('n1', 'labpc', 'sha256:old', 'PEM', 1.0, NULL, '',
            '[{"name": "ssh", "port": 22}]', '[]', NULL);
        """
    )
    db.commit()
    db.close()
    store = open_store(default_url(str(tmp_path)))
    assert store.schema_version() == SCHEMA_VERSION
    [node] = Registry(store, server_pin=PIN).load_nodes()
    assert node.fingerprints == ("sha256:old",)
    assert node.services == (m.ServiceInfo("ssh", 22),)
    assert store.node_by_fingerprint("sha256:old") is not None
    store.close()


# -- write-behind ------------------------------------------------------------------------------


def test_write_behind_keeps_order_and_flushes(db_url: str) -> None:
    registry = Registry(open_store(db_url), server_pin=PIN)
    key = registry.create_auth_key(now=T0)
    registry.enroll(_request("n1", "labpc", key.key_id, key.secret))
    writer = WriteBehind(registry)
    for i in range(200):
        writer.submit(SetSeen("n1", T0 + i, f"192.0.2.1:{i}"))
    read_back = writer.call(registry.load_nodes).result(10)  # runs after all 200 writes
    assert read_back[0].last_seen == T0 + 199 and read_back[0].last_address == "192.0.2.1:199"
    writer.close()
    registry.close()


def test_last_seen_writes_batch_without_reordering_other_writes(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(open_store(db_url), server_pin=PIN)
    registry.store.insert_node(
        NodeRow(node_id="n1", name="a", fingerprint="sha256:n1", cert_pem="PEM", created_at=T0)
    )
    batches: list[int] = []
    real = registry.apply_seen

    def counted(ops: list[SetSeen]) -> None:
        batches.append(len(ops))
        real(ops)

    monkeypatch.setattr(registry, "apply_seen", counted)
    writer = WriteBehind(registry)
    gate = threading.Event()
    writer.call(gate.wait, 10.0)  # hold the writer while the queue fills
    for i in range(300):
        writer.submit(SetSeen("n1", T0 + i, f"192.0.2.1:{i}"))
    mid = writer.call(registry.load_nodes)  # must see exactly the first 300
    for i in range(300, 600):
        writer.submit(SetSeen("n1", T0 + i, None))
    gate.set()
    assert mid.result(10)[0].last_seen == T0 + 299
    last = writer.call(registry.load_nodes).result(10)[0]
    assert last.last_seen == T0 + 599 and last.last_address == "192.0.2.1:299"
    assert batches == [300, 300]  # two transactions, split by the read in between
    writer.close()
    registry.close()


def test_a_failing_write_does_not_stop_the_writer(db_url: str) -> None:
    registry = Registry(open_store(db_url), server_pin=PIN)
    writer = WriteBehind(registry)
    boom = writer.call(lambda: 1 // 0)
    with pytest.raises(ZeroDivisionError):
        boom.result(10)
    assert writer.call(lambda: "still writing").result(10) == "still writing"
    writer.close()
    registry.close()
