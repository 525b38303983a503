"""The measurement phases of :mod:`bench.ssh_paths` and the machine-load monitor.

Each phase fills :class:`Results`; nothing here writes the document.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import select
import shlex
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from bench.lab import (
    BANNER,
    DASH,
    DIRECT,
    ENDPOINTS,
    GIB,
    HOMEPORT,
    HOMEPORT_CPU,
    HOST,
    HP_FAILED,
    HP_OVERRIDE,
    NODE,
    PATHS,
    PY,
    RTUN,
    RUSAGE,
    BenchError,
    Lab,
    Procs,
    cpu_seconds,
    free_port,
    hp_nc_argv,
    log,
    one_line,
    tcp_accepts,
    wait_until,
)
from homeport.testing.deadline import Deadline

# --------------------------------------------------------------------------- results


_T = TypeVar("_T")


@dataclass
class Series:
    """Repeated measurements of one path (or the reason it could not be measured)."""

    label: str
    values: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    def add_cpu(self, cpu: dict[str, float]) -> None:
        for key, val in cpu.items():
            self.cpu.setdefault(key, []).append(val)

    @property
    def ok(self) -> bool:
        return bool(self.values) and self.error is None

    def median(self) -> float | None:
        return statistics.median(self.values) if self.ok else None

    def cpu_median(self, key: str) -> float | None:
        vals = self.cpu.get(key)
        return statistics.median(vals) if vals and self.ok else None


# --------------------------------------------------------------------------- measurements


KEX_RE = re.compile(r"kex: algorithm: (\S+)")
CIPHER_RE = re.compile(r"kex: client->server cipher: (\S+) MAC: (\S+)")


def negotiated(text: str) -> list[str]:
    """The (kex, cipher) of every ssh connection in a ``-v`` log, outermost first."""
    kexes = KEX_RE.findall(text)
    out = []
    for i, (cipher, mac) in enumerate(CIPHER_RE.findall(text)):
        kex = kexes[i] if i < len(kexes) else "?"
        mac_s = "" if mac == "<implicit>" else f" + {mac}"
        out.append(f"{cipher}{mac_s} (kex {kex})")
    return out


def probe_cipher(lab: Lab, host: str) -> str:
    argv = lab.ssh("-v", host, "true")
    lab.record(f"cipher check ({host})", argv)
    res = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False
    )
    found = negotiated(res.stderr.decode(errors="replace"))
    if res.returncode != 0:
        raise BenchError(f"ssh exit {res.returncode}: {ssh_error(res.stderr)}")
    if not found:
        return "? (no kex line in ssh -v)"
    if host == RTUN and len(found) >= 2:
        return f"{found[-1]}; jump hop to bastion: {found[0]}"
    return found[-1]


def ssh_error(stderr: bytes) -> str:
    lines = [
        ln for ln in stderr.decode(errors="replace").splitlines() if not ln.startswith("debug")
    ]
    return one_line("\n".join(lines[-6:])) or "<no stderr>"


def time_ssh_true(lab: Lab, host: str) -> float:
    argv = lab.ssh(host, "true")
    lab.record("set-up", lab.ssh("HOST", "true"))
    start = time.perf_counter()
    try:
        res = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError("ssh true timed out after 60 s") from None
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        raise BenchError(f"ssh exit {res.returncode}: {ssh_error(res.stderr)}")
    return elapsed


def sshd_tree(lab: Lab) -> Any | None:
    """The target sshd's listener (its sessions are its descendants), or None."""
    proc = lab.target.process
    return psutil.Process(proc.pid) if proc is not None and proc.poll() is None else None


def tree_cpu(root: Any) -> float:
    """CPU seconds of ``root`` and its live descendants (each with what it reaped).

    A session that has ended is counted once it is reaped: in its parent's
    children times. So callers let the tree settle before the last sample.
    """
    total = cpu_seconds(root)
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += cpu_seconds(child)
    return total


def settle(root: Any, before: set[int], timeout: float = 10.0) -> None:
    """Wait (bounded) until every process born under ``root`` since ``before`` is reaped."""
    clock = Deadline(timeout)
    while not clock.expired():
        if not {c.pid for c in root.children(recursive=True)} - before:
            return
        time.sleep(0.01)  # bounded by the deadline; sshd reaps its own children


