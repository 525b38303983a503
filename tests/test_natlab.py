"""The direct-path matrix in the NAT lab: discovery's NAT kind and the raw punch outcome per row.

One lab (~25 namespaces) is built per module and every row reuses it; each row
starts from empty conntrack tables on every router, so rows do not see each
other's mappings. Raw primitives only (no homeport control plane): discovery
runs from each host's direct port against a whoami responder on the lab server's
two ports, then both hosts punch each other's candidates at the same moment.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from homeport.testing.deadline import wait_for
from homeport.testing.natlab import (
    DIRECT_PORT,
    MATRIX,
    MATRIX_ROUTERS,
    Lab,
    MatrixRow,
    build_matrix_lab,
    conntrack_available,
    natlab_available,
)

_ok, _why = natlab_available()
pytestmark = pytest.mark.skipif(not _ok, reason=_why)

#: Punch bound for rows expected to fail (the design's 5 s is for real use; 2 s is plenty here).
FAIL_DEADLINE = 2.0
#: Rows that should connect get the full design deadline.
OK_DEADLINE = 5.0


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, dict[str, dict[str, Any]]]]:
    with Lab() as lab:
        build_matrix_lab(lab)
        found = {host: lab.discover(host) for host in lab.hosts}
        yield lab, found


@pytest.mark.parametrize("row", MATRIX, ids=[r.name for r in MATRIX])
def test_matrix_row(lab: tuple[Lab, dict[str, dict[str, Any]]], row: MatrixRow) -> None:
    the_lab, found = lab
    a, b = found[row.a], found[row.b]
    assert (a["kind"], b["kind"]) == (row.nat_a, row.nat_b), (a["reason"], b["reason"])
    if conntrack_available()[0]:
        for router in MATRIX_ROUTERS:
            the_lab.flush_conntrack(router)
    deadline = FAIL_DEADLINE if row.path == "relay" else OK_DEADLINE
    t0 = time.monotonic()
    ra, rb = the_lab.punch_pair(row.a, a["candidates"], row.b, b["candidates"], deadline)
    wall = time.monotonic() - t0
    if row.path == "relay":
        assert not ra["ok"] and not rb["ok"], (ra, rb)
        assert ra["code"] == rb["code"] == "punch-timeout"
        return
    assert ra["ok"] and rb["ok"], (ra, rb)
    # Both ended on the same connection: each read the other's name over it.
    assert (ra["peer_said"], rb["peer_said"]) == (row.b, row.a)
    assert row.path in {ra["kind"], rb["kind"]}, (ra, rb)
    assert max(ra["elapsed"], rb["elapsed"]) < OK_DEADLINE, wall


def test_discovery_reasons(lab: tuple[Lab, dict[str, dict[str, Any]]]) -> None:
    _lab, found = lab
    assert found["tcp"]["code"] == "no-probe-port"
    assert found["sym1"]["code"] == "edm" and "differs by destination" in found["sym1"]["reason"]
    assert found["pub"]["code"] == "public"
    upnp = found["upnp"]
    assert upnp["observations"]["mapping"]["protocol"] == "natpmp"
    assert {"kind": "mapped", "host": "203.0.113.27", "port": DIRECT_PORT} in upnp["candidates"]
    assert "no PCP/NAT-PMP answer" in found["cone1"]["observations"]["mapping_error"]
    lan_kinds = [c["kind"] for c in found["lan1"]["candidates"]]
    assert lan_kinds[0] == "local"


def _tcp_ok(lab: Lab, host: str, dst: str, port: int, timeout: float) -> bool:
    code = (
        "import socket,sys\n"
        "a = (sys.argv[1], int(sys.argv[2]))\n"
        "try:\n socket.create_connection(a, timeout=float(sys.argv[3])).close()\n"
        "except OSError: sys.exit(1)\n"
    )
    proc = lab.run(host, [sys.executable, "-c", code, dst, str(port), str(timeout)], check=False)
    return proc.returncode == 0


def test_blackhole_and_heal(lab: tuple[Lab, dict[str, dict[str, Any]]]) -> None:
    the_lab, _found = lab
    server = "203.0.113.10"
    assert _tcp_ok(the_lab, "cone1", server, 7000, 2.0)
    with the_lab.blackhole("rt_cone1", server):
        assert not _tcp_ok(the_lab, "cone1", server, 7000, 0.3)
    wait_for(lambda: _tcp_ok(the_lab, "cone1", server, 7000, 1.0), 5.0, "the path to heal")


@pytest.mark.skipif(not conntrack_available()[0], reason=conntrack_available()[1])
def test_flush_conntrack_forgets_mappings(lab: tuple[Lab, dict[str, dict[str, Any]]]) -> None:
    the_lab, _found = lab
    assert _tcp_ok(the_lab, "cone2", "203.0.113.10", 7000, 2.0)
    assert the_lab.conntrack_count("rt_cone2") > 0
    the_lab.flush_conntrack("rt_cone2")
    assert the_lab.conntrack_count("rt_cone2") == 0


def test_lab_cleans_up_namespaces() -> None:
    with Lab() as small:
        small.internet()
        names = small.namespaces()
        assert len(names) == 2
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)


MINIUPNPD_CONF = """ext_ifname=wan
listening_ip=br0
enable_natpmp=yes
enable_upnp=no
secure_mode=yes
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
allow 1024-65535 10.0.0.0/8 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""

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


@pytest.mark.skipif(shutil.which("miniupnpd") is None, reason="miniupnpd not installed")
def test_real_miniupnpd_speaks_our_pcp_and_natpmp(tmp_path: Any) -> None:
    """Interop with a real miniupnpd (Debian 2.3.1, nftables flavour).

    miniupnpd 2.3.1 refuses to map when its WAN address is reserved, and the lab may
    only use TEST-NET "public" addresses, all of which it treats as reserved (newer
    releases have ``ext_allow_private_ipv4``). So this proves the wire format against
    the real daemon (it parses our PCP MAP and answers with a result code, not
    MALFORMED_REQUEST but a refusal) and our refusal path; the mapped row uses the lab gateway.
    """
    conf = tmp_path / "miniupnpd.conf"
    conf.write_text(MINIUPNPD_CONF)
    nft = tmp_path / "miniupnpd.nft"
    nft.write_text(MINIUPNPD_NFT)
    with Lab() as small:
        small.internet()
        small.router("rt_mu", wan_ip="203.0.113.40", lan="10.30.0.1/24", nat="edm")
        small.host("mu", "rt_mu", "10.30.0.2")
        small.run("rt_mu", ["nft", "-f", str(nft)])
        small.popen(
            "rt_mu",
            ["miniupnpd", "-d", "-f", str(conf), "-P", str(tmp_path / "mu.pid")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        code = (
            "from homeport.io.portmap import request_mapping\n"
            "print(request_mapping(41641, timeouts=(0.2, 0.4)))\n"
        )

        def answered() -> bool:
            out = small.run("mu", [sys.executable, "-c", code]).stdout
            answered.out = out  # type: ignore[attr-defined]
            return "no-answer" not in out

        wait_for(answered, 10.0, "miniupnpd to answer on 5351")
        out = answered.out  # type: ignore[attr-defined]
        # 2.3.1 answers NO_RESOURCES (its add fails while forwarding is disabled).
        assert "refused a PCP mapping" in out and "malformed" not in out, out
