"""Identity in the coordinator core, on a fake clock: approval, expiry, renewal, ephemeral nodes.

The calendar matters here (180-day keys), so every test drives time by hand;
the renewal tests wire real node cores to the coordinator (``tests.test_proto_pair.Net``),
so what is checked is the protocol both sides actually speak.
"""

from __future__ import annotations

import pytest

from homeport.proto import audit
from homeport.proto import coord as c
from homeport.proto import node as n
from homeport.wire import control as m
from tests.coordsim import T0, Sim
from tests.test_proto_pair import SSH, Net

DAY = 86400.0
TOKEN = "ab" * 16


def one(box: list[m.Message], cls: type[m.Message]) -> m.Message:
    found = [x for x in box if isinstance(x, cls)]
    assert len(found) == 1, box
    return found[0]


def enroll(sim: Sim, name: str, **key_kw: object) -> c.NodeRecord:
    key = sim.registry.create_auth_key(now=sim.now, **key_kw)  # type: ignore[arg-type]
    msg = sim.enroll(str(key), name)
    assert isinstance(msg, m.Enrolled), msg
    node = sim.core.node(msg.node_id)
    assert node is not None
    return node


def kinds(sim: Sim) -> list[str]:
    return [a.kind for a in sim.audits]


# -- approval ----------------------------------------------------------------------------------


def test_a_pending_node_is_isolated_until_approved() -> None:
    sim = Sim(key_expiry=None)
    lab = sim.new_node("labpc")
    lab_sid = sim.agent(lab, (m.ServiceInfo("ssh", 22),))
    sim.advance(1)
    sim.out[lab_sid].take()
    new = enroll(sim, "newbox", approval=True)
    assert not new.approved
    new_sid = sim.agent(new, (m.ServiceInfo("ssh", 22),))
    welcome = one(sim.out[new_sid].messages, m.Welcome)
    assert isinstance(welcome, m.Welcome) and welcome.approved is False
    sim.advance(1)
    # in no peer map: labpc was not told about it
    pushed = [p for p in sim.out[lab_sid].take() if isinstance(p, m.Peers)]
    assert all(peer.name != "newbox" for p in pushed for peer in p.peers)
    # it sees no one either
    sim.send(new_sid, m.NetMapRequest())
    assert [p.peers for p in sim.out[new_sid].messages if isinstance(p, m.Peers)] == [()]
    # it can neither open nor receive streams
    sim.send(new_sid, m.Open(dst="labpc", service="ssh", token=TOKEN))
    failed = sim.out[new_sid].of(m.OpenFailed)[-1]
    assert isinstance(failed, m.OpenFailed) and failed.code == "pending-approval"
    assert "homeport nodes approve newbox" in failed.message
    sim.send(lab_sid, m.Open(dst="newbox", service="ssh", token="cd" * 16))
    failed = sim.out[lab_sid].of(m.OpenFailed)[-1]
    assert isinstance(failed, m.OpenFailed) and failed.code == "pending-approval"
    assert not sim.out[new_sid].of(m.Incoming)
    # approval: a notice, the full map, and it appears in labpc's map
    sim.core.approve_node("newbox", sim.now)
    sim.run()
    notice = one(sim.out[new_sid].messages, m.Notice)
    assert isinstance(notice, m.Notice) and notice.code == "approved"
    assert any(
        peer.name == "labpc"
        for p in sim.out[new_sid].messages
        if isinstance(p, m.Peers)
        for peer in p.peers
    )
    sim.advance(1)
    assert any(
        peer.name == "newbox"
        for p in sim.out[lab_sid].messages
        if isinstance(p, m.Peers)
        for peer in p.peers
    )
    sim.send(lab_sid, m.Open(dst="newbox", service="ssh", token="ef" * 16))
    assert sim.out[new_sid].of(m.Incoming)
    assert kinds(sim).count(audit.APPROVE) == 1
    [stored] = [x for x in sim.registry.load_nodes() if x.name == "newbox"]
    assert stored.approved


# -- expiry ------------------------------------------------------------------------------------


