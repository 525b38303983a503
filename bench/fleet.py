"""A simulated fleet against one real server: 5,000 agents, churn, 1,000 streams.

What runs (two processes, loopback only):

* **the server**: a real ``homeport server`` process (``python -m homeport server``) with its
  own data directory, listening on 127.0.0.1;
* **the load process** (this one): many agents on one asyncio loop (uvloop). Each agent is
  the project's own node core (:class:`homeport.proto.node.NodeCore`) driven over a real
  TLS 1.3 control connection (:class:`homeport.io.control.ControlLink`, the driver the real
  agent uses) with a real node certificate, so the server sees exactly what real agents
  send: HELLO with capabilities, ANNOUNCE, a PING every 5 s, PEERS pushes read off the wire,
  OPEN, ACCEPT, and data connections that start with the preamble.

Each agent connects from its own loopback address (127.1.x.y): a real fleet comes from many
addresses, and the server's admission limits are per source.

**Enrollment (fast and honest).** Before the server starts, the bench creates every node in
the server's data directory through the same registry call the server makes on ENROLL
(:meth:`homeport.store.registry.Registry.enroll`, consuming a reusable auth key): each node
has its own Ed25519 key, a CSR, and a certificate signed by the network CA with CN = the
node id, exactly as the coordinator signs it. Only the network round trip of ENROLL is
skipped; every control connection afterwards authenticates with that certificate.

**What the load process does not do for every agent.** Decoding a 5,000-entry full map
costs ~0.2 s of Python; 5,000 agents would need ~1,000 CPU-seconds. So every agent reads,
decrypts and frames every PEERS byte (the server's work and the wire are unchanged), but
only a few *observer* agents (``--observers``) decode and apply PEERS into their
:class:`~homeport.proto.netmap.PeerView`; the observers' maps are checked against the
fleet at the end, and their PEERS bytes give the netmap delta per join. The others read
only each PEERS frame's version (head) and ``more`` flag (tail) and hold an empty map at
that version, so on reconnect they name it in HELLO (cap ``mapdelta``) as a real agent does.
``--compare-full`` churns once more before, with agents that forget their map (every
reconnect a full map, as before capver 4): the two phases side by side in one run.

**Legitimate nodes.** Two more nodes get real state directories: one runs a real
``homeport up`` process exposing an echo service, the other is used by real
``homeport nc`` processes (no local agent: nc dials the server itself). Their end-to-end
round trip (process start to echoed bytes) is measured at idle and during churn.

Run: ``python -m bench.fleet`` (5,000 agents; ~3 min) or ``--agents 200 --quick``;
``--write-docs`` writes the table into docs/reliability.md (the "Load" section).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homeport.crypto import identity
from homeport.crypto.tls import check_pin, fingerprint
from homeport.io import tlsctx
from homeport.io.control import ControlLink, open_link
from homeport.io.loop import new_event_loop
from homeport.node import state as nstate
from homeport.node.files import write_private, write_public
from homeport.policy.services import Service
from homeport.proto import coord as c
from homeport.proto import node as core
from homeport.proto.backoff import Backoff
from homeport.proto.control import AGENT_PING_INTERVAL, ConnectionClosed, ControlConnection, Role
from homeport.server.datadir import prepare_data_dir
from homeport.store.registry import database_url, open_registry
from homeport.testing.deadline import wait_for
from homeport.wire import control as m
from homeport.wire.data import encode_preamble, new_token
from homeport.wire.errors import UnknownType, WireError
from homeport.wire.frame import MAX_FRAME

ECHO = "echo"
ECHO_PORT = 7
#: Agents connecting at once during the ramp (TLS handshakes in flight).
RAMP_CONCURRENCY = 200
BEGIN = "<!-- fleet:begin -->"
END = "<!-- fleet:end -->"
NOFILE = 20_000
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_nofile(want: int = NOFILE) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def source_ip(i: int) -> str:
    """A distinct loopback source address per agent (127.1.0.1 …)."""
    return f"127.1.{i // 250}.{i % 250 + 1}"


# -- the fleet on disk ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    node_id: str
    pem: Path  # key + certificate in one file (load_cert_chain)


def create_fleet(data_dir: Path, keys_dir: Path, names: list[str]) -> tuple[list[Member], str]:
    """Enroll ``names`` through the registry of a stopped server; returns members and pin."""
    files = prepare_data_dir(data_dir)
    registry = open_registry(database_url(str(data_dir)), server_pin=files.pin)
    keys_dir.mkdir(mode=0o700, exist_ok=True)
    members = []
    try:
        key = registry.create_auth_key(now=time.time(), reusable=True, note="bench.fleet")
        for name in names:
            key_pem = identity.new_private_key_pem()
            csr = identity.make_csr(key_pem, name)
            node_id = "n" + os.urandom(6).hex()
            cert_pem = identity.sign_node_csr(files.ca, csr, node_id)
            fp = fingerprint(identity.cert_der_from_pem(cert_pem))
            now = time.time()
            node = c.NodeRecord(
                node_id=node_id,
                name=name,
                fingerprints=(fp,),
                created_at=now,
                cert_pem=cert_pem.decode(),
            )
            got = registry.enroll(c.EnrollRequest(0, key.key_id, key.secret, node, now))
            if not isinstance(got, c.NodeRecord):
                raise RuntimeError(f"enrolling {name}: {got}")
            pem = keys_dir / f"{name}.pem"
            write_private(pem, key_pem + cert_pem)
            members.append(Member(name, node_id, pem))
    finally:
        registry.close()
    return members, files.pin


def write_state(dir_: Path, server: str, pin: str, member: Member, ca_pem: bytes) -> None:
    """A real node state directory (what ``homeport up`` leaves after enrolling)."""
    pem = member.pem.read_bytes()
    cut = pem.index(b"-----BEGIN CERTIFICATE-----")
    nstate.ensure_dir(dir_)
    write_private(dir_ / nstate.KEY_FILE, pem[:cut])
    write_public(dir_ / nstate.CERT_FILE, pem[cut:])
    write_public(dir_ / nstate.CA_FILE, ca_pem)
    nstate.save(nstate.NodeState(dir_, server, pin, member.node_id, member.name))


# -- one simulated agent -------------------------------------------------------------------------


#: The head of a PEERS body as the server's PeerBook writes it (version, base, reset first).
_PEERS_HEAD = re.compile(rb'\{"version":(\d+),"base":(\d+),"reset":(?:true|false)')
#: Bytes of a PEERS body the skimmer reads for its head, and keeps of its tail (``"more":…}``).
_HEAD, _TAIL = 64, 16


class SkimDecoder:
    """Frames like :class:`homeport.wire.frame.FrameDecoder`, but PEERS bodies are only counted.

    Same length checks; a PEERS frame is skipped in place (no copy), which is most of the
    bytes a 5,000-node fleet receives. Only its head (version) and tail (``more``) are
    read, so the agent knows which map version it would hold (cap mapdelta: it names that
    version when it reconnects) without decoding 5,000 entries.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0  # bytes of a PEERS frame still to skip
        self._version = 0  # of the PEERS frame being skipped
        self._tail = b""
        self._update_bytes = 0  # PEERS bytes of the update in progress
        self.peers_bytes = 0
        #: Bytes of the first complete update on this connection (None: none yet).
        self.first_update: int | None = None
        #: Versions of completed updates not yet taken by the agent.
        self.versions: list[int] = []

    def _frame_done(self) -> None:
        if not self._tail.endswith(b'"more":true}'):
            self.versions.append(self._version)
            if self.first_update is None:
                self.first_update = self._update_bytes
            self._update_bytes = 0

    def feed_untrusted(self, data: bytes) -> list[tuple[int, bytes]]:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            self._tail = (self._tail + bytes(data[max(0, n - _TAIL) : n]))[-_TAIL:]
            data = data[n:]
            if not self._skip:
                self._frame_done()
        self._buf += data
        frames: list[tuple[int, bytes]] = []
        while len(self._buf) >= 5:
            length = int.from_bytes(self._buf[:4], "big")
            if length == 0 or length > MAX_FRAME:
                raise WireError(f"bad frame length {length}")
            if self._buf[4] == m.MsgType.PEERS:
                have = len(self._buf) - 4
                if have < min(length, 1 + _HEAD):
                    break  # wait for the head
                head = _PEERS_HEAD.match(bytes(self._buf[5 : 5 + _HEAD]))
                if head is None:
                    raise WireError("PEERS body without its version head")
                self._version = int(head.group(1))
                self.peers_bytes += 4 + length
                self._update_bytes += 4 + length
                if have < length:
                    self._skip = length - have
                    self._tail = bytes(self._buf[-_TAIL:])
                    self._buf.clear()
                    break
                self._tail = bytes(self._buf[4 + length - _TAIL : 4 + length])
                del self._buf[: 4 + length]
                self._frame_done()
                continue
            if len(self._buf) < 4 + length:
                break
            if self._buf[4] == m.MsgType.PEERS_Z:  # deflated: inflate it to read head and tail
                body = m.inflate_untrusted(bytes(self._buf[5 : 4 + length]))
                head = _PEERS_HEAD.match(body[:_HEAD])
                if head is None:
                    raise WireError("PEERS_Z body without its version head")
                self._version = int(head.group(1))
                self.peers_bytes += 4 + length
                self._update_bytes += 4 + length
                self._tail = body[-_TAIL:]
                del self._buf[: 4 + length]
                self._frame_done()
                continue
            frames.append((self._buf[4], bytes(self._buf[5 : 4 + length])))
            del self._buf[: 4 + length]
        return frames


