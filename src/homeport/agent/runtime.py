"""The agent (``homeport up``): a thin I/O driver of the pure node core.

Theory of operation. Every protocol decision of the agent lives in
:class:`homeport.proto.node.NodeCore` (HELLO/WELCOME/ANNOUNCE, the INCOMING
decision and the stream limit, routing OPENED/OPEN_FAILED to local opens, fatal
errors, the reconnect schedule). This module only feeds it events and carries
out its commands:

* **Control connection**: :func:`homeport.io.control.connect_control` (the one
  asyncio driver shared with the server: framing, 1.5 s pings, dead after 4.5 s of
  silence, WELCOME deadline), then the server pin is checked here, then the
  core is told the session started. The core answers a lost session or a failed
  connect with a :class:`~homeport.proto.node.Reconnect` delay (jittered
  backoff, forever) and ``ERROR(node-removed)`` with a
  :class:`~homeport.proto.node.Fatal` (exit code 3: an admin removed this node,
  its certificate will never be accepted again).
* **Incoming streams**: the core decides; on ``ConnectTarget`` this driver
  connects the local target (asyncio, bounded by :data:`TARGET_CONNECT_TIMEOUT`)
  and reports back; on ``StartStream`` the stream's data connection, end-to-end
  TLS handshake and pump run in their own thread (the pump is a blocking,
  single-threaded ``poll`` loop: :mod:`homeport.io.pump`), so the event loop
  never blocks on a stream.
* **Warm opens for local clients.** ``homeport nc`` on this machine asks the
  agent over ``<state>/agent.sock`` (:mod:`homeport.io.localapi`) instead of
  building its own control session. Each request's thread picks a random token,
  asks the core (on the loop) to admit it, dials the data connection with the
  ClientHello behind the preamble while OPEN is under way, waits for the core to
  route the answer back, finishes the handshake, writes known_hosts and hands nc
  a connected unix socket; the pump runs here, like an incoming stream's (same
  limit, same cancel).

Threads never touch the core: they hop onto the event loop with
``call_soon_threadsafe``, and the loop drains the core's commands after every
input (:meth:`Agent._drain`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from homeport.agent import exit as agent_exit
from homeport.agent.direct import DirectPaths, relay_only_status
from homeport.crypto import tls as hptls
from homeport.errors import CodedError
from homeport.io import localapi, tlsctx, tlsstream
from homeport.io.control import ControlLink, connect_control
from homeport.io.dial import SOFTWARE, DialError, dial_data, e2e_handshake, renewed_pin
from homeport.io.localapi import LocalApiServer, OpenRequest, QueryRequest, error_reply, send_reply
from homeport.io.loop import new_event_loop
from homeport.io.muxlink import MuxLinkError
from homeport.io.pump import PumpEnd, pump, tune_socket
from homeport.node import files, hostkeys
from homeport.node import settings as exit_settings
from homeport.node.state import NodeState
from homeport.policy.services import SSH_NAME, Service
from homeport.proto import node as core
from homeport.proto.backoff import Backoff
from homeport.proto.control import AGENT_IDLE_TIMEOUT, AGENT_PING_INTERVAL, ConnectionClosed
from homeport.proto.node import LOCAL_FALLBACK_CODES, ExitCode, NodeConfig, NodeCore, StreamRecord
from homeport.wire import control as m
from homeport.wire.data import new_token
from homeport.wire.hostkey import sanitize_host_keys

log = logging.getLogger("homeport.agent")

__all__ = ["Agent", "ExitCode", "StreamRecord", "run_agent", "run_in_loop"]

#: Seconds to open the control connection (TCP + TLS) before backing off.  Short, because
#: an attempt made while the network is down only gets through at its next SYN retransmit
#: (1 s, 3 s, 7 s ...): 4 s plus a reconnect delay of at most RECONNECT_CAP keeps recovery
#: after an outage within 5 s (docs/reliability.md).
CONNECT_TIMEOUT = 4.0
#: Seconds to wait for WELCOME after HELLO.
WELCOME_TIMEOUT = 10.0
#: Seconds to connect a stream's local target (sshd) before REJECT(service-down).
TARGET_CONNECT_TIMEOUT = 5.0
#: Seconds for a stream's data connection plus end-to-end TLS handshake.
STREAM_SETUP_TIMEOUT = 10.0
#: Seconds ``stop()`` waits for stream threads to finish after cancelling them.
STOP_GRACE = 2.0
#: SIGTERM: how long open streams may go on after the agent stopped taking new ones.
DRAIN_GRACE = 10.0
#: How often a draining agent looks whether its streams have ended.
DRAIN_POLL = 0.05
#: Seconds a local open waits for the event loop to admit it (it only does
#: bookkeeping and one write, so this is only reached if the loop is wedged).
LOCAL_ADMIT_TIMEOUT = 2.0
#: Recent control links aborted on exit: an ended link may still be finishing its
#: TLS close (up to the driver's SSL shutdown timeout), and none may outlive the loop.
MAX_RECENT_LINKS = 16


@dataclass(frozen=True, slots=True)
class StreamPumped:
    """Observer event (:attr:`Agent.observe`): a relayed stream's pump ended.

    ``incoming``: served for a peer (else a local open of ours); ``sent`` went to
    the peer, ``received`` came from it.
    """

    incoming: bool
    sent: int
    received: int


class _LocalRefused(CodedError):
    """A local open the agent cannot serve now; the client should dial by itself."""


class _ServerRefused(Exception):
    """We refused the server after TLS (pin mismatch, wrong ALPN): retry later."""


class _AnswerFailed(DialError):
    """The core failed an admitted local open; ``fallback`` says whether nc should dial."""

    def __init__(self, code: str, message: str, fallback: bool) -> None:
        super().__init__(code, message)
        self.fallback = fallback


@dataclass(frozen=True, slots=True)
class _LocalWait:
    """A local open's thread waiting for the core: admission, then the server's answer."""

    worker: threading.Thread
    admitted: concurrent.futures.Future[None]
    answer: concurrent.futures.Future[m.Opened]


#: What ends one connection attempt: the core's next step, or None when stopping.
_Action = core.Reconnect | core.Fatal | None


#: Seconds between re-reads of the exposed sshd's host keys (rotation, an sshd that
#: started after the agent); a failed connection to the ssh target re-reads at once.
HOSTKEY_REFRESH = 60.0
#: Seconds ``homeport set`` waits for the running agent to apply a change.
RELOAD_TIMEOUT = 15.0


class Agent:
    """The agent's I/O across reconnects; run with :meth:`run`, stop with :meth:`stop`."""

    def __init__(
        self,
        state: NodeState,
        services: tuple[Service, ...],
        *,
        ping_interval: float = AGENT_PING_INTERVAL,
        idle_timeout: float = AGENT_IDLE_TIMEOUT,
        host_keys: tuple[str, ...] | None = None,
        backoff: Backoff | None = None,
        on_decision: Callable[[StreamRecord], None] | None = None,
        local_api: bool = True,
        shields_up: bool = False,
        hostkey_refresh: float = HOSTKEY_REFRESH,
        direct_port: int = 0,
        relay_only: bool = False,
        portmap: bool = True,
    ) -> None:
        self.hostkey_refresh = hostkey_refresh
        self._hostkey_wake: asyncio.Event | None = None
        self.state = state
        self.services = services
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self._fixed_host_keys = host_keys
        self.on_decision = on_decision
        self.core = NodeCore(
            NodeConfig(
                name=state.name,
                server=state.server,
                services=services,
                software=SOFTWARE,
                shields_up=shields_up,
                relay_only=relay_only,
                exit_nets=exit_settings.load_exit(state.dir),
            ),
            backoff=backoff,
        )
        self._direct_port = direct_port
        self._portmap = portmap
        self._direct: DirectPaths | None = None  # direct paths (None: --relay-only or no port)
        self.connected = threading.Event()  # set while a session is READY (tests poll it)
        self._threads: set[threading.Thread] = set()
        self._cancel_r, self._cancel_w = os.pipe()  # readable = all pumps stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._link: ControlLink | None = None
        self._recent: collections.deque[ControlLink] = collections.deque(maxlen=MAX_RECENT_LINKS)
        self._action: asyncio.Future[_Action] | None = None
        # uvloop's call_at returns a plain Handle (no .when()) for a time already past,
        # so the deadline the timer was armed for is kept beside it
        self._timer: asyncio.Handle | None = None
        self._timer_when: float | None = None
        self._targets: dict[str, socket.socket] = {}  # connected targets awaiting StartStream
        self._stream_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None  # e2e client side of local opens
        self._local_api = local_api
        self._api: LocalApiServer | None = None
        self._local: dict[bytes, _LocalWait] = {}  # by token (event loop only)
        self.drain_grace = 0.0  # set by stop(drain=True)
        #: Sees every core command before it runs, and :class:`StreamPumped` events from
        #: stream threads (the metrics adapter, :mod:`homeport.agent.metrics`); must not block.
        self.observe: Callable[[object], None] | None = None

    @property
    def backoff(self) -> Backoff:
        return self.core.backoff

    @property
    def active_streams(self) -> int:
        return self.core.active

    # -- lifecycle ------------------------------------------------------------
    def stop(self, *, drain: bool = False) -> None:
        """Ask the agent to exit (thread-safe; also from a signal handler). ``drain``
        (SIGTERM): open streams get :data:`DRAIN_GRACE` seconds before they are cut."""
        if drain and not self._stopping:
            self.drain_grace = DRAIN_GRACE
        self._stopping = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed between the check and the call
                loop.call_soon_threadsafe(self._on_stop)

    def _on_stop(self) -> None:
        # cancel() alone can be lost in 3.11's wait_for; resolving the action cannot.
        if self._action is not None and not self._action.done():
            self._action.set_result(None)
        if self._main is not None:
            self._main.cancel()

    async def run(self) -> int:
        """Connect, serve, reconnect; return an :class:`ExitCode`."""
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        exposed = ", ".join(f"{s.name}={s.target_host}:{s.target_port}" for s in self.services)
        log.info(
            "agent %s starting; server %s; exposing %s",
            self.state.name,
            self.state.server,
            exposed or "nothing",
        )
        self._start_local_api()
        self._hostkey_wake = asyncio.Event()
        refresher = asyncio.get_running_loop().create_task(self._refresh_host_keys_forever())
        self._start_direct()
        try:
            while not self._stopping:
                action = await self._attempt()
                if isinstance(action, core.Fatal):
                    log.error("%s", action.message)
                    return action.exit_code
                if action is None or self._stopping:
                    break
                log.info("reconnecting in %.1fs", action.delay)
                await asyncio.sleep(action.delay)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            refresher.cancel()
            self.connected.clear()
            self.core.stop()
            self._drain()
            self._link = None
            for link in self._recent:
                # abort(), not close(): no TLS close handshake to wait for on a
                # link we are abandoning (and none may outlive the loop).
                if not link.ended:
                    link.abort("agent stopping")
                elif link.transport is not None:
                    link.transport.abort()  # ended, maybe still in its TLS close
            if self._timer is not None:
                self._timer.cancel()
            if self._api is not None:
                self._api.close()
            if self._direct is not None:
                self._direct.close()
            await asyncio.sleep(0)  # let the aborted transport report connection_lost
            await self._shutdown_streams()
        log.info("agent stopped")
        return int(ExitCode.STOPPED)

    async def _shutdown_streams(self) -> None:
        if self.drain_grace > 0 and self._threads:  # SIGTERM: open streams may finish
            log.info("draining %d stream(s) for up to %gs", len(self._threads), self.drain_grace)
            deadline = time.monotonic() + self.drain_grace
            with contextlib.suppress(asyncio.CancelledError):  # a second signal: cut now
                while self._threads and time.monotonic() < deadline:
                    await asyncio.sleep(DRAIN_POLL)
        os.write(self._cancel_w, b"x")
        for sock in self._targets.values():
            sock.close()
        self._targets.clear()
        deadline = time.monotonic() + STOP_GRACE
        while self._threads and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        os.close(self._cancel_r)
        os.close(self._cancel_w)

    # -- one control connection ---------------------------------------------
    async def _attempt(self) -> _Action:
        """One connection attempt; returns when the core says what comes next."""
        loop = asyncio.get_running_loop()
        action: asyncio.Future[_Action] = loop.create_future()
        self._action = action
        try:
            await self._connect()
        except (OSError, ssl.SSLError, TimeoutError, _ServerRefused) as exc:
            log.warning("cannot connect to server %s: %s", self.state.server, _why(exc))
            self.core.connect_failed(_why(exc), loop.time())
            self._drain()
        if self._stopping and not action.done():
            action.set_result(None)  # stop() may have run before this future existed
        return await action

    async def _connect(self) -> None:
        # Host keys first, so ANNOUNCE follows WELCOME at once: a client that
        # sees this node online can immediately open streams to its services.
        self.core.set_host_keys(await self._host_keys())
        self._drain()
        host, port = self.state.server_address()
        ctx = tlsctx.control_client_context(self.state.cert_path, self.state.key_path)
        link = await connect_control(
            host,
            port,
            ctx,
            self,
            ping_interval=self.ping_interval,
            idle_timeout=self.idle_timeout,
            answer_timeout=WELCOME_TIMEOUT,
            connect_timeout=CONNECT_TIMEOUT,
            sock=await _proxy_tunnel(self.state),
        )
        self._recent.append(link)
        if link.ended:  # refused by the driver itself (ALPN)
            ev = await link.wait_closed()
            raise _ServerRefused(ev.reason)
        problem = await self._server_cert_problem(link)
        if problem is not None:
            link.abort("server pin mismatch")
            raise _ServerRefused(problem)
        if link.transport is not None:
            sock = link.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._stream_ctx = tlsctx.stream_context(
            server_side=True,
            cert=self.state.cert_path,
            key=self.state.key_path,
            ca_cert=self.state.ca_path,
        )
        self._client_ctx = tlsctx.stream_context(
            server_side=False,
            cert=self.state.cert_path,
            key=self.state.key_path,
            ca_cert=self.state.ca_path,
        )
        if self._stopping:
            link.abort("agent stopping")
            return
        self._link = link
        self.core.session_started(asyncio.get_running_loop().time())
        self._drain()

    # ControlHandler
    def control_message(self, link: ControlLink, msg: m.Message) -> None:
        if link is not self._link:
            return  # a link we already gave up on (or not yet checked)
        self.core.message_received(msg, asyncio.get_running_loop().time())
        self._drain()

    def control_closed(self, link: ControlLink, ev: ConnectionClosed) -> None:
        if link is not self._link:
            return
        self._link = None
        self.core.session_ended(_closed_text(ev), asyncio.get_running_loop().time())
        self._drain()

    async def _host_keys(self) -> tuple[str, ...]:
        if self._fixed_host_keys is not None:
            return self._fixed_host_keys
        ssh = next((s for s in self.services if s.name == SSH_NAME), None)
        if ssh is None:
            return ()
        target = (ssh.target_host, ssh.target_port)
        return await asyncio.get_running_loop().run_in_executor(None, hostkeys.collect, target)

    async def _server_cert_problem(self, link: ControlLink) -> str | None:
        """None when the server's certificate is the pinned one, or a renewal we follow.

        A renewed certificate is accepted only as :func:`homeport.io.dial.renewed_pin`
        decides (the node joined a publicly trusted server under the same name).
        """
        der = link.peer_cert_der()
        try:
            hptls.check_pin(der, self.state.server_pin)
        except hptls.PinMismatch as exc:
            loop = asyncio.get_running_loop()
            renewed = await loop.run_in_executor(None, renewed_pin, self.state)
            if renewed is None or der is None or hptls.fingerprint(der) != renewed.server_pin:
                return f"server certificate does not match the pinned one ({exc})"
            self.state = renewed
        return None

    async def _refresh_host_keys_forever(self) -> None:
        """Re-read the ssh target's host keys on a schedule and after a failed connection.

        Why: sshd host keys rotate, and an sshd that starts after the agent was
        announced with the fallback keys from /etc/ssh (or none); until the agent
        restarted, clients got OpenSSH's man-in-the-middle warning.
        """
        wake = self._hostkey_wake
        assert wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.hostkey_refresh)
            wake.clear()
            if self._fixed_host_keys is not None:
                continue
            keys = await self._host_keys()
            if keys and keys != self.core.host_keys:
                log.info(
                    "sshd host keys changed: announcing %d keys (%s)",
                    len(keys),
                    ", ".join(hostkeys.fingerprint(k) for k in keys),
                )
                self.core.set_host_keys(keys)
                self._drain()

    # -- carrying out the core's commands ----------------------------------------------
    def _ssh_ca(self, text: str) -> None:
        """Keep the server's SSH CA key in the state dir (``homeport ssh-trust`` installs it)."""
        from homeport.agent import sshtrust

        try:
            line = sshtrust.ca_line_untrusted(text)
            path = self.state.dir / sshtrust.CA_STATE_FILE
            data = f"{line} {sshtrust.MARK}\n".encode()
            if not path.exists() or path.read_bytes() != data:
                files.write_public(path, data)
                log.info("the server's SSH user CA is %s (kept in %s)", line[:40] + "…", path)
        except (sshtrust.TrustError, OSError) as exc:
            log.warning("cannot keep the server's SSH CA key: %s", exc)

    def _drain(self) -> None:
        """Carry out every command the core made (event loop only)."""
        while (cmd := self.core.next_command()) is not None:
            if self.observe is not None:
                self.observe(cmd)
            if isinstance(cmd, core.Send):
                if self._link is not None:
                    self._link.send(cmd.msg)
            elif isinstance(cmd, core.Decided):
                self._log_decision(cmd.record)
            elif isinstance(cmd, core.ConnectTarget):
                task = asyncio.get_running_loop().create_task(self._connect_target(cmd))
                self._tasks.add(task)  # the loop keeps only weak references to tasks
                task.add_done_callback(self._tasks.discard)
            elif isinstance(cmd, core.ConnectExit):
                task = asyncio.get_running_loop().create_task(self._connect_exit(cmd))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(cmd, core.StartStream):
                self._start_stream(cmd)
            elif isinstance(cmd, core.DropTarget):
                target = self._targets.pop(cmd.stream_id, None)
                if target is not None:
                    target.close()
            elif isinstance(cmd, core.LocalOpenAdmitted | core.LocalOpenSucceeded):
                self._local_answer(cmd)
            elif isinstance(cmd, core.LocalOpenFailed):
                self._local_failed(cmd)
            elif isinstance(cmd, core.SessionReady):
                if cmd.ssh_ca:
                    self._ssh_ca(cmd.ssh_ca)
                if cmd.name and cmd.name != self.state.name:
                    self._renamed(cmd.name)
                log.info(
                    "connected to %s as %s (%s); announced %d services, %d host keys%s%s",
                    self.state.server,
                    cmd.name,
                    cmd.node_id,
                    cmd.services,
                    cmd.host_keys,
                    "; peer map pushed" if cmd.peers else "",
                    "; shields up: refusing every incoming stream"
                    if self.core.config.shields_up
                    else "",
                )
                self.connected.set()
                if self._direct is not None:
                    self._direct.session_ready()
            elif isinstance(cmd, core.StartPunch):
                if self._direct is not None:
                    self._direct.start_punch(cmd)
            elif isinstance(cmd, core.PeerPongReceived):
                if self._direct is not None:
                    self._direct.pong(cmd)
            elif isinstance(cmd, core.PathChanged):
                ch = cmd.choice
                known = self.core.peers.peers.get(cmd.peer)
                who = known.name if known is not None else cmd.peer
                log.info("path to %s: %s (%s)", who, ch.kind.value, ch.reason)
            elif isinstance(cmd, core.Renewed):
                self._store_renewed(cmd)
            elif isinstance(cmd, core.NoticeReceived):
                level = logging.WARNING if cmd.code == "expiry" else logging.INFO
                log.log(level, "server notice (%s): %s", cmd.code, cmd.message)
            elif isinstance(cmd, core.SessionLost):
                self.connected.clear()
                if not self._stopping:
                    log.warning("control connection lost: %s", cmd.reason)
            elif (
                isinstance(cmd, core.Reconnect | core.Fatal)
                and self._action is not None
                and not self._action.done()
            ):
                self._action.set_result(cmd)
        if self._direct is not None:
            self._direct.after_input()
        self._arm_timer()

    def _store_renewed(self, cmd: core.Renewed) -> None:
        """Write the renewed key and certificate, then use them for new connections."""
        try:
            store_renewed_identity(self.state, cmd.key_pem, cmd.cert_pem)
        except OSError as exc:
            # the old certificate stays valid for the overlap; the next renewal retries
            log.error("could not store the renewed node certificate: %s", exc)
            return
        when = (
            "never"
            if cmd.expires_at <= 0
            else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(cmd.expires_at))
        )
        log.info("node key renewed; it now expires %s", when)
        if self._direct is not None:
            self._direct.renewed()
        with contextlib.suppress(OSError, ssl.SSLError):
            self._stream_ctx = tlsctx.stream_context(
                server_side=True,
                cert=self.state.cert_path,
                key=self.state.key_path,
                ca_cert=self.state.ca_path,
            )
            self._client_ctx = tlsctx.stream_context(
                server_side=False,
                cert=self.state.cert_path,
                key=self.state.key_path,
                ca_cert=self.state.ca_path,
            )

    def _arm_timer(self) -> None:
        when = self.core.get_timer()
        if self._timer is not None:
            if when is not None and self._timer_when == when:
                return
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)
            self._timer_when = when

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(asyncio.get_running_loop().time())
        self._drain()

    def _log_decision(self, rec: StreamRecord) -> None:
        verb = "accepted" if rec.accepted else f"rejected [{rec.code}]"
        log.info(
            "stream %s from %s for %r: %s: %s (rule %s)",
            rec.stream_id,
            rec.src,
            rec.service,
            verb,
            rec.reason,
            rec.rule,
        )
        if self.on_decision is not None:
            self.on_decision(rec)

    # -- streams ------------------------------------------------------------
    async def _connect_target(self, cmd: core.ConnectTarget) -> None:
        svc = cmd.service
        try:
            target = await _connect_target(svc.target_host, svc.target_port)
        except OSError as exc:
            self.core.target_failed(cmd.stream_id, _connect_reason(exc, svc))
            if svc.name == SSH_NAME and self._hostkey_wake is not None:
                self._hostkey_wake.set()  # sshd restarted or moved: its keys may have changed
        else:
            self._targets[cmd.stream_id] = target
            self.core.target_connected(cmd.stream_id)
        self._drain()

    async def _connect_exit(self, cmd: core.ConnectExit) -> None:
        """Dial an exit stream's destination (checked after resolving: agent.exit)."""
        try:
            target = await agent_exit.connect_exit(cmd.host, cmd.port, cmd.nets)
        except agent_exit.ExitFailed as exc:
            self.core.target_failed(cmd.stream_id, exc.reason, code=exc.code)
        else:
            self._targets[cmd.stream_id] = target
            self.core.target_connected(cmd.stream_id)
        self._drain()

    def _start_stream(self, cmd: core.StartStream) -> None:
        target = self._targets.pop(cmd.stream_id, None)
        if target is None:  # cannot happen: the core starts only what we connected
            self.core.stream_ended(cmd.stream_id)
            return
        t = threading.Thread(
            target=self._stream_worker,
            args=(cmd, target),
            name=f"stream-{cmd.stream_id}",
            daemon=True,
        )
        self._threads.add(t)
        try:
            t.start()
        except RuntimeError:  # cannot start a thread: resource exhaustion
            self._threads.discard(t)
            target.close()
            self.core.stream_ended(cmd.stream_id)

    def _stream_worker(self, cmd: core.StartStream, target: socket.socket) -> None:
        """Data connection, e2e TLS server handshake + pin, pump (blocking, own thread)."""
        peer = cmd.src.name or cmd.src.node_id
        try:
            ctx = self._stream_ctx
            assert ctx is not None
            data = dial_data(self.state, cmd.token, timeout=STREAM_SETUP_TIMEOUT)
            tls = e2e_handshake(
                data,
                ctx,
                server_side=True,
                expected_pin=cmd.src.fingerprint,
                peer_name=peer,
                timeout=STREAM_SETUP_TIMEOUT,
            )
            target.setblocking(True)
            res = pump(tls, target.fileno(), target.fileno(), cancel_fd=self._cancel_r)
            if self.observe is not None:
                self.observe(StreamPumped(True, res.sent, res.received))
            level = logging.INFO if res.ok or res.end is PumpEnd.CANCELLED else logging.WARNING
            log.log(
                level,
                "stream %s from %s ended: %s (%d bytes in, %d bytes out)",
                cmd.stream_id,
                peer,
                res.reason,
                res.sent,
                res.received,
            )
        except DialError as exc:
            log.warning("stream %s from %s failed: %s", cmd.stream_id, peer, exc.message)
        except Exception:
            log.exception("stream %s from %s crashed", cmd.stream_id, peer)
        finally:
            target.close()
            self._on_loop(self._stream_done, cmd.stream_id, threading.current_thread())

    def _stream_done(self, stream_id: str, t: threading.Thread) -> None:
        self._threads.discard(t)
        self.core.stream_ended(stream_id)
        self._drain()

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the event loop (from a worker thread); dropped once it is gone.

        Once the loop is closed the agent is over: only the thread set still
        matters (``_shutdown_streams`` waits for it to empty).
        """
        loop = self._loop
        try:
            if loop is None or loop.is_closed():
                raise RuntimeError("loop closed")
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            for arg in args:
                if isinstance(arg, threading.Thread):
                    self._threads.discard(arg)

    # -- local opens (homeport nc on this machine) ------------------------------------
    def _start_local_api(self) -> None:
        """Serve ``<state>/agent.sock``; without it nc simply dials by itself."""
        if not self._local_api:
            return
        path = localapi.socket_path(self.state.dir)
        api = LocalApiServer(path, self._serve_local, self._reload_local, self._serve_query)
        try:
            api.start()
        except OSError as exc:
            log.warning("local API off (%s): %s; nc will dial by itself", path, _why(exc))
            return
        self._api = api
        log.info("local API on %s", path)

    def _reload_local(self) -> dict[str, Any]:
        """``homeport set`` (a local API thread): apply the services now saved in node.json."""
        from homeport.node.state import StateError, load

        try:
            fresh = load(self.state.dir)
            exit_nets = exit_settings.load_exit(self.state.dir)
        except (StateError, exit_settings.ExitSettingsError) as exc:
            return error_reply("bad-state", str(exc))
        services = fresh.services
        loop = self._loop
        if loop is None or loop.is_closed():
            return error_reply("not-running", "the agent is stopping")
        if fresh.server != self.state.server:  # ``set --server`` (verified): next connection
            loop.call_soon_threadsafe(self._follow_server, fresh.server)
        future = asyncio.run_coroutine_threadsafe(self._apply_services(services, exit_nets), loop)
        try:
            future.result(timeout=RELOAD_TIMEOUT)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            return error_reply("timeout", f"the agent did not apply the change: {exc!r}")
        return {"ok": True, "services": [s.name for s in services]}

    def _renamed(self, name: str) -> None:
        """The server calls this node ``name`` now (an admin's ``nodes rename``): save it."""
        from homeport.node.state import StateError, load, save

        log.info("renamed by the server: %s -> %s (saved)", self.state.name, name)
        self.state = replace(self.state, name=name)
        try:
            save(replace(load(self.state.dir), name=name))
        except (StateError, OSError) as exc:
            log.warning("cannot save the new name %s: %s", name, exc)

    def _follow_server(self, server: str) -> None:
        log.info(
            "server address changed: %s -> %s (used from the next connection)",
            self.state.server,
            server,
        )
        self.state = replace(self.state, server=server)

    async def _apply_services(
        self, services: tuple[Service, ...], exit_nets: tuple[str, ...] | None = None
    ) -> None:
        if exit_nets is not None:
            self.core.set_exit(exit_nets)
        old = self.services
        self.services = services
        self.state = self.state.with_services(services)
        self.core.set_services(services)
        ssh_old = next((s for s in old if s.name == SSH_NAME), None)
        ssh_new = next((s for s in services if s.name == SSH_NAME), None)
        if ssh_old != ssh_new:  # the ssh target changed: its host keys may have too
            self.core.set_host_keys(await self._host_keys())
        self._drain()
        exposed = ", ".join(f"{s.name}={s.target_host}:{s.target_port}" for s in services)
        log.info("settings reloaded: exposing %s", exposed or "nothing")

    def _local_answer(self, cmd: core.LocalOpenAdmitted | core.LocalOpenSucceeded) -> None:
        wait = self._local.get(cmd.token)
        if wait is None:
            return
        if isinstance(cmd, core.LocalOpenAdmitted):
            self._threads.add(wait.worker)
            if not wait.admitted.done():
                wait.admitted.set_result(None)
        elif not wait.answer.done():
            wait.answer.set_result(cmd.opened)

    def _local_failed(self, cmd: core.LocalOpenFailed) -> None:
        if not cmd.admitted:
            wait = self._local.pop(cmd.token, None)
            if wait is not None and not wait.admitted.done():
                wait.admitted.set_exception(_LocalRefused(cmd.code, cmd.message))
            return
        wait = self._local.get(cmd.token)
        if wait is not None and not wait.answer.done():
            wait.answer.set_exception(_AnswerFailed(cmd.code, cmd.message, cmd.fallback))

    def _local_begin(
        self, req: OpenRequest, token: bytes, wait: _LocalWait, timeout: float
    ) -> None:
        """Event loop side of a local open: hand it to the core (which admits it or not)."""
        if not wait.admitted.set_running_or_notify_cancel():
            return  # the worker gave up waiting for us
        self._local[token] = wait
        self.core.open_local(
            token, req.dst, req.service, asyncio.get_running_loop().time(), timeout
        )
        self._drain()

    def _local_done(self, token: bytes, worker: threading.Thread) -> None:
        self._local.pop(token, None)
        self._threads.discard(worker)
        self.core.local_open_ended(token)
        self._drain()

    def _admit_local(
        self, req: OpenRequest, token: bytes, wait: _LocalWait, timeout: float
    ) -> None:
        """Ask the event loop to admit a local open (called from its worker thread).

        Raises:
            _LocalRefused: not admitted; nothing was counted or sent.
        """
        loop = self._loop
        try:
            if loop is None or self._stopping:
                raise RuntimeError("no event loop")
            loop.call_soon_threadsafe(self._local_begin, req, token, wait, timeout)
        except RuntimeError:  # the loop is closed: the agent is stopping
            raise _LocalRefused("not-connected", "the agent is stopping") from None
        try:
            wait.admitted.result(timeout=LOCAL_ADMIT_TIMEOUT)
        except concurrent.futures.TimeoutError:
            if wait.admitted.cancel():  # the loop never looked at it: nothing to undo
                raise _LocalRefused("busy", "the agent did not answer in time") from None
            wait.admitted.result()  # decided meanwhile: its outcome stands

    def _serve_local(self, conn: socket.socket, req: OpenRequest) -> None:
        """One local ``open``, in its local API thread, for the whole life of the stream.

        Same steps as nc's own dial, minus the control handshake: OPEN over the
        warm session (the data connection and ClientHello go out meanwhile),
        OPENED, end-to-end handshake with the pin the server named, known_hosts,
        then a socketpair whose far end goes to the client and a pump here. The
        error replies carry exactly the messages nc prints when it dials itself.
        """
        timeout = req.timeout if req.timeout is not None else STREAM_SETUP_TIMEOUT
        deadline = time.monotonic() + timeout
        if self._direct is not None and self._local_direct(conn, req, timeout):
            return
        token = new_token()
        me = threading.current_thread()
        wait = _LocalWait(me, concurrent.futures.Future(), concurrent.futures.Future())
        try:
            self._admit_local(req, token, wait, timeout)
        except _LocalRefused as exc:
            log.info("local open of %s:%s handed back: %s", req.dst, req.service, exc.message)
            with contextlib.suppress(OSError):
                send_reply(conn, error_reply(exc.code, exc.message, fallback=True))
            return
        if req.ack:  # nc's sign of life: it gives up on a silent agent after 1 s
            with contextlib.suppress(OSError):
                send_reply(conn, localapi.ACCEPTED)
        try:
            self._local_stream(conn, req, token, wait.answer, deadline)
        finally:
            self._on_loop(self._local_done, token, me)

    def _local_stream(
        self,
        conn: socket.socket,
        req: OpenRequest,
        token: bytes,
        answer: concurrent.futures.Future[m.Opened],
        deadline: float,
    ) -> None:
        def left() -> float:
            return max(0.01, deadline - time.monotonic())

        ctx = self._client_ctx
        assert ctx is not None  # set before the session could admit anything
        try:
            data = dial_data(self.state, token, timeout=left())
            try:
                started, client_hello = tlsstream.begin_client(data, ctx)
                data.sendall(client_hello)  # rides behind the preamble, like nc's
                try:
                    # The core fails the open at the deadline; the slack only
                    # covers a wedged event loop.
                    msg = answer.result(timeout=left() + LOCAL_ADMIT_TIMEOUT)
                except concurrent.futures.TimeoutError:
                    raise DialError(
                        "timeout", f"no answer from server {self.state.server}"
                    ) from None
            except BaseException:
                data.close()
                raise
            peer = msg.peer
            tls = e2e_handshake(
                data,
                ctx,
                server_side=False,
                expected_pin=peer.fingerprint,
                peer_name=peer.name or req.dst,
                timeout=left(),
                started=started,
            )
        except DialError as exc:
            log.info("local open of %s:%s failed: %s", req.dst, req.service, exc.message)
            if isinstance(exc, _AnswerFailed):
                fallback = exc.fallback
            else:
                fallback = exc.code in LOCAL_FALLBACK_CODES
            with contextlib.suppress(OSError):
                send_reply(conn, error_reply(exc.code, exc.message, fallback=fallback))
            return
        except OSError as exc:
            log.info("local open of %s:%s failed: %s", req.dst, req.service, exc)
            with contextlib.suppress(OSError):
                send_reply(conn, error_reply("unreachable", f"connection failed: {exc}"))
            return
        port = msg.port or (int(req.service) if req.service.isdigit() else 22)
        try:
            _ensure_known_hosts(self.state.dir, req.dst, port, peer.node_id, peer.host_keys)
        except hostkeys.TrustError as exc:
            tls.close()
            with contextlib.suppress(OSError):
                send_reply(conn, error_reply("untrusted", str(exc)))
            return
        except (ValueError, OSError) as exc:
            tls.close()
            with contextlib.suppress(OSError):
                send_reply(
                    conn,
                    error_reply("known-hosts", f"cannot write known_hosts for {peer.name}: {exc}"),
                )
            return
        try:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            tune_socket(theirs)  # the client writes into it: room for the pump's coalescing
        except OSError as exc:  # EMFILE
            tls.close()
            with contextlib.suppress(OSError):
                send_reply(conn, error_reply("local", f"local agent: {exc}", fallback=True))
            return
        try:
            with theirs:
                send_reply(
                    conn,
                    {"ok": True, "peer": peer.name, "port": port, "stream": msg.stream_id},
                    theirs.fileno(),
                )
        except OSError as exc:
            log.info("local open of %s:%s: client left before the reply: %s", *_dst(req), exc)
            tls.close()
            mine.close()
            return
        log.info("local stream %s to %s:%s opened (peer %s)", msg.stream_id, *_dst(req), peer.name)
        try:
            res = pump(
                tls, mine.fileno(), mine.fileno(), cancel_fd=self._cancel_r, local_tuned=True
            )
            if self.observe is not None:
                self.observe(StreamPumped(False, res.sent, res.received))
            # LOCAL_ERROR here is our own user's process going away (ssh exited).
            quiet = res.ok or res.end in (PumpEnd.CANCELLED, PumpEnd.LOCAL_ERROR)
            level = logging.INFO if quiet else logging.WARNING
            log.log(
                level,
                "local stream %s to %s ended: %s (%d bytes out, %d bytes in)",
                msg.stream_id,
                peer.name,
                res.reason,
                res.sent,
                res.received,
            )
            # Before closing ``mine``: a client that pumps sees this line is ready
            # by the time it reads EOF on the stream.
            with contextlib.suppress(OSError):
                send_reply(conn, {"end": res.end.value, "ok": res.ok, "reason": res.reason})
        finally:
            mine.close()

    # -- direct paths (agent/direct.py does the work) ----------------------------------
    def _start_direct(self) -> None:
        """Own the direct port unless ``--relay-only``; without it streams use the relay."""
        if self.core.config.relay_only:
            log.info("relay-only mode: no direct paths")
            return
        try:
            self._direct = DirectPaths(self, port=self._direct_port, portmap=self._portmap)
        except OSError as exc:
            log.warning("direct port %d unavailable (%s): relay only", self._direct_port, exc)
            return
        self._direct.start()

    def _local_direct(self, conn: socket.socket, req: OpenRequest, timeout: float) -> bool:
        """Open ``req`` over the peer's direct path if it is up; False: use the relay."""
        direct = self._direct
        assert direct is not None
        try:
            opened = direct.open_direct(req.dst, req.service, timeout)
        except MuxLinkError as exc:  # the peer refused: its answer, as over the relay
            with contextlib.suppress(OSError):
                send_reply(conn, error_reply(exc.code, exc.message))
            return True
        if opened is None:
            return False
        sock, reply, peer = opened
        with sock:
            port = reply.get("port")
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                port = int(req.service) if req.service.isdigit() else 22
            raw = reply.get("host_keys")
            keys = sanitize_host_keys(raw if isinstance(raw, list) else [])
            try:
                _ensure_known_hosts(self.state.dir, req.dst, port, peer.node_id, keys)
            except hostkeys.TrustError as exc:
                with contextlib.suppress(OSError):
                    send_reply(conn, error_reply("untrusted", str(exc)))
                return True
            except (ValueError, OSError) as exc:
                with contextlib.suppress(OSError):
                    send_reply(
                        conn,
                        error_reply(
                            "known-hosts", f"cannot write known_hosts for {peer.name}: {exc}"
                        ),
                    )
                return True
            try:
                send_reply(
                    conn,
                    {"ok": True, "peer": peer.name, "port": port, "stream": "direct"},
                    sock.fileno(),
                )
                # The mux link pumps the stream; its end is not tracked here (ssh checks
                # its own integrity), so a client that still listens is told at once.
                send_reply(conn, {"end": "clean", "ok": True, "reason": "direct path"})
            except OSError as exc:
                log.info("local open of %s:%s: client left before the reply: %s", *_dst(req), exc)
        log.info("local stream to %s:%s opened over the direct path", *_dst(req))
        return True

    def _serve_query(self, req: QueryRequest) -> dict[str, Any]:
        """``status`` / ``ping`` / ``netcheck`` from the local API (its thread)."""
        direct = self._direct
        loop = self._loop
        if loop is None or loop.is_closed():
            return error_reply("not-connected", "the agent is stopping")
        if req.op == "ping":
            if direct is None:
                return error_reply("relay-only", "this agent runs without direct paths")
            return direct.ping(req.dst, req.timeout)
        if req.op == "drop-direct":
            if direct is None:
                return error_reply("relay-only", "this agent runs without direct paths")
            dropped = self._on_loop_wait(lambda: direct.drop_link(req.dst), req.timeout)
            return {"ok": True, "dropped": dropped}
        if req.op == "check":  # homeport ssh / ssh-config's precheck (client/precheck.py)
            checked: dict[str, Any] = self._on_loop_wait(
                lambda: self._check_reply(req.dst), req.timeout
            )
            return checked
        if req.op == "netcheck":
            if direct is None:
                return error_reply("relay-only", "this agent runs without direct paths")
            if not self.core.ready:
                return error_reply("not-connected", f"not connected to {self.state.server}")
            fut = asyncio.run_coroutine_threadsafe(direct.netcheck_now(), loop)
            answer: dict[str, Any] = fut.result(req.timeout + 30.0)
            return answer

        def status() -> dict[str, Any]:
            if direct is not None:
                out = direct.status()
            else:
                out = relay_only_status(self, "relay-only mode (this node runs --relay-only)")
            out["connected"] = self.core.ready
            out["server"] = self.state.server
            return out

        reply: dict[str, Any] = self._on_loop_wait(status, req.timeout)
        return reply

    def _check_reply(self, dst: str) -> dict[str, Any]:
        """One peer-map entry, flat (nc reads it without ``json``): see client/precheck.py."""
        peers = self.core.peers
        ready = self.core.ready and peers.has_map and not peers.awaiting_full
        peer = peers.get_by_name(dst)
        if peer is None:
            return {"ok": True, "ready": ready, "known": False}
        return {
            "ok": True,
            "ready": ready,
            "known": True,
            "online": peer.online,
            "last_seen": peer.last_seen,
            "services": ",".join(f"{s.name}/{s.port}" for s in peer.services),
        }

    def _on_loop_wait(self, fn: Callable[[], Any], timeout: float) -> Any:
        async def run() -> Any:
            return fn()

        loop = self._loop
        assert loop is not None
        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)


