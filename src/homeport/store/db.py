"""The server's database: SQLAlchemy Core tables, a tiny migration runner, a typed Store.

Why SQLAlchemy Core and not raw sqlite3: the same table definitions and
queries run on PostgreSQL (``--db postgresql://…``, driver psycopg 3, the
``homeport[postgres]`` extra) when a deployment outgrows one file; see
docs/postgresql.md. Why Core and not the ORM: the server has two tables and a
handful of queries, and every write must be a single, visible SQL statement
whose atomicity we can reason about (auth-key consumption, see
:meth:`Store.enroll_node`).

No SQL appears outside this package. Every method is a short transaction;
callers pass times in (unix seconds, float) so the store never reads a clock.

Concurrency. A :class:`Store` serializes its own callers with a lock (the
server calls it from one event loop; the lock only matters for tests and the
offline admin path). Across processes the database decides: the auth-key
``UPDATE … WHERE`` is atomic on SQLite (write transactions start with
``BEGIN IMMEDIATE``, so they queue on the busy timeout instead of failing on
a stale snapshot) and on PostgreSQL (READ COMMITTED: the second UPDATE waits
for the first's row lock, then re-checks its WHERE against the committed row
and matches nothing). Migrations run in one transaction on both (DDL is
transactional on SQLite and PostgreSQL alike); on PostgreSQL an advisory lock
makes two servers starting at once migrate one after the other.
"""

from __future__ import annotations

import enum
import importlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from homeport.node.files import create_private
from homeport.wire.control import ServiceInfo

#: The schema this code writes. Bump it and append to MIGRATIONS together.
SCHEMA_VERSION = 4
#: How long a SQLite writer waits for another writer before failing (ms).
SQLITE_BUSY_TIMEOUT_MS = 5000
#: PostgreSQL connections a Store keeps open. The Store serializes its callers
#: (one writer thread plus the odd admin read), so a small pool is enough.
PG_POOL_SIZE = 2
#: Extra PostgreSQL connections beyond the pool under a burst.
PG_MAX_OVERFLOW = 2
#: Seconds to wait for the PostgreSQL server to accept a connection.
PG_CONNECT_TIMEOUT = 10
#: Recycle pooled PostgreSQL connections after this many seconds (NAT/firewall idle drops).
PG_POOL_RECYCLE = 1800
#: pg_advisory_xact_lock key held while migrating ("homeport" in ASCII, as an int64).
PG_MIGRATION_LOCK = 0x686F6D65706F7274
#: The driver the ``postgresql://`` scheme means (psycopg 3).
PG_DRIVER = "psycopg"
#: The one line shown when PostgreSQL is asked for without its driver installed.
PG_DRIVER_MISSING = (
    "PostgreSQL needs the psycopg driver, which is not installed: "
    "pip install 'homeport[postgres]' (or: pip install 'psycopg[binary]')"
)

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(63), nullable=False),
    Column("fingerprint", String(80), nullable=False, unique=True),
    Column("cert_pem", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float, nullable=True),
    Column("last_address", String(128), nullable=False, default=""),
    Column("services_json", Text, nullable=False, default="[]"),
    Column("host_keys_json", Text, nullable=False, default="[]"),
    # A tombstone, not a DELETE: a removed node that comes back is told
    # "removed by an admin" instead of the puzzling "unknown node".
    Column("removed_at", Float, nullable=True),
    # schema 3: who the node is and whether it may take part
    Column("user", String(128), nullable=False, default=""),
    Column("tags_json", Text, nullable=False, default="[]"),
    Column("approved", Boolean, nullable=False, default=True),
    Column("expires_at", Float, nullable=True),
    Column("ephemeral", Boolean, nullable=False, default=False),
    Column("expiry_disabled", Boolean, nullable=False, default=False),
)
# Names are unique among live nodes only, so the name of a removed node is free.
Index(
    "ix_nodes_live_name",
    nodes.c.name,
    unique=True,
    sqlite_where=nodes.c.removed_at.is_(None),
    postgresql_where=nodes.c.removed_at.is_(None),
)

