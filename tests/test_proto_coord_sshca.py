"""Keyless SSH in the coordinator, in memory with a fake clock: certificates and login checks."""

from __future__ import annotations

from dataclasses import replace

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from homeport.crypto import sshca
from homeport.policy.acl import compile_policy
from homeport.proto import audit, login
from homeport.proto import coord as c
from homeport.wire import control as m
from tests.coordsim import Sim

POLICY = """{
  "groups": {"group:dev": ["dev@example.com"], "group:admin": ["admin@example.com"]},
  "tagOwners": {"tag:lab": ["group:admin"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "ssh": [
    {"action": "accept", "src": ["group:admin"], "dst": ["tag:lab"],
     "users": ["autogroup:nonroot"]},
    {"action": "check", "src": ["group:dev"], "dst": ["tag:lab"], "users": ["ubuntu"],
     "checkPeriod": "1h"},
  ],
}"""
CA = sshca.SshCa(sshca.SshCa.generate())


def key() -> str:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def network(sim: Sim) -> dict[str, c.NodeRecord]:
    spec = {
        "admin": ("admin@example.com", ()),
        "dev": ("dev@example.com", ()),
        "dev2": ("dev@example.com", ()),
        "guest": ("guest@example.com", ()),
        "lab": ("", ("tag:lab",)),
    }
    out = {}
    for name, (user, tags) in spec.items():
        node = replace(sim.new_node(name), user=user, tags=tags)
        sim.core._add_node(node)
        out[name] = node
    return out


def ask(sim: Sim, sid: int, account: str, dst: str = "lab") -> m.SshCert:
    sim.send(sid, m.SshCertReq(req_id=7, dst=dst, user=account, public_key=key()))
    reply = sim.out[sid].of(m.SshCert)[-1]
    assert isinstance(reply, m.SshCert) and reply.req_id == 7
    return reply


def login_state(sim: Sim, sid: int, action: str, code: str = "") -> m.LoginState:
    sim.send(sid, m.Login(action=action, code=code))
    reply = sim.out[sid].of(m.LoginState)[-1]
    assert isinstance(reply, m.LoginState)
    return reply


def setup() -> tuple[Sim, dict[str, c.NodeRecord]]:
    sim = Sim(policy=compile_policy(POLICY), ssh_ca=CA)
    return sim, network(sim)


def test_welcome_carries_the_ca_key() -> None:
    sim, nodes = setup()
    sid = sim.hello(nodes["admin"], "client")
    [w] = sim.out[sid].of(m.Welcome)
    assert isinstance(w, m.Welcome) and w.ssh_ca == CA.public_line


def test_an_accept_rule_gets_a_certificate_for_the_requested_account() -> None:
    sim, nodes = setup()
    sid = sim.hello(nodes["admin"], "client")
    cert = ask(sim, sid, "alice")
    assert cert.code == "ok" and cert.principals == ("alice",) and cert.rule == "ssh[0]"
    assert cert.ca_key == CA.public_line
    assert cert.valid_before == int(sim.now + sshca.DEFAULT_VALIDITY)
    parsed = serialization.load_ssh_public_identity(cert.cert.encode())
    assert isinstance(parsed, serialization.SSHCertificate)
    assert parsed.key_id.decode().startswith("homeport:admin:alice:ssh[0]:")
    [rec] = [a.as_dict() for a in sim.audits if a.kind == audit.CERT_ISSUE]
    assert rec["principals"] == "alice" and rec["key_id"] == parsed.key_id.decode()
    root = ask(sim, sid, "root")
    assert (root.code, root.cert, root.rule) == ("policy", "", "default-deny")


def test_denied_source_and_unknown_node_are_refused() -> None:
    sim, nodes = setup()
    sid = sim.hello(nodes["guest"], "client")
    no = ask(sim, sid, "ubuntu")
    assert no.code == "policy" and not no.cert
    assert no.reason.startswith("denied by policy: no ssh rule lets guest@example.com")
    unknown = ask(sim, sid, "ubuntu", dst="nowhere")
    assert unknown.code == "unknown-node"


