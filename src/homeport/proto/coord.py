"""The coordinator core: every decision of the server, as a sans-I/O machine.

Theory of operation (the model is aioquic's ``QuicConnection``, scaled to
many connections). The server's network shell (:mod:`homeport.server.service`)
owns sockets, TLS, the relay's threads and the database writer; this class owns
*what happens*: which sessions are authenticated, which node is online where,
every stream from OPEN to its end, the peer maps, and every timer. The shell
only feeds it inputs and executes the commands it returns:

==============================  ===================================================
input (method)                  when
==============================  ===================================================
``session_started``             a control connection finished TLS
``message``                     a decoded control message arrived on it
``session_ended``               it ended (any reason)
``enroll_done``                 the database answered an :class:`EnrollRequest`
``relay_event``                 the relay spliced a stream or saw it end
``relay_refused``               the relay could not take an :class:`RelayExpect`
``remove_node``                 an admin removed a node
``policy_changed``              an admin set a new ACL policy (or none)
``policy_refused``              an admin's policy was refused (audit only)
``handle_timer``                ``get_timer()`` came due
==============================  ===================================================

Commands (drained with :meth:`Coordinator.commands`): :class:`Send`,
:class:`SendEncoded`, :class:`Close`, :class:`Finish`, the relay's
:class:`RelayExpect` / :class:`RelayExtend` / :class:`RelayCancel` /
:class:`RelayRefuse` / :class:`RelayCut`, the write-behind :class:`Persist`,
:class:`EnrollRequest`, and :class:`Note` (a log line).

Why so strict: with the flow in one pure object, the whole stream set-up —
timeouts, refusals, removal, session replacement — is tested with a fake clock
and in-memory node cores (``tests/test_proto_coord.py``), and no SQL ever runs
on the event loop: the registry of nodes lives here, in memory, and the
database is written behind it (:mod:`homeport.store.registry`).

Stream life (one table, one place)::

    OPEN ──▶ WAITING ──ACCEPT──▶ ACCEPTED ──relay started──▶ LIVE ──relay ended──▶ gone
               │ REJECT/timeout/    │ no splice within         │ node removed: RelayCut
               │ dst offline/       │ unpaired_timeout
               ▼ opener gone        ▼
             gone (OPEN_FAILED)   gone (RelayCancel)
"""

from __future__ import annotations

import collections
import datetime
import enum
import heapq
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from homeport.crypto import sshca
from homeport.crypto.identity import IdentityError, KeyPair, cert_der_from_pem, sign_node_csr
from homeport.crypto.sshca import SshCa
from homeport.crypto.tls import fingerprint
from homeport.policy.acl import CompiledPolicy, SelSet, reach_set
from homeport.policy.decide import EXIT_SERVICE, Decision, Subject, decide, decide_exit
from homeport.policy.exitnet import MAX_DESTINATION, nets_untrusted
from homeport.proto import audit as au
from homeport.proto import path as hpath
from homeport.proto.audit import (
    APPROVE,
    CERT_ISSUE,
    ENROLL,
    ENROLL_REFUSED,
    NODE_EXPIRY,
    NODE_REMOVE,
    Audit,
)
from homeport.proto.login import Approvals, CodeProvider, Outcome
from homeport.proto.nat import NatKind
from homeport.proto.netmap import PeerBook
from homeport.proto.policy import policy_message
from homeport.proto.ratelimit import TokenBuckets
from homeport.wire import authkey, names
from homeport.wire import control as m
from homeport.wire.data import token_from_hex_untrusted
from homeport.wire.errors import WireError
from homeport.wire.hostkey import sanitize_host_keys
from homeport.wire.logtext import esc

SessionId = int
K = TypeVar("K")
V = TypeVar("V")

#: How long the destination agent has to ACCEPT or REJECT an INCOMING.
OPEN_TIMEOUT = 10.0
#: How long an accepted stream may wait for the relay to splice its two ends.
UNPAIRED_TIMEOUT = 10.0
#: Streams one session may have waiting for the destination's answer.
MAX_PENDING_OPENS_PER_SESSION = 64
#: Streams in any state (waiting, accepted, live) over the whole server.
MAX_STREAMS = 4096
#: Longest log line (Note) the core produces; peer text within it is escaped (wire.logtext).
MAX_NOTE = 1024
#: Netmap changes within this window go out as one push per agent.
NETMAP_COALESCE = 0.05
#: Session writes per second that map pushes may cost: every push writes to every online
#: agent, so a large fleet under churn waits longer between pushes (5,000 agents: 1 s).
NETMAP_PUSH_RATE = 5000.0
#: The longest a peer-map change waits for its push, however large the fleet.
NETMAP_COALESCE_MAX = 2.0
#: How long peer maps keep showing an agent online after its control connection ended.
#: Why: an agent that reconnects (a network blip, a process restart, a server-side drop)
#: is otherwise news to every node twice, offline then online with a new address, and at
#: thousands of agents that fan-out, not the reconnect, is the cost of churn (measured:
#: docs/reliability.md "Load"). Within the grace a reconnect from the same host changes
#: nothing in the map. The server's own view (``is_online``, admin, OPEN) is never delayed;
#: 5 s matches how long a dead control link takes to be noticed (an agent's idle timeout).
MAP_OFFLINE_GRACE = 5.0
#: Agents online from which the whole grace applies; below, it shrinks in proportion
#: (10 agents: 50 ms). Why: the grace buys nothing where pushes are cheap, and in a small
#: network a node that stopped must read as offline at once (``homeport ssh``'s and the
#: ssh-config check's one clean line depend on it; a new user saw OpenSSH's noise during
#: a fixed 5 s grace with two nodes).
MAP_GRACE_FULL_AT = 1000
#: Longest reject reason / code from an agent that we pass on.
MAX_REASON = 512
MAX_CODE = 64
#: Services one agent may announce (more are dropped).
MAX_SERVICES = 256
#: Viewers whose reachable policy rules are memoised (cleared when the policy changes).
MAX_REACH_CACHE = 65536
#: Keepalive interval the server asks nodes to use (WELCOME.ping_interval).
PING_INTERVAL = 5.0
#: PATH_REQs one pair of nodes may make (either direction) per PATH_REQ_WINDOW seconds.
MAX_PATH_REQS_PER_PAIR = 6
PATH_REQ_WINDOW = 60.0
#: Most STREAM_LOG reports (direct-stream decisions) one session may send per
#: :data:`STREAM_LOG_WINDOW`; the rest are dropped (the agent limits itself lower).
MAX_STREAM_LOGS_PER_SESSION = 120
#: The window of :data:`MAX_STREAM_LOGS_PER_SESSION` (seconds).
STREAM_LOG_WINDOW = 10.0
#: A PUNCH counts as in flight this long (or until a PATH_REPORT of the pair).
PUNCH_IN_FLIGHT = 10.0
#: Seconds the server's reachability probe of a node's ``ip:direct_port`` may take
#: (one TCP connect, nothing sent); see :class:`ProbeReach`.
REACH_PROBE_TIMEOUT = 2.0
#: At most one reachability probe per node in this many seconds (a node re-reporting
#: ENDPOINTS cannot turn the server into a connect loop against its own address).
REACH_PROBE_INTERVAL = 60.0
#: PEER_PING/PEER_PONG one node may have forwarded per PEER_PING_WINDOW seconds.
MAX_PEER_PINGS = 20
PEER_PING_WINDOW = 10.0
#: Pairs whose path reports, counters, rate limits and punches in flight are kept
#: (each table separately; the oldest entry is dropped beyond this).
MAX_PATH_RECORDS = 65536
#: Default node-key lifetime (``homeport server --key-expiry``); None would mean never.
DEFAULT_KEY_EXPIRY = 180 * 86400.0
#: An ephemeral node is removed once it has been offline this long.
EPHEMERAL_OFFLINE = 600.0
#: How far ahead of its key expiry a node is warned (logs, NOTICE, ``nodes list``).
EXPIRY_WARNINGS: tuple[float, ...] = (14 * 86400.0, 3 * 86400.0, 86400.0)
#: Certificates a node may authenticate with at once: the renewed one and the one before.
MAX_NODE_CERTS = 2

ROLE_AGENT = "agent"
ROLE_CLIENT = "client"

_PENDING_TEXT = (
    "{name} is waiting for an admin's approval ('homeport nodes approve {name}' on the server)"
)


# -- records ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node as the coordinator knows it (the database is written behind this).

    ``fingerprints``: every certificate the node may authenticate with, so a
    renewed certificate can overlap the old one; the first is the current one.
    """

    node_id: str
    name: str
    fingerprints: tuple[str, ...]
    created_at: float
    cert_pem: str = ""
    last_seen: float | None = None
    last_address: str = ""
    services: tuple[m.ServiceInfo, ...] = ()
    host_keys: tuple[str, ...] = ()
    removed_at: float | None = None
    user: str = ""
    tags: tuple[str, ...] = ()
    #: False while an admin has not approved it: in no peer map, no streams either way.
    approved: bool = True
    #: When its node key expires (None: never, e.g. tagged or enrolled before expiry existed).
    expires_at: float | None = None
    #: Removed automatically after EPHEMERAL_OFFLINE offline.
    ephemeral: bool = False
    #: An admin ran ``nodes disable-expiry``: ``expires_at`` is ignored.
    expiry_disabled: bool = False
    #: The exit networks its last ANNOUNCE advertised (cap ``exit``; memory only: a node
    #: announces again on every connection, and an offline node carries no streams).
    exit_nets: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        return self.fingerprints[0] if self.fingerprints else ""

    @property
    def removed(self) -> bool:
        return self.removed_at is not None

    def expired_at(self, now: float) -> bool:
        """Whether the node key has expired at ``now`` (never when expiry is off)."""
        return self.expiry_deadline is not None and now >= self.expiry_deadline

    @property
    def expiry_deadline(self) -> float | None:
        """The expiry that applies (None when the key never expires)."""
        return None if self.expiry_disabled else self.expires_at

    def subject(self) -> Subject:
        return Subject(node_id=self.node_id, name=self.name, user=self.user, tags=self.tags)

    def peer_info(self, *, host_keys: bool = False) -> m.PeerInfo:
        return m.PeerInfo(
            node_id=self.node_id,
            name=self.name,
            fingerprint=self.fingerprint,
            host_keys=self.host_keys if host_keys else (),
            user=self.user,
            tags=self.tags,
        )


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One node for ``homeport nodes list`` (admin view, live)."""

    node_id: str
    name: str
    online: bool
    last_seen: float | None
    address: str
    services: tuple[m.ServiceInfo, ...]
    fingerprint: str
    created_at: float
    user: str = ""
    tags: tuple[str, ...] = ()
    approved: bool = True
    expires_at: float | None = None
    ephemeral: bool = False
    expiry_disabled: bool = False
    host_keys: tuple[str, ...] = ()  # the sshd host keys it announced (OpenSSH public-key lines)


# -- commands -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    session: SessionId
    message: m.Message


