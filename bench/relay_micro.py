"""Micro-benchmark of the relay alone: CPU-s/GiB and wake-ups for a given write size.

One run: ``python -m bench.relay_micro [--mib 512] [--chunk 32768] [--pace MB/s]
[--old PATH | --splice PATH]``. This process runs the relay
(``homeport.relay.InProcessRelay``; with ``--old`` a module file with the first
thread-per-direction ``Relay``; with ``--splice`` today's ``InProcessRelay``
driven by the engine of another ``relay/splice.py`` file, e.g. the one before a
change); a forked child writes ``--chunk``-sized blocks into one end (ssh-like
traffic: one TLS record, ≤ 16 KiB, or ~32 KiB; bulk TCP: 1 MiB), optionally
paced (``--pace`` MB/s: the relay then may wake per chunk, as with ssh
traffic), and drains the other; with ``--ack N`` the sink writes 100 bytes back
per N bytes received, as ssh's window adjusts do. The relay's CPU is this process's rusage over
the transfer (its main thread only waits); "wake-ups" are its voluntary context
switches (each blocking epoll_wait or splice that had to wait).

Side by side: ``--repeats N`` (with any of ``--old``/``--splice``) runs each
engine N times, interleaved, each in a fresh process, and prints a markdown
table of medians, so that the noise of a shared machine hits every engine alike.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from types import ModuleType
from typing import Any


def _load(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _make_relay(args: argparse.Namespace) -> Any:
    if args.old:
        return _load(args.old, "old_relay").Relay()
    from homeport.relay import link

    if args.splice:  # the same pairing and glue, another engine
        link.SpliceEngine = _load(args.splice, "other_splice").SpliceEngine  # type: ignore[attr-defined]
    return link.InProcessRelay()


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(1 << 16):
            pass


def run_once(args: argparse.Namespace) -> dict[str, float]:
    relay = _make_relay(args)
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
            if args.ack:  # drain the acknowledgements the sink sends back
                threading.Thread(target=_drain, args=(a,), daemon=True).start()
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
        got = acked = 0
        ack = b"\xa5" * 100  # about an ssh window adjust in a TLS record
        while n := b.recv_into(buf):
            got += n
            if args.ack and got - acked >= args.ack:
                b.sendall(ack)
                acked = got
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
    gib = total / (1 << 30)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {
        "mbps": total / wall / 1e6,
        "cpu": cpu / gib,
        "wakeups": (r1.ru_nvcsw - r0.ru_nvcsw) / gib,
        "status": float(status),
    }


def side_by_side(args: argparse.Namespace) -> None:
    engines: list[tuple[str, list[str]]] = []
    if args.old:
        engines.append(("threads (first relay, 2 per stream)", ["--old", args.old]))
    if args.splice:
        engines.append((f"epoll engine from {args.splice}", ["--splice", args.splice]))
    engines.append(("epoll engine (this tree)", []))
    base = [sys.executable, "-m", "bench.relay_micro", "--mib", str(args.mib)]
    base += ["--chunk", str(args.chunk), "--pace", str(args.pace), "--ack", str(args.ack)]
    base += ["--json"]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in engines}
    for _ in range(args.repeats):
        for name, extra in engines:
            out = subprocess.run(base + extra, check=True, capture_output=True, text=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    pace = f"paced {args.pace:g} MB/s" if args.pace else "unpaced"
    if args.ack:
        pace += f", 100 bytes back per {args.ack} received"
    print(f"\n{args.mib} MiB in {args.chunk}-byte writes, {pace}; medians of {args.repeats}\n")
    print("| engine | MB/s | relay CPU-s/GiB | wake-ups/GiB | CPU-s/GiB of each run |")
    print("|---|---|---|---|---|")
    for name, _ in engines:
        rs = runs[name]
        if any(r["status"] for r in rs):
            print(f"| {name} | FAILED (a run lost bytes) | | | |")
            continue
        each = ", ".join(f"{r['cpu']:.2f}" for r in rs)
        print(
            f"| {name} | {statistics.median(r['mbps'] for r in rs):.0f} "
            f"| {statistics.median(r['cpu'] for r in rs):.2f} "
            f"| {statistics.median(r['wakeups'] for r in rs):.0f} | {each} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=32768)
    ap.add_argument("--pace", type=float, default=0.0, help="sender MB/s (0: as fast as it can)")
    ap.add_argument(
        "--ack", type=int, default=0, help="the sink writes 100 bytes back per ACK bytes (ssh-like)"
    )
    ap.add_argument("--old", default=None, help="path of the first relay module (class Relay)")
    ap.add_argument("--splice", default=None, help="path of another relay/splice.py")
    ap.add_argument("--repeats", type=int, default=0, help="side by side: runs per engine")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats:
        side_by_side(args)
        return
    r = run_once(args)
    if args.json:
        print(json.dumps(r))
        return
    name = "old" if args.old else ("other" if args.splice else "new")
    print(
        f"{name} chunk {args.chunk}: {r['mbps']:.0f} MB/s, relay {r['cpu']:.2f} CPU-s/GiB, "
        f"{r['wakeups']:.0f} wake-ups/GiB (exit {int(r['status'])})"
    )


if __name__ == "__main__":
    main()
