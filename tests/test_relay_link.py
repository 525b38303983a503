"""The in-process relay on real loopback TCP: pairing, byte-exact splicing, half-close,
timeouts, cuts, events, and a bounded number of threads at 4,096 streams."""

from __future__ import annotations

import os
import resource
import socket
import threading
from collections.abc import Iterator

import pytest

from homeport.relay import InProcessRelay as Relay
from homeport.relay import (
    RelayEvent,
    RelayFull,
    StreamEnded,
    StreamStarted,
    StreamState,
    TokenInUse,
)
from homeport.testing.deadline import wait_for

DEADLINE = 10.0
TC = b"c" * 16
TA = b"a" * 16


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    yield lsock
    lsock.close()


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Every socket a test makes, closed at the end."""
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


@pytest.fixture(params=["splice", "copy"])
def relay(request: pytest.FixtureRequest) -> Iterator[tuple[Relay, Clock]]:
    clock = Clock()
    if request.param == "splice" and not hasattr(os, "splice"):
        pytest.skip("no os.splice")
    r = Relay(use_splice=request.param == "splice", clock=clock)
    yield r, clock
    r.close()


def conn_pair(
    listener: socket.socket, sockets: list[socket.socket]
) -> tuple[socket.socket, socket.socket]:
    """(outside end the test drives, server end given to the relay)."""
    outside = socket.create_connection(listener.getsockname())
    inside, _ = listener.accept()
    sockets += [outside, inside]
    outside.settimeout(DEADLINE)
    return outside, inside


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def is_closed(sock: socket.socket) -> bool:
    """True if the peer closed: EOF or reset (reads and discards)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def spliced(
    relay: Relay, listener: socket.socket, sockets: list[socket.socket], stream: str = "s1"
) -> tuple[socket.socket, socket.socket]:
    src, src_in = conn_pair(listener, sockets)
    dst, dst_in = conn_pair(listener, sockets)
    relay.attach(TC, src_in)  # the opener's data connection is usually first
    relay.expect(stream, src_node="nsrc", dst_node="ndst", src_token=TC, dst_token=TA)
    relay.attach(TA, dst_in)
    return src, dst


def test_byte_exact_both_ways(
    relay: tuple[Relay, Clock], listener: socket.socket, sockets: list[socket.socket]
) -> None:
    r, _ = relay
    src, dst = spliced(r, listener, sockets)
    up = os.urandom(3 * 1024 * 1024 + 17)
    down = os.urandom(1024 * 1024 + 3)
    src.sendall(up)
    assert recv_exact(dst, len(up)) == up
    dst.sendall(down)
    assert recv_exact(src, len(down)) == down
    [st] = r.statistics().streams
    assert st.state is StreamState.SPLICING
    wait_for(lambda: r.statistics().streams[0].bytes_dst_to_src == len(down))
    st = r.statistics().streams[0]
    assert (st.src_node, st.dst_node, st.bytes_src_to_dst) == ("nsrc", "ndst", len(up))
    assert st.started > 0


def test_half_close_propagates_and_other_direction_continues(
    relay: tuple[Relay, Clock], listener: socket.socket, sockets: list[socket.socket]
) -> None:
    r, _ = relay
    src, dst = spliced(r, listener, sockets)
    src.sendall(b"request")
    src.shutdown(socket.SHUT_WR)
    assert recv_exact(dst, 7) == b"request"
    assert dst.recv(1) == b""  # EOF arrived, the connection is still open
    dst.sendall(b"response after EOF")
    assert recv_exact(src, 18) == b"response after EOF"
    assert r.statistics().streams[0].state is StreamState.SPLICING
    dst.shutdown(socket.SHUT_WR)
    assert src.recv(1) == b""
    wait_for(lambda: not r.statistics().streams)
    stats = r.statistics()
    assert stats.streams_spliced_total == 1 and stats.bytes_total == 7 + 18


def test_error_on_one_side_closes_both(
    relay: tuple[Relay, Clock], listener: socket.socket, sockets: list[socket.socket]
) -> None:
    r, _ = relay
    src, dst = spliced(r, listener, sockets)
    src.sendall(b"x")
    assert recv_exact(dst, 1) == b"x"
    # RST instead of FIN: SO_LINGER 0
    src.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    src.close()
    assert is_closed(dst)
    wait_for(lambda: not r.statistics().streams)


