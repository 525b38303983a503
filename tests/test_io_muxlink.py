"""Two MuxLinks over a real loopback TCP connection with real, mutually pinned TLS 1.3."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from homeport.crypto import identity
from homeport.crypto.tls import fingerprint
from homeport.io.dial import DialError, e2e_handshake
from homeport.io.muxlink import MuxLink, MuxLinkError, Refusal
from homeport.io.tlsctx import stream_context
from homeport.io.tlsstream import TlsStream
from homeport.proto import mux as pm
from homeport.testing.deadline import wait_for

MiB = 1024 * 1024
DEADLINE = 60.0


@dataclass(frozen=True)
class Pki:
    ca: Path
    certs: dict[str, tuple[Path, Path]]
    pins: dict[str, str]

    def ctx(self, name: str, server_side: bool) -> ssl.SSLContext:
        cert, key = self.certs[name]
        return stream_context(server_side=server_side, cert=cert, key=key, ca_cert=self.ca)


@pytest.fixture(autouse=True, params=["tls", "records"])
def layer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test over TLS records (stream/1) and homeport's records (stream/2)."""
    monkeypatch.setenv("HOMEPORT_RECORDS", "1" if request.param == "records" else "0")
    return str(request.param)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("muxpki")
    ca = identity.create_ca()
    (d / "ca.crt").write_bytes(ca.cert_pem)
    certs, pins = {}, {}
    for n in ("a", "b"):
        key = identity.new_private_key_pem()
        cert = identity.sign_node_csr(ca, identity.make_csr(key, n), f"node-{n}")
        (d / f"{n}.key").write_bytes(key)
        (d / f"{n}.crt").write_bytes(cert)
        certs[n] = (d / f"{n}.crt", d / f"{n}.key")
        pins[n] = fingerprint(identity.cert_der_from_pem(cert))
    return Pki(d / "ca.crt", certs, pins)


def tls_pair(pki: Pki) -> tuple[TlsStream, TlsStream]:
    """A (TLS client, pins b) and B (TLS server, pins a) over one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        ta = socket.create_connection(lsock.getsockname())
        tb, _ = lsock.accept()
    out: dict[str, TlsStream] = {}
    t = threading.Thread(
        target=lambda: out.update(
            b=e2e_handshake(
                tb, pki.ctx("b", True), server_side=True, expected_pin=pki.pins["a"], peer_name="a"
            )
        )
    )
    t.start()
    a = e2e_handshake(
        ta, pki.ctx("a", False), server_side=False, expected_pin=pki.pins["b"], peer_name="b"
    )
    t.join(DEADLINE)
    return a, out["b"]


@dataclass
class Services:
    """The destination's local targets, each the far end of a socketpair run by a thread."""

    keep: list[socket.socket] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    late: list[socket.socket] = field(default_factory=list)
    received: dict[str, bytes] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def __call__(
        self, sid: int, meta: dict[str, Any]
    ) -> tuple[socket.socket, dict[str, Any]] | Refusal:
        svc = meta.get("service", "")
        if svc == "refuse":
            return Refusal("no-service", "nothing called refuse here")
        if svc == "crash":
            raise RuntimeError("the policy engine fell over")
        if svc == "slow":  # answers only once the test releases it
            self.release.wait(DEADLINE)
            link_end, far = socket.socketpair()
            self.late.append(far)
            return link_end, {}
        handler: Callable[[socket.socket], None] | None = {
            "echo": self.echo,
            "sha": self.sha,
            "source": lambda s: self.source(s, int(meta["n"]), str(meta["tag"])),
            "stall": self.keep.append,
            "spew": lambda s: self.spew(s, str(meta["tag"])),
        }.get(svc)
        if handler is None:
            return Refusal("no-service", f"no service {svc}")
        link_end, svc_end = socket.socketpair()
        th = threading.Thread(target=handler, args=(svc_end,), daemon=True)
        th.start()
        self.threads.append(th)
        return link_end, {"host_keys": ["ssh-ed25519 AAAA"], "sid": sid}

    @staticmethod
    def echo(s: socket.socket) -> None:
        with s:
            while data := s.recv(256 * 1024):
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)

    @staticmethod
    def sha(s: socket.socket) -> None:
        """Read to EOF (the client's half-close), then answer the digest: server sends after FIN."""
        h = hashlib.sha256()
        n = 0
        with s:
            while data := s.recv(256 * 1024):
                h.update(data)
                n += len(data)
            s.sendall(f"{n} {h.hexdigest()}".encode())
            s.shutdown(socket.SHUT_WR)

    def source(self, s: socket.socket, n: int, tag: str) -> None:
        """Send n bytes and half-close first; keep reading what the client sends after that."""
        with s:
            s.sendall(pattern(n))
            s.shutdown(socket.SHUT_WR)
            got = bytearray()
            while data := s.recv(65536):
                got += data
            self.received[tag] = bytes(got)

    def spew(self, s: socket.socket, tag: str) -> None:
        """Send until the stream is torn down under us; record how it ended."""
        try:
            with s:
                while True:
                    s.sendall(bytes(65536))
        except OSError as exc:
            self.received[tag] = type(exc).__name__.encode()


