"""The lab of :mod:`bench.ssh_paths`: constants, child processes, sshds, tunnel, homeport.

Everything here sets things up (and knows how to stop them by PID); the
measurements live in :mod:`bench.phases` and the document in :mod:`bench.report`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from homeport.testing.deadline import Deadline
from homeport.testing.sshd import SshdServer

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
#: CPU-s/GiB each end of a stream (client agent or nc or forward; target agent) may spend.
T_END_CPU = 0.8
T_SETUP_VS_DIRECT = 1.15
T_NC_OVERHEAD_MS = 30.0


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
    # HOMEPORT_RECORDS (the stream record layer switch) is passed on, for A/B runs.
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HOMEPORT_") or k == "HOMEPORT_RECORDS"
    }


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
