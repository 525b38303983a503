"""The control connection as a sans-I/O state machine (one per TLS connection).

Theory of operation. The machine knows framing, message legality per state and
keepalive timing; it knows nothing of sockets, TLS or the clock. The I/O shell
(asyncio on the server and in the agent, blocking sockets in ``homeport nc``)
does exactly this loop::

    conn.receive_data(bytes_from_tls, now)      # b"" means the peer closed
    while (ev := conn.next_event()) is not None: handle(ev)
    conn.send(msg)                                # queue replies
    tls.write(conn.data_to_send())
    sleep until conn.get_timer(); conn.handle_timer(now)

Keepalive: the client side sends PING every ``ping_interval`` seconds; both
sides declare the link dead when nothing at all arrived for ``idle_timeout``
seconds (default 3 missed pings: 15 s), instead of waiting for TCP's
retransmission timeout of many minutes. PINGs are answered automatically and
never surface as events.

Capabilities: the opener (HELLO/ENROLL) and the answer (WELCOME) carry
``capver`` and ``caps``; the machine records what the peer announced
(:attr:`ControlConnection.peer_caps`, intersected with ours) and refuses to
*send* a message the peer did not say it understands (a bug in our code:
LocalProtocolError). A received frame of an unknown type in the ignorable
range (``wire.control.is_ignorable``) is skipped and counted; an unknown type
below it is a protocol error.

States (a table, as in h11)::

    CLIENT: START --send HELLO/ENROLL--> WAIT_ANSWER --recv WELCOME/ENROLLED--> READY
    SERVER: START --recv HELLO/ENROLL--> WAIT_ANSWER --send WELCOME/ENROLLED--> READY
    any --ERROR or protocol violation or timeout or EOF--> CLOSED (sticky)
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass

from homeport.wire import control as m
from homeport.wire.errors import UnknownType, WireError
from homeport.wire.frame import MAX_FRAME, FrameDecoder

DEFAULT_PING_INTERVAL = 5.0
#: Three missed pings and the link is dead.  The server keeps this (it never pings; older
#: agents ping every 5 s, so a shorter server-side timeout would cut them off).
DEFAULT_IDLE_TIMEOUT = 15.0
#: The agent's keepalive (docs/reliability.md, "Keepalive timing"): a dead control link is
#: noticed within 4.5 s of the last byte (3 pings of 1.5 s; a pong may take up to 3 s), so
#: an outage is detected and, after it heals, repaired within 5 s each. Cost: ~170 B/s.
AGENT_PING_INTERVAL = 1.5
AGENT_IDLE_TIMEOUT = 3 * AGENT_PING_INTERVAL
#: Outgoing bytes we queue before declaring the peer too slow (a netmap burst fits).
MAX_OUTGOING = 4 * 1024 * 1024
#: Largest frame a server accepts before the peer's HELLO/ENROLL: an opener is a few hundred
#: bytes, so an unauthenticated connection can make us buffer at most this much (not MAX_FRAME).
MAX_PREAUTH_FRAME = 64 * 1024


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    START = "start"
    WAIT_ANSWER = "wait-answer"
    READY = "ready"
    CLOSED = "closed"


class LocalProtocolError(Exception):
    """We (our own code) tried something the protocol forbids: a bug."""


@dataclass(frozen=True, slots=True)
class MessageReceived:
    message: m.Message


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over; ``reason`` is for logs and users, ``code`` for tests."""

    code: str
    reason: str


Event = MessageReceived | ConnectionClosed

_OPENERS = (m.Hello, m.Enroll)
_ANSWERS = (m.Welcome, m.Enrolled)