def pattern(n: int) -> bytes:
    block = hashlib.sha256(str(n).encode()).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


@dataclass
class Links:
    a: MuxLink
    b: MuxLink
    services: Services
    dead: dict[str, str]


@pytest.fixture
def links(pki: Pki) -> Iterator[Links]:
    ta, tb = tls_pair(pki)
    dead: dict[str, str] = {}
    services = Services()

    def no_incoming(sid: int, meta: dict[str, Any]) -> Refusal:
        return Refusal("no-service", "a serves nothing")

    a = MuxLink.start(ta, client=True, on_incoming=no_incoming, on_dead=lambda r: dead.update(a=r))
    b = MuxLink.start(
        tb, client=False, on_incoming=services, on_dead=lambda r: dead.update(b=r), name="b"
    )
    yield Links(a, b, services, dead)
    a.close()
    b.close()
    for s in services.keep + services.late:
        s.close()


def read_all(s: socket.socket) -> bytes:
    s.settimeout(DEADLINE)
    out = bytearray()
    while data := s.recv(1024 * 1024):
        out += data
    return bytes(out)


def echo_round_trip(link: MuxLink, payload: bytes) -> bytes:
    sock, reply = link.open_stream({"service": "echo"})
    assert reply["host_keys"] == ["ssh-ed25519 AAAA"]
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(read_all(sock)))
    reader.start()
    sock.settimeout(DEADLINE)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    reader.join(DEADLINE)
    sock.close()
    return got[0]


def test_open_refused_and_unknown(links: Links) -> None:
    with pytest.raises(MuxLinkError) as exc:
        links.a.open_stream({"service": "refuse"})
    assert exc.value.code == "no-service"
    with pytest.raises(MuxLinkError) as exc:
        links.b.open_stream({"service": "anything"})  # either side may open; a refuses
    assert exc.value.code == "no-service" and "a serves nothing" in exc.value.message
    assert links.a.alive and links.b.alive


