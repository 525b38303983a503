"""The direct-path matrix in the NAT lab: discovery's NAT kind and the raw punch outcome per row.

One lab (~25 namespaces) is built per module and every row reuses it; each row
starts from empty conntrack tables on every router, so rows do not see each
other's mappings. Raw primitives only (no homeport control plane): discovery
runs from each host's direct port against a whoami responder on the lab server's
two ports, then both hosts punch each other's candidates at the same moment.
"""

from __future__ import annotations

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
    # One line per row (visible with -s): the matrix the report quotes.
    print(
        f"\nMATRIX {row.name:<11} nat={a['kind']}/{b['kind']:<7} "
        f"a={ra.get('kind', ra.get('code'))} b={rb.get('kind', rb.get('code'))} "
        f"punch={max(ra.get('elapsed', 0), rb.get('elapsed', 0)) * 1000:.1f}ms wall={wall:.2f}s"
    )
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
    the_lab, found = lab
    assert found["tcp"]["code"] == "no-probe-port"
    assert found["sym1"]["code"] == "edm" and "differs by destination" in found["sym1"]["reason"]
    assert found["pub"]["code"] == "public"
    upnp = found["upnp"]
    # The real miniupnpd grants PCP (tried first); the stand-in gateway only NAT-PMP.
    want = "pcp" if the_lab.portmap_daemon == "miniupnpd" else "natpmp"
    assert upnp["observations"]["mapping"]["protocol"] == want, upnp["observations"]
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


def test_real_miniupnpd_natpmp_too(lab: tuple[Lab, dict[str, dict[str, Any]]]) -> None:
    """The NAT-PMP path against the real daemon (the matrix used PCP, which goes first)."""
    the_lab, _found = lab
    if the_lab.portmap_daemon != "miniupnpd":
        pytest.skip("miniupnpd not installed: the matrix used the lab NAT-PMP gateway")
    code = (
        "from homeport.io.portmap import request_mapping\n"
        "m = request_mapping(41700, protocols=('natpmp',), lifetime=120)\n"
        "print(m.protocol, m.external_ip, m.external_port, m.lifetime)\n"
    )
    out = the_lab.run("upnp", [sys.executable, "-c", code]).stdout.split()
    assert out == ["natpmp", "203.0.113.27", "41700", "120"]


def test_routers_drop_unsolicited_inbound(lab: tuple[Lab, dict[str, dict[str, Any]]]) -> None:
    """A listener behind a home router is unreachable from outside, and silently so."""
    the_lab, _found = lab
    listener = the_lab.labnode("cone1", "whoami", "41750")
    assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
    try:
        assert _tcp_ok(the_lab, "cone1", "10.20.1.2", 41750, 2.0)  # it does listen
        code = (
            "import socket,sys\n"
            "try:\n socket.create_connection(('203.0.113.21', 41750), timeout=0.5)\n"
            "except TimeoutError: print('dropped')\n"
            "except OSError as e: print(type(e).__name__)\n"
            "else: print('connected')\n"
        )
        for outside in ("pub", "cone2"):
            got = the_lab.run(outside, [sys.executable, "-c", code]).stdout.strip()
            assert got == "dropped", (outside, got)
    finally:
        the_lab.stop(listener)
