"""Micro-benchmark of the stream pump: CPU-s/GiB of each end, and keystroke latency.

``python -m bench.pump_micro [--mib 256] [--repeats 3] [--compare OLD_PUMP.py]``

Two pumps joined by loopback TCP run real end-to-end TLS 1.3, each in its own
forked process (no GIL sharing; CPU is the child's own ``wait4`` rusage, so it
includes every syscall the pump makes). A feeder writes blocks into a
socketpair that pump A (TLS client) encrypts; pump B (TLS server) decrypts and
writes to a socketpair a reader drains. The scenarios:

* ``bulk 1MiB``: 1 MiB writes, as fast as the pumps go (a raw TCP source);
* ``ssh 32KiB``: 32 KiB writes unpaced (ssh writes one channel packet at a time);
* ``ssh 32KiB @150MB/s``: the same paced at what ``cat | ssh`` through homeport
  reaches on this machine — the producer, not the pump, is the bottleneck, so
  every wake-up finds only a little data: the case that costs most per GiB;
* ``echo 1B``: one byte there and back through both pumps, 2,000 times
  (keystroke echo latency: the median and 99th percentile round trip).

``--compare`` loads another pump module from a file (e.g. the previous
version, extracted with ``git show main:src/homeport/io/pump.py``) and runs it
interleaved with the current one, so both are measured under the same load
(the machine is shared: compare ratios side by side, not absolute figures).
``--floor`` measures, in one thread and without waiting, what every pump pays
whatever its loop: TLS through memory BIOs each way and one kernel copy through
a unix socketpair and through loopback TCP. ``--layers tls,records`` (the
default) runs every scenario over both stream record layers, interleaved:
end-to-end TLS 1.3 records (``homeport-stream/1``) and homeport's own
AES-256-GCM records after the same TLS handshake
(``homeport-stream/2``, :mod:`homeport.io.recstream`); ``--floor`` then also
measures the record layer's seal and open alone. ``--profile`` runs one
``ssh 32KiB @150MB/s`` transfer with pump A (or B) under cProfile and prints the
top functions.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.util
import os
import pstats
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from homeport.crypto import identity
from homeport.io import pump as current_pump
from homeport.io import recstream
from homeport.io.tlsctx import stream_context
from homeport.io.tlsstream import TlsStream, handshake

GIB = 1 << 30
ECHO_ROUNDS = 2000


@dataclass(frozen=True)
class Scenario:
    name: str
    chunk: int
    rate: float | None  # bytes/s, None = unpaced
    echo: bool = False


SCENARIOS = (
    Scenario("bulk 1MiB", 1 << 20, None),
    Scenario("ssh 32KiB", 32768, None),
    Scenario("ssh 32KiB @150MB/s", 32768, 150e6),
    Scenario("echo 1B", 1, None, echo=True),
)


def contexts(records: bool = False) -> tuple[Any, Any]:
    """A client and a server stream context; ``records`` offers homeport-stream/2."""
    old = os.environ.get(recstream.ENV_SWITCH)
    os.environ[recstream.ENV_SWITCH] = "1" if records else "0"
    try:
        return _contexts()
    finally:
        if old is None:
            del os.environ[recstream.ENV_SWITCH]
        else:
            os.environ[recstream.ENV_SWITCH] = old


def _contexts() -> tuple[Any, Any]:
    d = Path(tempfile.mkdtemp(prefix="pump-micro-"))
    ca = identity.create_ca()
    (d / "ca.crt").write_bytes(ca.cert_pem)
    for n in ("a", "b"):
        key = identity.new_private_key_pem()
        (d / f"{n}.key").write_bytes(key)
        (d / f"{n}.crt").write_bytes(identity.sign_node_csr(ca, identity.make_csr(key, n), n))
    ca_cert = d / "ca.crt"
    return (
        stream_context(server_side=False, cert=d / "a.crt", key=d / "a.key", ca_cert=ca_cert),
        stream_context(server_side=True, cert=d / "b.crt", key=d / "b.key", ca_cert=ca_cert),
    )


def tls_pair(ctx_a: Any, ctx_b: Any) -> tuple[TlsStream, TlsStream]:
    lsock = socket.create_server(("127.0.0.1", 0))
    ta = socket.create_connection(lsock.getsockname())
    tb, _ = lsock.accept()
    lsock.close()
    hs: dict[str, TlsStream] = {}

    def server() -> None:
        sb = handshake(tb, ctx_b, server_side=True, timeout=10)
        hs["b"] = recstream.negotiate(sb, server_side=True, timeout=10)

    t = threading.Thread(target=server)
    t.start()
    sa = handshake(ta, ctx_a, server_side=False, timeout=10)
    sa = recstream.negotiate(sa, server_side=False, timeout=10)
    t.join()
    return sa, hs["b"]


def spawn_pump(
    mod: ModuleType, tls: TlsStream, fd: int, keep: set[int], profile: str | None
) -> tuple[int, int]:
    """Fork a child that pumps ``tls`` ⇄ ``fd`` and exits (1 unless the pump ended clean).

    Returns its pid and a pipe on which it reports how many times it polled
    (its wake-ups: a figure the machine's load does not change as much as CPU).
    """
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(report_w)
        return pid, report_r
    code = 1
    polls = 0
    try:
        os.close(report_r)
        for other in keep:
            if other not in (fd, tls.fileno()):
                os.close(other)
        real_poll = mod._Poller.poll

        def counting_poll(self: Any, timeout_ms: int | None) -> Any:
            nonlocal polls
            polls += 1
            return real_poll(self, timeout_ms)

        mod._Poller.poll = counting_poll
        # The feeder's and reader's ends are tuned like homeport's own socketpairs.
        kwargs = {"local_tuned": True} if hasattr(mod, "COALESCE_DELAY") else {}
        if profile:
            prof = cProfile.Profile()
            res = prof.runcall(mod.pump, tls, fd, fd, **kwargs)
            st = pstats.Stats(prof)
            st.sort_stats("tottime").print_stats(18)
        else:
            res = mod.pump(tls, fd, fd, **kwargs)
        code = 0 if res.ok else 1
        os.write(report_w, str(polls).encode())
    finally:
        os._exit(code)


def run_once(
    mod: ModuleType, sc: Scenario, nbytes: int, ctx: tuple[Any, Any], profile: str = ""
) -> dict[str, float]:
    sa, sb = tls_pair(*ctx)
    feed_out, feed_in = socket.socketpair()
    sink_in, sink_out = socket.socketpair()
    for s in (feed_out, sink_out):  # as homeport tunes the far end of its socketpairs
        current_pump.tune_socket(s)
    fds = {sa.fileno(), sb.fileno(), feed_out.fileno(), feed_in.fileno()}
    fds |= {sink_in.fileno(), sink_out.fileno()}
    pid_a, rep_a = spawn_pump(mod, sa, feed_in.fileno(), fds, profile if profile == "A" else None)
    pid_b, rep_b = spawn_pump(mod, sb, sink_in.fileno(), fds, profile if profile == "B" else None)
    for stream in (sa, sb):
        stream.close()
    feed_in.close()
    sink_in.close()
    out: dict[str, float] = {}
    if sc.echo:
        out.update(echo(feed_out, sink_out))
        moved = 0
    else:
        out.update(transfer(feed_out, sink_out, sc, nbytes))
        moved = nbytes
    for name, pid, report in (("A", pid_a, rep_a), ("B", pid_b, rep_b)):
        _, status, ru = os.wait4(pid, 0)
        polls = os.read(report, 64)
        os.close(report)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"pump {name} did not end clean")
        if moved:
            out[name] = (ru.ru_utime + ru.ru_stime) / (moved / GIB)
            out[f"{name} polls"] = int(polls) / (moved / GIB)
    feed_out.close()
    sink_out.close()
    return out


def transfer(
    feed_out: socket.socket, sink_out: socket.socket, sc: Scenario, nbytes: int
) -> dict[str, float]:
    got = 0

    def drain() -> None:
        nonlocal got
        buf = bytearray(1 << 20)
        while True:
            n = sink_out.recv_into(buf)
            if not n:
                break
            got += n
        sink_out.shutdown(socket.SHUT_WR)

    th = threading.Thread(target=drain)
    th.start()
    block = b"\x5a" * sc.chunk
    start = time.perf_counter()
    due = start
    left = nbytes
    while left:
        n = min(left, sc.chunk)
        feed_out.sendall(block[:n] if n < sc.chunk else block)
        left -= n
        if sc.rate is not None:
            due += n / sc.rate
            ahead = due - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)  # pacing the producer, not synchronisation
    feed_out.shutdown(socket.SHUT_WR)
    th.join()
    wall = time.perf_counter() - start
    if feed_out.recv(1) != b"" or got != nbytes:
        raise RuntimeError(f"moved {got} of {nbytes}")
    return {"MB/s": nbytes / wall / 1e6}


def echo(feed_out: socket.socket, sink_out: socket.socket) -> dict[str, float]:
    def echoer() -> None:
        while True:
            b = sink_out.recv(1)
            if not b:
                break
            sink_out.sendall(b)
        sink_out.shutdown(socket.SHUT_WR)

    th = threading.Thread(target=echoer)
    th.start()
    rtts = []
    for _ in range(ECHO_ROUNDS):
        t0 = time.perf_counter()
        feed_out.sendall(b"k")
        if feed_out.recv(1) != b"k":
            raise RuntimeError("echo lost")
        rtts.append(time.perf_counter() - t0)
    feed_out.shutdown(socket.SHUT_WR)
    if feed_out.recv(1) != b"":
        raise RuntimeError("echo: stray byte")
    th.join()
    rtts.sort()
    return {
        "rtt p50 us": statistics.median(rtts) * 1e6,
        "rtt p99 us": rtts[int(len(rtts) * 0.99)] * 1e6,
    }


def floor(ctx: tuple[Any, Any], nbytes: int, chunk: int = 256 * 1024) -> None:
    """CPU-s/GiB of the pieces every pump pays, in one thread, no waiting: the floor.

    TLS through memory BIOs (encrypt = ``write`` + taking the records out of the
    outgoing BIO; decrypt = putting them into the incoming BIO + ``read`` into a
    buffer) and one kernel copy each way through a unix socketpair and through
    loopback TCP (write + read in the same thread, so both sides' kernel work).
    """
    inc_a, out_a, inc_b, out_b = (ssl.MemoryBIO() for _ in range(4))
    a = ctx[0].wrap_bio(inc_a, out_a, server_side=False)
    b = ctx[1].wrap_bio(inc_b, out_b, server_side=True)
    for _ in range(10):  # in-memory handshake
        for obj in (a, b):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        inc_b.write(out_a.read())
        inc_a.write(out_b.read())
    data = memoryview(b"\x5a" * chunk)
    buf = bytearray(chunk)
    n = nbytes // chunk
    enc = dec = 0.0
    for _ in range(n):
        t0 = time.process_time()
        a.write(data)
        rec = out_a.read()
        t1 = time.process_time()
        inc_b.write(rec)
        with contextlib.suppress(ssl.SSLWantReadError):
            while True:
                b.read(chunk, buf)
        t2 = time.process_time()
        enc += t1 - t0
        dec += t2 - t1
    rows = [("TLS encrypt via memory BIO", enc), ("TLS decrypt via memory BIO", dec)]
    rows += _records_floor(data, buf, n)
    for name, pair in (
        ("unix socketpair write+read", socket.socketpair()),
        ("loopback TCP send+recv", _tcp_pair()),
    ):
        w, r = pair
        for sock in pair:
            current_pump.tune_socket(sock)
        t0 = time.process_time()
        for _ in range(n):
            w.sendall(data)
            got = 0
            while got < chunk:
                got += r.recv_into(buf)
        rows.append((name, time.process_time() - t0))
        w.close()
        r.close()
    print(f"# floor: {chunk // 1024} KiB chunks, one thread, CPU-s/GiB")
    print("| piece | CPU-s/GiB |\n|---|---|")
    for name, secs in rows:
        print(f"| {name} | {secs / (n * chunk / GIB):.2f} |")


def _records_floor(data: memoryview, buf: bytearray, n: int) -> list[tuple[str, float]]:
    """Seal and open through :mod:`homeport.io.recstream`'s stand-ins, as the pump calls them."""
    from homeport.proto import records

    c2s, _ = records.derive_keys(
        os.urandom(32), os.urandom(32), os.urandom(32), client_fp=bytes(32), server_fp=bytes(32)
    )
    out_a, in_b = recstream._Outgoing(), recstream._Incoming()
    a = recstream.RecordSession(
        records.Sealer(c2s), records.Opener(c2s), recstream._Incoming(), out_a, None
    )
    b = recstream.RecordSession(
        records.Sealer(c2s), records.Opener(c2s), in_b, recstream._Outgoing(), None
    )
    chunk = len(data)
    enc = dec = 0.0
    for _ in range(n):
        t0 = time.process_time()
        a.write(data)
        rec = out_a.read()
        t1 = time.process_time()
        in_b.write(rec)
        with contextlib.suppress(ssl.SSLWantReadError):
            while True:
                b.read(chunk, buf)
        t2 = time.process_time()
        enc += t1 - t0
        dec += t2 - t1
    return [("records (stream/2) seal incl. copy out", enc), ("records (stream/2) open", dec)]


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    w = socket.create_connection(lsock.getsockname())
    r, _ = lsock.accept()
    lsock.close()
    return w, r


def load_pump(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("pump_compare", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pump_micro")
    ap.add_argument("--mib", type=int, default=256, help="bytes per transfer (MiB)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per scenario and pump")
    ap.add_argument("--compare", type=Path, default=None, help="another pump.py to run beside")
    ap.add_argument("--only", default="", help="run only scenarios whose name contains this")
    ap.add_argument("--profile", choices=("A", "B"), default=None)
    ap.add_argument("--floor", action="store_true", help="measure the floor pieces only")
    ap.add_argument("--layers", default="tls,records", help="record layers to compare")
    ap.add_argument("--profile-scenario", type=int, default=2, help="index into SCENARIOS")
    args = ap.parse_args()
    ctx = contexts()
    nbytes = args.mib << 20
    layers = [x for x in args.layers.split(",") if x]
    if args.floor:
        floor(ctx, nbytes)
        return
    if args.profile:
        sc = SCENARIOS[args.profile_scenario]
        mod = load_pump(args.compare) if args.compare else current_pump
        pctx = contexts(records=layers[-1] == "records")
        print(run_once(mod, sc, nbytes, pctx, profile=args.profile))
        return
    mods: list[tuple[str, ModuleType]] = []
    if args.compare:
        mods.append(("before", load_pump(args.compare)))
    mods.append(("now", current_pump))
    ctxs = {layer: contexts(records=layer == "records") for layer in layers}
    pumps = [
        (f"{name} {layer}" if len(mods) > 1 else layer, mod, ctxs[layer])
        for name, mod in mods
        for layer in layers
    ]
    print(f"# pump micro-benchmark: {args.mib} MiB per transfer, median of {args.repeats}")
    print(
        "| scenario | pump / layer | MB/s | A (encrypts) CPU-s/GiB | B (decrypts) CPU-s/GiB "
        "| A polls/GiB | B polls/GiB | rtt p50 µs | rtt p99 µs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for sc in SCENARIOS:
        if args.only and args.only not in sc.name:
            continue
        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in pumps}
        for _ in range(args.repeats):
            for name, mod, pctx in pumps:  # interleaved: all see the same load
                runs[name].append(run_once(mod, sc, nbytes, pctx))
        for name, _, _ in pumps:
            cells = [
                _med(runs[name], key)
                for key in ("MB/s", "A", "B", "A polls", "B polls", "rtt p50 us", "rtt p99 us")
            ]
            print(f"| {sc.name} | {name} | " + " | ".join(cells) + " |", flush=True)


def _med(rows: list[dict[str, float]], key: str) -> str:
    vals = [r[key] for r in rows if key in r]
    if not vals:
        return "-"
    m = statistics.median(vals)
    return f"{m:.0f}" if m >= 100 else f"{m:.2f}"


if __name__ == "__main__":
    main()
