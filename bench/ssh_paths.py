"""SSH through homeport, side by side with direct ssh and the classic reverse tunnel.

Run from the repository root::

    python -m bench.ssh_paths                          # 1 GiB, 20 set-up runs -> docs/benchmarks.md
    python -m bench.ssh_paths --quick --out /tmp/b.md  # 64 MiB, 5 set-up runs: development

Everything runs on 127.0.0.1 inside one temporary directory, which is removed
at the end, and every process the benchmark starts is stopped by its PID:

* a *target* sshd (the lab PC's) and a *bastion* sshd (the VPS of the classic
  set-up), both from :func:`homeport.testing.sshd.make_sshd`;
* the reverse tunnel "the target" keeps to the bastion:
  ``ssh -N -R 127.0.0.1:RPORT:127.0.0.1:<target sshd> bastion``;
* a homeport server, an agent ``labpc`` exposing the target sshd, a raw TCP
  sink and a close-at-once service, and a client node ``laptop``;
* a raw TCP sink (:mod:`bench.tcp_endpoints`), ``ssh -N -L`` to it and
  ``homeport forward`` to it.

It measures (1) bulk ``cat FILE | ssh HOST 'cat > /dev/null'``, (2) set-up
``ssh HOST true``, each three ways (direct, homeport ProxyCommand, ProxyJump
through the reverse tunnel), (3) a raw TCP stream through ``homeport forward``
and ``ssh -L``, (4) the homeport processes' CPU per GiB during (1) and (3),
and (5) ``homeport nc`` start-up against OpenBSD ``nc``; then prints the
results next to the targets and writes them, with the machine facts and the
exact commands, to ``--out``.

Options: ``--size-mib`` (bulk and raw-stream size, 1024), ``--setup-runs``
(``ssh true`` and start-up runs, 20, after one warm-up), ``--repeats`` (bulk and
raw-stream runs per path, 3; paths interleaved, rotating who goes first),
``--out`` and ``--quick`` (64 MiB, 5 set-up runs, 1 repeat).

If homeport does not work, its rows say ``failed: <reason>`` and the rest is
still measured.  ``BENCH_HOMEPORT_ARGV`` (a command prefix replacing
``python -m homeport``) exists only to test this harness against a stand-in; the
report is then stamped with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

import psutil

from homeport.testing.deadline import Deadline
from homeport.testing.sshd import SshdServer, make_sshd, sshd_available

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
ENDPOINTS = BENCH_DIR / "tcp_endpoints.py"
RUSAGE = BENCH_DIR / "rusage_exec.py"
PY = sys.executable
# How homeport is run.  BENCH_HOMEPORT_ARGV (a shell-quoted command prefix) swaps in
# a stand-in, only to exercise this harness while the product is unfinished; the
# report says so loudly when it is set.
HP_OVERRIDE = os.environ.get("BENCH_HOMEPORT_ARGV", "")
HP_ARGV = shlex.split(HP_OVERRIDE) if HP_OVERRIDE else [PY, "-m", "homeport"]


def hp_proxy_command(state: Path) -> str:
    """homeport's own ProxyCommand (``python -I -S …/ncfast.py``), with %h %p."""
    from homeport.client.ssh import proxy_command

    return proxy_command(state, PY)


def hp_nc_argv(state: Path, node: str, port: str) -> list[str]:
    """The argv ssh runs for ``homeport nc`` (the ProxyCommand with %h %p filled in)."""
    if HP_OVERRIDE:
        return [*HP_ARGV, "nc", "--state", str(state), node, port]
    return shlex.split(hp_proxy_command(state).replace("%h", node).replace("%p", port))


MIB = 1 << 20
GIB = 1 << 30
HOST = "127.0.0.1"
NODE = "labpc"
BANNER = b"homeport-bench\n"  # what bench/tcp_endpoints.py's close service sends

# ssh config host aliases, one per path.
DIRECT = "target"
HOMEPORT = NODE
HOMEPORT_CPU = "labpc-cpu"  # same path, but nc runs under rusage_exec for its CPU time
RTUN = "target-rtun"
BASTION = "bastion"

