"""The stream pump: plain bytes ⇄ end-to-end TLS, in one thread, with ``poll``.

This is the hot path of every ``ssh`` session through homeport (nc: stdin/stdout
⇄ TLS; agent and forward: a TCP socket ⇄ TLS), so it is written for throughput
and for exact semantics, with the standard library only:

* **One thread, non-blocking fds, ``select.poll``.** Two threads per stream
  would contend for the one SSL object and double the context switches.
* **TLS through memory BIOs** (:class:`~homeport.io.tlsstream.TlsStream`), so
  that half-close works (see that module) and so the pump controls exactly
  which encrypted bytes OpenSSL sees.
* **No per-chunk buffers.** Each direction owns one preallocated
  :data:`BUFFER_SIZE` bytearray; reads go in with ``os.readv`` /
  ``socket.recv_into`` / ``SSLObject.read(n, buffer)`` through memoryviews.
  (The outgoing BIO hands back one bytes object per ≤256 KiB of records.)
* **Bounded buffers = backpressure.** A direction reads only while its buffer
  has room, encrypts only while fewer than :data:`MAX_UNSENT` encrypted bytes
  wait for the socket, and reads the socket only when the incoming BIO is
  empty; a slow consumer stalls its producer instead of growing memory.
* **Few wake-ups per byte (coalescing).** ssh writes one 32 KiB packet at a
  time and is slower than the pump, so each packet used to cost a whole
  wake-up (poll, read, encrypt, send — and on the far end recv, decrypt) and
  the wake-ups, not the bytes, dominated the CPU. After a read that drained
  its fd and got at least :data:`COALESCE_MIN` bytes, that fd is not read
  again for :data:`COALESCE_DELAY`: the next packets pile up in the kernel
  buffer and go through as one batch. Bytes already read are never held,
  small reads (keystrokes) never start a hold, only fds whose kernel buffer
  dwarfs a hold's worth are held (so the producer never stalls), and a
  producer that fills the buffer anyway is not held (:data:`COALESCE_PROBE`).
* **Half-close both ways (TLS 1.3).** Local EOF → once its bytes are encrypted,
  ``unwrap()`` queues ``close_notify`` and reading continues. Peer
  ``close_notify`` → once its bytes are written, ``shutdown(SHUT_WR)`` on a
  socket, or replace a pipe with /dev/null (the reader sees EOF, the fd number
  stays valid). The pump is done when both directions are closed.
* **Integrity failures abort.** Any ``ssl.SSLError`` (a relay flipped a bit:
  bad record MAC; TCP FIN without close_notify: truncation) stops the pump at
  once and closes the socket without flushing anything more. OpenSSL never
  returns bytes that failed authentication, and already-authenticated bytes
  not yet written are dropped too, so the consumer sees a clean prefix.
* **No ``splice``.** OpenSSH reads the SSH banner one byte at a time from
  its ProxyCommand's pipe; splicing into that pipe was seen to hang ssh.

Ownership: the pump always closes ``tls`` (its socket) before returning.
``plain_in`` and ``plain_out`` stay the caller's (the pump only half-closes
``plain_out`` as described, and restores their blocking mode).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import math
import os
import select
import socket
import ssl
import stat
import time
from dataclasses import dataclass

from homeport.io.tlsstream import TlsStream

#: Bytes each direction buffers (one preallocated bytearray per direction).
BUFFER_SIZE = 256 * 1024
#: Largest chunk of encrypted bytes taken from the outgoing BIO for one ``send``.
MAX_TLS_WRITE = BUFFER_SIZE
#: Encrypted bytes we let pile up before we stop encrypting (backpressure on plain_in).
MAX_UNSENT = BUFFER_SIZE
#: Seconds a cancelled pump with ``close_on_cancel`` may block flushing its last records.
CANCEL_FLUSH_TIMEOUT = 1.0
#: Kernel socket buffers we ask for (the kernel may clamp to net.core.*mem_max).
SOCKET_BUFFER = 4 * 1024 * 1024
#: Pipe capacity we ask for on Linux (F_SETPIPE_SZ); 1 MiB is the default max.
PIPE_SIZE = 1024 * 1024
#: A read that drained its fd and got at least this many bytes marks a bulk flow
#: (a keystroke, an echo or a screenful of output stays below it).
COALESCE_MIN = 16 * 1024
#: Seconds a bulk flow's next read of the same fd is held back, so that the
#: producer's small writes (ssh: one 32 KiB channel packet per write) pile up
#: in the kernel buffer and are read, encrypted and sent as one batch. Wake-ups
#: dominate the pump's CPU when the producer is slower than the pump (ssh is).
#: Bytes already read are never held; 0 turns coalescing off.
COALESCE_DELAY = 0.001
#: Seconds an fd is not held after a read filled ≥ 3/4 of the buffer (the
#: producer is about as fast as the pump, so a hold would only cost throughput),
#: before the pump tries holding it again.
COALESCE_PROBE = 0.1
#: Kernel buffer a producer must have for its fd to be held (COALESCE_DELAY):
#: a hold must never fill it, or the producer stalls and throughput drops.
COALESCE_MIN_KERNEL_BUFFER = 512 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_POLLBAD = select.POLLNVAL
_POLLREADABLE = select.POLLIN | select.POLLHUP | select.POLLERR


class PumpEnd(enum.Enum):
    """How a pump finished."""

    CLEAN = "clean"  # both directions closed in order (close_notify both ways)
    TLS_ERROR = "tls-error"  # integrity failure, truncation, reset of the TLS transport
    LOCAL_ERROR = "local-error"  # the local side failed (EPIPE, reset) — not the network's fault
    CANCELLED = "cancelled"  # the cancel fd became readable
    IDLE = "idle"  # nothing moved for ``idle_timeout`` seconds


@dataclass(frozen=True, slots=True)
class PumpResult:
    """Outcome of :func:`pump`; ``sent`` = plain→TLS bytes, ``received`` = TLS→plain."""

    ok: bool
    end: PumpEnd
    reason: str
    sent: int
    received: int


#: TCP keepalive on data connections: first probe after this many idle seconds, ...
KEEPALIVE_IDLE = 60
#: ... then one every this many seconds ...
KEEPALIVE_INTERVAL = 10
#: ... and the peer is declared dead (the socket errors with ETIMEDOUT) after this many
#: unanswered: a silently vanished peer frees its stream within 60 + 6 * 10 = 120 s, while
#: an idle but alive ssh session (its kernel answers the probes) is never cut.
KEEPALIVE_COUNT = 6


def set_keepalive(sock: socket.socket) -> None:
    """Turn on TCP keepalive with the limits above (once per connection, never per chunk)."""
    for level, opt, value in (
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", -1), KEEPALIVE_IDLE),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", -1), KEEPALIVE_INTERVAL),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", -1), KEEPALIVE_COUNT),
    ):
        with contextlib.suppress(OSError):  # not TCP (a socketpair in tests), or no such option
            sock.setsockopt(level, opt, value)


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY (interactive ssh keystrokes), large buffers (bulk copies), keepalive
    (a peer that vanished without a FIN or RST must not hold the stream forever)."""
    if sock.family != socket.AF_UNIX:
        set_keepalive(sock)
    for level, opt, value in (
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER),
        (socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER),
    ):
        with contextlib.suppress(OSError):  # not TCP (a socketpair in tests), or restricted
            sock.setsockopt(level, opt, value)