def test_an_expired_node_is_refused_and_extend_readmits_it() -> None:
    sim = Sim(key_expiry=180 * DAY)
    lab = sim.new_node("labpc")
    assert lab.expires_at == T0 + 180 * DAY
    sid = sim.hello(lab)
    welcome = one(sim.out[sid].messages, m.Welcome)
    assert isinstance(welcome, m.Welcome)
    assert (welcome.expires_at, welcome.key_lifetime) == (T0 + 180 * DAY, 180 * DAY)
    sim.end(sid)
    sim.advance(181 * DAY)  # offline the whole time (an old agent that cannot renew)
    sid = sim.hello(lab)
    closed = sim.out[sid].closed
    assert closed is not None and closed[0] == "expired"
    assert "homeport nodes extend labpc" in closed[1]
    assert not sim.core.is_online(lab.node_id)
    # the admin re-admits it without touching the node: the same certificate works again
    sim.core.extend_node("labpc", sim.now)
    sim.run()
    sid = sim.hello(lab)
    assert sim.out[sid].closed is None and sim.core.is_online(lab.node_id)
    [stored] = sim.registry.load_nodes()
    assert stored.expires_at == sim.now + 180 * DAY
    assert [a.as_dict()["event"] for a in sim.audits if a.kind == audit.NODE_EXPIRY] == [
        "expired",
        "extend",
    ]


def test_warnings_come_14_3_and_1_days_ahead() -> None:
    sim = Sim(key_expiry=30 * DAY)
    lab = sim.new_node("labpc")
    sid = sim.hello(lab, "client")  # a session that does not renew (a status CLI)
    sim.advance(16 * DAY - 1)
    assert not sim.out[sid].of(m.Notice)
    warned_at: list[float] = []
    for _ in range(int(14 * DAY / 3600) + 1):
        before = len(sim.out[sid].of(m.Notice))
        sim.advance(3600)
        if len(sim.out[sid].of(m.Notice)) > before:
            warned_at.append(round((T0 + 30 * DAY - sim.now) / DAY))
    assert warned_at == [14, 3, 1]
    notice = sim.out[sid].of(m.Notice)[-1]
    assert isinstance(notice, m.Notice) and notice.code == "expiry"
    assert notice.expires_at == T0 + 30 * DAY and "homeport nodes extend labpc" in notice.message
    assert sum("expires" in t for t in sim.notes) == 3


def test_an_online_node_that_cannot_renew_is_cut_at_expiry_and_expire_is_immediate() -> None:
    sim = Sim(key_expiry=10 * DAY)
    lab = sim.new_node("labpc")
    db = sim.new_node("db")
    sid = sim.agent(lab)
    sim.advance(10 * DAY + 1)
    closed = sim.out[sid].closed
    assert closed is not None and closed[0] == "expired"
    sid = sim.agent(db)
    sim.core.expire_node("db", sim.now)
    sim.run()
    closed = sim.out[sid].closed
    assert closed is not None and closed[0] == "expired"
    sim.end(sid)
    sim.core.set_expiry_disabled("db", sim.now)
    sim.run()
    sid = sim.agent(db)
    assert sim.out[sid].closed is None and sim.core.is_online(db.node_id)


def test_tagged_nodes_do_not_expire_by_default() -> None:
    sim = Sim(key_expiry=DAY)
    srv = enroll(sim, "srv", tags=("tag:server",))
    assert srv.expires_at is None and srv.tags == ("tag:server",) and srv.user == ""
    sim.advance(400 * DAY)
    sid = sim.hello(srv)
    assert sim.out[sid].closed is None


def test_enrollment_sets_user_and_tags_and_audits() -> None:
    sim = Sim()
    sim.registry.create_user("alice@example.com", sim.now)
    node = enroll(sim, "laptop", user="alice@example.com")
    assert (node.user, node.tags) == ("alice@example.com", ())
    sid = sim.connect(None)
    sim.send(sid, m.Enroll(proto=1, auth_key="hpk1-nonsense", name="x", csr_pem="x"))
    assert kinds(sim) == [audit.ENROLL, audit.ENROLL_REFUSED]
    assert sim.audits[0].as_dict()["user"] == "alice@example.com"


