"""The splice engine: a fixed pool of worker threads, each moving many streams with epoll.

Why this shape (measured, docs/benchmarks.md): ``splice(2)`` moves bytes
socket → pipe → socket inside the kernel, so the relay never copies payload
into Python and costs ~0.2 CPU-s/GiB; but one blocking thread per direction
(the first relay) means 2 threads and 2 pipes per stream, i.e. 8,192 threads
and 16,384 pipe fds at 4,096 streams — over this host's 20,000-fd limit.
Here each worker owns one ``epoll`` and serves any number of streams:

* **Level-triggered readiness, one splice each way per chunk.** A socket is
  watched for input while its direction has pipe room and for output only
  while a write came up short; a short read means "drained" and a short write
  "full", so the common path is epoll_wait + splice in + splice out, with no
  EAGAIN round trip and no ``epoll_ctl`` (the mask changes only on
  backpressure). A hung-up socket is dropped from epoll (HUP is reported
  whatever the mask) and treated as never blocking again.
* **Pooled pipes.** A direction leases a pipe from its worker only while bytes
  sit in it (read from the source, not yet written to the destination), and
  gives it back as soon as it is empty. Idle streams hold no pipe; a worker
  creates at most :data:`MAX_PIPES` (then directions wait for one: more
  backpressure, never more memory), and keeps at most :data:`POOL_KEEP` idle.
* **Bulk mode** (for ssh traffic, which reaches us as one TLS record of
  ≤ 16 KiB per write, so a wake-up per record cost ~0.8 CPU-s/GiB in Python).
  After BULK_STREAK reads of ≥ BULK_READ bytes a stream raises SO_RCVLOWAT on
  both its sockets to about BULK_WAKE_S of its traffic, so epoll reports a
  socket once that much is queued (EOF and errors still at once); every
  wake-up of the stream reads both directions, so the small records going
  back (window adjusts) ride along; a stream nothing woke for FLUSH_S is read
  anyway (a tail below the mark), and leaves bulk mode if that found little.
  It keeps its pipes meanwhile (no lease/release per wake-up). The cost: a
  byte of a bulk stream may wait in the relay up to ~1.5 x FLUSH_S (15 ms)
  once the burst ends; interactive streams never enter bulk mode.
* **Backpressure.** A direction reads only while its pipe has room, so a slow
  reader stalls its writer's socket buffer, then TCP flow control.
* **Half-close.** EOF on one side becomes ``shutdown(SHUT_WR)`` on the other
  once the pipe is drained (TLS 1.3 close_notify needs exact half-close); the
  stream ends when both directions have ended, or at once on any error.
* **Cuts** go through the worker's inbox (an eventfd wakes it), so a socket is
  only ever touched by its worker: no race between a cut and a close.

Where ``os.splice`` is missing (non-Linux) the same loop copies through a
pooled buffer with ``recv_into``/``send``.

``on_end`` (given to the constructor) is called **from a worker thread** when a
stream has ended and its sockets are closed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger("homeport.relay.splice")

#: Worker threads (each one epoll loop); bounded whatever the number of streams.
WORKERS = max(1, min(4, os.cpu_count() or 1))
#: Pipe capacity we ask for (F_SETPIPE_SZ); 1 MiB is the default pipe-max-size.
#: Measured on loopback: 256 KiB → ~0.30 CPU-s/GiB, 1 MiB → ~0.20 CPU-s/GiB.
PIPE_SIZE = 1024 * 1024
#: Pipes one worker may have at once (2 fds each); beyond it directions wait.
MAX_PIPES = 512
#: Idle pipes a worker keeps for reuse; more are closed.
POOL_KEEP = 32
#: Copy-fallback buffer per busy direction (no splice).
COPY_CHUNK = 256 * 1024
#: Streams whose ends one wake-up may process before epoll is polled again.
MAX_EVENTS = 1024
#: A read at least this large counts towards bulk mode (ssh bulk arrives as
#: ~16 KiB TLS records; interactive ssh as records of a few hundred bytes).
BULK_READ = 8 * 1024
#: ... and smaller than this: a stream whose wake-ups already move this much
#: (a fast sender, the relay behind) batches by itself; bulk mode only slowed it.
BULK_BIG = 256 * 1024
#: Consecutive such reads (one direction) that put a stream in bulk mode.
BULK_STREAK = 4
#: SO_RCVLOWAT of both sockets of a stream in bulk mode: epoll reports a socket
#: only once this much is queued (or at EOF/error), so one wake-up moves many
#: records, and the small records going the other way (ssh window adjusts)
#: ride on those wake-ups instead of costing one each. The mark follows the
#: stream's rate: what arrives in BULK_WAKE_S, within these bounds.
BULK_LOWAT_MIN = 64 * 1024
BULK_LOWAT_MAX = 1024 * 1024
#: Aimed time between two wake-ups of a stream in bulk mode.
BULK_WAKE_S = 0.004
#: A stream in bulk mode that nothing woke for this long is read anyway, both
#: directions (a tail below the mark; looked for every FLUSH_S / 4, so a tail
#: waits at most ~1.5 x this): the only latency bulk mode adds. A flush that
#: finds less than BULK_READ ends bulk mode.
FLUSH_S = 0.010

HAVE_SPLICE = hasattr(os, "splice") and hasattr(select, "epoll")
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_SO_RCVLOWAT = getattr(socket, "SO_RCVLOWAT", 18)
_ENDED_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ESHUTDOWN}
_IN_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_MORE", 4)
_IN_FLAGS |= getattr(os, "SPLICE_F_NONBLOCK", 2)
# No SPLICE_F_MORE towards the socket: it acts like MSG_MORE and would hold a
# small interactive write (a keystroke) back, waiting for more.
_OUT_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class _Dir:
    """One direction of a stream: ``src`` socket → (pipe | buffer) → ``dst`` socket."""

    __slots__ = (
        "buf",
        "done",
        "dst",
        "dst_hup",
        "end",
        "eof",
        "off",
        "pending",
        "pipe",
        "pipe_cap",
        "pipe_full",
        "rd",
        "src",
        "src_hup",
        "streak",
        "wr",
    )

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.rd = True  # src is readable (as far as we know)
        self.wr = True  # dst is writable (as far as we know)
        self.src_hup = False  # src hung up: reads never block again (data, EOF or error)
        self.dst_hup = False  # dst hung up: writes never block again (they fail)
        self.eof = False  # src reached EOF
        self.done = False  # dst half-closed after the last byte
        self.pipe: tuple[int, int] | None = None
        self.pipe_cap = 0
        self.pipe_full = False  # the pipe refused more (its slots are used up)
        self.pending = 0  # bytes in the pipe / buffer
        self.buf: memoryview | None = None  # copy mode
        self.off = 0
        self.end = 0
        self.streak = 0  # consecutive reads of at least BULK_READ bytes


class SpliceStream:
    """A stream being relayed; byte counters are updated by its worker."""

    __slots__ = (
        "bulk",
        "bytes_down",
        "bytes_up",
        "cut_reason",
        "down",
        "dst",
        "ended",
        "error",
        "flushed",
        "flushing",
        "lowat",
        "rx",
        "rx_mark",
        "src",
        "started",
        "stream_id",
        "up",
        "worker",
    )

    def __init__(self, stream_id: str, src: socket.socket, dst: socket.socket) -> None:
        self.stream_id = stream_id
        self.src = src
        self.dst = dst
        self.up = _Dir(src, dst)
        self.down = _Dir(dst, src)
        self.bytes_up = 0  # src → dst
        self.bytes_down = 0  # dst → src
        self.started = time.time()
        self.cut_reason: str | None = None
        self.error: str | None = None
        self.ended = False
        self.worker: _Worker | None = None
        self.bulk = False  # both sockets have SO_RCVLOWAT raised (see _Worker._set_bulk)
        self.flushed = 0.0  # monotonic time of the last wake-up (bulk mode)
        self.flushing = False  # read in this step because nothing woke it
        self.rx = 0  # bytes read from either socket
        self.rx_mark = 0  # rx at the last wake-up (bulk mode)
        self.lowat = 1  # SO_RCVLOWAT set on both sockets


EndCallback = Callable[[SpliceStream, str], None]


class _Worker:
    def __init__(self, engine: SpliceEngine, index: int) -> None:
        self.engine = engine
        self.ep = select.epoll() if hasattr(select, "epoll") else None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.inbox: collections.deque[tuple[str, SpliceStream | None, str]] = collections.deque()
        self.fds: dict[int, tuple[SpliceStream, int]] = {}  # fd -> (stream, 0 src / 1 dst)
        self.masks: dict[int, int] = {}  # fd -> the epoll mask registered
        self.streams: set[SpliceStream] = set()
        self.free: list[tuple[int, int, int]] = []  # (r, w, capacity)
        self.made = 0
        self.starved: collections.deque[SpliceStream] = collections.deque()
        self.bulk: dict[SpliceStream, None] = {}  # streams in bulk mode (ordered set)
        self.bulk_entered = 0  # times a stream went into bulk mode (statistics)
        self.next_flush = 0.0  # monotonic time of the next look for streams to flush
        self.woken: list[SpliceStream] = []  # bulk streams in this step
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=f"relay-splice-{index}", daemon=True)

    # -- called from other threads ------------------------------------------------
    def post(self, op: str, st: SpliceStream | None, reason: str = "") -> None:
        self.inbox.append((op, st, reason))
        with contextlib.suppress(BlockingIOError):  # already signalled
            os.write(self.wake_w, b"\0")

    # -- the loop ---------------------------------------------------------------
    def _run(self) -> None:
        ep = self.ep
        assert ep is not None
        ep.register(self.wake_r, select.EPOLLIN)
        try:
            while not (self.stopping and not self.streams):
                dirty: set[SpliceStream] = set()
                for fd, ev in ep.poll(FLUSH_S / 2 if self.bulk else -1, MAX_EVENTS):
                    if fd == self.wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self.wake_r, 4096)
                        self._drain_inbox(dirty)
                        continue
                    entry = self.fds.get(fd)
                    if entry is None:
                        continue
                    st, side = entry
                    rdir, wdir = (st.up, st.down) if side == 0 else (st.down, st.up)
                    if ev & (select.EPOLLHUP | select.EPOLLERR):
                        # Reported whatever the mask, level-triggered: stop
                        # watching; from now on the socket never blocks.
                        self._forget_fd(fd)
                        rdir.rd = rdir.src_hup = True
                        wdir.wr = wdir.dst_hup = True
                    if ev & (select.EPOLLIN | select.EPOLLRDHUP):
                        rdir.rd = True
                    if ev & select.EPOLLOUT:
                        wdir.wr = True
                    dirty.add(st)
                while self.starved and (self.free or self.made < MAX_PIPES):
                    dirty.add(self.starved.popleft())
                if self.bulk:
                    self._bulk_wakeup(dirty)
                for st in dirty:
                    if not st.ended:
                        self._step(st)
                if self.woken:
                    self._paced()
        except Exception:  # never let a worker die silently: end its streams
            log.exception("relay worker failed")
            for st in list(self.streams):
                self._end(st, "relay worker failed")
        finally:
            for r, w, _ in self.free:
                os.close(r)
                os.close(w)
            self.free.clear()
            ep.close()
            os.close(self.wake_r)
            os.close(self.wake_w)

    def _drain_inbox(self, dirty: set[SpliceStream]) -> None:
        while self.inbox:
            op, st, reason = self.inbox.popleft()
            if op == "add" and st is not None:
                self._add(st)
                dirty.add(st)
            elif op == "cut" and st is not None and not st.ended:
                st.cut_reason = st.cut_reason or reason
                self._end(st, reason)
            elif op == "stop":
                self.stopping = True
                for other in list(self.streams):
                    other.cut_reason = other.cut_reason or reason
                    self._end(other, reason)

    def _add(self, st: SpliceStream) -> None:
        assert self.ep is not None
        if self.stopping:
            self._end(st, "relay is shutting down", registered=False)
            return
        self.streams.add(st)
        for side, sock in enumerate((st.src, st.dst)):
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fd = sock.fileno()
            self.fds[fd] = (st, side)
            self.masks[fd] = 0
            self.ep.register(fd, 0)

    def _bulk_wakeup(self, dirty: set[SpliceStream]) -> None:
        """Bulk streams: read both directions whenever either wakes; flush the quiet ones.

        A bulk stream that epoll reported (a mark reached) also reads its other
        direction, so the small records going back ride on the big ones' wake-ups.
        One that nothing woke for FLUSH_S is read anyway (a tail below the mark).
        :meth:`_paced` looks at what they read once the step is done.
        """
        now = time.monotonic()
        for st in dirty:
            if st.bulk:
                st.up.rd = st.down.rd = True
                self.woken.append(st)
        if now < self.next_flush:
            return
        self.next_flush = now + FLUSH_S / 4
        for st in self.bulk:
            if now - st.flushed >= FLUSH_S and st not in dirty:
                st.up.rd = st.down.rd = True
                st.flushing = True
                dirty.add(st)
                self.woken.append(st)

    def _paced(self) -> None:
        """After a step: aim each woken bulk stream's mark at BULK_WAKE_S of its traffic.

        ``rx - rx_mark`` is what it read in this step, i.e. what arrived since
        its previous wake-up ended, ``now - flushed`` how long that was. A flush
        that found less than BULK_READ ends bulk mode (the burst is over), and
        so does a rate high enough to batch by itself (over BULK_LOWAT_MAX per
        BULK_WAKE_S: there bulk mode only slowed the stream down).
        """
        now = time.monotonic()
        for st in self.woken:
            if st.ended or not st.bulk:
                continue
            got = st.rx - st.rx_mark
            elapsed = now - st.flushed
            flushing, st.flushing = st.flushing, False
            if flushing and got < BULK_READ:
                self._set_bulk(st, False)
                continue
            if elapsed < BULK_WAKE_S / 4:
                continue  # too short to tell a rate (e.g. both sockets woke in turn)
            want = (st.lowat + int(got * BULK_WAKE_S / elapsed)) // 2  # damped
            if want > BULK_LOWAT_MAX:
                self._set_bulk(st, False)
                continue
            want = max(BULK_LOWAT_MIN, want)
            if not (st.lowat * 3 // 4 <= want <= st.lowat * 4 // 3):  # no setsockopt churn
                self._set_lowat(st, want)
            st.flushed = now
            st.rx_mark = st.rx
        self.woken.clear()

    def _set_lowat(self, st: SpliceStream, lowat: int) -> None:
        st.lowat = lowat
        for sock in (st.src, st.dst):
            with contextlib.suppress(OSError):  # a dead socket: the error surfaces elsewhere
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, lowat)

    def _set_bulk(self, st: SpliceStream, on: bool) -> None:
        """Raise (or lower back to 1) SO_RCVLOWAT on both of a stream's sockets.

        Why: with ssh traffic the ends write one TLS record (≤ 16 KiB) at a
        time, and a wake-up per record costs more Python than the splices
        themselves. With the mark raised the kernel wakes us once per mark's
        worth of bytes (EOF and errors still wake at once; :meth:`_paced` keeps
        the mark at about BULK_WAKE_S of traffic); the flush after FLUSH_S of
        quiet (:meth:`_bulk_wakeup`) moves what waits below the mark, in both
        directions, and ends bulk mode once the stream has gone quiet.
        """
        st.bulk = on
        st.up.streak = st.down.streak = 0
        if on:
            self.bulk[st] = None
            self.bulk_entered += 1
            st.flushed = time.monotonic()
            st.rx_mark = st.rx
            self._set_lowat(st, BULK_LOWAT_MIN)
        else:
            self.bulk.pop(st, None)
            for d in (st.up, st.down):  # back to pooling: give back idle pipes now
                if d.pending == 0:
                    self._release(d)
            self._set_lowat(st, 1)

    def _forget_fd(self, fd: int) -> None:
        if self.masks.pop(fd, None) is not None and self.ep is not None:
            with contextlib.suppress(OSError):
                self.ep.unregister(fd)

    def _watch(self, st: SpliceStream) -> None:
        """Level-triggered interest: read while there is room, write while blocked."""
        assert self.ep is not None
        for side, sock in enumerate((st.src, st.dst)):
            fd = sock.fileno()
            old = self.masks.get(fd)
            if old is None:
                continue  # hung up: no longer watched
            rdir, wdir = (st.up, st.down) if side == 0 else (st.down, st.up)
            mask = 0
            if not rdir.eof and self._room(rdir) > 0 and st not in self.starved:
                mask |= select.EPOLLIN | select.EPOLLRDHUP
            if wdir.pending and not wdir.wr:
                mask |= select.EPOLLOUT
            if mask != old:
                self.ep.modify(fd, mask)
                self.masks[fd] = mask

    def _room(self, d: _Dir) -> int:
        if d.pipe_full:
            return 0
        if not self.engine.use_splice:
            return 0 if d.pending else COPY_CHUNK
        return (d.pipe_cap if d.pipe is not None else PIPE_SIZE) - d.pending

    # -- moving bytes -------------------------------------------------------------
    def _step(self, st: SpliceStream) -> None:
        try:
            st.bytes_up += self._move(st, st.up)
            st.bytes_down += self._move(st, st.down)
        except OSError as exc:
            if exc.errno not in _ENDED_ERRNOS:
                log.info("stream %s: %s", st.stream_id, exc)
            st.error = str(exc)
            self._end(st, f"error: {exc.strerror or exc}")
            return
        if st.up.done and st.down.done:
            self._end(st, "closed")
        else:
            self._watch(st)

    def _move(self, st: SpliceStream, d: _Dir) -> int:
        """Move what can move without blocking; returns bytes delivered to ``dst``.

        Level-triggered: a short read means the socket is drained and a short
        write that its buffer is full, so the common path costs one splice
        each way and no EAGAIN; epoll reports the socket again when it is
        ready (see :meth:`_watch`).
        """
        if not ((d.rd and not d.eof) or (d.pending and d.wr) or (d.eof and not d.done)):
            return 0  # nothing this direction can do now (the common case for one side)
        moved = 0
        splicing = self.engine.use_splice
        while True:
            if d.pending and d.wr:
                try:
                    if splicing:
                        assert d.pipe is not None
                        n = os.splice(d.pipe[0], d.dst.fileno(), d.pending, flags=_OUT_FLAGS)
                    else:
                        assert d.buf is not None
                        n = d.dst.send(d.buf[d.off : d.end])
                        d.off += n
                except BlockingIOError:
                    n = 0
                d.pending -= n
                moved += n
                if n:
                    d.pipe_full = False
                if d.pending and not d.dst_hup:
                    d.wr = False  # short write: the socket buffer is full
                continue
            room = self._room(d)
            if not d.eof and d.rd and room > 0:
                if not self._lease(st, d):
                    break  # no pipe free: wait for one (backpressure)
                try:
                    if splicing:
                        assert d.pipe is not None
                        n = os.splice(d.src.fileno(), d.pipe[1], room, flags=_IN_FLAGS)
                    else:
                        assert d.buf is not None
                        n = d.src.recv_into(d.buf)
                        d.off, d.end = 0, n
                except BlockingIOError:
                    # An empty pipe always has room, so EAGAIN then means the
                    # socket is drained; with bytes in the pipe it may mean the
                    # pipe's slots are full: drain first, then read again.
                    if d.pending == 0:
                        d.rd = d.src_hup
                        break
                    d.pipe_full = True  # no IN interest until the pipe drains
                    continue
                if n == 0:
                    d.eof = True
                else:
                    d.pending += n
                    st.rx += n
                    if n < room and not d.src_hup:
                        d.rd = False  # short read: drained (epoll says when there is more)
                    if n < BULK_READ or n >= BULK_BIG:
                        d.streak = 0
                    elif not st.bulk:
                        d.streak += 1
                        if d.streak >= BULK_STREAK:
                            self._set_bulk(st, True)
                continue
            break
        if d.pending == 0:
            if not st.bulk:  # a bulk stream keeps its pipes between wake-ups
                self._release(d)
            if d.eof and not d.done:
                d.done = True
                with contextlib.suppress(OSError):  # the peer may have gone: the
                    d.dst.shutdown(socket.SHUT_WR)  # other direction reports it
        return moved

    def _lease(self, st: SpliceStream, d: _Dir) -> bool:
        if d.pipe is not None or d.buf is not None:
            return True
        if not self.engine.use_splice:
            d.buf = memoryview(bytearray(COPY_CHUNK))
            d.off = d.end = 0
            return True
        if self.free:
            r, w, cap = self.free.pop()
        elif self.made < MAX_PIPES:
            r, w = os.pipe()
            with contextlib.suppress(OSError):  # over pipe-max-size: keep the default
                fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
            try:
                cap = fcntl.fcntl(w, _F_GETPIPE_SZ)
            except OSError:
                cap = 64 * 1024
            self.made += 1
        else:
            self.starved.append(st)
            return False
        d.pipe, d.pipe_cap = (r, w), cap
        return True

    def _release(self, d: _Dir, *, dirty: bool = False) -> None:
        d.buf = None
        d.pipe_full = False
        if d.pipe is None:
            return
        r, w = d.pipe
        d.pipe = None
        if dirty or len(self.free) >= POOL_KEEP:
            os.close(r)
            os.close(w)
            self.made -= 1
        else:
            self.free.append((r, w, d.pipe_cap))
        d.pending = 0

    def _end(self, st: SpliceStream, reason: str, *, registered: bool = True) -> None:
        if st.ended:
            return
        st.ended = True
        self.streams.discard(st)
        for sock in (st.src, st.dst):
            if registered:
                fd = sock.fileno()
                if fd >= 0:
                    self.fds.pop(fd, None)
                    self._forget_fd(fd)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self.bulk.pop(st, None)
        for d in (st.up, st.down):
            self._release(d, dirty=d.pending > 0)
        self.engine._ended(st, st.cut_reason or reason)


class SpliceEngine:
    """Relays pairs of connected sockets with a fixed pool of workers; thread-safe."""

    def __init__(
        self,
        on_end: EndCallback,
        *,
        workers: int = WORKERS,
        use_splice: bool = HAVE_SPLICE,
    ) -> None:
        if not hasattr(select, "epoll"):
            raise RuntimeError("the relay needs epoll (Linux)")
        self.use_splice = use_splice and HAVE_SPLICE
        self._on_end = on_end
        self._lock = threading.Lock()
        self._workers = [_Worker(self, i) for i in range(max(1, workers))]
        self._load = [0] * len(self._workers)
        self._closed = False
        for w in self._workers:
            w.thread.start()

    @property
    def threads(self) -> list[threading.Thread]:
        """The worker threads (their number never depends on the streams)."""
        return [w.thread for w in self._workers]

    def add(self, stream_id: str, src: socket.socket, dst: socket.socket) -> SpliceStream:
        """Start relaying ``src`` ⇄ ``dst`` (the engine owns and closes both)."""
        st = SpliceStream(stream_id, src, dst)
        with self._lock:
            i = min(range(len(self._workers)), key=self._load.__getitem__)
            self._load[i] += 1
            worker = self._workers[i]
            st.worker = worker
            closed = self._closed
        if closed:  # the workers are gone: end it here
            st.ended = True
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()
            self._ended(st, "relay closed")
        else:
            worker.post("add", st)
        return st

    def cut(self, st: SpliceStream, reason: str) -> None:
        """End a stream at once (both sockets shut down and closed by its worker)."""
        if st.worker is not None and not st.ended:
            st.worker.post("cut", st, reason)

    def close(self, reason: str = "relay closed", join_timeout: float = 5.0) -> None:
        """End every stream and stop the workers (bounded wait)."""
        with self._lock:
            self._closed = True
        for w in self._workers:
            w.post("stop", None, reason)
        deadline = time.monotonic() + join_timeout
        for w in self._workers:
            w.thread.join(max(0.0, deadline - time.monotonic()))

    def pipes(self) -> int:
        """Pipes currently open (leased or pooled), for statistics and tests."""
        return sum(w.made for w in self._workers)

    def bulk_streams(self) -> int:
        """Streams in bulk mode now (their sockets' low-water marks raised)."""
        return sum(len(w.bulk) for w in self._workers)

    def bulk_entered(self) -> int:
        """How many times a stream went into bulk mode, since the start."""
        return sum(w.bulk_entered for w in self._workers)

    def _ended(self, st: SpliceStream, reason: str) -> None:
        worker = st.worker
        with self._lock:
            if worker is not None:
                self._load[self._workers.index(worker)] -= 1
        try:
            self._on_end(st, reason)
        except Exception:  # a faulty observer must not stop the worker
            log.exception("relay end callback failed for stream %s", st.stream_id)
