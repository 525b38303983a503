"""End to end in the NAT lab: a SOCKS5 proxy and a forward that leave through an exit node.

The lab (all inside namespaces this test creates; veths only between them)::

    laptop ns ── NAT ──┐                         ┌── NAT ── lab ns (labpc: exit agent)
    (socks, forward,   │   server ns             │          │ veth (lab LAN)
     curl; alice and   └── 203.0.113.10 ─────────┘          lanpc ns: 192.168.1.50:80 (http)
     bob's nodes)                                                      192.168.2.50:80 (http)

labpc advertises only 192.168.1.0/24, so 192.168.2.50 is routable from the
exit but not allowed. Names resolve at the exit (``/etc/netns/<lab ns>/hosts``,
which ``ip netns exec`` mounts over /etc/hosts for processes in that namespace
only): ``web.lab`` is inside, ``outside.lab`` resolves outside.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from homeport.testing.deadline import wait_for
from homeport.testing.netns import NatLab, netns_available, run_command
from tests.harness import HOMEPORT, Homeport

pytestmark = [pytest.mark.netns, pytest.mark.integration]

_ok, _why = netns_available()
if not _ok:
    pytest.skip(f"NAT lab unavailable: {_why}", allow_module_level=True)
if shutil.which("curl") is None:
    pytest.skip("needs curl (apt install curl) because the test drives the proxy with it")

PORT = 8443
WEB = "192.168.1.50"
OUTSIDE = "192.168.2.50"
MARKER = "hello from the lab LAN"
SOCKS_PORT = 1080
BOB_SOCKS_PORT = 1081
FORWARD_PORT = 8888


@dataclass
class ExitLab:
    nat: NatLab
    hp: Homeport
    proxies: set[int] = field(default_factory=set)  # SOCKS ports started (once each)

    def curl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.nat.cmd("laptop", ["curl", "-sS", "--max-time", "20", *args]),
            capture_output=True,
            text=True,
            timeout=40,
            check=False,
        )

    def laptop_spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        return self.hp.spawn(argv, log, self.nat.cmd("laptop", [])[:4])


def _lan(nat: NatLab, lan_ns: str, root: Path) -> subprocess.Popen[bytes]:
    """The lab LAN behind labpc: one namespace, one veth (created in lab, peer moved to lanpc)."""
    p = nat.prefix
    run_command(["ip", "netns", "add", lan_ns])
    run_command(["ip", "-n", nat.ns("lab"), "link", "add", f"{p}xlab", "type", "veth",
                 "peer", "name", f"{p}xlan", "netns", lan_ns])  # fmt: skip
    for ns, ifname, addrs in (
        (nat.ns("lab"), f"{p}xlab", ("192.168.1.1/24", "192.168.2.1/24")),
        (lan_ns, f"{p}xlan", (f"{WEB}/24", f"{OUTSIDE}/24")),
    ):
        for cidr in addrs:
            run_command(["ip", "-n", ns, "addr", "add", cidr, "dev", ifname])
        run_command(["ip", "-n", ns, "link", "set", ifname, "up"])
    run_command(["ip", "-n", lan_ns, "link", "set", "lo", "up"])
    site = root / "site"
    site.mkdir()
    (site / "index.html").write_text(MARKER + "\n")
    log = (root / "http.log").open("ab")
    return subprocess.Popen(
        ["ip", "netns", "exec", lan_ns, sys.executable, "-m", "http.server", "80",
         "--bind", "0.0.0.0", "--directory", str(site)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExitLab]:
    root = tmp_path_factory.mktemp("exitlab")
    hp = Homeport(root)
    http: subprocess.Popen[bytes] | None = None
    with NatLab() as nat:
        lan_ns = f"{nat.prefix}-lanpc"
        netns_etc = Path("/etc/netns")
        made_etc = not netns_etc.exists()
        hosts_dir = netns_etc / nat.ns("lab")
        try:
            hosts_dir.mkdir(parents=True)
            (hosts_dir / "hosts").write_text(
                f"127.0.0.1 localhost\n{WEB} web.lab\n{OUTSIDE} outside.lab\n"
            )
            http = _lan(nat, lan_ns, root)
            wait_for(
                lambda: _accepts(nat, WEB),
                20,
                f"http server in the lab LAN\n{(root / 'http.log').read_text()}",
            )
            hp.start_server(
                NatLab.server_ip, PORT, prefix=nat.cmd("server", [])[:4], ready=lambda: _ready(nat)
            )
            for user in ("alice", "bob"):
                hp.run([*HOMEPORT, "users", "create", user, "--data", str(hp.data_dir)])
            in_lab, in_laptop = nat.cmd("lab", [])[:4], nat.cmd("laptop", [])[:4]
            labpc = hp.up(
                "labpc",
                "--advertise-exit",
                "192.168.1.0/24",
                key=hp.keys_create("--user", "alice"),
                prefix=in_lab,
            )
            laptop = hp.up("laptop", key=hp.keys_create("--user", "alice"), prefix=in_laptop)
            bobpc = hp.up("bobpc", key=hp.keys_create("--user", "bob"), prefix=in_laptop)
            for name, proc in (("labpc", labpc), ("laptop", laptop), ("bobpc", bobpc)):
                hp.wait_online(name, proc)
            yield ExitLab(nat, hp)
        finally:
            hp.close()
            if http is not None:
                http.terminate()
                http.wait(timeout=10)
            with contextlib.suppress(subprocess.CalledProcessError):
                run_command(["ip", "netns", "del", lan_ns])
            shutil.rmtree(hosts_dir, ignore_errors=True)
            if made_etc:
                with contextlib.suppress(OSError):
                    netns_etc.rmdir()


def _accepts(nat: NatLab, host: str) -> bool:
    try:
        nat.wait_tcp("lab", host, 80, timeout=0.5)
        return True
    except TimeoutError:
        return False


def _ready(nat: NatLab) -> bool:
    try:
        nat.wait_tcp("laptop", NatLab.server_ip, PORT, timeout=0.5)
        return True
    except TimeoutError:
        return False


def _socks(lab: ExitLab, node: str, port: int) -> None:
    if port in lab.proxies:
        return
    lab.proxies.add(port)
    lab.laptop_spawn(
        [*HOMEPORT, "socks", "--listen", f"127.0.0.1:{port}", "--via", "labpc",
         "--state", str(lab.hp.state(node))],
        f"socks-{node}",
    )  # fmt: skip
    lab.nat.wait_tcp("laptop", "127.0.0.1", port, timeout=20)


def test_the_lan_is_not_reachable_without_the_exit(lab: ExitLab) -> None:
    with pytest.raises(TimeoutError):
        lab.nat.wait_tcp("laptop", WEB, 80, timeout=1.0)


def test_curl_through_the_socks_proxy_reaches_the_lab_web_server(lab: ExitLab) -> None:
    _socks(lab, "laptop", SOCKS_PORT)
    proxy = f"127.0.0.1:{SOCKS_PORT}"
    res = lab.curl("--socks5-hostname", proxy, f"http://{WEB}/")
    assert res.returncode == 0 and MARKER in res.stdout, (res, lab.hp.log("socks-laptop"))
    # a name resolved by the exit node, inside its networks
    res = lab.curl("--socks5-hostname", proxy, "http://web.lab/")
    assert res.returncode == 0 and MARKER in res.stdout, (res, lab.hp.log("socks-laptop"))
    # an address outside the advertised network is refused (early, by the server)
    res = lab.curl("--socks5-hostname", proxy, f"http://{OUTSIDE}/")
    assert res.returncode != 0 and MARKER not in res.stdout
    # a name that resolves outside is refused by the exit node, after resolving it
    res = lab.curl("--socks5-hostname", proxy, "http://outside.lab/")
    assert res.returncode != 0 and MARKER not in res.stdout
    log = lab.hp.log("socks-laptop")
    assert f"not allowed: {OUTSIDE} is outside the exit's networks (192.168.1.0/24)" in log, log
    assert f"outside.lab resolves to: not allowed: {OUTSIDE}" in log, log
    # a closed port: one line, connection refused
    res = lab.curl("--socks5-hostname", proxy, f"http://{WEB}:81/")
    assert res.returncode != 0
    assert f"connection refused by {WEB}:81" in lab.hp.log("socks-laptop")
    # the server's audit log names the destination of every exit stream
    audit = lab.hp.run([*HOMEPORT, "audit", "--json", "--data", str(lab.hp.data_dir)]).stdout
    events = [json.loads(line) for line in audit.splitlines() if line.strip()]
    exits = [e for e in events if e.get("kind") == "stream" and e.get("exit")]
    assert any(e["exit"] == f"{WEB}:80" and e["verdict"] == "allowed" for e in exits), exits
    assert any(e["exit"] == "web.lab:80" and e["verdict"] == "allowed" for e in exits), exits
    assert any(e["exit"] == f"{OUTSIDE}:80" and e["verdict"] == "denied" for e in exits), exits


def test_another_users_node_may_not_use_the_exit_by_default(lab: ExitLab) -> None:
    _socks(lab, "bobpc", BOB_SOCKS_PORT)
    res = lab.curl("--socks5-hostname", f"127.0.0.1:{BOB_SOCKS_PORT}", f"http://{WEB}/")
    assert res.returncode != 0 and MARKER not in res.stdout
    log = lab.hp.log("socks-bobpc")
    assert "only nodes of labpc's own owner may use it as an exit node" in log, log


def test_set_changes_the_exit_networks_of_the_running_agent(lab: ExitLab) -> None:
    _socks(lab, "laptop", SOCKS_PORT)
    state = ["--state", str(lab.hp.state("labpc"))]
    both = lab.hp.run([*HOMEPORT, "set", "--advertise-exit", "192.168.1.0/24,192.168.2.0/24",
                       *state])  # fmt: skip
    assert "labpc: exit node for 192.168.1.0/24, 192.168.2.0/24" in both.stdout, both
    assert "applied to the running agent" in both.stdout + both.stderr, both
    try:

        def outside_reachable() -> bool:
            res = lab.curl("--socks5-hostname", f"127.0.0.1:{SOCKS_PORT}", f"http://{OUTSIDE}/")
            return res.returncode == 0 and MARKER in res.stdout

        wait_for(outside_reachable, 20, f"{OUTSIDE} via labpc\n{lab.hp.log('socks-laptop')}")
    finally:
        back = lab.hp.run([*HOMEPORT, "set", "--advertise-exit", "192.168.1.0/24", *state])
        assert "exit node for 192.168.1.0/24" in back.stdout, back


def _policy(lab: ExitLab, *args: str) -> str:
    return lab.hp.run([*HOMEPORT, "policy", *args, "--data", str(lab.hp.data_dir)]).stdout


def test_policy_explain_shows_exit_verdicts(lab: ExitLab) -> None:
    assert _policy(lab, "explain", "laptop", "labpc:exit").startswith(
        "allow  (rule exit-same-owner)"
    )
    assert _policy(lab, "explain", "bobpc", "labpc:exit").startswith("deny  (rule exit-owner-only)")


def test_a_policy_grants_the_exit_to_another_user_and_only_to_them(
    lab: ExitLab, tmp_path: Path
) -> None:
    grant = tmp_path / "exit.hujson"
    grant.write_text('{"acls": [{"action": "accept", "src": ["user:bob"], "dst": ["labpc:exit"]}]}')
    _socks(lab, "laptop", SOCKS_PORT)
    _socks(lab, "bobpc", BOB_SOCKS_PORT)
    _policy(lab, "set", str(grant))
    try:
        assert _policy(lab, "explain", "bobpc", "labpc:exit").startswith("allow  (rule acls[0])")

        def bob_gets_through() -> bool:  # the exit node applies the pushed rules
            res = lab.curl("--socks5-hostname", f"127.0.0.1:{BOB_SOCKS_PORT}", f"http://{WEB}/")
            return res.returncode == 0 and MARKER in res.stdout

        wait_for(bob_gets_through, 20, f"bob through the exit\n{lab.hp.log('socks-bobpc')}")
        res = lab.curl("--socks5-hostname", f"127.0.0.1:{SOCKS_PORT}", f"http://{WEB}/")
        assert res.returncode != 0  # alice's laptop has no rule now
        assert "no rule lets alice use labpc as an exit node" in lab.hp.log("socks-laptop")
    finally:
        _policy(lab, "unset")


def test_forward_to_a_host_behind_the_exit(lab: ExitLab) -> None:
    lab.laptop_spawn(
        [*HOMEPORT, "forward", "--state", str(lab.hp.state("laptop")), str(FORWARD_PORT),
         f"labpc:{WEB}:80"],
        "forward",
    )  # fmt: skip
    lab.nat.wait_tcp("laptop", "127.0.0.1", FORWARD_PORT, timeout=20)
    res = lab.curl(f"http://127.0.0.1:{FORWARD_PORT}/")
    assert res.returncode == 0 and MARKER in res.stdout, (res, lab.hp.log("forward"))
    assert f"labpc:{WEB}:80: connected to labpc" in lab.hp.log("forward")
