"""The stream pump over socketpairs and real TLS 1.3 (no server needed)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homeport.crypto import identity
from homeport.crypto.tls import fingerprint
from homeport.io.dial import DialError, e2e_handshake
from homeport.io.pump import COALESCE_MIN, PumpEnd, PumpResult, _tune_fd, pump, tune_socket
from homeport.io.tlsctx import stream_context
from homeport.io.tlsstream import TlsStream

MB = 1024 * 1024
DEADLINE = 60.0


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    a_cert: Path
    a_key: Path
    b_cert: Path
    b_key: Path
    a_pin: str
    b_pin: str

    def ctx(self, side: str) -> ssl.SSLContext:
        if side == "a":
            return stream_context(
                server_side=False, cert=self.a_cert, key=self.a_key, ca_cert=self.ca
            )
        return stream_context(server_side=True, cert=self.b_cert, key=self.b_key, ca_cert=self.ca)


@pytest.fixture(autouse=True, params=["tls", "records"])
def layer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test over TLS records (stream/1) and homeport's records (stream/2)."""
    monkeypatch.setenv("HOMEPORT_RECORDS", "1" if request.param == "records" else "0")
    return str(request.param)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = identity.create_ca()
    (d / "ca.crt").write_bytes(ca.cert_pem)
    pins = {}
    for n in ("a", "b"):
        key = identity.new_private_key_pem()
        cert = identity.sign_node_csr(ca, identity.make_csr(key, n), f"node-{n}")
        (d / f"{n}.key").write_bytes(key)
        (d / f"{n}.crt").write_bytes(cert)
        pins[n] = fingerprint(identity.cert_der_from_pem(cert))
    return Pki(
        d, d / "ca.crt", d / "a.crt", d / "a.key", d / "b.crt", d / "b.key", pins["a"], pins["b"]
    )


