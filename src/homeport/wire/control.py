"""Control messages between nodes/CLIs and the server: wire version 1, capability version 3.

Each message is one frame (see :mod:`homeport.wire.frame`) whose type byte is
the message's :class:`MsgType` and whose body is a JSON object with the
message's fields. Unknown keys are ignored (forward compatible); missing or
mistyped keys are a :class:`WireError`.

Message table (c = node or CLI, s = server)::

    type  name         dir   when                                              (since capver)
    0x01  HELLO        c→s   first frame of an authenticated connection (client cert)     1
    0x02  WELCOME      s→c   answer to HELLO: who the server says we are                  1
    0x03  ENROLL       c→s   first frame of a certificate-less connection: auth key + CSR 1
    0x04  ENROLLED     s→c   the signed node certificate and the network CA               1
    0x05  ANNOUNCE     c→s   agent: the services it exposes and its sshd host keys        1
    0x06  NETMAP       s→c   capver 1 only: every node, in one frame (on request)         1
    0x07  NETMAP_REQ   c→s   ask for the peer map (capver ≥ 2: answered with PEERS)       1
    0x08  OPEN         c→s   open a stream to dst:service; token names our data conn.     1
    0x09  INCOMING     s→c   to the destination agent: accept a stream from src?          1
    0x0a  ACCEPT       c→s   destination agent accepts; its data conn. uses the token     1
    0x0b  REJECT       c→s   destination agent refuses (code, message)                    1
    0x0c  OPENED       s→c   to the opener: accepted; pin this peer, its host keys        1
    0x0d  OPEN_FAILED  s→c   to the opener: unknown node, offline, not exposed, refused … 1
    0x0e  PING         c↔s   keepalive; the peer answers PONG with the same seq           1
    0x0f  PONG         c↔s                                                                1
    0x10  ERROR        s→c   fatal: the server closes the connection after this           1
    0x80  PEERS        s→c   this node's peer map, full or delta, versioned (cap peers)   2
    0x81  ENDPOINTS    c→s   agent: its direct-path candidates and NAT kind (cap direct)  3
    0x82  PATH_REQ     c→s   agent: please coordinate a direct path to dst (cap direct)   3
    0x83  PUNCH        s→c   to both nodes at once: punch to the peer's candidates now    3
    0x84  PATH_FAILED  s→c   to the requester: no punch, with a code and a reason         3
    0x85  PATH_REPORT  c→s   agent: the path it uses to a peer now, and why (counters)    3
    0x86  PEER_PING    c↔s   a ping to a peer over the server (s rewrites ``peer``)        3
    0x87  PEER_PONG    c↔s   its answer, forwarded the same way                           3
    0x88  RENEW        c→s   agent: a CSR for a new node key before the old expires (renew) 3
    0x89  RENEWED      s→c   the renewed certificate and the new expiry date (cap renew)   3
    0x8a  NOTICE       s→c   a notice for the node: expiry warning, approved (cap renew)   3
    0x8c  SSH_CERT_REQ c→s   a user certificate to log in to dst as user (cap sshcert)     3
    0x8d  SSH_CERT     s→c   the certificate, or a refusal with code and reason (sshcert)   3
    0x8e  LOGIN        c→s   start/poll/approve a login check (``homeport login``)        3
    0x8f  LOGIN_STATE  s→c   its state: pending with a code, approved, refused            3
    0x90  POLICY       s→c   the ACL rules that can grant streams to this node (cap policy) 3
    0x91  STREAM_LOG   c→s   destination agent: its decision on a direct stream (policy)  3
    0x98  PEERS_Z      s→c   a PEERS frame whose JSON body is zlib-deflated (cap zpeers)  5

Evolution rules (why: old and new nodes must interoperate during an upgrade,
the way Tailscale's capability version lets old clients talk to new servers):

* ``proto`` in HELLO/ENROLL/WELCOME is the *wire* version (framing and the
  meaning of types 0x01-0x7f). A different wire version is refused with
  ``ERROR(upgrade)`` and a sentence saying which side to upgrade.
* ``capver`` (an integer that only grows) and ``caps`` (a set of names) say
  which optional behaviour a peer understands; a field that is absent means
  capability version 1 with no caps, i.e. a peer of the first release. Each
  side sends a newer message only when the other side announced its
  capability (:func:`may_send`); the server answers every capability version
  from :data:`MIN_CAPVER` up.
* Types 0x01-0x7f must be understood: an unknown one there is a protocol
  error. Types 0x80-0xff are *ignorable*: a receiver that does not know one
  skips it (:func:`is_ignorable`), so a newer peer's optional message never
  breaks an older one.
* New fields are added with a default, so older senders remain valid.

History: capver 1 (2026-11) first version. capver 2 (2026-12): HELLO/WELCOME
carry ``capver``/``caps``; PEERS (per-node, versioned, delta-encoded peer map,
no host keys); host keys travel only in OPENED; PeerInfo carries ``user`` and
``tags`` for policy decisions. capver 3 (2026-12): capability ``direct`` (direct
peer-to-peer paths, docs/nat-traversal.md): ENDPOINTS, PATH_REQ, PUNCH,
PATH_FAILED, PATH_REPORT, PEER_PING, PEER_PONG (0x81-0x87); WELCOME carries
``direct`` (false: the server is in relay-only mode) and ``probe_port`` (the
whoami probe listener, 0 = none); POLICY
(0x90, cap ``policy``); STREAM_LOG (0x91, cap ``policy``: the server's audit log
also sees direct streams, which never pass it). Capability ``sshcert``: SSH_CERT_REQ,
SSH_CERT, LOGIN, LOGIN_STATE (0x8c-0x8f); WELCOME carries ``ssh_ca`` (the SSH CA public key).
capver 4 (2026-12): capability ``exit`` (exit nodes, docs/exit-nodes.md): ANNOUNCE carries
``exit`` (the networks the node lets streams leave to; kept by the server, not put in peer
maps), OPEN and INCOMING carry ``exit`` (the destination ``host:port``; OPEN's ``service`` is then
``(exit)``, a name no service can have, so an older server refuses it as not exposed). The
server sends an exit INCOMING only to a node that announced cap ``exit``.
capver 4 also adds capability ``mapdelta``: WELCOME carries ``map_epoch`` (the server's
peer-map run) and HELLO ``map_epoch``/``map_version`` (the map the node still holds), so a
reconnecting agent gets a PEERS delta from its version instead of a full map
(docs/netmap.md, "Reconnecting without a full map").
capver 5 (2026-12): capability ``zpeers``: the server may send any PEERS frame as PEERS_Z
(0x98), the same body deflated with zlib (RFC 1950), when that is smaller. Only PEERS is
compressed: peer maps are most of the control bytes (a 5,000-node map is 1.35 MiB of JSON
and deflates ~3.8x), every other message is small. The receiver inflates at most
:data:`MAX_INFLATED` (one frame's worth); a PEERS_Z is then exactly a PEERS. Byte layout of a
PEERS_Z frame: the frame header (wire.frame) with type 0x98, then a zlib stream (2-byte
header, deflate data, Adler-32) whose inflated bytes are the PEERS JSON body.
"""

