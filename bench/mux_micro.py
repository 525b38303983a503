"""Micro-benchmark: one mux stream (io.muxlink) vs the per-stream pump (io.pump), side by side.

``python -m bench.mux_micro [--mib 1024] [--chunk 1048576] [--rounds 1]``: in one
process, for each path, a feeder writes ``--mib`` MiB in ``--chunk`` blocks into a
socketpair; the sending end (pump A / MuxLink A, TLS client) encrypts them over a
loopback TCP connection with real, mutually pinned TLS 1.3 to the receiving end
(pump B / MuxLink B), which writes them to a socketpair a reader drains and
counts. CPU is each end's own thread (``time.thread_time``); MB/s is wall clock.
Both paths run in the same process on the same machine, alternating per round,
so the *ratio* is the figure to read (a shared 2-core VM is noisy).

``--pings N`` (default 200) also measures keystroke latency on each path: a
1-byte write echoed back by the far end's local service, N times in a row on
one stream/connection (the median and 90th percentile round trip in µs), so a
batching change that trades latency for throughput shows up here.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from homeport.crypto import identity
from homeport.crypto.tls import fingerprint
from homeport.io.dial import e2e_handshake
from homeport.io.muxlink import MuxLink, Refusal
from homeport.io.pump import pump, tune_socket
from homeport.io.tlsctx import stream_context
from homeport.io.tlsstream import TlsStream
from homeport.proto import mux as pm

GiB = 1 << 30


class Pki:
    def __init__(self) -> None:
        d = Path(tempfile.mkdtemp(prefix="mux-micro-"))
        ca = identity.create_ca()
        (d / "ca.crt").write_bytes(ca.cert_pem)
        self.pins: dict[str, str] = {}
        self.ctx: dict[str, ssl.SSLContext] = {}
        for n, server_side in (("a", False), ("b", True)):
            key = identity.new_private_key_pem()
            cert = identity.sign_node_csr(ca, identity.make_csr(key, n), n)
            (d / f"{n}.key").write_bytes(key)
            (d / f"{n}.crt").write_bytes(cert)
            self.pins[n] = fingerprint(identity.cert_der_from_pem(cert))
            self.ctx[n] = stream_context(
                server_side=server_side,
                cert=d / f"{n}.crt",
                key=d / f"{n}.key",
                ca_cert=d / "ca.crt",
            )

    def pair(self) -> tuple[TlsStream, TlsStream]:
        with socket.create_server(("127.0.0.1", 0)) as lsock:
            ta = socket.create_connection(lsock.getsockname())
            tb, _ = lsock.accept()
        out: dict[str, TlsStream] = {}
        t = threading.Thread(
            target=lambda: out.update(
                b=e2e_handshake(
                    tb, self.ctx["b"], server_side=True, expected_pin=self.pins["a"], peer_name="a"
                )
            )
        )
        t.start()
        a = e2e_handshake(
            ta, self.ctx["a"], server_side=False, expected_pin=self.pins["b"], peer_name="b"
        )
        t.join()
        return a, out["b"]


def feed(sock: socket.socket, total: int, chunk: int) -> None:
    block = b"\x5a" * chunk
    left = total
    while left:
        n = min(left, chunk)
        sock.sendall(block[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)


def feed_and_wait(sock: socket.socket, total: int, chunk: int) -> None:
    feed(sock, total, chunk)
    assert sock.recv(1) == b""


def drain(sock: socket.socket, total: int) -> None:
    got = 0
    buf = bytearray(1 << 20)
    while n := sock.recv_into(buf):
        got += n
    assert got == total, got
    sock.shutdown(socket.SHUT_WR)


def run_threads(fns: list[Callable[[], None]]) -> None:
    ths = [threading.Thread(target=f) for f in fns]
    for t in ths:
        t.start()
    for t in ths:
        t.join()


def bench_pump(pki: Pki, total: int, chunk: int) -> tuple[float, float, float]:
    """(wall seconds, CPU-s of the sender, CPU-s of the receiver)."""
    sa, sb = pki.pair()
    feed_out, feed_in = socket.socketpair()
    sink_in, sink_out = socket.socketpair()
    for s in (feed_out, feed_in, sink_in, sink_out):
        tune_socket(s)
    cpu: dict[str, float] = {}

    def run(name: str, tls: TlsStream, fd: int) -> Callable[[], None]:
        def go() -> None:
            t0 = time.thread_time()
            res = pump(tls, fd, fd)
            cpu[name] = time.thread_time() - t0
            assert res.ok, res

        return go

    start = time.perf_counter()
    run_threads(
        [
            run("a", sa, feed_in.fileno()),
            run("b", sb, sink_in.fileno()),
            lambda: feed_and_wait(feed_out, total, chunk),
            lambda: drain(sink_out, total),
        ]
    )
    wall = time.perf_counter() - start
    for s in (feed_out, feed_in, sink_in, sink_out):
        s.close()
    return wall, cpu["a"], cpu["b"]


def bench_mux(
    pki: Pki, total: int, chunk: int, window: int = pm.INITIAL_WINDOW
) -> tuple[float, float, float]:
    ta, tb = pki.pair()
    sinks: list[threading.Thread] = []
    done = threading.Event()

    def on_incoming(sid: int, meta: dict[str, Any]) -> tuple[socket.socket, dict[str, Any]]:
        link_end, sink = socket.socketpair()
        tune_socket(sink)

        def sink_run() -> None:
            drain(sink, total)
            sink.close()
            done.set()

        th = threading.Thread(target=sink_run)
        th.start()
        sinks.append(th)
        return link_end, {}

    def no(sid: int, meta: dict[str, Any]) -> Refusal:
        return Refusal("no", "no")

    a = MuxLink.start(
        ta, client=True, on_incoming=no, on_dead=lambda r: None, name="b", stream_window=window
    )
    b = MuxLink.start(
        tb,
        client=False,
        on_incoming=on_incoming,
        on_dead=lambda r: None,
        name="a",
        stream_window=window,
    )
    cpu0_a = cpu0_b = 0.0  # threads start at ~0 CPU; the handshake ran on other threads
    start = time.perf_counter()
    sock, _ = a.open_stream({"service": "bench"})
    feed(sock, total, chunk)
    assert sock.recv(1) == b""  # the far end's half-close came back: all bytes delivered
    wall = time.perf_counter() - start
    done.wait()
    for th in sinks:
        th.join()
    sock.close()
    a.close()
    b.close()
    return wall, a.cpu_seconds - cpu0_a, b.cpu_seconds - cpu0_b


def echo(sock: socket.socket) -> None:
    """The far end's local service for the latency probe: echo every byte until EOF."""
    while data := sock.recv(4096):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def echo_and_close(sock: socket.socket) -> None:
    with sock:
        echo(sock)


