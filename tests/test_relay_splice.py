"""The splice engine's bulk mode on real loopback TCP: a busy source gets SO_RCVLOWAT raised
so one wake-up moves many records, tails below the mark are still delivered, EOF and resets
still end streams at once, and the mark drops back when the burst is over."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from homeport.relay import splice
from homeport.relay.splice import BULK_LOWAT_MIN, SpliceEngine, SpliceStream
from homeport.testing.deadline import wait_for

DEADLINE = 10.0
RECORD = 16 * 1024  # one TLS record, as the ends write ssh traffic


@pytest.fixture(params=["splice", "copy"])
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[SpliceEngine, list[str]]]:
    if request.param == "splice" and not splice.HAVE_SPLICE:
        pytest.skip("no os.splice")
    ended: list[str] = []
    eng = SpliceEngine(
        lambda st, reason: ended.append(reason),
        workers=1,
        use_splice=request.param == "splice",
    )
    yield eng, ended
    eng.close()


@pytest.fixture
def pairs() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


def tcp_pair(made: list[socket.socket]) -> tuple[socket.socket, socket.socket]:
    """(outside end the test drives, inside end given to the engine)."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        outside = socket.create_connection(lsock.getsockname())
        inside, _ = lsock.accept()
    outside.settimeout(DEADLINE)
    made += [outside, inside]
    return outside, inside


def lowat(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


class Drain(threading.Thread):
    """Reads ``sock`` until EOF (or a reset), keeping every byte."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = bytearray()
        self.reset = False

    def run(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 20):
                self.data += chunk
        except (ConnectionResetError, TimeoutError):
            self.reset = True


def received(drains: list[Drain], n: int) -> Callable[[], bool]:
    """A condition: every drain has at least ``n`` bytes."""
    return lambda: all(len(d.data) >= n for d in drains)


def start(
    eng: SpliceEngine, made: list[socket.socket]
) -> tuple[socket.socket, socket.socket, socket.socket, SpliceStream]:
    src, src_in = tcp_pair(made)
    dst, dst_in = tcp_pair(made)
    st = eng.add("s1", src_in, dst_in)
    return src, dst, src_in, st


def burst_until_bulk(src: socket.socket, src_in: socket.socket, drain: Drain) -> int:
    """Write records one at a time, ssh-like, until the engine raises the source's mark.

    Each record is sent once the previous one has arrived, so that the relay
    sees one record per wake-up (a sender much faster than the relay would
    batch by itself, and never needs bulk mode).
    """
    record = os.urandom(RECORD)
    sent = 0
    for _ in range(256):  # far more than BULK_STREAK: a bound
        src.sendall(record)
        sent += RECORD
        if lowat(src_in) >= BULK_LOWAT_MIN:
            return sent
        wait_for(received([drain], sent), timeout=DEADLINE, interval=0.0005)
    raise AssertionError("the source never went into bulk mode")


def test_bulk_mode_delivers_the_tail_and_drops_back(
    engine: tuple[SpliceEngine, list[str]], pairs: list[socket.socket]
) -> None:
    eng, ended = engine
    src, dst, src_in, st = start(eng, pairs)
    assert eng.bulk_entered() == 0
    drain = Drain(dst)
    drain.start()
    sent = burst_until_bulk(src, src_in, drain)
    assert eng.bulk_entered() == 1
    # the other direction's marks are raised too: a small record back still arrives
    dst.sendall(b"ack")
    assert src.recv(3) == b"ack"
    # a tail far below the mark still arrives (the flush), and nothing follows it
    src.sendall(b"tail!")
    wait_for(lambda: len(drain.data) == sent + 5, timeout=DEADLINE)
    assert bytes(drain.data[-5:]) == b"tail!"
    # idle: the burst is over, the mark is back to 1 and the pipe returned
    wait_for(lambda: lowat(src_in) == 1 and eng.bulk_streams() == 0, timeout=DEADLINE)
    # interactive again: one byte goes through, then EOF ends the stream in order
    src.sendall(b"k")
    wait_for(lambda: len(drain.data) == sent + 6, timeout=DEADLINE)
    src.shutdown(socket.SHUT_WR)
    dst.shutdown(socket.SHUT_WR)
    drain.join(DEADLINE)
    assert src.recv(1) == b""
    wait_for(lambda: ended == ["closed"], timeout=DEADLINE)
    assert (st.bytes_up, st.bytes_down) == (sent + 6, 3)


def test_eof_in_bulk_mode_is_not_held_back(
    engine: tuple[SpliceEngine, list[str]], pairs: list[socket.socket]
) -> None:
    eng, _ = engine
    src, dst, src_in, _st = start(eng, pairs)
    drain = Drain(dst)
    drain.start()
    sent = burst_until_bulk(src, src_in, drain)
    src.sendall(b"last")
    src.shutdown(socket.SHUT_WR)  # EOF below the mark: epoll reports it at once
    drain.join(DEADLINE)
    assert not drain.is_alive() and not drain.reset
    assert len(drain.data) == sent + 4 and bytes(drain.data[-4:]) == b"last"


def test_reset_in_bulk_mode_ends_both_directions(
    engine: tuple[SpliceEngine, list[str]], pairs: list[socket.socket]
) -> None:
    eng, ended = engine
    src, dst, src_in, _st = start(eng, pairs)
    drain = Drain(dst)
    drain.start()
    burst_until_bulk(src, src_in, drain)
    src.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    src.close()
    drain.join(DEADLINE)
    assert not drain.is_alive()
    wait_for(lambda: len(ended) == 1, timeout=DEADLINE)
    assert ended[0].startswith("error")
    assert eng.bulk_streams() == 0


def test_many_bulk_streams_share_the_fixed_workers(pairs: list[socket.socket]) -> None:
    """32 streams in bulk mode at once: still 2 threads, every byte delivered."""
    n = 32
    before = threading.active_count()
    ended: list[str] = []
    eng = SpliceEngine(lambda st, reason: ended.append(reason), workers=2)
    try:
        streams = [start(eng, pairs) for _ in range(n)]
        drains = [Drain(dst) for _src, dst, _in, _st in streams]
        for d in drains:
            d.start()
        record = os.urandom(RECORD)
        for rounds in range(1, 65):  # interleaved, so that all are busy together
            for src, _dst, _in, _st in streams:
                src.sendall(record)
            if rounds <= 2 * splice.BULK_STREAK:  # ssh-like pace until they are in bulk mode
                want = rounds * RECORD
                wait_for(received(drains, want), timeout=DEADLINE)
        assert eng.bulk_entered() >= n // 2  # most streams went into bulk mode
        assert threading.active_count() == before + 2 + n  # the engine's 2 + our drains
        for src, _dst, _in, _st in streams:
            src.shutdown(socket.SHUT_WR)
        for d in drains:
            d.join(DEADLINE)
            assert len(d.data) == 64 * RECORD
    finally:
        eng.close()