async def _proxy_tunnel(state: NodeState) -> socket.socket | None:
    """A CONNECT tunnel to the server when this node uses a proxy (docs/proxy.md), else None."""
    from homeport.io.dial import route_of, server_tcp

    try:
        route = route_of(state)  # a small file read: no thread for the usual direct case
        if route.proxy is None:
            return None
        host, port = state.server_address()
        deadline = time.monotonic() + CONNECT_TIMEOUT
        return await asyncio.get_running_loop().run_in_executor(
            None, server_tcp, host, port, route, deadline, "server"
        )
    except DialError as exc:
        raise OSError(exc.message) from exc


async def _connect_target(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, addr), TARGET_CONNECT_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_reason(exc: OSError, svc: Service) -> str:
    where = f"{svc.target_host}:{svc.target_port}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused to {where}"
    if isinstance(exc, TimeoutError):
        return f"timed out connecting to {where}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {svc.target_host}: {exc.strerror}"
    return f"cannot connect to {where}: {exc.strerror or exc}"


def _closed_text(ev: ConnectionClosed) -> str:
    return f"{ev.reason} [{ev.code}]"


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"DNS: {exc.strerror}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


#: Suffix of a renewed key/certificate written but not yet moved into place.
RENEW_SUFFIX = ".next"


def store_renewed_identity(state: NodeState, key_pem: bytes, cert_pem: bytes) -> None:
    """Replace the node key and certificate so that a crash never leaves a mismatched pair.

    Both are written next to the old ones first (atomically, key 0600), then
    moved into place key first; :func:`finish_renewal` completes a move that a
    crash interrupted. Until then the old pair keeps working: the server
    accepts the previous certificate during the overlap.
    """
    key_next = state.key_path.with_name(state.key_path.name + RENEW_SUFFIX)
    cert_next = state.cert_path.with_name(state.cert_path.name + RENEW_SUFFIX)
    files.write_private(key_next, key_pem)
    files.write_public(cert_next, cert_pem)
    finish_renewal(state)