auth_keys = Table(
    "auth_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("secret_hash", String(64), nullable=False),
    Column("reusable", Boolean, nullable=False, default=False),
    Column("expires_at", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("uses", Integer, nullable=False, default=0),
    Column("last_used_at", Float, nullable=True),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("note", String(256), nullable=False, default=""),
    # schema 3: what a node enrolled with this key becomes
    Column("user", String(128), nullable=False, default=""),
    Column("tags_json", Text, nullable=False, default="[]"),
    Column("ephemeral", Boolean, nullable=False, default=False),
    Column("approval", Boolean, nullable=False, default=False),
)

# schema 3: the people nodes belong to (login names; see wire.names.user_name_problem)
users = Table(
    "users",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("created_at", Float, nullable=False),
)


# Every certificate a node may authenticate with (several overlap during renewal).
# ``nodes.fingerprint`` stays the node's first certificate; this table is what
# authentication reads.
node_certs = Table(
    "node_certs",
    metadata,
    Column("fingerprint", String(80), primary_key=True),
    Column("node_id", String(32), nullable=False, index=True),
    Column("cert_pem", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)


def _migrate_to_1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[nodes, auth_keys])


def _migrate_to_2(conn: Connection) -> None:
    metadata.create_all(conn, tables=[node_certs])
    conn.execute(
        insert(node_certs).from_select(
            ["fingerprint", "node_id", "cert_pem", "created_at"],
            select(nodes.c.fingerprint, nodes.c.id, nodes.c.cert_pem, nodes.c.created_at),
        )
    )


# (table, column, SQL default) added by schema 3. Added with ALTER TABLE so
# existing rows keep their data: existing nodes become approved, owned by no
# user, untagged, not ephemeral, with no expiry date (they enrolled before
# expiry existed; an admin can still ``nodes expire`` them).
_SCHEMA3_COLUMNS: tuple[tuple[Table, str, str], ...] = (
    (nodes, "user", "''"),
    (nodes, "tags_json", "'[]'"),
    (nodes, "approved", "TRUE"),
    (nodes, "expires_at", ""),
    (nodes, "ephemeral", "FALSE"),
    (nodes, "expiry_disabled", "FALSE"),
    (auth_keys, "user", "''"),
    (auth_keys, "tags_json", "'[]'"),
    (auth_keys, "ephemeral", "FALSE"),
    (auth_keys, "approval", "FALSE"),
)


def _migrate_to_3(conn: Connection) -> None:
    metadata.create_all(conn, tables=[users])
    preparer = conn.dialect.identifier_preparer
    inspector = inspect(conn)
    present = {t: {c["name"] for c in inspector.get_columns(t)} for t in ("nodes", "auth_keys")}
    for table, name, default in _SCHEMA3_COLUMNS:
        if name in present[table.name]:  # a fresh database: step 1 made today's tables
            continue
        col = table.c[name]
        ddl = (
            f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {preparer.quote(name)} "
            f"{col.type.compile(dialect=conn.dialect)}"
        )
        if default:
            ddl += f" NOT NULL DEFAULT {default}"
        conn.exec_driver_sql(ddl)


# schema 4: tokens for the admin listener's REST API (server/apikeys.py). Only the
# SHA-256 of a token is stored; ``user`` (NULL: none) ties the key to a user, so
# removing the user ends the key.
api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("name", String(128), nullable=False),
    Column("scope", String(16), nullable=False),
    Column("user", String(128), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("revoked", Boolean, nullable=False, default=False),
)


def _migrate_to_4(conn: Connection) -> None:
    metadata.create_all(conn, tables=[api_keys])


#: MIGRATIONS[i] brings a database from version i to version i + 1.
MIGRATIONS: tuple[Callable[[Connection], None], ...] = (
    _migrate_to_1,
    _migrate_to_2,
    _migrate_to_3,
    _migrate_to_4,
)
assert len(MIGRATIONS) == SCHEMA_VERSION


class StoreError(Exception):
    """The database cannot be used (too new, corrupt, unreachable)."""


class NameTaken(StoreError):
    """A live node already has this name."""


class KeyOutcome(enum.Enum):
    """What happened when an auth key was presented for consumption."""

    CONSUMED = "consumed"
    UNKNOWN = "unknown"
    USED = "used"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One row of ``nodes``; ``removed_at`` is set on a tombstone."""

    node_id: str
    name: str
    fingerprint: str
    cert_pem: str
    created_at: float
    last_seen: float | None = None
    last_address: str = ""
    services: tuple[ServiceInfo, ...] = ()
    host_keys: tuple[str, ...] = ()
    removed_at: float | None = None
    user: str = ""
    tags: tuple[str, ...] = ()
    approved: bool = True
    expires_at: float | None = None
    ephemeral: bool = False
    expiry_disabled: bool = False

    @property
    def removed(self) -> bool:
        return self.removed_at is not None


@dataclass(frozen=True, slots=True)
class UserRow:
    """One row of ``users``."""

    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class AuthKeyRow:
    """One row of ``auth_keys``. Only the secret's hash is ever stored."""

    key_id: str
    secret_hash: str = field(repr=False)
    created_at: float
    reusable: bool = False
    expires_at: float | None = None
    uses: int = 0
    last_used_at: float | None = None
    revoked: bool = False
    note: str = ""
    user: str = ""
    tags: tuple[str, ...] = ()
    ephemeral: bool = False
    approval: bool = False

    def outcome_at(self, now: float) -> KeyOutcome:
        """Why this key could (CONSUMED) or could not be used at ``now``."""
        if self.revoked:
            return KeyOutcome.REVOKED
        if self.expires_at is not None and now >= self.expires_at:
            return KeyOutcome.EXPIRED
        if not self.reusable and self.uses > 0:
            return KeyOutcome.USED
        return KeyOutcome.CONSUMED


def _services_to_json(services: tuple[ServiceInfo, ...]) -> str:
    return json.dumps([{"name": s.name, "port": s.port} for s in services])


def _services_from_json(text: str) -> tuple[ServiceInfo, ...]:
    try:
        raw = json.loads(text or "[]")
        return tuple(ServiceInfo(name=str(d["name"]), port=int(d["port"])) for d in raw)
    except (ValueError, TypeError, KeyError):
        return ()


def _host_keys_from_json(text: str) -> tuple[str, ...]:
    try:
        raw = json.loads(text or "[]")
        return tuple(str(k) for k in raw)
    except (ValueError, TypeError):
        return ()


def _node(row: Any) -> NodeRow:
    return NodeRow(
        node_id=row.id,
        name=row.name,
        fingerprint=row.fingerprint,
        cert_pem=row.cert_pem,
        created_at=row.created_at,
        last_seen=row.last_seen,
        last_address=row.last_address or "",
        services=_services_from_json(row.services_json),
        host_keys=_host_keys_from_json(row.host_keys_json),
        removed_at=row.removed_at,
        user=row.user or "",
        tags=_host_keys_from_json(row.tags_json),
        approved=bool(row.approved),
        expires_at=row.expires_at,
        ephemeral=bool(row.ephemeral),
        expiry_disabled=bool(row.expiry_disabled),
    )


def _key(row: Any) -> AuthKeyRow:
    return AuthKeyRow(
        key_id=row.key_id,
        secret_hash=row.secret_hash,
        created_at=row.created_at,
        reusable=bool(row.reusable),
        expires_at=row.expires_at,
        uses=int(row.uses),
        last_used_at=row.last_used_at,
        revoked=bool(row.revoked),
        note=row.note or "",
        user=row.user or "",
        tags=_host_keys_from_json(row.tags_json),
        ephemeral=bool(row.ephemeral),
        approval=bool(row.approval),
    )


class Store:
    """Typed access to the server database. Construct with :func:`open_store`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.RLock()

    @property
    def url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self._engine.dispose()

    # -- plumbing ------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite)."""
        with self._lock, self._engine.connect() as conn:
            conn.execution_options(homeport_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._lock, self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def transaction(self, *, write: bool, snapshot: bool = False) -> Iterator[Connection]:
        """One transaction for :mod:`homeport.store.dbcopy` (the only user outside this class).

        ``snapshot``: every statement sees the same committed state (REPEATABLE
        READ on PostgreSQL; a SQLite read transaction already does in WAL mode).
        """
        with self._lock, self._engine.connect() as conn:
            if write:
                conn.execution_options(homeport_write=True)
            if snapshot and conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.max(schema_version.c.version))).scalar() or 0)

    # -- auth keys -----------------------------------------------------------
    def insert_auth_key(self, key: AuthKeyRow) -> None:
        with self._write() as conn:
            conn.execute(
                insert(auth_keys).values(
                    key_id=key.key_id,
                    secret_hash=key.secret_hash,
                    reusable=key.reusable,
                    expires_at=key.expires_at,
                    created_at=key.created_at,
                    uses=key.uses,
                    last_used_at=key.last_used_at,
                    revoked=key.revoked,
                    note=key.note,
                    user=key.user,
                    tags_json=json.dumps(list(key.tags)),
                    ephemeral=key.ephemeral,
                    approval=key.approval,
                )
            )

    def get_auth_key(self, key_id: str) -> AuthKeyRow | None:
        with self._read() as conn:
            row = conn.execute(select(auth_keys).where(auth_keys.c.key_id == key_id)).first()
        return None if row is None else _key(row)

    def list_auth_keys(self) -> list[AuthKeyRow]:
        with self._read() as conn:
            rows = conn.execute(select(auth_keys).order_by(auth_keys.c.created_at)).all()
        return [_key(r) for r in rows]

    def revoke_auth_key(self, key_id: str) -> bool:
        with self._write() as conn:
            res = conn.execute(
                update(auth_keys).where(auth_keys.c.key_id == key_id).values(revoked=True)
            )
            return res.rowcount > 0

    @staticmethod
    def _consume(conn: Connection, key_id: str, now: float) -> KeyOutcome:
        """The one atomic statement that spends a use of a key, then the reason if not."""
        res = conn.execute(
            update(auth_keys)
            .where(
                auth_keys.c.key_id == key_id,
                auth_keys.c.revoked.is_(False),
                or_(auth_keys.c.reusable.is_(True), auth_keys.c.uses == 0),
                or_(auth_keys.c.expires_at.is_(None), auth_keys.c.expires_at > now),
            )
            .values(uses=auth_keys.c.uses + 1, last_used_at=now)
        )
        if res.rowcount == 1:
            return KeyOutcome.CONSUMED
        row = conn.execute(select(auth_keys).where(auth_keys.c.key_id == key_id)).first()
        if row is None:
            return KeyOutcome.UNKNOWN
        outcome = _key(row).outcome_at(now)
        # the row changed between our UPDATE and SELECT only if another writer
        # interleaved, which the write transaction excludes; be safe anyway
        return KeyOutcome.USED if outcome is KeyOutcome.CONSUMED else outcome

    def consume_auth_key(self, key_id: str, now: float) -> KeyOutcome:
        """Spend one use of ``key_id`` atomically (the caller checked the secret)."""
        with self._write() as conn:
            return self._consume(conn, key_id, now)

    def enroll_node(self, key_id: str, node: NodeRow, now: float) -> KeyOutcome:
        """Consume ``key_id`` and insert ``node`` in ONE transaction.

        Either both happen or neither: a name clash does not burn a single-use
        key, and a key raced away by another enrollment inserts no node.

        Raises:
            NameTaken: a live node already has ``node.name`` (nothing changed).
        """
        try:
            with self._write() as conn:
                outcome = self._consume(conn, key_id, now)
                if outcome is not KeyOutcome.CONSUMED:
                    return outcome
                self._insert_node(conn, node)
        except IntegrityError as exc:
            raise NameTaken(node.name) from exc
        return KeyOutcome.CONSUMED

    # -- nodes ---------------------------------------------------------------
    @staticmethod
    def _insert_node(conn: Connection, node: NodeRow) -> None:
        conn.execute(
            insert(node_certs).values(
                fingerprint=node.fingerprint,
                node_id=node.node_id,
                cert_pem=node.cert_pem,
                created_at=node.created_at,
            )
        )
        conn.execute(
            insert(nodes).values(
                id=node.node_id,
                name=node.name,
                fingerprint=node.fingerprint,
                cert_pem=node.cert_pem,
                created_at=node.created_at,
                last_seen=node.last_seen,
                last_address=node.last_address,
                services_json=_services_to_json(node.services),
                host_keys_json=json.dumps(list(node.host_keys)),
                removed_at=node.removed_at,
                user=node.user,
                tags_json=json.dumps(list(node.tags)),
                approved=node.approved,
                expires_at=node.expires_at,
                ephemeral=node.ephemeral,
                expiry_disabled=node.expiry_disabled,
            )
        )

    def insert_node(self, node: NodeRow) -> None:
        """Insert a node. Raises NameTaken (also for a duplicate id or fingerprint)."""
        try:
            with self._write() as conn:
                self._insert_node(conn, node)
        except IntegrityError as exc:
            raise NameTaken(node.name) from exc

    def get_node(self, node_id: str) -> NodeRow | None:
        with self._read() as conn:
            row = conn.execute(select(nodes).where(nodes.c.id == node_id)).first()
        return None if row is None else _node(row)

    def node_by_fingerprint(self, fingerprint: str) -> NodeRow | None:
        """The node (live or tombstone) owning this certificate fingerprint (any of its certs)."""
        with self._read() as conn:
            row = conn.execute(
                select(nodes)
                .join(node_certs, node_certs.c.node_id == nodes.c.id)
                .where(node_certs.c.fingerprint == fingerprint)
            ).first()
        return None if row is None else _node(row)

    def add_node_cert(self, node_id: str, fingerprint: str, cert_pem: str, now: float) -> None:
        """Let ``node_id`` also authenticate with this certificate (renewal overlap)."""
        with self._write() as conn:
            conn.execute(
                insert(node_certs).values(
                    fingerprint=fingerprint, node_id=node_id, cert_pem=cert_pem, created_at=now
                )
            )

    def renew_node_cert(
        self, node_id: str, fingerprint: str, cert_pem: str, now: float, *, keep: int
    ) -> None:
        """Add a renewed certificate and forget all but the newest ``keep`` (one transaction).

        Why prune: an old certificate stays valid only for the overlap, so a
        key copied off the node long ago stops working once it has renewed.
        """
        with self._write() as conn:
            conn.execute(
                insert(node_certs).values(
                    fingerprint=fingerprint, node_id=node_id, cert_pem=cert_pem, created_at=now
                )
            )
            fps = [
                r[0]
                for r in conn.execute(
                    select(node_certs.c.fingerprint)
                    .where(node_certs.c.node_id == node_id)
                    .order_by(node_certs.c.created_at.desc())
                ).all()
            ]
            stale = [fp for fp in fps if fp != fingerprint][max(0, keep - 1) :]
            if stale:
                conn.execute(delete(node_certs).where(node_certs.c.fingerprint.in_(stale)))
            conn.execute(update(nodes).where(nodes.c.id == node_id).values(cert_pem=cert_pem))

    def set_node_access(
        self,
        node_id: str,
        *,
        approved: bool,
        expires_at: float | None,
        expiry_disabled: bool,
    ) -> None:
        """Write the node's approval and key-expiry state."""
        with self._write() as conn:
            conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id)
                .values(approved=approved, expires_at=expires_at, expiry_disabled=expiry_disabled)
            )

    # -- users ---------------------------------------------------------------
    def create_user(self, name: str, now: float) -> bool:
        """Add a user; False if it exists."""
        try:
            with self._write() as conn:
                conn.execute(insert(users).values(name=name, created_at=now))
        except IntegrityError:
            return False
        return True

    def get_user(self, name: str) -> UserRow | None:
        with self._read() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).first()
        return None if row is None else UserRow(name=row.name, created_at=row.created_at)

    def list_users(self) -> list[UserRow]:
        with self._read() as conn:
            rows = conn.execute(select(users).order_by(users.c.name)).all()
        return [UserRow(name=r.name, created_at=r.created_at) for r in rows]

    def remove_user(self, name: str) -> bool:
        """Delete the user and revoke every auth key bound to it (one transaction)."""
        with self._write() as conn:
            res = conn.execute(delete(users).where(users.c.name == name))
            conn.execute(update(auth_keys).where(auth_keys.c.user == name).values(revoked=True))
            return res.rowcount > 0

    def node_fingerprints(self) -> dict[str, tuple[str, ...]]:
        """Every node's certificate fingerprints, oldest first."""
        out: dict[str, list[str]] = {}
        with self._read() as conn:
            rows = conn.execute(
                select(node_certs.c.node_id, node_certs.c.fingerprint).order_by(
                    node_certs.c.created_at
                )
            ).all()
        for node_id, fp in rows:
            out.setdefault(node_id, []).append(fp)
        return {k: tuple(v) for k, v in out.items()}

    def node_by_name(self, name: str) -> NodeRow | None:
        """The live node called ``name``, else its most recent tombstone, else None."""
        with self._read() as conn:
            row = conn.execute(
                select(nodes)
                .where(nodes.c.name == name)
                .order_by(nodes.c.removed_at.is_not(None), nodes.c.removed_at.desc())
                .limit(1)
            ).first()
        return None if row is None else _node(row)

    def list_nodes(self, *, include_removed: bool = False) -> list[NodeRow]:
        query = select(nodes).order_by(nodes.c.name, nodes.c.created_at)
        if not include_removed:
            query = query.where(nodes.c.removed_at.is_(None))
        with self._read() as conn:
            return [_node(r) for r in conn.execute(query).all()]

    def set_node_seen(self, node_id: str, last_seen: float, address: str | None = None) -> None:
        values: dict[str, Any] = {"last_seen": last_seen}
        if address is not None:
            values["last_address"] = address
        with self._write() as conn:
            conn.execute(update(nodes).where(nodes.c.id == node_id).values(**values))

    def set_nodes_seen(self, seen: Sequence[tuple[str, float, str | None]]) -> None:
        """Several ``set_node_seen`` in one transaction, with the same result as in order.

        Why: every agent connect and disconnect is one of these, and under churn (100
        reconnects/s) a transaction each was the server's registry writer's main cost.
        """
        final: dict[str, tuple[float, str | None]] = {}
        for node_id, last_seen, address in seen:  # the last time wins, the last address too
            prev = final.get(node_id)
            keep = prev[1] if prev is not None else None
            final[node_id] = (last_seen, address if address is not None else keep)
        with_addr = [
            {"nid": nid, "seen": when, "addr": addr}
            for nid, (when, addr) in final.items()
            if addr is not None
        ]
        without = [
            {"nid": nid, "seen": when} for nid, (when, addr) in final.items() if addr is None
        ]
        nid: Any = bindparam("nid")
        with self._write() as conn:
            if with_addr:
                conn.execute(
                    update(nodes)
                    .where(nodes.c.id == nid)
                    .values(last_seen=bindparam("seen"), last_address=bindparam("addr")),
                    with_addr,
                )
            if without:
                conn.execute(
                    update(nodes).where(nodes.c.id == nid).values(last_seen=bindparam("seen")),
                    without,
                )

    def set_node_announce(
        self, node_id: str, services: tuple[ServiceInfo, ...], host_keys: tuple[str, ...]
    ) -> None:
        with self._write() as conn:
            conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id)
                .values(
                    services_json=_services_to_json(services),
                    host_keys_json=json.dumps(list(host_keys)),
                )
            )

    def rename_node(self, node_id: str, name: str) -> bool:
        """Give a live node a new name (the caller checked it is free); False if unknown."""
        with self._write() as conn:
            res = conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id, nodes.c.removed_at.is_(None))
                .values(name=name)
            )
            return res.rowcount > 0

    def remove_node(self, node_id: str, now: float) -> bool:
        """Tombstone a live node; False if it is unknown or already removed."""
        with self._write() as conn:
            res = conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id, nodes.c.removed_at.is_(None))
                .values(removed_at=now)
            )
            return res.rowcount > 0

    # -- API keys (schema 4) ---------------------------------------------------
    def create_api_key(self, key: ApiKeyRow) -> None:
        with self._write() as conn:
            conn.execute(
                insert(api_keys).values(
                    key_id=key.key_id,
                    token_hash=key.token_hash,
                    name=key.name,
                    scope=key.scope,
                    user=key.user,
                    created_at=key.created_at,
                    expires_at=key.expires_at,
                    revoked=key.revoked,
                )
            )

    def list_api_keys(self) -> list[ApiKeyRow]:
        with self._read() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
        return [_api_key(r) for r in rows]

    def revoke_api_key(self, key_id: str) -> bool:
        """Mark the key revoked; False if there is no such key."""
        with self._write() as conn:
            res = conn.execute(
                update(api_keys).where(api_keys.c.key_id == key_id).values(revoked=True)
            )
            return res.rowcount > 0

    def find_api_key_by_hash(self, token_hash: str) -> ApiKeyRow | None:
        with self._read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.token_hash == token_hash)).first()
        return None if row is None else _api_key(row)


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    """One row of ``api_keys`` (schema 4); ``scope`` is ``read`` or ``admin``."""

    key_id: str
    token_hash: str = field(repr=False)
    name: str
    scope: str
    created_at: float
    user: str | None = None
    expires_at: float | None = None
    revoked: bool = False


