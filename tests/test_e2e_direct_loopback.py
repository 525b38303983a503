"""Direct paths end to end on loopback: real server, two real agents, real sshd and ssh.

Both agents run on 127.0.0.1, so their discovery finds no NAT and the punch
the server coordinates connects at once: the path is ``local`` (a LAN interface
address of the peer) or ``direct`` (127.0.0.1, when the host has no other
address). These tests assert the *path kind* the agent reports, that ssh/scp
really run over it, that losing it sends new streams to the relay at once and
that re-probing brings it back; a ``--relay-only`` agent says why it is relayed.
The NAT matrix (cone, symmetric, CGNAT, miniupnpd ...) is the namespace lab's job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from homeport.io.localapi import query
from homeport.testing.deadline import wait_for
from homeport.testing.sshd import SshdServer, make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport

pytestmark = pytest.mark.integration

ok, why = sshd_available()
if not ok:
    pytest.skip(f"needs OpenSSH sshd: {why}", allow_module_level=True)

DIRECT_KINDS = ("local", "direct")


@dataclass
class Net:
    hp: Homeport
    sshd: SshdServer
    laptop: Path

    def ssh(self, *cmd: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
        argv = [
            *self.hp.ssh_args(state or self.laptop, self.sshd.client_key, self.sshd.user),
            "labpc",
            *cmd,
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=self.hp.env)

    def status(self, state: Path | None = None) -> dict[str, Any]:
        res = self.hp.run([*HOMEPORT, "status", "--json", "--state", str(state or self.laptop)])
        data: dict[str, Any] = json.loads(res.stdout)
        return data

    def path_of(self, name: str, state: Path | None = None) -> dict[str, Any]:
        node = next(n for n in self.status(state)["nodes"] if n["name"] == name)
        detail: dict[str, Any] = node["path_detail"] or {}
        return detail

    def wait_direct(self, timeout: float = 15) -> dict[str, Any]:
        """Open streams (each asks for a direct path if none) until the path is direct."""
        found: dict[str, Any] = {}

        def direct() -> bool:
            res = self.ssh("true")
            assert res.returncode == 0, res.stderr
            found.update(self.path_of("labpc"))
            return found.get("kind") in DIRECT_KINDS

        wait_for(direct, timeout, f"a direct path to labpc\n{self.hp.log('agent-laptop')}")
        return found


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("hpd")
    hp = Homeport(root)
    sshd = make_sshd(root / "sshd")
    try:
        sshd.start()
        hp.start_server()
        lab = hp.up("labpc", "--expose", f"ssh=127.0.0.1:{sshd.port}")
        hp.wait_online("labpc", lab)
        laptop = hp.up("laptop")
        hp.wait_online("laptop", laptop)
        yield Net(hp, sshd, hp.state("laptop"))
    finally:
        hp.close()
        sshd.stop()


def test_ssh_goes_direct_after_the_first_relayed_stream(net: Net) -> None:
    detail = net.wait_direct()
    assert detail["code"] == "direct-up"
    assert re.fullmatch(r"[0-9.]+:\d+", detail["endpoint"]), detail
    res = net.ssh("echo", "ok")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    data = net.status()
    counters = data["counters"]
    assert counters["streams_direct"] >= 1
    assert counters["punch_successes"] >= 1
    assert counters["streams_opened"] > counters["streams_direct"]  # the first went relayed
    assert data["direct"]["direct_port"] > 0
    # the host key ssh checked over the direct path is the pinned one
    pinned = (net.laptop / "known_hosts" / "labpc").read_text()
    ed25519 = next(p for p in net.sshd.host_key_pubs if "ed25519" in p.name).read_text().split()[1]
    assert ed25519 in pinned
    assert "over the direct path" in net.hp.log("agent-laptop")
    assert re.search(r"stream direct-\d+ from laptop .* accepted", net.hp.log("agent-labpc"))
    # the server never saw that stream, yet its audit log has it (STREAM_LOG from labpc)
    audit = [*HOMEPORT, "audit", "--json", "--data", str(net.hp.data_dir)]

    def direct_in_audit() -> list[dict[str, Any]]:
        lines = net.hp.run(audit).stdout.splitlines()
        evs = [json.loads(line) for line in lines]
        return [e for e in evs if e["kind"] == "stream" and e["by"] == "destination-direct"]

    wait_for(lambda: bool(direct_in_audit()), 10, "a destination-direct stream audit record")
    ev = direct_in_audit()[0]
    assert (ev["src"], ev["dst"], ev["service"], ev["verdict"], ev["code"]) == (
        "laptop", "labpc", "ssh", "allowed", "ok",
    )  # fmt: skip
    assert ev["stream"].startswith("direct-")


def test_scp_over_the_direct_path_is_byte_identical(net: Net, tmp_path: Path) -> None:
    net.wait_direct()
    before = net.status()["counters"]["streams_direct"]
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(20 * 1024 * 1024))
    dst = tmp_path / "copy.bin"
    scp = [
        *net.hp.scp_args(net.laptop, net.sshd.client_key),
        str(src),
        f"{net.sshd.user}@labpc:{dst}",
    ]
    res = subprocess.run(scp, capture_output=True, text=True, timeout=120, env=net.hp.env)
    assert res.returncode == 0, res.stderr
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert net.status()["counters"]["streams_direct"] == before + 1


def test_ping_says_which_path(net: Net) -> None:
    net.wait_direct()
    res = net.hp.run([*HOMEPORT, "ping", "--state", str(net.laptop), "labpc", "--count", "3"])
    lines = res.stdout.splitlines()
    assert len(lines) == 1, lines  # stops once direct
    assert re.fullmatch(r"pong from labpc via (local|direct) [0-9.]+:\d+ in [0-9.]+ ms", lines[0])
    res = net.hp.run([*HOMEPORT, "ping", "--json", "--state", str(net.laptop), "labpc"])
    probe = json.loads(res.stdout.splitlines()[0])
    assert probe["ok"] is True and probe["via"] in DIRECT_KINDS and probe["ms"] > 0


def test_netcheck_reports_the_mapping(net: Net) -> None:
    res = net.hp.run([*HOMEPORT, "netcheck", "--json", "--state", str(net.laptop)])
    report = json.loads(res.stdout)
    assert report["server_reachable"] is True
    assert report["latency_ms"] > 0
    host, port = report["seen_main"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) == report["direct_port"]
    assert report["seen_probe"] == report["seen_main"]
    assert report["varies_by_destination"] is False
    assert report["nat"] == "eim" and "endpoint-independent" in report["nat_reason"]
    assert report["portmap"] == ""  # the server is on loopback: no router asked
    text = net.hp.run([*HOMEPORT, "netcheck", "--state", str(net.laptop)]).stdout
    assert "mapping varies by destination: no" in text


def test_lost_direct_path_falls_back_to_relay_then_returns(net: Net) -> None:
    net.wait_direct()
    before = net.status()["counters"]["punch_successes"]
    ans = query(net.laptop, "drop-direct", "labpc")  # test hook: close the mux link
    assert ans is not None and ans["dropped"] is True

    # The choice flips to the relay at once (re-probing starts 2 s later, so polling
    # ``status`` from a loaded machine could miss the relayed window: read the log).
    def relayed() -> bool:
        return "path to labpc: relay (dropped" in net.hp.log("agent-laptop")

    wait_for(relayed, 5, "the path to fall back to the relay")
    res = net.ssh("echo", "relayed")  # a new stream works at once (relay, or direct again)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "relayed"
    detail = net.wait_direct(20)  # re-probing brings it back
    assert detail["code"] == "direct-up"
    assert net.status()["counters"]["punch_successes"] > before  # a new punch, not the old link


def test_relay_only_agent_keeps_the_relay_and_says_why(net: Net) -> None:
    desk = net.hp.up("desk", "--relay-only")
    net.hp.wait_online("desk", desk)
    state = net.hp.state("desk")
    for _ in range(2):
        res = net.ssh("true", state=state)
        assert res.returncode == 0, res.stderr
    detail = net.path_of("labpc", state)
    assert detail["kind"] == "relay"
    assert detail["code"] == "relay-only-local"
    assert "relay-only" in detail["reason"]
    table = net.hp.run([*HOMEPORT, "status", "--state", str(state)]).stdout
    assert "relay (relay-only mode" in table
    assert net.status(state)["counters"]["punch_attempts"] == 0