class SkimConnection(ControlConnection):
    """The control machine, minus decoding PEERS bodies (load-generator CPU; see module doc).

    Every byte is still read, decrypted and framed; PEERS frames are counted and dropped.
    """

    #: Observers decode PEERS into their PeerView; the rest only count the bytes.
    decode_peers = False
    #: Skimming agents: called with the version of the newest complete update.
    on_versions: Callable[[int], None] | None = None

    def __init__(
        self, role: Role, now: float, *, ping_interval: float, idle_timeout: float
    ) -> None:
        super().__init__(role, now, ping_interval=ping_interval, idle_timeout=idle_timeout)
        self._peers_counted = 0
        if not self.decode_peers:
            self._decoder = SkimDecoder()  # type: ignore[assignment]

    @property
    def peers_bytes(self) -> int:
        if isinstance(self._decoder, SkimDecoder):
            return self._decoder.peers_bytes
        return self._peers_counted

    @property
    def first_update_bytes(self) -> int | None:
        """PEERS bytes of the first complete update on this connection (None: none yet)."""
        if isinstance(self._decoder, SkimDecoder):
            return self._decoder.first_update
        return None

    def take_versions(self) -> list[int]:
        """Versions of the updates completed since the last call (skimming agents only)."""
        if not isinstance(self._decoder, SkimDecoder):
            return []
        out, self._decoder.versions = self._decoder.versions, []
        return out

    def receive_data(self, data: bytes, now: float) -> None:
        if self.closed or not data:
            super().receive_data(data, now)
            return
        self._last_rx = now
        try:
            for msg_type, body in self._decoder.feed_untrusted(data):
                if msg_type in (m.MsgType.PEERS, m.MsgType.PEERS_Z):
                    self._peers_counted += len(body) + 5
                try:
                    msg = m.decode_untrusted(msg_type, body)
                except UnknownType:
                    if not m.is_ignorable(msg_type):
                        raise
                    continue
                self._on_message(msg)
                if self.closed:
                    return
        except WireError as exc:
            self._close(f"protocol:{exc.code}", f"malformed control data: {exc}")
            return
        if self.on_versions is not None and isinstance(self._decoder, SkimDecoder):
            versions = self.take_versions()
            if versions:
                self.on_versions(versions[-1])