def _run_pump(tls: TlsStream, sock: socket.socket) -> None:
    res = pump(tls, sock.fileno(), sock.fileno())
    assert res.ok, res


def ping_pong(sock: socket.socket, count: int) -> list[float]:
    """``count`` 1-byte round trips through ``sock`` (its far end echoes); seconds each."""
    rtts: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        sock.sendall(b"k")
        assert sock.recv(1) == b"k"
        rtts.append(time.perf_counter() - t0)
    sock.shutdown(socket.SHUT_WR)
    assert sock.recv(1) == b""
    return rtts


def latency_pump(pki: Pki, count: int) -> list[float]:
    sa, sb = pki.pair()
    near, a_end = socket.socketpair()
    b_end, far = socket.socketpair()
    out: list[float] = []
    run_threads(
        [
            lambda: _run_pump(sa, a_end),
            lambda: _run_pump(sb, b_end),
            lambda: echo(far),
            lambda: out.extend(ping_pong(near, count)),
        ]
    )
    for s in (near, a_end, b_end, far):
        s.close()
    return out


def latency_mux(pki: Pki, count: int) -> list[float]:
    ta, tb = pki.pair()
    echoes: list[threading.Thread] = []

    def on_incoming(sid: int, meta: dict[str, Any]) -> tuple[socket.socket, dict[str, Any]]:
        link_end, far = socket.socketpair()
        th = threading.Thread(target=echo_and_close, args=(far,))
        th.start()
        echoes.append(th)
        return link_end, {}

    a = MuxLink.start(
        ta, client=True, on_incoming=lambda s, m: Refusal("no", "no"), on_dead=lambda r: None
    )
    b = MuxLink.start(tb, client=False, on_incoming=on_incoming, on_dead=lambda r: None)
    sock, _ = a.open_stream({"service": "echo"})
    out = ping_pong(sock, count)
    for th in echoes:
        th.join()
    sock.close()
    a.close()
    b.close()
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1 << 20)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--window", type=int, default=pm.INITIAL_WINDOW, help="mux stream window")
    ap.add_argument("--pings", type=int, default=200, help="1-byte round trips per path (0: skip)")
    args = ap.parse_args()
    pki = Pki()
    total = args.mib << 20
    gib = total / GiB
    rows: dict[str, list[tuple[float, float, float]]] = {"pump": [], "mux": []}
    rtts: dict[str, list[float]] = {"pump": [], "mux": []}
    for _ in range(args.rounds):
        rows["pump"].append(bench_pump(pki, total, args.chunk))
        rows["mux"].append(bench_mux(pki, total, args.chunk, args.window))
        if args.pings:
            rtts["pump"] += latency_pump(pki, args.pings)
            rtts["mux"] += latency_mux(pki, args.pings)
    print(f"{args.mib} MiB per run, feeder chunk {args.chunk}, {args.rounds} round(s)")
    print(f"{'path':<6} {'MB/s':>8} {'send CPU-s/GiB':>15} {'recv CPU-s/GiB':>15} {'total':>8}")
    best: dict[str, tuple[float, float]] = {}
    for name, runs in rows.items():
        wall = min(r[0] for r in runs)
        snd = min(r[1] for r in runs) / gib
        rcv = min(r[2] for r in runs) / gib
        best[name] = (total / wall / 1e6, snd + rcv)
        print(f"{name:<6} {total / wall / 1e6:8.0f} {snd:15.2f} {rcv:15.2f} {snd + rcv:8.2f}")
    print(
        f"mux/pump: CPU per byte x{best['mux'][1] / best['pump'][1]:.2f}, "
        f"throughput x{best['mux'][0] / best['pump'][0]:.2f}"
    )
    if args.pings:
        print(f"1-byte round trip, {len(rtts['mux'])} per path:")
        for name, values in rtts.items():
            print(f"{name:<6} median {_pct(values, 0.5):7.0f} us   p90 {_pct(values, 0.9):7.0f} us")
        print(
            f"mux/pump: median round trip x{_pct(rtts['mux'], 0.5) / _pct(rtts['pump'], 0.5):.2f}"
        )


if __name__ == "__main__":
    main()
