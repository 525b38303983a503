"""The sans-I/O mux: pairs of MuxConnection wired back to back in memory, a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homeport.proto import mux as pm
from homeport.proto.mux import (
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    MuxConnection,
    MuxEvent,
    MuxUsageError,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamRefused,
    StreamRequested,
    StreamReset,
)
from homeport.wire import mux as w
from homeport.wire.mux import MuxType

KiB = 1024


class Pair:
    """Client ``a`` and server ``b``; :meth:`flush` delivers bytes both ways until quiet."""

    def __init__(self, **kw: Any) -> None:
        self.now = 100.0
        self.a = MuxConnection(client=True, now=self.now, **kw)
        self.b = MuxConnection(client=False, now=self.now, **kw)
        self.ev: dict[str, list[MuxEvent]] = {"a": [], "b": []}

    def flush(self) -> None:
        moved = True
        while moved:
            moved = False
            for src, dst in ((self.a, self.b), (self.b, self.a)):
                out = src.data_to_send()
                if out:
                    dst.receive_data(out, self.now)
                    moved = True
            for name, conn in (("a", self.a), ("b", self.b)):
                while (e := conn.next_event()) is not None:
                    self.ev[name].append(e)

    def take(self, name: str) -> list[MuxEvent]:
        self.flush()
        got, self.ev[name] = self.ev[name], []
        return got

    def open(self, meta: dict[str, Any] | None = None) -> int:
        sid = self.a.open_stream(meta or {"service": "ssh"})
        [req] = self.take("b")
        assert isinstance(req, StreamRequested) and req.sid == sid
        self.b.accept_stream(sid, {"host_keys": ["k"]})
        assert self.take("a") == [StreamAccepted(sid, {"host_keys": ["k"]})]
        return sid


def data_of(events: list[MuxEvent], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.sid == sid)


def test_open_accept_and_data_both_ways() -> None:
    p = Pair()
    sid = p.open({"service": "ssh", "user": "x"})
    assert sid == 1
    assert p.a.send_data(sid, b"hello") == 5
    assert p.take("b") == [DataReceived(sid, b"hello")]
    assert p.b.send_data(sid, memoryview(b"world")) == 5
    assert p.take("a") == [DataReceived(sid, b"world")]


def test_server_opens_even_ids_and_both_may_open_at_once() -> None:
    p = Pair()
    s1 = p.a.open_stream({"service": "a"})
    s2 = p.b.open_stream({"service": "b"})
    p.flush()
    assert (s1, s2) == (1, 2)
    assert p.ev["a"] == [StreamRequested(2, {"service": "b"})]
    assert p.ev["b"] == [StreamRequested(1, {"service": "a"})]
    assert p.a.open_stream({}) == 3 and p.b.open_stream({}) == 4


def test_refuse() -> None:
    p = Pair()
    sid = p.a.open_stream({"service": "nope"})
    p.take("b")
    p.b.refuse_stream(sid, "no-service", "no service nope")
    assert p.take("a") == [StreamRefused(sid, "no-service", "no service nope")]
    assert p.a.stream_count() == p.b.stream_count() == 0
    with pytest.raises(MuxUsageError):
        p.a.send_data(sid, b"x")


def test_window_limits_sender_and_consumed_returns_credit() -> None:
    p = Pair(autotune=False)
    sid = p.open()
    big = bytes(1024 * KiB)
    taken = p.a.send_data(sid, big)
    assert taken == pm.INITIAL_WINDOW  # 256 KiB, not a byte more
    assert p.a.send_data(sid, big) == 0 and p.a.send_window(sid) == 0
    got = p.take("b")
    assert len(data_of(got, sid)) == pm.INITIAL_WINDOW
    assert all(len(e.data) <= w.MAX_MUX_PAYLOAD for e in got if isinstance(e, DataReceived))
    # Not consumed yet: still no credit however often we flush (backpressure).
    p.flush()
    assert p.a.send_window(sid) == 0
    p.b.consumed(sid, 10 * KiB)  # below the batching threshold: no WINDOW yet
    p.flush()
    assert p.a.send_window(sid) == 0
    p.b.consumed(sid, 60 * KiB)
    p.flush()
    assert p.a.send_window(sid) == 70 * KiB
    p.b.consumed(sid, pm.INITIAL_WINDOW - 70 * KiB)
    p.flush()
    assert p.a.send_window(sid) == pm.INITIAL_WINDOW


def test_one_stalled_stream_does_not_block_another() -> None:
    p = Pair()
    s1, s3 = p.open(), p.open()
    assert p.a.send_data(s1, bytes(pm.INITIAL_WINDOW)) == pm.INITIAL_WINDOW
    p.take("b")  # s1's consumer never consumes
    for _ in range(8):  # 2 MiB over s3 while s1 is stalled
        n = p.a.send_data(s3, bytes(pm.INITIAL_WINDOW))
        assert n == pm.INITIAL_WINDOW
        got = data_of(p.take("b"), s3)
        p.b.consumed(s3, len(got))
        p.flush()
    assert p.a.send_window(s1) == 0


def test_bigger_stream_window_is_granted_after_open() -> None:
    p = Pair(stream_window=1024 * KiB, autotune=False)
    sid = p.open()
    assert p.a.send_window(sid) == pm.OUTPUT_HIGH_WATER  # the output buffer caps one call
    assert p.a.send_data(sid, bytes(2048 * KiB)) == pm.OUTPUT_HIGH_WATER
    p.flush()
    assert p.a.send_data(sid, bytes(2048 * KiB)) == 1024 * KiB - pm.OUTPUT_HIGH_WATER


def fill(p: Pair, sid: int) -> int:
    """Send on ``sid`` until the window is used up; return the bytes b received."""
    got = 0
    while n := p.a.send_data(sid, bytes(pm.OUTPUT_HIGH_WATER)):
        got += len(data_of(p.take("b"), sid))
        assert got > 0 and n > 0
    return got


def test_autotune_grows_a_bulk_stream_within_budget_and_not_a_stalled_one() -> None:
    p = Pair()
    bulk, stalled = p.open(), p.open()
    p.a.send_data(stalled, bytes(pm.INITIAL_WINDOW))
    p.take("b")  # never consumed: its window must not grow
    windows = []
    for _ in range(12):
        n = fill(p, bulk)  # a window-limited sender: it sends until the credit is gone
        p.b.consumed(bulk, n)
        p.flush()
        windows.append(p.b._streams[bulk].window // KiB)
    # Doubles after every two windows consumed, up to the cap.
    assert windows == [256, 512, 512, 1024, 1024, 2048, 2048, 4096, 4096, 8192, 8192, 8192]
    assert p.b._streams[bulk].window == pm.MAX_STREAM_WINDOW  # doubled up to the cap
    assert p.b._streams[stalled].window == pm.INITIAL_WINDOW
    assert p.a.send_window(stalled) == 0
    # The budget: many bulk streams together grow at most MAX_WINDOW_GROWTH.
    p2 = Pair()
    sids = [p2.open() for _ in range(12)]
    for _ in range(20):
        for sid in sids:
            p2.b.consumed(sid, fill(p2, sid))
            p2.flush()
    grown = sum(p2.b._streams[sid].window - pm.INITIAL_WINDOW for sid in sids)
    assert grown == pm.MAX_WINDOW_GROWTH and p2.b._growth_left == 0
    first = p2.b._streams[sids[0]].window
    assert first > pm.INITIAL_WINDOW
    p2.a.reset_stream(sids[0], "done")
    p2.flush()
    assert p2.b._growth_left == first - pm.INITIAL_WINDOW  # given back when the stream goes


def test_sending_beyond_window_is_a_violation() -> None:
    p = Pair()
    sid = p.open()
    frame = w.encode(MuxType.DATA, sid, bytes(w.MAX_MUX_PAYLOAD))
    p.b.receive_data(frame * 4, p.now)  # exactly the window: fine
    p.b.receive_data(w.encode(MuxType.DATA, sid, b"x"), p.now)
    evs = drain(p.b)
    assert isinstance(evs[-1], ConnectionTerminated) and evs[-1].code == "protocol:mux"
    assert "window" in evs[-1].reason
    # The peer is told why.
    p.a.receive_data(p.b.data_to_send(), p.now)
    [term] = drain(p.a)
    assert isinstance(term, ConnectionTerminated) and term.code == "remote:protocol-mux"


def drain(c: MuxConnection) -> list[MuxEvent]:
    out = []
    while (e := c.next_event()) is not None:
        out.append(e)
    return out


def test_half_close_client_direction_then_server_keeps_sending() -> None:
    p = Pair()
    sid = p.open()
    p.a.send_data(sid, b"request")
    p.a.end_stream(sid)
    assert p.take("b") == [DataReceived(sid, b"request"), StreamEnded(sid)]
    with pytest.raises(MuxUsageError):
        p.a.send_data(sid, b"more")
    assert p.b.send_data(sid, b"reply after client FIN") > 0
    assert p.take("a") == [DataReceived(sid, b"reply after client FIN")]
    p.b.end_stream(sid)
    assert p.take("a") == [StreamEnded(sid)]
    assert p.a.stream_count() == p.b.stream_count() == 0


def test_half_close_server_direction_first() -> None:
    p = Pair()
    sid = p.open()
    p.b.end_stream(sid)
    assert p.take("a") == [StreamEnded(sid)]
    p.a.send_data(sid, b"upload continues")
    assert p.take("b") == [DataReceived(sid, b"upload continues")]
    p.a.end_stream(sid)
    assert p.take("b") == [StreamEnded(sid)]
    assert p.a.stream_count() == p.b.stream_count() == 0


def test_reset_and_late_frames_are_dropped() -> None:
    p = Pair()
    sid = p.open()
    p.b.send_data(sid, b"in flight")  # queued at b, not yet delivered
    p.a.reset_stream(sid, "local socket died")
    p.flush()
    assert p.ev["b"] == [StreamReset(sid, "local socket died")]
    assert p.ev["a"] == []  # the in-flight DATA for a gone stream is dropped
    assert p.a.dropped_frames == 1 and p.a.alive and p.b.alive
    p.a.reset_stream(sid, "again")  # idempotent


def test_frame_for_a_stream_never_opened_terminates() -> None:
    p = Pair()
    p.b.receive_data(w.encode(MuxType.DATA, 7, b"x"), p.now)
    [term] = drain(p.b)
    assert isinstance(term, ConnectionTerminated) and "never opened" in term.reason


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (w.encode_json(MuxType.OPEN, 2, {}), "our parity"),  # server receives an even id
        (w.encode_json(MuxType.OPEN_OK, 1, {}), "never opened"),
        (b"\xee" + bytes(9), "unknown"),
        (w.encode(MuxType.OPEN, 1, b"[]"), "not an object"),
    ],
)
def test_malformed_or_illegal_input_terminates(raw: bytes, why: str) -> None:
    b = MuxConnection(client=False, now=0.0)
    b.receive_data(raw, 0.0)
    evs = drain(b)
    assert len(evs) == 1 and isinstance(evs[0], ConnectionTerminated)
    assert why in evs[0].reason and not b.alive
    b.receive_data(w.encode_ping(MuxType.PING, 1), 0.0)  # sticky: nothing more happens
    assert drain(b) == []


def test_reused_id_and_data_before_accept_terminate() -> None:
    b = MuxConnection(client=False, now=0.0)
    b.receive_data(w.encode_json(MuxType.OPEN, 3, {}) + w.encode_json(MuxType.OPEN, 1, {}), 0.0)
    evs = drain(b)
    assert isinstance(evs[-1], ConnectionTerminated) and "reused" in evs[-1].reason
    b = MuxConnection(client=False, now=0.0)
    b.receive_data(w.encode_json(MuxType.OPEN, 1, {}) + w.encode(MuxType.DATA, 1, b"x"), 0.0)
    evs = drain(b)
    assert isinstance(evs[-1], ConnectionTerminated) and "requested" in evs[-1].reason


def test_stream_limit_refuses_busy_and_local_open_raises() -> None:
    p = Pair(max_streams=3)
    for _ in range(3):
        p.a.open_stream({})
    with pytest.raises(MuxUsageError) as exc:
        p.a.open_stream({})
    assert exc.value.code == "busy"
    # The peer (no local check) opens a 4th: refused busy, connection lives.
    p.b.max_streams = 3
    p.flush()
    p.a.max_streams = 10
    sid = p.a.open_stream({})
    ev = p.take("a")
    assert ev == [StreamRefused(sid, "busy", "too many streams on this path (3)")]
    assert pm.MAX_STREAMS == 256


def test_keepalive_pings_every_second_and_measures_rtt() -> None:
    p = Pair()
    assert p.a.get_timer() == p.now + pm.PING_INTERVAL
    p.now += 1.0
    p.a.handle_timer(p.now)
    p.b.receive_data(p.a.data_to_send(), p.now)
    p.now += 0.025
    p.a.receive_data(p.b.data_to_send(), p.now)
    [pong] = drain(p.a)
    assert isinstance(pong, PongReceived) and pong.rtt == pytest.approx(0.025)
    assert p.a.rtt == pytest.approx(0.025)
    assert drain(p.b) == []  # PINGs never surface as events


def test_silent_peer_is_dead_after_3_5_s_and_live_peer_never() -> None:
    p = Pair()
    # Both answer each other: an hour of fake time, nobody dies.
    for _ in range(3600 * 4):
        p.now += 0.25
        p.a.handle_timer(p.now)
        p.b.handle_timer(p.now)
        p.flush()
    assert p.a.alive and p.b.alive
    assert all(isinstance(e, PongReceived) for e in p.ev["a"] + p.ev["b"])
    # Now b goes silent (blackholed): a pings into the void.
    t0 = p.now
    while p.a.alive:
        t = p.a.get_timer()
        assert t is not None
        p.now = t
        p.a.handle_timer(p.now)
        p.a.data_to_send()
    assert p.now - t0 == pytest.approx(pm.DEAD_AFTER)
    term = drain(p.a)[-1]
    assert isinstance(term, ConnectionTerminated) and term.code == "timeout"
    assert p.a.get_timer() is None


def test_eof_and_goaway() -> None:
    p = Pair()
    sid = p.open()
    p.b.goaway("agent stopping")
    assert p.take("a") == [GoAwayReceived("shutdown", "agent stopping")]
    with pytest.raises(MuxUsageError):
        p.a.open_stream({})
    assert p.a.send_data(sid, b"existing streams go on") > 0
    assert data_of(p.take("b"), sid) == b"existing streams go on"
    p.a.close("bye")
    p.flush()
    assert p.ev["a"] == [ConnectionTerminated("local:closed", "bye")]
    assert p.ev["b"] == [ConnectionTerminated("remote:closed", "bye")]
    c = MuxConnection(client=True, now=0.0)
    c.receive_data(b"", 0.0)
    assert drain(c) == [ConnectionTerminated("eof", "connection closed by peer")]


def test_output_overflow_terminates() -> None:
    a = MuxConnection(client=True, now=0.0)
    ping = w.encode_ping(MuxType.PING, 1)
    # A peer that floods PINGs while never reading our PONGs.
    for _ in range(pm.MAX_OUTGOING // len(ping) + 2):
        a.receive_data(ping, 0.0)
    evs = drain(a)
    assert isinstance(evs[-1], ConnectionTerminated) and evs[-1].code == "overflow"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_receive_data_never_raises(data: bytes) -> None:
    for client in (True, False):
        c = MuxConnection(client=client, now=0.0)
        c.receive_data(w.encode_json(MuxType.OPEN, 2 if client else 1, {}), 0.0)
        c.receive_data(data, 1.0)
        evs = drain(c)
        assert sum(isinstance(e, ConnectionTerminated) for e in evs) <= 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=300 * KiB), max_size=20))
def test_fuzz_transfers_arrive_intact_under_flow_control(sizes: list[int]) -> None:
    p = Pair()
    sid = p.open()
    sent = bytearray()
    got = bytearray()
    for i, n in enumerate(sizes):
        chunk = bytes([i % 251]) * n
        while chunk:
            k = p.a.send_data(sid, chunk)
            sent += chunk[:k]
            chunk = chunk[k:]
            d = data_of(p.take("b"), sid)
            got += d
            p.b.consumed(sid, len(d))
            p.flush()
    assert got == sent