class CountingConnection(SkimConnection):
    """The full control machine, counting PEERS bytes (observer agents)."""

    decode_peers = True


class _Data(asyncio.Protocol):
    """A data connection held open (its bytes are end-to-end TLS we never start)."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class SimAgent:
    """One agent: a NodeCore over a real control connection, in the fleet's loop."""

    def __init__(self, fleet: Fleet, idx: int, member: Member, *, observer: bool) -> None:
        self.fleet = fleet
        self.idx = idx
        self.member = member
        self.observer = observer
        self.ip = source_ip(idx)
        self.core = core.NodeCore(
            core.NodeConfig(
                name=member.name,
                server=fleet.server,
                services=(Service(ECHO, ECHO_PORT, "127.0.0.1", ECHO_PORT),),
                software="bench.fleet",
            ),
            backoff=Backoff(base=0.5, cap=5.0),
        )
        self.link: ControlLink | None = None
        self.ready = False
        self.ready_at = 0.0
        self.connects = 0
        self.lost = 0  # sessions lost that we did not end ourselves
        self.churning = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._opens: dict[bytes, tuple[float, asyncio.Future[float]]] = {}
        self.data: list[_Data] = []
        self.peers_bytes_total = 0

    # ControlHandler
    def control_message(self, link: ControlLink, msg: m.Message) -> None:
        if link is self.link:
            self.core.message_received(msg, self.fleet.loop.time())
            self._drain()

    def control_closed(self, link: ControlLink, ev: ConnectionClosed) -> None:
        if link is not self.link:
            return
        self._count_peers(link)
        self.link = None
        self.ready = False
        if not self.churning:
            self.lost += 1
            self.fleet.lost_reasons[ev.code] += 1
        self.core.session_ended(f"{ev.reason} [{ev.code}]", self.fleet.loop.time())
        self._drain()

    def _count_peers(self, link: ControlLink) -> None:
        self.peers_bytes_total += getattr(link.conn, "peers_bytes", 0)

    def peers_bytes(self) -> int:
        link = self.link
        return self.peers_bytes_total + (getattr(link.conn, "peers_bytes", 0) if link else 0)

    async def connect(self) -> float:
        """One connection until READY (WELCOME received, ANNOUNCE sent); returns seconds."""
        loop = self.fleet.loop
        t0 = loop.time()
        self._waiter = loop.create_future()
        observer = self.observer

        def make() -> ControlLink:
            ping, idle = self.fleet.ping_interval, 3 * self.fleet.ping_interval
            link = ControlLink(
                Role.CLIENT,
                self,
                ssl_context=ctx,
                address=self.fleet.server,
                answer_timeout=30.0,
                ping_interval=ping,
                idle_timeout=idle,
            )
            conn_cls = CountingConnection if observer else SkimConnection
            conn = conn_cls(Role.CLIENT, loop.time(), ping_interval=ping, idle_timeout=idle)
            if not observer:
                conn.on_versions = self._skimmed
            link.conn = conn
            return link

        if not self.fleet.mapdelta:
            self.core.peers.expect_full()  # forget the map: HELLO names none, a full map comes
        ctx = self.fleet.contexts[self.member.name]
        link = await open_link(
            make, self.fleet.host, self.fleet.port, timeout=30.0, local_addr=(self.ip, 0)
        )
        check_pin(link.peer_cert_der(), self.fleet.pin)
        self.link = link
        self.connects += 1
        self.core.session_started(loop.time())
        self._drain()
        await asyncio.wait_for(self._waiter, 30.0)
        return loop.time() - t0

    def _skimmed(self, version: int) -> None:
        """A skimming agent completed an update: hold an (empty) map at that version.

        Cap mapdelta: HELLO then names this version on reconnect, as a real agent's would;
        what the server sends and the bytes on the wire are the same, only unread.
        """
        self.core.peers.receive(m.Peers(version=version, base=0, reset=True))

    def drop(self) -> None:
        """End the control connection abruptly (a churn step: the network blinked)."""
        self.churning = True
        link = self.link
        if link is not None:
            link.abort("churn")

    # the core's commands
    def _drain(self) -> None:
        loop = self.fleet.loop
        while (cmd := self.core.next_command()) is not None:
            if isinstance(cmd, core.Send):
                if self.link is not None:
                    self.link.send(cmd.msg)
            elif isinstance(cmd, core.SessionReady):
                self.ready = True
                self.ready_at = loop.time()
                if self._waiter is not None and not self._waiter.done():
                    self._waiter.set_result(None)
            elif isinstance(cmd, core.ConnectTarget):
                self.core.target_connected(cmd.stream_id)  # the local service is always up
            elif isinstance(cmd, core.StartStream):
                loop.create_task(self._dial(cmd.token, cmd.stream_id))
            elif isinstance(cmd, core.LocalOpenAdmitted):
                loop.create_task(self._dial(cmd.token, None))
            elif isinstance(cmd, core.LocalOpenSucceeded):
                entry = self._opens.get(cmd.token)
                if entry is not None and not entry[1].done():
                    entry[1].set_result(loop.time() - entry[0])
            elif isinstance(cmd, core.LocalOpenFailed):
                entry = self._opens.get(cmd.token)
                if entry is not None and not entry[1].done():
                    entry[1].set_exception(RuntimeError(f"{cmd.code}: {cmd.message}"))
            elif isinstance(cmd, core.Reconnect):
                if not self.churning and not self.fleet.closing:
                    loop.call_later(cmd.delay, lambda: loop.create_task(self._reconnect()))
            elif isinstance(cmd, core.Fatal):
                self.fleet.lost_reasons[f"fatal: {cmd.message}"] += 1
        self._arm()

    async def _reconnect(self) -> None:
        try:
            await self.connect()
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.core.connect_failed(str(exc), self.fleet.loop.time())
            self._drain()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.core.get_timer()
        if when is not None:
            self._timer = self.fleet.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(self.fleet.loop.time())
        self._drain()

    async def _dial(self, token: bytes, stream_id: str | None) -> None:
        loop = self.fleet.loop
        try:
            _, proto = await loop.create_connection(
                _Data, self.fleet.host, self.fleet.port, local_addr=(self.ip, 0)
            )
        except OSError as exc:
            self.fleet.lost_reasons[f"data dial: {exc.strerror}"] += 1
            if stream_id is not None:
                self.core.stream_ended(stream_id)
            return
        assert proto.transport is not None
        proto.transport.write(encode_preamble(token))  # type: ignore[attr-defined]
        self.data.append(proto)
        if stream_id is not None:
            await proto.closed
            self.core.stream_ended(stream_id)

    async def open_stream(self, dst: str) -> float:
        """OPEN → OPENED at this (source) agent, through the real coordinator; seconds."""
        loop = self.fleet.loop
        token = new_token()
        fut: asyncio.Future[float] = loop.create_future()
        self._opens[token] = (loop.time(), fut)
        self.core.open_local(token, dst, ECHO, loop.time(), timeout=30.0)
        self._drain()
        try:
            return await fut
        finally:
            self._opens.pop(token, None)

    def close_data(self) -> None:
        for d in self.data:
            if d.transport is not None:
                d.transport.close()
        self.data.clear()