def test_concurrent_streams_transfer_byte_identical(links: Links) -> None:
    blob = os.urandom(6 * MiB)
    parts = [blob[i * 3 * MiB // 2 : (i + 1) * 3 * MiB // 2] for i in range(4)]
    results: dict[int, bytes] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.update({i: echo_round_trip(links.a, parts[i])}))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert [hashlib.sha256(results[i]).digest() for i in range(4)] == [
        hashlib.sha256(p).digest() for p in parts
    ]
    assert links.a.bytes_sent == links.a.bytes_received == len(blob)
    wait_for(lambda: not links.a._locals and not links.b._locals, what="streams to be forgotten")


def test_half_close_client_direction_first(links: Links) -> None:
    sock, _ = links.a.open_stream({"service": "sha"})
    data = pattern(3 * MiB + 17)
    sock.settimeout(DEADLINE)
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)  # our direction ends; the answer still comes back
    answer = read_all(sock)
    sock.close()
    assert answer.decode() == f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def test_half_close_destination_direction_first(links: Links) -> None:
    sock, _ = links.a.open_stream({"service": "source", "n": 2 * MiB, "tag": "t1"})
    got = read_all(sock)  # EOF: the destination half-closed
    assert got == pattern(2 * MiB)
    late = b"sent after the destination's FIN" * 1000
    sock.sendall(late)
    sock.shutdown(socket.SHUT_WR)
    wait_for(lambda: "t1" in links.services.received, DEADLINE, "the late upload to arrive")
    assert links.services.received["t1"] == late
    sock.close()


def test_stalled_stream_does_not_block_others(links: Links) -> None:
    stalled, reply = links.a.open_stream({"service": "stall"})
    sid = int(reply["sid"])
    stalled.setblocking(False)
    pushed = 0
    chunk = bytes(64 * 1024)

    def stalled_now() -> bool:
        """Push until our socketpair is full; stalled = nothing went in and both links hold."""
        nonlocal pushed
        before = pushed
        with contextlib.suppress(BlockingIOError):
            while True:
                pushed += stalled.send(chunk)
        far = links.b._locals.get(sid)
        return (
            pushed == before
            and far is not None
            and bool(far.wr_queue)  # b could not write its local socket
            and links.a._mux.send_window(sid) == 0  # and a has no credit left
        )

    wait_for(stalled_now, DEADLINE, "the stream to stall")
    # Another stream runs at full speed meanwhile.
    data = os.urandom(4 * MiB)
    assert echo_round_trip(links.a, data) == data
    # The stalled one is still stalled, holding at most its window at the destination.
    far_loc = links.b._locals[sid]
    # Not yet written on: the head chunk's first wr_off bytes were written and credited
    # back already (consumed), so they do not count against the window.
    queued = sum(len(x) for x in list(far_loc.wr_queue)) - far_loc.wr_off
    assert 0 < queued <= links.b._mux._streams[sid].window <= pm.MAX_STREAM_WINDOW
    # Its bytes were waiting, intact, for their reader.
    far = links.services.keep[0]
    far.settimeout(DEADLINE)
    got = bytearray()
    while len(got) < pushed:
        got += far.recv(1024 * 1024)
    assert got == bytes(pushed)
    stalled.close()


def test_local_failure_resets_only_that_stream(links: Links) -> None:
    sock, reply = links.a.open_stream({"service": "spew", "tag": "r"})
    sid = int(reply["sid"])
    sock.settimeout(DEADLINE)
    assert sock.recv(65536)  # data flows
    # The source's consumer dies without reading on: a's write to it fails → RST.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    wait_for(
        lambda: "r" in links.services.received, DEADLINE, "the destination's end to be torn down"
    )
    assert links.services.received["r"] in (b"BrokenPipeError", b"ConnectionResetError")
    wait_for(lambda: sid not in links.a._locals and sid not in links.b._locals, what="forgotten")
    assert not links.a._mux.has_stream(sid) and not links.b._mux.has_stream(sid)
    data = b"the link itself is fine" * 1000
    assert echo_round_trip(links.a, data) == data


def test_crashing_destination_refuses_and_slow_one_times_out(links: Links) -> None:
    with pytest.raises(MuxLinkError) as exc:
        links.a.open_stream({"service": "crash"})
    assert exc.value.code == "error" and "fell over" in exc.value.message
    with pytest.raises(MuxLinkError) as exc:
        links.a.open_stream({"service": "slow"}, timeout=0.2)
    assert exc.value.code == "timeout"
    wait_for(lambda: not links.a._locals, what="the abandoned stream to be reset")
    links.services.release.set()  # the late answer meets a stream that is gone
    wait_for(lambda: bool(links.services.late), what="the late answer")
    far = links.services.late[0]
    far.settimeout(DEADLINE)
    assert far.recv(1) == b""  # its local socket was closed, not leaked
    assert links.a.alive and links.b.alive and not links.b._locals
    data = b"still fine" * 100
    assert echo_round_trip(links.a, data) == data


