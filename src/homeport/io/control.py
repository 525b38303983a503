"""The one asyncio driver of a control connection, for the server and the agent.

Theory of operation. :class:`ControlLink` is an ``asyncio.Protocol`` over a TLS
transport that does nothing but move bytes through the sans-I/O
:class:`homeport.proto.control.ControlConnection` (framing, message order,
capabilities, keepalive) and hand each decoded message to a
:class:`ControlHandler` — the server's coordinator shell or the agent's node
shell. It makes no protocol decision of its own: the cores do.

What it does own, because every side needs the same:

* one timer per connection (``get_timer``/``handle_timer`` of the machine), and
  an *answer deadline*: a connection must reach READY (server: it sent WELCOME
  or ENROLLED; client: it received one) within ``answer_timeout`` or it is
  aborted, so half-open handshakes cannot pile up;
* the ALPN check (a control connection must negotiate :data:`ALPN_CONTROL`);
* write-side backpressure: a peer that stops reading is dropped once
  :data:`MAX_WRITE_BUFFER` bytes wait for it, instead of growing memory;
* exactly one ``control_closed`` per connection, at the moment it ends (not
  when the TLS shutdown finishes), carrying the machine's close reason;
* when the machine closes for a protocol violation, one ERROR frame telling the
  peer why, written after whatever was already queued.

The blocking counterpart for ``homeport nc``'s slow path is
:class:`homeport.io.dial.ControlClient`: the same machine, driven with blocking
sockets, because importing asyncio would add ~80 ms to every ``ssh``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
from typing import Any, Protocol, cast

from homeport.crypto.tls import ALPN_CONTROL
from homeport.proto.control import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_PING_INTERVAL,
    ConnectionClosed,
    ControlConnection,
    MessageReceived,
    Role,
    State,
)
from homeport.wire import control as m
from homeport.wire.logtext import esc

log = logging.getLogger("homeport.control")

#: Bytes queued towards a peer that does not read before we drop it.
MAX_WRITE_BUFFER = 8 * 1024 * 1024
#: Longest reason we put into an ERROR frame after a protocol violation.
MAX_REASON = 512
#: How long a closing TLS connection waits for the peer's close_notify.
SSL_SHUTDOWN_TIMEOUT = 5.0
#: Shared encoded frames (peer maps, :meth:`ControlLink.send_encoded`) go to the transport
#: only while less than this waits in it; the rest stays a reference to the one shared copy.
#: Why: TLS copies what it is given into per-connection buffers, and after a restart every
#: agent is sent a full map at once (5,000 nodes: 1.7 MB each; measured 3.6 GB of server RSS
#: with ~3,000 agents joining), so a slow reader must not pull the whole map into its session.
#: Small because what waits is encrypted into the session's outgoing memory BIO, and an OpenSSL
#: memory BIO never shrinks: at 256 KiB (64 KiB slices) every agent kept ~64 KiB of it for good
#: after its full map (server RSS per idle agent 104 KiB at 600 agents; docs/reliability.md).
#: 4 KiB rather than 16 KiB (one full record): RSS per idle agent at 1,000 agents 65.8 -> 50.2
#: KiB (``python -m bench.fleet_memory --variants``); a full map takes 4x the writes, which
#: with cap mapdelta happens once per agent and server run rather than once per reconnect.
ENCODED_HIGH_WATER = 4 * 1024
#: Slice of held shared bytes handed to the transport at a time (one small TLS record).
ENCODED_CHUNK = 4 * 1024


class ControlHandler(Protocol):
    """What a driver reports to (the server's or the agent's shell)."""

    def control_message(self, link: ControlLink, msg: m.Message) -> None: ...

    def control_closed(self, link: ControlLink, ev: ConnectionClosed) -> None: ...


class ControlLink(asyncio.Protocol):
    """One control connection: the asyncio shell around a ControlConnection."""

    def __init__(
        self,
        role: Role,
        handler: ControlHandler,
        *,
        address: str = "",
        ping_interval: float = DEFAULT_PING_INTERVAL,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        answer_timeout: float | None = None,
    ) -> None:
        self.role = role
        self.handler = handler
        self.address = address
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.conn = ControlConnection(
            role, self._loop.time(), ping_interval=ping_interval, idle_timeout=idle_timeout
        )
        self._answer_timeout = answer_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._answer_deadline: asyncio.TimerHandle | None = None
        self._ended = False
        self._closed: asyncio.Future[ConnectionClosed] = self._loop.create_future()
        self._peer_der: bytes | None = None
        self._processing = False  # inside _process: sends must not re-enter it
        self._opened = False  # the peer's HELLO/ENROLL (or our WELCOME) was seen
        #: Output waiting behind held shared bytes, in order (views, never copies).
        self._held: collections.deque[memoryview] = collections.deque()
        self._held_bytes = 0

    def __repr__(self) -> str:
        return f"<ControlLink {self.role.value} {self.address}>"

    # -- asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but is one
        self.transport = cast(asyncio.Transport, transport)
        ssl_obj = transport.get_extra_info("ssl_object")
        if not isinstance(ssl_obj, ssl.SSLObject | ssl.SSLSocket):
            self.abort("no TLS object")
            return
        alpn = ssl_obj.selected_alpn_protocol()
        if alpn != ALPN_CONTROL:
            self.abort(f"ALPN is {alpn!r}, not {ALPN_CONTROL!r}")
            return
        self._peer_der = ssl_obj.getpeercert(binary_form=True) or None
        self.conn.transport_ready(self._loop.time())  # a slow handshake is not silence
        with contextlib.suppress(AttributeError, NotImplementedError):
            # below ENCODED_HIGH_WATER: whenever held bytes stop, the transport has paused
            # and will call resume_writing once it drains
            self.transport.set_write_buffer_limits(high=ENCODED_HIGH_WATER // 2)
        if self._answer_timeout is not None:
            self._answer_deadline = self._loop.call_later(self._answer_timeout, self._no_answer)
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data, self._loop.time())
        self._process()

    def eof_received(self) -> bool | None:
        self.conn.receive_data(b"", self._loop.time())
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn.state is not State.CLOSED:
            reason = f"connection lost: {exc}" if exc else "connection closed by peer"
            self.conn.receive_data(b"", self._loop.time())
            ev = self.conn.close_reason or ConnectionClosed("eof", reason)
            while self.conn.next_event() is not None:
                pass
            self._end(ev)
        else:
            self._end(self.conn.close_reason or ConnectionClosed("eof", "closed"))

    # -- API --------------------------------------------------------------------
    def peer_cert_der(self) -> bytes | None:
        """The peer's certificate (DER) from the TLS handshake, if it sent one."""
        return self._peer_der

    @property
    def ended(self) -> bool:
        return self._ended

    async def wait_closed(self) -> ConnectionClosed:
        """Until the connection has ended; returns why."""
        return await asyncio.shield(self._closed)

    def send(self, msg: m.Message) -> None:
        """Queue and write ``msg``; dropped silently once the connection is closing."""
        if self.conn.state is State.CLOSED or self.transport is None or self._ended:
            return
        try:
            self.conn.send(msg)
        except ValueError as exc:  # larger than MAX_FRAME: a bug on our side
            log.error("%r: cannot send %s: %s", self, msg.TYPE.name, exc)
            return
        if not self._processing:  # else the running loop flushes and sees a close
            self._process()

    def send_encoded(self, data: bytes) -> None:
        """Write frames encoded once for many recipients (see proto.netmap).

        Paced: handed to the transport in slices while it drains (:data:`ENCODED_HIGH_WATER`).
        """
        if self.conn.state is State.CLOSED or self.transport is None or self._ended:
            return
        self._hold(data)
        if not self._check_backlog():
            self._write_held()

    def resume_writing(self) -> None:
        """The transport drained below its low-water mark: continue with held bytes."""
        self._write_held()

    def _hold(self, data: bytes) -> None:
        if data:
            self._held.append(memoryview(data))
            self._held_bytes += len(data)

    def _write_held(self, *, everything: bool = False) -> None:
        transport = self.transport
        if transport is None or self._ended:
            return
        while self._held and (everything or transport.get_write_buffer_size() < ENCODED_HIGH_WATER):
            view = self._held[0]
            chunk = view if everything else view[:ENCODED_CHUNK]
            if len(chunk) == len(view):
                self._held.popleft()
            else:
                self._held[0] = view[len(chunk) :]
            self._held_bytes -= len(chunk)
            transport.write(chunk)

    def close_with_error(self, code: str, message: str) -> None:
        """Send ERROR(code, message) and close."""
        if self.conn.state is State.CLOSED or self._ended:
            if self.transport is not None:
                self.transport.close()
            return
        self.send(m.Error(code=code, message=message))

    def finish(self) -> None:
        """Close cleanly once what was sent is flushed (TLS close_notify)."""
        if self.transport is not None and not self._ended:
            self._flush()
            self._write_held(everything=True)
            self.transport.close()

    def abort(self, reason: str) -> None:
        """Drop the connection at once (no TLS close)."""
        if not self._ended:
            log.info("control connection %s dropped: %s", self.address, esc(reason))
        transport = self.transport
        self._end(ConnectionClosed("abort", reason))
        if transport is not None:
            transport.abort()

    # -- the loop of the sans-I/O machine ---------------------------------------------
    def _process(self) -> None:
        self._processing = True
        try:
            closed = self._drain()
        finally:
            self._processing = False
        self._flush()
        if closed is not None:
            self._end(closed)

    def _drain(self) -> ConnectionClosed | None:
        closed: ConnectionClosed | None = None
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, MessageReceived):
                self._opened = True
                if self.conn.state is State.READY and self._answer_deadline is not None:
                    self._answer_deadline.cancel()
                    self._answer_deadline = None
                try:
                    self.handler.control_message(self, ev.message)
                except Exception:  # a bug in a handler costs one connection, not the process
                    log.exception("%r: failed handling %s", self, ev.message.TYPE.name)
                    self.close_with_error("internal", "internal error")
            else:
                closed = ev
                self._tell_peer(ev)
        if self.conn.state is State.READY and self._answer_deadline is not None:
            self._answer_deadline.cancel()  # the server side becomes READY by sending
            self._answer_deadline = None
        return closed

    def _tell_peer(self, ev: ConnectionClosed) -> None:
        """After a protocol violation the peer still reads frames: say why once."""
        if not ev.code.startswith("protocol:") or self.transport is None or self._ended:
            return
        code = ev.code.removeprefix("protocol:")
        with contextlib.suppress(Exception):
            self._write_held(everything=True)
            self.transport.write(self.conn.data_to_send())
            self.transport.write(m.encode(m.Error(code=code, message=ev.reason[:MAX_REASON])))

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or self._ended:
            return
        data = self.conn.data_to_send()
        if self._held:  # behind held shared bytes: keep the order
            self._hold(data)
            self._write_held()
        elif data:
            transport.write(data)
        if self._check_backlog():
            return
        if self.conn.state is State.CLOSED:
            self._write_held(everything=True)
            transport.close()  # flushes what is buffered, then TLS close_notify
            reason = self.conn.close_reason
            if reason is not None and reason.code.startswith("protocol:") and not self._opened:
                # an unauthenticated peer broke the protocol: its ERROR is on its way; do not
                # read (and hold) what else it sends during a TLS shutdown (finding 2)
                self._loop.call_soon(transport.abort)
        else:
            self._arm_timer()

    def _check_backlog(self) -> bool:
        transport = self.transport
        if (
            transport is not None
            and transport.get_write_buffer_size() + self._held_bytes > MAX_WRITE_BUFFER
        ):
            self.abort("peer is not reading (write buffer over its limit)")
            return True
        return False

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.conn.get_timer()
        if when is not None and not self._ended:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.conn.handle_timer(self._loop.time())
        self._process()

    def _no_answer(self) -> None:
        self._answer_deadline = None
        if self.conn.state is not State.READY and not self._ended:
            if self.role is Role.SERVER and self.conn.state is State.START:
                self.abort(f"no HELLO or ENROLL within {self._answer_timeout:g}s")
            else:
                self.abort(f"no answer to the handshake within {self._answer_timeout:g}s")

    def _end(self, ev: ConnectionClosed) -> None:
        if self._ended:
            return
        self._ended = True
        self._held.clear()
        self._held_bytes = 0
        for handle in (self._timer, self._answer_deadline):
            if handle is not None:
                handle.cancel()
        self._timer = self._answer_deadline = None
        if not self._closed.done():
            self._closed.set_result(ev)
        if self.transport is not None and self.conn.state is State.CLOSED:
            self.transport.close()
        try:
            self.handler.control_closed(self, ev)
        except Exception:
            log.exception("%r: close handler failed", self)


async def connect_control(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    handler: ControlHandler,
    *,
    ping_interval: float = DEFAULT_PING_INTERVAL,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    answer_timeout: float = 10.0,
    connect_timeout: float = 10.0,
    sock: socket.socket | None = None,
) -> ControlLink:
    """Open a client control connection (TCP + TLS); the caller checks the pin, sends HELLO.

    ``sock``: an already connected TCP socket to run the TLS over (a proxy's
    CONNECT tunnel, :func:`homeport.io.dial.server_tcp`); ``host``/``port`` then
    only name the server in logs.
    """
    loop = asyncio.get_running_loop()
    where: dict[str, Any] = {"sock": sock} if sock is not None else {"host": host, "port": port}
    _, link = await asyncio.wait_for(
        loop.create_connection(
            lambda: ControlLink(
                Role.CLIENT,
                handler,
                address=f"{host}:{port}",
                ping_interval=ping_interval,
                idle_timeout=idle_timeout,
                answer_timeout=answer_timeout,
            ),
            ssl=ctx,
            server_hostname="",
            **where,
            ssl_shutdown_timeout=SSL_SHUTDOWN_TIMEOUT,
        ),
        connect_timeout,
    )
    return link