def finish_renewal(state: NodeState) -> None:
    """Complete (or discard) a renewal that was interrupted; call before loading the key."""
    key_next = state.key_path.with_name(state.key_path.name + RENEW_SUFFIX)
    cert_next = state.cert_path.with_name(state.cert_path.name + RENEW_SUFFIX)
    if key_next.exists() and not cert_next.exists():
        key_next.unlink()  # crashed while writing: the old pair is intact
        return
    if key_next.exists():
        os.replace(key_next, state.key_path)
    if cert_next.exists():
        os.replace(cert_next, state.cert_path)


def run_agent(
    state: NodeState,
    services: tuple[Service, ...],
    *,
    ping_interval: float = AGENT_PING_INTERVAL,
    idle_timeout: float = AGENT_IDLE_TIMEOUT,
    host_keys: tuple[str, ...] | None = None,
    shields_up: bool = False,
    hostkey_refresh: float = HOSTKEY_REFRESH,
    direct_port: int = 0,
    relay_only: bool = False,
    portmap: bool = True,
    attach: Callable[[Agent], Callable[[], None]] | None = None,
) -> int:
    """Run the agent in the foreground until SIGINT/SIGTERM or a fatal error.

    ``attach``: called with the agent before it runs (the metrics listener); returns
    what to call once it stopped. An OSError from it (a port in use) ends the start.
    Returns the process exit code (:class:`ExitCode`).
    """
    finish_renewal(state)
    agent = Agent(
        state,
        services,
        ping_interval=ping_interval,
        idle_timeout=idle_timeout,
        host_keys=host_keys,
        shields_up=shields_up,
        hostkey_refresh=hostkey_refresh,
        direct_port=direct_port,
        relay_only=relay_only,
        portmap=portmap,
    )
    if attach is None:
        return run_in_loop(agent)
    try:
        detach = attach(agent)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return int(ExitCode.FATAL)
    try:
        return run_in_loop(agent)
    finally:
        detach()


def run_in_loop(agent: Agent) -> int:
    """Run ``agent`` on a fresh (uvloop if available) event loop in this thread."""

    async def main() -> int:
        if threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, agent.stop)
            loop.add_signal_handler(signal.SIGTERM, functools.partial(agent.stop, drain=True))
        return await agent.run()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main())


def _dst(req: OpenRequest) -> tuple[str, str]:
    return req.dst, req.service


def _ensure_known_hosts(
    state_dir: Path, host: str, port: int, node_id: str, host_keys: tuple[str, ...]
) -> None:
    """Check ``host`` against its pin and write ``known_hosts/<host>`` (only if it changed).

    Raises:
        hostkeys.TrustError: another node id or other keys than pinned.
    """
    hostkeys.admit(state_dir, host, port, node_id, host_keys)
