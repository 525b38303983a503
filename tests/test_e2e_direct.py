"""The direct-path matrix end to end: the real server, real agents, real sshd, ssh and scp.

One NAT lab (:func:`homeport.testing.natlab.build_matrix_lab`, ~25 namespaces) is
built per module. The real ``homeport server`` listens on the lab server's main
port with its whoami probe port next to it; every lab host runs a real ``homeport
up`` (one agent per host, named after the host, on the fixed direct port
:data:`DIRECT_PORT`, which ``rt_fwd`` forwards); every host that plays "labpc" in
some row exposes a real sshd on its loopback. For each row of
:data:`homeport.testing.natlab.MATRIX`, host ``a`` plays ``labpc`` and host ``b``
the ``laptop``: from ``b``'s namespace, real ``ssh``/``scp`` reach ``labpc``
through the ssh config block ``homeport ssh-config`` prints (``Host labpc`` with
``HostName a``, as a user would alias a node).

What must hold in every row, whatever the path: ``ssh labpc echo ok`` and a
byte-identical ``scp`` (sha256 here and, over ssh, on the far end). On top of
that each row asserts the **path kind** ``homeport status --json`` reports for
the peer (direct / local / mapped, or relay with the reason code of
docs/nat-traversal.md), and the fault tests blackhole the direct path and flush
a NAT's conntrack table. Rows share agents but every row is a different pair,
so each row's path test opens that pair's first stream (its time is honest);
nothing is flushed between rows (that would cut every agent's control
connection too). The ssh/scp tests run after the path tests, over each row's
final path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from homeport.io.localapi import query
from homeport.testing.deadline import Deadline, wait_for
from homeport.testing.natlab import (
    DIRECT_PORT,
    MATRIX,
    SERVER_IP,
    SERVER_MAIN_PORT,
    SERVER_PROBE_PORT,
    Lab,
    MatrixRow,
    build_matrix_lab,
    conntrack_available,
    natlab_available,
)
from homeport.testing.sshd import SshdServer, make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport

pytestmark = [pytest.mark.netns, pytest.mark.integration]

_ok, _why = natlab_available()
if not _ok:
    pytest.skip(f"NAT lab unavailable: {_why}", allow_module_level=True)
_ok, _why = sshd_available()
if not _ok:
    pytest.skip(f"needs OpenSSH sshd: {_why}", allow_module_level=True)

#: Every lab host runs one agent; the ``a`` side of a row is "labpc" and runs sshd.
HOSTS = tuple(sorted({r.a for r in MATRIX} | {r.b for r in MATRIX}))
SSHD_HOSTS = tuple(sorted({r.a for r in MATRIX}))
#: scp payload per row: enough to cross many TLS records and mux windows, cheap for nine rows.
SCP_BYTES = 6 * 1024 * 1024
#: Relay codes a row expected to stay relayed may show (docs/nat-traversal.md).
RELAY_CODES: dict[str, frozenset[str]] = {
    "sym-cone": frozenset({"peer-edm", "self-edm"}),
    "sym-sym": frozenset({"both-edm"}),
    "tcp-only": frozenset({"no-probe-port", "punch-timeout", "self-edm", "peer-edm"}),
}
#: Seconds a row may take from its first stream to the final path (punch deadline 5 s).
PATH_SETTLE = 12.0


@dataclass
class Net:
    lab: Lab
    hp: Homeport
    sshd: dict[str, SshdServer]
    root: Path


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("direct")
    hp = Homeport(root)
    sshds: dict[str, SshdServer] = {}
    with Lab() as lab:
        try:
            build_matrix_lab(lab, whoami=False)
            for host in SSHD_HOSTS:
                sshd = make_sshd(root / f"sshd-{host}", netns=lab.ns(host))
                sshd.start()
                sshds[host] = sshd
            hp.start_server(
                SERVER_IP,
                SERVER_MAIN_PORT,
                prefix=lab.cmd("server", []),
                ready=lambda: (
                    lab.can_connect("pub", SERVER_IP, SERVER_PROBE_PORT, 0.5)
                    and lab.can_connect("pub", SERVER_IP, SERVER_MAIN_PORT, 0.5)
                ),
                extra=["--probe-port", str(SERVER_PROBE_PORT)],
            )
            key = hp.keys_create("--reusable")
            extra = ["--direct-port", str(DIRECT_PORT)]
            agents = {}
            for host in HOSTS:
                expose = ["--expose", f"ssh=127.0.0.1:{sshds[host].port}"] if host in sshds else []
                agents[host] = hp.up(host, *expose, *extra, key=key, prefix=lab.cmd(host, []))
            _wait_all_online(hp, agents)
            yield Net(lab, hp, sshds, root)
        finally:
            hp.close()
            for sshd in sshds.values():
                sshd.stop()


def _wait_all_online(hp: Homeport, agents: dict[str, subprocess.Popen[bytes]]) -> None:
    def ok() -> bool:
        for name, proc in agents.items():
            if proc.poll() is not None:
                raise AssertionError(f"agent {name} exited:\n{hp.log('agent-' + name)}")
        online = {n["name"] for n in hp.nodes() if n.get("online")}
        return online >= set(agents)

    wait_for(ok, 60, "every lab agent online", interval=0.2)


# -- a user's ssh, from the laptop side's namespace --------------------------------------------


def _ssh_config(net: Net, row: MatrixRow) -> Path:
    """``~/.ssh/config`` of the laptop user: an alias ``labpc`` plus homeport's block for it."""
    path = net.root / f"ssh_config-{row.name}"
    if path.exists():
        return path
    state = net.hp.state(row.b)
    block = net.hp.run(
        [*HOMEPORT, "ssh-config", "--state", str(state), "labpc"],
        prefix=net.lab.cmd(row.b, []),
    ).stdout
    sshd = net.sshd[row.a]
    mine = (
        f"Host labpc\n    HostName {row.a}\n    User {sshd.user}\n"
        f"    IdentityFile {sshd.client_key}\n    IdentitiesOnly yes\n"
        "    BatchMode yes\n    LogLevel ERROR\n    ConnectTimeout 20\n"
    )
    path.write_text(mine + block)
    return path