def test_unpaired_connection_times_out(
    relay: tuple[Relay, Clock], listener: socket.socket, sockets: list[socket.socket]
) -> None:
    r, clock = relay
    outside, inside = conn_pair(listener, sockets)
    r.attach(b"z" * 16, inside)
    assert r.statistics().unpaired == 1
    clock.t += r.unpaired_timeout - 0.1
    assert r.sweep() == 0
    clock.t += 0.2
    assert r.sweep() == 1
    assert is_closed(outside)
    assert r.statistics().unpaired == 0


def test_expected_stream_times_out_and_extend(
    relay: tuple[Relay, Clock], listener: socket.socket, sockets: list[socket.socket]
) -> None:
    r, clock = relay
    outside, inside = conn_pair(listener, sockets)
    r.expect("s1", src_node="a", dst_node="b", src_token=TC, dst_token=TA, timeout=20.0)
    r.attach(TC, inside)
    clock.t += 15
    r.extend("s1", 10.0)
    clock.t += 9
    assert r.sweep() == 0
    clock.t += 2
    assert r.sweep() == 1
    assert is_closed(outside)
    assert not r.statistics().streams


def test_cancel_closes_the_opener(
    relay: tuple[Relay, Clock], listener: socket.socket, sockets: list[socket.socket]
) -> None:
    r, _ = relay
    outside, inside = conn_pair(listener, sockets)
    r.attach(TC, inside)
    r.expect("s1", src_node="a", dst_node="b", src_token=TC, dst_token=TA)
    r.cancel("s1")
    assert is_closed(outside)
    # refuse_token: a refused OPEN whose data connection is parked
    outside2, inside2 = conn_pair(listener, sockets)
    r.attach(TC, inside2)
    r.refuse_token(TC)
    assert is_closed(outside2)
    # a data connection that arrives after its OPEN was refused is closed at once
    r.refuse_token(b"r" * 16)
    outside3, inside3 = conn_pair(listener, sockets)
    r.attach(b"r" * 16, inside3)
    assert is_closed(outside3)
    assert r.statistics().unpaired == 0
    # ... and after a cancel
    r.expect("s2", src_node="a", dst_node="b", src_token=b"x" * 16, dst_token=b"y" * 16)
    r.cancel("s2")
    outside4, inside4 = conn_pair(listener, sockets)
    r.attach(b"y" * 16, inside4)
    assert is_closed(outside4)


def test_cut_node_ends_streams_touching_it(
    relay: tuple[Relay, Clock], listener: socket.socket, sockets: list[socket.socket]
) -> None:
    r, _ = relay
    src, dst = spliced(r, listener, sockets, "s1")
    o1, i1 = conn_pair(listener, sockets)
    r.expect("s2", src_node="nother", dst_node="nsrc", src_token=b"1" * 16, dst_token=b"2" * 16)
    r.attach(b"1" * 16, i1)
    o3, i3 = conn_pair(listener, sockets)
    o4, i4 = conn_pair(listener, sockets)
    r.expect("s3", src_node="x", dst_node="y", src_token=b"3" * 16, dst_token=b"4" * 16)
    r.attach(b"3" * 16, i3)
    r.attach(b"4" * 16, i4)
    src.sendall(b"ping")
    assert recv_exact(dst, 4) == b"ping"
    assert r.cut_node("nsrc") == 2
    for s in (src, dst, o1):
        assert is_closed(s)
    wait_for(lambda: [s.stream_id for s in r.statistics().streams] == ["s3"])
    o3.sendall(b"still here")
    assert recv_exact(o4, 10) == b"still here"


