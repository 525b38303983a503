"""Hostile-input figures for docs/reliability.md: the same attacks on two source trees.

``python -m bench.hostile [--base /work/main/src]`` runs each attack against a server
process of the base tree and of this tree, side by side in one run, and prints one
Markdown table: server RSS before / during / after, and for the idle-socket flood how
many of 10 streams (``homeport nc`` through a reconnected agent) succeeded during it.

Attacks (findings 1 and 2 of issue 8):

* ``tls-1mib``: 500 TLS connections, each sending a frame header announcing 1 MiB and
  1 MiB - 1 KiB of it, never the rest (what the pre-auth frame limit refuses);
* ``tls-60kib``: 500 TLS connections each holding a 60 KB partial frame (under the limit);
* ``idle-flood``: 520 idle TCP sockets from one source address while an agent reconnects.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness import HOMEPORT, Homeport  # noqa: E402
from tests.test_e2e_loopback import EchoServer  # noqa: E402

N_TLS = 500
N_IDLE = 520
HEADER_LEN = 5


def mib(n: float) -> str:
    return f"{n / 1048576:.0f} MiB"


@contextlib.contextmanager
def server(tree: Path, root: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, dict[str, str]]]:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{REPO}")
    cfg = json.dumps({"handshake_timeout": 600.0, "idle_timeout": 600.0})
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.hostile_server", str(root / "server"), cfg],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        yield proc, int(info["port"]), env
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def rss(proc: subprocess.Popen[bytes]) -> int:
    return int(psutil.Process(proc.pid).memory_info().rss)


def drained(port: int) -> bool:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and int(f[4].split(":")[1], 16):
            return False
    return True


def settle(pred: object, limit: float) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end and not pred():  # type: ignore[operator]
        time.sleep(0.1)


def tls_attack(tree: Path, announce: int, send: int) -> tuple[int, int, int]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["homeport-control/1"])
    with tempfile.TemporaryDirectory() as d, server(tree, Path(d)) as (proc, port, _env):
        for _ in range(20):
            ctx.wrap_socket(socket.create_connection(("127.0.0.1", port))).close()
        time.sleep(1.0)
        before = rss(proc)
        conns = []
        for _ in range(N_TLS):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))
            with contextlib.suppress(OSError):
                s.sendall((announce).to_bytes(4, "big") + b"\x01" + b"x" * send)
            conns.append(s)
        settle(lambda: drained(port), 30)
        time.sleep(1.0)
        during = rss(proc)
        for s in conns:
            s.close()
        time.sleep(5.0)  # the server's sweep trims within a second
        after = rss(proc)
        return before, during, after


def flood(tree: Path) -> tuple[int, int]:
    echo = EchoServer()
    with tempfile.TemporaryDirectory() as d, server(tree, Path(d)) as (_proc, port, env):
        hp = Homeport(Path(d))
        hp.env.update(env)
        hp.data_dir = Path(d) / "server"
        hp.server_addr = f"127.0.0.1:{port}"
        try:
            lab = hp.up("labpc", "--expose", f"echo=127.0.0.1:{echo.port}")
            hp.wait_online("labpc", lab)
            hp.wait_online("laptop", hp.up("laptop"))
            socks = []
            for _ in range(N_IDLE):
                s = socket.socket()
                s.bind(("127.0.0.2", 0))
                s.connect(("127.0.0.1", port))
                socks.append(s)
            time.sleep(1.0)
            lab.terminate()
            lab.wait(timeout=10)
            lab = hp.up("labpc", "--expose", f"echo=127.0.0.1:{echo.port}")
            with contextlib.suppress(AssertionError):
                hp.wait_online("labpc", lab, timeout=15)
            ok = 0
            for i in range(10):
                payload = os.urandom(100) + bytes([i])
                res = subprocess.run(
                    [*HOMEPORT, "nc", "--state", str(hp.state("laptop")), "labpc", "echo"],
                    input=payload,
                    check=False,
                    capture_output=True,
                    timeout=30,
                    env=hp.env,
                )
                ok += res.returncode == 0 and res.stdout == payload
            for s in socks:
                s.close()
            return ok, 10
        finally:
            hp.close()
            echo.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", default="/work/main/src", help="the tree to compare with ('': none)")
    ap.add_argument("--no-flood", action="store_true", help="only the memory attacks")
    args = ap.parse_args()
    trees = {"base": Path(args.base), "this": REPO / "src"} if args.base else {"this": REPO / "src"}
    rows = []
    for attack, announce, send in (
        ("tls-1mib", 1 << 20, (1 << 20) - 1024),
        ("tls-60kib", 60_001, 59_999),
    ):
        for label, tree in trees.items():
            b, du, a = tls_attack(tree, announce, send)
            rows.append(
                f"| {attack} x{N_TLS} | {label} | {mib(b)} | {mib(du)} | {mib(a)} | "
                f"{(du - b) / N_TLS / 1024:.0f} KiB | - |"
            )
    for label, tree in trees.items() if not args.no_flood else ():
        ok, n = flood(tree)
        rows.append(f"| idle-flood x{N_IDLE} (one source) | {label} | - | - | - | - | {ok}/{n} |")
    print("| attack | tree | RSS before | during | after | per connection | streams ok during |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