from __future__ import annotations

import enum
import json
import re
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, TypeVar

from homeport.wire import probe
from homeport.wire.errors import UnknownType, WireError
from homeport.wire.frame import MAX_FRAME, encode_frame

#: The wire version: framing and the meaning of types 0x01-0x7f. Changes only
#: for an incompatible protocol; peers of another wire version get ERROR(upgrade).
PROTOCOL_VERSION = 1
#: Our capability version (grows with every protocol feature; see the module doc).
CAPVER = 5
#: The oldest capability version this code still serves.
MIN_CAPVER = 1
#: The first type number that a receiver may skip when it does not know it.
IGNORABLE_MIN = 0x80
#: Capability names. ``peers``: understands PEERS (and wants it pushed, if an agent).
CAP_PEERS = "peers"
#: ``direct``: understands ENDPOINTS … PEER_PONG (direct paths, capver 3).
CAP_DIRECT = "direct"
#: ``renew``: understands RENEW/RENEWED/NOTICE (node-key renewal, expiry and approval notices).
CAP_RENEW = "renew"
#: ``policy``: understands POLICY and enforces it on every INCOMING.
CAP_POLICY = "policy"
#: ``sshcert``: understands SSH_CERT_REQ/SSH_CERT/LOGIN/LOGIN_STATE (keyless SSH).
CAP_SSHCERT = "sshcert"
#: ``exit``: understands exit streams (OPEN/INCOMING ``exit``, ANNOUNCE ``exit``, capver 4).
CAP_EXIT = "exit"
#: OPEN's ``service`` for an exit stream (never a real service: the parentheses make it an
#: invalid service name, so a server without cap ``exit`` refuses it as not exposed).
EXIT_SERVICE = "(exit)"
#: ``mapdelta``: HELLO names the peer map it holds; the server answers with a delta (capver 4).
CAP_MAPDELTA = "mapdelta"
#: Every capability this code implements, announced in HELLO and WELCOME.
OUR_CAPS: tuple[str, ...] = (CAP_PEERS, CAP_RENEW, CAP_DIRECT, CAP_POLICY, CAP_SSHCERT)
OUR_CAPS += (CAP_EXIT,)
OUR_CAPS += (CAP_MAPDELTA,)
#: ``zpeers``: understands PEERS_Z, a PEERS frame with a zlib-deflated body (capver 5).
CAP_ZPEERS = "zpeers"
OUR_CAPS += (CAP_ZPEERS,)
#: Most bytes a PEERS_Z body may inflate to: what one uncompressed frame may hold, so
#: compression never lets a sender make us hold more than a plain frame could.
MAX_INFLATED = MAX_FRAME - 1
#: zlib level of PEERS_Z: 1 deflates a 5,000-node map 3.8x in 15 ms (level 6: 4.1x, 34 ms);
#: maps are encoded once per version and shared, and under a reconnect storm a new version
#: is encoded every push window, so the cheap level wins.
ZPEERS_LEVEL = 1
#: PEERS bodies shorter than this go out as they are (deflating a one-entry delta saves
#: little and costs a zlib stream per frame).
ZPEERS_MIN_BODY = 512
#: Most capability names a peer may announce (longer lists are a WireError).
MAX_CAPS = 64
#: Longest string field we accept (PEM blobs and host key lines fit easily).
MAX_STRING = 16 * 1024
#: Most elements in any list field (nodes in a netmap, services, host keys).
MAX_LIST = 4096
#: Most direct-path candidates one node may report (ENDPOINTS, PUNCH).
MAX_CANDIDATES = 16
#: Candidate kinds: an interface address, a router port mapping, the address the server sees.
CANDIDATE_KINDS = frozenset({"local", "mapped", "public"})
#: TLS roles in a PUNCH (the requester of the path is the TLS client).
TLS_ROLES = frozenset({"client", "server"})


