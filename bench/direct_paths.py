"""Direct path vs relay path, side by side in one run, on loopback.

Run from the repository root::

    python -m bench.direct_paths                 # 512 MiB bulk, 20 set-up runs
    python -m bench.direct_paths --quick         # 64 MiB, 5 set-up runs

One homeport server, an agent ``labpc`` exposing a real sshd, and two client
nodes on the same machine: ``laptop`` (direct paths on) and ``desk``
(``--relay-only``). So the only difference between the two rows of each table
is the path: ``laptop``'s streams go over the punched direct connection
(pinned TLS + the mux, no server involved), ``desk``'s through the server's relay.
Everything runs on 127.0.0.1, which favours the relay (its extra hop costs no
wire time here): what the direct path saves on loopback is the relay's CPU and
one TLS layer, not network latency.

Measured: (1) time from both agents online to the first direct path (one
``ssh labpc true`` over the relay asks for it); (2) bulk ``cat FILE | ssh labpc
'cat > /dev/null'``, paths interleaved; (3) ``ssh labpc true`` set-up, median;
(4) CPU seconds per GiB of every homeport process during (2). Every process
is stopped by PID at the end; the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from homeport.client.ssh import ssh_options
from homeport.testing.sshd import make_sshd

PY = sys.executable
HP = [PY, "-m", "homeport"]
MIB = 1 << 20
GIB = 1 << 30


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _poll(check: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)  # pacing of a poll with a deadline


class Net:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HOMEPORT_")}
        self.data = tmp / "server"
        self.server = ""

    def spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("ab") as logf:
            p = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=self.env
            )
        self.procs.append(p)
        return p

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), capture_output=True, text=True, env=self.env, check=True, **kw
        )

    def key(self) -> str:
        out = self.run([*HP, "keys", "create", "--data", str(self.data)]).stdout
        return out.strip().splitlines()[-1].strip()

    def up(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        return self.spawn(
            f"agent-{name}",
            [*HP, "up", "--state", str(self.tmp / name), "--server", self.server,
             "--authkey", self.key(), "--name", name, *args],
        )  # fmt: skip

    def online(self, name: str) -> bool:
        out = self.run([*HP, "nodes", "list", "--json", "--data", str(self.data)]).stdout
        doc = json.loads(out)
        nodes = doc["nodes"] if isinstance(doc, dict) else doc
        return any(n.get("name") == name and n.get("online") for n in nodes)

    def path(self, node: str, peer: str) -> dict[str, Any]:
        out = self.run([*HP, "status", "--json", "--state", str(self.tmp / node)]).stdout
        for n in json.loads(out)["nodes"]:
            if n["name"] == peer:
                return dict(n.get("path_detail") or {})
        return {}

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _ssh(net: Net, sshd: Any, node: str, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    opts: list[str] = []
    for k, v in ssh_options(net.tmp / node):
        opts += ["-o", f"{k}={v}"]
    argv = ["ssh", "-F", "/dev/null", "-i", str(sshd.client_key), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", *opts, "-l", sshd.user,
            "labpc", *cmd]  # fmt: skip
    return subprocess.run(argv, check=False, capture_output=True, text=True, env=net.env, **kw)


def _cpu(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, p in procs.items():
        t = p.cpu_times()
        out[name] = float(t.user + t.system)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--setup-runs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.size_mib, a.setup_runs, a.repeats = 64, 5, 1
    tmp = Path(tempfile.mkdtemp(prefix="hp-direct-bench-"))
    net = Net(tmp)
    sshd = make_sshd(tmp / "sshd")
    try:
        sshd.start()
        port = _free_port()
        net.server = f"127.0.0.1:{port}"
        srv = net.spawn("server", [*HP, "server", "--data", str(net.data), "--listen", net.server])
        _poll(lambda: srv.poll() is None and _accepts(port), 20, "server")
        lab = net.up("labpc", "--expose", f"ssh=127.0.0.1:{sshd.port}")
        laptop = net.up("laptop")
        desk = net.up("desk", "--relay-only")
        for name in ("labpc", "laptop", "desk"):
            _poll(lambda n=name: net.online(n), 30, f"{name} online")
        # (1) both online -> first direct path (one relayed ssh asks for it)
        t0 = time.monotonic()
        first = _ssh(net, sshd, "laptop", "true", timeout=60)
        assert first.returncode == 0, first.stderr
        _poll(lambda: net.path("laptop", "labpc").get("kind") in ("local", "direct"), 20, "direct")
        to_direct = time.monotonic() - t0
        detail = net.path("laptop", "labpc")
        relay_detail = net.path("desk", "labpc")
        # (2) bulk, interleaved
        data = tmp / "data.bin"
        with data.open("wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(MIB))
        procs = {
            "server": psutil.Process(srv.pid),
            "labpc agent": psutil.Process(lab.pid),
            "laptop agent (direct)": psutil.Process(laptop.pid),
            "desk agent (relay)": psutil.Process(desk.pid),
        }
        bulk: dict[str, list[float]] = {"direct": [], "relay": []}
        cpu: dict[str, dict[str, float]] = {"direct": {}, "relay": {}}
        order = [("direct", "laptop"), ("relay", "desk")]
        for r in range(a.repeats):
            for path, node in order if r % 2 == 0 else order[::-1]:
                before = _cpu(procs)
                with data.open("rb") as f:
                    t = time.monotonic()
                    res = _ssh(net, sshd, node, "cat > /dev/null", stdin=f, timeout=600)
                    dt = time.monotonic() - t
                assert res.returncode == 0, res.stderr
                after = _cpu(procs)
                bulk[path].append(a.size_mib / dt)
                for k in procs:
                    cpu[path][k] = cpu[path].get(k, 0.0) + after[k] - before[k]
        # (3) set-up
        setup: dict[str, list[float]] = {"direct": [], "relay": []}
        for i in range(a.setup_runs + 1):
            for path, node in order:
                t = time.monotonic()
                res = _ssh(net, sshd, node, "true", timeout=60)
                assert res.returncode == 0, res.stderr
                if i:
                    setup[path].append((time.monotonic() - t) * 1000)
        gib = a.size_mib * a.repeats / 1024
        print(f"first direct path after both agents online: {to_direct:.2f} s")
        print(f"  laptop -> labpc: {detail.get('kind')} {detail.get('endpoint')}")
        print(f"  desk -> labpc: relay ({relay_detail.get('reason')})")
        print(f"\nbulk ssh ({a.size_mib} MiB x {a.repeats}), MB/s median:")
        for p in ("direct", "relay"):
            print(f"  {p:7s} {statistics.median(bulk[p]):8.1f}  runs {bulk[p]}")
        ratio = statistics.median(bulk["direct"]) / statistics.median(bulk["relay"])
        print(f"  direct/relay = {ratio:.2f}")
        print(f"\nssh labpc true, median of {a.setup_runs} (ms):")
        for p in ("direct", "relay"):
            print(f"  {p:7s} {statistics.median(setup[p]):8.1f}")
        print("\nCPU-s/GiB during bulk:")
        print(f"  {'party':24s} {'direct':>8s} {'relay':>8s}")
        for k in procs:
            print(f"  {k:24s} {cpu['direct'][k] / gib:8.2f} {cpu['relay'][k] / gib:8.2f}")
        return 0
    finally:
        net.stop()
        sshd.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _accepts(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


if __name__ == "__main__":
    raise SystemExit(main())