# -- the fleet ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    host: str
    port: int
    pin: str
    server: str
    loop: asyncio.AbstractEventLoop
    contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)
    agents: list[SimAgent] = field(default_factory=list)
    lost_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    closing: bool = False  # the run is over: nobody reconnects
    #: What real agents use (``homeport up``): a PING every this many s, dead after 3 missed.
    ping_interval: float = AGENT_PING_INTERVAL
    #: Reconnecting agents name the map they hold (cap mapdelta); False: they forget it,
    #: so every reconnect gets a full map (the behaviour before capver 4).
    mapdelta: bool = True

    def online(self) -> int:
        return sum(1 for a in self.agents if a.ready)


class ServerProc:
    """The real server process, and its RSS and CPU from /proc."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        log_path: Path,
        *,
        runner: tuple[str, ...] = ("-m", "homeport"),
        env_extra: dict[str, str] | None = None,
    ) -> None:
        """``runner``: how Python starts the CLI (bench.fleet_memory runs it under tracemalloc)."""
        self.log_path = log_path
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
        env.pop("HOMEPORT_DATA", None)
        raise_nofile()  # inherited by the server (which raises its own further if it can)
        with open(log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    *runner,
                    "server",
                    "--data",
                    str(data_dir),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--probe-port",
                    "0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def cpu(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK

    def nofile(self) -> int:
        with open(f"/proc/{self.proc.pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        return 0

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class LagMonitor:
    """The load process's own event-loop lag: when it is high, the load generator (not the
    server) is the bottleneck, and keepalive or latency figures of that phase say so."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.05)
            self.worst = max(self.worst, loop.time() - t - 0.05)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst

    def stop(self) -> None:
        self._task.cancel()


class EchoServer:
    """The legitimate destination's local service (a thread per connection)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def nc_round_trip(state_dir: Path, dst: str, timeout: float = 30.0) -> float:
    """A real ``homeport nc`` process: start → echoed line back (seconds); raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "homeport", "nc", "--state", str(state_dir), dst, ECHO],
        input=b"hello fleet\n",
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if proc.stdout != b"hello fleet\n":
        raise RuntimeError(f"nc failed ({proc.returncode}): {proc.stderr.decode()[-400:]}")
    return elapsed


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Options:
    agents: int
    streams: int
    churn_rate: float
    churn_seconds: float
    idle_seconds: float
    observers: int
    root: Path
    settle: float = 3.0  # seconds of quiet after the ramp and after the churn
    nc_runs: int = 3  # legitimate nc round trips at idle
    ping_interval: float = AGENT_PING_INTERVAL
    #: Run the churn once more before, with every reconnect getting a full map (no mapdelta).
    compare_full: bool = False


async def _ramp(fleet: Fleet, agents: list[SimAgent]) -> list[float]:
    sem = asyncio.Semaphore(RAMP_CONCURRENCY)
    times: list[float] = []

    async def one(a: SimAgent) -> None:
        async with sem:
            for attempt in range(5):
                try:
                    times.append(await a.connect())
                    return
                except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                    fleet.lost_reasons[f"connect: {type(exc).__name__}"] += 1
                    await asyncio.sleep(0.2 * (attempt + 1))

    await asyncio.gather(*(one(a) for a in agents))
    return times


@dataclass
class Churn:
    """What one churn phase did."""

    started: int = 0
    done: list[float] = field(default_factory=list)  # seconds per completed reconnect
    failed: int = 0
    links: list[ControlLink] = field(default_factory=list)  # the reconnected sessions
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)  # failures

    def first_update_bytes(self) -> list[int]:
        """PEERS bytes of each reconnected session's first map update (full or delta).

        0 for a session that got none: the map it held was current, so the server sent
        nothing (cap mapdelta; asked once the churn is over and pushes have gone out).
        """
        got = (getattr(link.conn, "first_update_bytes", None) for link in self.links)
        return [b or 0 for b in got]


