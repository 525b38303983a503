"""Token pairing for the relay, as pure tables: no sockets, no threads, ``now`` passed in.

The control plane announces each stream with :meth:`Pairing.expect` (the
opener's token Tc and the destination's token Ta); every data connection
arrives, its preamble read, with one token (:meth:`Pairing.attach`). A data
connection whose token is not expected (yet) is *parked* until its deadline,
because the opener dials its data connection while its OPEN is still in
flight. When both ends of a stream are present the table answers
:class:`Paired` and the caller hands the two handles to the splice engine.

Handles are opaque (a socket, in the server); the tables only store them and
hand back the ones the caller must close. This keeps every pairing decision
(limits, duplicates, refusals, expiry) testable without a socket, and lets a
remote relay reuse the same rules.

Tokens are single-use: once a stream is paired its tokens are forgotten, so a
late duplicate parks as an unknown token and expires.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Generic, TypeVar

#: How long a data connection may wait for its stream (and a stream for its ends).
UNPAIRED_TIMEOUT = 10.0
#: Data connections waiting for a token the relay does not expect (yet).
MAX_UNPAIRED = 1024
#: Streams expected or splicing.
MAX_STREAMS = 4096
#: Remembered refused tokens (their data connection may still arrive); oldest dropped.
MAX_REFUSED = MAX_UNPAIRED

H = TypeVar("H")


class RelayFull(Exception):
    """Too many streams; the OPEN fails with a retryable error."""


class TokenInUse(Exception):
    """A token is already expected by another stream."""


class StreamState(enum.Enum):
    WAITING = "waiting"  # expected, not both ends present yet
    SPLICING = "splicing"
    CLOSED = "closed"


@dataclass(eq=False, slots=True)
class Entry(Generic[H]):
    """One stream in the tables (mutable: the tables own it)."""

    stream_id: str
    src_node: str
    dst_node: str
    src_token: bytes
    dst_token: bytes
    deadline: float
    state: StreamState = StreamState.WAITING
    src: H | None = None
    dst: H | None = None


@dataclass(frozen=True, slots=True)
class Paired(Generic[H]):
    """Both ends are present: splice ``src`` and ``dst`` (then call ``ended``)."""

    stream_id: str
    src_node: str
    dst_node: str
    src: H
    dst: H


@dataclass(frozen=True, slots=True)
class Parked:
    """The connection waits for its token to be expected."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """Close the connection; ``reason`` is for the log."""

    reason: str


@dataclass(frozen=True, slots=True)
class Cut(Generic[H]):
    """What :meth:`Pairing.cut_node` / :meth:`Pairing.close` leave to the caller."""

    close: list[H]  # handles of waiting streams / parked connections
    splicing: list[str]  # stream ids whose splicing the caller must cut
    count: int  # streams touched


Attached = Paired[H] | Parked | Rejected


class Pairing(Generic[H]):
    """The relay's pairing tables. Not thread-safe: the owner serialises calls."""

    def __init__(
        self,
        *,
        unpaired_timeout: float = UNPAIRED_TIMEOUT,
        max_unpaired: int = MAX_UNPAIRED,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        self.unpaired_timeout = unpaired_timeout
        self.max_unpaired = max_unpaired
        self.max_streams = max_streams
        self.streams: dict[str, Entry[H]] = {}
        self._by_token: dict[bytes, Entry[H]] = {}
        self._unpaired: dict[bytes, tuple[H, float]] = {}
        self._refused: dict[bytes, float] = {}  # token -> forget at
        self.closed = False

    @property
    def unpaired(self) -> int:
        return len(self._unpaired)

    # -- control plane -------------------------------------------------------
    def expect(
        self,
        stream_id: str,
        *,
        src_node: str,
        dst_node: str,
        src_token: bytes,
        dst_token: bytes,
        now: float,
        timeout: float | None = None,
    ) -> Paired[H] | None:
        """Announce a stream; returns :class:`Paired` if both ends were already parked.

        Raises:
            RelayFull: ``max_streams`` reached (or closed). TokenInUse: a token is taken.
        """
        if self.closed or len(self.streams) >= self.max_streams:
            raise RelayFull(f"relay has {len(self.streams)} streams (limit)")
        if (
            src_token == dst_token
            or src_token in self._by_token
            or dst_token in self._by_token
            or stream_id in self.streams
        ):
            raise TokenInUse(stream_id)
        st: Entry[H] = Entry(
            stream_id,
            src_node,
            dst_node,
            src_token,
            dst_token,
            now + (self.unpaired_timeout if timeout is None else timeout),
        )
        self.streams[stream_id] = st
        self._by_token[src_token] = st
        self._by_token[dst_token] = st
        for token in (src_token, dst_token):
            parked = self._unpaired.pop(token, None)
            if parked is not None:
                self._bind(st, token, parked[0])
        return self._maybe_paired(st)

    def extend(self, stream_id: str, timeout: float, now: float) -> None:
        """Give a waiting stream ``timeout`` more seconds from ``now``."""
        st = self.streams.get(stream_id)
        if st is not None and st.state is StreamState.WAITING:
            st.deadline = now + timeout

    def cancel(self, stream_id: str, now: float) -> list[H]:
        """The stream will not happen: returns the arrived ends to close; the
        missing ends' tokens are refused (closed on arrival)."""
        st = self.streams.get(stream_id)
        if st is None or st.state is not StreamState.WAITING:
            return []
        for token, h in ((st.src_token, st.src), (st.dst_token, st.dst)):
            if h is None:
                self._remember_refused(token, now)
        return self._forget(st)

    def refuse_token(self, token: bytes, now: float) -> H | None:
        """The OPEN naming ``token`` failed: returns its parked connection to close,
        or remembers the token so the connection is closed when it arrives. A token an
        expected stream owns is left alone: a second OPEN reusing it must not kill the first."""
        if token in self._by_token:
            return None
        parked = self._unpaired.pop(token, None)
        if parked is None:
            self._remember_refused(token, now)
            return None
        return parked[0]

    def cut_node(self, node_id: str) -> Cut[H]:
        """Every stream touching ``node_id``: waiting ones are forgotten (close their
        handles); splicing ones are listed for the caller to cut."""
        victims = [s for s in self.streams.values() if node_id in (s.src_node, s.dst_node)]
        close: list[H] = []
        splicing: list[str] = []
        for st in victims:
            if st.state is StreamState.WAITING:
                close += self._forget(st)
            else:
                splicing.append(st.stream_id)
        return Cut(close, splicing, len(victims))

    # -- data plane ------------------------------------------------------------
    def attach(self, token: bytes, handle: H, now: float) -> Attached[H]:
        """A data connection presented ``token``."""
        if self.closed:
            return Rejected("relay is shutting down")
        if self._refused.pop(token, None) is not None:
            return Rejected("its stream was refused or cancelled")
        st = self._by_token.get(token)
        if st is not None:
            if (st.src if token == st.src_token else st.dst) is not None:
                return Rejected("duplicate data connection for a token")
            self._bind(st, token, handle)
            return self._maybe_paired(st) or Parked()
        if token in self._unpaired:
            return Rejected("duplicate data connection for a token")
        if len(self._unpaired) >= self.max_unpaired:
            return Rejected(f"too many unpaired data connections ({self.max_unpaired})")
        self._unpaired[token] = (handle, now + self.unpaired_timeout)
        return Parked()

    def ended(self, stream_id: str) -> None:
        """A splicing stream finished: free its slot."""
        st = self.streams.pop(stream_id, None)
        if st is not None:
            st.state = StreamState.CLOSED

    def sweep(self, now: float) -> list[H]:
        """Expire parked connections, waiting streams and refusals; returns handles to close."""
        out: list[H] = []
        for token, (h, deadline) in list(self._unpaired.items()):
            if now >= deadline:
                del self._unpaired[token]
                out.append(h)
        for st in list(self.streams.values()):
            if st.state is StreamState.WAITING and now >= st.deadline:
                out += self._forget(st)
        for token, deadline in list(self._refused.items()):
            if now >= deadline:
                del self._refused[token]
        return out

    def close(self) -> Cut[H]:
        """Refuse everything from now on; returns all handles and splicing streams."""
        self.closed = True
        close = [h for h, _ in self._unpaired.values()]
        self._unpaired.clear()
        self._refused.clear()
        splicing: list[str] = []
        for st in list(self.streams.values()):
            if st.state is StreamState.WAITING:
                close += self._forget(st)
            else:
                splicing.append(st.stream_id)
        return Cut(close, splicing, len(splicing))

    # -- internals -------------------------------------------------------------
    def _bind(self, st: Entry[H], token: bytes, handle: H) -> None:
        if token == st.src_token:
            st.src = handle
        else:
            st.dst = handle

    def _maybe_paired(self, st: Entry[H]) -> Paired[H] | None:
        if st.src is None or st.dst is None:
            return None
        st.state = StreamState.SPLICING
        # tokens are single-use: a late duplicate must not find this stream
        self._by_token.pop(st.src_token, None)
        self._by_token.pop(st.dst_token, None)
        return Paired(st.stream_id, st.src_node, st.dst_node, st.src, st.dst)

    def _remember_refused(self, token: bytes, now: float) -> None:
        if len(self._refused) >= MAX_REFUSED:
            self._refused.pop(next(iter(self._refused)))  # the oldest
        self._refused[token] = now + self.unpaired_timeout

    def _forget(self, st: Entry[H]) -> list[H]:
        self.streams.pop(st.stream_id, None)
        self._by_token.pop(st.src_token, None)
        self._by_token.pop(st.dst_token, None)
        st.state = StreamState.CLOSED
        return [h for h in (st.src, st.dst) if h is not None]
