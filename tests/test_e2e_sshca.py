"""End to end: keyless SSH with a real server, real agents, a real sshd and real ssh.

sshd trusts only the CA key the lab agent learnt from the server (its state
dir's ``ssh_user_ca.pub``, named by ``TrustedUserCAKeys``); its
``authorized_keys`` holds an unrelated key, so every login here is by a
certificate the server minted from the policy's ``ssh`` rules.
"""

from __future__ import annotations

import getpass
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homeport.testing.deadline import wait_for
from homeport.testing.sshd import SshdServer, make_sshd, sshd_available
from tests.harness import HOMEPORT, Homeport

pytestmark = pytest.mark.integration
ok, why = sshd_available()
if not ok:
    pytest.skip(f"needs OpenSSH sshd: {why}", allow_module_level=True)

ME = getpass.getuser()  # sshd can log in only as the account it runs as (see testing.sshd)
POLICY = f"""{{
  "groups": {{"group:dev": ["dev@example.com"]}},
  "tagOwners": {{"tag:lab": ["admin@example.com"]}},
  "acls": [{{"action": "accept", "src": ["*"], "dst": ["*:*"]}}],
  "ssh": [
    {{"action": "accept", "src": ["admin@example.com"], "dst": ["tag:lab"],
      "users": ["{ME}"]}},
    {{"action": "accept", "src": ["group:dev"], "dst": ["tag:lab"], "users": ["ubuntu"]}},
    {{"action": "check", "src": ["group:dev"], "dst": ["tag:lab"], "users": ["{ME}"],
      "checkPeriod": "1h"}},
  ],
}}
"""
SSH_OPTS = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"]


@dataclass
class Net:
    hp: Homeport
    sshd: SshdServer

    def ssh(self, node: str, account: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        argv = [*HOMEPORT, "ssh", "--state", str(self.hp.state(node)), "--user", account]
        return self.hp.run([*argv, "labpc", *SSH_OPTS, *cmd], check=False)

    def homeport(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.hp.run([*HOMEPORT, *args], check=check)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("hp-sshca")
    hp = Homeport(root)
    ca_file = hp.state("labpc") / "ssh_user_ca.pub"
    sshd = make_sshd(root / "sshd", extra_config=f"TrustedUserCAKeys {ca_file}\nLogLevel INFO\n")
    try:
        hp.start_server()
        data = ["--data", str(hp.data_dir)]
        for user in ("admin@example.com", "dev@example.com"):
            hp.run([*HOMEPORT, "users", "create", user, *data])
        (root / "p.hujson").write_text(POLICY)
        hp.run([*HOMEPORT, "policy", "set", str(root / "p.hujson"), *data])
        sshd.start()
        lab = hp.up(
            "labpc",
            "--expose",
            f"ssh=127.0.0.1:{sshd.port}",
            key=hp.keys_create("--tag", "tag:lab"),
        )
        hp.wait_online("labpc", lab)
        wait_for(ca_file.exists, 10, "the agent keeps the server's SSH CA key")
        for name, user in (("laptop", "admin@example.com"), ("devbox", "dev@example.com")):
            proc = hp.up(name, key=hp.keys_create("--user", user))
            hp.wait_online(name, proc)
        yield Net(hp, sshd)
    finally:
        hp.close()
        sshd.stop()


def test_the_agent_keeps_the_servers_ca_key(net: Net) -> None:
    kept = (net.hp.state("labpc") / "ssh_user_ca.pub").read_text().split()[:2]
    assert kept == (net.hp.data_dir / "ssh_ca.pub").read_text().split()[:2]
    assert (net.hp.data_dir / "ssh_ca").stat().st_mode & 0o777 == 0o600


def test_an_allowed_user_logs_in_with_a_certificate_only_as_an_allowed_account(net: Net) -> None:
    res = net.ssh("laptop", ME, "echo", "in-by-cert")
    assert res.returncode == 0 and res.stdout.strip() == "in-by-cert", res.stderr
    assert f"ID homeport:laptop:{ME}:ssh[0]:" in net.sshd.log_path.read_text()
    # an account the policy does not grant: no certificate, and the one-line reason
    denied = net.ssh("laptop", "daemon", "true")
    assert denied.returncode == 255
    assert "no SSH certificate for daemon@labpc (denied by policy" in denied.stderr


def test_a_check_rule_blocks_until_a_login_is_approved(net: Net) -> None:
    # a certificate for the account dev may use (ubuntu) does not let it in as ME
    got = net.homeport(
        "ssh-cert", "--state", str(net.hp.state("devbox")), "--user", "ubuntu", "--json", "labpc"
    )
    cert = json.loads(got.stdout)
    assert cert["principals"] == ["ubuntu"] and cert["rule"] == "ssh[1]"
    assert Path(cert["key"]).stat().st_mode & 0o777 == 0o600
    argv = net.hp.ssh_args(net.hp.state("devbox"), Path(cert["key"]), ME)
    argv += ["-o", f"CertificateFile={cert['cert']}", "labpc", "true"]
    other = net.hp.run(argv, check=False)
    assert other.returncode == 255 and "Permission denied" in other.stderr, other.stderr
    # ME needs the check
    blocked = net.ssh("devbox", ME, "true")
    assert blocked.returncode == 255
    assert "ssh[2] needs a login check every 1h" in blocked.stderr, blocked.stderr
    login = subprocess.Popen(
        [*HOMEPORT, "login", "--state", str(net.hp.state("devbox")), "--wait", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=net.hp.env,
    )
    try:
        assert login.stdout is not None
        first = login.stdout.readline()
        match = re.search(r"login code ([A-Z0-9]{4}-[A-Z0-9]{4})", first)
        assert match, first
        approved = net.homeport("login", "approve", match.group(1), "--data", str(net.hp.data_dir))
        assert "approved the login of dev@example.com" in approved.stdout
        assert login.wait(timeout=30) == 0, login.stderr.read() if login.stderr else ""
    finally:
        if login.poll() is None:
            login.kill()
            login.wait()
    res = net.ssh("devbox", ME, "echo", "checked")
    assert res.returncode == 0 and res.stdout.strip() == "checked", res.stderr
    assert f"ID homeport:devbox:{ME}:ssh[2]:" in net.sshd.log_path.read_text()
