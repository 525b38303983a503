"""The real server on 127.0.0.1:0 (thread), driven by hand-made TLS clients.

Covers enrollment, HELLO/WELCOME, ANNOUNCE/NETMAP, a full stream through the
relay, OPEN failures, node removal, session replacement, keepalive timeout,
and hostile input (garbage, huge frames, bad preambles) that must close one
connection and leave the server serving.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homeport.crypto import identity, tls
from homeport.io import tlsctx
from homeport.node.files import write_private
from homeport.proto.netmap import PeerView
from homeport.server.admin import admin_request
from homeport.server.app import ServerHandle, start_server_thread
from homeport.server.service import ServiceConfig
from homeport.testing.deadline import wait_for
from homeport.wire import control as m
from homeport.wire.data import encode_preamble, new_token
from homeport.wire.frame import HEADER, FrameDecoder

DEADLINE = 10.0

CONFIG = ServiceConfig(
    ping_interval=5.0,
    idle_timeout=15.0,
    handshake_timeout=1.0,
    open_timeout=1.0,
    unpaired_timeout=2.0,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    with start_server_thread(tmp_path_factory.mktemp("srv"), config=CONFIG) as srv:
        yield srv


@dataclass
class Node:
    node_id: str
    name: str
    cert: Path
    key: Path
    fingerprint: str


class Ctl:
    """A blocking control-connection client for tests."""

    def __init__(self, srv: ServerHandle, node: Node | None = None) -> None:
        ctx = tlsctx.control_client_context(
            None if node is None else node.cert, None if node is None else node.key
        )
        raw = socket.create_connection((srv.host, srv.port), timeout=DEADLINE)
        self.sock = ctx.wrap_socket(raw)
        tls.check_pin(self.sock.getpeercert(binary_form=True), srv.pin)
        self.decoder = FrameDecoder()
        self.pending: list[m.Message] = []

    def send(self, *msgs: m.Message) -> None:
        self.sock.sendall(b"".join(m.encode(x) for x in msgs))

    def recv(self) -> m.Message:
        """The next message other than PING/PONG; AssertionError on EOF."""
        while True:
            while self.pending:
                msg = self.pending.pop(0)
                if not isinstance(msg, m.Ping | m.Pong):
                    return msg
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("server closed the connection")
            for t, body in self.decoder.feed_untrusted(data):
                self.pending.append(m.decode_untrusted(t, body))

    def recv_type(self, cls: type[m.Message]) -> m.Message:
        """Skip peer-map pushes until a ``cls`` arrives."""
        while True:
            msg = self.recv()
            if isinstance(msg, cls):
                return msg
            assert isinstance(msg, m.NetMap | m.Peers), msg

    def expect_closed(self) -> None:
        """Reads until EOF (ignoring frames)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return
            if not data:
                return

    def close(self) -> None:
        self.sock.close()


def create_key(srv: ServerHandle, **kw: object) -> str:
    answer = admin_request(srv.data_dir, {"op": "keys.create", **kw})
    assert answer["ok"], answer
    return str(answer["key"])


def enroll(srv: ServerHandle, name: str, tmp: Path) -> Node:
    key_pem = identity.new_private_key_pem()
    c = Ctl(srv)
    c.send(
        m.Enroll(
            proto=1,
            auth_key=create_key(srv),
            name=name,
            csr_pem=identity.make_csr(key_pem, name).decode(),
        )
    )
    msg = c.recv()
    assert isinstance(msg, m.Enrolled), msg
    c.expect_closed()
    c.close()
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert.write_text(msg.cert_pem)
    write_private(key, key_pem)
    fp = tls.fingerprint(identity.cert_der_from_pem(msg.cert_pem.encode()))
    return Node(msg.node_id, name, cert, key, fp)


#: A well-formed OpenSSH public key line (an all-zero Ed25519 key).
HOST_KEY = "ssh-ed25519 " + base64.b64encode(
    struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes(32)
).decode("ascii")


def hello(srv: ServerHandle, node: Node, role: str, *, capver: int = 1) -> Ctl:
    """HELLO as a first-release node (capver 1) by default; capver 2 announces ``peers``."""
    c = Ctl(srv, node)
    caps = m.OUR_CAPS if capver >= 2 else ()
    c.send(m.Hello(proto=1, role=role, capver=capver, caps=caps))
    w = c.recv()
    assert isinstance(w, m.Welcome), w
    assert (w.node_id, w.name) == (node.node_id, node.name)
    return c