def _tune_fd(fd: int, local_tuned: bool = False) -> tuple[bool, bool]:
    """Enlarge a pipe or socket; return (is a socket, large enough to hold reads).

    A unix socket's capacity is its *writer's* SO_SNDBUF, which we cannot read
    from this end: it counts as large only when the caller created the pair and
    tuned the writer's end (``local_tuned``).
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False, False
    if stat.S_ISFIFO(mode):
        with contextlib.suppress(OSError):  # over /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
        try:
            size = fcntl.fcntl(fd, _F_GETPIPE_SZ)
        except OSError:
            return False, False
        return False, size >= COALESCE_MIN_KERNEL_BUFFER
    if stat.S_ISSOCK(mode):
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            return True, False
        try:
            tune_socket(s)
            size = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            large = s.family != socket.AF_UNIX or local_tuned
        except OSError:
            return True, False
        finally:
            s.close()
        return True, large and size >= COALESCE_MIN_KERNEL_BUFFER
    return False, False


class _Poller:
    """``select.poll`` with interest sets recomputed each round but syscalls only on change.

    An fd with no interest is unregistered, because poll reports POLLHUP/POLLERR
    for every registered fd regardless of its mask, which would spin the loop
    (e.g. the write end of a pipe whose reader left while we have nothing to write).
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._masks: dict[int, int] = {}

    def set(self, wanted: dict[int, int]) -> None:
        for fd in list(self._masks):
            if wanted.get(fd, 0) == 0:
                self._poll.unregister(fd)
                del self._masks[fd]
        for fd, mask in wanted.items():
            if mask == 0:
                continue
            old = self._masks.get(fd)
            if old is None:
                self._poll.register(fd, mask)
            elif old != mask:
                self._poll.modify(fd, mask)
            self._masks[fd] = mask

    def poll(self, timeout_ms: int | None) -> list[tuple[int, int]]:
        return self._poll.poll(timeout_ms)


