"""Path choice and the per-peer path manager: pure, sans-I/O (docs/nat-traversal.md).

Theory of operation. A stream to a peer never waits for a direct path: it
starts on the relay at once. Behind that, one :class:`PathManager` per peer
decides *when to ask* the server for a direct path (PATH_REQ), tracks the
punch the server coordinates (PUNCH to both nodes at once), and remembers
*why* the path is what it is, so ``homeport status`` can say it in one line.
:func:`choose_path` is the one decision behind that line: facts in, a
:class:`PathChoice` (kind, code, reason, endpoint) out, tabled in
``tests/test_proto_path.py``. :func:`punch_outlook` is the coordinator's
prediction that a punch cannot work (both mappings endpoint-dependent and
nothing reachable), so hopeless punches are refused with a reason instead of
timing out every 30 s.

Path manager timeline (one peer)::

    IDLE ──stream_wanted──▶ REQUESTED ──PUNCH──▶ PUNCHING ──path_up──▶ UP
      ▲   (not before           │ PATH_FAILED /      │ punch_failed        │ path_lost
      │    retry_at)            │ no answer          ▼                     ▼
      └──────────── failure: backoff 2 s, 4 s, … 30 s ◀─────────── re-probe in 2 s

While a peer is in use (a stream wanted within :data:`WANT_WINDOW`) a due
retry asks again by itself; ``endpoints_changed`` (our discovery or the peer's
session changed) forgets the backoff and asks at once. A PUNCH that arrives
without our request (the peer asked) is taken in any state but UP.

No I/O, no clock: every input carries ``now``; outputs are drained with
:meth:`PathManager.next_command`.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from dataclasses import dataclass

from homeport.proto.nat import NatKind

#: First re-probe delay after a failure; doubles per failure up to :data:`BACKOFF_MAX`.
BACKOFF_MIN = 2.0
BACKOFF_MAX = 30.0
#: Retry delay after a failure that will not change soon (old peer, relay-only server).
STICKY_RETRY = 300.0
#: How long a stream keeps a peer "in use": due retries ask again by themselves.
WANT_WINDOW = 120.0
#: How long we wait for the server's PUNCH or PATH_FAILED after a PATH_REQ.
REQUEST_TIMEOUT = 10.0
#: The driver's punch deadline (connect + TLS) ...
PUNCH_TIMEOUT = 5.0
#: ... and our own safety net in case the driver never reports.
PUNCH_GRACE = 5.0
#: Commands one manager may hold undrained (the driver drains after every input).
MAX_COMMANDS = 64


class PathKind(enum.Enum):
    """Which way streams to a peer go; the values are the wire's PATH_REPORT ``kind``."""

    RELAY = "relay"
    DIRECT = "direct"  # the peer's public (server-observed) address
    LOCAL = "local"  # a LAN interface address of the peer
    MAPPED = "mapped"  # a router port mapping (NAT-PMP/PCP/UPnP or a static forward)


# -- reason codes (stable: status, PATH_FAILED, PATH_REPORT, tests and docs name them) ------
DIRECT_UP = "direct-up"
NOT_TRIED = "not-tried"
PROBING = "probing"
PUNCH_TIMEOUT_CODE = "punch-timeout"
PEER_EDM = "peer-edm"
SELF_EDM = "self-edm"
BOTH_EDM = "both-edm"
RELAY_ONLY_LOCAL = "relay-only-local"
RELAY_ONLY_SERVER = "relay-only-server"
PEER_RELAY_ONLY = "peer-relay-only"
PEER_NO_DIRECT = "peer-no-direct"
PEER_OFFLINE = "peer-offline"
PATH_LOST = "path-lost"
NO_PROBE_PORT = "no-probe-port"
POLICY = "policy"
NO_CANDIDATES = "no-candidates"
PEER_NO_CANDIDATES = "peer-no-candidates"
RATE_LIMITED = "rate-limited"
BUSY = "busy"  # a punch between the two is already in flight
UNKNOWN_NODE = "unknown-node"
NO_ANSWER = "no-answer"
SESSION_LOST = "session-lost"
PUNCH_FAILED = "punch-failed"  # the driver's other failures (TLS, fingerprint, refused)