def bulk_once(
    lab: Lab, host: str, watch: dict[str, Any], rusage: Path | None
) -> tuple[float, dict[str, float]]:
    """One ``cat FILE | ssh HOST 'cat > /dev/null'``; MB/s of the ssh wall time.

    CPU per party: the homeport processes in ``watch`` (psutil before/after);
    ``ssh`` from ``bench/rusage_exec.py`` wrapped around it (wait4: ssh plus
    the ProxyCommand it reaped, minus that ProxyCommand's own figure);
    ``sshd`` = the target sshd's whole tree (listener, session, remote
    ``cat``), read after the session has been reaped. Not measured for the
    reverse-tunnel path (two sshds, and the tunnel's ssh).
    """
    gib = lab.size / GIB
    timeout = 120 + lab.size / 2e6
    if rusage is not None:
        rusage.unlink(missing_ok=True)
    ssh_rusage = lab.tmp / "ssh-rusage.json"
    ssh_rusage.unlink(missing_ok=True)
    sshd = sshd_tree(lab) if host != RTUN else None
    sshd_pids = {c.pid for c in sshd.children(recursive=True)} if sshd is not None else set()
    sshd_before = tree_cpu(sshd) if sshd is not None else 0.0
    before = {k: cpu_seconds(p) for k, p in watch.items()}
    start = time.perf_counter()
    cat = subprocess.Popen(["cat", str(lab.data_file)], stdout=subprocess.PIPE)
    assert cat.stdout is not None
    try:
        ssh = subprocess.Popen(
            [PY, "-I", "-S", str(RUSAGE), str(ssh_rusage), "--", *lab.ssh(host, "cat > /dev/null")],
            stdin=cat.stdout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    finally:
        cat.stdout.close()
    try:
        _, err = ssh.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        Procs.stop(ssh)
        Procs.stop(cat)
        raise BenchError(f"cat | ssh did not finish within {timeout:.0f}s") from None
    elapsed = time.perf_counter() - start
    after = {k: cpu_seconds(p) for k, p in watch.items()}
    try:
        cat.wait(timeout=10)
    except subprocess.TimeoutExpired:
        Procs.stop(cat)
    if ssh.returncode != 0:
        raise BenchError(f"ssh exit {ssh.returncode}: {ssh_error(err)}")
    cpu = {k: (after[k] - before[k]) / gib for k in watch}
    nc_used = read_rusage(rusage) if rusage is not None else None
    if nc_used is not None:
        cpu["nc"] = nc_used / gib
    ssh_used = read_rusage(ssh_rusage)
    if ssh_used is not None:
        cpu["ssh"] = (ssh_used - (nc_used or 0.0)) / gib
    if sshd is not None:
        settle(sshd, sshd_pids)
        cpu["sshd"] = (tree_cpu(sshd) - sshd_before) / gib
    return lab.size / elapsed / 1e6, cpu


def read_rusage(path: Path) -> float | None:
    """CPU seconds the wrapped ``homeport nc`` used; ssh does not wait for its
    proxy, so the wrapper may still be writing: a bounded poll."""
    clock = Deadline(10)
    while not clock.expired():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.01)  # bounded by the deadline; the writer is not our child
            continue
        return float(doc["user"]) + float(doc["sys"])
    return None


def party_cpu(key: str, proc: Any) -> float:
    """``sshd`` is a whole tree (listener + the ``-L`` session); the rest one process."""
    return tree_cpu(proc) if key == "sshd" else cpu_seconds(proc)


