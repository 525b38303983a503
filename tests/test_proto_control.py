"""The control-connection machine, tested as an in-memory pair with a fake clock."""

from __future__ import annotations

import pytest

from homeport.proto.control import (
    ConnectionClosed,
    ControlConnection,
    LocalProtocolError,
    MessageReceived,
    Role,
    State,
)
from homeport.wire import control as m


def transfer(a: ControlConnection, b: ControlConnection, now: float) -> list[object]:
    """Move a's pending bytes into b and return b's events."""
    data = a.data_to_send()
    if data:
        b.receive_data(data, now)
    events: list[object] = []
    while (ev := b.next_event()) is not None:
        events.append(ev)
    return events


def pair(now: float = 0.0) -> tuple[ControlConnection, ControlConnection]:
    return ControlConnection(Role.CLIENT, now), ControlConnection(Role.SERVER, now)


def test_hello_welcome_then_ready() -> None:
    c, s = pair()
    c.send(m.Hello(proto=1, role="agent"))
    assert transfer(c, s, 0.1) == [MessageReceived(m.Hello(proto=1, role="agent"))]
    s.send(m.Welcome(proto=1, node_id="n1", name="labpc", ping_interval=5.0))
    assert [type(e) for e in transfer(s, c, 0.2)] == [MessageReceived]
    assert c.state is State.READY and s.state is State.READY


def test_pipelined_open_before_welcome_is_accepted_by_server() -> None:
    """nc sends HELLO and OPEN back to back to save a round trip."""
    c, s = pair()
    c.send(m.Hello(proto=1, role="client"))
    # the client may not send OPEN before WELCOME by state, so nc queues raw frames
    raw = c.data_to_send() + m.encode(m.Open(dst="labpc", service="22", token="00" * 16))
    s.receive_data(raw, 0.0)
    kinds = [type(e.message) for e in iter(s.next_event, None) if isinstance(e, MessageReceived)]
    assert kinds == [m.Hello, m.Open]


def test_server_rejects_non_opener_first() -> None:
    _, s = pair()
    s.receive_data(m.encode(m.Open(dst="x", service="22", token="00" * 16)), 0.0)
    ev = s.next_event()
    assert isinstance(ev, ConnectionClosed) and ev.code == "protocol:order"
    assert s.state is State.CLOSED


def test_client_must_open_with_hello_or_enroll() -> None:
    c, _ = pair()
    with pytest.raises(LocalProtocolError):
        c.send(m.Ping(seq=1))


def test_ping_answered_automatically_and_not_surfaced() -> None:
    c, s = pair()
    c.send(m.Hello(proto=1, role="agent"))
    transfer(c, s, 0.0)
    s.send(m.Welcome(proto=1, node_id="n", name="a", ping_interval=5))
    transfer(s, c, 0.0)
    c.handle_timer(5.0)  # ping due
    assert transfer(c, s, 5.0) == []  # PING is not an event
    assert transfer(s, c, 5.0) == []  # PONG is not an event
    assert not c.closed


def test_client_ping_schedule_and_dead_link_detection() -> None:
    c, s = pair()
    c.send(m.Hello(proto=1, role="agent"))
    transfer(c, s, 0.0)
    assert c.get_timer() == 5.0
    c.handle_timer(5.0)
    assert c.get_timer() == 10.0
    # the server never answers: after 15 s of silence the link is declared dead
    c.handle_timer(10.0)
    c.handle_timer(15.0)
    ev = [e for e in iter(c.next_event, None)]
    assert isinstance(ev[-1], ConnectionClosed) and ev[-1].code == "timeout"
    assert c.get_timer() is None


def test_a_slow_tls_handshake_is_not_counted_as_silence() -> None:
    # made at TCP connect (t=0); TLS took 20 s, longer than the 15 s idle timeout
    c = ControlConnection(Role.CLIENT, 0.0)
    c.transport_ready(20.0)
    assert c.get_timer() == 25.0  # the first PING is due a ping interval after TLS
    c.handle_timer(25.0)
    assert c.next_event() is None and c.get_timer() == 30.0
    c.handle_timer(35.0)  # 15 s of real silence after TLS: dead
    ev = c.next_event()
    assert isinstance(ev, ConnectionClosed) and ev.code == "timeout"
    # without it the link would have died at once
    d = ControlConnection(Role.CLIENT, 0.0)
    d.handle_timer(20.0)
    ev = d.next_event()
    assert isinstance(ev, ConnectionClosed) and ev.code == "timeout"