PATHS: list[tuple[str, str]] = [
    (DIRECT, "direct (ssh → sshd)"),
    (HOMEPORT, "homeport (ProxyCommand homeport nc)"),
    (RTUN, "reverse tunnel (ssh -R to bastion + ProxyJump)"),
]

X = "\u00d7"  # multiplication sign, for ratios
DASH = "\u2013"  # en dash, for ranges and empty cells
MINUS = "\u2212"

# Targets from the issue.
T_BULK_VS_DIRECT = 0.9
T_BULK_VS_RTUN = 2.0
T_RAW_VS_SSH_L = 2.0
T_RELAY_CPU = 0.3
T_SETUP_VS_DIRECT = 1.15
T_NC_OVERHEAD_MS = 30.0


_T = TypeVar("_T")
HP_FAILED = "homeport set-up failed (reason above the tables)"


class BenchError(Exception):
    """A measurement or set-up step failed; the message is the row's reason."""


def log(msg: str) -> None:
    sys.stderr.write(f"bench: {msg}\n")
    sys.stderr.flush()


def one_line(text: str | bytes, limit: int = 240) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def ssh_banner_answers(port: int) -> bool:
    """True once an SSH server answers on the port (reads its banner, sends ours)."""
    try:
        with socket.create_connection((HOST, port), timeout=2.0) as sock:
            if not sock.recv(256).startswith(b"SSH-"):
                return False
            sock.sendall(b"SSH-2.0-homeport_bench_probe\r\n")
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- processes


class Procs:
    """Long-lived child processes, each logging to its own file; stopped by PID."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def log_path(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def spawn(
        self, name: str, argv: Sequence[str], *, stdout_pipe: bool = False
    ) -> subprocess.Popen[bytes]:
        with self.log_path(name).open("ab") as logf:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else logf,
                stderr=logf,
                env=child_env(),
                # Own session: a Ctrl-C on the terminal reaches only us, and
                # we stop the children in order.
                start_new_session=True,
            )
        self.running.append((name, proc))
        return proc

    def tail(self, name: str, limit: int = 600) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return "<no log>"
        # The end of a log says why (a traceback ends with the exception).
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return one_line(" / ".join(lines[-3:])[-limit:], limit) or "<empty log>"

    def describe_exit(self, name: str, proc: subprocess.Popen[bytes]) -> str:
        return f"{name} exited with status {proc.returncode}: {self.tail(name)}"

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)

    def stop_all(self) -> None:
        for _, proc in reversed(self.running):
            with contextlib.suppress(Exception):
                self.stop(proc)
            if proc.stdout is not None:
                with contextlib.suppress(Exception):
                    proc.stdout.close()
        self.running.clear()


def child_env() -> dict[str, str]:
    # Explicit --state/--data everywhere; make sure no inherited default leaks in.
    return {k: v for k, v in os.environ.items() if not k.startswith("HOMEPORT_")}


def wait_until(
    check: Callable[[], bool],
    *,
    watch: Sequence[tuple[str, subprocess.Popen[bytes]]],
    procs: Procs,
    timeout: float,
    what: str,
    pace: float = 0.05,
) -> None:
    """Poll ``check`` until true; pacing waits on the watched processes, so an
    early exit of any of them ends the wait at once with that process's log."""
    clock = Deadline(timeout)
    while True:
        if check():
            return
        for name, proc in watch:
            if proc.poll() is not None:
                raise BenchError(f"{what}: {procs.describe_exit(name, proc)}")
        if clock.expired():
            raise BenchError(f"{what}: not ready within {timeout:.0f}s")
        with contextlib.suppress(subprocess.TimeoutExpired):
            watch[0][1].wait(timeout=min(pace, clock.remaining()))


def cpu_seconds(proc: Any) -> float:
    """user+sys of a psutil.Process: all its threads, plus children it reaped."""
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


# --------------------------------------------------------------------------- results


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