def raw_once(lab: Lab, port: int, watch: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """Source → PORT (a forwarder) → sink; MB/s from the sink's first byte to EOF."""
    while True:
        try:
            lab.sink_results.get_nowait()  # stale results of a failed earlier run
        except queue.Empty:
            break
    argv = [PY, str(ENDPOINTS), "source", "--port", str(port), "--bytes", str(lab.size)]
    lab.record(
        "raw stream source",
        [PY, str(ENDPOINTS), "source", "--port", "LOCALPORT", "--bytes", str(lab.size)],
    )
    timeout = 120 + lab.size / 2e6
    before = {k: party_cpu(k, p) for k, p in watch.items()}
    try:
        res = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"source did not finish within {timeout:.0f}s") from None
    after = {k: party_cpu(k, p) for k, p in watch.items()}
    if res.returncode != 0:
        raise BenchError(f"source exit {res.returncode}: {one_line(res.stderr)}")
    try:
        got = lab.sink_results.get(timeout=30)
    except queue.Empty:
        raise BenchError("sink reported nothing within 30 s after the source finished") from None
    if int(got["bytes"]) != lab.size:
        raise BenchError(f"sink received {int(got['bytes'])} of {lab.size} bytes")
    gib = lab.size / GIB
    return lab.size / float(got["seconds"]) / 1e6, {k: (after[k] - before[k]) / gib for k in watch}


def time_command(argv: Sequence[str], expect: bytes | None) -> float:
    start = time.perf_counter()
    try:
        res = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError("timed out after 30 s") from None
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        raise BenchError(f"exit {res.returncode}: {one_line(res.stderr or res.stdout)}")
    if expect is not None and res.stdout != expect:
        raise BenchError(f"expected {expect!r}, got {res.stdout[:80]!r}")
    return elapsed


# --------------------------------------------------------------------------- phases


@dataclass
class Results:
    ciphers: dict[str, str] = field(default_factory=dict)
    rtun_tunnel_cipher: str = "?"
    setup: dict[str, Series] = field(default_factory=dict)
    bulk: dict[str, Series] = field(default_factory=dict)
    raw: dict[str, Series] = field(default_factory=dict)
    startup: dict[str, Series] = field(default_factory=dict)
    # one-byte round trips through an open ssh session (keystroke echo), ms
    interactive: dict[str, Series] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    # CPU seconds the server / agent spend on one empty stream (mean over the nc runs).
    stream_fixed_cpu: dict[str, float] = field(default_factory=dict)
    load: ForeignLoad | None = None


def fmt_stat(series: Series, digits: int = 0, unit: str = "") -> str:
    if not series.ok:
        return f"failed: {one_line(series.error or 'no data', 160)}"
    vals = series.values
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{med:.{digits}f} {unit}".strip()
    return f"{med:.{digits}f} ({min(vals):.{digits}f}{DASH}{max(vals):.{digits}f}) {unit}".strip()


def series_json(series: Series) -> dict[str, Any]:
    return {
        "label": series.label,
        "values": series.values,
        "cpu": series.cpu,
        "error": series.error,
    }


def series_from_json(doc: dict[str, Any]) -> Series:
    return Series(
        str(doc["label"]),
        [float(v) for v in doc["values"]],
        {str(k): [float(x) for x in v] for k, v in doc["cpu"].items()},
        doc["error"],
    )


def results_json(res: Results, meta: dict[str, Any]) -> dict[str, Any]:
    """The measurements, for a later run to show as "before" (``--before``)."""
    return {
        "meta": meta,
        **{
            part: {k: series_json(s) for k, s in getattr(res, part).items()}
            for part in ("bulk", "raw", "setup", "interactive", "startup")
        },
    }


def rotated(items: Sequence[_T], turn: int) -> list[_T]:
    """Interleave paths and rotate who goes first, so no path always follows the same one."""
    k = turn % len(items) if items else 0
    return [*items[k:], *items[:k]]


def phase_ciphers(lab: Lab, res: Results) -> None:
    for host, _ in PATHS:
        if host == HOMEPORT and lab.hp_error:
            res.ciphers[host] = HP_FAILED
            continue
        try:
            res.ciphers[host] = probe_cipher(lab, host)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            res.ciphers[host] = f"failed: {exc}"
        log(f"cipher {host}: {res.ciphers[host]}")
    found = negotiated(lab.procs.log_path("rtun-ssh-debug").read_text(errors="replace"))
    res.rtun_tunnel_cipher = found[0] if found else "?"


