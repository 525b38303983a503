"""The relay's CPU cost of TLS-wrapped data connections (``--tls-data``) against the plain splice.

One run: ``python -m bench.proxy_cost [--mib 256] [--repeats 3] [--write docs/proxy.md]``.
A real ``homeport server`` on loopback and two real agents exposing the same
discard service: ``sink-plain`` (plain data connections) and ``sink-tls``
(``--tls-data on``). Each transfer is a raw stream, ``head -c N /dev/zero |
homeport nc --state CLIENT NODE sink``, nc dialing by itself (no client agent)
with ``HOMEPORT_TLS_DATA`` on or off, so three paths exist:

* **plain**: both data connections plain; the relay splices kernel to kernel;
* **one side wrapped**: the client's data connection carries an outer TLS the
  server terminates (a laptop behind a corporate proxy, the node at home plain);
* **both wrapped**: both sides terminated and re-encrypted by the server.

The figure is the **server process's** CPU (utime + stime from /proc, which
covers every thread: the splice workers and the TLS terminator threads) per GiB
moved, and the transfer's wall-clock throughput. The paths run interleaved,
``--repeats`` times each, against the same server, and the table reports
medians: the noise of a shared machine hits every path alike. nc and the agents
also burn CPU on this machine (their own TLS), so throughput is a whole-system
figure; the CPU column is the relay's alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.harness import HOMEPORT, Homeport, serve_in_threads

TICK = os.sysconf("SC_CLK_TCK")
PATHS = (
    ("plain", "sink-plain", "off"),
    ("one side wrapped", "sink-plain", "on"),
    ("both wrapped", "sink-tls", "on"),
)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _discard(conn: socket.socket) -> None:
    with conn:
        while conn.recv(1 << 20):
            pass


def transfer(
    hp: Homeport, client: Path, node: str, tls: str, mib: int, server_pid: int
) -> tuple[float, float]:
    """One stream of ``mib`` MiB; returns (server CPU-s per GiB, MiB/s)."""
    env = {**hp.env, "HOMEPORT_TLS_DATA": tls}
    cmd = f"head -c {mib * 1024 * 1024} /dev/zero | " + " ".join(
        [*HOMEPORT, "nc", "--state", str(client), node, "sink"]
    )
    cpu0 = cpu_seconds(server_pid)
    t0 = time.monotonic()
    res = subprocess.run(
        ["sh", "-c", cmd], check=False, env=env, capture_output=True, text=True, timeout=600
    )
    wall = time.monotonic() - t0
    cpu = cpu_seconds(server_pid) - cpu0
    if res.returncode != 0:
        raise SystemExit(f"transfer {node} tls={tls} failed: {res.stderr.strip()}")
    return cpu / (mib / 1024), mib / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB per transfer")
    ap.add_argument("--repeats", type=int, default=3, help="runs per path (interleaved)")
    ap.add_argument("--write", metavar="FILE", help="also replace the table in this markdown file")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hp-proxycost-"))
    sink = socket.create_server(("127.0.0.1", 0))
    serve_in_threads(sink, _discard)
    port = sink.getsockname()[1]
    hp = Homeport(root)
    for var in ("HTTPS_PROXY", "https_proxy", "HOMEPORT_PROXY", "HOMEPORT_TLS_DATA"):
        hp.env.pop(var, None)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in PATHS}
    try:
        server = hp.start_server()
        for node, tls in (("sink-plain", "off"), ("sink-tls", "on")):
            proc = hp.up(
                node, "--expose", f"sink=127.0.0.1:{port}", "--relay-only", "--tls-data", tls
            )
            hp.wait_online(node, proc)
        laptop = hp.up("laptop", "--relay-only")
        hp.wait_online("laptop", laptop)
        client = root / "client"
        client.mkdir(mode=0o700)
        for name in ("node.json", "node.key", "node.crt", "ca.crt"):
            shutil.copy2(hp.state("laptop") / name, client / name)
        for _name, node, tls in PATHS:  # warm-up: one small transfer each
            transfer(hp, client, node, tls, 16, server.pid)
        for _ in range(args.repeats):
            for name, node, tls in PATHS:
                results[name].append(transfer(hp, client, node, tls, args.mib, server.pid))
    finally:
        hp.close()
        sink.close()
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(c for c, _ in results["plain"])
    lines = [
        f"Relay CPU, TLS-wrapped vs plain data connections (`python -m bench.proxy_cost "
        f"--mib {args.mib} --repeats {args.repeats}`; loopback, one raw stream of {args.mib} MiB "
        f"per run, medians of {args.repeats}, interleaved):",
        "",
        "| path | server CPU-s/GiB | x plain | throughput MiB/s | runs (CPU-s/GiB) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, _, _ in PATHS:
        cpu = statistics.median(c for c, _ in results[name])
        mbs = statistics.median(t for _, t in results[name])
        runs = ", ".join(f"{c:.2f}" for c, _ in results[name])
        lines.append(f"| {name} | {cpu:.2f} | {cpu / base:.1f} | {mbs:.0f} | {runs} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        _replace_table(Path(args.write), table)
    return 0


BEGIN = "<!-- bench.proxy_cost:begin -->"
END = "<!-- bench.proxy_cost:end -->"


def _replace_table(path: Path, table: str) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
