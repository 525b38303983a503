"""The server's network shell: one TCP port, control TLS sessions and data connections.

Theory of operation. One listening socket; each accepted connection is
classified by its first byte (peeked, never consumed) within
``handshake_timeout``:

* ``0x16`` (a TLS handshake record): a control connection. asyncio runs TLS
  (``connect_accepted_socket``), and a :class:`ControlSession` drives the
  sans-I/O :class:`homeport.proto.control.ControlConnection`: bytes in,
  events out, bytes back, one timer.
* ``'H'``: a data connection. The 20-byte preamble is read (exactly; the
  end-to-end TLS bytes that follow stay in the kernel) and the socket goes to
  the :class:`homeport.server.relay.Relay`.
* anything else: closed with a logged reason.

Every decision (enrollment, authentication, may this stream open, netmap
contents) is made by :class:`homeport.server.state.ServerState`; this module
only moves bytes, keeps timers and words errors. A malformed frame closes
that one connection (with an ERROR frame where the framing still allows);
nothing a peer sends can stop the process.

Clocks: the control machines and timers use ``loop.time()`` (monotonic); the
state gets ``time.time()`` (unix seconds, stored in the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

from homeport.crypto.tls import ALPN_CONTROL, fingerprint
from homeport.proto.control import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_PING_INTERVAL,
    ConnectionClosed,
    ControlConnection,
    MessageReceived,
    Role,
    State,
)
from homeport.relay import UNPAIRED_TIMEOUT, Relay, RelayFull, TokenInUse
from homeport.server.state import (
    AuthError,
    EnrollError,
    OpenRefused,
    PendingStream,
    ServerState,
)
from homeport.store.db import NodeRow
from homeport.wire import control as m
from homeport.wire.data import (
    PREAMBLE_LEN,
    TLS_HANDSHAKE_BYTE,
    parse_preamble_untrusted,
    token_from_hex_untrusted,
)
from homeport.wire.errors import WireError

log = logging.getLogger("homeport.server")

#: From accept to an authenticated HELLO / complete ENROLL or data preamble.
HANDSHAKE_TIMEOUT = 5.0
#: How long a closing TLS connection waits for the peer's close_notify.
SSL_SHUTDOWN_TIMEOUT = 5.0
#: Connections not yet authenticated (TLS handshakes, preambles being read).
MAX_UNAUTHENTICATED = 512
#: How long the destination agent has to ACCEPT or REJECT an INCOMING.
OPEN_TIMEOUT = 10.0
#: At most one "too many handshakes" log line per this many seconds.
BUSY_LOG_INTERVAL = 5.0
#: Streams one session may have waiting for the destination's answer.
MAX_PENDING_OPENS_PER_SESSION = 64
#: Bytes queued towards a peer that does not read before we drop it.
MAX_WRITE_BUFFER = 8 * 1024 * 1024
#: Netmap changes within this window go out as one push per agent.
NETMAP_COALESCE = 0.05
#: How often waiting data connections are checked for their deadline.
SWEEP_INTERVAL = 0.5
#: Longest reject message from an agent we pass on.
MAX_REASON = 512
ROLE_AGENT = "agent"
ROLE_CLIENT = "client"


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Timeouts and limits of the network shell (defaults are production values)."""

    ping_interval: float = DEFAULT_PING_INTERVAL
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    open_timeout: float = OPEN_TIMEOUT
    unpaired_timeout: float = UNPAIRED_TIMEOUT
    max_unauthenticated: int = MAX_UNAUTHENTICATED