class Threads:
    """Run callables in threads; collect results; join with a deadline."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.results: dict[str, object] = {}
        self.errors: list[BaseException] = []

    def start(self, name: str, fn: Callable[[], object]) -> None:
        def run() -> None:
            try:
                self.results[name] = fn()
            except BaseException as exc:  # surfaced by join_all
                self.errors.append(exc)

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def join_all(self, timeout: float = DEADLINE) -> None:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
            assert not t.is_alive(), f"thread {t.name} did not finish"
        if self.errors:
            raise self.errors[0]


def tls_pair(pki: Pki, ta: socket.socket, tb: socket.socket) -> tuple[TlsStream, TlsStream]:
    """Handshake a (client) and b (server) over two connected transports."""
    th = Threads()
    th.start(
        "a",
        lambda: e2e_handshake(
            ta, pki.ctx("a"), server_side=False, expected_pin=pki.b_pin, peer_name="b"
        ),
    )
    th.start(
        "b",
        lambda: e2e_handshake(
            tb, pki.ctx("b"), server_side=True, expected_pin=pki.a_pin, peer_name="a"
        ),
    )
    th.join_all(10)
    a, b = th.results["a"], th.results["b"]
    assert isinstance(a, TlsStream) and isinstance(b, TlsStream)
    return a, b


@pytest.fixture
def closing() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def pairs(closing: list[socket.socket], n: int) -> list[tuple[socket.socket, socket.socket]]:
    out = []
    for _ in range(n):
        x, y = socket.socketpair()
        closing += [x, y]
        out.append((x, y))
    return out


def send_all_and_shut(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            b = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


@pytest.mark.parametrize("tuned", [False, True], ids=["plain-not-held", "coalescing"])
def test_bulk_both_directions_byte_exact(
    pki: Pki, closing: list[socket.socket], tuned: bool
) -> None:
    (app_a, pa), (app_b, pb), (ta, tb) = pairs(closing, 3)
    if tuned:  # the app ends tuned like homeport's own socketpairs: reads are held
        tune_socket(app_a)
        tune_socket(app_b)
    tls_a, tls_b = tls_pair(pki, ta, tb)
    ab = os.urandom(20 * MB)
    ba = os.urandom(20 * MB)
    th = Threads()
    th.start("pump-a", lambda: pump(tls_a, pa.fileno(), pa.fileno(), local_tuned=tuned))
    th.start("pump-b", lambda: pump(tls_b, pb.fileno(), pb.fileno(), local_tuned=tuned))
    th.start("send-ab", lambda: send_all_and_shut(app_a, ab))
    th.start("send-ba", lambda: send_all_and_shut(app_b, ba))
    th.start("recv-b", lambda: read_to_eof(app_b))
    th.start("recv-a", lambda: read_to_eof(app_a))
    th.join_all()
    got_b, got_a = th.results["recv-b"], th.results["recv-a"]
    assert isinstance(got_b, bytes) and isinstance(got_a, bytes)
    assert hashlib.sha256(got_b).digest() == hashlib.sha256(ab).digest()
    assert hashlib.sha256(got_a).digest() == hashlib.sha256(ba).digest()
    for name in ("pump-a", "pump-b"):
        res = th.results[name]
        assert isinstance(res, PumpResult)
        assert res.ok and res.end is PumpEnd.CLEAN, res
    res_a = th.results["pump-a"]
    assert isinstance(res_a, PumpResult)
    assert (res_a.sent, res_a.received) == (len(ab), len(ba))


def test_small_buffers_force_partial_io(pki: Pki, closing: list[socket.socket]) -> None:
    (app_a, pa), (app_b, pb), (ta, tb) = pairs(closing, 3)
    tls_a, tls_b = tls_pair(pki, ta, tb)
    data = os.urandom(3 * MB + 12345)
    th = Threads()
    th.start("pump-a", lambda: pump(tls_a, pa.fileno(), pa.fileno(), buffer_size=1000))
    th.start("pump-b", lambda: pump(tls_b, pb.fileno(), pb.fileno(), buffer_size=777))
    th.start("send", lambda: send_all_and_shut(app_a, data))
    th.start("recv", lambda: read_to_eof(app_b))
    th.start("close-b", lambda: app_b.shutdown(socket.SHUT_WR))
    th.start("recv-a", lambda: read_to_eof(app_a))
    th.join_all()
    assert th.results["recv"] == data
    assert th.results["recv-a"] == b""


@pytest.mark.parametrize("first", ["a", "b"])
def test_half_close_each_way(pki: Pki, closing: list[socket.socket], first: str) -> None:
    """After one side's EOF the other direction keeps flowing until it closes too."""
    (app_a, pa), (app_b, pb), (ta, tb) = pairs(closing, 3)
    tls_a, tls_b = tls_pair(pki, ta, tb)
    apps = {"a": app_a, "b": app_b}
    closer, other = apps[first], apps["b" if first == "a" else "a"]
    th = Threads()
    th.start("pump-a", lambda: pump(tls_a, pa.fileno(), pa.fileno()))
    th.start("pump-b", lambda: pump(tls_b, pb.fileno(), pb.fileno()))
    closer.sendall(b"request")
    closer.shutdown(socket.SHUT_WR)
    assert read_to_eof(other) == b"request"  # EOF arrived after the bytes
    # The half-closed direction does not stop the other one.
    for i in range(3):
        other.sendall(b"reply %d;" % i)
    other.shutdown(socket.SHUT_WR)
    assert read_to_eof(closer) == b"reply 0;reply 1;reply 2;"
    th.join_all(10)
    for name in ("pump-a", "pump-b"):
        res = th.results[name]
        assert isinstance(res, PumpResult) and res.end is PumpEnd.CLEAN, res


