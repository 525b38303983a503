"""Self-tests for homeport.testing.netns: the NAT lab must behave like real NAT.

If the lab let inbound connections through, every "works behind NAT" test
built on it would prove nothing; so these tests check both directions, the
masquerading, and that nothing is left behind on the host.
"""

from __future__ import annotations

import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeport.testing.netns import LOGICAL_NAMES, MAX_PREFIX_LEN, NatLab, netns_available
from homeport.testing.sshd import make_sshd, sshd_available

pytestmark = pytest.mark.netns

# Replies "<peer ip> <payload>" to each connection, so the test can see the
# source address the server observed.  Prints its port once listening.  The
# accept loop is bounded by a count and by an accept timeout.
ECHO_SERVER = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 0))
srv.listen(8)
srv.settimeout(60)
print(srv.getsockname()[1], flush=True)
for _ in range(32):
    conn, peer = srv.accept()
    with conn:
        conn.settimeout(5)
        data = conn.recv(1024)
        conn.sendall(peer[0].encode() + b" " + data)
"""

# Connects, sends "hello", prints the reply; exit status 3 on any socket error.
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        s.sendall(b"hello")
        print(s.recv(1024).decode(), flush=True)
except OSError as exc:
    print(type(exc).__name__, exc, file=sys.stderr)
    sys.exit(3)
"""


def _require_netns() -> None:
    ok, reason = netns_available()
    if not ok:
        pytest.skip(reason)


def _netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def lab() -> Iterator[NatLab]:
    _require_netns()
    with NatLab() as built:
        yield built
    assert not (set(built.names.values()) & _netns_list())


def _start_echo(lab: NatLab, logical: str, ip: str) -> int:
    """Start the echo server and return its port, read with a deadline."""
    proc = lab.popen(
        logical, [sys.executable, "-c", ECHO_SERVER, ip], stdout=subprocess.PIPE, stderr=None
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15.0)
    assert ready, "echo server did not report its port within 15 s"
    line = proc.stdout.readline().decode().strip()
    assert line.isdigit(), f"echo server said {line!r} (exit {proc.poll()})"
    return int(line)


def _connect(
    lab: NatLab, logical: str, ip: str, port: int, timeout: float = 5.0
) -> subprocess.CompletedProcess[str]:
    return lab.run(
        logical,
        [sys.executable, "-c", CLIENT, ip, str(port), str(timeout)],
        check=False,
        timeout=timeout + 30,
    )


def test_names_are_unique_and_short() -> None:
    a, b = NatLab(), NatLab()
    assert set(a.names) == set(LOGICAL_NAMES)
    assert not set(a.names.values()) & set(b.names.values())
    assert all(len(name) <= 15 for name in a.ifaces.values())
    assert a.cmd("lab", ["true"]) == ["ip", "netns", "exec", a.names["lab"], "true"]
    with pytest.raises(ValueError):
        NatLab("x" * (MAX_PREFIX_LEN + 1))
    with pytest.raises(ValueError):
        NatLab("bad/name")
    a.close()  # never created: a no-op


def test_outbound_is_masqueraded(lab: NatLab) -> None:
    port = _start_echo(lab, "server", lab.server_ip)
    for home, router in (("lab", "rt_lab"), ("laptop", "rt_laptop")):
        proc = _connect(lab, home, lab.server_ip, port)
        assert proc.returncode == 0, proc.stderr
        # The server sees the router's public address, not 10.10.x.2.
        assert proc.stdout.strip() == f"{lab.public_ips[router]} hello"


def test_inbound_to_private_address_fails(lab: NatLab) -> None:
    lab_ip = lab.lan_ips["lab"]
    port = _start_echo(lab, "lab", lab_ip)
    # Positive control: the listener works from its own LAN (the router).
    control = _connect(lab, "rt_lab", lab_ip, port)
    assert control.returncode == 0, control.stderr
    assert control.stdout.strip() == f"{lab.lan_ips['rt_lab']} hello"

    # The server has no route to private space at all...
    no_route = _connect(lab, "server", lab_ip, port, timeout=1.0)
    assert no_route.returncode == 3, no_route.stdout

    # ...and even with one pointing at the router, the NAT drops new inbound.
    lab.run("server", ["ip", "route", "add", "10.10.0.0/16", "via", lab.public_ips["rt_lab"]])
    dropped = _connect(lab, "server", lab_ip, port, timeout=1.0)
    assert dropped.returncode == 3, dropped.stdout
    assert "timed out" in dropped.stderr or "Timeout" in dropped.stderr


def test_homes_cannot_reach_each_other(lab: NatLab) -> None:
    laptop_ip = lab.lan_ips["laptop"]
    port = _start_echo(lab, "laptop", laptop_ip)
    control = _connect(lab, "rt_laptop", laptop_ip, port)
    assert control.returncode == 0, control.stderr
    crossed = _connect(lab, "lab", laptop_ip, port, timeout=1.0)
    assert crossed.returncode == 3, crossed.stdout
    # Nor via the other home's public address: nothing is forwarded inbound.
    public = _connect(lab, "lab", lab.public_ips["rt_laptop"], port, timeout=1.0)
    assert public.returncode == 3, public.stdout


def test_close_removes_everything_and_is_idempotent() -> None:
    _require_netns()
    before_links = _root_links()
    lab = NatLab()
    lab.create()
    assert set(lab.names.values()) <= _netns_list()
    sleeper = lab.popen("lab", [sys.executable, "-c", "import time; time.sleep(600)"])
    # A grandchild the lab never saw: close() must still not leave it behind.
    lab.run("laptop", ["sh", "-c", "sleep 600 >/dev/null 2>&1 &"])
    lab.close()
    assert sleeper.poll() is not None
    assert not (set(lab.names.values()) & _netns_list())
    assert _root_links() == before_links
    assert lab.prefix not in _root_links()
    lab.close()  # second close: no-op


def test_failure_midway_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_netns()
    lab = NatLab()

    def explode(self: NatLab, router: str, host: str) -> None:
        raise RuntimeError("injected failure")

    # Namespaces, bridge and server link exist by the time the homes are built.
    monkeypatch.setattr(NatLab, "_create_home", explode)
    with pytest.raises(RuntimeError, match="injected failure"), lab:
        pytest.fail("unreachable: __enter__ must raise")
    assert not (set(lab.names.values()) & _netns_list())
    lab.close()
    lab.close()


@pytest.mark.integration
def test_sshd_inside_namespace(lab: NatLab, tmp_path: Path) -> None:
    """make_sshd(netns=...) runs sshd in a home behind NAT, reachable only from there."""
    ok, reason = sshd_available()
    if not ok:
        pytest.skip(reason)
    with make_sshd(tmp_path / "sshd", netns=lab.ns("lab")) as sshd:
        proc = lab.run(
            "lab",
            [*sshd.ssh_base_args(), "-p", str(sshd.port), sshd.host, "echo", "ok"],
            timeout=60,
        )
        assert proc.stdout == "ok\n"