@dataclass
class Lab:
    tmp: Path
    procs: Procs
    cfg: Path
    target: SshdServer
    bastion: SshdServer
    data_file: Path
    size: int
    sink_port: int = 0
    close_port: int = 0
    sink_results: queue.Queue[dict[str, float]] = field(default_factory=queue.Queue)
    rport: int = 0
    hp_error: str | None = None
    hp_server: subprocess.Popen[bytes] | None = None
    hp_agent: subprocess.Popen[bytes] | None = None
    hp_laptop: subprocess.Popen[bytes] | None = None
    authkey: str = ""
    cfg_text: str = ""
    commands: list[tuple[str, str]] = field(default_factory=list)

    @property
    def hp_data(self) -> Path:
        return self.tmp / "server"

    @property
    def lab_state(self) -> Path:
        return self.tmp / "lab"

    @property
    def laptop_state(self) -> Path:
        return self.tmp / "laptop"

    @property
    def nc_rusage(self) -> Path:
        return self.tmp / "nc-rusage.json"

    def ssh(self, *args: str) -> list[str]:
        return ["ssh", "-F", str(self.cfg), *args]

    def homeport(self, *args: str) -> list[str]:
        return [*HP_ARGV, *args]

    def record(self, what: str, argv: Sequence[str] | str) -> None:
        text = argv if isinstance(argv, str) else shlex.join(argv)
        if all(what != w for w, _ in self.commands):
            self.commands.append((what, text))

    def display(self, text: str) -> str:
        out = text.replace(str(self.tmp), "$TMP").replace(PY, "$PY").replace(f"{REPO}/", "")
        return out.replace(self.authkey, "$AUTHKEY") if self.authkey else out


# --------------------------------------------------------------------------- set-up


def write_ssh_config(lab_tmp: Path, target: SshdServer, bastion: SshdServer, rport: int) -> Path:
    """One ssh_config for every path, so each command line is just ``ssh -F CFG HOST``."""
    rtun_known = lab_tmp / "known_hosts_rtun"
    rtun_known.write_text(target.known_hosts_line(f"[{HOST}]:{rport}"))
    laptop = lab_tmp / "laptop"
    # The ProxyCommand exactly as `homeport ssh` / `homeport ssh-config` write it.
    nc = (
        f"{shlex.join(HP_ARGV)} nc --state {laptop} %h %p"
        if HP_OVERRIDE
        else hp_proxy_command(laptop)
    )
    cfg = lab_tmp / "ssh_config"
    cfg.write_text(
        f"Host {DIRECT}\n"
        f"  HostName {HOST}\n  Port {target.port}\n"
        f"  IdentityFile {target.client_key}\n  UserKnownHostsFile {target.known_hosts_path}\n"
        f"Host {BASTION}\n"
        f"  HostName {HOST}\n  Port {bastion.port}\n"
        f"  IdentityFile {bastion.client_key}\n  UserKnownHostsFile {bastion.known_hosts_path}\n"
        f"Host {RTUN}\n"
        f"  HostName {HOST}\n  Port {rport}\n  ProxyJump {BASTION}\n"
        f"  IdentityFile {target.client_key}\n  UserKnownHostsFile {rtun_known}\n"
        f"Host {HOMEPORT}\n"
        f"  ProxyCommand {nc}\n"
        # homeport ssh / ssh-config write ProxyUseFdpass: nc hands ssh the stream's socket.
        f"  ProxyUseFdpass {'no' if HP_OVERRIDE else 'yes'}\n"
        f"  IdentityFile {target.client_key}\n  UserKnownHostsFile {laptop}/known_hosts/%h\n"
        f"Host {HOMEPORT_CPU}\n"
        f"  HostName {NODE}\n"
        # -I -S: the wrapper is stdlib-only, so skip site's start-up cost.
        f"  ProxyCommand {shlex.quote(PY)} -I -S {RUSAGE} {lab_tmp}/nc-rusage.json -- {nc}\n"
        f"  ProxyUseFdpass {'no' if HP_OVERRIDE else 'yes'}\n"
        f"  IdentityFile {target.client_key}\n"
        f"  UserKnownHostsFile {laptop}/known_hosts/{NODE}\n"
        "Host *\n"
        f"  User {target.user}\n"
        "  IdentitiesOnly yes\n  BatchMode yes\n  LogLevel ERROR\n"
        "  StrictHostKeyChecking yes\n  GlobalKnownHostsFile /dev/null\n"
        "  UpdateHostKeys no\n  ControlMaster no\n  ControlPath none\n"
    )
    return cfg


