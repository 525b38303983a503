"""The report of :mod:`bench.ssh_paths`: targets, tables, machine facts, markdown."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import os
import platform
import shlex
import socket
import ssl
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lab import (
    BANNER,
    DASH,
    DIRECT,
    GIB,
    HOMEPORT,
    HOMEPORT_CPU,
    HP_OVERRIDE,
    MIB,
    MINUS,
    PATHS,
    PY,
    REPO,
    RTUN,
    T_BULK_VS_DIRECT,
    T_BULK_VS_RTUN,
    T_END_CPU,
    T_NC_OVERHEAD_MS,
    T_RAW_VS_SSH_L,
    T_RELAY_CPU,
    T_SETUP_VS_DIRECT,
    Lab,
    X,
)
from bench.phases import ECHO_ROUNDS, ForeignLoad, Results, Series, fmt_stat, series_from_json

# --------------------------------------------------------------------------- report


def fmt_cpu(series: Series, key: str) -> str:
    if series.error:
        return DASH
    vals = series.cpu.get(key)
    if not vals:
        return DASH
    return f"{statistics.median(vals):.2f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class Target:
    what: str
    measured: str
    goal: str
    passed: bool | None  # None: could not be measured

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "MISS (not measured)"
        return "PASS" if self.passed else "MISS"


#: (party, key in the bulk series, key in the raw-stream series, target CPU-s/GiB).
#: A tuple of keys is summed (the client end of ssh is the laptop agent plus nc).
PARTIES: list[tuple[str, tuple[str, ...], tuple[str, ...], float | None]] = [
    ("ssh (client)", ("ssh",), (), None),
    ("sshd (session + remote cat)", ("sshd",), (), None),
    ("client end: laptop agent + nc / homeport forward", ("laptop agent", "nc"), ("forward",), 0.8),
    ("relay (server)", ("server",), ("server",), 0.3),
    ("target agent", ("agent",), ("agent",), 0.8),
]


def party_cpu(series: Series | None, keys: Sequence[str]) -> float | None:
    """Median over runs of the summed CPU-s/GiB of ``keys`` (None if any is missing)."""
    if series is None or not series.ok or not keys:
        return None
    cols = [series.cpu.get(k) for k in keys]
    if any(not c for c in cols):
        return None
    runs = min(len(c) for c in cols if c)
    return statistics.median(sum(c[i] for c in cols if c) for i in range(runs))


def fmt_num(val: float | None) -> str:
    return DASH if val is None else f"{val:.2f}"


def party_table(res: Results, before: dict[str, Any] | None) -> str:
    """CPU-s/GiB per party, ssh bulk and raw stream, next to the targets (and a baseline)."""
    bulk, raw = res.bulk.get(HOMEPORT), res.raw.get("forward")
    old_bulk = old_raw = None
    if before is not None:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            old_bulk = series_from_json(before["bulk"][HOMEPORT])
        with contextlib.suppress(KeyError, TypeError, ValueError):
            old_raw = series_from_json(before["raw"]["forward"])
    direct = res.bulk.get(DIRECT)
    rows = []
    for party, bkeys, rkeys, goal in PARTIES:
        row = [party]
        if before is not None:
            row.append(fmt_num(party_cpu(old_bulk, bkeys)))
        row.append(fmt_num(party_cpu(bulk, bkeys)))
        row.append(fmt_num(party_cpu(direct, bkeys)) if bkeys[0] in ("ssh", "sshd") else DASH)
        if before is not None:
            row.append(fmt_num(party_cpu(old_raw, rkeys)))
        row.append(fmt_num(party_cpu(raw, rkeys)))
        row.append(DASH if goal is None else f"≤ {goal}")
        rows.append(row)
    header = ["party"]
    if before is not None:
        header.append("ssh bulk via homeport: before")
    header += ["ssh bulk via homeport" + (": now" if before is not None else ""), "direct ssh"]
    if before is not None:
        header.append("raw stream (forward): before")
    header += ["raw stream (forward)" + (": now" if before is not None else ""), "target"]

    def mbps(series: Series | None) -> str:
        med = series.median() if series is not None else None
        return DASH if med is None else f"{med:.0f}"

    rows_line = ["MB/s (median)"]
    if before is not None:
        rows_line.append(mbps(old_bulk))
    rows_line += [mbps(bulk), mbps(direct)]
    if before is not None:
        rows_line.append(mbps(old_raw))
    rows_line += [mbps(raw), DASH]
    return md_table(header, [*rows, rows_line])


def targets(res: Results, gib: float) -> list[Target]:
    out = []
    bulk = {k: s.median() for k, s in res.bulk.items()}
    setup = {k: s.median() for k, s in res.setup.items()}

    def ratio_target(
        what: str, num: float | None, den: float | None, goal: str, ok: Callable[[float], bool]
    ) -> Target:
        r = ratio(num, den)
        if r is None:
            return Target(what, "n/a", goal, None)
        return Target(what, f"{r:.2f}{X}", goal, ok(r))

    out.append(
        ratio_target(
            "ssh bulk: homeport / direct",
            bulk.get(HOMEPORT),
            bulk.get(DIRECT),
            f"≥ {T_BULK_VS_DIRECT}{X}",
            lambda r: r >= T_BULK_VS_DIRECT,
        )
    )
    out.append(
        ratio_target(
            "ssh bulk: homeport / reverse tunnel",
            bulk.get(HOMEPORT),
            bulk.get(RTUN),
            f"≥ {T_BULK_VS_RTUN}{X}",
            lambda r: r >= T_BULK_VS_RTUN,
        )
    )
    raw = res.raw
    out.append(
        ratio_target(
            "raw stream: homeport forward / ssh -L",
            raw["forward"].median() if "forward" in raw else None,
            raw["ssh-L"].median() if "ssh-L" in raw else None,
            f"≥ {T_RAW_VS_SSH_L}{X}",
            lambda r: r >= T_RAW_VS_SSH_L,
        )
    )
    for what, series in (("ssh bulk", res.bulk.get(HOMEPORT)), ("raw stream", raw.get("forward"))):
        val = series.cpu_median("server") if series else None
        measured = "n/a" if val is None else f"{val:.2f} CPU-s/GiB"
        fixed = res.stream_fixed_cpu.get("server")
        if val is not None and fixed is not None:
            # Verdict on the total; the split shows how much is per-stream set-up.
            measured += f" ({max(0.0, val - fixed / gib):.2f} without the per-stream set-up)"
        out.append(
            Target(
                f"relay (server) CPU during {what}",
                measured,
                f"≤ {T_RELAY_CPU} CPU-s/GiB",
                None if val is None else val <= T_RELAY_CPU,
            )
        )
    for what, series, keys in (
        ("ssh bulk", res.bulk.get(HOMEPORT), ("laptop agent", "nc")),
        ("ssh bulk", res.bulk.get(HOMEPORT), ("agent",)),
        ("raw stream", raw.get("forward"), ("forward",)),
        ("raw stream", raw.get("forward"), ("agent",)),
    ):
        val = party_cpu(series, keys)
        name = "target agent" if keys == ("agent",) else " + ".join(keys)
        out.append(
            Target(
                f"end CPU during {what}: {name}",
                "n/a" if val is None else f"{val:.2f} CPU-s/GiB",
                f"≤ {T_END_CPU} CPU-s/GiB",
                None if val is None else val <= T_END_CPU,
            )
        )
    out.append(
        ratio_target(
            "ssh true: homeport / direct",
            setup.get(HOMEPORT),
            setup.get(DIRECT),
            f"≤ {T_SETUP_VS_DIRECT}{X}",
            lambda r: r <= T_SETUP_VS_DIRECT,
        )
    )
    out.append(
        ratio_target(
            "ssh true: homeport / ProxyJump",
            setup.get(HOMEPORT),
            setup.get(RTUN),
            f"< 1{X} (faster)",
            lambda r: r < 1.0,
        )
    )
    hp_nc = res.startup.get("homeport nc")
    plain = res.startup.get("nc -N (OpenBSD)")
    a = hp_nc.median() if hp_nc else None
    b = plain.median() if plain else None
    if a is None or b is None:
        out.append(
            Target(
                f"nc start-up: homeport nc {MINUS} nc", "n/a", f"≤ {T_NC_OVERHEAD_MS:.0f} ms", None
            )
        )
    else:
        out.append(
            Target(
                f"nc start-up: homeport nc {MINUS} nc",
                f"{a - b:+.1f} ms",
                f"≤ {T_NC_OVERHEAD_MS:.0f} ms",
                a - b <= T_NC_OVERHEAD_MS,
            )
        )
    return out


def machine_facts() -> list[tuple[str, str]]:
    def run(argv: list[str]) -> str:
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"? ({exc})"
        return (
            (res.stdout.strip() or res.stderr.strip()).splitlines()[0]
            if (res.stdout.strip() or res.stderr.strip())
            else "?"
        )

    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kib / (1 << 20):.1f} GiB"
    commit = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    if dirty not in ("?", ""):
        commit += " + uncommitted changes"
    versions = []
    for dist in ("homeport", "cryptography", "uvloop", "psutil"):
        try:
            from importlib.metadata import version

            versions.append(f"{dist} {version(dist)}")
        except Exception:  # a missing distribution is just reported
            versions.append(f"{dist} ?")
    return [
        ("nproc", f"{len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()})"),
        ("CPU", cpu_model),
        ("memory", mem),
        ("kernel", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("OS", run(["sh", "-c", '. /etc/os-release && echo "$PRETTY_NAME"'])),
        ("Python", f"{platform.python_implementation()} {platform.python_version()} ({PY})"),
        ("OpenSSL (Python ssl)", ssl.OPENSSL_VERSION),
        ("OpenSSH", run(["ssh", "-V"])),
        (
            "nc",
            "OpenBSD netcat " + run(["sh", "-c", "dpkg-query -W -f '${Version}' netcat-openbsd"]),
        ),
        ("packages", ", ".join(versions)),
        ("site .pth files that run code at Python start", site_hooks()),
        ("repository", commit),
    ]


def site_hooks() -> str:
    """``.pth`` files with ``import`` lines: code every Python start runs (e.g. nc's)."""
    import site

    hooks = []
    for d in site.getsitepackages():
        for pth in sorted(Path(d).glob("*.pth")):
            with contextlib.suppress(OSError):
                if any(ln.startswith("import") for ln in pth.read_text().splitlines()):
                    hooks.append(pth.name)
    return ", ".join(hooks) or "none"


def ktls_status() -> str:
    """Can this kernel do TLS (kTLS)? Tried on a loopback TCP pair, nothing sent."""
    if Path("/proc/net/tls_stat").exists():
        return "kernel has the tls module (/proc/net/tls_stat exists)"
    with contextlib.ExitStack() as stack:
        lsock = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        cli = stack.enter_context(socket.create_connection(lsock.getsockname()))
        stack.enter_context(lsock.accept()[0])
        try:
            cli.setsockopt(socket.IPPROTO_TCP, 31, b"tls")  # TCP_ULP
        except OSError as exc:
            return (
                f"no kernel TLS: setsockopt(TCP_ULP, 'tls') failed with {exc.strerror}, "
                "no /proc/net/tls_stat" + _config_tls()
            )
        return "setsockopt(TCP_ULP, 'tls') succeeded"
    return "?"


def _config_tls() -> str:
    try:
        with gzip.open("/proc/config.gz", "rt") as fh:
            for line in fh:
                if "CONFIG_TLS " in line or line.startswith("CONFIG_TLS="):
                    return f", /proc/config.gz: `{line.strip()}`"
    except OSError:
        pass
    return ""


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render(
    lab: Lab,
    res: Results,
    args: argparse.Namespace,
    facts: list[tuple[str, str]],
    loads: tuple[tuple[float, ...], tuple[float, ...]],
    started: datetime.datetime,
    elapsed: float,
) -> tuple[str, str]:
    """Return (summary for the terminal, the full markdown document)."""
    size_mib = lab.size // MIB
    parts: list[str] = []
    add = parts.append
    disturbed = res.load.disturbed() if res.load else []
    if disturbed:
        add(
            "**Disturbed run: other processes on this machine used CPU during "
            + "; ".join(disturbed)
            + ". Treat the numbers of those phases as unreliable (see Machine load).**\n"
        )
    add("## Results against the targets\n")
    add(
        md_table(
            ["target", "measured (medians)", "goal", "verdict"],
            [[t.what, t.measured, t.goal, t.verdict] for t in targets(res, lab.size / GIB)],
        )
    )
    if lab.hp_error:
        add(f"\n**homeport could not be set up: {lab.hp_error}** — its rows are not measured.")
    before: dict[str, Any] | None = args.before_doc
    add("\n### CPU-s/GiB per party\n")
    if before is not None:
        meta = before.get("meta", {})
        add(
            f'"before" is `{meta.get("commit", "?")}`, measured on this machine on '
            f'{meta.get("started", "?")} with `{meta.get("argv", "?")}` (`--before`); "now" is '
            "this run. Medians over the runs; the client end of ssh is the laptop agent "
            "(it runs the pump; ssh gets the socket by ProxyUseFdpass) plus `homeport nc`.\n"
        )
    add(party_table(res, before))

    add(
        f"\n### 1. Bulk: `cat FILE | ssh HOST 'cat > /dev/null'` ({size_mib} MiB, "
        f"{args.repeats} run(s) per path, interleaved)\n"
    )
    rows = []
    direct_b = res.bulk[DIRECT].median() if DIRECT in res.bulk else None
    for host, _ in PATHS:
        series = res.bulk.get(host)
        if series is None:
            continue
        setup_ms = res.setup[host].median() if host in res.setup else None
        net = DASH
        if series.ok and setup_ms is not None:
            secs = [lab.size / (v * 1e6) - setup_ms / 1e3 for v in series.values]
            if all(s > 0 for s in secs):
                net = f"{statistics.median(lab.size / s / 1e6 for s in secs):.0f}"
        r = ratio(series.median(), direct_b)
        rows.append(
            [
                series.label,
                fmt_stat(series),
                net,
                DASH if r is None else f"{r:.2f}{X}",
                res.ciphers.get(host, "?"),
                fmt_cpu(series, "server"),
                fmt_cpu(series, "agent"),
                fmt_cpu(series, "laptop agent"),
                fmt_cpu(series, "nc"),
            ]
        )
    add(
        md_table(
            [
                "path",
                f"MB/s median (min{DASH}max)",
                "MB/s minus set-up¹",
                "vs direct",
                "negotiated (client→server)",
                "server CPU-s/GiB",
                "agent CPU-s/GiB",
                "laptop agent CPU-s/GiB",
                "nc CPU-s/GiB",
            ],
            rows,
        )
    )
    add(
        f"\nThe target's own `ssh -R` session to the bastion negotiated {res.rtun_tunnel_cipher}."
        f"\n\n¹ derived: file size / (wall time {MINUS} that path's median `ssh true` time); "
        "the headline number is the plain wall time of the ssh process, which includes "
        "connection set-up."
    )

    add(f"\n### 2. Set-up: `ssh HOST true` (median of {args.setup_runs} after 1 warm-up, ms)\n")
    rows = []
    direct_s = res.setup[DIRECT].median() if DIRECT in res.setup else None
    rtun_s = res.setup[RTUN].median() if RTUN in res.setup else None
    for host, _ in PATHS:
        series = res.setup.get(host)
        if series is None:
            continue
        r1, r2 = ratio(series.median(), direct_s), ratio(series.median(), rtun_s)
        rows.append(
            [
                series.label,
                fmt_stat(series, 1),
                DASH if r1 is None else f"{r1:.2f}{X}",
                DASH if r2 is None else f"{r2:.2f}{X}",
            ]
        )
    add(md_table(["path", f"ms median (min{DASH}max)", "vs direct", "vs ProxyJump"], rows))

    add(
        f"\n### 2b. Interactive: one byte echoed by a remote `cat` in an open ssh session "
        f"({ECHO_ROUNDS} round trips after 20 warm-up ones, ms)\n"
    )
    rows = []
    for host, _ in PATHS:
        series = res.interactive.get(host)
        if series is None:
            continue
        p99 = (
            DASH
            if not series.ok
            else f"{sorted(series.values)[int(len(series.values) * 0.99)]:.3f}"
        )
        rows.append([series.label, fmt_stat(series, 3), p99])
    add(md_table(["path", f"ms median (min{DASH}max)", "p99 ms"], rows))

    add(
        f"\n### 3. Raw TCP stream, Python source → sink ({size_mib} MiB, receiver first byte → "
        "EOF)\n"
    )
    rows = []
    for key, series in res.raw.items():
        fwd_cpu = fmt_cpu(series, "forward" if key == "forward" else "ssh client")
        rows.append(
            [
                series.label,
                fmt_stat(series),
                fmt_cpu(series, "server"),
                fmt_cpu(series, "agent"),
                fwd_cpu,
            ]
        )
    add(
        md_table(
            [
                "path",
                f"MB/s median (min{DASH}max)",
                "server CPU-s/GiB",
                "agent CPU-s/GiB",
                "forwarder CPU-s/GiB (homeport forward / ssh client)",
            ],
            rows,
        )
    )

    add(
        f"\n### 4. Start-up: spawn → exit against a service that sends {len(BANNER)} bytes and "
        f"closes (median of {args.setup_runs} after 1 warm-up, ms)\n"
    )
    add(
        "`homeport nc` is the ProxyCommand exactly as `homeport ssh` writes it "
        "(`python -I -S …/ncfast.py`), with the client node's agent running: it asks that "
        "warm agent (over `agent.sock`) to open the stream, so the row includes a whole "
        "stream set-up (OPEN over the agent's control connection, the target agent's "
        "dial-back, the end-to-end TLS handshake, the target's connect) and the banner's "
        "trip back. `homeport nc (console script)` is `python -m homeport nc`, which pays "
        "`site` and this machine's `.pth` files. The `python` rows split out interpreter "
        "start.\n"
    )
    rows = [[name, fmt_stat(s, 1)] for name, s in res.startup.items()]
    add(md_table(["command (stdin /dev/null)", f"ms median (min{DASH}max)"], rows))
    if res.stream_fixed_cpu:
        per = ", ".join(f"the {k} {v * 1e3:.1f} ms" for k, v in res.stream_fixed_cpu.items())
        add(
            f"\nCPU per (empty) stream during the `homeport nc` runs (mean; psutil counts in "
            f"10 ms ticks): {per}. That "
            "fixed cost is part of every CPU-s/GiB figure above; spread over one transfer of "
            f"{size_mib} MiB, the server's part of it is "
            f"{res.stream_fixed_cpu.get('server', 0.0) / (lab.size / GIB):.2f} CPU-s/GiB."
        )
    summary = "\n".join(parts)

    doc: list[str] = [
        "# Benchmarks: ssh paths on loopback\n",
        *(
            [f"**WARNING: homeport replaced by `{HP_OVERRIDE}` (BENCH_HOMEPORT_ARGV).**\n"]
            if HP_OVERRIDE
            else []
        ),
        f"Generated by `{lab.display(shlex.join(['python', '-m', 'bench.ssh_paths', *args.argv]))}`"
        f" on {started:%Y-%m-%d %H:%M} UTC ({elapsed:.0f} s)."
        + (" **Quick mode: development numbers, not for comparison.**" if args.quick else ""),
        "Everything ran on 127.0.0.1 of one machine; MB/s is 10^6 bytes per second; CPU-s/GiB "
        "is user+system CPU seconds (all threads, and any children the process reaped) per "
        "2^30 bytes moved, sampled with psutil before and after each transfer.\n",
        "## Machine\n",
        md_table(
            ["fact", "value"],
            [
                *facts,
                (
                    "load average (1/5/15 min) before → after",
                    " / ".join(f"{x:.2f}" for x in loads[0])
                    + " → "
                    + " / ".join(f"{x:.2f}" for x in loads[1]),
                ),
            ],
        ),
        "",
        *load_table(res.load),
        summary,
        "\n## Caveats\n",
        "* **Two cores for everything.** Sender, ssh, sshd, and on the homeport path the "
        "client's agent, the server and the target's agent, all share the same two CPUs (and "
        "the machine may be shared with other work; see the load averages). The bulk rows are "
        "CPU-bound: every CPU-second homeport spends on end-to-end TLS at either end is taken "
        "from ssh and sshd. On a real network the client, the relay and the target are "
        "different machines and each end's cost lands on a core of its own.",
        "* **Login shell in every session.** sshd runs each command through the user's login "
        f"shell (`{os.environ.get('SHELL', '?')}` here"
        + (
            ", whose `~/.bashrc` runs `pyenv init`, about 85 ms per session"
            if _bashrc_has_pyenv()
            else ""
        )
        + "). All three paths pay it equally; it inflates the `ssh true` times and shrinks the "
        "set-up ratios towards 1.",
        "* **Bulk.** Direct `cat | ssh` is limited by OpenSSH's own encryption (default "
        "cipher, not forced) in ssh and sshd. Through homeport, `homeport nc` and the agent "
        "add a TLS layer each way on the same two cores, so there the transport competes with "
        "ssh for CPU. The bulk wall time includes connection set-up (see the minus-set-up "
        "column).",
        "* **nc CPU** comes from `bench/rusage_exec.py` wrapped around `homeport nc` in the "
        "ProxyCommand (fork + wait4), used only for the bulk runs, so it includes the "
        "interpreter start-up and the TLS handshake.",
        "* **Reverse tunnel.** The ProxyJump path is nested: the user's ssh runs inside the "
        "bastion hop (`-W`), which goes through the target's `ssh -R` session, so the payload is "
        "encrypted three times; this is the set-up the seeds describe.",
        "* **Load monitor.** A thread of the benchmark samples every process's CPU time once a "
        "second (about 1% of a core) to fill the machine-load table; a phase in which other "
        "processes averaged more than 0.1 cores is flagged at the top.",
        "* `ssh -L` CPU shown is the ssh client's only (sshd's forked session process is not "
        "sampled).",
    ]
    py_site = res.startup.get("python -c pass")
    py_bare = res.startup.get("python -I -S -c pass")
    if py_site and py_bare and py_site.ok and py_bare.ok:
        a, b = py_site.median() or 0.0, py_bare.median() or 0.0
        doc.append(
            f"* **Interpreter start.** `python -c pass` takes {a:.1f} ms here and "
            f"`python -I -S -c pass` {b:.1f} ms: {a - b:.1f} ms go to `site` "
            f"(.pth hooks: {site_hooks()}). `homeport nc` pays this on every ssh connection; "
            "on a clean Python install `site` costs a few ms."
        )
    if res.leftovers:
        doc.append(f"* Cleanup found and killed stray processes: {', '.join(res.leftovers)}.")
    doc += [
        "\n## Data-path notes\n",
        f"* **Kernel TLS:** {ktls_status()}. So `OP_ENABLE_KTLS` is not tried (it would "
        "also need OpenSSL to own the socket, i.e. `SSLSocket`, which the pump's "
        "memory-BIO half-close rules out).",
        "* **Cipher:** TLS 1.3 negotiates OpenSSL's first choice, `TLS_AES_256_GCM_SHA384`; "
        "Python 3.11's `ssl` has no TLS 1.3 ciphersuite setter (only a process-wide "
        "`OPENSSL_CONF`). `openssl speed -evp` at 16 KiB here: AES-128-GCM 2.79 GB/s, "
        "AES-256-GCM 2.60 GB/s, i.e. ~0.03 CPU-s/GiB per end: not worth the override.",
        "* **Relay threads:** the splice engine runs a fixed pool of workers "
        "(`homeport.relay.splice.WORKERS`); `tests/test_relay_link.py` relays 4,096 "
        "streams at once and asserts the thread count stays at the pool size.",
        "* **Pump micro-benchmark:** `python -m bench.pump_micro --chunk N` runs two "
        "pumps in one process for side-by-side comparisons of pump changes.",
        "\n## Exact commands\n",
        f"`$PY` is `{PY}`; `$TMP` is the per-run temporary directory; FILE is "
        f"`$TMP/data.bin`, {size_mib} MiB from `os.urandom`. All ssh commands use this "
        f"`$TMP/ssh_config`; HOST is `{DIRECT}` (direct), `{HOMEPORT}` (homeport; "
        f"`{HOMEPORT_CPU}` in the bulk runs: the same path with `homeport nc` under "
        f"`bench/rusage_exec.py` for its CPU time) or `{RTUN}` (ProxyJump through the reverse "
        "tunnel):\n",
        "```",
        lab.display(lab.cfg_text).rstrip(),
        "```\n",
        "```sh",
        *[f"# {what}\n{lab.display(cmd)}" for what, cmd in lab.commands],
        "```",
        "",
        "The target and bastion sshds come from `homeport.testing.sshd.make_sshd` "
        "(`/usr/sbin/sshd -D -e -f $TMP/<name>/sshd_config`, keys generated per run, "
        "`UsePAM no`, `AllowTcpForwarding yes`).",
    ]
    return summary, "\n".join(doc) + "\n"


def load_table(load: ForeignLoad | None) -> list[str]:
    if load is None or not load.phases:
        return []
    rows = [
        [
            name,
            f"{ph.wall:.0f}",
            f"{ph.machine_busy / ph.wall:.2f}" if ph.wall else "?",
            f"{ph.foreign / ph.wall:.2f}" if ph.wall else "?",
        ]
        for name, ph in load.phases.items()
        if name
    ]
    return [
        "### Machine load during the run\n",
        md_table(
            [
                "phase",
                "wall s",
                "machine busy, cores (all processes)",
                "other processes, cores (≥, sampled 1/s)",
            ],
            rows,
        ),
        "",
    ]


def _bashrc_has_pyenv() -> bool:
    try:
        return "pyenv init" in (Path.home() / ".bashrc").read_text(errors="replace")
    except OSError:
        return False
