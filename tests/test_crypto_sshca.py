"""The SSH user CA (pure): principals from the ssh rules, validity, key id, refusals.

Certificates are parsed back with ``cryptography``'s own loader, so the test reads
what sshd would read rather than trusting our builder's inputs.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from homeport.crypto import sshca
from homeport.policy.acl import SshVerdict, Subject, compile_policy
from homeport.wire.errors import WireError

POLICY = """{
  "groups": {"group:dev": ["dev@example.com"], "group:admin": ["admin@example.com"]},
  "tagOwners": {"tag:lab": ["group:admin"]},
  "ssh": [
    {"action": "accept", "src": ["group:admin"], "dst": ["tag:lab"],
     "users": ["autogroup:nonroot", "root"]},
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:lab"], "users": ["deploy"]},
    {"action": "check", "src": ["group:dev"], "dst": ["tag:lab"], "users": ["ubuntu"],
     "checkPeriod": "1h"},
  ],
}"""
ADMIN = Subject("n1", "laptop", "admin@example.com")
DEV = Subject("n2", "devbox", "dev@example.com")
OTHER = Subject("n3", "guest", "guest@example.com")
LAB = Subject("n4", "lab", "", ("tag:lab",))
NOW = 1_800_000_000.0


def user_key() -> str:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def plan(src: Subject, account: str, approved_at: float | None = None) -> object:
    return sshca.plan_certificate(
        compile_policy(POLICY), src, LAB, account, approved_at=approved_at, now=NOW
    )


def test_nonroot_expands_to_the_requested_account_only_and_named_root_rides_along() -> None:
    p = plan(ADMIN, "alice")
    assert isinstance(p, sshca.CertPlan)
    assert p.principals == ("alice", "root") and p.rule == "ssh[0]"
    assert p.verdict is SshVerdict.ACCEPT


def test_accept_grants_only_named_accounts_and_check_needs_an_approval() -> None:
    p = plan(DEV, "deploy")
    assert isinstance(p, sshca.CertPlan) and p.principals == ("deploy",)  # ubuntu: no check yet
    refused = plan(DEV, "ubuntu")
    assert isinstance(refused, sshca.Refusal)
    assert (refused.code, refused.rule) == (sshca.CHECK_REQUIRED, "ssh[2]")
    assert "ssh[2] needs a login check every 1h" in refused.reason
    fresh = plan(DEV, "ubuntu", approved_at=NOW - 3599)
    assert isinstance(fresh, sshca.CertPlan) and fresh.principals == ("ubuntu", "deploy")
    assert fresh.verdict is SshVerdict.CHECK
    stale = plan(DEV, "ubuntu", approved_at=NOW - 3600)
    assert isinstance(stale, sshca.Refusal) and stale.code == sshca.CHECK_REQUIRED
    # a fresh check adds the check account to an accept certificate too
    both = plan(DEV, "deploy", approved_at=NOW - 10)
    assert isinstance(both, sshca.CertPlan) and both.principals == ("deploy", "ubuntu")


def test_refusals_name_the_rule() -> None:
    root = plan(DEV, "root")
    assert isinstance(root, sshca.Refusal)
    assert (root.code, root.rule) == ("policy", "default-deny")
    assert root.reason.startswith("denied by policy: no ssh rule lets group:dev")
    guest = plan(OTHER, "alice")
    assert isinstance(guest, sshca.Refusal) and guest.code == "policy"
    bad = plan(ADMIN, "al:ice")
    assert isinstance(bad, sshca.Refusal) and bad.code == sshca.BAD_REQUEST
    none = sshca.plan_certificate(None, ADMIN, LAB, "alice", approved_at=None, now=NOW)
    assert isinstance(none, sshca.Refusal) and none.code == "no-policy"


def test_certificate_terms_read_back() -> None:
    ca = sshca.SshCa(sshca.SshCa.generate())
    assert ca.public_line.startswith("ssh-ed25519 ")
    kid = sshca.key_id("laptop", "alice", "ssh[0]", 0xABC)
    assert kid == "homeport:laptop:alice:ssh[0]:0000000000000abc"
    issued = ca.sign_user(
        user_key(), ("alice", "root"), key_id=kid, serial=0xABC, now=NOW, validity=300
    )
    cert = serialization.load_ssh_public_identity(issued.line.encode())
    assert isinstance(cert, serialization.SSHCertificate)
    assert cert.type is serialization.SSHCertificateType.USER
    assert cert.valid_principals == [b"alice", b"root"]
    assert cert.key_id == kid.encode() and cert.serial == 0xABC
    assert cert.valid_after == int(NOW - sshca.CLOCK_SKEW)
    assert cert.valid_before == int(NOW + 300)
    assert cert.extensions == {b"permit-pty": b""} and cert.critical_options == {}
    cert.verify_cert_signature()
    assert (
        cert.signature_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        == ca.public_line.encode()
    )
    long = ca.sign_user(user_key(), ("alice",), key_id=kid, serial=1, now=NOW, validity=1e9)
    assert long.valid_before == int(NOW + sshca.MAX_VALIDITY)


def test_sign_refuses_empty_or_bad_principals() -> None:
    ca = sshca.SshCa(sshca.SshCa.generate())
    with pytest.raises(sshca.SshCaError):
        ca.sign_user(user_key(), (), key_id="x", serial=1, now=NOW)
    with pytest.raises(sshca.SshCaError):
        ca.sign_user(user_key(), ("a b",), key_id="x", serial=1, now=NOW)


def test_ca_key_must_be_an_ed25519_openssh_key() -> None:
    with pytest.raises(sshca.SshCaError):
        sshca.SshCa(b"not a key")
    rsa_key = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    with pytest.raises(sshca.SshCaError, match="Ed25519"):
        sshca.SshCa(rsa_key)


def test_user_keys_are_checked_strictly() -> None:
    line = user_key()
    assert sshca.user_key_untrusted(line + " comment") == line
    for bad in ("", "ssh-ed25519", "ssh-ed25519 AAAA", "ssh-dss AAAAB3NzaC1kc3M=", line + "\n"):
        with pytest.raises(WireError):
            sshca.user_key_untrusted(bad)
    small = (
        rsa.generate_private_key(65537, 1024)
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    with pytest.raises(WireError, match="2048"):
        sshca.user_key_untrusted(small)