def agent(
    srv: ServerHandle, node: Node, services: tuple[m.ServiceInfo, ...], *, capver: int = 2
) -> Ctl:
    """An agent that has announced and (capver 2) seen itself online in its peer map."""
    c = hello(srv, node, "agent", capver=capver)
    c.send(m.Announce(services=services, host_keys=(HOST_KEY,)))
    if capver >= 2:
        view = PeerView()
        while True:
            msg = c.recv_type(m.Peers)
            assert isinstance(msg, m.Peers)
            view.apply(msg)
            me = view.peers.get(node.node_id)
            if me is not None and me.online and me.services == services:
                return c
    return c


def data_conn(srv: ServerHandle, token: bytes) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port), timeout=DEADLINE)
    s.sendall(encode_preamble(token))
    return s


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError("EOF")
        buf += chunk
    return bytes(buf)


def still_serving(srv: ServerHandle) -> None:
    """A fresh TLS control connection still gets an answer."""
    c = Ctl(srv)
    c.send(m.Enroll(proto=1, auth_key="nope", name="x", csr_pem=""))
    err = c.recv()
    assert isinstance(err, m.Error) and err.code == "auth-key-invalid"
    c.close()


def is_closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (EOF or reset) before its timeout (DEADLINE).

    A timeout is *not* a close: a server that never closed must fail the test.
    """
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def server_logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    """Whether the server (its own thread) logged a line containing ``text``."""
    return any(text in r.getMessage() for r in caplog.records if r.name == "homeport.server")


_counter = iter(range(10_000))


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}"


# -- enrollment and hello ----------------------------------------------------------


def test_enroll_then_hello(server: ServerHandle, tmp_path: Path) -> None:
    node = enroll(server, unique("lab"), tmp_path)
    c = hello(server, node, "client")
    c.send(m.NetMapRequest())
    nm = c.recv()
    assert isinstance(nm, m.NetMap) and node.node_id in {n.node_id for n in nm.nodes}
    c.close()
    listed = admin_request(server.data_dir, {"op": "nodes.list"})
    assert node.name in {n["name"] for n in listed["nodes"]}


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda k: "hpk1_garbage", "auth-key-invalid"),
        (lambda k: k[:18] + "0" * 32 + k[50:], "auth-key-invalid"),  # wrong secret
    ],
)
def test_enroll_bad_key(server: ServerHandle, mutate: Callable[[str], str], code: str) -> None:
    key = create_key(server)
    c = Ctl(server)
    csr = identity.make_csr(identity.new_private_key_pem(), "x").decode()
    c.send(m.Enroll(proto=1, auth_key=mutate(key), name="x", csr_pem=csr))
    err = c.recv()
    assert isinstance(err, m.Error) and err.code == code
    c.expect_closed()
    c.close()


def test_enroll_used_key_and_bad_name(server: ServerHandle, tmp_path: Path) -> None:
    key = create_key(server)
    csr = identity.make_csr(identity.new_private_key_pem(), "x").decode()
    for name, code in [
        ("Bad Name", "bad-name"),
        (unique("ok"), None),
        (unique("ok"), "auth-key-used"),
    ]:
        c = Ctl(server)
        c.send(m.Enroll(proto=1, auth_key=key, name=name, csr_pem=csr))
        msg = c.recv()
        if code is None:
            assert isinstance(msg, m.Enrolled)
        else:
            assert isinstance(msg, m.Error) and msg.code == code, msg
        c.close()


def test_hello_without_certificate(server: ServerHandle) -> None:
    c = Ctl(server)
    c.send(m.Hello(proto=1, role="client"))
    err = c.recv()
    assert isinstance(err, m.Error) and err.code == "unknown-node"
    c.close()


def test_hello_wrong_version_and_role(server: ServerHandle, tmp_path: Path) -> None:
    node = enroll(server, unique("v"), tmp_path)
    for msg, code in [
        (m.Hello(proto=99, role="client"), "upgrade"),
        (m.Hello(proto=1, role="client", capver=0), "upgrade"),
        (m.Hello(proto=1, role="king"), "bad-request"),
    ]:
        c = Ctl(server, node)
        c.send(msg)
        err = c.recv()
        assert isinstance(err, m.Error) and err.code == code
        c.close()


# -- streams -----------------------------------------------------------------------------


def test_full_stream_through_relay(server: ServerHandle, tmp_path: Path) -> None:
    lab = enroll(server, unique("labpc"), tmp_path)
    laptop = enroll(server, unique("laptop"), tmp_path)
    a = agent(server, lab, (m.ServiceInfo("ssh", 22),))
    c = hello(server, laptop, "client")
    tc = new_token()
    opener_data = data_conn(server, tc)  # dialed together with OPEN, like nc does
    c.send(m.Open(dst=lab.name, service="22", token=tc.hex()))
    inc = a.recv_type(m.Incoming)
    assert isinstance(inc, m.Incoming)
    assert inc.src.node_id == laptop.node_id and inc.src.fingerprint == laptop.fingerprint
    assert inc.service == "ssh"
    a.send(m.Accept(stream_id=inc.stream_id))
    agent_data = data_conn(server, bytes.fromhex(inc.token))
    opened = c.recv_type(m.Opened)
    assert isinstance(opened, m.Opened)
    assert opened.token == tc.hex() and opened.stream_id == inc.stream_id and opened.port == 22
    assert opened.peer.fingerprint == lab.fingerprint
    assert opened.peer.host_keys == (HOST_KEY,)
    payload = os.urandom(512 * 1024)
    opener_data.sendall(payload)
    assert recv_exact(agent_data, len(payload)) == payload
    agent_data.sendall(b"SSH-2.0-test\r\n")
    assert recv_exact(opener_data, 14) == b"SSH-2.0-test\r\n"
    opener_data.shutdown(socket.SHUT_WR)
    assert agent_data.recv(1) == b""  # half-close crossed the relay
    agent_data.sendall(b"bye")
    assert recv_exact(opener_data, 3) == b"bye"
    agent_data.close()
    assert opener_data.recv(1) == b""
    opener_data.close()
    for x in (a, c):
        x.close()


def test_open_failures(server: ServerHandle, tmp_path: Path) -> None:
    lab = enroll(server, unique("lab"), tmp_path)
    laptop = enroll(server, unique("laptop"), tmp_path)
    c = hello(server, laptop, "client")

    def open_fails(dst: str, service: str) -> m.OpenFailed:
        token = new_token()
        d = data_conn(server, token)
        c.send(m.Open(dst=dst, service=service, token=token.hex()))
        msg = c.recv_type(m.OpenFailed)
        assert isinstance(msg, m.OpenFailed) and msg.token == token.hex()
        assert is_closed(d)  # the relay closed the opener's data connection
        d.close()
        return msg

    assert open_fails("no-such-node", "22").code == "unknown-node"
    f = open_fails(lab.name, "22")
    assert f.code == "offline" and lab.name in f.message
    a = agent(server, lab, (m.ServiceInfo("ssh", 22),))
    f = open_fails(lab.name, "8080")
    assert f.code == "not-exposed" and "ssh/22" in f.message
    # the agent refuses
    token = new_token()
    c.send(m.Open(dst=lab.name, service="ssh", token=token.hex()))
    inc = a.recv_type(m.Incoming)
    assert isinstance(inc, m.Incoming)
    a.send(m.Reject(stream_id=inc.stream_id, code="refused", message="not today"))
    f2 = c.recv_type(m.OpenFailed)
    assert isinstance(f2, m.OpenFailed) and (f2.code, f2.message) == ("refused", "not today")
    # the agent never answers: timeout (open_timeout = 1 s)
    token = new_token()
    c.send(m.Open(dst=lab.name, service="ssh", token=token.hex()))
    a.recv_type(m.Incoming)
    f3 = c.recv_type(m.OpenFailed)
    assert isinstance(f3, m.OpenFailed) and f3.code == "timeout"
    # a bad token
    c.send(m.Open(dst=lab.name, service="ssh", token="zz"))
    f4 = c.recv_type(m.OpenFailed)
    assert isinstance(f4, m.OpenFailed) and f4.code == "bad-request"
    # the agent goes away while a stream waits for it
    token = new_token()
    c.send(m.Open(dst=lab.name, service="ssh", token=token.hex()))
    a.recv_type(m.Incoming)
    a.close()
    f5 = c.recv_type(m.OpenFailed)
    assert isinstance(f5, m.OpenFailed) and f5.code == "offline"
    c.close()


def test_self_stream_allowed(server: ServerHandle, tmp_path: Path) -> None:
    lab = enroll(server, unique("self"), tmp_path)
    a = agent(server, lab, (m.ServiceInfo("web", 8080),))
    token = new_token()
    a.send(m.Open(dst=lab.name, service="web", token=token.hex()))
    inc = a.recv_type(m.Incoming)
    assert isinstance(inc, m.Incoming) and inc.src.node_id == lab.node_id
    a.close()


def test_peer_map_pushed_to_agents_on_change(server: ServerHandle, tmp_path: Path) -> None:
    one = enroll(server, unique("one"), tmp_path)
    two = enroll(server, unique("two"), tmp_path)
    a1 = agent(server, one, ())
    view = PeerView()
    view.expect_full()  # a fresh view cannot apply deltas: ask for a full map first
    a1.send(m.NetMapRequest())

    def until(pred: Callable[[], bool]) -> None:
        while not pred():
            msg = a1.recv_type(m.Peers)
            assert isinstance(msg, m.Peers)
            view.apply(msg)

    def peer(node_id: str) -> m.Peer | None:
        return view.peers.get(node_id)

    a2 = agent(server, two, (m.ServiceInfo("ssh", 22),))
    until(lambda: (p := peer(two.node_id)) is not None and p.online and bool(p.services))
    a2.close()
    until(lambda: (p := peer(two.node_id)) is not None and not p.online)
    a1.close()


def test_first_release_agent_is_served_without_peer_maps(
    server: ServerHandle, tmp_path: Path
) -> None:
    """A capver-1 agent (no caps) still gets streams; it is never sent a PEERS frame."""
    lab = enroll(server, unique("old"), tmp_path)
    laptop = enroll(server, unique("new"), tmp_path)
    a = agent(server, lab, (m.ServiceInfo("ssh", 22),), capver=1)
    c = hello(server, laptop, "client", capver=2)
    wait_for(
        lambda: bool(
            [
                n
                for n in admin_request(server.data_dir, {"op": "nodes.list"})["nodes"]
                if n["name"] == lab.name and n["online"] and n["services"]
            ]
        )
    )
    token = new_token()
    c.send(m.Open(dst=lab.name, service="ssh", token=token.hex()))
    inc = a.recv()  # the very next frame: no PEERS (or NETMAP) came before it
    assert isinstance(inc, m.Incoming), inc
    c.send(m.NetMapRequest())  # a capver-2 client asks: PEERS, a full map
    full = c.recv_type(m.Peers)
    assert isinstance(full, m.Peers) and full.reset
    old_client = hello(server, laptop, "client", capver=1)
    old_client.send(m.NetMapRequest())  # a first-release `homeport status`: the old NETMAP
    nm = old_client.recv()
    assert isinstance(nm, m.NetMap)
    assert any(n.name == lab.name and n.online and not n.host_keys for n in nm.nodes)
    for x in (a, c, old_client):
        x.close()


# -- sessions -------------------------------------------------------------------------------


def test_new_agent_session_replaces_old(server: ServerHandle, tmp_path: Path) -> None:
    lab = enroll(server, unique("dup"), tmp_path)
    old = agent(server, lab, ())
    new = agent(server, lab, ())
    err = old.recv_type(m.Error)
    assert isinstance(err, m.Error) and err.code == "session-replaced"
    old.expect_closed()
    online = {
        n["name"]: n["online"]
        for n in admin_request(server.data_dir, {"op": "nodes.list"})["nodes"]
    }
    assert online[lab.name]
    new.close()
    old.close()


def test_remove_node_cuts_sessions_and_streams(server: ServerHandle, tmp_path: Path) -> None:
    lab = enroll(server, unique("rm"), tmp_path)
    laptop = enroll(server, unique("laptop"), tmp_path)
    a = agent(server, lab, (m.ServiceInfo("ssh", 22),))
    c = hello(server, laptop, "client")
    tc = new_token()
    od = data_conn(server, tc)
    c.send(m.Open(dst=lab.name, service="ssh", token=tc.hex()))
    inc = a.recv_type(m.Incoming)
    assert isinstance(inc, m.Incoming)
    a.send(m.Accept(stream_id=inc.stream_id))
    ad = data_conn(server, bytes.fromhex(inc.token))
    c.recv_type(m.Opened)
    od.sendall(b"hi")
    assert recv_exact(ad, 2) == b"hi"
    answer = admin_request(server.data_dir, {"op": "nodes.remove", "name": lab.name})
    assert answer["ok"] and answer["node_id"] == lab.node_id
    err = a.recv_type(m.Error)
    assert isinstance(err, m.Error) and err.code == "node-removed"
    assert is_closed(od) and is_closed(ad)  # the open stream was cut at once
    # it cannot come back with its old certificate
    c2 = Ctl(server, lab)
    c2.send(m.Hello(proto=1, role="agent"))
    err2 = c2.recv()
    assert isinstance(err2, m.Error) and err2.code == "node-removed"
    assert "removed by an admin" in err2.message
    for x in (a, c, c2):
        x.close()
    for s in (od, ad):
        s.close()
    again = admin_request(server.data_dir, {"op": "nodes.remove", "name": lab.name})
    assert not again["ok"] and "no node" in again["error"]


# -- hostile input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # neither TLS nor data
        os.urandom(64).replace(b"\x16", b"\x00").replace(b"H", b"\x00"),
        b"HPD\x02" + b"\x00" * 16,  # bad version
        b"HXX\x01" + b"\x00" * 16,  # bad magic
        b"\x16\x03\x01\x00\x05garbage-that-is-no-tls-handshake",
    ],
    ids=["http", "random", "preamble-version", "preamble-magic", "fake-tls"],
)
def test_garbage_closes_only_that_connection(server: ServerHandle, payload: bytes) -> None:
    s = socket.create_connection((server.host, server.port), timeout=DEADLINE)
    s.sendall(payload)
    assert is_closed(s)
    s.close()
    still_serving(server)


def test_silent_connection_is_closed_after_handshake_timeout(
    server: ServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="homeport.server")
    s = socket.create_connection((server.host, server.port), timeout=DEADLINE)
    assert is_closed(s)
    s.close()
    wait_for(
        lambda: server_logged(caplog, f"sent nothing within {CONFIG.handshake_timeout:g}s"),
        DEADLINE,
        "the handshake timeout to be the reason",
    )
    partial = socket.create_connection((server.host, server.port), timeout=DEADLINE)
    partial.sendall(b"HPD")  # a preamble that never completes
    assert is_closed(partial)
    partial.close()
    wait_for(
        lambda: server_logged(caplog, f"no preamble within {CONFIG.handshake_timeout:g}s"),
        DEADLINE,
        "the preamble timeout to be the reason",
    )
    still_serving(server)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (HEADER.pack(0x7FFFFFFF, 1), "too-large"),
        (HEADER.pack(6, 0x7E) + b"{}{}{", "unknown-type"),  # below the ignorable range
        (HEADER.pack(4, 0x03) + b"{x}", "malformed"),
        (m.encode(m.NetMapRequest()), "order"),
    ],
    ids=["huge-length", "unknown-type", "bad-json", "wrong-first-message"],
)
def test_malformed_frames_get_error_and_close(
    server: ServerHandle, frame: bytes, code: str
) -> None:
    c = Ctl(server)
    c.sock.sendall(frame)
    err = c.recv()
    assert isinstance(err, m.Error) and err.code == code, err
    c.expect_closed()
    c.close()
    still_serving(server)


def test_unauthenticated_tls_without_opener_is_closed(
    server: ServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="homeport.server")
    c = Ctl(server)
    c.expect_closed()
    c.close()
    wait_for(
        lambda: server_logged(caplog, "no HELLO or ENROLL within"),
        DEADLINE,
        "the opener timeout to be the reason",
    )


def _alpn_client(srv: ServerHandle, alpn: list[str] | None) -> ssl.SSLSocket:
    """A TLS client that differs from :class:`Ctl` only in the ALPN it offers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection((srv.host, srv.port), timeout=DEADLINE)
    s = ctx.wrap_socket(raw)  # the handshake itself succeeds: OpenSSL does not refuse
    tls.check_pin(s.getpeercert(binary_form=True), srv.pin)
    return s