def test_no_ca_means_no_certificates() -> None:
    sim = Sim(policy=compile_policy(POLICY))
    nodes = network(sim)
    sid = sim.hello(nodes["admin"], "client")
    assert ask(sim, sid, "alice").code == sshca.NO_CA


def test_check_rule_needs_an_admin_approval_then_admits_until_it_expires() -> None:
    sim, nodes = setup()
    dev = sim.hello(nodes["dev"], "client")
    first = ask(sim, dev, "ubuntu")
    assert (first.code, first.rule) == (sshca.CHECK_REQUIRED, "ssh[1]")
    pending = login_state(sim, dev, "start")
    assert pending.state == "pending" and len(pending.code) == 9 and pending.provider == "code"
    assert f"homeport login approve {pending.code}" in pending.message
    assert login_state(sim, dev, "poll", pending.code).state == "pending"
    assert ask(sim, dev, "ubuntu").code == sshca.CHECK_REQUIRED  # not yet approved
    sim.advance(30)
    outcome = sim.core.approve_login(pending.code.lower(), sim.now)
    sim.run()
    assert outcome.ok
    assert login_state(sim, dev, "poll", pending.code).state == "approved"
    ok = ask(sim, dev, "ubuntu")
    assert ok.code == "ok" and ok.principals == ("ubuntu",) and ok.rule == "ssh[1]"
    sim.advance(3599)
    assert ask(sim, dev, "ubuntu").code == "ok"
    sim.advance(1)  # the approval is now checkPeriod (1h) old
    assert ask(sim, dev, "ubuntu").code == sshca.CHECK_REQUIRED


def test_a_fresh_device_approves_a_sibling_but_not_another_user() -> None:
    sim, nodes = setup()
    dev = sim.hello(nodes["dev"], "client")
    dev2 = sim.hello(nodes["dev2"], "client")
    guest = sim.hello(nodes["guest"], "client")
    code1 = login_state(sim, dev, "start").code
    code2 = login_state(sim, dev2, "start").code
    # dev2 has no fresh check of its own: it cannot approve dev
    assert login_state(sim, dev2, "approve", code1).state == "refused"
    assert sim.core.approve_login(code1, sim.now).ok
    # dev (fresh) approves dev2; guest's login cannot be approved by dev
    code3 = login_state(sim, guest, "start").code
    assert login_state(sim, dev, "approve", code3).state == "refused"
    assert login_state(sim, dev, "approve", code2).state == "approved"
    assert ask(sim, dev2, "ubuntu").code == "ok"
    assert ask(sim, guest, "ubuntu").code == "policy"


def test_codes_expire() -> None:
    sim, nodes = setup()
    dev = sim.hello(nodes["dev"], "client")
    code = login_state(sim, dev, "start").code
    sim.advance(login.CODE_TTL)
    assert not sim.core.approve_login(code, sim.now).ok
    assert login_state(sim, dev, "poll", code).state == "expired"


def test_tagged_nodes_cannot_start_a_login() -> None:
    sim, nodes = setup()
    lab = sim.hello(nodes["lab"], "client")
    assert login_state(sim, lab, "start").state == "refused"


def test_messages_round_trip_and_reject_bad_input() -> None:
    import pytest

    from homeport.wire.errors import WireError

    req = m.SshCertReq(req_id=1, dst="lab", user="alice", public_key=key())
    assert m.decode_untrusted(m.MsgType.SSH_CERT_REQ, m.encode(req)[5:]) == req
    with pytest.raises(WireError):
        m.SshCertReq(req_id=1, dst="lab", user="al ice", public_key=key())
    with pytest.raises(WireError):
        m.SshCertReq(req_id=1, dst="lab", user="alice", public_key="ssh-ed25519 AAAA")
    with pytest.raises(WireError):
        m.Login(action="steal")
    assert m.REQUIRES[m.MsgType.SSH_CERT] == m.CAP_SSHCERT