def test_pipes_like_nc(pki: Pki, closing: list[socket.socket]) -> None:
    """nc mode: stdin/stdout pipes on one side; peer EOF closes the output pipe."""
    (app_b, pb), (ta, tb) = pairs(closing, 2)
    tls_a, tls_b = tls_pair(pki, ta, tb)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        th = Threads()
        th.start("pump-a", lambda: pump(tls_a, in_r, out_w))
        th.start("pump-b", lambda: pump(tls_b, pb.fileno(), pb.fileno()))
        payload = os.urandom(2 * MB)
        th.start("echo-b", lambda: send_all_and_shut(app_b, payload))
        os.write(in_w, b"hello")
        os.close(in_w)
        in_w = -1
        chunks = []
        while b := os.read(out_r, 1 << 20):
            chunks.append(b)
        assert b"".join(chunks) == payload
        assert read_to_eof(app_b) == b"hello"
        th.join_all(10)
        res = th.results["pump-a"]
        assert isinstance(res, PumpResult) and res.ok, res
        assert os.get_blocking(in_r) and os.get_blocking(out_w)  # restored
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)


def flipping_relay(left: socket.socket, right: socket.socket, flip_at: int) -> Callable[[], None]:
    """Copy left⇄right; in the left→right direction XOR the byte at offset ``flip_at``."""

    def l2r() -> None:
        seen = 0
        while True:
            try:
                chunk = bytearray(left.recv(65536))
            except OSError:
                break
            if not chunk:
                break
            if seen <= flip_at < seen + len(chunk):
                chunk[flip_at - seen] ^= 0x01
            seen += len(chunk)
            try:
                right.sendall(chunk)
            except OSError:
                break
        with contextlib.suppress(OSError):
            right.shutdown(socket.SHUT_WR)

    return l2r


def test_flipped_bit_aborts_and_never_delivers_altered_bytes(
    pki: Pki, closing: list[socket.socket]
) -> None:
    (app_a, pa), (app_b, pb), (ta, r1), (r2, tb) = pairs(closing, 4)
    # Handshake through a transparent relay, then start flipping well after it.
    th_relay = Threads()
    flip_at = 400_000
    th_relay.start("l2r", flipping_relay(r1, r2, flip_at))

    def r2l() -> None:
        while chunk := read_some(r2):
            r1.sendall(chunk)

    th_relay.start("r2l", r2l)
    tls_a, tls_b = tls_pair(pki, ta, tb)
    data = os.urandom(2 * MB)
    th = Threads()
    th.start("pump-a", lambda: pump(tls_a, pa.fileno(), pa.fileno()))
    th.start("pump-b", lambda: pump(tls_b, pb.fileno(), pb.fileno()))
    th.start("send", lambda: send_until_closed(app_a, data))
    th.start("recv", lambda: read_to_eof(app_b))
    end = time.monotonic() + DEADLINE
    while "pump-b" not in th.results and time.monotonic() < end:
        time.sleep(0.01)
    res_b = th.results.get("pump-b")
    assert isinstance(res_b, PumpResult)
    assert not res_b.ok and res_b.end is PumpEnd.TLS_ERROR, res_b
    assert "integrity" in res_b.reason, res_b.reason
    pb.close()  # the caller closes its plain fd after the pump: the app sees EOF
    # Tear down in order: the transport first (A's pump fails on it and returns),
    # then A's plain side (its app's pending send gets EPIPE).
    r1.shutdown(socket.SHUT_RDWR)
    r2.shutdown(socket.SHUT_RDWR)
    wait_result(th, "pump-a")
    pa.close()
    th.join_all(20)
    th_relay.join_all(20)
    received = th.results["recv"]
    assert isinstance(received, bytes)
    assert 0 < len(received) < len(data)
    assert received == data[: len(received)]  # a clean prefix, never altered bytes


