"""ServerState: the single owner and only writer of the server's state.

It owns the database (through :class:`homeport.store.db.Store`) and the
in-memory registry of online agent sessions, authenticated sessions and
streams being set up. It does no I/O of its own beyond the store and reads no
clock: every method that depends on time takes ``now`` (unix seconds), so the
rules below are unit-tested with an in-memory SQLite and a fake clock.

Sessions are opaque to it (``S``: whatever the I/O layer uses as a handle,
only hashed and handed back), so the service decides how to write to or close
a session and this module decides *whether* to.

The server runs single-threaded (asyncio); the store serializes its own
callers, so the offline admin path can use the same class in another process
while no server is running.
"""

from __future__ import annotations

import enum
import hmac
import re
import secrets
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from homeport.crypto.identity import (
    IdentityError,
    KeyPair,
    cert_der_from_pem,
    sign_node_csr,
)
from homeport.crypto.tls import fingerprint
from homeport.errors import CodedError
from homeport.store.db import AuthKeyRow, KeyOutcome, NameTaken, NodeRow, Store
from homeport.wire import authkey
from homeport.wire import control as m
from homeport.wire.errors import WireError

S = TypeVar("S", bound=Hashable)

#: Node names: DNS-label-like, so they work as ssh host aliases.
NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_NAME = 63
#: last_seen is kept exactly in memory; the database copy may lag this much.
LAST_SEEN_WRITE_INTERVAL = 30.0
#: Services and host keys one agent may announce (more are dropped).
MAX_SERVICES = 256
MAX_HOST_KEYS = 32
#: Service names as ``homeport up --expose NAME=...`` allows them.
SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
#: Streams between OPEN and ACCEPT/REJECT/timeout, over all sessions.
MAX_PENDING_STREAMS = 4096
#: A never-matching hash compared for unknown key ids, so "unknown id" and
#: "wrong secret" take the same path and time.
_DUMMY_HASH = "0" * 64


class EnrollError(CodedError):
    """Enrollment refused; ``code`` goes on the wire in ERROR, ``message`` to the user."""

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class AuthError(CodedError):
    """A certificate that does not (or no longer) belong to a node."""

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class OpenRefused(CodedError):
    """The server will not set up this stream; becomes OPEN_FAILED(code, message)."""

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


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


@dataclass(frozen=True, slots=True)
class Enrollment:
    node_id: str
    name: str
    cert_pem: str
    ca_pem: str


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One node for ``homeport nodes list``."""

    node_id: str
    name: str
    online: bool
    last_seen: float | None
    address: str
    services: tuple[m.ServiceInfo, ...]
    fingerprint: str
    created_at: float


@dataclass(frozen=True, slots=True)
class OpenVerdict:
    """Whether a stream to ``dst:service`` may be set up, and why (not)."""

    allowed: bool
    code: str
    message: str
    service: m.ServiceInfo | None = None


@dataclass(frozen=True, slots=True)
class PendingStream(Generic[S]):
    """A stream between OPEN and the destination's ACCEPT/REJECT."""

    stream_id: str
    src: NodeRow
    dst: NodeRow
    service: m.ServiceInfo
    opener_token: bytes  # Tc: the opener's data connection
    dest_token: bytes  # Ta: the destination's data connection
    opener: S
    created_at: float


@dataclass(frozen=True, slots=True)
class Removal(Generic[S]):
    """What removing a node affects; the service closes/cuts these."""

    node: NodeRow
    sessions: tuple[S, ...]
    failed_streams: tuple[PendingStream[S], ...]


def check_name(name: str) -> str | None:
    """Return why ``name`` is not a valid node name, or None if it is."""
    if not 1 <= len(name) <= MAX_NAME:
        return f"node names are 1 to {MAX_NAME} characters, got {len(name)}"
    if NAME_RE.fullmatch(name) is None:
        return (
            f"invalid node name {name!r}: use lowercase letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return None


def ago(seconds: float) -> str:
    """Human form of a duration in the past: '12 s', '3 min', '5 h', '2 days'."""
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 36 * 3600:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:.0f} days"