async def _churn(
    fleet: Fleet, pool: list[SimAgent], rate: float, seconds: float, stop: asyncio.Event
) -> Churn:
    """``rate`` agents per second drop their connection and reconnect at once."""
    loop = fleet.loop
    out = Churn()
    done = out.done
    tasks: set[asyncio.Task[None]] = set()
    order = list(pool)
    random.Random(7).shuffle(order)
    started = 0

    async def cycle(a: SimAgent) -> None:
        a.drop()
        await asyncio.sleep(0)
        try:
            done.append(await a.connect())
            if a.link is not None:
                out.links.append(a.link)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            out.failed += 1
            out.reasons[type(exc).__name__] += 1
            a.churning = False
            # as a real agent: retry with its backoff (it would otherwise stay offline)
            a.core.connect_failed(str(exc), loop.time())
            a._drain()
        finally:
            a.churning = False

    t0 = loop.time()
    i = 0
    while loop.time() - t0 < seconds and not stop.is_set():
        due = int((loop.time() - t0) * rate) + 1
        tries = 0
        while started < due and tries < len(order):
            a = order[i % len(order)]
            i += 1
            tries += 1
            if a.churning or not a.ready:
                continue
            started += 1
            t = loop.create_task(cycle(a))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        await asyncio.sleep(0.01)
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    out.started = started
    return out