def phase_startup(lab: Lab, res: Results, runs: int) -> None:
    cmds: dict[str, tuple[list[str], bytes | None]] = {
        "homeport nc": (
            hp_nc_argv(lab.laptop_state, NODE, str(lab.close_port)),
            BANNER,
        ),
        "homeport nc (console script)": (
            lab.homeport("nc", "--state", str(lab.laptop_state), NODE, str(lab.close_port)),
            BANNER,
        ),
        "nc -N (OpenBSD)": (["nc", "-N", HOST, str(lab.close_port)], BANNER),
        # Context for the difference: interpreter + imports, without any network.
        "python -c 'import homeport.client.nc'": ([PY, "-c", "import homeport.client.nc"], b""),
        "python -c pass": ([PY, "-c", "pass"], b""),
        "python -I -S -c pass": ([PY, "-I", "-S", "-c", "pass"], b""),
    }
    for name, (argv, _) in cmds.items():
        res.startup[name] = Series(name)
        lab.record(
            f"start-up: {name}",
            [*argv[:-1], "PORT"] if "nc -N" in name or name.startswith("homeport nc") else argv,
        )
        if name.startswith("homeport nc") and lab.hp_error:
            res.startup[name].fail(HP_FAILED)
        if "import homeport" in name and HP_OVERRIDE:
            res.startup[name].fail("skipped: homeport replaced by BENCH_HOMEPORT_ARGV")
    # The homeport processes' CPU per stream (set-up and teardown of an empty
    # stream): the fixed cost inside every CPU-per-GiB figure below.
    watch = {} if lab.hp_error else hp_watch(lab)
    fixed: dict[str, list[float]] = {k: [] for k in watch}
    for i in range(runs + 1):  # run 0 is the warm-up
        for name, (argv, expect) in rotated(list(cmds.items()), i):
            series = res.startup[name]
            if series.error:
                continue
            sample = watch if name == "homeport nc" else {}
            try:
                before = {k: cpu_seconds(p) for k, p in sample.items()}
                took = time_command(argv, expect)
                after = {k: cpu_seconds(p) for k, p in sample.items()}
            except (BenchError, psutil.Error) as exc:
                series.fail(str(exc))
                continue
            if i:
                series.values.append(took * 1e3)
                for k in sample:
                    fixed[k].append(after[k] - before[k])
    if res.startup["homeport nc"].ok:
        # Mean, not median: psutil's CPU times tick in 10 ms, more than one
        # empty stream costs, so most single deltas read 0.
        res.stream_fixed_cpu = {k: statistics.fmean(v) for k, v in fixed.items() if v}
    for name, series in res.startup.items():
        log(f"start-up {name}: {fmt_stat(series, 1, 'ms')}")
    for k, v in res.stream_fixed_cpu.items():
        log(f"per-stream CPU of the {k}: {v * 1e3:.1f} ms")


def phase_setup(lab: Lab, res: Results, runs: int) -> None:
    for host, label in PATHS:
        res.setup[host] = Series(label)
        if host == HOMEPORT and lab.hp_error:
            res.setup[host].fail(HP_FAILED)
    for i in range(runs + 1):  # run 0 is the warm-up
        for host, _ in rotated(PATHS, i):
            series = res.setup[host]
            if series.error:
                continue
            try:
                took = time_ssh_true(lab, host)
            except BenchError as exc:
                series.fail(str(exc))
                continue
            if i:
                series.values.append(took * 1e3)
    for host, series in res.setup.items():
        log(f"ssh true {host}: {fmt_stat(series, 1, 'ms')}")


#: One-byte round trips per path in the interactive phase (after 20 warm-up ones).
ECHO_ROUNDS = 300


def echo_rtts(lab: Lab, host: str, rounds: int) -> list[float]:
    """Keystroke echo: write one byte into ``ssh HOST cat`` and time until it is back."""
    argv = lab.ssh(host, "cat")
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0
    )
    assert proc.stdin is not None and proc.stdout is not None
    out: list[float] = []
    try:
        for i in range(rounds + 20):
            start = time.perf_counter()
            proc.stdin.write(b"x")
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            if not ready or proc.stdout.read(1) != b"x":
                raise BenchError(f"no echo from {host} within 30 s")
            if i >= 20:  # the first round trips include the session set-up
                out.append((time.perf_counter() - start) * 1e3)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out


