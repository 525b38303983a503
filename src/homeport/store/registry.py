"""The registry: the coordinator's records on disk, written behind, off the event loop.

Why: the coordinator core (:mod:`homeport.proto.coord`) keeps every node in
memory and decides without touching the database; what it decides is written
here, in order, by one writer thread (:class:`WriteBehind`). HELLO, OPEN,
ANNOUNCE and peer-map building therefore never wait for SQL, and a slow
database (PostgreSQL across a network) stalls no session.

This module is the only one outside :mod:`homeport.store.db` that talks to the
store (``tests/test_architecture.py`` enforces it): auth keys (create, list,
revoke), enrollment (the one atomic "consume key + insert node" transaction,
whose answer the core awaits), the write-behind operations, and the admin
views used while no server runs.
"""

from __future__ import annotations

import concurrent.futures
import enum
import hmac
import logging
import queue
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from homeport.proto.coord import (
    EnrollRefused,
    EnrollRequest,
    NodeRecord,
    NodeStatus,
    RemoveNode,
    RenameNode,
    RenewCert,
    SetAccess,
    SetAnnounce,
    SetSeen,
    StoreOp,
)
from homeport.store.db import ApiKeyRow as ApiKeyRow  # noqa: PLC0414 (re-exported)
from homeport.store.db import (
    AuthKeyRow,
    KeyOutcome,
    NameTaken,
    NodeRow,
    Store,
    UserRow,
    default_url,
    open_store,
)
from homeport.store.db import StoreError as StoreError  # noqa: PLC0414 (re-exported)
from homeport.store.db import check_url as check_url  # noqa: PLC0414 (re-exported)
from homeport.wire import authkey, names

log = logging.getLogger("homeport.registry")

T = TypeVar("T")

#: Writes queued for the database before the oldest is reported as dropped.
MAX_PENDING_WRITES = 100_000
#: Consecutive "last seen" writes the writer thread runs in one transaction (see
#: ``Store.set_nodes_seen``: one per agent connect and disconnect).
MAX_SEEN_BATCH = 512
#: A never-matching hash compared for unknown key ids, so "unknown id" and
#: "wrong secret" take the same path and time.
_DUMMY_HASH = "0" * 64


class KeyStatus(enum.Enum):
    VALID = "valid"
    USED = "used"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class AuthKeyInfo:
    """An auth key as the admin sees it: never the secret, never its hash."""

    key_id: str
    reusable: bool
    created_at: float
    expires_at: float | None
    uses: int
    last_used_at: float | None
    status: KeyStatus
    note: str
    user: str = ""
    tags: tuple[str, ...] = ()
    ephemeral: bool = False
    approval: bool = False


_STATUS = {
    KeyOutcome.CONSUMED: KeyStatus.VALID,
    KeyOutcome.USED: KeyStatus.USED,
    KeyOutcome.EXPIRED: KeyStatus.EXPIRED,
    KeyOutcome.REVOKED: KeyStatus.REVOKED,
    KeyOutcome.UNKNOWN: KeyStatus.REVOKED,
}

_KEY_ERRORS = {
    KeyOutcome.UNKNOWN: ("auth-key-invalid", "auth key is not valid for this server"),
    KeyOutcome.REVOKED: ("auth-key-invalid", "auth key was revoked by an admin"),
    KeyOutcome.USED: (
        "auth-key-used",
        "auth key was already used (single-use); ask the admin for a new one",
    ),
    KeyOutcome.EXPIRED: ("auth-key-expired", "auth key has expired; ask the admin for a new one"),
}


def _record(row: NodeRow, fingerprints: tuple[str, ...]) -> NodeRecord:
    # newest certificate first: it is the current one (renewal adds, then prunes old ones)
    fps = tuple(reversed(fingerprints)) or (row.fingerprint,)
    return NodeRecord(
        node_id=row.node_id,
        name=row.name,
        fingerprints=fps,
        created_at=row.created_at,
        cert_pem=row.cert_pem,
        last_seen=row.last_seen,
        last_address=row.last_address,
        services=row.services,
        host_keys=row.host_keys,
        removed_at=row.removed_at,
        user=row.user,
        tags=row.tags,
        approved=row.approved,
        expires_at=row.expires_at,
        ephemeral=row.ephemeral,
        expiry_disabled=row.expiry_disabled,
    )


