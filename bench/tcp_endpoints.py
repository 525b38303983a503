"""Raw TCP endpoints for :mod:`bench.ssh_paths` (standard library only).

Run by file path (``python bench/tcp_endpoints.py ...``) so it needs no
``sys.path`` set-up and imports nothing of homeport:

``serve``
    Listen on two free 127.0.0.1 ports and print ``{"sink_port": P, "close_port": Q}``.
    The *sink* reads every connection to EOF with ``recv_into`` and prints one
    JSON line ``{"bytes": N, "seconds": T}`` per connection that carried data,
    where ``T`` runs from the first byte to EOF (the receiver's view, so
    connection set-up through a tunnel is not counted).  Empty connections
    (readiness probes of a local forwarder) are ignored.  The *close* service
    sends :data:`BANNER` and closes at once: the target of the
    ``nc`` start-up measurement.
``source``
    Connect to ``--port``, send ``--bytes`` bytes of random data in 1 MiB
    ``sendall`` calls, half-close, and wait for the peer's EOF.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time

BANNER = b"homeport-bench\n"
CHUNK = 1 << 20
RECV_BUF = 4 << 20

_print_lock = threading.Lock()


def _emit(obj: dict[str, object]) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def _drain(conn: socket.socket) -> None:
    buf = bytearray(RECV_BUF)
    view = memoryview(buf)
    total = 0
    first = 0.0
    with conn:
        while True:
            try:
                got = conn.recv_into(view)
            except OSError:
                break
            if got == 0:
                break
            if total == 0:
                first = time.perf_counter()
            total += got
        end = time.perf_counter()
    if total:
        _emit({"bytes": total, "seconds": end - first})


def _sink_loop(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_drain, args=(conn,), daemon=True).start()


def _close_loop(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        with conn, contextlib.suppress(OSError):
            conn.sendall(BANNER)


def serve() -> int:
    sink = _listener()
    closer = _listener()
    threading.Thread(target=_close_loop, args=(closer,), daemon=True).start()
    _emit({"sink_port": sink.getsockname()[1], "close_port": closer.getsockname()[1]})
    _sink_loop(sink)
    return 0


def source(port: int, nbytes: int, timeout: float) -> int:
    block = os.urandom(CHUNK)
    view = memoryview(block)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        left = nbytes
        while left > 0:
            step = min(left, CHUNK)
            sock.sendall(view[:step])
            left -= step
        sock.shutdown(socket.SHUT_WR)
        # Wait for the far end to finish reading: its EOF reaches us once
        # the sink has closed, so the process exits only after delivery.
        while sock.recv(65536):
            pass
    _emit({"sent": nbytes, "seconds": time.perf_counter() - start})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("serve")
    src = sub.add_parser("source")
    src.add_argument("--port", type=int, required=True)
    src.add_argument("--bytes", type=int, required=True)
    src.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.mode == "serve":
        return serve()
    return source(args.port, args.bytes, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
