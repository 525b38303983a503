"""Where the server's memory per idle agent goes: tracemalloc and RSS across N idle agents.

Runs the real server under tracemalloc (``bench._traced_server``), takes a snapshot with
no agents and one with N idle agents connected (the fleet benchmark's simulated agents:
real TLS, real certificates, the node core), and prints per idle agent: RSS, what Python
allocators hold (tracemalloc: every ``PyMem``/``PyObject`` allocation, uvloop's raw buffers
included) grouped by where it was allocated, the rest (native: OpenSSL, libc), and live
objects by type. tracemalloc's own bookkeeping inflates RSS, so the per-agent RSS of
``bench.fleet`` (no tracing) is the figure to quote; this shows where it goes.

Run: ``python -m bench.fleet_memory --agents 1000``; ``--variants [--base DIR]`` compares
server variants (``VARIANTS``) one after the other in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench import fleet
from homeport.io import tlsctx
from homeport.io.loop import new_event_loop
from homeport.testing.deadline import wait_for

#: Where an allocation is attributed when its innermost frame is in one of these files.
GROUPS = (
    ("uvloop", "uvloop"),
    ("asyncio", "asyncio/"),
    ("ssl.py", "/ssl.py"),
    ("io/control.py", "homeport/io/control.py"),
    ("proto/control.py", "homeport/proto/control.py"),
    ("proto/coord.py", "homeport/proto/coord.py"),
    ("proto/netmap.py", "homeport/proto/netmap.py"),
    ("server/service.py", "homeport/server/service.py"),
    ("wire", "homeport/wire/"),
)


#: Server variants compared by ``--variants`` (environment of the server process); the
#: first runs the code of ``--base`` (a checkout of an earlier commit) when it is given.
VARIANTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("--base: uvloop TLS (ssl=), 2 TLS 1.3 tickets per handshake", {"HP_BASE": "1"}),
    ("TLS over memory BIOs, 2 tickets per handshake (as before)", {"HP_TICKETS": "2"}),
    ("TLS over memory BIOs, no tickets (this tree)", {}),
    ("this tree, glibc mmap threshold pinned at 128 KiB", {"MALLOC_MMAP_THRESHOLD_": "131072"}),
)


def _group(filename: str) -> str:
    for name, part in GROUPS:
        if part in filename:
            return name
    return "other: " + "/".join(filename.split("/")[-2:])


def _smaps(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


async def rss_per_agent(
    agents: int, root: Path, log: Any, env: dict[str, str], base: Path | None = None
) -> dict[str, float]:
    """One untraced server with ``env``: RSS (and its heap part) per idle agent after a
    ramp, then again after one glibc ``malloc_trim(0)`` in the server (and how long it took).
    ``HP_BASE`` in ``env``: the server runs the code of ``base`` (its ``src`` first on the path).
    """
    loop = asyncio.get_running_loop()
    names = [f"fleet-{i:05d}" for i in range(agents)]
    members, pin = fleet.create_fleet(root / "server", root / "keys", names)
    port = fleet.free_port()
    path = str(Path.cwd())
    if "HP_BASE" in env:
        assert base is not None
        path = f"{base / 'src'}:{path}"
    trim_out = root / "trim"
    srv = fleet.ServerProc(
        root / "server",
        port,
        root / "server.log",
        runner=("-m", "bench._traced_server"),
        env_extra={"PYTHONPATH": path, "HP_TRIM_OUT": str(trim_out), **env},
    )
    fl = fleet.Fleet("127.0.0.1", port, pin, f"127.0.0.1:{port}", loop)
    try:
        await loop.run_in_executor(
            None, lambda: wait_for(lambda: fleet._accepts(port), 180, "the server")
        )
        for mb in members:
            fl.contexts[mb.name] = tlsctx.control_client_context(mb.pem, mb.pem)
        fl.agents = [fleet.SimAgent(fl, i, mb, observer=False) for i, mb in enumerate(members)]
        await asyncio.sleep(1.0)
        rss0, heap0 = _smaps(srv.proc.pid)["Rss"], _heap(srv.proc.pid)
        await fleet._ramp(fl, fl.agents)
        online = fl.online()
        await asyncio.sleep(8.0)  # full maps drained, keepalives only
        rss1, heap1 = _smaps(srv.proc.pid)["Rss"], _heap(srv.proc.pid)
        load = os.getloadavg()[0]
        os.kill(srv.proc.pid, signal.SIGUSR1)
        trim_file = Path(f"{trim_out}.trim")
        await loop.run_in_executor(None, lambda: wait_for(trim_file.exists, 60, "malloc_trim"))
        trim_s = float(trim_file.read_text())
        rss2 = _smaps(srv.proc.pid)["Rss"]
        online = min(online, fl.online())
    finally:
        fl.closing = True
        for a in fl.agents:
            if a.link is not None:
                a.link.abort("bench over")
        srv.stop()
    n = max(1, online)
    got = {
        "online": online,
        "rss_kib": (rss1 - rss0) / n / 1024,
        "heap_kib": (heap1 - heap0) / n / 1024,
        "other_kib": ((rss1 - heap1) - (rss0 - heap0)) / n / 1024,
        "trimmed_kib": (rss2 - rss0) / n / 1024,
        "trim_ms": trim_s * 1000,
        "rss_mib": rss1 / 1048576,
        "load": load,
    }
    log(f"{env}: {got}")
    return got


def _heap(pid: int) -> int:
    """Resident bytes of the main [heap] mapping (brk); the rest is mmapped."""
    total = 0
    with open(f"/proc/{pid}/smaps") as f:
        in_heap = False
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                in_heap = line.rstrip().endswith("[heap]")
            elif in_heap and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


async def measure(agents: int, root: Path, log: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    names = [f"fleet-{i:05d}" for i in range(agents)]
    members, pin = fleet.create_fleet(root / "server", root / "keys", names)
    port = fleet.free_port()
    trace = root / "trace"
    srv = fleet.ServerProc(
        root / "server",
        port,
        root / "server.log",
        runner=("-m", "bench._traced_server"),
        env_extra={"HP_TRACE_OUT": str(trace), "PYTHONPATH": str(Path.cwd())},
    )
    fl = fleet.Fleet("127.0.0.1", port, pin, f"127.0.0.1:{port}", loop)
    snaps = 0

    async def snapshot() -> tuple[tracemalloc.Snapshot, dict[str, int], dict[str, int]]:
        nonlocal snaps
        snaps += 1
        done = Path(f"{trace}.{snaps}.done")
        os.kill(srv.proc.pid, signal.SIGUSR2)
        await loop.run_in_executor(None, lambda: wait_for(done.exists, 120, "snapshot"))
        rss = _smaps(srv.proc.pid)
        types = json.loads(Path(f"{trace}.{snaps}.types").read_text())
        return tracemalloc.Snapshot.load(f"{trace}.{snaps}"), rss, types

    try:
        await loop.run_in_executor(
            None, lambda: wait_for(lambda: fleet._accepts(port), 180, "the traced server")
        )
        for mb in members:
            fl.contexts[mb.name] = tlsctx.control_client_context(mb.pem, mb.pem)
        fl.agents = [fleet.SimAgent(fl, i, mb, observer=False) for i, mb in enumerate(members)]
        await asyncio.sleep(1.0)
        s0, rss0, types0 = await snapshot()
        t0 = time.perf_counter()
        await fleet._ramp(fl, fl.agents)
        online = fl.online()
        log(f"{online} online after {time.perf_counter() - t0:.1f} s; settling")
        await asyncio.sleep(8.0)  # full maps drained, keepalives only
        s1, rss1, types1 = await snapshot()
    finally:
        fl.closing = True
        for a in fl.agents:
            if a.link is not None:
                a.link.abort("bench over")
        srv.stop()
    by_group: dict[str, int] = {}
    for st in s1.compare_to(s0, "filename"):
        g = _group(st.traceback[0].filename)
        by_group[g] = by_group.get(g, 0) + st.size_diff
    lines = [
        (st.size_diff, st.count_diff, str(st.traceback[0]))
        for st in s1.compare_to(s0, "lineno")[:25]
    ]
    tb = [
        (st.size_diff, st.count_diff, [str(f) for f in st.traceback])
        for st in s1.compare_to(s0, "traceback")[:12]
    ]
    traced = sum(st.size_diff for st in s1.compare_to(s0, "filename"))
    type_diff = sorted(
        ((k, v - types0.get(k, 0)) for k, v in types1.items()), key=lambda kv: -kv[1]
    )[:20]
    return {
        "agents": online,
        "rss": {k: rss1.get(k, 0) - rss0.get(k, 0) for k in ("Rss", "Anonymous", "Private_Dirty")},
        "traced": traced,
        "groups": by_group,
        "lines": lines,
        "tracebacks": tb,
        "types": type_diff,
    }


def report(fig: dict[str, Any]) -> str:
    n = max(1, fig["agents"])
    rss = fig["rss"]["Rss"]
    out = [f"{fig['agents']} idle agents; per agent (under tracemalloc: RSS includes its traces)"]
    out.append("| part | KiB per agent |")
    out.append("|---|---|")
    out.append(f"| RSS growth | {rss / n / 1024:.1f} |")
    out.append(f"| Python allocators (tracemalloc), all | {fig['traced'] / n / 1024:.1f} |")
    for g, size in sorted(fig["groups"].items(), key=lambda kv: -kv[1])[:12]:
        out.append(f"|   {g} | {size / n / 1024:.2f} |")
    out.append(
        f"| rest (native: OpenSSL, libc; plus traces) | {(rss - fig['traced']) / n / 1024:.1f} |"
    )
    out.append("")
    out.append("top lines (bytes per agent, objects per agent):")
    for size, count, where in fig["lines"]:
        out.append(f"  {size / n:9.0f} B {count / n:6.2f}  {where}")
    out.append("")
    out.append("live objects per agent by type:")
    for name, count in fig["types"]:
        out.append(f"  {count / n:6.2f} {name}")
    out.append("")
    out.append("top tracebacks:")
    for size, _count, frames in fig["tracebacks"]:
        out.append(f"  {size / n:9.0f} B  " + " <- ".join(reversed(frames[-4:])))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--variants",
        action="store_true",
        help="no tracing: RSS per agent of server variants side by side, one after the other",
    )
    p.add_argument(
        "--base",
        type=Path,
        help="with --variants: also run the server from this checkout (e.g. a git worktree "
        "of the previous main) as the first variant",
    )
    args = p.parse_args(argv)
    fleet.raise_nofile()
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    if args.variants:
        rows = []
        for name, env in VARIANTS:
            if "HP_BASE" in env and args.base is None:
                continue
            with (
                tempfile.TemporaryDirectory(prefix="hp-fleetmem-") as tmp,
                asyncio.Runner(loop_factory=new_event_loop) as runner,
            ):
                got = runner.run(rss_per_agent(args.agents, Path(tmp), log, env, args.base))
            rows.append(
                f"| {name} | {got['online']} | {got['rss_kib']:.1f} | {got['heap_kib']:.1f} | "
                f"{got['other_kib']:.1f} | {got['trimmed_kib']:.1f} ({got['trim_ms']:.1f} ms) | "
                f"{got['rss_mib']:.0f} | {got['load']:.1f} |"
            )
        sys.stdout.write(
            "| server variant | agents | RSS KiB/agent | [heap] | mmapped | after one "
            "malloc_trim (its time) | server RSS MiB | load avg |\n"
            + "|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows)
            + "\n"
        )
        return 0
    with (
        tempfile.TemporaryDirectory(prefix="hp-fleetmem-") as tmp,
        asyncio.Runner(loop_factory=new_event_loop) as runner,
    ):
        fig = runner.run(measure(args.agents, Path(tmp), log))
    sys.stdout.write(report(fig))
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