def open_registry(url: str, *, server_pin: str) -> Registry:
    """Open (creating and migrating) the database at ``url``. Raises StoreError."""
    return Registry(open_store(url), server_pin=server_pin)


def database_url(data_dir: str) -> str:
    """The embedded SQLite database inside a server data directory."""
    return default_url(data_dir)


class Registry:
    """Typed, intention-level access to the store for the server."""

    def __init__(self, store: Store, *, server_pin: str) -> None:
        self.store = store
        self.server_pin = server_pin

    def close(self) -> None:
        self.store.close()

    # -- nodes -------------------------------------------------------------------
    def load_nodes(self) -> list[NodeRecord]:
        """Every node, live and tombstoned, for the coordinator to start from."""
        fps = self.store.node_fingerprints()
        return [
            _record(row, fps.get(row.node_id, ()))
            for row in self.store.list_nodes(include_removed=True)
        ]

    def node_list(self) -> list[NodeStatus]:
        """Live nodes as the admin sees them while no server runs (all offline)."""
        return [
            NodeStatus(
                node_id=n.node_id,
                name=n.name,
                online=False,
                last_seen=n.last_seen,
                address=n.last_address,
                services=n.services,
                fingerprint=n.fingerprint,
                created_at=n.created_at,
                user=n.user,
                tags=n.tags,
                approved=n.approved,
                expires_at=n.expires_at,
                ephemeral=n.ephemeral,
                expiry_disabled=n.expiry_disabled,
                host_keys=n.host_keys,
            )
            for n in self.store.list_nodes()
        ]

    def rename_node(self, name: str, new_name: str) -> NodeRecord:
        """Rename the live node ``name`` (no server running; the node reads its new name
        in WELCOME when it next connects).

        Raises:
            KeyError: no live node has this name.
            ValueError: ``new_name`` is not a node name, or a live node has it.
        """
        from homeport.wire.names import node_name_problem

        problem = node_name_problem(new_name)
        if problem is not None:
            raise ValueError(problem)
        row = self.store.node_by_name(name)
        if row is None or row.removed:
            raise KeyError(name)
        other = self.store.node_by_name(new_name)
        if other is not None and not other.removed and other.node_id != row.node_id:
            raise ValueError(f"another node is already called {new_name!r}")
        self.store.rename_node(row.node_id, new_name)
        fresh = self.store.get_node(row.node_id)
        assert fresh is not None
        return _record(fresh, ())

    def remove_node(self, name: str, now: float) -> NodeRecord:
        """Tombstone the live node ``name`` (no server running). Raises KeyError."""
        row = self.store.node_by_name(name)
        if row is None or row.removed or not self.store.remove_node(row.node_id, now):
            raise KeyError(name)
        return _record(row, ())

    def apply_seen(self, ops: list[SetSeen]) -> None:
        """Execute consecutive SetSeen operations in one transaction (same result as in turn)."""
        self.store.set_nodes_seen([(op.node_id, op.last_seen, op.address) for op in ops])

    def apply(self, op: StoreOp) -> None:
        """Execute one write-behind operation."""
        if isinstance(op, SetSeen):
            self.store.set_node_seen(op.node_id, op.last_seen, op.address)
        elif isinstance(op, SetAnnounce):
            self.store.set_node_announce(op.node_id, op.services, op.host_keys)
        elif isinstance(op, RemoveNode):
            self.store.remove_node(op.node_id, op.removed_at)
        elif isinstance(op, SetAccess):
            self.store.set_node_access(
                op.node_id,
                approved=op.approved,
                expires_at=op.expires_at,
                expiry_disabled=op.expiry_disabled,
            )
        elif isinstance(op, RenameNode):
            self.store.rename_node(op.node_id, op.name)
        elif isinstance(op, RenewCert):
            self.store.renew_node_cert(
                op.node_id, op.fingerprint, op.cert_pem, op.created_at, keep=op.keep
            )

    # -- enrollment ---------------------------------------------------------------
    def enroll(self, req: EnrollRequest) -> NodeRecord | EnrollRefused:
        """Check the key (before the name), then consume it and insert the node atomically."""
        row = self.store.get_auth_key(req.key_id)
        stored = row.secret_hash if row is not None else _DUMMY_HASH
        if not hmac.compare_digest(stored.encode(), authkey.hash_secret(req.secret).encode()):
            row = None
        if row is None:
            return EnrollRefused(*_KEY_ERRORS[KeyOutcome.UNKNOWN])
        early = row.outcome_at(req.now)
        if early is not KeyOutcome.CONSUMED:
            return EnrollRefused(*_KEY_ERRORS[early])
        if row.user and self.store.get_user(row.user) is None:
            return EnrollRefused(
                "auth-key-invalid", "the user this auth key belongs to was removed"
            )
        name = req.node.name
        existing = self.store.node_by_name(name)
        if existing is not None and not existing.removed:
            return EnrollRefused("name-taken", f"a node named {name!r} already exists")
        # who the node is comes from the key: a user's node, or a tagged one (no user)
        expires = req.key_lifetime is not None and (req.expire_tagged or not row.tags)
        node = replace(
            req.node,
            user="" if row.tags else row.user,
            tags=row.tags,
            approved=not row.approval,
            ephemeral=row.ephemeral,
            expires_at=req.now + req.key_lifetime if expires and req.key_lifetime else None,
        )
        try:
            outcome = self.store.enroll_node(
                req.key_id,
                NodeRow(
                    node_id=node.node_id,
                    name=node.name,
                    fingerprint=node.fingerprint,
                    cert_pem=node.cert_pem,
                    created_at=node.created_at,
                    user=node.user,
                    tags=node.tags,
                    approved=node.approved,
                    expires_at=node.expires_at,
                    ephemeral=node.ephemeral,
                ),
                req.now,
            )
        except NameTaken:
            return EnrollRefused("name-taken", f"a node named {name!r} already exists")
        if outcome is not KeyOutcome.CONSUMED:
            return EnrollRefused(*_KEY_ERRORS[outcome])
        return node

    # -- auth keys --------------------------------------------------------------------
    def create_auth_key(
        self,
        *,
        now: float,
        reusable: bool = False,
        expiry_seconds: float | None = None,
        note: str = "",
        user: str = "",
        tags: tuple[str, ...] = (),
        ephemeral: bool = False,
        approval: bool = False,
    ) -> authkey.AuthKey:
        """Create a key; only its hash is stored, so this is the one time it exists.

        A key makes either a user's nodes (``user``) or tagged nodes (``tags``),
        never both: a tagged node is owned by its tags, like Tailscale's.

        Raises:
            ValueError: bad expiry, tag or user name; both user and tags; unknown user.
        """
        if expiry_seconds is not None and expiry_seconds <= 0:
            raise ValueError("expiry must be positive")
        if user and tags:
            raise ValueError("a key makes a user's nodes or tagged nodes, not both")
        for tag in tags:
            problem = names.tag_problem(tag)
            if problem is not None:
                raise ValueError(problem)
        if user:
            problem = names.user_name_problem(user)
            if problem is not None:
                raise ValueError(problem)
            if self.store.get_user(user) is None:
                raise ValueError(f"no user {user!r}: create it with 'homeport users create'")
        key = authkey.AuthKey(
            key_id=secrets.token_hex(6), secret=secrets.token_hex(16), server_pin=self.server_pin
        )
        self.store.insert_auth_key(
            AuthKeyRow(
                key_id=key.key_id,
                secret_hash=authkey.hash_secret(key.secret),
                created_at=now,
                reusable=reusable,
                expires_at=None if expiry_seconds is None else now + expiry_seconds,
                note=note[:256],
                user=user,
                tags=tuple(dict.fromkeys(tags)),
                ephemeral=ephemeral,
                approval=approval,
            )
        )
        return key

    def list_auth_keys(self, now: float) -> list[AuthKeyInfo]:
        return [
            AuthKeyInfo(
                key_id=r.key_id,
                reusable=r.reusable,
                created_at=r.created_at,
                expires_at=r.expires_at,
                uses=r.uses,
                last_used_at=r.last_used_at,
                status=_STATUS[r.outcome_at(now)],
                note=r.note,
                user=r.user,
                tags=r.tags,
                ephemeral=r.ephemeral,
                approval=r.approval,
            )
            for r in self.store.list_auth_keys()
        ]

    def revoke_auth_key(self, key_id: str) -> bool:
        return self.store.revoke_auth_key(key_id)

    # -- users -------------------------------------------------------------------------
    def create_user(self, name: str, now: float) -> bool:
        """Add a user (False: it exists). Raises ValueError for a bad name."""
        problem = names.user_name_problem(name)
        if problem is not None:
            raise ValueError(problem)
        return self.store.create_user(name, now)

    def list_users(self) -> list[UserRow]:
        return self.store.list_users()

    def user_nodes(self, name: str) -> list[str]:
        """Names of the live nodes that belong to ``name``."""
        return [n.name for n in self.store.list_nodes() if n.user == name]

    def node_action(
        self, name: str, action: str, now: float, *, key_expiry: float = 180 * 86400.0
    ) -> NodeRecord:
        """approve / expire / extend / disable-expiry the live node ``name`` (no server running).

        Raises:
            KeyError: no live node has this name.
            ValueError: unknown action.
        """
        row = self.store.node_by_name(name)
        if row is None or row.removed:
            raise KeyError(name)
        approved, expires_at, disabled = row.approved, row.expires_at, row.expiry_disabled
        if action == "approve":
            approved = True
        elif action == "expire":
            expires_at, disabled = now, False
        elif action == "extend":
            expires_at = now + key_expiry
        elif action == "disable-expiry":
            disabled = True
        else:
            raise ValueError(f"unknown node action {action!r}")
        self.store.set_node_access(
            row.node_id, approved=approved, expires_at=expires_at, expiry_disabled=disabled
        )
        fresh = self.store.get_node(row.node_id)
        assert fresh is not None
        return _record(fresh, ())

    def remove_user(self, name: str) -> bool:
        """Delete the user and revoke its auth keys (its nodes are the caller's business)."""
        return self.store.remove_user(name)

    # -- API keys (the admin listener's tokens; server/apikeys.py) ------------------------
    def user_exists(self, name: str) -> bool:
        return self.store.get_user(name) is not None

    def create_api_key(self, key: ApiKeyRow) -> None:
        self.store.create_api_key(key)

    def list_api_keys(self) -> list[ApiKeyRow]:
        return self.store.list_api_keys()

    def revoke_api_key(self, key_id: str) -> bool:
        return self.store.revoke_api_key(key_id)

    def find_api_key_by_hash(self, token_hash: str) -> ApiKeyRow | None:
        return self.store.find_api_key_by_hash(token_hash)


