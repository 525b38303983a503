"""The direct-path stream multiplexer as a sans-I/O state machine (one per TLS connection).

Why a mux (see :mod:`homeport.wire.mux` for the frame layout): one punched,
mutually authenticated TLS 1.3 connection per peer carries every stream to that
peer, so a new stream costs one round trip instead of a punch and a handshake,
the NAT mapping stays warm, and the path is measured (RTT) and watched (death
within :data:`DEAD_AFTER` seconds) all the time.

Theory of operation (h11/aioquic style, like :mod:`homeport.proto.control`). The
machine knows framing, stream states, flow control and keepalive timing; it
knows nothing of sockets, TLS or the clock. A driver (``io.muxlink``) does::

    mux.receive_data(decrypted, now)        # b"" = the transport ended
    while (ev := mux.next_event()) is not None: handle(ev)
    n = mux.send_data(sid, chunk)            # takes at most the peer's window
    mux.consumed(sid, n)                     # we wrote n received bytes onward
    tls.write(mux.data_to_send())
    wait until mux.get_timer(); mux.handle_timer(now)

Streams. Either side opens (OPEN with JSON meta); the TLS client uses odd ids
(1, 3, …), the TLS server even ids (2, 4, …), each strictly increasing and never
reused, so two sides opening at the same moment never collide. The other side
answers OPEN_OK (JSON meta, e.g. sshd host keys) or OPEN_FAIL (code, reason).
Per stream::

    ours:   OPENING --recv OPEN_OK--> OPEN      --recv OPEN_FAIL--> gone
    theirs: REQUESTED --accept_stream--> OPEN   --refuse_stream--> gone
    OPEN: FIN each way independently (half-close); gone when both FINs passed;
          RST either way: gone at once (both directions aborted).

Frames for a stream that is gone (a RST raced with data in flight) are dropped
silently; frames for an id that was never opened are a protocol violation.

Flow control (per stream, per direction, in bytes, no connection-level window):
each side may send a stream at most the credit the receiver granted —
:data:`INITIAL_WINDOW` at open, plus every WINDOW increment since. The receiver
grants credit only for bytes its driver has *written onward* (:meth:`consumed`),
batched to a quarter of the window, so a stalled local consumer stalls exactly
its own stream's sender and nothing else, and what a receiver ever buffers is
bounded by window times :data:`MAX_STREAMS`. DATA beyond the credit is a violation.
A side may grant more than the initial window (``stream_window``): it sends the
difference as a WINDOW right behind its OPEN / OPEN_OK.

Window auto-tuning (receiver side only; the wire does not change): 256 KiB per
stream caps a bulk copy at 256 KiB per round trip (5 MB/s at 50 ms), and on
loopback it costs a WINDOW frame — a TLS record, a syscall and a wake-up of the
sender — every 64 KiB. So once our consumer has taken two whole windows of a
stream since its window last grew (a bulk stream whose consumer keeps up:
``consumed`` is only called for bytes written onward), the window doubles, up
to :data:`MAX_STREAM_WINDOW`, and the growth of all streams of a connection
together stays within :data:`MAX_WINDOW_GROWTH`, so the receive-side memory
bound is ``MAX_STREAMS x INITIAL_WINDOW + MAX_WINDOW_GROWTH`` (96 MiB) however
the peer behaves. A stalled consumer never calls ``consumed`` and never grows.

Keepalive: both sides send PING every :data:`PING_INTERVAL` seconds (PONG is
automatic; the RTT is taken from it) and declare the connection dead after
:data:`DEAD_AFTER` seconds in which *nothing* arrived — 3 missed pings and a half,
so a blackholed path is noticed well within the 5 s in which new streams must
fall back to the relay.

Errors: any malformed or illegal input ends the connection with one
:class:`ConnectionTerminated` event (``receive_data`` raises nothing) and queues
a GOAWAY naming the error for the peer. Local misuse (a bug in the driver, or a
limit the driver must handle) raises :class:`MuxUsageError`.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass
from typing import Any

from homeport.wire import mux as w
from homeport.wire.errors import WireError
from homeport.wire.mux import MuxType

#: Receive window each side grants a new stream, per direction (bytes).
INITIAL_WINDOW = 256 * 1024
#: Largest receive window a stream reaches (``stream_window`` or auto-tuning).
MAX_STREAM_WINDOW = 8 * 1024 * 1024
#: Window growth by auto-tuning, summed over a connection's streams (bytes).
MAX_WINDOW_GROWTH = 32 * 1024 * 1024
#: Largest send credit a peer may grant (HTTP/2's 2**31 - 1): more is a violation.
MAX_SEND_WINDOW = w.MAX_WINDOW_INCREMENT
#: Streams in any state per connection (both directions together); more → OPEN_FAIL busy.
MAX_STREAMS = 256
#: Seconds between our PINGs.
PING_INTERVAL = 1.0
#: Seconds of silence after which the connection is dead.
DEAD_AFTER = 3.5
#: PINGs whose PONG we still wait for (older ones are forgotten: no RTT from them).
MAX_PINGS_IN_FLIGHT = 16
#: :meth:`MuxConnection.send_data` takes no more stream bytes while this much output waits.
OUTPUT_HIGH_WATER = 512 * 1024
#: Output (control frames included) beyond which the peer counts as not reading: terminated.
MAX_OUTGOING = 4 * 1024 * 1024
#: Size of DATA frames we send (the wire maximum; bigger = fewer headers and records).
DATA_FRAME = w.MAX_MUX_PAYLOAD

Meta = dict[str, Any]
Buffer = bytes | bytearray | memoryview


class MuxUsageError(Exception):
    """Our own code asked for something the mux cannot do now (``code`` says what)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamRequested:
    """The peer opened stream ``sid``: answer with accept_stream or refuse_stream."""

    sid: int
    meta: Meta


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """The peer accepted the stream we opened."""

    sid: int
    meta: Meta


