"""A NAT lab built from Linux network namespaces (needs root).

homeport exists because machines behind NAT cannot be reached from outside.
Tests on loopback cannot show that the relay really works under that
constraint, so this module builds a miniature Internet in which inbound
connections to the "home" machines are genuinely impossible::

             inet ns: bridge "Internet" 203.0.113.0/24
               |                  |                   |
     server 203.0.113.10   rt_lab 203.0.113.21   rt_laptop 203.0.113.22
                             | NAT (MASQUERADE)     | NAT (MASQUERADE)
                           lab 10.10.1.2          laptop 10.10.2.2
                           (via 10.10.1.1)        (via 10.10.2.1)

Network-safety rules the implementation keeps (do not relax them):

* Traffic stays inside namespaces this module creates: every veth pair is
  created *inside* a lab namespace with its peer placed directly in another
  lab namespace (``ip -n A link add X type veth peer name Y netns B``), so no
  interface ever exists in the root namespace, and nothing is routed to it.
* "Public" addresses come only from the documentation range 203.0.113.0/24
  (RFC 5737); private 10.x addresses exist only inside the lab.
* Everything is named with a per-run prefix and deleted by name in
  :meth:`NatLab.close`, which also runs when creation fails halfway and is
  registered with :mod:`atexit` as a last resort.

The routers drop new WAN->LAN connections (FORWARD policy DROP, only LAN->WAN
and established/related traffic pass), and have no route to the other home
network, so lab <-> laptop private addressing fails just as it would between
two real homes.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

__all__ = ["CommandError", "NatLab", "NatLabError", "netns_available"]

_IFNAMSIZ = 15  # Linux interface names are at most 15 bytes.
_LONGEST_ROLE = 4  # longest interface role suffix used below ("isrv", "wlab", ...)
MAX_PREFIX_LEN = _IFNAMSIZ - _LONGEST_ROLE

LOGICAL_NAMES = ("inet", "server", "rt_lab", "lab", "rt_laptop", "laptop")


class NatLabError(RuntimeError):
    """Building or tearing down the lab failed; the message says which step and why."""


class CommandError(subprocess.CalledProcessError):
    """A :class:`subprocess.CalledProcessError` whose message includes stderr.

    Plain ``CalledProcessError`` only shows the exit status, which makes a
    failing ``ip``/``iptables`` call in a test log nearly useless.
    """

    def __str__(self) -> str:
        base = super().__str__()
        err = self.stderr
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        return f"{base}\nstderr: {err.strip()}" if err else base


def _run_checked(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    proc = subprocess.run(list(argv), check=False, **kw)
    if proc.returncode != 0:
        raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


@functools.cache
def netns_available() -> tuple[bool, str]:
    """Report whether :class:`NatLab` can work here, and if not, why.

    Beyond "am I root", it builds and deletes a throw-away namespace with a
    veth pair and the exact iptables rules a router uses, because containers
    often lack one of those capabilities (no CAP_SYS_ADMIN, no nf_nat or
    conntrack support) while looking fine otherwise.  Cached: the answer does
    not change within a process.
    """
    if os.geteuid() != 0:
        return False, "NAT lab needs root (network namespaces, iptables)"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables"), ("sysctl", "procps")):
        if shutil.which(tool) is None:
            return False, f"{tool} not found on PATH (install {package})"
    name = f"hpchk{os.getpid()}{secrets.token_hex(2)}"
    try:
        _run_checked(["ip", "netns", "add", name])
    except (CommandError, OSError) as exc:
        return False, f"cannot create a network namespace: {exc}"
    try:
        _run_checked(
            ["ip", "-n", name, "link", "add", "hpa", "type", "veth", "peer", "name", "hpb"]
        )
        ipt = ["ip", "netns", "exec", name, "iptables", "-w", "5"]
        _run_checked([*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "hpa", "-j", "MASQUERADE"])
        _run_checked(
            [*ipt, "-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED", "-j", "ACCEPT"]
        )
        _run_checked(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    except (CommandError, OSError) as exc:
        return False, f"namespace created but lab setup step failed: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return True, "network namespaces, veth, iptables NAT and conntrack available"


# Polls for a TCP listener inside a namespace; run via `ip netns exec ... python -c`,
# because this process cannot open sockets in another namespace.
_WAIT_TCP = """
import socket, sys, time
host, port, end = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        sys.exit(0)
    except OSError:
        if time.monotonic() >= end:
            sys.exit(1)
        # Connection refused returns at once; a short pause keeps this
        # bounded loop from spinning while the listener starts.
        time.sleep(0.02)