def ssh(
    net: Net, row: MatrixRow, *cmd: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    argv = ["ssh", "-F", str(_ssh_config(net, row)), "labpc", *cmd]
    return net.hp.run(argv, prefix=net.lab.cmd(row.b, []), timeout=timeout, check=False)


def scp_roundtrip(net: Net, row: MatrixRow, tmp: Path) -> None:
    """A byte-identical scp to labpc: sha256 of the source here, of the copy there (over ssh)."""
    src = tmp / f"src-{row.name}.bin"
    src.write_bytes(os.urandom(SCP_BYTES))
    dst = net.root / f"copy-{row.name}.bin"
    argv = ["scp", "-q", "-F", str(_ssh_config(net, row)), str(src), f"labpc:{dst}"]
    res = net.hp.run(argv, prefix=net.lab.cmd(row.b, []), timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    far = ssh(net, row, "sha256sum", shlex.quote(str(dst)))
    assert far.returncode == 0, far.stderr
    assert far.stdout.split()[0] == want
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == want
    dst.unlink()


# -- the path a node reports for a peer ---------------------------------------------------------


@dataclass(frozen=True)
class PeerPath:
    kind: str  # relay | direct | local | mapped
    code: str
    reason: str
    endpoint: str
    counters: dict[str, int]


def peer_path(net: Net, me: str, peer: str) -> PeerPath:
    """What ``homeport status --json`` on ``me`` says about the path to ``peer``."""
    out = net.hp.run(
        [*HOMEPORT, "status", "--json", "--state", str(net.hp.state(me))],
        prefix=net.lab.cmd(me, []),
    ).stdout
    data: Any = json.loads(out)
    node = next((n for n in data["nodes"] if n.get("name") == peer), None)
    assert node is not None, f"status --json on {me} lists no {peer}: {out[:2000]}"
    info: dict[str, Any] = node.get("path_detail") or {"kind": node.get("path") or "relay"}
    counters = ("streams_direct", "streams_relay", "punch_attempts", "punch_successes")
    return PeerPath(
        kind=str(info.get("kind", "relay")),
        code=str(info.get("code") or ""),
        reason=str(info.get("reason") or ""),
        endpoint=str(info.get("endpoint") or ""),
        counters={k: int(info[k]) for k in counters if isinstance(info.get(k), int)},
    )


def agent_peer(net: Net, me: str, peer: str) -> dict[str, Any]:
    """The agent's own per-peer path record (the local API query behind ``status``)."""
    got = query(net.hp.state(me), "status", timeout=5.0)
    assert got is not None, f"no agent runs for {me}"
    return next((dict(p) for p in got.get("peers", []) if p.get("name") == peer), {})


def _path_settled(net: Net, row: MatrixRow) -> PeerPath:
    """Poll until labpc's path on the laptop side is the row's expected outcome (or time out)."""
    seen: list[PeerPath] = []

    def done() -> bool:
        p = peer_path(net, row.b, row.a)
        seen.append(p)
        if row.path == "relay":
            return p.kind == "relay" and p.code in RELAY_CODES[row.name]
        return p.kind == row.path

    try:
        wait_for(done, PATH_SETTLE, f"{row.name}: path {row.path}", interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {seen[-1] if seen else None}") from None
    return seen[-1]


# -- the matrix ------------------------------------------------------------------------------


#: Rows the product does not get right yet, and why (the test still runs; xfail non-strict).
KNOWN_GAPS: dict[str, str] = {}
PATH_ROWS = [
    pytest.param(r, marks=pytest.mark.xfail(reason=KNOWN_GAPS[r.name], strict=False))
    if r.name in KNOWN_GAPS
    else r
    for r in MATRIX
]


@pytest.mark.parametrize("row", PATH_ROWS, ids=[r.name for r in MATRIX])
def test_path_kind(net: Net, row: MatrixRow) -> None:
    """The path the laptop side reports for labpc is the row's, and new streams take it."""
    t0 = time.monotonic()
    first = ssh(net, row, "echo", "ok")  # starts on the relay at once; asks for a path
    assert first.returncode == 0, first.stderr
    got = _path_settled(net, row)
    settled = time.monotonic() - t0
    before = got.counters.get("streams_direct", 0)
    res = ssh(net, row, "echo", "ok")
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    after = peer_path(net, row.b, row.a)
    print(
        f"\nE2E-MATRIX {row.name:<11} path={got.kind:<6} code={got.code:<14} "
        f"endpoint={got.endpoint or '-':<22} settled={settled:.2f}s reason={got.reason!r}"
    )
    if row.path == "relay":
        # The explained outcome came, and the next stream stayed on the relay (a row that
        # re-probes by itself, like tcp-only after a punch timeout, may say "probing" now).
        assert got.reason, got
        assert after.kind == "relay" and after.counters["streams_direct"] == before, after
        assert after.counters["streams_relay"] > got.counters["streams_relay"], after
    else:
        assert after.kind == row.path, after
        assert after.counters["streams_direct"] > before, after


@pytest.mark.parametrize("row", MATRIX, ids=[r.name for r in MATRIX])
def test_ssh_and_scp(net: Net, row: MatrixRow, tmp_path: Path) -> None:
    """Every row, whatever its path: ``ssh labpc echo ok`` and a byte-identical scp.

    Runs after the row's path test, so on a row with a direct path these streams
    (three: ssh, scp, the far end's sha256sum) must have gone over it.
    """
    before = peer_path(net, row.b, row.a)
    res = ssh(net, row, "echo", "ok")
    assert res.returncode == 0, f"{res.stderr}\n{net.hp.log('agent-' + row.b)[-3000:]}"
    assert res.stdout.strip() == "ok"
    scp_roundtrip(net, row, tmp_path)
    after = peer_path(net, row.b, row.a)
    if before.kind != "relay":
        moved = after.counters["streams_direct"] - before.counters["streams_direct"]
        assert after.kind == before.kind and moved >= 3, (before, after)


# -- faults (cone-cone) ----------------------------------------------------------------------

#: New streams must leave a dead direct path within this (the mux declares it dead at 3.5 s).
FALLBACK_WITHIN = 5.0
#: What one poll of the agent's local API adds to the observed detection time.
STATUS_SLACK = 0.2
CONE = next(r for r in MATRIX if r.name == "cone-cone")


def _direct_up(net: Net, timeout: float, row: MatrixRow = CONE) -> float:
    """Seconds until the row's path is direct (a stream asks for it first)."""
    t0 = time.monotonic()
    assert ssh(net, row, "true").returncode == 0
    wait_for(
        lambda: peer_path(net, row.b, row.a).kind == "direct",
        timeout,
        f"{row.name} direct path",
        interval=0.1,
    )
    return time.monotonic() - t0


def test_blackhole_falls_back_to_relay_and_heals(net: Net) -> None:
    """Blackhole the direct path 10 s during traffic: new streams on the relay within 5 s; heals."""
    _direct_up(net, PATH_SETTLE)
    peer_wan = net.lab.routers["rt_" + CONE.b].wan_ip
    # Traffic on the direct path while it dies: a long-running remote loop.
    bulk = subprocess.Popen(
        net.lab.cmd(
            CONE.b,
            [
                "ssh",
                "-F",
                str(_ssh_config(net, CONE)),
                "labpc",
                "cat /dev/zero | head -c 200000000",
            ],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=net.hp.env,
    )
    try:
        with net.lab.blackhole("rt_" + CONE.a, peer_wan):
            t0 = time.monotonic()
            clock = Deadline(10.0)
            # The agent's own answer (what status prints), polled cheaply: no CLI start per poll.
            wait_for(
                lambda: agent_peer(net, CONE.b, CONE.a).get("kind") == "relay",
                FALLBACK_WITHIN + 1.0,
                "the laptop to give up the blackholed direct path",
                interval=0.05,
            )
            detected = time.monotonic() - t0
            res = ssh(net, CONE, "echo", "ok", timeout=10)
            fell_back = time.monotonic() - t0
            assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
            assert detected <= FALLBACK_WITHIN + STATUS_SLACK, (detected, fell_back)
            assert peer_path(net, CONE.b, CONE.a).kind == "relay"
            # Streams keep working over the relay for the rest of the 10 s.
            wait_for(clock.expired, 11.0, "the 10 s blackhole", interval=0.2)
            assert ssh(net, CONE, "echo", "ok").returncode == 0
        healed = _direct_up(net, 40.0)
        print(
            f"\nE2E-FAULT blackhole: relay chosen after {detected:.2f}s, a new stream done on"
            f" the relay after {fell_back:.2f}s, direct again {healed:.2f}s after healing"
        )
    finally:
        if bulk.poll() is None:
            bulk.kill()
        bulk.wait(timeout=10)


#: (row, router to flush): an EIM NAT keeps the port, so Linux re-creates the same mapping
#: and the connection may survive; the symmetric NAT picks a new random port, so the
#: direct connection breaks for real (the public peer answers the new port with a RST).
FLUSHES = [
    pytest.param("cone-cone", "rt_cone1", id="cone-cone"),
    pytest.param("public-sym", "rt_sym1", id="public-sym"),
]


@pytest.mark.skipif(not conntrack_available()[0], reason=conntrack_available()[1])
@pytest.mark.parametrize(("row_name", "router"), FLUSHES)
def test_conntrack_flush_back_to_direct(net: Net, row_name: str, router: str) -> None:
    """A NAT that loses its mappings: the direct path is back within 10 s."""
    row = next(r for r in MATRIX if r.name == row_name)
    _direct_up(net, PATH_SETTLE, row)
    punches = agent_peer(net, row.b, row.a).get("punch_successes", 0)
    net.lab.flush_conntrack(router)
    t0 = time.monotonic()

    seen: list[str] = []

    def direct_again() -> bool:
        res = ssh(net, row, "true", timeout=20)
        got = peer_path(net, row.b, row.a)
        seen.append(f"{time.monotonic() - t0:.1f}s ssh={res.returncode} {got.kind}/{got.code}")
        return res.returncode == 0 and got.kind == "direct"

    try:
        wait_for(direct_again, 10.0, f"{row.name} direct again after conntrack -F", interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen}") from None
    again = agent_peer(net, row.b, row.a).get("punch_successes", 0) - punches
    print(
        f"\nE2E-FAULT conntrack flush {router}: direct after {time.monotonic() - t0:.2f}s"
        f" ({again} new punch(es): {'re-punched' if again else 'the connection survived'})"
    )