class WriteBehind:
    """One thread that runs database work in submission order.

    ``submit`` is fire-and-forget (the coordinator's Persist commands);
    ``call`` returns a future (enrollment, admin operations) and runs after
    everything submitted before it, so an admin reading back sees its writes.
    A failing write is logged with its operation and never stops the thread.
    """

    def __init__(self, registry: Registry, *, max_pending: int = MAX_PENDING_WRITES) -> None:
        self.registry = registry
        # SimpleQueue: put is one C call with no Condition to notify (a Queue.put per agent
        # connect and disconnect was 7 % of the server's loop under 100 reconnects/s)
        self._queue: queue.SimpleQueue[Callable[[], None] | SetSeen | None] = queue.SimpleQueue()
        self._max = max_pending
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="registry-writer", daemon=True)
        self._thread.start()

    def submit(self, op: StoreOp) -> None:
        if self._queue.qsize() >= self._max:
            self._dropped += 1
            log.error("database writer is %d writes behind; dropped %s", self._max, op)
            return
        if isinstance(op, SetSeen):  # queued as itself: consecutive ones run as one batch
            self._queue.put(op)
            return

        def work() -> None:
            self.registry.apply(op)

        self._queue.put(work)

    def call(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def work() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        self._queue.put(work)
        return fut

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything submitted so far is written."""
        self.call(lambda: None).result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        ahead: list[Callable[[], None] | SetSeen | None] = []  # taken while batching, runs next
        while True:
            work = ahead.pop() if ahead else self._queue.get()
            if work is None:
                return
            if not isinstance(work, SetSeen):
                try:
                    work()
                except (StoreError, Exception):
                    log.exception("database write failed")
                continue
            batch = [work]
            while len(batch) < MAX_SEEN_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(nxt, SetSeen):
                    ahead.append(nxt)  # after the batch: submission order is kept
                    break
                batch.append(nxt)
            try:
                self.registry.apply_seen(batch)
            except (StoreError, Exception):
                log.exception("database write failed (%d last-seen updates)", len(batch))