@dataclass(frozen=True, slots=True)
class SendEncoded:
    """Frames encoded once and shared by many recipients (peer-map pushes)."""

    session: SessionId
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Send ERROR(code, message) and close the session."""

    session: SessionId
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Finish:
    """Close the session cleanly once what was sent is flushed (after ENROLLED)."""

    session: SessionId


@dataclass(frozen=True, slots=True)
class RelayExpect:
    stream_id: str
    src_node: str
    dst_node: str
    src_token: bytes
    dst_token: bytes
    timeout: float


@dataclass(frozen=True, slots=True)
class RelayExtend:
    stream_id: str
    timeout: float


@dataclass(frozen=True, slots=True)
class RelayCancel:
    stream_id: str


@dataclass(frozen=True, slots=True)
class RelayRefuse:
    """An OPEN that names this token failed: close its data connection."""

    token: bytes


@dataclass(frozen=True, slots=True)
class RelayCut:
    """Shut every relayed stream of this node at once."""

    node_id: str


@dataclass(frozen=True, slots=True)
class RelayCutStream:
    """End one stream now, waiting or spliced (a policy change denied it)."""

    stream_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class SetSeen:
    node_id: str
    last_seen: float
    address: str | None = None


@dataclass(frozen=True, slots=True)
class SetAnnounce:
    node_id: str
    services: tuple[m.ServiceInfo, ...]
    host_keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RemoveNode:
    node_id: str
    removed_at: float


@dataclass(frozen=True, slots=True)
class SetAccess:
    """A node's approval and key-expiry state changed."""

    node_id: str
    approved: bool
    expires_at: float | None
    expiry_disabled: bool


@dataclass(frozen=True, slots=True)
class RenewCert:
    """A renewed certificate: add it, keep only the newest ``keep`` of the node's certificates."""

    node_id: str
    fingerprint: str
    cert_pem: str
    created_at: float
    keep: int = MAX_NODE_CERTS


@dataclass(frozen=True, slots=True)
class RenameNode:
    """An admin renamed a live node (``homeport nodes rename``)."""

    node_id: str
    name: str


StoreOp = SetSeen | SetAnnounce | RemoveNode | SetAccess | RenewCert | RenameNode


@dataclass(frozen=True, slots=True)
class Persist:
    """Write this to the database, in order, off the event loop."""

    op: StoreOp


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    """Atomically consume the auth key and create the node; answer with enroll_done.

    The database checks the key (secret hash, expiry, single use) before the
    name, so a caller without a valid key learns nothing about names.
    """

    session: SessionId
    key_id: str
    secret: str
    node: NodeRecord
    now: float
    #: The node-key lifetime to give an untagged node (None: never expires).
    key_lifetime: float | None = None
    #: Whether tagged nodes' keys expire too (default: exempt, like Tailscale).
    expire_tagged: bool = False


@dataclass(frozen=True, slots=True)
class ProbeReach:
    """Try one TCP connect to ``host:port`` (``REACH_PROBE_TIMEOUT``), then close it and
    report with :meth:`Coordinator.reach_probed`.

    Why: a node behind a static port forward of its direct port is reachable although
    its NAT maps endpoint-dependently; only a connect from outside shows it. ``host`` is
    always the address the server observed for that node's own control connection,
    never an address a node names, so the server cannot be pointed at third parties.
    """

    node_id: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Note:
    """A log line (level from :mod:`logging`)."""

    level: int
    text: str


Command = (
    Send
    | SendEncoded
    | Close
    | Finish
    | RelayExpect
    | RelayExtend
    | RelayCancel
    | RelayRefuse
    | RelayCut
    | RelayCutStream
    | Persist
    | EnrollRequest
    | Note
    | Audit
    | ProbeReach
)


@dataclass(frozen=True, slots=True)
class PathRecord:
    """The last PATH_REPORT one node sent about one peer (for status and counters)."""

    kind: str
    endpoint: str
    rtt_ms: float
    code: str
    reason: str
    at: float
    punch_attempts: int = 0
    punch_successes: int = 0
    streams_direct: int = 0
    streams_relay: int = 0


@dataclass(frozen=True, slots=True)
class PairStats:
    """Server-side counters of one pair: punches coordinated, direct paths reported up."""

    punches: int = 0
    direct_ups: int = 0


DIRECT_MESSAGES = (m.Endpoints, m.PathReq, m.PathReport, m.PeerPing, m.PeerPong)


def _source(address: str) -> str:
    """The host part of a session address (``1.2.3.4:5``, ``[::1]:5``): the rate-limit key."""
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]")


def _evict_oldest(table: dict[K, V], key: K) -> None:
    """Make room for ``key`` in a bounded table (insertion order: the oldest goes first)."""
    if key not in table and len(table) >= MAX_PATH_RECORDS:
        table.pop(next(iter(table)))


def _nat(eps: m.Endpoints) -> NatKind:
    try:
        return NatKind(eps.nat)
    except ValueError:
        return NatKind.UNKNOWN


def _reach(eps: m.Endpoints, forwarded: str = "") -> hpath.Reach:
    public = frozenset(c.addr.rpartition(":")[0] for c in eps.candidates if c.kind == "public")
    mapped = bool(forwarded) or any(c.kind == "mapped" for c in eps.candidates)
    return hpath.Reach(_nat(eps), public, mapped)


# -- inputs from the relay and the database -------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamStarted:
    stream_id: str


@dataclass(frozen=True, slots=True)
class StreamEnded:
    stream_id: str
    bytes_up: int = 0
    bytes_down: int = 0
    reason: str = ""


RelayEvent = StreamStarted | StreamEnded


@dataclass(frozen=True, slots=True)
class EnrollRefused:
    code: str
    message: str


# -- internal state -----------------------------------------------------------------------


class SessionState(enum.Enum):
    NEW = "new"  # TLS done, no HELLO/ENROLL yet
    ENROLLING = "enrolling"  # ENROLL received; waiting for the database
    AUTHED = "authed"  # HELLO accepted (agent or client)


class StreamState(enum.Enum):
    WAITING = "waiting"  # INCOMING sent; waiting for ACCEPT/REJECT
    ACCEPTED = "accepted"  # waiting for the relay to splice both ends
    LIVE = "live"  # spliced


@dataclass(slots=True)
class _Session:
    sid: SessionId
    address: str
    peer_fp: str | None
    state: SessionState = SessionState.NEW
    node_id: str = ""
    role: str = ""
    capver: int = 1
    caps: frozenset[str] = frozenset()
    map_version: int = 0  # the peer map version this session has (PEERS)
    wants_map: bool = False  # an agent with cap "peers": pushed on change
    opens: int = 0  # streams it opened that are still WAITING
    stream_logs: collections.deque[float] = field(default_factory=collections.deque)


@dataclass(slots=True)
class _Stream:
    stream_id: str
    src: NodeRecord
    dst: NodeRecord
    service: m.ServiceInfo
    opener: SessionId
    opener_token: bytes
    dest_token: bytes
    created_at: float
    state: StreamState = StreamState.WAITING
    deadline: float | None = None
    rule: str = ""  # the rule that let the server pass it on (for the audit log)
    exit: str = ""  # an exit stream's destination "host:port" ("" for a service stream)


@dataclass(order=True, slots=True)
class _Timer:
    when: float
    seq: int
    kind: str = field(compare=False)
    key: str = field(compare=False)


def _ago(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 36 * 3600:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:.0f} days"