class MsgType(enum.IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    ENROLL = 0x03
    ENROLLED = 0x04
    ANNOUNCE = 0x05
    NETMAP = 0x06
    NETMAP_REQ = 0x07
    OPEN = 0x08
    INCOMING = 0x09
    ACCEPT = 0x0A
    REJECT = 0x0B
    OPENED = 0x0C
    OPEN_FAILED = 0x0D
    PING = 0x0E
    PONG = 0x0F
    ERROR = 0x10
    PEERS = 0x80
    ENDPOINTS = 0x81
    PATH_REQ = 0x82
    PUNCH = 0x83
    PATH_FAILED = 0x84
    PATH_REPORT = 0x85
    PEER_PING = 0x86
    PEER_PONG = 0x87
    RENEW = 0x88
    RENEWED = 0x89
    NOTICE = 0x8A
    SSH_CERT_REQ = 0x8C
    SSH_CERT = 0x8D
    LOGIN = 0x8E
    LOGIN_STATE = 0x8F
    POLICY = 0x90
    STREAM_LOG = 0x91
    PEERS_Z = 0x98


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """A service a node exposes: clients address it by name or by port."""

    name: str
    port: int


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The other end of a stream, as the server vouches for it."""

    node_id: str
    name: str
    fingerprint: str
    host_keys: tuple[str, ...] = ()
    user: str = ""  # the owning user, "" while users do not exist (capver 2)
    tags: tuple[str, ...] = ()  # e.g. "tag:server" (capver 2)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One row of a capver-1 NETMAP (kept for first-release clients)."""

    node_id: str
    name: str
    online: bool
    last_seen: float
    fingerprint: str
    services: tuple[ServiceInfo, ...] = ()
    host_keys: tuple[str, ...] = ()
    address: str = ""
    path: str = ""


@dataclass(frozen=True, slots=True)
class Peer:
    """One entry of a PEERS map: what a node may know about one peer.

    No sshd host keys here (they travel only in OPENED, for the one peer a
    stream goes to), so one node's keys can never bloat or break other nodes'
    maps. ``rev`` is the map version at which this entry last changed.
    """

    node_id: str
    name: str
    online: bool
    last_seen: float
    fingerprint: str
    services: tuple[ServiceInfo, ...] = ()
    address: str = ""
    rev: int = 0
    user: str = ""
    tags: tuple[str, ...] = ()


def node_info(peer: Peer, *, now: float | None = None) -> NodeInfo:
    """A PEERS entry as a capver-1 NETMAP row (``now``: last seen of an online node)."""
    return NodeInfo(
        node_id=peer.node_id,
        name=peer.name,
        online=peer.online,
        last_seen=now if now is not None and peer.online else peer.last_seen,
        fingerprint=peer.fingerprint,
        services=peer.services,
        address=peer.address,
        path="relay",
    )


class Message:
    """Base of all control messages; subclasses are frozen dataclasses."""

    TYPE: ClassVar[MsgType]


@dataclass(frozen=True, slots=True)
class Hello(Message):
    TYPE: ClassVar[MsgType] = MsgType.HELLO
    proto: int
    role: str  # "agent" (stays connected, receives streams) or "client" (one-shot)
    software: str = ""
    capver: int = 1
    caps: tuple[str, ...] = ()
    #: cap mapdelta: the ``map_epoch`` of the WELCOME whose map the node still holds, and
    #: that map's version ("" / 0: none; the server then sends a full map as before).
    map_epoch: str = ""
    map_version: int = 0


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    proto: int
    node_id: str
    name: str
    ping_interval: float
    capver: int = 1
    caps: tuple[str, ...] = ()
    direct: bool = True  # capver 3: false = the server is in relay-only mode (never probe)
    probe_port: int = 0  # capver 3: the server's whoami probe port (0: none)
    #: capver 3: False while an admin has not approved this node (it sees and reaches no one).
    approved: bool = True
    #: capver 3: when this node's key expires (unix time; 0 = never).
    expires_at: float = 0.0
    #: capver 3: the server's node-key lifetime (s; 0 = none): a node renews with a third left.
    key_lifetime: float = 0.0
    #: capver 3: the server's clock when it sent this, so a node with a wrong clock (or a
    #: monotonic one) still times its renewal right: it uses ``expires_at - server_time``.
    server_time: float = 0.0
    #: cap sshcert: the server's SSH user CA public key (``ssh-ed25519 …``; "" = none).
    ssh_ca: str = ""
    #: cap mapdelta: names this server run's peer map; versions compare only within one epoch.
    map_epoch: str = ""


@dataclass(frozen=True, slots=True)
class Enroll(Message):
    TYPE: ClassVar[MsgType] = MsgType.ENROLL
    proto: int
    auth_key: str
    name: str
    csr_pem: str
    software: str = ""
    capver: int = 1
    caps: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Enrolled(Message):
    TYPE: ClassVar[MsgType] = MsgType.ENROLLED
    node_id: str
    name: str
    cert_pem: str
    ca_pem: str


@dataclass(frozen=True, slots=True)
class Announce(Message):
    TYPE: ClassVar[MsgType] = MsgType.ANNOUNCE
    services: tuple[ServiceInfo, ...]
    host_keys: tuple[str, ...]
    exit: tuple[str, ...] = ()  # networks streams may leave to (cap exit); () = not an exit


@dataclass(frozen=True, slots=True)
class NetMap(Message):
    TYPE: ClassVar[MsgType] = MsgType.NETMAP
    self_id: str
    nodes: tuple[NodeInfo, ...]


@dataclass(frozen=True, slots=True)
class NetMapRequest(Message):
    TYPE: ClassVar[MsgType] = MsgType.NETMAP_REQ


@dataclass(frozen=True, slots=True)
class Peers(Message):
    """One frame of a peer-map update (capver 2, cap ``peers``).

    ``reset``: this update replaces the receiver's whole map (it is a full
    map); otherwise it is a delta that applies only to a map at version
    ``base``: upsert ``peers``, drop ``removed`` (node ids). A receiver whose
    version is not ``base`` asks for a full map (NETMAP_REQ) instead of
    guessing. A large update is split over several frames with the same
    ``version``; ``more`` is true on all but the last, and the receiver
    applies the update when the last one arrives, so it never sees half a map.
    """

    TYPE: ClassVar[MsgType] = MsgType.PEERS
    version: int
    base: int
    reset: bool
    peers: tuple[Peer, ...] = ()
    removed: tuple[str, ...] = ()
    more: bool = False


@dataclass(frozen=True, slots=True)
class PolicySel:
    """One resolved selector of a POLICY rule (``kind`` as in ``policy.acl.SelKind``).

    ``ports`` ("22,80,8000-8999" or "*") is set on destination entries only;
    ``text`` is what the policy file said (``group:dev``), for explanations.
    """

    kind: str
    value: str = ""
    text: str = ""
    ports: str = ""


@dataclass(frozen=True, slots=True)
class PolicyRule:
    name: str  # where it is in the file: "acls[3]"
    src: tuple[PolicySel, ...]
    dst: tuple[PolicySel, ...]


@dataclass(frozen=True, slots=True)
class Policy(Message):
    """The ACL rules that can grant a stream to the receiving node (capver 3, cap ``policy``).

    ``active`` false: no policy file (every node may reach every exposed
    service). ``user``/``tags``: who the server says this node is, for the
    rules' destination selectors. ``version`` grows with every push.
    """

    TYPE: ClassVar[MsgType] = MsgType.POLICY
    version: int
    active: bool
    rules: tuple[PolicyRule, ...] = ()
    user: str = ""
    tags: tuple[str, ...] = ()
    digest: str = ""


@dataclass(frozen=True, slots=True)
class StreamLog(Message):
    """The destination agent's decision on a direct (mux) stream (capver 3, cap ``policy``).

    Direct streams never pass the server, so without this its audit log would
    miss them. The server records it as a ``stream`` audit event with
    ``by=destination-direct``; the destination is the reporting session's node,
    never a field of this message (an agent cannot speak for another node).
    """

    TYPE: ClassVar[MsgType] = MsgType.STREAM_LOG
    src: str  # the opener's node id (as its certificate says, on the direct link)
    service: str
    allowed: bool
    code: str  # "ok", or the refusal code
    rule: str
    reason: str = ""
    stream: str = ""  # the agent's local stream name ("direct-7")


@dataclass(frozen=True, slots=True)
class Open(Message):
    TYPE: ClassVar[MsgType] = MsgType.OPEN
    dst: str
    service: str  # a service name ("ssh") or a port number as text ("22")
    token: str  # hex of the 16-byte token our data connection will present
    exit: str = ""  # cap exit: leave dst to this "host:port" (service is then "(exit)")


@dataclass(frozen=True, slots=True)
class Incoming(Message):
    TYPE: ClassVar[MsgType] = MsgType.INCOMING
    stream_id: str
    token: str  # the destination's data connection presents this token
    src: PeerInfo
    service: str  # the resolved service name
    exit: str = ""  # cap exit: dial this "host:port" from the exit node (service "(exit)")


@dataclass(frozen=True, slots=True)
class Accept(Message):
    TYPE: ClassVar[MsgType] = MsgType.ACCEPT
    stream_id: str


@dataclass(frozen=True, slots=True)
class Reject(Message):
    TYPE: ClassVar[MsgType] = MsgType.REJECT
    stream_id: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Opened(Message):
    TYPE: ClassVar[MsgType] = MsgType.OPENED
    token: str
    stream_id: str
    peer: PeerInfo
    port: int


@dataclass(frozen=True, slots=True)
class OpenFailed(Message):
    TYPE: ClassVar[MsgType] = MsgType.OPEN_FAILED
    token: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE: ClassVar[MsgType] = MsgType.PING
    seq: int


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE: ClassVar[MsgType] = MsgType.PONG
    seq: int


@dataclass(frozen=True, slots=True)
class Renew(Message):
    """Agent → server (cap ``renew``): sign a new node key; the old one stays valid meanwhile."""

    TYPE: ClassVar[MsgType] = MsgType.RENEW
    csr_pem: str


@dataclass(frozen=True, slots=True)
class Renewed(Message):
    """Server → agent (cap ``renew``): the new certificate and the node's new expiry (0 = never)."""

    TYPE: ClassVar[MsgType] = MsgType.RENEWED
    cert_pem: str
    expires_at: float = 0.0
    server_time: float = 0.0


@dataclass(frozen=True, slots=True)
class Notice(Message):
    """Server → node (cap ``renew``): something the node's owner should know.

    ``code``: ``expiry`` (the key expires at ``expires_at``), ``approved``
    (an admin approved this node), ``renew-failed``; ``message`` is one
    sentence for logs and ``homeport status``.
    """

    TYPE: ClassVar[MsgType] = MsgType.NOTICE
    code: str
    message: str
    expires_at: float = 0.0


#: Longest SSH public key line in SSH_CERT_REQ (an RSA-8192 key line is ~1.4 kB).
MAX_SSH_KEY = 4096
#: LOGIN actions.
LOGIN_ACTIONS = ("start", "poll", "approve")
_ACCOUNT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_LOGIN_CODE_RE = re.compile(r"^[A-Z0-9-]{0,32}$")


@dataclass(frozen=True, slots=True)
class SshCertReq(Message):
    """Node → server (cap ``sshcert``): sign ``public_key`` to log in to ``dst`` as ``user``.

    Checked on construction (so on decode): ``user`` is a local account name,
    ``public_key`` one strict OpenSSH public key line of a signable type.
    """

    TYPE: ClassVar[MsgType] = MsgType.SSH_CERT_REQ
    req_id: int
    dst: str
    user: str
    public_key: str

    def __post_init__(self) -> None:
        from homeport.wire.hostkey import ECDSA_CURVES, ED25519, RSA, parse_host_key_untrusted

        if not _ACCOUNT_RE.match(self.user):
            raise WireError("SshCertReq.user: not a local account name")
        if not 0 < len(self.dst) <= 64:
            raise WireError("SshCertReq.dst: expected a node name")
        if len(self.public_key) > MAX_SSH_KEY:
            raise WireError(f"SshCertReq.public_key: longer than {MAX_SSH_KEY}")
        key = parse_host_key_untrusted(self.public_key)
        if key.key_type not in {ED25519, RSA, *ECDSA_CURVES}:
            raise WireError(f"SshCertReq.public_key: {key.key_type} keys are not signed")


@dataclass(frozen=True, slots=True)
class SshCert(Message):
    """Server → node (cap ``sshcert``): the certificate (``cert`` non-empty), or a refusal.

    A refusal has a stable ``code`` (``policy``, ``check-required``, ``no-ssh-ca``,
    ``unknown-node`` …) and a one-line ``reason`` naming the ``rule``.
    """

    TYPE: ClassVar[MsgType] = MsgType.SSH_CERT
    req_id: int
    cert: str = ""
    code: str = ""
    reason: str = ""
    rule: str = ""
    principals: tuple[str, ...] = ()
    valid_before: float = 0.0
    ca_key: str = ""


@dataclass(frozen=True, slots=True)
class Login(Message):
    """Node → server (cap ``sshcert``): a login check (``homeport login``).

    ``start``: begin one (the answer carries a short code); ``poll``: the state of
    ``code``; ``approve``: approve another device's ``code`` (same user, and this
    device's own check is fresh).
    """

    TYPE: ClassVar[MsgType] = MsgType.LOGIN
    action: str
    code: str = ""

    def __post_init__(self) -> None:
        if self.action not in LOGIN_ACTIONS:
            raise WireError(f"Login.action: one of {', '.join(LOGIN_ACTIONS)}")
        if not _LOGIN_CODE_RE.match(self.code):
            raise WireError("Login.code: not a login code")


@dataclass(frozen=True, slots=True)
class LoginState(Message):
    """Server → node (cap ``sshcert``): a login check's ``state``.

    ``pending`` (show ``code`` and ``message``), ``approved`` (at ``approved_at``),
    ``refused`` or ``expired`` (``message`` says why).
    """

    TYPE: ClassVar[MsgType] = MsgType.LOGIN_STATE
    state: str
    code: str = ""
    message: str = ""
    provider: str = ""
    approved_at: float = 0.0
    expires_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Error(Message):
    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: str
    message: str


def _check_candidates(where: str, candidates: tuple[Candidate, ...]) -> None:
    if len(candidates) > MAX_CANDIDATES:
        raise WireError(f"{where}: more than {MAX_CANDIDATES} candidates")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One address a peer may reach our direct port at (checked on construction).

    ``addr`` must be a literal ``ip:port`` (:func:`homeport.wire.probe.parse_addr_untrusted`):
    candidates come from the network and are dialled, so no host names.
    """

    kind: str  # "local" | "mapped" | "public"
    addr: str

    def __post_init__(self) -> None:
        if self.kind not in CANDIDATE_KINDS:
            raise WireError(f"unknown candidate kind {self.kind[:32]!r}")
        probe.parse_addr_untrusted(self.addr)


@dataclass(frozen=True, slots=True)
class Endpoints(Message):
    """Agent → server after WELCOME and whenever discovery changes (cap ``direct``).

    ``relay_only``: this agent runs ``--relay-only`` (no candidates; peers are
    told why no direct path is tried). ``nat`` is a :class:`homeport.proto.nat.NatKind`
    value; a value this release does not know is read as ``unknown``.
    """

    TYPE: ClassVar[MsgType] = MsgType.ENDPOINTS
    candidates: tuple[Candidate, ...] = ()
    nat: str = "unknown"
    nat_reason: str = ""
    portmap: str = ""  # "natpmp" | "pcp" | "upnp" | ""
    direct_port: int = 0
    relay_only: bool = False

    def __post_init__(self) -> None:
        _check_candidates("ENDPOINTS", self.candidates)


@dataclass(frozen=True, slots=True)
class PathReq(Message):
    """Agent → server: coordinate a direct path to ``dst`` (a node id)."""

    TYPE: ClassVar[MsgType] = MsgType.PATH_REQ
    dst: str
    punch_id: int


@dataclass(frozen=True, slots=True)
class Punch(Message):
    """Server → both nodes at once: connect to ``candidates`` from the direct port now."""

    TYPE: ClassVar[MsgType] = MsgType.PUNCH
    punch_id: int
    peer: PeerInfo
    candidates: tuple[Candidate, ...]
    nat: str
    tls_role: str  # "client" (the requester) or "server"

    def __post_init__(self) -> None:
        _check_candidates("PUNCH", self.candidates)
        if self.tls_role not in TLS_ROLES:
            raise WireError(f"PUNCH: unknown tls_role {self.tls_role[:32]!r}")


@dataclass(frozen=True, slots=True)
class PathFailed(Message):
    """Server → requester: no punch for ``punch_id``; ``code`` is a path reason code."""

    TYPE: ClassVar[MsgType] = MsgType.PATH_FAILED
    punch_id: int
    dst: str
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class PathReport(Message):
    """Agent → server: the path to ``peer`` now, why, and this agent's counters for it.

    The counters are cumulative since the agent started (the server shows the latest).
    """

    TYPE: ClassVar[MsgType] = MsgType.PATH_REPORT
    peer: str
    kind: str  # "relay" | "direct" | "local" | "mapped"
    endpoint: str = ""
    rtt_ms: float = 0.0
    code: str = ""
    reason: str = ""
    punch_attempts: int = 0
    punch_successes: int = 0
    streams_direct: int = 0
    streams_relay: int = 0


@dataclass(frozen=True, slots=True)
class PeerPing(Message):
    """A ping to ``peer`` over the server; the server rewrites ``peer`` to the sender."""

    TYPE: ClassVar[MsgType] = MsgType.PEER_PING
    peer: str
    seq: int


@dataclass(frozen=True, slots=True)
class PeerPong(Message):
    """The answer to a PEER_PING (same ``seq``), forwarded the same way."""

    TYPE: ClassVar[MsgType] = MsgType.PEER_PONG
    peer: str
    seq: int


MESSAGES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Welcome,
        Enroll,
        Enrolled,
        Announce,
        NetMap,
        NetMapRequest,
        Open,
        Incoming,
        Accept,
        Reject,
        Opened,
        OpenFailed,
        Ping,
        Pong,
        Error,
        Peers,
        Endpoints,
        PathReq,
        Punch,
        PathFailed,
        PathReport,
        PeerPing,
        PeerPong,
        Renew,
        Renewed,
        Notice,
        SshCertReq,
        SshCert,
        Login,
        LoginState,
        Policy,
        StreamLog,
    )
}

#: The capability a peer must have announced before we send it this type.
REQUIRES: dict[MsgType, str] = {
    MsgType.PEERS: CAP_PEERS,
    MsgType.PEERS_Z: CAP_ZPEERS,
    MsgType.ENDPOINTS: CAP_DIRECT,
    MsgType.PATH_REQ: CAP_DIRECT,
    MsgType.PUNCH: CAP_DIRECT,
    MsgType.PATH_FAILED: CAP_DIRECT,
    MsgType.PATH_REPORT: CAP_DIRECT,
    MsgType.PEER_PING: CAP_DIRECT,
    MsgType.PEER_PONG: CAP_DIRECT,
    MsgType.RENEW: CAP_RENEW,
    MsgType.RENEWED: CAP_RENEW,
    MsgType.NOTICE: CAP_RENEW,
    MsgType.POLICY: CAP_POLICY,
    MsgType.STREAM_LOG: CAP_POLICY,
    MsgType.SSH_CERT_REQ: CAP_SSHCERT,
    MsgType.SSH_CERT: CAP_SSHCERT,
    MsgType.LOGIN: CAP_SSHCERT,
    MsgType.LOGIN_STATE: CAP_SSHCERT,
}


def is_ignorable(msg_type: int) -> bool:
    """Whether a receiver that does not know ``msg_type`` may skip it."""
    return msg_type >= IGNORABLE_MIN


def may_send(msg_type: MsgType, peer_caps: frozenset[str]) -> bool:
    """Whether a peer that announced ``peer_caps`` understands ``msg_type``."""
    need = REQUIRES.get(msg_type)
    return need is None or need in peer_caps


def negotiate_caps(theirs: tuple[str, ...]) -> frozenset[str]:
    """The capabilities both sides have (unknown names are ignored, not errors)."""
    return frozenset(theirs[:MAX_CAPS]) & frozenset(OUR_CAPS)


T = TypeVar("T")


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _to_json(getattr(value, f.name)) for f in fields(value)}
    return value


def encode(msg: Message) -> bytes:
    """Return the frame for ``msg``."""
    body = json.dumps(_to_json(msg), separators=(",", ":"), ensure_ascii=False).encode()
    return encode_frame(msg.TYPE, body)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        hints.pop("TYPE", None)
        _HINTS[cls] = hints
    return hints


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check one decoded JSON value against a field annotation."""
    origin = typing.get_origin(hint)
    if hint is str:
        if not isinstance(value, str):
            raise WireError(f"{where}: expected a string")
        if len(value) > MAX_STRING:
            raise WireError(f"{where}: string longer than {MAX_STRING}")
        if not value.isascii():  # JSON's "\ud800" decodes to a lone surrogate: a string that
            try:  # cannot be encoded again would break every peer it is forwarded to
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise WireError(f"{where}: not valid Unicode (a lone surrogate)") from None
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise WireError(f"{where}: expected a boolean")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise WireError(f"{where}: expected an integer")
        if not -(2**63) <= value < 2**63:
            raise WireError(f"{where}: integer out of range")
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise WireError(f"{where}: expected a number")
        return float(value)
    if origin is tuple:
        (elem, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list):
            raise WireError(f"{where}: expected a list")
        if len(value) > MAX_LIST:
            raise WireError(f"{where}: more than {MAX_LIST} elements")
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is types.UnionType or origin is typing.Union:
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner, where)
    if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
        return _from_obj(hint, value, where)
    raise TypeError(f"unsupported field type {hint!r}")  # a bug in this module, not input


