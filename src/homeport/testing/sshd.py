"""A real, throw-away OpenSSH ``sshd`` for tests and benchmarks.

homeport's whole promise is that *plain* OpenSSH works through the relay, so the
end-to-end tests must talk to the real ``/usr/sbin/sshd`` rather than a Python
SSH server that might forgive protocol mistakes.  This module runs one on an
unprivileged port with everything (host keys, client key, ``authorized_keys``,
config, log, ``known_hosts``) inside a caller-supplied directory, so nothing in
``~/.ssh`` or ``/etc/ssh`` is read or changed.

Typical use::

    with make_sshd(tmp_path) as sshd:
        out = subprocess.run(
            [*sshd.ssh_base_args(), "-p", str(sshd.port), sshd.host, "echo", "ok"],
            check=True, capture_output=True, text=True,
        ).stdout

Caveats (deliberately not worked around):

* Commands run through the login user's *login shell*, which sources its rc
  files.  On a machine whose ``~/.bashrc`` is slow (e.g. ``pyenv init`` costs
  ~85 ms per session for root) every ``ssh host cmd`` pays that.  Benchmarks
  that care should measure a baseline over the direct connection
  (:meth:`SshdServer.ssh_base_args`) and compare against it, rather than this
  module hiding the shell behind a ``ForceCommand``, which would stop tests
  from exercising what a real user gets.
* Only the current user can log in: run unprivileged, sshd cannot switch users;
  run as root it can, but the key is only authorized for the current user.
  With ``UsePAM no`` sshd refuses *locked* accounts (shadow password starting
  with ``!``), even for key logins; e.g. the ``nobody`` that nss-systemd
  synthesizes is locked, so sshd starts as ``nobody`` but nobody can log in.
* As root, sshd insists on its privilege-separation directory ``/run/sshd``; it
  is created (mode 0755) if missing, which is the only change outside
  ``workdir``.  The ``sshd`` system user must exist (the Debian package adds it).
* ``extra_config`` is placed *before* the generated defaults because sshd uses
  the first value it reads for single-valued keywords, so callers can override
  them.  Additive keywords (``Port``, ``ListenAddress``, ``HostKey``) would add
  to the defaults instead, and a ``Match`` block would swallow the defaults that
  follow it, so do not put ``Match`` in ``extra_config``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from homeport.testing.deadline import Deadline

__all__ = ["SSHD_BIN", "SshdServer", "make_sshd", "sshd_available"]

SSHD_BIN = "/usr/sbin/sshd"
"""sshd must be run by absolute path: it re-executes itself for every connection."""

_PRIVSEP_DIR = Path("/run/sshd")


def _probe(host: str, port: int) -> bool:
    """True once an SSH server answers on ``host:port``.

    It reads sshd's banner and answers with an identification string before
    closing: a bare connect-and-close makes sshd log "kex_exchange_identification:
    Connection closed" at ERROR level, which would pollute the log that tests
    read when something really fails.
    """
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            if not sock.recv(256).startswith(b"SSH-"):
                return False
            sock.sendall(b"SSH-2.0-homeport_readiness_probe\r\n")
    except OSError:
        return False
    return True


def sshd_available() -> tuple[bool, str]:
    """Report whether a test can run :func:`make_sshd` here, and if not, why.

    Returned as ``(ok, reason)`` so tests can ``pytest.skip(reason)`` with a
    message that tells the reader what to install.
    """
    if not Path(SSHD_BIN).is_file():
        return False, f"{SSHD_BIN} not found (install openssh-server)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found on PATH (install openssh-client)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("sshd")
        except KeyError:
            return False, "running as root but the 'sshd' privilege-separation user is missing"
    return True, "sshd available"


def _current_user() -> str:
    # The uid's own name, not $USER/$LOGNAME: an unprivileged sshd can only
    # log in the account it runs as, whatever the environment claims.
    return pwd.getpwuid(os.geteuid()).pw_name


def _free_port(host: str) -> int:
    """Ask the kernel for a free port (racy by nature, accepted for tests)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _keygen(path: Path, key_type: str, comment: str) -> None:
    proc = subprocess.run(
        ["ssh-keygen", "-q", "-N", "", "-t", key_type, "-C", comment, "-f", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ssh-keygen -t {key_type} failed: {proc.stderr.strip()}")


def _pub(private_key: Path) -> Path:
    """ssh-keygen's public half: the private key's name plus ``.pub``."""
    return private_key.with_name(private_key.name + ".pub")


def _quote(path: Path) -> str:
    # sshd_config accepts double-quoted arguments; quoting keeps paths with
    # spaces (e.g. odd tmp dirs) intact.
    return f'"{path}"'


@dataclass(kw_only=True)
class SshdServer:
    """A prepared (and, once :meth:`start`-ed, running) sshd.

    Create it with :func:`make_sshd`; use it as a context manager to get
    start-on-enter and stop-on-exit even when the test body fails.
    """

    workdir: Path
    port: int
    host: str = "127.0.0.1"
    user: str
    client_key: Path
    host_key_pubs: list[Path]
    process: subprocess.Popen[bytes] | None = None
    netns: str | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "sshd_config"

    @property
    def log_path(self) -> Path:
        """sshd's stderr (``-e``): read it when a connection is refused."""
        return self.workdir / "sshd.log"

    @property
    def known_hosts_path(self) -> Path:
        return self.workdir / "known_hosts_direct"

    def _argv(self) -> list[str]:
        argv = [SSHD_BIN, "-D", "-e", "-f", str(self.config_path)]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no sshd log>"
        return text[-limit:].strip() or "<sshd log empty>"

    def _port_accepts(self) -> bool:
        if self.netns is None:
            return _probe(self.host, self.port)
        # The parent cannot connect across namespaces, so run this very file
        # (stdlib-only imports, hence no sys.path needs) inside the namespace.
        probe = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                sys.executable,
                __file__,
                "probe",
                self.host,
                str(self.port),
            ],
            capture_output=True,
            check=False,
        )
        return probe.returncode == 0

    def start(self, timeout: float = 10.0) -> None:
        """Start sshd and return once its port accepts TCP connections.

        Raises ``RuntimeError`` (with sshd's own words) if the config is bad or
        sshd exits, and ``TimeoutError`` if the port never opens in time.
        """
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"sshd already running (pid {self.process.pid})")
        if os.geteuid() == 0 and not _PRIVSEP_DIR.is_dir():
            _PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        # `sshd -t` turns config mistakes into a clear error instead of a
        # process that dies while we poll.
        check = subprocess.run(
            [SSHD_BIN, "-t", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise RuntimeError(
                f"sshd rejected {self.config_path}: {check.stderr.strip() or check.stdout.strip()}"
            )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Own process group, so a Ctrl-C aimed at the test runner
                # does not race with our orderly stop().
                start_new_session=True,
            )
        if not self._wait_until_listening(timeout):
            self.stop()
            raise TimeoutError(
                f"sshd did not accept on {self.host}:{self.port} within {timeout}s; "
                f"log: {self._log_tail()}"
            )

    def _wait_until_listening(self, timeout: float) -> bool:
        assert self.process is not None
        clock = Deadline(timeout)
        while not clock.expired():
            if self._port_accepts():
                return True
            # Waiting on the process paces the loop and notices an early
            # exit at the same time (no bare sleep).
            try:
                code = self.process.wait(timeout=min(0.02, clock.remaining()))
            except subprocess.TimeoutExpired:
                continue
            self.process = None
            raise RuntimeError(f"sshd exited with status {code}; log: {self._log_tail()}")
        return False

    def stop(self) -> None:
        """Terminate sshd by PID, escalating to SIGKILL; safe to call twice."""
        proc = self.process
        if proc is None:
            return
        self.process = None
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)

    def ssh_base_args(self, known_hosts: Path | None = None) -> list[str]:
        """An ``ssh`` argv prefix that reaches this server and nothing else.

        ``-F /dev/null`` and the explicit known-hosts files keep the user's and
        the system's ssh configuration out of tests; ``StrictHostKeyChecking``
        is on so a test fails if the wrong server answers.  Append ``-p PORT``,
        the host and the command.

        ssh keeps the *first* value it sees for an option, so ``-o`` options
        appended after this prefix cannot override these.  To pin the host
        keys under another name (e.g. reaching this sshd through the relay),
        pass ``known_hosts`` (a file written from :meth:`known_hosts_line`);
        it defaults to ``<workdir>/known_hosts_direct``.
        """
        if known_hosts is None:
            known_hosts = self.known_hosts_path
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-l",
            self.user,
        ]

    def known_hosts_line(self, hostname: str) -> str:
        """``known_hosts`` lines (``"<hostname> <type> <base64>\\n"`` each) for every host key.

        This is what a pinned ``known_hosts`` needs so that ssh, reaching this
        sshd through the relay under some other name, still verifies it.
        """
        lines = []
        for pub in self.host_key_pubs:
            key_type, blob = pub.read_text().split()[:2]
            lines.append(f"{hostname} {key_type} {blob}\n")
        return "".join(lines)

    def write_direct_known_hosts(self) -> None:
        """Pin the host keys for a direct connection (``[host]:port``)."""
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        self.known_hosts_path.write_text(self.known_hosts_line(name))

    def __enter__(self) -> Self:
        if self.process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def make_sshd(
    workdir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    extra_config: str = "",
    netns: str | None = None,
) -> SshdServer:
    """Prepare keys, ``authorized_keys``, config and ``known_hosts_direct`` in ``workdir``.

    The server is not started: call :meth:`SshdServer.start` or use it in a
    ``with`` block.  With ``netns``, sshd runs inside that network namespace
    (``host`` must then be an address there, e.g. ``127.0.0.1`` of the
    namespace), so the free-port probe only needs to avoid our own ports.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = _free_port("127.0.0.1" if netns is not None else host)

    host_keys = [workdir / "ssh_host_ed25519_key", workdir / "ssh_host_ecdsa_key"]
    for key, key_type in zip(host_keys, ("ed25519", "ecdsa"), strict=True):
        if not key.exists():
            _keygen(key, key_type, f"homeport-test-host-{key_type}")
    client_key = workdir / "client_ed25519"
    if not client_key.exists():
        _keygen(client_key, "ed25519", "homeport-test-client")
    authorized_keys = workdir / "authorized_keys"
    authorized_keys.write_text(_pub(client_key).read_text())
    authorized_keys.chmod(0o600)

    host_key_lines = "".join(f"HostKey {_quote(key)}\n" for key in host_keys)
    config = (
        (extra_config.rstrip("\n") + "\n" if extra_config.strip() else "")
        + f"Port {port}\n"
        + f"ListenAddress {host}\n"
        + host_key_lines
        + "PidFile none\n"
        + "UsePAM no\n"
        + "StrictModes no\n"
        + "PermitRootLogin prohibit-password\n"
        + "PasswordAuthentication no\n"
        + "KbdInteractiveAuthentication no\n"
        + "PubkeyAuthentication yes\n"
        + f"AuthorizedKeysFile {_quote(authorized_keys)}\n"
        + "AllowTcpForwarding yes\n"
        # Benchmarks open many connections at once; the default (10:30:100)
        # would randomly drop unauthenticated ones beyond ten.
        + "MaxStartups 200\n"
        + "Subsystem sftp internal-sftp\n"
        + "LogLevel ERROR\n"
        # No AcceptEnv line: sshd then accepts no client environment, which
        # keeps the caller's locale etc. from leaking into sessions.
    )
    (workdir / "sshd_config").write_text(config)

    server = SshdServer(
        workdir=workdir,
        port=port,
        host=host,
        user=_current_user(),
        client_key=client_key,
        host_key_pubs=[_pub(key) for key in host_keys],
        netns=netns,
    )
    server.write_direct_known_hosts()
    return server


if __name__ == "__main__":
    # `python sshd.py probe HOST PORT`: the in-namespace readiness check.
    if len(sys.argv) == 4 and sys.argv[1] == "probe":
        sys.exit(0 if _probe(sys.argv[2], int(sys.argv[3])) else 1)
    sys.exit(f"usage: {sys.argv[0]} probe HOST PORT")