@dataclass(frozen=True, slots=True)
class StreamRefused:
    sid: int
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Stream bytes; call :meth:`MuxConnection.consumed` once they are written onward."""

    sid: int
    #: A view of the buffer given to :meth:`MuxConnection.receive_data` when the
    #: connection was made with ``borrow_data`` (valid until that buffer changes).
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent FIN: no more data will arrive on ``sid``."""

    sid: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is aborted in both directions (by the peer's RST)."""

    sid: int
    reason: str


@dataclass(frozen=True, slots=True)
class PongReceived:
    rtt: float
    seq: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will accept no new streams; existing ones continue."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection is over (sticky, last event); ``code`` for tests, ``reason`` for people."""

    code: str
    reason: str


MuxEvent = (
    StreamRequested
    | StreamAccepted
    | StreamRefused
    | DataReceived
    | StreamEnded
    | StreamReset
    | PongReceived
    | GoAwayReceived
    | ConnectionTerminated
)


class StreamState(enum.Enum):
    OPENING = "opening"  # ours, OPEN sent
    REQUESTED = "requested"  # theirs, OPEN received
    OPEN = "open"


class _Stream:
    __slots__ = (
        "local_done",
        "recv_credit",
        "remote_done",
        "send_window",
        "since_grow",
        "state",
        "unacked",
        "window",
    )

    def __init__(self, state: StreamState, window: int) -> None:
        self.state = state
        self.send_window = INITIAL_WINDOW  # what the peer lets us send
        self.window = window  # the receive window we grant (grows by auto-tuning)
        self.recv_credit = window  # what we let the peer send (granted, not yet used)
        self.unacked = 0  # consumed bytes not yet returned as WINDOW
        self.since_grow = 0  # consumed bytes since the window last grew
        self.local_done = False  # FIN sent
        self.remote_done = False  # FIN received


class MuxConnection:
    """One side of a mux connection; ``client`` = the TLS client (opens odd stream ids)."""

    def __init__(
        self,
        *,
        client: bool,
        now: float,
        stream_window: int = INITIAL_WINDOW,
        max_streams: int = MAX_STREAMS,
        ping_interval: float = PING_INTERVAL,
        dead_after: float = DEAD_AFTER,
        autotune: bool = True,
        borrow_data: bool = False,
    ) -> None:
        if not INITIAL_WINDOW <= stream_window <= MAX_STREAM_WINDOW:
            raise ValueError(f"stream_window {stream_window} out of range")
        self.client = client
        self.stream_window = stream_window
        self.max_streams = max_streams
        self.ping_interval = ping_interval
        self.dead_after = dead_after
        self._decoder = w.MuxDecoder(borrow_data=borrow_data)
        self._out = bytearray()
        self._events: collections.deque[MuxEvent] = collections.deque()
        self._streams: dict[int, _Stream] = {}
        self._next_sid = 1 if client else 2
        self._last_peer_sid = 0
        self._last_rx = now
        self._next_ping = now + ping_interval
        self._ping_seq = 0
        self._pings: collections.OrderedDict[int, float] = collections.OrderedDict()
        self.autotune = autotune
        self._growth_left = MAX_WINDOW_GROWTH
        self.closed = False
        self.close_reason: ConnectionTerminated | None = None
        #: The latest round-trip time measured by PING/PONG (seconds), None until one.
        self.rtt: float | None = None
        #: We sent / received GOAWAY "shutdown": no new streams that way.
        self.goaway_sent = False
        self.goaway_received = False
        #: Frames dropped because their stream was already gone (races, not errors).
        self.dropped_frames = 0

    # -- state -------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self.closed

    def stream_count(self) -> int:
        return len(self._streams)

    def has_stream(self, sid: int) -> bool:
        return sid in self._streams

    def send_window(self, sid: int) -> int:
        """Bytes :meth:`send_data` would take on ``sid`` now (0: wait for WINDOW or room)."""
        s = self._streams.get(sid)
        if s is None or s.state is not StreamState.OPEN or s.local_done or self.closed:
            return 0
        return min(s.send_window, max(0, OUTPUT_HIGH_WATER - len(self._out)))

    def output_room(self) -> int:
        """Stream bytes the output buffer takes before :data:`OUTPUT_HIGH_WATER`."""
        return max(0, OUTPUT_HIGH_WATER - len(self._out))

    # -- input -------------------------------------------------------------------
    def receive_data(self, data: Buffer, now: float) -> None:
        """Feed decrypted bytes from the peer; ``b""`` means the transport ended."""
        if self.closed:
            return
        if not data:
            self._terminate("eof", "connection closed by peer", tell_peer=False)
            return
        self._last_rx = now
        try:
            for frame in self._decoder.feed_untrusted(data):
                self._on_frame(frame, now)
                if self.closed:
                    return
        except WireError as exc:
            self._terminate(f"protocol:{exc.code}", f"mux protocol violation: {exc}")

    def _on_frame(self, f: w.MuxFrame, now: float) -> None:
        t = f.type
        sid = f.stream_id
        if t is MuxType.DATA:
            s = self._streams.get(sid)
            if s is None:
                self._gone(sid, t)
                return
            if s.state is not StreamState.OPEN or s.remote_done:
                raise w.MuxError(f"DATA on stream {sid} in state {s.state.value}")
            n = len(f.payload)
            if n > s.recv_credit:
                raise w.MuxError(f"stream {sid}: {n} bytes exceed the window {s.recv_credit}")
            s.recv_credit -= n
            self._events.append(DataReceived(sid, f.payload))
        elif t is MuxType.WINDOW:
            s = self._streams.get(sid)
            if s is None:
                self._gone(sid, t)
                return
            s.send_window += w.u32_untrusted(f.payload)
            if s.send_window > MAX_SEND_WINDOW:
                raise w.MuxError(f"stream {sid}: window over {MAX_SEND_WINDOW}")
        elif t is MuxType.PING:
            self._queue(w.encode_ping(MuxType.PONG, w.u64_untrusted(f.payload)))
        elif t is MuxType.PONG:
            seq = w.u64_untrusted(f.payload)
            sent = self._pings.pop(seq, None)
            if sent is not None:
                self.rtt = max(0.0, now - sent)
                self._events.append(PongReceived(self.rtt, seq))
        elif t is MuxType.OPEN:
            self._on_open(sid, w.json_untrusted(f.payload))
        elif t is MuxType.GOAWAY:
            code, reason = w.code_reason_untrusted(f.payload)
            if code == "shutdown":
                self.goaway_received = True
                self._events.append(GoAwayReceived(code, reason))
            else:
                self._terminate(f"remote:{code}", reason or code, tell_peer=False)
        else:
            self._on_stream_frame(t, sid, f.payload)

    def _on_open(self, sid: int, meta: Meta) -> None:
        if (sid % 2 == 1) == self.client:
            raise w.MuxError(f"peer opened stream {sid} with our parity")
        if sid <= self._last_peer_sid:
            raise w.MuxError(f"peer reused stream id {sid}")
        self._last_peer_sid = sid
        if self.goaway_sent:
            self._queue_fail(sid, "going-away", "the peer is shutting this path down")
        elif len(self._streams) >= self.max_streams:
            self._queue_fail(sid, "busy", f"too many streams on this path ({self.max_streams})")
        else:
            self._streams[sid] = _Stream(StreamState.REQUESTED, self.stream_window)
            self._events.append(StreamRequested(sid, meta))

    def _on_stream_frame(self, t: MuxType, sid: int, payload: bytes | memoryview) -> None:
        s = self._streams.get(sid)
        if s is None:
            self._gone(sid, t)
            return
        if t is MuxType.RST:
            _, reason = w.code_reason_untrusted(payload)
            self._drop(sid)
            self._events.append(StreamReset(sid, reason or "reset by peer"))
        elif t is MuxType.FIN:
            if s.state is not StreamState.OPEN or s.remote_done:
                raise w.MuxError(f"FIN on stream {sid} in state {s.state.value}")
            s.remote_done = True
            self._events.append(StreamEnded(sid))
            if s.local_done:
                self._drop(sid)
        elif t in (MuxType.OPEN_OK, MuxType.OPEN_FAIL):
            if s.state is not StreamState.OPENING:
                raise w.MuxError(f"{t.name} for stream {sid} in state {s.state.value}")
            if t is MuxType.OPEN_OK:
                meta = w.json_untrusted(payload)
                s.state = StreamState.OPEN
                self._events.append(StreamAccepted(sid, meta))
            else:
                code, reason = w.code_reason_untrusted(payload)
                self._drop(sid)
                self._events.append(StreamRefused(sid, code or "refused", reason))
        else:  # pragma: no cover - every type is dispatched above
            raise w.MuxError(f"unexpected {t.name}")

    def _gone(self, sid: int, t: MuxType) -> None:
        """A frame for a stream not in the table: dropped if it existed, else a violation."""
        ours = (sid % 2 == 1) == self.client
        existed = sid < self._next_sid if ours else sid <= self._last_peer_sid
        if not existed:
            raise w.MuxError(f"{t.name} for stream {sid} that was never opened")
        self.dropped_frames += 1

    def next_event(self) -> MuxEvent | None:
        return self._events.popleft() if self._events else None

    # -- streams -----------------------------------------------------------------
    def open_stream(self, meta: Meta) -> int:
        """Queue OPEN and return the new stream id.

        Raises:
            MuxUsageError: closed / going away / :attr:`max_streams` reached / ids exhausted.
        """
        self._check_open()
        if self.goaway_sent or self.goaway_received:
            raise MuxUsageError("going-away", "this path accepts no new streams")
        if len(self._streams) >= self.max_streams:
            raise MuxUsageError("busy", f"too many streams on this path ({self.max_streams})")
        sid = self._next_sid
        if sid > w.MAX_STREAM_ID:
            raise MuxUsageError("exhausted", "stream ids exhausted on this path")
        frame = w.encode_json(MuxType.OPEN, sid, meta)
        self._next_sid += 2
        self._streams[sid] = _Stream(StreamState.OPENING, self.stream_window)
        self._queue(frame)
        self._grant_extra(sid)
        return sid

    def accept_stream(self, sid: int, meta: Meta) -> None:
        s = self._stream(sid, StreamState.REQUESTED)
        frame = w.encode_json(MuxType.OPEN_OK, sid, meta)
        s.state = StreamState.OPEN
        self._queue(frame)
        self._grant_extra(sid)

    def refuse_stream(self, sid: int, code: str, reason: str) -> None:
        self._stream(sid, StreamState.REQUESTED)
        self._drop(sid)
        self._queue_fail(sid, code, reason)

    def send_data(self, sid: int, data: Buffer) -> int:
        """Queue up to ``len(data)`` bytes as DATA frames; return how many were taken.

        Takes at most the peer's window and the room below :data:`OUTPUT_HIGH_WATER`;
        0 means "wait" (a WINDOW frame or :meth:`data_to_send` makes room).
        """
        s = self._stream(sid, StreamState.OPEN)
        if s.local_done:
            raise MuxUsageError("ended", f"stream {sid} already ended (FIN sent)")
        out = self._out
        room = OUTPUT_HIGH_WATER - len(out)
        n = min(len(data), s.send_window, room)
        if n <= 0:
            return 0
        with memoryview(data) as view:
            off = 0
            while off < n:
                size = min(DATA_FRAME, n - off)
                out += w.HEADER.pack(MuxType.DATA, 0, sid, size)
                out += view[off : off + size]
                off += size
        s.send_window -= n
        return n

    def frame_data_into(self, sid: int, buf: bytearray | memoryview, n: int) -> int:
        """Zero-copy :meth:`send_data` for drivers: ``n`` stream bytes of ``sid`` already
        sit in ``buf`` at :func:`homeport.wire.mux.data_payload_slots`; write their DATA
        headers in front of them and take the window. Returns how many bytes of ``buf``
        (from 0) are frames now. The caller must send them *after* :meth:`data_to_send`'s
        bytes (frames queued earlier go first) and must not ask for more than
        :meth:`send_window`.
        """
        s = self._stream(sid, StreamState.OPEN)
        if s.local_done:
            raise MuxUsageError("ended", f"stream {sid} already ended (FIN sent)")
        if not 0 < n <= s.send_window:
            raise MuxUsageError("window", f"{n} bytes on stream {sid} exceed its window")
        off = 0
        left = n
        pack_into = w.HEADER.pack_into
        while left:
            size = min(DATA_FRAME, left)
            pack_into(buf, off, MuxType.DATA, 0, sid, size)
            off += w.HEADER_LEN + size
            left -= size
        s.send_window -= n
        return off

    def consumed(self, sid: int, n: int) -> None:
        """The driver wrote ``n`` received bytes of ``sid`` onward: return the credit (batched)."""
        s = self._streams.get(sid)
        if s is None or self.closed or n <= 0:
            return
        s.unacked += n
        quarter = s.window // 4
        if s.unacked >= quarter and not s.remote_done:
            inc = s.unacked
            s.since_grow += s.unacked
            if self.autotune and s.since_grow >= 2 * s.window and s.window < MAX_STREAM_WINDOW:
                # Our consumer has taken two whole windows since the last growth: a
                # bulk stream whose consumer keeps up. Double its window, within
                # the connection's growth budget.
                grow = min(s.window, MAX_STREAM_WINDOW - s.window, self._growth_left)
                s.since_grow = 0
                if grow > 0:
                    s.window += grow
                    self._growth_left -= grow
                    inc += grow
            self._queue(w.encode_window(sid, inc))
            s.recv_credit += inc
            s.unacked = 0

    def end_stream(self, sid: int) -> None:
        """Half-close our direction (FIN); the peer's direction stays open."""
        s = self._stream(sid, StreamState.OPEN)
        if s.local_done:
            return
        s.local_done = True
        self._queue(w.encode(MuxType.FIN, sid))
        if s.remote_done:
            self._drop(sid)

    def reset_stream(self, sid: int, reason: str) -> None:
        """Abort both directions (RST); a stream already gone is left alone."""
        if self.closed or sid not in self._streams:
            return
        self._drop(sid)
        self._queue(w.encode_json(MuxType.RST, sid, {"reason": reason[: w.MAX_REASON_LEN]}))

    def goaway(self, reason: str) -> None:
        """Graceful: accept no new streams from now on; existing streams continue."""
        self._check_open()
        if not self.goaway_sent:
            self.goaway_sent = True
            self._queue(w.encode_json(MuxType.GOAWAY, 0, {"code": "shutdown", "reason": reason}))

    def close(self, reason: str, code: str = "closed") -> None:
        """End the connection now: GOAWAY ``code`` to the peer, ConnectionTerminated to us."""
        self._terminate(f"local:{code}", reason, tell_code=code)

    # -- keepalive ---------------------------------------------------------------
    def ping(self, now: float) -> int:
        """Queue a PING now; return its sequence number (a PongReceived will name it)."""
        self._check_open()
        self._ping_seq += 1
        seq = self._ping_seq
        self._pings[seq] = now
        while len(self._pings) > MAX_PINGS_IN_FLIGHT:
            self._pings.popitem(last=False)
        self._queue(w.encode_ping(MuxType.PING, seq))
        return seq

    def get_timer(self) -> float | None:
        if self.closed:
            return None
        return min(self._last_rx + self.dead_after, self._next_ping)

    def handle_timer(self, now: float) -> None:
        if self.closed:
            return
        silent = now - self._last_rx
        if silent >= self.dead_after:
            self._terminate(
                "timeout", f"no answer for {silent:.1f} s (dead after {self.dead_after:g} s)"
            )
            return
        if now >= self._next_ping:
            self.ping(now)
            self._next_ping = now + self.ping_interval

    # -- output ------------------------------------------------------------------
    def data_to_send(self) -> bytes | bytearray:
        """Return and forget the bytes to encrypt and send (no copy: the buffer is handed over)."""
        out = self._out
        if not out:
            return b""
        self._out = bytearray()
        return out

    def pending_output(self) -> int:
        return len(self._out)

    # -- helpers -----------------------------------------------------------------
    def _stream(self, sid: int, state: StreamState) -> _Stream:
        self._check_open()
        s = self._streams.get(sid)
        if s is None:
            raise MuxUsageError("unknown-stream", f"stream {sid} does not exist (or is gone)")
        if s.state is not state:
            raise MuxUsageError("state", f"stream {sid} is {s.state.value}, not {state.value}")
        return s

    def _drop(self, sid: int) -> None:
        s = self._streams.pop(sid)
        self._growth_left += s.window - self.stream_window

    def _check_open(self) -> None:
        if self.closed:
            raise MuxUsageError("closed", "the mux connection is closed")

    def _grant_extra(self, sid: int) -> None:
        extra = self.stream_window - INITIAL_WINDOW
        if extra > 0:
            self._queue(w.encode_window(sid, extra))

    def _queue_fail(self, sid: int, code: str, reason: str) -> None:
        self._queue(
            w.encode_json(
                MuxType.OPEN_FAIL,
                sid,
                {"code": code[: w.MAX_CODE_LEN], "reason": reason[: w.MAX_REASON_LEN]},
            )
        )

    def _queue(self, frame: bytes) -> None:
        self._out += frame
        if len(self._out) > MAX_OUTGOING:
            self._out.clear()
            self._terminate("overflow", "peer is not reading; mux output over its limit")

    def _terminate(
        self, code: str, reason: str, *, tell_peer: bool = True, tell_code: str | None = None
    ) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = ConnectionTerminated(code, reason)
        self._streams.clear()
        if tell_peer:
            peer_code = tell_code if tell_code is not None else "-".join(code.split(":"))
            self._out += w.encode_json(
                MuxType.GOAWAY,
                0,
                {"code": peer_code[: w.MAX_CODE_LEN], "reason": reason[: w.MAX_REASON_LEN]},
            )
        self._events.append(self.close_reason)