#: Default sentences for codes (the server or driver may send a more specific one).
REASONS: dict[str, str] = {
    DIRECT_UP: "direct path up",
    NOT_TRIED: "no stream yet; a direct path is tried with the first stream",
    PROBING: "trying a direct path; streams use the relay meanwhile",
    PUNCH_TIMEOUT_CODE: "punch timed out",
    PEER_EDM: "peer behind endpoint-dependent NAT",
    SELF_EDM: "this node is behind endpoint-dependent NAT",
    BOTH_EDM: "both nodes behind endpoint-dependent NAT",
    RELAY_ONLY_LOCAL: "relay-only mode (this node runs --relay-only)",
    RELAY_ONLY_SERVER: "relay-only mode (the server runs --relay-only)",
    PEER_RELAY_ONLY: "relay-only mode (the peer runs --relay-only)",
    PEER_NO_DIRECT: "peer runs an older homeport without direct paths",
    PEER_OFFLINE: "peer is offline",
    PATH_LOST: "direct path lost (no answer for 3.5 s)",
    NO_PROBE_PORT: "the server's probe port is unreachable: mapping unknown",
    POLICY: "policy allows this node no service on the peer",
    NO_CANDIDATES: "this node has reported no direct-path candidates yet",
    PEER_NO_CANDIDATES: "the peer has reported no direct-path candidates yet",
    RATE_LIMITED: "too many path requests for this pair; retrying later",
    BUSY: "a punch between these nodes is already in progress",
    UNKNOWN_NODE: "no such node",
    NO_ANSWER: "the server did not answer the path request",
    SESSION_LOST: "the control connection to the server was lost",
    PUNCH_FAILED: "punch failed",
}

#: Failure codes that will not change by retrying soon: retried after STICKY_RETRY.
#: The NAT verdicts are among them: the coordinator refuses those punches up front, and
#: a NAT changes only with new ENDPOINTS, which re-probe at once (``endpoints_changed``);
#: short retries would only run into the server's rate limit and hide the real reason.
STICKY_CODES = frozenset(
    {PEER_NO_DIRECT, RELAY_ONLY_SERVER, PEER_RELAY_ONLY, POLICY, PEER_EDM, SELF_EDM, BOTH_EDM}
)


@dataclass(frozen=True, slots=True)
class PathChoice:
    """The path streams to one peer take now, and why (``code`` is stable, ``reason`` prose)."""

    kind: PathKind
    code: str
    reason: str
    endpoint: str = ""

    @property
    def direct(self) -> bool:
        return self.kind is not PathKind.RELAY


@dataclass(frozen=True, slots=True)
class PathFacts:
    """Everything :func:`choose_path` looks at (one peer, one moment)."""

    relay_only_local: bool = False
    relay_only_server: bool = False
    peer_online: bool = True
    up_kind: PathKind | None = None  # a direct path is up (authenticated, mux alive)
    up_endpoint: str = ""
    probing: bool = False  # a PATH_REQ or a punch is in flight
    tried: bool = False  # any attempt was made since the last success/reset
    failure_code: str = ""  # the last attempt's failure ("" = none)
    failure_reason: str = ""
    retry_in: float | None = None  # seconds to the next automatic re-probe
    self_nat: NatKind = NatKind.UNKNOWN
    peer_nat: NatKind = NatKind.UNKNOWN
    probe_port_ok: bool = True  # our discovery reached the server's probe port


def _edm_explanation(facts: PathFacts) -> str | None:
    """A NAT code explaining a failed punch, if the mappings explain it."""
    mine, theirs = facts.self_nat is NatKind.EDM, facts.peer_nat is NatKind.EDM
    if mine and theirs:
        return BOTH_EDM
    if theirs:
        return PEER_EDM
    if mine:
        return SELF_EDM
    return None


