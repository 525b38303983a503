"""The server's network shell: one TCP port, control TLS sessions and data connections.

Theory of operation. One listening socket; each accepted connection is
classified by its first byte (peeked, never consumed) within
``handshake_timeout``:

* ``0x16`` (a TLS handshake record): a control connection, accepted as plain TCP
  (``connect_accepted_socket``): a :class:`homeport.io.control.ControlLink` runs the TLS
  over memory BIOs (less memory per agent than asyncio's TLS) and drives the sans-I/O
  :class:`homeport.proto.control.ControlConnection`: bytes in, events out, bytes back,
  one timer.
* ``'H'``: a data connection. The 20-byte preamble is read (exactly; the
  end-to-end TLS bytes that follow stay in the kernel) and the socket goes to
  the relay (:mod:`homeport.relay`) -- unless it is a whoami request
  (``HPW\x01``, :mod:`homeport.wire.probe`): then the answer is the address
  and port this connection comes from, and the connection is closed.
* ``0x16`` offering ALPN ``homeport-data/1``: a TLS-wrapped data connection
  (detection rule: :mod:`homeport.wire.data`); :mod:`homeport.server.tlsdata`
  terminates the outer TLS and gives the relay the inside.
* anything else: closed with a logged reason.

A second, optional listener (the **probe port**, default main port + 1) speaks
only whoami, within :data:`PROBE_TIMEOUT` and at most :data:`MAX_PROBE_CONNECTIONS`
at once: a node that asks both ports from the same source port learns whether
its NAT maps endpoint-independently (docs/nat-traversal.md).

Every decision (enrollment, authentication, may this stream open, peer maps,
timeouts) is made by the pure :class:`homeport.proto.coord.Coordinator`; this
module feeds it (sessions, messages, relay events, the database's answers) and
executes its commands (send, close, relay, persist). Control connections are
driven by the shared :class:`homeport.io.control.ControlLink`. A malformed
frame closes that one connection (with an ERROR frame where the framing still
allows); nothing a peer sends can stop the process.

Clocks: the control machines use ``loop.time()`` (monotonic); the coordinator
gets ``time.time()`` (unix seconds: its timestamps are stored).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import enum
import functools
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from homeport import relay as hprelay
from homeport.crypto.tls import ALPN_CONTROL, fingerprint
from homeport.io.control import ControlLink
from homeport.io.pump import set_keepalive
from homeport.policy.acl import CompiledPolicy
from homeport.proto import coord as c
from homeport.proto.audit import Audit
from homeport.proto.control import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_PING_INTERVAL,
    ConnectionClosed,
    Role,
)
from homeport.relay import UNPAIRED_TIMEOUT, Relay, RelayFull, TokenInUse
from homeport.server.tlsdata import TlsDataTerminator
from homeport.store.registry import Registry, WriteBehind
from homeport.wire import control as m
from homeport.wire import probe, tlshello
from homeport.wire.data import (
    ALPN_DATA,
    PREAMBLE_LEN,
    TLS_HANDSHAKE_BYTE,
    is_wrapped_data,
    parse_preamble_untrusted,
)
from homeport.wire.errors import WireError
from homeport.wire.logtext import esc

log = logging.getLogger("homeport.server")

#: From accept to an authenticated HELLO / complete ENROLL or data preamble.
HANDSHAKE_TIMEOUT = 5.0
#: Connections not yet authenticated (TLS handshakes, preambles being read).
MAX_UNAUTHENTICATED = 512
#: Of those, at most this many from one source address; a new connection from a source at
#: its limit evicts that source's oldest unauthenticated one (a flooder only displaces itself).
MAX_UNAUTHENTICATED_PER_SOURCE = 64
#: Accept queue of the listening sockets (the kernel caps it at net.core.somaxconn). With
#: 1024, 5,000 agents reconnecting at once overflowed it (SYN cookies, retransmitted SYNs:
#: seconds of connect delay); agents reconnect in bursts after any server or network blip.
LISTEN_BACKLOG = 4096
#: At most one "too many handshakes" log line per this many seconds.
BUSY_LOG_INTERVAL = 5.0
#: How often waiting data connections are checked for their deadline.
SWEEP_INTERVAL = 0.5
#: Give freed heap back to the OS (glibc ``malloc_trim``) once this many unauthenticated
#: connections have ended since the last trim: after a flood the freed TLS and frame
#: buffers otherwise stay in the process for good (measured: docs/reliability.md) ...
TRIM_AFTER_RELEASED = 64
#: ... but at most once per this many seconds (a trim of a large heap takes milliseconds).
TRIM_INTERVAL = 2.0
#: Whole life of one connection to the probe port (request in, answer out).
PROBE_TIMEOUT = 5.0
#: Connections the probe port serves at once (more are closed at accept).
MAX_PROBE_CONNECTIONS = 128
#: Reachability probes (one TCP connect each, to a node's own address) in flight at once.
MAX_REACH_PROBES = 32
#: SIGTERM: how long open streams may go on after the server stopped taking connections.
DRAIN_GRACE = 10.0
#: How often a draining server looks whether its streams have ended.
DRAIN_POLL = 0.1
#: ServiceConfig.probe_port: -1 = main port + 1 (ephemeral if the main port is), 0 = none.
PROBE_PORT_AUTO = -1
#: While a ClientHello's first record is still arriving, peek again after this many seconds
#: (a peeked socket stays readable, so waiting for readability would spin).
HELLO_PEEK_INTERVAL = 0.005


class Refusal(enum.Enum):
    """Why the shell dropped a connection before any session began (a fixed vocabulary:
    :mod:`homeport.server.metrics` counts them by this value, so it stays bounded)."""

    EVICTED = "evicted"  # the unauthenticated budget (global or per source) was full
    HANDSHAKE_TIMEOUT = "handshake-timeout"  # nothing, or no whole preamble, in time
    BAD_PREAMBLE = "bad-preamble"  # 'H' but not a valid data preamble / whoami
    UNKNOWN_PROTOCOL = "unknown-protocol"  # the first byte is neither TLS nor 'H'
    TLS_FAILED = "tls-failed"  # the control connection's TLS handshake failed
    PROBE_BUSY = "probe-busy"  # MAX_PROBE_CONNECTIONS reached on the probe port


@dataclass(frozen=True, slots=True)
class ConnectionRefused:
    """Observer event (:attr:`Service.observe`): one connection dropped for ``reason``."""

    reason: Refusal


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Timeouts and limits of the network shell (defaults are production values)."""

    ping_interval: float = DEFAULT_PING_INTERVAL
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    open_timeout: float = c.OPEN_TIMEOUT
    unpaired_timeout: float = UNPAIRED_TIMEOUT
    max_unauthenticated: int = MAX_UNAUTHENTICATED
    max_unauthenticated_per_source: int = MAX_UNAUTHENTICATED_PER_SOURCE
    probe_port: int = PROBE_PORT_AUTO  # the whoami listener (-1 auto, 0 none, or a port)
    relay_only: bool = False  # never coordinate direct paths (WELCOME direct: false)
    tls_data: bool = True  # accept TLS-wrapped data connections (ALPN homeport-data/1)


