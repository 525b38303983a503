"""Drives real homeport processes (server, agents, nc) through the CLI, like a user.

Every process is started by this harness and stopped by PID in :meth:`Homeport.close`.
Waiting is done by polling a condition against a deadline, never by sleeping blindly.
A ``prefix`` (e.g. ``["ip", "netns", "exec", "hp-lab"]``) runs a command inside a
network namespace of the NAT lab.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homeport.testing.deadline import wait_for

HOMEPORT = [sys.executable, "-m", "homeport"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_in_threads(sock: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    """Accept on a listening ``sock`` in a daemon thread until it is closed; each
    connection is handled by ``handle`` in a thread of its own."""

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
            del conn  # the handler owns it: holding it here would delay its close

    threading.Thread(target=accept_loop, daemon=True).start()


def tcp_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Homeport:
    """A homeport network made of real processes."""

    root: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    server_addr: str = ""
    data_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.data_dir = self.root / "server"
        self.env = dict(os.environ)
        self.env.pop("HOMEPORT_STATE", None)
        self.env.pop("HOMEPORT_DATA", None)
        self.env["PYTHONUNBUFFERED"] = "1"

    # -- processes -----------------------------------------------------------
    def spawn(
        self, argv: Sequence[str], log: str, prefix: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        logf = open(self.root / f"{log}.log", "ab")
        proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        logf.close()
        self.procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        prefix: Sequence[str] = (),
        timeout: float = 60,
        check: bool = True,
        **kw: Any,
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=timeout, env=self.env, **kw
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"{shlex.join([*prefix, *argv])} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
            )
        return res

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    # -- server ----------------------------------------------------------------
    def start_server(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        prefix: Sequence[str] = (),
        ready: Callable[[], bool] | None = None,
        extra: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        port = port or free_port(host)
        self.server_addr = f"{host}:{port}"
        proc = self.spawn(
            [
                *HOMEPORT,
                "server",
                "--data",
                str(self.data_dir),
                "--listen",
                self.server_addr,
                *extra,
            ],
            "server",
            prefix,
        )
        check = ready or (lambda: tcp_accepts(host, port))
        wait_for(
            lambda: proc.poll() is None and check(),
            20,
            f"server on {self.server_addr}\n{self.log('server')}",
        )
        return proc

    def keys_create(self, *args: str) -> str:
        out = self.run([*HOMEPORT, "keys", "create", "--data", str(self.data_dir), *args]).stdout
        lines = [ln for ln in out.splitlines() if ln.strip()]
        assert len(lines) == 1, f"keys create must print exactly one line, got {out!r}"
        return lines[0].strip()

    def nodes(self) -> list[dict[str, Any]]:
        out = self.run([*HOMEPORT, "nodes", "list", "--json", "--data", str(self.data_dir)]).stdout
        data = json.loads(out)
        return list(data["nodes"] if isinstance(data, dict) else data)

    def node_online(self, name: str) -> bool:
        return any(n.get("name") == name and n.get("online") for n in self.nodes())

    # -- nodes -----------------------------------------------------------------
    def state(self, name: str) -> Path:
        return self.root / f"state-{name}"

    def up(
        self,
        name: str,
        *args: str,
        key: str | None = None,
        prefix: Sequence[str] = (),
        server: str | None = None,
    ) -> subprocess.Popen[bytes]:
        key = key or self.keys_create()
        return self.spawn(
            [
                *HOMEPORT,
                "up",
                "--state",
                str(self.state(name)),
                "--server",
                server or self.server_addr,
                "--authkey",
                key,
                "--name",
                name,
                *args,
            ],
            f"agent-{name}",
            prefix,
        )

    def wait_online(
        self, name: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30
    ) -> None:
        def ok() -> bool:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(
                    f"agent {name} exited {proc.returncode}:\n{self.log('agent-' + name)}"
                )
            return self.node_online(name)

        wait_for(ok, timeout, f"{name} online\n{self.log('agent-' + name)}", interval=0.1)

    def proxy_command(self, state: Path) -> str:
        """The ProxyCommand exactly as ``homeport ssh`` and ``ssh-config`` write it."""
        from homeport.client.ssh import proxy_command

        return proxy_command(state)

    def ssh_options(self, state: Path) -> list[str]:
        """``-o`` arguments for exactly the options ``homeport ssh`` / ``ssh-config`` write."""
        from homeport.client.ssh import ssh_options

        out: list[str] = []
        for key, value in ssh_options(state):
            out += ["-o", f"{key}={value}"]
        return out

    def ssh_args(self, state: Path, key: Path, user: str) -> list[str]:
        return [
            "ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", *self.ssh_options(state), "-l", user,
        ]  # fmt: skip

    def scp_args(self, state: Path, key: Path) -> list[str]:
        return [
            "scp", "-q", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", *self.ssh_options(state),
        ]  # fmt: skip
