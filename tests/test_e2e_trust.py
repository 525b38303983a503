"""End to end: host-key continuity, shields-up and the audit log, with real processes.

A real server, real agents, two real OpenSSH sshd (two different sets of host keys) and
real ssh. The story of issue 7: ``nodes remove labpc``, someone enrolls a new ``labpc``
in front of another sshd, and ``ssh labpc`` must refuse until the user trusts it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from homeport.testing.deadline import wait_for
from homeport.testing.sshd import SshdServer, make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport
from tests.test_e2e_loopback import EchoServer

pytestmark = pytest.mark.integration

ok, why = sshd_available()
if not ok:
    pytest.skip(f"needs OpenSSH sshd: {why}", allow_module_level=True)


@dataclass
class Net:
    hp: Homeport
    sshd_a: SshdServer
    sshd_b: SshdServer
    echo: EchoServer
    lab: subprocess.Popen[bytes]
    laptop: Path  # its agent runs: nc takes the warm path (the agent pins)
    roamer: Path  # enrolled, agent stopped: nc dials by itself (nc pins)

    def ssh(self, state: Path, sshd: SshdServer, *cmd: str) -> subprocess.CompletedProcess[str]:
        argv = [*self.hp.ssh_args(state, sshd.client_key, sshd.user), "labpc", *cmd]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=self.hp.env)

    def nc(
        self, state: Path, host: str, port: str, stdin: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*HOMEPORT, "nc", "--state", str(state), host, port],
            input=stdin,
            capture_output=True,
            timeout=30,
            env=self.hp.env,
        )

    def hp_json(self, *args: str) -> Any:
        return json.loads(self.hp.run([*HOMEPORT, *args, "--json"]).stdout)

    def audit(self) -> list[dict[str, Any]]:
        out = self.hp.run([*HOMEPORT, "audit", "--json", "--data", str(self.hp.data_dir)]).stdout
        return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("hp-trust")
    hp = Homeport(root)
    sshd_a, sshd_b = make_sshd(root / "sshd-a"), make_sshd(root / "sshd-b")
    echo = EchoServer()
    try:
        sshd_a.start()
        sshd_b.start()
        hp.start_server()
        lab = hp.up("labpc", "--expose", f"ssh=127.0.0.1:{sshd_a.port}")
        hp.wait_online("labpc", lab)
        # Relayed streams only: these tests read the server's audit log, and a stream over
        # a direct path never reaches the server (the destination agent logs it).
        laptop = hp.up("laptop", "--relay-only")
        hp.wait_online("laptop", laptop)
        roamer = hp.up("roamer")
        hp.wait_online("roamer", roamer)
        roamer.send_signal(signal.SIGTERM)
        roamer.wait(timeout=10)
        yield Net(hp, sshd_a, sshd_b, echo, lab, hp.state("laptop"), hp.state("roamer"))
    finally:
        hp.close()
        sshd_a.stop()
        sshd_b.stop()
        echo.close()


def _key_b64(sshd: SshdServer) -> str:
    return next(p for p in sshd.host_key_pubs if "ed25519" in p.name).read_text().split()[1]


def test_shields_up_refuses_everything_and_can_still_open(net: Net) -> None:
    hp = net.hp
    shy = hp.up("shy", "--shields-up", "--expose", f"echo=127.0.0.1:{net.echo.port}")
    hp.wait_online("shy", shy)
    for service in ("echo", str(net.echo.port)):  # by name and by port: both refused
        res = net.nc(net.laptop, "shy", service, b"ping")
        assert res.returncode == 1, res
        assert b"shy has shields up: it accepts no incoming streams" in res.stderr
        assert res.stdout == b""
    assert net.echo.received == []  # nothing ever reached the service
    assert "rejected [shields-up]" in hp.log("agent-shy")
    assert "shields up" in hp.log("agent-shy")
    # it can still open streams itself: the sshd banner of labpc
    res = net.nc(hp.state("shy"), "labpc", "22", b"")
    assert res.returncode == 0 and res.stdout.startswith(b"SSH-2.0-"), res
    # status says so on the node with shields up, and only there
    shy_status = hp.run([*HOMEPORT, "status", "--state", str(hp.state("shy"))]).stdout
    assert shy_status.startswith("shields up:")
    assert net.hp_json("status", "--state", str(hp.state("shy")))["shields_up"] is True
    assert net.hp_json("status", "--state", str(net.laptop))["shields_up"] is False

    # the server's audit log has the destination's refusal
    def denied() -> list[dict[str, Any]]:
        return [e for e in net.audit() if e["kind"] == "stream" and e.get("code") == "shields-up"]

    wait_for(lambda: len(denied()) == 2, 10, "shields-up refusals in audit.jsonl")
    ev = denied()[0]
    assert (ev["src"], ev["dst"], ev["verdict"], ev["by"]) == (
        "laptop",
        "shy",
        "denied",
        "destination",
    )


def test_audit_records_streams_enrollments_and_keys(net: Net) -> None:
    assert net.ssh(net.laptop, net.sshd_a, "true").returncode == 0
    res = net.nc(net.laptop, "labpc", "nope")
    assert res.returncode == 1
    nodes = {n["name"]: n["node_id"] for n in net.hp.nodes()}

    def events() -> list[dict[str, Any]]:
        return net.audit()

    def has(pred: Any) -> bool:
        return any(pred(e) for e in events())

    wait_for(
        lambda: has(lambda e: e["kind"] == "stream" and e["verdict"] == "allowed"
                    and e["dst"] == "labpc" and e["service"] == "ssh"),
        10, "an allowed stream in the audit log",
    )  # fmt: skip
    evs = events()
    allowed = next(
        e
        for e in evs
        if e["kind"] == "stream" and e["verdict"] == "allowed" and e["src"] == "laptop"
    )
    assert allowed["src_id"] == nodes["laptop"]
    assert allowed["dst_id"] == nodes["labpc"] and allowed["rule"] == "service-exposed"
    denied = [e for e in evs if e["kind"] == "stream" and e.get("service") == "nope"]
    assert denied and denied[0]["verdict"] == "denied" and denied[0]["by"] == "server"
    assert denied[0]["code"] == "not-exposed" and denied[0]["rule"]
    enrolled = {e["node"]: e for e in evs if e["kind"] == "enroll"}
    assert {"labpc", "laptop", "roamer", "shy"} <= set(enrolled)
    assert enrolled["labpc"]["node_id"] == nodes["labpc"] and enrolled["labpc"]["key_id"]
    key_ids = {e["key_id"] for e in evs if e["kind"] == "key-create"}
    assert {e["key_id"] for e in enrolled.values()} <= key_ids
    # the human form: one line per event
    text = net.hp.run([*HOMEPORT, "audit", "--since", "1h", "--data", str(net.hp.data_dir)]).stdout
    assert len(text.splitlines()) == len(events())
    assert " stream " in text and "verdict=denied" in text


def test_audit_follow_prints_new_events(net: Net) -> None:
    proc = subprocess.Popen(
        [*HOMEPORT, "audit", "--follow", "--json", "--since", "1s", "--data", str(net.hp.data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=net.hp.env,
    )
    lines: list[dict[str, Any]] = []

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(json.loads(raw))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        key = net.hp.keys_create("--note", "follow-me")
        wait_for(
            lambda: any(e["kind"] == "key-create" and e.get("note") == "follow-me" for e in lines),
            10,
            "the new key in `homeport audit --follow`",
        )
        assert key  # the key itself never appears in the log, only its id
        assert all(key not in json.dumps(e) for e in lines)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        t.join(5)


def test_reenrolled_name_with_other_host_keys_is_refused_until_trust_reset(net: Net) -> None:
    hp = net.hp
    # first contact pins labpc: through the agent (laptop) and by nc itself (roamer)
    for state in (net.laptop, net.roamer):
        res = net.ssh(state, net.sshd_a, "echo", "ok")
        assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    old_id = next(n["node_id"] for n in hp.nodes() if n["name"] == "labpc")
    (pin,) = [
        p
        for p in net.hp_json("trust", "list", "--state", str(net.laptop))["pins"]
        if p["name"] == "labpc"
    ]
    assert pin["node_id"] == old_id and len(pin["host_keys"]) == 2
    assert any(_key_b64(net.sshd_a) in k for k in pin["host_keys"])

    # labpc is removed; someone enrolls a new "labpc" in front of another sshd
    hp.run([*HOMEPORT, "nodes", "remove", "--data", str(hp.data_dir), "labpc"])
    assert net.lab.wait(timeout=10) != 0
    impostor_state = hp.root / "state-labpc2"
    cmd = [*HOMEPORT, "up", "--state", str(impostor_state), "--server", hp.server_addr,
           "--authkey", hp.keys_create(), "--name", "labpc",
           "--expose", f"ssh=127.0.0.1:{net.sshd_b.port}"]  # fmt: skip
    impostor = hp.spawn(cmd, "agent-labpc2")
    hp.wait_online("labpc", impostor)
    new_id = next(n["node_id"] for n in hp.nodes() if n["name"] == "labpc")
    assert new_id != old_id

    for state in (net.laptop, net.roamer):  # warm path and direct path alike
        res = net.ssh(state, net.sshd_b, "echo", "ok")
        assert res.returncode == 255 and res.stdout == "", res
        assert (
            f"homeport nc: labpc: labpc is now a different node ({new_id}, pinned {old_id}"
            in res.stderr
        )
        assert "run: homeport trust reset labpc" in res.stderr
        # known_hosts still holds only the old keys: ssh never saw the impostor's
        kh = (state / "known_hosts" / "labpc").read_text()
        assert _key_b64(net.sshd_a) in kh and _key_b64(net.sshd_b) not in kh

    out = hp.run([*HOMEPORT, "trust", "reset", "--state", str(net.laptop), "labpc"]).stdout
    assert "forgot the pin for labpc" in out
    res = net.ssh(net.laptop, net.sshd_b, "echo", "ok")
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    (pin,) = [
        p
        for p in net.hp_json("trust", "list", "--state", str(net.laptop))["pins"]
        if p["name"] == "labpc"
    ]
    assert pin["node_id"] == new_id
    # roamer did not reset: still refused
    assert net.ssh(net.roamer, net.sshd_b, "true").returncode == 255
    res = hp.run([*HOMEPORT, "trust", "reset", "--state", str(net.laptop), "nosuch"], check=False)
    assert res.returncode == 1 and "nothing pinned for nosuch" in res.stderr

    # same node id, other host keys (its agent now fronts sshd A): refused as a key change
    impostor.send_signal(signal.SIGTERM)
    impostor.wait(timeout=10)
    cmd[cmd.index(f"ssh=127.0.0.1:{net.sshd_b.port}")] = f"ssh=127.0.0.1:{net.sshd_a.port}"
    again = hp.spawn(cmd, "agent-labpc2")
    hp.wait_online("labpc", again)
    assert next(n["node_id"] for n in hp.nodes() if n["name"] == "labpc") == new_id

    def refused() -> bool:
        res = net.nc(net.laptop, "labpc", "22")
        return res.returncode == 1 and b"labpc's ssh host keys changed" in res.stderr

    wait_for(refused, 10, "the key change refused")
    res = net.ssh(net.laptop, net.sshd_a, "true")
    assert res.returncode == 255 and "host keys changed (new " in res.stderr
    assert "trust reset labpc" in res.stderr
    hp.run([*HOMEPORT, "trust", "reset", "--state", str(net.laptop), "labpc"])
    assert net.ssh(net.laptop, net.sshd_a, "true").returncode == 0
    # the removal is in the audit log
    assert any(e["kind"] == "node-remove" and e["node_id"] == old_id for e in net.audit())
