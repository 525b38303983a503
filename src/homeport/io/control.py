"""The one asyncio driver of a control connection, for the server and the agent.

Theory of operation. :class:`ControlLink` is an ``asyncio.BufferedProtocol`` over a
plain TCP transport that runs TLS itself (an :class:`ssl.SSLObject` over two
:class:`ssl.MemoryBIO`) and does nothing else but move bytes through the sans-I/O
:class:`homeport.proto.control.ControlConnection` (framing, message order,
capabilities, keepalive) and hand each decoded message to a
:class:`ControlHandler` — the server's coordinator shell or the agent's node
shell. It makes no protocol decision of its own: the cores do.

Why TLS is done here rather than by asyncio (``ssl=``): memory per idle agent on
the server (issue 8's target is 50 KB). uvloop's TLS transport gives every
connection its own 256 KiB read buffer (``SSL_READ_MAX_SIZE``, resident as far
as it was touched), and its outgoing memory BIO grows with whatever one write
handed it. Here every link on a thread reads into one shared buffer
(:data:`READ_CHUNK`; data is consumed before the next read, they share a thread),
and plaintext is encrypted in slices of at most :data:`TLS_WRITE_CHUNK` whose
records are handed to the transport at once, so the outgoing BIO, which OpenSSL
never shrinks, never holds more than one slice. Measured (``python -m
bench.fleet_memory --variants --base <checkout of the previous main>``, one run,
servers one after the other, load average 3-5 on 2 shared cores): server RSS per
idle agent 44.0 -> 31.5 KiB at 1,000 agents, 49.9 -> 32.1 KiB at 2,000 (with the
control server context sending no TLS 1.3 tickets, :mod:`homeport.crypto.tls`,
which is ~1.5 KiB of it). OpenSSL's own per-connection record buffers are already
released when idle (CPython sets ``SSL_MODE_RELEASE_BUFFERS`` on every context).

What it owns, because every side needs the same:

* the TLS handshake, with its own deadline (``handshake_timeout``), and then an
  *answer deadline*: a connection must reach READY (server: it sent WELCOME or
  ENROLLED; client: it received one) within ``answer_timeout`` or it is
  aborted, so half-open handshakes cannot pile up;
* the ALPN check (a control connection must negotiate :data:`ALPN_CONTROL`);
* write-side backpressure: a peer that stops reading is dropped once
  :data:`MAX_WRITE_BUFFER` bytes wait for it, instead of growing memory;
* a clean end: close_notify, then the peer's close_notify or TCP EOF awaited at
  most :data:`SSL_SHUTDOWN_TIMEOUT`; ``abort`` sends nothing;
* exactly one ``control_closed`` per connection (a failed handshake included),
  at the moment it ends (not when the TLS shutdown finishes), carrying the
  machine's close reason;
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
import threading
from collections.abc import Callable
from typing import Protocol, cast

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
#: Small because what is encrypted at once goes through the session's outgoing memory BIO,
#: and an OpenSSL memory BIO never shrinks: at 256 KiB (64 KiB slices) every agent kept
#: ~64 KiB of it for good after its full map (server RSS per idle agent 104 KiB at 600
#: agents; docs/reliability.md). 4 KiB rather than 16 KiB (one full record): RSS per idle
#: agent at 1,000 agents 65.8 -> 50.2 KiB (``python -m bench.fleet_memory --variants``).
ENCODED_HIGH_WATER = 4 * 1024
#: Slice of held shared bytes handed to the transport at a time (one small TLS record).
ENCODED_CHUNK = 4 * 1024
#: Largest plaintext encrypted at once: the outgoing memory BIO (never shrunk) holds at
#: most one such slice's records before they go to the transport.
TLS_WRITE_CHUNK = 4 * 1024
#: Size of the one read buffer shared by every link of a thread (and of each decrypted
#: read): ciphertext is copied into the link's incoming BIO at once, so no link owns one.
READ_CHUNK = 16 * 1024


class ControlHandler(Protocol):
    """What a driver reports to (the server's or the agent's shell)."""

    def control_message(self, link: ControlLink, msg: m.Message) -> None: ...

    def control_closed(self, link: ControlLink, ev: ConnectionClosed) -> None: ...


class _Shared(threading.local):
    """The read buffer of this thread's links (an event loop runs on one thread)."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_CHUNK))