def choose_path(facts: PathFacts) -> PathChoice:
    """The path for new streams to one peer, with the reason. Pure; first rule that applies wins.

    1. relay-only here or at the server: relay, always;
    2. a direct path that is up: that path;
    3. peer offline: relay (streams fail anyway, but say so);
    4. a punch in flight: relay, ``probing``;
    5. the last attempt failed: relay with its code (a punch timeout explained by
       endpoint-dependent mappings or an unreachable probe port says so), plus when
       the next re-probe comes;
    6. nothing tried yet: relay, ``not-tried``.
    """
    relay = PathKind.RELAY
    if facts.relay_only_local:
        return PathChoice(relay, RELAY_ONLY_LOCAL, REASONS[RELAY_ONLY_LOCAL])
    if facts.relay_only_server:
        return PathChoice(relay, RELAY_ONLY_SERVER, REASONS[RELAY_ONLY_SERVER])
    if facts.up_kind is not None and facts.up_kind is not PathKind.RELAY:
        where = f" ({facts.up_kind.value} {facts.up_endpoint})" if facts.up_endpoint else ""
        return PathChoice(facts.up_kind, DIRECT_UP, REASONS[DIRECT_UP] + where, facts.up_endpoint)
    if not facts.peer_online:
        return PathChoice(relay, PEER_OFFLINE, REASONS[PEER_OFFLINE])
    if facts.probing:
        return PathChoice(relay, PROBING, REASONS[PROBING])
    if facts.failure_code:
        code, reason = (
            facts.failure_code,
            facts.failure_reason or REASONS.get(facts.failure_code, facts.failure_code),
        )
        if code in (PUNCH_TIMEOUT_CODE, PUNCH_FAILED):
            nat = _edm_explanation(facts)
            if nat is not None:
                code, reason = nat, f"{REASONS[nat]} ({reason})"
            elif not facts.probe_port_ok and facts.self_nat is NatKind.UNKNOWN:
                code, reason = NO_PROBE_PORT, f"{REASONS[NO_PROBE_PORT]} ({reason})"
        if facts.retry_in is not None:
            reason = f"{reason}; re-probing in {max(0.0, facts.retry_in):.0f} s"
        return PathChoice(relay, code, reason)
    return PathChoice(relay, NOT_TRIED, REASONS[NOT_TRIED])


@dataclass(frozen=True, slots=True)
class Reach:
    """What the coordinator knows about one side's reachability (from its ENDPOINTS)."""

    nat: NatKind
    public_ips: frozenset[str] = frozenset()  # the addresses the server observed
    mapped: bool = False  # has a router mapping / static forward candidate


def punch_outlook(requester: Reach, peer: Reach) -> str | None:
    """A reason code when a direct path cannot work, else None (then punch). Pure.

    A path works when either side is reachable without punching (no NAT, or a
    mapped port), when both share a public address (same LAN: local candidates),
    or when both map endpoint-independently (TCP simultaneous open). An unknown
    mapping is given the benefit of the doubt. Codes are from the requester's view.
    """
    for side in (requester, peer):
        if side.nat is NatKind.NONE or side.mapped or side.nat is NatKind.UNKNOWN:
            return None
    if requester.public_ips & peer.public_ips:
        return None
    mine, theirs = requester.nat is NatKind.EDM, peer.nat is NatKind.EDM
    if mine and theirs:
        return BOTH_EDM
    if theirs:
        return PEER_EDM
    if mine:
        return SELF_EDM
    return None


def backoff_delay(failures: int) -> float:
    """Re-probe delay after ``failures`` consecutive failures: 2 s, 4 s, 8 s, 16 s, 30 s, …"""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** min(failures - 1, 16))


# -- commands ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestPath:
    """Send PATH_REQ(dst=peer, punch_id) to the server."""

    peer: str
    punch_id: int


