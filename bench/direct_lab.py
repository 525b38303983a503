"""Direct path against relay, in the cone-NAT namespace lab, in one run (needs root).

Run from the repository root::

    python -m bench.direct_lab                       # 256 MiB x 3, 15 set-up runs
    python -m bench.direct_lab --quick               # 64 MiB x 1, 5 set-up runs
    python -m bench.direct_lab --write docs/benchmarks.md   # (re)write its own section

The lab (:class:`homeport.testing.natlab.Lab`): the server on 203.0.113.10
(main port 7000, whoami probe port 7001); ``labpc`` behind the endpoint-
independent NAT ``rt_cone1`` with a real sshd on its loopback; behind
``rt_cone2`` two agents on one laptop: ``laptop`` (direct paths on, direct port
41641) and ``laptop-r`` (``--relay-only``). The same ssh, the same sshd, the same
NATs: only the path differs, and the two are measured interleaved (rotating who
goes first), so their ratio is honest on a noisy 2-core machine.

Measured:

1. time from both agents online (the laptop's agent lists labpc) to the direct
   path being up and to the first stream that went direct (a stream at "online"
   asks for the path; then ``ssh labpc true`` until the direct counter moves);
2. ``ssh labpc true`` wall time, direct vs relay (median of N);
3. ``cat FILE | ssh labpc 'cat > /dev/null'`` MB/s, direct vs relay, with the
   CPU seconds per GiB of each homeport party (labpc's agent, the laptop side's
   agent, the server) from psutil before/after.

Each run checks its own path: the laptop agent's ``streams_direct`` counter must
move on a direct run, the relay-only agent's path must say relay. Every process
is stopped by PID, every namespace deleted by name on exit.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from homeport.testing.deadline import Deadline, wait_for
from homeport.testing.natlab import (
    DIRECT_PORT,
    SERVER_IP,
    SERVER_MAIN_PORT,
    SERVER_PROBE_PORT,
    Lab,
    natlab_available,
)
from homeport.testing.sshd import make_sshd

PY = sys.executable
HP = [PY, "-m", "homeport"]
MIB = 1 << 20
GIB = 1 << 30
#: Markers around this benchmark's section of docs/benchmarks.md (rewritten in place).
BEGIN = "<!-- bench.direct_lab: begin -->"
END = "<!-- bench.direct_lab: end -->"
DIRECT, RELAY = "direct", "relay"


def log(msg: str) -> None:
    print(f"[direct_lab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Series:
    values: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def cpu_median(self, key: str) -> float:
        got = self.cpu.get(key, [])
        return statistics.median(got) if got else float("nan")


@dataclass
class Bench:
    lab: Lab
    tmp: Path
    env: dict[str, str]
    procs: dict[str, psutil.Process] = field(default_factory=dict)
    popens: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    def state(self, name: str) -> Path:
        return self.tmp / f"state-{name}"

    def spawn(self, ns: str, name: str, argv: list[str]) -> None:
        logf = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = self.lab.popen(
            ns, argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
        )
        logf.close()
        self.popens[name] = proc
        self.procs[name] = psutil.Process(proc.pid)  # ip netns exec execs: this is python

    def check_alive(self) -> None:
        for name, proc in self.popens.items():
            if proc.poll() is not None:
                tail = (self.tmp / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{tail}")

    def status(self, agent: str) -> dict[str, Any]:
        """The agent's own path view (the local API query ``homeport status --json`` reads)."""
        from homeport.io.localapi import query

        got = query(self.state(agent), "status", timeout=5.0)
        if got is None:
            raise RuntimeError(f"no agent answers in {self.state(agent)}")
        return dict(got)

    def peer(self, agent: str, peer: str) -> dict[str, Any] | None:
        for p in self.status(agent).get("peers", []):
            if p.get("name") == peer:
                return dict(p)
        return None

    def ssh_argv(self, via: str, *cmd: str) -> list[str]:
        return self.lab.cmd("laptop", ["ssh", "-F", str(self.tmp / f"ssh_config-{via}"), "labpc",
                                       *cmd])  # fmt: skip


