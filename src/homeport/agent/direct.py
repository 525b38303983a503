"""The agent's direct paths: discovery, punching, the mux link per peer (a thin driver).

Theory of operation. Every *decision* about direct paths is made by the pure
cores: :class:`homeport.proto.node.NodeCore` (ENDPOINTS after WELCOME, PUNCH
→ :class:`~homeport.proto.node.StartPunch`, PATH_REPORT), its per-peer
:class:`~homeport.proto.path.PathManager` (when to ask, backoff, the reason a
peer is relayed), :func:`homeport.proto.natcheck.classify_nat` (the NAT kind)
and :func:`homeport.policy.decide.decide` (who may open what). This module only
carries them out, the same way :mod:`homeport.agent.runtime` does for relayed
streams:

* **One direct port** (:class:`~homeport.io.punch.DirectPort`): ``homeport up
  --direct-port N`` (default: ephemeral) listens on it and makes every probe
  and punch from it, so one NAT mapping serves discovery and punching.
* **Discovery** (:func:`homeport.io.netcheck.netcheck`, blocking, in the
  executor): after every WELCOME (the probe port comes from it), every
  :data:`DISCOVERY_INTERVAL` seconds, sooner to renew a router port mapping
  (half its lifetime) and after a failed punch. The result goes to the core
  (``set_probe_port_ok``, ``set_endpoints``), which sends ENDPOINTS when it changed.
  No router is asked for a mapping when the server is on loopback (one host:
  tests, demos; there is no router between the nodes, and this keeps tests from
  talking to the host's real gateway).
* **Punching**: a :class:`~homeport.proto.node.StartPunch` runs
  :func:`homeport.io.punch.punch` in a worker thread (punches are serialised:
  they share P's listener), then mutual TLS 1.3 with ALPN ``homeport-mux/1``
  and the peer's fingerprint from PUNCH pinned, then a
  :class:`~homeport.io.muxlink.MuxLink`. The outcome goes back as
  ``punch_succeeded`` / ``punch_failed``; the link's death as ``path_lost``;
  its PING round trips as ``path_rtt``.
* **Two winners.** A simultaneous open is one connection both sides see; but
  when both nodes are reachable (same LAN, public), A's dial may be accepted by
  B while B's dial is accepted by A. The TLS role comes from PUNCH (the
  requester is the client), and *the client's connection wins*: the client
  sends its ClientHello on its winner at once, and the TLS server, before it
  commits to its own winner, waits up to :data:`SETTLE_TIME` for the first of
  its winner and any connection still queued on P's listener to carry bytes,
  and runs the handshake on that one.
* **Streams over the mux.** A local open whose path choice is direct opens a
  mux stream (meta ``service``; reply: the peer's sshd host keys, sanitised and
  admitted exactly like OPENED's) and hands nc the stream's socket: 1 RTT, no
  server involved. The destination runs the same ``policy.decide`` as for
  INCOMING, with the subject from the PUNCH's server-vouched peer identity;
  shields up refuses everything.

Threads never touch the core: they hop onto the event loop with the agent's
``_on_loop``; the loop drains the core's commands after every input.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from homeport.crypto import tls as hptls
from homeport.io import tlsctx
from homeport.io.dial import DialError
from homeport.io.muxlink import MuxLink, MuxLinkError, Refusal
from homeport.io.netcheck import netcheck
from homeport.io.portmap import PortMapFailure, request_mapping
from homeport.io.punch import DirectPort, PunchFailure, PunchSuccess, ended_quietly, punch
from homeport.node.state import NodeState
from homeport.policy.decide import RULE_NOT_EXPOSED, Decision, Subject, decide, match_service
from homeport.policy.services import Service
from homeport.proto import node as core
from homeport.proto import path as hpath
from homeport.proto.natcheck import Candidate, NatVerdict, Observations, candidates, classify_nat
from homeport.proto.node import StreamRecord
from homeport.wire import control as m
from homeport.wire.errors import WireError
from homeport.wire.probe import parse_addr_untrusted

log = logging.getLogger("homeport.agent.direct")


class Agent(Protocol):
    """What this driver uses of :class:`homeport.agent.runtime.Agent` (no import cycle)."""

    core: core.NodeCore
    state: NodeState
    services: tuple[Service, ...]
    _loop: asyncio.AbstractEventLoop | None

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None: ...
    def _drain(self) -> None: ...
    def _log_decision(self, rec: StreamRecord) -> None: ...


T = TypeVar("T")

#: Seconds between discoveries while nothing else asks for one (NAT mappings and
#: interface addresses change rarely; a failed punch asks sooner).
DISCOVERY_INTERVAL = 60.0
#: Shortest gap between two discoveries (a burst of failed punches runs one).
DISCOVERY_MIN_GAP = 5.0
#: Seconds between feeding the links' measured RTTs to the core.
RTT_INTERVAL = 2.0
#: Seconds the TLS server side of a punch waits for the client's ClientHello to
#: show on which connection the client chose (see "two winners").
SETTLE_TIME = 1.0
#: Seconds to connect a mux stream's local target (as for a relayed stream).
TARGET_CONNECT_TIMEOUT = 5.0
#: Connections queued on P's listener looked at while settling (the listen backlog).
MAX_SETTLE = 16
#: Accepted mux streams remembered for a policy re-check (one per stream; the mux allows
#: 256 per link).
MAX_SERVED = 4096
#: Seconds a thread waits for the event loop to answer a question about the core.
LOOP_ANSWER_TIMEOUT = 2.0


@dataclass
class Counters:
    """Cumulative counters (``status --json``), like iroh's: all streams, direct ones, punches."""

    streams_opened: int = 0
    streams_direct: int = 0
    streams_incoming_direct: int = 0
    punch_attempts: int = 0
    punch_successes: int = 0

    def as_json(self) -> dict[str, int]:
        return {
            "streams_opened": self.streams_opened,
            "streams_direct": self.streams_direct,
            "streams_incoming_direct": self.streams_incoming_direct,
            "punch_attempts": self.punch_attempts,
            "punch_successes": self.punch_successes,
        }