def observed_address(sock: socket.socket) -> tuple[str, int]:
    """The peer's address as the whoami answer carries it (IPv4-mapped IPv6 unwrapped)."""
    peer = sock.getpeername()
    host, port = str(peer[0]), int(peer[1])
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return host.partition("%")[0], port


def _format_addr(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


class _Slot:
    """One unit of the unauthenticated-connection budget; release is idempotent.

    Slots are kept per source address in arrival order, so the admission policy can
    evict the oldest unauthenticated connection of the heaviest source.
    """

    def __init__(self, service: Service, source: str) -> None:
        self._service = service
        self._held = True
        self.source = source
        #: Drops the connection this slot stands for (set by whoever owns it at the time).
        self.kill: Callable[[], None] | None = None
        service._unauthenticated += 1
        service._by_source.setdefault(source, {})[self] = None

    def release(self) -> None:
        if self._held:
            self._held = False
            self._service._unauthenticated -= 1
            self._service._released += 1
            held = self._service._by_source.get(self.source)
            if held is not None:
                held.pop(self, None)
                if not held:
                    del self._service._by_source[self.source]

    def evict(self) -> None:
        """Release the slot and drop its connection."""
        kill, self.kill = self.kill, None
        self.release()
        if kill is not None:
            kill()


@functools.cache
def _libc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return cast(Callable[[int], int], trim)


def _malloc_trim() -> None:
    """Return free heap pages to the OS (glibc only; elsewhere a no-op)."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


def _source_of(addr: object) -> str:
    """The admission key of a peer address: its host, IPv4-mapped IPv6 unwrapped."""
    host = str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return host.partition("%")[0]


class Service:
    """The listener, the control links, and the executor of the coordinator's commands."""

    def __init__(
        self,
        core: c.Coordinator,
        registry: Registry,
        writer: WriteBehind,
        relay: Relay,
        ssl_context: ssl.SSLContext,
        *,
        config: ServiceConfig | None = None,
        audit: Callable[[Audit], None] | None = None,
    ) -> None:
        self.core = core
        #: Where the core's Audit commands go (:meth:`homeport.server.audit.AuditSink.submit`).
        self.audit = audit
        self.registry = registry
        self.writer = writer
        self.relay = relay
        self.ssl_context = ssl_context
        self.config = config or ServiceConfig()
        self._unauthenticated = 0
        self._by_source: dict[str, dict[_Slot, None]] = {}
        self._released = 0  # unauthenticated connections ended since the last trim
        self._next_trim = 0.0
        self._acceptors: list[asyncio.Task[None]] = []
        self._evicted = 0
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: dict[c.SessionId, ControlLink] = {}
        self._sids: dict[ControlLink, c.SessionId] = {}
        self._slots: dict[ControlLink, _Slot] = {}
        self._started: set[c.SessionId] = set()
        self._next_sid = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_busy_log = 0.0
        self._probe_listener: socket.socket | None = None
        self._probe_conns = 0
        self._reach_probes: set[asyncio.Task[None]] = set()
        #: The bound whoami probe port (0: none).
        self.probe_port = 0
        #: Sees every core command before it runs, and :class:`ConnectionRefused` events
        #: (the metrics adapter, :mod:`homeport.server.metrics`); must not block or raise.
        self.observe: Callable[[object], None] | None = None
        self.tls_data: TlsDataTerminator | None = None
        if self.config.tls_data:
            # One context for both: a control handshake still insists on homeport-control/1.
            ssl_context.set_alpn_protocols([ALPN_CONTROL, ALPN_DATA])
            self.tls_data = TlsDataTerminator(
                ssl_context, relay.attach, handshake_timeout=self.config.handshake_timeout
            )

    # -- lifecycle -------------------------------------------------------------
    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind and start accepting (and the probe port); returns the main bound address."""
        loop = asyncio.get_running_loop()
        sock = await self._bind(host, port)
        self._listener = sock
        self._loop = loop
        self._acceptors.append(self._spawn(self._accept_loop(sock)))
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        self._rearm()  # timers of loaded nodes (expiry, ephemeral removal) run without traffic
        bound = sock.getsockname()
        await self._start_probe(host, port, int(bound[1]))
        return str(bound[0]), int(bound[1])

    async def _start_probe(self, host: str, port: int, bound_port: int) -> None:
        want = self.config.probe_port
        if want == 0:
            return
        if want < 0:
            want = 0 if port == 0 else bound_port + 1
            if want > 65535:
                log.warning("no probe port (main port %d is the last one)", bound_port)
                return
        try:
            psock = await self._bind(host, want)
        except OSError as exc:
            if self.config.probe_port > 0:
                raise
            log.warning(
                "probe port %d unavailable (%s): nodes cannot measure their NAT's mapping",
                want,
                exc,
            )
            return
        self._probe_listener = psock
        self.probe_port = int(psock.getsockname()[1])
        self.core.probe_port = self.probe_port
        self._acceptors.append(self._spawn(self._probe_loop(psock)))

    async def _bind(self, host: str, port: int) -> socket.socket:
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
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def drain(self, grace: float) -> int:
        """Graceful stop (SIGTERM), before :meth:`stop`: stop accepting connections, tell the
        nodes (ERROR ``server-stopping``: they reconnect with backoff, and open no new
        streams here meanwhile), and let open streams run for up to ``grace`` seconds.
        Returns how many streams were still open when the grace ran out."""
        for task in self._acceptors:
            task.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        for lst in (self._listener, self._probe_listener):
            if lst is not None:
                lst.close()
        self._listener = self._probe_listener = None
        for link in list(self._links.values()):
            link.close_with_error("server-stopping", "the server is shutting down; reconnecting")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.core.stream_states():
            log.info("draining %d stream(s) for up to %gs", len(self.core.stream_states()), grace)
        while self.core.stream_states() and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL)
        left = len(self.core.stream_states())
        if left:
            log.info("grace of %gs over: cutting %d stream(s)", grace, left)
        return left

    async def stop(self) -> None:
        """Stop accepting, close every session and the relay, write what is queued."""
        self._closing = True
        for handle in (self._sweeper, self._timer):
            if handle is not None:
                handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._probe_listener is not None:
            self._probe_listener.close()
            self._probe_listener = None
        for link in list(self._links.values()):
            if link.transport is not None:
                link.transport.abort()
        await asyncio.sleep(0)
        await asyncio.to_thread(self.relay.close)
        await asyncio.to_thread(self.writer.flush)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _sweep(self) -> None:
        self.relay.sweep()
        loop = asyncio.get_running_loop()
        if self._released >= TRIM_AFTER_RELEASED and loop.time() >= self._next_trim:
            self._released = 0
            self._next_trim = loop.time() + TRIM_INTERVAL
            _malloc_trim()
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
            slot = self._admit(_source_of(addr), address, loop.time())
            task = self._spawn(self._classify(sock, address, slot))
            slot.kill = functools.partial(_cancel, task)  # its finally closes the socket

    def _admit(self, source: str, address: str, now: float) -> _Slot:
        """Make room for one more unauthenticated connection from ``source``.

        Never refuses the newcomer (a reconnecting node must get in during a flood):
        when ``source`` is at its own limit its oldest pending connection goes; when the
        global budget is full the oldest of the source holding the most slots goes. An
        attacker with few addresses thus only ever evicts itself, and a legitimate
        handshake, which takes milliseconds, is rarely the oldest.
        """
        held = self._by_source.get(source)
        victim: _Slot | None = None
        if held is not None and len(held) >= self.config.max_unauthenticated_per_source:
            victim = next(iter(held))
        elif self._unauthenticated >= self.config.max_unauthenticated and self._by_source:
            heaviest = max(self._by_source.values(), key=len)
            victim = next(iter(heaviest))
        if victim is not None:
            victim.evict()
            self._evicted += 1
            self._notify(ConnectionRefused(Refusal.EVICTED))
            if now >= self._next_busy_log:  # one line per interval, not one per attacker SYN
                self._next_busy_log = now + BUSY_LOG_INTERVAL
                log.warning(
                    "evicted %d unauthenticated connection(s) (latest from %s, admitting %s): "
                    "%d handshaking, %d source(s)",
                    self._evicted,
                    esc(victim.source),
                    esc(address),
                    self._unauthenticated,
                    len(self._by_source),
                )
                self._evicted = 0
        return _Slot(self, source)

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
                self._notify(ConnectionRefused(Refusal.HANDSHAKE_TIMEOUT))
                return
            if not first:
                log.debug("%s closed before sending anything", address)
                return
            if first[0] == TLS_HANDSHAKE_BYTE:
                if await self._wrapped_data(sock, address, slot):
                    handed_off = True
                    return
                handed_off = await self._start_control(sock, address, slot)
            elif first == b"H":
                try:
                    data = await asyncio.wait_for(self._recv_exact(sock, PREAMBLE_LEN), timeout)
                    if probe.is_probe(data):
                        await asyncio.wait_for(self._answer_whoami(sock, data), timeout)
                        return
                    token = parse_preamble_untrusted(data)
                except TimeoutError:
                    log.info("closing data connection %s: no preamble within %gs", address, timeout)
                    self._notify(ConnectionRefused(Refusal.HANDSHAKE_TIMEOUT))
                    return
                except (WireError, ConnectionError) as exc:
                    log.info("closing data connection %s: %s", address, esc(exc))
                    self._notify(ConnectionRefused(Refusal.BAD_PREAMBLE))
                    return
                slot.release()
                sock.setblocking(True)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                set_keepalive(sock)  # a vanished peer must not hold a relay slot forever
                self.relay.attach(token, sock)
                handed_off = True
            else:
                log.info(
                    "closing %s: first byte 0x%02x is neither TLS nor a homeport data preamble",
                    address,
                    first[0],
                )
                self._notify(ConnectionRefused(Refusal.UNKNOWN_PROTOCOL))
        except OSError as exc:
            log.info("closing %s: %s", address, exc)
        finally:
            if not handed_off:
                slot.release()
                sock.close()

    async def _offered_alpn(self, sock: socket.socket) -> tuple[str, ...]:
        """The ALPN names of the ClientHello waiting in ``sock`` (peeked, not consumed)."""
        while True:
            try:
                head = sock.recv(tlshello.MAX_PEEK, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                head = b"\x16"  # nothing new yet (the first byte was there)
            if not head:
                return ()  # closed: the control path logs it
            try:
                names = tlshello.offered_alpn_untrusted(head)
            except WireError:
                return ()  # the control path's TLS handshake will refuse it with a reason
            if names is not None:
                return names
            await asyncio.sleep(HELLO_PEEK_INTERVAL)

    async def _wrapped_data(self, sock: socket.socket, address: str, slot: _Slot) -> bool:
        """A TLS-wrapped data connection goes to the terminator (True: it owns ``sock``)."""
        timeout = self.config.handshake_timeout
        try:
            names = await asyncio.wait_for(self._offered_alpn(sock), timeout)
        except TimeoutError:  # the handshake's time is spent: no second allowance for control
            log.info("closing %s: no complete TLS ClientHello within %gs", address, timeout)
            sock.close()
            slot.release()
            return True
        if not is_wrapped_data(names) or self.tls_data is None:
            return False  # --no-tls-data: the control handshake refuses it (no common ALPN)
        loop = asyncio.get_running_loop()

        def released() -> None:
            loop.call_soon_threadsafe(slot.release)

        if not self.tls_data.start(sock, address, released):
            log.warning("closing %s: %d TLS-wrapped data connections already", address,
                        self.tls_data.active)  # fmt: skip
            sock.close()
            slot.release()
        return True

    # -- whoami (wire.probe) -----------------------------------------------------------
    async def _answer_whoami(self, sock: socket.socket, request: bytes) -> None:
        """Answer a complete whoami request with the address ``sock`` comes from."""
        nonce = probe.parse_request_untrusted(request)
        host, port = observed_address(sock)
        await asyncio.get_running_loop().sock_sendall(sock, probe.encode_answer(nonce, host, port))

    async def _probe_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _addr = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.warning("probe port: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if self._probe_conns >= MAX_PROBE_CONNECTIONS:
                sock.close()
                self._notify(ConnectionRefused(Refusal.PROBE_BUSY))
                continue
            self._probe_conns += 1
            self._spawn(self._probe_one(sock))

    async def _probe_one(self, sock: socket.socket) -> None:
        async def serve() -> None:
            request = await self._recv_exact(sock, probe.REQUEST_LEN)
            await self._answer_whoami(sock, request)

        try:
            sock.setblocking(False)
            await asyncio.wait_for(serve(), PROBE_TIMEOUT)  # the whole exchange
        except (TimeoutError, WireError, OSError, ConnectionError) as exc:
            log.debug("probe port: %s", exc)
        finally:
            self._probe_conns -= 1
            sock.close()

    async def _start_control(self, sock: socket.socket, address: str, slot: _Slot) -> bool:
        """Accept a control connection: plain TCP, the link runs TLS itself (io.control)."""
        loop = asyncio.get_running_loop()

        def make() -> ControlLink:
            link = ControlLink(
                Role.SERVER,
                self,
                ssl_context=self.ssl_context,
                address=address,
                ping_interval=self.config.ping_interval,
                idle_timeout=self.config.idle_timeout,
                handshake_timeout=self.config.handshake_timeout,
                answer_timeout=self.config.handshake_timeout,
            )
            self._next_sid += 1
            self._links[self._next_sid] = link
            self._sids[link] = self._next_sid
            self._slots[link] = slot
            cancel = slot.kill

            def kill() -> None:  # mid-handshake: cancel the task; after it: drop the link
                if cancel is not None:
                    cancel()
                if link.transport is not None:
                    link.abort("evicted: too many unauthenticated connections")

            slot.kill = kill
            return link

        try:
            _, link = await loop.connect_accepted_socket(make, sock)
            await link.handshake()
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("TLS handshake with %s failed: %s", address, exc)
            slot.release()
            self._notify(ConnectionRefused(Refusal.TLS_FAILED))
        except Exception:
            log.exception("control connection from %s failed to start", address)
            slot.release()
        return True  # the transport owns the socket now, whatever happened

    # -- ControlHandler (called by the links) ----------------------------------------
    def control_message(self, link: ControlLink, msg: m.Message) -> None:
        sid = self._sids.get(link)
        if sid is None:
            return
        if sid not in self._started:
            self._started.add(sid)
            der = link.peer_cert_der()
            self.core.session_started(sid, fingerprint(der) if der else None, link.address)
            slot = self._slots.pop(link, None)
            if slot is not None:  # HELLO or ENROLL arrived: the handshake phase is over
                slot.release()
        self.core.message(sid, msg, time.time())
        self._run()

    def control_closed(self, link: ControlLink, ev: ConnectionClosed) -> None:
        # "tls": a failed handshake, logged by _start_control
        quiet = ev.code in ("eof", "tls", "local:node-removed", "local:session-replaced")
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "control connection %s closed (%s): %s",
            link.address,
            esc(ev.code),
            esc(ev.reason),
        )
        slot = self._slots.pop(link, None)
        if slot is not None:
            slot.release()
        sid = self._sids.pop(link, None)
        if sid is None:
            return
        self._links.pop(sid, None)
        if sid in self._started:
            self._started.discard(sid)
            self.core.session_ended(sid, time.time())
            self._run()

    # -- executing the core's commands ---------------------------------------------------
    def _run(self) -> None:
        """Execute every command the core produced (executing may produce more)."""
        while cmds := self.core.commands():
            for cmd in cmds:
                if self.observe is not None:
                    self._notify(cmd)  # before it runs: a Close still sees its session
                try:
                    self._execute(cmd)
                except Exception:  # one failed command must not lose the others
                    log.exception("executing %r failed", cmd)
        self._rearm()

    def _notify(self, event: object) -> None:
        if self.observe is not None:
            try:
                self.observe(event)
            except Exception:  # an observer's bug must not break the server
                log.exception("observer failed on %r", event)

    def _execute(self, cmd: c.Command) -> None:
        if isinstance(cmd, c.Send):
            link = self._links.get(cmd.session)
            if link is not None:
                link.send(cmd.message)
        elif isinstance(cmd, c.SendEncoded):
            link = self._links.get(cmd.session)
            if link is not None:
                link.send_encoded(cmd.data)
        elif isinstance(cmd, c.Close):
            link = self._links.get(cmd.session)
            if link is not None:
                log.info("%s: closing: %s: %s", link.address, esc(cmd.code), esc(cmd.message))
                link.close_with_error(cmd.code, cmd.message)
        elif isinstance(cmd, c.Finish):
            link = self._links.get(cmd.session)
            if link is not None:
                link.finish()
        elif isinstance(cmd, c.RelayExpect):
            try:
                self.relay.expect(
                    cmd.stream_id,
                    src_node=cmd.src_node,
                    dst_node=cmd.dst_node,
                    src_token=cmd.src_token,
                    dst_token=cmd.dst_token,
                    timeout=cmd.timeout,
                )
            except RelayFull as exc:
                self.core.relay_refused(cmd.stream_id, "busy", str(exc))
            except TokenInUse as exc:
                self.core.relay_refused(cmd.stream_id, "bad-request", f"token in use: {exc}")
        elif isinstance(cmd, c.RelayExtend):
            self.relay.extend(cmd.stream_id, cmd.timeout)
        elif isinstance(cmd, c.RelayCancel):
            self.relay.cancel(cmd.stream_id)
        elif isinstance(cmd, c.RelayRefuse):
            self.relay.refuse_token(cmd.token)
        elif isinstance(cmd, c.RelayCut):
            self.relay.cut_node(cmd.node_id)
        elif isinstance(cmd, c.RelayCutStream):
            self.relay.cut_stream(cmd.stream_id, cmd.reason)
        elif isinstance(cmd, c.Persist):
            self.writer.submit(cmd.op)
        elif isinstance(cmd, c.EnrollRequest):
            self._enroll(cmd)
        elif isinstance(cmd, c.Note):
            log.log(cmd.level, "%s", cmd.text)
        elif isinstance(cmd, Audit) and self.audit is not None:
            self.audit(cmd)  # queued: never waits for the disk
        elif isinstance(cmd, c.ProbeReach):
            self._probe_reach(cmd)

    def _probe_reach(self, cmd: c.ProbeReach) -> None:
        """One bounded TCP connect to a node's own observed address (the core rate-limits)."""
        if len(self._reach_probes) >= MAX_REACH_PROBES:
            self.core.reach_probed(cmd.node_id, cmd.host, cmd.port, False, time.time())
            return

        async def probe() -> None:
            ok = False
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(cmd.host, cmd.port), c.REACH_PROBE_TIMEOUT
                )
            except (OSError, TimeoutError):
                pass
            else:
                ok = True
                writer.close()  # nothing sent: the agent drops a connection that only ends
            self.core.reach_probed(cmd.node_id, cmd.host, cmd.port, ok, time.time())
            self._run()

        task = asyncio.get_running_loop().create_task(probe())
        self._reach_probes.add(task)
        task.add_done_callback(self._reach_probes.discard)

    def _enroll(self, req: c.EnrollRequest) -> None:
        loop = asyncio.get_running_loop()
        fut = self.writer.call(self.registry.enroll, req)

        def done(f: concurrent.futures.Future[c.NodeRecord | c.EnrollRefused]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server stopped
                loop.call_soon_threadsafe(self._enroll_done, req, f)

        fut.add_done_callback(done)

    def _enroll_done(
        self, req: c.EnrollRequest, fut: concurrent.futures.Future[c.NodeRecord | c.EnrollRefused]
    ) -> None:
        try:
            result = fut.result()
        except Exception as exc:
            log.error("enrollment of %s failed in the database: %s", esc(req.node.name), exc)
            result = c.EnrollRefused("internal", "the server could not store the node; retry")
        self.core.enroll_done(req.session, result, time.time())
        self._run()

    def relay_event(self, ev: hprelay.RelayEvent) -> None:
        """From the relay, on any thread: a stream was spliced or ended."""
        loop = self._loop
        if loop is None or self._closing:
            return
        core_ev: c.RelayEvent
        if isinstance(ev, hprelay.StreamStarted):
            core_ev = c.StreamStarted(ev.stream_id)
        else:
            core_ev = c.StreamEnded(ev.stream_id, ev.bytes_up, ev.bytes_down, ev.reason)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._relay_event, core_ev)

    def _relay_event(self, ev: c.RelayEvent) -> None:
        self.core.relay_event(ev, time.time())
        self._run()

    # -- the core's timer --------------------------------------------------------------
    def _rearm(self) -> None:
        when = self.core.get_timer()
        if when == self._timer_at or self._closing:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            delay = max(0.0, when - time.time())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        due = self._timer_at or 0.0
        self._timer = None
        self._timer_at = None
        # the loop's clock may fire a hair early against the wall clock: treat it as due
        self.core.handle_timer(max(time.time(), due))
        self._run()

    # -- admin operations with live effects ------------------------------------------------
    def remove_node(self, name: str) -> c.NodeRecord:
        """Tombstone ``name``, close its sessions, cut its streams. Raises KeyError."""
        node = self.core.remove_node(name, time.time())
        self._run()
        return node

    def rename_node(self, name: str, new_name: str) -> c.NodeRecord:
        """Rename ``name`` in the live core. Raises KeyError / ValueError."""
        node = self.core.rename_node(name, new_name, time.time())
        self._run()
        return node

    def node_action(self, action: str, name: str) -> c.NodeRecord:
        """approve / expire / extend / disable-expiry ``name`` in the live core. Raises KeyError."""
        now = time.time()
        actions: dict[str, Callable[[str, float], c.NodeRecord]] = {
            "approve": self.core.approve_node,
            "expire": self.core.expire_node,
            "extend": self.core.extend_node,
            "disable-expiry": self.core.set_expiry_disabled,
        }
        node = actions[action](name, now)
        self._run()
        return node

    def admin_audit(self, kind: str, fields: tuple[tuple[str, str], ...]) -> None:
        """An admin action outside the core (keys, users): into the audit stream, in order."""
        self.core.admin_audit(kind, time.time(), fields)
        self._run()

    def approve_login(self, code: str) -> tuple[bool, str]:
        """An admin approves a login check code (``homeport login approve``)."""
        outcome = self.core.approve_login(code, time.time())
        self._run()
        return outcome.ok, outcome.message

    def set_policy(self, compiled: CompiledPolicy | None) -> None:
        """Put a (compiled, stored) policy in force: pushes, peer maps, cuts denied streams."""
        self.core.policy_changed(compiled, time.time())
        self._run()

    def policy_refused(self, reason: str) -> None:
        self.core.policy_refused(reason, time.time())
        self._run()

    def node_list(self) -> list[c.NodeStatus]:
        return self.core.node_list()

    @property
    def unauthenticated(self) -> int:
        return self._unauthenticated

    @property
    def control_connections(self) -> int:
        """Control connections open now (handshaking or in a session)."""
        return len(self._links)
