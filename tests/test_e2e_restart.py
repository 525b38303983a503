"""The server restarts (an upgrade, a reboot of the VPS): nothing is lost.

Agents notice the dead link, reconnect on their own, and the network works again
with the same identities — the SQLite state (nodes, keys) survives the restart.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from homeport.testing.deadline import wait_for
from homeport.testing.sshd import make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport

pytestmark = pytest.mark.integration

_ok, _why = sshd_available()
if not _ok:
    pytest.skip(f"needs OpenSSH sshd: {_why}", allow_module_level=True)


def test_agents_come_back_after_a_server_restart(tmp_path: Path) -> None:
    hp = Homeport(tmp_path)
    sshd = make_sshd(tmp_path / "sshd")
    try:
        sshd.start()
        server = hp.start_server()
        host, port = hp.server_addr.rsplit(":", 1)
        lab = hp.up("labpc", "--expose", f"ssh=127.0.0.1:{sshd.port}")
        hp.wait_online("labpc", lab)
        laptop = hp.up("laptop")
        hp.wait_online("laptop", laptop)
        unused_key = hp.keys_create()

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0, hp.log("server")
        wait_for(lambda: not hp.node_online("labpc"), 10, "labpc shown offline while down")
        assert lab.poll() is None and laptop.poll() is None, "agents must not exit"

        hp.start_server(host, int(port))
        # back well within the backoff cap (30 s), not after minutes: a deadline, which
        # fails only when the agents do not come back
        hp.wait_online("labpc", lab, timeout=35)
        hp.wait_online("laptop", laptop, timeout=35)

        ssh = hp.ssh_args(hp.state("laptop"), sshd.client_key, sshd.user)
        res = subprocess.run(
            [*ssh, "labpc", "echo", "again"], capture_output=True, text=True, timeout=60, env=hp.env
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "again"
        # keys made before the restart still work
        fresh = hp.up("late", key=unused_key)
        hp.wait_online("late", fresh)
        names = {n["name"] for n in hp.nodes()}
        assert {"labpc", "laptop", "late"} <= names
        out = hp.run([*HOMEPORT, "status", "--state", str(hp.state("laptop"))]).stdout
        assert "labpc" in out
    finally:
        hp.close()
        sshd.stop()


def test_agent_restarted_as_systemd_runs_it_keeps_its_identity_and_services(
    tmp_path: Path,
) -> None:
    """``homeport up --state DIR`` alone (the unit's ExecStart) reuses what the first run set up."""
    hp = Homeport(tmp_path)
    try:
        hp.start_server()
        first = hp.up("labpc", "--expose", "web=127.0.0.1:8080")
        hp.wait_online("labpc", first)
        node_id = next(n["node_id"] for n in hp.nodes() if n["name"] == "labpc")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=10) == 0, hp.log("agent-labpc")
        wait_for(lambda: not hp.node_online("labpc"), 20, "labpc offline after SIGTERM")

        again = hp.spawn([*HOMEPORT, "up", "--state", str(hp.state("labpc"))], "agent-labpc-2")
        hp.wait_online("labpc", again)
        labpc = next(n for n in hp.nodes() if n["name"] == "labpc")
        assert labpc["node_id"] == node_id  # the same identity, no new enrollment
        assert "web" in str(labpc["services"])
    finally:
        hp.close()