def phase_interactive(lab: Lab, res: Results) -> None:
    lab.record("interactive", f"{shlex.join(lab.ssh('HOST', 'cat'))}  (write 1 byte, read it back)")
    for host, label in PATHS:
        series = res.interactive[host] = Series(label)
        if host == HOMEPORT and lab.hp_error:
            series.fail(HP_FAILED)
            continue
        try:
            series.values = echo_rtts(lab, host, ECHO_ROUNDS)
        except (BenchError, OSError) as exc:
            series.fail(str(exc))
        log(f"echo {host}: {fmt_stat(series, 3, 'ms')}")


def hp_watch(lab: Lab, with_forward: subprocess.Popen[bytes] | None = None) -> dict[str, Any]:
    watch: dict[str, Any] = {}
    for key, proc in (
        ("server", lab.hp_server),
        ("agent", lab.hp_agent),
        # the client machine's agent: with a warm agent it runs the client-side
        # end-to-end TLS and pump for nc and ssh (ProxyUseFdpass)
        ("laptop agent", lab.hp_laptop),
        ("forward", with_forward),
    ):
        if proc is not None and proc.poll() is None:
            watch[key] = psutil.Process(proc.pid)
    return watch


def phase_bulk(lab: Lab, res: Results, repeats: int) -> None:
    lab.record("bulk", f"cat FILE | {shlex.join(lab.ssh('HOST', 'cat > /dev/null'))}")
    for host, label in PATHS:
        res.bulk[host] = Series(label)
        if host == HOMEPORT and lab.hp_error:
            res.bulk[host].fail(HP_FAILED)
    for i in range(repeats):
        for host, _ in rotated(PATHS, i):
            series = res.bulk[host]
            if series.error:
                continue
            is_hp = host == HOMEPORT
            try:
                mbps, cpu = bulk_once(
                    lab,
                    HOMEPORT_CPU if is_hp else host,
                    hp_watch(lab) if is_hp else {},
                    lab.nc_rusage if is_hp else None,
                )
            except (BenchError, psutil.Error) as exc:
                series.fail(str(exc))
                log(f"bulk {host} run {i + 1}: failed: {exc}")
                continue
            series.values.append(mbps)
            series.add_cpu(cpu)
            extra = " ".join(f"{k}={v:.2f}" for k, v in cpu.items())
            log(f"bulk {host} run {i + 1}/{repeats}: {mbps:.0f} MB/s {extra}")


def phase_raw(lab: Lab, res: Results, repeats: int) -> None:
    sink = f"{HOST}:{lab.sink_port}"
    res.raw["forward"] = Series("homeport forward")
    res.raw["ssh-L"] = Series("ssh -L (target sshd)")
    forwarders: dict[str, tuple[int, subprocess.Popen[bytes] | None]] = {}

    def start_forwarder(key: str, name: str, argv: list[str], port: int, via: str) -> None:
        """Spawn a local forwarder on ``port`` and register it once it accepts."""
        lab.record(f"raw stream via {via}", argv)
        proc = lab.procs.spawn(name, argv)
        try:
            wait_until(
                lambda: tcp_accepts(port),
                watch=[(name, proc)],
                procs=lab.procs,
                timeout=30,
                what=res.raw[key].label,
            )
            forwarders[key] = (port, proc)
        except BenchError as exc:
            res.raw[key].fail(str(exc))

    # ssh -L to the target sshd, default cipher.
    lport = free_port()
    start_forwarder(
        "ssh-L",
        "ssh-L",
        lab.ssh("-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{HOST}:{lport}:{sink}", DIRECT),
        lport,
        "ssh -L",
    )
    if lab.hp_error:
        res.raw["forward"].fail(HP_FAILED)
    else:
        fport = free_port()
        start_forwarder(
            "forward",
            "hp-forward",
            lab.homeport(
                "forward", "--state", str(lab.laptop_state), str(fport), f"{NODE}:{lab.sink_port}"
            ),
            fport,
            "homeport forward",
        )

    for i in range(repeats):
        for key, (port, fproc) in rotated(list(forwarders.items()), i):
            series = res.raw[key]
            if series.error:
                continue
            watch = hp_watch(lab, fproc) if key == "forward" else {}
            if key == "ssh-L" and fproc is not None:
                watch = {"ssh client": psutil.Process(fproc.pid)}
                sshd = sshd_tree(lab)
                if sshd is not None:
                    watch["sshd"] = sshd
            try:
                mbps, cpu = raw_once(lab, port, watch)
            except (BenchError, psutil.Error) as exc:
                series.fail(str(exc))
                log(f"raw {key} run {i + 1}: failed: {exc}")
                continue
            series.values.append(mbps)
            series.add_cpu(cpu)
            extra = " ".join(f"{k}={v:.2f}" for k, v in cpu.items())
            log(f"raw {key} run {i + 1}/{repeats}: {mbps:.0f} MB/s {extra}")