@dataclass(frozen=True, slots=True)
class ReportPath:
    """The choice changed: send PATH_REPORT (and log/show it)."""

    peer: str
    choice: PathChoice
    rtt_ms: float
    punch_attempts: int
    punch_successes: int
    streams_direct: int
    streams_relay: int


PathCommand = RequestPath | ReportPath


class PathState(enum.Enum):
    IDLE = "idle"
    REQUESTED = "requested"  # PATH_REQ sent; waiting for PUNCH / PATH_FAILED
    PUNCHING = "punching"  # PUNCH received; the driver punches
    UP = "up"


class PathManager:
    """One peer's direct-path state; see the module docstring for the timeline."""

    def __init__(self, peer: str, *, next_punch_id: Callable[[], int]) -> None:
        self.peer = peer
        self._next_id = next_punch_id
        self.state = PathState.IDLE
        self.punch_id = 0  # the punch (or request) in flight / that made the path
        self.failures = 0
        self.retry_at = 0.0
        self.deadline: float | None = None
        self.want_until = -1.0
        self.up_kind: PathKind | None = None
        self.up_endpoint = ""
        self.rtt_ms = 0.0
        self.failure_code = ""
        self.failure_reason = ""
        self.tried = False
        self.repunch = False  # a PUNCH from the peer runs while our path is UP
        # facts fed by the table / node core
        self.relay_only_local = False
        self.relay_only_server = False
        self.peer_online = True
        self.self_nat = NatKind.UNKNOWN
        self.peer_nat = NatKind.UNKNOWN
        self.probe_port_ok = True
        # counters (cumulative; status --json)
        self.punch_attempts = 0
        self.punch_successes = 0
        self.streams_direct = 0
        self.streams_relay = 0
        self._out: collections.deque[PathCommand] = collections.deque()
        self._last: PathChoice | None = None

    # -- read-outs -----------------------------------------------------------------------
    def facts(self, now: float) -> PathFacts:
        retry = None
        if self.state is PathState.IDLE and self.failure_code and self.retry_at > now:
            retry = self.retry_at - now
        return PathFacts(
            relay_only_local=self.relay_only_local,
            relay_only_server=self.relay_only_server,
            peer_online=self.peer_online,
            up_kind=self.up_kind if self.state is PathState.UP else None,
            up_endpoint=self.up_endpoint,
            probing=self.state in (PathState.REQUESTED, PathState.PUNCHING),
            tried=self.tried,
            failure_code=self.failure_code,
            failure_reason=self.failure_reason,
            retry_in=retry,
            self_nat=self.self_nat,
            peer_nat=self.peer_nat,
            probe_port_ok=self.probe_port_ok,
        )

    def choose(self, now: float) -> PathChoice:
        """The path new streams to this peer take now, and why."""
        return choose_path(self.facts(now))

    @property
    def blocked(self) -> bool:
        """Whether no direct path may be asked for at all (relay-only, peer offline)."""
        return self.relay_only_local or self.relay_only_server or not self.peer_online

    def next_command(self) -> PathCommand | None:
        return self._out.popleft() if self._out else None

    # -- inputs ---------------------------------------------------------------------------
    def stream_wanted(self, now: float, *, direct: bool = False) -> None:
        """A stream to this peer starts (``direct``: over the direct path, else the relay)."""
        self.want_until = now + WANT_WINDOW
        if direct:
            self.streams_direct += 1
            return
        self.streams_relay += 1
        self._maybe_request(now)

    def punch_started(self, punch_id: int, now: float) -> bool:
        """The server sent PUNCH: the driver runs it. Always True.

        Also when we are UP: the server only sends PUNCH because the peer asked for a path
        (PATH_REQ), i.e. the peer has lost the one we still hold (e.g. its NAT dropped the
        mapping; our side notices only after the mux's silence timeout). Ignoring it would
        leave the peer's new connection unaccepted until then. We stay UP meanwhile (the
        old link serves while it lives; its death is ``path_lost`` as ever); the driver
        replaces the old link when the new one is up, and a failed re-punch changes nothing.
        """
        if self.state is PathState.UP:
            self.punch_id = punch_id
            self.repunch = True
            self.punch_attempts += 1
            return True
        self.state = PathState.PUNCHING
        self.punch_id = punch_id
        self.deadline = now + PUNCH_TIMEOUT + PUNCH_GRACE
        self.punch_attempts += 1
        self.tried = True
        self._changed(now)
        return True

    def path_up(self, kind: PathKind, endpoint: str, now: float, rtt_ms: float = 0.0) -> None:
        """An authenticated direct connection to the peer is up (punch won, or accepted)."""
        if kind is PathKind.RELAY:
            raise ValueError("path_up needs a direct kind")
        if self.state is PathState.PUNCHING or self.repunch:
            self.punch_successes += 1
        self.repunch = False
        self.state = PathState.UP
        self.up_kind, self.up_endpoint = kind, endpoint
        self.rtt_ms = rtt_ms or self.rtt_ms
        self.failures = 0
        self.failure_code = self.failure_reason = ""
        self.deadline = None
        self._changed(now)

    def punch_failed(self, punch_id: int, code: str, reason: str, now: float) -> None:
        """The driver's punch ``punch_id`` ended without a path (timeout, TLS, …)."""
        if self.repunch and punch_id == self.punch_id:
            self.repunch = False  # the old link (if still up) goes on; its death is path_lost
            return
        if self.state is PathState.PUNCHING and punch_id == self.punch_id:
            self._fail(code, reason, now)

    def path_failed(self, punch_id: int, code: str, reason: str, now: float) -> None:
        """The server answered our PATH_REQ ``punch_id`` with PATH_FAILED."""
        if self.state is PathState.REQUESTED and punch_id == self.punch_id:
            self._fail(code, reason, now)

    def path_lost(self, reason: str, now: float) -> None:
        """The direct path died (mux silent 3.5 s, reset): relay at once, re-probe soon."""
        if self.state is not PathState.UP:
            return
        self.up_kind, self.up_endpoint = None, ""
        self._fail(PATH_LOST, reason or REASONS[PATH_LOST], now)

    def session_lost(self, now: float) -> None:
        """The control connection ended: a PATH_REQ in flight will never be answered."""
        if self.state is PathState.REQUESTED:
            self._fail(SESSION_LOST, REASONS[SESSION_LOST], now)

    def endpoints_changed(self, now: float) -> None:
        """Our or the peer's candidates changed: forget the backoff; ask again if in use."""
        self.failures = 0
        self.retry_at = now
        if self.state is PathState.IDLE:
            self._maybe_request(now)

    def set_rtt(self, rtt_ms: float) -> None:
        self.rtt_ms = rtt_ms

    def update(self, now: float, **facts: object) -> None:
        """Change facts (``relay_only_server=...``, ``peer_online=...``, ``self_nat=...``)."""
        for name, value in facts.items():
            if name not in _FACT_NAMES:
                raise TypeError(f"unknown fact {name!r}")
            setattr(self, name, value)
        if self.blocked and self.state in (PathState.REQUESTED, PathState.PUNCHING):
            self.state, self.deadline = PathState.IDLE, None
        self._changed(now)

    # -- time ------------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        if self.deadline is not None:
            return self.deadline
        if self.state is PathState.IDLE and self.failures and self.want_until > self.retry_at:
            return self.retry_at
        return None

    def handle_timer(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            if self.state is PathState.REQUESTED:
                self._fail(NO_ANSWER, REASONS[NO_ANSWER], now)
            elif self.state is PathState.PUNCHING:
                self._fail(PUNCH_TIMEOUT_CODE, REASONS[PUNCH_TIMEOUT_CODE], now)
            return
        if self.state is PathState.IDLE and now >= self.retry_at and now < self.want_until:
            self._maybe_request(now)

    # -- internals ---------------------------------------------------------------------------
    def _maybe_request(self, now: float) -> None:
        if self.state is not PathState.IDLE or self.blocked or now < self.retry_at:
            return
        self.state = PathState.REQUESTED
        self.punch_id = self._next_id()
        self.deadline = now + REQUEST_TIMEOUT
        self.tried = True
        self._push(RequestPath(self.peer, self.punch_id))
        self._changed(now)

    def _fail(self, code: str, reason: str, now: float) -> None:
        self.state = PathState.IDLE
        self.deadline = None
        self.failures += 1
        self.failure_code, self.failure_reason = code, reason
        delay = STICKY_RETRY if code in STICKY_CODES else backoff_delay(self.failures)
        self.retry_at = now + delay
        self._changed(now)

    def _changed(self, now: float) -> None:
        choice = self.choose(now)
        last = self._last
        if last is not None and (last.kind, last.code, last.endpoint) == (
            choice.kind,
            choice.code,
            choice.endpoint,
        ):
            return
        self._last = choice
        self._push(
            ReportPath(
                self.peer,
                choice,
                self.rtt_ms,
                self.punch_attempts,
                self.punch_successes,
                self.streams_direct,
                self.streams_relay,
            )
        )

    def _push(self, cmd: PathCommand) -> None:
        if len(self._out) < MAX_COMMANDS:  # undrained: drop reports rather than grow
            self._out.append(cmd)


_FACT_NAMES = frozenset(
    {
        "relay_only_local",
        "relay_only_server",
        "peer_online",
        "self_nat",
        "peer_nat",
        "probe_port_ok",
    }
)


class PathTable:
    """One :class:`PathManager` per peer of this node, with shared facts and punch ids."""

    #: Most peers tracked (one per peer this node streams with or is punched by).
    MAX_PEERS = 4096

    def __init__(self) -> None:
        self._managers: dict[str, PathManager] = {}
        self._next_punch = 0
        self.relay_only_local = False
        self.relay_only_server = False
        self.self_nat = NatKind.UNKNOWN
        self.probe_port_ok = True

    def _punch_id(self) -> int:
        self._next_punch += 1
        return self._next_punch

    def get(self, peer: str) -> PathManager | None:
        return self._managers.get(peer)

    def manager(self, peer: str) -> PathManager | None:
        """The manager for ``peer`` (created with the table's facts); None when full."""
        pm = self._managers.get(peer)
        if pm is None:
            if len(self._managers) >= self.MAX_PEERS:
                return None
            pm = PathManager(peer, next_punch_id=self._punch_id)
            pm.relay_only_local = self.relay_only_local
            pm.relay_only_server = self.relay_only_server
            pm.self_nat = self.self_nat
            pm.probe_port_ok = self.probe_port_ok
            self._managers[peer] = pm
        return pm

    def managers(self) -> list[PathManager]:
        return list(self._managers.values())

    def update_all(self, now: float, **facts: object) -> None:
        """Change a fact shared by every peer (relay-only server, our NAT kind)."""
        for name, value in facts.items():
            if name in ("relay_only_local", "relay_only_server", "self_nat", "probe_port_ok"):
                setattr(self, name, value)
        for pm in self._managers.values():
            pm.update(now, **facts)

    def choose(self, peer: str, now: float) -> PathChoice:
        pm = self._managers.get(peer)
        if pm is None:
            facts = PathFacts(
                relay_only_local=self.relay_only_local,
                relay_only_server=self.relay_only_server,
                self_nat=self.self_nat,
                probe_port_ok=self.probe_port_ok,
            )
            return choose_path(facts)
        return pm.choose(now)

    def get_timer(self) -> float | None:
        times = [t for pm in self._managers.values() if (t := pm.get_timer()) is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for pm in self._managers.values():
            t = pm.get_timer()
            if t is not None and t <= now:
                pm.handle_timer(now)

    def next_command(self) -> PathCommand | None:
        for pm in self._managers.values():
            cmd = pm.next_command()
            if cmd is not None:
                return cmd
        return None