def build(b: Bench, sshd_port: int) -> None:
    lab = b.lab
    data = b.tmp / "server"
    b.spawn("server", "server", [*HP, "server", "--data", str(data), "--listen",
                                 f"{SERVER_IP}:{SERVER_MAIN_PORT}", "--probe-port",
                                 str(SERVER_PROBE_PORT)])  # fmt: skip

    def server_up() -> bool:
        b.check_alive()
        return lab.can_connect("laptop", SERVER_IP, SERVER_PROBE_PORT, 0.5)

    wait_for(server_up, 30, "the server", interval=0.1)
    key = subprocess.run(
        [*HP, "keys", "create", "--data", str(data), "--reusable"],
        capture_output=True, text=True, check=True, env=b.env,
    ).stdout.strip()  # fmt: skip
    (b.tmp / "authkey").write_text(key + "\n")
    common = ["--server", f"{SERVER_IP}:{SERVER_MAIN_PORT}", "--authkey-file",
              str(b.tmp / "authkey")]  # fmt: skip
    # The relay-only laptop agent first and online before the measured pair starts.
    b.spawn("laptop", "laptop-r", [*HP, "up", "--state", str(b.state("laptop-r")), *common,
                                   "--name", "laptop-r", "--relay-only"])  # fmt: skip
    wait_for(lambda: _answers(b, "laptop-r"), 30, "laptop-r's agent", interval=0.05)


def _answers(b: Bench, agent: str) -> bool:
    b.check_alive()
    try:
        b.status(agent)
    except (OSError, RuntimeError, ValueError):
        return False
    return True


def start_pair(b: Bench, sshd_port: int) -> dict[str, float]:
    """Start labpc and laptop together; seconds from both online to direct path / stream."""
    common = ["--server", f"{SERVER_IP}:{SERVER_MAIN_PORT}", "--authkey-file",
              str(b.tmp / "authkey"), "--direct-port", str(DIRECT_PORT)]  # fmt: skip
    b.spawn("labpc", "labpc", [*HP, "up", "--state", str(b.state("labpc")), *common, "--name",
                               "labpc", "--expose", f"ssh=127.0.0.1:{sshd_port}"])  # fmt: skip
    b.spawn("laptop", "laptop", [*HP, "up", "--state", str(b.state("laptop")), *common,
                                 "--name", "laptop"])  # fmt: skip

    def both_online() -> bool:
        if not _answers(b, "laptop"):
            return False
        p = b.peer("laptop", "labpc")
        return p is not None and bool(p.get("online"))

    wait_for(both_online, 60, "labpc and laptop online", interval=0.02)
    t0 = time.monotonic()
    first = subprocess.Popen(b.ssh_argv(DIRECT, "true"), env=b.env, stderr=subprocess.PIPE)

    def path_up() -> bool:
        if first.poll() not in (None, 0):
            raise RuntimeError(f"the first ssh failed: {first.communicate()[1]!r}")
        p = b.peer("laptop", "labpc")
        return p is not None and p.get("kind") == DIRECT

    wait_for(path_up, 30, "the direct path", interval=0.02)
    t_path = time.monotonic() - t0
    first.wait(timeout=60)
    clock = Deadline(30)
    while True:
        run = subprocess.run(
            b.ssh_argv(DIRECT, "true"), env=b.env, capture_output=True, check=False
        )
        p = b.peer("laptop", "labpc") or {}
        if run.returncode == 0 and int(p.get("streams_direct", 0)) >= 1:
            break
        if clock.expired():
            raise RuntimeError(f"no direct stream within 30 s: {p}")
    return {"path_up": t_path, "first_direct_stream": time.monotonic() - t0}


def write_ssh_configs(b: Bench, user: str, key: Path) -> None:
    """The laptop user's ssh config per path: the Host block ``homeport ssh-config`` prints."""
    from homeport.client.ssh import ssh_config_block

    for via, agent in ((DIRECT, "laptop"), (RELAY, "laptop-r")):
        block = ssh_config_block(["labpc"], b.state(agent))
        (b.tmp / f"ssh_config-{via}").write_text(
            f"Host labpc\n    User {user}\n    IdentityFile {key}\n    IdentitiesOnly yes\n"
            "    BatchMode yes\n    LogLevel ERROR\n" + block
        )