def pump(
    tls: TlsStream,
    plain_in: int,
    plain_out: int,
    *,
    cancel_fd: int | None = None,
    close_on_cancel: bool = False,
    idle_timeout: float | None = None,
    buffer_size: int = BUFFER_SIZE,
    coalesce: float = COALESCE_DELAY,
    local_tuned: bool = False,
) -> PumpResult:
    """Copy ``plain_in`` → ``tls`` and ``tls`` → ``plain_out`` until both are closed.

    Args:
        tls: a handshaken end-to-end TLS stream; its socket is closed on return.
        plain_in, plain_out: local fds (the same fd for a TCP socket).
        cancel_fd: when it becomes readable the pump stops (``CANCELLED``).
        close_on_cancel: on cancel, encrypt what plain_in already gave us, send
            close_notify and flush for up to :data:`CANCEL_FLUSH_TIMEOUT` — for
            ``nc``, whose ssh hangs it up (SIGHUP) once the session is over: the
            peer then sees a clean end instead of a truncation.
        idle_timeout: stop (``IDLE``) after this many seconds without a byte moving.
        buffer_size: per-direction buffer (tests use small ones to force partial I/O).
        coalesce: after a bulk-sized read that drained its fd, wait this long
            before reading that fd again (:data:`COALESCE_DELAY`; 0 = never).
            Only fds whose kernel buffer holds far more than a hold's worth
            are held: pipes we could enlarge, TCP sockets, and unix sockets
            whose writer's end the caller enlarged (``local_tuned``, e.g. with
            :func:`tune_socket` on the far end of its own socketpair).
    """
    sock = tls.sock
    obj = tls.obj
    incoming = tls.incoming
    outgoing = tls.outgoing
    in_blocking = os.get_blocking(plain_in)
    out_blocking = os.get_blocking(plain_out)
    out_is_socket, in_large = _tune_fd(plain_out, local_tuned)
    if plain_in != plain_out:
        _, in_large = _tune_fd(plain_in, local_tuned)
    tune_socket(sock)
    in_coalesce = coalesce if in_large else 0.0
    sock_coalesce = coalesce
    with contextlib.suppress(OSError):
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < COALESCE_MIN_KERNEL_BUFFER:
            sock_coalesce = 0.0
    sock.setblocking(False)
    os.set_blocking(plain_in, False)
    os.set_blocking(plain_out, False)
    sock_fd = sock.fileno()

    up = bytearray(buffer_size)  # plain_in → TLS
    up_mv = memoryview(up)
    up_off = up_len = 0
    down = bytearray(buffer_size)  # TLS → plain_out
    down_mv = memoryview(down)
    down_off = down_len = 0
    raw = bytearray(buffer_size)  # socket → incoming BIO
    raw_mv = memoryview(raw)
    wire: memoryview | None = None  # encrypted bytes taken from the outgoing BIO, not yet sent
    wire_off = 0
    sent = received = 0

    # Readiness as last learned from poll or from EAGAIN: an fd is tried only while
    # it may be ready, so the loop never spends a syscall and an exception on an
    # fd that poll has not reported (measured: ~40% of nc's syscalls otherwise).
    in_ready = sock_rd_ready = True
    # Coalescing (see COALESCE_DELAY): monotonic time before which plain_in / the
    # socket is not read again; 0.0 = not held.
    in_hold = sock_hold = 0.0
    # ... and before which it is not held at all (its producer outpaced a hold).
    in_fast = sock_fast = 0.0
    fast_fill = buffer_size * 3 // 4  # a read that fills this much: no holding
    up_eof = False  # plain_in hit EOF
    up_closed = False  # close_notify queued
    down_eof = False  # the peer's close_notify arrived
    down_closed = False  # plain_out half-closed
    sock_eof = False  # TCP FIN on the transport
    poller = _Poller()
    last_activity = time.monotonic()

    def finish(ok: bool, end: PumpEnd, reason: str) -> PumpResult:
        return PumpResult(ok, end, reason, sent, received)

    result: PumpResult | None = None
    try:
        while result is None:
            progress = True
            while progress and result is None:
                progress = False
                # ---- plain_in → up buffer
                if in_ready and not up_eof and up_len < buffer_size:
                    room = buffer_size - up_len
                    try:
                        n = os.readv(plain_in, [up_mv[up_len:]])
                    except BlockingIOError:
                        in_ready = False
                    except (ConnectionResetError, BrokenPipeError, TimeoutError) as exc:
                        result = finish(False, PumpEnd.LOCAL_ERROR, f"local read: {exc}")
                        break
                    else:
                        if n == 0:
                            up_eof = True
                        else:
                            up_len += n
                            if n < room:
                                # A short read drained the pipe/socket: skip the
                                # read that would only raise EAGAIN; poll says when.
                                in_ready = False
                            if in_coalesce and n >= COALESCE_MIN:
                                now = time.monotonic()
                                if up_len >= fast_fill:
                                    # The buffer (nearly) filled: the producer keeps up
                                    # with a hold, which would only idle the pump and
                                    # cap throughput near buffer_size per hold.
                                    in_fast = now + COALESCE_PROBE
                                elif n < room and now >= in_fast:
                                    in_hold = now + in_coalesce
                        progress = True
                # ---- up buffer → TLS records (bounded by what is still unsent)
                if up_off < up_len and (
                    (len(wire) - wire_off if wire is not None else 0) + outgoing.pending
                    < MAX_UNSENT
                ):
                    n = obj.write(up_mv[up_off:up_len])
                    up_off += n
                    sent += n
                    if up_off == up_len:
                        up_off = up_len = 0
                    progress = True
                # ---- local EOF → close_notify, when OpenSSL has nothing unread to trip on
                if (
                    up_eof
                    and not up_closed
                    and up_off == up_len
                    and incoming.pending == 0
                    and obj.pending() == 0
                ):
                    try:
                        obj.unwrap()
                    except ssl.SSLWantReadError:
                        pass  # close_notify is queued; the peer's may follow later
                    else:
                        down_eof = True  # the peer's close_notify had already arrived
                    up_closed = True
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
                # ---- socket → incoming BIO (only when empty: see tlsstream's doc)
                if sock_rd_ready and incoming.pending == 0 and not sock_eof and not down_eof:
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
                            if n < buffer_size:  # drained: as for plain_in above
                                sock_rd_ready = False
                            if sock_coalesce and n >= COALESCE_MIN:
                                now = time.monotonic()
                                if n >= fast_fill:
                                    sock_fast = now + COALESCE_PROBE
                                elif now >= sock_fast:
                                    sock_hold = now + sock_coalesce
                        progress = True
                # ---- incoming BIO → down buffer (until OpenSSL wants more bytes).
                # With nothing in the BIO, nothing decrypted pending and no EOF,
                # read() could only raise SSLWantReadError: skip that exception.
                while (
                    not down_eof
                    and down_len < buffer_size
                    and (incoming.pending or sock_eof or obj.pending())
                ):
                    got: int | bytes
                    try:
                        got = obj.read(buffer_size - down_len, down_mv[down_len:])
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLZeroReturnError:
                        got = 0
                    assert isinstance(got, int)  # read into a buffer returns a count
                    if got == 0:
                        down_eof = True
                    else:
                        down_len += got
                        received += got
                    progress = True
                # ---- down buffer → plain_out
                if down_off < down_len:
                    try:
                        n = os.write(plain_out, down_mv[down_off:down_len])
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError) as exc:
                        result = finish(False, PumpEnd.LOCAL_ERROR, f"local write: {exc}")
                        break
                    else:
                        down_off += n
                        if down_off == down_len:
                            down_off = down_len = 0
                        progress = True
                # ---- peer EOF → half-close plain_out once its bytes are out
                if down_eof and not down_closed and down_off == down_len:
                    down_closed = True
                    _half_close(plain_out, out_is_socket, plain_in)
                    progress = True
                if up_closed and down_closed and wire is None and not outgoing.pending:
                    result = finish(True, PumpEnd.CLEAN, "closed")
                if progress:
                    last_activity = time.monotonic()
            if result is not None:
                break

            # ---- nothing more to do without waiting: poll
            timeout_s: float | None = None
            if in_hold or sock_hold:
                now = time.monotonic()
                if in_hold and now >= in_hold:
                    in_hold = 0.0
                    in_ready = True  # try the read at once; EAGAIN sends it to poll
                if sock_hold and now >= sock_hold:
                    sock_hold = 0.0
                    sock_rd_ready = True
                if in_ready or sock_rd_ready:
                    continue
                timeout_s = min(t for t in (in_hold, sock_hold) if t) - now
            wanted: dict[int, int] = {}
            if not up_eof and up_len < buffer_size and not in_hold:
                wanted[plain_in] = _POLLIN
            if down_off < down_len:
                wanted[plain_out] = wanted.get(plain_out, 0) | _POLLOUT
            sock_mask = 0
            if incoming.pending == 0 and not sock_eof and not down_eof and not sock_hold:
                sock_mask |= _POLLIN
            if wire is not None:
                sock_mask |= _POLLOUT
            wanted[sock_fd] = sock_mask
            if cancel_fd is not None:
                wanted[cancel_fd] = _POLLIN
            poller.set(wanted)
            if idle_timeout is not None:
                left = last_activity + idle_timeout - time.monotonic()
                if left <= 0:
                    result = finish(False, PumpEnd.IDLE, f"idle for {idle_timeout:.0f}s")
                    break
                timeout_s = left if timeout_s is None else min(timeout_s, left)
            timeout_ms = None if timeout_s is None else max(1, math.ceil(timeout_s * 1000))
            for fd, ev in poller.poll(timeout_ms):
                if cancel_fd is not None and fd == cancel_fd:
                    result = finish(False, PumpEnd.CANCELLED, "cancelled")
                    if close_on_cancel:
                        if up_off < up_len:
                            sent += obj.write(up_mv[up_off:up_len])
                        _close_and_flush(tls, wire[wire_off:] if wire is not None else None)
                        result = finish(False, PumpEnd.CANCELLED, "cancelled")
                elif ev & _POLLBAD:
                    result = finish(False, PumpEnd.LOCAL_ERROR, f"fd {fd} is not open")
                else:
                    # POLLHUP/POLLERR count as readable: the read reports EOF or the error.
                    if fd == plain_in and ev & _POLLREADABLE:
                        in_ready = True
                    if fd == sock_fd and ev & _POLLREADABLE:
                        sock_rd_ready = True
    except ssl.SSLError as exc:
        result = finish(
            False, PumpEnd.TLS_ERROR, f"stream integrity/TLS failure: {_ssl_reason(exc)}"
        )
    except OSError as exc:
        # The transport (reset by the relay) or an unexpected local fd error.
        result = finish(False, PumpEnd.TLS_ERROR, f"stream connection failed: {exc}")
    finally:
        up_mv.release()
        down_mv.release()
        raw_mv.release()
        tls.close()
        for fd, blocking in ((plain_in, in_blocking), (plain_out, out_blocking)):
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)
    return result


def _close_and_flush(tls: TlsStream, wire: memoryview | None) -> None:
    """Best effort: queue close_notify and push every queued record out, briefly blocking."""
    with contextlib.suppress(ssl.SSLError):
        # The second SSL_shutdown inside unwrap() may trip on unread records;
        # by then close_notify is already queued, which is all we need.
        tls.obj.unwrap()
    with contextlib.suppress(OSError):
        tls.sock.settimeout(CANCEL_FLUSH_TIMEOUT)
        if wire is not None:
            tls.sock.sendall(wire)
        tls.sock.sendall(tls.outgoing.read())


def _half_close(fd: int, is_socket: bool, plain_in: int) -> None:
    """Signal EOF on ``fd`` without giving up the fd number (see the module doc)."""
    if is_socket:
        s = socket.socket(fileno=os.dup(fd))
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the local peer already went away; nothing left to signal
        finally:
            s.close()
    elif fd != plain_in:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = getattr(exc, "reason", None)
    # 3.11.7 raises SSLEOFError for a ragged EOF; 3.11.2 a plain SSLError with this reason.
    if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return "connection truncated without close_notify"
    return str(reason).lower().replace("_", " ") if reason else str(exc)
