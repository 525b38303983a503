"""Micro-benchmark of the stream pump: CPU-s/GiB of each end for a given write size.

``python -m bench.pump_micro [--mib 256] [--chunk 32768]``: a feeder writes
``--chunk``-sized blocks (ssh writes ~32 KiB; a bulk TCP source 1 MiB) into a
socketpair, pump A (TLS client) encrypts them over loopback TCP to pump B (TLS
server), which writes them to a socketpair a reader drains. Each pump's CPU is
its own thread's ``time.thread_time``. One process, so the figures are for
comparing pump versions side by side, not absolute.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

from homeport.crypto import identity
from homeport.io.pump import pump
from homeport.io.tlsctx import stream_context
from homeport.io.tlsstream import handshake


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=32768)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="pump-micro-"))
    ca = identity.create_ca()
    (d / "ca.crt").write_bytes(ca.cert_pem)
    for n in ("a", "b"):
        key = identity.new_private_key_pem()
        (d / f"{n}.key").write_bytes(key)
        (d / f"{n}.crt").write_bytes(identity.sign_node_csr(ca, identity.make_csr(key, n), n))
    ctx_a = stream_context(
        server_side=False, cert=d / "a.crt", key=d / "a.key", ca_cert=d / "ca.crt"
    )
    ctx_b = stream_context(
        server_side=True, cert=d / "b.crt", key=d / "b.key", ca_cert=d / "ca.crt"
    )
    lsock = socket.create_server(("127.0.0.1", 0))
    ta = socket.create_connection(lsock.getsockname())
    tb, _ = lsock.accept()
    hs: dict[str, object] = {}
    t = threading.Thread(
        target=lambda: hs.update(b=handshake(tb, ctx_b, server_side=True, timeout=10))
    )
    t.start()
    sa = handshake(ta, ctx_a, server_side=False, timeout=10)
    t.join()
    sb = hs["b"]
    feed_out, feed_in = socket.socketpair()
    sink_in, sink_out = socket.socketpair()
    total = args.mib << 20
    cpu: dict[str, float] = {}

    def run(name: str, tls: object, fd: int) -> None:
        t0 = time.thread_time()
        res = pump(tls, fd, fd)  # type: ignore[arg-type]
        cpu[name] = time.thread_time() - t0
        assert res.ok, res

    def feed() -> None:
        block = b"\x5a" * args.chunk
        left = total
        while left:
            n = min(left, len(block))
            feed_out.sendall(block[:n])
            left -= n
        feed_out.shutdown(socket.SHUT_WR)
        assert feed_out.recv(1) == b""

    def drain() -> None:
        got = 0
        buf = bytearray(1 << 20)
        while True:
            n = sink_out.recv_into(buf)
            if not n:
                break
            got += n
        assert got == total, got
        sink_out.shutdown(socket.SHUT_WR)

    start = time.perf_counter()
    ths = [
        threading.Thread(target=run, args=("A (encrypts)", sa, feed_in.fileno())),
        threading.Thread(target=run, args=("B (decrypts)", sb, sink_in.fileno())),
        threading.Thread(target=feed),
        threading.Thread(target=drain),
    ]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    wall = time.perf_counter() - start
    gib = total / (1 << 30)
    print(
        f"chunk {args.chunk}: {total / wall / 1e6:.0f} MB/s; "
        + "; ".join(f"{k} {v / gib:.2f} CPU-s/GiB" for k, v in cpu.items())
    )


if __name__ == "__main__":
    main()