@dataclass
class _Link:
    """A peer's live direct connection (event loop's bookkeeping)."""

    peer: m.PeerInfo
    link: MuxLink
    kind: str
    endpoint: str
    since: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Discovery:
    """The last discovery: what it saw, the verdict, the candidates offered."""

    obs: Observations
    verdict: NatVerdict
    cands: tuple[Candidate, ...]
    at: float  # unix time

    def as_json(self, server: str, probe_port: int) -> dict[str, Any]:
        o = self.obs
        mapping = o.mapping
        return {
            "server": server,
            "server_reachable": o.main is not None,
            "server_error": o.main_error,
            "latency_ms": round(o.rtt_ms, 2) if o.rtt_ms is not None else None,
            "probe_port": probe_port,
            "seen_main": f"{o.main[0]}:{o.main[1]}" if o.main else "",
            "seen_probe": f"{o.probe[0]}:{o.probe[1]}" if o.probe else "",
            "probe_error": o.probe_error,
            "varies_by_destination": (
                None if o.main is None or o.probe is None else o.main != o.probe
            ),
            "nat": self.verdict.kind.value,
            "nat_code": self.verdict.code,
            "nat_reason": self.verdict.reason,
            "portmap": mapping.protocol if mapping else "",
            "portmap_mapping": (
                f"{mapping.external_ip}:{mapping.external_port}" if mapping else ""
            ),
            "portmap_error": o.mapping_error,
            "direct_port": o.direct_port,
            "local_addresses": list(o.local_addrs),
            "candidates": [{"kind": c.kind, "addr": c.addr} for c in self.cands],
            "at": self.at,
        }


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DirectPaths:
    """The agent's direct-path machinery; created by the agent when ``direct`` is on."""

    def __init__(self, agent: Agent, *, port: int = 0, portmap: bool = True) -> None:
        self.agent = agent
        self.port = DirectPort(port)
        host, _ = agent.state.server_address()
        self.portmap = portmap and not _is_loopback_host(host)
        self.counters = Counters()
        self.discovery: Discovery | None = None
        self._links: dict[str, _Link] = {}  # by peer node id (event loop writes)
        self._punch_lock = threading.Lock()
        self._kick: asyncio.Event | None = None
        self._discovering = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_discovery = -1e9
        self._closed = False
        self._ctx: dict[bool, ssl.SSLContext] = {}
        self._pongs: dict[tuple[str, int], concurrent.futures.Future[None]] = {}
        self._served: list[tuple[m.PeerInfo, str, socket.socket]] = []
        self._policy_seen: tuple[int, str] = (0, "")
        self._seq = 0

    # -- lifecycle (event loop) ------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._kick = asyncio.Event()
        self._task = loop.create_task(self._discovery_loop())
        log.info("direct port %d (listening for direct paths)", self.port.port)

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        links = list(self._links.values())
        self._links.clear()
        for lk in links:
            with contextlib.suppress(Exception):
                lk.link.close("agent stopping")
        self.port.close()

    def session_ready(self) -> None:
        """A new session (WELCOME): discover again (the probe port may have changed)."""
        self._last_discovery = -1e9
        if self._kick is not None:
            self._kick.set()

    def rediscover(self) -> None:
        if self._kick is not None:
            self._kick.set()

    # -- discovery ----------------------------------------------------------------------
    async def _discovery_loop(self) -> None:
        loop = asyncio.get_running_loop()
        kick = self._kick
        assert kick is not None
        while not self._closed:
            wait = DISCOVERY_INTERVAL
            d = self.discovery
            if d is not None and d.obs.mapping is not None:
                wait = min(wait, max(DISCOVERY_MIN_GAP, d.obs.mapping.renew_after))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(kick.wait(), timeout=min(wait, RTT_INTERVAL))
            self._feed_rtts()
            since = time.monotonic() - self._last_discovery
            if not kick.is_set() and since < wait:
                continue
            if since < DISCOVERY_MIN_GAP:  # asked again too soon: run it when the gap is over
                await asyncio.sleep(DISCOVERY_MIN_GAP - since)
            kick.clear()
            if not self.agent.core.ready or not self.agent.core.direct_expected:
                continue
            await self._discover_once(loop)

    async def _discover_once(self, loop: asyncio.AbstractEventLoop) -> Discovery | None:
        # One at a time: two whoamis from P to the same server port would be one 4-tuple.
        async with self._discovering:
            return await self._discover_locked(loop)

    async def _discover_locked(self, loop: asyncio.AbstractEventLoop) -> Discovery | None:
        self._last_discovery = time.monotonic()
        host, port = self.agent.state.server_address()
        pp = self.agent.core.probe_port
        probe = (host, pp) if pp else None
        try:
            # whoami first and report at once: a router that never answers NAT-PMP/PCP
            # costs seconds, and peers can punch to the observed address meanwhile.
            obs = await loop.run_in_executor(
                None, lambda: netcheck(self.port, (host, port), probe, portmap=False)
            )
            d = self._apply(obs, loop)
            if not self.portmap:
                return d
            got = await loop.run_in_executor(None, lambda: request_mapping(self.port.port))
        except Exception:
            log.exception("discovery failed")
            return None
        if isinstance(got, PortMapFailure):
            obs = dataclasses.replace(obs, mapping_error=got.reason)
        else:
            obs = dataclasses.replace(obs, mapping=got)
        return self._apply(obs, loop)

    def _apply(self, obs: Observations, loop: asyncio.AbstractEventLoop) -> Discovery:
        verdict = classify_nat(obs)
        cands = tuple(candidates(obs, verdict))
        d = Discovery(obs, verdict, cands, time.time())
        changed = self.discovery is None or self.discovery.cands != cands
        self.discovery = d
        now = loop.time()
        core_ = self.agent.core
        core_.set_probe_port_ok(obs.probe is not None, now)
        try:
            endpoints = m.Endpoints(
                candidates=tuple(m.Candidate(c.kind, c.addr) for c in cands),
                nat=verdict.kind.value,
                nat_reason=verdict.reason,
                portmap=obs.mapping.protocol if obs.mapping else "",
                direct_port=self.port.port,
            )
        except WireError as exc:  # cannot happen: candidates are literal addresses
            log.warning("discovery produced bad candidates: %s", exc)
            return d
        core_.set_endpoints(endpoints, now)
        self.agent._drain()
        if changed:
            log.info(
                "discovery: %s; candidates %s",
                verdict.reason,
                ", ".join(f"{c.kind} {c.addr}" for c in cands) or "none",
            )
        return d

    async def netcheck_now(self) -> dict[str, Any]:
        """A fresh discovery for ``homeport netcheck`` (event loop)."""
        loop = asyncio.get_running_loop()
        d = await self._discover_once(loop)
        state = self.agent.state
        if d is None:
            return {"ok": False, "code": "failed", "message": "discovery failed (see agent log)"}
        return {"ok": True, **d.as_json(state.server, self.agent.core.probe_port)}

    def _feed_rtts(self) -> None:
        for peer_id, lk in list(self._links.items()):
            rtt = lk.link.rtt
            if rtt is not None:
                self.agent.core.path_rtt(peer_id, rtt * 1000.0)

    # -- punching -------------------------------------------------------------------------
    def _context(self, client: bool) -> ssl.SSLContext:
        ctx = self._ctx.get(client)
        if ctx is None:
            st = self.agent.state
            ctx = tlsctx.stream_context(
                server_side=not client, cert=st.cert_path, key=st.key_path, ca_cert=st.ca_path
            )
            ctx.set_alpn_protocols([hptls.ALPN_MUX])
            self._ctx[client] = ctx
        return ctx

    def renewed(self) -> None:
        """The node certificate changed: build the TLS contexts again on next use."""
        self._ctx.clear()

    def start_punch(self, cmd: core.StartPunch) -> None:
        """Carry out the core's StartPunch in a worker thread (event loop)."""
        loop = asyncio.get_running_loop()
        budget = max(0.5, cmd.deadline - loop.time())
        client = cmd.punch.tls_role == "client"
        # Build both contexts here: the thread must not race the loop for the dict.
        ctx = self._context(client)
        self.counters.punch_attempts += 1
        t = threading.Thread(
            target=self._punch_worker,
            args=(cmd.punch, budget, ctx),
            name=f"punch-{cmd.punch.peer.name}",
            daemon=True,
        )
        try:
            t.start()
        except RuntimeError:
            self.agent.core.punch_failed(
                cmd.punch.peer.node_id, cmd.punch.punch_id, "punch-failed", "no thread", loop.time()
            )

    def _punch_worker(self, p: m.Punch, budget: float, ctx: ssl.SSLContext) -> None:
        end = time.monotonic() + budget
        peer = p.peer
        client = p.tls_role == "client"
        cands: list[Candidate] = []
        for c in p.candidates:
            try:
                host, port = parse_addr_untrusted(c.addr)
            except WireError:
                continue
            cands.append(Candidate(c.kind, host, port))
        local = [c for c in cands if c.kind == "local"]
        if not self._punch_lock.acquire(timeout=budget):
            self._punch_done(peer, p.punch_id, "punch-timeout", "punch timed out (busy)", None)
            return
        try:
            res = punch(self.port, cands, max(0.1, end - time.monotonic()), peer_local=local)
            if isinstance(res, PunchFailure):
                self._punch_done(peer, p.punch_id, res.code, res.reason, None)
                return
            sock = self._settle(res) if not client else res.sock
        finally:
            self._punch_lock.release()
        try:
            link = MuxLink.over_socket(
                sock,
                ctx,
                client=client,
                expected_pin=peer.fingerprint,
                on_incoming=lambda sid, meta: self._incoming(peer, sid, meta),
                on_dead=lambda reason: self._dead(peer.node_id, reason),
                name=peer.name or peer.node_id,
                timeout=max(0.5, end - time.monotonic() + 1.0),
            )
        except DialError as exc:
            self._punch_done(peer, p.punch_id, "punch-failed", exc.message, None)
            return
        except OSError as exc:
            self._punch_done(peer, p.punch_id, "punch-failed", f"direct connection: {exc}", None)
            return
        self._punch_done(peer, p.punch_id, "", "", (link, res))

    def _settle(self, win: PunchSuccess) -> socket.socket:
        """TLS server side: the connection on which the client's ClientHello arrives wins."""
        sel = selectors.DefaultSelector()
        extra: list[socket.socket] = []
        chosen = win.sock
        try:
            sel.register(win.sock, selectors.EVENT_READ)
            self.port.listener.setblocking(False)
            sel.register(self.port.listener, selectors.EVENT_READ)
            end = time.monotonic() + SETTLE_TIME
            while (left := end - time.monotonic()) > 0:
                ready = [k.fileobj for k, _ in sel.select(left)]
                if win.sock in ready:
                    break
                if self.port.listener in ready:
                    with contextlib.suppress(BlockingIOError, InterruptedError):
                        conn, _ = self.port.listener.accept()
                        if ended_quietly(conn):
                            continue
                        if len(extra) >= MAX_SETTLE:
                            conn.close()
                            continue
                        conn.setblocking(True)
                        extra.append(conn)
                        sel.register(conn, selectors.EVENT_READ)
                    continue
                other = next((s for s in ready if isinstance(s, socket.socket)), None)
                if other is not None and other is not self.port.listener:
                    chosen = other
                    break
        finally:
            sel.close()
            self.port.listener.setblocking(True)
        for s in extra:
            if s is not chosen:
                s.close()
        if chosen is not win.sock:
            log.info("punch: the TLS client chose another connection; using it")
            win.sock.close()
        return chosen

    def _punch_done(
        self,
        peer: m.PeerInfo,
        punch_id: int,
        code: str,
        reason: str,
        won: tuple[MuxLink, PunchSuccess] | None,
    ) -> None:
        self.agent._on_loop(self._punch_result, peer, punch_id, code, reason, won)

    def _punch_result(
        self,
        peer: m.PeerInfo,
        punch_id: int,
        code: str,
        reason: str,
        won: tuple[MuxLink, PunchSuccess] | None,
    ) -> None:
        now = asyncio.get_running_loop().time()
        core_ = self.agent.core
        if won is None:
            log.info("direct path to %s: %s", peer.name, reason)
            core_.punch_failed(peer.node_id, punch_id, code, reason, now)
            self.agent._drain()
            if code == "punch-timeout":
                self.rediscover()
            return
        link, res = won
        if self._closed:
            threading.Thread(target=link.close, daemon=True).start()
            return
        old = self._links.pop(peer.node_id, None)
        if old is not None:
            threading.Thread(target=old.link.close, args=("replaced",), daemon=True).start()
        self._links[peer.node_id] = _Link(peer, link, res.kind, res.endpoint)
        self.counters.punch_successes += 1
        log.info(
            "direct path to %s up: %s %s (%s, %.0f ms)",
            peer.name,
            res.kind,
            res.endpoint,
            res.via,
            res.elapsed * 1000,
        )
        core_.punch_succeeded(peer.node_id, hpath.PathKind(res.kind), res.endpoint, now)
        self.agent._drain()

    def _dead(self, peer_id: str, reason: str) -> None:
        self.agent._on_loop(self._link_dead, peer_id, reason)

    def _link_dead(self, peer_id: str, reason: str) -> None:
        lk = self._links.get(peer_id)
        if lk is None or lk.link.alive:
            return  # a replaced link, or the new one is fine
        del self._links[peer_id]
        log.warning("direct path to %s lost: %s", lk.peer.name, reason)
        self.agent.core.path_lost(peer_id, reason, asyncio.get_running_loop().time())
        self.agent._drain()

    def drop_link(self, peer_name: str) -> bool:
        """Close the direct link to ``peer_name`` (test hook / ``homeport`` debugging)."""
        for lk in list(self._links.values()):
            if lk.peer.name == peer_name:
                threading.Thread(target=lk.link.close, args=("dropped",), daemon=True).start()
                return True
        return False

    # -- incoming mux streams (worker thread per request) ---------------------------------
    def _incoming(self, peer: m.PeerInfo, sid: int, meta: dict[str, Any]) -> Any:
        """A mux OPEN from ``peer`` (its link's worker thread): decide, connect, answer."""
        service = meta.get("service")
        if not isinstance(service, str) or not service or len(service) > 64:
            return Refusal("protocol", "OPEN without a service")
        try:
            answer = self._ask_loop(lambda: self._decide(peer, sid, service))
        except (RuntimeError, concurrent.futures.TimeoutError):
            return Refusal("busy", f"{self.agent.state.name} did not decide in time")
        if isinstance(answer, Refusal):
            return answer
        svc, host_keys = answer
        try:
            target = socket.create_connection(
                (svc.target_host, svc.target_port), TARGET_CONNECT_TIMEOUT
            )
        except OSError as exc:
            return Refusal(
                "service-down", f"cannot connect to {svc.target_host}:{svc.target_port}: {exc}"
            )
        target.settimeout(None)
        self.agent._on_loop(self._serving, peer, service, target)
        return target, {"host_keys": list(host_keys), "port": svc.port, "name": peer.name}

    def _serving(self, peer: m.PeerInfo, service: str, target: socket.socket) -> None:
        """Event loop: remember an accepted mux stream, so a new policy can cut it."""
        self._served = [x for x in self._served if x[2].fileno() >= 0]  # the link closed them
        if len(self._served) < MAX_SERVED:
            self._served.append((peer, service, target))

    def after_input(self) -> None:
        """Event loop, after each core input: a new policy cuts the direct streams it denies
        (as the server cuts relayed ones), by shutting their local target down."""
        core_ = self.agent.core
        seen = (core_.policy_version, core_.policy_problem)
        if seen == self._policy_seen:
            return
        self._policy_seen = seen
        keep: list[tuple[m.PeerInfo, str, socket.socket]] = []
        for peer, service, target in self._served:
            if target.fileno() < 0:
                continue
            verdict = self._verdict(peer, service)
            if isinstance(verdict, Refusal):
                log.info("direct stream from %s for %r cut: %s", peer.name, service, verdict.reason)
                with contextlib.suppress(OSError):
                    target.shutdown(socket.SHUT_RDWR)
                continue
            keep.append((peer, service, target))
        self._served = keep

    def _verdict(self, peer: m.PeerInfo, service: str) -> Refusal | Decision[Service]:
        core_ = self.agent.core
        if core_.config.shields_up:
            reason = f"{core_.name} has shields up: it accepts no incoming streams"
            return Refusal(core.SHIELDS_UP, reason)
        if core_.policy_problem:
            reason = f"this node cannot read the server's policy ({core_.policy_problem})"
            return Refusal("policy", reason)
        src = Subject(peer.node_id, peer.name, peer.user, peer.tags)
        me = Subject(core_.node_id, core_.name, core_.user, core_.tags)
        decision = decide(src, me, core_.config.services, service, core_.policy)
        if not decision.allowed or decision.service is None:
            return Refusal(decision.code, decision.reason)
        return decision

    def _decide(
        self, peer: m.PeerInfo, sid: int, service: str
    ) -> Refusal | tuple[Service, tuple[str, ...]]:
        """Event loop: the destination's decision on a mux OPEN, with the same checks, in the
        same order, as the core's on INCOMING (shields up, an unreadable policy, then
        ``policy.decide`` with the policy in force); one :class:`StreamRecord` either way."""
        core_ = self.agent.core
        who = f"{peer.name} ({peer.node_id})"
        sid_text = f"direct-{sid}"
        if core_.config.shields_up:
            core_.shields_refused += 1
            reason = f"{core_.name} has shields up: it accepts no incoming streams"
            self._record(
                peer,
                StreamRecord(
                    sid_text, who, service, False, core.SHIELDS_UP, reason, core.SHIELDS_UP
                ),
            )
            return Refusal(core.SHIELDS_UP, reason)
        if core_.policy_problem:
            reason = f"this node cannot read the server's policy ({core_.policy_problem})"
            rule = core.RULE_POLICY_UNREADABLE
            self._record(peer, StreamRecord(sid_text, who, service, False, "policy", reason, rule))
            return Refusal("policy", reason)
        src = Subject(peer.node_id, peer.name, peer.user, peer.tags)
        me = Subject(core_.node_id, core_.name, core_.user, core_.tags)
        decision = decide(src, me, core_.config.services, service, core_.policy)
        # the same record (log line, audit callback) as a relayed INCOMING's
        self._record(
            peer,
            StreamRecord(
                sid_text,
                who,
                service,
                decision.allowed,
                "ok" if decision.allowed else decision.code,
                decision.reason,
                decision.rule or RULE_NOT_EXPOSED,
            ),
            decision.service.name if decision.service is not None else "",
        )
        if not decision.allowed or decision.service is None:
            return Refusal(decision.code, decision.reason)
        self.counters.streams_incoming_direct += 1
        return decision.service, core_.host_keys

    def _record(self, peer: m.PeerInfo, rec: StreamRecord, resolved: str = "") -> None:
        """Event loop: log a direct-stream decision, and report it to the server's audit log
        (STREAM_LOG; rate-limited by the core): such a stream never passes the server.
        ``resolved``: the service's name when the OPEN named it by port (as a relayed
        stream's audit record names it)."""
        self.agent._log_decision(rec)
        core_ = self.agent.core
        now = asyncio.get_running_loop().time()
        core_.direct_decided(
            peer.node_id, resolved or rec.service, rec.accepted, rec.code, rec.rule, rec.reason,
            rec.stream_id, now,
        )  # fmt: skip
        self.agent._drain()

    # -- local opens (called from a local API thread) ---------------------------------------
    def _ask_loop(self, fn: Callable[[], T]) -> T:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        loop = self.agent._loop
        if loop is None or loop.is_closed():
            raise RuntimeError("no event loop")
        loop.call_soon_threadsafe(run)
        return fut.result(LOOP_ANSWER_TIMEOUT)

    def route(self, dst: str, service: str) -> tuple[m.Peer, _Link] | m.Peer | None:
        """Event loop: the direct link a new stream to ``dst`` takes, or the peer (relay).

        A service the peer did not announce goes to the relay: the server refuses it
        there with the usual answer and keeps it in its audit log.
        """
        core_ = self.agent.core
        peer = core_.peers.get_by_name(dst)
        self.counters.streams_opened += 1
        if peer is None or match_service(peer.services, service) is None:
            return None
        now = asyncio.get_running_loop().time()
        choice = core_.path_choice(peer.node_id, now)
        lk = self._links.get(peer.node_id)
        if choice.direct and lk is not None and lk.link.alive:
            core_.stream_wanted(peer.node_id, now, direct=True)
            self.counters.streams_direct += 1
            self.agent._drain()
            return peer, lk
        core_.stream_wanted(peer.node_id, now)
        self.agent._drain()
        return peer

    def open_direct(
        self, dst: str, service: str, timeout: float
    ) -> tuple[socket.socket, dict[str, Any], m.Peer] | None:
        """From a local API thread: open ``service`` on ``dst`` over the mux, or None (relay).

        Raises:
            MuxLinkError: the peer refused (its policy: not a reason to use the relay).
        """
        try:
            routed = self._ask_loop(lambda: self.route(dst, service))
        except (RuntimeError, concurrent.futures.TimeoutError):
            return None
        if not isinstance(routed, tuple):
            return None
        peer, lk = routed
        try:
            sock, reply = lk.link.open_stream({"service": service}, timeout=timeout)
        except MuxLinkError as exc:
            if exc.code in ("path-lost", "timeout", "busy", "going-away"):
                log.info("direct open to %s failed (%s); using the relay", dst, exc.message)
                return None
            raise
        return sock, reply, peer

    # -- ping / status ------------------------------------------------------------------------
    def ping(self, dst: str, timeout: float) -> dict[str, Any]:
        """One probe to ``dst`` (local API thread): over the mux if up, else PEER_PING."""
        try:
            routed = self._ask_loop(lambda: self._ping_route(dst))
        except (RuntimeError, concurrent.futures.TimeoutError):
            return {"ok": False, "code": "busy", "message": "the agent did not answer"}
        if isinstance(routed, dict):
            return routed
        if isinstance(routed, _Link):
            lk = routed
            try:
                rtt = lk.link.ping(timeout)
            except MuxLinkError as exc:
                return {"ok": False, "code": exc.code, "message": exc.message}
            return {"ok": True, "via": lk.kind, "endpoint": lk.endpoint, "ms": rtt * 1000}
        fut, t0 = routed
        try:
            fut.result(timeout)
        except concurrent.futures.TimeoutError:
            return {"ok": False, "code": "timeout", "message": f"no pong in {timeout:g} s"}
        ms = (time.monotonic() - t0) * 1000
        return {"ok": True, "via": "relay", "endpoint": self.agent.state.server, "ms": ms}

    def _ping_route(
        self, dst: str
    ) -> dict[str, Any] | _Link | tuple[concurrent.futures.Future[None], float]:
        core_ = self.agent.core
        peer = core_.peers.get_by_name(dst)
        if peer is None:
            return {"ok": False, "code": "unknown", "message": f"no node named {dst!r}"}
        if not peer.online:
            return {"ok": False, "code": "offline", "message": f"{dst} is offline"}
        lk = self._links.get(peer.node_id)
        if lk is not None and lk.link.alive:
            return lk
        now = asyncio.get_running_loop().time()
        self._seq += 1
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        key = (peer.node_id, self._seq)
        if len(self._pongs) > 256:
            self._pongs.clear()
        self._pongs[key] = fut
        if not core_.peer_ping(peer.node_id, self._seq):
            self._pongs.pop(key, None)
            return {"ok": False, "code": "not-connected", "message": "not connected to the server"}
        # like a stream: the relay works now; ask for a direct path behind it
        core_.stream_wanted(peer.node_id, now)
        self.agent._drain()
        return fut, time.monotonic()

    def pong(self, cmd: core.PeerPongReceived) -> None:
        fut = self._pongs.pop((cmd.peer, cmd.seq), None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def status(self) -> dict[str, Any]:
        """Per-peer path detail and counters (event loop)."""
        core_ = self.agent.core
        now = asyncio.get_running_loop().time()
        peers: list[dict[str, Any]] = []
        for peer in core_.peers.peers.values():
            choice = core_.path_choice(peer.node_id, now)
            lk = self._links.get(peer.node_id)
            pm = core_.paths.get(peer.node_id)
            rtt = lk.link.rtt if lk is not None else None
            peers.append(
                {
                    "node_id": peer.node_id,
                    "name": peer.name,
                    "online": peer.online,
                    "kind": choice.kind.value,
                    "code": choice.code,
                    "reason": choice.reason,
                    "endpoint": choice.endpoint,
                    "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
                    "punch_attempts": pm.punch_attempts if pm else 0,
                    "punch_successes": pm.punch_successes if pm else 0,
                    "streams_direct": pm.streams_direct if pm else 0,
                    "streams_relay": pm.streams_relay if pm else 0,
                }
            )
        d = self.discovery
        return {
            "ok": True,
            "direct_port": self.port.port,
            "nat": d.verdict.kind.value if d else "unknown",
            "nat_reason": d.verdict.reason if d else "discovery has not run yet",
            "candidates": [{"kind": c.kind, "addr": c.addr} for c in d.cands] if d else [],
            "peers": peers,
            "counters": self.counters.as_json(),
        }


def relay_only_status(agent: Agent, reason: str) -> dict[str, Any]:
    """``status`` detail of an agent without direct paths (``--relay-only``, or no port)."""
    core_ = agent.core
    loop_now = asyncio.get_running_loop().time()
    peers = []
    for peer in core_.peers.peers.values():
        choice = core_.path_choice(peer.node_id, loop_now)
        peers.append(
            {
                "node_id": peer.node_id,
                "name": peer.name,
                "kind": choice.kind.value,
                "code": choice.code,
                "reason": choice.reason,
                "endpoint": choice.endpoint,
                "rtt_ms": None,
            }
        )
    return {
        "ok": True,
        "direct_port": 0,
        "nat": "unknown",
        "nat_reason": reason,
        "candidates": [],
        "peers": peers,
        "counters": Counters().as_json(),
    }
