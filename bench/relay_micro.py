"""Micro-benchmark of the relay alone: CPU-s/GiB for a given write size.

``python -m bench.relay_micro [--mib 512] [--chunk 32768] [--old PATH]``: this
process runs the relay (``homeport.relay.InProcessRelay``, or with ``--old`` a
module file with the previous thread-per-direction ``Relay``); a forked child
writes ``--chunk``-sized blocks into one end (ssh-like traffic: ~32 KiB; bulk
TCP: 1 MiB), optionally paced (``--pace`` MB/s: the relay then wakes per
chunk, as with ssh traffic), and drains the other. The relay's CPU is this process's rusage
over the transfer (its main thread only waits).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import socket
import sys
import time
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=32768)
    ap.add_argument("--pace", type=float, default=0.0, help="sender MB/s (0: as fast as it can)")
    ap.add_argument("--old", default=None, help="path of an older relay module (class Relay)")
    args = ap.parse_args()
    relay: Any
    if args.old:
        spec = importlib.util.spec_from_file_location("old_relay", args.old)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["old_relay"] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
        relay = mod.Relay()
    else:
        from homeport.relay import InProcessRelay

        relay = InProcessRelay()
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lsock.getsockname())
    a_in, _ = lsock.accept()
    b = socket.create_connection(lsock.getsockname())
    b_in, _ = lsock.accept()
    total = args.mib << 20
    pid = os.fork()
    if pid == 0:  # the child: source and sink
        a_in.close()
        b_in.close()
        if os.fork() == 0:
            block = b"\x5a" * args.chunk
            left = total
            gap = args.chunk / (args.pace * 1e6) if args.pace else 0.0
            due = time.perf_counter()
            while left:
                n = min(left, len(block))
                a.sendall(block[:n])
                left -= n
                if gap:  # ssh-like: one chunk at a time, at a given rate
                    due += gap
                    pause = due - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
            a.shutdown(socket.SHUT_WR)
            os._exit(0)
        buf = bytearray(1 << 20)
        got = 0
        while n := b.recv_into(buf):
            got += n
        os._exit(0 if got == total else 1)
    a.close()
    b.close()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    relay.expect("s", src_node="x", dst_node="y", src_token=b"c" * 16, dst_token=b"a" * 16)
    relay.attach(b"c" * 16, a_in)
    relay.attach(b"a" * 16, b_in)
    _, status = os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    relay.close()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(
        f"{'old' if args.old else 'new'} chunk {args.chunk}: {total / wall / 1e6:.0f} MB/s, "
        f"relay {cpu / (total / (1 << 30)):.2f} CPU-s/GiB (exit {status})"
    )


if __name__ == "__main__":
    main()