def test_duplicates_and_limits(listener: socket.socket, sockets: list[socket.socket]) -> None:
    clock = Clock()
    r = Relay(max_unpaired=2, max_streams=1, clock=clock)
    try:
        conns = [conn_pair(listener, sockets) for _ in range(4)]
        r.attach(b"1" * 16, conns[0][1])
        r.attach(b"1" * 16, conns[1][1])  # duplicate token: the newcomer is closed
        assert is_closed(conns[1][0])
        r.attach(b"2" * 16, conns[2][1])
        r.attach(b"3" * 16, conns[3][1])  # over MAX_UNPAIRED
        assert is_closed(conns[3][0])
        assert r.statistics().unpaired == 2
        r.expect("s1", src_node="a", dst_node="b", src_token=b"1" * 16, dst_token=b"9" * 16)
        with pytest.raises(RelayFull):
            r.expect("s2", src_node="a", dst_node="b", src_token=b"5" * 16, dst_token=b"6" * 16)
        r.cancel("s1")
        with pytest.raises(TokenInUse):
            r.expect("s3", src_node="a", dst_node="b", src_token=b"7" * 16, dst_token=b"7" * 16)
    finally:
        r.close()


def test_tokens_are_single_use(
    relay: tuple[Relay, Clock], listener: socket.socket, sockets: list[socket.socket]
) -> None:
    r, _ = relay
    spliced(r, listener, sockets)
    _late, late_in = conn_pair(listener, sockets)
    r.attach(TC, late_in)  # parks as an unknown token: never joins the running stream
    assert r.statistics().unpaired == 1
    assert len(r.statistics().streams) == 1


def test_close_ends_everything(listener: socket.socket, sockets: list[socket.socket]) -> None:
    r = Relay()
    src, dst = spliced(r, listener, sockets)
    parked, parked_in = conn_pair(listener, sockets)
    r.attach(b"p" * 16, parked_in)
    r.close()
    for s in (src, dst, parked):
        assert is_closed(s)
    assert not r.statistics().streams


def test_events_report_start_and_end_with_byte_counts(
    listener: socket.socket, sockets: list[socket.socket]
) -> None:
    events: list[RelayEvent] = []
    r = Relay(on_event=events.append)
    try:
        src, dst = spliced(r, listener, sockets)
        src.sendall(b"12345")
        assert recv_exact(dst, 5) == b"12345"
        dst.sendall(b"ab")
        assert recv_exact(src, 2) == b"ab"
        src.shutdown(socket.SHUT_WR)
        dst.shutdown(socket.SHUT_WR)
        assert src.recv(1) == b"" and dst.recv(1) == b""
        wait_for(lambda: len(events) == 2)
        assert events == [
            StreamStarted("s1", "nsrc", "ndst"),
            StreamEnded("s1", bytes_up=5, bytes_down=2, reason="closed"),
        ]
        # a cut names its reason
        src2, dst2 = spliced(r, listener, sockets, "s2")
        r.cut_node("ndst")
        wait_for(lambda: len(events) == 4)
        assert events[3] == StreamEnded("s2", 0, 0, "node removed")
        assert is_closed(src2) and is_closed(dst2)
    finally:
        r.close()


def test_thread_count_is_bounded_at_4096_streams(listener: socket.socket) -> None:
    """4,096 streams (16,384 fds in this process) ride on the fixed worker pool."""
    n = 4096
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * n + 512:
        pytest.skip(f"RLIMIT_NOFILE {soft} is too low for {n} streams")
    listener.listen(1024)
    before = threading.active_count()
    r = Relay(workers=2)
    outside: list[tuple[socket.socket, socket.socket]] = []
    try:
        assert threading.active_count() == before + 2
        for i in range(n):
            a = socket.create_connection(listener.getsockname())
            a_in, _ = listener.accept()
            b = socket.create_connection(listener.getsockname())
            b_in, _ = listener.accept()
            tc, ta = b"c%015d" % i, b"a%015d" % i
            r.attach(tc, a_in)
            r.expect(f"s{i}", src_node="x", dst_node="y", src_token=tc, dst_token=ta)
            r.attach(ta, b_in)
            outside.append((a, b))
        stats = r.statistics()
        assert len(stats.streams) == n
        assert stats.threads == 2
        assert threading.active_count() == before + 2
        # every stream is live: one byte each way through a spread of them
        for a, b in outside[:: n // 64] + outside[-1:]:
            a.settimeout(DEADLINE)
            b.settimeout(DEADLINE)
            a.sendall(b"p")
            assert b.recv(1) == b"p"
            b.sendall(b"q")
            assert a.recv(1) == b"q"
        assert r.statistics().pipes <= 2 * 512  # pooled: idle streams hold no pipe
    finally:
        r.close()
        for a, b in outside:
            a.close()
            b.close()
    assert threading.active_count() == before
