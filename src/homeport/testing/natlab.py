"""A general NAT lab: segments, routers (EIM / symmetric / CGN / port forward), hosts (needs root).

:mod:`homeport.testing.netns` builds one fixed two-home topology; this module
builds any tree of them, which the direct-path matrix needs::

    inet (bridge, 203.0.113.0/24) ── server 203.0.113.10, public hosts, router WANs
      └ router (own LAN bridge br0) ── hosts / another router (carrier-grade NAT)

Every node is a network namespace ``<prefix>-<name>``; every segment is a bridge
``br0`` inside the namespace that owns it (``inet`` for the Internet, the router
for its LAN). The same safety rules as ``netns`` hold and are kept by the same
code: veth pairs are created inside a lab namespace with the peer placed straight
into another (never in the root namespace); "public" addresses only from
203.0.113.0/24 (and 198.51.100.0/24, 192.0.2.0/24); 10.x and 100.64.0.0/10 only
inside the lab; everything is deleted by name in :meth:`Lab.close` (processes
first, by PID).

Routers behave like home routers: MASQUERADE on the WAN (``nat="eim"``: Linux
keeps the source port, so the mapping is endpoint-independent; ``nat="edm"``:
``--random-fully``, a new port per destination, i.e. "symmetric"), FORWARD
policy DROP except LAN->WAN and established/related (and DNAT'd flows, for
forwards and mappings), and new inbound connections to the router's own WAN
address are dropped silently (no RST, which would abort a punch).

:meth:`Lab.flush_conntrack` makes a router forget its mappings (a NAT reboot);
:meth:`Lab.blackhole` silently drops a path until healed.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from homeport.testing.deadline import wait_for
from homeport.testing.netns import (
    MAX_PREFIX_LEN,
    CommandError,
    NatLabError,
    _run_checked,
    _stop_process,
    netns_available,
    run_command,
    teardown,
)

__all__ = [
    "DIRECT_PORT",
    "MATRIX",
    "MATRIX_ROUTERS",
    "Host",
    "Lab",
    "MatrixRow",
    "Router",
    "build_matrix_lab",
    "conntrack_available",
    "natlab_available",
]

#: The direct port every lab host uses.
DIRECT_PORT = 41641
#: The lab "server": whoami on its main port and its probe port.
SERVER_IP = "203.0.113.10"
#: The server's second address (only the lab STUN responder uses it, for CHANGE-REQUEST).
SERVER_IP2 = "203.0.113.11"
STUN_PORTS = (3478, 3479)
SERVER_MAIN_PORT = 7000
SERVER_PROBE_PORT = 7001
_IPT = ("iptables", "-w", "5")


def conntrack_available() -> tuple[bool, str]:
    if shutil.which("conntrack") is None:
        return False, "conntrack not found on PATH (install conntrack)"
    return True, "conntrack available"


def natlab_available() -> tuple[bool, str]:
    """Whether :class:`Lab` can work here (root, namespaces, veth, iptables NAT), and why not."""
    return netns_available()


@dataclass(frozen=True)
class Router:
    name: str
    wan_ip: str
    lan_gw: str  # the router's address on its LAN (hosts' default gateway)
    nat: str  # "eim" | "edm"


@dataclass(frozen=True)
class Host:
    name: str
    ip: str
    router: str | None  # None: directly on the Internet segment


@dataclass
class _Counter:
    n: int = 0

    def next(self) -> int:
        self.n += 1
        return self.n


class Lab:
    """A NAT lab built step by step; a context manager that destroys it on exit."""

    def __init__(self, prefix: str | None = None) -> None:
        if prefix is None:
            prefix = f"hq{secrets.token_hex(3)}"
        if not prefix or len(prefix) > MAX_PREFIX_LEN or not prefix.replace("-", "").isalnum():
            raise ValueError(f"bad lab prefix {prefix!r}")
        self.prefix = prefix
        self.routers: dict[str, Router] = {}
        #: What answers NAT-PMP/PCP in the matrix ("miniupnpd" or the "lab-natpmp" stand-in).
        self.portmap_daemon = ""
        self.hosts: dict[str, Host] = {}
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._ports = _Counter()
        self._atexit = False

    # -- names and commands ---------------------------------------------------------------

    def ns(self, name: str) -> str:
        real = f"{self.prefix}-{name}"
        if real not in self._created:
            raise KeyError(name)
        return real

    def cmd(self, name: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name), *argv]

    def run(self, name: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in namespace ``name``: checked, text, captured (overridable)."""
        return run_command(self.cmd(name, argv), **kw)

    def popen(self, name: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        """Start ``argv`` in ``name``; :meth:`close` stops it by PID."""
        kw.setdefault("text", True)
        proc: subprocess.Popen[str] = subprocess.Popen(self.cmd(name, argv), **kw)
        self._procs.append(proc)
        return proc

    def labnode(self, name: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
        """Start ``python -m homeport.testing.labnode ARGS`` in ``name`` (stdin/stdout piped)."""
        kw.setdefault("stdin", subprocess.PIPE)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return self.popen(name, [sys.executable, "-m", "homeport.testing.labnode", *args], **kw)

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        _stop_process(proc)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    # -- building blocks ------------------------------------------------------------------

    def _step(self, what: str, argv: Sequence[str]) -> None:
        try:
            _run_checked(argv)
        except CommandError as exc:
            raise NatLabError(
                f"lab {self.prefix}: {what} failed: {' '.join(map(str, exc.cmd))}: "
                f"{(exc.stderr or '').strip()}"
            ) from exc

    def _ip(self, name: str, *args: str) -> None:
        self._step(f"ip {' '.join(args)} in {name}", ["ip", "-n", self.ns(name), *args])

    def _ipt(self, name: str, *rule: str) -> None:
        self._step(f"iptables {' '.join(rule)} in {name}", self.cmd(name, [*_IPT, *rule]))

    def _add_ns(self, name: str) -> None:
        if not self._atexit:
            atexit.register(self.close)
            self._atexit = True
        real = f"{self.prefix}-{name}"
        self._step(f"creating namespace {name}", ["ip", "netns", "add", real])
        self._created.append(real)
        self._ip(name, "link", "set", "lo", "up")

    def _segment(self, owner: str, cidr: str | None = None) -> None:
        self._ip(owner, "link", "add", "br0", "type", "bridge")
        self._ip(owner, "link", "set", "br0", "up")
        if cidr is not None:
            self._ip(owner, "addr", "add", cidr, "dev", "br0")

    def _plug(self, name: str, ifname: str, segment: str, cidr: str) -> None:
        """A veth from ``name``/``ifname`` into ``segment``'s bridge; neither end in the root ns."""
        port = f"p{self._ports.next()}"
        self._ip(name, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns",
                 self.ns(segment))  # fmt: skip
        self._ip(segment, "link", "set", port, "master", "br0")
        self._ip(segment, "link", "set", port, "up")
        self._ip(name, "addr", "add", cidr, "dev", ifname)
        self._ip(name, "link", "set", ifname, "up")

    def internet(self, cidr_bits: int = 24) -> None:
        """The Internet segment (namespace ``inet``) and the whoami server on it."""
        self._add_ns("inet")
        self._segment("inet")
        self._add_ns("server")
        self._plug("server", "eth0", "inet", f"{SERVER_IP}/{cidr_bits}")
        self._ip("server", "addr", "add", f"{SERVER_IP2}/{cidr_bits}", "dev", "eth0")

    def public_host(self, name: str, ip: str) -> Host:
        self._add_ns(name)
        self._plug(name, "eth0", "inet", f"{ip}/24")
        host = Host(name, ip, None)
        self.hosts[name] = host
        return host

    def router(
        self,
        name: str,
        *,
        wan_ip: str,
        lan: str,
        nat: str = "eim",
        upstream: str = "inet",
        upstream_gw: str | None = None,
        allow_out: Sequence[tuple[str, int]] | None = None,
    ) -> Router:
        """A NAT router with WAN ``wan_ip`` on ``upstream``'s segment and LAN gateway ``lan``.

        ``lan`` is ``"10.20.1.1/24"``; ``upstream_gw`` is the default route (a router
        behind a carrier-grade NAT); ``allow_out`` restricts LAN->WAN to these TCP
        destinations (everything else is rejected).
        """
        if nat not in ("eim", "edm"):
            raise ValueError(f"nat must be eim or edm, not {nat!r}")
        self._add_ns(name)
        self._plug(name, "wan", upstream, f"{wan_ip}/24")
        if upstream_gw is not None:
            self._ip(name, "route", "add", "default", "via", upstream_gw)
        self._segment(name, lan)
        self._step(
            f"ip_forward in {name}",
            self.cmd(name, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]),
        )
        # Only LAN traffic is translated (the router's own traffic keeps its port).
        subnet = str(ipaddress.ip_interface(lan).network)
        masq = ["-t", "nat", "-A", "POSTROUTING", "-s", subnet, "-o", "wan", "-j", "MASQUERADE"]
        if nat == "edm":
            masq.append("--random-fully")
        est = ("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        self._ipt(name, *masq)
        self._ipt(name, "-P", "FORWARD", "DROP")
        self._ipt(name, "-A", "FORWARD", *est)
        self._ipt(name, "-A", "FORWARD", "-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT")
        # Host to host on the LAN bridge (seen here when br_netfilter is loaded).
        self._ipt(name, "-A", "FORWARD", "-i", "br0", "-o", "br0", "-j", "ACCEPT")
        if allow_out is None:
            self._ipt(name, "-A", "FORWARD", "-i", "br0", "-o", "wan", "-j", "ACCEPT")
        else:
            for ip, port in allow_out:
                self._ipt(name, "-A", "FORWARD", "-i", "br0", "-o", "wan", "-p", "tcp",
                          "-d", ip, "--dport", str(port), "-j", "ACCEPT")  # fmt: skip
            self._ipt(name, "-A", "FORWARD", "-i", "br0", "-p", "tcp",
                      "-j", "REJECT", "--reject-with", "tcp-reset")  # fmt: skip
            self._ipt(name, "-A", "FORWARD", "-i", "br0", "-j", "REJECT")
        self._ipt(name, "-A", "INPUT", "-i", "wan", *est)
        self._ipt(name, "-A", "INPUT", "-i", "wan", "-j", "DROP")
        r = Router(name, wan_ip, lan.split("/", maxsplit=1)[0], nat)
        self.routers[name] = r
        return r

    def host(self, name: str, router: str, ip: str) -> Host:
        """A host on ``router``'s LAN with default route via the router."""
        r = self.routers[router]
        self._add_ns(name)
        self._plug(name, "eth0", router, f"{ip}/24")
        self._ip(name, "route", "add", "default", "via", r.lan_gw)
        h = Host(name, ip, router)
        self.hosts[name] = h
        return h

    def port_forward(self, router: str, port: int, host: str) -> None:
        """A static TCP port forward ``router-wan:port -> host:port`` (like a home router's)."""
        r, h = self.routers[router], self.hosts[host]
        dnat = ("-j", "DNAT", "--to-destination", f"{h.ip}:{port}")
        self._ipt(router, "-t", "nat", "-A", "PREROUTING", "-d", r.wan_ip, "-p", "tcp",
                  "--dport", str(port), *dnat)  # fmt: skip

    def can_connect(self, name: str, ip: str, port: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connect from namespace ``name`` to ``ip:port`` completes in ``timeout``."""
        code = (
            "import socket,sys\n"
            "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])),"
            " timeout=float(sys.argv[3])).close()\n"
            "except OSError: sys.exit(1)\n"
        )
        argv = [sys.executable, "-c", code, ip, str(port), str(timeout)]
        return self.run(name, argv, check=False, timeout=timeout + 10).returncode == 0

    # -- faults ---------------------------------------------------------------------------

    def flush_conntrack(self, router: str) -> None:
        """Make ``router`` forget every connection and NAT mapping (``conntrack -F``)."""
        self.run(router, ["conntrack", "-F"])

    def conntrack_count(self, router: str) -> int:
        out = self.run(router, ["conntrack", "-C"]).stdout.strip()
        return int(out or 0)

    @contextlib.contextmanager
    def blackhole(self, router: str, peer_ip: str) -> Iterator[None]:
        """Silently drop everything ``router`` forwards to or from ``peer_ip`` while active."""
        rules = [("-s", peer_ip), ("-d", peer_ip)]
        for flag, ip in rules:
            self._ipt(router, "-I", "FORWARD", "1", flag, ip, "-j", "DROP")
        try:
            yield
        finally:
            for flag, ip in rules:
                self.run(router, [*_IPT, "-D", "FORWARD", flag, ip, "-j", "DROP"], check=False)

    def set_wan_ip(self, router: str, wan_ip: str) -> Router:
        """Give ``router`` a new WAN address (an ISP's new DHCP lease) in place of the old one.

        Deleting the old address makes the kernel drop the router's masqueraded
        connections, as on a real router: every flow through it must start over.
        """
        r = self.routers[router]
        # Old first: deleting a primary address also deletes its subnet's secondaries.
        self._ip(router, "addr", "del", f"{r.wan_ip}/24", "dev", "wan")
        self._ip(router, "addr", "add", f"{wan_ip}/24", "dev", "wan")
        new = Router(r.name, wan_ip, r.lan_gw, r.nat)
        self.routers[router] = new
        return new

    def move_host(self, name: str, router: str, ip: str) -> Host:
        """Unplug host ``name`` and plug it into ``router``'s LAN as ``ip`` (a laptop moving).

        Processes in the host's namespace keep running; their sockets keep the old,
        now foreign source address and die as they would on a real laptop.
        """
        r = self.routers[router]
        self._ip(name, "link", "del", "eth0")  # takes the peer port (in the old router) along
        self._plug(name, "eth0", router, f"{ip}/24")
        self._ip(name, "route", "add", "default", "via", r.lan_gw)
        h = Host(name, ip, router)
        self.hosts[name] = h
        return h

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop processes by PID, then delete namespaces by name; idempotent."""
        procs, self._procs = self._procs, []
        created, self._created = self._created, []
        errors = teardown(procs, created)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self._atexit:
            atexit.unregister(self.close)
            self._atexit = False
        if errors:
            raise NatLabError(f"lab {self.prefix} cleanup incomplete: " + "; ".join(errors))

    def namespaces(self) -> list[str]:
        return list(self._created)

    # -- lab programs ---------------------------------------------------------------------

    def start_whoami(self, ports: Sequence[int] = (SERVER_MAIN_PORT, SERVER_PROBE_PORT)) -> None:
        proc = self.labnode("server", "whoami", *map(str, ports))
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise NatLabError(f"whoami responder did not start: {proc.communicate()[1]}")

    def start_natpmp_gateway(self, router: str) -> None:
        r = self.routers[router]
        proc = self.labnode(router, "natpmp-gw", "--ext-ip", r.wan_ip, "--lan-ip", r.lan_gw)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise NatLabError(f"NAT-PMP gateway did not start: {proc.communicate()[1]}")

    def tmpdir(self) -> Path:
        """A private directory for lab config files, deleted by :meth:`close`."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{self.prefix}-")
        return Path(self._tmp.name)

    def start_stun(self) -> None:
        """The classic STUN responder on the server's two addresses (miniupnpd needs it)."""
        p1, p2 = STUN_PORTS
        proc = self.labnode("server", "stun", SERVER_IP, SERVER_IP2, str(p1), str(p2))
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise NatLabError(f"STUN responder did not start: {proc.communicate()[1]}")

    def start_miniupnpd(self, router: str) -> subprocess.Popen[str]:
        """Run the real miniupnpd (nftables flavour) on ``router`` with NAT-PMP/PCP on its LAN.

        miniupnpd 2.3.1 refuses to map ports when its WAN address is reserved, and
        every address the lab may use as "public" (TEST-NET) is reserved to it; with
        ``ext_perform_stun`` it asks a STUN server instead and, when the four RFC 3489
        tests pass (no NAT, no filtering), enables mapping. So the server runs a STUN
        responder (:meth:`start_stun`) and the router accepts its UDP answers.
        Returns once it listens on UDP 5351 (it does after STUN); :meth:`close` stops it.
        """
        r = self.routers[router]
        d = self.tmpdir()
        subnet = str(ipaddress.ip_interface(f"{r.lan_gw}/24").network)
        conf = d / f"miniupnpd-{router}.conf"
        conf.write_text(
            "ext_ifname=wan\nlistening_ip=br0\nenable_natpmp=yes\nenable_upnp=no\n"
            "secure_mode=yes\next_perform_stun=yes\n"
            f"ext_stun_host={SERVER_IP}\next_stun_port={STUN_PORTS[0]}\n"
            "upnp_table_name=miniupnpd\nupnp_nat_table_name=miniupnpd\n"
            f"allow 1024-65535 {subnet} 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
        )
        nft = d / f"miniupnpd-{router}.nft"
        nft.write_text(MINIUPNPD_NFT)
        self._step(
            f"nft tables for miniupnpd in {router}", self.cmd(router, ["nft", "-f", str(nft)])
        )
        self._ipt(
            router, "-I", "INPUT", "1", "-i", "wan", "-p", "udp", "-s", SERVER_IP, "-j", "ACCEPT"
        )
        self._ipt(
            router, "-I", "INPUT", "1", "-i", "wan", "-p", "udp", "-s", SERVER_IP2, "-j", "ACCEPT"
        )
        proc = self.popen(
            router,
            ["miniupnpd", "-d", "-f", str(conf), "-P", str(d / f"miniupnpd-{router}.pid")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def listening() -> bool:
            if proc.poll() is not None:
                raise NatLabError(f"miniupnpd on {router} exited with {proc.returncode}")
            out = self.run(router, ["ss", "-Hlun", "sport = :5351"]).stdout
            return bool(out.strip())

        wait_for(listening, 10.0, f"miniupnpd on {router} to listen on 5351")
        return proc

    def discover(self, host: str, *, probe: bool = True, portmap: bool = True) -> dict[str, Any]:
        """Run discovery from ``host``'s direct port; the JSON the labnode printed."""
        args = ["discover", "--port", str(DIRECT_PORT), "--main", f"{SERVER_IP}:{SERVER_MAIN_PORT}"]
        if probe:
            args += ["--probe", f"{SERVER_IP}:{SERVER_PROBE_PORT}"]
        if not portmap:
            args.append("--no-portmap")
        proc = self.run(host, [sys.executable, "-m", "homeport.testing.labnode", *args],
                        timeout=30)  # fmt: skip
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def punch_pair(
        self,
        a: str,
        a_cands: list[dict[str, Any]],
        b: str,
        b_cands: list[dict[str, Any]],
        deadline: float = 5.0,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Both hosts punch each other at the same moment; each side's JSON result."""
        procs = []
        for me, peer_cands in ((a, b_cands), (b, a_cands)):
            procs.append(
                self.labnode(me, "punch", "--port", str(DIRECT_PORT), "--cands",
                             json.dumps(peer_cands), "--deadline", str(deadline), "--name", me)
            )  # fmt: skip
        try:
            for p in procs:
                assert p.stdout is not None
                if p.stdout.readline().strip() != "ready":
                    raise NatLabError(f"punch did not start: {p.communicate()[1]}")
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = [p.communicate(timeout=deadline + 15)[0] for p in procs]
        finally:
            for p in procs:
                self.stop(p)
        return json.loads(outs[0]), json.loads(outs[1])


#: The nftables skeleton miniupnpd (nftables flavour) fills: its own table whose base
#: chains accept (the router's iptables rules do the filtering) and jump to its chains.
MINIUPNPD_NFT = """table inet miniupnpd {
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; policy accept;
                     jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; policy accept;
                      jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
"""


# -- the direct-path matrix of docs (direct-design.md) ---------------------------------------


@dataclass(frozen=True)
class MatrixRow:
    """One row: two hosts, the NAT kind discovery must report for each, the expected path."""

    name: str
    a: str
    b: str
    nat_a: str
    nat_b: str
    path: str  # "direct" | "local" | "mapped" | "relay"
    notes: str = ""


MATRIX: tuple[MatrixRow, ...] = (
    MatrixRow("cone-cone", "cone1", "cone2", "eim", "eim", "direct"),
    MatrixRow("same-lan", "lan1", "lan2", "eim", "eim", "local"),
    MatrixRow("public-sym", "pub", "sym1", "none", "edm", "direct"),
    MatrixRow("fwd-sym", "fwd", "sym2", "edm", "edm", "direct", "static forward of P"),
    MatrixRow("upnp-sym", "upnp", "sym2", "edm", "edm", "mapped", "NAT-PMP gateway"),
    MatrixRow("cgnat-cone", "cgh", "cone2", "eim", "eim", "direct", "home NAT behind CGN"),
    MatrixRow("sym-cone", "sym1", "cone1", "edm", "eim", "relay", "peer-edm/self-edm"),
    MatrixRow("sym-sym", "sym1", "sym2", "edm", "edm", "relay", "both-edm"),
    MatrixRow("tcp-only", "tcp", "cone1", "unknown", "eim", "relay", "no-probe-port"),
)

#: Routers whose conntrack a matrix row may want to flush (every NAT in the lab).
MATRIX_ROUTERS = ("rt_cone1", "rt_cone2", "rt_lan", "rt_sym1", "rt_sym2", "rt_fwd", "rt_upnp",
                  "cgn", "rt_cgh", "rt_tcp")  # fmt: skip


def build_matrix_lab(lab: Lab, *, whoami: bool = True) -> None:
    """Every host of :data:`MATRIX` in one lab (rows share hosts; ~25 namespaces).

    ``whoami=False`` leaves the server's main and probe ports free for a real
    ``homeport server`` (``--listen SERVER_IP:SERVER_MAIN_PORT --probe-port
    SERVER_PROBE_PORT``); the ``tcp`` host's router lets only the main port out.
    """
    lab.internet()
    lab.public_host("pub", "203.0.113.30")
    homes = [
        ("rt_cone1", "203.0.113.21", "10.20.1.1/24", "eim", [("cone1", "10.20.1.2")]),
        ("rt_cone2", "203.0.113.22", "10.20.2.1/24", "eim", [("cone2", "10.20.2.2")]),
        ("rt_lan", "203.0.113.23", "10.20.3.1/24", "eim", [("lan1", "10.20.3.2"),
                                                            ("lan2", "10.20.3.3")]),
        ("rt_sym1", "203.0.113.24", "10.20.4.1/24", "edm", [("sym1", "10.20.4.2")]),
        ("rt_sym2", "203.0.113.25", "10.20.5.1/24", "edm", [("sym2", "10.20.5.2")]),
        ("rt_fwd", "203.0.113.26", "10.20.6.1/24", "edm", [("fwd", "10.20.6.2")]),
        ("rt_upnp", "203.0.113.27", "10.20.7.1/24", "edm", [("upnp", "10.20.7.2")]),
    ]  # fmt: skip
    for router, wan, lan, nat, hosts in homes:
        lab.router(router, wan_ip=wan, lan=lan, nat=nat)
        for name, ip in hosts:
            lab.host(name, router, ip)
    lab.port_forward("rt_fwd", DIRECT_PORT, "fwd")
    if shutil.which("miniupnpd") is not None:
        lab.start_stun()
        lab.start_miniupnpd("rt_upnp")
        lab.portmap_daemon = "miniupnpd"
    else:
        lab.start_natpmp_gateway("rt_upnp")
        lab.portmap_daemon = "lab-natpmp"
    # Carrier-grade NAT: the home router's WAN is in 100.64.0.0/10, behind the CGN.
    lab.router("cgn", wan_ip="203.0.113.28", lan="100.64.0.1/24", nat="eim")
    lab.router("rt_cgh", wan_ip="100.64.0.2", lan="10.20.8.1/24", nat="eim", upstream="cgn",
               upstream_gw="100.64.0.1")  # fmt: skip
    lab.host("cgh", "rt_cgh", "10.20.8.2")
    lab.router("rt_tcp", wan_ip="203.0.113.29", lan="10.20.9.1/24", nat="eim",
               allow_out=[(SERVER_IP, SERVER_MAIN_PORT)])  # fmt: skip
    lab.host("tcp", "rt_tcp", "10.20.9.2")
    if whoami:
        lab.start_whoami()
