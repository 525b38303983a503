"""Attacks on a real server process, each with a legitimate-traffic or memory assertion.

The server runs as its own process (``tests.hostile_server``) so its memory (psutil RSS) and
its sockets (``/proc/net/tcp``) are measured apart from the attacker's (this process). Each
test is a regression test of one finding in docs/reliability.md ("Hostile input").
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from homeport.crypto import tls
from homeport.io import tlsctx
from homeport.testing.deadline import wait_for
from homeport.wire import control as m
from homeport.wire.frame import HEADER, FrameDecoder
from tests.harness import HOMEPORT, Homeport
from tests.test_e2e_loopback import EchoServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 30.0
#: Reported by the tests that measure (``pytest -s`` shows them; docs/reliability.md).
FIGURES: dict[str, str] = {}


@dataclass
class Srv:
    proc: subprocess.Popen[bytes]
    port: int
    pin: str
    data: Path
    log: Path

    @property
    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def server_process(root: Path, **config: object) -> Iterator[Srv]:
    data = root / "server"
    logf = root / "server.log"
    with open(logf, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.hostile_server", str(data), json.dumps(config)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"server did not start:\n{logf.read_text()}"
        info = json.loads(line)
        yield Srv(proc, int(info["port"]), str(info["pin"]), data, logf)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tcp_table() -> list[tuple[int, int, int, int]]:
    """(local port, remote port, tx_queue, rx_queue) of every IPv4 TCP socket here.

    Without TIME_WAIT (state 06): the kernel's memory of a connection its owner closed first
    (e.g. a server eviction of a client that then closed cleanly), no process holds it."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "06":
            continue
        lport = int(f[1].split(":")[1], 16)
        rport = int(f[2].split(":")[1], 16)
        tx, rx = (int(x, 16) for x in f[4].split(":"))
        rows.append((lport, rport, tx, rx))
    return rows