def _answer_to_out_of_order_frame(s: ssl.SSLSocket) -> m.Message | None:
    """Send NETMAP_REQUEST first (an order error); the server's answer, or None if it
    closed the connection without one."""
    try:
        s.sendall(m.encode(m.NetMapRequest()))
        decoder = FrameDecoder()
        while True:
            data = s.recv(65536)
            if not data:
                return None
            for t, body in decoder.feed_untrusted(data):
                return m.decode_untrusted(t, body)
    except (ssl.SSLError, ConnectionError):
        return None
    finally:
        s.close()


@pytest.mark.parametrize("alpn", [["h2"], None], ids=["h2", "no-alpn"])
def test_wrong_alpn_is_refused(
    server: ServerHandle, caplog: pytest.LogCaptureFixture, alpn: list[str] | None
) -> None:
    """The same client and frame get an answer with the right ALPN and none without it,
    and the server says the ALPN is why: the ALPN check is what refuses."""
    caplog.set_level(logging.INFO, logger="homeport.server")
    right = _answer_to_out_of_order_frame(_alpn_client(server, [tls.ALPN_CONTROL]))
    assert isinstance(right, m.Error) and right.code == "order", right
    assert not server_logged(caplog, "ALPN is")
    wrong = _alpn_client(server, alpn)
    assert wrong.selected_alpn_protocol() is None
    assert _answer_to_out_of_order_frame(wrong) is None
    wait_for(
        lambda: server_logged(caplog, f"ALPN is None, not {tls.ALPN_CONTROL!r}"),
        DEADLINE,
        "the server to log the ALPN refusal",
    )
    still_serving(server)


