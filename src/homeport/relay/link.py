"""The relay as the server sees it: the :class:`Relay` protocol and its in-process implementation.

:class:`InProcessRelay` glues the pure pairing tables
(:mod:`homeport.relay.pairing`) to the bounded splice engine
(:mod:`homeport.relay.splice`): the control plane announces a stream with
:meth:`~Relay.expect`, the listener hands over each data connection with
:meth:`~Relay.attach`, and once both ends are present the engine relays them
without ever looking at a byte (what follows the preamble is the nodes'
end-to-end TLS session).

Events. ``on_event`` receives a :class:`StreamStarted` when a stream is paired
and a :class:`StreamEnded` when it is over (with its byte counts and why). It
may be called **from any thread, including a relay worker thread**; it must not
block and must not call back into the relay. An asyncio owner marshals it onto
its loop with ``loop.call_soon_threadsafe``.

A remote relay (a separate process or host) can implement the same
:class:`Relay` protocol: every method takes plain values, except ``attach``,
which takes the data connection's socket.

Time: ``sweep(now)`` expires what waited too long; the owner calls it
periodically (tests pass their own clock).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from homeport.relay.pairing import (
    MAX_STREAMS,
    MAX_UNPAIRED,
    UNPAIRED_TIMEOUT,
    Paired,
    Pairing,
    Rejected,
    StreamState,
)
from homeport.relay.splice import HAVE_SPLICE, WORKERS, SpliceEngine, SpliceStream

log = logging.getLogger("homeport.relay")


@dataclass(frozen=True, slots=True)
class StreamStarted:
    """Both data connections arrived; the stream is being relayed."""

    stream_id: str
    src_node: str
    dst_node: str


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """A relayed stream is over; its sockets are closed.

    ``reason``: "closed" (both sides half-closed in order), "error: …" (a reset
    or broken pipe on either side), or the reason given to a cut ("node
    removed", "relay closed").
    """

    stream_id: str
    bytes_up: int  # src → dst
    bytes_down: int  # dst → src
    reason: str


RelayEvent = StreamStarted | StreamEnded


@dataclass(frozen=True, slots=True)
class StreamStats:
    stream_id: str
    src_node: str
    dst_node: str
    state: StreamState
    bytes_src_to_dst: int
    bytes_dst_to_src: int
    started: float  # unix seconds when relaying began (0 while waiting)


@dataclass(frozen=True, slots=True)
class RelayStats:
    """An immutable snapshot of the relay."""

    streams: tuple[StreamStats, ...]
    unpaired: int
    streams_spliced_total: int
    bytes_total: int
    splice: bool
    threads: int = 0  # worker threads (bounded, whatever the number of streams)
    pipes: int = 0  # pipes open (leased to busy directions or pooled)


class Relay(Protocol):
    """What the control plane needs from a relay (in-process today, remote later)."""

    unpaired_timeout: float

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
        """Announce a stream. Raises RelayFull or TokenInUse."""

    def extend(self, stream_id: str, timeout: float) -> None:
        """Give a waiting stream ``timeout`` more seconds from now."""

    def cancel(self, stream_id: str) -> None:
        """The stream will not happen: close the ends that arrived, refuse the others."""

    def cut_node(self, node_id: str) -> int:
        """End every stream touching ``node_id``; returns how many."""

    def cut_stream(self, stream_id: str, reason: str) -> bool:
        """End one stream, waiting or spliced (a policy change); whether it existed."""

    def refuse_token(self, token: bytes) -> None:
        """Close the data connection naming ``token``, now or when it arrives."""

    def attach(self, token: bytes, sock: socket.socket) -> None:
        """Take ownership of a data connection whose preamble named ``token``."""

    def sweep(self, now: float | None = None) -> int:
        """Close what waited past its deadline; returns how many connections."""

    def statistics(self) -> RelayStats:
        """A snapshot of the streams and counters."""

    def close(self) -> None:
        """End everything."""


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


class InProcessRelay:
    """Pairs data connections by token and relays them in this process; thread-safe."""

    def __init__(
        self,
        *,
        unpaired_timeout: float = UNPAIRED_TIMEOUT,
        max_unpaired: int = MAX_UNPAIRED,
        max_streams: int = MAX_STREAMS,
        use_splice: bool = HAVE_SPLICE,
        workers: int = WORKERS,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[RelayEvent], None] | None = None,
    ) -> None:
        self.unpaired_timeout = unpaired_timeout
        self._clock = clock
        self._on_event = on_event
        self._lock = threading.Lock()
        self._pairing: Pairing[socket.socket] = Pairing(
            unpaired_timeout=unpaired_timeout, max_unpaired=max_unpaired, max_streams=max_streams
        )
        self._running: dict[str, SpliceStream] = {}
        self._cut_early: dict[str, str] = {}  # paired, cut before the engine had it
        self._spliced_total = 0
        self._bytes_total = 0
        self._engine = SpliceEngine(self._ended, workers=workers, use_splice=use_splice)
        self.use_splice = self._engine.use_splice

    @property
    def max_streams(self) -> int:
        return self._pairing.max_streams

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
        with self._lock:
            paired = self._pairing.expect(
                stream_id,
                src_node=src_node,
                dst_node=dst_node,
                src_token=src_token,
                dst_token=dst_token,
                now=self._clock(),
                timeout=timeout,
            )
            if paired is not None:
                self._begin(paired)
        if paired is not None:
            self._start(paired)

    def extend(self, stream_id: str, timeout: float) -> None:
        with self._lock:
            self._pairing.extend(stream_id, timeout, self._clock())

    def cancel(self, stream_id: str) -> None:
        with self._lock:
            socks = self._pairing.cancel(stream_id, self._clock())
        for s in socks:
            _close(s)

    def cut_node(self, node_id: str) -> int:
        with self._lock:
            cut = self._pairing.cut_node(node_id)
            running = [self._running[s] for s in cut.splicing if s in self._running]
            for s in cut.splicing:
                if s not in self._running:
                    self._cut_early[s] = "node removed"
        for sock in cut.close:
            _close(sock)
        for st in running:
            self._engine.cut(st, "node removed")
        return cut.count

    def cut_stream(self, stream_id: str, reason: str) -> bool:
        with self._lock:
            entry = self._pairing.streams.get(stream_id)
            if entry is None:
                return False
            if entry.state is StreamState.WAITING:
                socks = self._pairing.cancel(stream_id, self._clock())
                running = None
            else:
                socks = []
                running = self._running.get(stream_id)
                if running is None:
                    self._cut_early[stream_id] = reason
        for sock in socks:
            _close(sock)
        if running is not None:
            self._engine.cut(running, reason)
        return True

    def refuse_token(self, token: bytes) -> None:
        """The OPEN naming ``token`` failed: close its data connection now or on arrival.

        The opener dials its data connection while the OPEN is in flight, so
        it may arrive after the refusal; remembering the token for
        ``unpaired_timeout`` closes it at once instead of letting it wait.
        """
        with self._lock:
            parked = self._pairing.refuse_token(token, self._clock())
        if parked is not None:
            _close(parked)

    # -- data plane ------------------------------------------------------------
    def attach(self, token: bytes, sock: socket.socket) -> None:
        with self._lock:
            verdict = self._pairing.attach(token, sock, self._clock())
            if isinstance(verdict, Paired):
                self._begin(verdict)
        if isinstance(verdict, Rejected):
            log.info("closing data connection: %s", verdict.reason)
            _close(sock)
        elif isinstance(verdict, Paired):
            self._start(verdict)

    def sweep(self, now: float | None = None) -> int:
        """Close data connections and streams that waited past their deadline."""
        with self._lock:
            socks = self._pairing.sweep(self._clock() if now is None else now)
        for sock in socks:
            _close(sock)
        if socks:
            log.info("closed %d data connection(s) that found no partner in time", len(socks))
        return len(socks)

    def statistics(self) -> RelayStats:
        with self._lock:
            streams = []
            live = 0
            for e in self._pairing.streams.values():
                run = self._running.get(e.stream_id)
                up, down = (run.bytes_up, run.bytes_down) if run is not None else (0, 0)
                live += up + down
                streams.append(
                    StreamStats(
                        e.stream_id,
                        e.src_node,
                        e.dst_node,
                        e.state,
                        up,
                        down,
                        run.started if run is not None else 0.0,
                    )
                )
            return RelayStats(
                streams=tuple(streams),
                unpaired=self._pairing.unpaired,
                streams_spliced_total=self._spliced_total,
                bytes_total=self._bytes_total + live,
                splice=self.use_splice,
                threads=len(self._engine.threads),
                pipes=self._engine.pipes(),
            )

    def close(self, join_timeout: float = 5.0) -> None:
        """Close everything and wait (bounded) for the workers."""
        with self._lock:
            cut = self._pairing.close()
        for sock in cut.close:
            _close(sock)
        self._engine.close("relay closed", join_timeout)

    # -- internals -------------------------------------------------------------
    def _begin(self, paired: Paired[socket.socket]) -> None:
        """(holding the lock) count the stream before any worker can end it."""
        self._spliced_total += 1

    def _start(self, paired: Paired[socket.socket]) -> None:
        log.info("stream %s: relaying %s -> %s", paired.stream_id, paired.src_node, paired.dst_node)
        self._emit(StreamStarted(paired.stream_id, paired.src_node, paired.dst_node))
        with self._lock:
            # add under the lock so that _ended (which takes it) sees _running set
            st = self._engine.add(paired.stream_id, paired.src, paired.dst)
            self._running[paired.stream_id] = st
            early = self._cut_early.pop(paired.stream_id, None)
        if early is not None:
            self._engine.cut(st, early)

    def _ended(self, st: SpliceStream, reason: str) -> None:
        """(a worker thread) the engine closed a stream."""
        with self._lock:
            self._running.pop(st.stream_id, None)
            self._pairing.ended(st.stream_id)
            self._bytes_total += st.bytes_up + st.bytes_down
        log.info(
            "stream %s: %s after %.1fs, %d bytes up, %d bytes down",
            st.stream_id,
            reason,
            time.time() - st.started,
            st.bytes_up,
            st.bytes_down,
        )
        self._emit(StreamEnded(st.stream_id, st.bytes_up, st.bytes_down, reason))

    def _emit(self, event: RelayEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:  # an observer's bug must not break the data path
            log.exception("relay event handler failed")