def send_until_closed(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the test tears the path down mid-send
        sock.sendall(data)


def wait_result(th: Threads, name: str) -> None:
    end = time.monotonic() + DEADLINE
    while name not in th.results and not th.errors and time.monotonic() < end:
        time.sleep(0.01)


def read_some(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 20)
    except OSError:
        return b""


def test_truncation_without_close_notify_is_an_error(
    pki: Pki, closing: list[socket.socket]
) -> None:
    (_app_b, pb), (ta, tb) = pairs(closing, 2)
    tls_a, tls_b = tls_pair(pki, ta, tb)
    th = Threads()
    th.start("pump-b", lambda: pump(tls_b, pb.fileno(), pb.fileno()))
    tls_a.send_blocking(b"partial")
    # A TCP FIN without close_notify: a relay (or attacker) cutting the stream.
    tls_a.sock.shutdown(socket.SHUT_RDWR)
    th.join_all(10)
    res = th.results["pump-b"]
    assert isinstance(res, PumpResult) and res.end is PumpEnd.TLS_ERROR, res
    assert "truncated" in res.reason
    tls_a.close()


def test_cancel_fd_stops_the_pump(pki: Pki, closing: list[socket.socket]) -> None:
    (_app_b, pb), (ta, tb) = pairs(closing, 2)
    tls_a, tls_b = tls_pair(pki, ta, tb)
    r, w = os.pipe()
    try:
        th = Threads()
        th.start("pump-b", lambda: pump(tls_b, pb.fileno(), pb.fileno(), cancel_fd=r))
        os.write(w, b"x")
        th.join_all(10)
        res = th.results["pump-b"]
        assert isinstance(res, PumpResult) and res.end is PumpEnd.CANCELLED
        assert tls_b.closed  # the pump closed its TLS socket
    finally:
        os.close(r)
        os.close(w)
        tls_a.close()


def test_idle_timeout(pki: Pki, closing: list[socket.socket]) -> None:
    (_app_b, pb), (ta, tb) = pairs(closing, 2)
    tls_a, tls_b = tls_pair(pki, ta, tb)
    res = pump(tls_b, pb.fileno(), pb.fileno(), idle_timeout=0.2)
    assert res.end is PumpEnd.IDLE
    tls_a.close()


def test_pin_mismatch_rejected(pki: Pki, closing: list[socket.socket]) -> None:
    """A expects a pin B's certificate does not have: A refuses after the handshake."""
    ((ta, tb),) = pairs(closing, 1)
    th = Threads()
    th.start(
        "b",
        lambda: e2e_handshake(
            tb, pki.ctx("b"), server_side=True, expected_pin=pki.a_pin, peer_name="a", timeout=5
        ),
    )
    with pytest.raises(DialError) as info:
        e2e_handshake(
            ta, pki.ctx("a"), server_side=False, expected_pin=pki.a_pin, peer_name="b", timeout=5
        )
    assert info.value.code == "pin-mismatch"
    assert "did not name" in info.value.message
    with contextlib.suppress(DialError):  # B may see A hang up mid-handshake
        th.join_all(10)
    for v in th.results.values():
        assert isinstance(v, TlsStream)
        v.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        b = sock.recv(n - len(buf))
        assert b, "EOF too early"
        buf += b
    return bytes(buf)


def test_small_writes_are_never_held(pki: Pki, closing: list[socket.socket]) -> None:
    """Keystrokes and screenfuls (well below COALESCE_MIN) go through at once, even with a
    30 s hold configured: only a bulk-sized read holds the next one."""
    (app_a, pa), (app_b, pb), (ta, tb) = pairs(closing, 3)
    tune_socket(app_a)
    tune_socket(app_b)
    tls_a, tls_b = tls_pair(pki, ta, tb)
    th = Threads()
    th.start(
        "pump-a", lambda: pump(tls_a, pa.fileno(), pa.fileno(), coalesce=30.0, local_tuned=True)
    )
    th.start(
        "pump-b", lambda: pump(tls_b, pb.fileno(), pb.fileno(), coalesce=30.0, local_tuned=True)
    )
    for s in (app_a, app_b):
        s.settimeout(10)  # far below the 30 s hold: a held read fails the test
    for i in range(20):
        # A screenful: half the threshold, so its records (TLS adds 22 bytes per
        # 16 KiB) stay below it on the encrypted side too.
        msg = bytes([i]) * (COALESCE_MIN // 2 if i % 2 else 1)
        app_a.sendall(msg)
        assert recv_exactly(app_b, len(msg)) == msg
        app_b.sendall(msg[:1])
        assert recv_exactly(app_a, 1) == msg[:1]
    app_a.shutdown(socket.SHUT_WR)
    app_b.shutdown(socket.SHUT_WR)
    assert read_to_eof(app_a) == b"" and read_to_eof(app_b) == b""
    th.join_all(10)
    for name in ("pump-a", "pump-b"):
        res = th.results[name]
        assert isinstance(res, PumpResult) and res.end is PumpEnd.CLEAN, res


def test_bulk_read_holds_the_next_read(pki: Pki, closing: list[socket.socket]) -> None:
    """After a bulk-sized read that drained the fd, the next read waits ``coalesce``
    seconds (so a producer's small writes pile up into one batch); the bytes
    already read are not held, and nothing is lost."""
    hold = 0.5
    (app_a, pa), (app_b, pb), (ta, tb) = pairs(closing, 3)
    tune_socket(app_a)  # 4 MiB: the 64 KiB write below is one atomic skb
    tls_a, tls_b = tls_pair(pki, ta, tb)
    th = Threads()
    th.start(
        "pump-a", lambda: pump(tls_a, pa.fileno(), pa.fileno(), coalesce=hold, local_tuned=True)
    )
    th.start("pump-b", lambda: pump(tls_b, pb.fileno(), pb.fileno()))
    app_b.settimeout(DEADLINE)
    bulk = os.urandom(4 * COALESCE_MIN)
    t0 = time.monotonic()
    app_a.sendall(bulk)
    assert recv_exactly(app_b, len(bulk)) == bulk
    app_a.sendall(b"!")
    assert recv_exactly(app_b, 1) == b"!"
    assert time.monotonic() - t0 >= hold  # the byte after the bulk read was held
    app_a.shutdown(socket.SHUT_WR)
    app_b.shutdown(socket.SHUT_WR)
    assert read_to_eof(app_b) == b"" and read_to_eof(app_a) == b""
    th.join_all(10)


def test_only_large_kernel_buffers_are_held(closing: list[socket.socket]) -> None:
    """Holding a reader must never fill its writer's buffer (that would stall the
    producer): a unix socket's writer is unknown unless the caller tuned it."""
    ((x, _y),) = pairs(closing, 1)
    assert _tune_fd(x.fileno()) == (True, False)
    assert _tune_fd(x.fileno(), local_tuned=True) == (True, True)
    lsock = socket.create_server(("127.0.0.1", 0))
    tcp = socket.create_connection(lsock.getsockname())
    closing += [lsock, tcp]
    assert _tune_fd(tcp.fileno()) == (True, True)
    r, w = os.pipe()
    try:
        assert _tune_fd(r) == (False, True)  # enlarged to PIPE_SIZE
    finally:
        os.close(r)
        os.close(w)


def test_a_producer_that_fills_the_buffer_is_not_held(
    pki: Pki, closing: list[socket.socket]
) -> None:
    """A read that fills 3/4 of the buffer means the producer keeps up with a hold:
    holding would only idle the pump and cap throughput, so the next read is not
    held (even with a 30 s hold configured)."""
    size = 8 * COALESCE_MIN
    (app_a, pa), (app_b, pb), (ta, tb) = pairs(closing, 3)
    tune_socket(app_a)  # 4 MiB: the write below is one atomic skb, read at once
    tls_a, tls_b = tls_pair(pki, ta, tb)
    th = Threads()
    th.start(
        "pump-a",
        lambda: pump(
            tls_a, pa.fileno(), pa.fileno(), coalesce=30.0, local_tuned=True, buffer_size=size
        ),
    )
    th.start("pump-b", lambda: pump(tls_b, pb.fileno(), pb.fileno(), coalesce=0))
    app_b.settimeout(10)  # far below the 30 s hold: a held read fails the test
    bulk = os.urandom(size * 7 // 8)  # ≥ 3/4 of the buffer, but a short read
    app_a.sendall(bulk)
    assert recv_exactly(app_b, len(bulk)) == bulk
    app_a.sendall(b"!")
    assert recv_exactly(app_b, 1) == b"!"
    app_a.shutdown(socket.SHUT_WR)
    app_b.shutdown(socket.SHUT_WR)
    assert read_to_eof(app_b) == b"" and read_to_eof(app_a) == b""
    th.join_all(10)
