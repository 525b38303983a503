"""The node (agent) protocol core: sans-I/O, events in, commands out.

Theory of operation. Everything the agent *decides* lives here, as a pure
state machine in the style of h11 and aioquic's ``QuicConnection``; the agent
runtime (:mod:`homeport.agent.runtime`) only feeds it and carries out what it
asks. The core never touches a socket, a thread, a future or the clock: every
input carries ``now`` where time matters, and the random stream token of a
local open is chosen by the driver and passed in, so a test can replay any
sequence of inputs and get exactly the same commands back.

The driver's loop::

    core.session_started(now)               # TLS up, server pin checked
    core.message_received(msg, now)         # each message the control machine decoded
    core.target_connected(stream_id) / core.target_failed(stream_id, reason)
    core.stream_ended(stream_id)            # an accepted stream's pump finished
    core.open_local(token, dst, service, now, timeout) / core.local_open_ended(token)
    core.session_ended(reason, now) / core.connect_failed(reason, now)
    core.handle_timer(now)                  # when core.get_timer() is due
    # direct paths (capability "direct"):
    core.set_endpoints(endpoints, now)      # discovery result (io/netcheck); again on change
    core.path_choice(peer_id, now)          # before a local open: direct → open on the mux
    core.stream_wanted(peer_id, now, direct=...)   # a stream started (relay ones may PATH_REQ)
    core.punch_succeeded(peer_id, kind, endpoint, now) / core.punch_failed(peer_id, id, code, …)
    core.path_lost(peer_id, reason, now) / core.path_rtt(peer_id, ms)   # from the mux link
    core.peer_ping(peer_id, seq)            # homeport ping over the relay → PeerPongReceived
    while (cmd := core.next_command()) is not None: carry_out(cmd)

What it owns:

* **The session across reconnects.** ``session_started`` sends HELLO (wire
  version, our capability version and caps, role ``agent``); WELCOME makes the
  session READY and sends ANNOUNCE (services and sshd host keys); new host keys
  while READY are announced again. When a session ends (or a connect fails) the
  core asks for a reconnect after a jittered backoff delay
  (:class:`~homeport.proto.backoff.Backoff`), forever, except after a fatal
  ERROR (``node-removed``: :class:`Fatal` with exit code 3), because an admin
  removed this node and its certificate will never be accepted again.
* **The destination's decision.** Every INCOMING is answered by this node,
  never by trusting the server's routing: a bad token is refused, at
  :data:`MAX_STREAMS` the answer is REJECT(busy), and otherwise the one access
  decision :func:`homeport.policy.decide.decide` runs (REJECT(not-exposed) with
  its reason) before anything local is connected. A node with shields up
  (``NodeConfig.shields_up``) refuses every INCOMING first: REJECT(shields-up).
  An allowed stream becomes a :class:`ConnectTarget`; the driver reports the
  outcome, and only then does the core send ACCEPT (and :class:`StartStream`)
  or REJECT(service-down).
  Every outcome is one :class:`StreamRecord` (in a :class:`Decided` command).
* **The ACL policy** (capability ``policy``): POLICY from the server carries
  the rules that can grant a stream to this node and who the server says this
  node is (user, tags); :meth:`NodeCore.message_received` keeps it and every
  INCOMING is decided with it (the destination's decision is authoritative,
  even if the server let the stream through). Until the first POLICY arrives
  the node decides as without a policy; a POLICY it cannot read makes it
  refuse every stream (``policy-unreadable``) rather than guess.
* **Local opens** (``homeport nc`` through ``agent.sock``): admitted only while
  READY and under the stream limit, sent as OPEN, and the matching OPENED or
  OPEN_FAILED is routed back by token. A session that ends, or a deadline that
  passes, fails every open still waiting with a reason the user can read.
* **One stream limit.** Incoming streams (from INCOMING until ``stream_ended``)
  and local opens (from admission until ``local_open_ended``) share
  :data:`MAX_STREAMS`: each is a worker thread and a few descriptors.
* **The peer map** from PEERS frames (capability ``peers`` only): a
  :class:`~homeport.proto.netmap.PeerView`; a delta that does not follow the
  version we hold makes the core ask once for a full map (NETMAP_REQ).
* **Direct paths** (capability ``direct``, docs/nat-traversal.md): the
  driver's discovery result goes out as ENDPOINTS after every WELCOME
  (:meth:`NodeCore.set_endpoints`); a :class:`~homeport.proto.path.PathTable`
  (one pure path manager per peer) turns ``stream_wanted`` into PATH_REQ and
  PATH_REPORT; a PUNCH becomes :class:`StartPunch` for the driver, whose
  outcome comes back as ``punch_succeeded`` / ``punch_failed`` (and later
  ``path_lost``); PEER_PING is answered here, PEER_PONG goes to the driver
  (:class:`PeerPongReceived`). The driver asks :meth:`NodeCore.path_choice`
  before each local open: a direct choice means "open it on the mux".

Commands are drained with :meth:`NodeCore.next_command`, in the order they were
made; the queue never holds more than one input's worth of commands if the
driver drains after each input, and a single input makes at most one command
per local open or pending stream, so it is bounded by :data:`MAX_STREAMS`.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from dataclasses import replace as with_fields

from homeport.crypto import identity
from homeport.policy.acl import CompiledPolicy
from homeport.policy.decide import EXIT_SERVICE, RULE_NOT_EXPOSED, Subject, decide, decide_exit
from homeport.policy.services import Service
from homeport.proto import path as hpath
from homeport.proto.backoff import Backoff
from homeport.proto.nat import NatKind
from homeport.proto.netmap import PeerView, Status
from homeport.proto.policy import policy_from_message
from homeport.wire import control as m
from homeport.wire.data import token_from_hex_untrusted
from homeport.wire.errors import WireError

#: Concurrent streams per agent (incoming and local opens together); beyond
#: this INCOMING is answered REJECT(busy) and a local open is handed back.
MAX_STREAMS = 256
#: Server ERROR codes after which reconnecting can never succeed.
FATAL_ERROR_CODES = frozenset({"node-removed"})
#: Renew the node key when this fraction of its lifetime is left (well before expiry).
RENEW_FRACTION = 1 / 3
#: When the server gives no lifetime: renew this long before expiry.
RENEW_AHEAD = 7 * 86400.0
#: A renewal that got no RENEWED within this long is tried again (a new key each time).
RENEW_RETRY = 300.0
#: OPEN_FAILED codes after which nc should dial by itself rather than report:
#: "busy" is about this session (opens in flight), not about the peer.
LOCAL_FALLBACK_CODES = frozenset({"busy"})
#: Seconds a local open waits for OPENED/OPEN_FAILED when the caller names no timeout.
DEFAULT_OPEN_TIMEOUT = 10.0
#: Longest reconnect delay (seconds; full jitter, so 1.25-2.5 s once grown): an agent is back
#: within ~5 s of the server (or the network) returning, however long it was gone. Retrying
#: a down server every ~2 s is cheap for it (a refused SYN); see docs/reliability.md.
RECONNECT_CAP = 2.5
#: Most STREAM_LOG reports (direct-stream decisions, for the server's audit log) sent per
#: :data:`STREAM_LOG_WINDOW` seconds; beyond it they are dropped and counted, so a peer that
#: hammers our direct link with OPENs cannot make us flood the server.
MAX_STREAM_LOGS = 60
#: The window of :data:`MAX_STREAM_LOGS` (seconds, the driver's clock).
STREAM_LOG_WINDOW = 10.0
#: The role this core announces in HELLO (it stays connected and receives streams).
ROLE_AGENT = "agent"
#: Rules named in a record when the core refused before any policy rule ran.
RULE_LIMIT = "stream-limit"
RULE_MALFORMED = "malformed"
RULE_DUPLICATE = "duplicate"
#: REJECT code and rule of a node started with ``--shields-up`` (stable: logs, tests).
SHIELDS_UP = "shields-up"
#: File in the state directory that says the last ``homeport up`` ran with ``--shields-up``
#: (written by ``up``, read by ``status``: the agent and the client are separate processes).
SHIELDS_UP_FILE = "shields-up"
RULE_POLICY_UNREADABLE = "policy-unreadable"


class ExitCode(enum.IntEnum):
    """The agent's process exit codes (systemd's RestartPreventExitStatus uses 3)."""

    STOPPED = 0
    FATAL = 2
    NODE_REMOVED = 3


class SessionState(enum.Enum):
    """Where the node is with the server (the control machine has its own states)."""

    IDLE = "idle"  # no control connection (connecting, or waiting to reconnect)
    HELLO_SENT = "hello-sent"  # connected, HELLO sent, waiting for WELCOME
    READY = "ready"  # WELCOME received, ANNOUNCE sent: streams may flow
    FATAL = "fatal"  # a fatal ERROR: the node must exit (sticky)
    STOPPED = "stopped"  # the driver is shutting down (sticky)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """What the core needs to know about this node; no paths, no I/O."""

    name: str
    server: str  # "host:port", for messages only
    services: tuple[Service, ...] = ()
    software: str = ""
    relay_only: bool = False  # --relay-only: never probe, never punch (ENDPOINTS says so)
    #: ``up --shields-up``: refuse every INCOMING (REJECT ``shields-up``); opens still work.
    shields_up: bool = False
    #: ``--advertise-exit``: the networks exit streams may leave to (() = not an exit node).
    exit_nets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Renewed:
    """The server signed a new node key: store ``key_pem``/``cert_pem`` (atomically) and use them.

    The old certificate stays valid on the server for the overlap, so a
    driver that crashes before writing loses nothing but this renewal.
    """

    key_pem: bytes = field(repr=False)
    cert_pem: bytes
    expires_at: float  # unix time, 0 = never


@dataclass(frozen=True, slots=True)
class NoticeReceived:
    """A NOTICE from the server (expiry warning, approval): log it, show it in status."""

    code: str
    message: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """One decision on an INCOMING, for logs and tests.

    ``code`` is ``"ok"`` for an accepted stream, else the REJECT code;
    ``rule`` names what decided (a policy rule, or the core's own check).
    """

    stream_id: str
    src: str  # "name (node id)"
    service: str
    accepted: bool
    code: str
    reason: str
    rule: str


# -- commands -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``msg`` on the current control connection."""

    msg: m.Message


@dataclass(frozen=True, slots=True)
class SessionReady:
    """WELCOME arrived and ANNOUNCE went out: the node is online."""

    node_id: str
    name: str
    services: int
    host_keys: int
    peers: bool  # whether the server will push PEERS (it announced the capability)
    ssh_ca: str = ""  # the server's SSH user CA key (WELCOME.ssh_ca; keyless SSH)


@dataclass(frozen=True, slots=True)
class SessionLost:
    """The control connection is over (after being started); ``reason`` is for the log."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Open a new control connection after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class Fatal:
    """Stop for good and exit with ``exit_code``: reconnecting can never succeed."""

    exit_code: int
    message: str


@dataclass(frozen=True, slots=True)
class Decided:
    """A decision on an INCOMING was made (log it, hand it to observers)."""

    record: StreamRecord


@dataclass(frozen=True, slots=True)
class ConnectTarget:
    """Connect the local target of an allowed stream; report with target_connected/failed."""

    stream_id: str
    service: Service


@dataclass(frozen=True, slots=True)
class ConnectExit:
    """Resolve ``host`` and dial ``host:port`` for an allowed exit stream, only inside ``nets``.

    The driver checks every resolved address against ``nets``
    (:func:`homeport.policy.exitnet.check_address`) before it connects, and
    reports with ``target_connected`` or ``target_failed(..., code=...)``.
    """

    stream_id: str
    host: str
    port: int
    nets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StartStream:
    """ACCEPT was sent: dial the data connection, run the e2e TLS server and the pump.

    The peer's certificate must have ``src.fingerprint``. Call
    :meth:`NodeCore.stream_ended` when the stream is over.
    """

    stream_id: str
    token: bytes
    src: m.PeerInfo
    service: Service


@dataclass(frozen=True, slots=True)
class DropTarget:
    """Close the target connected for ``stream_id``: the stream will not go ahead."""

    stream_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class LocalOpenAdmitted:
    """OPEN went out for this local open; dial the data connection meanwhile."""

    token: bytes


@dataclass(frozen=True, slots=True)
class LocalOpenSucceeded:
    """The server answered OPENED: pin ``opened.peer`` in the e2e handshake."""

    token: bytes
    opened: m.Opened


@dataclass(frozen=True, slots=True)
class LocalOpenFailed:
    """This local open is over without a stream.

    ``fallback``: the agent could not help (not connected, busy), so the
    client should dial by itself; otherwise the failure is the final answer.
    ``admitted`` says whether it had been admitted (and so counts until
    :meth:`NodeCore.local_open_ended`).
    """

    token: bytes
    code: str
    message: str
    fallback: bool
    admitted: bool


@dataclass(frozen=True, slots=True)
class StartPunch:
    """The server's PUNCH: connect from the direct port to ``punch.candidates`` now.

    Both nodes get one at the same moment. Run TLS as ``punch.tls_role`` and pin
    ``punch.peer.fingerprint``; report with :meth:`NodeCore.punch_succeeded` or
    :meth:`NodeCore.punch_failed` (with ``punch.punch_id``) by ``deadline``.
    """

    punch: m.Punch
    deadline: float


@dataclass(frozen=True, slots=True)
class PeerPongReceived:
    """A PEER_PONG over the server: the relay round trip of ping ``seq`` to ``peer`` ended."""

    peer: str
    seq: int


@dataclass(frozen=True, slots=True)
class PathChanged:
    """The path to ``peer`` (a node id) changed (log it; ``status`` shows it)."""

    peer: str
    choice: hpath.PathChoice


Command = (
    Send
    | Renewed
    | NoticeReceived
    | SessionReady
    | SessionLost
    | Reconnect
    | Fatal
    | Decided
    | ConnectTarget
    | ConnectExit
    | StartStream
    | DropTarget
    | LocalOpenAdmitted
    | LocalOpenSucceeded
    | LocalOpenFailed
    | StartPunch
    | PeerPongReceived
    | PathChanged
)


# -- the core --------------------------------------------------------------------------------


@dataclass
class _Pending:
    """An allowed INCOMING whose local target is being connected."""

    msg: m.Incoming
    token: bytes
    service: Service
    reason: str
    rule: str
    epoch: int


class _OpenState(enum.Enum):
    WAITING = "waiting"  # OPEN sent, no answer yet
    ANSWERED = "answered"  # OPENED routed to the driver
    FAILED = "failed"  # failure routed to the driver


@dataclass
class _LocalOpen:
    token: bytes
    dst: str
    service: str
    deadline: float
    state: _OpenState = _OpenState.WAITING


class NodeCore:
    """The agent's protocol state across reconnects (one per agent process)."""

    def __init__(self, config: NodeConfig, *, backoff: Backoff | None = None) -> None:
        self.config = config
        self.name = config.name
        self.node_id = ""
        self.backoff = backoff or Backoff(cap=RECONNECT_CAP)
        self.state = SessionState.IDLE
        self.host_keys: tuple[str, ...] = ()
        #: Capabilities the current server announced in WELCOME (intersected with ours).
        self.server_caps: frozenset[str] = frozenset()
        self.server_capver = 1
        self.peers = PeerView()
        #: The ACL policy the server pushed (None: no policy in force), its version,
        #: and who the server says this node is (for the rules' destinations).
        self.policy: CompiledPolicy | None = None
        self.policy_version = 0
        self.policy_problem = ""
        self.user = ""
        self.tags: tuple[str, ...] = ()
        #: Why the last peer-map update was refused (over a limit), if one was.
        self.map_refused = ""
        #: Messages ignored because they came where they make no sense (for tests).
        self.ignored = 0
        #: INCOMING refused because shields are up (for logs and status).
        self.shields_refused = 0
        self._epoch = 0  # one per session; stale pending streams are dropped
        self._map_epoch = ""  # cap mapdelta: the server run our peer map comes from
        self._session_start = 0.0
        self._pending: dict[str, _Pending] = {}
        self._streams: set[str] = set()
        self._local: dict[bytes, _LocalOpen] = {}
        self._commands: collections.deque[Command] = collections.deque()
        #: One path manager per peer (direct paths); facts shared through the table.
        self.paths = hpath.PathTable()
        self.paths.relay_only_local = config.relay_only
        #: Our latest discovery result (sent after each WELCOME), if the driver gave one.
        self.endpoints: m.Endpoints | None = None
        #: The server's whoami probe port from WELCOME (0: none or no ``direct``).
        self.probe_port = 0
        #: Whether an admin approved this node (WELCOME/NOTICE); False: it reaches no one.
        self.approved = True
        #: When the node key expires (server's unix time; 0 = never) and the last notice.
        self.expires_at = 0.0
        self.notice: NoticeReceived | None = None
        self._renew_due: float | None = None  # on the driver's clock
        self._renew_key: bytes | None = None
        self._now = 0.0  # the driver's clock at the last input
        #: Direct-stream decisions not reported to the server (over the limit, or no session).
        self.stream_logs_dropped = 0
        self._stream_logs: collections.deque[float] = collections.deque()

    # -- read-outs ------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether a session is READY (WELCOME received)."""
        return self.state is SessionState.READY

    @property
    def active(self) -> int:
        """Streams counting against :data:`MAX_STREAMS` (pending, running, local)."""
        return len(self._pending) + len(self._streams) + len(self._local)

    @property
    def peers_expected(self) -> bool:
        """Whether this server pushes PEERS (it announced the ``peers`` capability)."""
        return m.CAP_PEERS in self.server_caps

    def next_command(self) -> Command | None:
        """Pop the next command, or None."""
        return self._commands.popleft() if self._commands else None

    # -- session lifecycle ---------------------------------------------------------------
    def session_started(self, now: float) -> None:
        """A control connection is up (TLS done, server pin checked): send HELLO."""
        if self.state in (SessionState.FATAL, SessionState.STOPPED):
            return
        if self.state is not SessionState.IDLE:
            self._end_session("replaced by a new connection", now, reconnect=False)
        self._epoch += 1
        self._session_start = now
        held = self._held_map()
        if held[1]:
            self.peers.resume()  # cap mapdelta: keep the map, the server may send a delta
        else:
            self.peers.expect_full()
        self.state = SessionState.HELLO_SENT
        self.server_caps, self.server_capver = frozenset(), 1
        self._send(
            m.Hello(
                proto=m.PROTOCOL_VERSION,
                role=ROLE_AGENT,
                software=self.config.software,
                capver=m.CAPVER,
                caps=m.OUR_CAPS,
                map_epoch=held[0],
                map_version=held[1],
            )
        )

    def _held_map(self) -> tuple[str, int]:
        """The (epoch, version) of a complete peer map we hold, or ("", 0) (cap mapdelta)."""
        view = self.peers
        if not self._map_epoch or not view.has_map or view.awaiting_full or view.version <= 0:
            return "", 0
        return self._map_epoch, view.version

    def _welcome_map(self, msg: m.Welcome) -> None:
        """Keep the held map only if this server run is the one it came from (cap mapdelta).

        Otherwise (another run, or a server without mapdelta) the server sends a full map,
        as to every new session before capver 4.
        """
        epoch = msg.map_epoch if m.CAP_MAPDELTA in self.server_caps else ""
        if not epoch or epoch != self._map_epoch:
            self.peers.expect_full()
        self._map_epoch = epoch

    def session_ended(self, reason: str, now: float) -> None:
        """The control connection is over; ``reason`` says why (for logs and local opens)."""
        if self.state in (SessionState.IDLE, SessionState.FATAL, SessionState.STOPPED):
            return
        self._end_session(reason, now, reconnect=True)

    def connect_failed(self, reason: str, now: float) -> None:
        """A connect attempt failed before any session started: try again later."""
        del reason, now  # the driver logs it; the schedule does not depend on it
        if self.state is SessionState.IDLE:
            self._commands.append(Reconnect(self.backoff.next_delay()))

    def stop(self) -> None:
        """The driver is shutting down: fail what waits, schedule nothing more."""
        if self.state is SessionState.STOPPED:
            return
        self._fail_waiting("not-connected", "the agent is stopping", fallback=True)
        self.state = SessionState.STOPPED

    def set_host_keys(self, host_keys: Sequence[str]) -> None:
        """This node's sshd host keys (re)read; announced again if they changed while READY."""
        keys = tuple(host_keys)
        if keys == self.host_keys:
            return
        self.host_keys = keys
        if self.state is SessionState.READY:
            self._send(self._announce())

    def set_services(self, services: Sequence[Service]) -> None:
        """What this node exposes changed (``homeport set``); announced at once while READY."""
        svcs = tuple(services)
        if svcs == self.config.services:
            return
        self.config = with_fields(self.config, services=svcs)
        if self.state is SessionState.READY:
            self._send(self._announce())

    def set_exit(self, nets: Sequence[str]) -> None:
        """The advertised exit networks changed (``homeport set``); announced at once."""
        new = tuple(nets)
        if new == self.config.exit_nets:
            return
        self.config = with_fields(self.config, exit_nets=new)
        if self.state is SessionState.READY:
            self._send(self._announce())

    def _end_session(self, reason: str, now: float, *, reconnect: bool) -> None:
        for pm in self.paths.managers():
            pm.session_lost(now)
        self._drain_paths()  # reports are not sent (no session); PathChanged still goes out
        self.state = SessionState.IDLE
        self.server_caps, self.server_capver = frozenset(), 1
        self._commands.append(SessionLost(reason))
        self._fail_waiting("eof", f"server {self.config.server} closed the connection ({reason})")
        self.backoff.connected_for(now - self._session_start)
        if reconnect:
            self._commands.append(Reconnect(self.backoff.next_delay()))

    def _announce(self) -> m.Announce:
        return m.Announce(
            services=tuple(m.ServiceInfo(s.name, s.port) for s in self.config.services),
            host_keys=self.host_keys,
            exit=self.config.exit_nets,
        )

    def _send(self, msg: m.Message) -> None:
        self._commands.append(Send(msg))

    # -- messages from the server ------------------------------------------------------------
    def message_received(self, msg: m.Message, now: float) -> None:
        """One message the control machine decoded (PING/PONG never get here)."""
        self._now = now
        if self.state not in (SessionState.HELLO_SENT, SessionState.READY):
            self.ignored += 1  # a late message of a session we already gave up on
            return
        if isinstance(msg, m.Error):
            self._on_error(msg)
        elif self.state is SessionState.HELLO_SENT:
            if isinstance(msg, m.Welcome):
                self._on_welcome(msg, now)
            else:
                self.ignored += 1  # the control machine refuses these; belt and braces
        elif isinstance(msg, m.Incoming):
            self._on_incoming(msg)
        elif isinstance(msg, m.Opened | m.OpenFailed):
            self._on_open_answer(msg)
        elif isinstance(msg, m.Renewed):
            self._on_renewed(msg)
        elif isinstance(msg, m.Notice):
            self._on_notice(msg)
        elif isinstance(msg, m.Policy):
            self._on_policy(msg)
        elif isinstance(msg, m.Peers):
            if self.peers_expected:
                self._on_peers(msg)
                self._peers_online(now)
            else:
                self.ignored += 1  # the server did not announce ``peers``: not for us
        elif isinstance(msg, m.Punch | m.PathFailed | m.PeerPing | m.PeerPong):
            if self.direct_expected:
                self._on_direct(msg, now)
            else:
                self.ignored += 1  # the server did not announce ``direct``: not for us
        else:
            self.ignored += 1  # NETMAP (capver 1 push), a second WELCOME, ...

    def _on_peers(self, msg: m.Peers) -> None:
        outcome = self.peers.receive(msg)
        if outcome.status is Status.NEED_FULL:
            self._send(m.NetMapRequest())  # a gap: ask once for a full map, never guess
        elif outcome.status is Status.REFUSED:
            self.map_refused = outcome.reason

    def _on_policy(self, msg: m.Policy) -> None:
        if msg.version < self.policy_version:
            self.ignored += 1  # an older push overtaken by a newer one
            return
        try:
            policy = policy_from_message(msg)
        except WireError as exc:
            self.policy_problem = str(exc)
            self.policy_version = msg.version
            return
        self.policy, self.policy_problem = policy, ""
        self.policy_version = msg.version
        self.user, self.tags = msg.user, msg.tags

    def _on_welcome(self, msg: m.Welcome, now: float) -> None:
        self.state = SessionState.READY
        self.node_id = msg.node_id
        self.name = msg.name or self.name
        self.server_capver = msg.capver
        self.server_caps = m.negotiate_caps(msg.caps)
        self._welcome_map(msg)
        self.approved = msg.approved
        self.expires_at = msg.expires_at
        self._plan_renewal(msg.expires_at, msg.server_time, msg.key_lifetime)
        # Every session starts with no policy in force; a server with a policy sends
        # POLICY right after WELCOME, before any INCOMING can arrive on this session.
        self.policy, self.policy_problem, self.policy_version = None, "", 0
        # ANNOUNCE right after WELCOME: a client that sees this node online can
        # open streams to its services at once.
        self._send(self._announce())
        self._welcome_direct(msg, now)
        self._commands.append(
            SessionReady(
                node_id=msg.node_id,
                name=self.name,
                services=len(self.config.services),
                host_keys=len(self.host_keys),
                peers=self.peers_expected,
                ssh_ca=msg.ssh_ca,
            )
        )

    # -- node-key renewal (cap renew) ---------------------------------------------------------
    def _plan_renewal(self, expires_at: float, server_time: float, lifetime: float) -> None:
        """Arm the renewal: a third of the lifetime before expiry, on our own clock.

        Times are differences against the server's clock (``server_time``), so
        a node whose wall clock is wrong still renews on time.
        """
        self._renew_key = None
        if m.CAP_RENEW not in self.server_caps or expires_at <= 0 or server_time <= 0:
            self._renew_due = None
            return
        ahead = lifetime * RENEW_FRACTION if lifetime > 0 else RENEW_AHEAD
        self._renew_due = self._now + (expires_at - server_time) - ahead

    def _on_renewed(self, msg: m.Renewed) -> None:
        key, self._renew_key = self._renew_key, None
        if key is None:
            self.ignored += 1  # not asked for (or a late answer to an attempt we gave up on)
            return
        self.expires_at = msg.expires_at
        self._commands.append(Renewed(key, msg.cert_pem.encode(), msg.expires_at))
        self._renew_due = None
        if msg.expires_at > 0 and msg.server_time > 0:
            full = msg.expires_at - msg.server_time  # a fresh key: its whole lifetime is left
            self._renew_due = self._now + full * (1 - RENEW_FRACTION)

    def _on_notice(self, msg: m.Notice) -> None:
        if msg.code == "approved":
            self.approved = True
        if msg.code == "expiry" and msg.expires_at > 0:
            self.expires_at = msg.expires_at
        self.notice = NoticeReceived(msg.code[:64], msg.message[:512], msg.expires_at)
        self._commands.append(self.notice)

    def _renew_now(self, now: float) -> None:
        key_pem = identity.new_private_key_pem()
        self._renew_key = key_pem
        self._renew_due = now + RENEW_RETRY  # tried again if no RENEWED comes
        self._send(m.Renew(csr_pem=identity.make_csr(key_pem, self.name).decode()))

    def _on_error(self, msg: m.Error) -> None:
        if msg.code in FATAL_ERROR_CODES:
            self.state = SessionState.FATAL
            self._fail_waiting("eof", f"this node was removed from server {self.config.server}")
            said = "this node was removed by an admin"
            extra = f" ({msg.message[:200]})" if msg.message and msg.message != said else ""
            self._commands.append(
                Fatal(
                    int(ExitCode.NODE_REMOVED),
                    f"{said}{extra}; enroll again with a new auth key",
                )
            )
        # Any other ERROR: the control machine closes; session_ended follows.

    # -- INCOMING: the destination's decision ---------------------------------------------------
    def _on_incoming(self, msg: m.Incoming) -> None:
        if msg.stream_id in self._pending or msg.stream_id in self._streams:
            self._refuse(msg, "protocol", "duplicate stream id", RULE_DUPLICATE)
            return
        if self.config.shields_up:  # before anything else: not even the service is looked up
            self.shields_refused += 1
            reason = f"{self.name} has shields up: it accepts no incoming streams"
            self._refuse(msg, SHIELDS_UP, reason, SHIELDS_UP)
            return
        if self.active >= MAX_STREAMS:
            self._refuse(msg, "busy", f"{MAX_STREAMS} streams already active", RULE_LIMIT)
            return
        try:
            token = token_from_hex_untrusted(msg.token)
        except WireError as exc:
            self._refuse(msg, "protocol", f"bad stream token: {exc}", RULE_MALFORMED)
            return
        if self.policy_problem:
            self._refuse(
                msg,
                "policy",
                f"this node cannot read the server's policy ({self.policy_problem})",
                RULE_POLICY_UNREADABLE,
            )
            return
        src = Subject(msg.src.node_id, msg.src.name, msg.src.user, msg.src.tags)
        me = Subject(self.node_id, self.name, self.user, self.tags)
        if msg.exit:
            self._on_exit_incoming(msg, token, src, me)
            return
        decision = decide(src, me, self.config.services, msg.service, self.policy)
        if not decision.allowed or decision.service is None:
            self._refuse(msg, decision.code, decision.reason, decision.rule or RULE_NOT_EXPOSED)
            return
        self._pending[msg.stream_id] = _Pending(
            msg, token, decision.service, decision.reason, decision.rule, self._epoch
        )
        self._commands.append(ConnectTarget(msg.stream_id, decision.service))

    def _on_exit_incoming(self, msg: m.Incoming, token: bytes, src: Subject, me: Subject) -> None:
        """An exit stream: decided on our own networks and policy copy (authoritative here)."""
        ex = decide_exit(src, me, self.config.exit_nets, msg.exit, self.policy)
        if not ex.allowed or ex.service is None:
            self._refuse(msg, ex.code, ex.reason, ex.rule)
            return
        dest = ex.service
        svc = Service(EXIT_SERVICE, dest.port, dest.host, dest.port)
        self._pending[msg.stream_id] = _Pending(msg, token, svc, ex.reason, ex.rule, self._epoch)
        self._commands.append(
            ConnectExit(msg.stream_id, dest.host, dest.port, self.config.exit_nets)
        )

    def target_connected(self, stream_id: str) -> None:
        """The local target of ``stream_id`` is connected: ACCEPT and start the stream."""
        p = self._pending.pop(stream_id, None)
        if p is None:
            self._commands.append(DropTarget(stream_id, "unknown stream"))
            return
        if p.epoch != self._epoch or self.state is not SessionState.READY:
            # The control connection died meanwhile: the server cancels the stream.
            self._commands.append(DropTarget(stream_id, "control connection lost"))
            self._record(p.msg, False, "session-lost", "control connection lost", p.rule)
            return
        self._streams.add(stream_id)
        self._send(m.Accept(stream_id=stream_id))
        self._record(p.msg, True, "ok", p.reason, p.rule)
        self._commands.append(StartStream(stream_id, p.token, p.msg.src, p.service))

    def target_failed(self, stream_id: str, reason: str, *, code: str = "service-down") -> None:
        """The local target of ``stream_id`` could not be connected: REJECT(``code``).

        ``code``: ``service-down`` for an exposed service; an exit stream's
        dialer says ``not-allowed``, ``refused``, ``unreachable`` … (one line).
        """
        p = self._pending.pop(stream_id, None)
        if p is None:
            return
        live = p.epoch == self._epoch and self.state is SessionState.READY
        self._refuse(p.msg, code, reason, p.rule, send=live)

    def stream_ended(self, stream_id: str) -> None:
        """An accepted stream is over (its worker finished); frees its slot."""
        self._streams.discard(stream_id)

    def _refuse(
        self, msg: m.Incoming, code: str, reason: str, rule: str, *, send: bool = True
    ) -> None:
        self._record(msg, False, code, reason, rule)
        if send:
            self._send(m.Reject(stream_id=msg.stream_id, code=code, message=reason))

    def _record(self, msg: m.Incoming, accepted: bool, code: str, reason: str, rule: str) -> None:
        src = f"{msg.src.name} ({msg.src.node_id})"
        service = f"{msg.service} to {msg.exit}" if msg.exit else msg.service
        rec = StreamRecord(msg.stream_id, src, service, accepted, code, reason, rule)
        self._commands.append(Decided(rec))

    def direct_decided(  # noqa: PLR0917 - one decision's fields
        self,
        src_id: str,
        service: str,
        accepted: bool,
        code: str,
        rule: str,
        reason: str,
        stream: str,
        now: float,
    ) -> bool:
        """Report a decision on a direct (mux) stream to the server's audit log (STREAM_LOG).

        Only to a server with cap ``policy``, at most :data:`MAX_STREAM_LOGS` per
        :data:`STREAM_LOG_WINDOW`; False (and counted in ``stream_logs_dropped``) when not sent.
        """
        if not self.ready or not m.may_send(m.MsgType.STREAM_LOG, self.server_caps):
            self.stream_logs_dropped += 1
            return False
        sent = self._stream_logs
        while sent and sent[0] <= now - STREAM_LOG_WINDOW:
            sent.popleft()
        if len(sent) >= MAX_STREAM_LOGS:
            self.stream_logs_dropped += 1
            return False
        sent.append(now)
        self._send(
            m.StreamLog(
                src=src_id,
                service=service,
                allowed=accepted,
                code=code,
                rule=rule,
                reason=reason,
                stream=stream,
            )
        )
        return True

    # -- local opens ----------------------------------------------------------------------
    def open_local(
        self,
        token: bytes,
        dst: str,
        service: str,
        now: float,
        timeout: float = DEFAULT_OPEN_TIMEOUT,
        *,
        exit: str = "",
    ) -> None:
        """A local client asks for a stream to ``dst:service``; ``token`` names its data conn.

        ``exit``: an exit stream leaving ``dst`` to this ``host:port`` (``service`` ignored).

        Answers with :class:`LocalOpenAdmitted` (then later
        :class:`LocalOpenSucceeded` or :class:`LocalOpenFailed`) or at once
        with :class:`LocalOpenFailed` (``admitted`` false). An admitted open
        counts against the limit until :meth:`local_open_ended`.
        """
        if self.state is not SessionState.READY:
            what = (
                "the agent is stopping"
                if self.state is SessionState.STOPPED
                else f"not connected to server {self.config.server}"
            )
            self._commands.append(LocalOpenFailed(token, "not-connected", what, True, False))
            return
        if self.active >= MAX_STREAMS:
            msg = f"{MAX_STREAMS} streams already active"
            self._commands.append(LocalOpenFailed(token, "busy", msg, True, False))
            return
        if token in self._local:  # the driver reused a token: a bug, never a collision
            self._commands.append(LocalOpenFailed(token, "local", "token in use", True, False))
            return
        self._local[token] = _LocalOpen(token, dst, service, now + timeout)
        service = m.EXIT_SERVICE if exit else service
        self._send(m.Open(dst=dst, service=service, token=token.hex(), exit=exit))
        self._commands.append(LocalOpenAdmitted(token))

    def local_open_ended(self, token: bytes) -> None:
        """The driver is done with this local open (any outcome); frees its slot."""
        self._local.pop(token, None)

    def _on_open_answer(self, msg: m.Opened | m.OpenFailed) -> None:
        try:
            token = token_from_hex_untrusted(msg.token)
        except WireError:
            self.ignored += 1
            return
        lo = self._local.get(token)
        if lo is None or lo.state is not _OpenState.WAITING:
            self.ignored += 1  # timed out already, or never ours
            return
        if isinstance(msg, m.Opened):
            lo.state = _OpenState.ANSWERED
            self._commands.append(LocalOpenSucceeded(token, msg))
        else:
            lo.state = _OpenState.FAILED
            fallback = msg.code in LOCAL_FALLBACK_CODES
            text = msg.message or msg.code
            self._commands.append(LocalOpenFailed(token, msg.code, text, fallback, True))

    def _fail_waiting(self, code: str, message: str, *, fallback: bool = False) -> None:
        for lo in self._local.values():
            if lo.state is _OpenState.WAITING:
                lo.state = _OpenState.FAILED
                self._commands.append(LocalOpenFailed(lo.token, code, message, fallback, True))

    # -- direct paths --------------------------------------------------------------------
    @property
    def direct_expected(self) -> bool:
        """Whether the server speaks direct paths (announced ``direct``)."""
        return m.CAP_DIRECT in self.server_caps

    def _welcome_direct(self, msg: m.Welcome, now: float) -> None:
        direct = self.direct_expected
        self.probe_port = msg.probe_port if direct else 0
        self.paths.update_all(now, relay_only_server=direct and not msg.direct)
        if not direct:
            return
        if self.config.relay_only:
            self._send(m.Endpoints(relay_only=True))
        elif self.endpoints is not None:
            self._send(self.endpoints)
        self._drain_paths()

    def set_endpoints(self, endpoints: m.Endpoints, now: float) -> None:
        """The driver's discovery result (candidates, NAT kind); sent now and after each WELCOME.

        A change makes every peer's manager forget its backoff and re-probe if in use.
        """
        if self.config.relay_only or endpoints == self.endpoints:
            return
        self.endpoints = endpoints
        try:
            nat = NatKind(endpoints.nat)
        except ValueError:
            nat = NatKind.UNKNOWN
        self.paths.update_all(now, self_nat=nat)
        if self.state is SessionState.READY and self.direct_expected:
            self._send(endpoints)
        for pm in self.paths.managers():
            pm.endpoints_changed(now)
        self._drain_paths()

    def set_probe_port_ok(self, ok: bool, now: float) -> None:
        """Whether discovery reached the server's probe port (explains ``no-probe-port``)."""
        self.paths.update_all(now, probe_port_ok=ok)
        self._drain_paths()

    def path_choice(self, peer: str, now: float) -> hpath.PathChoice:
        """The path a new stream to ``peer`` (node id) takes now, and why."""
        return self.paths.choose(peer, now)

    def stream_wanted(self, peer: str, now: float, *, direct: bool = False) -> None:
        """A stream to ``peer`` starts (over the mux if ``direct``, else the relay).

        On the relay this may ask the server for a direct path (PATH_REQ).
        """
        pm = self.paths.manager(peer)
        if pm is not None:
            pm.stream_wanted(now, direct=direct)
        self._drain_paths()

    def punch_succeeded(
        self, peer: str, kind: hpath.PathKind, endpoint: str, now: float, *, rtt_ms: float = 0.0
    ) -> None:
        """An authenticated direct connection to ``peer`` is up (a punch won, or it dialled us).

        Any authenticated connection to the peer is the path, whichever punch made it.
        """
        pm = self.paths.manager(peer)
        if pm is not None:
            pm.path_up(kind, endpoint, now, rtt_ms)
        self._drain_paths()

    def punch_failed(self, peer: str, punch_id: int, code: str, reason: str, now: float) -> None:
        """The driver's punch ``punch_id`` to ``peer`` ended without a path."""
        pm = self.paths.get(peer)
        if pm is not None:
            pm.punch_failed(punch_id, code, reason, now)
        self._drain_paths()

    def path_lost(self, peer: str, reason: str, now: float) -> None:
        """The direct path to ``peer`` died: new streams use the relay; re-probe soon."""
        pm = self.paths.get(peer)
        if pm is not None:
            pm.path_lost(reason, now)
        self._drain_paths()

    def path_rtt(self, peer: str, rtt_ms: float) -> None:
        """The mux measured a round trip to ``peer``."""
        pm = self.paths.get(peer)
        if pm is not None:
            pm.set_rtt(rtt_ms)

    def peer_ping(self, peer: str, seq: int) -> bool:
        """Send PEER_PING to ``peer`` over the server; False when the server cannot forward it."""
        if self.state is not SessionState.READY or not self.direct_expected:
            return False
        self._send(m.PeerPing(peer=peer, seq=seq))
        return True

    def _peers_online(self, now: float) -> None:
        """Feed the peer map's online flags to the path managers; a peer back online re-probes."""
        view = self.peers.peers
        for pm in self.paths.managers():
            peer = view.get(pm.peer)
            if peer is not None and peer.online != pm.peer_online:
                pm.update(now, peer_online=peer.online)
                if peer.online:
                    pm.endpoints_changed(now)
        self._drain_paths()

    def _on_direct(self, msg: m.Punch | m.PathFailed | m.PeerPing | m.PeerPong, now: float) -> None:
        if isinstance(msg, m.PeerPing):
            self._send(m.PeerPong(peer=msg.peer, seq=msg.seq))
        elif isinstance(msg, m.PeerPong):
            self._commands.append(PeerPongReceived(msg.peer, msg.seq))
        elif isinstance(msg, m.PathFailed):
            pm = self.paths.get(msg.dst)
            if pm is None:
                self.ignored += 1
            else:
                pm.path_failed(msg.punch_id, msg.code, msg.reason, now)
        elif self.config.relay_only:
            self.ignored += 1  # we never reported candidates; a PUNCH is a server's mistake
        else:
            pm = self.paths.manager(msg.peer.node_id)
            if pm is not None and pm.punch_started(msg.punch_id, now):
                deadline = now + hpath.PUNCH_TIMEOUT
                self._commands.append(StartPunch(msg, deadline))
            else:
                self.ignored += 1
        self._drain_paths()

    def _drain_paths(self) -> None:
        live = self.state is SessionState.READY and self.direct_expected
        while (cmd := self.paths.next_command()) is not None:
            if isinstance(cmd, hpath.RequestPath):
                if live:
                    self._send(m.PathReq(dst=cmd.peer, punch_id=cmd.punch_id))
                continue
            ch = cmd.choice
            if live:
                self._send(
                    m.PathReport(
                        peer=cmd.peer,
                        kind=ch.kind.value,
                        endpoint=ch.endpoint,
                        rtt_ms=cmd.rtt_ms,
                        code=ch.code,
                        reason=ch.reason,
                        punch_attempts=cmd.punch_attempts,
                        punch_successes=cmd.punch_successes,
                        streams_direct=cmd.streams_direct,
                        streams_relay=cmd.streams_relay,
                    )
                )
            self._commands.append(PathChanged(cmd.peer, ch))

    # -- time -----------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next (a local open's or a path's deadline, a
        renewal), or None."""
        waiting = [lo.deadline for lo in self._local.values() if lo.state is _OpenState.WAITING]
        if self._renew_due is not None and self.state is SessionState.READY:
            waiting.append(self._renew_due)
        path_t = self.paths.get_timer()
        if path_t is not None:
            waiting.append(path_t)
        return min(waiting) if waiting else None

    def handle_timer(self, now: float) -> None:
        """Fail local opens whose answer did not come in time; renew the node key when due;
        run path timers."""
        self.paths.handle_timer(now)
        self._drain_paths()
        if (
            self._renew_due is not None
            and self.state is SessionState.READY
            and now >= self._renew_due
        ):
            self._renew_now(now)
        for lo in self._local.values():
            if lo.state is _OpenState.WAITING and now >= lo.deadline:
                lo.state = _OpenState.FAILED
                msg = f"no answer from server {self.config.server}"
                self._commands.append(LocalOpenFailed(lo.token, "timeout", msg, False, True))
