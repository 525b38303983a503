"""The mux driver: one thread per direct connection moves bytes between the mux and local sockets.

Why a mux at all is explained in :mod:`homeport.wire.mux` (frame layout) and
:mod:`homeport.proto.mux` (streams, flow control, keepalive); this module is the
thin I/O shell around :class:`~homeport.proto.mux.MuxConnection`:

* **One thread per direct connection, non-blocking fds, ``select.poll``**, the
  same shape as :func:`homeport.io.pump.pump`, because one SSL object must not
  be shared between threads and a thread per stream would contend for it.
* **TLS through memory BIOs** (:class:`~homeport.io.tlsstream.TlsStream`, made
  by the same handshake and pin check as a relayed stream): the loop decides
  what OpenSSL sees and decrypts into one preallocated buffer, up to
  :data:`DECRYPT_SIZE` at a time, so whole 64 KiB DATA frames are sliced out of
  it without being reassembled.
* **Each stream's local end is a socket**: on the destination, its connection
  to the local target (sshd) returned by ``on_incoming``; on the source, one
  end of a ``socketpair`` whose other end :meth:`MuxLink.open_stream` hands to
  its caller (nc's pump, a forward). Local reads go into one shared buffer and
  are never larger than what the mux will take at once (the peer's window and
  the output room), so nothing is ever held back per stream on the way out.
* **Backpressure, no unbounded buffers.** Outgoing: a local socket is read only
  while its stream has window and the mux output is below its high water mark;
  the mux output is encrypted only while fewer than :data:`MAX_UNSENT` encrypted
  bytes wait for the TCP socket. Incoming: DATA is queued per stream for the
  local socket and credited back to the peer (WINDOW) only once written there,
  so a stalled local consumer holds at most one window (256 KiB) and stalls
  only its own stream.
* **Half-close**: local EOF → FIN; the peer's FIN → ``shutdown(SHUT_WR)`` of the
  local socket once its queued bytes are written. A stream ends when both
  directions have; a local error resets (RST) only that stream.
* **Keepalive and death**: the mux's timer drives PINGs every second; after
  3.5 s of silence the link ends and ``on_dead(reason)`` runs (once, on the
  link thread, whatever ended it), after every local socket is closed and every
  waiting :meth:`open_stream` / :meth:`ping` has failed.

``on_incoming(sid, meta)`` may block (it connects to a local service and runs
the policy decision), so it runs on a short-lived worker thread per request and
its answer comes back to the link thread through the command queue; the link
never waits for it. At most :data:`~homeport.proto.mux.MAX_STREAMS` requests exist.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import math
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from homeport.errors import CodedError
from homeport.io.pump import _Poller, tune_socket
from homeport.io.tlsstream import TlsStream
from homeport.proto import mux as pm
from homeport.wire import mux as w

log = logging.getLogger(__name__)

#: Largest single read from a local socket (further capped by the stream's window).
READ_SIZE = 256 * 1024
#: Decrypted bytes gathered before they are handed to the mux in one call (large:
#: a DATA frame that straddles two calls is copied, one that does not is not).
DECRYPT_SIZE = 1024 * 1024
#: Encrypted bytes taken from the outgoing BIO per ``send``.
MAX_TLS_WRITE = 256 * 1024
#: Encrypted bytes we let wait for the TCP socket before we stop encrypting mux output.
MAX_UNSENT = 256 * 1024
#: Raw bytes read from the TCP socket per ``recv_into`` (what one round decrypts).
RAW_READ_SIZE = 1024 * 1024
#: Buffers handed to one ``sendmsg`` (writev) towards a local socket.
MAX_IOV = 32
#: Commands from other threads waiting for the link thread (open, ping, answers, close).
MAX_COMMANDS = 1024
#: Seconds the link thread may block flushing its last frames (GOAWAY) when it ends.
CLOSE_FLUSH_TIMEOUT = 1.0
#: Default seconds :meth:`MuxLink.open_stream` waits for OPEN_OK.
OPEN_TIMEOUT = 10.0
#: A read (local socket or TCP) that drained its fd and got at least this many
#: bytes marks a bulk flow; keystrokes and echoes stay below it and are never held.
COALESCE_MIN = 16 * 1024
#: Seconds a bulk flow's fd is not read again after such a read, so the
#: producer's writes pile up in the kernel buffer and the next wake-up moves a
#: batch (fewer reads, frames, TLS records, sends and GIL hand-offs per byte), as
#: :data:`homeport.io.pump.COALESCE_DELAY` does for relayed streams. Bytes already
#: read are never held.
COALESCE_DELAY = 0.001
#: Seconds an fd is not held after a read that filled >= 3/4 of what was asked
#: (its producer keeps up with us: a hold would only idle the link).
COALESCE_PROBE = 0.1
#: Kernel receive buffer an fd needs to be held: a hold must never fill it.
COALESCE_MIN_KERNEL_BUFFER = 512 * 1024

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_POLLREADABLE = select.POLLIN | select.POLLHUP | select.POLLERR

Meta = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Refusal:
    """What ``on_incoming`` returns to refuse a stream (sent to the opener as OPEN_FAIL)."""

    code: str
    reason: str


IncomingAnswer = tuple[socket.socket, Meta] | Refusal
OnIncoming = Callable[[int, Meta], IncomingAnswer]
OnDead = Callable[[str], None]


class MuxLinkError(CodedError):
    """A stream could not be opened or a ping not answered (``code``: refused code, ``timeout``,
    ``busy``, ``going-away``, ``path-lost`` …)."""


class _Local:
    """The link thread's view of one stream's local socket."""

    __slots__ = (
        "accepted",
        "coalesce",
        "fast",
        "fd",
        "future",
        "hold",
        "peer_fin",
        "rd_eof",
        "rd_ready",
        "sid",
        "sock",
        "wr_off",
        "wr_queue",
        "wr_shut",
    )

    def __init__(
        self,
        sid: int,
        sock: socket.socket,
        *,
        accepted: bool,
        future: concurrent.futures.Future[Meta] | None = None,
    ) -> None:
        self.sid = sid
        self.sock = sock
        self.fd = sock.fileno()
        self.accepted = accepted
        self.future = future
        self.rd_ready = True
        self.rd_eof = False  # local EOF read, FIN sent
        self.peer_fin = False  # the peer's FIN arrived
        self.wr_shut = False  # local SHUT_WR done
        # Received stream bytes not yet written; views of the link's decrypt buffer
        # until the loop copies what is left before that buffer is reused.
        self.wr_queue: collections.deque[bytes | memoryview] = collections.deque()
        self.wr_off = 0  # bytes of wr_queue[0] already written
        # Coalescing (COALESCE_DELAY): whether this fd may be held, the monotonic
        # time before which it is not read (0.0: not held), and before which it is
        # not held at all (its producer outpaced a hold).
        self.coalesce = _holdable(sock, created=not accepted)
        self.hold = 0.0
        self.fast = 0.0

    @property
    def done(self) -> bool:
        return self.rd_eof and self.wr_shut


class MuxLink:
    """One direct connection to a peer carrying many streams. Build with :meth:`start`."""

    def __init__(
        self,
        tls: TlsStream,
        *,
        client: bool,
        on_incoming: OnIncoming,
        on_dead: OnDead,
        name: str = "peer",
        clock: Callable[[], float] = time.monotonic,
        stream_window: int = pm.INITIAL_WINDOW,
    ) -> None:
        self._tls = tls
        self._on_incoming = on_incoming
        self._on_dead = on_dead
        self.name = name
        self._clock = clock
        # borrow_data: DATA payloads are views of the decrypt buffer, written to the
        # local socket from there (see _loop), not copied per frame.
        self._mux = pm.MuxConnection(
            client=client, now=clock(), stream_window=stream_window, borrow_data=True
        )
        self._locals: dict[int, _Local] = {}
        self._pings: dict[int, concurrent.futures.Future[float]] = {}
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._alive = True
        self._thread = threading.Thread(target=self._run, name=f"muxlink-{name}", daemon=True)
        #: Why the link ended (None while alive).
        self.end: pm.ConnectionTerminated | None = None
        #: CPU seconds the link thread used (set when it ends; for benchmarks).
        self.cpu_seconds = 0.0
        #: Stream bytes moved: local → peer, peer → local.
        self.bytes_sent = 0
        self.bytes_received = 0

    @classmethod
    def start(
        cls,
        tls: TlsStream,
        *,
        client: bool,
        on_incoming: OnIncoming,
        on_dead: OnDead,
        name: str = "peer",
        clock: Callable[[], float] = time.monotonic,
        stream_window: int = pm.INITIAL_WINDOW,
    ) -> MuxLink:
        """Run a link over ``tls`` — a handshaken, pin-checked TLS stream (e.g. from
        :func:`homeport.io.dial.e2e_handshake`); ``client`` = we are its TLS client.
        The link owns ``tls`` from now on and closes it when it ends."""
        link = cls(
            tls,
            client=client,
            on_incoming=on_incoming,
            on_dead=on_dead,
            name=name,
            clock=clock,
            stream_window=stream_window,
        )
        link._thread.start()
        return link

    @classmethod
    def over_socket(
        cls,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        *,
        client: bool,
        expected_pin: str,
        on_incoming: OnIncoming,
        on_dead: OnDead,
        name: str = "peer",
        timeout: float = 5.0,
    ) -> MuxLink:
        """Mutual TLS 1.3 over a connected ``sock`` (a punched or accepted direct
        connection), the peer's certificate pinned exactly as for relayed streams,
        then :meth:`start`. Blocks for the handshake.

        Raises:
            homeport.io.dial.DialError: handshake failed, timed out or the pin did not
            match (``sock`` is closed).
        """
        from homeport.io.dial import e2e_handshake

        tls = e2e_handshake(
            sock,
            ctx,
            server_side=not client,
            expected_pin=expected_pin,
            peer_name=name,
            timeout=timeout,
        )
        return cls.start(tls, client=client, on_incoming=on_incoming, on_dead=on_dead, name=name)

    # -- API for other threads ------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def rtt(self) -> float | None:
        """The latest PING/PONG round trip in seconds (None before the first PONG)."""
        return self._mux.rtt

    def open_stream_async(
        self, meta: Meta
    ) -> tuple[socket.socket, concurrent.futures.Future[Meta]]:
        """Open a stream; return the caller's local socket at once and a future of the
        peer's reply meta (it fails with :class:`MuxLinkError`). Bytes written to the
        socket before the answer wait in the socket and are sent once accepted."""
        ours, theirs = socket.socketpair()
        tune_socket(ours)
        tune_socket(theirs)
        fut: concurrent.futures.Future[Meta] = concurrent.futures.Future()
        if not self._command(("open", meta, ours, fut)):
            ours.close()
            theirs.close()
            fut.set_exception(MuxLinkError("path-lost", self._end_reason()))
        return theirs, fut

    def open_stream(self, meta: Meta, timeout: float = OPEN_TIMEOUT) -> tuple[socket.socket, Meta]:
        """Open a stream and wait for the peer's answer: ``(local_socket, reply_meta)``.

        Raises:
            MuxLinkError: refused (the peer's code), ``timeout``, ``busy``, ``path-lost`` …
        """
        sock, fut = self.open_stream_async(meta)
        try:
            reply = fut.result(timeout)
        except concurrent.futures.TimeoutError:
            self._command(("cancel", fut))
            sock.close()
            raise MuxLinkError(
                "timeout", f"{self.name} did not answer within {timeout:g} s"
            ) from None
        except BaseException:
            sock.close()
            raise
        return sock, reply

    def ping(self, timeout: float = 5.0) -> float:
        """Send a PING now and return its round-trip time in seconds."""
        fut: concurrent.futures.Future[float] = concurrent.futures.Future()
        if not self._command(("ping", fut)):
            raise MuxLinkError("path-lost", self._end_reason())
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise MuxLinkError("timeout", f"no PONG from {self.name} in {timeout:g} s") from None

    def close(self, reason: str = "closed") -> None:
        """End the link (GOAWAY to the peer); returns once the link thread is gone."""
        self._command(("close", reason))
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _command(self, cmd: tuple[Any, ...]) -> bool:
        with self._lock:
            if not self._alive:
                return False
            if len(self._commands) >= MAX_COMMANDS:
                raise MuxLinkError("busy", "mux link command queue is full")
            self._commands.append(cmd)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")
        return True

    def _end_reason(self) -> str:
        return self.end.reason if self.end is not None else "direct path closed"

    # -- the link thread ---------------------------------------------------------------
    def _run(self) -> None:
        reason = "direct path closed"
        try:
            end = self._loop()
        except Exception as exc:  # a bug must not leave sockets and waiters hanging
            log.exception("mux link to %s failed", self.name)
            end = pm.ConnectionTerminated("internal", f"mux link failed: {exc}")
        self.end = end
        reason = end.reason
        with self._lock:
            self._alive = False
            leftover = list(self._commands)
            self._commands.clear()
        self._cleanup(leftover, end)
        self.cpu_seconds = time.thread_time()
        try:
            self._on_dead(reason)
        except Exception:
            log.exception("on_dead callback of the mux link to %s failed", self.name)

    def _cleanup(self, leftover: list[tuple[Any, ...]], end: pm.ConnectionTerminated) -> None:
        err = MuxLinkError("path-lost", end.reason)
        self._tls.close()
        for loc in self._locals.values():
            loc.sock.close()
            if loc.future is not None and not loc.future.done():
                loc.future.set_exception(err)
        self._locals.clear()
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(err)
        for cmd in leftover:
            if cmd[0] == "open":
                cmd[2].close()
                cmd[3].set_exception(err)
            elif cmd[0] == "ping":
                cmd[1].set_exception(err)
            elif cmd[0] == "answer" and isinstance(cmd[2], tuple):
                cmd[2][0].close()
        self._wake_r.close()
        self._wake_w.close()

    def _loop(self) -> pm.ConnectionTerminated:
        mux = self._mux
        tls = self._tls
        sock = tls.sock
        obj = tls.obj
        incoming = tls.incoming
        outgoing = tls.outgoing
        clock = self._clock
        tune_socket(sock)
        sock.setblocking(False)
        sock_fd = sock.fileno()
        wake_fd = self._wake_r.fileno()
        # Local reads land straight in DATA frame layout (headers written by the mux
        # afterwards), so stream bytes go from the socket to OpenSSL without a copy.
        framebuf = bytearray(-(-READ_SIZE // w.MAX_MUX_PAYLOAD) * w.DATA_SLOT)
        read_mv = memoryview(framebuf)
        decbuf = bytearray(DECRYPT_SIZE)
        dec_mv = memoryview(decbuf)
        raw = bytearray(RAW_READ_SIZE)
        raw_mv = memoryview(raw)
        wire: memoryview | None = None
        wire_off = 0
        sock_rd_ready = True
        sock_eof = False
        # Coalescing of the TCP socket's reads (see COALESCE_DELAY), as for locals.
        sock_coalesce = _holdable(sock, created=False)
        sock_hold = sock_fast = 0.0
        monotonic = time.monotonic
        wake_ready = True
        poller = _Poller()
        locals_ = self._locals

        while True:
            progress = True
            while progress:
                progress = False
                now = clock()
                if wake_ready:
                    wake_ready = False
                    with contextlib.suppress(BlockingIOError):
                        while self._wake_r.recv(4096):
                            pass
                if self._commands:
                    self._do_commands(now)
                    progress = True
                # ---- local sockets → DATA frames → TLS records (only what the mux
                # takes at once, and only while few encrypted bytes wait for TCP)
                for loc in list(locals_.values()):
                    if not loc.accepted or loc.rd_eof or not loc.rd_ready or loc.hold:
                        continue
                    if (len(wire) - wire_off if wire is not None else 0) + outgoing.pending >= (
                        MAX_UNSENT
                    ):
                        break
                    room = mux.send_window(loc.sid)
                    if room <= 0:
                        continue
                    want = min(room, READ_SIZE)
                    try:
                        n = loc.sock.recvmsg_into(w.data_payload_slots(read_mv, want))[0]
                    except BlockingIOError:
                        loc.rd_ready = False
                        continue
                    except OSError as exc:
                        self._reset_local(loc, f"local read failed: {exc}")
                        progress = True
                        continue
                    progress = True
                    if n == 0:
                        loc.rd_eof = True
                        mux.end_stream(loc.sid)
                        self._maybe_finish(loc)
                    else:
                        pending = mux.data_to_send()  # frames queued earlier go first
                        if pending:
                            obj.write(pending)
                        obj.write(read_mv[: mux.frame_data_into(loc.sid, read_mv, n)])
                        self.bytes_sent += n
                        if n < want:
                            # A short read drained the socket: skip the read that
                            # would only raise EAGAIN; poll says when there is more.
                            loc.rd_ready = False
                        if loc.coalesce and n >= COALESCE_MIN:
                            t_now = monotonic()
                            if n >= READ_SIZE * 3 // 4:
                                loc.fast = t_now + COALESCE_PROBE
                            elif n < want and t_now >= loc.fast:
                                loc.hold = t_now + COALESCE_DELAY
                # ---- mux output → TLS records (bounded by what is still unsent)
                unsent = (len(wire) - wire_off if wire is not None else 0) + outgoing.pending
                if unsent < MAX_UNSENT and mux.pending_output():
                    obj.write(mux.data_to_send())
                    progress = True
                # ---- TLS records → socket
                if wire is None and outgoing.pending:
                    wire = memoryview(outgoing.read(MAX_TLS_WRITE))
                    wire_off = 0
                if wire is not None:
                    try:
                        n = sock.send(wire[wire_off:])
                    except BlockingIOError:
                        pass
                    else:
                        wire_off += n
                        if wire_off == len(wire):
                            wire = None
                        progress = True
                # ---- socket → incoming BIO
                if sock_rd_ready and incoming.pending == 0 and not sock_eof and not sock_hold:
                    try:
                        n = sock.recv_into(raw_mv)
                    except BlockingIOError:
                        sock_rd_ready = False
                    else:
                        if n == 0:
                            sock_eof = True
                            incoming.write_eof()
                        else:
                            incoming.write(raw_mv[:n])
                            if n < RAW_READ_SIZE:  # drained: as for local reads above
                                sock_rd_ready = False
                            if sock_coalesce and n >= COALESCE_MIN:
                                t_now = monotonic()
                                if n >= RAW_READ_SIZE * 3 // 4:
                                    sock_fast = t_now + COALESCE_PROBE
                                elif n < RAW_READ_SIZE and t_now >= sock_fast:
                                    sock_hold = t_now + COALESCE_DELAY
                        progress = True
                # ---- incoming BIO → decrypted buffer → mux
                # With nothing in the BIO, nothing decrypted pending and no EOF,
                # read() could only raise SSLWantReadError: skip that exception.
                got = 0
                ended = False
                while got < DECRYPT_SIZE and (incoming.pending or sock_eof or obj.pending()):
                    try:
                        k = obj.read(DECRYPT_SIZE - got, dec_mv[got:])
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLZeroReturnError:
                        ended = True
                        break
                    except ssl.SSLError as exc:
                        if got:
                            mux.receive_data(dec_mv[:got], clock())
                        mux.close(f"TLS failure on the direct path: {_ssl_reason(exc)}", "tls")
                        got = 0
                        break
                    assert isinstance(k, int)
                    if k == 0:
                        ended = True
                        break
                    got += k
                if got:
                    mux.receive_data(dec_mv[:got], clock())
                    progress = True
                if ended:
                    mux.receive_data(b"", clock())
                    progress = True
                # ---- events
                end = self._do_events()
                if end is not None:
                    self._flush_last(wire[wire_off:] if wire is not None else None)
                    read_mv.release()
                    dec_mv.release()
                    raw_mv.release()
                    return end
                # ---- mux → local sockets, then copy what is left of the decrypt
                # buffer's views (the next decrypt overwrites that buffer)
                for loc in list(locals_.values()):
                    if loc.wr_queue and self._write_local(loc):
                        progress = True
                if got:
                    for loc in locals_.values():
                        if loc.wr_queue:
                            _unborrow(loc)
                # ---- timers
                t = mux.get_timer()
                if t is not None and clock() >= t:
                    mux.handle_timer(clock())
                    progress = True

            # ---- release expired holds; the earliest one bounds the wait
            hold_until = 0.0
            held = [loc for loc in locals_.values() if loc.hold]
            if held or sock_hold:
                t_now = monotonic()
                released = False
                if sock_hold and t_now >= sock_hold:
                    sock_hold = 0.0
                    sock_rd_ready = released = True  # try at once; EAGAIN sends it to poll
                for loc in held:
                    if t_now >= loc.hold:
                        loc.hold = 0.0
                        loc.rd_ready = released = True
                if released:
                    continue
                hold_until = min([loc.hold for loc in held] + ([sock_hold] if sock_hold else []))
            # ---- wait
            wanted: dict[int, int] = {wake_fd: _POLLIN}
            sock_mask = 0
            if incoming.pending == 0 and not sock_eof and not sock_hold:
                sock_mask |= _POLLIN
            if wire is not None:
                sock_mask |= _POLLOUT
            wanted[sock_fd] = sock_mask
            by_fd: dict[int, _Local] = {}
            room_out = (len(wire) - wire_off if wire is not None else 0) + outgoing.pending < (
                MAX_UNSENT
            )
            for loc in locals_.values():
                by_fd[loc.fd] = loc
                mask = 0
                if (
                    loc.accepted
                    and not loc.rd_eof
                    and not loc.hold
                    and room_out
                    and mux.send_window(loc.sid) > 0
                ):
                    mask |= _POLLIN
                if loc.wr_queue:
                    mask |= _POLLOUT
                wanted[loc.fd] = wanted.get(loc.fd, 0) | mask
            poller.set(wanted)
            t = mux.get_timer()
            timeout_ms = None if t is None else max(0, math.ceil((t - clock()) * 1000))
            if hold_until:
                hold_ms = max(0, math.ceil((hold_until - monotonic()) * 1000))
                timeout_ms = hold_ms if timeout_ms is None else min(timeout_ms, hold_ms)
            for fd, ev in poller.poll(timeout_ms):
                if fd == wake_fd:
                    wake_ready = True
                elif fd == sock_fd:
                    if ev & _POLLREADABLE:
                        sock_rd_ready = True
                elif ev & _POLLREADABLE and (hit := by_fd.get(fd)) is not None:
                    hit.rd_ready = True

    # -- pieces of the loop ----------------------------------------------------------
    def _do_commands(self, now: float) -> None:
        mux = self._mux
        while True:
            with self._lock:
                if not self._commands:
                    return
                cmd = self._commands.popleft()
            kind = cmd[0]
            if kind == "open":
                _, meta, sock, fut = cmd
                try:
                    sid = mux.open_stream(meta)
                except (pm.MuxUsageError, ValueError) as exc:
                    sock.close()
                    code = exc.code if isinstance(exc, pm.MuxUsageError) else "bad-meta"
                    fut.set_exception(MuxLinkError(code, str(exc)))
                    continue
                sock.setblocking(False)
                self._locals[sid] = _Local(sid, sock, accepted=False, future=fut)
            elif kind == "answer":
                _, sid, answer = cmd
                self._answer(sid, answer)
            elif kind == "ping":
                try:
                    seq = mux.ping(now)
                except pm.MuxUsageError as exc:
                    cmd[1].set_exception(MuxLinkError("path-lost", str(exc)))
                    continue
                self._pings[seq] = cmd[1]
            elif kind == "cancel":
                for loc in list(self._locals.values()):
                    if loc.future is cmd[1]:
                        self._reset_local(loc, "the opener gave up waiting")
            elif kind == "close":
                mux.close(str(cmd[1]))

    def _answer(self, sid: int, answer: IncomingAnswer | BaseException) -> None:
        mux = self._mux
        if not mux.has_stream(sid) or mux.closed:  # reset while on_incoming ran
            if isinstance(answer, tuple):
                answer[0].close()
            return
        if isinstance(answer, Refusal):
            mux.refuse_stream(sid, answer.code, answer.reason)
        elif isinstance(answer, BaseException):
            mux.refuse_stream(sid, "error", f"destination failed: {answer}")
        else:
            sock, reply = answer
            try:
                mux.accept_stream(sid, reply)
            except ValueError as exc:  # reply meta too large for one frame: a local bug
                sock.close()
                mux.refuse_stream(sid, "error", f"bad reply: {exc}")
                return
            sock.setblocking(False)
            tune_socket(sock)
            self._locals[sid] = _Local(sid, sock, accepted=True)

    def _do_events(self) -> pm.ConnectionTerminated | None:
        mux = self._mux
        while (ev := mux.next_event()) is not None:
            if isinstance(ev, pm.DataReceived):
                loc = self._locals.get(ev.sid)
                if loc is not None:
                    loc.wr_queue.append(ev.data)
                    self.bytes_received += len(ev.data)
            elif isinstance(ev, pm.StreamRequested):
                self._spawn_incoming(ev.sid, ev.meta)
            elif isinstance(ev, pm.StreamAccepted):
                loc = self._locals.get(ev.sid)
                if loc is not None:
                    loc.accepted = True
                    if loc.future is not None and not loc.future.done():
                        loc.future.set_result(ev.meta)
            elif isinstance(ev, pm.StreamRefused):
                loc = self._locals.pop(ev.sid, None)
                if loc is not None:
                    loc.sock.close()
                    if loc.future is not None and not loc.future.done():
                        loc.future.set_exception(MuxLinkError(ev.code, ev.reason))
            elif isinstance(ev, pm.StreamEnded):
                loc = self._locals.get(ev.sid)
                if loc is not None:
                    loc.peer_fin = True
                    self._maybe_finish(loc)
            elif isinstance(ev, pm.StreamReset):
                loc = self._locals.pop(ev.sid, None)
                if loc is not None:
                    loc.sock.close()
                    if loc.future is not None and not loc.future.done():
                        loc.future.set_exception(MuxLinkError("reset", ev.reason))
            elif isinstance(ev, pm.PongReceived):
                fut = self._pings.pop(ev.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(ev.rtt)
            elif isinstance(ev, pm.ConnectionTerminated):
                return ev
        return None

    def _spawn_incoming(self, sid: int, meta: Meta) -> None:
        def work() -> None:
            answer: IncomingAnswer | BaseException
            try:
                answer = self._on_incoming(sid, meta)
            except Exception as exc:
                log.exception("on_incoming for stream %d from %s failed", sid, self.name)
                answer = exc
            if not self._command(("answer", sid, answer)) and isinstance(answer, tuple):
                answer[0].close()

        threading.Thread(target=work, name=f"mux-accept-{sid}", daemon=True).start()

    def _write_local(self, loc: _Local) -> bool:
        """Write queued bytes to the local socket (writev); credit the peer. True = progress."""
        q = loc.wr_queue
        if loc.wr_off:
            bufs: list[bytes | memoryview] = [memoryview(q[0])[loc.wr_off :]]
            bufs.extend(q[i] for i in range(1, min(len(q), MAX_IOV)))
        else:
            bufs = [q[i] for i in range(min(len(q), MAX_IOV))]
        try:
            n = loc.sock.sendmsg(bufs)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._reset_local(loc, f"local write failed: {exc}")
            return True
        self._mux.consumed(loc.sid, n)
        left = n + loc.wr_off
        while q and left >= len(q[0]):
            left -= len(q.popleft())
        loc.wr_off = left
        if not q:
            self._maybe_finish(loc)
        return n > 0

    def _maybe_finish(self, loc: _Local) -> None:
        if loc.peer_fin and not loc.wr_shut and not loc.wr_queue:
            loc.wr_shut = True
            with contextlib.suppress(OSError):
                loc.sock.shutdown(socket.SHUT_WR)
        if loc.done:
            self._locals.pop(loc.sid, None)
            loc.sock.close()

    def _reset_local(self, loc: _Local, reason: str) -> None:
        self._locals.pop(loc.sid, None)
        loc.sock.close()
        self._mux.reset_stream(loc.sid, reason)
        if loc.future is not None and not loc.future.done():
            loc.future.set_exception(MuxLinkError("reset", reason))

    def _flush_last(self, wire: memoryview | None) -> None:
        """Best effort: push what is queued (a GOAWAY naming why) before the socket closes."""
        tls = self._tls
        with contextlib.suppress(OSError, ssl.SSLError, ValueError):
            tail = self._mux.data_to_send()
            if tail:
                tls.obj.write(tail)
            tls.sock.settimeout(CLOSE_FLUSH_TIMEOUT)
            if wire is not None:
                tls.sock.sendall(wire)
            tls.sock.sendall(tls.outgoing.read())


def _unborrow(loc: _Local) -> None:
    """Replace the views in ``loc.wr_queue`` by copies of their unwritten bytes."""
    q = loc.wr_queue
    if not any(isinstance(item, memoryview) for item in q):
        return
    items = list(q)
    q.clear()
    if isinstance(items[0], memoryview) and loc.wr_off:
        items[0] = items[0][loc.wr_off :]
        loc.wr_off = 0
    q.extend(item.tobytes() if isinstance(item, memoryview) else item for item in items)


def _holdable(sock: socket.socket, *, created: bool) -> bool:
    """Whether reads of ``sock`` may be held (COALESCE_DELAY): only when its kernel
    buffer dwarfs a hold's worth. A unix socket's capacity is its *writer's*
    SO_SNDBUF, unknowable from here: it counts only when we ``created`` the pair
    and tuned both ends (:meth:`MuxLink.open_stream_async`)."""
    try:
        size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        family = sock.family
    except OSError:
        return False
    return (family != socket.AF_UNIX or created) and size >= COALESCE_MIN_KERNEL_BUFFER


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return "connection truncated without close_notify"
    return str(reason).lower().replace("_", " ") if reason else str(exc)