def counters(b: Bench, via: str) -> tuple[str, int]:
    p = b.peer("laptop" if via == DIRECT else "laptop-r", "labpc") or {}
    return str(p.get("kind", "?")), int(p.get("streams_direct", 0))


def timed(b: Bench, via: str, argv: list[str], **kw: Any) -> float:
    """Run one ssh and check it took ``via``'s path; wall seconds."""
    kind0, direct0 = counters(b, via)
    t = time.perf_counter()
    subprocess.run(argv, env=b.env, check=True, capture_output=True, timeout=600, **kw)
    wall = time.perf_counter() - t
    kind1, direct1 = counters(b, via)
    if via == DIRECT and not (kind1 == DIRECT and direct1 > direct0):
        raise RuntimeError(
            f"a 'direct' run did not go direct: {kind0}/{direct0} -> {kind1}/{direct1}"
        )
    if via == RELAY and kind1 != RELAY:
        raise RuntimeError(f"a 'relay' run reports path {kind1}")
    return wall


def bulk(b: Bench, via: str, data: Path, size: int, series: Series) -> None:
    watch = {"labpc agent": b.procs["labpc"], "laptop agent": b.procs[
        "laptop" if via == DIRECT else "laptop-r"], "server": b.procs["server"]}  # fmt: skip
    before = {k: _cpu(p) for k, p in watch.items()}
    with data.open("rb") as f:
        wall = timed(b, via, b.ssh_argv(via, "cat > /dev/null"), stdin=f)
    after = {k: _cpu(p) for k, p in watch.items()}
    series.values.append(size / wall / 1e6)
    for k in watch:
        series.cpu.setdefault(k, []).append((after[k] - before[k]) / (size / GIB))


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def rotated(i: int) -> list[str]:
    return [DIRECT, RELAY] if i % 2 == 0 else [RELAY, DIRECT]


