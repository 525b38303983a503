"""The relay: pair two data connections by token and splice them together.

Theory of operation. The control plane (``service``) announces each stream
with :meth:`Relay.expect` — the opener's token Tc and the destination's token
Ta — and the listener hands every data connection, its 20-byte preamble
already read, to :meth:`Relay.attach`. A connection whose token is not (yet)
expected waits up to ``unpaired_timeout`` (the opener dials its data
connection at the same time as it sends OPEN, so it often arrives first).
Once both ends of a stream are present the relay starts two threads, one per
direction, and never looks at a byte again: what follows the preamble is the
end-to-end TLS session between the two nodes.

Why threads and ``splice(2)``: each direction is a blocking loop
``socket → pipe → socket`` in the kernel; no byte is copied into Python, and
a blocked thread costs no CPU. That keeps the relay around 0.1 CPU-s per GiB.
Where ``os.splice`` is missing (non-Linux) a recv_into/sendall copy runs
instead.

Half-close: EOF on one side becomes ``shutdown(SHUT_WR)`` on the other (TLS
1.3 close_notify needs it); the sockets close when both directions have
ended, or at once on any error, or when :meth:`Relay.cut_node` shuts them.

Time: ``sweep(now)`` expires what waited too long; the owner calls it
periodically with ``time.monotonic()`` (tests pass their own clock).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("homeport.server.relay")

#: How long a data connection may wait for its stream (and a stream for its ends).
UNPAIRED_TIMEOUT = 10.0
#: Data connections waiting for a token the relay does not expect (yet).
MAX_UNPAIRED = 1024
#: Streams expected or splicing. Each splicing stream holds 2 sockets, 2 pipes, 2 threads.
MAX_STREAMS = 4096
#: Pipe capacity we ask for (F_SETPIPE_SZ); the kernel default is 64 KiB and
#: 1 MiB is the default /proc/sys/fs/pipe-max-size for unprivileged processes.
PIPE_SIZE = 1024 * 1024
#: Bytes asked for per splice(2) call: a full pipe. Measured on loopback
#: (2 GiB, one stream): 256 KiB → ~0.30 CPU-s/GiB, 1 MiB → ~0.20-0.24 CPU-s/GiB.
SPLICE_CHUNK = PIPE_SIZE
#: Buffer of the copy fallback, per direction.
COPY_CHUNK = 64 * 1024

_HAVE_SPLICE = hasattr(os, "splice")
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, absent from older fcntl modules
_ENDED_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ESHUTDOWN}


class RelayFull(Exception):
    """Too many streams; the OPEN fails with a retryable error."""


class TokenInUse(Exception):
    """A token is already expected by another stream."""


class StreamState(enum.Enum):
    WAITING = "waiting"  # expected, not both ends present yet
    SPLICING = "splicing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class StreamStats:
    stream_id: str
    src_node: str
    dst_node: str
    state: StreamState
    bytes_src_to_dst: int
    bytes_dst_to_src: int
    started: float  # unix seconds when splicing began (0 while waiting)


@dataclass(frozen=True, slots=True)
class RelayStats:
    """An immutable snapshot of the relay."""

    streams: tuple[StreamStats, ...]
    unpaired: int
    streams_spliced_total: int
    bytes_total: int
    splice: bool


@dataclass(eq=False)
class _Stream:
    stream_id: str
    src_node: str
    dst_node: str
    src_token: bytes
    dst_token: bytes
    deadline: float
    state: StreamState = StreamState.WAITING
    src_sock: socket.socket | None = None
    dst_sock: socket.socket | None = None
    bytes_src_to_dst: int = 0
    bytes_dst_to_src: int = 0
    started: float = 0.0
    directions_left: int = 2
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stats(self) -> StreamStats:
        return StreamStats(
            self.stream_id,
            self.src_node,
            self.dst_node,
            self.state,
            self.bytes_src_to_dst,
            self.bytes_dst_to_src,
            self.started,
        )


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def _shutdown(sock: socket.socket | None, how: int) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(how)


def _make_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, ImportError):  # over /proc/sys/fs/pipe-max-size: keep the default
        pass
    return r, w


def _pump_splice(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> None:
    """Move src → dst through a pipe until EOF; then half-close dst."""
    r, w = _make_pipe()
    try:
        src_fd, dst_fd = src.fileno(), dst.fileno()
        flags_in = os.SPLICE_F_MOVE | os.SPLICE_F_MORE
        # No SPLICE_F_MORE towards the socket: it would act like MSG_MORE and
        # hold a small interactive write (a keystroke) back, waiting for more.
        flags_out = os.SPLICE_F_MOVE
        while True:
            n = os.splice(src_fd, w, SPLICE_CHUNK, flags=flags_in)
            if n == 0:
                break
            left = n
            while left:
                left -= os.splice(r, dst_fd, left, flags=flags_out)
            count(n)
    finally:
        os.close(r)
        os.close(w)
    dst.shutdown(socket.SHUT_WR)


def _pump_copy(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> None:
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    while True:
        n = src.recv_into(buf)
        if n == 0:
            break
        dst.sendall(view[:n])
        count(n)
    dst.shutdown(socket.SHUT_WR)


class Relay:
    """Pairs data connections by token and splices them; thread-safe."""

    def __init__(
        self,
        *,
        unpaired_timeout: float = UNPAIRED_TIMEOUT,
        max_unpaired: int = MAX_UNPAIRED,
        max_streams: int = MAX_STREAMS,
        use_splice: bool = _HAVE_SPLICE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.unpaired_timeout = unpaired_timeout
        self.max_unpaired = max_unpaired
        self.max_streams = max_streams
        self.use_splice = use_splice and _HAVE_SPLICE
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._by_token: dict[bytes, _Stream] = {}
        self._unpaired: dict[bytes, tuple[socket.socket, float]] = {}
        # tokens of failed streams whose data connection has not arrived (yet)
        self._refused: dict[bytes, float] = {}
        self._spliced_total = 0
        self._bytes_total = 0
        self._threads: set[threading.Thread] = set()
        self._closed = False

    # -- control plane -------------------------------------------------------
    def expect(
        self,
        stream_id: str,
        *,
        src_node: str,
        dst_node: str,
        src_token: bytes,
        dst_token: bytes,
        timeout: float | None = None,
    ) -> None:
        """Announce a stream whose ends will present ``src_token`` and ``dst_token``.

        ``timeout`` (default ``unpaired_timeout``) bounds how long the stream
        may wait for both ends; the caller may extend it with :meth:`extend`.

        Raises:
            RelayFull: MAX_STREAMS reached. TokenInUse: a token is taken.
        """
        now = self._clock()
        start: _Stream | None = None
        with self._lock:
            if self._closed or len(self._streams) >= self.max_streams:
                raise RelayFull(f"relay has {len(self._streams)} streams (limit)")
            if src_token == dst_token or src_token in self._by_token or dst_token in self._by_token:
                raise TokenInUse(stream_id)
            st = _Stream(
                stream_id=stream_id,
                src_node=src_node,
                dst_node=dst_node,
                src_token=src_token,
                dst_token=dst_token,
                deadline=now + (self.unpaired_timeout if timeout is None else timeout),
            )
            self._streams[stream_id] = st
            self._by_token[src_token] = st
            self._by_token[dst_token] = st
            for token in (src_token, dst_token):
                parked = self._unpaired.pop(token, None)
                if parked is not None:
                    self._bind(st, token, parked[0])
            if st.src_sock is not None and st.dst_sock is not None:
                start = st
        if start is not None:
            self._start(start)

    def extend(self, stream_id: str, timeout: float) -> None:
        """Give a waiting stream ``timeout`` more seconds from now (e.g. after ACCEPT)."""
        with self._lock:
            st = self._streams.get(stream_id)
            if st is not None and st.state is StreamState.WAITING:
                st.deadline = self._clock() + timeout

    def cancel(self, stream_id: str) -> None:
        """The stream will not happen: close whatever ends already arrived."""
        with self._lock:
            st = self._streams.get(stream_id)
            if st is None or st.state is not StreamState.WAITING:
                return
            socks = self._forget(st)
            for token, sock in ((st.src_token, st.src_sock), (st.dst_token, st.dst_sock)):
                if sock is None:
                    self._remember_refused(token)
        for s in socks:
            _close(s)

    def cut_node(self, node_id: str) -> int:
        """Shut down every stream touching ``node_id`` at once. Returns how many."""
        with self._lock:
            victims = [s for s in self._streams.values() if node_id in (s.src_node, s.dst_node)]
            to_close: list[socket.socket] = []
            for st in victims:
                if st.state is StreamState.WAITING:
                    to_close += self._forget(st)
        for sock in to_close:
            _close(sock)
        for st in victims:
            if st.state is StreamState.SPLICING:
                # wakes both pump threads; the last one closes the sockets
                _shutdown(st.src_sock, socket.SHUT_RDWR)
                _shutdown(st.dst_sock, socket.SHUT_RDWR)
        return len(victims)

    def refuse_token(self, token: bytes) -> None:
        """The OPEN naming ``token`` failed: close its data connection now or on arrival.

        The opener dials its data connection while the OPEN is in flight, so
        it may arrive after the refusal; remembering the token for
        ``unpaired_timeout`` closes it at once instead of letting it wait.
        """
        with self._lock:
            parked = self._unpaired.pop(token, None)
            if parked is None:
                self._remember_refused(token)
        if parked is not None:
            _close(parked[0])

    # -- data plane ------------------------------------------------------------
    def attach(self, token: bytes, sock: socket.socket) -> None:
        """Take ownership of a data connection whose preamble named ``token``."""
        now = self._clock()
        start: _Stream | None = None
        reject: str | None = None
        with self._lock:
            st = self._by_token.get(token)
            if self._closed:
                reject = "relay is shutting down"
            elif self._refused.pop(token, None) is not None:
                reject = "its stream was refused or cancelled"
            elif st is not None:
                if st.state is not StreamState.WAITING:
                    reject = "token already used"
                elif (st.src_sock if token == st.src_token else st.dst_sock) is not None:
                    reject = "duplicate data connection for a token"
                else:
                    self._bind(st, token, sock)
                    if st.src_sock is not None and st.dst_sock is not None:
                        start = st
            elif token in self._unpaired:
                reject = "duplicate data connection for a token"
            elif len(self._unpaired) >= self.max_unpaired:
                reject = f"too many unpaired data connections ({self.max_unpaired})"
            else:
                self._unpaired[token] = (sock, now + self.unpaired_timeout)
        if reject is not None:
            log.info("closing data connection: %s", reject)
            _close(sock)
        elif start is not None:
            self._start(start)

    def sweep(self, now: float | None = None) -> int:
        """Close data connections and streams that waited past their deadline."""
        t = self._clock() if now is None else now
        to_close: list[socket.socket] = []
        with self._lock:
            for token, (sock, deadline) in list(self._unpaired.items()):
                if t >= deadline:
                    del self._unpaired[token]
                    to_close.append(sock)
            for st in list(self._streams.values()):
                if st.state is StreamState.WAITING and t >= st.deadline:
                    to_close += self._forget(st)
            for token, deadline in list(self._refused.items()):
                if t >= deadline:
                    del self._refused[token]
        for sock in to_close:
            _close(sock)
        if to_close:
            log.info("closed %d data connection(s) that found no partner in time", len(to_close))
        return len(to_close)

    def statistics(self) -> RelayStats:
        with self._lock:
            return RelayStats(
                streams=tuple(s.stats() for s in self._streams.values()),
                unpaired=len(self._unpaired),
                streams_spliced_total=self._spliced_total,
                bytes_total=self._bytes_total
                + sum(s.bytes_src_to_dst + s.bytes_dst_to_src for s in self._streams.values()),
                splice=self.use_splice,
            )

    def close(self, join_timeout: float = 5.0) -> None:
        """Close everything and wait (bounded) for the pump threads."""
        with self._lock:
            self._closed = True
            socks = [s for s, _ in self._unpaired.values()]
            self._unpaired.clear()
            streams = list(self._streams.values())
            for st in streams:
                if st.state is StreamState.WAITING:
                    socks += self._forget(st)
            threads = list(self._threads)
        for sock in socks:
            _close(sock)
        for st in streams:
            if st.state is StreamState.SPLICING:
                _shutdown(st.src_sock, socket.SHUT_RDWR)
                _shutdown(st.dst_sock, socket.SHUT_RDWR)
        deadline = time.monotonic() + join_timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- internals (hold self._lock) -------------------------------------------
    def _bind(self, st: _Stream, token: bytes, sock: socket.socket) -> None:
        if token == st.src_token:
            st.src_sock = sock
        else:
            st.dst_sock = sock

    def _remember_refused(self, token: bytes) -> None:
        if len(self._refused) >= self.max_unpaired:
            self._refused.pop(next(iter(self._refused)))  # the oldest
        self._refused[token] = self._clock() + self.unpaired_timeout

    def _forget(self, st: _Stream) -> list[socket.socket]:
        """Drop a stream from the tables; return its sockets for closing."""
        self._streams.pop(st.stream_id, None)
        self._by_token.pop(st.src_token, None)
        self._by_token.pop(st.dst_token, None)
        st.state = StreamState.CLOSED
        socks = [s for s in (st.src_sock, st.dst_sock) if s is not None]
        return socks

    # -- splicing ----------------------------------------------------------------
    def _start(self, st: _Stream) -> None:
        assert st.src_sock is not None and st.dst_sock is not None
        with self._lock:
            st.state = StreamState.SPLICING
            st.started = time.time()
            self._spliced_total += 1
            # tokens are single-use: a late duplicate must not find this stream
            self._by_token.pop(st.src_token, None)
            self._by_token.pop(st.dst_token, None)
        for sock in (st.src_sock, st.dst_sock):
            sock.setblocking(True)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def up(n: int) -> None:
            st.bytes_src_to_dst += n

        def down(n: int) -> None:
            st.bytes_dst_to_src += n

        threads = [
            threading.Thread(
                target=self._run,
                args=(st, st.src_sock, st.dst_sock, up),
                name=f"relay-{st.stream_id}-up",
                daemon=True,
            ),
            threading.Thread(
                target=self._run,
                args=(st, st.dst_sock, st.src_sock, down),
                name=f"relay-{st.stream_id}-down",
                daemon=True,
            ),
        ]
        with self._lock:
            self._threads.update(threads)
        log.info("stream %s: splicing %s -> %s", st.stream_id, st.src_node, st.dst_node)
        for t in threads:
            t.start()

    def _run(
        self,
        st: _Stream,
        src: socket.socket,
        dst: socket.socket,
        count: Callable[[int], None],
    ) -> None:
        pump = _pump_splice if self.use_splice else _pump_copy
        try:
            pump(src, dst, count)
        except OSError as exc:
            if exc.errno not in _ENDED_ERRNOS:
                log.info("stream %s: %s", st.stream_id, exc)
            # an error in one direction ends both: wake the other thread
            _shutdown(src, socket.SHUT_RDWR)
            _shutdown(dst, socket.SHUT_RDWR)
        except Exception:  # never let a pump thread die silently
            log.exception("stream %s: relay thread failed", st.stream_id)
            _shutdown(src, socket.SHUT_RDWR)
            _shutdown(dst, socket.SHUT_RDWR)
        finally:
            with st.lock:
                st.directions_left -= 1
                last = st.directions_left == 0
            if last:
                self._finish(st)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _finish(self, st: _Stream) -> None:
        _close(st.src_sock)
        _close(st.dst_sock)
        with self._lock:
            self._streams.pop(st.stream_id, None)
            st.state = StreamState.CLOSED
            self._bytes_total += st.bytes_src_to_dst + st.bytes_dst_to_src
        log.info(
            "stream %s: closed after %.1fs, %d bytes up, %d bytes down",
            st.stream_id,
            time.time() - st.started,
            st.bytes_src_to_dst,
            st.bytes_dst_to_src,
        )