def _format_addr(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


class _Slot:
    """One unit of the unauthenticated-connection budget; release is idempotent."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._held = True
        service._unauthenticated += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._service._unauthenticated -= 1


class ControlSession(asyncio.Protocol):
    """One control TLS connection: the I/O shell around ControlConnection."""

    def __init__(self, service: Service, address: str, slot: _Slot) -> None:
        self.service = service
        self.address = address
        self.slot = slot
        self.node: NodeRow | None = None
        self.role: str | None = None
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.conn = ControlConnection(
            Role.SERVER,
            self._loop.time(),
            ping_interval=service.config.ping_interval,
            idle_timeout=service.config.idle_timeout,
        )
        self._peer_fp: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._opener_deadline: asyncio.TimerHandle | None = None
        self._lost = False

    def __repr__(self) -> str:
        who = self.node.name if self.node is not None else "?"
        return f"<ControlSession {who} {self.role or '-'} {self.address}>"

    # -- asyncio.Protocol -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but is one
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.service._sessions.add(self)
        ssl_obj = transport.get_extra_info("ssl_object")
        if not isinstance(ssl_obj, ssl.SSLObject | ssl.SSLSocket):
            self._abort("no TLS object")
            return
        if ssl_obj.selected_alpn_protocol() != ALPN_CONTROL:
            self._abort(f"ALPN is {ssl_obj.selected_alpn_protocol()!r}, not {ALPN_CONTROL!r}")
            return
        der = ssl_obj.getpeercert(binary_form=True)
        self._peer_fp = fingerprint(der) if der else None
        self._opener_deadline = self._loop.call_later(
            self.service.config.handshake_timeout, self._opener_timeout
        )
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data, self._loop.time())
        if self.node is not None and self.role == ROLE_AGENT:
            self.service.state.touch(self.node.node_id, time.time())
        self._process()

    def eof_received(self) -> bool | None:
        self.conn.receive_data(b"", self._loop.time())
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn.state is not State.CLOSED:
            self.conn.receive_data(b"", self._loop.time())
            while self.conn.next_event() is not None:
                pass
        self._teardown()

    def _teardown(self) -> None:
        """Unregister at once when the connection ends (not when TLS shutdown finishes)."""
        if self._lost:
            return
        self._lost = True
        for handle in (self._timer, self._opener_deadline):
            if handle is not None:
                handle.cancel()
        self.slot.release()
        self.service._session_lost(self)

    # -- output -----------------------------------------------------------------
    def send(self, msg: m.Message) -> None:
        """Queue and write ``msg``; silently dropped once the connection is closing."""
        if self.conn.state is State.CLOSED or self.transport is None or self._lost:
            return
        try:
            self.conn.send(msg)
        except ValueError as exc:  # larger than MAX_FRAME: our bug or a huge network
            log.error("%r: cannot send %s: %s", self, msg.TYPE.name, exc)
            return
        self._process()

    def close_with_error(self, code: str, message: str) -> None:
        """Send ERROR(code) and close (the machine goes CLOSED after ERROR)."""
        if self.conn.state is State.CLOSED or self._lost:
            if self.transport is not None:
                self.transport.close()
            return
        log.info("%r: closing: %s: %s", self, code, message)
        self.send(m.Error(code=code, message=message))

    def _abort(self, reason: str) -> None:
        log.info("control connection from %s closed: %s", self.address, reason)
        if self.transport is not None:
            self.transport.abort()

    # -- the loop of the sans-I/O machine ------------------------------------------
    def _process(self) -> None:
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, MessageReceived):
                try:
                    self._on_message(ev.message)
                except Exception:  # a bug here must cost one connection, not the server
                    log.exception("%r: failed handling %s", self, ev.message.TYPE.name)
                    self.close_with_error("internal", "internal server error")
            elif isinstance(ev, ConnectionClosed):
                self._on_closed(ev)
        self._flush()

    def _on_closed(self, ev: ConnectionClosed) -> None:
        level = logging.DEBUG if ev.code in ("eof", "local:node-removed") else logging.INFO
        log.log(level, "%r: connection closed (%s): %s", self, ev.code, ev.reason)
        if ev.code.startswith("protocol:") and self.transport is not None and not self._lost:
            # the machine is closed, but the peer still reads frames: tell it why
            code = ev.code.removeprefix("protocol:")
            with contextlib.suppress(Exception):
                self.transport.write(self.conn.data_to_send())
                self.transport.write(m.encode(m.Error(code=code, message=ev.reason[:MAX_REASON])))

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        data = self.conn.data_to_send()
        if data:
            transport.write(data)
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self._abort("peer is not reading (write buffer over its limit)")
            return
        if self.conn.state is State.CLOSED:
            transport.close()  # flushes what is buffered, then TLS close_notify
            self._teardown()
        else:
            self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.conn.get_timer()
        if when is not None and not self._lost:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.conn.handle_timer(self._loop.time())
        self._process()

    def _opener_timeout(self) -> None:
        self._opener_deadline = None
        if self.node is None and self.role is None:
            self._abort(f"no HELLO or ENROLL within {self.service.config.handshake_timeout:g}s")

    # -- messages ------------------------------------------------------------------
    def _on_message(self, msg: m.Message) -> None:
        if self.role is None:
            if self._opener_deadline is not None:
                self._opener_deadline.cancel()
                self._opener_deadline = None
            if isinstance(msg, m.Enroll):
                self._enroll(msg)
            elif isinstance(msg, m.Hello):
                self._hello(msg)
            return
        if self.role == "enroll" or self.node is None:
            return  # closing after ENROLLED/ERROR; ignore pipelined extras
        if isinstance(msg, m.Announce) and self.role == ROLE_AGENT:
            self.service._announce(self, msg)
        elif isinstance(msg, m.NetMapRequest):
            self.send(self.service.state.netmap(self.node.node_id, time.time()))
        elif isinstance(msg, m.Open):
            self.service._open(self, msg)
        elif isinstance(msg, m.Accept | m.Reject) and self.role == ROLE_AGENT:
            self.service._answer(self, msg)
        elif isinstance(msg, m.Error):
            pass  # the machine closes the connection
        else:
            self.close_with_error("bad-request", f"unexpected {msg.TYPE.name} from a {self.role}")

    def _enroll(self, msg: m.Enroll) -> None:
        self.role = "enroll"
        self.slot.release()
        if msg.proto != m.PROTOCOL_VERSION:
            self.close_with_error(
                "bad-version", f"server speaks protocol {m.PROTOCOL_VERSION}, not {msg.proto}"
            )
            return
        try:
            enrolled = self.service.state.enroll(msg.auth_key, msg.name, msg.csr_pem, time.time())
        except EnrollError as exc:
            log.info("enrollment from %s refused: %s: %s", self.address, exc.code, exc.message)
            self.close_with_error(exc.code, exc.message)
            return
        log.info("enrolled node %s (%s) from %s", enrolled.name, enrolled.node_id, self.address)
        self.send(
            m.Enrolled(
                node_id=enrolled.node_id,
                name=enrolled.name,
                cert_pem=enrolled.cert_pem,
                ca_pem=enrolled.ca_pem,
            )
        )
        if self.transport is not None:
            self.transport.close()
        self.service._netmap_changed()

    def _hello(self, msg: m.Hello) -> None:
        if msg.proto != m.PROTOCOL_VERSION:
            self.close_with_error(
                "bad-version", f"server speaks protocol {m.PROTOCOL_VERSION}, not {msg.proto}"
            )
            return
        if msg.role not in (ROLE_AGENT, ROLE_CLIENT):
            self.close_with_error("bad-request", f"unknown role {msg.role!r}")
            return
        if self._peer_fp is None:
            self.close_with_error(
                "unknown-node", "no node certificate presented; enroll first (homeport up)"
            )
            return
        try:
            node = self.service.state.authenticate(self._peer_fp)
        except AuthError as exc:
            log.info("HELLO from %s refused: %s: %s", self.address, exc.code, exc.message)
            self.close_with_error(exc.code, exc.message)
            return
        self.node = node
        self.role = msg.role
        self.slot.release()
        self.send(
            m.Welcome(
                proto=m.PROTOCOL_VERSION,
                node_id=node.node_id,
                name=node.name,
                ping_interval=self.service.config.ping_interval,
            )
        )
        self.service._session_ready(self)


class Service:
    """The listener and the glue between sessions, state and relay."""

    def __init__(
        self,
        state: ServerState[ControlSession],
        relay: Relay,
        ssl_context: ssl.SSLContext,
        config: ServiceConfig | None = None,
    ) -> None:
        self.state = state
        self.relay = relay
        self.ssl_context = ssl_context
        self.config = config or ServiceConfig()
        self._unauthenticated = 0
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: set[ControlSession] = set()
        self._open_timers: dict[str, asyncio.TimerHandle] = {}
        self._netmap_pending: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False
        self._refused_busy = 0
        self._next_busy_log = 0.0

    # -- lifecycle -------------------------------------------------------------
    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind and start accepting; returns the bound address."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self._spawn(self._accept_loop(sock))
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        bound = sock.getsockname()
        return str(bound[0]), int(bound[1])

    async def stop(self) -> None:
        """Stop accepting, close every session and the relay."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._netmap_pending is not None:
            self._netmap_pending.cancel()
        for handle in self._open_timers.values():
            handle.cancel()
        self._open_timers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.abort()
        await asyncio.sleep(0)
        await asyncio.to_thread(self.relay.close)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _sweep(self) -> None:
        self.relay.sweep()
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    # -- accepting and classifying -------------------------------------------------
    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            address = _format_addr(addr)
            if self._unauthenticated >= self.config.max_unauthenticated:
                self._refused_busy += 1
                now = loop.time()
                if now >= self._next_busy_log:  # one line per interval, not one per attacker SYN
                    self._next_busy_log = now + BUSY_LOG_INTERVAL
                    log.warning(
                        "refused %d connection(s) (latest %s): %d still handshaking (limit)",
                        self._refused_busy,
                        address,
                        self._unauthenticated,
                    )
                    self._refused_busy = 0
                sock.close()
                continue
            self._spawn(self._classify(sock, address, _Slot(self)))

    async def _wait_readable(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            loop.remove_reader(fd)

    async def _peek_first(self, sock: socket.socket) -> bytes:
        while True:
            await self._wait_readable(sock)
            try:
                return sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue

    async def _recv_exact(self, sock: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            await self._wait_readable(sock)
            try:
                chunk = sock.recv(n - len(buf))  # never more: what follows is not ours
            except (BlockingIOError, InterruptedError):
                continue
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} of {n} preamble bytes")
            buf += chunk
        return bytes(buf)

    async def _classify(self, sock: socket.socket, address: str, slot: _Slot) -> None:
        handed_off = False
        try:
            sock.setblocking(False)
            timeout = self.config.handshake_timeout
            try:
                first = await asyncio.wait_for(self._peek_first(sock), timeout)
            except TimeoutError:
                log.info("closing %s: sent nothing within %gs", address, timeout)
                return
            if not first:
                log.debug("%s closed before sending anything", address)
                return
            if first[0] == TLS_HANDSHAKE_BYTE:
                handed_off = await self._start_control(sock, address, slot)
            elif first == b"H":
                try:
                    data = await asyncio.wait_for(self._recv_exact(sock, PREAMBLE_LEN), timeout)
                    token = parse_preamble_untrusted(data)
                except TimeoutError:
                    log.info("closing data connection %s: no preamble within %gs", address, timeout)
                    return
                except (WireError, ConnectionError) as exc:
                    log.info("closing data connection %s: %s", address, exc)
                    return
                slot.release()
                sock.setblocking(True)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.relay.attach(token, sock)
                handed_off = True
            else:
                log.info(
                    "closing %s: first byte 0x%02x is neither TLS nor a homeport data preamble",
                    address,
                    first[0],
                )
        except OSError as exc:
            log.info("closing %s: %s", address, exc)
        finally:
            if not handed_off:
                slot.release()
                sock.close()

    async def _start_control(self, sock: socket.socket, address: str, slot: _Slot) -> bool:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: ControlSession(self, address, slot),
                sock,
                ssl=self.ssl_context,
                ssl_handshake_timeout=self.config.handshake_timeout,
                ssl_shutdown_timeout=SSL_SHUTDOWN_TIMEOUT,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("TLS handshake with %s failed: %s", address, exc)
            slot.release()
        except Exception:
            log.exception("control connection from %s failed to start", address)
            slot.release()
        return True  # the transport owns the socket now, whatever happened

    # -- sessions ---------------------------------------------------------------------
    def _session_ready(self, session: ControlSession) -> None:
        node = session.node
        assert node is not None
        self._sessions.add(session)
        self.state.session_opened(node.node_id, session)
        if session.role == ROLE_AGENT:
            old = self.state.agent_online(node, session, session.address, time.time())
            if old is not None:
                old.close_with_error(
                    "session-replaced", "a newer agent session of this node connected"
                )
            log.info("agent %s (%s) online from %s", node.name, node.node_id, session.address)
            self._netmap_changed()

    def _session_lost(self, session: ControlSession) -> None:
        self._sessions.discard(session)
        node = session.node
        if node is None:
            return
        self.state.session_closed(node.node_id, session)
        now = time.time()
        for p in self.state.pending_of_opener(session):
            self.state.drop_stream(p.stream_id)
            self._forget_pending(p)
        if session.role == ROLE_AGENT and self.state.agent_session(node.node_id) is session:
            for p in self.state.agent_offline(node.node_id, session, now):
                self._fail_pending(p, "offline", f"{p.dst.name} went offline")
            log.info("agent %s (%s) offline", node.name, node.node_id)
            self._netmap_changed()

    def _announce(self, session: ControlSession, msg: m.Announce) -> None:
        node = session.node
        assert node is not None
        changed = self.state.announce(node.node_id, msg.services, msg.host_keys, time.time())
        session.send(self.state.netmap(node.node_id, time.time()))
        if changed:
            log.info(
                "agent %s exposes %s",
                node.name,
                ", ".join(f"{s.name}/{s.port}" for s in msg.services) or "nothing",
            )
            self._netmap_changed()

    # -- streams --------------------------------------------------------------------------
    def _open(self, session: ControlSession, msg: m.Open) -> None:
        node = session.node
        assert node is not None
        token_text = msg.token[:64]
        try:
            token = token_from_hex_untrusted(msg.token)
        except WireError as exc:
            session.send(m.OpenFailed(token=token_text, code="bad-request", message=str(exc)))
            return
        if len(self.state.pending_of_opener(session)) >= MAX_PENDING_OPENS_PER_SESSION:
            self.relay.refuse_token(token)
            session.send(
                m.OpenFailed(token=token_text, code="busy", message="too many opens in flight")
            )
            return
        try:
            p = self.state.open_stream(
                node, session, msg.dst, msg.service, opener_token=token, now=time.time()
            )
        except OpenRefused as exc:
            log.info("%s: OPEN %s:%s refused: %s", node.name, msg.dst, msg.service, exc.code)
            self.relay.refuse_token(token)
            session.send(m.OpenFailed(token=token_text, code=exc.code, message=exc.message))
            return
        try:
            self.relay.expect(
                p.stream_id,
                src_node=p.src.node_id,
                dst_node=p.dst.node_id,
                src_token=p.opener_token,
                dst_token=p.dest_token,
                timeout=self.config.open_timeout + self.config.unpaired_timeout,
            )
        except (RelayFull, TokenInUse) as exc:
            self.state.drop_stream(p.stream_id)
            self.relay.refuse_token(token)
            code = "busy" if isinstance(exc, RelayFull) else "bad-request"
            session.send(m.OpenFailed(token=token_text, code=code, message=str(exc)))
            return
        agent = self.state.agent_session(p.dst.node_id)
        assert agent is not None  # open_stream checked it is online
        agent.send(
            m.Incoming(
                stream_id=p.stream_id,
                token=p.dest_token.hex(),
                src=m.PeerInfo(
                    node_id=p.src.node_id, name=p.src.name, fingerprint=p.src.fingerprint
                ),
                service=p.service.name,
            )
        )
        loop = asyncio.get_running_loop()
        self._open_timers[p.stream_id] = loop.call_later(
            self.config.open_timeout, self._open_timed_out, p.stream_id
        )
        log.info(
            "stream %s: %s -> %s:%s requested", p.stream_id, p.src.name, p.dst.name, p.service.name
        )

    def _answer(self, session: ControlSession, msg: m.Accept | m.Reject) -> None:
        node = session.node
        assert node is not None
        p = self.state.accept_stream(msg.stream_id, node.node_id)
        if p is None:
            log.info("%s answered unknown or expired stream %s", node.name, msg.stream_id[:32])
            return
        timer = self._open_timers.pop(p.stream_id, None)
        if timer is not None:
            timer.cancel()
        if isinstance(msg, m.Reject):
            log.info("stream %s: rejected by %s: %s", p.stream_id, node.name, msg.code)
            self.relay.cancel(p.stream_id)
            p.opener.send(
                m.OpenFailed(
                    token=p.opener_token.hex(),
                    code=msg.code[:64] or "rejected",
                    message=msg.message[:MAX_REASON],
                )
            )
            return
        self.relay.extend(p.stream_id, self.config.unpaired_timeout)
        p.opener.send(
            m.Opened(
                token=p.opener_token.hex(),
                stream_id=p.stream_id,
                peer=m.PeerInfo(
                    node_id=p.dst.node_id,
                    name=p.dst.name,
                    fingerprint=p.dst.fingerprint,
                    host_keys=p.dst.host_keys,
                ),
                port=p.service.port,
            )
        )

    def _open_timed_out(self, stream_id: str) -> None:
        self._open_timers.pop(stream_id, None)
        p = self.state.drop_stream(stream_id)
        if p is not None:
            self._fail_pending(
                p,
                "timeout",
                f"{p.dst.name} did not answer within {self.config.open_timeout:g}s",
            )

    def _forget_pending(self, p: PendingStream[ControlSession]) -> None:
        timer = self._open_timers.pop(p.stream_id, None)
        if timer is not None:
            timer.cancel()
        self.relay.cancel(p.stream_id)

    def _fail_pending(self, p: PendingStream[ControlSession], code: str, message: str) -> None:
        self._forget_pending(p)
        log.info("stream %s: failed: %s: %s", p.stream_id, code, message)
        p.opener.send(m.OpenFailed(token=p.opener_token.hex(), code=code, message=message))

    # -- netmap ------------------------------------------------------------------------------
    def _netmap_changed(self) -> None:
        if self._netmap_pending is None and not self._closing:
            loop = asyncio.get_running_loop()
            self._netmap_pending = loop.call_later(NETMAP_COALESCE, self._push_netmaps)

    def _push_netmaps(self) -> None:
        self._netmap_pending = None
        agents = self.state.online_agents()
        if not agents:
            return
        nodes = self.state.netmap_nodes(time.time())
        for node_id, session in agents:
            session.send(m.NetMap(self_id=node_id, nodes=nodes))

    # -- admin operations with live effects ------------------------------------------------------
    def remove_node(self, name: str) -> NodeRow:
        """Tombstone ``name``, close its sessions, cut its streams. Raises KeyError."""
        removal = self.state.remove_node(name, time.time())
        for session in removal.sessions:
            session.close_with_error("node-removed", "this node was removed by an admin")
        for p in removal.failed_streams:
            self._fail_pending(p, "node-removed", f"{removal.node.name} was removed by an admin")
        cut = self.relay.cut_node(removal.node.node_id)
        log.info(
            "node %s (%s) removed; %d session(s) closed, %d stream(s) cut",
            removal.node.name,
            removal.node.node_id,
            len(removal.sessions),
            cut,
        )
        self._netmap_changed()
        return removal.node

    @property
    def unauthenticated(self) -> int:
        return self._unauthenticated
