"""Fault scenarios in the namespace lab: measured detection and recovery, zero bytes lost.

``python -m bench.faults`` (root) builds the lab once, runs every scenario against the
real server, agents, sshd and ssh, prints the table and rewrites the faults table of
docs/reliability.md (between its ``faults:begin``/``faults:end`` markers).
tests/test_e2e_faults.py runs the same scenarios and asserts on the same figures.

The lab (:class:`homeport.testing.natlab.Lab`)::

    inet 203.0.113.0/24 ── server 203.0.113.10 (homeport server)
      ├ rt_lab    .21  NAT ── lab     10.20.1.2  (agent "labpc", sshd)
      ├ rt_laptop .22  NAT ── laptop  10.20.2.2  (agent "laptop", ssh clients)
      └ rt_cafe   .23  NAT ── (empty: where the laptop moves to)

How times are measured. *Detection* is from the moment the fault is injected to the
agent's own log line saying its control link is lost (the log's millisecond
timestamps, same clock). *Recovery* is from the moment the fault ends (healed,
restarted, listening again) until everything works again: the agents say they are
connected and a fresh ``ssh labpc`` from the laptop round-trips (so it includes one
ssh handshake, ~0.3 s, and is conservative). *Bytes lost* compares what was sent with
what arrived (sha256 both ends); a transfer that failed loudly counts as 0 lost, one
that ended short without an error counts its missing bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from homeport.proto.control import AGENT_IDLE_TIMEOUT
from homeport.testing.deadline import Deadline, wait_for
from homeport.testing.natlab import SERVER_IP, Lab
from homeport.testing.sshd import SshdServer, make_sshd
from tests.harness import HOMEPORT, Homeport

#: The homeport server's port in the lab.
PORT = 8443
#: How long the link is blackholed (the issue's 10 s).
BLACKHOLE_SECONDS = 10.0
#: Bars from the issue: a dead control link is seen within this, and back within this.
DETECT_BAR = 5.0
RECOVER_BAR = 5.0
#: Bar for NAT loss, new WAN address, moving networks, agent restart.
NAT_RECOVER_BAR = 10.0
#: Server RSS may grow at most this much while one stream's reader is stalled.
RSS_GROWTH_BAR = 64 * 1024 * 1024
#: Bulk sizes of the stalled stream and of the stream that must keep moving.
STALLED_BYTES = 96 * 1024 * 1024
MOVING_BYTES = 64 * 1024 * 1024
#: The moving stream must keep at least this fraction of its speed when alone.
SPEED_RATIO_BAR = 0.5
CHUNK = 64 * 1024
#: Past the agent's idle timeout, a link with no "lost" line has survived the fault.
KEEPALIVE_SLACK = 1.0
MIB = 1 << 20

#: A policy in force, so a restart has one to keep (everyone may reach everything).
POLICY = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}\n'
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
LOST = "control connection lost"
CONNECTED = "connected to "
CANNOT = "cannot connect to server"


@dataclass(frozen=True)
class FaultResult:
    """One row of the table. ``None`` times: nothing to detect / nothing broke."""

    fault: str
    detection: float | None
    recovery: float | None
    bytes_lost: int
    ok: bool
    notes: str = ""


def _log_events(text: str, needle: str, after: float) -> list[float]:
    """Wall-clock times of log lines containing ``needle`` stamped at or after ``after``."""
    out = []
    for line in text.splitlines():
        mt = _LOG_TIME.match(line)
        if mt is None or needle not in line:
            continue
        t = datetime.strptime(mt.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
        t += int(mt.group(2)) / 1000
        if t >= after - 0.001:
            out.append(t)
    return out


class Session:
    """An ssh session from the laptop to labpc with piped stdio, read by a thread."""

    def __init__(self, fl: FaultLab, command: str) -> None:
        self.proc = fl.ssh_popen(command)
        assert self.proc.stdout is not None
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.received = 0
        self.digest = hashlib.sha256()
        self._raw = False
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)

    def start(self, *, raw: bool = False) -> Self:
        self._raw = raw
        self._reader.start()
        return self

    def _read(self, out: IO[bytes]) -> None:
        if self._raw:
            while chunk := out.read(CHUNK):
                self.received += len(chunk)
                self.digest.update(chunk)
            return
        for line in iter(out.readline, b""):
            self.lines.put(line)

    def echo(self, text: str, timeout: float) -> bool:
        """Write a line and wait for it to come back (an interactive keystroke's round trip)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode() + b"\n")
            self.proc.stdin.flush()
            return self.lines.get(timeout=timeout).strip() == text.encode()
        except (OSError, queue.Empty):
            return False

    def finish(self, timeout: float = 60.0) -> int:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        return rc


class Pusher:
    """Writes random bytes into a session's stdin as fast as it takes them (a busy session)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.sent = 0
        self.digest = hashlib.sha256()
        self.error: str = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stdin = self.session.proc.stdin
        assert stdin is not None
        block = os.urandom(CHUNK * 16)
        n = 0
        try:
            while not self._stop.is_set():
                chunk = block[(n * 4099) % CHUNK :][:CHUNK]  # varies, cheap
                stdin.write(chunk)
                self.digest.update(chunk)
                self.sent += len(chunk)
                n += 1
            stdin.close()
        except OSError as exc:
            self.error = str(exc)

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)


class FaultLab:
    """The lab, the server, two agents and an sshd; stopped by PID / deleted by name on exit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lab = Lab()
        self.hp = Homeport(root)
        self.sshd: SshdServer | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.host_of = {"labpc": "lab", "laptop": "laptop"}

    # -- lifecycle --------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _build(self) -> None:
        lab = self.lab
        lab.internet()
        for router, wan, lan in (
            ("rt_lab", "203.0.113.21", "10.20.1.1/24"),
            ("rt_laptop", "203.0.113.22", "10.20.2.1/24"),
            ("rt_cafe", "203.0.113.23", "10.20.3.1/24"),
        ):
            lab.router(router, wan_ip=wan, lan=lan)
        lab.host("lab", "rt_lab", "10.20.1.2")
        lab.host("laptop", "rt_laptop", "10.20.2.2")
        self.sshd = make_sshd(self.root / "sshd", netns=lab.ns("lab"))
        self.sshd.start()
        self.start_server()
        self.agents["labpc"] = self.hp.up(
            "labpc",
            "--expose",
            f"ssh=127.0.0.1:{self.sshd.port}",
            prefix=self.prefix("lab"),
        )
        self.agents["laptop"] = self.hp.up("laptop", prefix=self.prefix("laptop"))
        for name, proc in self.agents.items():
            self.hp.wait_online(name, proc)
        policy = self.root / "policy.hujson"
        policy.write_text(POLICY)
        self.hp.run([*HOMEPORT, "policy", "set", str(policy), "--data", str(self.hp.data_dir)])
        wait_for(self.ssh_ok, 20, "a first ssh labpc from the laptop")

    def close(self) -> None:
        try:
            self.hp.close()
        finally:
            try:
                if self.sshd is not None:
                    self.sshd.stop()
            finally:
                self.lab.close()

    # -- processes --------------------------------------------------------------------
    def prefix(self, host: str) -> list[str]:
        return self.lab.cmd(host, [])

    def start_server(self) -> float:
        """Start the server on the same data dir; returns the wall time it accepted."""
        self.server = self.hp.start_server(
            SERVER_IP, PORT, prefix=self.prefix("server"), ready=self._server_ready
        )
        return time.time()

    def _server_ready(self) -> bool:
        try:
            self.lab.run(
                "laptop",
                [sys.executable, "-c", _CONNECT, SERVER_IP, str(PORT)],
                timeout=5,
            )
            return True
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return False

    def kill_server(self) -> float:
        """SIGKILL the server; returns the wall time just before the signal."""
        assert self.server is not None
        t = time.time()
        self.server.kill()
        self.server.wait(timeout=10)
        return t

    def restart_agent(self, name: str) -> float:
        """SIGKILL the agent, start it again on its state; returns the wall time of the kill."""
        old = self.agents[name]
        t = time.time()
        old.kill()
        old.wait(timeout=10)
        argv = [*HOMEPORT, "up", "--state", str(self.hp.state(name))]
        self.agents[name] = self.hp.spawn(argv, f"agent-{name}", self.prefix(self.host_of[name]))
        return t

    def agent_log(self, name: str) -> str:
        return self.hp.log(f"agent-{name}")

    def events(self, name: str, needle: str, after: float) -> list[float]:
        return _log_events(self.agent_log(name), needle, after)

    def connected_since(self, name: str, after: float) -> float | None:
        """When the agent last said it connected, if that is after ``after`` and not lost since."""
        ups = self.events(name, CONNECTED, after)
        if not ups:
            return None
        downs = self.events(name, LOST, ups[-1])
        return ups[-1] if not downs or downs[-1] <= ups[-1] else None

    def server_rss(self) -> int:
        assert self.server is not None
        for line in Path(f"/proc/{self.server.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    # -- ssh from the laptop ----------------------------------------------------------
    def ssh_argv(self, command: str) -> list[str]:
        assert self.sshd is not None
        args = self.hp.ssh_args(self.hp.state("laptop"), self.sshd.client_key, self.sshd.user)
        return self.lab.cmd("laptop", [*args, "labpc", command])

    def ssh_popen(self, command: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            self.ssh_argv(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self.hp.env,
        )
        self.hp.procs.append(proc)  # stopped by PID on close
        return proc

    def ssh_ok(self, timeout: float = 8.0) -> bool:
        """A fresh ssh labpc round trip from the laptop (the user's view of "it works")."""
        try:
            res = subprocess.run(
                self.ssh_argv("echo ok"),
                capture_output=True,
                timeout=timeout,
                env=self.hp.env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return res.returncode == 0 and res.stdout.strip() == b"ok"

    def nc_error(self) -> tuple[int, str, float]:
        """``homeport nc labpc 22`` from the laptop: exit code, stderr, seconds taken."""
        argv = [*HOMEPORT, "nc", "--state", str(self.hp.state("laptop")), "labpc", "22"]
        t = time.monotonic()
        res = self.lab.run("laptop", argv, check=False, timeout=60, env=self.hp.env,
                           stdin=subprocess.DEVNULL)  # fmt: skip
        return res.returncode, res.stderr, time.monotonic() - t

    def wait_recovered(
        self,
        fault_at: float,
        since: float,
        names: tuple[str, ...],
        bound: float,
        *,
        restarted: bool = False,
    ) -> float | None:
        """Seconds from ``since`` until everything works again after a fault at ``fault_at``.

        Works again: a fresh ssh labpc from the laptop round-trips, and each agent in
        ``names`` either reconnected after losing its link, or kept it through a whole
        keepalive window (a dead link would have been declared dead by then). The ssh
        alone proves little: ``homeport nc`` dials the server itself when its agent cannot.
        ``restarted``: the agents are new processes, which must have connected since.
        """
        deadline = Deadline(bound + 10.0)  # measure past the bar, so a miss is reported
        ssh_at: float | None = None
        while not deadline.expired():
            if ssh_at is None and self.ssh_ok(max(1.0, deadline.remaining())):
                ssh_at = time.time()
            back: list[float] = []
            for n in names:
                lost = self.events(n, LOST, fault_at) or ([fault_at] if restarted else [])
                if lost:
                    up = self.connected_since(n, lost[-1])
                    if up is None:
                        break
                    back.append(up)
                elif time.time() - fault_at < AGENT_IDLE_TIMEOUT + KEEPALIVE_SLACK:
                    break  # too early to tell whether the link survived
            else:
                if ssh_at is not None:
                    return max([ssh_at, *back]) - since
            time.sleep(0.05)
        return None


_CONNECT = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close()"


def _first(times: list[float]) -> float | None:
    return times[0] if times else None


def _hold(seconds: float, poll: Callable[[], None]) -> None:
    """Keep a fault in place for ``seconds`` (its duration is the fault), polling meanwhile."""
    d = Deadline(seconds)
    while not d.expired():
        poll()
        time.sleep(min(0.05, d.remaining()))


# -- scenarios -------------------------------------------------------------------------------


def blackhole(fl: FaultLab, seconds: float = BLACKHOLE_SECONDS) -> list[FaultResult]:
    """Drop all laptop<->server packets for ``seconds`` under an idle and a busy ssh session."""
    idle = Session(fl, 'while IFS= read -r l; do echo "$l"; done').start()
    busy = Session(fl, "sha256sum").start()
    try:
        if not idle.echo("before", 15):
            raise AssertionError("the idle session did not echo before the fault")
        pusher = Pusher(busy)
        wait_for(lambda: pusher.sent >= 4 * MIB or bool(pusher.error), 20, "busy session moving")
        t0 = time.time()
        detected: list[float] = []

        def poll() -> None:
            if not detected:
                detected.extend(fl.events("laptop", LOST, t0)[:1])

        with fl.lab.blackhole("rt_laptop", SERVER_IP):
            _hold(seconds, poll)
            at_heal = pusher.sent
        t1 = time.time()
        poll()
        ctl_back: float | None = None
        idle_back: float | None = None
        busy_back: float | None = None
        d = Deadline(30)
        while not d.expired() and None in (ctl_back, idle_back, busy_back):
            if ctl_back is None:
                up = fl.connected_since("laptop", t1)
                ctl_back = None if up is None else max(0.0, up - t1)
            if idle_back is None and idle.echo("after", 0.5):
                idle_back = time.time() - t1
            if busy_back is None and (pusher.sent >= at_heal + 4 * MIB):
                busy_back = time.time() - t1
            time.sleep(0.02)
        pusher.stop()
        rc = busy.finish()
        echoed_hash = busy.lines.get(timeout=5).split()[0].decode() if rc == 0 else ""
        same = echoed_hash == pusher.digest.hexdigest()
        idle_rc = idle.finish()
    finally:
        for s in (idle, busy):
            if s.proc.poll() is None:
                s.proc.kill()
    det = None if not detected else detected[0] - t0
    loud = rc != 0  # a failed transfer is loud: ssh exits non-zero
    lost_busy = 0 if same or loud else pusher.sent
    tag = f"{seconds:g} s blackhole"
    return [
        FaultResult(
            f"{tag}: control link",
            det,
            ctl_back,
            0,
            det is not None
            and det <= DETECT_BAR
            and ctl_back is not None
            and ctl_back <= RECOVER_BAR,
            "ping 1.5 s, dead after 4.5 s",
        ),
        FaultResult(
            f"{tag}: idle ssh session",
            None,
            idle_back,
            0,
            idle_back is not None and idle_rc == 0,
            "session survives; keystroke echoes after healing",
        ),
        FaultResult(
            f"{tag}: busy ssh session",
            None,
            busy_back,
            lost_busy,
            busy_back is not None and same and rc == 0,
            f"{pusher.sent / MIB:.0f} MiB, sha256 equal: {same}",
        ),
    ]


def _nat_fault(fl: FaultLab, name: str, inject: Callable[[], object], note: str) -> FaultResult:
    """Inject a laptop-side network fault; detection from the agent's log, recovery to ssh ok."""
    t0 = time.time()
    inject()
    rec = fl.wait_recovered(t0, t0, ("laptop", "labpc"), NAT_RECOVER_BAR)
    det = _first(fl.events("laptop", LOST, t0))
    detection = None if det is None else det - t0
    ok = rec is not None and rec <= NAT_RECOVER_BAR
    return FaultResult(
        name, detection, rec, 0, ok, note if det is not None else note + "; link kept"
    )


def conntrack_flush(fl: FaultLab) -> FaultResult:
    return _nat_fault(
        fl,
        "NAT mappings lost (conntrack -F on the laptop's router)",
        lambda: fl.lab.flush_conntrack("rt_laptop"),
        "recovery until a fresh ssh round-trips",
    )


def new_wan_address(fl: FaultLab, wan_ip: str = "203.0.113.32") -> FaultResult:
    res = _nat_fault(
        fl,
        "laptop's router gets a new WAN address",
        lambda: fl.lab.set_wan_ip("rt_laptop", wan_ip),
        f"server sees {wan_ip}",
    )
    seen = any(
        n.get("name") == "laptop" and wan_ip in str(n.get("address", "")) for n in fl.hp.nodes()
    )
    return FaultResult(res.fault, res.detection, res.recovery, 0, res.ok and seen, res.notes)


def move_laptop(fl: FaultLab, router: str = "rt_cafe", ip: str = "10.20.3.2") -> FaultResult:
    return _nat_fault(
        fl,
        "laptop moves to another network",
        lambda: fl.lab.move_host("laptop", router, ip),
        "old address gone; keepalive notices",
    )


def agent_restart(fl: FaultLab, name: str = "labpc") -> FaultResult:
    t0 = fl.restart_agent(name)
    rec = fl.wait_recovered(t0, t0, (name,), NAT_RECOVER_BAR, restarted=True)
    ok = rec is not None and rec <= NAT_RECOVER_BAR
    return FaultResult(f"agent process restarted (SIGKILL, {name})", None, rec, 0, ok,
                       "includes Python start-up")  # fmt: skip


#: Fields of a node that change with its connection, not with the server's state.
_VOLATILE = ("online", "last_seen", "address", "expiry_warning")


@dataclass(frozen=True)
class ServerState:
    nodes: str
    keys: str
    policy: str


def server_state(fl: FaultLab) -> ServerState:
    """What the server must keep across a crash: nodes, auth keys, the policy (as JSON)."""
    nodes = [{k: v for k, v in n.items() if k not in _VOLATILE} for n in fl.hp.nodes()]
    data = str(fl.hp.data_dir)
    keys = fl.hp.run([*HOMEPORT, "keys", "list", "--json", "--data", data]).stdout
    policy = fl.hp.run([*HOMEPORT, "policy", "get", "--json", "--data", data]).stdout
    return ServerState(json.dumps(nodes, sort_keys=True), keys, policy)


def server_sigkill(fl: FaultLab) -> FaultResult:
    """SIGKILL the server, start it again on the same data dir; nothing may be lost."""
    before = server_state(fl)
    names = ("labpc", "laptop")
    wait_for(lambda: all(fl.connected_since(n, 0.0) for n in names), 10, "agents connected")
    t0 = fl.kill_server()
    wait_for(lambda: all(fl.events(n, LOST, t0) for n in names), 10, "agents see the loss")
    det = max(_first(fl.events(n, LOST, t0)) or t0 for n in names) - t0
    t1 = fl.start_server()
    rec = fl.wait_recovered(t0, t1, ("labpc", "laptop"), RECOVER_BAR)
    after = server_state(fl)
    same = before == after and '"set": true' in after.policy
    ok = rec is not None and rec <= RECOVER_BAR and same
    return FaultResult("server SIGKILL + restart (same data dir)", det, rec, 0, ok,
                       f"nodes, keys, policy unchanged: {same}")  # fmt: skip


@dataclass(frozen=True)
class DownReport:
    attempts: dict[str, int]
    alive: bool
    nc_rc: int
    nc_stderr: str
    nc_seconds: float
    recovery: float | None


def server_down(fl: FaultLab, seconds: float = 8.0) -> DownReport:
    """Keep the server down for ``seconds``: agents keep retrying, clients fail in one line."""
    t0 = fl.kill_server()
    nc_rc, nc_err, nc_s = fl.nc_error()
    _hold(max(0.0, seconds - (time.time() - t0)), lambda: None)
    attempts = {n: len(fl.events(n, CANNOT, t0)) for n in ("labpc", "laptop")}
    alive = all(p.poll() is None for p in fl.agents.values())
    t1 = fl.start_server()
    rec = fl.wait_recovered(t0, t1, ("labpc", "laptop"), RECOVER_BAR)
    return DownReport(attempts, alive, nc_rc, nc_err, nc_s, rec)


def down_result(rep: DownReport, seconds: float) -> FaultResult:
    lines = [ln for ln in rep.nc_stderr.splitlines() if ln.strip()]
    ok = (
        rep.alive
        and min(rep.attempts.values()) >= 2
        # over a direct path (issue 6) nc still works with the server down; else one line
        and (rep.nc_rc == 0 or len(lines) == 1)
        and rep.recovery is not None
        and rep.recovery <= RECOVER_BAR
    )
    return FaultResult(
        f"server down {seconds:g} s",
        None,
        rep.recovery,
        0,
        ok,
        f"agents retried {min(rep.attempts.values())}+ times; nc: one line in "
        f"{rep.nc_seconds:.1f} s",
    )


def direct_while_server_down(fl: FaultLab) -> tuple[bool, float | None]:
    """With the server down, can the laptop still ssh to labpc (over a direct path)?"""
    fl.ssh_ok()  # gives the agents a reason to set up a direct path first
    t0 = fl.kill_server()
    worked = fl.ssh_ok(10.0)
    t1 = fl.start_server()
    rec = fl.wait_recovered(t0, t1, ("labpc", "laptop"), RECOVER_BAR)
    return worked, rec


@dataclass(frozen=True)
class StallReport:
    alone: float  # MiB/s of the moving stream alone
    beside_stalled: float  # MiB/s while the other stream's reader is stopped
    rss_before: int
    rss_peak: int
    stalled_complete: bool
    moving_complete: bool


def _pull(fl: FaultLab, nbytes: int) -> tuple[float, bool]:
    """Download ``nbytes`` of zeros from labpc over ssh; (MiB/s, byte-identical)."""
    s = Session(fl, f"head -c {nbytes} /dev/zero")
    t = time.monotonic()
    s.start(raw=True)
    rc = s.finish(timeout=120)
    secs = time.monotonic() - t
    return nbytes / MIB / secs, rc == 0 and s.digest.digest() == _zeros_sha(nbytes)


def _zeros_sha(n: int) -> bytes:
    h = hashlib.sha256()
    block = bytes(MIB)
    while n > 0:
        h.update(block[: min(n, MIB)])
        n -= MIB
    return h.digest()


def stalled_receiver(fl: FaultLab) -> StallReport:
    alone, ok1 = _pull(fl, MOVING_BYTES)
    rss0 = fl.server_rss()
    stalled = Session(fl, f"head -c {STALLED_BYTES} /dev/zero")
    stalled.start(raw=True)
    wait_for(lambda: stalled.received >= MIB, 20, "the stalled stream moving")
    os.kill(stalled.proc.pid, signal.SIGSTOP)  # its reader (ssh) stops reading
    try:
        # Let the stopped reader's buffers fill up, until nothing more arrives for it.
        last = [-1]

        def settled() -> bool:
            cur = stalled.received
            done = cur == last[0]
            last[0] = cur
            return done

        wait_for(settled, 20, "the stalled stream's buffers filling", interval=0.5)
        beside, ok2 = _pull(fl, MOVING_BYTES)
        peak = fl.server_rss()
    finally:
        os.kill(stalled.proc.pid, signal.SIGCONT)
    rc = stalled.finish(timeout=120)
    full = rc == 0 and stalled.digest.digest() == _zeros_sha(STALLED_BYTES)
    return StallReport(alone, beside, rss0, max(peak, fl.server_rss()), full, ok1 and ok2)


def stall_result(rep: StallReport) -> FaultResult:
    growth = rep.rss_peak - rep.rss_before
    ratio = rep.beside_stalled / rep.alone if rep.alone else 0.0
    ok = (
        ratio >= SPEED_RATIO_BAR
        and growth <= RSS_GROWTH_BAR
        and rep.stalled_complete
        and rep.moving_complete
    )
    return FaultResult(
        "one stream's reader stalled (relay)",
        None,
        None,
        0 if rep.stalled_complete and rep.moving_complete else -1,
        ok,
        f"other stream {rep.beside_stalled:.0f} vs {rep.alone:.0f} MiB/s alone "
        f"({ratio:.2f}x); server RSS +{growth / MIB:.1f} MiB",
    )


# -- the table -------------------------------------------------------------------------------

BEGIN = "<!-- faults:begin (python -m bench.faults) -->"
END = "<!-- faults:end -->"


def _secs(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} s"


def render(results: list[FaultResult]) -> str:
    rows = [
        "| fault | detection time | recovery time | bytes lost | result | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lost = "error (loud)" if r.bytes_lost < 0 else str(r.bytes_lost)
        rows.append(
            f"| {r.fault} | {_secs(r.detection)} | {_secs(r.recovery)} | {lost} | "
            f"{'pass' if r.ok else 'FAIL'} | {r.notes} |"
        )
    return "\n".join(rows)


def write_doc(doc: Path, table: str, facts: str) -> None:
    text = doc.read_text()
    block = f"{BEGIN}\n{facts}\n\n{table}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Faults survived (measured)\n\n" + block + "\n"
    doc.write_text(text)


@contextlib.contextmanager
def fault_lab(root: Path) -> Iterator[FaultLab]:
    with FaultLab(root) as fl:
        yield fl


def run_all(fl: FaultLab) -> list[FaultResult]:
    results = blackhole(fl)
    results.append(conntrack_flush(fl))
    results.append(new_wan_address(fl))
    results.append(move_laptop(fl))
    results.append(agent_restart(fl))
    results.append(server_sigkill(fl))
    results.append(down_result(server_down(fl), 8.0))
    results.append(stall_result(stalled_receiver(fl)))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    ap.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs"
                    / "reliability.md")  # fmt: skip
    ap.add_argument("--no-doc", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    import tempfile

    from homeport.testing.natlab import natlab_available

    ok, why = natlab_available()
    if not ok:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="hp-faults-") as tmp, fault_lab(Path(tmp)) as fl:
        results = run_all(fl)
    table = render(results)
    facts = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
        f"{os.cpu_count()} cores ({os.uname().sysname} {os.uname().release}), one run."
    )
    print(table)
    if not args.no_doc:
        write_doc(args.doc, table, facts)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
