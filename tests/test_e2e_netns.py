"""The NAT lab: the server on a "public" address, labpc and laptop each behind its own NAT.

Neither home can accept a connection from outside (the routers drop new inbound
flows), so this proves the relay path works where the seeds' users live: the agent
dials out, the laptop dials out, and ssh/scp meet in the middle.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
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

PORT = 8443


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatLab, Homeport, SshdServer]]:
    root = tmp_path_factory.mktemp("lab")
    hp = Homeport(root)
    with NatLab() as nat:
        sshd = make_sshd(root / "sshd", netns=nat.ns("lab"))
        try:
            sshd.start()
            hp.start_server(
                NatLab.server_ip,
                PORT,
                prefix=nat.cmd("server", [])[:4],
                ready=lambda: _ready(nat),
            )
            lab_agent = hp.up(
                "labpc", "--expose", f"ssh=127.0.0.1:{sshd.port}", prefix=nat.cmd("lab", [])[:4]
            )
            hp.wait_online("labpc", lab_agent)
            laptop = hp.up("laptop", prefix=nat.cmd("laptop", [])[:4])
            hp.wait_online("laptop", laptop)
            yield nat, hp, sshd
        finally:
            hp.close()
            sshd.stop()


def _ready(nat: NatLab) -> bool:
    try:
        nat.wait_tcp("laptop", NatLab.server_ip, PORT, timeout=0.5)
        return True
    except TimeoutError:
        return False


def test_lab_is_really_behind_nat(lab: tuple[NatLab, Homeport, SshdServer]) -> None:
    nat, _, sshd = lab
    # the laptop cannot reach the lab's sshd directly: no route into a NATed home
    with pytest.raises(TimeoutError):
        nat.wait_tcp("laptop", NatLab.lan_ips["lab"], sshd.port, timeout=1.0)


def test_server_sees_nat_public_addresses(lab: tuple[NatLab, Homeport, SshdServer]) -> None:
    _, hp, _ = lab
    nodes = {n["name"]: n for n in hp.nodes()}
    assert NatLab.public_ips["rt_lab"] in str(nodes["labpc"].get("address", ""))
    assert NatLab.public_ips["rt_laptop"] in str(nodes["laptop"].get("address", ""))


def test_ssh_and_scp_through_both_nats(
    lab: tuple[NatLab, Homeport, SshdServer], tmp_path: Path
) -> None:
    nat, hp, sshd = lab
    state = hp.state("laptop")
    res = hp.run(
        nat.cmd("laptop", [*hp.ssh_args(state, sshd.client_key, sshd.user), "labpc", "echo", "ok"]),
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"

    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(50 * 1024 * 1024))
    dst = tmp_path / "copy.bin"
    scp = [*hp.scp_args(state, sshd.client_key), str(src), f"{sshd.user}@labpc:{dst}"]
    res2 = subprocess.run(
        nat.cmd("laptop", scp), capture_output=True, text=True, timeout=180, env=hp.env
    )
    assert res2.returncode == 0, res2.stderr
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_nc_reports_unknown_node_through_nat(lab: tuple[NatLab, Homeport, SshdServer]) -> None:
    nat, hp, _ = lab
    res = subprocess.run(
        nat.cmd("laptop", [*HOMEPORT, "nc", "--state", str(hp.state("laptop")), "ghost", "22"]),
        capture_output=True,
        text=True,
        timeout=30,
        env=hp.env,
    )
    assert res.returncode != 0 and "ghost" in res.stderr