async def run_fleet(opts: Options, log: Callable[[str], None]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    fig: dict[str, Any] = {}
    root = opts.root
    n = opts.agents
    names = [f"fleet-{i:05d}" for i in range(n)] + ["legit-dst", "legit-src", "joiner"]
    t0 = time.perf_counter()
    members, pin = create_fleet(root / "server", root / "keys", names)
    fig["enroll_s"] = time.perf_counter() - t0
    log(f"enrolled {len(members)} nodes in {fig['enroll_s']:.1f} s")
    by_name = {mb.name: mb for mb in members}
    port = free_port()
    server_addr = f"127.0.0.1:{port}"
    ca_pem = (root / "server" / "ca.crt").read_bytes()
    echo = EchoServer()
    legit_dst, legit_src = root / "state-legit-dst", root / "state-legit-src"
    write_state(legit_dst, server_addr, pin, by_name["legit-dst"], ca_pem)
    write_state(legit_src, server_addr, pin, by_name["legit-src"], ca_pem)
    srv = ServerProc(root / "server", port, root / "server.log")
    procs: list[subprocess.Popen[bytes]] = []
    fleet = Fleet("127.0.0.1", port, pin, server_addr, loop, ping_interval=opts.ping_interval)
    lag = LagMonitor()
    try:
        await loop.run_in_executor(
            None,
            lambda: wait_for(
                lambda: srv.proc.poll() is None and _accepts(port),
                30,
                f"server on {server_addr}\n{srv.log_tail()}",
            ),
        )
        fig["server_nofile"] = srv.nofile()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(root / "legit-agent.log", "ab") as logf:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "homeport",
                        "up",
                        "--state",
                        str(legit_dst),
                        "--expose",
                        f"{ECHO}=127.0.0.1:{echo.port}",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        for mb in members:
            fleet.contexts[mb.name] = tlsctx.control_client_context(mb.pem, mb.pem)
        observers = set(range(0, n, max(1, n // max(1, opts.observers))))
        fleet.agents = [
            SimAgent(fleet, i, by_name[f"fleet-{i:05d}"], observer=i in observers) for i in range(n)
        ]
        # the legitimate agent is online and answering before anything is measured
        nc_idle = await loop.run_in_executor(
            None, lambda: _retry(lambda: nc_round_trip(legit_src, "legit-dst"), 30)
        )
        fig["nc_idle"] = [
            nc_idle,
            *[
                await loop.run_in_executor(None, nc_round_trip, legit_src, "legit-dst")
                for _ in range(opts.nc_runs - 1)
            ],
        ]
        rss0 = srv.rss()
        fig["rss0"] = rss0
        log(f"server RSS with no fleet: {rss0 / 2**20:.1f} MiB; nc at idle {fig['nc_idle']}")

        # -- ramp -------------------------------------------------------------------------------
        lag.take()
        cpu_a, t_a, me_a = srv.cpu(), time.perf_counter(), self_cpu()
        connect_times = await _ramp(fleet, fleet.agents)
        fig["lag_ramp"] = lag.take()
        fig["ramp_s"] = time.perf_counter() - t_a
        fig["ramp_cpu"] = srv.cpu() - cpu_a
        fig["ramp_load_cpu"] = self_cpu() - me_a
        fig["connect_p50"], fig["connect_p99"] = pct(connect_times, 0.5), pct(connect_times, 0.99)
        fig["online"] = fleet.online()
        log(
            f"{fig['online']:,}/{n:,} agents online after {fig['ramp_s']:.1f} s "
            f"(server CPU {fig['ramp_cpu']:.1f} s); lost {dict(fleet.lost_reasons)}"
        )
        # let full maps drain and the allocator settle, then idle
        await asyncio.sleep(opts.settle)
        rss_n = srv.rss()
        fig["rss_n"] = rss_n
        fig["rss_per_agent"] = (rss_n - rss0) / max(1, fig["online"])

        cpu_a, t_a, me_a = srv.cpu(), time.perf_counter(), self_cpu()
        await asyncio.sleep(opts.idle_seconds)
        wall = time.perf_counter() - t_a
        fig["lag_idle"] = lag.take()
        fig["idle_s"] = wall
        fig["idle_cpu"] = (srv.cpu() - cpu_a) / wall
        fig["idle_load_cpu"] = (self_cpu() - me_a) / wall
        fig["online_after_idle"] = fleet.online()
        log(
            f"idle {wall:.0f} s: server {100 * fig['idle_cpu']:.1f} % CPU, "
            f"load {100 * fig['idle_load_cpu']:.1f} %; online {fig['online_after_idle']:,}"
        )

        # -- netmap delta per join (measured at the observers) ---------------------------------
        obs = [a for a in fleet.agents if a.observer and a.ready]
        before = [a.peers_bytes() for a in obs]
        joiner = SimAgent(fleet, n + 10, by_name["joiner"], observer=False)
        fleet.contexts["joiner"] = tlsctx.control_client_context(
            by_name["joiner"].pem, by_name["joiner"].pem
        )
        await joiner.connect()
        await asyncio.sleep(c.NETMAP_COALESCE_MAX + 0.5)  # the push window grows with the fleet
        deltas = [a.peers_bytes() - b for a, b in zip(obs, before, strict=True)]
        fig["delta_join"] = statistics.median(deltas) if deltas else float("nan")
        fig["join_full_map"] = joiner.peers_bytes()
        log(f"join: {fig['delta_join']} B per peer; joiner's full map {joiner.peers_bytes():,} B")

        # -- churn, with 1,000 streams and the legitimate nc during it --------------------------
        k = min(opts.streams, n // 2 - len(observers))
        # streams between connected agents (one lost in the ramp may still be in its backoff)
        plain = sorted((a for a in fleet.agents if not a.observer), key=lambda a: not a.ready)
        srcs, dsts = plain[:k], plain[k : 2 * k]
        pool = plain[2 * k :]
        stop = asyncio.Event()
        if opts.compare_full:
            # the same churn first as before capver 4 (every reconnect gets a full map),
            # side by side with the mapdelta phase below on the same server and fleet
            fleet.mapdelta = False
            fig["full"] = await _churn_phase(fleet, srv, pool, opts, lag)
            fleet.mapdelta = True
            log(f"churn with full maps: {fig['full']}")
            await asyncio.sleep(opts.settle)
        maps_a = sum(a.peers_bytes() for a in fleet.agents)
        cpu_a, t_a, me_a = srv.cpu(), time.perf_counter(), self_cpu()
        churn_task = loop.create_task(
            _churn(fleet, pool, opts.churn_rate, opts.churn_seconds, stop)
        )
        await asyncio.sleep(min(3.0, opts.churn_seconds / 4))
        s_t0 = loop.time()
        results = await asyncio.gather(
            *(s.open_stream(d.member.name) for s, d in zip(srcs, dsts, strict=True)),
            return_exceptions=True,
        )
        fig["streams_wall"] = loop.time() - s_t0
        lat = [r for r in results if isinstance(r, float)]
        # grouped by reason: the node's name is cut out ("offline: fleet-01194 is offline ...")
        errs = collections.Counter(
            re.sub(r"fleet-\d+", "fleet-N", str(r))[:80]
            for r in results
            if not isinstance(r, float)
        )
        fig["streams"] = k
        fig["streams_ok"] = len(lat)
        fig["streams_errors"] = dict(errs)
        fig["setup_p50"], fig["setup_p99"] = pct(lat, 0.5), pct(lat, 0.99)
        fig["setup_max"] = max(lat) if lat else float("nan")
        log(
            f"{len(lat)}/{k} streams opened in {fig['streams_wall']:.2f} s: "
            f"p50 {1000 * fig['setup_p50']:.0f} ms p99 {1000 * fig['setup_p99']:.0f} ms "
            f"{dict(errs)}"
        )
        nc_churn: list[float] = []
        nc_fail: list[str] = []
        while not churn_task.done():
            try:
                nc_churn.append(
                    await loop.run_in_executor(None, nc_round_trip, legit_src, "legit-dst")
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                nc_fail.append(str(exc)[:200])
            await asyncio.sleep(1.0)
        churn = await churn_task
        started, reconnects, failed = churn.started, churn.done, churn.failed
        wall = time.perf_counter() - t_a
        fig["lag_churn"] = lag.take()
        fig["churn_s"] = wall
        fig["churn_cpu"] = (srv.cpu() - cpu_a) / wall
        fig["churn_load_cpu"] = (self_cpu() - me_a) / wall
        fig["churn_started"], fig["churn_failed"] = started, failed
        fig["churn_why"] = dict(churn.reasons)
        fig["churn_rate"] = len(reconnects) / opts.churn_seconds
        fig["reconnect_p50"], fig["reconnect_p99"] = pct(reconnects, 0.5), pct(reconnects, 0.99)
        first = churn.first_update_bytes()
        fig["reconnect_map_bytes"] = statistics.median(first) if first else float("nan")
        fig["churn_map_mib_s"] = (
            (sum(a.peers_bytes() for a in fleet.agents) - maps_a) / wall / 2**20
        )
        fig["nc_churn"], fig["nc_fail"] = nc_churn, nc_fail
        fig["live_streams_data"] = sum(len(a.data) for a in srcs + dsts)
        log(f"loop lag: ramp {fig['lag_ramp']:.2f} s, churn {fig['lag_churn']:.2f} s")
        log(
            f"churn {wall:.0f} s: {len(reconnects)} reconnects ({failed} failed), server "
            f"{100 * fig['churn_cpu']:.0f} % CPU, load {100 * fig['churn_load_cpu']:.0f} %; "
            f"nc {[round(x, 2) for x in nc_churn]} failures {nc_fail}"
        )
        for a in srcs + dsts:
            a.close_data()
        await asyncio.sleep(opts.settle)
        # one reconnect on a quiet fleet, with and without mapdelta: its first map update
        quiet = next((a for a in pool if a.ready), None)
        if quiet is not None:
            for mapdelta in (False, True):
                fleet.mapdelta = mapdelta
                fig[f"quiet_reconnect_{'delta' if mapdelta else 'full'}"] = await _one_reconnect(
                    quiet
                )
            fleet.mapdelta = True
        fig["online_end"] = fleet.online()
        fig["lost"] = sum(a.lost for a in fleet.agents)
        fig["lost_reasons"] = dict(fleet.lost_reasons)
        # observers' maps agree with the fleet (every agent online in their view)
        views = [a.core.peers for a in obs]
        fig["expected_online"] = fleet.online() + 1 + int(joiner.ready)  # + legit-dst
        fig["observer_maps"] = [sum(1 for p in v.peers.values() if p.online) for v in views]
        fig["rss_end"] = srv.rss()
        fig["server_alive"] = srv.proc.poll() is None
        fleet.closing = True
        for a in [*fleet.agents, joiner]:
            if a.link is not None:
                a.link.abort("bench over")
    finally:
        lag.stop()
        fleet.closing = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        srv.stop()
        echo.close()
    return fig


async def _one_reconnect(a: SimAgent) -> float:
    """Drop and reconnect one agent; PEERS bytes of its new session's first update.

    0 when none came within two push windows: the map it held was current, so the server
    had nothing to send (cap mapdelta, and the map unchanged by a quick reconnect).
    """
    a.drop()
    await asyncio.sleep(0)
    try:
        await a.connect()
    finally:
        a.churning = False
    deadline = a.fleet.loop.time() + 2 * c.NETMAP_COALESCE_MAX + 1
    while a.fleet.loop.time() < deadline:
        got = getattr(a.link.conn, "first_update_bytes", None) if a.link else None
        if got is not None:
            return float(got)
        await asyncio.sleep(0.05)
    return 0.0


async def _churn_phase(
    fleet: Fleet, srv: ServerProc, pool: list[SimAgent], opts: Options, lag: LagMonitor
) -> dict[str, Any]:
    """One churn phase alone (no streams): reconnects/s, latency, server CPU, map bytes."""
    maps_a = sum(a.peers_bytes() for a in fleet.agents)
    cpu_a, t_a = srv.cpu(), time.perf_counter()
    lag.take()
    churn = await _churn(fleet, pool, opts.churn_rate, opts.churn_seconds, asyncio.Event())
    wall = time.perf_counter() - t_a
    first = churn.first_update_bytes()
    return {
        "s": round(wall, 1),
        "cpu": round((srv.cpu() - cpu_a) / wall, 3),
        "started": churn.started,
        "failed": churn.failed,
        "why": dict(churn.reasons),
        "rate": round(len(churn.done) / opts.churn_seconds, 1),
        "p50": round(pct(churn.done, 0.5), 3),
        "p99": round(pct(churn.done, 0.99), 3),
        "map_bytes": statistics.median(first) if first else float("nan"),
        "map_mib_s": round((sum(a.peers_bytes() for a in fleet.agents) - maps_a) / wall / 2**20, 2),
        "lag": round(lag.take(), 3),
    }


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _retry(fn: Callable[[], float], seconds: float) -> float:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except (RuntimeError, subprocess.TimeoutExpired):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- report ----------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{1000 * s:,.0f} ms" if s >= 0.01 else f"{1000 * s:.1f} ms"


def rows(fig: dict[str, Any], opts: Options) -> list[tuple[str, str, str]]:
    nc_idle = fig["nc_idle"]
    nc_churn = fig["nc_churn"]
    out = [
        (
            "agents connected (real TLS, real certificates)",
            f"{fig['online']:,} / {opts.agents:,}",
            f"ramp {fig['ramp_s']:.1f} s, {RAMP_CONCURRENCY} handshakes in flight; connect "
            f"p50 {_ms(fig['connect_p50'])}, p99 {_ms(fig['connect_p99'])}; server fd limit "
            f"{fig['server_nofile']:,}",
        ),
        (
            "server RSS per idle agent",
            f"{fig['rss_per_agent'] / 1024:.1f} KiB",
            f"({fig['rss_n'] / 2**20:.0f} MiB at {fig['online']:,} - "
            f"{fig['rss0'] / 2**20:.0f} MiB at 0) / {fig['online']:,}; target <= 50 KB",
        ),
        (
            f"server CPU at idle (keepalives), {fig['idle_s']:.0f} s",
            f"{100 * fig['idle_cpu']:.1f} % of a core",
            f"a PING per agent per {opts.ping_interval:g} s "
            f"({opts.agents / opts.ping_interval:,.0f}/s); load process "
            f"{100 * fig['idle_load_cpu']:.0f} %; {fig['online_after_idle']:,} still online",
        ),
        (
            f"server CPU under churn ({opts.churn_rate:.0f} reconnects/s)",
            f"{100 * fig['churn_cpu']:.0f} % of a core",
            f"{fig['churn_s']:.0f} s; {fig['churn_rate']:.0f} reconnects/s done "
            f"({fig['churn_failed']} failed {fig['churn_why'] or ''}), reconnect p50 "
            f"{_ms(fig['reconnect_p50'])} p99 "
            f"{_ms(fig['reconnect_p99'])}; load process {100 * fig['churn_load_cpu']:.0f} %",
        ),
        (
            "one reconnect on the quiet fleet: its first map update",
            f"{fig.get('quiet_reconnect_delta', float('nan')) / 1024:,.1f} KiB",
            f"cap mapdelta (a delta from the map it holds); the same reconnect forgetting its "
            f"map: {fig.get('quiet_reconnect_full', float('nan')) / 1024:,.1f} KiB (full map)",
        ),
        (
            "  map bytes per reconnect (its first update)",
            f"{fig['reconnect_map_bytes'] / 1024:,.1f} KiB",
            f"median; cap mapdelta: a delta from the version the agent holds; all agents' "
            f"PEERS traffic during the churn {fig['churn_map_mib_s']:.1f} MiB/s",
        ),
        *_full_rows(fig, opts),
        (
            f"stream setup under churn, {fig['streams']:,} concurrent",
            f"p50 {_ms(fig['setup_p50'])}, p99 {_ms(fig['setup_p99'])}",
            f"OPEN -> OPENED at the source; {fig['streams_ok']:,} ok "
            f"{fig['streams_errors'] or ''}, all issued at once, max {_ms(fig['setup_max'])}",
        ),
        (
            f"netmap delta per join at {opts.agents:,}",
            f"{fig['delta_join']:,.0f} B per peer",
            f"x {fig['online']:,} peers = {fig['delta_join'] * fig['online'] / 2**20:.1f} MiB "
            f"sent per join; the joiner's full map {fig['join_full_map'] / 2**20:.2f} MiB",
        ),
        (
            "legitimate `homeport nc` round trip, idle",
            f"{statistics.median(nc_idle):.2f} s",
            f"process start -> echoed line (real agent, real nc; median of {len(nc_idle)})",
        ),
        (
            "  same, during churn",
            f"{statistics.median(nc_churn):.2f} s" if nc_churn else "none",
            f"median of {len(nc_churn)}, max {max(nc_churn, default=0):.2f} s; "
            f"{len(fig['nc_fail'])} failed",
        ),
        (
            "load process: worst event-loop lag",
            f"{_ms(fig['lag_churn'])} churn",
            f"ramp {_ms(fig['lag_ramp'])}, idle {_ms(fig['lag_idle'])}: above ~10 s its "
            "pings are late and sessions time out (the generator, not the server)",
        ),
        (
            "agents dropped by the server",
            f"{fig['lost']}",
            f"{fig['lost_reasons'] or 'none'}; {fig['online_end']:,} online at the end; "
            f"server alive: {fig['server_alive']}",
        ),
    ]
    return out


def _full_rows(fig: dict[str, Any], opts: Options) -> list[tuple[str, str, str]]:
    full = fig.get("full")
    if not full:
        return []
    return [
        (
            "  same churn, every reconnect a full map",
            f"{100 * full['cpu']:.0f} % of a core",
            f"the phase before, same fleet (no mapdelta: agents forget their map); "
            f"{full['rate']:.0f} reconnects/s done ({full['failed']} failed {full['why'] or ''}), "
            f"reconnect p50 "
            f"{_ms(full['p50'])} p99 {_ms(full['p99'])}; first update "
            f"{full['map_bytes'] / 1024:,.1f} KiB; PEERS traffic {full['map_mib_s']:.1f} MiB/s",
        )
    ]


def render(table_rows: list[tuple[str, str, str]], opts: Options, seconds: float) -> str:
    head = ("what", "measured", "notes")
    widths = [max(len(r[i]) for r in [head, *table_rows]) for i in range(3)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table_rows:
        lines.append("| " + " | ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) + " |")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    facts = (
        f"`python -m bench.fleet --agents {opts.agents} --streams {opts.streams} "
        f"--idle-seconds {opts.idle_seconds:g} --churn-seconds {opts.churn_seconds:g}` on {stamp}: "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs "
        f"(shared VM: the server and the load process share 2 cores); one run, "
        f"{seconds:.0f} s."
    )
    return facts + "\n\n" + "\n".join(lines) + "\n"


def write_doc(path: Path, table: str) -> None:
    block = f"{BEGIN}\n{table}{END}"
    text = path.read_text()
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        _, post = rest.split(END, 1)
        path.write_text(pre + block + post)
        return
    path.write_text(text.rstrip("\n") + "\n\n## Load\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--agents", type=int, default=5000)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--churn-rate", type=float, default=100.0)
    p.add_argument("--churn-seconds", type=float, default=30.0)
    p.add_argument("--idle-seconds", type=float, default=30.0)
    p.add_argument("--observers", type=int, default=10)
    p.add_argument("--ping-interval", type=float, default=AGENT_PING_INTERVAL)
    p.add_argument(
        "--compare-full",
        action="store_true",
        help="churn once more first with full maps on every reconnect (before capver 4)",
    )
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    p.add_argument("--write-docs", action="store_true", help="update docs/reliability.md")
    p.add_argument("--doc", type=Path, default=Path("docs/reliability.md"))
    args = p.parse_args(argv)
    got = raise_nofile()
    need = args.agents + 2 * args.streams + 200
    if got < need:
        p.error(f"RLIMIT_NOFILE is {got}; {args.agents} agents need about {need}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hp-fleet-") as tmp:
        opts = Options(
            agents=args.agents,
            streams=args.streams,
            churn_rate=args.churn_rate,
            churn_seconds=args.churn_seconds,
            idle_seconds=args.idle_seconds,
            observers=args.observers,
            root=Path(tmp),
            ping_interval=args.ping_interval,
            compare_full=args.compare_full,
        )

        def log(text: str) -> None:
            print(f"[{time.perf_counter() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            fig = runner.run(run_fleet(opts, log))
        if os.environ.get("HP_FLEET_KEEP"):
            shutil.copy(Path(tmp) / "server.log", os.environ["HP_FLEET_KEEP"])
    table = render(rows(fig, opts), opts, time.perf_counter() - started)
    sys.stdout.write(table)
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1, default=str) + "\n")
    if args.write_docs:
        write_doc(args.doc, table)
        sys.stdout.write(f"\nwrote {args.doc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