def resolve_service(services: tuple[m.ServiceInfo, ...], requested: str) -> m.ServiceInfo | None:
    """The announced service a client means by ``requested`` (a name or a port)."""
    for svc in services:
        if requested in (svc.name, str(svc.port)):
            return svc
    return None


def decide_open(
    requested_dst: str,
    dst: NodeRow | None,
    *,
    online: bool,
    last_seen: float | None,
    requested_service: str,
    now: float,
) -> OpenVerdict:
    """May a stream to ``requested_dst:requested_service`` be set up? Pure.

    A node may reach its own services: nothing here special-cases src == dst.
    """
    if dst is None:
        return OpenVerdict(
            False, "unknown-node", f"no node named {requested_dst!r} in this network"
        )
    if dst.removed_at is not None:
        return OpenVerdict(
            False,
            "node-removed",
            f"{dst.name} was removed by an admin {ago(now - dst.removed_at)} ago",
        )
    if not online:
        seen = "never seen" if last_seen is None else f"last seen {ago(now - last_seen)} ago"
        return OpenVerdict(
            False, "offline", f"{dst.name} is offline ({seen}); is 'homeport up' running there?"
        )
    svc = resolve_service(dst.services, requested_service)
    if svc is None:
        exposed = ", ".join(f"{s.name}/{s.port}" for s in dst.services) or "none"
        return OpenVerdict(
            False,
            "not-exposed",
            f"{dst.name} does not expose {requested_service!r} (exposed: {exposed})",
        )
    return OpenVerdict(True, "ok", f"{dst.name}:{svc.name} (port {svc.port})", svc)


def sanitize_announce(
    services: tuple[m.ServiceInfo, ...], host_keys: tuple[str, ...]
) -> tuple[tuple[m.ServiceInfo, ...], tuple[str, ...]]:
    """The usable part of an ANNOUNCE (see :meth:`ServerState.announce`)."""
    seen: set[str] = set()
    good: list[m.ServiceInfo] = []
    for svc in services:
        if (
            SERVICE_NAME_RE.fullmatch(svc.name)
            and not svc.name.isdigit()
            and 0 < svc.port < 65536
            and svc.name not in seen
        ):
            seen.add(svc.name)
            good.append(svc)
    keys = [k for k in host_keys if k and "\n" not in k and len(k.split()) >= 2]
    return tuple(good[:MAX_SERVICES]), tuple(keys[:MAX_HOST_KEYS])


def key_status(row: AuthKeyRow, now: float) -> KeyStatus:
    return {
        KeyOutcome.CONSUMED: KeyStatus.VALID,
        KeyOutcome.USED: KeyStatus.USED,
        KeyOutcome.EXPIRED: KeyStatus.EXPIRED,
        KeyOutcome.REVOKED: KeyStatus.REVOKED,
        KeyOutcome.UNKNOWN: KeyStatus.REVOKED,
    }[row.outcome_at(now)]


_KEY_ERRORS = {
    KeyOutcome.UNKNOWN: ("auth-key-invalid", "auth key is not valid for this server"),
    KeyOutcome.REVOKED: ("auth-key-invalid", "auth key was revoked by an admin"),
    KeyOutcome.USED: (
        "auth-key-used",
        "auth key was already used (single-use); ask the admin for a new one",
    ),
    KeyOutcome.EXPIRED: ("auth-key-expired", "auth key has expired; ask the admin for a new one"),
}


def new_node_id() -> str:
    return "n" + secrets.token_hex(6)


def new_stream_id() -> str:
    return "s" + secrets.token_hex(6)


