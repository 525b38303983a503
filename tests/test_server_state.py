"""ServerState with an in-memory SQLite and a fake clock: keys, enrollment, sessions, opens."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from cryptography import x509

from homeport.crypto import identity
from homeport.crypto.tls import fingerprint
from homeport.server.state import (
    AuthError,
    EnrollError,
    KeyStatus,
    OpenRefused,
    ServerState,
    ago,
    check_name,
    decide_open,
)
from homeport.store.db import NodeRow, default_url, open_store
from homeport.wire import control as m

PIN = "sha256:" + "ab" * 32
T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
def ca() -> identity.KeyPair:
    return identity.create_ca()


@pytest.fixture
def state(ca: identity.KeyPair) -> ServerState[str]:
    return ServerState(open_store("sqlite://"), ca=ca, server_pin=PIN)


def csr(name: str = "labpc") -> str:
    return identity.make_csr(identity.new_private_key_pem(), name).decode()


def enroll(state: ServerState[str], name: str, now: float = T0) -> NodeRow:
    key = state.create_auth_key(now=now)
    e = state.enroll(str(key), name, csr(name), now)
    row = state.store.get_node(e.node_id)
    assert row is not None
    return row


# -- names --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "labpc", "lab-pc-2", "0", "x" * 63, "a-b"])
def test_good_names(name: str) -> None:
    assert check_name(name) is None


@pytest.mark.parametrize(
    "name", ["", "-a", "a-", "LabPC", "lab_pc", "lab.pc", "x" * 64, "lab pc", "ünï", "a\n"]
)
def test_bad_names(name: str) -> None:
    assert check_name(name) is not None


# -- auth keys and enrollment --------------------------------------------------------


def test_enroll_issues_cert_for_server_chosen_id(
    state: ServerState[str], ca: identity.KeyPair
) -> None:
    key = state.create_auth_key(now=T0)
    e = state.enroll(str(key), "labpc", csr(), T0 + 1)
    assert e.node_id.startswith("n") and len(e.node_id) == 13
    cert = x509.load_pem_x509_certificate(e.cert_pem.encode())
    assert cert.subject.rfc4514_string() == f"CN={e.node_id}"
    assert e.ca_pem == ca.cert_pem.decode()
    fp = fingerprint(identity.cert_der_from_pem(e.cert_pem.encode()))
    assert state.authenticate(fp).name == "labpc"


def test_key_is_single_use_by_default(state: ServerState[str]) -> None:
    key = state.create_auth_key(now=T0)
    state.enroll(str(key), "a", csr(), T0)
    with pytest.raises(EnrollError) as exc:
        state.enroll(str(key), "b", csr(), T0)
    assert exc.value.code == "auth-key-used"
    [info] = state.list_auth_keys(T0)
    assert info.status is KeyStatus.USED and info.uses == 1


def test_reusable_key(state: ServerState[str]) -> None:
    key = state.create_auth_key(now=T0, reusable=True)
    for i in range(3):
        state.enroll(str(key), f"n{i}", csr(), T0 + i)
    [info] = state.list_auth_keys(T0)
    assert info.status is KeyStatus.VALID and info.uses == 3


def test_expired_key(state: ServerState[str]) -> None:
    key = state.create_auth_key(now=T0, expiry_seconds=3600)
    with pytest.raises(EnrollError) as exc:
        state.enroll(str(key), "a", csr(), T0 + 3600)
    assert exc.value.code == "auth-key-expired"
    state.enroll(str(key), "a", csr(), T0 + 3599)  # just in time


def test_wrong_secret_and_unknown_id_are_indistinguishable(state: ServerState[str]) -> None:
    key = state.create_auth_key(now=T0)
    wrong_secret = str(key).replace(key.secret, "0" * 32)
    unknown_id = str(key).replace(key.key_id, "f" * 12)
    errors = []
    for text in (wrong_secret, unknown_id):
        with pytest.raises(EnrollError) as exc:
            state.enroll(text, "a", csr(), T0)
        errors.append((exc.value.code, exc.value.message))
    assert errors[0] == errors[1] and errors[0][0] == "auth-key-invalid"
    state.enroll(str(key), "a", csr(), T0)  # the failures did not burn the key


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("garbage", "auth-key-invalid"),
        ("hpk1_" + "0" * 12 + "_" + "0" * 32 + "_" + "cd" * 32, "auth-key-invalid"),  # other server
    ],
)
def test_malformed_or_foreign_keys(state: ServerState[str], text: str, code: str) -> None:
    with pytest.raises(EnrollError) as exc:
        state.enroll(text, "a", csr(), T0)
    assert exc.value.code == code


def test_revoked_key(state: ServerState[str]) -> None:
    key = state.create_auth_key(now=T0, reusable=True)
    assert state.revoke_auth_key(key.key_id)
    with pytest.raises(EnrollError) as exc:
        state.enroll(str(key), "a", csr(), T0)
    assert exc.value.code == "auth-key-invalid"
    assert state.list_auth_keys(T0)[0].status is KeyStatus.REVOKED


def test_bad_name_bad_csr_name_taken(state: ServerState[str]) -> None:
    key = state.create_auth_key(now=T0, reusable=True)
    with pytest.raises(EnrollError) as exc:
        state.enroll(str(key), "Bad_Name", csr(), T0)
    assert exc.value.code == "bad-name"
    with pytest.raises(EnrollError) as exc:
        state.enroll(str(key), "ok", "-----BEGIN CERTIFICATE REQUEST-----\nxx\n", T0)
    assert exc.value.code == "bad-request"
    state.enroll(str(key), "ok", csr(), T0)
    with pytest.raises(EnrollError) as exc:
        state.enroll(str(key), "ok", csr(), T0)
    assert exc.value.code == "name-taken"
    assert state.list_auth_keys(T0)[0].uses == 1  # refused enrollments cost no use


def test_single_use_key_raced_by_threads_has_one_winner(
    ca: identity.KeyPair, tmp_path: Path
) -> None:
    url = default_url(str(tmp_path))
    states: list[ServerState[str]] = [
        ServerState(open_store(url), ca=ca, server_pin=PIN) for _ in range(6)
    ]
    key = states[0].create_auth_key(now=T0)
    csrs = [csr(f"racer{i}") for i in range(len(states))]
    outcomes: list[str] = ["?"] * len(states)
    barrier = threading.Barrier(len(states))

    def go(i: int) -> None:
        barrier.wait()
        try:
            states[i].enroll(str(key), f"racer{i}", csrs[i], T0)
            outcomes[i] = "ok"
        except EnrollError as exc:
            outcomes[i] = exc.code

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(states))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes.count("ok") == 1, outcomes
    assert set(outcomes) == {"ok", "auth-key-used"}
    assert len(states[0].store.list_nodes()) == 1
    for s in states:
        s.store.close()


def test_secret_never_stored(ca: identity.KeyPair, tmp_path: Path) -> None:
    state: ServerState[str] = ServerState(
        open_store(default_url(str(tmp_path))), ca=ca, server_pin=PIN
    )
    key = state.create_auth_key(now=T0, note="for labpc")
    state.enroll(str(key), "labpc", csr(), T0)
    state.store.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert key.secret.encode() not in blob
    assert key.key_id.encode() in blob  # the id is stored (sanity check of the scan)
    assert key.secret not in repr(key)


# -- authentication and removal ------------------------------------------------------------


def test_authenticate_unknown_and_removed(state: ServerState[str]) -> None:
    with pytest.raises(AuthError) as exc:
        state.authenticate("sha256:" + "00" * 32)
    assert exc.value.code == "unknown-node"
    node = enroll(state, "labpc")
    state.session_opened(node.node_id, "client-1")
    assert state.agent_online(node, "agent-1", "192.0.2.1:1", T0) is None
    removal = state.remove_node("labpc", T0 + 5)
    assert set(removal.sessions) == {"client-1", "agent-1"}
    assert not state.is_online(node.node_id)
    with pytest.raises(AuthError) as exc:
        state.authenticate(node.fingerprint)
    assert exc.value.code == "node-removed" and "removed by an admin" in exc.value.message
    with pytest.raises(KeyError):
        state.remove_node("labpc", T0 + 6)
    enroll(state, "labpc")  # the name is free again


# -- sessions, last seen, netmap --------------------------------------------------------------


def test_new_agent_session_replaces_old(state: ServerState[str]) -> None:
    node = enroll(state, "labpc")
    assert state.agent_online(node, "s1", "a:1", T0) is None
    assert state.agent_online(node, "s2", "a:2", T0 + 1) == "s1"
    assert state.agent_offline(node.node_id, "s1", T0 + 2) == []  # stale: no effect
    assert state.agent_session(node.node_id) == "s2"
    state.agent_offline(node.node_id, "s2", T0 + 3)
    assert not state.is_online(node.node_id)


def test_last_seen_writes_are_throttled(state: ServerState[str]) -> None:
    node = enroll(state, "labpc")
    state.agent_online(node, "s", "a:1", T0)
    state.touch(node.node_id, T0 + 10)
    stored = state.store.get_node(node.node_id)
    assert stored is not None and stored.last_seen == T0  # not written yet
    assert state.last_seen(stored) == T0 + 10  # but known in memory
    state.touch(node.node_id, T0 + 31)
    stored = state.store.get_node(node.node_id)
    assert stored is not None and stored.last_seen == T0 + 31
    state.touch(node.node_id, T0 + 40)
    state.agent_offline(node.node_id, "s", T0 + 41)
    stored = state.store.get_node(node.node_id)
    assert stored is not None and stored.last_seen == T0 + 40  # flushed on disconnect


def test_netmap_contents(state: ServerState[str]) -> None:
    a = enroll(state, "alpha")
    b = enroll(state, "beta")
    gone = enroll(state, "gone")
    state.remove_node("gone", T0)
    state.agent_online(a, "sa", "192.0.2.1:5000", T0)
    ssh = m.ServiceInfo("ssh", 22)
    assert state.announce(a.node_id, (ssh,), ("ssh-ed25519 AAAAC3",), T0 + 1)
    assert not state.announce(a.node_id, (ssh,), ("ssh-ed25519 AAAAC3",), T0 + 2)  # unchanged
    nm = state.netmap(b.node_id, T0 + 3)
    assert nm.self_id == b.node_id
    by_name = {n.name: n for n in nm.nodes}
    assert set(by_name) == {"alpha", "beta"}
    assert gone.node_id not in {n.node_id for n in nm.nodes}
    assert by_name["alpha"].online and by_name["alpha"].services == (ssh,)
    assert by_name["alpha"].host_keys == ("ssh-ed25519 AAAAC3",)
    assert by_name["alpha"].fingerprint == a.fingerprint
    assert by_name["alpha"].address == "192.0.2.1:5000"
    assert not by_name["beta"].online
    # a netmap survives a round trip through the wire encoding
    assert m.encode(nm)


def test_announce_drops_unusable_entries(state: ServerState[str]) -> None:
    node = enroll(state, "labpc")
    services = (
        m.ServiceInfo("ssh", 22),
        m.ServiceInfo("ssh", 2222),  # duplicate name
        m.ServiceInfo("web", 0),
        m.ServiceInfo("web", 70000),
        m.ServiceInfo("8080", 8080),  # a name that looks like a port
        m.ServiceInfo("bad name", 80),
        m.ServiceInfo("jupyter", 8888),
    )
    keys = ("ssh-ed25519 AAAA host", "", "garbage", "ssh-rsa AAAA\nssh-evil X")
    assert state.announce(node.node_id, services, keys, T0)
    stored = state.store.get_node(node.node_id)
    assert stored is not None
    assert stored.services == (m.ServiceInfo("ssh", 22), m.ServiceInfo("jupyter", 8888))
    assert stored.host_keys == ("ssh-ed25519 AAAA host",)


# -- open decisions ------------------------------------------------------------------------------


def _row(removed: float | None = None, services: tuple[m.ServiceInfo, ...] = ()) -> NodeRow:
    return NodeRow("n1", "labpc", "sha256:x", "PEM", 0.0, services=services, removed_at=removed)


SSH = m.ServiceInfo("ssh", 22)
WEB = m.ServiceInfo("jupyter", 8888)


@pytest.mark.parametrize(
    ("dst", "online", "last_seen", "service", "allowed", "code", "text"),
    [
        (None, False, None, "22", False, "unknown-node", "no node named"),
        (_row(removed=T0 - 60), False, None, "22", False, "node-removed", "removed by an admin"),
        (_row(services=(SSH,)), False, T0 - 180, "22", False, "offline", "last seen 3 min ago"),
        (_row(services=(SSH,)), False, None, "ssh", False, "offline", "never seen"),
        (_row(services=(SSH,)), True, T0, "80", False, "not-exposed", "ssh/22"),
        (_row(), True, T0, "ssh", False, "not-exposed", "exposed: none"),
        (_row(services=(SSH, WEB)), True, T0, "22", True, "ok", "ssh"),
        (_row(services=(SSH, WEB)), True, T0, "ssh", True, "ok", "ssh"),
        (_row(services=(SSH, WEB)), True, T0, "8888", True, "ok", "jupyter"),
        (_row(services=(SSH, WEB)), True, T0, "jupyter", True, "ok", "jupyter"),
    ],
)
def test_decide_open(
    dst: NodeRow | None,
    online: bool,
    last_seen: float | None,
    service: str,
    allowed: bool,
    code: str,
    text: str,
) -> None:
    v = decide_open(
        "labpc", dst, online=online, last_seen=last_seen, requested_service=service, now=T0
    )
    assert (v.allowed, v.code) == (allowed, code)
    assert text in v.message
    assert (v.service is not None) == allowed


@pytest.mark.parametrize(
    ("seconds", "text"), [(5, "5 s"), (180, "3 min"), (7200, "2 h"), (3 * 86400, "3 days")]
)
def test_ago(seconds: float, text: str) -> None:
    assert ago(seconds) == text


def test_open_stream_lifecycle(state: ServerState[str]) -> None:
    src = enroll(state, "laptop")
    dst = enroll(state, "labpc")
    with pytest.raises(OpenRefused) as exc:
        state.open_stream(src, "c", "labpc", "22", opener_token=b"t" * 16, now=T0)
    assert exc.value.code == "offline"
    state.agent_online(dst, "agent", "a:1", T0)
    state.announce(dst.node_id, (SSH,), (), T0)
    p = state.open_stream(src, "c", "labpc", "22", opener_token=b"t" * 16, now=T0)
    assert p.service == SSH and p.dest_token != p.opener_token and len(p.dest_token) == 16
    with pytest.raises(OpenRefused) as exc:  # the same opener token twice
        state.open_stream(src, "c", "labpc", "22", opener_token=b"t" * 16, now=T0)
    assert exc.value.code == "bad-request"
    assert state.accept_stream(p.stream_id, src.node_id) is None  # only dst may answer
    assert state.accept_stream(p.stream_id, dst.node_id) == p
    assert state.accept_stream(p.stream_id, dst.node_id) is None  # answered once
    # a node may open a stream to itself
    own = state.open_stream(dst, "agent", "labpc", "ssh", opener_token=b"u" * 16, now=T0)
    assert own.src.node_id == own.dst.node_id
    # the destination going offline fails its pending streams
    assert state.agent_offline(dst.node_id, "agent", T0) == [own]
    assert state.pending_count() == 0


def test_remove_fails_pending_streams(state: ServerState[str]) -> None:
    src = enroll(state, "laptop")
    dst = enroll(state, "labpc")
    state.agent_online(dst, "agent", "a:1", T0)
    state.announce(dst.node_id, (SSH,), (), T0)
    p = state.open_stream(src, "c", "labpc", "22", opener_token=b"t" * 16, now=T0)
    removal = state.remove_node("labpc", T0)
    assert removal.failed_streams == (p,)
    assert removal.sessions == ("agent",)
    assert removal.node.node_id == dst.node_id