def _from_obj(cls: type[T], obj: Any, where: str) -> T:
    if not isinstance(obj, dict):
        raise WireError(f"{where}: expected an object")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in obj:
            if f.default is not MISSING:  # has a default: optional on the wire
                continue
            raise WireError(f"{where}: missing field {f.name!r}")
        kwargs[f.name] = _coerce(obj[f.name], _hints(cls)[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def peers_frame(body: bytes) -> bytes:
    """The frame for a PEERS JSON ``body``: PEERS_Z when deflating makes it smaller.

    Only for a receiver that announced :data:`CAP_ZPEERS`.
    """
    if len(body) >= ZPEERS_MIN_BODY:
        import zlib  # lazily: ``homeport nc`` imports this module and never sees a map

        packed = zlib.compress(body, ZPEERS_LEVEL)
        if len(packed) < len(body):
            return encode_frame(MsgType.PEERS_Z, packed)
    return encode_frame(MsgType.PEERS, body)


def inflate_untrusted(body: bytes) -> bytes:
    """The PEERS body inside a PEERS_Z body: exactly one complete zlib stream.

    Raises:
        WireError: not zlib, truncated, bytes after the stream, or more than
            :data:`MAX_INFLATED` bytes inflated (checked while inflating: we never
            hold more than that).
    """
    import zlib  # lazily, as in peers_frame

    d = zlib.decompressobj()
    try:
        out = d.decompress(body, MAX_INFLATED)
    except zlib.error as exc:
        raise WireError(f"PEERS_Z: not a zlib stream ({exc})") from exc
    if d.unconsumed_tail:
        raise WireError(f"PEERS_Z: inflates to more than {MAX_INFLATED} bytes")
    if not d.eof:
        raise WireError("PEERS_Z: truncated zlib stream")
    if d.unused_data:
        raise WireError("PEERS_Z: bytes after the zlib stream")
    return out


def decode_untrusted(msg_type: int, body: bytes) -> Message:
    """Parse one frame's body into its message (a PEERS_Z is inflated into its PEERS).

    Raises:
        UnknownType: the type byte names no message of this version.
        WireError: the body is not a JSON object with the message's fields.
    """
    if msg_type == MsgType.PEERS_Z:
        body, msg_type = inflate_untrusted(body), MsgType.PEERS
    cls = MESSAGES.get(msg_type)
    if cls is None:
        raise UnknownType(f"unknown control message type 0x{msg_type:02x}")
    if not body:
        obj: Any = {}
    else:
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise WireError(f"{cls.__name__}: body is not UTF-8 JSON") from exc
    return _from_obj(cls, obj, cls.__name__)