def _api_key(row: Any) -> ApiKeyRow:
    return ApiKeyRow(
        key_id=row.key_id,
        token_hash=row.token_hash,
        name=row.name,
        scope=row.scope,
        created_at=row.created_at,
        user=row.user,
        expires_at=row.expires_at,
        revoked=bool(row.revoked),
    )


# -- opening -----------------------------------------------------------------


def _is_memory_sqlite(url: str) -> bool:
    u = make_url(url)
    return u.get_backend_name() == "sqlite" and u.database in (None, "", ":memory:")


def _setup_sqlite(engine: Engine, *, memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We emit BEGIN ourselves (below) instead of pysqlite's implicit one,
        # so transactions mean what SQLAlchemy says they mean.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("homeport_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _run_migrations(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execution_options(homeport_write=True)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                # two servers starting on one database migrate one after the other
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK})
            schema_version.create(conn, checkfirst=True)
            current = int(conn.execute(select(func.max(schema_version.c.version))).scalar() or 0)
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"database schema version {current} is newer than this homeport "
                    f"(knows {SCHEMA_VERSION}); upgrade homeport"
                )
            for version in range(current, SCHEMA_VERSION):
                MIGRATIONS[version](conn)
            if current != SCHEMA_VERSION:
                conn.execute(schema_version.delete())
                conn.execute(insert(schema_version).values(version=SCHEMA_VERSION))


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL for a ``--db`` value; raises StoreError for one we do not support.

    ``postgresql://`` and ``postgres://`` mean psycopg 3 (SQLAlchemy alone would
    pick psycopg2, which homeport does not depend on); ``postgresql+psycopg://``
    is accepted as written. SQLite URLs pass through.
    """
    try:
        parsed = make_url(url)
    except Exception:
        raise StoreError(  # not echoed: it may hold a password
            "cannot parse the database URL: use sqlite:///PATH or "
            "postgresql://USER:PASSWORD@HOST/DB"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite":
        return url
    if backend in ("postgresql", "postgres") and driver in ("", PG_DRIVER):
        parsed = parsed.set(drivername=f"postgresql+{PG_DRIVER}")
        return parsed.render_as_string(hide_password=False)
    raise StoreError(
        f"unsupported database {parsed.drivername!r}: use sqlite:///PATH or "
        f"postgresql://USER:PASSWORD@HOST/DB"
    )


def display_url(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"


def _engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        memory = _is_memory_sqlite(url)
        if memory:
            engine = create_engine(
                url, poolclass=StaticPool, connect_args={"check_same_thread": False}
            )
        else:
            if parsed.database:  # created 0600 before SQLite would create it with the umask's
                create_private(Path(parsed.database))
            engine = create_engine(url, connect_args={"check_same_thread": False})
        _setup_sqlite(engine, memory=memory)
        return engine
    try:
        importlib.import_module(PG_DRIVER)  # SQLAlchemy would; we say what to install instead
    except ImportError:
        raise StoreError(PG_DRIVER_MISSING) from None
    connect_args: dict[str, Any] = {"connect_timeout": PG_CONNECT_TIMEOUT}
    if "application_name" not in parsed.query:  # shows in pg_stat_activity
        connect_args["application_name"] = "homeport"
    return create_engine(
        url,
        pool_size=PG_POOL_SIZE,
        max_overflow=PG_MAX_OVERFLOW,
        pool_pre_ping=True,
        pool_recycle=PG_POOL_RECYCLE,
        isolation_level="READ COMMITTED",
        connect_args=connect_args,
    )


def check_url(url: str) -> None:
    """Refuse, before anything is created, a database URL that cannot be opened: an
    unsupported scheme, PostgreSQL without its driver, or a SQLite file whose directory
    does not exist. Why up front: the server would otherwise create its CA and TLS files
    first, then fail on an ``OSError`` that reads like a listen problem.

    A SQLite path is as SQLAlchemy reads it: ``sqlite:///rel/x.db`` is relative to the
    current directory, ``sqlite:////abs/x.db`` absolute.

    Raises:
        StoreError: one line, without the URL (it may hold a password).
    """
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite":
        try:
            importlib.import_module(PG_DRIVER)
        except ImportError:
            raise StoreError(PG_DRIVER_MISSING) from None
        return
    if _is_memory_sqlite(url):
        return
    path = Path(str(parsed.database))
    if not path.parent.is_dir():
        where = "absolute" if path.is_absolute() else "relative to the current directory"
        raise StoreError(
            f"SQLite file {str(path)!r} ({where}): its directory does not exist "
            f"(sqlite:///rel/path is relative, sqlite:////abs/path absolute)"
        )


def open_store(url: str) -> Store:
    """Open (creating and migrating as needed) the database at ``url``.

    ``sqlite://`` is a private in-memory database (for tests): one shared
    connection, so every caller sees the same data. ``postgresql://…`` needs
    psycopg (``homeport[postgres]``).

    Raises:
        StoreError: unsupported URL, missing driver, unreachable server, or a
            schema newer than this code; always one line.
    """
    url = normalize_url(url)
    engine = _engine(url)
    try:
        _run_migrations(engine)
    except StoreError:
        engine.dispose()
        raise
    except Exception as exc:
        engine.dispose()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"cannot open database {display_url(url)}: {first}") from exc
    return Store(engine)


def peek_schema_version(url: str) -> int | None:
    """The schema version recorded at ``url`` without migrating it (None: no homeport tables).

    Raises:
        StoreError: unsupported URL, missing driver, unreachable server.
    """
    url = normalize_url(url)
    parsed = make_url(url)
    sqlite_file = parsed.get_backend_name() == "sqlite" and parsed.database
    if sqlite_file and not Path(str(parsed.database)).exists():  # do not create it by looking
        return None
    engine = _engine(url)
    try:
        with engine.connect() as conn, conn.begin():
            if not inspect(conn).has_table(schema_version.name):
                return None
            return int(conn.execute(select(func.max(schema_version.c.version))).scalar() or 0)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"cannot open database {display_url(url)}: {first}") from exc
    finally:
        engine.dispose()


def default_url(data_dir: str) -> str:
    """The SQLite database inside a server data directory."""
    return f"sqlite:///{data_dir}/homeport.db"
