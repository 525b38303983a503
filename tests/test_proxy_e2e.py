"""TLS-wrapped data connections end to end on loopback (no proxy): real server, agents, sshd, ssh.

labpc runs with ``--tls-data on`` (its agent's data connections are wrapped); the
laptop's own dials are wrapped through ``HOMEPORT_TLS_DATA=on``. A bulk scp
checks the bytes arrive intact through two outer TLS sessions, the relay's
terminator and the half-closes scp depends on. A second server run with
``--no-tls-data`` must refuse the wrapped connection with one clear line.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homeport.testing.sshd import SshdServer, make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport

pytestmark = pytest.mark.integration

ok, why = sshd_available()
if not ok:
    pytest.skip(f"needs OpenSSH sshd: {why}", allow_module_level=True)


@dataclass
class Net:
    hp: Homeport
    sshd: SshdServer
    laptop: Path


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("tlsdata")
    hp = Homeport(root)
    for var in ("HTTPS_PROXY", "https_proxy", "HOMEPORT_PROXY"):
        hp.env.pop(var, None)
    hp.env["HOMEPORT_TLS_DATA"] = "on"  # the laptop's nc/ssh (and labpc saves it anyway)
    sshd = make_sshd(root / "sshd")
    try:
        sshd.start()
        hp.start_server()
        lab = hp.up(
            "labpc", "--expose", f"ssh=127.0.0.1:{sshd.port}", "--tls-data", "on", "--relay-only"
        )
        hp.wait_online("labpc", lab)
        laptop = hp.up("laptop", "--relay-only")
        hp.wait_online("laptop", laptop)
        yield Net(hp, sshd, hp.state("laptop"))
    finally:
        hp.close()
        sshd.stop()


def test_ssh_and_bulk_scp_over_wrapped_data(net: Net, tmp_path: Path) -> None:
    assert '"tls_data": "on"' in (net.hp.state("labpc") / "network.json").read_text()
    ssh = [*net.hp.ssh_args(net.laptop, net.sshd.client_key, net.sshd.user), "labpc", "echo", "w"]
    res = net.hp.run(ssh, check=False)
    assert res.returncode == 0 and res.stdout.strip() == "w", res.stderr
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(20 * 1024 * 1024))
    dst = tmp_path / "copy.bin"
    scp = [
        *net.hp.scp_args(net.laptop, net.sshd.client_key),
        str(src),
        f"{net.sshd.user}@labpc:{dst}",
    ]
    res2 = net.hp.run(scp, check=False, timeout=120)
    assert res2.returncode == 0, res2.stderr
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert "data connections TLS-wrapped" in net.hp.log("agent-labpc")


def test_nc_direct_path_wraps_too(net: Net, tmp_path: Path) -> None:
    client = tmp_path / "client"
    client.mkdir(mode=0o700)
    for name in ("node.json", "node.key", "node.crt", "ca.crt"):
        (client / name).write_bytes((net.laptop / name).read_bytes())
    res = subprocess.run(
        [*HOMEPORT, "nc", "--state", str(client), "labpc", "22"],
        capture_output=True,
        timeout=30,
        env=net.hp.env,
        stdin=subprocess.DEVNULL,
    )
    assert res.stdout.startswith(b"SSH-2.0-"), res.stderr


def test_a_server_that_refuses_wrapped_data_says_so(tmp_path: Path) -> None:
    hp = Homeport(tmp_path)
    hp.env.pop("HOMEPORT_TLS_DATA", None)
    try:
        hp.start_server(extra=["--no-tls-data"])
        lab = hp.up("labpc", "--expose", "ssh=127.0.0.1:9")
        hp.wait_online("labpc", lab)
        laptop = hp.up("laptop")
        hp.wait_online("laptop", laptop)
        client = tmp_path / "client"  # no agent here: nc dials (and wraps) by itself
        client.mkdir(mode=0o700)
        for name in ("node.json", "node.key", "node.crt", "ca.crt"):
            (client / name).write_bytes((hp.state("laptop") / name).read_bytes())
        res = subprocess.run(
            [*HOMEPORT, "nc", "--timeout", "5", "--state", str(client), "labpc", "22"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**hp.env, "HOMEPORT_TLS_DATA": "on"},
            stdin=subprocess.DEVNULL,
        )
    finally:
        hp.close()
    assert res.returncode == 1
    line = res.stderr.strip()
    assert "\n" not in line
    assert "does not accept TLS-wrapped data connections" in line, line