"""


class NatLab:
    """The NAT lab; a context manager that creates it on enter and destroys it on exit.

    ``names`` maps the logical namespace names (``"inet"``, ``"server"``,
    ``"rt_lab"``, ``"lab"``, ``"rt_laptop"``, ``"laptop"``) to the real ones,
    which carry a per-run prefix so parallel runs never collide.
    """

    server_ip: str = "203.0.113.10"
    public_ips: dict[str, str] = {"rt_lab": "203.0.113.21", "rt_laptop": "203.0.113.22"}
    """The routers' WAN addresses: what the server sees as the homes' source address."""
    lan_ips: dict[str, str] = {
        "rt_lab": "10.10.1.1",
        "lab": "10.10.1.2",
        "rt_laptop": "10.10.2.1",
        "laptop": "10.10.2.2",
    }

    def __init__(self, prefix: str | None = None) -> None:
        if prefix is None:
            prefix = f"hp{secrets.token_hex(3)}"
        if not prefix or len(prefix) > MAX_PREFIX_LEN or not prefix.isascii():
            raise ValueError(
                f"prefix must be 1..{MAX_PREFIX_LEN} ASCII characters "
                f"(interface names are limited to {_IFNAMSIZ}): {prefix!r}"
            )
        if not all(ch.isalnum() or ch in "-_" for ch in prefix):
            raise ValueError(f"prefix may contain only letters, digits, '-' and '_': {prefix!r}")
        self.prefix = prefix
        self.names: dict[str, str] = {logical: f"{prefix}-{logical}" for logical in LOGICAL_NAMES}
        p = prefix
        # Interface names, by role.  They live only inside lab namespaces, but
        # carry the prefix anyway so `ip link` output is attributable to a run.
        self.ifaces: dict[str, str] = {
            "bridge": f"{p}br",  # inet: the "Internet" segment
            "server": f"{p}srv",  # server: its only interface
            "inet_server": f"{p}isrv",  # inet: bridge port towards server
            "rt_lab_wan": f"{p}wlab",
            "inet_rt_lab": f"{p}ilab",
            "rt_lab_lan": f"{p}llab",
            "lab": f"{p}hlab",
            "rt_laptop_wan": f"{p}wlap",
            "inet_rt_laptop": f"{p}ilap",
            "rt_laptop_lan": f"{p}llap",
            "laptop": f"{p}hlap",
        }
        assert all(len(name) <= _IFNAMSIZ for name in self.ifaces.values())
        self._created: list[str] = []  # real namespace names, in creation order
        self._procs: list[subprocess.Popen[Any]] = []
        self._atexit_registered = False

    # -- names and commands -------------------------------------------------

    def ns(self, logical: str) -> str:
        """The real namespace name for a logical one (KeyError if unknown)."""
        return self.names[logical]

    def cmd(self, logical: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside the namespace (``ip netns exec``)."""
        return ["ip", "netns", "exec", self.ns(logical), *argv]

    def run(self, logical: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace: checked, text, captured (all overridable via ``kw``).

        Failures raise :class:`CommandError`, whose message includes stderr.
        """
        return run_command(self.cmd(logical, argv), **kw)

    def popen(self, logical: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the namespace; :meth:`close` terminates it by PID.

        ``ip netns exec`` execs the command, so the Popen's PID is the
        command's own and terminating it reaches the right process.
        """
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.cmd(logical, argv), **kw)
        self._procs.append(proc)
        return proc

    def wait_tcp(self, logical: str, host: str, port: int, timeout: float = 10.0) -> None:
        """Return once ``host:port`` accepts TCP connections as seen from ``logical``.

        Raises ``TimeoutError`` otherwise.  The polling runs inside the
        namespace, in one helper process bounded by ``timeout``.
        """
        proc = self.run(
            logical,
            [sys.executable, "-c", _WAIT_TCP, host, str(port), str(timeout)],
            check=False,
            timeout=timeout + 10.0,
        )
        if proc.returncode != 0:
            raise TimeoutError(
                f"{host}:{port} not accepting in {logical} ({self.ns(logical)}) "
                f"after {timeout}s {proc.stderr.strip()}"
            )

    # -- lifecycle ----------------------------------------------------------

    def __enter__(self) -> Self:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def create(self) -> None:
        """Build the whole lab; on any failure, remove what was built and re-raise."""
        if self._created:
            raise NatLabError(f"lab {self.prefix} already created")
        if not self._atexit_registered:
            atexit.register(self.close)
            self._atexit_registered = True
        try:
            self._create_namespaces()
            self._create_internet()
            self._create_server()
            self._create_home("rt_lab", "lab")
            self._create_home("rt_laptop", "laptop")
        except BaseException:
            # Deliberately BaseException: a KeyboardInterrupt mid-way must not
            # leave namespaces behind either.
            with contextlib.suppress(NatLabError):
                self.close()
            raise

    def _step(self, what: str, argv: Sequence[str]) -> None:
        try:
            _run_checked(argv)
        except CommandError as exc:
            raise NatLabError(
                f"NAT lab {self.prefix}: {what} failed: {' '.join(map(str, exc.cmd))}: "
                f"exit {exc.returncode}: {(exc.stderr or '').strip()}"
            ) from exc

    def _ip(self, logical: str, what: str, *args: str) -> None:
        self._step(what, ["ip", "-n", self.ns(logical), *args])

    def _in_ns(self, logical: str, what: str, *argv: str) -> None:
        self._step(what, self.cmd(logical, argv))

    def _create_namespaces(self) -> None:
        for logical in LOGICAL_NAMES:
            real = self.ns(logical)
            self._step(f"creating namespace {logical}", ["ip", "netns", "add", real])
            self._created.append(real)
            self._ip(logical, f"bringing up lo in {logical}", "link", "set", "lo", "up")

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        # Created inside ns_a with the peer placed straight into ns_b: neither
        # end ever exists in the root namespace.
        self._ip(
            ns_a,
            f"creating veth {ns_a}/{if_a} <-> {ns_b}/{if_b}",
            "link",
            "add",
            if_a,
            "type",
            "veth",
            "peer",
            "name",
            if_b,
            "netns",
            self.ns(ns_b),
        )

    def _addr_up(self, logical: str, iface: str, cidr: str) -> None:
        self._ip(logical, f"adding {cidr} to {logical}/{iface}", "addr", "add", cidr, "dev", iface)
        self._ip(logical, f"bringing up {logical}/{iface}", "link", "set", iface, "up")

    def _bridge_port(self, iface: str) -> None:
        bridge = self.ifaces["bridge"]
        self._ip("inet", f"attaching {iface} to {bridge}", "link", "set", iface, "master", bridge)
        self._ip("inet", f"bringing up inet/{iface}", "link", "set", iface, "up")

    def _create_internet(self) -> None:
        bridge = self.ifaces["bridge"]
        self._ip("inet", "creating bridge", "link", "add", bridge, "type", "bridge")
        self._ip("inet", "bringing up bridge", "link", "set", bridge, "up")

    def _create_server(self) -> None:
        srv, port = self.ifaces["server"], self.ifaces["inet_server"]
        self._veth("server", srv, "inet", port)
        self._bridge_port(port)
        # Only the /24: the server needs to answer the routers' public
        # addresses and nothing else, so it has no default route.
        self._addr_up("server", srv, f"{self.server_ip}/24")

    def _create_home(self, router: str, host: str) -> None:
        wan, port = self.ifaces[f"{router}_wan"], self.ifaces[f"inet_{router}"]
        lan, host_if = self.ifaces[f"{router}_lan"], self.ifaces[host]
        gateway = self.lan_ips[router]

        self._veth(router, wan, "inet", port)
        self._bridge_port(port)
        self._addr_up(router, wan, f"{self.public_ips[router]}/24")

        self._veth(router, lan, host, host_if)
        self._addr_up(router, lan, f"{gateway}/24")
        self._addr_up(host, host_if, f"{self.lan_ips[host]}/24")
        self._ip(host, f"default route in {host}", "route", "add", "default", "via", gateway)

        self._in_ns(router, f"ip_forward in {router}", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ipt = ["iptables", "-w", "5"]
        rules: list[tuple[str, list[str]]] = [
            ("masquerade", ["-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE"]),
            ("forward policy", ["-P", "FORWARD", "DROP"]),
            (
                "established/related",
                [
                    *("-A", "FORWARD", "-m", "conntrack"),
                    *("--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"),
                ],
            ),
            ("LAN->WAN", ["-A", "FORWARD", "-i", lan, "-o", wan, "-j", "ACCEPT"]),
        ]
        for what, rule in rules:
            self._in_ns(router, f"iptables {what} in {router}", *ipt, *rule)

    def close(self) -> None:
        """Tear everything down; idempotent and safe after a partial :meth:`create`.

        Order matters: processes first (a namespace with live processes
        outlives ``ip netns del`` along with its interfaces), then the
        namespaces, which takes their veths, bridge and iptables rules along.
        Every step is attempted; failures are reported together at the end.
        """
        procs, self._procs = self._procs, []
        created, self._created = self._created, []
        errors = teardown(procs, created)
        if self._atexit_registered:
            atexit.unregister(self.close)
            self._atexit_registered = False
        if errors:
            raise NatLabError(f"NAT lab {self.prefix} cleanup incomplete: " + "; ".join(errors))

    @staticmethod
    def _kill_stragglers(real: str) -> list[str]:
        """SIGKILL processes still inside one of *our* namespaces.

        These can only have been started there through this lab (e.g.
        daemons forked by a :meth:`run` command, or an sshd started with
        ``make_sshd(netns=...)`` and never stopped).  Killed by PID, then
        polled with a deadline until gone.
        """
        proc = subprocess.run(
            ["ip", "netns", "pids", real], capture_output=True, text=True, check=False
        )
        pids = [int(tok) for tok in proc.stdout.split() if tok.isdigit()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return [
            f"pid {pid} in {real} survived SIGKILL" for pid in pids if not _await_exit(pid, 5.0)
        ]


def run_command(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``argv``: checked (``check=True`` unless given), text, captured (overridable).

    Failures raise :class:`CommandError`, whose message includes stderr.
    """
    check = kw.pop("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    proc: subprocess.CompletedProcess[str] = subprocess.run(argv, check=False, **kw)
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def teardown(procs: Sequence[subprocess.Popen[Any]], created: Sequence[str]) -> list[str]:
    """Stop ``procs`` by PID, then delete the namespaces ``created`` (newest first) by name.

    Processes go first: a namespace with live processes outlives ``ip netns del``
    along with its interfaces. Every step is attempted; the failures are returned.
    """
    errors: list[str] = []
    for proc in procs:
        _stop_process(proc)
    for real in reversed(created):
        errors.extend(NatLab._kill_stragglers(real))
        deleted = subprocess.run(
            ["ip", "netns", "del", real], capture_output=True, text=True, check=False
        )
        if deleted.returncode != 0 and real in _list_netns():
            errors.append(f"ip netns del {real}: {deleted.stderr.strip()}")
    return errors


def _await_exit(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to exit (a pidfd turns readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def _stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _list_netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    # Lines look like "name" or "name (id: 3)".
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