def _utc(when: float) -> str:
    """A date people read in logs and errors (UTC, minute precision)."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def sanitize_services(services: tuple[m.ServiceInfo, ...]) -> tuple[m.ServiceInfo, ...]:
    """The usable part of an announced service list (bad names/ports and duplicates dropped).

    Dropped rather than refused: an agent is not disconnected over one bad ``--expose``.
    """
    seen: set[str] = set()
    good: list[m.ServiceInfo] = []
    for svc in services:
        ok = names.service_name_problem(svc.name) is None and names.port_problem(svc.port) is None
        if ok and svc.name not in seen:
            seen.add(svc.name)
            good.append(svc)
    return tuple(good[:MAX_SERVICES])


class Coordinator:
    """The server's state and decisions; see the module docstring."""

    def __init__(
        self,
        *,
        ca: KeyPair,
        server_pin: str,
        nodes: list[NodeRecord] | tuple[NodeRecord, ...] = (),
        open_timeout: float = OPEN_TIMEOUT,
        unpaired_timeout: float = UNPAIRED_TIMEOUT,
        ping_interval: float = PING_INTERVAL,
        max_streams: int = MAX_STREAMS,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        relay_only: bool = False,
        probe_port: int = 0,
        key_expiry: float | None = DEFAULT_KEY_EXPIRY,
        expire_tagged: bool = False,
        ephemeral_offline: float = EPHEMERAL_OFFLINE,
        policy: CompiledPolicy | None = None,
        ssh_ca: SshCa | None = None,
        ssh_cert_validity: float = sshca.DEFAULT_VALIDITY,
        map_epoch: str | None = None,
        map_offline_grace: float = MAP_OFFLINE_GRACE,
    ) -> None:
        self.ca = ca
        self._ca_pem = ca.cert_pem.decode()
        self.server_pin = server_pin
        self.open_timeout = open_timeout
        self.unpaired_timeout = unpaired_timeout
        self.ping_interval = ping_interval
        self.max_streams = max_streams
        self._random = random_bytes
        self._out: list[Command] = []
        self._nodes: dict[str, NodeRecord] = {}
        self._by_name: dict[str, str] = {}  # live nodes only
        self._by_fp: dict[str, str] = {}  # live and removed (tombstones are refused by name)
        self._sessions: dict[SessionId, _Session] = {}
        self._node_sessions: dict[str, set[SessionId]] = {}
        self._agents: dict[str, SessionId] = {}
        self._addresses: dict[str, str] = {}
        #: node id -> (online since, address) as peer maps show it: set when an agent comes
        #: online, kept across a reconnect from the same host within ``map_offline_grace``.
        self._presence: dict[str, tuple[float, str]] = {}
        self.map_offline_grace = map_offline_grace
        self._streams: dict[str, _Stream] = {}
        self._tokens: set[bytes] = set()  # opener tokens of streams not yet spliced
        self._enroll_rate = TokenBuckets()  # per source address (proto.ratelimit)
        self._timers: list[_Timer] = []
        self._timer_seq = 0
        self._push_due: float | None = None
        #: Server setting: never coordinate direct paths (WELCOME says ``direct: false``).
        self.relay_only = relay_only
        #: The whoami probe port announced in WELCOME (0: none); set once it is bound.
        self.probe_port = probe_port
        self._endpoints: dict[str, m.Endpoints] = {}  # online agents' ENDPOINTS, memory only
        self._forwarded: dict[str, str] = {}  # node id -> "ip:port" the server reached
        self._reach_probed: dict[str, tuple[str, float]] = {}  # node id -> (target, when)
        self._path_reqs: dict[frozenset[str], collections.deque[float]] = {}
        self._punching: dict[frozenset[str], float] = {}  # pair -> in flight until
        self._paths: dict[tuple[str, str], PathRecord] = {}  # (reporter, peer) -> last report
        self._pair_stats: dict[frozenset[str], PairStats] = {}
        #: Cumulative, for metrics (the per-pair table above evicts): punches coordinated,
        #: and those whose pair then reported a direct path up.
        self.punches_total = 0
        self.punch_successes_total = 0
        self._peer_pings: dict[str, collections.deque[float]] = {}
        self.key_expiry = key_expiry
        self.expire_tagged = expire_tagged
        self.ephemeral_offline = ephemeral_offline
        #: (kind, node id) -> when its "expiry"/"ephemeral" timer is due (others are stale)
        self._node_due: dict[tuple[str, str], float] = {}
        self._enroll_keys: dict[SessionId, str] = {}  # auth key id of an enrollment in flight
        #: The ACL policy in force (None: no policy file; see policy.decide).
        self.policy = policy
        self._policy_version = 1
        #: The SSH user CA (keyless SSH, capability sshcert); None: certificates refused.
        self.ssh_ca = ssh_ca
        self.ssh_cert_validity = ssh_cert_validity
        #: Login checks for ``check`` ssh rules (pluggable provider; docs/policy.md).
        self.logins = Approvals(CodeProvider(random_bytes))
        # who a viewer is (name, user, tags) -> the rules it may reach through (its
        # peer-map filter); depends only on the policy, cleared when it changes
        self._reach: dict[tuple[str, str, tuple[str, ...]], SelSet] = {}
        self.book = PeerBook(self._visible, audience=self._audience)
        #: Names this book (cap mapdelta): its versions restart at 0 with every server run, so
        #: a node's "I hold version v" means something only with the epoch it got it in.
        self.map_epoch = map_epoch if map_epoch is not None else secrets.token_hex(8)
        for node in nodes:
            self._add_node(node)
            self._schedule_expiry(node, None)
            if node.ephemeral and not node.removed:
                offline_since = node.last_seen if node.last_seen is not None else node.created_at
                self._set_due("ephemeral", node.node_id, offline_since + ephemeral_offline)

    # -- inspection (tests, admin, status) ------------------------------------------------
    def commands(self) -> list[Command]:
        """Return and clear the commands produced so far, in order."""
        out, self._out = self._out, []
        return out

    def node(self, node_id: str) -> NodeRecord | None:
        return self._nodes.get(node_id)

    def node_by_name(self, name: str) -> NodeRecord | None:
        node_id = self._by_name.get(name)
        return None if node_id is None else self._nodes[node_id]

    def is_online(self, node_id: str) -> bool:
        return node_id in self._agents

    def agent_session(self, node_id: str) -> SessionId | None:
        return self._agents.get(node_id)

    def stream_states(self) -> dict[str, StreamState]:
        return {s.stream_id: s.state for s in self._streams.values()}

    def session_node(self, sid: SessionId) -> str:
        s = self._sessions.get(sid)
        return s.node_id if s is not None else ""

    def node_list(self) -> list[NodeStatus]:
        return [
            NodeStatus(
                node_id=n.node_id,
                name=n.name,
                online=self.is_online(n.node_id),
                last_seen=n.last_seen,
                address=self._addresses.get(n.node_id, n.last_address),
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
            for n in self._nodes.values()
            if not n.removed
        ]

    # -- sessions ----------------------------------------------------------------------------
    def session_started(self, sid: SessionId, peer_fp: str | None, address: str) -> None:
        self._sessions[sid] = _Session(sid=sid, address=address, peer_fp=peer_fp)

    def session_ended(self, sid: SessionId, now: float) -> None:
        s = self._sessions.pop(sid, None)
        if s is None or s.state is not SessionState.AUTHED:
            return
        node_id = s.node_id
        peers = self._node_sessions.get(node_id)
        if peers is not None:
            peers.discard(sid)
            if not peers:
                del self._node_sessions[node_id]
        for st in [x for x in self._streams.values() if x.opener == sid]:
            if st.state is not StreamState.LIVE:
                self._drop_stream(st)
                self._emit(RelayCancel(st.stream_id))
        if s.role == ROLE_AGENT and self._agents.get(node_id) == sid:
            del self._agents[node_id]
            node = self._nodes.get(node_id)
            if node is not None and not node.removed:
                self._nodes[node_id] = replace(node, last_seen=now)
                self._emit(Persist(SetSeen(node_id, now)))
                for st in [x for x in self._streams.values() if x.dst.node_id == node_id]:
                    if st.state is StreamState.WAITING:
                        self._fail(st, "offline", f"{node.name} went offline")
                self._note(logging.INFO, f"agent {node.name} ({node_id}) offline")
                self._direct_offline(node_id)
                grace = self.offline_grace()
                if grace > 0:  # maps say so once it has not come back
                    self._set_due("offline", node_id, now + grace)
                else:
                    self._offline_timer(node_id, now)
                if node.ephemeral:
                    self._set_due("ephemeral", node_id, now + self.ephemeral_offline)

    def message(self, sid: SessionId, msg: m.Message, now: float) -> None:
        """One decoded control message from session ``sid``."""
        s = self._sessions.get(sid)
        if s is None:
            return
        if s.state is SessionState.NEW:
            if isinstance(msg, m.Hello):
                self._hello(s, msg, now)
            elif isinstance(msg, m.Enroll):
                self._enroll(s, msg, now)
            return
        if s.state is SessionState.ENROLLING or isinstance(msg, m.Error):
            return  # closing after ENROLL; an ERROR closes the machine by itself
        agent = s.role == ROLE_AGENT
        if isinstance(msg, m.Announce) and agent:
            self._announce(s, msg, now)
        elif isinstance(msg, m.NetMapRequest):
            self._send_map(s, now)
        elif isinstance(msg, m.Open):
            self._open(s, msg, now)
        elif isinstance(msg, m.Accept | m.Reject) and agent:
            self._answer(s, msg, now)
        elif isinstance(msg, DIRECT_MESSAGES) and agent:
            self._direct(s, msg, now)
        elif isinstance(msg, m.Renew) and agent:
            self._renew(s, msg, now)
        elif isinstance(msg, m.StreamLog) and agent:
            self._stream_log(s, msg, now)
        elif isinstance(msg, m.SshCertReq):
            self._ssh_cert(s, msg, now)
        elif isinstance(msg, m.Login):
            self._login(s, msg, now)
        else:
            self._emit(
                Close(sid, "bad-request", f"unexpected {msg.TYPE.name} from a {s.role or 'node'}")
            )

    def _version_problem(self, proto: int, capver: int) -> str | None:
        if proto != m.PROTOCOL_VERSION:
            return (
                f"this server speaks wire version {m.PROTOCOL_VERSION}, the node sent {proto}; "
                "install the same homeport release on both"
            )
        if capver < m.MIN_CAPVER:
            return (
                f"this node's homeport is too old (capability version {capver}, the server "
                f"needs {m.MIN_CAPVER} or newer): upgrade homeport on this node"
            )
        return None

    def _hello(self, s: _Session, msg: m.Hello, now: float) -> None:
        problem = self._version_problem(msg.proto, msg.capver)
        if problem is not None:
            self._emit(Close(s.sid, "upgrade", problem))
            return
        if msg.role not in (ROLE_AGENT, ROLE_CLIENT):
            self._emit(Close(s.sid, "bad-request", f"unknown role {msg.role[:32]!r}"))
            return
        if s.peer_fp is None:
            self._emit(
                Close(
                    s.sid,
                    "unknown-node",
                    "no node certificate presented; enroll first (homeport up)",
                )
            )
            return
        node_id = self._by_fp.get(s.peer_fp)
        node = self._nodes.get(node_id) if node_id is not None else None
        if node is None:
            self._emit(
                Close(
                    s.sid,
                    "unknown-node",
                    "this certificate belongs to no node of this network; "
                    "enroll again with 'homeport up --authkey KEY'",
                )
            )
            return
        if node.removed:
            self._emit(
                Close(
                    s.sid,
                    "node-removed",
                    f"node {node.name!r} was removed by an admin; "
                    "enroll again with a new auth key to rejoin",
                )
            )
            return
        if node.expired_at(now):
            self._emit(Close(s.sid, "expired", self._expired_text(node)))
            return
        s.state = SessionState.AUTHED
        s.node_id = node.node_id
        s.role = msg.role
        s.capver = msg.capver
        s.caps = m.negotiate_caps(msg.caps)
        self._node_sessions.setdefault(node.node_id, set()).add(s.sid)
        self._emit(
            Send(
                s.sid,
                m.Welcome(
                    proto=m.PROTOCOL_VERSION,
                    node_id=node.node_id,
                    name=node.name,
                    ping_interval=self.ping_interval,
                    capver=m.CAPVER,
                    caps=m.OUR_CAPS,
                    direct=not self.relay_only,
                    probe_port=self.probe_port,
                    approved=node.approved,
                    expires_at=node.expiry_deadline or 0.0,
                    key_lifetime=self.key_expiry or 0.0,
                    server_time=now,
                    ssh_ca=self.ssh_ca.public_line if self.ssh_ca is not None else "",
                    map_epoch=self.map_epoch if m.CAP_MAPDELTA in s.caps else "",
                ),
            )
        )
        self._warn_expiry(node, now, s)
        if msg.role != ROLE_AGENT:
            return
        self._node_due.pop(("ephemeral", node.node_id), None)
        self._node_due.pop(("offline", node.node_id), None)
        old = self._agents.get(node.node_id)
        self._agents[node.node_id] = s.sid
        self._addresses[node.node_id] = s.address
        shown = self._presence.get(node.node_id)
        # the same host, any source port (it changes with every reconnect): no news
        if shown is None or _source(shown[1]) != _source(s.address):
            self._presence[node.node_id] = (now, s.address)
        self._nodes[node.node_id] = replace(node, last_seen=now, last_address=s.address)
        self._emit(Persist(SetSeen(node.node_id, now, s.address)))
        if old is not None and old != s.sid:
            self._emit(
                Close(old, "session-replaced", "a newer agent session of this node connected")
            )
            old_s = self._sessions.get(old)
            if old_s is not None:
                old_s.role = ""  # its end must not take the node offline
        s.wants_map = m.CAP_PEERS in s.caps and node.approved
        s.map_version = self._resume_base(s, msg)
        if self.policy is not None:  # a node starts every session with no policy in force
            self._send_policy(s)
        self._note(logging.INFO, f"agent {node.name} ({node.node_id}) online from {s.address}")
        self._map_changed(node.node_id, now)

    def _enroll(self, s: _Session, msg: m.Enroll, now: float) -> None:
        s.state = SessionState.ENROLLING
        rate = self._enroll_rate.check(_source(s.address), now)
        if not rate.allowed:  # one log line and audit record per burst, not per guess
            if rate.first:
                self._refuse_enroll(s, "rate-limited", rate.reason, now)
            else:
                self._emit(Close(s.sid, "rate-limited", rate.reason))
            return
        problem = self._version_problem(msg.proto, msg.capver)
        if problem is not None:
            self._emit(Close(s.sid, "upgrade", problem))
            return
        try:
            key = authkey.parse_untrusted(msg.auth_key)
        except WireError:
            self._refuse_enroll(s, "auth-key-invalid", "not a homeport auth key", now)
            return
        if not hmac.compare_digest(key.server_pin.encode(), self.server_pin.encode()):
            self._refuse_enroll(
                s, "auth-key-invalid", "this auth key was made for a different server", now
            )
            return
        bad_name = names.node_name_problem(msg.name)
        if bad_name is not None:
            self._refuse_enroll(s, "bad-name", bad_name, now)
            return
        node_id = "n" + self._random(6).hex()
        try:
            cert_pem = sign_node_csr(self.ca, msg.csr_pem.encode(), node_id).decode()
            fp = fingerprint(cert_der_from_pem(cert_pem.encode()))
        except (IdentityError, UnicodeError) as exc:
            self._refuse_enroll(s, "bad-request", str(exc), now)
            return
        node = NodeRecord(
            node_id=node_id, name=msg.name, fingerprints=(fp,), created_at=now, cert_pem=cert_pem
        )
        self._enroll_keys[s.sid] = key.key_id
        self._emit(
            EnrollRequest(
                s.sid,
                key.key_id,
                key.secret,
                node,
                now,
                key_lifetime=self.key_expiry,
                expire_tagged=self.expire_tagged,
            )
        )

    def _refuse_enroll(self, s: _Session, code: str, message: str, now: float) -> None:
        if code != "rate-limited":  # a failed attempt spends its source's budget
            self._enroll_rate.spend(_source(s.address), now)
        self._note(logging.INFO, f"enrollment from {s.address} refused: {code}: {message}")
        self._emit(
            Audit(
                ENROLL_REFUSED,
                now,
                (
                    ("address", s.address),
                    ("code", code),
                    ("reason", message),
                    ("key_id", self._enroll_keys.pop(s.sid, "")),
                ),
            )
        )
        self._emit(Close(s.sid, code, message))

    def enroll_done(self, sid: SessionId, result: NodeRecord | EnrollRefused, now: float) -> None:
        """The database's answer to an EnrollRequest."""
        s = self._sessions.get(sid)
        if isinstance(result, EnrollRefused):
            if s is not None:
                self._refuse_enroll(s, result.code, result.message, now)
            self._enroll_keys.pop(sid, None)
            return
        self._add_node(result)
        self._schedule_expiry(result, now)
        self._emit(
            Audit(
                ENROLL,
                now,
                (
                    ("node", result.name),
                    ("node_id", result.node_id),
                    ("user", result.user),
                    ("tags", ",".join(result.tags)),
                    ("key_id", self._enroll_keys.pop(sid, "")),
                    ("approved", "yes" if result.approved else "pending"),
                    ("ephemeral", "yes" if result.ephemeral else "no"),
                    ("address", s.address if s is not None else ""),
                ),
            )
        )
        self._note(
            logging.INFO,
            f"enrolled node {result.name} ({result.node_id})"
            + (f" from {s.address}" if s is not None else ""),
        )
        self._map_changed(result.node_id, now)
        if s is not None:
            self._emit(
                Send(
                    sid,
                    m.Enrolled(
                        node_id=result.node_id,
                        name=result.name,
                        cert_pem=result.cert_pem,
                        ca_pem=self._ca_pem,
                    ),
                )
            )
            self._emit(Finish(sid))

    def _add_node(self, node: NodeRecord) -> None:
        self._nodes[node.node_id] = node
        for fp in node.fingerprints:
            self._by_fp[fp] = node.node_id
        if not node.removed:
            self._by_name[node.name] = node.node_id
            if node.approved:
                self.book.upsert(self._peer(node))

    # -- announce and peer maps ---------------------------------------------------------------
    def _announce(self, s: _Session, msg: m.Announce, now: float) -> None:
        node = self._nodes[s.node_id]
        services = sanitize_services(msg.services)
        host_keys = tuple(sorted(sanitize_host_keys(msg.host_keys)))  # any order is the same
        exit_nets = (  # only well-formed networks count (bad ones dropped, never guessed)
            tuple(str(net) for net in nets_untrusted(msg.exit)) if m.CAP_EXIT in s.caps else ()
        )
        if node.exit_nets != exit_nets:
            node = self._nodes[node.node_id] = replace(node, exit_nets=exit_nets)
            shown_exit = ", ".join(exit_nets) or "nothing"
            self._note(logging.INFO, f"agent {node.name} is an exit node for {shown_exit}")
            if exit_nets and self.policy is None:  # the default lends an exit to its owner's
                self._send_policy(s)  # nodes only: the exit node must know its user and tags
        if node.services == services and node.host_keys == host_keys:
            return
        self._nodes[node.node_id] = replace(node, services=services, host_keys=host_keys)
        self._emit(Persist(SetAnnounce(node.node_id, services, host_keys)))
        shown = ", ".join(f"{x.name}/{x.port}" for x in services) or "nothing"
        self._note(logging.INFO, f"agent {node.name} exposes {shown}")
        if node.services != services:
            self._map_changed(node.node_id, now)

    def _peer(self, node: NodeRecord) -> m.Peer:
        """``node``'s map entry: online (and since when, from where) as ``_presence`` says.

        Built only from what a quick reconnect does not change, so rebuilding it then is no
        change to the book, and no push.
        """
        shown = self._presence.get(node.node_id)
        if shown is not None:
            online, last_seen, address = True, shown[0], shown[1]
        else:
            online, last_seen = False, node.last_seen or 0.0
            address = self._addresses.get(node.node_id, node.last_address)
        return m.Peer(
            node_id=node.node_id,
            name=node.name,
            online=online,
            last_seen=last_seen,
            fingerprint=node.fingerprint,
            services=node.services,
            address=address,
            user=node.user,
            tags=node.tags,
        )

    def _map_changed(self, node_id: str, now: float) -> None:
        node = self._nodes.get(node_id)
        if node is None or node.removed:
            self._presence.pop(node_id, None)
        if node is None or node.removed or not node.approved:
            self.book.remove(node_id)
        else:
            self.book.upsert(self._peer(node))
        if self._push_due is None:
            self._push_due = now + self.push_delay()
            self._add_timer(self._push_due, "push", "")

    def offline_grace(self) -> float:
        """How long maps keep an agent that left online: MAP_OFFLINE_GRACE at scale.

        Scaled by the agents online (``MAP_GRACE_FULL_AT``), as :meth:`push_delay` is:
        what a reconnect costs peers grows with them.
        """
        return self.map_offline_grace * min(1.0, len(self._agents) / MAP_GRACE_FULL_AT)

    def _offline_timer(self, node_id: str, now: float) -> None:
        """The grace after an agent left is over: if it has not come back, maps say offline."""
        if node_id in self._agents:
            return
        self._presence.pop(node_id, None)
        self._map_changed(node_id, now)

    def _resume_base(self, s: _Session, msg: m.Hello) -> int:
        """The map version a reconnecting agent still holds, or 0 (it gets a full map).

        Cap mapdelta: the first push after HELLO is then the delta from that version
        (``PeerBook.delta``: O(changed), shared with every session at that version, and a
        full map anyway when the removal log no longer reaches back that far or the delta
        would not be smaller). Why a delta is right for this viewer: what it may see depends
        on the policy and on its own name, user and tags, which never change for a node; a
        policy change is a ``reset_all``, which puts every older version below the horizon.
        """
        if not s.wants_map or m.CAP_MAPDELTA not in s.caps:
            return 0
        if msg.map_epoch != self.map_epoch or self.book.needs_full(msg.map_version):
            return 0
        return msg.map_version

    def push_delay(self) -> float:
        """How long map changes coalesce: NETMAP_COALESCE, more once the fleet is large.

        A push is one write to every online agent, so at a fixed window the cost of churn
        grows with N x pushes per second (measured: 5,000 agents and a 50 ms window kept
        the server busy with pushes alone); scaling the window with N bounds it.
        """
        scaled = len(self._agents) / NETMAP_PUSH_RATE
        return min(NETMAP_COALESCE_MAX, max(NETMAP_COALESCE, scaled))

    def _push_maps(self) -> None:
        self._push_due = None
        version = self.book.version
        for s in self._sessions.values():
            if s.wants_map and s.map_version != version and s.state is SessionState.AUTHED:
                self._emit(
                    SendEncoded(
                        s.sid,
                        self.book.encoded_updates_for(
                            s.node_id, s.map_version, deflate=m.CAP_ZPEERS in s.caps
                        ),
                    )
                )
                s.map_version = version

    def _send_map(self, s: _Session, now: float) -> None:
        me = self._nodes.get(s.node_id)
        if me is not None and not me.approved:
            # pending approval: it may see no one, exactly as no one sees it
            if m.CAP_PEERS in s.caps:
                self._emit(Send(s.sid, m.Peers(version=0, base=0, reset=True)))
            else:
                self._emit(Send(s.sid, m.NetMap(self_id=s.node_id, nodes=())))
            return
        if m.CAP_PEERS in s.caps:
            # encoded once and written straight to the transport: a 10,000-node map
            # (~3.3 MiB over ~50 frames) must not sit in the control machine's queue
            deflate = m.CAP_ZPEERS in s.caps
            self._emit(
                SendEncoded(s.sid, self.book.encoded_updates_for(s.node_id, 0, deflate=deflate))
            )
            if s.wants_map:
                s.map_version = self.book.version
            return
        # a first-release client (``homeport status`` 0.1): the old one-frame map
        nodes = tuple(
            m.node_info(peer, now=now)
            for peer in (
                self._peer(n) for n in self._nodes.values() if not n.removed and n.approved
            )
            if self._visible(s.node_id, peer)
        )
        msg = m.NetMap(self_id=s.node_id, nodes=nodes)
        try:
            m.encode(msg)
        except ValueError:  # over MAX_FRAME
            self._emit(
                Close(
                    s.sid,
                    "upgrade",
                    "this network's map no longer fits the first-release format; "
                    "upgrade homeport on this node",
                )
            )
            return
        self._emit(Send(s.sid, msg))

    # -- streams --------------------------------------------------------------------------------
    def _open(self, s: _Session, msg: m.Open, now: float) -> None:
        src = self._nodes[s.node_id]
        token_text = msg.token[:64]
        try:
            token = token_from_hex_untrusted(msg.token)
        except WireError as exc:
            self._emit(
                Send(s.sid, m.OpenFailed(token=token_text, code="bad-request", message=str(exc)))
            )
            return

        def refuse(code: str, message: str, rule: str = "") -> None:
            self._audit_stream(
                now, src, msg.dst, None, msg.service, False, code, rule or code, message,
                exit=msg.exit[:MAX_DESTINATION],
            )  # fmt: skip
            self._note(
                logging.INFO,
                f"{src.name}: OPEN {msg.dst[:64]!r}:{msg.service[:64]!r} refused: {code}",
            )
            if token not in self._tokens:  # a live stream's token: refusing it would kill that
                self._emit(RelayRefuse(token))
            self._emit(Send(s.sid, m.OpenFailed(token=token_text, code=code, message=message)))

        if s.opens >= MAX_PENDING_OPENS_PER_SESSION:
            refuse("busy", "too many opens in flight")
            return
        if not src.approved:
            refuse("pending-approval", _PENDING_TEXT.format(name=src.name))
            return
        dst_id = self._by_name.get(msg.dst)
        dst = self._nodes.get(dst_id) if dst_id is not None else None
        if dst is None:
            tomb = next((n for n in self._nodes.values() if n.removed and n.name == msg.dst), None)
            if tomb is not None and tomb.removed_at is not None:
                refuse(
                    "node-removed",
                    f"{tomb.name} was removed by an admin {_ago(now - tomb.removed_at)} ago",
                )
            else:
                refuse("unknown-node", f"no node named {msg.dst[:64]!r} in this network")
            return
        if not dst.approved:
            refuse("pending-approval", f"{dst.name} is waiting for an admin's approval")
            return
        if dst.node_id not in self._agents:
            seen = (
                "never seen"
                if dst.last_seen is None
                else f"last seen {_ago(now - dst.last_seen)} ago"
            )
            refuse("offline", f"{dst.name} is offline ({seen}); is 'homeport up' running there?")
            return
        if msg.exit:  # an exit stream: leave dst to msg.exit (docs/exit-nodes.md)
            dst_s = self._sessions.get(self._agents[dst.node_id])
            if dst_s is None or m.CAP_EXIT not in dst_s.caps:
                refuse(
                    "upgrade",
                    f"{dst.name} runs a homeport without exit nodes; upgrade it there",
                    "not-exit",
                )
                return
            ex = decide_exit(src.subject(), dst.subject(), dst.exit_nets, msg.exit, self.policy)
            if not ex.allowed or ex.service is None:
                refuse(ex.code, ex.reason, ex.rule)
                return
            pseudo = m.ServiceInfo(EXIT_SERVICE, ex.service.port)  # the destination's port
            decision: Decision[m.ServiceInfo] = Decision(
                ex.verdict, ex.code, ex.reason, ex.rule, pseudo
            )
            exit_dest = ex.service.destination
        else:
            decision = decide(src.subject(), dst.subject(), dst.services, msg.service, self.policy)
            exit_dest = ""
        if not decision.allowed or decision.service is None:
            refuse(decision.code, decision.reason, decision.rule)
            return
        if len(self._streams) >= self.max_streams:
            refuse("busy", "the server has too many streams being set up; retry")
            return
        if token in self._tokens:
            refuse("bad-request", "token already in use")
            return
        st = _Stream(
            stream_id="s" + self._random(6).hex(),
            src=src,
            dst=dst,
            service=decision.service,
            opener=s.sid,
            opener_token=token,
            dest_token=self._random(len(token)),
            created_at=now,
            deadline=now + self.open_timeout,
            rule=decision.rule,
            exit=exit_dest,
        )
        self._streams[st.stream_id] = st
        self._tokens.add(token)
        s.opens += 1
        self._emit(
            RelayExpect(
                st.stream_id,
                src_node=src.node_id,
                dst_node=dst.node_id,
                src_token=token,
                dst_token=st.dest_token,
                timeout=self.open_timeout + self.unpaired_timeout,
            )
        )
        self._emit(
            Send(
                self._agents[dst.node_id],
                m.Incoming(
                    stream_id=st.stream_id,
                    token=st.dest_token.hex(),
                    src=src.peer_info(),
                    service=st.service.name,
                    exit=st.exit,
                ),
            )
        )
        self._add_timer(now + self.open_timeout, "stream", st.stream_id)
        via = f" exit to {st.exit}" if st.exit else ""
        self._note(
            logging.INFO,
            f"stream {st.stream_id}: {src.name} -> {dst.name}:{st.service.name}{via} requested "
            f"({decision.rule})",
        )

    def relay_refused(self, stream_id: str, code: str, message: str) -> None:
        """The relay could not take a RelayExpect (full, token clash)."""
        st = self._streams.get(stream_id)
        if st is not None and st.state is StreamState.WAITING:
            self._fail(st, code, message)

    def _answer(self, s: _Session, msg: m.Accept | m.Reject, now: float) -> None:
        st = self._streams.get(msg.stream_id)
        if st is None or st.dst.node_id != s.node_id or st.state is not StreamState.WAITING:
            self._note(
                logging.INFO,
                f"{s.node_id} answered unknown or expired stream {msg.stream_id[:32]!r}",
            )
            return
        self._leave_waiting(st)
        if isinstance(msg, m.Reject):
            self._note(
                logging.INFO,
                f"stream {st.stream_id}: rejected by {st.dst.name}: {msg.code[:MAX_CODE]!r}",
            )
            self._audit_stream(
                now,
                st.src,
                st.dst.name,
                st.dst,
                st.service.name,
                False,
                msg.code[:MAX_CODE] or "rejected",
                f"{st.dst.name}:{msg.code[:MAX_CODE]}",
                msg.message[:MAX_REASON],
                stream_id=st.stream_id,
                by="destination",
                exit=st.exit,
            )
            self._drop_stream(st)
            self._emit(RelayCancel(st.stream_id))
            self._emit(
                Send(
                    st.opener,
                    m.OpenFailed(
                        token=st.opener_token.hex(),
                        code=msg.code[:MAX_CODE] or "rejected",
                        message=msg.message[:MAX_REASON],
                    ),
                )
            )
            return
        self._audit_stream(
            now, st.src, st.dst.name, st.dst, st.service.name, True, "ok", st.rule, "",
            stream_id=st.stream_id, by="destination", exit=st.exit,
        )  # fmt: skip
        st.state = StreamState.ACCEPTED
        st.deadline = now + self.unpaired_timeout
        self._add_timer(st.deadline, "stream", st.stream_id)
        self._emit(RelayExtend(st.stream_id, self.unpaired_timeout))
        dst = self._nodes.get(st.dst.node_id, st.dst)
        self._emit(
            Send(
                st.opener,
                m.Opened(
                    token=st.opener_token.hex(),
                    stream_id=st.stream_id,
                    peer=dst.peer_info(host_keys=True),
                    port=st.service.port,
                ),
            )
        )

    def relay_event(self, ev: RelayEvent, now: float) -> None:
        st = self._streams.get(ev.stream_id)
        if st is None:
            return
        if isinstance(ev, StreamStarted):
            self._leave_waiting(st)
            self._tokens.discard(st.opener_token)
            st.state = StreamState.LIVE
            st.deadline = None
        else:
            self._note(
                logging.INFO,
                f"stream {st.stream_id}: ended ({ev.reason or 'closed'}), "
                f"{ev.bytes_up} bytes up, {ev.bytes_down} bytes down",
            )
            self._drop_stream(st)

    def _leave_waiting(self, st: _Stream) -> None:
        if st.state is StreamState.WAITING:
            opener = self._sessions.get(st.opener)
            if opener is not None:
                opener.opens -= 1

    def _drop_stream(self, st: _Stream) -> None:
        self._leave_waiting(st)
        st.state = StreamState.LIVE  # so a second _leave_waiting never counts again
        self._streams.pop(st.stream_id, None)
        self._tokens.discard(st.opener_token)

    def _fail(self, st: _Stream, code: str, message: str) -> None:
        self._note(logging.INFO, f"stream {st.stream_id}: failed: {code}: {message}")
        opener, token = st.opener, st.opener_token.hex()
        self._drop_stream(st)
        self._emit(RelayCancel(st.stream_id))
        if opener in self._sessions:
            self._emit(Send(opener, m.OpenFailed(token=token, code=code, message=message)))

    # -- admin ------------------------------------------------------------------------------------
    def remove_node(self, name: str, now: float, reason: str = "admin") -> NodeRecord:
        """Tombstone the live node ``name``: close its sessions, fail and cut its streams.

        Raises:
            KeyError: no live node has this name.
        """
        node_id = self._by_name.get(name)
        if node_id is None:
            raise KeyError(name)
        node = replace(self._nodes[node_id], removed_at=now)
        self._nodes[node_id] = node
        del self._by_name[name]
        self._emit(Persist(RemoveNode(node_id, now)))
        self._emit(
            Audit(NODE_REMOVE, now, (("node", node.name), ("node_id", node_id), ("by", reason)))
        )
        sessions = set(self._node_sessions.pop(node_id, set()))
        agent = self._agents.pop(node_id, None)
        if agent is not None:
            sessions.add(agent)
        for sid in sorted(sessions):
            s = self._sessions.get(sid)
            if s is not None:
                s.role = ""  # its end is not an "offline" event any more
                s.wants_map = False
            self._emit(Close(sid, "node-removed", "this node was removed by an admin"))
        cut = 0
        for st in [x for x in self._streams.values() if node_id in (x.src.node_id, x.dst.node_id)]:
            cut += 1
            if st.state is StreamState.WAITING and st.opener not in sessions:
                self._fail(st, "node-removed", f"{node.name} was removed by an admin")
            else:
                self._drop_stream(st)
                self._emit(RelayCancel(st.stream_id))
        self._emit(RelayCut(node_id))
        self._addresses.pop(node_id, None)
        self._direct_offline(node_id)
        self._note(
            logging.INFO,
            f"node {node.name} ({node_id}) removed; {len(sessions)} session(s) closed, "
            f"{cut} stream(s) cut",
        )
        self._map_changed(node_id, now)
        self._node_due.pop(("expiry", node_id), None)
        self._node_due.pop(("ephemeral", node_id), None)
        self._node_due.pop(("offline", node_id), None)
        return node

    # -- direct paths (capability "direct"; docs/nat-traversal.md) ------------------------------
    def endpoints_of(self, node_id: str) -> m.Endpoints | None:
        """The ENDPOINTS an online agent reported last (None: none, or offline)."""
        return self._endpoints.get(node_id)

    def path_record(self, reporter: str, peer: str) -> PathRecord | None:
        """The last PATH_REPORT ``reporter`` sent about ``peer``."""
        return self._paths.get((reporter, peer))

    def pair_stats(self, a: str, b: str) -> PairStats:
        """Punches the server coordinated between ``a`` and ``b`` and how many came up."""
        return self._pair_stats.get(frozenset((a, b)), PairStats())

    def _direct(self, s: _Session, msg: m.Message, now: float) -> None:
        if m.CAP_DIRECT not in s.caps:
            self._note(logging.INFO, f"{s.node_id}: {msg.TYPE.name} without capability direct")
            return
        if isinstance(msg, m.Endpoints):
            self._endpoints[s.node_id] = msg
            self._maybe_probe_reach(s, msg, now)
        elif isinstance(msg, m.PathReq):
            self._path_req(s, msg, now)
        elif isinstance(msg, m.PathReport):
            self._path_report(s, msg, now)
        elif isinstance(msg, m.PeerPing | m.PeerPong):
            self._peer_ping(s, msg, now)

    def _maybe_probe_reach(self, s: _Session, eps: m.Endpoints, now: float) -> None:
        """Ask the shell to connect to the node's observed ip:direct_port (see ProbeReach).

        Only when a ``public`` candidate names the very address this session comes from,
        at most once per node per ``REACH_PROBE_INTERVAL`` (unless the target changed).
        """
        host = _source(s.address)
        target = f"{host}:{eps.direct_port}"
        fresh = any(
            c.kind == "public" and c.addr.rpartition(":")[0] == host for c in eps.candidates
        )
        if eps.relay_only or not 0 < eps.direct_port < 65536 or not fresh:
            self._forwarded.pop(s.node_id, None)
            return
        if self._forwarded.get(s.node_id, target) != target:
            del self._forwarded[s.node_id]  # the node moved: its old forward means nothing
        last = self._reach_probed.get(s.node_id)
        if last is not None and last[0] == target and now - last[1] < REACH_PROBE_INTERVAL:
            return
        _evict_oldest(self._reach_probed, s.node_id)
        self._reach_probed.pop(s.node_id, None)
        self._reach_probed[s.node_id] = (target, now)
        self._emit(ProbeReach(s.node_id, host, eps.direct_port))

    def reach_probed(self, node_id: str, host: str, port: int, ok: bool, now: float) -> None:
        """The shell's answer to :class:`ProbeReach`: whether the TCP connect succeeded.

        A success counts only while the node is online with the same observed address
        and direct port; the node is then treated like one with a mapped port (a peer's
        PUNCH lists ``host:port`` as a candidate)."""
        target = f"{host}:{port}"
        sid = self._agents.get(node_id)
        sess = self._sessions.get(sid) if sid is not None else None
        eps = self._endpoints.get(node_id)
        if sess is None or eps is None or f"{_source(sess.address)}:{eps.direct_port}" != target:
            return
        if not any(
            c.kind == "public" and c.addr.rpartition(":")[0] == host for c in eps.candidates
        ):
            return  # the node stopped naming that address since the probe started
        if ok:
            _evict_oldest(self._forwarded, node_id)
            self._forwarded[node_id] = target
            self._note(logging.INFO, f"{node_id}: direct port reachable at {target} (forwarded)")
        else:
            self._forwarded.pop(node_id, None)

    def _punch_candidates(self, node_id: str, eps: m.Endpoints) -> tuple[m.Candidate, ...]:
        """``eps``'s candidates, plus the forwarded address the server reached, first."""
        fwd = self._forwarded.get(node_id)
        if not fwd or any(c.addr == fwd for c in eps.candidates):
            return eps.candidates
        return (m.Candidate("public", fwd), *eps.candidates)[: m.MAX_CANDIDATES]

    def _path_req(self, s: _Session, msg: m.PathReq, now: float) -> None:
        src = self._nodes[s.node_id]

        def fail(code: str, reason: str = "") -> None:
            text = reason or hpath.REASONS.get(code, code)
            self._note(logging.INFO, f"path {src.name} -> {msg.dst[:64]!r}: refused: {code}")
            self._emit(
                Send(
                    s.sid,
                    m.PathFailed(punch_id=msg.punch_id, dst=msg.dst[:64], code=code, reason=text),
                )
            )

        dst = self._nodes.get(msg.dst)
        if dst is None or dst.removed or dst.node_id == src.node_id:
            fail(hpath.UNKNOWN_NODE, f"no node with id {msg.dst[:64]!r} in this network")
            return
        pair = frozenset((src.node_id, dst.node_id))
        verdict = self._path_verdict(src, dst, pair, now)
        if verdict is not None:
            fail(*verdict)
            return
        mine, theirs = self._endpoints[src.node_id], self._endpoints[dst.node_id]
        _evict_oldest(self._punching, pair)
        self._punching[pair] = now + PUNCH_IN_FLIGHT
        _evict_oldest(self._pair_stats, pair)
        stats = self._pair_stats.setdefault(pair, PairStats())
        self._pair_stats[pair] = replace(stats, punches=stats.punches + 1)
        self.punches_total += 1
        for sid, peer, eps, role in (
            (s.sid, dst, theirs, "client"),
            (self._agents[dst.node_id], src, mine, "server"),
        ):
            punch = m.Punch(
                punch_id=msg.punch_id,
                peer=peer.peer_info(),
                candidates=self._punch_candidates(peer.node_id, eps),
                nat=_nat(eps).value,
                tls_role=role,
            )
            self._emit(Send(sid, punch))
        self._note(logging.INFO, f"path {src.name} -> {dst.name}: punch {msg.punch_id} sent")

    def _path_verdict(
        self, src: NodeRecord, dst: NodeRecord, pair: frozenset[str], now: float
    ) -> tuple[str, str] | None:
        """Why no punch may go to this pair now (code, reason), or None. Checked in order."""
        if self.relay_only:
            return hpath.RELAY_ONLY_SERVER, hpath.REASONS[hpath.RELAY_ONLY_SERVER]
        dst_sid = self._agents.get(dst.node_id)
        if dst_sid is None:
            return hpath.PEER_OFFLINE, f"{dst.name} is offline"
        dst_s = self._sessions.get(dst_sid)
        if dst_s is None or m.CAP_DIRECT not in dst_s.caps:
            return hpath.PEER_NO_DIRECT, f"{dst.name} runs an older homeport without direct paths"
        allowed = any(
            decide(src.subject(), dst.subject(), dst.services, svc.name, self.policy).allowed
            for svc in dst.services
        )
        if not allowed:
            return hpath.POLICY, f"{dst.name} exposes no service {src.name} may reach"
        _evict_oldest(self._path_reqs, pair)
        reqs = self._path_reqs.setdefault(pair, collections.deque())
        while reqs and reqs[0] <= now - PATH_REQ_WINDOW:
            reqs.popleft()
        if len(reqs) >= MAX_PATH_REQS_PER_PAIR:
            wait = reqs[0] + PATH_REQ_WINDOW - now
            return hpath.RATE_LIMITED, (
                f"more than {MAX_PATH_REQS_PER_PAIR} path requests for this pair in "
                f"{PATH_REQ_WINDOW:g} s; retry in {wait:.0f} s"
            )
        reqs.append(now)
        if self._punching.get(pair, 0.0) > now:
            return hpath.BUSY, hpath.REASONS[hpath.BUSY]
        mine, theirs = self._endpoints.get(src.node_id), self._endpoints.get(dst.node_id)
        if mine is not None and mine.relay_only:
            return hpath.RELAY_ONLY_LOCAL, hpath.REASONS[hpath.RELAY_ONLY_LOCAL]
        if theirs is not None and theirs.relay_only:
            return hpath.PEER_RELAY_ONLY, f"relay-only mode ({dst.name} runs --relay-only)"
        if mine is None or not mine.candidates:
            return hpath.NO_CANDIDATES, hpath.REASONS[hpath.NO_CANDIDATES]
        if theirs is None or not theirs.candidates:
            return hpath.PEER_NO_CANDIDATES, f"{dst.name} has reported no direct-path candidates"
        outlook = hpath.punch_outlook(
            _reach(mine, self._forwarded.get(src.node_id, "")),
            _reach(theirs, self._forwarded.get(dst.node_id, "")),
        )
        if outlook is not None:
            return outlook, hpath.REASONS[outlook]
        return None

    def _path_report(self, s: _Session, msg: m.PathReport, now: float) -> None:
        peer = self._nodes.get(msg.peer)
        if peer is None:
            return
        pair = frozenset((s.node_id, peer.node_id))
        key = (s.node_id, peer.node_id)
        old = self._paths.get(key)
        rec = PathRecord(
            kind=msg.kind[:MAX_CODE],
            endpoint=msg.endpoint[:MAX_CODE],
            rtt_ms=msg.rtt_ms,
            code=msg.code[:MAX_CODE],
            reason=msg.reason[:MAX_REASON],
            at=now,
            punch_attempts=msg.punch_attempts,
            punch_successes=msg.punch_successes,
            streams_direct=msg.streams_direct,
            streams_relay=msg.streams_relay,
        )
        _evict_oldest(self._paths, key)
        self._paths[key] = rec
        if rec.code == hpath.PROBING:
            return  # a punch started: not an outcome
        # an outcome (up, failed, timed out) ends the punch in flight; the first "up"
        # report of a punch counts it as a success (both ends report it)
        if self._punching.pop(pair, None) is not None and rec.kind != "relay":
            stats = self._pair_stats.setdefault(pair, PairStats())
            self._pair_stats[pair] = replace(stats, direct_ups=stats.direct_ups + 1)
            self.punch_successes_total += 1
        if rec.kind != (old.kind if old is not None else "relay"):
            self._note(
                logging.INFO,
                f"path {s.node_id} -> {peer.name}: {rec.kind} {rec.endpoint} ({rec.code})",
            )

    def _peer_ping(self, s: _Session, msg: m.PeerPing | m.PeerPong, now: float) -> None:
        sent = self._peer_pings.setdefault(s.node_id, collections.deque())
        while sent and sent[0] <= now - PEER_PING_WINDOW:
            sent.popleft()
        if len(sent) >= MAX_PEER_PINGS:
            return  # dropped: the pinger times that probe out
        dst_sid = self._agents.get(msg.peer)
        dst_s = self._sessions.get(dst_sid) if dst_sid is not None else None
        if dst_s is None or m.CAP_DIRECT not in dst_s.caps or msg.peer == s.node_id:
            return
        sent.append(now)
        out = type(msg)(peer=s.node_id, seq=msg.seq)
        self._emit(Send(dst_s.sid, out))

    def _direct_offline(self, node_id: str) -> None:
        self._endpoints.pop(node_id, None)
        self._forwarded.pop(node_id, None)
        self._reach_probed.pop(node_id, None)
        self._peer_pings.pop(node_id, None)
        for pair in [p for p in self._punching if node_id in p]:
            del self._punching[pair]

    # -- identity: approval, expiry, renewal, ephemeral nodes ------------------------------------
    def _live(self, name: str) -> NodeRecord:
        node_id = self._by_name.get(name)
        if node_id is None:
            raise KeyError(name)
        return self._nodes[node_id]

    def _set_access(self, node: NodeRecord, now: float, **changes: object) -> NodeRecord:
        new = replace(node, **changes)  # type: ignore[arg-type]
        self._nodes[node.node_id] = new
        self._emit(
            Persist(SetAccess(new.node_id, new.approved, new.expires_at, new.expiry_disabled))
        )
        self._schedule_expiry(new, now)
        return new

    def _expired_text(self, node: NodeRecord) -> str:
        when = node.expiry_deadline or 0.0
        return (
            f"the key of node {node.name!r} expired {_utc(when)}; an admin can re-admit it "
            f"without touching this machine: 'homeport nodes extend {node.name}' on the server"
        )

    def _set_due(self, kind: str, node_id: str, when: float) -> None:
        self._node_due[(kind, node_id)] = when
        self._add_timer(when, kind, node_id)

    def _schedule_expiry(self, node: NodeRecord, now: float | None) -> None:
        """Arm the node's next expiry event: a warning point or the expiry itself.

        ``now`` None (start-up): the earliest point, which re-evaluates at once.
        """
        deadline = node.expiry_deadline
        if node.removed or deadline is None:
            self._node_due.pop(("expiry", node.node_id), None)
            return
        points = sorted([deadline - d for d in EXPIRY_WARNINGS] + [deadline])
        later = [p for p in points if now is None or p > now]
        self._set_due("expiry", node.node_id, later[0] if later else deadline)

    def _warn_expiry(self, node: NodeRecord, now: float, only: _Session | None = None) -> None:
        """Warn (log, NOTICE to the node's sessions) if the key expires within a warning window."""
        deadline = node.expiry_deadline
        if deadline is None or now >= deadline or deadline - now > max(EXPIRY_WARNINGS):
            return
        text = f"the key of node {node.name!r} expires {_utc(deadline)} (in {_ago(deadline - now)})"
        sessions = (
            [only]
            if only is not None
            else [self._sessions[sid] for sid in sorted(self._node_sessions.get(node.node_id, ()))]
        )
        notice = m.Notice(
            code="expiry",
            message=text + "; it renews itself while online, or run "
            f"'homeport nodes extend {node.name}'",
            expires_at=deadline,
        )
        for s in sessions:
            if m.CAP_RENEW in s.caps:
                self._emit(Send(s.sid, notice))
        if only is None:
            self._note(logging.WARNING, text)

    def _expiry_timer(self, node_id: str, now: float) -> None:
        self._node_due.pop(("expiry", node_id), None)
        node = self._nodes.get(node_id)
        if node is None or node.removed:
            return
        if node.expired_at(now):
            sessions = set(self._node_sessions.get(node_id, set()))
            agent = self._agents.get(node_id)
            if agent is not None:
                sessions.add(agent)
            for sid in sorted(sessions):
                self._emit(Close(sid, "expired", self._expired_text(node)))
            self._note(logging.WARNING, self._expired_text(node))
            self._emit(
                Audit(
                    NODE_EXPIRY,
                    now,
                    (("node", node.name), ("node_id", node_id), ("event", "expired")),
                )
            )
            return
        self._warn_expiry(node, now)
        self._schedule_expiry(node, now)

    def _ephemeral_timer(self, node_id: str, now: float) -> None:
        self._node_due.pop(("ephemeral", node_id), None)
        node = self._nodes.get(node_id)
        if node is None or node.removed or node_id in self._agents:
            return
        self._note(
            logging.INFO,
            f"ephemeral node {node.name} offline for {_ago(self.ephemeral_offline)}: removing it",
        )
        self.remove_node(node.name, now, reason="ephemeral")

    def _renew(self, s: _Session, msg: m.Renew, now: float) -> None:
        node = self._nodes[s.node_id]
        try:
            cert_pem = sign_node_csr(self.ca, msg.csr_pem.encode(), node.node_id).decode()
            fp = fingerprint(cert_der_from_pem(cert_pem.encode()))
        except (IdentityError, UnicodeError) as exc:
            self._emit(Send(s.sid, m.Notice(code="renew-failed", message=str(exc)[:MAX_REASON])))
            return
        if fp in self._by_fp:
            self._emit(
                Send(s.sid, m.Notice(code="renew-failed", message="this key is already in use"))
            )
            return
        keep = (fp, *node.fingerprints)[:MAX_NODE_CERTS]
        for old in node.fingerprints[MAX_NODE_CERTS - 1 :]:
            self._by_fp.pop(old, None)
        self._by_fp[fp] = node.node_id
        expires_at = node.expires_at
        if expires_at is not None and self.key_expiry is not None:
            expires_at = max(expires_at, now + self.key_expiry)
        node = replace(node, fingerprints=keep, cert_pem=cert_pem)
        self._nodes[node.node_id] = node
        self._emit(Persist(RenewCert(node.node_id, fp, cert_pem, now)))
        if expires_at != node.expires_at:
            node = self._set_access(node, now, expires_at=expires_at)
        self._emit(
            Send(
                s.sid,
                m.Renewed(
                    cert_pem=cert_pem, expires_at=node.expiry_deadline or 0.0, server_time=now
                ),
            )
        )
        self._note(
            logging.INFO,
            f"renewed the key of {node.name}"
            + (f"; it now expires {_utc(node.expires_at)}" if node.expires_at else ""),
        )
        self._emit(
            Audit(
                CERT_ISSUE,
                now,
                (
                    ("node", node.name),
                    ("node_id", node.node_id),
                    ("kind", "node-renew"),
                    ("fingerprint", fp),
                    ("expires_at", "" if node.expires_at is None else f"{node.expires_at:.0f}"),
                ),
            )
        )
        self._map_changed(node.node_id, now)

    def approve_node(self, name: str, now: float) -> NodeRecord:
        """An admin approved a pending node: it joins the peer maps and may open streams.

        Raises:
            KeyError: no live node has this name.
        """
        node = self._live(name)
        if node.approved:
            return node
        node = self._set_access(node, now, approved=True)
        for sid in sorted(self._node_sessions.get(node.node_id, set())):
            s = self._sessions.get(sid)
            if s is None:
                continue
            if m.CAP_RENEW in s.caps:
                self._emit(
                    Send(sid, m.Notice(code="approved", message=f"{name} was approved by an admin"))
                )
            if s.role == ROLE_AGENT and m.CAP_PEERS in s.caps:
                s.wants_map = True
                s.map_version = 0
                deflate = m.CAP_ZPEERS in s.caps
                self._emit(
                    SendEncoded(sid, self.book.encoded_updates_for(s.node_id, 0, deflate=deflate))
                )
        self._note(logging.INFO, f"node {name} ({node.node_id}) approved")
        self._emit(Audit(APPROVE, now, (("node", name), ("node_id", node.node_id))))
        self._map_changed(node.node_id, now)
        return node

    def _expiry_audit(self, node: NodeRecord, now: float, event: str) -> None:
        self._emit(
            Audit(
                NODE_EXPIRY,
                now,
                (
                    ("node", node.name),
                    ("node_id", node.node_id),
                    ("event", event),
                    ("expires_at", "" if node.expires_at is None else f"{node.expires_at:.0f}"),
                ),
            )
        )

    def rename_node(self, name: str, new_name: str, now: float) -> NodeRecord:
        """An admin renamed a live node: peers get the new name with the next map push,
        and the node's own sessions end so it reconnects and reads the name in WELCOME
        (its agent saves it). Streams already open keep running.

        Raises:
            KeyError: no live node has this name.
            ValueError: ``new_name`` is not a node name, or another live node has it.
        """
        problem = names.node_name_problem(new_name)
        if problem is not None:
            raise ValueError(problem)
        node = self._live(name)
        if new_name == name:
            return node
        if new_name in self._by_name:
            raise ValueError(f"another node is already called {new_name!r}")
        new = replace(node, name=new_name)
        self._nodes[node.node_id] = new
        del self._by_name[name]
        self._by_name[new_name] = node.node_id
        self._emit(Persist(RenameNode(node.node_id, new_name)))
        self._emit(
            Audit(
                au.NODE_RENAME, now, (("node", new_name), ("node_id", node.node_id), ("from", name))
            )
        )
        sessions = set(self._node_sessions.get(node.node_id, set()))
        agent = self._agents.get(node.node_id)
        if agent is not None:
            sessions.add(agent)
        for sid in sorted(sessions):
            self._emit(Close(sid, "renamed", f"renamed by an admin: {name} -> {new_name}"))
        self._note(logging.INFO, f"node {name} ({node.node_id}) renamed to {new_name}")
        self._map_changed(node.node_id, now)
        return new

    def expire_node(self, name: str, now: float) -> NodeRecord:
        """Expire the node's key now: its sessions end with ERROR(expired). Raises KeyError."""
        node = self._set_access(self._live(name), now, expires_at=now, expiry_disabled=False)
        self._expiry_audit(node, now, "expire")
        self._expiry_timer(node.node_id, now)
        return node

    def extend_node(self, name: str, now: float, seconds: float | None = None) -> NodeRecord:
        """Give the node a fresh key lifetime from now (re-admits an expired node). Raises KeyError.

        ``seconds`` None: the server's key lifetime (or, when keys never expire here, 180 days).
        """
        life = seconds if seconds is not None else (self.key_expiry or DEFAULT_KEY_EXPIRY)
        node = self._set_access(self._live(name), now, expires_at=now + life)
        self._note(logging.INFO, f"node {name}: key extended to {_utc(now + life)}")
        self._expiry_audit(node, now, "extend")
        return node

    def set_expiry_disabled(self, name: str, now: float, disabled: bool = True) -> NodeRecord:
        """Turn key expiry off (or back on) for one node. Raises KeyError."""
        node = self._set_access(self._live(name), now, expiry_disabled=disabled)
        self._expiry_audit(node, now, "disable-expiry" if disabled else "enable-expiry")
        return node

    def nodes_of_user(self, user: str) -> list[NodeRecord]:
        """The live nodes that belong to ``user``."""
        return [n for n in self._nodes.values() if not n.removed and user and n.user == user]

    def admin_audit(self, kind: str, now: float, fields: tuple[tuple[str, str], ...]) -> None:
        """Record an admin action that happened outside the core (keys, users)."""
        self._emit(Audit(kind, now, fields))

    # -- the ACL policy ------------------------------------------------------------------------
    def _visible(self, viewer_id: str, peer: m.Peer) -> bool:
        """PeerBook's filter: a node learns only the peers it may reach on some port."""
        if self.policy is None:
            return True
        viewer = self._nodes.get(viewer_id)
        if viewer is None:
            return False
        me = viewer.subject()
        subj = Subject(peer.node_id, peer.name, peer.user, peer.tags)
        return self._reachable(me).matches(subj, me)

    def _reachable(self, me: Subject) -> SelSet:
        assert self.policy is not None
        key = (me.name, me.user, me.tags)
        found = self._reach.get(key)
        if found is None:
            if len(self._reach) >= MAX_REACH_CACHE:
                self._reach.clear()
            found = self._reach[key] = reach_set(self.policy, me)
        return found

    def _audience(self, viewer_id: str) -> tuple[object, ...]:
        """Viewers selected by the same rules (and, for autogroup:self, of the same user) see
        the same peers, so their map frames are encoded once."""
        if self.policy is None:
            return ()
        viewer = self._nodes.get(viewer_id)
        if viewer is None:
            return ("?", viewer_id)
        subj = viewer.subject()
        reach = self._reachable(subj)
        return (reach, subj.user if reach.self_ and not subj.tags else "")

    def _send_policy(self, s: _Session) -> None:
        if m.CAP_POLICY not in s.caps or s.role != ROLE_AGENT:
            return
        node = self._nodes.get(s.node_id)
        if node is not None:
            self._emit(
                Send(
                    s.sid,
                    policy_message(
                        self.policy,
                        node.subject(),
                        self._policy_version,
                        exit_entries=m.CAP_EXIT in s.caps,
                    ),
                )
            )

    def policy_changed(self, compiled: CompiledPolicy | None, now: float) -> int:
        """A new policy (None: back to no policy) is in force from now on.

        New streams are decided under it at once; every agent that understands
        POLICY gets its new rules; peer maps are recomputed (a full map for
        everyone, since who may see whom changed); and every stream the new
        policy denies is ended now (waiting ones fail with the reason, spliced
        ones are cut by the relay). Returns how many streams were ended.
        """
        self.policy = compiled
        self._policy_version += 1
        self._reach.clear()
        digest = "none" if compiled is None else compiled.digest
        self._emit(
            Audit(
                au.POLICY_SET,
                now,
                (
                    ("digest", digest),
                    ("acls", str(0 if compiled is None else len(compiled.acls))),
                    ("ssh", str(0 if compiled is None else len(compiled.ssh))),
                ),
            )
        )
        for s in self._sessions.values():
            if s.state is SessionState.AUTHED:
                self._send_policy(s)
        ended = 0
        for st in list(self._streams.values()):
            src = self._nodes.get(st.src.node_id, st.src)
            dst = self._nodes.get(st.dst.node_id, st.dst)
            d = (
                decide_exit(src.subject(), dst.subject(), dst.exit_nets, st.exit, compiled)
                if st.exit
                else decide(src.subject(), dst.subject(), dst.services, st.service.name, compiled)
            )
            if d.allowed:
                continue
            ended += 1
            self._audit_stream(
                now,
                src,
                dst.name,
                dst,
                st.service.name,
                False,
                d.code,
                d.rule,
                d.reason,
                stream_id=st.stream_id,
                by="policy-change",
                exit=st.exit,
            )
            if st.state is StreamState.WAITING:
                self._fail(st, d.code, d.reason)  # RelayCancel: the relay never splices it
            else:
                self._note(logging.INFO, f"stream {st.stream_id}: cut: {d.reason}")
                self._drop_stream(st)
                self._emit(RelayCutStream(st.stream_id, d.reason))
        self.book.reset_all()
        if self._push_due is None:
            self._push_due = now + NETMAP_COALESCE
            self._add_timer(self._push_due, "push", "")
        self._note(
            logging.INFO,
            f"policy {digest} in force (version {self._policy_version}); {ended} stream(s) ended",
        )
        return ended

    def policy_refused(self, reason: str, now: float) -> None:
        """An admin's policy was refused (the old one stays): recorded for the audit log."""
        self._emit(Audit(au.POLICY_REFUSED, now, (("reason", reason[:MAX_REASON]),)))

    # -- keyless SSH: user certificates and login checks (capability sshcert) -----------------
    def _ssh_cert(self, s: _Session, msg: m.SshCertReq, now: float) -> None:
        """Sign a short-lived SSH user certificate if the policy's ssh rules allow it."""
        src = self._nodes[s.node_id]
        ca = self.ssh_ca

        def answer(reply: m.SshCert) -> None:
            if m.CAP_SSHCERT in s.caps:
                self._emit(Send(s.sid, reply))

        def refuse(code: str, reason: str, rule: str = "") -> None:
            self._note(
                logging.INFO,
                f"ssh certificate {src.name} -> {msg.dst[:64]!r} as {msg.user}: refused: {code}",
            )
            self._emit(
                Audit(
                    CERT_ISSUE,
                    now,
                    (
                        ("node", src.name),
                        ("kind", "ssh-user-refused"),
                        ("dst", msg.dst[:64]),
                        ("account", msg.user),
                        ("code", code),
                        ("rule", rule),
                    ),
                )
            )
            answer(m.SshCert(req_id=msg.req_id, code=code, reason=reason[:MAX_REASON], rule=rule))

        if ca is None:
            refuse(sshca.NO_CA, "this server has no SSH certificate authority")
            return
        if not src.approved:
            refuse("pending-approval", _PENDING_TEXT.format(name=src.name))
            return
        dst_id = self._by_name.get(msg.dst)
        dst = self._nodes.get(dst_id) if dst_id is not None else None
        if dst is None or dst.removed:
            refuse("unknown-node", f"no node named {msg.dst[:64]!r} in this network")
            return
        plan = sshca.plan_certificate(
            self.policy,
            src.subject(),
            dst.subject(),
            msg.user,
            approved_at=self.logins.approved_at(src.node_id),
            now=now,
        )
        if isinstance(plan, sshca.Refusal):
            refuse(plan.code, plan.reason, plan.rule)
            return
        serial = int.from_bytes(self._random(8), "big")
        kid = sshca.key_id(src.name, msg.user, plan.rule, serial)
        try:
            issued = ca.sign_user(
                msg.public_key,
                plan.principals,
                key_id=kid,
                serial=serial,
                now=now,
                validity=self.ssh_cert_validity,
            )
        except sshca.SshCaError as exc:
            refuse(sshca.BAD_REQUEST, str(exc))
            return
        self._note(
            logging.INFO,
            f"ssh certificate for {src.name} -> {dst.name} as {','.join(plan.principals)} "
            f"({plan.rule}, {plan.verdict.value}); key id {kid}",
        )
        self._emit(
            Audit(
                CERT_ISSUE,
                now,
                (
                    ("node", src.name),
                    ("node_id", src.node_id),
                    ("kind", "ssh-user"),
                    ("dst", dst.name),
                    ("principals", ",".join(plan.principals)),
                    ("rule", plan.rule),
                    ("key_id", kid),
                    ("valid_before", str(issued.valid_before)),
                ),
            )
        )
        answer(
            m.SshCert(
                req_id=msg.req_id,
                cert=issued.line,
                code="ok",
                reason=plan.reason[:MAX_REASON],
                rule=plan.rule,
                principals=plan.principals,
                valid_before=float(issued.valid_before),
                ca_key=ca.public_line,
            )
        )

    def _login(self, s: _Session, msg: m.Login, now: float) -> None:
        """A device starts or polls its login check, or approves a sibling's."""
        node = self._nodes[s.node_id]

        def answer(reply: m.LoginState) -> None:
            if m.CAP_SSHCERT in s.caps:
                self._emit(Send(s.sid, reply))

        if msg.action == "start":
            if not node.user or node.tags:
                answer(
                    m.LoginState(
                        state="refused",
                        message="only a user's own (untagged) device can log in; "
                        f"{node.name} belongs to no user",
                    )
                )
                return
            ch = self.logins.start(node.node_id, node.user, now)
            self._note(logging.INFO, f"login check started for {node.name} ({node.user})")
            answer(
                m.LoginState(
                    state="pending",
                    code=ch.code,
                    message=ch.instructions(),
                    provider=ch.provider,
                    expires_at=ch.expires_at,
                )
            )
        elif msg.action == "poll":
            got = self.logins.pending(msg.code, now)
            if got is None or got.node_id != node.node_id:
                answer(m.LoginState(state="expired", code=msg.code, message="no such login"))
            elif got.approved_at is not None:
                answer(
                    m.LoginState(
                        state="approved",
                        code=got.code,
                        message="approved",
                        provider=got.provider,
                        approved_at=got.approved_at,
                    )
                )
            else:
                answer(
                    m.LoginState(
                        state="pending",
                        code=got.code,
                        message=got.instructions(),
                        provider=got.provider,
                        expires_at=got.expires_at,
                    )
                )
        else:  # approve from another device of the same user
            if not self.logins.may_approve(node.node_id, now) or node.tags:
                answer(
                    m.LoginState(
                        state="refused",
                        code=msg.code,
                        message=f"{node.name} has no fresh login check of its own",
                    )
                )
                return
            outcome = self.logins.complete(msg.code, now, approver_user=node.user)
            self._login_outcome(outcome, now, by=node.name)
            answer(
                m.LoginState(
                    state="approved" if outcome.ok else "refused",
                    code=msg.code,
                    message=outcome.message[:MAX_REASON],
                )
            )

    def approve_login(self, code: str, now: float, by: str = "admin") -> Outcome:
        """An admin approved a login code (``homeport login approve CODE`` on the server)."""
        outcome = self.logins.complete(code.strip().upper(), now)
        self._login_outcome(outcome, now, by=by)
        return outcome

    def _login_outcome(self, outcome: Outcome, now: float, by: str) -> None:
        self._note(logging.INFO, f"login check by {by}: {outcome.message}")
        ch = outcome.challenge
        if ch is not None:
            self._emit(
                Audit(
                    APPROVE,
                    now,
                    (
                        ("node_id", ch.node_id),
                        ("user", ch.user),
                        ("kind", "login-check"),
                        ("provider", ch.provider),
                        ("by", by),
                    ),
                )
            )

    # -- time -----------------------------------------------------------------------------------
    def _add_timer(self, when: float, kind: str, key: str) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, _Timer(when, self._timer_seq, kind, key))

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next run (None: nothing is waiting)."""
        while self._timers and not self._timer_live(self._timers[0]):
            heapq.heappop(self._timers)
        return self._timers[0].when if self._timers else None

    def _timer_live(self, t: _Timer) -> bool:
        if t.kind == "push":
            return self._push_due == t.when
        if t.kind in ("expiry", "ephemeral", "offline"):
            return self._node_due.get((t.kind, t.key)) == t.when
        st = self._streams.get(t.key)
        return st is not None and st.deadline == t.when

    def handle_timer(self, now: float) -> None:
        while self._timers and self._timers[0].when <= now:
            t = heapq.heappop(self._timers)
            if not self._timer_live(t):
                continue
            if t.kind == "push":
                self._push_maps()
                continue
            if t.kind == "expiry":
                self._expiry_timer(t.key, now)
                continue
            if t.kind == "ephemeral":
                self._ephemeral_timer(t.key, now)
                continue
            if t.kind == "offline":
                self._node_due.pop(("offline", t.key), None)
                self._offline_timer(t.key, now)
                continue
            st = self._streams[t.key]
            if st.state is StreamState.WAITING:
                self._fail(
                    st, "timeout", f"{st.dst.name} did not answer within {self.open_timeout:g}s"
                )
            elif st.state is StreamState.ACCEPTED:
                self._note(logging.INFO, f"stream {st.stream_id}: not spliced in time; dropped")
                self._drop_stream(st)
                self._emit(RelayCancel(st.stream_id))

    # -- direct-stream reports (STREAM_LOG, cap "policy") ---------------------------------------
    def _stream_log(self, s: _Session, msg: m.StreamLog, now: float) -> None:
        """A destination agent's decision on a direct stream: one STREAM audit record.

        The destination is the reporting session's node (never a claim in the
        message); the source must be a node of this network. Bounded per session
        (:data:`MAX_STREAM_LOGS_PER_SESSION` per :data:`STREAM_LOG_WINDOW`): beyond
        it reports are dropped (one note per window), as the agent also limits them.
        """
        if m.CAP_POLICY not in s.caps:
            self._note(logging.INFO, f"{s.node_id}: STREAM_LOG without capability policy")
            return
        window = s.stream_logs
        while window and window[0] <= now - STREAM_LOG_WINDOW:
            window.popleft()
        if len(window) >= MAX_STREAM_LOGS_PER_SESSION:
            if len(window) == MAX_STREAM_LOGS_PER_SESSION:
                window.append(now)  # marks the window as noted (one note per burst)
                self._note(logging.INFO, f"{s.node_id}: STREAM_LOG over the limit, dropped")
            return
        window.append(now)
        dst = self._nodes.get(s.node_id)
        src = self._nodes.get(msg.src)
        if dst is None or src is None or src.node_id == dst.node_id:
            self._note(logging.INFO, f"{s.node_id}: STREAM_LOG from unknown {msg.src[:64]!r}")
            return
        if msg.allowed != (msg.code == "ok"):
            self._note(logging.INFO, f"{s.node_id}: STREAM_LOG verdict and code disagree")
            return
        self._audit_stream(
            now, src, dst.name, dst, msg.service[:64], msg.allowed, msg.code[:MAX_CODE],
            msg.rule[:MAX_CODE], msg.reason[:MAX_REASON],
            stream_id=msg.stream[:32], by="destination-direct",
        )  # fmt: skip

    # -- helpers ----------------------------------------------------------------------------------
    def _audit(self, kind: str, now: float, **fields: str) -> None:
        self._emit(Audit(kind, now, tuple(fields.items())))

    def _audit_stream(  # noqa: PLR0917 - one audit record's fields
        self,
        now: float,
        src: NodeRecord,
        dst_name: str,
        dst: NodeRecord | None,
        service: str,
        allowed: bool,
        code: str,
        rule: str,
        reason: str,
        *,
        stream_id: str = "",
        by: str = "server",
        exit: str = "",
    ) -> None:
        """One STREAM record: who asked whom for what, the verdict, its code and rule.

        ``by`` says who decided (the server's early check, or the destination's
        ACCEPT/REJECT, which is authoritative). ``exit``: an exit stream's
        destination ``host:port`` (recorded as ``exit``), so the log says where
        traffic left the network to.
        """
        extra = {"exit": exit} if exit else {}
        self._audit(
            au.STREAM,
            now,
            stream=stream_id,
            src=src.name,
            src_id=src.node_id,
            dst=dst_name[:64],
            dst_id=dst.node_id if dst is not None else "",
            service=service[:64],
            verdict="allowed" if allowed else "denied",
            code=code,
            rule=rule,
            by=by,
            reason=reason,
            **extra,
        )

    def _emit(self, cmd: Command) -> None:
        self._out.append(cmd)

    def _note(self, level: int, text: str) -> None:
        # texts carry peer-supplied strings (names, OPEN dst/service, REJECT code/message):
        # escaped here, once, so no node can forge a log line (docs/reliability.md)
        self._out.append(Note(level, esc(text, MAX_NOTE)))
