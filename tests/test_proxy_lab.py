"""A corporate network in the NAT lab: the laptop reaches the server only through tinyproxy.

Lab (homeport.testing.netns.NatLab, doc-range addresses, veths only between lab
namespaces): the server on 203.0.113.10:8443; labpc behind its home NAT, dialing
the server directly; the laptop's router ``rt_laptop`` is the corporate gateway:

* its FORWARD chain drops everything from the laptop's LAN, so the laptop has
  no direct path anywhere (what "direct outbound traffic is blocked" means here);
* it runs a real tinyproxy (Debian's) on 10.10.2.1:8888 with BasicAuth, allowing
  CONNECT to port 8443 only; the proxy's own connections may reach the server;
* a middlebox rule in its OUTPUT chain resets a connection to the server's port
  whose first payload byte (within the connection's first packets) is ``'H'``
  — a plain homeport data preamble — and lets a TLS ClientHello (0x16) pass.

What this proves: ``homeport up --proxy`` enrolls and stays online through the
proxy with authentication; ssh works in both directions (the laptop's agent
dials its data connections through the proxy, TLS-wrapped), as does ``homeport
nc``'s own direct path with ProxyUseFdpass; without the proxy, with bad or no
credentials, or with plain data connections through the middlebox, each fails
with its one clear line. What it does not prove: that a real TLS-inspecting
appliance (which parses the ClientHello, or man-in-the-middles it) passes us —
the middlebox here only checks the first byte, and nothing here intercepts TLS
(homeport pins the server, so an intercepting proxy must be told to let it pass).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homeport.testing.netns import NatLab, netns_available
from homeport.testing.sshd import SshdServer, make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport

pytestmark = [pytest.mark.netns, pytest.mark.integration]

_ok, _why = netns_available()
if not _ok:
    pytest.skip(f"NAT lab unavailable: {_why}", allow_module_level=True)
_ok, _why = sshd_available()
if not _ok:
    pytest.skip(f"needs OpenSSH sshd: {_why}", allow_module_level=True)
TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
if not os.path.exists(TINYPROXY):
    pytest.skip("needs tinyproxy (apt-get install tinyproxy)", allow_module_level=True)

PORT = 8443
PROXY_IP = NatLab.lan_ips["rt_laptop"]
PROXY_PORT = 8888
USER, PASSWORD = "alice", "s3cret"
PROXY_URL = f"http://{USER}:{PASSWORD}@{PROXY_IP}:{PROXY_PORT}"
#: The middlebox: the first payload byte of a packet is 'H' (u32: IP header length, TCP data
#: offset, first byte), in the first 4 packets the client sends on the connection.
FIRST_BYTE_H = "0>>22&0x3C@12>>26&0x3C@0>>24=0x48"


@dataclass
class Lab:
    nat: NatLab
    hp: Homeport
    lab_sshd: SshdServer
    laptop_sshd: SshdServer
    client_state: Path  # a copy of the laptop's identity without an agent: nc's direct path


def _tinyproxy_conf(root: Path) -> Path:
    log = root / "tinyproxy.log"
    log.touch()
    os.chmod(log, 0o666)  # tinyproxy drops to nobody before it opens the log
    conf = root / "tinyproxy.conf"
    conf.write_text(
        "\n".join(
            [
                "User nobody",
                "Group nogroup",
                f"Port {PROXY_PORT}",
                f"Listen {PROXY_IP}",
                "Timeout 600",
                f'LogFile "{log}"',
                "LogLevel Info",
                "MaxClients 64",
                "Allow 10.10.2.0/24",
                f"BasicAuth {USER} {PASSWORD}",
                f"ConnectPort {PORT}",
                "",
            ]
        )
    )
    return conf


def _corporate_gateway(nat: NatLab) -> None:
    lan = nat.ifaces["rt_laptop_lan"]
    ipt = ["iptables", "-w", "5"]
    nat.run("rt_laptop", [*ipt, "-I", "FORWARD", "1", "-i", lan, "-j", "DROP"])
    nat.run(
        "rt_laptop",
        [
            *ipt, "-A", "OUTPUT", "-p", "tcp", "-d", NatLab.server_ip, "--dport", str(PORT),
            "-m", "connbytes", "--connbytes", "0:4", "--connbytes-dir", "original",
            "--connbytes-mode", "packets", "-m", "u32", "--u32", FIRST_BYTE_H,
            "-j", "REJECT", "--reject-with", "tcp-reset",
        ],
    )  # fmt: skip


def middlebox_hits(nat: NatLab) -> int:
    out = nat.run("rt_laptop", ["iptables", "-w", "5", "-L", "OUTPUT", "-v", "-x", "-n"]).stdout
    for line in out.splitlines():
        if "u32" in line and "REJECT" in line:
            return int(line.split()[0])
    raise AssertionError(f"middlebox rule not found:\n{out}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("proxylab")
    os.chmod(root, 0o755)  # tinyproxy (as nobody) reads its config and writes its log here
    hp = Homeport(root)
    for var in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "HOMEPORT_PROXY"):
        hp.env.pop(var, None)
    hp.env.pop("HOMEPORT_TLS_DATA", None)
    with NatLab() as nat:
        lab_sshd = make_sshd(root / "sshd-lab", netns=nat.ns("lab"))
        laptop_sshd = make_sshd(root / "sshd-laptop", netns=nat.ns("laptop"))
        try:
            lab_sshd.start()
            laptop_sshd.start()
            _corporate_gateway(nat)
            nat.popen("rt_laptop", [TINYPROXY, "-d", "-c", str(_tinyproxy_conf(root))])
            nat.wait_tcp("rt_laptop", PROXY_IP, PROXY_PORT, timeout=10)
            hp.start_server(
                NatLab.server_ip,
                PORT,
                prefix=nat.cmd("server", [])[:4],
                ready=lambda: _reachable(nat, "lab"),
            )
            labpc = hp.up(
                "labpc", "--expose", f"ssh=127.0.0.1:{lab_sshd.port}", prefix=nat.cmd("lab", [])
            )
            hp.wait_online("labpc", labpc)
            laptop = hp.up(
                "laptop",
                "--expose",
                f"ssh=127.0.0.1:{laptop_sshd.port}",
                "--proxy",
                PROXY_URL,
                "--relay-only",
                prefix=nat.cmd("laptop", []),
            )
            hp.wait_online("laptop", laptop)
            client = root / "client-laptop"
            client.mkdir(mode=0o700)
            for name in ("node.json", "node.key", "node.crt", "ca.crt", "network.json"):
                shutil.copy2(hp.state("laptop") / name, client / name)
            yield Lab(nat, hp, lab_sshd, laptop_sshd, client)
        finally:
            hp.close()
            lab_sshd.stop()
            laptop_sshd.stop()


def _reachable(nat: NatLab, where: str) -> bool:
    try:
        nat.wait_tcp(where, NatLab.server_ip, PORT, timeout=0.5)
        return True
    except TimeoutError:
        return False


def _nc(
    lab: Lab, *args: str, env: dict[str, str] | None = None, timeout: float = 15
) -> subprocess.CompletedProcess[str]:
    argv = [*HOMEPORT, "nc", "--timeout", str(timeout), "--state", str(lab.client_state), *args]
    return subprocess.run(
        lab.nat.cmd("laptop", argv),
        capture_output=True,
        text=True,
        timeout=60,
        env={**lab.hp.env, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def _ssh(lab: Lab, where: str, state: Path, sshd: SshdServer, target: str, *cmd: str) -> str:
    res = lab.hp.run(
        lab.nat.cmd(where, [*lab.hp.ssh_args(state, sshd.client_key, sshd.user), target, *cmd]),
        check=False,
    )
    assert res.returncode == 0, f"ssh {target}: {res.stderr}"
    return res.stdout


def test_the_laptop_has_no_direct_path(lab: Lab) -> None:
    assert not _reachable(lab.nat, "laptop")
    assert _reachable(lab.nat, "lab")


def test_up_saved_the_proxy_and_the_server_sees_the_proxy(lab: Lab) -> None:
    saved = (lab.hp.state("laptop") / "network.json").read_text()
    assert (
        PROXY_IP in saved and (lab.hp.state("laptop") / "network.json").stat().st_mode & 0o077 == 0
    )
    nodes = {n["name"]: n for n in lab.hp.nodes()}
    assert NatLab.public_ips["rt_laptop"] in str(nodes["laptop"].get("address", ""))
    log = lab.hp.log("agent-laptop")
    assert f"through proxy http://{USER}:***@{PROXY_IP}:{PROXY_PORT}" in log
    assert PASSWORD not in log


def test_ssh_from_the_laptop_through_the_proxy(lab: Lab) -> None:
    hits = middlebox_hits(lab.nat)
    out = _ssh(lab, "laptop", lab.hp.state("laptop"), lab.lab_sshd, "labpc", "echo", "via-proxy")
    assert out.strip() == "via-proxy"
    assert middlebox_hits(lab.nat) == hits  # TLS-wrapped: nothing for the middlebox to reset


def test_ssh_into_the_laptop_through_its_proxy(lab: Lab) -> None:
    # labpc -> relay -> (tinyproxy tunnel, TLS-wrapped) -> the laptop's agent -> its sshd
    out = _ssh(lab, "lab", lab.hp.state("labpc"), lab.laptop_sshd, "laptop", "echo", "inbound")
    assert out.strip() == "inbound"


def test_nc_direct_path_with_fdpass_through_the_proxy(lab: Lab) -> None:
    # No agent on client_state: nc dials by itself (control + wrapped data via the proxy)
    # and hands ssh a descriptor from a forked child (ProxyUseFdpass).
    out = _ssh(lab, "laptop", lab.client_state, lab.lab_sshd, "labpc", "echo", "fdpass")
    assert out.strip() == "fdpass"


def test_status_through_the_proxy(lab: Lab) -> None:
    res = lab.hp.run(
        lab.nat.cmd("laptop", [*HOMEPORT, "status", "--state", str(lab.client_state)]),
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "labpc" in res.stdout


def test_without_the_proxy_it_fails_with_one_line(lab: Lab) -> None:
    res = _nc(lab, "labpc", "22", env={"HOMEPORT_PROXY": "off"}, timeout=4)
    assert res.returncode == 1
    line = res.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert re.search(rf"server {re.escape(NatLab.server_ip)}:{PORT} timed out", line), line


def test_wrong_password_says_proxy_needs_authentication(lab: Lab) -> None:
    bad = f"http://{USER}:wrong@{PROXY_IP}:{PROXY_PORT}"
    res = _nc(lab, "labpc", "22", env={"HOMEPORT_PROXY": bad})
    assert res.returncode == 1
    assert "proxy needs authentication: it refused the credentials for 'alice'" in res.stderr
    assert "wrong" not in res.stderr  # the password is never printed


def test_no_credentials_says_how_to_give_them(lab: Lab) -> None:
    res = _nc(lab, "labpc", "22", env={"HOMEPORT_PROXY": f"http://{PROXY_IP}:{PROXY_PORT}"})
    assert res.returncode == 1
    assert (
        "proxy needs authentication: give --proxy http://USER@HOST:PORT with "
        "--proxy-password-file FILE (or $HOMEPORT_PROXY_PASSWORD)"
    ) in res.stderr


def test_proxy_unreachable_is_named(lab: Lab) -> None:
    res = _nc(lab, "labpc", "22", env={"HOMEPORT_PROXY": f"http://{PROXY_IP}:9"})
    assert res.returncode == 1
    assert f"cannot reach proxy http://{PROXY_IP}:9" in res.stderr


def test_the_middlebox_resets_plain_data_connections(lab: Lab) -> None:
    hits = middlebox_hits(lab.nat)
    res = _nc(lab, "labpc", "22", env={"HOMEPORT_TLS_DATA": "off"})
    assert res.returncode == 1, res.stdout
    assert middlebox_hits(lab.nat) > hits  # the plain preamble was what it reset
    line = res.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("homeport nc: labpc:")
    # ... and the same call with wrapping on gets through the same middlebox
    ok = _nc(lab, "labpc", "22", env={"HOMEPORT_TLS_DATA": "on"})
    assert ok.stdout.startswith("SSH-2.0-"), ok.stderr


def test_forbidden_port_is_a_403(lab: Lab) -> None:
    node_json = lab.client_state / "node.json"
    moved = lab.client_state.parent / "client-wrongport"
    shutil.copytree(lab.client_state, moved)
    text = node_json.read_text().replace(f":{PORT}", ":8444")
    (moved / "node.json").write_text(text)
    res = subprocess.run(
        lab.nat.cmd(
            "laptop", [*HOMEPORT, "nc", "--timeout", "15", "--state", str(moved), "labpc", "22"]
        ),
        capture_output=True,
        text=True,
        timeout=60,
        env=lab.hp.env,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 1
    assert "forbids a tunnel to server 203.0.113.10:8444" in res.stderr, res.stderr
