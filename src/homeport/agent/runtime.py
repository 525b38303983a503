"""The agent (``homeport up``): one control connection, forever, and a worker per stream.

Theory of operation:

* **Never give up on the network.** A box may boot before its network or DNS is
  up, the server may restart, a NAT may drop the connection silently. Every
  failure to connect or to keep the connection is logged and retried with
  jittered exponential backoff (:class:`~homeport.proto.backoff.Backoff`). The
  one exception is ``ERROR(node-removed)``: an admin removed this node, its
  certificate will never be accepted again, so the agent exits non-zero with a
  clear message instead of spinning.
* **Dead links are found in seconds.** The sans-I/O
  :class:`~homeport.proto.control.ControlConnection` pings every
  ``ping_interval`` and declares the link dead after ``idle_timeout`` of
  silence (15 s by default), instead of TCP's many-minute retransmission timeout.
* **The destination decides.** Every ``INCOMING`` is checked against this
  node's own exposed services (:func:`homeport.policy.services.resolve`) before
  anything is connected, even though the server checked first. Every decision
  is logged with its reason.
* **The event loop never blocks on a stream.** asyncio handles control traffic
  and target connects; each accepted stream's data connection, end-to-end TLS
  handshake and pump run in their own thread (the pump is a blocking,
  single-threaded ``poll`` loop: :mod:`homeport.io.pump`), at most
  :data:`MAX_STREAMS` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from homeport.crypto import tls as hptls
from homeport.io.dial import SOFTWARE, DialError, dial_data, e2e_handshake
from homeport.io.pump import PumpEnd, pump
from homeport.node import hostkeys
from homeport.node.state import NodeState
from homeport.policy.services import SSH_NAME, Service, resolve
from homeport.proto.backoff import Backoff
from homeport.proto.control import (
    ConnectionClosed,
    ControlConnection,
    MessageReceived,
    Role,
)
from homeport.wire import control as m
from homeport.wire.data import token_from_hex_untrusted
from homeport.wire.errors import WireError

log = logging.getLogger("homeport.agent")

#: Concurrent streams per agent; beyond this, INCOMING is answered REJECT(busy).
MAX_STREAMS = 256
#: Seconds to open the control connection (TCP + TLS) before backing off.
CONNECT_TIMEOUT = 10.0
#: Seconds to wait for WELCOME after HELLO.
WELCOME_TIMEOUT = 10.0
#: Seconds to connect a stream's local target (sshd) before REJECT(service-down).
TARGET_CONNECT_TIMEOUT = 5.0
#: Seconds for a stream's data connection plus end-to-end TLS handshake.
STREAM_SETUP_TIMEOUT = 10.0
#: Bytes read from the control connection at a time.
CONTROL_READ_SIZE = 64 * 1024
#: Seconds ``stop()`` waits for stream threads to finish after cancelling them.
STOP_GRACE = 2.0
#: Server ERROR codes after which reconnecting can never succeed.
FATAL_ERROR_CODES = frozenset({"node-removed"})


class ExitCode(enum.IntEnum):
    STOPPED = 0
    FATAL = 2
    NODE_REMOVED = 3


class _Fatal(Exception):
    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Reconnect(Exception):
    """The control connection is over; log this message and reconnect."""


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """What the agent decided for one INCOMING (kept for tests and logs)."""

    stream_id: str
    src: str
    service: str
    accepted: bool
    code: str
    reason: str


class Agent:
    """The agent's state across reconnects; run with :meth:`run`, stop with :meth:`stop`."""

    def __init__(
        self,
        state: NodeState,
        services: tuple[Service, ...],
        *,
        ping_interval: float = 5.0,
        idle_timeout: float = 15.0,
        host_keys: tuple[str, ...] | None = None,
        backoff: Backoff | None = None,
        on_decision: Callable[[StreamRecord], None] | None = None,
    ) -> None:
        self.state = state
        self.services = services
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self._fixed_host_keys = host_keys
        self.backoff = backoff or Backoff()
        self.on_decision = on_decision
        self.connected = threading.Event()  # set while a session is READY (tests poll it)
        self._active = 0
        self._threads: set[threading.Thread] = set()
        self._cancel_r, self._cancel_w = os.pipe()  # readable = all pumps stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._conn: ControlConnection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stream_ctx: ssl.SSLContext | None = None

    # -- lifecycle ------------------------------------------------------------
    def stop(self) -> None:
        """Ask the agent to exit (thread-safe; also from a signal handler)."""
        self._stopping = True
        loop, main = self._loop, self._main
        if loop is not None and main is not None and not loop.is_closed():
            loop.call_soon_threadsafe(main.cancel)

    @property
    def active_streams(self) -> int:
        return self._active

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
        try:
            while not self._stopping:
                started = time.monotonic()
                try:
                    await self._session()
                except _Reconnect as exc:
                    log.warning("control connection lost: %s", exc)
                except _Fatal as exc:
                    log.error("%s", exc)
                    return int(exc.code)
                except (OSError, ssl.SSLError, TimeoutError) as exc:
                    log.warning("cannot connect to server %s: %s", self.state.server, _why(exc))
                finally:
                    self.connected.clear()
                    self._conn = None
                    if self._writer is not None:
                        # abort(), not close(): no TLS close handshake to wait for on a
                        # link we are abandoning (and none may outlive the loop).
                        self._writer.transport.abort()
                        self._writer = None
                self.backoff.connected_for(time.monotonic() - started)
                if self._stopping:
                    break
                delay = self.backoff.next_delay()
                log.info("reconnecting in %.1fs", delay)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            await asyncio.sleep(0)  # let the aborted transport report connection_lost
            await self._shutdown_streams()
        log.info("agent stopped")
        return int(ExitCode.STOPPED)

    async def _shutdown_streams(self) -> None:
        os.write(self._cancel_w, b"x")
        deadline = time.monotonic() + STOP_GRACE
        while self._threads and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        os.close(self._cancel_r)
        os.close(self._cancel_w)

    # -- one control connection ---------------------------------------------
    async def _session(self) -> None:
        # Host keys first, so ANNOUNCE follows WELCOME at once: a client that
        # sees this node online can immediately open streams to its services.
        host_keys = await self._host_keys()
        host, port = self.state.server_address()
        ctx = hptls.control_client_context(self.state.cert_path, self.state.key_path)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=""),
            CONNECT_TIMEOUT,
        )
        self._writer = writer
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        try:
            hptls.check_pin(der, self.state.server_pin)
        except hptls.PinMismatch as exc:
            raise _Reconnect(f"server certificate does not match the pinned one ({exc})") from exc
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._stream_ctx = hptls.stream_context(
            server_side=True,
            cert=self.state.cert_path,
            key=self.state.key_path,
            ca_cert=self.state.ca_path,
        )
        loop = asyncio.get_running_loop()
        conn = ControlConnection(
            Role.CLIENT,
            loop.time(),
            ping_interval=self.ping_interval,
            idle_timeout=self.idle_timeout,
        )
        self._conn = conn
        self._send(m.Hello(proto=m.PROTOCOL_VERSION, role="agent", software=SOFTWARE))
        welcome_by = loop.time() + WELCOME_TIMEOUT
        while not self._stopping:  # cancel() alone can be lost in 3.11's wait_for
            timer = conn.get_timer()
            now = loop.time()
            wait = max(0.0, (timer if timer is not None else now) - now)
            if self._conn is conn and not self.connected.is_set():
                wait = min(wait, max(0.0, welcome_by - now))
            try:
                data = await asyncio.wait_for(reader.read(CONTROL_READ_SIZE), wait)
            except TimeoutError:
                if not self.connected.is_set() and loop.time() >= welcome_by:
                    raise _Reconnect("no WELCOME from the server") from None
                conn.handle_timer(loop.time())
            else:
                conn.receive_data(data, loop.time())
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, MessageReceived):
                    self._on_message(ev.message, host_keys)
                else:
                    self._flush()
                    raise _Reconnect(_closed_text(ev))
            self._flush()

    def _send(self, msg: m.Message) -> None:
        if self._conn is None:
            return
        self._conn.send(msg)
        self._flush()

    def _flush(self) -> None:
        if self._conn is None or self._writer is None:
            return
        data = self._conn.data_to_send()
        if data:
            self._writer.write(data)

    def _on_message(self, msg: m.Message, host_keys: tuple[str, ...]) -> None:
        if isinstance(msg, m.Welcome):
            self._send(
                m.Announce(
                    services=tuple(m.ServiceInfo(s.name, s.port) for s in self.services),
                    host_keys=host_keys,
                )
            )
            log.info(
                "connected to %s as %s (%s); announced %d services, %d host keys",
                self.state.server,
                msg.name,
                msg.node_id,
                len(self.services),
                len(host_keys),
            )
            self.connected.set()
        elif isinstance(msg, m.Incoming):
            task = asyncio.create_task(self._on_incoming(msg))
            self._tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)
        elif isinstance(msg, m.Error):
            if msg.code in FATAL_ERROR_CODES:
                raise _Fatal(
                    ExitCode.NODE_REMOVED,
                    f"this node was removed by an admin ({msg.message}); "
                    "enroll again with a new auth key",
                )
            raise _Reconnect(f"server error {msg.code}: {msg.message}")
        elif isinstance(msg, m.NetMap):
            log.debug("network map: %d nodes", len(msg.nodes))
        else:
            log.debug("ignoring %s", msg.TYPE.name)

    async def _host_keys(self) -> tuple[str, ...]:
        if self._fixed_host_keys is not None:
            return self._fixed_host_keys
        ssh = next((s for s in self.services if s.name == SSH_NAME), None)
        if ssh is None:
            return ()
        target = (ssh.target_host, ssh.target_port)
        return await asyncio.get_running_loop().run_in_executor(None, hostkeys.collect, target)

    # -- streams ------------------------------------------------------------
    def _decide(self, msg: m.Incoming, accepted: bool, code: str, reason: str) -> None:
        src = f"{msg.src.name} ({msg.src.node_id})"
        verb = "accepted" if accepted else f"rejected [{code}]"
        log.info("stream %s from %s for %r: %s: %s", msg.stream_id, src, msg.service, verb, reason)
        if self.on_decision is not None:
            self.on_decision(StreamRecord(msg.stream_id, src, msg.service, accepted, code, reason))
        if not accepted:
            self._send(m.Reject(stream_id=msg.stream_id, code=code, message=reason))

    async def _on_incoming(self, msg: m.Incoming) -> None:
        if self._active >= MAX_STREAMS:
            self._decide(msg, False, "busy", f"{MAX_STREAMS} streams already active")
            return
        self._active += 1
        handed_off = False
        try:
            try:
                token = token_from_hex_untrusted(msg.token)
            except WireError as exc:
                self._decide(msg, False, "protocol", f"bad stream token: {exc}")
                return
            verdict = resolve(self.services, msg.service)
            if not verdict.allowed or verdict.service is None:
                self._decide(msg, False, "not-exposed", verdict.reason)
                return
            svc = verdict.service
            try:
                target = await _connect_target(svc.target_host, svc.target_port)
            except OSError as exc:
                self._decide(msg, False, "service-down", _connect_reason(exc, svc))
                return
            conn = self._conn
            if conn is None:
                target.close()
                return  # the control connection died meanwhile; the server cancels the stream
            self._send(m.Accept(stream_id=msg.stream_id))
            self._decide(msg, True, "", verdict.reason)
            t = threading.Thread(
                target=self._stream_worker,
                args=(msg, token, target),
                name=f"stream-{msg.stream_id}",
                daemon=True,
            )
            self._threads.add(t)
            t.start()
            handed_off = True
        finally:
            if not handed_off:
                self._active -= 1

    def _stream_worker(self, msg: m.Incoming, token: bytes, target: socket.socket) -> None:
        """Data connection, e2e TLS server handshake + pin, pump (blocking, own thread)."""
        peer = msg.src.name or msg.src.node_id
        try:
            ctx = self._stream_ctx
            assert ctx is not None
            data = dial_data(self.state, token, timeout=STREAM_SETUP_TIMEOUT)
            tls = e2e_handshake(
                data,
                ctx,
                server_side=True,
                expected_pin=msg.src.fingerprint,
                peer_name=peer,
                timeout=STREAM_SETUP_TIMEOUT,
            )
            target.setblocking(True)
            res = pump(tls, target.fileno(), target.fileno(), cancel_fd=self._cancel_r)
            level = logging.INFO if res.ok or res.end is PumpEnd.CANCELLED else logging.WARNING
            log.log(
                level,
                "stream %s from %s ended: %s (%d bytes in, %d bytes out)",
                msg.stream_id,
                peer,
                res.reason,
                res.sent,
                res.received,
            )
        except DialError as exc:
            log.warning("stream %s from %s failed: %s", msg.stream_id, peer, exc.message)
        except Exception:
            log.exception("stream %s from %s crashed", msg.stream_id, peer)
        finally:
            target.close()
            loop = self._loop
            me = threading.current_thread()
            if loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self._stream_done, me)
                except RuntimeError:  # loop closed between the check and the call
                    self._stream_done(me)
            else:
                self._stream_done(me)

    def _stream_done(self, t: threading.Thread) -> None:
        self._threads.discard(t)
        self._active -= 1


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


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_agent(
    state: NodeState,
    services: tuple[Service, ...],
    *,
    ping_interval: float = 5.0,
    idle_timeout: float = 15.0,
    host_keys: tuple[str, ...] | None = None,
) -> int:
    """Run the agent in the foreground until SIGINT/SIGTERM or a fatal error.

    Returns the process exit code (:class:`ExitCode`).
    """
    agent = Agent(
        state,
        services,
        ping_interval=ping_interval,
        idle_timeout=idle_timeout,
        host_keys=host_keys,
    )
    return run_in_loop(agent)


def run_in_loop(agent: Agent) -> int:
    """Run ``agent`` on a fresh (uvloop if available) event loop in this thread."""

    async def main() -> int:
        if threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, agent.stop)
        return await agent.run()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main())