def test_server_idle_timeout_marks_peer_gone() -> None:
    c, s = pair()
    c.send(m.Hello(proto=1, role="agent"))
    transfer(c, s, 1.0)
    s.next_event()
    assert s.get_timer() == 16.0
    s.handle_timer(15.9)
    assert not s.closed
    s.handle_timer(16.0)
    assert s.closed


def test_error_message_closes_and_is_surfaced() -> None:
    c, s = pair()
    c.send(m.Hello(proto=1, role="agent"))
    transfer(c, s, 0.0)
    s.send(m.Error(code="node-removed", message="removed by an admin"))
    assert s.state is State.CLOSED
    events = transfer(s, c, 0.0)
    assert events[0] == MessageReceived(m.Error(code="node-removed", message="removed by an admin"))
    assert isinstance(events[1], ConnectionClosed) and events[1].code == "remote:node-removed"


def test_garbage_closes_with_reason() -> None:
    _, s = pair()
    s.receive_data(b"\x00\x00\x00\x02\x7e{", 0.0)  # unknown, must-understand range
    ev = s.next_event()
    assert isinstance(ev, ConnectionClosed) and ev.code.startswith("protocol:")
    # further input is ignored, no exception
    s.receive_data(b"more", 0.0)


def test_eof_closes() -> None:
    c, _ = pair()
    c.send(m.Hello(proto=1, role="client"))
    c.receive_data(b"", 1.0)
    ev = c.next_event()
    assert isinstance(ev, ConnectionClosed) and ev.code == "eof"


def test_send_after_close_is_a_local_error() -> None:
    c, _ = pair()
    c.receive_data(b"", 0.0)
    with pytest.raises(LocalProtocolError):
        c.send(m.Hello(proto=1, role="client"))


# -- capabilities ----------------------------------------------------------------


def test_unknown_ignorable_type_is_skipped_not_fatal() -> None:
    c, s = pair()
    c.send(m.Hello(proto=1, role="agent", capver=m.CAPVER, caps=m.OUR_CAPS))
    transfer(c, s, 0.0)
    # a newer peer's optional message (0xee), then a known one: the first is skipped
    s.receive_data(b"\x00\x00\x00\x03\xee{}" + m.encode(m.NetMapRequest()), 0.0)
    assert s.state is not State.CLOSED
    assert s.ignored == 1
    assert s.next_event() == MessageReceived(m.NetMapRequest())


def test_unknown_type_below_the_ignorable_range_is_fatal() -> None:
    c, s = pair()
    c.send(m.Hello(proto=1, role="agent"))
    transfer(c, s, 0.0)
    s.receive_data(b"\x00\x00\x00\x03\x7f{}", 0.0)
    ev = s.next_event()
    assert isinstance(ev, ConnectionClosed) and ev.code == "protocol:unknown-type"


def test_capabilities_are_learned_from_hello_and_welcome() -> None:
    c, s = pair()
    c.send(m.Hello(proto=1, role="agent", capver=7, caps=(m.CAP_PEERS, "from-the-future")))
    transfer(c, s, 0.0)
    assert s.peer_capver == 7
    assert s.peer_caps == frozenset({m.CAP_PEERS})  # unknown names are dropped
    s.send(m.Welcome(proto=1, node_id="n1", name="a", ping_interval=5.0, capver=2, caps=()))
    transfer(s, c, 0.0)
    assert c.peer_capver == 2 and c.peer_caps == frozenset()


def test_sends_are_gated_on_the_peers_capabilities() -> None:
    c, s = pair()
    c.send(m.Hello(proto=1, role="agent"))  # a first-release peer: no caps
    transfer(c, s, 0.0)
    s.send(m.Welcome(proto=1, node_id="n1", name="a", ping_interval=5.0))
    peers = m.Peers(version=1, base=0, reset=True)
    assert not s.may_send(m.MsgType.PEERS)
    with pytest.raises(LocalProtocolError):
        s.send(peers)
    c2, s2 = pair()
    c2.send(m.Hello(proto=1, role="agent", capver=m.CAPVER, caps=m.OUR_CAPS))
    transfer(c2, s2, 0.0)
    s2.send(m.Welcome(proto=1, node_id="n1", name="a", ping_interval=5.0))
    s2.send(peers)
    assert [e for e in transfer(s2, c2, 0.0) if isinstance(e, MessageReceived)][-1] == (
        MessageReceived(peers)
    )


def test_first_release_hello_decodes_with_capver_1() -> None:
    body = b'{"proto":1,"role":"agent","software":"homeport/0.1.0"}'
    msg = m.decode_untrusted(m.MsgType.HELLO, body)
    assert msg == m.Hello(proto=1, role="agent", software="homeport/0.1.0", capver=1, caps=())