# --------------------------------------------------------------------------- machine load


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return (total - idle) / hz, total / hz


@dataclass
class PhaseLoad:
    wall: float = 0.0
    machine_busy: float = 0.0  # CPU-s, every process (exact, /proc/stat)
    foreign: float = 0.0  # CPU-s of processes outside this benchmark (sampled: a lower bound)


class ForeignLoad:
    """Watches for other work on the machine, phase by phase.

    Loopback numbers on a small shared machine mean little if something else
    ran meanwhile, so a thread samples, once a second, the CPU time of every
    process that is neither a descendant of this benchmark nor names its temp
    dir (orphaned ProxyCommands).  Processes that live less than a sample apart
    are missed, so ``foreign`` is a lower bound; ``machine_busy`` is exact.
    """

    def __init__(self, tmp: Path, interval: float = 1.0) -> None:
        self._tmp = str(tmp)
        self._interval = interval
        self._me = os.getpid()
        self._last: dict[int, float] = {}
        self._last_t = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._phase = "start-up of the lab"
        self._phase_t0 = time.monotonic()
        self._busy0 = machine_busy_seconds()[0]
        self.phases: dict[str, PhaseLoad] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._sample()  # baseline
        self._thread.start()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.phase("")

    def phase(self, name: str) -> None:
        """Close the current phase (charging it its share) and open ``name``."""
        self._sample()
        with self._lock:
            busy = machine_busy_seconds()[0]
            load = self.phases.setdefault(self._phase, PhaseLoad())
            load.wall += time.monotonic() - self._phase_t0
            load.machine_busy += busy - self._busy0
            self._busy0, self._phase_t0, self._phase = busy, time.monotonic(), name

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _family(self, procs: list[Any]) -> set[int]:
        children: dict[int, list[int]] = {}
        for proc in procs:
            children.setdefault(proc.info["ppid"] or 0, []).append(proc.pid)
        family, todo = set(), [self._me]
        while todo:
            pid = todo.pop()
            family.add(pid)
            todo.extend(children.get(pid, []))
        for proc in procs:
            if any(self._tmp in part for part in proc.info["cmdline"] or []):
                family.add(proc.pid)
        return family

    def _sample(self) -> None:
        with self._lock:
            now = time.time()
            procs = list(psutil.process_iter(["ppid", "cmdline", "cpu_times", "create_time"]))
            family = self._family(procs)
            seen: dict[int, float] = {}
            foreign = 0.0
            for proc in procs:
                times = proc.info["cpu_times"]
                if times is None:
                    continue
                cpu = float(times.user + times.system)
                seen[proc.pid] = cpu
                if proc.pid in family:
                    continue
                if proc.pid in self._last:
                    foreign += max(0.0, cpu - self._last[proc.pid])
                elif (proc.info["create_time"] or 0.0) >= self._last_t:
                    foreign += cpu  # born since the last sample
            self._last, self._last_t = seen, now
            self.phases.setdefault(self._phase, PhaseLoad()).foreign += foreign

    def disturbed(self, threshold: float = 0.1) -> list[str]:
        """Phases in which other processes averaged more than ``threshold`` cores."""
        return [
            f"{name} ({load.foreign / load.wall:.2f} cores)"
            for name, load in self.phases.items()
            if name and load.wall > 0 and load.foreign / load.wall > threshold
        ]
