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
* **Warm opens for local clients.** ``homeport nc`` on this machine asks the
  agent over ``<state>/agent.sock`` (:mod:`homeport.io.localapi`) instead of
  building its own control session: the agent sends OPEN over the connection it
  already holds, runs the end-to-end handshake and hands nc a connected unix
  socket; the pump runs here, like an incoming stream's (same limit, same cancel).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
from pathlib import Path
from typing import Any

from homeport.crypto import tls as hptls
from homeport.errors import CodedError
from homeport.io import localapi, tlsstream
from homeport.io.dial import SOFTWARE, DialError, dial_data, e2e_handshake
from homeport.io.localapi import LocalApiServer, OpenRequest, error_reply, send_reply
from homeport.io.pump import PumpEnd, pump
from homeport.node import hostkeys
from homeport.node import state as node_state
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
from homeport.wire.data import new_token, token_from_hex_untrusted
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
#: OPEN_FAILED codes after which nc should dial by itself rather than report.
LOCAL_FALLBACK_CODES = frozenset({"busy"})
#: Seconds a local open waits for the event loop to admit it (it only does
#: bookkeeping and one write, so this is only reached if the loop is wedged).
LOCAL_ADMIT_TIMEOUT = 2.0


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


class _LocalRefused(CodedError):
    """A local open the agent cannot serve now; the client should dial by itself."""


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
        local_api: bool = True,
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
        self._client_ctx: ssl.SSLContext | None = None  # e2e client side of local opens
        self._local_api = local_api
        self._api: LocalApiServer | None = None
        # Local opens waiting for OPENED/OPEN_FAILED, by token hex (event loop only).
        self._local_opens: dict[str, concurrent.futures.Future[m.Message]] = {}

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
        self._start_local_api()
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
                    self._fail_local_opens()
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
            if self._api is not None:
                self._api.close()
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
        self._client_ctx = hptls.stream_context(
            server_side=False,
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
        elif isinstance(msg, m.Opened | m.OpenFailed):
            fut = self._local_opens.pop(msg.token, None)
            if fut is None:
                log.debug("%s for an unknown token", msg.TYPE.name)
            elif not fut.done():
                fut.set_result(msg)
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

    # -- local opens (homeport nc on this machine) ------------------------------------
    def _start_local_api(self) -> None:
        """Serve ``<state>/agent.sock``; without it nc simply dials by itself."""
        if not self._local_api:
            return
        path = localapi.socket_path(self.state.dir)
        api = LocalApiServer(path, self._serve_local)
        try:
            api.start()
        except OSError as exc:
            log.warning("local API off (%s): %s; nc will dial by itself", path, _why(exc))
            return
        self._api = api
        log.info("local API on %s", path)

    def _fail_local_opens(self) -> None:
        """The session is gone: no OPENED will ever come for what it carried."""
        opens, self._local_opens = self._local_opens, {}
        err = DialError("eof", f"server {self.state.server} closed the connection")
        for fut in opens.values():
            if not fut.done():
                fut.set_exception(err)

    def _local_begin(
        self,
        req: OpenRequest,
        token: bytes,
        worker: threading.Thread,
        admitted: concurrent.futures.Future[None],
        answer: concurrent.futures.Future[m.Message],
    ) -> None:
        """Event loop side of a local open: admit it (limit, session up) and send OPEN."""
        if not admitted.set_running_or_notify_cancel():
            return  # the worker gave up waiting for us
        if self._stopping or self._conn is None or not self.connected.is_set():
            admitted.set_exception(
                _LocalRefused("not-connected", f"not connected to server {self.state.server}")
            )
            return
        if self._active >= MAX_STREAMS:
            admitted.set_exception(_LocalRefused("busy", f"{MAX_STREAMS} streams already active"))
            return
        self._active += 1
        self._threads.add(worker)
        self._local_opens[token.hex()] = answer
        self._send(m.Open(dst=req.dst, service=req.service, token=token.hex()))
        admitted.set_result(None)

    def _local_done(self, token_hex: str, worker: threading.Thread) -> None:
        self._local_opens.pop(token_hex, None)
        self._stream_done(worker)

    def _admit_local(
        self, req: OpenRequest, token: bytes, answer: concurrent.futures.Future[m.Message]
    ) -> None:
        """Ask the event loop to admit a local open (called from its worker thread).

        Raises:
            _LocalRefused: not admitted; nothing was counted or sent.
        """
        loop = self._loop
        admitted: concurrent.futures.Future[None] = concurrent.futures.Future()
        me = threading.current_thread()
        try:
            if loop is None:
                raise RuntimeError("no event loop")
            loop.call_soon_threadsafe(self._local_begin, req, token, me, admitted, answer)
        except RuntimeError:  # the loop is closed: the agent is stopping
            raise _LocalRefused("not-connected", "the agent is stopping") from None
        try:
            admitted.result(timeout=LOCAL_ADMIT_TIMEOUT)
        except concurrent.futures.TimeoutError:
            if admitted.cancel():  # the loop never looked at it: nothing to undo
                raise _LocalRefused("busy", "the agent did not answer in time") from None
            admitted.result()  # decided meanwhile: its outcome stands

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
        token = new_token()
        answer: concurrent.futures.Future[m.Message] = concurrent.futures.Future()
        try:
            self._admit_local(req, token, answer)
        except _LocalRefused as exc:
            log.info("local open of %s:%s handed back: %s", req.dst, req.service, exc.message)
            with contextlib.suppress(OSError):
                send_reply(conn, error_reply(exc.code, exc.message, fallback=True))
            return
        me = threading.current_thread()
        try:
            self._local_stream(conn, req, token, answer, deadline)
        finally:
            loop = self._loop
            try:
                if loop is None or loop.is_closed():
                    raise RuntimeError("loop closed")
                loop.call_soon_threadsafe(self._local_done, token.hex(), me)
            except RuntimeError:
                self._stream_done(me)

    def _local_stream(
        self,
        conn: socket.socket,
        req: OpenRequest,
        token: bytes,
        answer: concurrent.futures.Future[m.Message],
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
                    msg = answer.result(timeout=left())
                except concurrent.futures.TimeoutError:
                    raise DialError(
                        "timeout", f"no answer from server {self.state.server}"
                    ) from None
                if isinstance(msg, m.OpenFailed):
                    raise DialError(msg.code, msg.message or msg.code)
                assert isinstance(msg, m.Opened)
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
            # "busy" is about this session (opens in flight), not about the peer:
            # nc's own session may well get through.
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
            _ensure_known_hosts(self.state.dir, req.dst, port, peer.host_keys)
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
            res = pump(tls, mine.fileno(), mine.fileno(), cancel_fd=self._cancel_r)
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


def _dst(req: OpenRequest) -> tuple[str, str]:
    return req.dst, req.service


def _ensure_known_hosts(state_dir: Path, host: str, port: int, host_keys: tuple[str, ...]) -> None:
    """Write ``known_hosts/<host>`` unless it already says exactly this.

    Saves the atomic write's fsync (~1 ms) on the warm path, where the same peer
    is opened again and again; a changed key set is written as before.
    """
    text = node_state.render_known_hosts(host, port, host_keys).encode()
    path = state_dir / node_state.KNOWN_HOSTS_DIR / host
    with contextlib.suppress(OSError):
        if path.read_bytes() == text:
            return
    node_state.write_known_hosts(state_dir, host, port, host_keys)