def start_endpoints(lab: Lab) -> None:
    proc = lab.procs.spawn("endpoints", [PY, str(ENDPOINTS), "serve"], stdout_pipe=True)
    lab.record("raw TCP sink + close service", [PY, str(ENDPOINTS), "serve"])
    assert proc.stdout is not None
    stream: IO[bytes] = proc.stdout
    ports: queue.Queue[dict[str, int]] = queue.Queue()

    def reader() -> None:
        first = True
        for raw in stream:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if first:
                ports.put(msg)
                first = False
            else:
                lab.sink_results.put(msg)

    threading.Thread(target=reader, daemon=True).start()
    try:
        msg = ports.get(timeout=15)
    except queue.Empty:
        raise BenchError(f"tcp endpoints did not start: {lab.procs.tail('endpoints')}") from None
    lab.sink_port, lab.close_port = int(msg["sink_port"]), int(msg["close_port"])


def start_reverse_tunnel(lab: Lab) -> None:
    """The seeds' method: the target keeps ``ssh -R`` open to the bastion."""
    argv = lab.ssh(
        "-v",
        "-E",
        str(lab.procs.log_path("rtun-ssh-debug")),
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "ServerAliveInterval=30",
        "-R",
        f"{HOST}:{lab.rport}:{HOST}:{lab.target.port}",
        BASTION,
    )
    lab.record("reverse tunnel, run on the target", argv)
    proc = lab.procs.spawn("rtun-ssh", argv)
    wait_until(
        lambda: ssh_banner_answers(lab.rport),
        watch=[("rtun-ssh", proc)],
        procs=lab.procs,
        timeout=30,
        what="reverse tunnel",
    )


def start_homeport(lab: Lab) -> None:
    port = free_port()
    server_argv = lab.homeport("server", "--data", str(lab.hp_data), "--listen", f"{HOST}:{port}")
    lab.record("homeport server", server_argv)
    server = lab.procs.spawn("hp-server", server_argv)
    lab.hp_server = server
    wait_until(
        lambda: tcp_accepts(port),
        watch=[("hp-server", server)],
        procs=lab.procs,
        timeout=30,
        what="homeport server",
    )

    keys_argv = lab.homeport("keys", "create", "--data", str(lab.hp_data), "--reusable")
    lab.record("auth key", keys_argv)
    clock = Deadline(30)
    while True:
        res = subprocess.run(
            keys_argv, capture_output=True, env=child_env(), timeout=30, check=False
        )
        found = re.search(rb"hpk1_[A-Za-z0-9_\-.~+/=]+", res.stdout)
        if res.returncode == 0 and found:
            lab.authkey = found.group().decode()
            break
        if clock.expired() or server.poll() is not None:
            raise BenchError(
                f"homeport keys create: exit {res.returncode}: "
                f"{one_line(res.stderr or res.stdout) or 'no hpk1_ key in output'}"
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=0.2)

    common = ["--server", f"{HOST}:{port}", "--authkey", lab.authkey]
    agent_argv = lab.homeport(
        "up",
        "--state",
        str(lab.lab_state),
        *common,
        "--name",
        NODE,
        "--expose",
        f"ssh={HOST}:{lab.target.port}",
        "--expose",
        f"sink={HOST}:{lab.sink_port}",
        "--expose",
        f"close={HOST}:{lab.close_port}",
    )
    laptop_argv = lab.homeport("up", "--state", str(lab.laptop_state), *common, "--name", "laptop")
    lab.record("homeport agent on the target", agent_argv)
    lab.record("homeport client node", laptop_argv)
    lab.hp_agent = lab.procs.spawn("hp-agent", agent_argv)
    lab.hp_laptop = lab.procs.spawn("hp-laptop", laptop_argv)

    status_argv = lab.homeport("status", "--state", str(lab.laptop_state), "--json")
    lab.record("readiness poll", status_argv)
    last = ["no status yet"]

    def online() -> bool:
        try:
            res = subprocess.run(
                status_argv, capture_output=True, env=child_env(), timeout=20, check=False
            )
        except subprocess.TimeoutExpired:
            last[0] = "homeport status timed out"
            return False
        if res.returncode != 0:
            last[0] = f"status exit {res.returncode}: {one_line(res.stderr or res.stdout)}"
            return False
        try:
            doc = json.loads(res.stdout)
        except ValueError:
            last[0] = f"status printed no JSON: {one_line(res.stdout)}"
            return False
        state = node_online(doc, NODE)
        last[0] = f"status says {NODE} online={state}: {one_line(res.stdout, 160)}"
        return state is True

    try:
        wait_until(
            online,
            watch=[("hp-agent", lab.hp_agent), ("hp-laptop", lab.hp_laptop), ("hp-server", server)],
            procs=lab.procs,
            timeout=60,
            what=f"{NODE} online",
            pace=0.25,
        )
    except BenchError as exc:
        raise BenchError(f"{exc} (last: {last[0]})") from None