def test_ping_measures_rtt(links: Links) -> None:
    rtt = links.a.ping()
    assert 0 < rtt < 1.0
    assert links.a.rtt is not None
    assert links.b.ping() > 0


def test_close_tells_the_peer_and_fails_new_opens(links: Links) -> None:
    sock, _ = links.a.open_stream({"service": "stall"})
    links.a.close("agent stopping")
    wait_for(lambda: "b" in links.dead, 10, "b to notice the close")
    assert links.dead == {"a": "agent stopping", "b": "agent stopping"}
    assert links.b.end is not None and links.b.end.code == "remote:closed"
    assert read_all(sock) == b""  # the stream's local end is closed too
    with pytest.raises(MuxLinkError) as exc:
        links.a.open_stream({"service": "echo"})
    assert exc.value.code == "path-lost"
    with pytest.raises(MuxLinkError):
        links.b.ping()


def test_over_socket_pins_the_peer(pki: Pki) -> None:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        ca = socket.create_connection(lsock.getsockname())
        cb, _ = lsock.accept()
    dead: list[str] = []
    made: dict[str, MuxLink] = {}
    errors: list[BaseException] = []

    def server() -> None:
        try:
            made["b"] = MuxLink.over_socket(
                cb,
                pki.ctx("b", True),
                client=False,
                expected_pin=pki.pins["b"],  # wrong: a presents a's certificate
                on_incoming=Services(),
                on_dead=dead.append,
            )
        except DialError as exc:
            errors.append(exc)

    t = threading.Thread(target=server)
    t.start()
    with contextlib.suppress(DialError):
        made["a"] = MuxLink.over_socket(
            ca,
            pki.ctx("a", False),
            client=True,
            expected_pin=pki.pins["b"],
            on_incoming=Services(),
            on_dead=dead.append,
        )
    t.join(DEADLINE)
    assert len(errors) == 1 and isinstance(errors[0], DialError)
    assert errors[0].code == "pin-mismatch" and "b" not in made
    if "a" in made:  # a's handshake may finish before b hangs up; the link then dies
        wait_for(lambda: not made["a"].alive, 10, "a's link to end")
        made["a"].close()


def test_silent_peer_is_declared_dead_within_3_5_s(pki: Pki) -> None:
    """The peer finishes TLS and then says nothing (a blackholed path): dead after 3.5 s."""
    ta, tb = tls_pair(pki)  # tb is held open and never read nor written
    dead: list[tuple[float, str]] = []
    t0 = time.monotonic()
    a = MuxLink.start(
        ta,
        client=True,
        on_incoming=lambda sid, meta: Refusal("x", "x"),
        on_dead=lambda r: dead.append((time.monotonic(), r)),
    )
    try:
        sock, fut = a.open_stream_async({"service": "echo"})
        wait_for(lambda: bool(dead), pm.DEAD_AFTER + 3, "the link to declare its peer dead")
        when, reason = dead[0]
        assert pm.DEAD_AFTER - 0.1 <= when - t0 <= pm.DEAD_AFTER + 1.0
        assert "no answer" in reason and not a.alive
        assert a.end is not None and a.end.code == "timeout"
        with pytest.raises(MuxLinkError) as exc:
            fut.result(1)
        assert exc.value.code == "path-lost"
        sock.close()
    finally:
        a.close()
        tb.close()


def test_tls_cut_ends_the_link(links: Links) -> None:
    links.b._tls.sock.shutdown(socket.SHUT_RDWR)  # the path dies under both links
    wait_for(lambda: "a" in links.dead and "b" in links.dead, 10, "both links to end")
    assert not links.a.alive