class ServerState(Generic[S]):
    """The one writer of server state; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        ca: KeyPair,
        server_pin: str,
        last_seen_write_interval: float = LAST_SEEN_WRITE_INTERVAL,
        max_pending_streams: int = MAX_PENDING_STREAMS,
    ) -> None:
        self.store = store
        self.ca = ca
        self.server_pin = server_pin
        self.last_seen_write_interval = last_seen_write_interval
        self.max_pending_streams = max_pending_streams
        self._agents: dict[str, S] = {}
        self._sessions: dict[str, set[S]] = {}
        self._last_seen: dict[str, float] = {}
        self._last_written: dict[str, float] = {}
        self._addresses: dict[str, str] = {}
        self._pending: dict[str, PendingStream[S]] = {}

    # -- auth keys -----------------------------------------------------------
    def create_auth_key(
        self,
        *,
        now: float,
        reusable: bool = False,
        expiry_seconds: float | None = None,
        note: str = "",
    ) -> authkey.AuthKey:
        """Create a key; only its hash is stored, so this is the one time it exists."""
        if expiry_seconds is not None and expiry_seconds <= 0:
            raise ValueError("expiry must be positive")
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
                status=key_status(r, now),
                note=r.note,
            )
            for r in self.store.list_auth_keys()
        ]

    def revoke_auth_key(self, key_id: str) -> bool:
        return self.store.revoke_auth_key(key_id)

    # -- enrollment and authentication ----------------------------------------
    def enroll(self, auth_key_text: str, name: str, csr_pem: str, now: float) -> Enrollment:
        """Check the key, sign the CSR, consume the key and create the node atomically.

        The key is checked before the name is looked at, so someone without a
        key cannot probe which names exist.

        Raises:
            EnrollError: codes auth-key-invalid, auth-key-used, auth-key-expired,
                name-taken, bad-name, bad-request.
        """
        try:
            key = authkey.parse_untrusted(auth_key_text)
        except WireError:
            raise EnrollError("auth-key-invalid", "not a homeport auth key") from None
        if not hmac.compare_digest(key.server_pin.encode(), self.server_pin.encode()):
            raise EnrollError("auth-key-invalid", "this auth key was made for a different server")
        problem = check_name(name)
        if problem is not None:
            raise EnrollError("bad-name", problem)
        row = self.store.get_auth_key(key.key_id)
        stored = row.secret_hash if row is not None else _DUMMY_HASH
        if not hmac.compare_digest(stored.encode(), authkey.hash_secret(key.secret).encode()):
            row = None
        if row is None:
            raise EnrollError(*_KEY_ERRORS[KeyOutcome.UNKNOWN])
        early = row.outcome_at(now)
        if early is not KeyOutcome.CONSUMED:
            raise EnrollError(*_KEY_ERRORS[early])
        existing = self.store.node_by_name(name)
        if existing is not None and not existing.removed:
            raise EnrollError("name-taken", f"a node named {name!r} already exists")
        node_id = new_node_id()
        try:
            cert_pem = sign_node_csr(self.ca, csr_pem.encode(), node_id).decode()
        except (IdentityError, UnicodeError) as exc:
            raise EnrollError("bad-request", str(exc)) from None
        node = NodeRow(
            node_id=node_id,
            name=name,
            fingerprint=fingerprint(cert_der_from_pem(cert_pem.encode())),
            cert_pem=cert_pem,
            created_at=now,
        )
        try:
            outcome = self.store.enroll_node(key.key_id, node, now)
        except NameTaken:
            raise EnrollError("name-taken", f"a node named {name!r} already exists") from None
        if outcome is not KeyOutcome.CONSUMED:
            raise EnrollError(*_KEY_ERRORS[outcome])
        return Enrollment(node_id, name, cert_pem, self.ca.cert_pem.decode())

    def authenticate(self, cert_fingerprint: str) -> NodeRow:
        """The live node owning this certificate. Raises AuthError."""
        node = self.store.node_by_fingerprint(cert_fingerprint)
        if node is None:
            raise AuthError(
                "unknown-node",
                "this certificate belongs to no node of this network; "
                "enroll again with 'homeport up --authkey KEY'",
            )
        if node.removed_at is not None:
            raise AuthError(
                "node-removed",
                f"node {node.name!r} was removed by an admin; "
                "enroll again with a new auth key to rejoin",
            )
        return node

    # -- sessions -------------------------------------------------------------
    def session_opened(self, node_id: str, session: S) -> None:
        """Track an authenticated session (agent or client) so removal can close it."""
        self._sessions.setdefault(node_id, set()).add(session)

    def session_closed(self, node_id: str, session: S) -> None:
        sessions = self._sessions.get(node_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions[node_id]

    def agent_online(self, node: NodeRow, session: S, address: str, now: float) -> S | None:
        """Make ``session`` the node's live agent session; return the one it replaces.

        The caller closes the replaced session at once: a node has exactly one
        agent registration, never a stale one.
        """
        old = self._agents.get(node.node_id)
        self._agents[node.node_id] = session
        self._addresses[node.node_id] = address
        self._last_seen[node.node_id] = now
        self._last_written[node.node_id] = now
        self.store.set_node_seen(node.node_id, now, address)
        return old if old is not None and old != session else None

    def agent_offline(self, node_id: str, session: S, now: float) -> list[PendingStream[S]]:
        """The agent session ended. Returns pending streams towards it (now failed).

        Does nothing if ``session`` was already replaced by a newer one.
        """
        if self._agents.get(node_id) != session:
            return []
        del self._agents[node_id]
        seen = self._last_seen.get(node_id, now)
        self._last_written[node_id] = seen
        self.store.set_node_seen(node_id, seen)
        return [
            self._pending.pop(p.stream_id)
            for p in list(self._pending.values())
            if p.dst.node_id == node_id
        ]

    def is_online(self, node_id: str) -> bool:
        return node_id in self._agents

    def agent_session(self, node_id: str) -> S | None:
        return self._agents.get(node_id)

    def online_agents(self) -> list[tuple[str, S]]:
        return list(self._agents.items())

    def touch(self, node_id: str, now: float) -> None:
        """Activity from an online agent; writes last_seen at most every interval."""
        self._last_seen[node_id] = now
        if now - self._last_written.get(node_id, float("-inf")) >= self.last_seen_write_interval:
            self._last_written[node_id] = now
            self.store.set_node_seen(node_id, now)

    def last_seen(self, node: NodeRow) -> float | None:
        return self._last_seen.get(node.node_id, node.last_seen)

    def announce(
        self,
        node_id: str,
        services: tuple[m.ServiceInfo, ...],
        host_keys: tuple[str, ...],
        now: float,
    ) -> bool:
        """Store what an agent exposes. Returns True if it changed (push netmaps).

        Entries that other nodes could not use (bad names or ports, duplicate
        names, absurd counts) are dropped rather than refused: an agent is not
        disconnected over one bad ``--expose``.
        """
        self.touch(node_id, now)
        services, host_keys = sanitize_announce(services, host_keys)
        node = self.store.get_node(node_id)
        if node is None or (node.services == services and node.host_keys == host_keys):
            return False
        self.store.set_node_announce(node_id, services, host_keys)
        return True

    # -- netmap -----------------------------------------------------------------
    def netmap_nodes(self, now: float) -> tuple[m.NodeInfo, ...]:
        """Every live node as NodeInfo (the same for every recipient)."""
        out: list[m.NodeInfo] = []
        for node in self.store.list_nodes():
            online = self.is_online(node.node_id)
            out.append(
                m.NodeInfo(
                    node_id=node.node_id,
                    name=node.name,
                    online=online,
                    last_seen=(now if online else self.last_seen(node)) or 0.0,
                    fingerprint=node.fingerprint,
                    services=node.services,
                    host_keys=node.host_keys,
                    address=self._addresses.get(node.node_id, node.last_address),
                    path="relay",
                )
            )
        return tuple(out)

    def netmap(self, for_node_id: str, now: float) -> m.NetMap:
        return m.NetMap(self_id=for_node_id, nodes=self.netmap_nodes(now))

    def node_list(self) -> list[NodeStatus]:
        return [
            NodeStatus(
                node_id=n.node_id,
                name=n.name,
                online=self.is_online(n.node_id),
                last_seen=self.last_seen(n),
                address=self._addresses.get(n.node_id, n.last_address),
                services=n.services,
                fingerprint=n.fingerprint,
                created_at=n.created_at,
            )
            for n in self.store.list_nodes()
        ]

    # -- streams ------------------------------------------------------------------
    def check_open(
        self, dst_name: str, service: str, now: float
    ) -> tuple[NodeRow | None, OpenVerdict]:
        dst = self.store.node_by_name(dst_name)
        online = dst is not None and self.is_online(dst.node_id)
        last = None if dst is None else self.last_seen(dst)
        return dst, decide_open(
            dst_name, dst, online=online, last_seen=last, requested_service=service, now=now
        )

    def open_stream(
        self,
        src: NodeRow,
        opener: S,
        dst_name: str,
        service: str,
        *,
        opener_token: bytes,
        now: float,
    ) -> PendingStream[S]:
        """Decide an OPEN and, if allowed, register the pending stream.

        Raises:
            OpenRefused: with the OPEN_FAILED code and a message for the user.
        """
        dst, verdict = self.check_open(dst_name, service, now)
        if not verdict.allowed or dst is None or verdict.service is None:
            raise OpenRefused(verdict.code, verdict.message)
        if len(self._pending) >= self.max_pending_streams:
            raise OpenRefused("busy", "the server has too many streams being set up; retry")
        if any(p.opener_token == opener_token for p in self._pending.values()):
            raise OpenRefused("bad-request", "token already in use")
        pending = PendingStream(
            stream_id=new_stream_id(),
            src=src,
            dst=dst,
            service=verdict.service,
            opener_token=opener_token,
            dest_token=secrets.token_bytes(len(opener_token)),
            opener=opener,
            created_at=now,
        )
        self._pending[pending.stream_id] = pending
        return pending

    def accept_stream(self, stream_id: str, by_node_id: str) -> PendingStream[S] | None:
        """The destination accepted; None if no such pending stream goes to that node."""
        p = self._pending.get(stream_id)
        if p is None or p.dst.node_id != by_node_id:
            return None
        return self._pending.pop(stream_id)

    reject_stream = accept_stream  # same bookkeeping; the caller words the failure

    def drop_stream(self, stream_id: str) -> PendingStream[S] | None:
        """Forget a pending stream (timeout, opener gone)."""
        return self._pending.pop(stream_id, None)

    def pending_of_opener(self, opener: S) -> list[PendingStream[S]]:
        return [p for p in self._pending.values() if p.opener == opener]

    def pending_count(self) -> int:
        return len(self._pending)

    # -- admin --------------------------------------------------------------------
    def remove_node(self, name: str, now: float) -> Removal[S]:
        """Tombstone the live node ``name``. Raises KeyError if there is none.

        The caller must close ``sessions`` with ERROR(node-removed), cut the
        node's relayed streams and push netmaps.
        """
        node = self.store.node_by_name(name)
        if node is None or node.removed or not self.store.remove_node(node.node_id, now):
            raise KeyError(name)
        sessions = set(self._sessions.pop(node.node_id, set()))
        agent = self._agents.pop(node.node_id, None)
        if agent is not None:
            sessions.add(agent)
        failed = tuple(
            self._pending.pop(p.stream_id)
            for p in list(self._pending.values())
            if node.node_id in (p.src.node_id, p.dst.node_id)
        )
        self._last_seen.pop(node.node_id, None)
        self._addresses.pop(node.node_id, None)
        return Removal(node=node, sessions=tuple(sessions), failed_streams=failed)