def node_online(doc: object, name: str) -> bool | None:
    """Find ``name``'s entry anywhere in ``homeport status --json`` and read its state."""
    if isinstance(doc, dict):
        if doc.get("name") == name:
            for key in ("online", "connected"):
                if isinstance(doc.get(key), bool):
                    return bool(doc[key])
            for key in ("status", "state"):
                val = doc.get(key)
                if isinstance(val, str):
                    return val.lower() == "online"
        if isinstance(doc.get(name), dict):
            found = node_online({"name": name, **doc[name]}, name)
            if found is not None:
                return found
        for val in doc.values():
            found = node_online(val, name)
            if found is not None:
                return found
    elif isinstance(doc, list):
        for val in doc:
            found = node_online(val, name)
            if found is not None:
                return found
    return None


def write_random_file(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        left = size
        while left:
            step = min(left, 4 * MIB)
            fh.write(os.urandom(step))
            left -= step


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


def bulk_once(
    lab: Lab, host: str, watch: dict[str, Any], rusage: Path | None
) -> tuple[float, dict[str, float]]:
    """One ``cat FILE | ssh HOST 'cat > /dev/null'``; MB/s of the ssh wall time."""
    gib = lab.size / GIB
    timeout = 120 + lab.size / 2e6
    if rusage is not None:
        rusage.unlink(missing_ok=True)
    before = {k: cpu_seconds(p) for k, p in watch.items()}
    start = time.perf_counter()
    cat = subprocess.Popen(["cat", str(lab.data_file)], stdout=subprocess.PIPE)
    assert cat.stdout is not None
    try:
        ssh = subprocess.Popen(
            lab.ssh(host, "cat > /dev/null"),
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
    if rusage is not None:
        used = read_rusage(rusage)
        if used is not None:
            cpu["nc"] = used / gib
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
    before = {k: cpu_seconds(p) for k, p in watch.items()}
    try:
        res = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"source did not finish within {timeout:.0f}s") from None
    after = {k: cpu_seconds(p) for k, p in watch.items()}
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


# --------------------------------------------------------------------------- report


def fmt_stat(series: Series, digits: int = 0, unit: str = "") -> str:
    if not series.ok:
        return f"failed: {one_line(series.error or 'no data', 160)}"
    vals = series.values
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{med:.{digits}f} {unit}".strip()
    return f"{med:.{digits}f} ({min(vals):.{digits}f}{DASH}{max(vals):.{digits}f}) {unit}".strip()


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


# --------------------------------------------------------------------------- main


def sweep_leftovers(tmp: Path) -> list[str]:
    """Processes started indirectly (e.g. ssh's ProxyCommand) that outlived their
    parent: found by this run's unique temp-dir path in their command line."""
    killed = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.pid != me and any(str(tmp) in part for part in cmdline):
                killed.append(f"{proc.pid} ({one_line(' '.join(cmdline), 80)})")
                proc.kill()
        except psutil.Error:
            continue
    return killed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ssh_paths",
        description="ssh bulk/set-up, raw stream and relay CPU: direct vs homeport vs "
        "reverse tunnel, on loopback.",
    )
    parser.add_argument("--size-mib", type=int, default=None, help="bulk and raw size (1024)")
    parser.add_argument("--setup-runs", type=int, default=None, help="ssh true / nc runs (20)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="bulk and raw-stream runs per path, interleaved (3)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument(
        "--quick", action="store_true", help="development mode: 64 MiB, 5 set-up runs, 1 repeat"
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.size_mib is None:
        args.size_mib = 64 if args.quick else 1024
    if args.setup_runs is None:
        args.setup_runs = 5 if args.quick else 20
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.size_mib < 1 or args.setup_runs < 1 or args.repeats < 1:
        parser.error("--size-mib, --setup-runs and --repeats must be positive")
    return args


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the cleanup in ``finally`` always runs."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ok, why = sshd_available()
    if not ok:
        log(f"cannot run: {why}")
        return 2
    if shutil.which("nc") is None:
        log("cannot run: nc (netcat-openbsd) not found")
        return 2
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    load_before = os.getloadavg()
    facts = machine_facts()
    tmp = Path(tempfile.mkdtemp(prefix="homeport-bench-"))
    (tmp / "logs").mkdir()
    procs = Procs(tmp / "logs")
    target = make_sshd(tmp / "target-sshd")
    bastion = make_sshd(tmp / "bastion-sshd")
    rport = free_port()
    lab = Lab(
        tmp=tmp,
        procs=procs,
        cfg=write_ssh_config(tmp, target, bastion, rport),
        target=target,
        bastion=bastion,
        data_file=tmp / "data.bin",
        size=args.size_mib * MIB,
        rport=rport,
    )
    lab.cfg_text = lab.cfg.read_text()
    res = Results()
    monitor = ForeignLoad(tmp)
    res.load = monitor
    try:
        monitor.start()
        with terminate_as_interrupt():
            log(f"temp dir {tmp}; writing {args.size_mib} MiB of random data")
            write_random_file(lab.data_file, lab.size)
            target.start()
            bastion.start()
            start_endpoints(lab)
            start_reverse_tunnel(lab)
            try:
                start_homeport(lab)
                log("homeport: server, agent and client node are up")
            except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
                lab.hp_error = str(exc)
                log(f"homeport set-up failed: {exc}")
            monitor.phase("ciphers")
            phase_ciphers(lab, res)
            monitor.phase("start-up")
            phase_startup(lab, res, args.setup_runs)
            monitor.phase("ssh true")
            phase_setup(lab, res, args.setup_runs)
            monitor.phase("interactive")
            phase_interactive(lab, res)
            monitor.phase("bulk")
            phase_bulk(lab, res, args.repeats)
            monitor.phase("raw stream")
            phase_raw(lab, res, args.repeats)
            monitor.stop()
            for name in monitor.disturbed():
                log(f"other processes were busy during {name}")
            summary, doc = render(
                lab,
                res,
                args,
                facts,
                (load_before, os.getloadavg()),
                started,
                time.monotonic() - t0,
            )
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        monitor.stop()
        procs.stop_all()
        target.stop()
        bastion.stop()
        res.leftovers = sweep_leftovers(tmp)
        if res.leftovers:
            log(f"killed stray processes: {res.leftovers}")
        shutil.rmtree(tmp, ignore_errors=True)
    if res.leftovers:
        # Re-render so the document mentions them.
        summary, doc = render(
            lab, res, args, facts, (load_before, os.getloadavg()), started, time.monotonic() - t0
        )
    if HP_OVERRIDE:
        print(f"WARNING: homeport replaced by {HP_OVERRIDE!r} (BENCH_HOMEPORT_ARGV)\n")
    print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(doc)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