def test_unauthenticated_slots_are_released(tmp_path: Path) -> None:
    """Every way an unauthenticated connection ends gives its slot back, and a
    connection that authenticates gives it back while it stays open.

    Its own server, so the count starts at a known zero whatever ran before.
    """
    cfg = ServiceConfig(handshake_timeout=60.0, idle_timeout=60.0)
    with start_server_thread(tmp_path / "srv", config=cfg) as srv:
        assert srv.service is not None
        service = srv.service
        assert service.unauthenticated == 0
        node = enroll(srv, "slots", tmp_path)
        wait_for(lambda: service.unauthenticated == 0, DEADLINE, "enrollment's slot back")
        silent = socket.create_connection((srv.host, srv.port), timeout=DEADLINE)
        partial = socket.create_connection((srv.host, srv.port), timeout=DEADLINE)
        partial.sendall(b"HPD")
        tls_idle = Ctl(srv)  # TLS done, no HELLO yet
        authed = Ctl(srv, node)
        wait_for(lambda: service.unauthenticated == 4, DEADLINE, "4 unauthenticated slots")
        authed.send(m.Hello(proto=1, role="client"))
        assert isinstance(authed.recv(), m.Welcome)
        wait_for(lambda: service.unauthenticated == 3, DEADLINE, "HELLO to release its slot")
        silent.close()
        partial.close()
        tls_idle.close()
        wait_for(lambda: service.unauthenticated == 0, DEADLINE, "closed connections' slots")
        authed.close()
        still_serving(srv)
        wait_for(lambda: service.unauthenticated == 0, DEADLINE, "still_serving's slot")