def server_drained(port: int) -> bool:
    """Whether the server has read every byte sent to ``port`` (no socket has a receive queue)."""
    return all(rx == 0 for lport, _r, _tx, rx in tcp_table() if lport == port)


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether ``sock`` has EOF/reset waiting (without blocking)."""
    r, _, _ = select.select([sock], [], [], 0)
    if not r:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


# -- finding 1: idle-socket flood --------------------------------------------------------------


@pytest.mark.parametrize(
    "sources",
    [("127.0.0.2",), tuple(f"127.0.0.{i}" for i in range(2, 12))],
    ids=["one-source", "ten-sources"],
)
def test_idle_socket_flood_does_not_lock_out_nodes(
    tmp_path: Path, sources: tuple[str, ...]
) -> None:
    """Hold 520 idle sockets (one or ten source addresses); an enrolled agent that reconnects
    during the flood comes back online, and streams through it still open."""
    echo = EchoServer()
    # handshake timeout beyond the test: the attacker's sockets stay unless evicted
    with server_process(tmp_path, handshake_timeout=600.0) as srv:
        hp = Homeport(tmp_path)
        hp.data_dir = srv.data
        hp.server_addr = f"127.0.0.1:{srv.port}"
        try:
            lab = hp.up("labpc", "--expose", f"echo=127.0.0.1:{echo.port}")
            hp.wait_online("labpc", lab)
            laptop = hp.up("laptop")
            hp.wait_online("laptop", laptop)

            flood: list[socket.socket] = []
            for i in range(520):
                s = socket.socket()
                s.bind((sources[i % len(sources)], 0))
                s.connect(("127.0.0.1", srv.port))
                flood.append(s)
            # eviction happened: one source keeps at most its per-source share (64), ten
            # sources together at most the global limit (512)
            limit = 64 if len(sources) == 1 else 512
            wait_for(
                lambda: sum(not closed_by_peer(s) for s in flood) <= limit,
                DEADLINE,
                "the server to evict the flood's oldest sockets",
            )
            # the agent reconnects during the flood (a restart: new process, same identity)
            lab.terminate()
            lab.wait(timeout=10)
            wait_for(lambda: not hp.node_online("labpc"), DEADLINE, "labpc offline")
            lab = hp.up("labpc", "--expose", f"echo=127.0.0.1:{echo.port}")
            hp.wait_online("labpc", lab, timeout=DEADLINE)
            ok = 0
            for i in range(10):
                payload = os.urandom(1000) + bytes([i])
                res = subprocess.run(
                    [*HOMEPORT, "nc", "--state", str(hp.state("laptop")), "labpc", "echo"],
                    input=payload,
                    capture_output=True,
                    timeout=30,
                    env=hp.env,
                )
                ok += res.returncode == 0 and res.stdout == payload
            held = sum(not closed_by_peer(s) for s in flood)
            FIGURES[f"flood-{len(sources)}"] = f"{ok}/10 streams ok, {held} flood sockets held"
            print(f"\nflood from {len(sources)} source(s): {FIGURES[f'flood-{len(sources)}']}")
            assert ok == 10
            assert held > 0, "the flood must still be there while the streams ran"
            for s in flood:
                s.close()
        finally:
            hp.close()
            echo.close()


# -- finding 2: memory per unauthenticated TLS connection --------------------------------------


def _tls(srv: Srv) -> ssl.SSLSocket:
    ctx = tlsctx.control_client_context(None, None)
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE)
    s = ctx.wrap_socket(raw)
    tls.check_pin(s.getpeercert(binary_form=True), srv.pin)
    return s


def test_unauthenticated_tls_connections_cost_little_and_memory_returns(tmp_path: Path) -> None:
    """500 TLS connections each holding a partial frame just under the pre-auth limit: RSS
    grows by far less than the old 1.7 MiB per connection and returns afterwards; a frame
    above the limit is refused before it is buffered."""
    n = 500
    with server_process(tmp_path, handshake_timeout=600.0, idle_timeout=600.0) as srv:
        warm = [_tls(srv) for _ in range(20)]  # allocator and TLS caches warmed up
        for s in warm:
            s.close()
        before = srv.rss
        conns = []
        body = 60_000  # under MAX_PREAUTH_FRAME (64 KiB): legal, never completed
        for _ in range(n):
            s = _tls(srv)
            s.sendall(HEADER.pack(body + 1, m.MsgType.HELLO) + b"x" * (body - 1))
            conns.append(s)
        wait_for(lambda: server_drained(srv.port), DEADLINE, "the server to read every byte")
        during = srv.rss
        # above the limit: refused from the header alone, with an ERROR saying so
        big = _tls(srv)
        big.sendall(HEADER.pack(1024 * 1024, m.MsgType.HELLO))
        dec, err = FrameDecoder(), None
        while err is None:
            data = big.recv(65536)
            assert data, "closed without ERROR"
            for t, b in dec.feed_untrusted(data):
                err = m.decode_untrusted(t, b)
        assert isinstance(err, m.Error) and err.code == "too-large", err
        big.close()
        for s in conns:
            s.close()
        wait_for(
            lambda: sum(1 for lp, *_ in tcp_table() if lp == srv.port) <= 1,
            DEADLINE,
            "the server to close the connections",
        )
        per_conn = (during - before) / n
        # memory returns: within 8 MiB of where it started (trimmed once the flood ended)
        wait_for(lambda: srv.rss - before < 8 * 1048576, DEADLINE, "the server's RSS to return")
        after = srv.rss
        FIGURES["preauth-rss"] = (
            f"before {mib(before)}, during {mib(during)} ({per_conn / 1024:.0f} KiB/conn), "
            f"after {mib(after)}"
        )
        print(f"\n{n} unauthenticated TLS connections: {FIGURES['preauth-rss']}")
        assert per_conn < 256 * 1024, FIGURES["preauth-rss"]
        # the old attack: most of a 1 MiB frame on each of 200 connections; each is refused
        # from its header and aborted after its ERROR, so none of it is held
        base = srv.rss
        flood = []
        for _ in range(200):
            s = _tls(srv)
            with contextlib.suppress(OSError):
                s.sendall(HEADER.pack(1024 * 1024, m.MsgType.HELLO) + b"x" * (1024 * 1024 - 1024))
            flood.append(s)
        wait_for(lambda: server_drained(srv.port), DEADLINE, "the server to read every byte")
        peak = srv.rss
        for s in flood:
            s.close()
        per_big = (peak - base) / len(flood)
        FIGURES["preauth-1mib"] = f"{per_big / 1024:.0f} KiB per connection (was ~1.6 MiB)"
        print(f"200 connections sending 1 MiB frames: {FIGURES['preauth-1mib']}")
        assert per_big < 256 * 1024, FIGURES["preauth-1mib"]


# -- finding 5: a peer's ERROR frame cannot forge a server log line ----------------------------


def test_peer_error_frame_cannot_forge_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from homeport.server.app import start_server_thread
    from homeport.server.service import ServiceConfig

    forged = "x\n2026-12-05 04:00:00 INFO homeport.server: node labpc (n1) removed\x1b[2J"
    caplog.set_level(logging.DEBUG)
    cfg = ServiceConfig(handshake_timeout=5.0)
    with start_server_thread(tmp_path / "srv", config=cfg) as srv:
        ctx = tlsctx.control_client_context(None, None)
        s = ctx.wrap_socket(socket.create_connection((srv.host, srv.port), timeout=DEADLINE))
        s.sendall(m.encode(m.Error(code=forged[:60], message=forged)))

        def logged() -> list[str]:
            return [r.getMessage() for r in caplog.records if "closed (remote:" in r.getMessage()]

        wait_for(lambda: bool(logged()), DEADLINE, "the server to log the peer's ERROR")
        s.close()
        for line in logged():
            assert line.isprintable(), repr(line)
            assert "x\\n2026-12-05" in line


# -- finding 7: relayed streams and agent pumps have TCP keepalive -----------------------------


def _keepalive_sockets(port: int, side: str) -> list[str]:
    """``ss`` lines of established TCP sockets with ``side`` (sport/dport) ``port`` whose
    timer is a keepalive (the kernel probes the peer and errors the socket if it vanished)."""
    out = subprocess.run(
        ["ss", "-tnoH", "state", "established", f"( {side} = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ln for ln in out.splitlines() if "timer:(keepalive" in ln]


def test_relayed_stream_sockets_have_keepalive(tmp_path: Path) -> None:
    echo = EchoServer()
    with server_process(tmp_path) as srv:
        hp = Homeport(tmp_path)
        hp.data_dir = srv.data
        hp.server_addr = f"127.0.0.1:{srv.port}"
        try:
            lab = hp.up("labpc", "--expose", f"echo=127.0.0.1:{echo.port}")
            hp.wait_online("labpc", lab)
            laptop = hp.up("laptop")
            hp.wait_online("laptop", laptop)
            assert _keepalive_sockets(srv.port, "sport") == []  # control links: pings instead
            nc = subprocess.Popen(
                [*HOMEPORT, "nc", "--state", str(hp.state("laptop")), "labpc", "echo"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=hp.env,
            )
            try:
                assert nc.stdin is not None and nc.stdout is not None
                nc.stdin.write(b"ping\n")
                nc.stdin.flush()
                assert nc.stdout.readline() == b"ping\n"  # the stream is up (relayed)
                # both relay ends on the server, both dialled ends (nc, agent) on the nodes
                wait_for(
                    lambda: len(_keepalive_sockets(srv.port, "sport")) >= 2,
                    DEADLINE,
                    "keepalive on the server's two data sockets",
                )
                wait_for(
                    lambda: len(_keepalive_sockets(srv.port, "dport")) >= 2,
                    DEADLINE,
                    "keepalive on the nodes' two data sockets",
                )
            finally:
                nc.kill()
                nc.wait()
        finally:
            hp.close()
            echo.close()


# -- graceful behaviour: SIGTERM drains -----------------------------------------------------------


class _Stream:
    """A ``homeport nc`` stream to an echo service, kept open."""

    def __init__(self, hp: Homeport, state: Path) -> None:
        self.proc = subprocess.Popen(
            [*HOMEPORT, "nc", "--state", str(state), "labpc", "echo"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=hp.env,
        )

    def echo(self, line: bytes) -> bytes:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=DEADLINE)


@pytest.mark.parametrize("who", ["server", "agent"])
def test_sigterm_drains_open_streams_within_the_grace(tmp_path: Path, who: str) -> None:
    """SIGTERM: an open stream keeps working and its end lets the process exit at once; a
    stream that stays open is cut when the grace (DRAIN_GRACE) runs out."""
    import time

    from homeport.agent.runtime import DRAIN_GRACE as AGENT_GRACE
    from homeport.server.service import DRAIN_GRACE as SERVER_GRACE

    grace = SERVER_GRACE if who == "server" else AGENT_GRACE
    echo = EchoServer()
    hp = Homeport(tmp_path)
    try:
        server = hp.start_server(extra=["--relay-only"])
        lab = hp.up("labpc", "--expose", f"echo=127.0.0.1:{echo.port}")
        hp.wait_online("labpc", lab)
        laptop = hp.up("laptop")
        hp.wait_online("laptop", laptop)
        target = server if who == "server" else lab

        short, held = _Stream(hp, hp.state("laptop")), _Stream(hp, hp.state("laptop"))
        assert short.echo(b"one\n") == b"one\n" and held.echo(b"two\n") == b"two\n"
        target.send_signal(15)
        t0 = time.monotonic()
        wait_for(
            lambda: (
                f"draining 2 stream(s) for up to {grace:g}s"
                in hp.log(who if who == "server" else "agent-labpc")
            ),
            DEADLINE,
            "the drain to start",
        )
        assert short.echo(b"after\n") == b"after\n"  # open streams keep working
        assert held.echo(b"after2\n") == b"after2\n"
        assert short.close() == 0
        assert target.poll() is None  # still draining: one stream is open
        code = target.wait(timeout=grace + DEADLINE)
        took = time.monotonic() - t0
        FIGURES[f"drain-{who}"] = f"held stream cut after {took:.1f}s (grace {grace:g}s)"
        print(f"\nSIGTERM {who}: {FIGURES[f'drain-{who}']}")
        assert grace - 0.5 <= took <= grace + 5.0, took
        assert code == 0, hp.log(who if who == "server" else "agent-labpc")  # a clean stop
        held.close()
    finally:
        hp.close()
        echo.close()