def render(res: dict[str, Any]) -> str:
    bulk_s: dict[str, Series] = res["bulk"]
    setup: dict[str, Series] = res["setup"]
    d, r = bulk_s[DIRECT], bulk_s[RELAY]
    lines = [
        BEGIN,
        "## Direct paths against the relay: the cone-NAT lab (issue 6)",
        "",
        f"`python -m bench.direct_lab{' --quick' if res['quick'] else ''}`, {res['when']}, "
        f"{res['machine']}. Namespace lab: server 203.0.113.10 (main 7000, probe 7001), `labpc`"
        " behind EIM NAT `rt_cone1`, the laptop behind EIM NAT `rt_cone2` with two agents:",
        "`laptop` (direct paths, port 41641) and `laptop-r` (`--relay-only`). Same ssh, sshd and"
        " NATs; runs interleaved, each run checked to have taken its path (the `streams_direct`"
        " counter moved, or the path said relay).",
        "",
        "| measure | direct | relay | direct / relay | target |",
        "|---|---|---|---|---|",
        f"| ssh bulk MB/s (median of {len(d.values)}, {res['size_mib']} MiB) | {d.median():.0f} |"
        f" {r.median():.0f} | {d.median() / r.median():.2f} | direct ≥ relay |",
        f"| `ssh labpc true` ms (median of {len(setup[DIRECT].values)}) |"
        f" {setup[DIRECT].median() * 1000:.0f} | {setup[RELAY].median() * 1000:.0f} |"
        f" {setup[DIRECT].median() / setup[RELAY].median():.2f} | direct ≤ relay |",
        f"| floor: `ssh true` to the same sshd from its own host, no homeport |"
        f" {setup['floor'].median() * 1000:.0f} | | | |",
    ]
    for party in ("labpc agent", "laptop agent", "server"):
        lines.append(
            f"| CPU-s/GiB on ssh bulk: {party} | {d.cpu_median(party):.2f} |"
            f" {r.cpu_median(party):.2f} | — | — |"
        )
    t = res["first"]
    lines += [
        f"| both agents online → direct path up | {t['path_up']:.2f} s | — | — | ≤ 2 s |",
        f"| both agents online → first `ssh labpc true` that went direct, done |"
        f" {t['first_direct_stream']:.2f} s | — | — | — |",
        "",
        "Per run (MB/s): direct "
        + ", ".join(f"{v:.0f}" for v in d.values)
        + "; relay "
        + ", ".join(f"{v:.0f}" for v in r.values)
        + ".",
        '"Both online" is the moment the laptop\'s agent lists labpc as a peer; at that'
        " moment one `ssh labpc true` starts (on the relay, as every first stream does) and"
        " asks for the path; the next `ssh labpc true` after it finished is the first direct"
        " stream (so that row includes two whole ssh sessions). The server's CPU on a direct"
        " run is its idle cost. The `ssh true` floor is mostly ssh, sshd and the login"
        " shell; the rows above it add `ip netns exec`, the ProxyCommand and homeport.",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    doc = path.read_text() if path.exists() else ""
    pat = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    doc = pat.sub(lambda _m: text, doc) if pat.search(doc) else doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--setup-runs", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="64 MiB x 1, 5 set-up runs")
    ap.add_argument("--write", type=Path, help="(re)write this benchmark's section of FILE")
    args = ap.parse_args(argv)
    if args.quick:
        args.size_mib, args.repeats, args.setup_runs = 64, 1, 5
    ok, why = natlab_available()
    if not ok:
        print(f"bench.direct_lab: NAT lab unavailable: {why}", file=sys.stderr)
        return 2
    size = args.size_mib * MIB
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMEPORT_")}
    env["PYTHONUNBUFFERED"] = "1"
    with tempfile.TemporaryDirectory(prefix="hp-direct-lab-") as tmp_s, Lab() as lab:
        tmp = Path(tmp_s)
        lab.internet()
        lab.router("rt_cone1", wan_ip="203.0.113.21", lan="10.20.1.1/24", nat="eim")
        lab.host("labpc", "rt_cone1", "10.20.1.2")
        lab.router("rt_cone2", wan_ip="203.0.113.22", lan="10.20.2.1/24", nat="eim")
        lab.host("laptop", "rt_cone2", "10.20.2.2")
        sshd = make_sshd(tmp / "sshd", netns=lab.ns("labpc"))
        sshd.start()
        b = Bench(lab, tmp, env)
        try:
            build(b, sshd.port)
            write_ssh_configs(b, sshd.user, sshd.client_key)
            first = start_pair(b, sshd.port)
            log(f"online -> path up {first['path_up']:.2f}s, first direct stream "
                f"{first['first_direct_stream']:.2f}s")  # fmt: skip
            data = tmp / "bulk.bin"
            with data.open("wb") as f:
                for _ in range(args.size_mib):
                    f.write(os.urandom(MIB))
            setup = {DIRECT: Series(), RELAY: Series()}
            for via in (DIRECT, RELAY):  # warm-up (known_hosts, page cache)
                timed(b, via, b.ssh_argv(via, "true"))
            for i in range(args.setup_runs):
                for via in rotated(i):
                    setup[via].values.append(timed(b, via, b.ssh_argv(via, "true")))
            floor = Series()
            floor_argv = lab.cmd("labpc", [*sshd.ssh_base_args(), "-p", str(sshd.port),
                                           "127.0.0.1", "true"])  # fmt: skip
            for _ in range(args.setup_runs):
                t = time.perf_counter()
                subprocess.run(floor_argv, env=env, check=True, capture_output=True, timeout=60)
                floor.values.append(time.perf_counter() - t)
            setup["floor"] = floor
            log("ssh true ms: " + ", ".join(f"{v}={setup[v].median() * 1000:.0f}" for v in setup))
            bulk_s = {DIRECT: Series(), RELAY: Series()}
            for i in range(args.repeats):
                for via in rotated(i):
                    bulk(b, via, data, size, bulk_s[via])
                    cpu = {k: round(v[-1], 2) for k, v in bulk_s[via].cpu.items()}
                    log(f"bulk {via} run {i + 1}: {bulk_s[via].values[-1]:.0f} MB/s {cpu}")
        finally:
            for proc in reversed(list(b.popens.values())):
                lab.stop(proc)
            sshd.stop()
    res = {
        "quick": args.quick,
        "size_mib": args.size_mib,
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "first": first,
        "setup": setup,
        "bulk": bulk_s,
    }
    text = render(res)
    print(text)
    if args.write:
        write_section(args.write, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