# -- keepalive ---------------------------------------------------------------------------------


def test_idle_agent_goes_offline(tmp_path: Path) -> None:
    cfg = ServiceConfig(idle_timeout=0.5, handshake_timeout=2.0)
    with start_server_thread(tmp_path / "srv", config=cfg) as srv:
        lab = enroll(srv, "idle", tmp_path)
        a = agent(srv, lab, ())

        def online() -> bool:
            nodes = admin_request(srv.data_dir, {"op": "nodes.list"})["nodes"]
            return bool(nodes[0]["online"])

        assert online()
        a.expect_closed()  # we never PING: the server times us out
        wait_for(lambda: not online(), DEADLINE, "the idle agent to go offline")
        a.close()


def test_unauthenticated_limit(tmp_path: Path) -> None:
    """At the global limit a newcomer is admitted and the oldest pending one evicted."""
    # The handshake timeout is far beyond DEADLINE: a close seen within DEADLINE can
    # only be the eviction, not the timeout.
    cfg = ServiceConfig(handshake_timeout=600.0, max_unauthenticated=2)
    with start_server_thread(tmp_path / "srv", config=cfg) as srv:
        assert srv.service is not None
        service = srv.service
        silent = [
            socket.create_connection((srv.host, srv.port), timeout=DEADLINE) for _ in range(2)
        ]
        wait_for(lambda: service.unauthenticated == 2, DEADLINE, "2 unauthenticated slots")
        extra = socket.create_connection((srv.host, srv.port), timeout=DEADLINE)
        assert is_closed(silent[0])  # the oldest goes; the handshake timeout is 600 s
        wait_for(lambda: service.unauthenticated == 2, DEADLINE, "the newcomer admitted")
        silent[1].settimeout(0.2)
        extra.settimeout(0.2)
        assert not is_closed(silent[1]) and not is_closed(extra)
        for s in [*silent, extra]:
            s.close()
        wait_for(lambda: service.unauthenticated == 0, DEADLINE, "the slots back")
        still_serving(srv)