_shared = _Shared()


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Mark a handshake failure seen: nobody need await it (the link ends either way)."""
    if not fut.cancelled():
        fut.exception()


class ControlLink(asyncio.BufferedProtocol):
    """One control connection: TLS and the asyncio shell around a ControlConnection."""

    __slots__ = (
        "_answer_deadline",
        "_answer_timeout",
        "_closed",
        "_closing",
        "_ctx",
        "_ended",
        "_handshake",
        "_handshake_timeout",
        "_held",
        "_held_bytes",
        "_incoming",
        "_loop",
        "_opened",
        "_outgoing",
        "_peer_der",
        "_processing",
        "_secure",
        "_shutdown",
        "_timer",
        "_tls",
        "address",
        "conn",
        "handler",
        "role",
        "transport",
    )

    def __init__(
        self,
        role: Role,
        handler: ControlHandler,
        *,
        ssl_context: ssl.SSLContext,
        address: str = "",
        ping_interval: float = DEFAULT_PING_INTERVAL,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        handshake_timeout: float | None = None,
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
        self._ctx = ssl_context
        self._handshake_timeout = handshake_timeout
        self._answer_timeout = answer_timeout
        self._tls: ssl.SSLObject | None = None
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        self._secure = False  # the TLS handshake completed
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        self._handshake.add_done_callback(_retrieve)
        self._timer: asyncio.TimerHandle | None = None
        self._answer_deadline: asyncio.TimerHandle | None = None  # handshake, then answer
        self._shutdown: asyncio.TimerHandle | None = None  # close_notify sent: peer's awaited
        self._closing = False  # TLS close started (or the transport closed)
        self._ended = False
        self._closed: asyncio.Future[ConnectionClosed] = self._loop.create_future()
        self._peer_der: bytes | None = None
        self._processing = False  # inside _process: sends must not re-enter it
        self._opened = False  # the peer's HELLO/ENROLL (or our WELCOME) was seen
        #: Output waiting behind held shared bytes, in order (views, never copies); created
        #: on first use: most links never hold anything once their first map went out.
        self._held: collections.deque[memoryview] | None = None
        self._held_bytes = 0

    def __repr__(self) -> str:
        return f"<ControlLink {self.role.value} {self.address}>"

    # -- asyncio.BufferedProtocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        try:
            self._tls = self._ctx.wrap_bio(
                self._incoming, self._outgoing, server_side=self.role is Role.SERVER
            )
        except (ssl.SSLError, ValueError) as exc:
            self._handshake_failed(exc)
            return
        with contextlib.suppress(AttributeError, NotImplementedError):
            # below ENCODED_HIGH_WATER: whenever held bytes stop, the transport has paused
            # and will call resume_writing once it drains
            self.transport.set_write_buffer_limits(high=ENCODED_HIGH_WATER // 2)
        if self._handshake_timeout is not None:
            self._answer_deadline = self._loop.call_later(
                self._handshake_timeout, self._handshake_too_slow
            )
        self._do_handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _shared.view

    def buffer_updated(self, nbytes: int) -> None:
        if self._incoming is None:
            return
        if self._shutdown is not None:
            self._incoming.write(_shared.view[:nbytes])
            self._read_until_close_notify()
        elif not self._ended:
            self._incoming.write(_shared.view[:nbytes])
            if self._secure:
                self._read_records()
            else:
                self._do_handshake()

    def eof_received(self) -> bool | None:
        if self._secure and not self._ended:
            self._read_records()  # what arrived with the FIN
        if self._incoming is not None:
            self._incoming.write_eof()
        if not self._secure and not self._ended:
            self._handshake_failed(ConnectionResetError("closed during the TLS handshake"))
        elif not self._ended:
            self.conn.receive_data(b"", self._loop.time())
            self._process()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._shutdown is not None:
            self._shutdown.cancel()
            self._shutdown = None
        self._closing = True
        if not self._secure:
            self._handshake_failed(exc or ConnectionResetError("closed during the TLS handshake"))
        elif self.conn.state is not State.CLOSED:
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

    async def handshake(self) -> None:
        """Until the TLS handshake is done (the ALPN check may still have ended the link).

        Raises what failed it: ``ssl.SSLError``, ``TimeoutError`` (``handshake_timeout``)
        or ``ConnectionError`` (the peer went away during it).
        """
        await asyncio.shield(self._handshake)

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

    def close_with_error(self, code: str, message: str) -> None:
        """Send ERROR(code, message) and close."""
        if self.conn.state is State.CLOSED or self._ended:
            self._close_tls()
            return
        self.send(m.Error(code=code, message=message))

    def finish(self) -> None:
        """Close cleanly once what was sent is flushed (TLS close_notify)."""
        if self.transport is not None and not self._ended:
            self._flush()
            self._write_held(everything=True)
            self._close_tls()

    def abort(self, reason: str) -> None:
        """Drop the connection at once (no TLS close)."""
        if not self._ended:
            log.info("control connection %s dropped: %s", self.address, esc(reason))
        transport = self.transport
        self._closing = True
        self._end(ConnectionClosed("abort", reason))
        if transport is not None:
            transport.abort()

    # -- TLS ----------------------------------------------------------------------------
    def _do_handshake(self) -> None:
        tls = self._tls
        if tls is None or self._ended:
            return
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._send_records()
            return
        except (ssl.SSLError, OSError) as exc:
            self._handshake_failed(exc)  # no alert, as asyncio's TLS: the peer sees EOF
            return
        self._send_records()
        self._secure = True
        if self._answer_deadline is not None:
            self._answer_deadline.cancel()
            self._answer_deadline = None
        if not self._handshake.done():
            self._handshake.set_result(None)
        alpn = tls.selected_alpn_protocol()
        if alpn != ALPN_CONTROL:
            self.abort(f"ALPN is {alpn!r}, not {ALPN_CONTROL!r}")
            return
        self._peer_der = tls.getpeercert(binary_form=True) or None
        self.conn.transport_ready(self._loop.time())  # a slow handshake is not silence
        if self._answer_timeout is not None:
            self._answer_deadline = self._loop.call_later(self._answer_timeout, self._no_answer)
        self._arm_timer()
        self._read_records()  # application data that came with the handshake's last flight
        self._process()  # whatever was queued before the handshake finished

    def _handshake_too_slow(self) -> None:
        self._answer_deadline = None
        if not self._secure and not self._ended:
            self._handshake_failed(
                TimeoutError(f"TLS handshake not done within {self._handshake_timeout:g}s")
            )

    def _handshake_failed(self, exc: BaseException) -> None:
        """Fail the handshake: the waiter gets ``exc``, the link ends (one control_closed)."""
        if self._ended:
            return
        if not self._handshake.done():
            self._handshake.set_exception(exc)
        transport = self.transport
        self._closing = True
        self._end(ConnectionClosed("tls", f"TLS handshake failed: {exc}"))
        if transport is not None:
            transport.abort()

    def _read_records(self) -> None:
        """Decrypt what the incoming BIO holds and feed the machine."""
        tls = self._tls
        if tls is None:
            return
        now = self._loop.time()
        parts: list[bytes] = []
        eof = False
        error: BaseException | None = None
        try:
            while data := tls.read(READ_CHUNK):  # one record's plaintext at a time
                parts.append(data)
            eof = True  # b"": the peer's close_notify, a clean end
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            eof = True
        except (ssl.SSLError, OSError) as exc:
            error = exc
        if parts:  # the machine once per read, not once per record
            self.conn.receive_data(parts[0] if len(parts) == 1 else b"".join(parts), now)
        if error is not None:
            self._send_records()
            self._lost(error)
            return
        if eof:
            self.conn.receive_data(b"", now)
        self._send_records()  # e.g. a KeyUpdate answer
        if parts or eof:
            self._process()

    def _read_until_close_notify(self) -> None:
        """Our close_notify is out: discard what the peer still sends until its own."""
        tls = self._tls
        if tls is None:
            return
        try:
            while tls.read(READ_CHUNK):  # b"": the peer's close_notify
                pass
        except ssl.SSLWantReadError:
            return
        except (ssl.SSLError, OSError):  # close_notify, or anything else: we are done
            pass
        if self.transport is not None:
            self.transport.close()

    def _lost(self, exc: BaseException) -> None:
        """A TLS error on an established connection: it ends like a lost one."""
        transport = self.transport
        self._closing = True
        if self.conn.state is not State.CLOSED:
            self.conn.receive_data(b"", self._loop.time())
            while self.conn.next_event() is not None:
                pass
        self._end(ConnectionClosed("eof", f"connection lost: {exc}"))
        if transport is not None:
            transport.abort()

    def _encrypt(self, data: bytes | memoryview) -> None:
        """Encrypt ``data`` in slices; each slice's records leave the outgoing BIO at once
        (so it never holds more than one), and all go to the transport in one call."""
        tls, outgoing, transport = self._tls, self._outgoing, self.transport
        if tls is None or outgoing is None or transport is None or self._closing or not data:
            return  # after our close_notify nothing more may be sent
        view = memoryview(data)
        records = []
        for start in range(0, len(view), TLS_WRITE_CHUNK):
            tls.write(view[start : start + TLS_WRITE_CHUNK])
            records.append(outgoing.read())
        if not transport.is_closing():
            transport.writelines(records)

    def _send_records(self) -> None:
        outgoing, transport = self._outgoing, self.transport
        if outgoing is not None and outgoing.pending and transport is not None:
            data = outgoing.read()
            if not transport.is_closing():
                transport.write(data)

    def _close_tls(self) -> None:
        """Send close_notify (once); close when the peer's arrives, at EOF, or after
        :data:`SSL_SHUTDOWN_TIMEOUT`."""
        transport = self.transport
        if transport is None or self._closing:
            return
        self._closing = True
        if self._tls is None or not self._secure:
            transport.close()
            return
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:  # ours is out, the peer's not yet in
            self._send_records()
            self._shutdown = self._loop.call_later(SSL_SHUTDOWN_TIMEOUT, transport.abort)
            return
        except (ssl.SSLError, OSError):
            pass
        self._send_records()
        transport.close()

    # -- held shared bytes -----------------------------------------------------------------
    def _hold(self, data: bytes | memoryview) -> None:
        if data:
            if self._held is None:
                self._held = collections.deque()
            self._held.append(memoryview(data))
            self._held_bytes += len(data)

    def _write_held(self, *, everything: bool = False) -> None:
        transport, held = self.transport, self._held
        if transport is None or self._ended or held is None or not self._secure:
            return
        while held and (everything or transport.get_write_buffer_size() < ENCODED_HIGH_WATER):
            view = held[0]
            chunk = view if everything else view[:ENCODED_CHUNK]
            if len(chunk) == len(view):
                held.popleft()
            else:
                held[0] = view[len(chunk) :]
            self._held_bytes -= len(chunk)
            self._encrypt(chunk)
        if not held:
            self._held = None

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
            self._encrypt(self.conn.data_to_send())
            self._encrypt(m.encode(m.Error(code=code, message=ev.reason[:MAX_REASON])))

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or self._ended or not self._secure:
            return
        data = self.conn.data_to_send()
        if self._held:  # behind held shared bytes: keep the order
            self._hold(data)
            self._write_held()
        elif data:
            self._encrypt(data)
        if self._check_backlog():
            return
        if self.conn.state is State.CLOSED:
            self._write_held(everything=True)
            reason = self.conn.close_reason
            if reason is not None and reason.code.startswith("protocol:") and not self._opened:
                # an unauthenticated peer broke the protocol: its ERROR is on its way; do not
                # read (and hold) what else it sends during a TLS shutdown (finding 2)
                self._closing = True
                if self._tls is not None:
                    with contextlib.suppress(ssl.SSLError, OSError):
                        self._tls.unwrap()  # our close_notify; the peer's is not awaited
                self._send_records()
                transport.close()
            else:
                self._close_tls()  # flushes what is buffered, then TLS close_notify
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
        self._held = None
        self._held_bytes = 0
        for handle in (self._timer, self._answer_deadline):
            if handle is not None:
                handle.cancel()
        self._timer = self._answer_deadline = None
        if not self._handshake.done():
            self._handshake.set_exception(ConnectionResetError(ev.reason))
        if not self._closed.done():
            self._closed.set_result(ev)
        if self.conn.state is State.CLOSED:
            self._close_tls()
        try:
            self.handler.control_closed(self, ev)
        except Exception:
            log.exception("%r: close handler failed", self)


async def open_link(
    make: Callable[[], ControlLink],
    host: str,
    port: int,
    *,
    timeout: float,
    sock: socket.socket | None = None,
    local_addr: tuple[str, int] | None = None,
) -> ControlLink:
    """Connect TCP (or use ``sock``) for the link ``make`` builds and run its TLS handshake,
    all within ``timeout``; raises what failed (``OSError``, ``ssl.SSLError``, ``TimeoutError``).

    The link may already have ended when this returns (its ALPN check): see ``link.ended``.
    """
    loop = asyncio.get_running_loop()
    link: ControlLink | None = None
    try:
        async with asyncio.timeout(timeout):
            if sock is not None:
                _, link = await loop.create_connection(make, sock=sock)
            else:
                _, link = await loop.create_connection(make, host, port, local_addr=local_addr)
            await link.handshake()
    except BaseException:
        if link is not None and not link.ended:
            link.abort("connect failed or was cancelled during the TLS handshake")
        raise
    return link


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

    def make() -> ControlLink:
        return ControlLink(
            Role.CLIENT,
            handler,
            ssl_context=ctx,
            address=f"{host}:{port}",
            ping_interval=ping_interval,
            idle_timeout=idle_timeout,
            answer_timeout=answer_timeout,
        )

    return await open_link(make, host, port, timeout=connect_timeout, sock=sock)