# -- renewal: an online node is never cut off by the calendar ----------------------------------


class RenewNet(Net):
    def __init__(self, key_expiry: float) -> None:
        super().__init__()
        self.sim = Sim(open_timeout=10.0, unpaired_timeout=10.0, key_expiry=key_expiry)


def test_an_online_node_renews_itself_and_is_never_cut_off() -> None:
    net = RenewNet(key_expiry=30 * DAY)
    lab = net.join("labpc", (SSH,))
    first_fp = lab.record.fingerprint
    # two years in 6-hour steps: the agent stays online across ~36 lifetimes
    for _ in range(4 * 730):
        net.advance(6 * 3600)
        assert net.sim.out[lab.sid].closed is None, net.sim.out[lab.sid].closed
    renewals = lab.of(n.Renewed)
    assert len(renewals) >= 24  # every ~20 days
    record = net.sim.core.node(lab.record.node_id)
    assert record is not None and record.expires_at is not None
    assert record.expires_at - net.sim.now > 9 * DAY  # always more than a third left
    # the server knows the newest certificate plus one overlap, not the first any more
    assert len(record.fingerprints) == c.MAX_NODE_CERTS and first_fp not in record.fingerprints
    [stored] = net.sim.registry.load_nodes()
    assert stored.fingerprints == record.fingerprints
    assert audit.CERT_ISSUE in {a.kind for a in net.sim.audits}
    last = renewals[-1]
    assert isinstance(last, n.Renewed) and b"BEGIN CERTIFICATE" in last.cert_pem
    assert b"PRIVATE KEY" in last.key_pem


def test_a_lost_renewal_answer_is_retried() -> None:
    net = RenewNet(key_expiry=30 * DAY)
    lab = net.join("labpc")
    net.advance(20 * DAY + 1)  # due: RENEW goes out
    assert len(lab.of(n.Renewed)) == 1
    # a renewal whose answer never arrives: the node tries again after RENEW_RETRY
    lab.core._renew_due = net.sim.now
    net.sim.out[lab.sid].closed = ("lost", "")  # drop what the server says (settle skips it)
    lab.core.handle_timer(net.sim.now)
    sent = [x for x in iter(lab.core.next_command, None) if isinstance(x, n.Send)]
    assert [type(s.msg) for s in sent] == [m.Renew]
    assert lab.core.get_timer() == pytest.approx(net.sim.now + n.RENEW_RETRY)


# -- ephemeral nodes ---------------------------------------------------------------------------


def test_an_ephemeral_node_is_removed_after_it_was_offline_long_enough() -> None:
    sim = Sim(ephemeral_offline=600.0)
    ci = enroll(sim, "ci-runner", ephemeral=True, reusable=True)
    sid = sim.agent(ci)
    sim.advance(3 * DAY)  # online: never removed
    assert sim.core.node_by_name("ci-runner") is not None
    sim.end(sid)
    sim.advance(300)
    sid = sim.agent(ci)  # came back in time: the clock starts over
    sim.advance(3600)
    assert sim.core.node_by_name("ci-runner") is not None
    sim.end(sid)
    sim.advance(599)
    assert sim.core.node_by_name("ci-runner") is not None
    sim.advance(2)
    assert sim.core.node_by_name("ci-runner") is None
    [stored] = sim.registry.load_nodes()
    assert stored.removed
    [removal] = [a for a in sim.audits if a.kind == audit.NODE_REMOVE]
    assert removal.as_dict()["by"] == "ephemeral"


def test_an_ephemeral_node_offline_across_a_server_restart_is_removed() -> None:
    sim = Sim(ephemeral_offline=600.0)
    ci = enroll(sim, "ci-runner", ephemeral=True)
    sim.end(sim.agent(ci))
    restarted = Sim(ephemeral_offline=600.0, nodes=sim.registry.load_nodes())
    restarted.now = sim.now + 601
    restarted.advance(0)
    assert restarted.core.node_by_name("ci-runner") is None