class ControlConnection:
    """One side of a control connection."""

    def __init__(
        self,
        role: Role,
        now: float,
        *,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.role = role
        self.state = State.START
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self._decoder = FrameDecoder()
        if role is Role.SERVER:  # raised to MAX_FRAME once the opener is accepted
            self._decoder.max_frame = MAX_PREAUTH_FRAME
        self._out = bytearray()
        self._events: collections.deque[Event] = collections.deque()
        self._last_rx = now
        self._next_ping = now + ping_interval
        self._ping_seq = 0
        self.close_reason: ConnectionClosed | None = None
        #: What the peer announced in its HELLO/ENROLL or WELCOME (1 and none until then).
        self.peer_capver = 1
        self.peer_caps: frozenset[str] = frozenset()
        #: Frames of unknown ignorable types skipped so far.
        self.ignored = 0

    @property
    def closed(self) -> bool:
        """Whether the connection is over (sticky)."""
        return self.state is State.CLOSED

    # -- input -------------------------------------------------------------
    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self.state is State.CLOSED:
            return
        if not data:
            self._close("eof", "connection closed by peer")
            return
        self._last_rx = now
        try:
            frames = self._decoder.feed_untrusted(data)
            for msg_type, body in frames:
                if msg_type == m.MsgType.PEERS_Z and self.role is Role.SERVER:
                    # only servers send maps; inflating a node's frames would let it make
                    # the server hold up to 1 MiB per 64 KiB pre-auth frame
                    raise WireError("PEERS_Z from a node (only the server sends peer maps)")
                try:
                    msg = m.decode_untrusted(msg_type, body)
                except UnknownType:
                    if not m.is_ignorable(msg_type):
                        raise
                    self.ignored += 1  # a newer peer's optional message
                    continue
                self._on_message(msg)
                if self.closed:
                    return
        except WireError as exc:
            self._close(f"protocol:{exc.code}", f"malformed control data: {exc}")

    def _on_message(self, msg: m.Message) -> None:
        if isinstance(msg, m.Ping):
            self._queue(m.Pong(seq=msg.seq))
            return
        if isinstance(msg, m.Pong):
            return
        if isinstance(msg, m.Error):
            self._events.append(MessageReceived(msg))
            self._close(f"remote:{msg.code}", msg.message)
            return
        if self.role is Role.SERVER and self.state is State.START:
            if not isinstance(msg, _OPENERS):
                self._close("protocol:order", f"expected HELLO or ENROLL, got {msg.TYPE.name}")
                return
            self._learn_caps(msg.capver, msg.caps)
            self.state = State.WAIT_ANSWER
            self._decoder.max_frame = MAX_FRAME
        elif self.role is Role.CLIENT and self.state is State.WAIT_ANSWER:
            if not isinstance(msg, _ANSWERS):
                self._close("protocol:order", f"expected WELCOME or ENROLLED, got {msg.TYPE.name}")
                return
            if isinstance(msg, m.Welcome):
                self._learn_caps(msg.capver, msg.caps)
            self.state = State.READY
        elif self.state is not State.READY and not (
            self.role is Role.SERVER and self.state is State.WAIT_ANSWER
        ):
            self._close("protocol:order", f"unexpected {msg.TYPE.name} in state {self.state.value}")
            return
        self._events.append(MessageReceived(msg))

    def _learn_caps(self, capver: int, caps: tuple[str, ...]) -> None:
        self.peer_capver = capver
        self.peer_caps = m.negotiate_caps(caps)

    def may_send(self, msg_type: m.MsgType) -> bool:
        """Whether the peer announced that it understands ``msg_type``."""
        return m.may_send(msg_type, self.peer_caps)

    def next_event(self) -> Event | None:
        """Pop the next event, or None."""
        return self._events.popleft() if self._events else None

    # -- output ------------------------------------------------------------
    def send(self, msg: m.Message) -> None:
        """Queue ``msg``. Raises LocalProtocolError when the protocol forbids it now."""
        if self.state is State.CLOSED:
            raise LocalProtocolError(f"cannot send {msg.TYPE.name}: connection closed")
        if not m.may_send(msg.TYPE, self.peer_caps):
            raise LocalProtocolError(f"the peer did not announce support for {msg.TYPE.name}")
        if self.role is Role.CLIENT and self.state is State.START:
            if not isinstance(msg, _OPENERS):
                raise LocalProtocolError("a client must open with HELLO or ENROLL")
            self.state = State.WAIT_ANSWER
        elif (
            self.role is Role.SERVER
            and self.state is State.WAIT_ANSWER
            and isinstance(msg, _ANSWERS)
        ):
            self.state = State.READY
        elif (
            self.role is Role.SERVER and self.state is State.START and not isinstance(msg, m.Error)
        ):
            raise LocalProtocolError("the server speaks only after the client's opener")
        self._queue(msg)
        if isinstance(msg, m.Error):
            self._close(f"local:{msg.code}", msg.message)

    def _queue(self, msg: m.Message) -> None:
        self._out += m.encode(msg)
        if len(self._out) > MAX_OUTGOING:
            self._close("overflow", "peer is not reading; outgoing queue over its limit")

    def data_to_send(self) -> bytes:
        """Return and clear the bytes to write to the transport."""
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- time --------------------------------------------------------------
    def transport_ready(self, now: float) -> None:
        """The secure channel is up (TLS done): the keepalive clock starts now.

        Why: the machine is made when TCP connects, and a TLS handshake with a busy
        server (a reconnect storm) can take longer than ``idle_timeout``; counted as
        silence, the link would be declared dead the moment it came up, and its retry
        would add one more handshake to the storm.
        """
        if self.state is State.CLOSED:
            return
        self._last_rx = max(self._last_rx, now)
        self._next_ping = max(self._next_ping, now + self.ping_interval)

    def get_timer(self) -> float | None:
        """The next time :meth:`handle_timer` must run, or None once closed."""
        if self.state is State.CLOSED:
            return None
        deadline = self._last_rx + self.idle_timeout
        if self.role is Role.CLIENT:
            return min(deadline, self._next_ping)
        return deadline

    def handle_timer(self, now: float) -> None:
        """Send a due PING; close when the peer has been silent too long."""
        if self.state is State.CLOSED:
            return
        if now >= self._last_rx + self.idle_timeout:
            self._close("timeout", f"no data from peer for {now - self._last_rx:.1f}s (keepalive)")
            return
        if self.role is Role.CLIENT and now >= self._next_ping:
            self._ping_seq += 1
            self._queue(m.Ping(seq=self._ping_seq))
            self._next_ping = now + self.ping_interval

    def _close(self, code: str, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_reason = ConnectionClosed(code, reason)
        self._events.append(self.close_reason)
